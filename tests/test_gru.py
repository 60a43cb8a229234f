"""The component-wise GRU optimizer: inert at initialization, any pytree, equations as documented."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lopt.optimizers import GRUOptimizer, as_optax


def _random_theta(optimizer, seed=0, readout_scale=0.3):
  theta = optimizer.init(jax.random.key(seed))
  keys = jax.random.split(jax.random.key(seed + 1), 4)
  theta["readout_weights"] = readout_scale * jax.random.normal(keys[0], theta["readout_weights"].shape)
  theta["readout_bias"] = 0.01 * jax.random.normal(keys[1], (1,))
  theta["initial_state"] = 0.5 * jax.random.normal(keys[2], theta["initial_state"].shape)
  theta["bias"] = 0.1 * jax.random.normal(keys[3], theta["bias"].shape)
  return theta


@pytest.mark.parametrize("encoding", ["scale", "log1p_sign"])
def test_zero_readout_leaves_parameters_unchanged(encoding):
  optimizer = GRUOptimizer(hidden_size=8, input_encoding=encoding)
  theta = optimizer.init(jax.random.key(0))
  params = {"w": jnp.ones((3, 4)), "b": jnp.arange(4.0), "nested": [jnp.ones((2, 2, 2, 2))]}
  grads = jax.tree.map(lambda p: 5.0 * jnp.ones_like(p), params)
  state = optimizer.init_state(theta, params)
  for _ in range(3):
    updates, state = optimizer.update(theta, state, grads, params)
    assert all(float(jnp.max(jnp.abs(u))) == 0.0 for u in jax.tree.leaves(updates))
  assert int(state.step) == 3


def test_cell_matches_the_gru_equations():
  optimizer = GRUOptimizer(hidden_size=6, input_scale=0.5, output_scale=2.0)
  theta = _random_theta(optimizer)
  h = jax.random.normal(jax.random.key(5), (6,))
  g = jnp.array(1.7)
  x = 0.5 * g
  a, w, b = theta["input_weights"][0], theta["recurrent_weights"], theta["bias"]
  sig = jax.nn.sigmoid
  u = sig(a[:6] * x + h @ w[:, :6] + b[:6])
  r = sig(a[6:12] * x + h @ w[:, 6:12] + b[6:12])
  c = jnp.tanh(a[12:] * x + (r * h) @ w[:, 12:] + b[12:])
  expected = u * h + (1 - u) * c
  np.testing.assert_allclose(optimizer.cell(theta, h, g), expected, rtol=1e-5, atol=1e-6)
  dx = 2.0 * (expected @ theta["readout_weights"][:, 0] + theta["readout_bias"][0])
  np.testing.assert_allclose(optimizer.readout(theta, optimizer.cell(theta, h, g)), dx, rtol=1e-5)


def test_component_wise_every_coordinate_is_independent():
  optimizer = GRUOptimizer(hidden_size=5)
  theta = _random_theta(optimizer)
  grads = {"a": jnp.array([0.3, -2.0]), "b": jnp.array([[1.0]])}
  params = jax.tree.map(jnp.zeros_like, grads)
  updates, _ = optimizer.update(theta, optimizer.init_state(theta, params), grads, params)
  # The update of one coordinate equals the update of a 1-element problem with that gradient alone.
  for value, update in zip([0.3, -2.0, 1.0], [updates["a"][0], updates["a"][1], updates["b"][0, 0]]):
    single, _ = optimizer.update(theta, optimizer.init_state(theta, jnp.zeros(1)), jnp.array([value]), jnp.zeros(1))
    np.testing.assert_allclose(single[0], update, rtol=1e-6)


def test_log1p_sign_encoding():
  optimizer = GRUOptimizer(hidden_size=3, input_encoding="log1p_sign", input_scale=2.0)
  np.testing.assert_allclose(optimizer.encode(jnp.array([-1.5, 0.0])), [[np.log1p(3.0), -1.0], [0.0, 0.0]])
  assert optimizer.init(jax.random.key(0))["input_weights"].shape == (2, 9)


def test_as_optax_runs_under_jit():
  optimizer = GRUOptimizer(hidden_size=4)
  theta = _random_theta(optimizer)
  tx = as_optax(optimizer, theta)
  params = jnp.ones(3)
  state = tx.init(params)
  updates, _ = jax.jit(tx.update)(jnp.ones(3), state, params)
  direct, _ = optimizer.update(theta, optimizer.init_state(theta, params), jnp.ones(3), params)
  np.testing.assert_allclose(updates, direct, rtol=1e-6)


def test_bad_constructor_arguments():
  with pytest.raises(ValueError, match="field 'input_encoding' must be one of"):
    GRUOptimizer(input_encoding="raw")
  with pytest.raises(ValueError, match=r"field 'hidden_size' must be an integer in \[1, 65536\]"):
    GRUOptimizer(hidden_size=0)
