"""Every analysis of SPEC §5 on one recurrent optimizer, from its callables and what it visited."""

from __future__ import annotations

import numpy as np

from lopt.dynamics.adaptation import adaptation_curve, gradient_sweep
from lopt.dynamics.clipping import clipping_profile
from lopt.dynamics.fixed_points import find_fixed_points
from lopt.dynamics.momentum import momentum_modes_at
from lopt.dynamics.pca import pca
from lopt.dynamics.schedule import learning_rate_schedule

MAX_SEEDS = 1024      # fixed-point seeds drawn from the visited states (ours)
SCHEDULE_STEPS = 200  # autonomous steps (ours: the default horizon)


def _seeds(h0, visited_states, count: int, seed: int = 0) -> np.ndarray:
  """h0 plus up to ``count - 1`` visited states (a random subset), or h0 alone."""
  h0 = np.asarray(h0)[None]
  if visited_states is None or len(visited_states) == 0:
    return h0
  visited = np.asarray(visited_states)
  if len(visited) > count - 1:
    visited = visited[np.random.default_rng(seed).choice(len(visited), count - 1, replace=False)]
  return np.concatenate([h0, visited.astype(h0.dtype)])


def analyze(step, readout, h0, *, visited_states=None, gradients=None, heavy_ball: dict | None = None,
            schedule_steps: int = SCHEDULE_STEPS, num_seeds: int = MAX_SEEDS, adaptation_limit: float | None = None,
            adaptation_seeds: int | None = None, dtype=None) -> dict:
  """Runs the analyses: PCA, fixed points at g = 0, momentum modes, clipping, schedule, adaptation.

  Args:
    step: ``F(h, g)`` (H,), () -> (H,); readout: ``R(h)`` (H,) -> (); h0: (H,) the initial state.
    visited_states: (M, H) states seen while optimizing (seeds for the fixed-point searches and PCA).
    gradients: gradients seen while optimizing, any shape (density, default ranges).
    heavy_ball: the task's optimal heavy ball, as from ``lopt.tasks.heavy_ball_optimum``, when known.
    schedule_steps: length of the autonomous run.
    num_seeds: fixed-point seeds at g = 0.
    adaptation_limit: largest |g*| of the adaptation sweep (default: the 99.9th percentile of |gradients|, or 1).
    adaptation_seeds: seeds per g* of the adaptation sweep (default: the g = 0 seeds, capped by the sweep). The
      sweep runs 30 searches; with 256 units each Newton iteration costs O(seeds H^3), so a CPU needs few seeds.
    dtype: passed to the fixed-point searches (float64 for machine-precision points).

  Returns:
    dict of results: "pca", "fixed_points", "momentum", "clipping", "schedule", "adaptation", "heavy_ball", "h0".
  """
  h0 = np.asarray(h0)
  seeds = _seeds(h0, visited_states, num_seeds)
  results = {"h0": h0, "heavy_ball": heavy_ball}
  states_for_pca = visited_states if visited_states is not None and len(visited_states) > 1 else None

  # The convergence point (g = 0) and its linearization: momentum.
  fixed = find_fixed_points(step, seeds, 0.0, dtype=dtype)
  results["fixed_points"] = fixed
  results["momentum"] = None
  if len(fixed.points):
    best = fixed.best()
    results["momentum"] = {"point": fixed.points[best],
                           "modes": momentum_modes_at(step, readout, fixed.points[best].astype(h0.dtype), 0.0)}

  # Clipping at h0; schedule from h0 with no gradient.
  results["clipping"] = clipping_profile(step, readout, h0, gradients)
  results["schedule"] = learning_rate_schedule(step, readout, h0, schedule_steps)
  if states_for_pca is None:
    states_for_pca = results["schedule"]["states"]
  results["pca"] = pca(states_for_pca, num_components=min(10, h0.shape[-1]))

  # Adaptation over the range of gradients actually encountered.
  if adaptation_limit is None:
    observed = np.abs(np.asarray(gradients, np.float64).ravel()) if gradients is not None else np.zeros(0)
    observed = observed[np.isfinite(observed)]
    adaptation_limit = float(np.quantile(observed, 0.999)) if observed.size and np.any(observed > 0) else 1.0
  sweep_seeds = seeds if adaptation_seeds is None else seeds[:max(1, adaptation_seeds)]  # h0 first, then visited
  results["adaptation"] = adaptation_curve(step, readout, sweep_seeds, gradient_sweep(adaptation_limit), dtype=dtype)
  return results
