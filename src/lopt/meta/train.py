"""Meta-training: a jitted outer step (built from task, learned optimizer and outer optax optimizer) and the loop
around it, which owns the run directory, logging, held-out selection, checkpoints and resume."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from lopt import tasks as task_registry
from lopt.meta.config import MetaTrainConfig
from lopt.meta.objectives import META_LOSSES
from lopt.meta.unroll import normalized_mean_loss, unroll
from lopt.optimizers import GRUOptimizer, as_optax


def _l2_norm(tree) -> jax.Array:
  return jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(tree)))


def _all_finite(tree) -> jax.Array:
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


class StepMetrics(NamedTuple):
  meta_loss: jax.Array         # mean bounded meta-loss over the meta-batch
  gradient_norm: jax.Array     # of the (unclipped) meta-gradient actually used
  diverged_problems: jax.Array  # problems whose loss left [0, cap * loss_0] or became non-finite
  dropped_problems: jax.Array  # problems whose meta-gradient was non-finite and was left out
  skipped: jax.Array           # 1 if no finite meta-gradient was left and theta was not changed


def problem_meta_loss(task, optimizer, theta, key, *, horizon: int, meta_loss: str = "mean", loss_cap: float = 10.0,
                      remat: bool = True, first_order: bool = False):
  """Meta-loss of one sampled problem; returns (scalar, diverged flag)."""
  losses = unroll(task, as_optax(optimizer, theta), key, horizon, remat=remat, first_order=first_order)
  ratio = losses / losses[0]
  diverged = ~jnp.all(jnp.isfinite(ratio) & (ratio < loss_cap))
  return META_LOSSES[meta_loss](losses, loss_cap), diverged


def build_outer_step(task, optimizer, outer_optimizer: optax.GradientTransformation, *, horizon: int,
                     meta_loss: str = "mean", loss_cap: float = 10.0, l2_penalty: float = 0.0,
                     remat: bool = True, first_order: bool = False) -> Callable:
  """Returns ``outer_step(theta, outer_state, keys) -> (theta, outer_state, StepMetrics)``, jitted.

  ``keys`` is the meta-batch: (meta_batch_size,) problem keys on the leading axis, so the batch can be sharded across
  devices by sharding ``keys`` alone. The meta-gradient is that of the batch-mean loss (full backpropagation through
  the unroll). When it is not finite, it is recomputed problem by problem and the problems with non-finite
  gradients are left out (and counted); when none is left, the step is skipped (and counted).
  """

  def one_problem(theta, key):
    return problem_meta_loss(task, optimizer, theta, key, horizon=horizon, meta_loss=meta_loss, loss_cap=loss_cap,
                             remat=remat, first_order=first_order)

  def batch_loss(theta, keys):
    losses, diverged = jax.vmap(one_problem, in_axes=(None, 0))(theta, keys)
    return jnp.mean(losses) + l2_penalty * _l2_norm(theta), (jnp.mean(losses), jnp.sum(diverged))

  def per_problem_gradient(theta, keys):
    # Slow path, only taken when the batch gradient is not finite: per-problem gradients, non-finite ones masked.
    grads = jax.vmap(jax.grad(lambda t, k: one_problem(t, k)[0]), in_axes=(None, 0))(theta, keys)
    finite = jax.vmap(_all_finite)(grads)
    count = jnp.sum(finite)
    mean = jax.tree.map(
        lambda g: jnp.sum(jnp.where(finite.reshape((-1,) + (1,) * (g.ndim - 1)), g, 0.0), 0) / jnp.maximum(count, 1),
        grads)
    penalty = jax.grad(lambda t: l2_penalty * _l2_norm(t))(theta)
    return jax.tree.map(jnp.add, mean, penalty), keys.shape[0] - count

  @jax.jit
  def outer_step(theta, outer_state, keys):
    (_, (mean_loss, diverged)), grads = jax.value_and_grad(batch_loss, has_aux=True)(theta, keys)
    grads, dropped = jax.lax.cond(_all_finite(grads), lambda: (grads, jnp.zeros((), jnp.int32)),
                                  lambda: per_problem_gradient(theta, keys))
    usable = _all_finite(grads) & (dropped < keys.shape[0])
    safe_grads = jax.tree.map(lambda g: jnp.where(usable, g, 0.0), grads)
    updates, new_state = outer_optimizer.update(safe_grads, outer_state, theta)
    new_theta = optax.apply_updates(theta, updates)
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(usable, a, b), new, old)  # noqa: E731
    metrics = StepMetrics(mean_loss, _l2_norm(safe_grads), diverged, dropped, (~usable).astype(jnp.int32))
    return keep(new_theta, theta), keep(new_state, outer_state), metrics

  return outer_step


def learning_rate_schedule(config: MetaTrainConfig) -> optax.Schedule:
  """The outer learning rate at each step: learning_rate * decay_rate ** (step / decay_steps) (not staircase)."""
  return optax.exponential_decay(config.learning_rate, config.decay_steps, config.decay_rate)


def outer_optimizer_from(config: MetaTrainConfig) -> optax.GradientTransformation:
  """Element-wise meta-gradient clipping, then Adam with exponential learning-rate decay (the paper's outer loop)."""
  return optax.chain(optax.clip(config.clip_value),
                     optax.adam(learning_rate_schedule(config), config.b1, config.b2, config.eps))


def optimizer_from(config: MetaTrainConfig) -> GRUOptimizer:
  return GRUOptimizer(config.hidden_size, config.input_scale, config.output_scale, config.input_encoding)


def task_from(config: MetaTrainConfig):
  options = dict(config.task_options)
  if config.horizon is not None:
    options["horizon"] = config.horizon
  return task_registry.get(config.task, **options)


def step_keys(seed: int, step: int, batch_size: int) -> jax.Array:
  """The meta-batch of outer step ``step``: a pure function of (seed, step), so a resumed run sees the same problems."""
  return jax.random.split(jax.random.fold_in(jax.random.key(seed), step), batch_size)


def held_out_keys(seed: int, count: int) -> jax.Array:
  """Problems for held-out selection during training, disjoint from the training stream and the evaluation seeds."""
  return jax.random.split(jax.random.fold_in(jax.random.key(seed + 1_000_003), 2**30), count)


def build_evaluator(task, optimizer, horizon: int) -> Callable:
  """``evaluate(theta, keys) -> (num_keys,)`` normalized mean losses (non-finite counted as inf), jitted."""

  @jax.jit
  def evaluate(theta, keys):
    losses = jax.vmap(lambda k: unroll(task, as_optax(optimizer, theta), k, horizon))(keys)
    score = normalized_mean_loss(losses)
    return jnp.where(jnp.isfinite(score), score, jnp.inf)

  return evaluate


@dataclass
class TrainState:
  """The loop's whole state: what a checkpoint holds (theta, outer state, best-so-far, step, counters)."""
  step: int
  theta: dict
  outer_state: Any
  best_theta: dict
  best_score: float
  best_step: int
  skipped_steps: int = 0
  dropped_problems: int = 0


def meta_train(config: MetaTrainConfig, run_dir: str | Path | None = None, *, resume: bool = False,
               progress: Callable | None = None) -> TrainState:
  """Meta-trains a GRU optimizer as ``config`` says; with ``run_dir`` writes the run directory (see run.py).

  ``progress(step, total, metrics_dict)`` is called after every logged step (the CLI draws a bar with it).
  Returns the final TrainState; ``best_theta`` (best on held-out problems) is what gets exported.
  """
  from lopt.meta import run as run_files

  task, optimizer = task_from(config), optimizer_from(config)
  horizon = config.horizon or task.horizon
  outer, schedule = outer_optimizer_from(config), learning_rate_schedule(config)
  outer_step = build_outer_step(task, optimizer, outer, horizon=horizon, meta_loss=config.meta_loss,
                                loss_cap=config.loss_cap, l2_penalty=config.l2_penalty, remat=config.remat,
                                first_order=config.meta_gradient == "first_order")
  evaluate = build_evaluator(task, optimizer, horizon)
  eval_keys = held_out_keys(config.seed, config.num_eval_problems)

  theta = optimizer.init(jax.random.key(config.seed))
  state = TrainState(0, theta, outer.init(theta), theta, float("inf"), 0)
  run = None
  if run_dir is not None:
    run = run_files.RunDirectory(run_dir)
    run.open(config, resume=resume)
    if resume:
      restored = run.restore(state)
      if restored is not None:
        state = restored

  # The counters stay on the device between log steps: reading them every step would make the host wait for each
  # outer step to finish before dispatching the next one.
  skipped, dropped = jnp.asarray(state.skipped_steps), jnp.asarray(state.dropped_problems)

  def sync_counters():
    state.skipped_steps, state.dropped_problems = int(skipped), int(dropped)

  started = time.perf_counter()
  try:
    while state.step < config.num_steps:
      keys = step_keys(config.seed, state.step, config.meta_batch_size)
      theta, outer_state, metrics = outer_step(state.theta, state.outer_state, keys)
      state.theta, state.outer_state, state.step = theta, outer_state, state.step + 1
      skipped, dropped = skipped + metrics.skipped, dropped + metrics.dropped_problems
      record = None
      if state.step % config.eval_every == 0 or state.step == config.num_steps:
        score = float(jnp.mean(evaluate(state.theta, eval_keys)))
        if score < state.best_score:
          state.best_theta, state.best_score, state.best_step = state.theta, score, state.step
        record = {"held_out_loss": score, "best_held_out_loss": state.best_score}
      if record is not None or state.step % config.log_every == 0:
        sync_counters()
        record = {
            "step": state.step, "meta_loss": float(metrics.meta_loss), "gradient_norm": float(metrics.gradient_norm),
            "diverged_problems": int(metrics.diverged_problems), "dropped_problems": int(metrics.dropped_problems),
            "skipped": int(metrics.skipped), "total_skipped_steps": state.skipped_steps,
            "learning_rate": float(schedule(state.step)),
            "seconds": round(time.perf_counter() - started, 3), "best_held_out_loss": state.best_score,
            **(record or {})}
        if run is not None:
          run.log(record)
        if progress is not None:
          progress(state.step, config.num_steps, record)
      if run is not None and (state.step % config.checkpoint_every == 0 or state.step == config.num_steps):
        sync_counters()
        run.checkpoint(state)
    sync_counters()
    if run is not None:
      run.export(optimizer, state, config)
  finally:
    if run is not None:
      run.close()
  return state


def load_metrics(run_dir: str | Path) -> list[dict]:
  """Reads ``metrics.jsonl``, skipping a torn last line left by a kill."""
  lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
  out = []
  for line in lines:
    try:
      out.append(json.loads(line))
    except json.JSONDecodeError:
      continue
  return out


__all__ = ["build_outer_step", "meta_train", "MetaTrainConfig", "TrainState", "StepMetrics", "step_keys",
           "build_evaluator", "learning_rate_schedule", "outer_optimizer_from", "optimizer_from", "task_from", "load_metrics"]
