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

import contextlib
import functools
import os
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.scipy.linalg import cho_factor, cho_solve

from lopt.dynamics._precision import as_input, as_state, bind, default_dtype, precision

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
ADAM_BLOCK = 10                # Adam steps per test of the stopping rule (see _adam_run)
# Threads computing the eigenvalues at the distinct points (1: serial): a core each, at most 16.
EIGENVALUE_THREADS = min(16, os.cpu_count() or 1)
# On an accelerator in float64 the spectral radius of a converged point comes from SQUARINGS repeated squarings on the
# device (see spectral_radii) instead of the host's eigenvalues; a radius this close to 1 is confirmed on the host,
# so that the classification is LAPACK's wherever the two could disagree.
SQUARINGS = 60
SQUARING_COLLAPSE = 1e-30      # a normalized square this small: the squaring is not to be trusted (spectral_radii)
DEVICE_RADIUS_MARGIN = 1e-8
MIN_LANES = 8                  # the fewest states one polishing call runs (see _lanes)


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
  return _adam_run(step, states, x_star, tolerance, per_seed=per_seed, max_steps=max_steps,
                   learning_rate=learning_rate, stop=stop)


def _adam_run(step, states, x_star, tolerance, *, per_seed, max_steps, learning_rate, stop):
  """``_adam_minimize``'s body, traceable inside a larger jitted function.

  Every step evaluates q and its gradient in one pass at the new point (the gradient is the next step's, the speed
  is the stopping test's). The steps run in blocks of ADAM_BLOCK under a fixed trip count, a step past the stop
  leaving everything as it was, so the loop's condition (read back by the host on accelerators) is tested once per
  block rather than once per step; the states and the count are those of stopping after the exact step.
  """
  optimizer = optax.adam(learning_rate)
  # Each state's speed depends on that state only: per-state gradients are the gradient of the sum.
  value_and_grad = jax.vmap(jax.value_and_grad(functools.partial(_speed, step)),
                            in_axes=(0, 0 if per_seed else None))

  def done(q):
    return jnp.max(q) <= tolerance if stop == "all" else jnp.mean(q) <= tolerance

  def running(q, t):
    return (t < max_steps) & ~done(q)

  def one_step(carry, _):
    h, opt_state, q, grad, t = carry
    updates, new_opt_state = optimizer.update(grad, opt_state)
    new_h = optax.apply_updates(h, updates)
    new_q, new_grad = value_and_grad(new_h, x_star)
    active = running(q, t)
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(active, a, b), new, old)  # noqa: E731
    return (keep(new_h, h), keep(new_opt_state, opt_state), keep(new_q, q), keep(new_grad, grad),
            t + active.astype(t.dtype)), None

  def block(carry):
    return jax.lax.scan(one_step, carry, None, length=min(ADAM_BLOCK, max_steps))[0]

  q0, grad0 = value_and_grad(states, x_star)
  init = (states, optimizer.init(states), q0, grad0, jnp.zeros((), jnp.int32))
  h, _, q, _, t = jax.lax.while_loop(lambda c: running(c[2], c[4]), block, init)
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


def _newton_and_levenberg(jac, r, damped):
  """The full Newton step -jac^-1 r and the damped Gauss-Newton step -damped^-1 jac^T r (damped: jac^T jac + mu I).

  On accelerators the damped system, symmetric positive definite, is solved by Cholesky (a batch takes 40% of an
  LU's time on an H200; where it breaks down the step is NaN and the candidate is never chosen). On a CPU both
  systems go through one LU call: jaxlib's batched LAPACK kernels wait for their batch on XLA's thread pool from a
  thread of that pool, and two running at once could hold both threads of a 2-core machine and wait forever (seen
  with jax 0.10: the search hung at random iterations).
  """
  if jax.default_backend() == "cpu":
    both = jnp.linalg.solve(jnp.stack([jac, damped]), jnp.stack([r, jac.T @ r])[..., None])[..., 0]
    return -both[0], -both[1]
  return -jnp.linalg.solve(jac, r), -cho_solve(cho_factor(damped), jac.T @ r)


def _polish_one(step, s: _Polish, x, tolerance) -> _Polish:
  """One damped-Newton / Levenberg-Marquardt iteration for one state, with a watchdog.

  A full Newton step can raise q even when it lands next to the fixed point (q is a poor merit function where F is
  strongly curved), so a rejected Newton step is taken tentatively once: if the next iteration beats the point it
  left, it is kept; otherwise the search returns to the best damped candidate from before (Chamberlain's watchdog).
  """
  h = s.h
  residual = lambda v: v - step(v, x)  # noqa: E731
  jac, r = jax.jacfwd(lambda v: (residual(v),) * 2, has_aux=True)(h)  # I - J_rec, and r from the same pass
  q = 0.5 * jnp.sum(r * r)
  size = h.shape[0]
  normal = jac.T @ jac
  # Damping relative to the curvature scale, so mu means the same thing for any state scale.
  damping = s.mu * (jnp.trace(normal) / size + jnp.finfo(h.dtype).tiny)
  newton, levenberg = _newton_and_levenberg(jac, r, normal + damping * jnp.eye(size, dtype=h.dtype))
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
  """``newton_polish``'s body: the whole batch iterates until every state is done (done states stay as they are)."""
  one = jax.vmap(functools.partial(_polish_one, step), in_axes=(0, 0 if per_seed else None, None))

  def cond(carry):
    s, t = carry
    return (t < max_steps) & ~jnp.all(s.done)

  def body(carry):
    s, t = carry
    return one(s, x_star, tolerance), t + 1

  init = _polish_init(step, states, x_star, tolerance, per_seed)
  s, t = jax.lax.while_loop(cond, body, (init, jnp.zeros((), jnp.int32)))
  return (*_polish_result(step, s, x_star, per_seed), t)


def _polish_init(step, states, x_star, tolerance, per_seed) -> _Polish:
  """The polishing state of states (N, H) before the first iteration: done where q is already <= tolerance."""
  q0 = _speeds(step, states, x_star, per_seed)
  false = jnp.zeros(q0.shape, bool)
  return _Polish(states, q0, jnp.full(q0.shape, 1e-3, states.dtype), q0 <= tolerance, false, states, q0, states, q0)


def _polish_result(step, s: _Polish, x_star, per_seed):
  """(states (N, H), speeds (N,)) at the end: a state still on a tentative Newton step returns to the best point it
  had before."""
  revert = s.trial & (s.q >= s.anchor_q)
  h = jnp.where(revert[:, None], jnp.where((s.fallback_q < s.anchor_q)[:, None], s.fallback, s.anchor), s.h)
  return h, _speeds(step, h, x_star, per_seed)


def _lanes(count: int, chunk: int) -> int:
  """How many states one polishing call runs to hold ``count`` of them: ``chunk``, or a sixteenth of it (at least
  MIN_LANES) for the few seeds of the last iterations. Two sizes, so that two shapes compile: each costs about as
  much as a polishing call on a small problem, and the lanes a finer ladder would save are few."""
  small = max(chunk // 16, min(chunk, MIN_LANES))
  return small if count <= small else chunk


_polish_start = jax.jit(_polish_init, static_argnames=("step", "per_seed"))
_polish_finish = jax.jit(_polish_result, static_argnames=("step", "per_seed"))


@functools.partial(jax.jit, static_argnames=("step", "per_seed"), donate_argnames=("s",))
def _polish_lanes(step, s: _Polish, index, x_star, tolerance, *, per_seed):
  """One polishing iteration for the seeds at ``index`` (lanes,) of ``s`` (N per field); index N marks an empty
  lane (it computes a copy of the last seed, and writes nothing)."""
  lane = lambda a: jnp.take(a, index, axis=0, mode="clip")  # noqa: E731
  x = lane(x_star) if per_seed else x_star
  new = jax.vmap(functools.partial(_polish_one, step), in_axes=(0, 0 if per_seed else None, None))(
      jax.tree.map(lane, s), x, tolerance)
  return jax.tree.map(lambda a, b: a.at[index].set(b, mode="drop"), s, new)


def _polish_active(step, states, x_star, tolerance, *, per_seed, max_steps, chunk):
  """``_newton_polish`` on every seed, each iteration run only on the seeds not yet done, at most ``chunk`` per call.

  A seed's iterations depend on that seed alone (done seeds are left as they are), so which seeds share a call
  changes the work, and the rounding only: XLA's kernels do not give bit-identical rows at another batch size (seen
  on CPU in float32, and in float64 at 256 units; the points found agree to rounding, but where speeds are at the
  rounding floor their order, and so the order of the points, can change). Most seeds are done after one or two
  iterations (1024 seeds of a 256-unit GRU: 1024, then 421, then 17 still running), and iterating whole chunks until
  their slowest seed is done cost 2-3 times the iterations needed. The host reads the done flags after each
  iteration (as the loop's condition was read back every iteration before) and gathers the seeds still running into
  the fewest lanes (see ``_lanes``).

  Returns (states (N, H), speeds (N,), iterations run (the most any seed ran)).
  """
  num = states.shape[0]
  s = _polish_start(step, states, x_star, tolerance, per_seed=per_seed)
  iterations = 0
  while iterations < max_steps:
    running = np.flatnonzero(~np.asarray(s.done))
    if not len(running):
      break
    for part in np.array_split(running, -(-len(running) // chunk)):
      index = np.full(_lanes(len(part), chunk), num, dtype=np.int32)
      index[:len(part)] = part
      s = _polish_lanes(step, s, jnp.asarray(index), x_star, tolerance, per_seed=per_seed)
    iterations += 1
  return (*_polish_finish(step, s, x_star, per_seed=per_seed), iterations)


def _search(step, seeds, x_star, tolerance, *, per_seed, first_order_steps, learning_rate, newton_steps, chunk):
  """Both stages: (states (N, H), speeds (N,), Adam steps, Newton iterations), on the host."""
  states, adam_steps = seeds, 0
  if first_order_steps > 0:
    states, _, adam_steps = _adam_minimize(step, seeds, x_star, tolerance, per_seed=per_seed,
                                           max_steps=first_order_steps, learning_rate=learning_rate, stop="all")
  if newton_steps > 0:
    states, final_speeds, newton_iters = _polish_active(step, states, x_star, tolerance, per_seed=per_seed,
                                                        max_steps=newton_steps, chunk=chunk)
  else:
    final_speeds, newton_iters = _speeds_jit(step, states, x_star, per_seed=per_seed), 0
  states, final_speeds, adam_steps = jax.device_get((states, final_speeds, adam_steps))
  return states, final_speeds, int(adam_steps), int(newton_iters)


@functools.partial(jax.jit, static_argnames=("step", "per_seed"))
def _recurrent_jacobians(step, points, x_star, *, per_seed):
  """J_rec = dF/dh at each of ``points`` (K, H) -> (K, H, H)."""
  return jax.vmap(jax.jacfwd(step), in_axes=(0, 0 if per_seed else None))(points, x_star)


@jax.jit
def spectral_radii(matrices):
  """max |eigenvalue| of each (K, H, H) matrix -> ((K,) radii, (K,) reliable), by repeated squaring, without an
  eigendecomposition.

  B_0 = J / c_0 and B_j = B_{j-1}^2 / c_j, each c_j the largest |entry| of what it divides, so that
  J^(2^k) = B_k prod_j c_j^(2^(k-j)) and, by Gelfand's formula, log rho(J) = lim 2^-k log ||J^(2^k)||
  = sum_j 2^-j log c_j. After 60 squarings the limit's error, a factor of at most (cond)^(2^-60) for any eigenvector
  conditioning, is below float64's rounding, and each term's rounding is weighted by 2^-j: the radius agrees with
  LAPACK's eigenvalues to about 1e-13. Where the dominant eigenvalue is simple, c_j tends to at least 1/H; it
  collapses only where the dominant part is nilpotent-like (a Jordan block of more than a few rows, a nilpotent
  matrix), whose squares underflow: those are not ``reliable`` (an all-zero matrix is, with radius 0). 60 (H, H)
  products are microseconds on a GPU, where a 256 x 256 host eigendecomposition takes 30-50 ms; on a CPU the
  eigendecomposition is the cheaper one.
  """
  def norm(x):
    return jnp.max(jnp.abs(x), axis=(-2, -1))

  c = norm(matrices)
  zero = c == 0
  b = matrices / jnp.where(zero, 1, c)[:, None, None]

  def square(j, carry):
    b, log_radius, smallest = carry
    b = b @ b
    c = norm(b)
    b = b / jnp.where(c == 0, 1, c)[:, None, None]
    weight = jnp.exp2(-j.astype(b.dtype))
    return b, log_radius + jnp.log(jnp.where(c == 0, 1, c)) * weight, jnp.minimum(smallest, c)

  _, log_radius, smallest = jax.lax.fori_loop(1, SQUARINGS + 1, square,
                                              (b, jnp.log(jnp.where(zero, 1, c)), jnp.ones_like(c)))
  return jnp.where(zero, 0.0, jnp.exp(log_radius)), zero | (smallest > SQUARING_COLLAPSE)


# -- classification ----------------------------------------------------------------------------------------------------

def _rms_norm(x: np.ndarray) -> float:
  x = x[np.all(np.isfinite(x), axis=1)]
  return float(np.sqrt(np.mean(np.sum(x * x, axis=1)))) if len(x) else 0.0


def deduplicate(points: np.ndarray, speeds_: np.ndarray, distance) -> tuple[np.ndarray, np.ndarray]:
  """Greedy merge, slowest first: a point within ``distance`` (a float, or (N,) one per point) of a kept one joins it.

  Returns (kept indices into ``points`` (K,), assignment (N,) index into the kept list).

  Point by point in order of speed, each joins the nearest point kept before it (the first on ties) if within its
  own distance, else is kept. Computed kept point by kept point: every point's distance to the nearest kept point is
  tracked as points are kept, and the next point kept is the first one in the order beyond its distance from all
  kept so far; the points before it join their nearest (K passes over the points, not N).
  """
  points = np.asarray(points)
  distance = np.broadcast_to(np.asarray(distance, np.float64), (len(points),))
  order = np.argsort(speeds_, kind="stable")
  ordered, limit = points[order], distance[order]
  nearest_gap = np.full(len(points), np.inf)
  nearest = np.zeros(len(points), dtype=np.int64)
  kept: list[int] = []
  assignment = np.empty(len(points), dtype=np.int64)
  position = 0  # in the order: every point before it is assigned
  while position < len(points):
    # ordered[position] is beyond every kept point: keep it.
    assignment[order[position]] = len(kept)
    kept.append(int(order[position]))
    rest = slice(position + 1, len(points))
    gaps = np.linalg.norm(ordered[rest] - ordered[position], axis=1)
    closer = gaps < nearest_gap[rest]  # strictly: ties stay with the earlier kept point
    nearest_gap[rest] = np.where(closer, gaps, nearest_gap[rest])
    nearest[rest] = np.where(closer, len(kept) - 1, nearest[rest])
    beyond = np.flatnonzero(~(nearest_gap[rest] <= limit[rest]))
    end = position + 1 + (int(beyond[0]) if len(beyond) else len(points) - position - 1)
    assignment[order[position + 1:end]] = nearest[position + 1:end]
    position = end
  return np.asarray(kept, dtype=np.int64), assignment


def _bucket(count: int) -> int:
  """The smallest power of 2 >= count."""
  return 1 << max(count - 1, 0).bit_length()


_blas_controller = None


@contextlib.contextmanager
def _single_threaded_blas():
  """BLAS and LAPACK on one thread inside the block (through threadpoolctl, which scikit-learn brings).

  The search factorizes many small (H, H) matrices (XLA's CPU LAPACK calls, numpy's eigenvalues): one thread each
  is all they can use, while OpenBLAS's worker threads, spinning as they wait for one another, take the cores from
  XLA and from each other. On 2 busy cores a batch of 512 float64 256 x 256 solves took 8-20 s with OpenBLAS's
  default threads and 1 s with one.
  """
  global _blas_controller
  try:
    import scipy.linalg  # noqa: F401  (loads the OpenBLAS that XLA's CPU LAPACK calls, so the controller sees it)
    import threadpoolctl
  except ImportError:
    yield
    return
  if _blas_controller is None:
    _blas_controller = threadpoolctl.ThreadpoolController()
  with _blas_controller.limit(limits=1, user_api="blas"):
    yield


def _eigenvalues(matrices: np.ndarray) -> np.ndarray:
  """``np.linalg.eigvals`` of (K, H, H) -> (K, H), the matrices shared out over EIGENVALUE_THREADS threads at most.

  numpy runs one LAPACK call per matrix of a stack, without the GIL, so each thread's share gets the values one
  call on the whole stack would, bit for bit (where a share's eigenvalues are all real numpy returns them real, the
  stack's complex: the same numbers, and only their moduli are used). One 256 x 256 problem takes 30-50 ms on an
  H200's host and no more BLAS threads speed it up (benchmarks/results/fixed_points_speed.md), so with K points
  the classification took K times that, after the search.
  """
  workers = min(len(matrices), EIGENVALUE_THREADS)
  if workers <= 1:
    return np.linalg.eigvals(matrices)
  with ThreadPoolExecutor(workers) as pool:
    return np.concatenate(list(pool.map(np.linalg.eigvals, np.array_split(matrices, workers))))


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

    # A bounded first-order descent (stopping early once every point is within the polishing basin), then Newton
    # polishing of the seeds still running, at most `chunk` per call so the stacked Jacobians (chunk, H, H) fit.
    chunk = max(1, min(num, MAX_JACOBIAN_ELEMENTS // (size * size)))
    with _single_threaded_blas():
      states, final_speeds, adam_steps, newton_iters = _search(
          step, seeds, x_star, jnp.asarray(tolerance, dtype), per_seed=per_seed,
          first_order_steps=max(first_order_steps, 0), learning_rate=learning_rate,
          newton_steps=max(newton_steps, 0), chunk=chunk)
    final_speeds = np.asarray(final_speeds, np.float64)
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

    # Stability from the spectral radius of J_rec at each point; how flat q is there (needed for slow points only)
    # from the eigenvalues near 1. One compiled call for all points (their number padded to a power of 2, so few
    # shapes compile); the eigenvalues on the host, except on an accelerator in float64, where a converged point's
    # radius comes from the device (spectral_radii) unless it is too near 1 to tell.
    candidate_speeds = final_speeds[candidates]
    radius, flatness = np.zeros(len(candidates)), np.zeros(len(candidates))
    if len(candidates):
      padded = np.concatenate([candidates, np.full(_bucket(len(candidates)) - len(candidates), candidates[0])])
      with _single_threaded_blas():
        j_rec = _recurrent_jacobians(step, jnp.asarray(states[padded]), x_star[padded] if per_seed else x_star,
                                     per_seed=per_seed)
        on_host = np.ones(len(candidates), bool)
        if dtype == np.float64 and jax.default_backend() != "cpu":
          radius, reliable = (np.array(x)[:len(candidates)] for x in spectral_radii(j_rec))
          radius = radius.astype(np.float64)
          on_host = (candidate_speeds > tolerance) | ~reliable | ~(np.abs(radius - 1.0) > DEVICE_RADIUS_MARGIN)
        if np.any(on_host):
          eigenvalues = _eigenvalues(np.asarray(j_rec, np.float64)[:len(candidates)][on_host])
          radius[on_host] = np.max(np.abs(eigenvalues), axis=1)
          flatness[on_host] = np.min(np.abs(1.0 - eigenvalues), axis=1)

    # Slow points within their own uncertainty (see SLOW_DUPLICATE_TOLERANCE) of a slower point join it.
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
    nearest_seed = np.array([np.min(np.linalg.norm(seeds_np - p, axis=1)) for p in points])
    outlier = nearest_seed > outlier_factor * reference

  return FixedPoints(points=points, speeds=point_speeds, converged=point_speeds <= tolerance,
                     slow=point_speeds > tolerance, outlier=outlier, stable=radius < 1.0, max_abs_eigenvalue=radius,
                     counts=counts, seed_points=states_np, seed_speeds=final_speeds, assignment=assignment,
                     tolerance=float(tolerance), slow_tolerance=float(slow_tolerance),
                     duplicate_distance=float(duplicate_distance),
                     slow_duplicate_distance=float(slow_duplicate_distance), scale=float(scale),
                     first_order_steps=adam_steps, newton_steps=newton_iters)
