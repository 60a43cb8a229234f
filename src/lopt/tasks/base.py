"""The Task protocol: a distribution of optimization problems, one problem per PRNG key."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import jax

Params = Any  # a pytree of arrays


@dataclass(frozen=True)
class Task:
  """A family of optimization problems.

  One problem key defines the problem instance *and* its initialization: ``params = task.init(key)``, then
  ``task.loss(params, key, t)`` for ``t = 0, 1, ...``. Minibatched tasks pick batch ``t`` deterministically from
  ``(key, t)``. Everything random comes from keys, so a batch of problems is ``jax.vmap`` over keys.

  Attributes:
    name: registry name, e.g. ``"linear_regression"``.
    init: ``key -> params`` (a pytree of float arrays).
    loss: ``(params, key, step) -> scalar`` training loss.
    horizon: default number of optimization steps.
    valid_loss: optional ``(params, key, step) -> scalar`` loss on held-out data.
    options: the keyword options the task was built with (JSON-serializable), so it can be rebuilt by name.
    sample: optional ``key -> problem`` that draws a problem's data once (e.g. a quadratic's Hessian), with
      ``loss_from_sample(params, problem, step)``; the inner loop then samples outside its scan instead of every step.
    traits: what is known about the task, so code asks about properties rather than names: ``"heavy_ball"`` (the
      optimal heavy ball in closed form, ``lopt.tasks.heavy_ball_optimum``), ``"network"`` (thousands of
      parameters: evaluate one problem at a time on a CPU, subsample coordinates for the dynamics).
  """
  name: str
  init: Callable[[jax.Array], Params]
  loss: Callable[[Params, jax.Array, Any], jax.Array]
  horizon: int
  valid_loss: Callable[[Params, jax.Array, Any], jax.Array] | None = None
  options: dict = field(default_factory=dict)
  sample: Callable[[jax.Array], Any] | None = None
  loss_from_sample: Callable[[Params, Any, Any], jax.Array] | None = None
  traits: dict = field(default_factory=dict)

  def bind(self, key: jax.Array) -> Callable[[Params, Any], jax.Array]:
    """``(params, step) -> loss`` of the problem ``key``, with the problem's data drawn once."""
    if self.sample is None:
      return lambda params, step: self.loss(params, key, step)
    problem = self.sample(key)
    return lambda params, step: self.loss_from_sample(params, problem, step)

  def num_params(self) -> int:
    """Number of scalar parameters of one problem."""
    shapes = jax.eval_shape(self.init, jax.random.key(0))
    return sum(int(x.size) for x in jax.tree.leaves(shapes))
