"""A learned optimizer with bound meta-parameters as an optax gradient transformation.

The learned optimizer protocol (``init_state(theta, params)``, ``update(theta, state, grads, params, *, loss)``) maps
onto optax's (``init(params)``, ``update(updates, state, params, **extra_args)``) once theta is bound. What this
module adds on top of that binding is what makes the result composable:

- the loss arrives as an extra argument: ``value=`` (optax's name, as in ``optax.contrib.reduce_on_plateau`` and the
  line searches) or ``loss=``; every other extra argument is ignored, so the transformation can sit in an
  ``optax.chain`` next to transformations that need other extra arguments;
- dtypes are stable: updates come back in the dtype of the incoming gradients and every state leaf keeps the dtype
  it was initialized with, so the state can be a ``lax.scan`` / ``while_loop`` carry even for bfloat16 parameters
  or float32 meta-parameters driving float64 parameters;
- masked leaves pass through: inside ``optax.masked`` / ``optax.multi_transform`` / ``optax.partition`` the leaves
  this transformation does not own arrive as ``optax.MaskedNode()`` (an empty pytree node) in params, gradients and
  therefore in the state; the optimizer maps over leaves only, so they hold no state and cost nothing.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import optax

LOSS_ARGUMENTS = ("value", "loss")  # extra-argument names read as the current loss, in order of preference


def loss_from_extra_args(extra_args: Mapping[str, Any]):
  """The loss passed as ``value=`` (preferred, optax's convention) or ``loss=``; None when neither is given."""
  for name in LOSS_ARGUMENTS:
    if extra_args.get(name) is not None:
      return extra_args[name]
  return None


def check_meta_parameters(optimizer, theta: Mapping[str, Any]) -> None:
  """Raises ValueError naming every meta-parameter whose name or shape does not match ``optimizer``.

  Catching this when the transformation is built gives a readable message instead of a shape error deep inside a
  jitted update.
  """
  expected = getattr(optimizer, "param_shapes", None)
  if expected is None:  # an optimizer that does not describe its meta-parameters: nothing to check against
    return
  expected = expected()
  problems = [f"missing {name!r}" for name in sorted(set(expected) - set(theta))]
  problems += [f"unexpected {name!r}" for name in sorted(set(theta) - set(expected))]
  problems += [f"{name!r} has shape {tuple(jnp.shape(theta[name]))}, expected {tuple(shape)}"
               for name, shape in expected.items() if name in theta and tuple(jnp.shape(theta[name])) != tuple(shape)]
  if problems:
    raise ValueError(f"as_optax: meta-parameters do not match {type(optimizer).__name__}: " + "; ".join(problems))


def _cast_like(new_tree, reference_tree):
  """Casts every leaf of ``new_tree`` to the dtype of the matching leaf of ``reference_tree`` (same structure)."""
  return jax.tree.map(lambda new, ref: jnp.asarray(new).astype(jnp.result_type(ref)), new_tree, reference_tree)


def as_optax(optimizer, theta) -> optax.GradientTransformationExtraArgs:
  """Wraps ``optimizer`` (with meta-parameters ``theta``) as an optax transformation.

  Args:
    optimizer: a learned optimizer (e.g. ``GRUOptimizer``).
    theta: its meta-parameters, ``{name: array}``; numpy arrays (as loaded from a checkpoint) or jax arrays, or
      tracers when meta-training differentiates through the transformation.

  Returns:
    ``optax.GradientTransformationExtraArgs`` whose ``update(grads, state, params=None, **extra_args)`` returns
    *updates* to add to the parameters (``optax.apply_updates``), each leaf shaped and typed like its gradient. The
    loss is read from ``value=`` or ``loss=`` (see ``loss_from_extra_args``); other extra arguments are ignored.
  """
  check_meta_parameters(optimizer, theta)
  # Concrete (numpy) arrays become jax arrays once here rather than at every un-jitted call; tracers pass through.
  theta = {name: jnp.asarray(value) for name, value in theta.items()}

  def init_fn(params):
    return optimizer.init_state(theta, params)

  def update_fn(updates, state, params=None, **extra_args):
    new_updates, new_state = optimizer.update(theta, state, updates, params, loss=loss_from_extra_args(extra_args))
    return _cast_like(new_updates, updates), _cast_like(new_state, state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
