"""Can the right step size be read off a run's first steps? Tuned Adam's learning rate against what `general` sees.

Every failure of `general` on the benchmark is a step size far from tuned Adam's, and every fixed rule tried so far
fixed one kind of problem by breaking another. A learned optimizer can only choose the step per problem from the
dynamics it observes, so this measures how much of the choice those dynamics hold. On fresh problems of the training
families: the learning rate that minimizes Adam's mean training loss over the run (9 rates, 1e-4..1 in half decades,
2 keys), and simple statistics of the first K steps of `general`'s own run on the first key (as a user would run
it: ``num_steps`` and the validation loss every 10 steps). A ridge regression predicts log10 of the learning rate
from them; printed: its error in decades under leave-one-out and on the last third of the problems (fitted on the
first two thirds), against predicting the mean and against `general`'s own step size alone; how many decades
`general`'s step moves per decade of tuned Adam's learning rate, beside tuned Adam's own step (its update's RMS at
that rate over the same first steps) and beside the held-out predictions' own slope (the most a step chosen from
these statistics follows lr*; tuned Adam's needs lr* known); and which statistics the regression leans on.

  python benchmarks/step_size_predictability.py [--count 64] [--seed 990000] [--max-horizon 400] [--steps 20]
                                                [--out results.jsonl] [--figure steps.png]
                                                [--optimizer general|RUN/optimizer] [--adam-from results.jsonl]

``--optimizer`` probes another learned optimizer than `general` (a name or a directory ``lopt.load`` reads; the
summary's ``general_step_slope`` is then its slope). ``--adam-from`` reuses the tuned-Adam columns of another
results file of this script (same --steps and --max-horizon) for the seeds it holds, instead of tuning Adam again:
two optimizers are then compared on exactly the same problems and the same Adam numbers.

``--out`` appends one JSON line per problem as it finishes (an interrupted run continues from the lines written;
run again with everything done, it only summarizes) and ends with the summary line. ``--figure``: `general`'s step
and tuned Adam's against tuned Adam's learning rate, one point per problem.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import lopt
from general_family_problems import adam_runner, fed_valid_loss  # this folder
from lopt.evaluation import benchmark
from lopt.tasks import families

LEARNING_RATES = tuple(float(x) for x in 10.0 ** np.arange(-4.0, 0.01, 0.5))
FEATURES = ("log_loss_drop_5", "log_loss_drop_10", "log_loss_drop_K", "loss_noise", "gradient_cosine",
            "log_gradient_ratio", "log_param_rms", "log_update_ratio", "log_gradient_rms", "log_update_rms")
RIDGE = 1.0


def adam_mean_losses(task, horizon: int, keys) -> np.ndarray:
  """(len(LEARNING_RATES),) Adam's mean training loss over the run, averaged over ``keys`` (inf: diverged)."""
  run = adam_runner(task, horizon)
  rates = jnp.asarray(LEARNING_RATES, jnp.float32)
  losses = np.stack([np.asarray(jax.vmap(run, (0, None))(rates, key), np.float64) for key in keys])  # (keys, R, T)
  finite = np.all(np.isfinite(losses), axis=-1)
  means = np.where(finite, np.nan_to_num(losses).mean(-1), np.inf)
  return means.mean(0)


def adam_log_update_rms(task, steps: int, key, learning_rate: float) -> float:
  """The mean over the first ``steps`` steps of log RMS of Adam's update at ``learning_rate`` (the step tuned Adam
  takes: the reference for `general`'s)."""
  adam = optax.with_extra_args_support(optax.adam(learning_rate))

  def size(updates, state):
    return jnp.sqrt(sum(jnp.sum(jnp.square(u.astype(jnp.float32))) for u in jax.tree.leaves(updates)))

  @jax.jit
  def run(key):
    return benchmark.training_scan(task, adam, key, steps, measure=size)[3]
  numel = sum(x.size for x in jax.tree.leaves(task.init(key)))
  return float(np.mean(np.log(np.asarray(run(key), np.float64) / np.sqrt(numel) + 1e-30)))


def probe(optimizer, task, horizon: int, steps: int, key) -> dict:
  """Statistics of the first ``steps`` steps of ``optimizer`` (`general`'s optax transformation) on ``task``."""

  @jax.jit
  def run(key):
    params = task.init(key)

    def step(carry, t):
      params, state, last = carry
      loss, grads = jax.value_and_grad(task.loss)(params, key, t)
      valid = fed_valid_loss(task, params, key, t, loss.dtype)
      updates, state = optimizer.update(grads, state, params, value=loss, valid_loss=valid, num_steps=horizon)
      flat = jnp.concatenate([g.ravel().astype(jnp.float32) for g in jax.tree.leaves(grads)])
      norm = lambda x: jnp.sqrt(jnp.sum(jnp.square(x)))  # noqa: E731
      cosine = jnp.vdot(flat, last) / (norm(flat) * norm(last) + 1e-30)
      size = lambda tree: jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))  # noqa: E731
      record = (loss, cosine, norm(flat), size(params), size(updates))
      return (optax.apply_updates(params, updates), state, flat), record
    params = task.init(key)
    start = jnp.zeros(sum(x.size for x in jax.tree.leaves(params)), jnp.float32)
    return jax.lax.scan(step, (params, optimizer.init(params), start), jnp.arange(steps))[1]
  loss, cosine, gradient_norm, param_norm, update_norm = (np.asarray(x, np.float64) for x in run(key))
  numel = sum(x.size for x in jax.tree.leaves(task.init(key)))
  log_loss = np.log(np.maximum(loss, 1e-30))
  return {
      "log_loss_drop_5": log_loss[min(5, steps - 1)] - log_loss[0],
      "log_loss_drop_10": log_loss[min(10, steps - 1)] - log_loss[0],
      "log_loss_drop_K": log_loss[-1] - log_loss[0],
      "loss_noise": float(np.std(np.diff(log_loss))),
      "gradient_cosine": float(np.mean(cosine[1:])),
      "log_gradient_ratio": float(np.log(gradient_norm[-1] / max(gradient_norm[0], 1e-30) + 1e-30)),
      "log_param_rms": float(np.log(param_norm[0] / np.sqrt(numel) + 1e-30)),
      "log_update_ratio": float(np.mean(np.log(update_norm / np.maximum(param_norm, 1e-30) + 1e-30))),
      "log_gradient_rms": float(np.log(gradient_norm[0] / np.sqrt(numel) + 1e-30)),
      "log_update_rms": float(np.mean(np.log(update_norm / np.sqrt(numel) + 1e-30))),  # the step general takes
  }


def ridge_fit(x: np.ndarray, y: np.ndarray, ridge: float = RIDGE):
  """(weights, mean, scale, intercept, low, high) of a ridge regression on standardized features, each clipped to
  the 2nd..98th percentile of the rows fitted (a zero initialization's log RMS of -69 would otherwise decide the
  fit)."""
  low, high = np.percentile(x, 2, axis=0), np.percentile(x, 98, axis=0)
  x = np.clip(x, low, high)
  mean, scale = x.mean(0), x.std(0) + 1e-9
  z = (x - mean) / scale
  weights = np.linalg.solve(z.T @ z + ridge * np.eye(z.shape[1]), z.T @ (y - y.mean()))
  return weights, mean, scale, y.mean(), low, high


def ridge_predict(model, x: np.ndarray) -> np.ndarray:
  weights, mean, scale, intercept, low, high = model
  return intercept + ((np.clip(x, low, high) - mean) / scale) @ weights


def leave_one_out(x: np.ndarray, y: np.ndarray) -> np.ndarray:
  """(n,) each problem's prediction by the ridge regression fitted on the others."""
  return np.array([ridge_predict(ridge_fit(np.delete(x, i, 0), np.delete(y, i)), x[i:i + 1])[0]
                   for i in range(len(y))])


def summarize(rows: list) -> dict:
  """Leave-one-out and split errors (decades of the learning rate) of the regression on every statistic, on
  `general`'s own step size alone (calibrated: how well the step it takes tracks tuned Adam's), and on every
  statistic but that one; the standardized weights and each statistic's correlation with log10 lr*."""
  x = np.array([[row["features"][name] for name in FEATURES] for row in rows], np.float64)
  x = np.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)
  y = np.array([np.log10(row["adam_learning_rate"]) for row in rows])
  n = len(rows)
  rmse = lambda a, b: float(np.sqrt(np.mean((a - b) ** 2)))  # noqa: E731
  own = FEATURES.index("log_update_rms")
  loo = leave_one_out(x, y)
  without_own = leave_one_out(np.delete(x, own, 1), y)
  split = (2 * n) // 3
  test = ridge_predict(ridge_fit(x[:split], y[:split]), x[split:])
  full = ridge_fit(x, y)
  return {
      "problems": n, "log10_lr_std": float(y.std()),
      "leave_one_out": {"rmse_decades": rmse(loo, y),
                        "mean_only_rmse_decades": rmse(np.array([np.delete(y, i).mean() for i in range(n)]), y),
                        "general_step_only_rmse_decades": rmse(leave_one_out(x[:, own:own + 1], y), y),
                        "without_general_step_rmse_decades": rmse(without_own, y),
                        "within_half_decade": float(np.mean(np.abs(loo - y) <= 0.5)),
                        # The slope of those held-out predictions on log10 lr*: what a step chosen from these
                        # statistics can reach. A prediction that is right on average regresses to the mean, so
                        # its slope is about R^2 (here well below 1) however well it is fitted.
                        "prediction_slope": float(np.polyfit(y, without_own, 1)[0])},
      "split": {"train": split, "test": n - split, "rmse_decades": rmse(test, y[split:]),
                "mean_only_rmse_decades": rmse(np.full(n - split, y[:split].mean()), y[split:]),
                "within_half_decade": float(np.mean(np.abs(test - y[split:]) <= 0.5))},
      # How strongly general's step follows lr*: the least-squares slope of log10 of its update RMS on log10 lr*
      # (1: a decade of lr* moves its step a decade, as a tuned Adam's does; 0: the same step everywhere).
      "general_step_slope": float(np.polyfit(y, x[:, own] / np.log(10), 1)[0]),
      "adam_step_slope": float(np.polyfit(y, np.array([row["adam_log_update_rms"] for row in rows]) / np.log(10),
                                          1)[0]),  # the same for tuned Adam's own steps
      "standardized_weights": dict(zip(FEATURES, map(float, full[0]))),
      "correlations": {name: float(np.corrcoef(x[:, j], y)[0, 1]) if x[:, j].std() > 0 else 0.0
                       for j, name in enumerate(FEATURES)},
  }


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--count", type=int, default=64)
  parser.add_argument("--seed", type=int, default=990000)
  parser.add_argument("--max-horizon", type=int, default=400)
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--out")
  parser.add_argument("--figure", help="write a scatter plot of the steps against tuned Adam's learning rate (PNG)")
  parser.add_argument("--optimizer", default="general", help="the learned optimizer probed (name or directory)")
  parser.add_argument("--adam-from", help="reuse the tuned-Adam columns of this results file for its seeds")
  args = parser.parse_args(argv)
  rows = []
  if args.out and os.path.exists(args.out):
    with open(args.out) as f:
      rows = [row for row in map(json.loads, f) if "seed" in row]
  done = {row["seed"] for row in rows}
  adam_rows = {}
  if args.adam_from:
    with open(args.adam_from) as f:
      adam_rows = {row["seed"]: row for row in map(json.loads, f) if "seed" in row}
  keys = [jax.random.key(2000 + k) for k in range(2)]
  general = lopt.load(args.optimizer).as_optax()
  start = time.time()
  for i in range(args.count):
    seed = args.seed + i
    if seed in done:
      continue
    config = families.sample(seed, max_step_flops=1e6)
    task = families.task(config)
    horizon = min(int(config["horizon"]), args.max_horizon)
    if seed in adam_rows:
      assert adam_rows[seed]["horizon"] == horizon, "--adam-from was run with another --max-horizon"
      adam = {name: adam_rows[seed][name] for name in ("adam_learning_rate", "adam_mean_losses", "adam_log_update_rms")}
    else:
      means = adam_mean_losses(task, horizon, keys)
      best = LEARNING_RATES[int(np.argmin(means))]
      adam = {"adam_learning_rate": best, "adam_mean_losses": [float(m) for m in means],
              "adam_log_update_rms": adam_log_update_rms(task, args.steps, keys[0], best)}
    row = {"seed": seed, "family": config["family"], "horizon": horizon, "batch_size": config.get("batch_size"),
           "param_scale": config.get("param_scale"), "adam_learning_rate": adam["adam_learning_rate"],
           "adam_mean_losses": adam["adam_mean_losses"],
           "features": probe(general, task, horizon, args.steps, keys[0]),
           "adam_log_update_rms": adam["adam_log_update_rms"]}
    best = row["adam_learning_rate"]
    rows.append(row)
    if args.out:
      with open(args.out, "a") as f:
        f.write(json.dumps(row) + "\n")
    print(f"{seed} {config['family']:20s} T={horizon:4d} lr*={best:.2g}  "
          + " ".join(f"{name}={row['features'][name]:.3g}" for name in FEATURES[:5])
          + f"  ({time.time() - start:.0f} s)", flush=True)
  summary = summarize(rows)
  summary.update(machine={"platform": platform.platform(), "python": platform.python_version(),
                          "jax": jax.__version__, "backend": jax.default_backend()},
                 steps=args.steps, seconds_this_invocation=round(time.time() - start, 1), optimizer=args.optimizer)
  print(json.dumps(summary, indent=1))
  if args.out:  # the rows, then this summary (replacing an earlier one)
    with open(args.out + ".tmp", "w") as f:
      f.writelines(json.dumps(row) + "\n" for row in rows)
      f.write(json.dumps({"summary": summary}) + "\n")
    os.replace(args.out + ".tmp", args.out)
  if args.figure:
    figure(rows, summary, args.figure)
  return 0


def figure(rows: list, summary: dict, path: str) -> None:
  """log10 of the RMS of the first steps' updates against log10 of tuned Adam's learning rate: `general`'s and
  tuned Adam's (at that rate), each with its least-squares line."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  x = np.log10([row["adam_learning_rate"] for row in rows])
  jitter = np.random.default_rng(0).uniform(-0.08, 0.08, len(x))  # the rates are on a half-decade grid
  fig, ax = plt.subplots(figsize=(6.4, 4.4))
  for label, values, slope, color in (
      ("tuned Adam", [row["adam_log_update_rms"] for row in rows], summary["adam_step_slope"], "tab:gray"),
      (summary.get("optimizer", "general"), [row["features"]["log_update_rms"] for row in rows],
       summary["general_step_slope"], "tab:blue")):
    y = np.asarray(values) / np.log(10)
    ax.scatter(x + jitter, y, s=14, alpha=0.7, color=color, label=f"{label} (slope {slope:.2f})")
    fit = np.polyfit(x, y, 1)
    grid = np.array([x.min(), x.max()])
    ax.plot(grid, np.polyval(fit, grid), color=color)
  ax.set_xlabel("log10 tuned Adam's learning rate (mean loss over the run)")
  ax.set_ylabel(f"log10 RMS of the update over the first {summary['steps']} steps")
  ax.set_title(f"{len(rows)} fresh family problems: the step taken against the step that was best", fontsize=10)
  ax.legend(loc="upper left")
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


if __name__ == "__main__":
  raise SystemExit(main())
