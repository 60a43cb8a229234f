"""The 2-D Rosenbrock function."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lopt.tasks.base import Task


def rosenbrock(a: float = 1.0, b: float = 100.0, horizon: int = 200) -> Task:
  """``f(x, y) = (a - x)^2 + b (y - x^2)^2``; minimum 0 at (a, a^2).

  The initial point is uniform in [-2, 2] x [-1, 3] (ours; the paper does not say).
  """

  def init(key):
    return jax.random.uniform(key, (2,), minval=jnp.array([-2.0, -1.0]), maxval=jnp.array([2.0, 3.0]))

  def loss(xy, key=None, step=0):
    del key, step
    x, y = xy[0], xy[1]
    return (a - x)**2 + b * (y - x**2)**2

  return Task("rosenbrock", init, loss, horizon, options=dict(a=a, b=b, horizon=horizon))
