"""The contracts between lopt's parts, as ``typing.Protocol``s (no jax import: the torch side reads them too).

Pipeline: a **Task** (or a **TaskFamily** of them) is optimized by a **LearnedOptimizer** with meta-parameters
theta; a **GradientEstimator** turns unrolls of tasks into meta-gradients of theta; any optax transformation applies
them. Architectures with a **RecurrentView** also get the dynamics toolkit's recurrent analyses (fixed points,
linearization, momentum, adaptation). Every function is pure over pytrees: theta, optimizer state, estimator state
and task parameters are pytrees of arrays.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol, runtime_checkable

Array = Any    # a jax.Array (or numpy array) -- kept abstract so this module imports no jax
PyTree = Any   # nested dicts / lists / tuples / NamedTuples of arrays
Key = Any      # a jax PRNG key


@runtime_checkable
class LearnedOptimizer(Protocol):
  """A learned-optimizer architecture (``lopt.architectures``); hyperparameters are its (static) fields.

  init(key) -> theta: meta-parameters, any pytree.
  init_state(theta, params) -> state: the optimizer state for a pytree of parameters.
  update(theta, state, grads, params, *, loss, valid_loss, step, num_steps) -> (updates, state): updates shaped like
    grads, to be *added* to params (optax's convention). ``loss``/``valid_loss`` are the current training and
    validation losses (scalars) when known, ``step`` the inner step, ``num_steps`` a horizon hint; architectures that
    do not use one of them ignore it.
  config() -> {"architecture": name, **fields}: JSON, enough to rebuild it (``lopt.architectures.from_config``).
  param_shapes() -> {key path: shape}: theta's leaves as files store them.
  """

  def init(self, key: Key) -> PyTree: ...

  def init_state(self, theta: PyTree, params: PyTree) -> PyTree: ...

  def update(self, theta: PyTree, state: PyTree, grads: PyTree, params: PyTree, *, loss: Array | None = None,
             valid_loss: Array | None = None, step: Array | None = None,
             num_steps: int | None = None) -> tuple[PyTree, PyTree]: ...

  def config(self) -> dict: ...

  def param_shapes(self) -> dict[str, tuple[int, ...]]: ...


@runtime_checkable
class RecurrentView(Protocol):
  """What the dynamics toolkit needs of a recurrent architecture: per coordinate, h' = cell(theta, h, x) and the
  update y = readout(theta, h'); h0 = initial_hidden(theta) (H,); hidden(state) -> a pytree like params whose
  leaves have a trailing axis of size H (the states of every coordinate)."""

  def cell(self, theta: PyTree, hidden: Array, gradient: Array) -> Array: ...

  def readout(self, theta: PyTree, hidden: Array) -> Array: ...

  def initial_hidden(self, theta: PyTree) -> Array: ...

  def hidden(self, state: PyTree) -> PyTree: ...


class EstimatorMetrics(Protocol):
  """What every estimator reports per estimate (arrays, on the device): ``meta_loss`` (mean meta-loss of the
  problems it unrolled), ``diverged_problems``, ``dropped_problems`` (left out of the gradient: non-finite)."""
  meta_loss: Array
  diverged_problems: Array
  dropped_problems: Array


@runtime_checkable
class GradientEstimator(Protocol):
  """Estimates the meta-gradient of theta (``lopt.meta.estimators``).

  init(theta, key) -> estimator_state: whatever persists between estimates (inner states of tasks at staggered
    steps, perturbations, accumulators); a pytree, checkpointed with the run (empty for full backpropagation).
  estimate(theta, estimator_state, key) -> (estimator_state, meta_gradient like theta, metrics): pure and jittable;
    ``key`` is the randomness of this outer step (a resumed run passes the same keys again).
  """

  def init(self, theta: PyTree, key: Key) -> PyTree: ...

  def estimate(self, theta: PyTree, state: PyTree, key: Key) -> tuple[PyTree, PyTree, EstimatorMetrics]: ...


@runtime_checkable
class Task(Protocol):
  """A distribution of optimization problems, one problem (instance and initialization) per key.

  init(key) -> params; loss(params, key, step) -> scalar training loss (minibatch ``step`` fixed by the key);
  valid_loss: the same on held-out data, or None; horizon: default number of steps; traits: what the task is known to
  be (``{"quadratic": True, "heavy_ball": {...}}``), so that code asks about properties instead of names.
  """
  name: str
  horizon: int
  valid_loss: Callable | None
  traits: dict

  def init(self, key: Key) -> PyTree: ...

  def loss(self, params: PyTree, key: Key, step: Any) -> Array: ...


@runtime_checkable
class TaskFamily(Protocol):
  """A parametric distribution over tasks (sizes, data, batch size, horizon, augmentation): sample(key) -> a JSON
  configuration; task(configuration) -> Task. Configurations that share shapes can be vmapped together."""
  name: str

  def sample(self, key: Key) -> dict: ...

  def task(self, configuration: dict) -> Task: ...
