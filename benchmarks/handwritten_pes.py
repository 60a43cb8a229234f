"""A minimal hand-written pure-JAX antithetic PES meta-training loop: the reference lopt's estimator is timed against.

The same computation as lopt's PES configuration, written as cheaply as plain JAX allows, with no lopt code:

  learned optimizer  lopt's ``mlp`` architecture with its defaults (re-implemented below; ``check_against_lopt``
                     compares it with lopt's ``MLPOptimizer``): 9 per-tensor-normalized features (g, p, 3 momenta,
                     g rs, 3 m rs with Adafactor's factored, bias-corrected rs), 9 tanh time features, 2 relu layers
                     of 32, update d * exp(1e-3 a) * 1e-3.
  inner task         a 64-32-10 relu MLP on scikit-learn's digits, softmax cross-entropy, minibatches of 64 drawn
                     per step from (task key, step); glorot-normal weights, zero biases.
  estimator          PES (Vicol et al. 2021) with P antithetic pairs (2P trajectories, theta +- eps, each pair on one
                     task), truncations of T steps, episodes of 1000 steps with staggered ends; meta-loss of a
                     trajectory: mean over the truncation of loss_t / loss at the episode's first step; then Adam.

One outer step is one ``jax.jit`` (state donated): vmap over pairs and the two signs, ``lax.scan`` over T steps.

  python benchmarks/handwritten_pes.py --tasks 8 64 --seconds 10
"""

from __future__ import annotations

import argparse
import json
import math
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

# -- the learned optimizer: lopt's mlp architecture, defaults ------------------------------------------------------

TIME_SCALES = (1.0, 3.0, 10.0, 30.0, 100.0, 300.0, 1000.0, 3000.0, 10000.0)
MOMENTUM_DECAYS = (0.9, 0.99, 0.999)
RMS_DECAY = 0.999
STEP_SCALE = 1e-3
MAGNITUDE_SCALE = 1e-3
HIDDEN = 32
NUM_FEATURES = 3 + 2 * len(MOMENTUM_DECAYS)  # g, p, m_k, g rs, m_k rs: normalized per tensor
NUM_INPUTS = NUM_FEATURES + len(TIME_SCALES)
# theta is one flat vector (PES perturbs it, Adam updates it); lopt's layer order: (w0, b0, w1, b1, w2, b2).
THETA_SHAPES = ((NUM_INPUTS, HIDDEN), (HIDDEN,), (HIDDEN, HIDDEN), (HIDDEN,), (HIDDEN, 2), (2,))
THETA_SIZE = sum(math.prod(s) for s in THETA_SHAPES)


def unflatten_theta(theta: jax.Array) -> list[jax.Array]:
  """(THETA_SIZE,) -> [w0 (18, 32), b0 (32,), w1 (32, 32), b1 (32,), w2 (32, 2), b2 (2,)]."""
  out, start = [], 0
  for shape in THETA_SHAPES:
    size = math.prod(shape)
    out.append(theta[start:start + size].reshape(shape))
    start += size
  return out


def flatten_lopt_theta(theta: dict) -> jax.Array:
  """lopt's {"layers": [{"w", "b"}, ...]} -> (THETA_SIZE,)."""
  return jnp.concatenate([jnp.ravel(x) for layer in theta["layers"] for x in (layer["w"], layer["b"])])


def init_opt_state(params: tuple) -> tuple:
  """(momenta, second moments) of zeros: momenta (K,) + S (decays first: g broadcasts against them); second
  moment (rows (n, 1), cols (1, m)) for a matrix (n, m), whose two axes are its two largest, else a vector S."""
  momenta = tuple(jnp.zeros((len(MOMENTUM_DECAYS),) + p.shape, p.dtype) for p in params)
  second = tuple((jnp.zeros((p.shape[0], 1), p.dtype), jnp.zeros((1, p.shape[1]), p.dtype)) if p.ndim == 2
                 else jnp.zeros_like(p) for p in params)
  return momenta, second


def lopt_update(theta: jax.Array, params: tuple, grads: tuple, momenta: tuple, second: tuple, step: jax.Array):
  """One step of the learned optimizer on a tuple of tensors (matrices and vectors), step = steps taken (int32).

  Returns (updates like params, new momenta, new second moments). The time features are the same for every
  coordinate and each feature's normalizer for every coordinate of a tensor, so both fold into the first layer (its
  bias, and its weights per tensor); that layer, with 9 inputs, runs as one elementwise fusion (faster on CPU than a
  dot of depth 9), and the two deeper layers as one dot over all coordinates.
  """
  w0, b0, w1, b1, w2, b2 = unflatten_theta(theta)
  t = (step + 1).astype(jnp.float32)
  bias0 = b0 + jnp.tanh(t / jnp.asarray(TIME_SCALES)) @ w0[NUM_FEATURES:]
  correction = 1 - jnp.power(jnp.float32(RMS_DECAY), t)  # Adam-style bias correction of v
  decays = jnp.asarray(MOMENTUM_DECAYS)
  new_momenta, new_second, blocks = [], [], []
  for p, g, m, v in zip(params, grads, momenta, second):
    d = decays.reshape((-1,) + (1,) * g.ndim)
    m = d * m + (1 - d) * g
    g2 = g * g + 1e-30
    if g.ndim == 2:  # Adafactor over (rows, cols), the two largest axes of a matrix
      rows = RMS_DECAY * v[0] + (1 - RMS_DECAY) * jnp.mean(g2, axis=1, keepdims=True)
      cols = RMS_DECAY * v[1] + (1 - RMS_DECAY) * jnp.mean(g2, axis=0, keepdims=True)
      v, estimate = (rows, cols), rows * cols / jnp.mean(rows, axis=0, keepdims=True)
    else:
      v = estimate = RMS_DECAY * v + (1 - RMS_DECAY) * g2
    rs = jax.lax.rsqrt(estimate / correction + 1e-12)
    features = [g, p, *m, g * rs, *(m * rs)]  # each S
    # Unit RMS per feature over the tensor: a per-tensor scale on the feature's row of w0.
    scale = jnp.stack([jax.lax.rsqrt(jnp.mean(f * f) + 1e-12) for f in features])
    w = scale[:, None] * w0[:NUM_FEATURES]
    blocks.append((bias0 + sum(f[..., None] * w[j] for j, f in enumerate(features))).reshape(-1, HIDDEN))
    new_momenta.append(m)
    new_second.append(v)
  x = jax.nn.relu(jnp.concatenate(blocks, axis=0))  # (2410, 32) for the digits MLP
  x = jax.nn.relu(x @ w1 + b1)
  if jax.default_backend() == "cpu":
    out = x @ w2 + b2
  else:  # a dot of width 2 is slow on GPUs; as a reduction it fuses with the relu above and skips a round trip
    out = jnp.sum(x[:, :, None] * w2, axis=1) + b2
  u = out[:, 0] * jnp.exp(MAGNITUDE_SCALE * out[:, 1]) * STEP_SCALE
  updates, start = [], 0
  for p in params:
    updates.append(u[start:start + p.size].reshape(p.shape))
    start += p.size
  return tuple(updates), tuple(new_momenta), tuple(new_second)


# -- the inner task: a 64-32-10 MLP on digits ----------------------------------------------------------------------

LAYER_SIZES = (64, 32, 10)


def load_data() -> tuple[jax.Array, jax.Array]:
  """scikit-learn's digits on the device: x (1797, 64) in [0, 1], y (1797,) int32."""
  from sklearn.datasets import load_digits
  digits = load_digits()
  return jnp.asarray(digits.data / 16.0, jnp.float32), jnp.asarray(digits.target, jnp.int32)


def init_params(key: jax.Array) -> tuple:
  """(w1 (64, 32), b1 (32,), w2 (32, 10), b2 (10,)): glorot-normal weights, zero biases."""
  k1, k2 = jax.random.split(key)
  glorot = jax.nn.initializers.glorot_normal()
  return (glorot(k1, LAYER_SIZES[:2]), jnp.zeros(LAYER_SIZES[1]),
          glorot(k2, LAYER_SIZES[1:]), jnp.zeros(LAYER_SIZES[2]))


def task_loss(params: tuple, x: jax.Array, y: jax.Array) -> jax.Array:
  """Mean softmax cross-entropy; x (B, 64), y (B,)."""
  w1, b1, w2, b2 = params
  logits = jax.nn.relu(x @ w1 + b1) @ w2 + b2
  return jnp.mean(jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(logits, y[:, None], axis=-1)[:, 0])


# -- PES -----------------------------------------------------------------------------------------------------------

class PESState(NamedTuple):
  """Pair quantities have a leading (P,), trajectory quantities (P, 2): sign + then -."""
  theta: jax.Array        # (THETA_SIZE,)
  adam_m: jax.Array       # (THETA_SIZE,)
  adam_v: jax.Array       # (THETA_SIZE,)
  adam_count: jax.Array   # int32
  key: jax.Array          # the estimator's key
  task_key: jax.Array     # (P,): init and minibatches of the pair's current task
  step: jax.Array         # (P,) int32: inner steps taken in the current episode
  end: jax.Array          # (P,) int32: the episode's length (the first ones staggered)
  acc: jax.Array          # (P, THETA_SIZE): PES's accumulated perturbation of the + member
  loss0: jax.Array        # (P, 2): loss at the episode's first step
  params: tuple           # each (P, 2) + S
  momenta: tuple          # each (P, 2, K) + S
  second: tuple           # (P, 2) + rows / cols / S


def fresh_inner(task_key: jax.Array) -> tuple:
  """(params, momenta, second) of a new task, one copy per sign: (2,) + leaf shapes."""
  params = init_params(task_key)
  inner = (params, *init_opt_state(params))
  return jax.tree.map(lambda x: jnp.broadcast_to(x, (2,) + x.shape), inner)


def _make(num_tasks: int, truncation: int = 50, batch_size: int = 64, sigma: float = 0.01, seed: int = 0,
          episode_length: int = 1000, learning_rate: float = 1e-3, pairs_per_chunk: int | None = None):
  """(initial state, the outer step as a function of (state, data), data)."""
  if num_tasks < 2 or num_tasks % 2:
    raise ValueError(f"num_tasks counts both members of each antithetic pair: an even number >= 2, got {num_tasks}")
  if episode_length % truncation:
    raise ValueError("episodes end at truncation boundaries: episode_length must be a multiple of truncation")
  pairs, truncations = num_tasks // 2, episode_length // truncation
  if pairs_per_chunk is None:
    # On CPU, whole truncations of a few pairs at a time keep their activations in cache (the dots run on one
    # core either way); an accelerator wants every pair in one vmap.
    pairs_per_chunk = max(c for c in range(1, 5) if pairs % c == 0) if jax.default_backend() == "cpu" else pairs
  if pairs % pairs_per_chunk:
    raise ValueError(f"pairs_per_chunk={pairs_per_chunk} does not divide the {pairs} pairs")
  chunks = pairs // pairs_per_chunk
  data = load_data()
  num_data = data[0].shape[0]

  def unroll(theta_pm, inner, task_key, step0, data):
    """One pair over one truncation: theta_pm (2, THETA_SIZE) -> (inner, losses (T, 2))."""
    xs, ys = data

    def inner_step(inner, step):
      params, momenta, second = inner
      # Both members see the same minibatch: one draw per pair.
      idx = jax.random.randint(jax.random.fold_in(task_key, step), (batch_size,), 0, num_data)
      x, y = xs[idx], ys[idx]
      loss, grads = jax.vmap(jax.value_and_grad(task_loss), (0, None, None))(params, x, y)
      updates, momenta, second = jax.vmap(lopt_update, (0, 0, 0, 0, 0, None))(
          theta_pm, params, grads, momenta, second, step)
      params = jax.tree.map(jnp.add, params, updates)
      return (params, momenta, second), loss

    return jax.lax.scan(inner_step, inner, step0 + jnp.arange(truncation, dtype=jnp.int32))

  def outer_step(state: PESState, data) -> tuple[PESState, jax.Array]:
    key, eps_key, task_key = jax.random.split(state.key, 3)
    eps = sigma * jax.random.normal(eps_key, (pairs, THETA_SIZE))
    acc = state.acc + eps
    theta_pm = jnp.stack([state.theta + eps, state.theta - eps], axis=1)  # (P, 2, THETA_SIZE)
    inner = (state.params, state.momenta, state.second)
    args = (theta_pm, inner, state.task_key, state.step)
    unroll_pairs = lambda args: jax.vmap(unroll, (0, 0, 0, 0, None))(*args, data)  # noqa: E731
    if chunks == 1:
      inner, losses = unroll_pairs(args)
    else:
      split = lambda x: x.reshape((chunks, pairs_per_chunk) + x.shape[1:])  # noqa: E731
      inner, losses = jax.lax.map(unroll_pairs, jax.tree.map(split, args))
      inner, losses = jax.tree.map(lambda x: x.reshape((pairs,) + x.shape[2:]), (inner, losses))
    loss0 = jnp.where((state.step == 0)[:, None], losses[:, 0], state.loss0)  # losses: (P, T, 2)
    meta = jnp.mean(losses, axis=1) / loss0  # (P, 2)
    grad = jnp.mean((meta[:, 0] - meta[:, 1])[:, None] * acc, axis=0) / (2 * sigma**2)

    # Adam (no weight decay): the standard bias-corrected update.
    count = state.adam_count + 1
    adam_m = 0.9 * state.adam_m + 0.1 * grad
    adam_v = 0.999 * state.adam_v + 0.001 * grad * grad
    m_hat = adam_m / (1 - 0.9**count.astype(jnp.float32))
    v_hat = adam_v / (1 - 0.999**count.astype(jnp.float32))
    theta = state.theta - learning_rate * m_hat / (jnp.sqrt(v_hat) + 1e-8)

    # Episodes that ended restart on a new task with a zero accumulated perturbation.
    step = state.step + truncation
    done = step >= state.end
    new_keys = jax.random.split(task_key, pairs)
    fresh = jax.vmap(fresh_inner)(new_keys)
    select = lambda new, old: jnp.where(done.reshape((-1,) + (1,) * (old.ndim - 1)), new, old)  # noqa: E731
    params, momenta, second = jax.tree.map(select, fresh, inner)
    state = PESState(
        theta=theta, adam_m=adam_m, adam_v=adam_v, adam_count=count, key=key,
        task_key=select(new_keys, state.task_key), step=jnp.where(done, 0, step),
        end=jnp.where(done, episode_length, state.end), acc=select(jnp.zeros_like(acc), acc),
        loss0=loss0, params=params, momenta=momenta, second=second)
    return state, jnp.mean(meta)

  def init_state(key):
    theta_key, task_key, key = jax.random.split(key, 3)
    task_keys = jax.random.split(task_key, pairs)
    # Staggered episodes: pair i's first one is shorter by i / P of an episode (whole truncations), so resets
    # spread evenly over the outer steps instead of all landing on the same one.
    end = episode_length - truncation * ((jnp.arange(pairs) * truncations) // pairs)
    params, momenta, second = jax.vmap(fresh_inner)(task_keys)
    return PESState(
        theta=flatten_lopt_theta(init_lopt_theta(theta_key)), adam_m=jnp.zeros(THETA_SIZE),
        adam_v=jnp.zeros(THETA_SIZE), adam_count=jnp.zeros((), jnp.int32), key=key, task_key=task_keys,
        step=jnp.zeros(pairs, jnp.int32), end=end.astype(jnp.int32), acc=jnp.zeros((pairs, THETA_SIZE)),
        loss0=jnp.ones((pairs, 2)), params=params, momenta=momenta, second=second)

  # Under jit every leaf gets its own buffer: donation refuses two arguments sharing one.
  state = jax.jit(init_state)(jax.random.key(seed))
  return state, jax.jit(outer_step, donate_argnums=0), data


def init_lopt_theta(key: jax.Array) -> dict:
  """lopt's MLPOptimizer.init: He-normal hidden weights, zero biases, zero last layer (an inert start)."""
  keys = jax.random.split(key, len(THETA_SHAPES) // 2)
  layers = []
  for i, layer_key in enumerate(keys):
    fan_in, fan_out = THETA_SHAPES[2 * i]
    last = i == len(keys) - 1
    w = jnp.zeros((fan_in, fan_out)) if last else jax.random.normal(layer_key, (fan_in, fan_out)) * jnp.sqrt(2 / fan_in)
    layers.append({"w": w, "b": jnp.zeros((fan_out,))})
  return {"layers": layers}


def build(num_tasks: int, truncation: int = 50, batch_size: int = 64, sigma: float = 0.01, seed: int = 0,
          **kwargs):
  """(state, outer_step) with outer_step(state) -> (state, meta_loss); state is donated: use the returned one.

  num_tasks counts trajectories, both members of each antithetic pair (P = num_tasks / 2 tasks). kwargs:
  episode_length (1000), learning_rate (1e-3).
  """
  state, step, data = _make(num_tasks, truncation, batch_size, sigma, seed, **kwargs)
  return state, lambda state: step(state, data)


def measure(num_tasks: int, seconds: float = 10.0, truncation: int = 50, **kwargs) -> dict:
  """Compiles (timed apart), then runs outer steps until `seconds` have passed; inner steps = num_tasks * truncation
  per outer step."""
  state, step, data = _make(num_tasks, truncation, **kwargs)
  started = time.perf_counter()
  compiled = step.lower(state, data).compile()
  compile_seconds = time.perf_counter() - started
  state, loss = compiled(state, data)  # a first run: allocations, page faults
  jax.block_until_ready((state, loss))
  outer_steps = 0
  started = time.perf_counter()
  while time.perf_counter() - started < seconds:
    state, loss = compiled(state, data)
    jax.block_until_ready(loss)
    outer_steps += 1
  jax.block_until_ready(state)
  elapsed = time.perf_counter() - started
  return {"inner_steps_per_second": outer_steps * num_tasks * truncation / elapsed, "outer_steps": outer_steps,
          "compile_seconds": compile_seconds, "meta_loss": float(loss)}


# -- the check against lopt ----------------------------------------------------------------------------------------

def check_against_lopt(steps: int = 5, seed: int = 0, rtol: float = 1e-5) -> bool:
  """5 steps of ``lopt_update`` and of lopt's ``MLPOptimizer`` on the same random theta (lopt's init with a random
  last layer), params and grads: the updates must agree to ``rtol`` (relative to each tensor's largest update).
  Returns False when lopt is not importable; raises AssertionError on a mismatch."""
  try:
    from lopt.architectures.mlp.optimizer import MLPOptimizer
  except ImportError:
    return False
  optimizer = MLPOptimizer()
  key = jax.random.key(seed)
  theta_key, last_key, params_key, grads_key = jax.random.split(key, 4)
  theta = optimizer.init(theta_key)
  last = theta["layers"][-1]
  last["w"] = jax.random.normal(last_key, last["w"].shape)
  last["b"] = jnp.array([0.3, -0.5])
  flat = flatten_lopt_theta(theta)
  names = ("w1", "b1", "w2", "b2")
  params = tuple(p + 0.1 * jax.random.normal(k, p.shape)  # nonzero biases: p is a feature
                 for p, k in zip(init_params(params_key), jax.random.split(params_key, 4)))
  lopt_params = dict(zip(names, params))
  lopt_state = optimizer.init_state(theta, lopt_params)
  momenta, second = init_opt_state(params)
  mine_update = jax.jit(lopt_update)
  for i in range(steps):
    keys = jax.random.split(jax.random.fold_in(grads_key, i), len(params))
    grads = tuple(jax.random.normal(k, p.shape) * 10.0**(-j) for j, (p, k) in enumerate(zip(params, keys)))
    ref, lopt_state = optimizer.update(theta, lopt_state, dict(zip(names, grads)), lopt_params)
    updates, momenta, second = mine_update(flat, params, grads, momenta, second, jnp.int32(i))
    for name, mine in zip(names, updates):
      ref_u = np.asarray(ref[name])
      assert np.abs(ref_u).max() > 0, f"step {i}, {name}: zero updates, the check would be vacuous"
      np.testing.assert_allclose(np.asarray(mine), ref_u, rtol=rtol, atol=rtol * np.abs(ref_u).max(),
                                 err_msg=f"step {i}, {name}")
    params = tuple(p + u for p, u in zip(params, updates))
    lopt_params = {n: lopt_params[n] + ref[n] for n in names}
  return True


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--tasks", type=int, nargs="+", default=[8, 64], help="trajectories (2 per antithetic pair)")
  parser.add_argument("--seconds", type=float, default=10.0, help="timed run per size")
  parser.add_argument("--truncation", type=int, default=50, help="inner steps per outer step")
  parser.add_argument("--check", action="store_true", help="first compare the optimizer with lopt's")
  args = parser.parse_args()
  if args.check:
    print("check against lopt:", "passed" if check_against_lopt() else "skipped (lopt not importable)")
  rates = {}
  for n in args.tasks:
    result = measure(n, seconds=args.seconds, truncation=args.truncation)
    rates[n] = result["inner_steps_per_second"]
    print(f"{n:6d} tasks: {rates[n]:12.0f} inner steps/s  ({result['outer_steps']} outer steps, compile "
          f"{result['compile_seconds']:.1f} s, meta-loss {result['meta_loss']:.4f}) on {jax.devices()[0]}")
  print(json.dumps({"inner_steps_per_second": rates}))


if __name__ == "__main__":
  main()

