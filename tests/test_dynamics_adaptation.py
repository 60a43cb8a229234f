"""Learning-rate adaptation recovered on an RMSProp-like system whose steady-state alpha_eff(g*) is known."""

import jax.numpy as jnp
import numpy as np
import pytest

from lopt import dynamics

LR, RHO, EPS = 0.01, 0.9, 1e-4


def rmsprop_like(h, g):
  """h = (s, y): s <- rho s + (1 - rho) g^2 (second moment); y <- -LR g / sqrt(s' + EPS) (the update).

  Under constant g*, s* = g*^2, and from there alpha_eff = -dy'/dg at g = 0 = LR / sqrt(RHO g*^2 + EPS).
  """
  s = RHO * h[0] + (1 - RHO) * g * g
  return jnp.stack([s, -LR * g / jnp.sqrt(s + EPS)])


def readout(h):
  return h[1]


def test_rmsprop_like_adaptation_is_recovered():
  rng = np.random.default_rng(0)
  seeds = np.stack([rng.uniform(0, 1, 64), rng.normal(0, 0.01, 64)], axis=1)
  gradients = dynamics.gradient_sweep(1.0, num=8)
  curve = dynamics.adaptation_curve(rmsprop_like, readout, seeds, gradients, dtype=np.float64)
  expected_points = np.stack([gradients**2, -LR * gradients / np.sqrt(gradients**2 + EPS)], axis=1)
  np.testing.assert_allclose(curve["points"], expected_points, rtol=1e-9, atol=1e-12)
  assert curve["stable"].all() and (curve["num_points"] == 1).all()
  expected_alpha = LR / np.sqrt(RHO * gradients**2 + EPS)
  np.testing.assert_allclose(curve["alpha_eff"], expected_alpha, rtol=1e-9)
  assert curve["falls"]
  fit = curve["rmsprop_fit"]  # a / sqrt(g^2 + e) with a = LR / sqrt(RHO), e = EPS / RHO
  assert fit["learning_rate"] == pytest.approx(LR / np.sqrt(RHO), rel=1e-6)
  assert fit["eps"] == pytest.approx(EPS / RHO, rel=1e-6)
  assert fit["r2"] == pytest.approx(1.0, abs=1e-9)
  arm = curve["arms"]["positive"]
  assert np.all(np.diff(arm["alpha_eff"]) < 0) and np.all(np.diff(arm["gradients"]) > 0)
  reference = dynamics.rmsprop_reference(gradients, fit["learning_rate"], fit["eps"])
  np.testing.assert_allclose(reference, expected_alpha, rtol=1e-6)


def test_constant_learning_rate_does_not_adapt():
  step = lambda h, g: jnp.stack([0.5 * h[0] + g, -0.1 * g + 0 * h[1]])  # noqa: E731
  curve = dynamics.adaptation_curve(step, readout, np.zeros((4, 2)), dynamics.gradient_sweep(1.0, num=4),
                                    dtype=np.float64)
  np.testing.assert_allclose(curve["alpha_eff"], 0.1, rtol=1e-9)
  assert not curve["falls"]
