"""What a practitioner's optimizer must do beyond the learned update, in PyTorch and in JAX alike: a learning-rate
multiplier, decoupled weight decay, non-finite gradients skipped and counted (the state never poisoned), and
parameter-group keys it would ignore refused."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lopt
from lopt.architectures.mlp.optimizer import MLPOptimizer
from lopt.io.checkpoint import save_optimizer

torch = pytest.importorskip("torch")
from lopt.torch import LearnedOptimizer  # noqa: E402


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  """An mlp optimizer with a random, nonzero last layer (an untrained one is inert), saved to a directory."""
  optimizer = MLPOptimizer(hidden_size=8, num_layers=1, step_scale=0.05)
  theta = optimizer.init(jax.random.key(0))
  theta["layers"][-1]["w"] = 0.5 * jax.random.normal(jax.random.key(1), theta["layers"][-1]["w"].shape)
  path = tmp_path_factory.mktemp("opt") / "opt"
  save_optimizer(path, optimizer, theta)
  return path


def gradients(step: int) -> dict:
  rng = np.random.default_rng(step)
  return {"w": rng.normal(size=(4, 3)), "b": rng.normal(size=3)}


def test_torch_matches_jax_with_learning_rate_and_weight_decay(saved):
  start = {"w": np.linspace(-1, 1, 12).reshape(4, 3), "b": np.array([0.5, -0.2, 0.1])}
  tx = lopt.load(saved).as_optax(learning_rate=0.5, weight_decay=0.1)
  with jax.enable_x64(True):
    params = jax.tree.map(jnp.asarray, start)
    state = tx.init(params)
    for step in range(10):
      updates, state = tx.update(jax.tree.map(jnp.asarray, gradients(step)), state, params)
      params = optax.apply_updates(params, updates)
    params = jax.tree.map(np.asarray, params)
  weights = {k: torch.nn.Parameter(torch.tensor(v)) for k, v in start.items()}
  optimizer = LearnedOptimizer(weights.values(), saved, lr=0.5, weight_decay=0.1)
  for step in range(10):
    for k, g in gradients(step).items():
      weights[k].grad = torch.tensor(g)
    optimizer.step()
  for k in start:
    np.testing.assert_allclose(weights[k].detach().numpy(), params[k], rtol=1e-9, atol=1e-12)
  assert not np.allclose(params["w"], start["w"])


def test_torch_skips_and_counts_non_finite_gradients(saved):
  weight = torch.nn.Parameter(torch.ones(4, 3, dtype=torch.float64))
  bias = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
  optimizer = LearnedOptimizer([weight, bias], saved)
  weight.grad, bias.grad = torch.ones(4, 3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
  optimizer.step()
  before = ({k: v.clone() for k, v in optimizer.state[weight].items()}, weight.detach().clone(), bias.detach().clone())
  bias.grad = torch.tensor([1.0, float("nan"), 1.0], dtype=torch.float64)
  optimizer.step()
  assert optimizer.skipped_steps == 1
  assert torch.equal(weight, before[1]) and torch.equal(bias, before[2])  # neither tensor moved
  assert all(torch.equal(v, before[0][k]) for k, v in optimizer.state[weight].items())  # nor its state
  bias.grad = torch.ones(3, dtype=torch.float64)
  optimizer.step()
  assert not torch.equal(weight, before[1]) and all(torch.isfinite(v).all() for v in optimizer.state[weight].values())
  restored = LearnedOptimizer([weight, bias], saved)
  restored.load_state_dict(optimizer.state_dict())
  assert restored.skipped_steps == 1


def test_jax_skips_and_counts_non_finite_gradients(saved):
  tx = lopt.load(saved).as_optax(skip_nonfinite=True)
  params = {"w": jnp.ones((4, 3)), "b": jnp.zeros(3)}
  state = tx.init(params)
  _, state = tx.update({"w": jnp.ones((4, 3)), "b": jnp.ones(3)}, state, params)
  updates, after = jax.jit(tx.update)({"w": jnp.ones((4, 3)), "b": jnp.array([1.0, jnp.inf, 1.0])}, state, params)
  assert int(after.skipped_steps) == 1
  assert all(float(jnp.max(jnp.abs(u))) == 0.0 for u in jax.tree.leaves(updates))
  for a, b in zip(jax.tree.leaves(after.inner), jax.tree.leaves(state.inner)):
    np.testing.assert_array_equal(a, b)


def test_bare_transformation_unchanged(saved):
  """Without options ``as_optax()`` is the learned update itself, state and all (existing code keeps working)."""
  trained = lopt.load(saved)
  params = {"w": jnp.ones((4, 3))}
  bare, wrapped = trained.as_optax(), trained.as_optax(learning_rate=1.0)
  grads = {"w": jnp.full((4, 3), 0.5)}
  u1, s1 = bare.update(grads, bare.init(params), params)
  u2, s2 = wrapped.update(grads, wrapped.init(params), params)
  np.testing.assert_array_equal(u1["w"], u2["w"])
  assert type(s1).__name__ == "MLPState" and int(s2.skipped_steps) == 0


@pytest.mark.parametrize("group, message", [
    ({"momentum": 0.9}, "unknown key(s) ['momentum']"),
    ({"weight_decy": 0.1}, "unknown key(s) ['weight_decy']"),
    ({"lr": -1.0}, "lr must be a non-negative finite number"),
])
def test_torch_refuses_what_it_would_ignore(saved, group, message):
  weight = torch.nn.Parameter(torch.ones(3))
  with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(")
                     .replace(")", r"\)")):
    LearnedOptimizer([{"params": [weight], **group}], saved)
