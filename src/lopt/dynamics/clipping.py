"""Gradient clipping: the update function at the initial state over a wide range of gradients (SPEC §5.7).

Saturation threshold (our definition): the knee of the equivalent hard clip. With slope s = dU/dg at 0 and
saturation level S = the largest |U(g) - U(0)| on one side, the update looks like -alpha clip(g, c) with alpha = -s
and c = S / |s|, the gradient at which the linear part would reach the saturation level. For an exact clip at c
this gives c; for a tanh of width c it gives c. It is reported per side and as their mean. The function counts as
saturating on a side only when its slope at the end of the range has fallen below SATURATED_SLOPE times the slope
at 0; otherwise the update is linear over the range and no threshold is reported.
"""

from __future__ import annotations

import numpy as np

from lopt.dynamics.update_functions import update_function, update_slope

SATURATED_SLOPE = 0.1  # (ours)
RANGE_FACTOR = 10.0    # default range: this many times the 99.9th percentile of |observed gradient| (ours)
NUM_GRID = 801


def gradient_range(observed_gradients, factor: float = RANGE_FACTOR) -> float:
  """Half-width of the default gradient grid from the gradients actually seen."""
  g = np.abs(np.asarray(observed_gradients, np.float64).ravel())
  g = g[np.isfinite(g)]
  top = float(np.quantile(g, 0.999)) if g.size else 0.0
  return factor * top if top > 0 else 1.0


def clipping_profile(step, readout, h0, observed_gradients=None, *, limit: float | None = None,
                     num: int = NUM_GRID) -> dict:
  """U_{h0}(g) on a symmetric grid, the slope, the saturation threshold, and the density of observed gradients.

  Args:
    step, readout: the map and its readout.
    h0: (H,) the initial state.
    observed_gradients: any shape, gradients seen while optimizing (for the density and the default range).
    limit: grid half-width (default: RANGE_FACTOR times the 99.9th percentile of |observed|, or 1).
    num: grid points (odd, so 0 is on the grid).

  Returns:
    dict with "gradients" (num,), "updates" (num,), "slope_at_zero", per-side "saturation" levels, "saturating"
    flags and "thresholds", "threshold" (mean over saturating sides, None if neither saturates),
    "fraction_beyond_threshold" of observed gradients, and "density" = (bin edges, density) of observed gradients.
  """
  if limit is None:
    limit = gradient_range(observed_gradients) if observed_gradients is not None else 1.0
  grid = np.linspace(-limit, limit, num)
  h0 = np.asarray(h0)
  updates = np.asarray(update_function(step, readout, h0, grid.astype(h0.dtype)), np.float64)
  slope0 = float(update_slope(step, readout, h0, 0.0))
  end_slopes = np.asarray([float(update_slope(step, readout, h0, s * limit)) for s in (-1.0, 1.0)])
  at_zero = updates[num // 2]
  sides = {"negative": grid < 0, "positive": grid > 0}
  result = {"gradients": grid, "updates": updates, "limit": float(limit), "slope_at_zero": slope0,
            "offset": float(at_zero), "saturation": {}, "saturating": {}, "thresholds": {}}
  for (name, mask), end_slope in zip(sides.items(), end_slopes):
    level = float(np.max(np.abs(updates[mask] - at_zero)))
    saturating = abs(slope0) > 0 and abs(end_slope) < SATURATED_SLOPE * abs(slope0)
    result["saturation"][name] = level
    result["saturating"][name] = bool(saturating)
    result["thresholds"][name] = level / abs(slope0) if saturating else None
  found = [t for t in result["thresholds"].values() if t is not None]
  result["threshold"] = float(np.mean(found)) if found else None
  if observed_gradients is not None:
    g = np.asarray(observed_gradients, np.float64).ravel()
    g = g[np.isfinite(g)]
    density, edges = np.histogram(g, bins=80, range=(-limit, limit), density=True)
    result["density"] = (edges, density)
    result["fraction_beyond_threshold"] = (float(np.mean(np.abs(g) > result["threshold"]))
                                           if result["threshold"] is not None and g.size else None)
  return result
