"""Learned optimizers against a learning-rate-tuned Adam on linear regressions whose solution lies far from the start.

A diagnostic of one regime: least squares from a zero start, with targets of unit scale, where the weights must
travel far in units of any early step (the benchmark's least_squares and matrix_completion are milder cases; the
task families have none, which is why ``--task-option distance_scale_range`` exists). Eight problems: 16 or 128
features, condition number 10 or 1000 of the features' covariance (a rotated log-spaced spectrum), full batch or
minibatches of 16, 512 examples, 500 steps. Every optimizer runs on the same problems and keys; Adam's learning
rate is tuned over 7 values (1e-3..1) on the same key, an optimistic Adam. Printed: per problem the tuned rate and
each learned optimizer's mean training loss over the run relative to tuned Adam's; then wins and the geometric mean.
The learned optimizers get the loss and the horizon, as in `lopt benchmark` (no validation loss: these problems have
none).

  python benchmarks/far_solution_probe.py [general runs/X/optimizer ...] [--out FILE]
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import platform

import jax
import jax.numpy as jnp
import numpy as np
import optax

import lopt
from lopt.evaluation.benchmark import training_scan
from lopt.tasks.base import Task

HORIZON = 500
EXAMPLES = 512
LEARNING_RATES = (1e-3, 3.2e-3, 1e-2, 3.2e-2, 0.1, 0.32, 1.0)
PROBLEMS = list(itertools.product((16, 128), (10, 1000), (None, 16)))  # (features, condition, batch or full)


def regression(seed: int, features: int, condition: float, batch: int | None) -> Task:
  """A least-squares problem started at zero: x (512, features) with covariance of condition number ``condition``,
  y = x w* + noise with w* of unit-scale outputs."""
  rng = np.random.default_rng(seed)
  rotation, _ = np.linalg.qr(rng.normal(size=(features, features)))
  scales = np.exp(np.linspace(0, -0.5 * np.log(condition), features))
  x = (rng.normal(size=(EXAMPLES, features)) * scales) @ rotation.T
  w = rng.normal(size=features) / np.sqrt(features)
  y = 3 * x @ w + 0.1 * rng.normal(size=EXAMPLES)
  x, y = jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)

  def loss(params, key, step):
    if batch is None:
      xb, yb = x, y
    else:
      index = jax.random.randint(jax.random.fold_in(key, step), (batch,), 0, EXAMPLES)
      xb, yb = x[index], y[index]
    return 0.5 * jnp.mean((xb @ params["w"] + params["b"] - yb) ** 2)
  zeros = {"w": jnp.zeros(features), "b": jnp.zeros(())}
  return Task("far_least_squares", lambda key: zeros, loss, HORIZON)


def mean_loss(tx, task: Task, key) -> float:
  """The mean training loss over HORIZON steps, run as ``lopt benchmark`` runs a problem (``training_scan``)."""
  run = jax.jit(lambda: jnp.mean(training_scan(task, optax.with_extra_args_support(tx), key, HORIZON)[1]))
  return float(run())


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("optimizers", nargs="*", default=["general"], help="learned optimizers: names or paths")
  parser.add_argument("--out", help="write the results as JSON here")
  args = parser.parse_args(argv)
  learned = {name: lopt.load(name).as_optax() for name in args.optimizers}
  rows = []
  for seed, (features, condition, batch) in enumerate(PROBLEMS):
    task = regression(seed, features, condition, batch)
    key = jax.random.key(seed)
    adam = [mean_loss(optax.adam(lr), task, key) for lr in LEARNING_RATES]
    best = int(np.nanargmin(adam))
    ratios = {name: mean_loss(tx, task, key) / adam[best] for name, tx in learned.items()}
    rows.append({"features": features, "condition": condition, "batch": batch,
                 "adam_learning_rate": LEARNING_RATES[best], "adam_mean_loss": adam[best], "ratios": ratios})
    shown = "  ".join(f"{name}: {r:.3f}" for name, r in ratios.items())
    print(f"features {features:4d}  condition {condition:5g}  batch {batch or 'full':>4}  tuned Adam lr "
          f"{LEARNING_RATES[best]:g}  mean-loss ratio  {shown}", flush=True)
  summary = {}
  for name in learned:
    ratios = np.array([row["ratios"][name] for row in rows])
    summary[name] = {"wins": int(np.sum(ratios < 1)), "problems": len(rows),
                     "geometric_mean": float(np.exp(np.mean(np.log(ratios))))}
    print(f"{name}: wins {summary[name]['wins']}/{len(rows)} against tuned Adam, geometric mean of the ratios "
          f"{summary[name]['geometric_mean']:.3f}")
  if args.out:
    with open(args.out, "w") as f:
      json.dump({"date": datetime.date.today().isoformat(), "machine": platform.platform(),
                 "python": platform.python_version(), "jax": jax.__version__, "horizon": HORIZON,
                 "learning_rates": LEARNING_RATES, "problems": rows, "summary": summary}, f, indent=1)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
