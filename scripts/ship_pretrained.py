"""Copies a finished run's optimizer into the package (src/lopt/pretrained/NAME) with everything a user may ask of it.

  python scripts/ship_pretrained.py RUN_DIR NAME --search SEARCH.json --provenance TEXT [--device TEXT]

RUN_DIR is a `lopt train` run directory that `lopt compare RUN_DIR` has been run on. The shipped config.json's
"info" holds the training config, the held-out selection, the search that chose the config (SEARCH.json, written by
hand from the runs tried), the compute (outer steps and wall seconds summed over the run's metrics.jsonl, which
restarts its clock on every resume) and the comparison with tuned baselines on fresh problems (without its curves).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from lopt.checkpoint import load_optimizer, read_json, save_optimizer
from lopt.meta import evaluate as evaluation
from lopt.meta.train import load_metrics

CURVES = ("curve_mean", "curve_se", "raw_curve_mean", "per_problem")


def evaluation_info(comparison: dict, seconds: float | None) -> dict:
  """A ``lopt.meta.evaluate.compare`` result as a shipped config's ``info["evaluation"]``: settings, results without
  their curves (small enough for config.json), paired ratios of the learned optimizer to each baseline."""
  results = comparison["results"]
  learned = results["learned"]
  return {"settings": {k: v for k, v in comparison["settings"].items() if k not in ("learning_rates", "seconds")},
          "results": {name: {k: v for k, v in r.items() if k not in CURVES} for name, r in results.items()},
          "ratios": {name: evaluation.paired_ratio(learned, r) for name, r in results.items() if name != "learned"},
          "seconds": seconds}


def training_seconds(metrics: list[dict]) -> float:
  """Wall seconds of a run resumed several times: the clock restarts at each resume, so sum each segment's last."""
  total, last = 0.0, 0.0
  for record in metrics:
    if record["seconds"] < last:
      total += last
    last = record["seconds"]
  return total + last


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("run_dir", type=Path)
  parser.add_argument("name")
  parser.add_argument("--search", type=Path, required=True)
  parser.add_argument("--provenance", required=True)
  parser.add_argument("--device", default="NVIDIA H100 80GB HBM3")
  args = parser.parse_args(argv)

  optimizer, theta, config = load_optimizer(args.run_dir / "optimizer")
  comparison = read_json(args.run_dir / "comparison" / "results.json", "comparison")
  metrics = load_metrics(args.run_dir)
  learned = comparison["results"]["learned"]
  seconds = training_seconds(metrics)
  info = {**config["info"],
          "search": json.loads(args.search.read_text()),
          "compute": {"device": args.device, "outer_steps_total": metrics[-1]["step"],
                      "training_seconds": round(seconds), "seconds_per_outer_step": seconds / metrics[-1]["step"]},
          "evaluation": evaluation_info(comparison, comparison["settings"].get("seconds")),
          "provenance": args.provenance}
  out = Path(__file__).resolve().parents[1] / "src" / "lopt" / "pretrained" / args.name
  save_optimizer(out, optimizer, theta, info)
  print(f"shipped {args.run_dir} as {out}: learned {learned['normalized_mean_loss']:.4f}; "
        + ", ".join(f"{n} ratio {r['ratio']:.3f}" for n, r in info["evaluation"]["ratios"].items()))


if __name__ == "__main__":
  main(sys.argv[1:])
