"""Report sections for ``analysis/``: each mechanism's numbers, figure, and a plain-language paragraph from them."""

from __future__ import annotations

import json
from pathlib import Path

from lopt.report.findings import (HIERARCHICAL_CAPTIONS, MECHANISM_CAPTIONS, adaptation_paragraph, clipping_paragraph,
                                  hierarchical_equilibria_paragraph, hierarchical_findings,
                                  hierarchical_fixed_points_paragraph, hierarchical_inputs_paragraph,
                                  hierarchical_schedule_paragraph, hierarchical_validation_paragraph,
                                  momentum_paragraph, schedule_paragraph)
from lopt.report.html import Section, escape


MECHANISMS = [
    ("momentum", "Momentum: the convergence point and its linearization", momentum_paragraph),
    ("clipping", "Gradient clipping", clipping_paragraph),
    ("schedule", "Learning-rate schedule", schedule_paragraph),
    ("adaptation", "Learning-rate adaptation", adaptation_paragraph),
    ("pca", "State space", lambda s: (
        f"{s['pca']['components_for_90_percent']} principal components explain 90% of the variance of the visited "
        f"states." if s.get("pca") else "")),
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
  if source.get("recurrent", True):
    how = ("fixed points polished with Newton steps to machine precision (float64), linearization, update "
           "functions")
  elif summary.get("hierarchical"):
    how = ("update functions probed along real runs (no per-coordinate recurrent state map, so fixed points, "
           "momentum and adaptation of the GRU kind do not apply), and the per-tensor LSTM that sets each tensor's "
           "step size: its fixed points at typical inputs, linearization, the learned step-size schedule and the "
           "response to a rising validation loss (numbers in <code>analysis/hierarchical.json</code>)")
  else:
    how = ("update functions probed along real runs (the architecture has no recurrent state map, so fixed points, "
           "momentum and adaptation do not apply)")
  intro.paragraphs.append(
      f"Reverse engineering with <code>lopt.dynamics</code> on {source.get('num_problems', '?')} "
      f"<code>{escape(source.get('task', '?'))}</code> problems: {how}. Numbers in "
      f"<code>analysis/summary.json</code>.")
  sections = [intro]
  for key, title, text in MECHANISMS:
    caption = MECHANISM_CAPTIONS[key if source.get("recurrent", True) or key != "schedule" else "learned_schedule"]
    section = Section(title)
    paragraph = text(summary)
    if paragraph:
      section.paragraphs.append(escape(paragraph))
    png = directory / f"{key}.png"
    if png.is_file():
      section.figures.append((png.read_bytes(), caption))
    if section.paragraphs or section.figures:
      sections.append(section)
  if summary.get("hierarchical"):
    sections.extend(hierarchical_sections(directory, summary["hierarchical"]))
  return sections


HIERARCHICAL_SECTIONS = [
    ("The per-tensor LSTM: typical inputs and fixed points",
     (hierarchical_inputs_paragraph, hierarchical_fixed_points_paragraph, hierarchical_equilibria_paragraph),
     ("hierarchical_inputs", "hierarchical_controller")),
    ("The per-tensor LSTM: the learned step-size schedule", (hierarchical_schedule_paragraph,),
     ("hierarchical_schedule",)),
    ("The per-tensor LSTM: response to a rising validation loss", (hierarchical_validation_paragraph,),
     ("hierarchical_validation",)),
]


def hierarchical_sections(directory: Path, h: dict) -> list[Section]:
  """The hierarchical optimizer's per-tensor LSTM (``lopt.pipeline.hierarchical_analysis``): its findings, then a
  section per part with paragraphs from ``h`` (summary.json's "hierarchical") and the figures of ``directory``."""
  sections = []
  for k, (title, paragraphs, figures) in enumerate(HIERARCHICAL_SECTIONS):
    section = Section(title)
    if k == 0:
      section.paragraphs.append("<ul>" + "".join(f"<li>{escape(line)}</li>" for line in hierarchical_findings(h))
                                + "</ul>")
    for paragraph in paragraphs:
      text = paragraph(h)
      if text:
        section.paragraphs.append(escape(text))
    for name in figures:
      png = directory / f"{name}.png"
      if png.is_file():
        section.figures.append((png.read_bytes(), HIERARCHICAL_CAPTIONS[name]))
    sections.append(section)
  return sections
