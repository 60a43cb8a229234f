"""Ships a trained general-purpose optimizer as lopt's `general` (src/lopt/pretrained/general), with its lineage.

  python scripts/ship_general.py OPTIMIZER_DIR --run RUN_DIR:DEVICE [--run ...] --benchmark BENCHMARK.json

OPTIMIZER_DIR is the trained optimizer to ship (a run's optimizer/). Each --run is one meta-training run it descends
from, oldest first (warm starts with --init-from), with the device it ran on ("H200", "2 CPU cores"). The shipped
config.json's "info" holds the last run's training config, every run's steps, inner steps, wall time and best
held-out score, the compute summed per device, and the `lopt benchmark` summary (machine, versions, date, win rates,
speedup, per-problem ratios to tuned Adam). docs/GENERAL.md tabulates the same.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lopt.io.checkpoint import load_optimizer, save_optimizer
from lopt.meta.train import load_metrics

DESTINATION = Path(__file__).resolve().parent.parent / "src" / "lopt" / "pretrained" / "general"


def run_summary(run_dir: Path, device: str) -> dict:
  """Steps, inner steps, wall seconds (summed over resumed segments: each restarts its clock) and the best held-out
  score of a run directory."""
  metrics = load_metrics(run_dir)
  seconds, last = 0.0, 0.0
  for record in metrics:
    if record["seconds"] < last:
      seconds += last
    last = record["seconds"]
  seconds += last
  held_out = [r["held_out_loss"] for r in metrics if "held_out_loss" in r]
  return {"run": run_dir.name, "device": device, "steps": metrics[-1]["step"] if metrics else 0,
          "inner_steps": metrics[-1].get("inner_steps") if metrics else 0, "seconds": round(seconds, 1),
          "best_held_out_loss": min(held_out) if held_out else None}


def benchmark_summary(path: Path) -> dict:
  """What config.json keeps of a benchmark.json: machine, date, settings that matter, the summary, and per problem
  the mean-loss and final-loss ratios to tuned Adam (no curves)."""
  data = json.loads(path.read_text())
  settings = {k: data["settings"][k] for k in ("quick", "problems", "tuning_seeds", "eval_seeds", "valid_every")}
  problems = {}
  for name, problem in data["problems"].items():
    comparison = problem["learned"]["general"]
    problems[name] = {k: comparison[k] for k in ("ratio_mean_loss", "ratio_final_loss", "speedup")}
  return {"date": data["date"], "machine": data["machine"], "seconds": data["seconds"], "settings": settings,
          "summary": data["summary"].get("general"), "problems": problems}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("optimizer")
  parser.add_argument("--run", action="append", required=True, help="RUN_DIR:DEVICE, oldest first")
  parser.add_argument("--benchmark", required=True)
  args = parser.parse_args()
  optimizer, theta, config = load_optimizer(args.optimizer)
  runs = [run_summary(Path(spec.rsplit(":", 1)[0]), spec.rsplit(":", 1)[1]) for spec in args.run]
  compute: dict = {}
  for run in runs:
    compute[run["device"]] = round(compute.get(run["device"], 0.0) + run["seconds"] / 3600, 3)
  info = {"training": config["info"].get("training"), "best_step": config["info"].get("best_step"),
          "lineage": runs, "compute_hours": compute, "benchmark": benchmark_summary(Path(args.benchmark)),
          "docs": "docs/GENERAL.md"}
  save_optimizer(DESTINATION, optimizer, theta, info)
  print(f"shipped {args.optimizer} as general: {DESTINATION}")


if __name__ == "__main__":
  main()
