"""``lopt benchmark``: learned optimizers against well-tuned hand-designed ones on the held-out suite
(``lopt.evaluation.suite``), side by side in one run.

On every problem: each learned optimizer as trained (``as_optax()``, no learning rate), Adam with its learning rate
tuned over ``ADAM_LEARNING_RATES``, NAdamW with a cosine schedule tuned by a seeded random search
(``nadamw_trials``), and Adam at its default 1e-3. Baselines are tuned on tuning seeds by the mean training loss over
the run and evaluated, like the learned optimizers, on other (evaluation) seeds. Every (candidate, seed) pair of an
optimizer on a problem runs in one compiled, vmapped unroll (hyperparameters traced), ``lanes`` pairs per call.

Each finished (problem, optimizer) is cached in ``OUT/cache/`` under a hash of everything that determines it, so a
rerun skips it and a rerun with other settings does not reuse it. ``OUT/benchmark.json`` holds the settings, the
machine, per-problem metrics and the summary (``summarize``).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import math
import os
import platform
import re
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lopt.errors import UserError
from lopt.evaluation import suite
from lopt.io.checkpoint import atomic_write_json, read_json

FORMAT = "lopt-benchmark"
FORMAT_VERSION = 1
TUNING_SEED = 31_000      # tuning seeds: one stream ...
EVALUATION_SEED = 41_000  # ... evaluation seeds: another (fold_in(seed, i): n seeds are a prefix of n + 1)
NADAMW_SEED = 51_000      # the random search's trial list, the same for every problem
BOOTSTRAP_SEED = 61_000
ADAM_LEARNING_RATES = tuple(float(x) for x in 10.0**np.arange(-5.0, 1.0 + 1e-9, 0.5))  # 13: 2 per decade
NADAMW_TRIALS = 20
DEFAULT_LEARNING_RATE = 1e-3
TUNING_SEEDS, EVAL_SEEDS = 3, 5
QUICK_TUNING_SEEDS, QUICK_EVAL_SEEDS = 2, 3
VALID_EVERY = 10          # steps between validation losses
FINAL_FRACTION = 0.05     # "final" = mean over the last 5% of steps; also the smoothing window of the speedup
DIVERGENCE_FACTOR = 10.0  # final loss above 10x the initial one counts as diverged
BOOTSTRAP_RESAMPLES = 2000
LANES = 8                 # about this many (candidate, seed) unrolls per vmapped call
CURVE_POINTS = 400        # curves in benchmark.json: at most this many steps
BASELINES = ("adam_tuned", "nadamw_cosine", "adam_1e-3")


# -- optimizers ------------------------------------------------------------------------------------------------------

def adam(learning_rate):
  return optax.adam(learning_rate)


def nadamw_cosine(learning_rate, b1, b2, weight_decay, warmup_fraction, *, horizon: int):
  """NAdamW whose learning rate rises linearly over the first ``warmup_fraction`` of the horizon (none at 0), then
  follows ``optax.cosine_decay_schedule`` down to 0 at the horizon. Every hyperparameter may be traced."""
  cosine = optax.cosine_decay_schedule(1.0, horizon)
  warmup = warmup_fraction * horizon

  def schedule(count):
    ramp = jnp.where(warmup > 0, jnp.minimum(1.0, (count + 1) / jnp.maximum(warmup, 1.0)), 1.0)
    after = jnp.clip((count - warmup) / jnp.maximum(horizon - warmup, 1.0), 0.0, 1.0) * horizon  # decay after warmup
    return learning_rate * ramp * cosine(after)
  return optax.nadamw(schedule, b1=b1, b2=b2, weight_decay=weight_decay)


def nadamw_trials(count: int = NADAMW_TRIALS, seed: int = NADAMW_SEED) -> dict[str, np.ndarray]:
  """The random search: {hyperparameter: (count,)}. Learning rate log-uniform 1e-5..1, 1 - b1 log-uniform 0.01..0.5,
  1 - b2 log-uniform 1e-4..0.1, weight decay 0 (a quarter of trials) or log-uniform 1e-6..0.1, warmup 0 (half)
  or uniform 1-10% of the horizon."""
  rng = np.random.default_rng(seed)
  log_uniform = lambda low, high: np.exp(rng.uniform(np.log(low), np.log(high), count))
  trials = {"learning_rate": log_uniform(1e-5, 1.0), "b1": 1 - log_uniform(0.01, 0.5),
            "b2": 1 - log_uniform(1e-4, 0.1), "weight_decay": log_uniform(1e-6, 0.1) * (rng.uniform(size=count) > 0.25),
            "warmup_fraction": rng.uniform(0.01, 0.1, count) * (rng.uniform(size=count) > 0.5)}
  return {k: v.astype(np.float32) for k, v in trials.items()}


def baseline_plan(name: str, learning_rates=ADAM_LEARNING_RATES, num_trials: int = NADAMW_TRIALS) -> dict:
  """{"build": family name, "candidates": {hyperparameter: (n,)}, "tuned": bool} of baseline ``name``."""
  if name == "adam_tuned":
    return {"build": "adam", "candidates": {"learning_rate": np.asarray(learning_rates, np.float32)}, "tuned": True}
  if name == "nadamw_cosine":
    return {"build": "nadamw", "candidates": nadamw_trials(num_trials), "tuned": True}
  return {"build": "adam", "candidates": {"learning_rate": np.float32([DEFAULT_LEARNING_RATE])}, "tuned": False}


def builder(family: str, horizon: int):
  return adam if family == "adam" else lambda **h: nadamw_cosine(**h, horizon=horizon)


# -- running ---------------------------------------------------------------------------------------------------------

def seed_keys(seed: int, count: int) -> jax.Array:
  """(count,) keys of a named stream; the first n are the same whatever the count."""
  return jax.vmap(lambda i: jax.random.fold_in(jax.random.key(seed), i))(jnp.arange(count))


def training_scan(task, optimizer, key, horizon: int, feed_valid: bool = True, measure=None):
  """(final params, train (horizon,), valid (horizon,)) of one problem; valid is NaN except every VALID_EVERY steps.
  The optimizer gets value=, num_steps= and valid_loss= (non-finite: none this step; always none without
  ``feed_valid``) at every step. With ``measure(updates, state) -> ()`` (the step's updates and the optimizer's new
  state), a fourth result: its value at every step (horizon,)."""
  params = task.init(key)

  def step(carry, t):
    params, state = carry
    loss, grads = jax.value_and_grad(task.loss)(params, key, t)
    if task.valid_loss is None:
      valid = jnp.full((), jnp.nan, loss.dtype)
    else:  # a cond, not a select: the predicate is the same for every vmapped problem, so the others skip it
      valid = jax.lax.cond(t % VALID_EVERY == 0, lambda: task.valid_loss(params, key, t).astype(loss.dtype),
                           lambda: jnp.full((), jnp.nan, loss.dtype))
    fed = valid if feed_valid else jnp.full((), jnp.nan, loss.dtype)
    updates, state = optimizer.update(grads, state, params, value=loss, valid_loss=fed, num_steps=horizon)
    measured = () if measure is None else (measure(updates, state),)
    return (optax.apply_updates(params, updates), state), (loss, valid, *measured)

  (params, _), outputs = jax.lax.scan(step, (params, optimizer.init(params)), jnp.arange(horizon))
  return (params, *outputs)


def unroll_with_validation(task, optimizer, key, horizon: int, feed_valid: bool = True):
  """(train (horizon,), valid (horizon,)) losses of one problem (``training_scan`` without the final params)."""
  return training_scan(task, optimizer, key, horizon, feed_valid)[1:]


def lane_runner(task, build, horizon: int, lanes: int, feed_valid: bool = True, unroll=unroll_with_validation):
  """``run(hyperparameters {name: (n,)}, keys (n,), report) -> (train (n, T), valid (n, ceil(T / VALID_EVERY)))``.

  Unroll i uses hyperparameters[:][i] and keys[i]; they run ``lanes`` at a time in one jitted vmap (the last call
  padded), so every call, tuning or evaluation, reuses one compilation. ``report(done, train)`` after each call.
  ``unroll(task, optimizer, key, horizon, feed_valid) -> (train, valid, *extras)``; the extras of the last call
  (concatenated over its lanes, numpy) are left in ``run.extras``.
  """
  from lopt import interrupts

  def one(hyperparameters, key):
    optimizer = optax.with_extra_args_support(build(**hyperparameters))
    return unroll(task, optimizer, key, horizon, feed_valid)
  batched = jax.jit(jax.vmap(one))

  def run(hyperparameters, keys, report=lambda done, train: None):
    count = keys.shape[0]
    parts = []
    for start in range(0, count, lanes):
      index = np.minimum(np.arange(start, start + lanes), count - 1)
      chunk = {k: jnp.asarray(np.asarray(v)[index], jnp.float32) for k, v in hyperparameters.items()}
      with interrupts.deferred():  # a Ctrl-C lands between calls, never inside a compilation
        outputs = [np.asarray(a, np.float64) for a in batched(chunk, keys[index])]
      real = min(lanes, count - start)
      train, valid, *extras = (a[:real] for a in outputs)
      parts.append((train, valid[:, ::VALID_EVERY], *extras))
      report(real, train)
    train, valid, *extras = (np.concatenate(column) for column in zip(*parts))
    run.extras = extras
    return train, valid
  return run


# -- metrics ---------------------------------------------------------------------------------------------------------

def window(horizon: int, fraction: float = FINAL_FRACTION) -> int:
  return max(1, int(round(fraction * horizon)))


def _inf(x):
  return np.where(np.isfinite(x), x, np.inf)


def mean_loss(train: np.ndarray) -> np.ndarray:
  """(..., T) -> (...) mean over the run; non-finite -> inf."""
  with np.errstate(invalid="ignore", over="ignore"):
    return _inf(np.mean(train, -1))


def final_loss(train: np.ndarray, fraction: float = FINAL_FRACTION) -> np.ndarray:
  """(..., T) -> (...) mean of the last ``fraction`` of steps (minibatch noise averaged out); non-finite -> inf."""
  with np.errstate(invalid="ignore", over="ignore"):
    return _inf(np.mean(train[..., -window(train.shape[-1], fraction):], -1))


def diverged(train: np.ndarray) -> np.ndarray:
  """(..., T) -> (...) bool: a non-finite loss anywhere, or a final loss above DIVERGENCE_FACTOR x the initial."""
  with np.errstate(invalid="ignore"):
    return ~np.all(np.isfinite(train), -1) | (final_loss(train) > DIVERGENCE_FACTOR * train[..., 0])


def final_valid_loss(valid: np.ndarray, horizon: int) -> np.ndarray:
  """(S, V) validation losses recorded every VALID_EVERY steps -> (S,): mean of those in the last FINAL_FRACTION
  of the steps (at least the last one); non-finite -> inf."""
  steps = np.arange(valid.shape[-1]) * VALID_EVERY
  chosen = steps >= min(horizon - window(horizon), steps[-1])
  with np.errstate(invalid="ignore"):
    return _inf(np.mean(valid[..., chosen], -1))


def running_mean(curve: np.ndarray, width: int) -> np.ndarray:
  """(T,) -> (T,) trailing mean over ``width`` steps (fewer at the start); inf where the window holds a non-finite."""
  finite = np.isfinite(curve)
  sums = np.cumsum(np.where(finite, curve, 0.0))
  bad = np.cumsum(~finite)
  lagged = lambda c: np.concatenate([np.zeros(width), c[:-width]]) if width < len(c) else np.zeros_like(c)
  counts = np.minimum(np.arange(1, len(curve) + 1), width)
  with np.errstate(invalid="ignore"):
    return np.where(bad - lagged(bad) > 0, np.inf, (sums - lagged(sums)) / counts)


def first_reach(curve: np.ndarray, level: float) -> int | None:
  """The first index where ``curve <= level``, or None."""
  hits = np.flatnonzero(curve <= level)
  return int(hits[0]) if hits.size else None


def speedup(learned: np.ndarray, reference: np.ndarray, fraction: float = FINAL_FRACTION) -> float:
  """Step ratio of two (T,) mean loss curves at the loss both reach, each curve smoothed by a trailing mean over
  ``fraction`` of the horizon (its last value is its final loss): with L = the higher of the two final losses,
  t_ref(L) / t_learned(L), the steps (1-based) each curve first needs to reach L. > 1: the learned optimizer gets
  there sooner. When the learned one ends lower, L is the reference's final loss (how much sooner it reaches tuned
  Adam's result); when it ends higher, L is its own final loss (how much sooner tuned Adam reaches it). Identical
  curves give 1. Non-finite losses count as +inf; both diverged: 1; only the learned one diverged: 1 / T."""
  horizon = len(learned)
  ours, theirs = running_mean(_inf(learned), window(horizon, fraction)), running_mean(_inf(reference),
                                                                                         window(horizon, fraction))
  if not (np.isfinite(ours[-1]) or np.isfinite(theirs[-1])):
    return 1.0
  if not np.isfinite(ours[-1]):
    return 1.0 / horizon
  if not np.isfinite(theirs[-1]):
    return float(horizon)
  target = max(ours[-1], theirs[-1])
  return (first_reach(theirs, target) + 1) / (first_reach(ours, target) + 1)


def win(ours: float, theirs: float) -> float:
  """1 when ours is lower, 0.5 on a tie (both diverged included), 0 otherwise; non-finite counts as +inf."""
  ours, theirs = float(_inf(ours)), float(_inf(theirs))
  return 1.0 if ours < theirs else 0.5 if ours == theirs else 0.0


def iqm(values) -> float:
  """Interquartile mean: the mean after dropping int(n / 4) values at each end (as scipy.stats.trim_mean(x, .25))."""
  values = np.sort(np.asarray(values, np.float64))
  cut = int(0.25 * len(values))
  return float(np.mean(values[cut:len(values) - cut]))


def bootstrap_interval(values, statistic=iqm, resamples: int = BOOTSTRAP_RESAMPLES, level: float = 0.95,
                       seed: int = BOOTSTRAP_SEED) -> tuple[float, float]:
  """Percentile bootstrap interval of ``statistic`` over resamples (with replacement) of ``values``."""
  values = np.asarray(values, np.float64)
  draws = np.random.default_rng(seed).integers(0, len(values), (resamples, len(values)))
  stats = np.array([statistic(values[row]) for row in draws])
  tail = 100 * (1 - level) / 2
  return float(np.percentile(stats, tail)), float(np.percentile(stats, 100 - tail))


def curve_steps(horizon: int, points: int = CURVE_POINTS) -> np.ndarray:
  return np.unique(np.round(np.linspace(0, horizon - 1, min(points, horizon))).astype(int))


def _mean_curve(curves: np.ndarray) -> np.ndarray:
  with np.errstate(invalid="ignore", over="ignore"):
    return _inf(np.mean(_inf(curves), 0))


def optimizer_metrics(record: dict, horizon: int) -> dict:
  """Metrics over the evaluation seeds of one (problem, optimizer) record (``run_job``)."""
  train = np.asarray(_floats(record["train"]), np.float64)
  out = {"mean_loss": float(np.mean(mean_loss(train))), "final_loss": float(np.mean(final_loss(train))),
         "initial_loss": float(np.mean(train[:, 0])), "diverged_seeds": int(np.sum(diverged(train))),
         "num_seeds": int(train.shape[0]), "hyperparameters": record.get("hyperparameters"),
         "curve": _mean_curve(train)[curve_steps(horizon)].tolist(), "seconds": record.get("seconds")}
  if record.get("valid") is not None:
    valid = np.asarray(_floats(record["valid"]), np.float64)
    out["final_valid_loss"] = float(np.mean(final_valid_loss(valid, horizon)))
    with np.errstate(invalid="ignore"):
      out["gap"] = out["final_valid_loss"] - out["final_loss"]
    out["valid_curve"] = _mean_curve(valid).tolist()
  if record.get("tuning"):
    out["tuning"] = record["tuning"]
  return out


def compare_learned(learned: dict, results: dict, learned_train: np.ndarray, adam_train: np.ndarray) -> dict:
  """One learned optimizer on one problem against the baselines' metrics ``results``: ratios to tuned Adam, the
  speedup over it, and a win (1 / 0.5 / 0) against each baseline on both metrics."""
  adam = results["adam_tuned"]
  with np.errstate(invalid="ignore", divide="ignore"):
    ratio = lambda key: float(_inf(learned[key]) / _inf(adam[key])) if np.isfinite(adam[key]) else float("nan")
  return {"ratio_mean_loss": ratio("mean_loss"), "ratio_final_loss": ratio("final_loss"),
          "speedup": speedup(_mean_curve(learned_train), _mean_curve(adam_train)),
          "wins": {name: {key: win(learned[key], results[name][key]) for key in ("mean_loss", "final_loss")}
                   for name in BASELINES}}


def summarize(per_problem: dict[str, dict], learned_labels: list[str]) -> dict:
  """Per learned optimizer, over problems: win rates against each baseline, the IQM of the speedups with its
  bootstrap interval, the median and geometric-mean ratio to tuned Adam, the problems where it diverged."""
  summary = {}
  for label in learned_labels:
    rows = [p["learned"][label] for p in per_problem.values()]
    speedups = [r["speedup"] for r in rows]
    ratios = np.array([r["ratio_mean_loss"] for r in rows], np.float64)
    finite = ratios[np.isfinite(ratios) & (ratios > 0)]
    summary[label] = {
        "num_problems": len(rows),
        "win_rate": {name: {key: float(np.mean([r["wins"][name][key] for r in rows]))
                            for key in ("mean_loss", "final_loss")} for name in BASELINES},
        "speedup_iqm": iqm(speedups), "speedup_interval": list(bootstrap_interval(speedups)),
        "speedups": speedups,
        "median_ratio_mean_loss": float(np.median(_inf(ratios))) if len(ratios) else float("nan"),
        "geometric_mean_ratio_mean_loss": float(np.exp(np.mean(np.log(finite)))) if finite.size else float("nan"),
        "diverged_on": [name for name, p in per_problem.items() if p["results"][label]["diverged_seeds"]],
    }
  return summary


# -- jobs and their cache --------------------------------------------------------------------------------------------

def _floats(rows):
  """JSON rows (None for non-finite) -> float array."""
  return np.array([[np.nan if x is None else x for x in row] for row in rows], np.float64)


def _json_rows(array: np.ndarray) -> list:
  """Float rows with 7 significant digits (float32's), non-finite as None (JSON has no NaN)."""
  return [[float(f"{x:.7g}") if math.isfinite(x) else None for x in row] for row in np.asarray(array).tolist()]


def clean(obj):
  """``obj`` with every non-finite float as None and numpy scalars as Python ones (standard JSON)."""
  if isinstance(obj, dict):
    return {k: clean(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [clean(v) for v in obj]
  if isinstance(obj, (np.floating, float)):
    return float(obj) if math.isfinite(obj) else None
  if isinstance(obj, np.integer):
    return int(obj)
  if isinstance(obj, np.ndarray):
    return clean(obj.tolist())
  return obj


def _digest(obj) -> str:
  return hashlib.sha256(json.dumps(clean(obj), sort_keys=True).encode()).hexdigest()[:12]


def cache_path(out: Path, problem: str, label: str, identity: dict) -> Path:
  """OUT/cache/PROBLEM.LABEL.HASH.json; the hash covers everything that determines the result."""
  slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", label)[:60]
  return out / "cache" / f"{problem}.{slug}.{_digest(identity)}.json"


def run_job(task, horizon: int, plan: dict, runner, tuning_keys, eval_keys, report) -> dict:
  """One optimizer on one problem: tune over ``plan["candidates"]`` on the tuning keys when ``plan["tuned"]``
  (score: mean over tuning seeds of the mean training loss), then run the chosen hyperparameters on the evaluation
  keys. Returns the record the cache holds: train (S, T) and valid losses, hyperparameters, tuning."""
  started = time.perf_counter()
  candidates = {k: np.asarray(v, np.float32) for k, v in plan.get("candidates", {}).items()}
  count = len(next(iter(candidates.values()))) if candidates else 1
  record = {"hyperparameters": None, "tuning": None}
  chosen = {k: v[:1] for k, v in candidates.items()}
  if plan.get("tuned") and count > 1:
    seeds = tuning_keys.shape[0]
    repeated = {k: np.repeat(v, seeds) for k, v in candidates.items()}
    train, _ = runner(repeated, tuning_keys[np.tile(np.arange(seeds), count)], lambda n, t: report(n, t, "tuning"))
    scores = np.mean(mean_loss(train).reshape(count, seeds), 1)
    best = int(np.argmin(scores))  # inf for a diverged candidate; the first of equals
    chosen = {k: v[best:best + 1] for k, v in candidates.items()}
    record["tuning"] = {"candidates": {k: v.tolist() for k, v in candidates.items()}, "scores": scores.tolist(),
                        "best": best, "num_seeds": seeds}
  if candidates:
    record["hyperparameters"] = {k: float(v[0]) for k, v in chosen.items()}
  seeds = eval_keys.shape[0]
  train, valid = runner({k: np.repeat(v, seeds) for k, v in chosen.items()}, eval_keys,
                        lambda n, t: report(n, t, "evaluation"))
  record.update(train=_json_rows(train), valid=_json_rows(valid) if task.valid_loss is not None else None,
                seconds=round(time.perf_counter() - started, 2))
  return clean(record)


# -- the benchmark ---------------------------------------------------------------------------------------------------

def learned_optimizers(names: list[str]) -> dict[str, dict]:
  """{label: {"trained": TrainedOptimizer, "name", "path", "identity"}} for names or paths (``lopt.load``); a
  missing or corrupt optimizer is a UserError naming it."""
  from lopt.trained import load
  out = {}
  for name in names:
    trained = load(name)
    path = Path(trained.path)
    label = path.parent.name if path.name == "optimizer" else (name if os.sep not in name else path.name)
    while label in out or label in BASELINES:
      label += "'"
    identity = {"architecture": trained.optimizer.config(), "sha256": trained.config.get("weights_sha256")}
    out[label] = {"trained": trained, "name": name, "path": str(path), "identity": identity}
  return out


def select_problems(names: list[str] | None, quick: bool) -> list[str]:
  """Problem names in suite order: ``names`` (checked), else the quick subset or the whole suite."""
  if not names:
    return list(suite.QUICK if quick else suite.PROBLEMS)
  unknown = [n for n in names if n not in suite.PROBLEMS]
  if unknown:
    raise UserError(f"unknown benchmark problem(s) {', '.join(map(repr, unknown))}; known: "
                    f"{', '.join(suite.PROBLEMS)} (`lopt benchmark --list` describes them)")
  return [n for n in suite.PROBLEMS if n in names]


def machine() -> dict:
  import lopt
  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
          "cpu_cores": cores, "jax_backend": jax.default_backend(),
          "devices": [d.device_kind for d in jax.devices()],
          "versions": {"python": sys.version.split()[0], "jax": jax.__version__, "optax": optax.__version__,
                       "numpy": np.__version__, "lopt": lopt.__version__}}


@contextmanager
def progress_bar(total: int, enabled: bool = True):
  """Yields ``update(advance, status)``: ``lopt.progress.work_bar`` over unrolls (a line every 5% off a terminal),
  the status naming the problem, the optimizer and its loss; nothing when not ``enabled``."""
  if not enabled:
    yield lambda advance, status: None
    return
  from lopt.progress import work_bar
  with work_bar(total, "benchmark", lines=20) as show:
    done = [0]

    def update(advance, status):
      done[0] += advance
      show(done[0], status)
    yield update


def run_benchmark(names: list[str], out, *, problems: list[str] | None = None, quick: bool = False,
                  tuning_seeds: int | None = None, eval_seeds: int | None = None,
                  learning_rates=ADAM_LEARNING_RATES, num_trials: int = NADAMW_TRIALS, horizon: int | None = None,
                  lanes: int = LANES, progress: bool = True, feed_valid: bool = True,
                  say=lambda message: None) -> dict:
  """Runs (or reads from the cache) every (problem, optimizer), writes OUT/benchmark.json and returns its content.

  ``horizon`` overrides every problem's horizon (tests); ``learning_rates`` and ``num_trials`` shrink the grids.
  Without ``feed_valid`` the learned optimizers are given no validation loss (the baselines never read one).
  """
  out = Path(out)
  tuning_seeds = tuning_seeds or (QUICK_TUNING_SEEDS if quick else TUNING_SEEDS)
  eval_seeds = eval_seeds or (QUICK_EVAL_SEEDS if quick else EVAL_SEEDS)
  for what, value in (("tuning seeds", tuning_seeds), ("evaluation seeds", eval_seeds), ("trials", num_trials),
                      ("lanes", lanes), ("horizon", horizon or 1)):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise UserError(f"benchmark: {what} must be a positive integer, got {value!r}")
  if not learning_rates or not all(isinstance(r, (int, float)) and 0 < r < math.inf for r in learning_rates):
    raise UserError(f"benchmark: learning rates must be positive numbers, got {learning_rates!r}")
  chosen = select_problems(problems, quick)
  learned = learned_optimizers(names)
  plans = {name: baseline_plan(name, learning_rates, num_trials) for name in BASELINES}
  settings = {"quick": quick, "problems": chosen, "tuning_seeds": tuning_seeds, "eval_seeds": eval_seeds,
              "tuning_seed": TUNING_SEED, "evaluation_seed": EVALUATION_SEED, "nadamw_seed": NADAMW_SEED,
              "adam_learning_rates": [float(r) for r in learning_rates],
              "nadamw_trials": clean(plans["nadamw_cosine"]["candidates"]), "default_learning_rate":
              DEFAULT_LEARNING_RATE, "valid_every": VALID_EVERY, "final_fraction": FINAL_FRACTION,
              "divergence_factor": DIVERGENCE_FACTOR, "bootstrap_resamples": BOOTSTRAP_RESAMPLES,
              "bootstrap_seed": BOOTSTRAP_SEED, "horizon_override": horizon, "feed_valid": feed_valid,
              "learned": {label: {"name": entry["name"], "path": entry["path"], **entry["identity"]}
                          for label, entry in learned.items()}}
  tuning_keys, eval_keys = seed_keys(TUNING_SEED, tuning_seeds), seed_keys(EVALUATION_SEED, eval_seeds)

  # The jobs, and how many inner steps each still has to run (for the bar's ETA).
  jobs = []
  for name in chosen:
    problem = suite.PROBLEMS[name]
    steps = horizon or (problem.quick_horizon if quick and problem.quick_horizon else problem.horizon)
    common = {"format": FORMAT_VERSION, "suite": suite.SUITE_VERSION, "problem": name, "options": problem.options,
              "horizon": steps,
              "eval_seeds": eval_seeds, "seeds": [TUNING_SEED, EVALUATION_SEED], "valid_every": VALID_EVERY}
    for label, entry in learned.items():
      fed = {} if feed_valid else {"feed_valid": False}  # (the default keeps earlier caches valid)
      jobs.append((name, steps, label, {"learned": True}, {**common, **fed, "optimizer": entry["identity"]}))
    for label, plan in plans.items():
      identity = {**common, "optimizer": {"build": plan["build"], "candidates": plan["candidates"]}}
      if plan["tuned"]:
        identity["tuning_seeds"] = tuning_seeds
      jobs.append((name, steps, label, plan, identity))
  pending = [job for job in jobs if not cache_path(out, job[0], job[2], job[4]).is_file()]
  runs = lambda plan: (len(next(iter(plan["candidates"].values()))) * tuning_seeds if plan.get("tuned") else 0) \
      + eval_seeds
  total = sum(runs(plan) * steps for _, steps, _, plan, _ in pending)
  say(f"benchmark: {len(chosen)} problems x {len(learned) + len(plans)} optimizers; {len(jobs) - len(pending)} "
      f"results cached, {len(pending)} to run -> {out}")

  started = time.perf_counter()
  records = {}
  with progress_bar(total, progress) as update:
    task_cache, runner_cache = {}, {}
    for name, steps, label, plan, identity in jobs:
      path = cache_path(out, name, label, identity)
      if path.is_file():
        records[name, label] = read_json(path, "cached benchmark result")
        continue
      if (name, steps) not in task_cache:
        task_cache.clear()
        runner_cache.clear()  # one problem's compilations at a time
        task_cache[name, steps] = suite.PROBLEMS[name].task(quick, horizon=steps)
      task = task_cache[name, steps]
      family = "learned:" + label if plan.get("learned") else plan["build"]
      if family not in runner_cache:
        if plan.get("learned"):
          transformation = learned[label]["trained"].as_optax()
          build, width = (lambda: transformation), min(lanes, eval_seeds)
        else:
          # A multiple of the evaluation seeds near ``lanes``: evaluations fill their calls, tuning nearly does.
          build, width = builder(plan["build"], steps), eval_seeds * max(1, round(lanes / eval_seeds))
        runner_cache[family] = lane_runner(task, build, steps, width, feed_valid)

      def report(count, train, phase, name=name, label=label, steps=steps):
        finals = final_loss(train)
        shown = np.median(finals) if np.all(np.isfinite(finals)) else float("inf")
        update(count * steps, f"{name} · {label} · {phase} · loss {shown:.3g}")
      record = run_job(task, steps, plan, runner_cache[family], tuning_keys, eval_keys, report)
      record.update(problem=name, optimizer=label, kind="learned" if plan.get("learned") else "baseline")
      atomic_write_json(path, record)
      records[name, label] = record

  per_problem = {}
  for name in chosen:
    problem = suite.PROBLEMS[name]
    steps = next(s for n, s, *_ in jobs if n == name)
    results = {label: optimizer_metrics(records[name, label], steps) for label in [*learned, *BASELINES]}
    trains = {label: _floats(records[name, label]["train"]) for label in [*learned, "adam_tuned"]}
    per_problem[name] = {
        "kind": problem.kind, "description": problem.description, "horizon": steps,
        "batch_size": problem.batch_size, "num_params": suite.num_params(problem),
        "curve_steps": curve_steps(steps).tolist(), "results": results,
        "learned": {label: compare_learned(results[label], results, trains[label], trains["adam_tuned"])
                    for label in learned}}
  result = clean({"format": FORMAT, "format_version": FORMAT_VERSION,
                  "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  "machine": machine(), "settings": settings, "seconds": round(time.perf_counter() - started, 1),
                  "problems": per_problem, "summary": summarize(per_problem, list(learned))})
  atomic_write_json(out / "benchmark.json", result)
  return result


# -- text ------------------------------------------------------------------------------------------------------------

def _num(x, digits: int = 3) -> str:
  return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.{digits}g}"


def text_table(result: dict) -> str:
  """Per problem: tuned Adam's learning rate and mean loss, the other baselines' and each learned optimizer's mean
  loss as a ratio to tuned Adam's (< 1: better), its final-loss ratio and speedup; '!' marks diverged seeds."""
  labels = list(result["summary"])
  headers = ["problem", "adam lr", "adam mean", "nadamw/adam", "adam1e-3/adam"]
  for label in labels:
    headers += [f"{label}/adam", "final", "speedup"]
  rows = [headers]
  for name, p in result["problems"].items():
    r = p["results"]
    adam = r["adam_tuned"]["mean_loss"]
    ratio = lambda label: _num(r[label]["mean_loss"] / adam if r[label]["mean_loss"] is not None and adam else None) \
        + ("!" if r[label]["diverged_seeds"] else "")
    row = [name, _num(r["adam_tuned"]["hyperparameters"]["learning_rate"], 2), _num(adam, 4),
           ratio("nadamw_cosine"), ratio("adam_1e-3")]
    for label in labels:
      c = p["learned"][label]
      row += [ratio(label), _num(c["ratio_final_loss"]), _num(c["speedup"])]
    rows.append(row)
  widths = [max(len(str(row[i])) for row in rows) for i in range(len(headers))]
  line = lambda row: "  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip()
  return "\n".join([line(rows[0]), line(["-" * w for w in widths])] + [line(row) for row in rows[1:]])


def summary_lines(result: dict) -> list[str]:
  """One paragraph per learned optimizer: win rates, speedup IQM with its interval, ratios, divergence."""
  lines = []
  for label, s in result["summary"].items():
    wins = "; ".join(f"vs {name} {100 * w['mean_loss']:.0f}% (mean loss) / {100 * w['final_loss']:.0f}% (final)"
                     for name, w in s["win_rate"].items())
    low, high = s["speedup_interval"]
    lines.append(f"{label}: win rate over {s['num_problems']} problems {wins}")
    lines.append(f"{label}: speedup over tuned Adam IQM {_num(s['speedup_iqm'])} (95% bootstrap interval "
                 f"{_num(low)}..{_num(high)}); mean-loss ratio to tuned Adam: median "
                 f"{_num(s['median_ratio_mean_loss'])}, geometric mean {_num(s['geometric_mean_ratio_mean_loss'])}"
                 + (f"; diverged on {', '.join(s['diverged_on'])}" if s["diverged_on"] else "; never diverged"))
  return lines
