"""lopt.as_optax: numbers against an independent NumPy GRU, under jit, in chains, partitions, and with the loss."""

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lopt
from lopt.checkpoint import CheckpointError, save_optimizer
from lopt.optimizers import GRUOptimizer

HIDDEN = 5


def random_theta(optimizer: GRUOptimizer, seed: int = 0) -> dict:
  """GRUOptimizer.init with random biases, h0 and readout, so updates are non-zero and depend on the state."""
  theta = {k: np.asarray(v) for k, v in optimizer.init(jax.random.key(seed)).items()}
  rng = np.random.default_rng(seed)
  size = optimizer.hidden_size
  theta["bias"] = (0.3 * rng.standard_normal(3 * size)).astype(np.float32)
  theta["initial_state"] = (0.3 * rng.standard_normal(size)).astype(np.float32)
  theta["readout_weights"] = (0.1 * rng.standard_normal((size, 1))).astype(np.float32)
  theta["readout_bias"] = np.asarray([0.01], np.float32)
  return theta


def numpy_gru_update(optimizer: GRUOptimizer, theta: dict, hidden: np.ndarray, gradient: np.ndarray):
  """The GRU equations of SPEC section 2, written independently in float64: (hidden (..., H), gradient (...)) ->
  (update (...), new hidden (..., H))."""
  t = {k: np.asarray(v, np.float64) for k, v in theta.items()}
  size = optimizer.hidden_size
  scaled = optimizer.input_scale * np.asarray(gradient, np.float64)
  x = scaled[..., None] if optimizer.input_encoding == "scale" else \
      np.stack([np.log1p(np.abs(scaled)), np.sign(scaled)], -1)
  a, w, b = t["input_weights"], t["recurrent_weights"], t["bias"]
  sigmoid = lambda z: 1 / (1 + np.exp(-z))  # noqa: E731
  u = sigmoid(x @ a[:, :size] + hidden @ w[:, :size] + b[:size])
  r = sigmoid(x @ a[:, size:2 * size] + hidden @ w[:, size:2 * size] + b[size:2 * size])
  c = np.tanh(x @ a[:, 2 * size:] + (r * hidden) @ w[:, 2 * size:] + b[2 * size:])
  new_hidden = u * hidden + (1 - u) * c
  return optimizer.output_scale * (new_hidden @ t["readout_weights"] + t["readout_bias"])[..., 0], new_hidden


class NumpyGRU:
  """Runs numpy_gru_update over a dict of parameters, keeping the per-leaf hidden state."""

  def __init__(self, optimizer, theta, params):
    self.optimizer, self.theta = optimizer, theta
    h0 = np.asarray(theta["initial_state"], np.float64)
    self.hidden = {k: np.broadcast_to(h0, np.shape(v) + h0.shape) for k, v in params.items()}

  def __call__(self, grads):
    updates = {}
    for k, g in grads.items():
      updates[k], self.hidden[k] = numpy_gru_update(self.optimizer, self.theta, self.hidden[k], np.asarray(g))
    return updates


@pytest.fixture(params=["scale", "log1p_sign"])
def optimizer_and_theta(request):
  optimizer = GRUOptimizer(HIDDEN, input_scale=1.5, output_scale=0.7, input_encoding=request.param)
  return optimizer, random_theta(optimizer)


def sample_params(seed=1):
  rng = np.random.default_rng(seed)
  return {"w": jnp.asarray(rng.standard_normal((4, 3)), jnp.float32),
          "b": jnp.asarray(rng.standard_normal(3), jnp.float32),
          "k": jnp.asarray(rng.standard_normal((2, 1, 2, 2)), jnp.float32)}


def sample_grads(params, step):
  rng = np.random.default_rng(100 + step)
  return {k: jnp.asarray(rng.standard_normal(v.shape), v.dtype) for k, v in params.items()}


def assert_tree_close(found, expected, rtol=2e-5, atol=1e-6):
  assert set(found) == set(expected)
  for k in expected:
    np.testing.assert_allclose(np.asarray(found[k]), np.asarray(expected[k]), rtol=rtol, atol=atol, err_msg=k)


@pytest.mark.parametrize("jit", [False, True])
def test_matches_the_numpy_gru_with_and_without_jit(optimizer_and_theta, jit):
  optimizer, theta = optimizer_and_theta
  transformation = lopt.as_optax(optimizer, theta)
  update = jax.jit(transformation.update) if jit else transformation.update
  params = sample_params()
  state, reference = transformation.init(params), NumpyGRU(optimizer, theta, params)
  for t in range(4):
    grads = sample_grads(params, t)
    updates, state = update(grads, state, params)
    expected = reference(grads)
    assert_tree_close(updates, expected)
    assert all(np.abs(np.asarray(u)).min() > 0 for u in jax.tree.leaves(updates))
  assert int(state.step) == 4


@dataclass(frozen=True)
class LossScaledSGD:
  """A stand-in learned optimizer that uses the loss: dx = -theta['rate'] * loss * g (no state but a step count)."""

  def param_shapes(self):
    return {"rate": ()}

  def init_state(self, theta, params):
    return jnp.zeros((), jnp.int32)

  def update(self, theta, state, grads, params=None, *, loss=None, step=None):
    if loss is None:
      raise ValueError("LossScaledSGD needs the loss")
    return jax.tree.map(lambda g: -theta["rate"] * loss * g, grads), state + 1


def test_loss_arrives_as_value_or_loss_and_other_extra_args_are_ignored():
  transformation = lopt.as_optax(LossScaledSGD(), {"rate": np.float32(0.5)})
  params = {"x": jnp.array([1.0, -2.0])}
  grads = {"x": jnp.array([0.5, 4.0])}
  state = transformation.init(params)
  by_value, _ = jax.jit(lambda g, s: transformation.update(g, s, params, value=3.0, batch_stats=1))(grads, state)
  np.testing.assert_allclose(by_value["x"], [-0.75, -6.0])
  by_loss, _ = transformation.update(grads, state, params, loss=jnp.float32(2.0), grad_fn=lambda p: p)
  np.testing.assert_allclose(by_loss["x"], [-0.5, -4.0])
  with pytest.raises(ValueError, match="needs the loss"):
    transformation.update(grads, state, params, unrelated=1.0)


def test_gru_ignores_the_loss_and_unrelated_extra_args(optimizer_and_theta):
  optimizer, theta = optimizer_and_theta
  transformation = lopt.as_optax(optimizer, theta)
  params = sample_params()
  grads = sample_grads(params, 0)
  plain, _ = transformation.update(grads, transformation.init(params), params)
  extra, _ = transformation.update(grads, transformation.init(params), params, value=jnp.float32(7.0), key=None)
  assert_tree_close(extra, plain, rtol=0, atol=0)


@pytest.mark.parametrize("scale", ["scale_by_schedule", "scale_by_learning_rate"])
def test_chain_with_weight_decay_and_a_schedule(optimizer_and_theta, scale):
  optimizer, theta = optimizer_and_theta
  decay, schedule = 0.1, optax.linear_schedule(1.0, 0.25, transition_steps=3)
  last = optax.scale_by_schedule(schedule) if scale == "scale_by_schedule" else \
      optax.scale_by_learning_rate(schedule, flip_sign=False)
  chained = optax.chain(optax.add_decayed_weights(decay), lopt.as_optax(optimizer, theta), last)
  params = sample_params()
  state, reference = chained.init(params), NumpyGRU(optimizer, theta, params)
  update = jax.jit(chained.update)
  for t in range(5):
    grads = sample_grads(params, t)
    updates, state = update(grads, state, params, value=jnp.float32(1.0))
    gru_updates = reference({k: np.asarray(grads[k], np.float64) + decay * np.asarray(params[k], np.float64)
                             for k in grads})
    assert_tree_close(updates, {k: float(schedule(t)) * v for k, v in gru_updates.items()})
    params = optax.apply_updates(params, updates)


@pytest.mark.parametrize("combinator", ["multi_transform", "partition"])
def test_partition_with_a_masked_subset(optimizer_and_theta, combinator):
  optimizer, theta = optimizer_and_theta
  labels = {"w": "learned", "k": "learned", "b": "sgd"}
  transforms = {"learned": lopt.as_optax(optimizer, theta), "sgd": optax.sgd(0.1)}
  combined = getattr(optax, combinator)(transforms, labels)
  params = sample_params()
  state = combined.init(params)
  # The learned optimizer holds hidden states for its own leaves only; the others arrive as MaskedNode.
  hidden = state.inner_states["learned"].inner_state.hidden
  assert isinstance(hidden["b"], optax.MaskedNode)
  assert hidden["w"].shape == (4, 3, HIDDEN) and hidden["k"].shape == (2, 1, 2, 2, HIDDEN)
  reference = NumpyGRU(optimizer, theta, {k: params[k] for k in ("w", "k")})
  update = jax.jit(combined.update)
  for t in range(3):
    grads = sample_grads(params, t)
    updates, state = update(grads, state, params, value=jnp.float32(1.0))
    expected = reference({k: grads[k] for k in ("w", "k")})
    assert_tree_close({k: updates[k] for k in ("w", "k")}, expected)
    np.testing.assert_allclose(updates["b"], -0.1 * grads["b"], rtol=1e-6)


def test_fully_masked_and_frozen_leaves(optimizer_and_theta):
  optimizer, theta = optimizer_and_theta
  params = sample_params()
  combined = optax.multi_transform({"learned": lopt.as_optax(optimizer, theta), "frozen": optax.set_to_zero()},
                                   {"w": "frozen", "k": "frozen", "b": "frozen"})
  state = combined.init(params)
  assert jax.tree.leaves(state.inner_states["learned"].inner_state.hidden) == []
  updates, _ = jax.jit(combined.update)(sample_grads(params, 0), state, params)
  assert all(float(jnp.abs(u).max()) == 0.0 for u in jax.tree.leaves(updates))


def test_state_and_updates_keep_their_dtypes_in_a_scan(optimizer_and_theta):
  """bfloat16 parameters with float32 meta-parameters: a scan carry must not change dtype."""
  optimizer, theta = optimizer_and_theta
  transformation = lopt.as_optax(optimizer, theta)
  params = jax.tree.map(lambda p: p.astype(jnp.bfloat16), sample_params())

  def step(carry, t):
    params, state = carry
    grads = jax.tree.map(lambda p: jnp.sin(p + t.astype(p.dtype)), params)
    updates, state = transformation.update(grads, state, params)
    return (optax.apply_updates(params, updates), state), None

  (final, state), _ = jax.lax.scan(step, (params, transformation.init(params)), jnp.arange(3))
  assert all(p.dtype == jnp.bfloat16 for p in jax.tree.leaves(final))
  assert all(h.dtype == jnp.bfloat16 for h in jax.tree.leaves(state.hidden))


def test_meta_gradient_flows_through_the_transformation(optimizer_and_theta):
  optimizer, theta = optimizer_and_theta
  params = sample_params()
  grads = sample_grads(params, 0)

  def total_update(theta):
    transformation = lopt.as_optax(optimizer, theta)
    updates, _ = transformation.update(grads, transformation.init(params), params)
    return sum(jnp.sum(u) for u in jax.tree.leaves(updates))

  meta_grads = jax.jit(jax.grad(total_update))({k: jnp.asarray(v) for k, v in theta.items()})
  # d(sum of updates)/d(readout bias) = output_scale * number of coordinates, exactly.
  np.testing.assert_allclose(meta_grads["readout_bias"], [optimizer.output_scale * (12 + 3 + 8)], rtol=1e-6)
  assert all(np.isfinite(np.asarray(g)).all() for g in meta_grads.values())


def test_wrong_meta_parameters_are_named(optimizer_and_theta):
  optimizer, theta = optimizer_and_theta
  bad = dict(theta, bias=np.zeros(7, np.float32))
  del bad["readout_bias"]
  with pytest.raises(ValueError, match=r"missing 'readout_bias'; 'bias' has shape \(7,\), expected \(15,\)"):
    lopt.as_optax(optimizer, bad)


def test_load_returns_a_trained_optimizer_with_as_optax(optimizer_and_theta, tmp_path, monkeypatch):
  optimizer, theta = optimizer_and_theta
  save_optimizer(tmp_path / "run" / "optimizer", optimizer, theta)
  trained = lopt.load(tmp_path / "run")
  assert isinstance(trained, lopt.TrainedOptimizer) and trained.optimizer == optimizer
  assert trained.path == tmp_path / "run" / "optimizer"
  loaded_optimizer, loaded_theta, config = trained  # unpacks like load_optimizer
  assert config["weights_sha256"] == trained.config["weights_sha256"]
  params = sample_params()
  grads = sample_grads(params, 0)
  transformation = trained.as_optax()
  found, _ = transformation.update(grads, transformation.init(params), params)
  assert_tree_close(found, NumpyGRU(optimizer, theta, params)(grads))
  # By name, through $LOPT_OPTIMIZER_PATH.
  monkeypatch.setenv("LOPT_OPTIMIZER_PATH", str(tmp_path))
  assert lopt.load("run").optimizer == optimizer
  with pytest.raises(CheckpointError, match="no such trained optimizer"):
    lopt.load("nothing-by-this-name")
  assert lopt.load_optimizer(tmp_path / "run")[0] == optimizer
