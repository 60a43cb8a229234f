"""State collection: run a learned optimizer on test problems and keep everything per step (SPEC §5.1).

This is the one place that knows about optimizers and tasks; everything after it sees plain arrays and callables.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree


class Collected(NamedTuple):
  """What a learned optimizer did on P problems over T steps (C = P * parameters per problem coordinates).

  losses: (P, T) loss before each update.
  params: (T, C) parameters before each update.
  gradients: (T, C) gradients at those parameters.
  updates: (T, C) the optimizer's parameter changes.
  hidden: (T, C, H) optimizer state before each update (hidden[0] is h0 for every coordinate).
  """
  losses: np.ndarray
  params: np.ndarray
  gradients: np.ndarray
  updates: np.ndarray
  hidden: np.ndarray

  @property
  def visited_states(self) -> np.ndarray:
    """(T * C, H) every state seen, flattened over steps and coordinates."""
    return self.hidden.reshape(-1, self.hidden.shape[-1])


def _flat_hidden(hidden_tree, size: int) -> jax.Array:
  return jnp.concatenate([leaf.reshape(-1, size) for leaf in jax.tree.leaves(hidden_tree)])


def collect_states(task, optimizer, theta, keys, num_steps: int | None = None,
                   coordinates=None) -> Collected:
  """Runs ``optimizer`` (a ``lopt.api.LearnedOptimizer`` with a ``RecurrentView``) on each problem.

  Args:
    task: a lopt Task.
    optimizer: the learned optimizer; theta: its meta-parameters.
    keys: (P,) problem keys.
    num_steps: steps per problem (default: the task's horizon).
    coordinates: optional index array into one problem's flattened parameters: only these coordinates are kept
      (per problem). Network tasks have thousands of parameters, and (T, C, H) states would take gigabytes.
  """
  num_steps = num_steps or task.horizon
  size = int(np.shape(optimizer.initial_hidden(theta))[-1])
  keep = (lambda x: x) if coordinates is None else (lambda x: x[jnp.asarray(coordinates)])  # noqa: E731

  def run(key):
    params = task.init(key)
    state = optimizer.init_state(theta, params)

    def body(carry, t):
      params, state = carry
      loss, grads = jax.value_and_grad(task.loss)(params, key, t)
      updates, new_state = optimizer.update(theta, state, grads, params, loss=loss, step=t)
      record = (loss, keep(ravel_pytree(params)[0]), keep(ravel_pytree(grads)[0]), keep(ravel_pytree(updates)[0]),
                keep(_flat_hidden(optimizer.hidden(state), size)))
      return (optax.apply_updates(params, updates), new_state), record

    _, records = jax.lax.scan(body, (params, state), jnp.arange(num_steps))
    return records

  losses, params, grads, updates, hidden = jax.jit(jax.vmap(run))(keys)
  # Problems onto the coordinate axis: (P, T, n, ...) -> (T, P * n, ...).
  merge = lambda x: np.asarray(jnp.moveaxis(x, 0, 1)).reshape(num_steps, -1, *x.shape[3:])  # noqa: E731
  return Collected(np.asarray(losses), merge(params), merge(grads), merge(updates), merge(hidden))
