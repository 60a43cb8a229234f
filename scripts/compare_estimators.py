"""The estimators side by side on one meta-training problem: wall time to a held-out meta-loss, and gradient noise.

Every estimator meta-trains the ``mlp`` learned optimizer from the same initialization on the same task group (a
task family's shape, problem fields drawn per problem) for the same wall-clock budget, with the same outer optimizer;
the held-out meta-loss (normalized mean loss over full unrolls of held-out problems) is measured at intervals.
Then, at one common theta, each estimator's gradient noise: R independent estimates (episodes already spread over
their phases by warm-up estimates), their per-coordinate variance, the variance times the inner steps an estimate
costs (noise at equal compute), and the cosine of their mean with the unbiased estimators' pooled mean.

  python scripts/compare_estimators.py --out runs/estimators --seconds 60          # CPU, small
  python scripts/compare_estimators.py --out $OUT/estimators --seconds 90 --tasks 256 --family-shape digits
Writes DIR/estimators.json and DIR/*.png (``docs/ESTIMATORS.md`` shows them).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from datetime import date
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lopt.architectures.mlp.optimizer import MLPOptimizer
from lopt.meta import estimators
from lopt.meta.train import build_evaluator, build_outer_step, held_out_keys, step_key
from lopt.tasks import families

SHAPES = {
    "digits": {"family": "mlp", "dataset": "digits", "data_seed": 0, "depth": 1, "width": 32, "activation": "relu",
               "layer_norm": False, "batch_size": 64},
    "small": {"family": "mlp", "dataset": "iris", "data_seed": 0, "depth": 1, "width": 16, "activation": "tanh",
              "layer_norm": False, "batch_size": 16},
}
ESTIMATORS = ("tbptt", "es", "pes", "nres", "mixed")
UNBIASED = ("pes", "nres")


def settings(name: str, tasks: int, truncation: int) -> dict:
  """Equal trajectories for every estimator: tasks problems for tbptt, tasks / 2 antithetic pairs otherwise."""
  if name == "tbptt":
    return {"meta_batch_size": tasks, "truncation": truncation}
  values = {"meta_batch_size": tasks // 2, "truncation": None if name == "es" else truncation, "sigma": 0.01}
  return values


def train(name, task, eval_task, optimizer, args):
  """Meta-trains for ``args.seconds``; returns the curve [(seconds, inner steps, held-out loss)] and final theta."""
  estimate = estimators.get(name).create(task, optimizer, settings(name, args.tasks, args.truncation), args.horizon)
  outer = optax.chain(optax.clip(0.1), optax.adam(args.learning_rate))
  outer_step = build_outer_step(estimate, outer)
  evaluate = build_evaluator(eval_task, optimizer, args.horizon)
  keys = held_out_keys(args.seed, args.eval_problems)
  theta = optimizer.init(jax.random.key(args.seed))
  outer_state, state = outer.init(theta), estimate.init(theta, jax.random.key(args.seed + 1))
  score = lambda t: float(jnp.mean(jnp.minimum(evaluate(t, keys), 10.0)))  # noqa: E731 (a diverged problem: 10)
  curve, step, trained_seconds = [(0.0, 0, score(theta))], 0, 0.0
  compiled = False
  while trained_seconds < args.seconds:
    started = time.perf_counter()
    for _ in range(args.eval_every):
      theta, outer_state, state, metrics = outer_step(theta, outer_state, state, step_key(args.seed, step))
      step += 1
    jax.block_until_ready(theta)
    elapsed = time.perf_counter() - started
    if not compiled:  # the first block includes compilation: not counted as training time
      compiled = True
      curve.append((0.0, step * estimate.inner_steps_per_estimate, score(theta)))
      continue
    trained_seconds += elapsed
    curve.append((trained_seconds, step * estimate.inner_steps_per_estimate, score(theta)))
    print(f"  {name:6} {trained_seconds:7.1f} s  step {step:6d}  held-out {curve[-1][2]:.4f}", flush=True)
  return curve, theta


def gradient_noise(name, task, optimizer, theta, args) -> dict:
  """R estimates at ``theta`` after warm-up: their stacked per-coordinate values."""
  estimate = estimators.get(name).create(task, optimizer, settings(name, args.tasks, args.truncation), args.horizon)
  estimate_fn = jax.jit(estimate.estimate)
  state = estimate.init(theta, jax.random.key(args.seed + 2))
  for i in range(args.warmup):
    state, _, _ = estimate_fn(theta, state, jax.random.key(10_000 + i))
  samples = []
  for i in range(args.samples):
    state, grads, _ = estimate_fn(theta, state, jax.random.key(20_000 + i))
    samples.append(np.concatenate([np.ravel(x) for x in jax.tree.leaves(grads)]))
  return {"samples": np.stack(samples), "inner_steps": estimate.inner_steps_per_estimate}


def figures(out: Path, curves: dict, noise: dict) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  for name, curve in curves.items():
    seconds, steps, loss = zip(*curve)
    axes[0].plot(seconds, loss, label=name)
    axes[1].plot(np.asarray(steps) / 1e6, loss, label=name)
  axes[0].set(xlabel="training wall time (s, compilation excluded)", ylabel="held-out meta-loss",
              title="Held-out meta-loss against wall time")
  axes[1].set(xlabel="inner steps (millions)", ylabel="held-out meta-loss", title="... against inner steps")
  for ax in axes:
    ax.legend()
    ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(out / "estimators_training.png", dpi=120)
  plt.close(fig)
  fig, ax = plt.subplots(figsize=(6, 4))
  names = list(noise)
  values = [noise[n]["variance_at_equal_compute"] for n in names]
  ax.bar(names, values)
  ax.set_yscale("log")
  ax.set(ylabel="mean variance x inner steps per estimate", title="Gradient noise at equal compute (lower is better)")
  fig.tight_layout()
  fig.savefig(out / "estimators_noise.png", dpi=120)
  plt.close(fig)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", required=True)
  parser.add_argument("--estimators", nargs="+", default=list(ESTIMATORS), choices=ESTIMATORS)
  parser.add_argument("--family-shape", default="small", choices=list(SHAPES))
  parser.add_argument("--seconds", type=float, default=60.0, help="training wall time per estimator")
  parser.add_argument("--tasks", type=int, default=16, help="trajectories in parallel")
  parser.add_argument("--truncation", type=int, default=20)
  parser.add_argument("--horizon", type=int, default=200, help="episode length and held-out unroll length")
  parser.add_argument("--learning-rate", type=float, default=3e-3)
  parser.add_argument("--eval-every", type=int, default=10)
  parser.add_argument("--eval-problems", type=int, default=32)
  parser.add_argument("--samples", type=int, default=32, help="estimates per estimator for the noise")
  parser.add_argument("--warmup", type=int, default=20)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()
  out = Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  shape = SHAPES[args.family_shape]
  task = families.group_task(shape)
  optimizer = MLPOptimizer()
  curves, thetas = {}, {}
  device = jax.devices()[0]
  record = {"date": str(date.today()), "machine": platform.node(),
            "device": f"{device.platform} {getattr(device, 'device_kind', '')}", "jax": jax.__version__,
            "settings": vars(args), "shape": shape, "curves": curves}
  for name in args.estimators:
    curves[name], thetas[name] = train(name, task, task, optimizer, args)
    (out / "estimators.json").write_text(json.dumps(record, indent=1))  # what is done survives a time limit
  reference_name = "pes" if "pes" in thetas else args.estimators[0]
  theta = thetas[reference_name]  # a trained theta: where the noise matters
  noise_raw = {name: gradient_noise(name, task, optimizer, theta, args) for name in args.estimators}
  pooled = np.mean([noise_raw[n]["samples"].mean(0) for n in UNBIASED if n in noise_raw] or
                   [noise_raw[reference_name]["samples"].mean(0)], axis=0)
  noise = {}
  for name, raw in noise_raw.items():
    mean = raw["samples"].mean(0)
    variance = float(raw["samples"].var(0, ddof=1).mean())
    cosine = float(mean @ pooled / (np.linalg.norm(mean) * np.linalg.norm(pooled) + 1e-30))
    noise[name] = {"mean_variance": variance, "inner_steps_per_estimate": raw["inner_steps"],
                   "variance_at_equal_compute": variance * raw["inner_steps"], "cosine_to_unbiased_mean": cosine}
  record["noise"] = noise
  (out / "estimators.json").write_text(json.dumps(record, indent=1))
  figures(out, curves, noise)
  for name in args.estimators:
    final = curves[name][-1]
    print(f"{name:6} final held-out {final[2]:.4f} after {final[0]:.0f} s / {final[1] / 1e6:.2f} M inner steps; "
          f"variance {noise[name]['mean_variance']:.3g}, x cost {noise[name]['variance_at_equal_compute']:.3g}, "
          f"cosine {noise[name]['cosine_to_unbiased_mean']:.2f}")


if __name__ == "__main__":
  main()
