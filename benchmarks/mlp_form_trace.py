"""What a family run's start costs with `hierarchical`'s per-coordinate MLP unit by unit or as matrix products.

One shape group's estimate of a run's config (default: runs/general-hierarchical-h200-tbptt-calibration-8b, tbptt
with five references) is traced, lowered and (with --compile) compiled, once per variant, each in a fresh process:
the MLP form (LOPT_JAX_MLP_FORM matrix or units) times the tensors of one shape stepped one at a time (a CPU's path)
or as a batch (an accelerator's). Printed side by side, with the equations of the traced program.

  python benchmarks/mlp_form_trace.py [--config RUN/config.json] [--compile] [--json out.json]

The last line printed is JSON: machine, versions, date and each variant's seconds.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CONFIG = os.path.join(HERE, "..", "runs", "general-hierarchical-h200-tbptt-calibration-8b", "config.json")
VARIANTS = [("matrix", False), ("units", False), ("matrix", True), ("units", True)]


def count_equations(jaxpr) -> int:
  """Equations of a jaxpr, those of its sub-jaxprs (scan bodies, custom derivatives) included."""
  from jax._src import core
  return sum(1 + sum(count_equations(sub) for sub in core.jaxprs_in_params(e.params)) for e in jaxpr.eqns)


def measure(config: str, batched: bool, compile_too: bool) -> dict:
  """In this process (LOPT_JAX_MLP_FORM already set): one group's estimate traced, lowered, compiled."""
  import jax
  sys.path[:0] = [HERE, os.path.join(HERE, "..", "src")]
  import family_compile_time
  from lopt.architectures.hierarchical import optimizer as hierarchical
  hierarchical.HierarchicalOptimizer._batches_tensors = lambda self: batched
  args = argparse.Namespace(config=config, groups=2, problems=4, tiny=False)
  _, estimator, _, (theta, _, state) = family_compile_time.build(args)
  began = time.perf_counter()
  traced = jax.jit(estimator.estimators[0].estimate).trace(theta, state[0], jax.random.key(1))
  out = {"trace_s": time.perf_counter() - began, "equations": count_equations(traced.jaxpr.jaxpr)}
  began = time.perf_counter()
  lowered = traced.lower()
  out["lower_s"] = time.perf_counter() - began
  if compile_too:
    began = time.perf_counter()
    lowered.compile()
    out["compile_s"] = time.perf_counter() - began
  return {k: round(v, 1) if isinstance(v, float) else v for k, v in out.items()}


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", default=DEFAULT_CONFIG, help="a family run's config.json")
  parser.add_argument("--compile", action="store_true", help="compile too (minutes on a CPU)")
  parser.add_argument("--json", default=None, help="write the results here too")
  parser.add_argument("--variant", default=None, help=argparse.SUPPRESS)  # FORM,BATCHED: one measurement, as JSON
  args = parser.parse_args()
  if args.variant:
    form, batched = args.variant.split(",")
    print(json.dumps(measure(args.config, batched == "1", args.compile)))
    return
  rows = []
  for form, batched in VARIANTS:
    command = [sys.executable, __file__, "--config", args.config, "--variant", f"{form},{int(batched)}"]
    env = {**os.environ, "LOPT_JAX_MLP_FORM": form}
    env.pop("JAX_COMPILATION_CACHE_DIR", None)  # every program compiled here
    done = subprocess.run(command + (["--compile"] if args.compile else []), env=env, capture_output=True,
                          text=True, check=True)
    rows.append({"mlp_form": form, "tensors": "batched" if batched else "one at a time",
                 **json.loads(done.stdout.strip().splitlines()[-1])})
    print(rows[-1], flush=True)
  from lopt.evaluation.benchmark import machine  # jax only now: each variant ran in a fresh process
  result = {"benchmark": "mlp_form_trace", "date": datetime.date.today().isoformat(), "machine": machine(),
            "config": os.path.relpath(args.config), "variants": rows}
  if args.json:
    with open(args.json, "w") as f:
      json.dump(result, f, indent=1)
  print(json.dumps(result))


if __name__ == "__main__":
  main()
