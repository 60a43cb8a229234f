"""GRUs trained inside the test to imitate heavy ball (chosen beta) and clipping (chosen threshold): summarize finds them."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lopt import dynamics
from lopt.optimizers import GRUOptimizer

BETA, MOMENTUM_LR = 0.8, 0.1
THRESHOLD, CLIP_LR = 0.5, 0.2


def _train_imitation(target, hidden_size, gradient_scale, num_steps=400, length=40, batch=64, seed=0):
  """Fits a GRUOptimizer's cell + readout to ``target(gradients (B, T)) -> updates (B, T)`` on random sequences."""
  optimizer = GRUOptimizer(hidden_size=hidden_size)
  theta = optimizer.init(jax.random.key(seed))

  def loss(theta, key):
    g = gradient_scale * jax.random.normal(key, (batch, length))
    h0 = jnp.broadcast_to(theta["initial_state"], (batch, hidden_size))

    def body(h, g_t):
      h = optimizer.cell(theta, h, g_t)
      return h, optimizer.readout(theta, h)

    _, updates = jax.lax.scan(body, h0, g.T)
    return jnp.mean((updates.T - target(g))**2) / jnp.mean(target(g)**2)

  outer = optax.adam(optax.cosine_decay_schedule(2e-2, num_steps))

  @jax.jit
  def train_step(theta, state, key):
    value, grad = jax.value_and_grad(loss)(theta, key)
    updates, state = outer.update(grad, state)
    return optax.apply_updates(theta, updates), state, value

  state = outer.init(theta)
  for i in range(num_steps):
    theta, state, value = train_step(theta, state, jax.random.key(1000 + i))
  return optimizer, theta, float(value)


def _heavy_ball(g):
  def body(v, g_t):
    v = BETA * v + g_t
    return v, -MOMENTUM_LR * v
  return jax.lax.scan(body, jnp.zeros(g.shape[0]), g.T)[1].T


def _clipped(g):
  return -CLIP_LR * jnp.clip(g, -THRESHOLD, THRESHOLD)


def _visited(optimizer, theta, scale, count=32, length=40):
  g = scale * jax.random.normal(jax.random.key(7), (count, length))
  h0 = jnp.broadcast_to(theta["initial_state"], (count, optimizer.hidden_size))
  _, hs = jax.lax.scan(lambda h, g_t: (optimizer.cell(theta, h, g_t),) * 2, h0, g.T)
  return np.asarray(hs).reshape(-1, optimizer.hidden_size), np.asarray(g)


def test_gru_imitating_heavy_ball_reports_its_beta():
  optimizer, theta, fit = _train_imitation(_heavy_ball, hidden_size=8, gradient_scale=0.3)
  assert fit < 0.05, f"imitation did not train (relative error {fit})"
  step, readout = functools.partial(optimizer.cell, theta), functools.partial(optimizer.readout, theta)
  visited, grads = _visited(optimizer, theta, 0.3)
  results = dynamics.analyze(step, readout, theta["initial_state"], visited_states=visited, gradients=grads,
                             heavy_ball={"momentum_beta": BETA, "momentum_learning_rate": MOMENTUM_LR},
                             schedule_steps=50, num_seeds=128)
  summary = dynamics.summarize(results)
  assert summary["momentum"]["beta"] == pytest.approx(BETA, abs=0.05)
  assert summary["momentum"]["alpha"] == pytest.approx(MOMENTUM_LR, rel=0.3)
  assert summary["momentum"]["time_constant"] == pytest.approx(-1 / np.log(BETA), rel=0.3)
  assert abs(summary["momentum"]["heavy_ball"]["beta_difference"]) < 0.05
  assert summary["fixed_points"]["converged"] >= 1 and summary["fixed_points"]["stable"] >= 1


def test_gru_imitating_clipping_reports_its_threshold():
  optimizer, theta, fit = _train_imitation(_clipped, hidden_size=8, gradient_scale=1.0, length=10)
  assert fit < 0.05, f"imitation did not train (relative error {fit})"
  step, readout = functools.partial(optimizer.cell, theta), functools.partial(optimizer.readout, theta)
  profile = dynamics.clipping_profile(step, readout, theta["initial_state"],
                                      np.random.default_rng(0).normal(size=4000))
  summary = dynamics.summarize({"clipping": profile})
  assert summary["clipping"]["threshold"] == pytest.approx(THRESHOLD, rel=0.2)
  # The slope at 0 of a smooth fit to a kink overshoots the linear part a little.
  assert summary["clipping"]["learning_rate_at_zero"] == pytest.approx(CLIP_LR, rel=0.35)
