"""The inner loop: optimize one problem for a number of steps and record the loss curve."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from lopt.tasks.base import Task


def unroll(task: Task, optimizer: optax.GradientTransformation, key: jax.Array, num_steps: int, *,
           remat: bool = False, first_order: bool = False) -> jax.Array:
  """Runs ``optimizer`` on the problem ``key`` of ``task``; returns the (num_steps,) training losses.

  losses[t] is the loss at the parameters *before* update t, so losses[0] is the loss at initialization (as in the
  paper's code). The optimizer receives the loss as ``value=`` (optax's convention).
  With ``remat`` each step is rematerialized in the backward pass: memory O(num_steps * |params|) instead of
  O(num_steps * |activations|), the paper's choice for backpropagating through long unrolls.
  With ``first_order`` the optimizer's inputs (gradient and loss) are constants to autodiff, so a meta-gradient
  takes no second derivatives of the task loss (Andrychowicz et al. 2016). That cuts the feedback
  params -> gradient -> update -> params through which meta-gradients of long unrolls on networks explode
  (norms of 1e16 and beyond were measured on two moons); the losses themselves are unchanged.
  """
  params = task.init(key)
  problem_loss = task.bind(key)  # the problem's data are drawn once, outside the scan

  def step(carry, t):
    params, state = carry
    loss, grads = jax.value_and_grad(problem_loss)(params, t)
    if first_order:
      loss_in, grads = jax.lax.stop_gradient((loss, grads))
    else:
      loss_in = loss
    updates, state = optimizer.update(grads, state, params, value=loss_in)
    return (optax.apply_updates(params, updates), state), loss

  if remat:
    step = jax.checkpoint(step)
  _, losses = jax.lax.scan(step, (params, optimizer.init(params)), jnp.arange(num_steps))
  return losses


def normalized_losses(losses: jax.Array) -> jax.Array:
  """(..., T) losses -> losses / losses[..., :1]."""
  return losses / losses[..., :1]


def normalized_mean_loss(losses: jax.Array) -> jax.Array:
  """The comparison metric and meta-objective: mean over the horizon of loss_t / loss_0; (..., T) -> (...)."""
  return jnp.mean(normalized_losses(losses), axis=-1)
