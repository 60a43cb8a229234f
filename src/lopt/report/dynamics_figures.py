"""Figures of the reverse-engineering analyses, in the paper's style (matplotlib Agg; see ``figures.to_png``).

Each function takes the results of ``lopt.dynamics.analyze`` (plus the map and readout where it evaluates update
functions) and returns a Figure.
"""

from __future__ import annotations

import numpy as np

from lopt.dynamics.update_functions import update_function
from lopt.report.figures import COLORS, plt

LEARNED = COLORS["learned"]


def _grid(axis):
  axis.grid(alpha=0.3)
  axis.axhline(0, color="#999", lw=0.6)
  axis.axvline(0, color="#999", lw=0.6)


def clipping_figure(results: dict):
  """Update function at the initial state over a wide range (top) and the density of gradients seen (bottom)."""
  clip = results["clipping"]
  figure, (top, bottom) = plt.subplots(2, 1, figsize=(6.0, 5.5), sharex=True, gridspec_kw={"height_ratios": [2, 1]})
  g = clip["gradients"]
  top.plot(g, clip["updates"], color=LEARNED, lw=2, label="learned: $U_{h_0}(g)$")
  top.plot(g, clip["offset"] + clip["slope_at_zero"] * g, "--", color="#555", lw=1,
           label=f"linear: $-\\alpha g$, $\\alpha$ = {-clip['slope_at_zero']:.3g}")
  lo, hi = np.min(clip["updates"]), np.max(clip["updates"])
  top.set_ylim(lo - 0.15 * (hi - lo + 1e-12), hi + 0.15 * (hi - lo + 1e-12))
  if clip["threshold"] is not None:
    for sign in (-1, 1):
      top.axvline(sign * clip["threshold"], color="#1f77b4", ls=":", lw=1.2)
    top.set_title(f"update function at $h_0$: saturates beyond |g| ≈ {clip['threshold']:.3g}")
  else:
    top.set_title("update function at $h_0$: linear over this range (no clipping)")
  top.set_ylabel("update $\\Delta x$")
  top.legend(fontsize=8)
  _grid(top)
  if "density" in clip:
    edges, density = clip["density"]
    bottom.fill_between(edges[:-1], density, step="post", color="#7f7f7f", alpha=0.6)
  bottom.set_yscale("symlog", linthresh=1e-3)
  bottom.set_xlabel("gradient g")
  bottom.set_ylabel("density of seen g")
  bottom.grid(alpha=0.3)
  return figure


def momentum_figure(results: dict, step, readout):
  """Convergence point in PC space, update functions along the slow mode, eigenvalues, and (alpha_i, beta_i)."""
  figure, axes = plt.subplots(2, 2, figsize=(10.0, 8.0))
  (projection, slow), (eigen, scatter) = axes
  pca_, momentum = results["pca"], results["momentum"]
  point = momentum["point"]
  modes = momentum["modes"]
  # States around the convergence point.
  if "visited" in results:
    visited = pca_.project(results["visited"])
    projection.plot(visited[:, 0], visited[:, 1], ".", ms=1.5, color="#999", alpha=0.4, label="visited states")
  p = pca_.project(point[None])[0]
  projection.plot(p[0], p[1], "*", ms=14, color=LEARNED, label="convergence point (g = 0)")
  h0 = pca_.project(results["h0"][None])[0]
  projection.plot(h0[0], h0[1], "o", ms=7, mfc="none", color="k", label="$h_0$")
  projection.set_xlabel("PC 1")
  projection.set_ylabel("PC 2")
  projection.set_title("optimizer state around the convergence point")
  projection.legend(fontsize=8)
  projection.grid(alpha=0.3)
  # Update functions along the slowest mode (real part of its right eigenvector): moving shifts U like a velocity.
  direction = _mode_direction(step, point, modes.dominant)
  g_limit = results["clipping"]["limit"] / 10
  grid = np.linspace(-g_limit, g_limit, 201)
  cmap = plt.get_cmap("coolwarm")
  scale = max(np.abs(point).max(), 1e-3) * 0.5
  for k, delta in enumerate(np.linspace(-1, 1, 7)):
    state = (point + delta * scale * direction).astype(results["h0"].dtype)
    slow.plot(grid, np.asarray(update_function(step, readout, state, grid.astype(state.dtype))), color=cmap(k / 6),
              lw=1.5, label=f"{delta:+.2f}" if k in (0, 3, 6) else None)
  slow.set_xlabel("gradient g")
  slow.set_ylabel("update $\\Delta x$")
  slow.set_title("update functions along the slow mode")
  slow.legend(title="offset along mode", fontsize=8, title_fontsize=8)
  _grid(slow)
  # Eigenvalues and the unit circle.
  theta = np.linspace(0, 2 * np.pi, 400)
  eigen.plot(np.cos(theta), np.sin(theta), color="#999", lw=1)
  eigen.scatter(modes.betas.real, modes.betas.imag, s=18, color=LEARNED, zorder=3)
  eigen.set_aspect("equal")
  eigen.set_xlabel("Re λ")
  eigen.set_ylabel("Im λ")
  eigen.set_title(f"eigenvalues of $J_{{rec}}$ (spectral radius {np.abs(modes.betas).max():.3f})")
  eigen.grid(alpha=0.3)
  # Each mode as a momentum term.
  alphas = np.abs(modes.alphas)
  ok = alphas > 0
  scatter.scatter(alphas[ok], np.abs(modes.betas[ok]), s=12 + 60 * modes.weights[ok] / modes.weights.max(),
                  color=LEARNED, label="modes (size: weight)")
  if results.get("heavy_ball"):
    hb = results["heavy_ball"]
    scatter.plot(hb["momentum_learning_rate"], hb["momentum_beta"], "*", ms=16, color="#1f77b4",
                 label="optimal heavy ball for the task")
  scatter.set_xscale("log")
  scatter.set_xlabel("effective learning rate |α_i|")
  scatter.set_ylabel("momentum |β_i|")
  scatter.set_title("eigenmodes as momentum terms")
  scatter.legend(fontsize=8)
  scatter.grid(alpha=0.3, which="both")
  figure.tight_layout()
  return figure


def _mode_direction(step, point, index: int) -> np.ndarray:
  """Unit vector along the right eigenvector of mode ``index`` (real part; imaginary part if that is zero)."""
  import jax.numpy as jnp

  from lopt.dynamics.linearize import eig_sorted, linearize
  j_rec, _ = linearize(step, jnp.asarray(point), 0.0)
  vector = eig_sorted(j_rec).right[:, index]
  direction = np.real(vector) if np.linalg.norm(np.real(vector)) > 1e-6 else np.imag(vector)
  return direction / np.linalg.norm(direction)


def schedule_figure(results: dict):
  """Autonomous trajectory (zero gradients) from h0 in PC space (left) and alpha_eff against step (right)."""
  schedule, pca_ = results["schedule"], results["pca"]
  figure, (space, rate) = plt.subplots(1, 2, figsize=(10.0, 4.0))
  path = pca_.project(schedule["states"])
  steps = np.arange(len(path))
  space.plot(path[:, 0], path[:, 1], color="#999", lw=1)
  points = space.scatter(path[:, 0], path[:, 1], c=steps, cmap="viridis", s=10, zorder=3)
  space.plot(path[0, 0], path[0, 1], "o", ms=8, mfc="none", color="k", label="$h_0$")
  figure.colorbar(points, ax=space, label="step")
  space.set_xlabel("PC 1")
  space.set_ylabel("PC 2")
  space.set_title("autonomous dynamics $h_{t+1} = F(h_t, 0)$")
  space.legend(fontsize=8)
  space.grid(alpha=0.3)
  _schedule_panel(rate, schedule, f"implied schedule: {schedule['shape']}")
  figure.tight_layout()
  return figure


def learned_schedule_figure(results: dict):
  """An architecture without a recurrent view: alpha_eff = -dU/dg at g = 0 along real runs (median and quartiles
  over the probed coordinates, ``lopt.pipeline.update_analysis``) against the step."""
  schedule = results["schedule"]
  figure, axis = plt.subplots(figsize=(6.0, 4.0))
  low, high = schedule["alpha_eff_quartiles"]
  axis.fill_between(np.arange(low.size), low, high, color=LEARNED, alpha=0.25, lw=0,
                    label="quartiles over coordinates")
  _schedule_panel(axis, schedule, f"learned schedule along real trajectories: {schedule['shape']}")
  figure.tight_layout()
  return figure


def _schedule_panel(axis, schedule: dict, title: str) -> None:
  """alpha_eff against step with its peak marked."""
  alpha = schedule["alpha_eff"]
  axis.plot(np.arange(len(alpha)), alpha, color=LEARNED, lw=2, label="$\\alpha_{eff}$")
  axis.axvline(schedule["peak_step"], color="#1f77b4", ls=":", label=f"peak at step {schedule['peak_step']}")
  axis.set_xlabel("step")
  axis.set_ylabel("effective learning rate $\\alpha_{eff}$")
  axis.set_title(title)
  axis.legend(fontsize=8)
  axis.grid(alpha=0.3)


def adaptation_figure(results: dict, step, readout):
  """S-curve of fixed points for constant gradients (PC space), update functions along it, alpha_eff per arm."""
  curve, pca_ = results["adaptation"], results["pca"]
  figure, (space, functions, arms) = plt.subplots(1, 3, figsize=(15.0, 4.2))
  found = np.all(np.isfinite(curve["points"]), axis=1)
  g = curve["gradients"]
  if np.any(found):
    path = pca_.project(curve["points"][found])
    space.plot(path[:, 0], path[:, 1], color="#999", lw=1)
    sc = space.scatter(path[:, 0], path[:, 1], c=g[found], cmap="coolwarm", s=25, zorder=3)
    figure.colorbar(sc, ax=space, label="constant gradient g*")
  space.set_xlabel("PC 1")
  space.set_ylabel("PC 2")
  space.set_title("fixed points for constant gradients g*")
  space.grid(alpha=0.3)
  limit = np.max(np.abs(g))
  grid = np.linspace(-limit, limit, 201)
  cmap = plt.get_cmap("coolwarm")
  chosen = np.flatnonzero(found)[::max(1, int(np.sum(found)) // 7)]
  for i in chosen:
    state = curve["points"][i].astype(results["h0"].dtype)
    functions.plot(grid, np.asarray(update_function(step, readout, state, grid.astype(state.dtype))),
                   color=cmap((g[i] + limit) / (2 * limit)), lw=1.4)
  functions.set_xlabel("gradient g")
  functions.set_ylabel("update $\\Delta x$")
  functions.set_title("update functions along the curve")
  _grid(functions)
  for name, color in (("negative", "#1f77b4"), ("positive", LEARNED)):
    arm = curve["arms"][name]
    if len(arm["gradients"]):
      arms.plot(np.abs(arm["gradients"]), arm["alpha_eff"], "o-", ms=3, color=color, label=f"{name} g*")
  fit = curve.get("rmsprop_fit")
  if fit:
    xs = np.geomspace(np.min(np.abs(g)), limit, 100)
    arms.plot(xs, fit["learning_rate"] / np.sqrt(xs**2 + fit["eps"]), "--", color="#555",
              label=f"RMSProp-like fit a/√(g²+ε), R² = {fit['r2']:.2f}")
  arms.set_xscale("log")
  arms.set_xlabel("|g*|")
  arms.set_ylabel("$\\alpha_{eff}$ at the fixed point")
  arms.set_title("learning-rate adaptation")
  arms.legend(fontsize=8)
  arms.grid(alpha=0.3, which="both")
  figure.tight_layout()
  return figure


def pca_figure(results: dict, trajectories=None):
  """Cumulative explained variance (left) and per-coordinate trajectories in PC space (right)."""
  pca_ = results["pca"]
  figure, (variance, space) = plt.subplots(1, 2, figsize=(10.0, 4.0))
  ratio = pca_.explained_variance_ratio
  variance.plot(np.arange(1, len(ratio) + 1), np.cumsum(ratio), "o-", color=LEARNED)
  variance.set_ylim(0, 1.02)
  variance.set_xlabel("number of components")
  variance.set_ylabel("cumulative explained variance")
  variance.set_title("PCA of visited optimizer states")
  variance.grid(alpha=0.3)
  if trajectories is not None:  # (T, C, H): one line per coordinate
    coords = np.asarray(trajectories)
    cmap = plt.get_cmap("tab10")
    for c in range(min(coords.shape[1], 10)):
      path = pca_.project(coords[:, c])
      space.plot(path[:, 0], path[:, 1], lw=0.8, color=cmap(c % 10))
      space.plot(path[0, 0], path[0, 1], "o", ms=4, color=cmap(c % 10))
    space.set_title("state trajectories (one per parameter; start marked)")
  space.set_xlabel("PC 1")
  space.set_ylabel("PC 2")
  space.grid(alpha=0.3)
  figure.tight_layout()
  return figure
