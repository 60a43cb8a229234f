"""Ships a trained general-purpose optimizer as lopt's `general` (src/lopt/pretrained/general), with its lineage.

  python scripts/ship_general.py OPTIMIZER_DIR --run RUN_DIR:DEVICE [--run ...] --benchmark BENCHMARK.json
      [--benchmark-name NAME] [--what TEXT --why TEXT] [--destination DIR]

OPTIMIZER_DIR is the trained optimizer to ship (a run's optimizer/, or a graft written by benchmarks/theta_graft.py).
Each --run is one meta-training run it descends from, oldest first (warm starts with --init-from; for a graft, the
base's runs, then the donor's), with the device it ran on ("H200", "2 CPU cores"). The shipped config.json's "info"
holds the training config, every run's steps, inner steps, wall time and best held-out score, the compute summed per
device, and the `lopt benchmark` summary (machine, versions, date, win rates, speedup, per-problem ratios to tuned
Adam) of the entry NAME of BENCHMARK.json (default: general). A graft's "graft" record (base, donor, leaves taken,
weight) and the donor's training config are kept, and so is the optimizer's list of "changes", to which --what and
--why add an entry dated today. docs/GENERAL.md tabulates the same.
"""

from __future__ import annotations

import argparse
import datetime
import json
from pathlib import Path

from lopt._version import __version__
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


def benchmark_summary(path: Path, name: str = "general") -> dict:
  """What config.json keeps of a benchmark.json: machine, date, settings that matter, the summary, and per problem
  the mean-loss and final-loss ratios to tuned Adam (no curves) of the learned optimizer entered as ``name``."""
  data = json.loads(path.read_text())
  if name not in data["summary"]:
    raise SystemExit(f"{path}: no learned optimizer named {name!r}; it has {', '.join(sorted(data['summary']))}")
  settings = {k: data["settings"][k] for k in ("quick", "problems", "tuning_seeds", "eval_seeds", "valid_every")}
  problems = {}
  for problem_name, problem in data["problems"].items():
    comparison = problem["learned"][name]
    problems[problem_name] = {k: comparison[k] for k in ("ratio_mean_loss", "ratio_final_loss", "speedup")}
  return {"date": data["date"], "machine": data["machine"], "seconds": data["seconds"], "settings": settings,
          "summary": data["summary"][name], "problems": problems}


def shipped_info(source_info: dict, runs: list[dict], benchmark: dict, change: dict | None = None) -> dict:
  """The shipped config's "info": the source's training config, best step, graft record and changes, with the
  lineage ``runs``, their compute summed per device, the benchmark summary and ``change`` appended."""
  compute: dict = {}
  for run in runs:
    compute[run["device"]] = round(compute.get(run["device"], 0.0) + run["seconds"] / 3600, 3)
  info = {"training": source_info.get("training"), "best_step": source_info.get("best_step"), "lineage": runs,
          "compute_hours": compute, "benchmark": benchmark, "docs": "docs/GENERAL.md"}
  if "graft" in source_info:
    graft = dict(source_info["graft"])
    _, _, donor = load_optimizer(graft["donor"])
    graft["donor_training"] = donor["info"].get("training")
    info["graft"] = graft
  changes = list(source_info.get("changes", []))
  if change is not None:
    changes.append(change)
  if changes:
    info["changes"] = changes
  return info


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("optimizer")
  parser.add_argument("--run", action="append", required=True, help="RUN_DIR:DEVICE, oldest first")
  parser.add_argument("--benchmark", required=True)
  parser.add_argument("--benchmark-name", default="general", help="the optimizer's entry in the benchmark JSON")
  parser.add_argument("--what", help="what changed from the optimizer shipped before (with --why)")
  parser.add_argument("--why", help="why it changed")
  parser.add_argument("--destination", type=Path, default=DESTINATION)
  args = parser.parse_args(argv)
  if (args.what is None) != (args.why is None):
    parser.error("--what and --why go together")
  optimizer, theta, config = load_optimizer(args.optimizer)
  runs = [run_summary(Path(spec.rsplit(":", 1)[0]), spec.rsplit(":", 1)[1]) for spec in args.run]
  change = None if args.what is None else {"date": datetime.date.today().isoformat(), "lopt_version": __version__,
                                           "what": args.what, "why": args.why, "docs": "docs/GENERAL.md"}
  info = shipped_info(config["info"], runs, benchmark_summary(Path(args.benchmark), args.benchmark_name), change)
  save_optimizer(args.destination, optimizer, theta, info)
  print(f"shipped {args.optimizer} as {args.destination.name}: {args.destination}")


if __name__ == "__main__":
  main()
