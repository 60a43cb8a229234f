"""Update functions, effective learning rates, offsets, clipping thresholds and schedules on systems with known answers."""

import jax.numpy as jnp
import numpy as np
import pytest

from lopt import dynamics


def test_update_function_of_sgd_with_offset():
  lr, bias = 0.3, 0.05
  step = lambda h, g: jnp.stack([g, h[1]])  # noqa: E731  carries the gradient; h[1] is a constant bias state
  readout = lambda h: -lr * h[0] + h[1]  # noqa: E731
  h = jnp.array([0.0, bias])
  grid = jnp.linspace(-2, 2, 9)
  np.testing.assert_allclose(dynamics.update_function(step, readout, h, grid), -lr * grid + bias, atol=1e-6)
  assert float(dynamics.effective_learning_rate(step, readout, h)) == pytest.approx(lr)
  assert float(dynamics.offset(step, readout, h)) == pytest.approx(bias)
  states = jnp.stack([h, h + jnp.array([0.0, 1.0])])
  assert dynamics.update_function(step, readout, states, grid).shape == (2, 9)
  np.testing.assert_allclose(dynamics.offset(step, readout, states), [bias, bias + 1], atol=1e-6)


@pytest.mark.parametrize("threshold", [0.05, 1.0, 20.0])
def test_clipping_threshold_of_a_hard_clip_and_of_tanh(threshold):
  lr = 0.7
  readout = lambda h: -lr * h[0]  # noqa: E731
  observed = np.random.default_rng(0).normal(0, threshold, 5000)
  hard = lambda h, g: jnp.clip(g, -threshold, threshold)[None] + 0 * h  # noqa: E731
  profile = dynamics.clipping_profile(hard, readout, jnp.zeros(1), observed)
  assert profile["threshold"] == pytest.approx(threshold, rel=1e-2)
  assert profile["saturating"] == {"negative": True, "positive": True}
  assert -profile["slope_at_zero"] == pytest.approx(lr)
  assert 0.2 < profile["fraction_beyond_threshold"] < 0.45  # ~32% of a normal lies beyond one s.d.
  edges, density = profile["density"]
  assert np.sum(density * np.diff(edges)) == pytest.approx(1.0, abs=1e-6)
  soft = lambda h, g: threshold * jnp.tanh(g / threshold)[None] + 0 * h  # noqa: E731
  assert dynamics.clipping_profile(soft, readout, jnp.zeros(1), observed)["threshold"] == pytest.approx(threshold,
                                                                                                        rel=1e-2)


def test_linear_update_has_no_threshold():
  profile = dynamics.clipping_profile(lambda h, g: g[None] + 0 * h, lambda h: -h[0], jnp.zeros(1), np.ones(10))
  assert profile["threshold"] is None and profile["saturating"]["positive"] is False


def test_schedule_warmup_then_decay_known_curve():
  # alpha_eff(h_t) = 0.9^(t+1) - 0.5^(t+1) along the autonomous run from (1, 1).
  step = lambda h, g: jnp.stack([0.9 * h[0], 0.5 * h[1], (0.9 * h[0] - 0.5 * h[1]) * g])  # noqa: E731
  readout = lambda h: -h[2]  # noqa: E731
  schedule = dynamics.learning_rate_schedule(step, readout, jnp.array([1.0, 1.0, 0.0]), 60)
  t = np.arange(61)
  expected = 0.9**(t + 1) - 0.5**(t + 1)
  np.testing.assert_allclose(schedule["alpha_eff"], expected, atol=1e-6)
  assert schedule["peak_step"] == int(np.argmax(expected)) == 2
  assert schedule["shape"] == "warm-up then decay"
  assert schedule["warmup_steps"] == int(np.argmax(expected >= 0.9 * expected.max()))
  assert schedule["states"].shape == (61, 3)
  flat = dynamics.schedule_shape(np.ones(10))
  assert flat["shape"] == "flat" and flat["peak_step"] == 0


def test_pca_recovers_a_plane():
  rng = np.random.default_rng(0)
  basis = np.linalg.qr(rng.normal(size=(6, 2)))[0]
  states = rng.normal(size=(500, 2)) * [3.0, 1.0] @ basis.T + 5.0
  result = dynamics.pca(states)
  assert result.explained_variance_ratio[:2].sum() == pytest.approx(1.0, abs=1e-10)
  assert abs(result.components[0] @ basis[:, 0]) == pytest.approx(1.0, abs=1e-2)
  np.testing.assert_allclose(result.project(states)[:, 2:], 0, atol=1e-9)
