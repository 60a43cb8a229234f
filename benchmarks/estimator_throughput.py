"""Inner steps per second of lopt's truncated meta-training against a minimal hand-written JAX loop, side by side.

The Celo-like configuration both run: the ``mlp`` learned optimizer (defaults) on 64-32-10 relu MLPs over the 8x8
digits (the ``mlp`` task family's shape {dataset digits, depth 1, width 32, relu, batch 64}), antithetic PES with
truncation 50 and episodes of 1000 steps, Adam as the outer optimizer; N tasks in parallel = N trajectories = N / 2
antithetic pairs. An inner step is one step of one trajectory. lopt's side is exactly what ``lopt train
--task-family mlp --estimator pes`` runs (``build_outer_step`` over the registered estimator); the hand-written side
is ``handwritten_pes.py`` (no lopt code).

  python benchmarks/estimator_throughput.py                       # 8 and 64 tasks (CPU)
  python benchmarks/estimator_throughput.py --tasks 8 64 512 4096 # the GPU sizes
  python benchmarks/estimator_throughput.py --estimator nres      # lopt's NRES (same cost as PES)

The last line printed is JSON: {"inner_steps_per_second": {N: lopt's}, "handwritten": {N: ...}, "ratio": ...}.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from datetime import date
from pathlib import Path

import jax
import optax

sys.path.insert(0, str(Path(__file__).parent))
import handwritten_pes  # noqa: E402

from lopt.architectures.mlp.optimizer import MLPOptimizer  # noqa: E402
from lopt.meta import estimators  # noqa: E402
from lopt.meta.train import build_outer_step, step_key  # noqa: E402
from lopt.tasks import families  # noqa: E402

CELO_SHAPE = {"family": "mlp", "dataset": "digits", "data_seed": 0, "depth": 1, "width": 32, "activation": "relu",
              "layer_norm": False, "batch_size": 64, "init_scale": 1.0, "param_scale": 1.0, "horizon": 1000}
EPISODE = 1000


def lopt_loop(num_tasks: int, truncation: int, estimator: str, seed: int = 0):
  """(run(steps) -> blocks until done, inner steps per outer step) for lopt's meta-training outer step."""
  task = families.task(CELO_SHAPE)
  optimizer = MLPOptimizer()
  values = {"meta_batch_size": num_tasks // 2, "truncation": truncation, "sigma": 0.01}
  estimate = estimators.get(estimator).create(task, optimizer, values, EPISODE)
  outer = optax.adam(1e-3)
  outer_step = build_outer_step(estimate, outer)
  theta = optimizer.init(jax.random.key(seed))
  state = {"theta": theta, "outer": outer.init(theta), "estimator": estimate.init(theta, jax.random.key(seed + 1)),
           "step": 0}

  def run(steps: int):
    for _ in range(steps):
      state["theta"], state["outer"], state["estimator"], metrics = outer_step(
          state["theta"], state["outer"], state["estimator"], step_key(seed, state["step"]))
      state["step"] += 1
    jax.block_until_ready((state["theta"], metrics.meta_loss))

  return run, estimate.inner_steps_per_estimate


def measure_lopt(num_tasks: int, seconds: float, truncation: int, estimator: str) -> dict:
  run, per_step = lopt_loop(num_tasks, truncation, estimator)
  started = time.perf_counter()
  run(1)
  compile_seconds = time.perf_counter() - started
  steps, started = 0, time.perf_counter()
  while time.perf_counter() - started < seconds or steps < 3:
    run(1)
    steps += 1
  elapsed = time.perf_counter() - started
  return {"inner_steps_per_second": steps * per_step / elapsed, "outer_steps": steps,
          "compile_seconds": compile_seconds}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--tasks", type=int, nargs="+", default=[8, 64])
  parser.add_argument("--seconds", type=float, default=10.0, help="timed seconds per loop and size")
  parser.add_argument("--truncation", type=int, default=50)
  parser.add_argument("--estimator", default="pes", choices=["pes", "nres", "es"])
  args = parser.parse_args()
  device = jax.devices()[0]
  print(f"# {date.today()}  {platform.node()}  {device.platform} {getattr(device, 'device_kind', '')}  "
        f"jax {jax.__version__}  python {platform.python_version()}")
  print(f"# lopt {args.estimator} vs hand-written PES, truncation {args.truncation}, {args.seconds:g} s per loop")
  print(f"{'tasks':>6} {'lopt steps/s':>14} {'hand-written':>14} {'ratio':>7} {'compile lopt / hand (s)':>24}")
  results = {"inner_steps_per_second": {}, "handwritten": {}, "ratio": {}, "device": f"{device.platform} "
             f"{getattr(device, 'device_kind', '')}", "estimator": args.estimator, "truncation": args.truncation}
  for n in args.tasks:
    if n % 2:
      parser.error(f"--tasks: {n} is odd; tasks come in antithetic pairs")
    ours = measure_lopt(n, args.seconds, args.truncation, args.estimator)
    theirs = handwritten_pes.measure(n, seconds=args.seconds, truncation=args.truncation)
    ratio = ours["inner_steps_per_second"] / theirs["inner_steps_per_second"]
    print(f"{n:>6} {ours['inner_steps_per_second']:>14,.0f} {theirs['inner_steps_per_second']:>14,.0f} "
          f"{ratio:>7.2f} {ours['compile_seconds']:>11.1f} / {theirs['compile_seconds']:<10.1f}", flush=True)
    results["inner_steps_per_second"][n] = round(ours["inner_steps_per_second"])
    results["handwritten"][n] = round(theirs["inner_steps_per_second"])
    results["ratio"][n] = round(ratio, 3)
  print(json.dumps(results))


if __name__ == "__main__":
  main()
