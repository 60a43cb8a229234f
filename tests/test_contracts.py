"""The seams: a toy architecture and a toy estimator defined here only, registered, and run through train ->
checkpoint -> resume -> load -> optax -> torch without editing lopt; and every registered architecture and estimator
through the same contract."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lopt
from lopt import api, architectures
from lopt.architectures.spec import ArchitectureSpec
from lopt.fields import Field, is_positive_finite
from lopt.checkpoint import save_optimizer
from lopt.meta import estimators
from lopt.meta.config import EstimatorSection, MetaTrainConfig, OptimizerSection, TaskSection
from lopt.meta.train import meta_train
from lopt.pytree import flatten_by_path


# -- a toy architecture: learned heavy ball with a nested theta --------------------------------------------------------

class ToyState(NamedTuple):
  velocity: object
  step: jax.Array


@dataclass(frozen=True)
class ToyMomentum:
  """v <- sigmoid(b) v + g; update = -exp(a) v; theta = {"log_lr": a, "nested": {"beta_logit": b}}."""
  initial_lr: float = 0.1

  def config(self):
    return TOY_SPEC.config(dataclasses.asdict(self))

  def param_shapes(self):
    return TOY_SPEC.param_shapes(dataclasses.asdict(self))

  def init(self, key):
    del key
    return {"log_lr": jnp.log(jnp.asarray(self.initial_lr, jnp.float32)),
            "nested": {"beta_logit": jnp.zeros((), jnp.float32)}}

  def init_state(self, theta, params):
    return ToyState(jax.tree.map(jnp.zeros_like, params), jnp.zeros((), jnp.int32))

  def update(self, theta, state, grads, params, *, loss=None, valid_loss=None, step=None, num_steps=None):
    beta = jax.nn.sigmoid(theta["nested"]["beta_logit"])
    velocity = jax.tree.map(lambda v, g: beta * v + g, state.velocity, grads)
    updates = jax.tree.map(lambda v: -jnp.exp(theta["log_lr"]) * v, velocity)
    return updates, ToyState(velocity, state.step + 1)


class ToyMomentumRule:
  """The same in PyTorch, as lopt.torch runs it."""

  def __init__(self, values, tensors):
    self.tensors = tensors

  def state_shapes(self, p):
    return {"velocity": tuple(p.shape)}

  def reset(self):
    pass

  def step(self, key, params, states, lr):
    import torch
    beta = torch.sigmoid(self.tensors["nested/beta_logit"].double())
    scale = torch.exp(self.tensors["log_lr"].double())
    for p, state in zip(params, states):
      velocity = state.setdefault("velocity", torch.zeros_like(p))
      velocity.mul_(beta.to(p.dtype)).add_(p.grad)
      p.add_(velocity, alpha=-lr * float(scale))


TOY_SPEC = ArchitectureSpec(
    name="toy_momentum", description="a learned heavy ball (test only)",
    fields={"initial_lr": Field(0.1, is_positive_finite, "a positive number", "initial learning rate", float)},
    param_shapes=lambda values: {"log_lr": (), "nested/beta_logit": ()},
    jax_class=ToyMomentum, torch_class=ToyMomentumRule)


# -- a toy estimator: antithetic ES with a running average kept in its state -----------------------------------------

class ToyEstimatorState(NamedTuple):
  average: object      # like theta: an exponential moving average of the estimates
  count: jax.Array     # estimates so far
  key: jax.Array       # a PRNG key carried between estimates (checkpointed as key data)


class ToyMetrics(NamedTuple):
  meta_loss: jax.Array
  diverged_problems: jax.Array
  dropped_problems: jax.Array
  num_problems: int


@dataclass(frozen=True)
class ToyES:
  task: object
  optimizer: object
  horizon: int
  sigma: float = 0.05
  pairs: int = 4

  def init(self, theta, key):
    return ToyEstimatorState(jax.tree.map(jnp.zeros_like, theta), jnp.zeros((), jnp.int32), key)

  def _loss(self, theta, key):
    from lopt.meta.objectives import mean_normalized_loss
    from lopt.meta.unroll import unroll
    return mean_normalized_loss(unroll(self.task, lopt.as_optax(self.optimizer, theta), key, self.horizon))

  def estimate(self, theta, state, key):
    carried, key = jax.random.split(jax.random.fold_in(state.key, state.count))
    flat, unravel = jax.flatten_util.ravel_pytree(theta)
    noise = self.sigma * jax.random.normal(key, (self.pairs, flat.size))
    problem = jax.random.fold_in(carried, 1)
    plus = jax.vmap(lambda e: self._loss(unravel(flat + e), problem))(noise)
    minus = jax.vmap(lambda e: self._loss(unravel(flat - e), problem))(noise)
    grad = unravel(jnp.mean((plus - minus)[:, None] * noise, 0) / (2 * self.sigma**2))
    average = jax.tree.map(lambda a, g: 0.5 * a + 0.5 * g, state.average, grad)
    metrics = ToyMetrics(jnp.mean(plus + minus) / 2, jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32), self.pairs)
    return ToyEstimatorState(average, state.count + 1, state.key), average, metrics


TOY_ESTIMATOR = estimators.EstimatorSpec(
    name="toy_es", description="antithetic ES with a running average (test only)",
    fields={"sigma": Field(0.05, is_positive_finite, "a positive number", "perturbation scale", float)},
    build=lambda task, optimizer, values, horizon: ToyES(task, optimizer, horizon, sigma=values["sigma"]))


@pytest.fixture
def registered():
  architectures.register(TOY_SPEC)
  estimators.register(TOY_ESTIMATOR)
  yield
  architectures.REGISTRY.pop(TOY_SPEC.name)
  estimators.REGISTRY.pop(TOY_ESTIMATOR.name)


def toy_config(num_steps: int) -> MetaTrainConfig:
  return MetaTrainConfig(task=TaskSection("linear_regression", {}, 20),
                         optimizer=OptimizerSection("toy_momentum", {"initial_lr": 0.05}),
                         estimator=EstimatorSection("toy_es", {"sigma": 0.05}),
                         num_steps=num_steps, learning_rate=0.05, eval_every=2, log_every=1, checkpoint_every=2,
                         num_eval_problems=8)


def test_toy_architecture_and_estimator_end_to_end(registered, tmp_path):
  assert isinstance(ToyMomentum(), api.LearnedOptimizer) and not isinstance(ToyMomentum(), api.RecurrentView)
  unbroken = meta_train(toy_config(6), tmp_path / "unbroken")
  meta_train(toy_config(3), tmp_path / "run")                    # stops after a checkpoint at step 2 and one at 3
  resumed = meta_train(toy_config(6), tmp_path / "run", resume=True)
  for a, b in zip(jax.tree.leaves((unbroken.theta, unbroken.estimator_state)),
                  jax.tree.leaves((resumed.theta, resumed.estimator_state))):
    a, b = (jax.random.key_data(x) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else x for x in (a, b))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert int(resumed.estimator_state.count) == 6
  assert np.asarray(unbroken.theta["log_lr"]) != np.log(0.05)  # it trained

  trained = lopt.load(tmp_path / "run")
  assert trained.optimizer == ToyMomentum(0.05) and set(flatten_by_path(trained.theta)) == {"log_lr",
                                                                                            "nested/beta_logit"}
  params = {"w": jnp.ones(3)}
  tx = trained.as_optax()
  state = tx.init(params)
  grads = {"w": jnp.asarray([1.0, -2.0, 0.5])}
  updates, state = tx.update(grads, state, params)
  beta = 1 / (1 + np.exp(-np.float64(trained.theta["nested"]["beta_logit"])))
  np.testing.assert_allclose(updates["w"], -np.exp(np.float64(trained.theta["log_lr"])) * np.asarray(grads["w"]),
                             rtol=1e-6)
  del beta

  torch = pytest.importorskip("torch")
  from lopt.torch import LearnedOptimizer
  weight = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))
  optimizer = LearnedOptimizer([weight], tmp_path / "run")
  for _ in range(3):
    weight.grad = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    optimizer.step()
  jax_params, jax_state = {"w": jnp.ones(3)}, tx.init({"w": jnp.ones(3)})
  for _ in range(3):
    u, jax_state = tx.update(grads, jax_state, jax_params)
    jax_params = optax.apply_updates(jax_params, u)
  np.testing.assert_allclose(weight.detach().numpy(), np.asarray(jax_params["w"]), rtol=1e-5)


def test_unknown_architecture_in_a_file_is_refused(registered, tmp_path):
  optimizer = ToyMomentum()
  save_optimizer(tmp_path / "opt", optimizer, optimizer.init(jax.random.key(0)))
  architectures.REGISTRY.pop(TOY_SPEC.name)
  try:
    with pytest.raises(lopt.CheckpointError, match="unknown learned-optimizer architecture 'toy_momentum'"):
      lopt.load(tmp_path / "opt")
  finally:
    architectures.register(TOY_SPEC)


# -- every registered architecture through the same contract -----------------------------------------------------

BUILTIN_ARCHITECTURES = sorted(architectures.REGISTRY)


def _random_theta(optimizer, seed=0):
  theta = optimizer.init(jax.random.key(seed))
  leaves, treedef = jax.tree.flatten(theta)
  keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
  return jax.tree.unflatten(treedef, [x + 0.3 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)])


@pytest.mark.parametrize("name", BUILTIN_ARCHITECTURES)
def test_architecture_contract(name, tmp_path):
  spec = architectures.get(name)
  small = {"hidden_size": 8} if "hidden_size" in spec.fields else {}
  optimizer = spec.build(small)
  assert isinstance(optimizer, api.LearnedOptimizer)
  assert isinstance(optimizer, api.RecurrentView) == spec.recurrent
  assert optimizer.config() == spec.config(spec.validate(small))
  assert architectures.from_config(optimizer.config()) == optimizer
  # No weak-typed leaf (a Python number made an array): the first outer update makes it strong, and meta-training's
  # outer step would then compile a second time at step 2.
  fresh = jax.tree_util.tree_flatten_with_path(optimizer.init(jax.random.key(0)))[0]
  assert not [jax.tree_util.keystr(p) for p, x in fresh if jnp.asarray(x).aval.weak_type]
  theta = _random_theta(optimizer)
  shapes = {k: tuple(np.shape(v)) for k, v in flatten_by_path(theta).items()}
  assert shapes == {k: tuple(v) for k, v in optimizer.param_shapes().items()}

  params = {"dense": {"w": jnp.linspace(-1, 1, 12).reshape(3, 4), "b": jnp.zeros(4)}, "scale": jnp.ones(())}
  grads = jax.tree.map(lambda p: 0.1 * jnp.cos(3 * p) + 0.01, params)
  state = optimizer.init_state(theta, params)
  update = jax.jit(lambda t, s, g, p: optimizer.update(t, s, g, p, loss=jnp.asarray(1.0)))
  updates, state = update(theta, state, grads, params)
  assert jax.tree.structure(updates) == jax.tree.structure(params)
  assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(updates))
  assert any(float(jnp.max(jnp.abs(u))) > 0 for u in jax.tree.leaves(updates))

  # Files: save, load, same numbers through optax.
  save_optimizer(tmp_path / "opt", optimizer, theta)
  loaded = lopt.load(tmp_path / "opt")
  assert loaded.optimizer == optimizer
  for a, b in zip(jax.tree.leaves(theta), jax.tree.leaves(loaded.theta)):
    np.testing.assert_array_equal(np.asarray(a), b)
  tx = loaded.as_optax()
  reference, _ = optimizer.update(theta, optimizer.init_state(theta, params), grads, params, loss=jnp.asarray(1.0))
  got, _ = tx.update(grads, tx.init(params), params, value=jnp.asarray(1.0))
  for a, b in zip(jax.tree.leaves(reference), jax.tree.leaves(got)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-9)

  # PyTorch: the same update from the same file.
  torch = pytest.importorskip("torch")
  from lopt.torch import LearnedOptimizer
  tensors = {k: torch.nn.Parameter(torch.tensor(np.asarray(v))) for k, v in flatten_by_path(params).items()}
  torch_optimizer = LearnedOptimizer(list(tensors.values()), tmp_path / "opt")
  for k, p in tensors.items():
    p.grad = torch.tensor(np.asarray(flatten_by_path(grads)[k]))
  torch_optimizer.step(loss=1.0)  # the loss the JAX update saw (architectures that read none ignore it)
  for k, p in tensors.items():
    expected = np.asarray(flatten_by_path(params)[k]) + np.asarray(flatten_by_path(reference)[k])
    np.testing.assert_allclose(p.detach().numpy(), expected, rtol=1e-5, atol=1e-6)


SMALL_ARCHITECTURES = {"gru": {"hidden_size": 4, "input_scale": 0.1, "output_scale": 10.0},
                       "mlp": {"hidden_size": 8, "num_layers": 1}}


# The pairs that take 9-17 s each on 2 CPU cores run with -m slow; by default every estimator still runs with mlp,
# gru and hierarchical with full and nres, and gru with tbptt and pes too.
SLOW_CONTRACTS = {("es", "gru"), ("es", "hierarchical"), ("mixed", "gru"), ("mixed", "hierarchical"),
                  ("tbptt", "hierarchical"), ("pes", "hierarchical"), ("full", "hierarchical")}


@pytest.mark.parametrize("name, architecture", [
    pytest.param(name, architecture, marks=pytest.mark.slow) if (name, architecture) in SLOW_CONTRACTS
    else (name, architecture) for name in sorted(estimators.REGISTRY) for architecture in BUILTIN_ARCHITECTURES])
def test_estimator_contract(name, architecture):
  """Every registered estimator works with every architecture: a pure, finite estimate."""
  from lopt import tasks
  spec = estimators.get(name)
  task = tasks.get("linear_regression", horizon=10)
  optimizer = architectures.get(architecture).build(SMALL_ARCHITECTURES.get(architecture, {}))
  values = {"meta_batch_size": 4} if "meta_batch_size" in spec.fields else {}
  if "truncation" in spec.fields:
    values["truncation"] = 5
  estimator = spec.create(task, optimizer, values, 10)
  assert isinstance(estimator, api.GradientEstimator)
  theta = optimizer.init(jax.random.key(0))
  state = estimator.init(theta, jax.random.key(1))
  estimate = jax.jit(estimator.estimate)
  state1, grads, metrics = estimate(theta, state, jax.random.key(2))
  _, again, _ = estimate(theta, state, jax.random.key(2))
  assert jax.tree.structure(grads) == jax.tree.structure(theta)
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(again)):
    assert np.all(np.isfinite(a)) and np.array_equal(a, b)  # pure: same inputs, same estimate
  assert np.isfinite(float(metrics.meta_loss)) and int(metrics.dropped_problems) == 0


def test_meta_loss_names_match_objectives():
  from lopt.meta.objectives import META_LOSSES
  assert tuple(META_LOSSES) == estimators.META_LOSS_NAMES
