"""Learning-rate adaptation: fixed points for constant gradients g* and alpha_eff along them (SPEC §5.9).

Under a constant gradient the state settles at a fixed point h*(g*); the curve h*(g*) over a sweep of g* (both signs)
is the paper's S-curve, one arm per sign. alpha_eff(h*(g*)) against |g*| shows whether the optimizer lowers its
learning rate for large gradients, as RMSProp does: at its steady state under constant g*, RMSProp's second moment is
g*^2, so alpha_eff = a / sqrt(g*^2 + eps).
"""

from __future__ import annotations

import numpy as np

from lopt.dynamics._precision import default_dtype, precision
from lopt.dynamics.fixed_points import find_fixed_points
from lopt.dynamics.update_functions import effective_learning_rate

NUM_GRADIENTS = 15   # per sign (ours)
MAX_SEEDS = 256      # seeds per g* (ours)


def gradient_sweep(limit: float, num: int = NUM_GRADIENTS) -> np.ndarray:
  """(2 num,) g* values, log-spaced over [limit/100, limit] on each side, negative first."""
  positive = np.geomspace(limit / 100.0, limit, num)
  return np.concatenate([-positive[::-1], positive])


def rmsprop_reference(gradients, learning_rate: float, eps: float) -> np.ndarray:
  """RMSProp's alpha_eff at its steady state under constant g*: learning_rate / sqrt(g*^2 + eps)."""
  g = np.asarray(gradients, np.float64)
  return learning_rate / np.sqrt(g * g + eps)


def fit_rmsprop(gradients, alpha_eff) -> dict | None:
  """Least-squares fit of a / sqrt(g^2 + eps): 1/alpha^2 = g^2/a^2 + eps/a^2 is linear in g^2.

  Returns {"learning_rate", "eps", "r2"} or None when the curve is not positive or the fit is not of that form.
  """
  g, alpha = np.asarray(gradients, np.float64), np.asarray(alpha_eff, np.float64)
  ok = np.isfinite(alpha) & (alpha > 0)
  if ok.sum() < 3:
    return None
  y, x = 1.0 / alpha[ok]**2, g[ok]**2
  slope, intercept = np.polyfit(x, y, 1)
  if slope <= 0 or intercept <= 0:
    return None
  fit = 1.0 / np.sqrt(slope * x + intercept)
  residual = np.sum((np.log(alpha[ok]) - np.log(fit))**2)
  total = np.sum((np.log(alpha[ok]) - np.log(alpha[ok]).mean())**2)
  return {"learning_rate": float(1.0 / np.sqrt(slope)), "eps": float(intercept / slope),
          "r2": float(1.0 - residual / total) if total > 0 else 1.0}


def _choose(fixed, previous) -> int | None:
  """The point to follow along an arm: stable (else any), nearest the previous one (continuation), else slowest."""
  if not len(fixed.points):
    return None
  mask = fixed.stable if np.any(fixed.stable) else np.ones(len(fixed.points), bool)
  candidates = np.flatnonzero(mask)
  if previous is None:
    return int(candidates[np.argmin(fixed.speeds[candidates])])
  return int(candidates[np.argmin(np.linalg.norm(fixed.points[candidates] - previous, axis=1))])


def adaptation_curve(step, readout, seeds, gradients, *, dtype=None, **fixed_point_options) -> dict:
  """Fixed points of F(., g*) for each g* and alpha_eff at each.

  Args:
    step, readout: the map and its readout.
    seeds: (N, H) seeds (visited states); at most MAX_SEEDS are used, evenly spaced.
    gradients: (G,) the g* values (see ``gradient_sweep``).
    dtype, fixed_point_options: passed to ``find_fixed_points``.

  Returns:
    dict with "gradients" (G,), "points" (G, H) (NaN where none was found), "speeds" (G,), "stable" (G,),
    "num_points" (G,) distinct points found per g*, "alpha_eff" (G,), "arms" per sign: {"gradients", "alpha_eff"}
    ordered by |g*|, "falls": alpha_eff at the largest |g*| below 0.8 times that at the smallest on both arms, and
    "rmsprop_fit" (see ``fit_rmsprop``).
  """
  with precision(dtype):
    return _adaptation_curve(step, readout, seeds, gradients, dtype=dtype, **fixed_point_options)


def _adaptation_curve(step, readout, seeds, gradients, *, dtype=None, **fixed_point_options) -> dict:
  seeds = np.asarray(seeds)
  if len(seeds) > MAX_SEEDS:
    seeds = seeds[np.linspace(0, len(seeds) - 1, MAX_SEEDS).astype(int)]
  gradients = np.asarray(gradients, np.float64)
  size = seeds.shape[1]
  points = np.full((len(gradients), size), np.nan)
  point_speeds = np.full(len(gradients), np.nan)
  stable = np.zeros(len(gradients), bool)
  counts = np.zeros(len(gradients), int)
  # Walk each arm outwards from small |g*|, seeding with the previous point too (continuation along the curve).
  for sign in (-1.0, 1.0):
    order = [i for i in np.argsort(np.abs(gradients)) if np.sign(gradients[i]) == sign]
    previous = None
    for i in order:
      # The previous point replaces the last seed: same shapes for every g*, so the search compiles once.
      arm_seeds = seeds if previous is None else np.concatenate([seeds[:-1], previous[None]])
      fixed = find_fixed_points(step, arm_seeds, gradients[i], dtype=dtype, **fixed_point_options)
      counts[i] = len(fixed.points)
      k = _choose(fixed, previous)
      if k is None:
        continue
      points[i], point_speeds[i], stable[i] = fixed.points[k], fixed.speeds[k], fixed.stable[k]
      previous = points[i]
  found = np.all(np.isfinite(points), axis=1)
  alpha = np.full(len(gradients), np.nan)
  if np.any(found):
    alpha[found] = np.asarray(effective_learning_rate(step, readout, points[found].astype(default_dtype(dtype))),
                              np.float64)
  arms = {}
  falls = []
  for name, sign in (("negative", -1.0), ("positive", 1.0)):
    idx = [i for i in np.argsort(np.abs(gradients)) if np.sign(gradients[i]) == sign and found[i]]
    arms[name] = {"gradients": gradients[idx], "alpha_eff": alpha[idx]}
    if len(idx) >= 2:
      falls.append(bool(alpha[idx[-1]] < 0.8 * alpha[idx[0]]))
  return {"gradients": gradients, "points": points, "speeds": point_speeds, "stable": stable, "num_points": counts,
          "alpha_eff": alpha, "arms": arms, "falls": bool(falls) and all(falls),
          "rmsprop_fit": fit_rmsprop(gradients[found], alpha[found])}
