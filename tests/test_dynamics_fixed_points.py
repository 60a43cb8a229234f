"""Fixed points of a nonlinear map with nine known fixed points, slow points, and the Adam and Newton stages."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lopt import dynamics

ANGLE = 0.6
ROTATION = np.array([[np.cos(ANGLE), -np.sin(ANGLE)], [np.sin(ANGLE), np.cos(ANGLE)]])


def _bistable(rotation, h, x):
  """Rotated per-coordinate z + 0.1 (z - z^3): fixed points at rotation @ {-1, 0, 1}^2.

  dF/dz is 0.8 at z = +-1 (stable) and 1.1 at z = 0 (unstable): 4 stable nodes, 4 saddles, 1 unstable node.
  """
  z = rotation.T @ h
  return rotation @ (z + 0.1 * (z - z**3)) + 0.0 * x


def _known_points():
  grid = np.array([[i, j] for i in (-1, 0, 1) for j in (-1, 0, 1)], float)
  return grid @ ROTATION.T, np.all(np.abs(grid) == 1, axis=1)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_nine_known_fixed_points_each_once_with_stability(dtype):
  with jax.enable_x64(dtype == np.float64):
    step = functools.partial(_bistable, jnp.asarray(ROTATION, dtype))
  seeds = np.random.default_rng(1).uniform(-1.6, 1.6, size=(512, 2))
  fixed = dynamics.find_fixed_points(step, seeds, 0.0, dtype=dtype)
  points, stable = _known_points()
  assert len(fixed.points) == 9, fixed.points
  assert fixed.converged.all() and not fixed.outlier.any()
  matched = [int(np.argmin(np.linalg.norm(points - p, axis=1))) for p in fixed.points]
  assert sorted(matched) == list(range(9))  # each known point exactly once
  atol = 1e-12 if dtype == np.float64 else 1e-5
  np.testing.assert_allclose(fixed.points, points[matched], atol=atol)
  np.testing.assert_array_equal(fixed.stable, stable[matched])
  expected_radius = np.where(stable[matched], 0.8, 1.1)
  np.testing.assert_allclose(fixed.max_abs_eigenvalue, expected_radius, atol=10 * atol)
  assert fixed.counts.sum() + np.sum(fixed.assignment < 0) == 512
  if dtype == np.float64:
    assert fixed.speeds.max() < 1e-28


def test_slow_point_is_reported_as_slow():
  # h - F(h) = -(1e-5 + 0.1 h^2) is never zero; q has its minimum 5e-11 at h = 0: a slow point, not a fixed point.
  step = lambda h, x: h + 1e-5 + 0.1 * h**2 + 0.0 * x  # noqa: E731
  fixed = dynamics.find_fixed_points(step, np.linspace(-0.5, 0.5, 16)[:, None], 0.0, dtype=np.float64)
  assert len(fixed.points) == 1
  assert fixed.slow[0] and not fixed.converged[0]
  assert fixed.speeds[0] == pytest.approx(5e-11, rel=1e-3)
  np.testing.assert_allclose(fixed.points[0], [0.0], atol=1e-3)


def test_polishing_beats_adam_alone():
  # A random tanh network (one fixed point): Adam alone stalls far above working precision, Newton gets there.
  rng = np.random.default_rng(0)
  size = 16
  with jax.enable_x64(True):
    weights = jnp.asarray(0.6 * rng.normal(size=(size, size)) / np.sqrt(size))
    step = functools.partial(lambda w, h, x: jnp.tanh(w @ h + x), weights)
    seeds = jnp.asarray(rng.normal(size=(32, size)))
    _, q_adam, _ = dynamics.adam_minimize(step, seeds, 0.1, 1e-30, max_steps=300)
    q_adam = np.asarray(q_adam)
  fixed = dynamics.find_fixed_points(step, seeds, 0.1, dtype=np.float64, first_order_steps=50)
  assert fixed.converged.all() and fixed.speeds.max() < 1e-26
  assert float(np.max(q_adam)) > 1e-20
  assert fixed.newton_steps <= 20


def test_outliers_flagged_and_duplicates_scale_aware():
  points = np.array([[0.0, 0.0], [1e-9, 0.0], [1.0, 0.0]])
  kept, assignment = dynamics.deduplicate(points, np.array([3.0, 1.0, 2.0]), 1e-6)
  assert list(kept) == [1, 2] and list(assignment) == [0, 0, 1]
  # One distance per point: a point joins a slower kept one within its own distance.
  kept, assignment = dynamics.deduplicate(points, np.array([3.0, 1.0, 2.0]), np.array([2.0, 1e-6, 1e-6]))
  assert list(kept) == [1, 2] and list(assignment) == [0, 0, 1]
  kept, _ = dynamics.deduplicate(points, np.array([1.0, 2.0, 3.0]), np.array([1e-6, 1e-6, 2.0]))
  assert list(kept) == [0]
  # A fixed point far from where the seeds are gets flagged (here: h* = 10 for F(h) = 0.5 h + 5).
  step = lambda h, x: 0.5 * h + 5.0 + 0.0 * x  # noqa: E731
  fixed = dynamics.find_fixed_points(step, np.random.default_rng(0).normal(0, 0.1, size=(8, 1)), 0.0,
                                     dtype=np.float64)
  assert len(fixed.points) == 1 and fixed.outlier[0] and fixed.converged[0]


def _gru(w, h, x):
  """A GRU cell with random recurrent weights (gain 2): many slow points, stable and unstable fixed points."""
  z = jax.nn.sigmoid(w["uz"] @ h + w["bz"] + x)
  r = jax.nn.sigmoid(w["ur"] @ h + w["br"])
  n = jnp.tanh(w["un"] @ (r * h) + w["bn"] + x)
  return (1 - z) * n + z * h


def _identical_case(name, dtype):
  """(step, seeds, x_star, per_seed) of a problem with several distinct points."""
  rng = np.random.default_rng(3)
  if name == "bistable":  # 9 fixed points, 4 stable
    with jax.enable_x64(dtype == np.float64):
      step = functools.partial(_bistable, jnp.asarray(ROTATION, dtype))
    return step, rng.uniform(-1.6, 1.6, size=(128, 2)), 0.0, False
  if name == "gru":  # 18-28 points, mostly slow (their merging uses the eigenvalues near 1), 1-2 stable
    w = {f"u{g}": 2.0 * rng.normal(size=(8, 8)) / np.sqrt(8) for g in "zrn"}
    w.update({f"b{g}": 0.1 * rng.normal(size=8) for g in "zrn"})
    return functools.partial(_gru, w), rng.normal(size=(128, 8)), 0.0, False
  # One input per seed: a point (or two) per seed, stable and unstable.
  w = 1.5 * rng.normal(size=(6, 6)) / np.sqrt(6)
  step = lambda h, x: jnp.tanh(jnp.asarray(w, h.dtype) @ h + x)  # noqa: E731
  return step, rng.normal(size=(48, 6)), 0.3 * rng.normal(size=(48, 6)), True


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", ["bistable", "gru", "per_seed"])
def test_eigenvalues_on_threads_change_nothing(name, dtype, monkeypatch):
  # The eigenvalues at the distinct points, shared out over threads (unevenly: 3), against one call on the stack.
  from lopt.dynamics import fixed_points
  step, seeds, x_star, per_seed = _identical_case(name, dtype)
  results = []
  for threads in (1, 3):
    monkeypatch.setattr(fixed_points, "EIGENVALUE_THREADS", threads)
    results.append(dynamics.find_fixed_points(step, seeds, x_star, per_seed=per_seed, dtype=dtype))
  serial, threaded = results
  assert len(serial.points) >= 4 and serial.stable.any() and not serial.stable.all()
  for field in serial._fields:
    np.testing.assert_array_equal(getattr(threaded, field), getattr(serial, field), err_msg=field)


def _matrices_with_known_radii():
  """(name, (H, H) matrix) pairs that stress the spectral radius: non-normal, complex, defective, nilpotent."""
  rng = np.random.default_rng(3)
  h = 64
  jordan = 0.97 * np.eye(h) + np.diag(np.ones(h - 1), 1)  # one Jordan block: ||J^n|| grows like n^63 first
  rotation = np.kron(np.eye(h // 2), 0.99 * ROTATION)    # all eigenvalues 0.99 e^(+-0.6i)
  skewed = rng.normal(size=(h, h))
  skewed = skewed @ np.diag(np.geomspace(1e-4, 1e4, h)) @ np.linalg.inv(skewed) * 1e-4  # badly conditioned basis
  return [("random", rng.normal(size=(h, h)) / np.sqrt(h)), ("jordan", jordan), ("rotation", rotation),
          ("skewed", skewed), ("nilpotent", np.diag(np.ones(h - 1), 1)), ("zero", np.zeros((h, h))),
          ("gru-like", np.tanh(rng.normal(size=(h, h))) * 0.2)]


def test_spectral_radii_by_repeated_squaring_match_the_eigenvalues():
  names, matrices = zip(*_matrices_with_known_radii())
  matrices = np.stack(matrices)
  with jax.enable_x64(True):
    radii, reliable = map(np.asarray, dynamics.fixed_points.spectral_radii(jnp.asarray(matrices)))
  expected = np.max(np.abs(np.linalg.eigvals(matrices)), axis=1)
  for name, got, want, trusted in zip(names, radii, expected, reliable):
    if name in ("jordan", "nilpotent"):  # dominant parts whose squares underflow: left to the host
      assert not trusted, name
    else:
      assert trusted and got == pytest.approx(want, rel=1e-10, abs=1e-300), name


def test_the_device_radius_classifies_as_the_host_eigenvalues(monkeypatch):
  """Where an accelerator would take the radii from repeated squaring, the points, their stability and radii are
  those of the host's eigenvalues (forced here on the CPU)."""
  with jax.enable_x64(True):
    step = functools.partial(_bistable, jnp.asarray(ROTATION, np.float64))
  seeds = np.random.default_rng(1).uniform(-1.6, 1.6, size=(512, 2))
  on_host = dynamics.find_fixed_points(step, seeds, 0.0, dtype=np.float64)
  calls = []
  radii = dynamics.fixed_points.spectral_radii
  monkeypatch.setattr(dynamics.fixed_points.jax, "default_backend", lambda: "gpu")
  monkeypatch.setattr(dynamics.fixed_points, "spectral_radii", lambda m: calls.append(len(m)) or radii(m))
  monkeypatch.setattr(dynamics.fixed_points, "_eigenvalues", lambda m: pytest.fail("host eigenvalues were computed"))
  on_device = dynamics.find_fixed_points(step, seeds, 0.0, dtype=np.float64)
  assert calls, "the device path was not taken"
  np.testing.assert_array_equal(on_device.points, on_host.points)
  np.testing.assert_array_equal(on_device.stable, on_host.stable)
  np.testing.assert_allclose(on_device.max_abs_eigenvalue, on_host.max_abs_eigenvalue, rtol=1e-12)
