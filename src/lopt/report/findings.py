"""The words about mechanisms, written once: a paragraph per mechanism from an analysis summary (``lopt analyze``'s
report), a one-line text per finding and the Markdown findings table (``lopt reproduce``), and figure captions."""

from __future__ import annotations

import numpy as np

PAPER = {  # what the paper found, one line per mechanism (for the findings table)
    "comparison": "the learned optimizer beats tuned momentum, RMSProp and Adam",
    "momentum": "momentum-like dynamics; on linear regression the dominant beta is near the optimal heavy ball's",
    "clipping": "the update saturates for large gradients, at a threshold matched to the gradient distribution",
    "schedule": "an autonomous learning-rate schedule (warm-up and/or decay)",
    "adaptation": "alpha_eff falls as the constant gradient g* grows in magnitude (RMSProp-like adaptation)",
}

# Figure captions, per analysis figure (report.html and reproduce.html).
MECHANISM_CAPTIONS = {
    "momentum": "Top: states around the convergence point (PCs of visited states) and update functions as the state "
                "moves along the slowest mode. Bottom: eigenvalues of the recurrent Jacobian with the unit circle; "
                "each mode as a momentum term (α_i, β_i), with the task's optimal heavy ball as a star where known.",
    "clipping": "Update function at the initial state over a wide gradient range (dotted: the saturation threshold), "
                "above the density of gradients actually encountered.",
    "schedule": "Left: the state under zero gradients, projected on the top PCs. Right: effective learning rate "
                "against step.",
    "learned_schedule": "Effective learning rate −dU/dg at g = 0 along real runs: median and quartiles over probed "
                        "coordinates.",
    "adaptation": "Left: fixed points for constant gradients g* (colour). Middle: update functions at points along "
                  "the curve. Right: effective learning rate along each arm against |g*|, with an RMSProp-like fit.",
    "pca": "Cumulative explained variance of visited states and per-parameter state trajectories in PC space.",
}


def _fmt(x, digits: int = 3) -> str:
  return _num(x, digits)


def momentum_paragraph(s: dict) -> str:
  if not _recurrent(s):
    return ""
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


def _recurrent(s: dict) -> bool:
  return (s.get("source") or {}).get("recurrent", True)


def clipping_paragraph(s: dict) -> str:
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


def schedule_paragraph(s: dict) -> str:
  sc = s.get("schedule")
  if not sc:
    return ""
  if not _recurrent(s):
    return (f"Along real optimization runs, the effective learning rate −dU/dg (at g = 0, median over probed "
            f"coordinates) gives the learned schedule: {sc['shape']}. It starts at {_fmt(sc['initial'])}, peaks at "
            f"{_fmt(sc['peak'])} at step {sc['peak_step']} and ends at {_fmt(sc['final'])}.")
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


def adaptation_paragraph(s: dict) -> str:
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


def _num(x, digits: int = 4) -> str:
  return "n/a" if x is None or (isinstance(x, float) and not np.isfinite(x)) else f"{x:.{digits}g}"


def findings_markdown(findings: dict) -> str:
  """The findings table as Markdown: one block per task, one line per finding with its status."""
  lines = ["# lopt reproduce: findings", "",
           f"{findings['settings']['eval_problems']} evaluation problems; baseline tuning "
           f"'{findings['settings']['tuning']}'; {findings['settings'].get('seconds', 0):.0f} s.", ""]
  for name, task in findings["tasks"].items():
    architecture = task.get("architecture_text") or f"GRU with {task['hidden_size']} units"  # lopt 0.1's findings
    lines += [f"## {name}", "", f"Optimizer: {task['source']}, {architecture}.", ""]
    lines += comparison_markdown(task["comparison"]) + [""]
    lines += ["| finding | measured | paper | status |", "|---|---|---|---|"]
    for key, text in (("momentum", momentum_text), ("clipping", clipping_text), ("schedule", schedule_text),
                      ("adaptation", adaptation_text)):
      lines.append(f"| {key} | {text(task[key])} | {PAPER[key]} | {task[key]['status']} |")
    lines.append("")
  return "\n".join(lines)


def comparison_markdown(comparison: dict) -> list[str]:
  lines = [f"Learned optimizer: normalized mean loss {_num(comparison['learned'])} ± "
           f"{_num(comparison['learned_se'], 2)} (s.e., {comparison['num_eval_problems']} problems); baselines tuned "
           f"'{comparison['tuning_mode']}'. Comparison: **{comparison['status']}**.", "",
           "| baseline | tuned hyperparameters | baseline loss ± s.e. | ratio learned/baseline | "
           "paired difference ± s.e. | learned is |", "|---|---|---|---|---|---|"]
  for name, row in comparison["baselines"].items():
    hyper = ", ".join(f"{k}={v:.3g}" for k, v in (row["hyperparameters"] or {}).items())
    lines.append(f"| {name} | {hyper} | {_num(row['baseline'])} ± {_num(row['baseline_se'], 2)} | "
                 f"{_num(row['ratio'], 3)} | {row['difference']:+.3g} ± {_num(row['difference_se'], 2)} | "
                 f"{row['verdict']} |")
  return lines


def momentum_text(m: dict) -> str:
  if m.get("beta") is None:
    return m.get("why", "none")
  text = f"dominant β = {_num(m['beta'], 3)}, τ = {_num(m['time_constant'], 3)} steps"
  if "optimal_beta" in m:
    text += f" (β* = {_num(m['optimal_beta'], 3)})"
  return text


def clipping_text(c: dict) -> str:
  if c.get("threshold") is None:
    return f"no saturation over |g| ≤ {_num(c.get('range'), 3)}"
  beyond = c.get("fraction_beyond_threshold")
  return f"threshold {_num(c['threshold'], 3)}; {_num(100 * beyond if beyond is not None else None, 3)}% of seen " \
         f"gradients beyond it"


def schedule_text(s: dict) -> str:
  return f"{s['shape']}: α_eff {_num(s['initial'], 3)} → peak {_num(s['peak'], 3)} at step {s['peak_step']} → " \
         f"{_num(s['final'], 3)}"


def adaptation_text(a: dict) -> str:
  ratios = ", ".join(f"{arm} {_num(r, 3)}" for arm, r in a["alpha_ratio_largest_to_smallest"].items())
  # No "|" in the text: it is a Markdown table cell.
  return f"α_eff at the largest over the smallest g* magnitude: {ratios}; RMSProp fit R² {_num(a['rmsprop_fit_r2'], 3)}"
