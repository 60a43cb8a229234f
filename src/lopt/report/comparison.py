"""The comparison table (text, markdown, HTML) and files: results.json, table.md, loss_curves.png."""

from __future__ import annotations

import json
from pathlib import Path

from lopt.io.checkpoint import atomic_write_bytes
from lopt.evaluation.compare import paired_ratio, verdict as paired_verdict
from lopt.report import figures

HEADERS = ["optimizer", "normalized mean loss", "± s.e.", "final loss / initial", "learned / this",
           "hyperparameters"]


def _format_hyperparameters(result: dict) -> str:
  hp = result.get("hyperparameters")
  if not hp:
    return "meta-trained" if result["kind"] == "learned" else ""
  return ", ".join(f"{k}={v:.3g}" for k, v in hp.items())


def table_rows(comparison: dict) -> list[list[str]]:
  """One row per optimizer, best first. 'learned / this': the learned optimizer's loss over this one's (<1: the
  learned optimizer is better)."""
  results = comparison["results"]
  learned = next((r for r in results.values() if r["kind"] == "learned"), None)
  rows = []
  for name, result in sorted(results.items(), key=lambda item: item[1]["normalized_mean_loss"]):
    ratio = ""
    if learned is not None and result is not learned:
      paired = paired_ratio(learned, result)
      ratio = f"{paired['ratio']:.3g}" if paired["ratio"] == paired["ratio"] else "n/a"
    rows.append([name, f"{result['normalized_mean_loss']:.4g}", f"{result['normalized_mean_loss_se']:.2g}",
                 f"{result['final_normalized_loss']:.3g}", ratio, _format_hyperparameters(result)])
  return rows


def text_table(comparison: dict) -> str:
  rows = [HEADERS] + table_rows(comparison)
  widths = [max(len(str(r[i])) for r in rows) for i in range(len(HEADERS))]
  line = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
  return "\n".join([line(rows[0]), line(["-" * w for w in widths])] + [line(r) for r in rows[1:]])


def markdown_table(comparison: dict) -> str:
  rows = table_rows(comparison)
  out = ["| " + " | ".join(HEADERS) + " |", "|" + "---|" * len(HEADERS)]
  out += ["| " + " | ".join(r) + " |" for r in rows]
  return "\n".join(out)


def verdicts(comparison: dict) -> list[str]:
  """Plain sentences: how the learned optimizer stands against each tuned baseline (paired over problems)."""
  results = comparison["results"]
  out = []
  for lname, learned in results.items():
    if learned["kind"] != "learned":
      continue
    for bname, base in results.items():
      if base["kind"] == "learned":
        continue
      paired = paired_ratio(learned, base)
      d, se = paired["difference"], paired["difference_se"]
      if d != d:
        out.append(f"{lname} vs tuned {bname}: not comparable (a run diverged).")
        continue
      verdict = {"better": "better than", "worse": "worse than"}.get(paired_verdict(paired), "indistinguishable from")
      out.append(f"{lname} is {verdict} tuned {bname}: normalized mean loss {learned['normalized_mean_loss']:.4g} vs "
                 f"{base['normalized_mean_loss']:.4g} (ratio {paired['ratio']:.3g}; paired difference "
                 f"{d:+.3g} ± {se:.2g} s.e.)")
  return out


def write_comparison(directory: str | Path, comparison: dict) -> dict[str, Path]:
  """Writes results.json, table.md, loss_curves.png and tuning.png into ``directory``."""
  directory = Path(directory)
  paths = {"results": directory / "results.json", "table": directory / "table.md",
           "loss_curves": directory / "loss_curves.png", "tuning": directory / "tuning.png"}
  atomic_write_bytes(paths["results"], json.dumps(comparison, indent=1).encode())
  atomic_write_bytes(paths["table"], (markdown_table(comparison) + "\n\n" + "\n".join(
      f"- {v}" for v in verdicts(comparison)) + "\n").encode())
  atomic_write_bytes(paths["loss_curves"], figures.to_png(figures.loss_curves(comparison)))
  atomic_write_bytes(paths["tuning"], figures.to_png(figures.tuning_curves(comparison)))
  return paths
