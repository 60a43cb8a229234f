"""The first outer step of a task-family run, its groups compiled side by side against one program of the whole.

``lopt train --task-family ...`` builds one program per shape group and compiles them in parallel threads on the
first call (``lopt.meta.train.GroupedOuterStep``); before, the whole outer step was one program, and XLA compiles a
program on one thread for most of its passes. This times the first call (compilation included) of both, in one
process, the side-by-side form first (so that one-time start-up counts against it), with the persistent
compilation cache off. The run is the family run of ``--config`` (a run's config.json) with ``--groups`` shape groups.

  python benchmarks/family_compile_time.py --groups 4                 # the GPU measurement
  python benchmarks/family_compile_time.py --groups 2 --tiny          # a CPU check of the script

The last line printed is JSON (also written to --json): machine, versions, date and the seconds.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time

os.environ.pop("JAX_COMPILATION_CACHE_DIR", None)  # every program compiled here, none read from disk

import jax  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
from lopt.meta import train as meta  # noqa: E402
from lopt.meta.config import MetaTrainConfig  # noqa: E402
from lopt.meta.estimators import restrict  # noqa: E402

DEFAULT_CONFIG = os.path.join(os.path.dirname(__file__), "..", "runs", "general-hierarchical-h200-tbptt-calibration-3",
                              "config.json")


def parse_args():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", default=DEFAULT_CONFIG, help="a family run's config.json (default: a tbptt run "
                      "with five Adam references and the step-calibration term)")
  parser.add_argument("--groups", type=int, default=4, help="shape groups (num_groups)")
  parser.add_argument("--problems", type=int, default=None, help="meta-batch size (default: the config's)")
  parser.add_argument("--tiny", action="store_true", help="CPU-sized: small problems, truncation 5, two references")
  parser.add_argument("--json", default=None, help="write the results here too")
  return parser.parse_args()


def build(args):
  values = json.load(open(args.config))
  values["task"]["options"]["num_groups"] = args.groups
  if args.problems:
    values["estimator"]["meta_batch_size"] = args.problems
  if args.tiny:
    values["task"]["options"]["max_step_flops"] = 2e5
    values["estimator"].update(meta_batch_size=2 * args.groups, truncation=5)
    if values["estimator"].get("reference_learning_rates"):
      values["estimator"]["reference_learning_rates"] = [0.001, 0.1]
  config = MetaTrainConfig.from_dict(values, args.config)
  groups, optimizer = meta.task_from(config), meta.optimizer_from(config)
  theta = meta.initial_theta(config, optimizer)
  estimator = restrict(meta.estimator_from(config, groups, optimizer), meta.trainable_mask(config, theta))
  outer = meta.outer_optimizer_from(config, optimizer)
  start = (theta, outer.init(theta), estimator.init(theta, jax.random.key(0)))
  return config, estimator, outer, start


def first_call(step, start) -> float:
  began = time.perf_counter()
  jax.block_until_ready(step(*start, jax.random.key(1)))
  return time.perf_counter() - began


def main():
  args = parse_args()
  config, estimator, outer, start = build(args)
  side_by_side = first_call(meta.build_outer_step(estimator, outer), start)
  print(f"groups side by side: first outer step {side_by_side:.1f} s", flush=True)
  one_program = first_call(jax.jit(meta._outer_step(estimator, outer)), start)
  print(f"one program:         first outer step {one_program:.1f} s", flush=True)
  result = {
      "benchmark": "family_compile_time", "date": datetime.date.today().isoformat(),
      "machine": {"device": str(jax.devices()[0].device_kind), "cpu_count": os.cpu_count(),
                  "python": platform.python_version(), "jax": jax.__version__},
      "config": os.path.relpath(args.config), "groups": args.groups, "tiny": args.tiny,
      "estimator": config.estimator.name, "meta_batch_size": config.estimator.fields.get("meta_batch_size"),
      "seconds": {"side_by_side": round(side_by_side, 1), "one_program": round(one_program, 1)},
      "ratio_one_program_to_side_by_side": round(one_program / side_by_side, 2)}
  if args.json:
    with open(args.json, "w") as f:
      json.dump(result, f, indent=1)
  print(json.dumps(result))


if __name__ == "__main__":
  main()
