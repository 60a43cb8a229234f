"""Evaluation over seeds, baseline tuning, and the fair comparison (SPEC §4).

Everything is ranked by the *normalized mean loss*: per problem, the mean over the horizon of loss_t / loss_0
(the meta-objective), then averaged over problems. A problem whose loss becomes non-finite scores +inf.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lopt.meta.unroll import normalized_score, unroll
from lopt.optimizers import baselines

TUNING_SEED = 10_000     # tuning problems: one stream ...
EVALUATION_SEED = 20_000  # ... evaluation problems: another; neither is the meta-training stream fold_in(seed, step)


def problem_keys(seed: int, count: int) -> jax.Array:
  """(count,) problem keys of a named stream."""
  return jax.random.split(jax.random.key(seed), count)


def problem_runner(task, build: Callable[..., optax.GradientTransformation], horizon: int, *,
                   one_at_a_time: bool = False) -> Callable[[dict, jax.Array], np.ndarray]:
  """``run(hyperparameters, keys) -> (num_keys, horizon)`` raw training losses of ``build(**hyperparameters)``.

  The hyperparameters are traced, so one compilation serves every value of them: a baseline's tuning candidates
  and its evaluation. All problems run in one vmapped call, or with ``one_at_a_time`` each in its own call of one
  compiled single-problem unroll (as many at once as there are CPU cores), which also serves any number of
  problems. On a CPU that is 2-4x faster for networks with thousands of parameters: XLA:CPU turns a vmapped batch
  of per-problem convolution kernels into a slow grouped convolution, and a batch of per-coordinate GRU states
  outgrows the cache. Its compilation is smaller too. Each problem's losses are the same either way up to float
  rounding, which the minibatch training of a network can amplify to ~1e-3 of the mean.
  """
  def losses(hyperparameters, key):
    return unroll(task, build(**hyperparameters), key, horizon)

  def traced(hyperparameters):
    # Python floats and numpy scalars alike become one input type (else each would compile anew).
    return {k: jnp.asarray(v, float) for k, v in hyperparameters.items()}

  if one_at_a_time:
    single = jax.jit(losses)

    def run(hyperparameters, keys):
      values = traced(hyperparameters)
      # Compiled here (once: jit keeps it), so the threads only run it, whatever their JAX configuration.
      compiled = single.lower(values, keys[0]).compile()
      # One problem keeps a core or so busy; as many at once as there are cores keep them all busy.
      with ThreadPoolExecutor(_num_cores()) as pool:
        return np.stack(list(pool.map(lambda key: np.asarray(compiled(values, key)), keys)))
    return run
  batched = jax.jit(jax.vmap(losses, in_axes=(None, 0)))
  return lambda hyperparameters, keys: np.asarray(batched(traced(hyperparameters), keys))


def _num_cores() -> int:
  """CPU cores this process may run on (its affinity mask where the OS has one)."""
  return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def run_problems(task, optimizer: optax.GradientTransformation, keys: jax.Array, horizon: int, *,
                 one_at_a_time: bool = False) -> np.ndarray:
  """(num_keys, horizon) raw training losses of ``optimizer`` on the problems ``keys`` (see ``problem_runner``)."""
  return problem_runner(task, lambda: optimizer, horizon, one_at_a_time=one_at_a_time)({}, keys)


def scores(losses: np.ndarray) -> np.ndarray:
  """(..., T) losses -> (...) normalized mean losses with non-finite values as +inf."""
  return np.asarray(normalized_score(jnp.asarray(losses)))


def summarize_losses(losses: np.ndarray) -> dict:
  """Summary of (num_problems, T) raw losses: both metrics (mean and standard error) and the curves."""
  losses = np.asarray(losses, np.float64)
  n = losses.shape[0]
  per_problem = scores(losses)
  normalized = losses / losses[:, :1]
  final = normalized[:, -1]
  finite = np.isfinite(per_problem)

  def mean_se(x):
    if not np.all(np.isfinite(x)):
      return float("inf"), float("nan")
    return float(np.mean(x)), float(np.std(x, ddof=1) / np.sqrt(n)) if n > 1 else 0.0

  nml, nml_se = mean_se(per_problem)
  fin, fin_se = mean_se(final)
  with np.errstate(invalid="ignore"):
    curve_mean = np.mean(normalized, axis=0)
    curve_se = np.std(normalized, axis=0, ddof=1) / np.sqrt(n) if n > 1 else np.zeros_like(curve_mean)
  return {
      "normalized_mean_loss": nml, "normalized_mean_loss_se": nml_se,
      "final_normalized_loss": fin, "final_normalized_loss_se": fin_se,
      "final_loss": float(np.mean(losses[:, -1])), "diverged_problems": int(np.sum(~finite)),
      "num_problems": n,
      "curve_mean": curve_mean.tolist(), "curve_se": curve_se.tolist(),
      "raw_curve_mean": np.mean(losses, axis=0).tolist(),
      "per_problem": per_problem.tolist(),
  }


def tune_baseline(task, name: str, keys: jax.Array, horizon: int,
                  learning_rates=baselines.LEARNING_RATES, chunk: int = 32, candidates: dict | None = None,
                  runner: Callable[[dict, jax.Array], np.ndarray] | None = None) -> dict:
  """Grid search of baseline ``name`` on problems ``keys``; returns the candidates' scores and the best.

  ``candidates`` ({hyperparameter: (n,) values}, every hyperparameter of the baseline) replaces the full grid
  ``baselines.grid(name, learning_rates)``, e.g. for a local re-tuning around a known optimum.

  All candidates run in one compiled call: ``lax.map`` over candidates (``chunk`` at a time, vmapped) of a vmap over
  the tuning problems. With a ``runner`` (``problem_runner`` of this baseline) they run in turn through it instead,
  e.g. to share its compilation with the evaluation.
  """
  if candidates is None:
    candidates = baselines.grid(name, learning_rates)
  candidates = {k: np.asarray(v, np.float32) for k, v in candidates.items()}

  def candidate_score(hyperparameters):
    optimizer = baselines.build(name, **hyperparameters)
    losses = jax.vmap(lambda k: unroll(task, optimizer, k, horizon))(keys)
    return jnp.mean(normalized_score(losses))

  started = time.perf_counter()
  if runner is None:
    grid_scores = np.asarray(jax.jit(lambda c: jax.lax.map(candidate_score, c, batch_size=chunk))(
        {k: jnp.asarray(v) for k, v in candidates.items()}))
  else:
    rows = ({k: v[i] for k, v in candidates.items()} for i in range(len(candidates["learning_rate"])))
    grid_scores = np.array([np.mean(scores(runner(row, keys))) for row in rows], np.float32)
  best = int(np.argmin(np.where(np.isnan(grid_scores), np.inf, grid_scores)))
  return {
      "name": name,
      "best": {k: float(v[best]) for k, v in candidates.items()},
      "best_tuning_score": float(grid_scores[best]),
      "candidates": {k: v.tolist() for k, v in candidates.items()},
      "scores": grid_scores.tolist(),
      "num_candidates": int(grid_scores.size),
      "num_tuning_problems": int(keys.shape[0]),
      "seconds": round(time.perf_counter() - started, 2),
  }


def evaluate_learned(task, optimizer: optax.GradientTransformation, keys: jax.Array, horizon: int, *,
                     one_at_a_time: bool = False) -> dict:
  """A comparison entry for a learned optimizer: ``summarize_losses`` on the problems ``keys``."""
  losses = run_problems(task, optimizer, keys, horizon, one_at_a_time=one_at_a_time)
  return {"kind": "learned", **summarize_losses(losses)}


def evaluate_baseline(task, name: str, hyperparameters: dict, keys: jax.Array, horizon: int, *,
                      runner: Callable[[dict, jax.Array], np.ndarray] | None = None) -> dict:
  """A comparison entry for baseline ``name`` with the given (tuned) hyperparameters, run by ``runner`` (a
  ``problem_runner`` of this baseline, e.g. the one that tuned it) when given."""
  if runner is None:
    losses = run_problems(task, baselines.build(name, **hyperparameters), keys, horizon)
  else:
    losses = runner(hyperparameters, keys)
  return {"kind": "baseline", "hyperparameters": hyperparameters, **summarize_losses(losses)}


def add_ranks(results: dict) -> None:
  """Sets each entry's ``rank`` by normalized mean loss (1 = best; ties share a rank)."""
  for result in results.values():
    result["rank"] = 1 + sum(r["normalized_mean_loss"] < result["normalized_mean_loss"] for r in results.values())


def compare(task, learned: dict[str, optax.GradientTransformation], *, horizon: int | None = None,
            baseline_names=("sgd", "momentum", "rmsprop", "adam"), num_tuning_problems: int = 32,
            num_eval_problems: int = 128, learning_rates=baselines.LEARNING_RATES,
            progress: Callable[[str], None] | None = None) -> dict:
  """Tunes the baselines, then evaluates them and the ``learned`` optimizers on the same fresh problems.

  Returns {"results": {name: summary + hyperparameters}, "tuning": {...}, "settings": {...}}.
  """
  horizon = horizon or task.horizon
  tuning_keys = problem_keys(TUNING_SEED, num_tuning_problems)
  eval_keys = problem_keys(EVALUATION_SEED, num_eval_problems)
  say = progress or (lambda message: None)
  results, tuning = {}, {}
  for name, optimizer in learned.items():
    say(f"evaluating {name} on {num_eval_problems} problems")
    results[name] = evaluate_learned(task, optimizer, eval_keys, horizon)
  for name in baseline_names:
    say(f"tuning {name} over {baselines.grid(name, learning_rates)['learning_rate'].size} candidates")
    tuned = tune_baseline(task, name, tuning_keys, horizon, learning_rates)
    tuning[name] = tuned
    say(f"evaluating tuned {name} on {num_eval_problems} problems")
    results[name] = evaluate_baseline(task, name, tuned["best"], eval_keys, horizon)
  add_ranks(results)
  settings = {"task": task.name, "task_options": task.options, "horizon": horizon,
              "num_tuning_problems": num_tuning_problems, "tuning_seed": TUNING_SEED,
              "num_eval_problems": num_eval_problems, "evaluation_seed": EVALUATION_SEED,
              "learning_rates": list(learning_rates), "grids": {n: baselines.GRIDS[n] for n in baseline_names},
              "tuning_budget": {n: tuning[n]["num_candidates"] * num_tuning_problems for n in tuning}}
  return {"results": results, "tuning": tuning, "settings": settings}


def verdict(paired: dict) -> str:
  """'better', 'worse' or 'indistinguishable': whether ``paired_ratio``'s difference is beyond two standard errors."""
  d, se = paired["difference"], paired["difference_se"]
  return "better" if d < -2 * se else "worse" if d > 2 * se else "indistinguishable"


def paired_ratio(a: dict, b: dict) -> dict:
  """Ratio of normalized mean losses a / b, and the paired per-problem difference a - b with its standard error."""
  x, y = np.asarray(a["per_problem"]), np.asarray(b["per_problem"])
  diff = x - y
  ok = np.all(np.isfinite(diff))
  se = float(np.std(diff, ddof=1) / np.sqrt(len(diff))) if ok and len(diff) > 1 else float("nan")
  return {"ratio": float(np.mean(x) / np.mean(y)) if ok else float("nan"),
          "difference": float(np.mean(diff)) if ok else float("nan"), "difference_se": se}
