"""Report sections for ``analysis/``: each mechanism's numbers, figure, and a plain-language paragraph from them."""

from __future__ import annotations

import json
from pathlib import Path

from lopt.report.html import Section, escape


def _fmt(x, digits: int = 3) -> str:
  return "n/a" if x is None else f"{x:.{digits}g}"


def momentum_text(s: dict) -> str:
  m = s.get("momentum")
  fp = s.get("fixed_points", {})
  if not m:
    return "No fixed point was found at zero gradient, so the optimizer cannot be read as momentum around one."
  text = (f"With no gradient, the optimizer's state settles at a convergence point ({fp.get('converged', 0)} "
          f"fixed point(s) to machine precision among {fp.get('seeds', 0)} seeds, {fp.get('stable', 0)} stable). "
          f"Around it the dynamics are close to linear, and each eigenmode acts as a momentum term. The dominant mode "
          f"has β = {_fmt(m['beta'])} (|β| = {_fmt(m['beta_abs'])}, a memory of about {_fmt(m['time_constant'])} "
          f"steps) and an effective learning rate α = {_fmt(m['alpha'])}, carrying "
          f"{100 * m['weight_fraction']:.0f}% of the update's impulse response.")
  hb = m.get("heavy_ball")
  if hb:
    close = abs(hb["beta_difference"]) < 0.05
    text += (f" The optimal heavy ball for this task has β* = {_fmt(hb['optimal_beta'])} and α* = "
             f"{_fmt(hb['optimal_alpha'])}: the learned momentum is {'close to' if close else 'different from'} "
             f"the optimum (β − β* = {hb['beta_difference']:+.3f}, α/α* = {_fmt(hb['alpha_ratio'])}).")
  return text


def clipping_text(s: dict) -> str:
  c = s.get("clipping")
  if not c:
    return ""
  if c["threshold"] is None:
    return (f"At its initial state the update is linear in the gradient over the whole range examined "
            f"(|g| ≤ {_fmt(c['limit'])}), with learning rate {_fmt(c['learning_rate_at_zero'])}: no clipping.")
  beyond = c.get("fraction_beyond_threshold")
  share = f" {100 * beyond:.1f}% of the gradients it actually saw lie beyond that." if beyond is not None else ""
  return (f"At its initial state the update grows linearly for small gradients (learning rate "
          f"{_fmt(c['learning_rate_at_zero'])}) and saturates for large ones, like gradient clipping with a threshold "
          f"of about {_fmt(c['threshold'])} (the gradient where the linear part would reach the saturation level)."
          f"{share}")


def schedule_text(s: dict) -> str:
  sc = s.get("schedule")
  if not sc:
    return ""
  shape = sc["shape"]
  text = (f"Fed zero gradients, the state drifts from h₀ towards the convergence point, and the effective learning "
          f"rate along the way gives a built-in schedule: {shape}. It starts at {_fmt(sc['initial'])}, peaks at "
          f"{_fmt(sc['peak'])} at step {sc['peak_step']}")
  if shape.startswith("warm-up"):
    text += f" (warm-up of {sc['warmup_steps']} steps to 90% of the peak)"
  text += f", and ends at {_fmt(sc['final'])} after {sc['num_steps']} steps"
  if sc.get("decay_half_life") is not None:
    text += f"; it loses half its decay within {sc['decay_half_life']} steps of the peak"
  return text + "."


def adaptation_text(s: dict) -> str:
  a = s.get("adaptation")
  if not a:
    return ""
  parts = []
  for name, arm in a["arms"].items():
    alpha = [x for x in arm["alpha_eff"] if x is not None]
    g = arm["abs_gradient"]
    if len(alpha) >= 2:
      parts.append(f"on the {name} arm α_eff goes from {_fmt(alpha[0])} at |g*| = {_fmt(g[0])} to {_fmt(alpha[-1])} "
                   f"at |g*| = {_fmt(g[-1])}")
  text = ("Under a constant gradient g* the state moves to a different fixed point; together they trace a curve "
          "(the paper's S-curve). " + ("; ".join(parts) + ". " if parts else ""))
  if a["falls"]:
    text += "The learning rate falls as gradients grow, as in RMSProp"
    fit = a.get("rmsprop_fit")
    if fit:
      text += (f" (fit a/√(g*²+ε): a = {_fmt(fit['learning_rate'])}, ε = {_fmt(fit['eps'])}, "
               f"R² = {fit['r2']:.2f})")
    text += "."
  else:
    text += "The learning rate does not fall appreciably with the gradient's size: no RMSProp-like adaptation here."
  return text


MECHANISMS = [
    ("momentum", "Momentum: the convergence point and its linearization", momentum_text,
     "Top: states around the convergence point (PCs of visited states) and update functions as the state moves along "
     "the slowest mode. Bottom: eigenvalues of the recurrent Jacobian with the unit circle; each mode as a momentum "
     "term (α_i, β_i), with the task's optimal heavy ball as a star where known."),
    ("clipping", "Gradient clipping", clipping_text,
     "Update function at the initial state over a wide gradient range (dotted: the saturation threshold), above the "
     "density of gradients actually encountered."),
    ("schedule", "Learning-rate schedule from autonomous dynamics", schedule_text,
     "Left: the state under zero gradients, projected on the top PCs. Right: effective learning rate against step."),
    ("adaptation", "Learning-rate adaptation", adaptation_text,
     "Left: fixed points for constant gradients g* (colour). Middle: update functions at points along the curve. "
     "Right: effective learning rate along each arm against |g*|, with an RMSProp-like fit."),
    ("pca", "State space", lambda s: (
        f"{s['pca']['components_for_90_percent']} principal components explain 90% of the variance of the visited "
        f"states." if s.get("pca") else ""),
     "Cumulative explained variance of visited states and per-parameter state trajectories in PC space."),
]


def analysis_sections(run_dir: str | Path) -> list[Section]:
  """One section per mechanism from ``run_dir/analysis/`` (summary.json + PNGs); empty when there is none."""
  directory = Path(run_dir) / "analysis"
  summary_path = directory / "summary.json"
  if not summary_path.is_file():
    return []
  summary = json.loads(summary_path.read_text())
  source = summary.get("source", {})
  intro = Section("How the learned optimizer works")
  intro.paragraphs.append(
      f"Reverse engineering with <code>lopt.dynamics</code> on {source.get('num_problems', '?')} "
      f"<code>{escape(source.get('task', '?'))}</code> problems: fixed points polished with Newton steps to machine "
      f"precision (float64), linearization, update functions. Numbers in <code>analysis/summary.json</code>.")
  sections = [intro]
  for key, title, text, caption in MECHANISMS:
    section = Section(title)
    paragraph = text(summary)
    if paragraph:
      section.paragraphs.append(escape(paragraph))
    png = directory / f"{key}.png"
    if png.is_file():
      section.figures.append((png.read_bytes(), caption))
    if section.paragraphs or section.figures:
      sections.append(section)
  return sections
