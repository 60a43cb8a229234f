"""A 3-bit flip-flop GRU trained in the test: its 8 stable fixed points, and its slow points, in float64 and float32.

The trained GRU has 8 stable fixed points, one per stored bit pattern, and regions where saturated gates make
F(h) ~ h: slow points, reached from seeds pushed off the visited states. Those used to come out as many slow points,
some 2.5e-4 apart (float64), and in float32 searches stopped short (q ~ 1e-12, in float64 too) counted as converged.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lopt import dynamics

INPUTS, UNITS = 3, 16
LENGTH, BATCH, PULSE = 64, 128, 0.05
TRAIN_STEPS = 2000
SEEDS, SEED_NOISE = 1024, 0.3


def _gru(w, h, x):
  """A standard GRU cell: (H,), (3,) -> (H,)."""
  z = jax.nn.sigmoid(w["wz"] @ x + w["uz"] @ h + w["bz"])
  r = jax.nn.sigmoid(w["wr"] @ x + w["ur"] @ h + w["br"])
  n = jnp.tanh(w["wn"] @ x + w["un"] @ (r * h) + w["bn"])
  return (1 - z) * n + z * h


def _output(w, h):
  """(H,) -> (3,) the stored bits."""
  return w["wo"] @ h + w["bo"]


def _task(key):
  """Inputs (B, T, 3): +-1 pulses, one on every channel at t = 0; targets (B, T, 3): the last pulse per channel."""
  k1, k2 = jax.random.split(key)
  pulses = jax.random.bernoulli(k1, PULSE, (BATCH, LENGTH, INPUTS)).at[:, 0].set(True)
  x = pulses * jnp.where(jax.random.bernoulli(k2, 0.5, (BATCH, LENGTH, INPUTS)), 1.0, -1.0)

  def hold(last, x_t):
    last = jnp.where(x_t != 0, x_t, last)
    return last, last

  return x, jnp.swapaxes(jax.lax.scan(hold, jnp.zeros((BATCH, INPUTS)), jnp.swapaxes(x, 0, 1))[1], 0, 1)


def _run(w, xs):
  """States (T, H) from h = 0 through inputs (T, 3)."""
  return jax.lax.scan(lambda h, x_t: (_gru(w, h, x_t),) * 2, jnp.zeros(UNITS), xs)[1]


@pytest.fixture(scope="module")
def flip_flop():
  """Weights (numpy float64) of a GRU trained on the flip-flop task, and seeds: visited states plus noise."""
  keys = jax.random.split(jax.random.key(0), 7)
  w = {f"w{g}": 0.5 * jax.random.normal(keys[i], (UNITS, INPUTS)) for i, g in enumerate("zrn")}
  w.update({f"u{g}": jax.random.normal(keys[3 + i], (UNITS, UNITS)) / np.sqrt(UNITS) for i, g in enumerate("zrn")})
  w.update({f"b{g}": jnp.zeros(UNITS) for g in "zrn"})
  w.update(wo=jax.random.normal(keys[6], (INPUTS, UNITS)) / np.sqrt(UNITS), bo=jnp.zeros(INPUTS))
  optimizer = optax.adam(optax.cosine_decay_schedule(1e-2, TRAIN_STEPS, 0.05))

  def loss(w, key):
    x, y = _task(key)
    return jnp.mean((jax.vmap(lambda xs: jax.vmap(functools.partial(_output, w))(_run(w, xs)))(x) - y)**2)

  def train(w, state, key):
    value, grad = jax.value_and_grad(loss)(w, key)
    updates, state = optimizer.update(grad, state)
    return optax.apply_updates(w, updates), state, value

  state = optimizer.init(w)
  # 2000 steps of real work: compiled at XLA's full optimization even where the suite compiles at level 0
  # (conftest.py), which would double this fixture's time.
  train = jax.jit(train).lower(w, state, jax.random.key(1)).compile({"xla_backend_optimization_level": 3})
  for i in range(TRAIN_STEPS):
    w, state, value = train(w, state, jax.random.key(i + 1))
  assert float(value) < 1e-2
  x, _ = _task(jax.random.key(TRAIN_STEPS + 1))
  visited = np.asarray(jax.vmap(functools.partial(_run, w))(x)).reshape(-1, UNITS)
  rng = np.random.default_rng(0)
  seeds = visited[rng.choice(len(visited), SEEDS, replace=False)] + rng.normal(0, SEED_NOISE, (SEEDS, UNITS))
  return {k: np.asarray(v, np.float64) for k, v in w.items()}, seeds


def _patterns(weights, points):
  """The bit pattern each point stores: signs of the outputs, as integers 0..7."""
  bits = np.array([_output(weights, p) for p in points]) > 0
  return bits @ np.array([4, 2, 1])


def test_float64_eight_stable_points_and_slow_points_merged(flip_flop):
  weights, seeds = flip_flop
  step = functools.partial(_gru, weights)
  fixed = dynamics.find_fixed_points(step, seeds, np.zeros(INPUTS), dtype=np.float64)
  stable = fixed.stable & fixed.converged
  assert stable.sum() == 8 and fixed.speeds[fixed.converged].max() < 1e-28
  assert sorted(_patterns(weights, fixed.points[stable])) == list(range(8))
  # Slow points are merged within their uncertainty: none is left right next to another point (there were pairs
  # 2.5e-4 apart).
  gaps = np.linalg.norm(fixed.points[:, None] - fixed.points[None], axis=-1)
  np.fill_diagonal(gaps, np.inf)
  assert fixed.slow.any() and gaps[fixed.slow].min() > 1e-3


def test_float32_converges_on_fixed_points_only(flip_flop):
  weights, seeds = flip_flop
  step = functools.partial(_gru, {k: v.copy() for k, v in weights.items()})  # arrays the float64 test did not use
  fixed = dynamics.find_fixed_points(step, seeds, np.zeros(INPUTS), dtype=np.float32)
  stable = fixed.stable & fixed.converged
  assert stable.sum() == 8 and sorted(_patterns(weights, fixed.points[stable])) == list(range(8))
  # Every point called converged is a fixed point to float32 precision by a float64 evaluation too (rounding the
  # true fixed points to float32 leaves q ~ 1e-14 here); searches stopped short (q ~ 1e-12) are polished on or slow.
  with jax.enable_x64(True):
    weights64 = {k: jnp.asarray(v) for k, v in weights.items()}
    q64 = np.asarray(dynamics.speeds(functools.partial(_gru, weights64), jnp.asarray(fixed.points), jnp.zeros(INPUTS)))
  assert q64[fixed.converged].max() < 0.5 * (3 * np.finfo(np.float32).eps * fixed.scale)**2
