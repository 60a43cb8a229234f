"""Update functions U_h(g) = R(F(h, g)), effective learning rates -dU/dg at g = 0, and offsets U_h(0) (SPEC §5.2).

Every function takes plain callables ``step(h, x) -> h'`` (one state of shape (H,), a scalar input) and
``readout(h) -> y`` (a scalar), with their parameters already bound, e.g. ``functools.partial(opt.cell, theta)``.
The readout is applied to the *new* state, as in the component-wise GRU optimizer. Each function runs in the dtype
of its states (as the current 64-bit mode has it), with ``step`` and ``readout`` bound to it (see
``lopt.dynamics._precision.bind``), jitted with both static: one compilation per callable object, dtype and shape,
instead of one per operation run eagerly (pass the same objects across calls to reuse it).
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp

from lopt.dynamics._precision import as_input, as_state, bind

Step = Callable[[jax.Array, jax.Array], jax.Array]
Readout = Callable[[jax.Array], jax.Array]


def _update(step: Step, readout: Readout, h: jax.Array, g: jax.Array) -> jax.Array:
  return readout(step(h, g))


def update_function(step: Step, readout: Readout, states: jax.Array, gradients: jax.Array) -> jax.Array:
  """U_h(g) on a grid of gradients.

  Args:
    step: ``F(h, g)``, (H,), () -> (H,).
    readout: ``R(h)``, (H,) -> ().
    states: (H,) one state, or (S, H) several.
    gradients: (G,) the gradient grid.

  Returns:
    (G,) for one state, (S, G) for several: the parameter change each gradient produces from each state.
  """
  states = as_state(states)
  return _update_function(bind(step, states.dtype), bind(readout, states.dtype), states,
                          as_input(gradients, states.dtype))


def update_slope(step: Step, readout: Readout, states: jax.Array, gradient=0.0) -> jax.Array:
  """dU_h/dg at ``gradient`` by autodiff: (H,) -> () or (S, H) -> (S,)."""
  states = as_state(states)
  return _update_slope(bind(step, states.dtype), bind(readout, states.dtype), states,
                       as_input(gradient, states.dtype))


def effective_learning_rate(step: Step, readout: Readout, states: jax.Array) -> jax.Array:
  """alpha_eff(h) = -dU_h/dg at g = 0 (autodiff, not finite differences): (H,) -> () or (S, H) -> (S,).

  For plain gradient descent with learning rate a, U(g) = -a g, so alpha_eff = a.
  """
  return -update_slope(step, readout, states, 0.0)


def offset(step: Step, readout: Readout, states: jax.Array) -> jax.Array:
  """U_h(0), the update with no gradient (a momentum-like bias): (H,) -> () or (S, H) -> (S,)."""
  states = as_state(states)
  return _offset(bind(step, states.dtype), bind(readout, states.dtype), states)


# The jitted work, on ``step`` and ``readout`` already bound to the dtype of ``states``.

@functools.partial(jax.jit, static_argnames=("step", "readout"))
def _update_function(step, readout, states, gradients):
  one = jax.vmap(lambda g, h: _update(step, readout, h, g), in_axes=(0, None))
  if states.ndim == 1:
    return one(gradients, states)
  return jax.vmap(lambda h: one(gradients, h))(states)


@functools.partial(jax.jit, static_argnames=("step", "readout"))
def _update_slope(step, readout, states, gradient):
  slope = lambda h: jax.grad(lambda g: _update(step, readout, h, g))(gradient)  # noqa: E731
  return slope(states) if states.ndim == 1 else jax.vmap(slope)(states)


@functools.partial(jax.jit, static_argnames=("step", "readout"))
def _offset(step, readout, states):
  at_zero = lambda h: _update(step, readout, h, jnp.zeros((), h.dtype))  # noqa: E731
  return at_zero(states) if states.ndim == 1 else jax.vmap(at_zero)(states)
