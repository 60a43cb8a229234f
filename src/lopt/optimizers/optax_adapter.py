"""A learned optimizer with bound meta-parameters as an optax gradient transformation."""

from __future__ import annotations

import optax


def as_optax(optimizer, theta) -> optax.GradientTransformationExtraArgs:
  """Wraps ``optimizer`` (with meta-parameters ``theta``) as an optax transformation.

  The returned ``update(grads, state, params=None, **extra)`` accepts the loss as ``value=`` (optax's convention for
  loss-aware transformations) or ``loss=``, and ignores other extra arguments. The outputs are *updates* to add to
  the parameters (``optax.apply_updates``), like any optax transformation.
  """

  def init_fn(params):
    return optimizer.init_state(theta, params)

  def update_fn(updates, state, params=None, **extra):
    loss = extra.get("value", extra.get("loss"))
    return optimizer.update(theta, state, updates, params, loss=loss)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
