"""The mechanism summary: the numbers a reader wants, as a JSON-serializable dict (SPEC §5.10)."""

from __future__ import annotations

import math

import numpy as np

from lopt.dynamics.momentum import compare_with_heavy_ball, dominant_mode


def _clean(value):
  """numpy scalars/arrays to Python, non-finite floats to None (JSON has no inf or NaN)."""
  if isinstance(value, dict):
    return {str(k): _clean(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_clean(v) for v in value]
  if isinstance(value, np.ndarray):
    return _clean(value.tolist())
  if isinstance(value, (np.bool_, bool)):
    return bool(value)
  if isinstance(value, (np.integer, int)):
    return int(value)
  if isinstance(value, (np.floating, float)):
    return float(value) if math.isfinite(value) else None
  if isinstance(value, complex):
    return {"real": _clean(value.real), "imag": _clean(value.imag)}
  return value


def summarize(results: dict) -> dict:
  """Condenses ``lopt.dynamics.analyze`` results (or any dict with the same keys) into plain numbers.

  Keys: "fixed_points" (counts, speeds, stability), "momentum" (dominant beta, alpha, time constant, the top modes,
  and the task's optimal heavy ball where known), "clipping" (threshold and where gradients fall), "schedule"
  (peak step, warm-up, decay), "adaptation" (alpha_eff against |g*| on each arm, whether it falls, RMSProp fit), "pca".
  """
  out = {}
  fixed = results.get("fixed_points")
  if fixed is not None:
    out["fixed_points"] = {
        "seeds": int(len(fixed.seed_speeds)), "distinct": int(len(fixed.points)),
        "converged": int(np.sum(fixed.converged)), "slow": int(np.sum(fixed.slow)),
        "stable": int(np.sum(fixed.stable)), "outliers": int(np.sum(fixed.outlier)),
        "failed_seeds": int(np.sum(fixed.assignment < 0)),
        "speeds": fixed.speeds[:20], "max_abs_eigenvalue": fixed.max_abs_eigenvalue[:20], "counts": fixed.counts[:20],
        "tolerance": fixed.tolerance, "first_order_steps": fixed.first_order_steps,
        "newton_steps": fixed.newton_steps}
  momentum = results.get("momentum")
  if momentum is not None:
    modes = momentum["modes"]
    top = np.argsort(-modes.weights)[:5]
    out["momentum"] = {**dominant_mode(modes),
                       "top_modes": [{"beta": complex(modes.betas[i]), "alpha": complex(modes.alphas[i]),
                                      "time_constant": modes.time_constants[i],
                                      "weight": modes.weights[i]} for i in top],
                       "spectral_radius": float(np.max(np.abs(modes.betas)))}
    if results.get("heavy_ball"):
      out["momentum"]["heavy_ball"] = compare_with_heavy_ball(modes, results["heavy_ball"])
  clipping = results.get("clipping")
  if clipping is not None:
    out["clipping"] = {k: clipping.get(k) for k in ("threshold", "thresholds", "saturation", "saturating",
                                                    "slope_at_zero", "offset", "limit", "fraction_beyond_threshold")}
    out["clipping"]["learning_rate_at_zero"] = -clipping["slope_at_zero"]
  schedule = results.get("schedule")
  if schedule is not None:
    out["schedule"] = {k: v for k, v in schedule.items() if k not in ("states", "alpha_eff")}
    out["schedule"]["num_steps"] = len(schedule["alpha_eff"]) - 1
  adaptation = results.get("adaptation")
  if adaptation is not None:
    out["adaptation"] = {
        "falls": adaptation["falls"], "rmsprop_fit": adaptation["rmsprop_fit"],
        "arms": {name: {"abs_gradient": np.abs(arm["gradients"]), "alpha_eff": arm["alpha_eff"]}
                 for name, arm in adaptation["arms"].items()},
        "points_per_gradient": adaptation["num_points"], "all_stable": bool(np.all(adaptation["stable"]))}
  pca_ = results.get("pca")
  if pca_ is not None:
    ratio = pca_.explained_variance_ratio
    out["pca"] = {"explained_variance_ratio": ratio,
                  "components_for_90_percent": int(np.searchsorted(np.cumsum(ratio), 0.9) + 1)}
  return _clean(out)
