"""Report sections for ``analysis/``: each mechanism's numbers, figure, and a plain-language paragraph from them."""

from __future__ import annotations

import json
from pathlib import Path

from lopt.report.findings import (MECHANISM_CAPTIONS, adaptation_paragraph, clipping_paragraph, momentum_paragraph,
                                  schedule_paragraph)
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
  return sections
