"""The outer optimizer of meta-training as a learned optimizer (SPEC §7): "meta-training a learned optimizer" is a task
like any other, so a trained optimizer -- or a copy of the one being trained -- can apply the meta-gradient.

``learned_outer(optimizer, applier, ...)`` is an optax transformation over theta. Its state (``LearnedOuterState``)
holds the meta-parameters that apply the update (``applier``), so the jitted outer step stays a pure function and a
checkpoint of the outer state resumes exactly, also when the applier is a refreshed copy of theta (``self``).

What the learned optimizer's hints mean one level up (ours):
  value / loss  the estimator's meta-loss of this outer step (what the outer optimizer minimizes);
  valid_loss    the latest held-out score (``record_valid_loss``), given once, then NaN ("none this step", as the
                inner loop feeds validation losses at an interval);
  num_steps     the run's outer steps (the horizon of the outer problem).
Element-wise meta-gradient clipping (``clip_value``) stays in front, as Metz 2020 found it still needed when their
optimizer trained itself; the learned update is then multiplied by ``scale`` (1: the update as trained).
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from lopt.errors import UserError

ADAM = "adam"  # the hand-designed default: clipping, then Adam with exponential decay (lopt.meta.train)
SELF = "self"  # a copy of the optimizer being trained, refreshed every ``outer_refresh`` outer steps


class LearnedOuterState(NamedTuple):
  """inner: the learned optimizer's state over theta; applier: the meta-parameters applying the update (a pytree
  shaped like the applying optimizer's theta); step: () int32 updates made; valid_loss: () float32, a held-out score
  not yet passed on (NaN: none)."""
  inner: Any
  applier: Any
  step: jax.Array
  valid_loss: jax.Array


def learned_outer(optimizer, applier=None, *, clip_value: float | None, scale: float = 1.0, refresh: int = 1,
                  num_steps: int | None = None) -> optax.GradientTransformationExtraArgs:
  """An optax transformation of meta-gradients: clip element-wise to ``clip_value`` (None: no clipping), then the
  update of ``optimizer`` with meta-parameters ``applier``, times ``scale``.

  ``applier`` None means *self*: the optimizer updating theta is theta itself, copied into the state at ``init``
  and refreshed every ``refresh`` updates (at steps 0, refresh, 2 refresh, ...; 1: always the current theta); it
  needs ``params`` (theta) at every update. The extra argument ``value=`` (or ``loss=``) is the meta-loss.
  """
  is_self = applier is None
  if not is_self:
    applier = jax.tree.map(jnp.asarray, applier)

  def init_fn(theta):
    chosen = theta if is_self else applier
    return LearnedOuterState(optimizer.init_state(chosen, theta), chosen, jnp.zeros((), jnp.int32),
                             jnp.full((), jnp.nan, jnp.float32))

  def update_fn(grads, state, params=None, **extra_args):
    if params is None:
      raise ValueError("learned_outer: the update needs params (theta): the learned optimizer reads them")
    current = state.applier
    if is_self:  # the copy follows theta every ``refresh`` updates; in between it is the older theta
      fresh = state.step % refresh == 0
      current = jax.tree.map(lambda new, old: jnp.where(fresh, new, old), params, state.applier)
    if clip_value is not None:
      grads = jax.tree.map(lambda g: jnp.clip(g, -clip_value, clip_value), grads)
    loss = next((extra_args[n] for n in ("value", "loss") if extra_args.get(n) is not None), None)
    updates, inner = optimizer.update(current, state.inner, grads, params, loss=loss, valid_loss=state.valid_loss,
                                      num_steps=num_steps)
    updates = jax.tree.map(lambda u, g: (scale * u).astype(g.dtype), updates, grads)
    inner = optax.tree_utils.tree_cast_like(inner, state.inner)
    return updates, LearnedOuterState(inner, current, state.step + 1, jnp.full((), jnp.nan, jnp.float32))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def record_valid_loss(outer_state, score: float):
  """``outer_state`` with every ``LearnedOuterState`` in it (e.g. inside an ``optax.chain`` state) carrying
  ``score`` as the held-out loss its next update sees; any other state is returned unchanged."""
  is_learned = lambda s: isinstance(s, LearnedOuterState)  # noqa: E731
  return jax.tree.map(lambda s: s._replace(valid_loss=jnp.asarray(score, jnp.float32)) if is_learned(s) else s,
                      outer_state, is_leaf=is_learned)


def resolve(name: str, optimizer, source: str = "--outer-optimizer"):
  """(applying optimizer, its meta-parameters) for an ``outer_optimizer`` setting other than ``adam``: for ``self``
  (``optimizer``, None); otherwise the trained optimizer of that path or name (``lopt.load``), any architecture.
  UserError (what was wrong, what is allowed) when it cannot be loaded."""
  if name == SELF:
    return optimizer, None
  from lopt.trained import load
  try:
    trained = load(name)
  except UserError as e:
    raise UserError(f"{source} {name!r}: {e}; expected {ADAM!r} (the default), {SELF!r} (the optimizer being "
                    f"trained) or the path or name of a trained optimizer") from None
  return trained.optimizer, trained.theta


def is_inert(optimizer, theta) -> bool:
  """Whether ``optimizer`` with meta-parameters ``theta`` makes an all-zero update on a probe problem (an untrained
  architecture with a zero readout): as an outer optimizer of itself it would never move."""
  return not bool(_moves(optimizer, theta))


@functools.partial(jax.jit, static_argnums=0)
def _moves(optimizer, theta) -> jax.Array:
  params = {"w": jnp.linspace(-1.0, 1.0, 12).reshape(3, 4), "b": jnp.linspace(0.5, -0.5, 4)}
  grads = jax.tree.map(lambda p: jnp.cos(3 * p) + 0.1, params)
  updates, _ = optimizer.update(theta, optimizer.init_state(theta, params), grads, params, loss=jnp.ones(()))
  return jnp.any(jnp.stack([jnp.any(u != 0) for u in jax.tree.leaves(updates)]))
