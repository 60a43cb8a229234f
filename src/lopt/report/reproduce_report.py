"""``DIR/reproduce.html``: the paper's figure set for every task and the findings table, in one self-contained file.

Figures come from what ``lopt reproduce`` wrote: Figure 1 is redrawn from ``TASK/comparison/results.json`` (one
panel per task); the mechanism figures are the PNGs of ``TASK/analysis/``. Everything is embedded (no URL).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from lopt.report import figures
from lopt.report.html import Section, escape, table, write

MECHANISMS = ("momentum", "clipping", "schedule", "adaptation")


def figure_one(comparisons: dict[str, dict]):
  """Loss curves, one panel per task (the paper's Figure 1)."""
  import matplotlib.pyplot as plt
  count = len(comparisons)
  columns = min(count, 2)
  rows = int(np.ceil(count / columns))
  figure, axes = plt.subplots(rows, columns, figsize=(6.0 * columns, 4.0 * rows), squeeze=False)
  for axis, (name, comparison) in zip(axes.ravel(), comparisons.items()):
    for label, result in sorted(comparison["results"].items(), key=lambda item: item[1]["kind"] != "learned"):
      mean, se = np.asarray(result["curve_mean"], float), np.asarray(result["curve_se"], float)
      steps = np.arange(mean.size)
      color = figures.color_for(label, result["kind"])
      axis.plot(steps, mean, color=color, lw=2.2 if result["kind"] == "learned" else 1.4,
                label=f"{label} ({result['normalized_mean_loss']:.3g})")
      axis.fill_between(steps, np.clip(mean - se, 1e-12, None), mean + se, color=color, alpha=0.2, lw=0)
    axis.set_yscale("log")
    axis.set_title(f"{name} ({comparison['settings']['num_eval_problems']} problems)")
    axis.set_xlabel("step")
    axis.set_ylabel("loss / initial loss")
    axis.grid(alpha=0.3, which="both")
    axis.legend(fontsize=7, title="normalized mean loss", title_fontsize=7)
  for axis in axes.ravel()[count:]:
    axis.set_visible(False)
  figure.tight_layout()
  return figure


def findings_rows(findings: dict) -> list[list[str]]:
  """One row per task and finding: what was measured, and whether the paper's finding reproduced."""
  from lopt.report import findings as r
  rows = []
  for name, task in findings["tasks"].items():
    c = task["comparison"]
    versus = "; ".join(f"{b} {r._num(row['baseline'])} (ratio {r._num(row['ratio'], 3)}, {row['verdict']})"
                       for b, row in c["baselines"].items())
    rows.append([name, "comparison", f"learned {r._num(c['learned'])} ± {r._num(c['learned_se'], 2)} vs {versus}",
                 c["status"]])
    for key, text in (("momentum", r.momentum_text), ("clipping", r.clipping_text), ("schedule", r.schedule_text),
                      ("adaptation", r.adaptation_text)):
      rows.append([name, key, text(task[key]), task[key]["status"]])
  return rows


def _png(path: Path) -> bytes | None:
  return path.read_bytes() if path.is_file() else None


def task_section(out: Path, name: str, task: dict, comparison: dict) -> Section:
  """Figure 1 panel, comparison table and the four mechanism figures of one task."""
  from lopt.report import findings as r
  from lopt.report.comparison import HEADERS, table_rows, verdicts
  settings = comparison["settings"]
  section = Section(f"{name}")
  shipped = settings.get("shipped_tuning") or {}
  section.paragraphs.append(
      f"Optimizer: {escape(task['source'])}. Baselines tuned <b>{escape(settings.get('tuning_mode', 'full'))}</b>"
      f" (shipped full-grid tuning budget on {escape(shipped.get('device'))}: "
      f"{escape(shipped.get('budget'))} candidate-problem runs). Evaluated on {settings['num_eval_problems']} fresh "
      f"problems.")
  section.paragraphs.append(table(HEADERS, table_rows(comparison)))
  section.paragraphs.append("<ul>" + "".join(f"<li>{escape(v)}</li>" for v in verdicts(comparison)) + "</ul>")
  section.paragraphs.append("<ul>" + "".join(
      f"<li><b>{key}</b>: {escape(text(task[key]))} — <i>{escape(task[key]['status'])}</i></li>"
      for key, text in (("momentum", r.momentum_text), ("clipping", r.clipping_text),
                        ("schedule", r.schedule_text), ("adaptation", r.adaptation_text))) + "</ul>")
  for mechanism in MECHANISMS:
    png = _png(out / name / "analysis" / f"{mechanism}.png")
    if png is not None:
      section.figures.append((png, f"{name}. {r.MECHANISM_CAPTIONS[mechanism]}"))
  return section


def write_reproduce_report(out: str | Path, findings: dict) -> Path:
  """Writes ``out/reproduce.html`` and returns its path."""
  out = Path(out)
  comparisons = {name: json.loads((out / name / "comparison" / "results.json").read_text())
                 for name in findings["tasks"]}
  overview = Section("Figure 1 and findings")
  overview.paragraphs.append(
      f"Normalized mean loss (mean over the horizon of loss/initial loss), mean ± standard error over "
      f"{findings['settings']['eval_problems']} fresh problems. A learned optimizer is better/worse than a baseline "
      f"when the paired difference exceeds two standard errors. Took {findings['settings'].get('seconds', 0):.0f} s.")
  overview.figures.append((figures.to_png(figure_one(comparisons)),
                           "Figure 1: training loss of the learned optimizer and the tuned baselines, per task."))
  overview.paragraphs.append(table(["task", "finding", "measured", "paper's finding"], findings_rows(findings)))
  sections = [overview] + [task_section(out, name, task, comparisons[name])
                           for name, task in findings["tasks"].items()]
  return write(out / "reproduce.html", "lopt reproduce: the paper's results on four tasks", sections)
