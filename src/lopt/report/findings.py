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


# -- the hierarchical optimizer's per-tensor LSTM (summary.json's "hierarchical", lopt.pipeline.hierarchical_analysis)

HIERARCHICAL_CAPTIONS = {
    "hierarchical_inputs": "The per-tensor LSTM's input features (tensor statistics, then the global loss and time "
                           "features) for the tensors holding most parameters: quartiles over all steps, tensors and "
                           "problems, the median x* used as the typical input, and the median per third of the run.",
    "hierarchical_controller": "Left: eigenvalues of the LSTM's Jacobian dF/ds (s = [h, c]) at its fixed point for "
                               "the typical input, with the unit circle. Middle: the steady-state change of the log "
                               "step per step when an input moves by its interquartile range. Right: the log step's "
                               "drift per step against the log step the LSTM sees (at its fixed point there); a "
                               "zero crossing is where the controller settles.",
    "hierarchical_schedule": "Left: the effective learning rate step_scale·exp(log step + schedule term) of every "
                             "tensor along real runs (median over problems; grey: every tensor), with the schedule "
                             "term alone dotted. Right: the controller alone with its inputs held at their typical "
                             "values, time advancing (horizon hint) or frozen at the first step.",
    "hierarchical_validation": "From the middle of real runs, optimizer states fed a validation loss that stays flat "
                               "or rises 1% per measurement, or none at all, on the same gradients and parameters. "
                               "Left: the losses fed (first problem). Middle: effective learning rate relative to the "
                               "flat branch. Right: that ratio per tensor at the end.",
}


def _tensor_kind(h: dict) -> str:
  return f"{h.get('main_kind', '?')} tensors"


def hierarchical_inputs_paragraph(h: dict) -> str:
  st = h["settings"]
  text = (f"Recorded over {st['num_steps']} steps of {st['finite_problems']} {st['task']} problems (training loss "
          f"every step, validation loss every {st['valid_every']} steps as in meta-training, horizon hint "
          f"{st['horizon']}), the LSTM of the {_tensor_kind(h)} (those holding most parameters) reads the inputs "
          f"shown below; their median x* is the typical input.")
  changes = h.get("largest_input_changes") or []
  if changes:
    moved = ", ".join(f"{c['feature']} ({_num(c['early'], 2)} → {_num(c['late'], 2)})" for c in changes[:3])
    text += f" Apart from the time features, the inputs that move most from the first to the last third: {moved}."
  return text


def hierarchical_fixed_points_paragraph(h: dict) -> str:
  fp = h["fixed_points"]["typical"]
  text = (f"At x*, the LSTM state s = [h, c] has {fp['distinct']} fixed point(s) from {fp['seeds']} visited states "
          f"({fp['converged']} to machine precision, {fp['stable']} stable).")
  phases = [(name.split(", ")[-1], f) for name, f in h["fixed_points"].items() if ", " in name]
  if phases:
    radius = lambda f: _num(f["max_abs_eigenvalue"][0] if f["max_abs_eigenvalue"] else None, 3)  # noqa: E731
    text += " At the typical input of each third of the run: " + "; ".join(
        f"{phase} {f['distinct']} (spectral radius {radius(f)})" for phase, f in phases) + "."
  lin = h.get("linearization")
  if not lin:
    return text + " No fixed point was found, so nothing was linearized."
  tau = [t for t in lin["time_constants"] if t is not None]
  text += (f" Around the main one, the largest eigenvalues of dF/ds have moduli "
           f"{', '.join(_num(a, 3) for a in lin['abs_eigenvalues'][:3])}: "
           + (f"the slowest mode forgets a change of input with a time constant of {_num(tau[0], 3)} steps, so the "
              f"LSTM acts as a low-pass filter of its inputs over about that many steps."
              if lin["spectral_radius"] < 1 and tau else "a mode does not decay (spectral radius ≥ 1)."))
  text += (f" There the log step changes by {lin['drift']:+.3g} per step. The inputs that move it most, per typical "
           f"(interquartile) variation held until the LSTM settles: " + ", ".join(
               f"{g['feature']} ({g['steady_times_spread']:+.3g} per step)" for g in lin["top_gains"][:4]) + ".")
  feedback = lin.get("log_step_feedback")
  if feedback is not None:
    text += f" The log step acts on itself with a gain of {feedback:+.3g} per step per unit of log step"
    text += (f" (self-correcting: a deviation of the log step decays with a time constant of about "
             f"{_num(1 / abs(feedback), 3)} steps, other inputs held)." if feedback < 0 else " (self-reinforcing).")
  attribution = lin.get("phase_attribution")
  if attribution and attribution.get("top"):
    text += (f" From the first to the last third of the run, the typical input's change moves the drift by "
             f"{attribution['predicted_change']:+.3g} per step (linear prediction; at the fixed points: "
             f"{_num(attribution['drift_early'], 3)} → {_num(attribution['drift_late'], 3)}), mostly through "
             + ", ".join(f"{a['feature']} ({a['change']:+.3g})" for a in attribution["top"][:3]) + ".")
  return text


def hierarchical_equilibria_paragraph(h: dict) -> str:
  equilibria = h.get("log_step_equilibria") or []
  step_scale = (h.get("settings") or {}).get("step_scale")
  inside = [e for e in equilibria if not e["at_limit"]]
  pinned = [e for e in equilibria if e["at_limit"]]
  if not equilibria:
    return ("With its log step in the loop and the other inputs held at x*, the controller has no equilibrium "
            "that the search found.")
  parts = []
  for e in inside:
    rate = f" (step size {_num(step_scale * np.exp(e['log_step']), 3)})" if step_scale else ""
    tau = -1 / np.log(e["spectral_radius"]) if 0 < e["spectral_radius"] < 1 else None
    parts.append(f"log step {e['log_step']:+.3g}{rate}, {'stable' if e['stable'] else 'unstable'}"
                 + (f", reached with a time constant of about {_num(tau, 3)} steps" if tau else ""))
  text = "With its log step in the loop and the other inputs held at x*, the controller settles at " if inside else ""
  text += "; ".join(parts) + ("." if parts else "")
  for e in pinned:
    sign = "positive" if e["log_step"] > 0 else "negative"
    text += (f" {'Also, f' if inside else 'F'}rom {'some' if inside else 'any'} starting point the drift stays "
             f"{sign} under constant typical inputs, so the log step runs to its limit {e['log_step']:+.3g} (the "
             f"clip) and {'stays there' if e['stable'] else 'is pushed off it'}.")
  return text


def hierarchical_schedule_paragraph(h: dict) -> str:
  sc = h["schedule"]
  real, term = sc["real"], sc["schedule_term"]
  text = (f"Along real runs the effective learning rate step_scale·exp(log step + schedule term) (median over "
          f"problems and tensors) has the shape {real['shape']}: it starts at {_num(real['initial'], 3)}, peaks at "
          f"{_num(real['peak'], 3)} at step {real['peak_step']} and ends at {_num(real['final'], 3)}.")
  shapes = [t["shape"] for t in sc.get("per_tensor") or []]
  if shapes:
    common = max(set(shapes), key=shapes.count)
    text += f" Per tensor, {shapes.count(common)} of {len(shapes)} have the shape {common}."
  text += (f" The schedule term alone (the learned weights on the time features) multiplies the rate by "
           f"{_num(term['factor_final_over_initial'], 3)} from the first to the last step (on its own it would set "
           f"the rate between {_num(np.exp(term['min']), 3)} and {_num(np.exp(term['max']), 3)} times the step "
           f"scale).")
  auto = sc.get("autonomous") or {}
  if "time" in auto and "frozen" in auto:
    t, f = auto["time"], auto["frozen"]
    text += (f" Holding the tensor statistics and losses at their typical values and advancing only time, the "
             f"controller's rate has the shape {t['shape']} ({_num(t['initial'], 3)} → {_num(t['final'], 3)}); with "
             f"time frozen at the first step it ends at {_num(f['final'], 3)}: the time features account for a "
             f"factor {_num(auto.get('time_effect_at_horizon'), 3)} at the horizon.")
    ratio = real["final"] / real["initial"] if real["initial"] else None
    if ratio is not None and t["initial"]:
      auto_ratio = t["final"] / t["initial"]
      if (ratio < 1) != (auto_ratio < 1) or abs(np.log(ratio)) > 2 * abs(np.log(auto_ratio)):
        text += (f" The real runs' schedule (×{_num(ratio, 3)} overall) is therefore mostly set by what the "
                 f"optimizer observes (its tensor statistics and losses), not by the clock (×{_num(auto_ratio, 3)}).")
  return text


def hierarchical_validation_paragraph(h: dict) -> str:
  v = h["validation"]
  st = h["settings"]
  measurements = v["steps"] // st["valid_every"]
  rise = (1 + st["valid_rise_per_measurement"]) ** measurements - 1
  rising = v["ratio_median"].get("rising")
  none = v["ratio_median"].get("none")
  low, high = v["ratio_range"]["rising"]
  if rising is None:
    verdict = "could not be measured"
  elif rising < 0.95:
    verdict = f"lowers the step size: to {_num(rising, 3)} of the flat branch's"
  elif rising > 1.05:
    verdict = f"raises the step size: to {_num(rising, 3)} times the flat branch's"
  else:
    verdict = f"barely changes the step size ({_num(rising, 3)} times the flat branch's)"
  text = (f"From step {v['branch_step']} of the same runs, copies of the optimizer's state saw the same gradients "
          f"and parameters while being fed a training loss falling {100 * st['train_fall_per_step']:.1f}% per step "
          f"and, every {st['valid_every']} steps, a validation loss that stays flat or rises "
          f"{100 * st['valid_rise_per_measurement']:.0f}% per measurement (+{100 * rise:.0f}% after "
          f"{measurements} measurements). After {v['steps']} steps the rising validation loss {verdict} (median "
          f"over tensors; {_num(low, 3)} to {_num(high, 3)} across tensors).")
  if none is not None:
    at_branch = (v.get("ratio_at_branch_median") or {}).get("none")
    text += (f" With no validation loss ever given (otherwise the same), the step size is {_num(none, 3)} times the "
             f"flat branch's after those {v['steps']} steps (median over tensors)"
             + (f", and already {_num(at_branch, 3)} times at the branch point: the difference builds up over the "
                f"whole run" if at_branch is not None else "") + ".")
  return text


def hierarchical_findings(h: dict) -> list[str]:
  """One line per finding, for the command line and the top of the report's section."""
  lines = []
  fp = h["fixed_points"]["typical"]
  lin = h.get("linearization")
  if lin:
    lines.append(f"LSTM at the typical input: {fp['distinct']} fixed point(s), {fp['stable']} stable; top |λ| "
                 f"{', '.join(_num(a, 3) for a in lin['abs_eigenvalues'][:3])}; strongest input on the log step: "
                 f"{lin['top_gains'][0]['feature']}")
  eq = [e for e in h.get("log_step_equilibria") or [] if not e["at_limit"]]
  if eq:
    lines.append(f"log-step equilibrium at {eq[0]['log_step']:+.3g} ({'stable' if eq[0]['stable'] else 'unstable'})")
  real = h["schedule"]["real"]
  lines.append(f"step-size schedule along real runs: {real['shape']} ({_num(real['initial'], 3)} → "
               f"{_num(real['final'], 3)})")
  rising = h["validation"]["ratio_median"].get("rising")
  lines.append(f"rising validation loss: step size × {_num(rising, 3)} after {h['validation']['steps']} steps "
               f"(no validation loss: × {_num(h['validation']['ratio_median'].get('none'), 3)})")
  return lines
