"""A meta-training run's held-out problems, scored for the optimizer it started from and for its export.

A family run selects on held-out problems of its own shapes but never scores its starting point there (its first
evaluation comes after ``--eval-every`` steps), so its log does not say how far it moved. This scores both, problem
by problem, with the run's own evaluator: the normalized mean loss over the run's evaluation horizon (non-finite
counts as inf), as `lopt train` reports it.

  python benchmarks/run_held_out.py RUN_DIR [--other NAME|PATH ...] [--out results.json]

Printed: the mean (the run's held-out score), the median, the worst problem and, per held-out group, the share of
problems where the export does better than the start. ``--other`` scores further trained optimizers of the same
architecture on the same problems.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
from pathlib import Path

import jax
import numpy as np

import lopt
from lopt.checkpoint import read_json
from lopt.meta.config import MetaTrainConfig
from lopt.meta.train import build_evaluator, held_out_keys, held_out_tasks, initial_theta, optimizer_from, task_from


def summary(scores: np.ndarray) -> dict:
  return {"mean": float(np.mean(scores)), "median": float(np.median(scores)), "worst": float(np.max(scores))}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("run", type=Path)
  parser.add_argument("--other", action="append", default=[], metavar="NAME|PATH")
  parser.add_argument("--out", type=Path)
  args = parser.parse_args(argv)
  config = MetaTrainConfig.from_dict(read_json(args.run / "config.json", "run config"))
  task, optimizer = task_from(config), optimizer_from(config)
  eval_task, horizon = held_out_tasks(config, task)
  evaluate = build_evaluator(eval_task, optimizer, horizon)
  keys = held_out_keys(config.seed, config.num_eval_problems)
  thetas = {f"start ({config.outer.init_from or 'seed'})": initial_theta(config, optimizer),
            "export": lopt.load(args.run / "optimizer").theta}
  thetas.update({name: lopt.load(name).theta for name in args.other})
  scores = {name: np.asarray(evaluate(theta, keys)) for name, theta in thetas.items()}
  groups = read_json(args.run / "task_groups.json", "task groups")["held_out"] if isinstance(eval_task, tuple) else []
  parts = np.array_split(np.arange(len(keys)), max(len(groups), 1))  # how build_evaluator shares out the keys
  start, export = list(scores.values())[:2]
  for name, s in scores.items():
    print(f"{name:<40} " + "  ".join(f"{k} {v:.4g}" for k, v in summary(s).items()))
  for group, part in zip(groups, parts):
    print(f"  {group['family']:<20} export better on {np.mean(export[part] < start[part]):.0%} of {part.size}; "
          f"start {np.median(start[part]):.3g}, export {np.median(export[part]):.3g} (medians)")
  if args.out:
    record = {"run": str(args.run), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "machine": {"platform": platform.platform(), "devices": [d.device_kind for d in jax.devices()],
                          "versions": {"jax": jax.__version__, "lopt": lopt.__version__}},
              "groups": [g["family"] for g in groups], "horizon": horizon,
              "scores": {name: s.tolist() for name, s in scores.items()},
              "summary": {name: summary(s) for name, s in scores.items()}}
    args.out.write_text(json.dumps(record, indent=1))
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
