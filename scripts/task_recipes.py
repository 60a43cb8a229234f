"""Per-task meta-training recipe search on a wall-clock budget, then the fair comparison of the winner (issue 4).

  python scripts/task_recipes.py OUT_DIR TASK [--budget SECONDS] [--hidden H] [--batch B] [--space NAME]
                                 [--variants JSON_LIST] [--base JSON]

Writes OUT_DIR/TASK/: sweep.json (every variant's held-out curve), optimizer/ (the winner: config.json +
weights.safetensors, with its training config, the search and the evaluation in config.json's "info") and
results.json (lopt.meta.evaluate.compare: tuned baselines and the winner on 128 fresh problems).

Phases, all in one process on one device:
  1. probe: seconds per outer step of the base config, after compilation. It sizes the learning-rate decay so the
     schedule fits the steps the budget allows.
  2. sweep: the variants train round-robin, a chunk of steps at a time, until the sweep deadline; each is scored on
     held-out problems (lopt.meta.train.held_out_keys) at the same steps. Round-robin rather than one after another
     so that a slow device (other processes on the GPU) shortens every variant alike and the ranking stays fair.
  3. continue the variant with the best held-out loss until the training deadline. Step keys and the learning-rate
     schedule depend only on the step, so this is exactly one longer run of the winning config.
  4. export the best held-out theta, then compare it with tuned SGD/momentum/RMSProp/Adam.

The exported config has num_steps = the steps actually taken, so `lopt train` with it retrains the same optimizer.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import jax
import numpy as np

from lopt.checkpoint import atomic_write_json, save_optimizer
from lopt.meta import evaluate as evaluation
from lopt.meta.config import PRESETS
from lopt.meta.train import (build_evaluator, build_outer_step, held_out_keys, optimizer_from, outer_optimizer_from,
                             step_keys, task_from)
from lopt.optimizers import as_optax
from ship_pretrained import evaluation_info  # scripts/, beside this file

# Search spaces per task (ours). Input scales put the typical per-coordinate gradient near 0.1-1 (measured at
# initialization: rms |g| ~ 0.008 on both networks, ~100 on Rosenbrock); output scales allow steps of the size a tuned
# baseline takes. log1p_sign compresses Rosenbrock's gradients, which span four decades along one run.
SPACES = {
    "linear_regression": [
        {}, {"learning_rate": 2e-3}, {"learning_rate": 1e-3}, {"learning_rate": 2e-3, "output_scale": 3.0},
        {"learning_rate": 2e-3, "input_scale": 0.3}, {"learning_rate": 1e-3, "meta_batch_size": 64},
    ],
    "rosenbrock": [
        {"input_scale": 1e-2, "output_scale": 1e-2}, {"input_scale": 1e-2, "output_scale": 0.1},
        {"input_scale": 1e-3, "output_scale": 0.1}, {"input_scale": 1e-3, "output_scale": 1e-2},
        {"input_encoding": "log1p_sign", "input_scale": 1.0, "output_scale": 1e-2},
        {"input_encoding": "log1p_sign", "input_scale": 1.0, "output_scale": 0.1},
        {"input_encoding": "log1p_sign", "input_scale": 0.1, "output_scale": 0.1},
        {"input_encoding": "log1p_sign", "input_scale": 0.01, "output_scale": 0.03},
    ],
    "networks": [
        {"input_scale": 10.0, "output_scale": 0.01}, {"input_scale": 10.0, "output_scale": 0.1},
        {"input_scale": 100.0, "output_scale": 0.01}, {"input_scale": 1.0, "output_scale": 0.1},
        {"input_encoding": "log1p_sign", "input_scale": 100.0, "output_scale": 0.01},
        {"input_encoding": "log1p_sign", "input_scale": 1000.0, "output_scale": 0.03},
    ],
}
SPACE_OF_TASK = {"linear_regression": "linear_regression", "rosenbrock": "rosenbrock", "two_moons": "networks",
                 "digits_cnn": "networks"}


def say(message: str) -> None:
  print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


class Variant:
  """One configuration under training: its jitted step and evaluator, state, and held-out history."""

  def __init__(self, index: int, changes: dict, config):
    self.index, self.changes, self.config = index, changes, config
    task, optimizer = task_from(config), optimizer_from(config)
    self.task, self.optimizer = task, optimizer
    self.horizon = config.horizon or task.horizon
    outer = outer_optimizer_from(config)
    self.outer_step = build_outer_step(task, optimizer, outer, horizon=self.horizon, meta_loss=config.meta_loss,
                                       loss_cap=config.loss_cap, l2_penalty=config.l2_penalty, remat=config.remat,
                                       first_order=config.meta_gradient == "first_order")
    self.evaluate = build_evaluator(task, optimizer, self.horizon)
    self.eval_keys = held_out_keys(config.seed, config.num_eval_problems)
    self.theta = optimizer.init(jax.random.key(config.seed))
    self.outer_state = outer.init(self.theta)
    self.step, self.skipped = 0, 0
    self.best_theta, self.best_score, self.best_step = self.theta, math.inf, 0
    self.history, self.meta_losses, self.seconds = [], [], 0.0

  def train(self, steps: int) -> None:
    started = time.perf_counter()
    for _ in range(steps):
      keys = step_keys(self.config.seed, self.step, self.config.meta_batch_size)
      self.theta, self.outer_state, metrics = self.outer_step(self.theta, self.outer_state, keys)
      self.step += 1
      self.skipped += int(metrics.skipped)
    self.meta_losses.append([self.step, float(metrics.meta_loss)])
    self.seconds += time.perf_counter() - started

  def score(self) -> float:
    started = time.perf_counter()
    score = float(np.mean(np.asarray(self.evaluate(self.theta, self.eval_keys))))
    self.seconds += time.perf_counter() - started
    self.history.append([self.step, score])
    if score < self.best_score:
      self.best_theta, self.best_score, self.best_step = self.theta, score, self.step
    return score

  def record(self) -> dict:
    return {"index": self.index, "changes": self.changes, "steps": self.step, "skipped_steps": self.skipped,
            "best_held_out_loss": self.best_score, "best_step": self.best_step, "seconds": round(self.seconds, 1),
            "held_out": self.history, "meta_loss": self.meta_losses}


def seconds_per_step(config) -> float:
  """Outer-step time of ``config`` after compilation (median of 3 timed steps)."""
  variant = Variant(-1, {}, config)
  variant.train(1)
  jax.block_until_ready(variant.theta)
  times = []
  for _ in range(3):
    started = time.perf_counter()
    variant.train(1)
    jax.block_until_ready(variant.theta)
    times.append(time.perf_counter() - started)
  return float(np.median(times))


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("out")
  parser.add_argument("task")
  parser.add_argument("--budget", type=float, default=400.0, help="seconds for phases 1-3 (training)")
  parser.add_argument("--sweep-fraction", type=float, default=0.5, help="share of the budget for the sweep")
  parser.add_argument("--hidden", type=int, default=256)
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--space", default=None, help="a key of SPACES (default: the task's)")
  parser.add_argument("--variants", default=None, help="a JSON list of changes, replaces the space")
  parser.add_argument("--base", default="{}", help="JSON changes applied to every variant")
  parser.add_argument("--chunk", type=int, default=25, help="outer steps per variant per round")
  parser.add_argument("--eval-problems", type=int, default=64)
  parser.add_argument("--smoke", action="store_true", help="a tiny comparison (checks the script, not the numbers)")
  args = parser.parse_args(argv)

  started = time.perf_counter()
  out = Path(args.out) / args.task
  out.mkdir(parents=True, exist_ok=True)
  device = str(jax.devices()[0].device_kind) if jax.devices() else "unknown"
  base = PRESETS["demo"].replace(task=args.task, hidden_size=args.hidden, meta_batch_size=args.batch,
                                 num_eval_problems=args.eval_problems, **json.loads(args.base))
  space = json.loads(args.variants) if args.variants else SPACES[args.space or SPACE_OF_TASK[args.task]]

  # 1. Probe, then size the schedule: the learning rate halves 2.5 times over the steps the budget should allow
  #    (the demo recipe's 1000 steps / decay 400), counted for the winner's whole run (its sweep share + the rest).
  per_step = seconds_per_step(base)
  remaining = args.budget - (time.perf_counter() - started)
  sweep_seconds = args.sweep_fraction * remaining
  expected_steps = int(sweep_seconds / len(space) / per_step + (1 - args.sweep_fraction) * remaining / per_step)
  decay_steps = max(50, int(expected_steps / 2.5))
  say(f"{args.task}: {per_step * 1e3:.1f} ms/outer step (hidden {args.hidden}, batch {args.batch}) on {device}; "
      f"{len(space)} variants, winner expected at ~{expected_steps} steps, decay every {decay_steps}")

  # 2. Sweep, round-robin until the sweep deadline (compilation of each variant happens in its first chunk).
  variants = [Variant(i, changes, base.replace(decay_steps=decay_steps, **changes)) for i, changes in enumerate(space)]
  sweep_deadline = time.perf_counter() + sweep_seconds
  train_deadline = started + args.budget
  rounds = 0
  while time.perf_counter() < sweep_deadline or rounds == 0:
    for variant in variants:
      variant.train(args.chunk)
      variant.score()
    rounds += 1
  for variant in variants:
    say(f"variant {variant.index} {variant.changes}: best held-out {variant.best_score:.4f} at step "
        f"{variant.best_step}/{variant.step} ({variant.seconds:.0f} s)")
  finite = [v for v in variants if math.isfinite(v.best_score)]
  winner = min(finite or variants, key=lambda v: v.best_score)
  sweep_records = [v.record() for v in variants]
  atomic_write_json(out / "sweep.json", {"task": args.task, "device": device, "seconds_per_step": per_step,
                                         "decay_steps": decay_steps, "variants": sweep_records})
  del variants  # frees the losers' compiled steps

  # 3. Continue the winner until the training deadline.
  sweep_steps = winner.step
  while time.perf_counter() < train_deadline:
    winner.train(args.chunk)
    winner.score()
  training_seconds = time.perf_counter() - started
  atomic_write_json(out / "sweep.json", {"task": args.task, "device": device, "seconds_per_step": per_step,
                                         "decay_steps": decay_steps, "variants": sweep_records,
                                         "winner": winner.record()})
  say(f"winner {winner.index} {winner.changes}: best held-out {winner.best_score:.4f} at step {winner.best_step}/"
      f"{winner.step}; training took {training_seconds:.0f} s")

  # 4. Export, then compare with tuned baselines on fresh problems (compare's own tuning and evaluation seeds).
  config = winner.config.replace(num_steps=winner.step, eval_every=args.chunk)
  info = {"training": config.to_dict(), "best_step": winner.best_step, "held_out_loss": winner.best_score,
          "final_step": winner.step, "skipped_steps": winner.skipped,
          "search": {"space": space, "base": json.loads(args.base), "steps_per_variant": sweep_steps,
                     "selection": f"best mean normalized loss on {args.eval_problems} held-out problems",
                     "results": [{k: r[k] for k in ("changes", "steps", "best_held_out_loss", "best_step")}
                                 for r in sweep_records]},
          "compute": {"device": device, "seconds_per_outer_step": per_step, "training_seconds": round(training_seconds),
                      "outer_steps_total": sum(r["steps"] for r in sweep_records) + winner.step - sweep_steps}}
  save_optimizer(out / "optimizer", winner.optimizer, {k: np.asarray(v) for k, v in winner.best_theta.items()}, info)
  compare_started = time.perf_counter()
  reduced = dict(num_tuning_problems=2, num_eval_problems=4, learning_rates=(1e-2, 1e-1)) if args.smoke else {}
  comparison = evaluation.compare(winner.task, {"learned": as_optax(winner.optimizer, winner.best_theta)},
                                  progress=say, **reduced)
  results = comparison["results"]
  info["evaluation"] = evaluation_info(comparison, round(time.perf_counter() - compare_started))
  atomic_write_json(out / "results.json", {**comparison, "ratios": info["evaluation"]["ratios"], "info": info})
  save_optimizer(out / "optimizer", winner.optimizer, {k: np.asarray(v) for k, v in winner.best_theta.items()}, info)
  for name, r in results.items():
    say(f"{args.task} {name}: {r['normalized_mean_loss']:.4f} +- {r['normalized_mean_loss_se']:.4f}"
        f" {r.get('hyperparameters', '')}")
  say(f"done in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
  main(sys.argv[1:])
