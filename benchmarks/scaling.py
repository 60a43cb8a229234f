"""Meta-training throughput on 1 and on N devices, side by side in one process (lopt.meta.sharding).

(a) NRES on task-family groups with many problems (the compute-bound case): lopt's outer step exactly as
    ``lopt train --task-family mlp --estimator nres --devices N`` builds it; outer steps/s, inner steps/s, and the
    N-device / 1-device ratio (issue 14's target: >= 1.8x on 2 GPUs).
(b) The paper config (GRU 256, full backpropagation through 201 steps, meta-batches 64/128/512): lopt's outer step on
    1 and N devices against the minimal hand-written loop of ``meta_train_speed.py`` with its meta-batch keys sharded
    over the same devices (jit infers the sharding from the keys; theta and Adam's state replicated).

  python benchmarks/scaling.py                                        # the GPU run (all local devices, at most 2)
  python benchmarks/scaling.py --tiny --host-devices 2                # CPU check: two host-platform devices

--on-nonfinite drop_problems skip_step times lopt's paper-config step with each of the full estimator's guards
(``skip_step`` has no ``lax.cond``, whose predicate makes the host wait every step; meta_train_speed.py: 0.996x the
hand-written loop on one H200 where the default is 1.2x), a line each.

The last line printed is JSON (also written to --json): machine, versions, date and every number.
"""

from __future__ import annotations

import argparse
import os
import sys


def parse_args():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--devices", type=int, default=None, help="the N of 1 vs N (default: local devices, max 2)")
  parser.add_argument("--host-devices", type=int, default=None,
                      help="CPU only: split the host into this many devices (sets XLA_FLAGS before JAX starts)")
  parser.add_argument("--tiny", action="store_true", help="CPU-sized problems (checks the script, measures nothing)")
  parser.add_argument("--meta-batches", type=int, nargs="+", default=None, help="paper-config meta-batch sizes")
  parser.add_argument("--nres-problems", type=int, nargs="+", default=None,
                      help="NRES problems per outer step (antithetic pairs: twice as many trajectories)")
  parser.add_argument("--seconds", type=float, default=None, help="timed seconds per measurement")
  parser.add_argument("--rounds", type=int, default=2, help="alternating rounds; medians are reported")
  parser.add_argument("--skip", choices=["nres", "paper"], default=None, help="leave one part out")
  parser.add_argument("--json", default=None, help="write the results here too")
  parser.add_argument("--on-nonfinite", nargs="+", default=["drop_problems"], choices=["drop_problems", "skip_step"],
                      help="the paper config's estimator guard (several: lopt timed with each)")
  return parser.parse_args()


ARGS = parse_args()
if ARGS.host_devices:  # must precede the first import of jax
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             f" --xla_force_host_platform_device_count={ARGS.host_devices}").strip()

import json  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402
from dataclasses import replace  # noqa: E402
from datetime import date  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from meta_train_speed import hand_written_step  # noqa: E402

from lopt.architectures.mlp.optimizer import MLPOptimizer  # noqa: E402
from lopt.meta import estimators, sharding  # noqa: E402
from lopt.meta.config import PRESETS, TaskSection  # noqa: E402
from lopt.meta.train import (build_outer_step, build_sharded_outer_step, estimator_from, family_groups,  # noqa: E402
                             optimizer_from, outer_optimizer_from, step_key, step_keys, task_from)


def lopt_runner(estimator, theta, outer, devices: int):
  """``run(steps)``: lopt's outer step on ``devices`` devices (1: the unsharded path), blocking at the end."""
  layout = sharding.layout(devices)
  state = estimator.init(theta, jax.random.key(1))
  outer_state = outer.init(theta)
  if layout.sharded:
    step = build_sharded_outer_step(estimator, outer, layout, state)
    theta, outer_state = layout.put(theta, layout.replica), layout.put(outer_state, layout.replica)
    state = layout.put(state, layout.leading(state))
  else:
    step = build_outer_step(estimator, outer)
  box = {"theta": theta, "outer": outer_state, "state": state, "step": 0}

  def run(steps: int):
    for _ in range(steps):
      box["theta"], box["outer"], box["state"], metrics = step(box["theta"], box["outer"], box["state"],
                                                               step_key(0, box["step"]))
      box["step"] += 1
    jax.block_until_ready((box["theta"], metrics.meta_loss))

  return run


def hand_written_runner(config, devices: int):
  """``run(steps)``: meta_train_speed.py's hand-written outer step, its (B,) keys sharded over ``devices``."""
  step = hand_written_step(config)
  optimizer = optimizer_from(config)
  theta = optimizer.init(jax.random.key(config.seed))
  outer_state = outer_optimizer_from(config).init(theta)
  keys_sharding = None
  if devices > 1:
    mesh = sharding.layout(devices).mesh
    replica, keys_sharding = NamedSharding(mesh, PartitionSpec()), NamedSharding(mesh, PartitionSpec("batch"))
    theta, outer_state = jax.device_put((theta, outer_state), replica)
  # step_keys' values, made where they are used (each device its own slice: no transfer per step)
  make_keys = jax.jit(lambda step: step_keys(config.seed, step, config.meta_batch_size), out_shardings=keys_sharding)
  box = {"theta": theta, "outer": outer_state, "step": 0}

  def run(steps: int):
    for _ in range(steps):
      box["theta"], box["outer"], loss = step(box["theta"], box["outer"], make_keys(box["step"]))
      box["step"] += 1
    jax.block_until_ready((box["theta"], loss))

  return run


def seconds_per_step(run, seconds: float) -> tuple[float, float]:
  """(compile + first step seconds, seconds per outer step over at least ``seconds`` and 3 steps)."""
  started = time.perf_counter()
  run(1)
  first = time.perf_counter() - started
  run(1)  # a warm step outside the timing
  steps, started = 0, time.perf_counter()
  while time.perf_counter() - started < seconds or steps < 3:
    run(1)
    steps += 1
  return first, (time.perf_counter() - started) / steps


def alternate(runners: dict, seconds: float, rounds: int) -> dict:
  """Median seconds per step of every runner, measured in alternating rounds (load drifts hit all alike)."""
  times = {name: [] for name in runners}
  compile_seconds = {}
  for r in range(rounds):
    for name, run in runners.items():
      first, per_step = seconds_per_step(run, seconds)
      compile_seconds.setdefault(name, first)
      times[name].append(per_step)
  return {name: {"seconds_per_step": float(np.median(t)), "first_step_seconds": compile_seconds[name]}
          for name, t in times.items()}


def nres_part(devices: int, sizes, seconds: float, rounds: int, tiny: bool) -> list[dict]:
  """NRES on the mlp family's groups, 1 vs ``devices`` devices."""
  options = {"num_groups": 2 if tiny else 4, "max_step_flops": 2e5 if tiny else 1e7}
  groups = family_groups(TaskSection(name="mlp", family="mlp", options=options), seed=0)
  optimizer = MLPOptimizer(hidden_size=8, num_layers=1) if tiny else MLPOptimizer()
  truncation, horizon = (5, 20) if tiny else (50, 1000)
  theta, outer = optimizer.init(jax.random.key(0)), optax.adam(1e-3)
  rows = []
  for problems in sizes:
    values = {"meta_batch_size": problems, "truncation": truncation, "sigma": 0.01}
    estimator = estimators.get("nres").create(groups, optimizer, values, horizon)
    found = alternate({d: lopt_runner(estimator, theta, outer, d) for d in (1, devices)}, seconds, rounds)
    inner = estimator.inner_steps_per_estimate
    row = {"problems": problems, "trajectories": 2 * problems, "groups": len(groups), "truncation": truncation,
           "inner_steps_per_outer_step": inner}
    for d in (1, devices):
      t = found[d]["seconds_per_step"]
      row[f"devices_{d}"] = {"outer_steps_per_second": 1 / t, "inner_steps_per_second": inner / t,
                             "first_step_seconds": found[d]["first_step_seconds"]}
    row["speedup"] = found[1]["seconds_per_step"] / found[devices]["seconds_per_step"]
    rows.append(row)
    print(f"nres {problems:>6} problems ({len(groups)} groups): 1 device {inner / found[1]['seconds_per_step']:>12,.0f}"
          f" inner steps/s, {devices} devices {inner / found[devices]['seconds_per_step']:>12,.0f}  "
          f"speedup {row['speedup']:.2f}x", flush=True)
  return rows


def paper_part(devices: int, sizes, seconds: float, rounds: int, tiny: bool,
               guards=("drop_problems",)) -> list[dict]:
  """The paper config with full backpropagation: lopt (with each of the estimator's ``on_nonfinite`` ``guards``;
  "lopt" is the default guard's, "lopt_skip_step" the other's) vs the hand-written loop, each on 1 and
  ``devices``."""
  base = PRESETS["paper"]
  if tiny:
    base = base.replace(hidden_size=8, horizon=20)
  base = base.replace(horizon=base.horizon or 200)
  rows = []
  for batch in sizes:
    config = base.replace(meta_batch_size=batch)
    task, optimizer = task_from(config), optimizer_from(config)
    outer = outer_optimizer_from(config)
    labels = {guard: "lopt" if guard == "drop_problems" else f"lopt_{guard}" for guard in guards}
    built = {guard: estimator_from(config.replace(estimator=replace(
        config.estimator, fields={**config.estimator.fields, "on_nonfinite": guard})), task, optimizer)
        for guard in guards}
    theta = optimizer.init(jax.random.key(config.seed))
    runners = {}
    for d in (1, devices):
      for guard, estimator in built.items():
        runners[(labels[guard], d)] = lopt_runner(estimator, theta, outer, d)
      runners[("hand", d)] = hand_written_runner(config, d)
    found = alternate(runners, seconds, rounds)
    ms = {f"{who}_{d}": 1e3 * found[(who, d)]["seconds_per_step"] for who, d in found}
    row = {"meta_batch_size": batch, "hidden_size": config.hidden_size, "horizon": config.horizon,
           "milliseconds_per_outer_step": ms,
           "first_step_seconds": {f"{who}_{d}": found[(who, d)]["first_step_seconds"] for who, d in found},
           "hand_speedup": ms["hand_1"] / ms[f"hand_{devices}"]}
    for label in labels.values():
      row[f"{label}_speedup"] = ms[f"{label}_1"] / ms[f"{label}_{devices}"]
      row[f"{label}_over_hand"] = {d: ms[f"{label}_{d}"] / ms[f"hand_{d}"] for d in (1, devices)}
      print(f"paper meta-batch {batch:>4}: {label} {ms[f'{label}_1']:7.2f} -> {ms[f'{label}_{devices}']:7.2f} ms "
            f"({row[f'{label}_speedup']:.2f}x), hand-written {ms['hand_1']:7.2f} -> {ms[f'hand_{devices}']:7.2f} ms "
            f"({row['hand_speedup']:.2f}x); {label} / hand-written on {devices}: "
            f"{row[f'{label}_over_hand'][devices]:.3f}", flush=True)
    rows.append(row)
  return rows


def main():
  args = ARGS
  local = jax.local_device_count()
  devices = args.devices or min(local, 2)
  if not 2 <= devices <= local:
    sys.exit(f"scaling.py: needs 2 to {local} devices to compare, found {local} (on a CPU: --host-devices 2)")
  seconds = args.seconds if args.seconds is not None else (0.5 if args.tiny else 3.0)
  device = jax.devices()[0]
  result = {"date": str(date.today()), "machine": platform.node(), "platform": platform.platform(),
            "device": f"{devices} x {device.platform} {getattr(device, 'device_kind', '')}", "jax": jax.__version__,
            "optax": optax.__version__, "python": platform.python_version(), "tiny": args.tiny,
            "command": " ".join(["python", *sys.argv])}
  print(f"# {result['date']}  {result['machine']}  {result['device']}  jax {jax.__version__}", flush=True)
  if args.skip != "nres":
    sizes = args.nres_problems or ([8] if args.tiny else [4096])
    result["nres"] = nres_part(devices, sizes, seconds, args.rounds, args.tiny)
  if args.skip != "paper":
    sizes = args.meta_batches or ([4, 8] if args.tiny else [64, 128, 512])
    result["paper"] = paper_part(devices, sizes, seconds, args.rounds, args.tiny, args.on_nonfinite)
  if args.json:
    Path(args.json).write_text(json.dumps(result, indent=1))
  print(json.dumps(result))


if __name__ == "__main__":
  main()
