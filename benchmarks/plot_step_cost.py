"""The recorded step-cost measurements of `general` against Adam as one figure: every row of a
``general_step_cost.py`` results file (JSON lines), in the order recorded, its ratio to Adam on a log scale.

  python benchmarks/plot_step_cost.py [benchmarks/results/general_step_cost_h200.jsonl] [--out docs/images/general_step_cost.png]

Colour: the framework (JAX, PyTorch); marker: the model size (about 10M or 100M parameters); hollow markers are
rows measured with a non-default setting (another compile mode, the Triton kernels or Pallas passes switched off, a
batching limit, convolution layers, the loss as a device tensor). The lines: the issue's bound (3x) and the floor of
a GPU-memory-bound step (2.14x: 15 floats moved per parameter against Adam's 7).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

TARGET, FLOOR = 3.0, 15 / 7
# The settings a row may carry, and the values that are the optimizer as shipped (None: the row predates the
# setting, so it measured the default of its day).
DEFAULTS = {"compile": (None,), "triton": (None, "auto", "on"), "jax_passes": (None, "pallas"), "layers": (None,),
            "group_limit": (None, 2**21), "tensor_loss": (None, False)}


def is_default(row: dict) -> bool:
  """True when every setting the row records is a shipped default."""
  return all(row.get(key) in values for key, values in DEFAULTS.items())


def load(path: Path) -> list[dict]:
  """The rows of a JSON-lines results file, each with ``index`` (its position) added."""
  rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
  return [{**row, "index": i} for i, row in enumerate(rows)]


def plot(rows: list[dict], out: Path) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  colors = {"jax": "tab:blue", "torch": "tab:orange"}
  fig, ax = plt.subplots(figsize=(9, 4.5))
  for framework, name in (("jax", "JAX"), ("torch", "PyTorch")):
    for large, marker, size in ((False, "o", "~10M"), (True, "s", "~100M")):
      for default in (True, False):
        chosen = [r for r in rows if r["framework"] == framework and (r["params"] > 3e7) == large
                  and is_default(r) == default]
        if not chosen:
          continue
        ax.scatter([r["index"] for r in chosen], [r["ratio"] for r in chosen], marker=marker, s=28,
                   facecolors=colors[framework] if default else "none", edgecolors=colors[framework],
                   label=f"{name}, {size}" + ("" if default else ", other setting"))
  ax.axhline(TARGET, color="black", lw=1, ls="--", label="bound: 3x Adam")
  ax.axhline(FLOOR, color="gray", lw=1, ls=":", label="memory-bound floor: 2.14x")
  ax.set_yscale("log")
  ax.set_xlabel("measurement, in the order recorded (2026-11-30 to 2026-12-02, one H200 per call)")
  ax.set_ylabel("general's step / Adam's step")
  ax.set_title("Step cost of `general` against Adam (fused in PyTorch), H200")
  ax.legend(fontsize=7, ncol=2, loc="upper right")
  ax.grid(True, which="both", alpha=0.3)
  fig.tight_layout()
  out.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(out, dpi=120)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("results", nargs="?", type=Path,
                      default=Path(__file__).parent / "results" / "general_step_cost_h200.jsonl")
  parser.add_argument("--out", type=Path, default=Path(__file__).parent.parent / "docs/images/general_step_cost.png")
  args = parser.parse_args(argv)
  rows = load(args.results)
  plot(rows, args.out)
  latest = {}
  for row in rows:
    if is_default(row):
      latest[(row["framework"], row["params"] > 3e7)] = row
  for (framework, large), row in sorted(latest.items()):
    print(f"{framework:5s} {'~100M' if large else '~10M':5s} last default row {row['index']}: {row['ratio']:.2f}x "
          f"({row['general_ms']:.3f} ms against {row['adam_ms']:.3f} ms, {row['date']})")
  print(f"wrote {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
