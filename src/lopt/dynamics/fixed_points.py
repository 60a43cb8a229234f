"""Fixed points and slow points of a recurrent map h' = F(h, x*), found from many seeds at once (SPEC §5.4).

The speed of a state is q(h) = 1/2 ||h - F(h, x*)||^2; fixed points are its zeros. Two stages, both batched over seeds
and jitted:

1. First-order: Adam on q (the authors' method; lr 0.01), here only for a bounded number of steps, to pull seeds
   from wherever they start into the basins of nearby fixed points.
2. Polishing: damped Newton on the residual r(h) = h - F(h, x*), i.e. solve (I - J_rec) d = -r, with a backtracking
   line search, falling back to Levenberg-Marquardt (Gauss-Newton with damping) steps where Newton does not decrease
   q (near-singular I - J_rec: slow modes, line attractors). Newton converges quadratically, so points reach machine
   precision in a handful of iterations where Adam needs thousands of steps and often never gets there.

Then the end points are classified (converged / slow / failed), duplicates are merged with a tolerance relative to
the scale of the states (wider for slow points, whose positions are only approximate), points far from every seed are
flagged as outliers, and each is linearized for stability.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lopt.dynamics._precision import as_input, as_state, bind, default_dtype, precision
from lopt.dynamics.linearize import _linearize

# Defaults (ours; the paper's code runs Adam alone, lr 0.01, up to 1000 steps, tolerance 1e-8 on the mean speed).
FIRST_ORDER_STEPS = 200        # Adam steps before polishing; Newton does the rest
FIRST_ORDER_LEARNING_RATE = 0.01
NEWTON_STEPS = 50              # polishing iterations at most (typically < 10 are used)
# Converged: ||h - F(h)|| <= CONVERGENCE_FACTOR eps scale, i.e. q <= 1/2 (CONVERGENCE_FACTOR eps scale)^2. Rounding
# leaves ~eps |h| in the residual of a true fixed point: polished to the end, float32 searches reach q <= 0.8 *
# 1/2 (eps scale)^2 on flip-flop GRUs (16-32 units) and random tanh networks (up to 256 units), while searches that
# stop short (stalled on gate-saturated slow points, or cut off by a loose tolerance; float64 confirms their q) sit
# 15 to 100+ times above that. 3 (9 in q) is in between; the former 10 max(sqrt(H), scale) (100-300 in q) let those
# pass as converged.
CONVERGENCE_FACTOR = 3.0
SLOW_TOLERANCE = 1e-8          # q below this (relative to scale^2) but above `tolerance`: a slow point
DUPLICATE_TOLERANCE = 1e-5     # points closer than this times the state scale are one point (float64) ...
DUPLICATE_TOLERANCE_SQRT_EPS = 10.0  # ... at least this times sqrt(eps) (float32: 3.5e-3): where I - J_rec is
                                     # ill-conditioned, a point at working precision q can be ~sqrt(eps) off
# A slow point is not a zero of q, so where a search stops on it is only known up to how flat q is there: moving by
# d changes the residual by ~(I - J_rec) d, so within sqrt(2 q) / min_i |1 - lambda_i| (the Newton step to where the
# linearization puts the fixed point; for a contraction, Banach's bound on the distance to it) q stays at its own
# level and the points cannot be told apart. A slow point within that distance of a slower point is merged into it,
# but never farther than SLOW_DUPLICATE_TOLERANCE times the state scale: along gate-saturated regions |1 - lambda|
# falls to 1e-8 and the distance would span the whole state space, while the linearization only holds locally.
SLOW_DUPLICATE_TOLERANCE = 0.1
OUTLIER_FACTOR = 3.0           # flagged when farther from every seed than this times the seeds' spread
MAX_JACOBIAN_ELEMENTS = 2**25  # polishing works on chunks of seeds so that the stacked Jacobians stay this size


class FixedPoints(NamedTuple):
  """Distinct fixed (and slow) points, best first, with what the search saw.

  points: (K, H) distinct points (converged and slow), sorted by speed.
  speeds: (K,) q at each.
  converged: (K,) q <= tolerance (a fixed point to working precision).
  slow: (K,) not converged but q <= slow_tolerance: a slow point, reported as such (one per slow region: see
    SLOW_DUPLICATE_TOLERANCE).
  outlier: (K,) farther from every seed than OUTLIER_FACTOR times the seeds' spread (kept, but flagged).
  stable: (K,) all eigenvalues of J_rec inside the unit circle.
  max_abs_eigenvalue: (K,) the spectral radius of J_rec at the point.
  counts: (K,) how many seeds ended at each point.
  seed_points: (N,) + (H,) where every seed ended; seed_speeds: (N,); assignment: (N,) index into points, -1 for
    seeds that ended at neither a fixed nor a slow point.
  tolerance, slow_tolerance, duplicate_distance, scale: the thresholds used (absolute).
  slow_duplicate_distance: the farthest a slow point is merged into a slower one (absolute).
  first_order_steps, newton_steps: iterations the two stages ran.
  """
  points: np.ndarray
  speeds: np.ndarray
  converged: np.ndarray
  slow: np.ndarray
  outlier: np.ndarray
  stable: np.ndarray
  max_abs_eigenvalue: np.ndarray
  counts: np.ndarray
  seed_points: np.ndarray
  seed_speeds: np.ndarray
  assignment: np.ndarray
  tolerance: float
  slow_tolerance: float
  duplicate_distance: float
  slow_duplicate_distance: float
  scale: float
  first_order_steps: int
  newton_steps: int

  @property
  def num_converged(self) -> int:
    return int(np.sum(self.converged))

  def best(self) -> int:
    """Index of the point to linearize around: the slowest stable non-outlier if there is one, else the slowest."""
    for mask in (self.stable & ~self.outlier, np.ones_like(self.stable)):
      if np.any(mask):
        return int(np.flatnonzero(mask)[np.argmin(self.speeds[mask])])
    raise ValueError("no fixed or slow point was found")


# -- the speed and its minimization ----------------------------------------------------------------------------------
# The public functions evaluate ``step`` through ``bind`` (see _precision: the weights bound into it are cast to the
# states' dtype, so float32 and float64 calls can follow each other in any order); the jitted ones behind them take
# the bound callable as a static argument.

def _speed(step, h, x):
  r = h - step(h, x)
  return 0.5 * jnp.sum(r * r)


def _speeds(step, states, x_star, per_seed: bool = False):
  return jax.vmap(functools.partial(_speed, step), in_axes=(0, 0 if per_seed else None))(states, x_star)


_speeds_jit = jax.jit(_speeds, static_argnames=("step", "per_seed"))


def speed(step, h, x):
  """q(h) = 1/2 ||h - F(h, x)||^2 for one state (H,) -> ()."""
  h = as_state(h)
  return _speeds_jit(bind(step, h.dtype), h[None], as_input(x, h.dtype))[0]


def speeds(step, states, x_star, per_seed: bool = False):
  """q for a batch of states (N, H) -> (N,), in the states' dtype."""
  states = as_state(states)
  return _speeds_jit(bind(step, states.dtype), states, as_input(x_star, states.dtype), per_seed=per_seed)


def adam_minimize(step, states, x_star, tolerance, *, per_seed: bool = False, max_steps: int = 1000,
                  learning_rate: float = 0.01, stop: str = "all"):
  """Adam on the speeds of a batch of states, as in the authors' code, with an early stop.

  Args:
    step: ``F(h, x)``.
    states: (N, H) seeds (the search runs in their dtype).
    x_star: the input, shared, or (N, ...) when ``per_seed``.
    tolerance: stop once every q (``stop="all"``) or the mean q (``"mean"``, the authors' rule) is <= this.
    max_steps: at most this many Adam steps.
    learning_rate: Adam's (authors: 0.01).

  Returns:
    (states (N, H), speeds (N,), steps run ()).
  """
  states = as_state(states)
  return _adam_minimize(bind(step, states.dtype), states, as_input(x_star, states.dtype),
                        jnp.asarray(tolerance, states.dtype), per_seed=per_seed, max_steps=max_steps,
                        learning_rate=learning_rate, stop=stop)


@functools.partial(jax.jit, static_argnames=("step", "per_seed", "max_steps", "learning_rate", "stop"))
def _adam_minimize(step, states, x_star, tolerance, *, per_seed, max_steps, learning_rate, stop):
  optimizer = optax.adam(learning_rate)
  # Each state's speed depends on that state only, so the gradient of the sum is every state's own gradient.
  value_and_grad = jax.value_and_grad(lambda h: jnp.sum(_speeds(step, h, x_star, per_seed)))

  def done(q):
    return jnp.max(q) <= tolerance if stop == "all" else jnp.mean(q) <= tolerance

  def cond(carry):
    _, _, q, t = carry
    return (t < max_steps) & ~done(q)

  def body(carry):
    h, opt_state, _, t = carry
    _, grad = value_and_grad(h)
    updates, opt_state = optimizer.update(grad, opt_state)
    h = optax.apply_updates(h, updates)
    return h, opt_state, _speeds(step, h, x_star, per_seed), t + 1

  q0 = _speeds(step, states, x_star, per_seed)
  h, _, q, t = jax.lax.while_loop(cond, body, (states, optimizer.init(states), q0, jnp.zeros((), jnp.int32)))
  return h, q, t


class _Polish(NamedTuple):
  """Per-state polishing state. While ``trial``, ``h`` is a tentative full Newton step taken from ``anchor``."""
  h: jax.Array
  q: jax.Array
  mu: jax.Array
  done: jax.Array
  trial: jax.Array
  anchor: jax.Array
  anchor_q: jax.Array
  fallback: jax.Array
  fallback_q: jax.Array


def _polish_one(step, s: _Polish, x, tolerance) -> _Polish:
  """One damped-Newton / Levenberg-Marquardt iteration for one state, with a watchdog.

  A full Newton step can raise q even when it lands next to the fixed point (q is a poor merit function where F is
  strongly curved), so a rejected Newton step is taken tentatively once: if the next iteration beats the point it
  left, it is kept; otherwise the search returns to the best damped candidate from before (Chamberlain's watchdog).
  """
  h = s.h
  residual = lambda v: v - step(v, x)  # noqa: E731
  r = residual(h)
  q = 0.5 * jnp.sum(r * r)
  jac = jax.jacfwd(residual)(h)  # I - J_rec
  size = h.shape[0]
  newton = -jnp.linalg.solve(jac, r)
  normal = jac.T @ jac
  # Damping relative to the curvature scale, so mu means the same thing for any state scale.
  damping = s.mu * (jnp.trace(normal) / size + jnp.finfo(h.dtype).tiny)
  levenberg = -jnp.linalg.solve(normal + damping * jnp.eye(size, dtype=h.dtype), jac.T @ r)
  # Candidates: full Newton step, two backtracked ones, and the damped Gauss-Newton step.
  candidates = h + jnp.stack([newton, 0.5 * newton, 0.125 * newton, levenberg])
  q_candidates = jax.vmap(lambda v: _speed(step, v, x))(candidates)
  q_candidates = jnp.where(jnp.isfinite(q_candidates), q_candidates, jnp.inf)
  best = jnp.argmin(q_candidates)
  h_best, q_best = candidates[best], q_candidates[best]
  reference = jnp.where(s.trial, s.anchor_q, q)
  improved = q_best < reference
  newton_finite = jnp.all(jnp.isfinite(newton))
  start_trial = ~improved & ~s.trial & newton_finite
  failed_trial = ~improved & s.trial
  # Where to go: the improving candidate; a tentative full Newton step; back to the fallback; or stay.
  fallback = jnp.where(q_best < q, h_best, h)
  fallback_q = jnp.minimum(q_best, q)
  back = jnp.where(s.fallback_q < s.anchor_q, s.fallback, s.anchor)
  back_q = jnp.minimum(s.fallback_q, s.anchor_q)
  h_new = jnp.where(improved, h_best, jnp.where(start_trial, candidates[0], jnp.where(failed_trial, back, h)))
  q_new = jnp.where(improved, q_best, jnp.where(start_trial, q_candidates[0], jnp.where(failed_trial, back_q, q)))
  # Newton accepted: trust the model more; only the damped step helped: keep mu; nothing helped: damp harder.
  mu_new = jnp.where(improved, jnp.where(best < 3, s.mu * 0.1, s.mu), jnp.where(start_trial, s.mu, s.mu * 10.0))
  mu_new = jnp.clip(mu_new, 1e-12, 1e12)
  settled = ~start_trial
  # Also done at the rounding floor: within 1e4 of tolerance, quadratic convergence would gain far more than a
  # factor 10 in one step, so a smaller gain is rounding noise, and iterating on would only chase it.
  at_floor = settled & (q_new <= 1e4 * tolerance) & (q_new > 0.1 * reference)
  stuck = failed_trial & (s.mu >= 1e8) | (~improved & ~newton_finite & (s.mu >= 1e8))
  done_new = s.done | (settled & (q_new <= tolerance)) | at_floor | stuck
  keep = lambda new, old: jnp.where(s.done, old, new)  # noqa: E731
  return _Polish(keep(h_new, s.h), keep(q_new, s.q), keep(mu_new, s.mu), done_new, keep(start_trial, s.trial),
                 keep(jnp.where(start_trial, h, s.anchor), s.anchor), keep(jnp.where(start_trial, q, s.anchor_q),
                                                                         s.anchor_q),
                 keep(jnp.where(start_trial, fallback, s.fallback), s.fallback),
                 keep(jnp.where(start_trial, fallback_q, s.fallback_q), s.fallback_q))


def newton_polish(step, states, x_star, tolerance, *, per_seed: bool = False, max_steps: int = NEWTON_STEPS):
  """Damped Newton / Levenberg-Marquardt on r(h) = h - F(h, x*) for a batch of states (N, H), in their dtype.

  Returns (states (N, H), speeds (N,), iterations run ()). A state still on a tentative Newton step when the
  iterations run out returns to the best point it had before.
  """
  states = as_state(states)
  return _newton_polish(bind(step, states.dtype), states, as_input(x_star, states.dtype),
                        jnp.asarray(tolerance, states.dtype), per_seed=per_seed, max_steps=max_steps)


@functools.partial(jax.jit, static_argnames=("step", "per_seed", "max_steps"))
def _newton_polish(step, states, x_star, tolerance, *, per_seed, max_steps):
  one = jax.vmap(functools.partial(_polish_one, step), in_axes=(0, 0 if per_seed else None, None))
  size = states.shape[0]

  def cond(carry):
    s, t = carry
    return (t < max_steps) & ~jnp.all(s.done)

  def body(carry):
    s, t = carry
    return one(s, x_star, tolerance), t + 1

  q0 = _speeds(step, states, x_star, per_seed)
  false = jnp.zeros((size,), bool)
  init = _Polish(states, q0, jnp.full((size,), 1e-3, states.dtype), q0 <= tolerance, false, states, q0, states, q0)
  s, t = jax.lax.while_loop(cond, body, (init, jnp.zeros((), jnp.int32)))
  # Undo unfinished trials.
  revert = s.trial & (s.q >= s.anchor_q)
  h = jnp.where(revert[:, None], jnp.where((s.fallback_q < s.anchor_q)[:, None], s.fallback, s.anchor), s.h)
  return h, _speeds(step, h, x_star, per_seed), t


# -- classification ----------------------------------------------------------------------------------------------------

def _rms_norm(x: np.ndarray) -> float:
  x = x[np.all(np.isfinite(x), axis=1)]
  return float(np.sqrt(np.mean(np.sum(x * x, axis=1)))) if len(x) else 0.0


def deduplicate(points: np.ndarray, speeds_: np.ndarray, distance) -> tuple[np.ndarray, np.ndarray]:
  """Greedy merge, slowest first: a point within ``distance`` (a float, or (N,) one per point) of a kept one joins it.

  Returns (kept indices into ``points`` (K,), assignment (N,) index into the kept list).
  """
  distance = np.broadcast_to(np.asarray(distance, np.float64), (len(points),))
  order = np.argsort(speeds_, kind="stable")
  kept: list[int] = []
  assignment = np.empty(len(points), dtype=np.int64)
  for i in order:
    if kept:
      gaps = np.linalg.norm(points[kept] - points[i], axis=1)
      nearest = int(np.argmin(gaps))
      if gaps[nearest] <= distance[i]:
        assignment[i] = nearest
        continue
    assignment[i] = len(kept)
    kept.append(int(i))
  return np.asarray(kept, dtype=np.int64), assignment


def find_fixed_points(step, seeds, x_star=0.0, *, per_seed: bool = False, dtype=None, tolerance: float | None = None,
                      slow_tolerance: float | None = None, first_order_steps: int = FIRST_ORDER_STEPS,
                      learning_rate: float = FIRST_ORDER_LEARNING_RATE, newton_steps: int = NEWTON_STEPS,
                      duplicate_tolerance: float | None = None,
                      outlier_factor: float = OUTLIER_FACTOR) -> FixedPoints:
  """Fixed points of ``h -> step(h, x_star)`` from many seeds: Adam, then Newton polishing, then classification.

  Args:
    step: ``F(h, x)``, (H,), x -> (H,), parameters bound. Must be traceable by JAX; pass the same object across calls
      to reuse the compiled search.
    seeds: (N, H) initial states, typically states visited while optimizing.
    x_star: the constant input (a scalar gradient for the optimizers), or (N, ...) one per seed when ``per_seed``.
    dtype: float64 runs the whole search in 64-bit (enabled only for the call); default: JAX's default float.
    tolerance: q at or below which a point has converged. Default: working precision,
      1/2 (CONVERGENCE_FACTOR eps scale)^2 with eps of ``dtype`` and scale the RMS norm of the seeds.
    slow_tolerance: q at or below which an unconverged point is a slow point (default SLOW_TOLERANCE max(1, scale^2)).
    first_order_steps, learning_rate: the Adam stage (0 skips it).
    newton_steps: the polishing stage, at most this many iterations (0 skips it).
    duplicate_tolerance: points closer than this times the state scale are merged (default: the larger of
      DUPLICATE_TOLERANCE and DUPLICATE_TOLERANCE_SQRT_EPS sqrt(eps)); slow points also within
      sqrt(2 q) / min |1 - lambda(J_rec)| of a slower point, up to SLOW_DUPLICATE_TOLERANCE times the scale.
    outlier_factor: points farther than this times the seeds' spread from every seed are flagged.

  Returns:
    FixedPoints (numpy arrays).
  """
  with precision(dtype):
    dtype = default_dtype(dtype)
    seeds = as_state(seeds, dtype)
    if seeds.ndim != 2:
      raise ValueError(f"find_fixed_points: seeds must be (N, H), got shape {seeds.shape}")
    x_star = as_input(x_star, dtype)
    step = bind(step, dtype)  # the whole search in `dtype`, whatever mode earlier calls on `step` ran in
    num, size = seeds.shape
    seeds_np = np.asarray(seeds, np.float64)
    scale = _rms_norm(seeds_np) or 1.0
    eps = float(np.finfo(dtype).eps)
    if tolerance is None:
      tolerance = 0.5 * (CONVERGENCE_FACTOR * eps * scale)**2
    if slow_tolerance is None:
      slow_tolerance = SLOW_TOLERANCE * max(1.0, scale**2)
    slow_tolerance = max(slow_tolerance, tolerance)

    # Stage 1: a bounded first-order descent (stops early once every point is within the polishing basin).
    states, adam_steps = seeds, 0
    if first_order_steps > 0:
      states, _, adam_steps = _adam_minimize(step, seeds, x_star, jnp.asarray(tolerance, dtype), per_seed=per_seed,
                                             max_steps=first_order_steps, learning_rate=learning_rate, stop="all")
      adam_steps = int(adam_steps)
    # Stage 2: Newton polishing, in chunks so the stacked Jacobians (chunk, H, H) fit in memory.
    newton_iters = 0
    if newton_steps > 0:
      chunk = max(1, min(num, MAX_JACOBIAN_ELEMENTS // (size * size)))
      parts = []
      for start in range(0, num, chunk):
        xs = x_star[start:start + chunk] if per_seed else x_star
        h, _, t = _newton_polish(step, states[start:start + chunk], xs, jnp.asarray(tolerance, dtype),
                                 per_seed=per_seed, max_steps=newton_steps)
        parts.append(h)
        newton_iters = max(newton_iters, int(t))
      states = jnp.concatenate(parts)
    final_speeds = np.asarray(_speeds_jit(step, states, x_star, per_seed=per_seed), np.float64)
    states_np = np.asarray(states, np.float64)

    # Keep converged and slow points; merge duplicates with a tolerance relative to the state scale.
    finite = np.isfinite(final_speeds) & np.all(np.isfinite(states_np), axis=1)
    usable = finite & (final_speeds <= slow_tolerance)
    scale = max(scale, _rms_norm(states_np[usable]) if np.any(usable) else 0.0)
    if duplicate_tolerance is None:
      duplicate_tolerance = max(DUPLICATE_TOLERANCE, DUPLICATE_TOLERANCE_SQRT_EPS * np.sqrt(eps))
    duplicate_distance = duplicate_tolerance * scale
    slow_duplicate_distance = max(SLOW_DUPLICATE_TOLERANCE * scale, duplicate_distance)
    usable_index = np.flatnonzero(usable)
    first, first_assignment = deduplicate(states_np[usable], final_speeds[usable], duplicate_distance)
    candidates = usable_index[first]  # seed index of each distinct point

    # Stability from the spectral radius of J_rec at each point; how flat q is there from the eigenvalues near 1.
    radius, flatness = np.zeros(len(candidates)), np.zeros(len(candidates))
    for k, i in enumerate(candidates):
      j_rec, _ = _linearize(step, states[i], x_star[i] if per_seed else x_star)
      eigenvalues = np.linalg.eigvals(np.asarray(j_rec, np.float64))
      radius[k], flatness[k] = np.max(np.abs(eigenvalues)), np.min(np.abs(1.0 - eigenvalues))

    # Slow points within their own uncertainty (see SLOW_DUPLICATE_TOLERANCE) of a slower point join it.
    candidate_speeds = final_speeds[candidates]
    with np.errstate(divide="ignore", invalid="ignore"):  # inf (capped below) where an eigenvalue is exactly 1
      reach = np.sqrt(2.0 * candidate_speeds) / flatness
    reach = np.where(candidate_speeds > tolerance, np.minimum(reach, slow_duplicate_distance), 0.0)
    kept, second_assignment = deduplicate(states_np[candidates], candidate_speeds,
                                          np.maximum(reach, duplicate_distance))
    assignment = np.full(num, -1, dtype=np.int64)
    assignment[usable_index] = second_assignment[first_assignment]
    points, point_speeds, radius = states_np[candidates[kept]], final_speeds[candidates[kept]], radius[kept]
    counts = np.bincount(assignment[usable_index], minlength=len(kept)) if len(kept) else np.zeros(0, np.int64)

    # Outliers: far from every seed, relative to how spread out the seeds are.
    spread = float(np.sqrt(np.mean(np.sum((seeds_np - seeds_np.mean(0))**2, axis=1))))
    reference = max(spread, 1e-3 * scale, np.finfo(np.float64).tiny)
    if len(points):
      nearest_seed = np.array([np.min(np.linalg.norm(seeds_np - p, axis=1)) for p in points])
    else:
      nearest_seed = np.zeros(0)
    outlier = nearest_seed > outlier_factor * reference

  return FixedPoints(points=points, speeds=point_speeds, converged=point_speeds <= tolerance,
                     slow=point_speeds > tolerance, outlier=outlier, stable=radius < 1.0, max_abs_eigenvalue=radius,
                     counts=counts, seed_points=states_np, seed_speeds=final_speeds, assignment=assignment,
                     tolerance=float(tolerance), slow_tolerance=float(slow_tolerance),
                     duplicate_distance=float(duplicate_distance),
                     slow_duplicate_distance=float(slow_duplicate_distance), scale=float(scale),
                     first_order_steps=adam_steps, newton_steps=newton_iters)
