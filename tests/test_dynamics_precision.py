"""float32 and float64 calls on one ``step`` whose weights are numpy arrays, in any order, for every function.

JAX caches its conversion of a numpy array per array object, whatever the 64-bit mode: once a map closing over
numpy weights had been traced in one mode, calls in the other crashed (XLA executables getting buffers of the other
dtype) or, float32 first, ran float64 analyses on float32-rounded weights. The results here are compared with the
same map bound to JAX arrays made in the right mode, which that cache does not touch.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lopt import dynamics

SIZE = 4


def _weights():
  """Fresh numpy float64 weights (new objects each call: the bug lived in a per-object cache)."""
  rng = np.random.default_rng(0)
  return {"a": 0.4 * rng.normal(size=(SIZE, SIZE)), "b": rng.normal(size=SIZE), "c": 0.3 * rng.normal(size=SIZE),
          "r": rng.normal(size=SIZE)}


def _cell(w, h, x):
  return jnp.tanh(w["a"] @ h + w["b"] * x + w["c"])


def _readout(w, h):
  return -0.1 * w["r"] @ h


def _bound(weights, kind):
  """(step, readout) with ``weights`` bound by functools.partial or by a closure."""
  if kind == "partial":
    return functools.partial(_cell, weights), functools.partial(_readout, weights)

  def step(h, x):
    return _cell(weights, h, x)

  def readout(h):
    return _readout(weights, h)

  return step, readout


def _jax_bound(dtype):
  """The same map bound to JAX arrays of ``dtype``: the reference."""
  with jax.enable_x64(dtype == np.float64):
    weights = {k: jnp.asarray(v, dtype) for k, v in _weights().items()}
  return _bound(weights, "partial")


def _jacobian(point, x):
  """J_rec of the cell in float64 numpy: diag(1 - tanh^2) A."""
  w = _weights()
  return (1 - np.tanh(w["a"] @ point + w["b"] * x + w["c"])**2)[:, None] * w["a"]


def _every_function(step, readout, dtype) -> dict:
  """Each public function of lopt.dynamics that takes ``step``, on inputs of ``dtype``, in that dtype's mode."""
  rng = np.random.default_rng(1)
  seeds_np, h_np = rng.normal(size=(16, SIZE)), 0.1 * rng.normal(size=SIZE)
  x = 0.2
  with jax.enable_x64(dtype == np.float64):
    seeds, h = jnp.asarray(seeds_np, dtype), jnp.asarray(h_np, dtype)
    fixed = dynamics.find_fixed_points(step, seeds_np, x, dtype=dtype)
    point = jnp.asarray(fixed.points[0], dtype)
    out = {
        "points": fixed.points, "fixed_speeds": fixed.speeds, "converged": fixed.converged,
        "speeds": dynamics.speeds(step, seeds, x), "speed": dynamics.speed(step, point, x),
        # The search's own shapes and settings, so that these reuse its compilations.
        "adam": dynamics.adam_minimize(step, seeds, x, 0.0, max_steps=200)[0],
        "newton": dynamics.newton_polish(step, seeds, x, 0.0)[0],
        "j_rec": dynamics.linearize(step, point, x)[0], "j_in": dynamics.linearize(step, point, x)[1],
        "update_function": dynamics.update_function(step, readout, h, jnp.linspace(-1, 1, 5, dtype=dtype)),
        "update_slope": dynamics.update_slope(step, readout, h, 0.3),
        "alpha_eff": dynamics.effective_learning_rate(step, readout, seeds),
        "offset": dynamics.offset(step, readout, h),
        "trajectory": dynamics.autonomous_trajectory(step, h, 5),
        "schedule": dynamics.learning_rate_schedule(step, readout, h, 5)["alpha_eff"],
        "clipping": dynamics.clipping_profile(step, readout, h, limit=1.0, num=11)["updates"],
        "betas": dynamics.momentum_modes_at(step, readout, point, x).betas,
        "adaptation": dynamics.adaptation_curve(step, readout, seeds_np, [-0.5, 0.5], dtype=dtype)["alpha_eff"],
    }
  for name in ("speeds", "speed", "adam", "newton", "j_rec", "j_in", "update_function", "update_slope", "alpha_eff",
               "offset", "trajectory"):
    assert out[name].dtype == dtype, (name, out[name].dtype)
  return out


@pytest.fixture(scope="module")
def references():
  return {dtype: _every_function(*_jax_bound(dtype), dtype) for dtype in (np.float32, np.float64)}


@pytest.mark.parametrize("kind, order", [("partial", (np.float64, np.float32, np.float64)),
                                         ("closure", (np.float32, np.float64, np.float32))])
def test_every_function_in_any_order_of_dtypes(references, kind, order):
  step, readout = _bound(_weights(), kind)
  for dtype in order:
    results = _every_function(step, readout, dtype)
    rtol = 1e-10 if dtype == np.float64 else 1e-5
    for name, expected in references[dtype].items():
      np.testing.assert_allclose(np.asarray(results[name]), np.asarray(expected), rtol=rtol, atol=rtol, err_msg=name)
    # The float64 Jacobian from float64 weights, not float32-rounded ones (float64 after float32 had those).
    expected = _jacobian(results["points"][0], 0.2)
    np.testing.assert_allclose(results["j_rec"], expected, atol=1e-13 if dtype == np.float64 else 1e-6)
    if dtype == np.float64:
      assert results["fixed_speeds"][0] < 1e-28


def test_float32_search_with_64_bit_mode_on():
  # With 64-bit mode on globally, float64 numpy weights made float32 states float64 inside the search.
  step, _ = _bound(_weights(), "partial")
  with jax.enable_x64(True):
    fixed = dynamics.find_fixed_points(step, np.random.default_rng(1).normal(size=(16, SIZE)), 0.2,
                                       dtype=np.float32)
    j_rec, _ = dynamics.linearize(step, jnp.asarray(fixed.points[0], jnp.float32), 0.2)
  assert len(fixed.points) == 1 and fixed.converged[0] and j_rec.dtype == jnp.float32
  np.testing.assert_allclose(j_rec, _jacobian(fixed.points[0], 0.2), atol=1e-6)


def test_bind_converts_bound_arrays_and_leaves_the_callers_alone():
  weights = _weights()
  step, _ = _bound(weights, "closure")
  bound = dynamics._precision.bind(step, np.float32)
  assert bound == dynamics._precision.bind(step, np.float32) and hash(bound) == hash(dynamics._precision.bind(
      step, np.float32))  # jit caches keyed on it are hit across calls
  inner = bound.function.__closure__[0].cell_contents
  assert all(isinstance(v, jax.Array) and v.dtype == jnp.float32 for v in inner.values())
  assert all(isinstance(v, np.ndarray) and v.dtype == np.float64 for v in weights.values())  # the caller's: as given
  assert step.__closure__[0].cell_contents is weights
  # JAX never converted the caller's arrays, so the caller's own float32 use after a float64 analysis works.
  with jax.enable_x64(True):
    dynamics.linearize(step, np.zeros(SIZE), 0.2)
  assert step(jnp.zeros(SIZE), 0.2).dtype == jnp.float32
