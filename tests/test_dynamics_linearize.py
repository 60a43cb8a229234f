"""Known answers on a linear recurrent map h' = A h + b x, y = w.h + c with chosen eigenvalues (float64)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lopt import dynamics

# Real modes 0.9, 0.5, -0.3 and a complex pair 0.6 +- 0.3i (|lambda| = 0.6708).
BLOCK = np.array([[0.9, 0, 0, 0, 0], [0, 0.6, 0.3, 0, 0], [0, -0.3, 0.6, 0, 0], [0, 0, 0, 0.5, 0],
                  [0, 0, 0, 0, -0.3]])
# Eigenvectors of BLOCK: e1, [0, 1, i, 0, 0] for 0.6 + 0.3i (and its conjugate), e4, e5.
BLOCK_VECTORS = np.array([[1, 0, 0, 0, 0], [0, 1, 1, 0, 0], [0, 1j, -1j, 0, 0], [0, 0, 0, 1, 0], [0, 0, 0, 0, 1]])
BLOCK_VALUES = np.array([0.9, 0.6 + 0.3j, 0.6 - 0.3j, 0.5, -0.3])


@pytest.fixture(scope="module")
def system():
  rng = np.random.default_rng(3)
  basis = np.eye(5) + 0.3 * rng.normal(size=(5, 5))
  a = basis @ BLOCK @ np.linalg.inv(basis)
  b, w, c = rng.normal(size=5), rng.normal(size=5), 0.25
  with jax.enable_x64(True):
    a_j, b_j, w_j = jnp.asarray(a), jnp.asarray(b), jnp.asarray(w)
  step = functools.partial(lambda a, b, h, x: a @ h + b * x, a_j, b_j)
  readout = functools.partial(lambda w, h: w @ h + c, w_j)
  right = basis @ BLOCK_VECTORS
  return dict(a=a, b=b, w=w, c=c, step=step, readout=readout, right=right, left=np.linalg.inv(right).T)


def test_fixed_point_linearization_and_eigenvalues(system):
  x_star = 0.7
  expected = np.linalg.solve(np.eye(5) - system["a"], system["b"] * x_star)
  rng = np.random.default_rng(0)
  fixed = dynamics.find_fixed_points(system["step"], rng.normal(size=(64, 5)), x_star, dtype=np.float64)
  assert len(fixed.points) == 1 and fixed.counts[0] == 64 and fixed.converged[0] and fixed.stable[0]
  np.testing.assert_allclose(fixed.points[0], expected, atol=1e-12)
  assert fixed.speeds[0] < 1e-24
  np.testing.assert_allclose(fixed.max_abs_eigenvalue[0], 0.9, atol=1e-12)

  with jax.enable_x64(True):
    j_rec, j_in = dynamics.linearize(system["step"], jnp.asarray(fixed.points[0]), x_star)
  np.testing.assert_allclose(j_rec, system["a"], atol=1e-12)
  np.testing.assert_allclose(j_in, system["b"], atol=1e-12)

  eigen = dynamics.eig_sorted(j_rec)
  np.testing.assert_allclose(eigen.eigenvalues, BLOCK_VALUES, atol=1e-10)
  np.testing.assert_allclose(eigen.right @ np.diag(eigen.eigenvalues) @ eigen.left.T, system["a"], atol=1e-10)
  np.testing.assert_allclose(eigen.left.T @ eigen.right, np.eye(5), atol=1e-10)
  for i in range(5):  # right and left eigenvectors are eigenvectors
    np.testing.assert_allclose(system["a"] @ eigen.right[:, i], eigen.eigenvalues[i] * eigen.right[:, i], atol=1e-10)
    np.testing.assert_allclose(eigen.left[:, i] @ system["a"], eigen.eigenvalues[i] * eigen.left[:, i], atol=1e-10)


def test_time_constants():
  tau = dynamics.time_constants(BLOCK_VALUES)
  np.testing.assert_allclose(tau, -1 / np.log(np.abs(BLOCK_VALUES)), rtol=1e-12)
  np.testing.assert_allclose(dynamics.time_constants([0.9, 0.99]), [9.4912, 99.4992], atol=1e-4)
  assert np.isinf(dynamics.time_constants([1.0, -1.2])).all() and dynamics.time_constants([0.0])[0] == 0


def test_momentum_modes_exact(system):
  with jax.enable_x64(True):
    modes = dynamics.momentum_modes_at(system["step"], system["readout"], jnp.zeros(5), 0.0)
  # alpha_i from the construction: -(w . r_i)(l_i . b), invariant to how each eigenvector is scaled.
  expected = -(system["w"] @ system["right"]) * (system["left"].T @ system["b"])
  np.testing.assert_allclose(modes.betas, BLOCK_VALUES, atol=1e-10)
  np.testing.assert_allclose(modes.alphas, expected, atol=1e-8)
  np.testing.assert_allclose(modes.alphas[1], np.conj(modes.alphas[2]), atol=1e-10)
  # The modes reproduce the map's actual impulse response: update at t after a unit gradient at 0 is w A^t b.
  actual = np.array([system["w"] @ np.linalg.matrix_power(system["a"], t) @ system["b"] for t in range(30)])
  np.testing.assert_allclose(dynamics.impulse_response(modes, 30), actual, atol=1e-10)


def test_heavy_ball_is_one_mode():
  beta, lr = 0.85, 0.3
  step = lambda h, g: beta * h + g  # noqa: E731  v <- beta v + g
  readout = lambda h: -lr * h[0]  # noqa: E731  dx = -lr v
  with jax.enable_x64(True):
    modes = dynamics.momentum_modes_at(lambda h, g: step(h, g), readout, jnp.zeros(1), 0.0)
  np.testing.assert_allclose(modes.betas, [beta], atol=1e-12)
  np.testing.assert_allclose(modes.alphas, [lr], atol=1e-12)
  mode = dynamics.dominant_mode(modes)
  assert mode["beta"] == pytest.approx(beta) and mode["alpha"] == pytest.approx(lr)
  comparison = dynamics.compare_with_heavy_ball(modes, {"momentum_beta": 0.881, "momentum_learning_rate": 3.76})
  assert comparison["beta_difference"] == pytest.approx(beta - 0.881)
