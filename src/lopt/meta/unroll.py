"""The inner loop, resumable: ``init_inner`` a problem, ``advance`` it n steps (returning the losses), again and again.

``unroll`` (initialize and advance a whole horizon) is what full backpropagation differentiates; truncated
estimators advance many problems a truncation at a time, carrying ``InnerState`` between outer steps.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from lopt.tasks.base import Task

WITHHELD_STREAM = 2**30 + 17  # fold_in data of a problem key: whether its validation loss is withheld (never a step)


class InnerState(NamedTuple):
  """One problem being optimized. params: the task's pytree; opt_state: the optimizer's; step: () int32, the next
  inner step; key: the problem's key; problem: its data drawn once (``task.sample(key)``), or None."""
  params: Any
  opt_state: Any
  step: jax.Array
  key: jax.Array
  problem: Any


def init_inner(task: Task, optimizer: optax.GradientTransformation, key: jax.Array) -> InnerState:
  """The problem ``key`` at step 0: its initial parameters, a fresh optimizer state, its data."""
  params = task.init(key)
  problem = None if task.sample is None else task.sample(key)
  return InnerState(params, optimizer.init(params), jnp.zeros((), jnp.int32), key, problem)


def _bound_loss(task: Task, state: InnerState):
  if task.sample is None:
    return lambda params, step: task.loss(params, state.key, step)
  return lambda params, step: task.loss_from_sample(params, state.problem, step)


def advance(task: Task, optimizer: optax.GradientTransformation, state: InnerState, num_steps: int, *,
            remat: bool = False, first_order: bool = False, valid: bool = False, valid_every: int = 0,
            horizon=None, valid_withheld: float = 0.0, measure_update: bool = False) -> tuple[InnerState, Any]:
  """Runs ``optimizer`` for ``num_steps`` steps from ``state``; returns (new state, (num_steps,) training losses).

  losses[t] is the loss at the parameters *before* update t, so an unroll's losses[0] is the loss at initialization
  (as in the paper's code). The optimizer receives the loss as ``value=`` (optax's convention).
  With ``remat`` each step is rematerialized in the backward pass: memory O(num_steps * |params|) instead of
  O(num_steps * |activations|), the paper's choice for backpropagating through long unrolls.
  With ``first_order`` the optimizer's inputs (gradient and loss) are constants to autodiff, so a meta-gradient
  takes no second derivatives of the task loss (Andrychowicz et al. 2016). That cuts the feedback
  params -> gradient -> update -> params through which meta-gradients of long unrolls on networks explode
  (norms of 1e16 and beyond were measured on two moons); the losses themselves are unchanged.
  With ``valid`` the losses are (num_steps, 2): the training and the validation loss (``task.valid_loss``) at the
  same parameters, for meta-objectives on held-out data.
  With ``valid_every`` (and a ``task.valid_loss``) the optimizer also receives ``valid_loss=`` every
  ``valid_every``-th step of this call (NaN, meaning "none", on the others), as a practitioner would measure it:
  the interval counts from the call's first step, so under ``vmap`` over staggered problems the measurement stays a
  real branch, not computed every step. A fraction ``valid_withheld`` of the problems (drawn from the problem's key,
  so a problem is withheld for its whole episode) never gets one: the optimizer must also work without it.
  ``horizon`` (int or traced) is passed as the ``num_steps=`` hint.
  With ``measure_update`` the second result is (losses as above, (num_steps,) ``log_update_rms`` of each step's
  update): the step size the optimizer took, for meta-objectives on it (the estimators' ``step_calibration``).
  Without it nothing is measured and the computation is the same as before the option existed.
  """
  problem_loss = _bound_loss(task, state)  # the problem's data were drawn once, outside the scan

  feed_valid = bool(valid_every) and task.valid_loss is not None
  hints = {} if horizon is None else {"num_steps": horizon}
  withheld = (jax.random.uniform(jax.random.fold_in(state.key, WITHHELD_STREAM)) < valid_withheld
              if valid_withheld > 0 else jnp.asarray(False))

  def step(carry, inputs):
    params, opt_state = carry
    t, i = inputs
    loss, grads = jax.value_and_grad(problem_loss)(params, t)
    measured = jnp.stack([loss, task.valid_loss(params, state.key, t)]) if valid else loss
    step_hints = dict(hints)
    if feed_valid:
      if valid:
        fed = measured[1]
      else:
        fed = jax.lax.cond(i % valid_every == 0, lambda: task.valid_loss(params, state.key, t).astype(loss.dtype),
                           lambda: jnp.asarray(jnp.nan, loss.dtype))
      step_hints["valid_loss"] = jnp.where((i % valid_every == 0) & jnp.logical_not(withheld), fed, jnp.nan)
    if first_order:
      loss_in, grads, hints_in = jax.lax.stop_gradient((loss, grads, step_hints))
    else:
      loss_in, hints_in = loss, step_hints
    updates, opt_state = optimizer.update(grads, opt_state, params, value=loss_in, **hints_in)
    out = (measured, log_update_rms(updates)) if measure_update else measured
    return (optax.apply_updates(params, updates), opt_state), out

  if remat:
    step = jax.checkpoint(step)
  (params, opt_state), losses = jax.lax.scan(step, (state.params, state.opt_state),
                                             (state.step + jnp.arange(num_steps), jnp.arange(num_steps)))
  return state._replace(params=params, opt_state=opt_state, step=state.step + num_steps), losses


RMS_FLOOR = 1e-10  # below LOG_RMS_BOUNDS' lower end (es.py), so the bounded values are unchanged


def log_update_rms(updates) -> jax.Array:
  """() log of the RMS of ``updates`` over every coordinate of every leaf, 0.5 * log(mean of u^2), in float32; an
  RMS below RMS_FLOOR counts as RMS_FLOOR (callers bound it higher), so that an all-zero update has a finite log and
  a zero derivative instead of -inf and NaN (which would void a backpropagated meta-gradient).

  One RMS over all coordinates rather than a mean of per-tensor log RMS: it is the step size that
  benchmarks/step_size_predictability.py measures (the calibration's success measure), each tensor counts by its
  size (a bias or a gain does not weigh as much as a weight matrix), and a tensor whose update is exactly zero (a
  zero-initialized one with no gradient yet) does not make it -inf while the others move."""
  leaves = jax.tree.leaves(updates)
  total = sum(jnp.sum(jnp.square(u.astype(jnp.float32))) for u in leaves)
  return 0.5 * jnp.log(jnp.maximum(total / sum(u.size for u in leaves), RMS_FLOOR**2))


def unroll(task: Task, optimizer: optax.GradientTransformation, key: jax.Array, num_steps: int, *,
           remat: bool = False, first_order: bool = False) -> jax.Array:
  """Runs ``optimizer`` on the problem ``key`` of ``task`` from initialization; returns (num_steps,) losses. The
  optimizer gets ``num_steps`` as its horizon hint (``num_steps=``), as in meta-training."""
  _, losses = advance(task, optimizer, init_inner(task, optimizer, key), num_steps, remat=remat,
                      first_order=first_order, horizon=num_steps)
  return losses


def normalized_losses(losses: jax.Array) -> jax.Array:
  """(..., T) losses -> losses / losses[..., :1]."""
  return losses / losses[..., :1]


def normalized_mean_loss(losses: jax.Array) -> jax.Array:
  """The comparison metric and meta-objective: mean over the horizon of loss_t / loss_0; (..., T) -> (...)."""
  return jnp.mean(normalized_losses(losses), axis=-1)


def normalized_score(losses: jax.Array) -> jax.Array:
  """The score everything is ranked by (held-out selection, tuning, comparison): ``normalized_mean_loss`` with a
  non-finite value (a diverged problem) as +inf; (..., T) -> (...)."""
  score = normalized_mean_loss(losses)
  return jnp.where(jnp.isfinite(score), score, jnp.inf)
