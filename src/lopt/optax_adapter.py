"""A learned optimizer with bound meta-parameters as an optax gradient transformation.

The learned optimizer protocol (``lopt.api.LearnedOptimizer``: ``init_state(theta, params)``, ``update(theta, state,
grads, params, *, loss, valid_loss, step, num_steps)``) maps onto optax's (``init(params)``, ``update(updates, state, params, **extra_args)``) once theta is bound. What this
module adds on top of that binding is what makes the result composable:

- the loss arrives as an extra argument: ``value=`` (optax's name, as in ``optax.contrib.reduce_on_plateau`` and the
  line searches) or ``loss=``; likewise ``valid_loss=`` (a validation loss, for architectures that use one) and
  ``num_steps=`` (a horizon hint); every other extra argument is ignored, so the transformation can sit in an
  ``optax.chain`` next to transformations that need other extra arguments;
- dtypes are stable: updates come back in the dtype of the incoming gradients and every state leaf keeps the dtype
  it was initialized with, so the state can be a ``lax.scan`` / ``while_loop`` carry even for bfloat16 parameters
  or float32 meta-parameters driving float64 parameters;
- masked leaves pass through: inside ``optax.masked`` / ``optax.multi_transform`` / ``optax.partition`` the leaves
  this transformation does not own arrive as ``optax.MaskedNode()`` (an empty pytree node) in params, gradients and
  therefore in the state; the optimizer maps over leaves only, so they hold no state and cost nothing.
"""

from __future__ import annotations

from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import optax

from lopt.pytree import shapes_by_path

LOSS_ARGUMENTS = ("value", "loss")  # extra-argument names read as the current loss, in order of preference


def loss_from_extra_args(extra_args: Mapping[str, Any]):
  """The loss passed as ``value=`` (preferred, optax's convention) or ``loss=``; None when neither is given."""
  for name in LOSS_ARGUMENTS:
    if extra_args.get(name) is not None:
      return extra_args[name]
  return None


def check_meta_parameters(optimizer, theta) -> None:
  """Raises ValueError naming every meta-parameter (by key path) whose name or shape does not match ``optimizer``.

  Catching this when the transformation is built gives a readable message instead of a shape error deep inside a
  jitted update.
  """
  expected = getattr(optimizer, "param_shapes", None)
  if expected is None:  # an optimizer that does not describe its meta-parameters: nothing to check against
    return
  expected, found = expected(), shapes_by_path(theta)
  problems = [f"missing {name!r}" for name in sorted(set(expected) - set(found))]
  problems += [f"unexpected {name!r}" for name in sorted(set(found) - set(expected))]
  problems += [f"{name!r} has shape {found[name]}, expected {tuple(shape)}"
               for name, shape in expected.items() if name in found and found[name] != tuple(shape)]
  if problems:
    raise ValueError(f"as_optax: meta-parameters do not match {type(optimizer).__name__}: " + "; ".join(problems))


def as_optax(optimizer, theta, *, num_steps: int | None = None) -> optax.GradientTransformationExtraArgs:
  """Wraps ``optimizer`` (with meta-parameters ``theta``) as an optax transformation.

  Args:
    optimizer: a learned optimizer (e.g. ``GRUOptimizer``).
    theta: its meta-parameters, any pytree (``{name: array}`` for the GRU); numpy arrays (as loaded from a checkpoint) or jax arrays, or
      tracers when meta-training differentiates through the transformation.
    num_steps: a horizon hint bound once (an update's own ``num_steps=`` extra argument wins); None: none.

  Returns:
    ``optax.GradientTransformationExtraArgs`` whose ``update(grads, state, params=None, **extra_args)`` returns
    *updates* to add to the parameters (``optax.apply_updates``), each leaf shaped and typed like its gradient. The
    loss is read from ``value=`` or ``loss=`` (see ``loss_from_extra_args``); other extra arguments are ignored.
  """
  check_meta_parameters(optimizer, theta)
  if num_steps is not None and (isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1):
    raise ValueError(f"as_optax: num_steps must be a positive integer or None, got {num_steps!r}")
  # Concrete (numpy) arrays become jax arrays once here rather than at every un-jitted call; tracers pass through.
  theta = jax.tree.map(jnp.asarray, theta)

  def init_fn(params):
    return optimizer.init_state(theta, params)

  def update_fn(updates, state, params=None, **extra_args):
    # valid_loss and num_steps are passed only when given: optimizers written for lopt 0.1 take loss and step only.
    hints = {name: extra_args[name] for name in ("valid_loss", "num_steps") if extra_args.get(name) is not None}
    if num_steps is not None:
      hints.setdefault("num_steps", num_steps)
    new_updates, new_state = optimizer.update(theta, state, updates, params, loss=loss_from_extra_args(extra_args),
                                              **hints)
    return optax.tree_utils.tree_cast_like(new_updates, updates), optax.tree_utils.tree_cast_like(new_state, state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


class GuardedState(NamedTuple):
  """inner: the wrapped transformation's state; skipped_steps: () int32, steps whose gradients were not all finite
  (skipped: zero updates, ``inner`` unchanged)."""
  inner: Any
  skipped_steps: jax.Array


def guarded(transformation: optax.GradientTransformation, *, learning_rate: float = 1.0,
            weight_decay: float = 0.0) -> optax.GradientTransformationExtraArgs:
  """What a practitioner's optimizer adds around a learned update, as ``lopt.torch.LearnedOptimizer`` does it:

  - a step with any non-finite gradient is skipped and counted: zero updates, the state untouched (never poisoned);
  - decoupled weight decay first, then the learned update of the decayed parameters, scaled by ``learning_rate``:
    q = p (1 - learning_rate * weight_decay), p' = q + learning_rate * update(g, q).
  With the defaults the updates are the learned ones unchanged.
  """
  if not (isinstance(learning_rate, (int, float)) and learning_rate >= 0 and jnp.isfinite(learning_rate)):
    raise ValueError(f"guarded: learning_rate must be a non-negative finite number, got {learning_rate!r}")
  if not (isinstance(weight_decay, (int, float)) and weight_decay >= 0 and jnp.isfinite(weight_decay)):
    raise ValueError(f"guarded: weight_decay must be a non-negative finite number, got {weight_decay!r}")

  def init_fn(params):
    return GuardedState(transformation.init(params), jnp.zeros((), jnp.int32))

  def update_fn(grads, state, params=None, **extra_args):
    finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)] or [jnp.array(True)]))
    decayed = params
    if weight_decay:
      if params is None:
        raise ValueError("guarded: weight decay needs params")
      decayed = jax.tree.map(lambda p: p * (1 - learning_rate * weight_decay), params)
    updates, inner = transformation.update(grads, state.inner, decayed, **extra_args)
    if learning_rate != 1.0:
      updates = jax.tree.map(lambda u: learning_rate * u, updates)
    if weight_decay:
      updates = jax.tree.map(lambda u, q, p: (q - p) + u, updates, decayed, params)
    updates = jax.tree.map(lambda u: jnp.where(finite, u, jnp.zeros_like(u)), updates)
    inner = jax.tree.map(lambda new, old: jnp.where(finite, new, old), inner, state.inner)
    return updates, GuardedState(inner, state.skipped_steps + (~finite).astype(jnp.int32))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
