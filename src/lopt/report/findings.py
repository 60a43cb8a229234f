"""The findings' words, written once: one-line texts per mechanism and the Markdown findings table of ``lopt
reproduce`` (``report/reproduce_report.py`` renders the same texts in HTML)."""

from __future__ import annotations

import numpy as np

PAPER = {  # what the paper found, one line per mechanism (for the findings table)
    "comparison": "the learned optimizer beats tuned momentum, RMSProp and Adam",
    "momentum": "momentum-like dynamics; on linear regression the dominant beta is near the optimal heavy ball's",
    "clipping": "the update saturates for large gradients, at a threshold matched to the gradient distribution",
    "schedule": "an autonomous learning-rate schedule (warm-up and/or decay)",
    "adaptation": "alpha_eff falls as the constant gradient g* grows in magnitude (RMSProp-like adaptation)",
}


def _num(x, digits: int = 4) -> str:
  return "n/a" if x is None or (isinstance(x, float) and not np.isfinite(x)) else f"{x:.{digits}g}"


def findings_markdown(findings: dict) -> str:
  """The findings table as Markdown: one block per task, one line per finding with its status."""
  lines = ["# lopt reproduce: findings", "",
           f"{findings['settings']['eval_problems']} evaluation problems; baseline tuning "
           f"'{findings['settings']['tuning']}'; {findings['settings'].get('seconds', 0):.0f} s.", ""]
  for name, task in findings["tasks"].items():
    lines += [f"## {name}", "", f"Optimizer: {task['source']}, {task.get('architecture_text') or 'GRU with ' + str(task['hidden_size']) + ' units'}.", ""]
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
