"""Assembles ``report.html`` for a run directory from what is there: comparison, meta-training curve, analyses."""

from __future__ import annotations

import json
from pathlib import Path

from lopt.io.checkpoint import read_json
from lopt.report import figures
from lopt.report.comparison import HEADERS, table_rows, verdicts
from lopt.report.html import Section, escape, table, write


def comparison_section(comparison: dict) -> Section:
  settings = comparison["settings"]
  section = Section("Learned optimizer vs tuned baselines")
  section.paragraphs.append(
      f"Task <code>{escape(settings['task'])}</code>, horizon {settings['horizon']} steps. Baselines tuned on "
      f"{settings['num_tuning_problems']} problems over a learning-rate grid of {len(settings['learning_rates'])} "
      f"values × their β-type grids, selected by normalized mean loss (mean over the horizon of loss/initial loss), "
      f"then everything evaluated on {settings['num_eval_problems']} fresh problems.")
  section.paragraphs.append(table(HEADERS, table_rows(comparison)))
  section.paragraphs.append("<ul>" + "".join(f"<li>{escape(v)}</li>" for v in verdicts(comparison)) + "</ul>")
  section.figures.append((figures.to_png(figures.loss_curves(comparison)),
                          "Normalized training loss, mean ± standard error over evaluation problems (Figure 1 style)."))
  section.figures.append((figures.to_png(figures.tuning_curves(comparison)),
                          "Baseline tuning: best score at each learning rate."))
  return section


def training_section(run_dir: Path) -> Section | None:
  from lopt.meta.train import load_metrics
  if not (run_dir / "metrics.jsonl").exists():
    return None
  metrics = load_metrics(run_dir)
  if not metrics:
    return None
  from lopt import architectures
  from lopt.meta.config import MetaTrainConfig
  config = MetaTrainConfig.from_dict(read_json(run_dir / "config.json", "run config"), str(run_dir / "config.json"))
  optimizer = architectures.get(config.optimizer.architecture).describe(config.optimizer.fields)
  batch = config.estimator.fields.get("meta_batch_size")
  section = Section("Meta-training")
  section.paragraphs.append(
      f"{len(metrics)} logged steps of {config.outer.num_steps}; {escape(optimizer)}; estimator "
      f"<code>{escape(config.estimator.name)}</code>{f', meta-batch {batch}' if batch else ''}, outer Adam lr "
      f"{config.outer.learning_rate:g}. Skipped steps (non-finite meta-gradient): "
      f"{metrics[-1].get('total_skipped_steps', 0)}.")
  section.figures.append((figures.to_png(figures.meta_training_curve(metrics)),
                          "Meta-loss per outer step and held-out normalized mean loss."))
  return section


def write_report(run_dir: str | Path, extra_sections: list[Section] | None = None) -> Path:
  """Writes ``run_dir/report.html`` and returns its path."""
  run_dir = Path(run_dir)
  sections = []
  comparison_path = run_dir / "comparison" / "results.json"
  if comparison_path.exists():
    sections.append(comparison_section(json.loads(comparison_path.read_text())))
  training = training_section(run_dir)
  if training is not None:
    sections.append(training)
  from lopt.report.dynamics_report import analysis_sections
  sections.extend(analysis_sections(run_dir))  # analysis/ from `lopt analyze`, when present
  sections.extend(extra_sections or [])
  return write(run_dir / "report.html", f"lopt report: {run_dir.name}", sections)
