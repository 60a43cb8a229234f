"""Antithetic evolution strategies over truncations, and what PES and NRES share with it.

Every problem is optimized by ``num_particles`` antithetic pairs: trajectory + with theta + eps, trajectory - with
theta - eps, both from the same problem (common random numbers), eps ~ N(0, sigma^2 I). Per pair the estimate is

  g = (L+ - L-) / (2 sigma^2) * w

where L+- are the truncation's meta-losses and w the pair's *weight vector*; the estimators differ only in which
perturbation a truncation uses and which weight it multiplies (a ``NoiseRule``):

  es    a fresh eps per truncation, w = eps. With whole episodes (``truncation`` null) this is full-unroll ES, an
        unbiased estimate of the gradient of the Gaussian-smoothed meta-loss; with truncations it ignores what
        earlier perturbations did to later losses (biased, like truncated backpropagation).
  pes   (pes.py) a fresh eps per truncation, w = the sum of the pair's eps since its episode began (Vicol et al.
        2021): unbiased for the smoothed loss of the whole episode; variance grows with the truncations elapsed.
  nres  (nres.py) one eps per pair per episode, reused by all its truncations, w = that eps (Li et al. 2023):
        unbiased, variance constant in the number of truncations.

Gradients need no backpropagation: the cost is two forward unrolls per pair.

With ``reference_learning_rates`` (ours), every pair's problem is also optimized by Adam at each of those learning
rates, from the same initialization on the same batches, restarted with the pair. A pair's term is divided by the
best reference's meta-loss on the same truncation (floored at REFERENCE_FLOOR) and the divisors are normalized to
mean 1 over the estimate's pairs: the meta-objective becomes the learned optimizer's loss relative to a tuned Adam's,
problem by problem, as ``lopt benchmark`` scores it, instead of a normalized loss in which the problems that any
optimizer drives low barely count. Each reference costs one more unroll per pair.

With ``step_calibration`` = lambda > 0 as well (ours), the references also say how large a step the problem wants:
each trajectory's objective gets the term

  lambda * mean over the truncation's steps of (r_t - r*_t)^2

r_t the log RMS of the learned optimizer's update at step t (``unroll.log_update_rms``), r*_t that of the pair's
best reference (the lowest meta-loss on this truncation) at the same step, both bounded to LOG_RMS_BOUNDS. The
relative weight divides the loss only: the term is already scale-free (log units), and dividing it by the best
reference's loss would let the problems Adam solves outright dominate the regression. A pair's estimate is then
(O+ - O-) / (2 sigma^2) * w with O = (relative weight) * L + term. The term is a smooth function of theta (no
loss noise, no chaos over 20-50 steps), so it gives ES a dense signal on the step size that the loss alone does not.

Which reference is the best (``reference_window``): by default the one with the lowest meta-loss on this truncation.
With ``reference_window="episode"`` it is the one with the lowest sum of meta-losses since the episode began, as a
tuner picks one learning rate for a whole run: the target step then follows one learning rate through an episode
instead of switching with each truncation's noise, and later in an episode it is chosen over a longer horizon than
one truncation, which counters the short-horizon bias toward small steps. The weight divides by that reference's
meta-loss on this truncation. The sums live in the estimator state (``scores``, (pairs, R)).

What divides the weight (``weight_window``): by default that reference's meta-loss on this truncation, so every
truncation of a run weighs alike, its late, small losses as much as its first. The mean loss over a run, which
``lopt benchmark`` compares, weighs them by their size instead: the ratio of two runs' sums is the ratios of their
truncations weighted by the reference's loss on each. With ``weight_window="episode"`` the divisor is the reference's
mean meta-loss per truncation since the episode began: a run's first truncation weighs its full ratio and later ones
their ratio times their share of the run's losses so far (causal: the rest of the run is not known yet).

A soft count of lost problems (``win_temperature`` = tau > 0, ours; antithetic estimators, ``reference_window=
"episode"``): ``lopt benchmark`` counts the problems where the learned optimizer's mean loss over a run is below
tuned Adam's, so a problem lost 10x counts as one lost by 1%. A mean of relative losses is dominated by the few
problems lost badly; this objective counts them instead. Each member's objective on a truncation is

  g_k - g_(k-1),   g_k = sigmoid(log(S_k / R_k) / tau)

S_k the member's meta-losses summed since the episode began, R_k the best reference's sum (the lowest; floored at
REFERENCE_FLOOR per truncation), g_0 = 1/2. Over an episode the terms telescope to g_K - 1/2: NRES (one perturbation
per episode) and PES estimate the gradient of the smoothed soft loss of the whole run so far, g near 0 where the
learned optimizer wins by far, 1 where it loses by far, 1/2 at a tie; a problem far from a tie hardly moves the
estimate (tau 0.1: a 10% gap is sigmoid(0.95) = 0.72). The relative weight is then not used.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from lopt.meta import sharding
from lopt.meta.estimators import REFERENCE_WINDOWS
from lopt.meta.estimators.truncated import (NOISE_STREAM, Episode, Metrics, Unroller, first_episodes,
                                            l2_penalty_gradient, masked_mean, restart_finished, restart_keys)
from lopt.meta.unroll import advance, init_inner

SIGNS = jnp.array([1.0, -1.0])
# A reference meta-loss below this counts as this: a problem Adam solves outright weighs at most 1 / REFERENCE_FLOOR
# times one it cannot improve, so that a few solved problems do not drown the estimate.
REFERENCE_FLOOR = 0.01
# The log update RMS the calibration compares is bounded to [log 1e-8, log 1e2]: an all-zero update (-inf) or a
# diverged one (inf, NaN: the upper bound) counts as a large but finite gap, never a non-finite objective. Adam's
# steps lie far inside (about its learning rate); the bounds only catch the degenerate cases.
LOG_RMS_BOUNDS = (math.log(1e-8), math.log(1e2))


class AntitheticState(NamedTuple):
  """episodes: Episode with leading axes (pairs, 2) (+ and - member); noise: the rule's per-pair state (a pytree
  like theta with a leading pairs axis, or ())."""
  episodes: Any
  noise: Any


@dataclass(frozen=True)
class NoiseRule:
  """``init(eps) -> noise state`` from a (pairs, ...) draw; ``apply(noise state, eps, starting) -> (noise state,
  perturbation used, weight)``, ``starting`` (pairs,) True where a pair's episode starts with this truncation."""
  name: str
  init: Callable
  apply: Callable


def where_pairs(flag, a, b):
  """``a`` where ``flag`` (pairs,) else ``b``, for pytrees with a leading pairs axis."""
  return jax.tree.map(lambda x, y: jnp.where(flag.reshape((-1,) + (1,) * (x.ndim - 1)), x, y), a, b)


ES_RULE = NoiseRule("es", init=lambda eps: (), apply=lambda state, eps, starting: (state, eps, eps))


class ReferencedState(NamedTuple):
  """AntitheticState with reference_learning_rates: references, an Episode with leading axes (pairs, R) of Adam at
  each reference learning rate on the pair's problem; scores (pairs, R) their meta-losses summed since the episode
  began (``reference_window="episode"``; None otherwise, so that older checkpoints still match); learned_sums
  likewise, with ``win_temperature`` only."""
  episodes: Any
  noise: Any
  references: Any
  scores: Any = None
  learned_sums: Any = None  # (pairs, 2) the members' meta-losses summed since the episode began (win_temperature)


def reference_optimizer():
  """Adam whose learning rate lives in its state (so R of them vmap as one), ignoring the learned optimizers'
  extra arguments (value=, valid_loss=, num_steps=)."""
  return optax.with_extra_args_support(optax.inject_hyperparams(optax.adam)(learning_rate=1e-3))


def relative_weights(best: jax.Array) -> jax.Array:
  """(pairs,) best reference meta-losses -> (pairs,) weights 1 / max(best, REFERENCE_FLOOR), normalized to mean 1
  (non-finite references count as the floor)."""
  inverse = 1.0 / jnp.maximum(jnp.where(jnp.isfinite(best), best, REFERENCE_FLOOR), REFERENCE_FLOOR)
  return inverse / jnp.mean(inverse)


def bounded_log_rms(log_rms: jax.Array) -> jax.Array:
  """Log RMS values (any shape) bounded to LOG_RMS_BOUNDS, NaN (a diverged update) as the upper bound."""
  low, high = LOG_RMS_BOUNDS
  return jnp.clip(jnp.where(jnp.isnan(log_rms), high, log_rms), low, high)


def initial_scores(problems: int, learning_rates: tuple, window: str) -> jax.Array | None:
  """(problems, R) zero sums where ``window`` is "episode"; None otherwise (the state then has no such leaves)."""
  return jnp.zeros((problems, len(learning_rates)), jnp.float32) if window == "episode" else None


def episode_scores(scores: jax.Array, meta_losses: jax.Array, starting: jax.Array) -> jax.Array:
  """(pairs, R) sums of the references' meta-losses since their episode began, this truncation's (pairs, R) and
  ``starting`` (pairs,) -> the sums after this truncation (a non-finite meta-loss counts as inf)."""
  losses = jnp.where(jnp.isnan(meta_losses), jnp.inf, meta_losses)
  return jnp.where(starting[:, None], 0.0, scores) + losses


class BestReference(NamedTuple):
  """Per pair: index (pairs,) of its best reference, meta_loss (pairs,) that reference's on this truncation."""
  index: jax.Array
  meta_loss: jax.Array


def best_reference(reference_losses: jax.Array, scores: jax.Array | None = None) -> BestReference:
  """(pairs, R) reference meta-losses of this truncation -> the best reference of each pair: the lowest
  ``scores`` (pairs, R) where given (the episode's sums), else the lowest meta-loss; on a tie the first listed."""
  if scores is None:
    return BestReference(jnp.argmin(reference_losses, axis=1), jnp.min(reference_losses, axis=1))
  index = jnp.argmin(scores, axis=1)
  return BestReference(index, jnp.take_along_axis(reference_losses, index[:, None], axis=1)[:, 0])


def weight_divisors(best: BestReference, scores: jax.Array | None, steps: jax.Array, truncation: int,
                    window: str) -> jax.Array:
  """(pairs,) what divides each pair's relative weight: its best reference's meta-loss on this truncation
  ("truncation"), or that reference's mean meta-loss per truncation since the episode began ("episode": ``scores``
  (pairs, R) the sums after this truncation, ``steps`` (pairs,) the inner step it started at). Under "episode" the
  truncations of a run weigh as they weigh in its mean loss: the first, at high losses, most."""
  if window == "truncation":
    return best.meta_loss
  count = steps // truncation + 1
  return jnp.take_along_axis(scores, best.index[:, None], axis=1)[:, 0] / count.astype(scores.dtype)


def soft_losses(sums: jax.Array, reference_sums: jax.Array, count: jax.Array, temperature: float) -> jax.Array:
  """(pairs, 2) the members' summed meta-losses, (pairs, R) the references' sums over the same ``count`` (pairs,)
  truncations -> (pairs, 2) sigmoid(log(sums / best reference's) / temperature): 1/2 a tie, 1 lost by far. A
  non-finite sum counts as lost."""
  best = jnp.maximum(jnp.min(reference_sums, axis=1), REFERENCE_FLOOR * count.astype(sums.dtype))
  ratio = jnp.where(jnp.isnan(sums), jnp.inf, sums) / best[:, None]
  return jax.nn.sigmoid(jnp.log(jnp.maximum(ratio, 1e-30)) / temperature)


class SoftCount(NamedTuple):
  """One truncation of the soft count: objective (pairs, 2) g_k - g_(k-1) per member; sums (pairs, 2) the members'
  meta-losses since the episode began, this truncation's included; soft (pairs, 2) g_k."""
  objective: jax.Array
  sums: jax.Array
  soft: jax.Array


def soft_count_terms(sums: jax.Array, meta_losses: jax.Array, scores: jax.Array, new_scores: jax.Array,
                     steps: jax.Array, truncation: int, temperature: float) -> SoftCount:
  """The members' sums before this truncation (pairs, 2) and its meta-losses (pairs, 2); the references' sums
  before (pairs, R; stale where an episode starts) and after it; ``steps`` (pairs,) the inner step it started at
  (0: the episode starts) -> the truncation's SoftCount (module docstring)."""
  starting = steps == 0
  count = steps // truncation
  before = jnp.where(starting[:, None], 0.0, sums)
  after = before + jnp.where(jnp.isnan(meta_losses), jnp.inf, meta_losses)
  previous = jnp.where(starting[:, None], 0.5, soft_losses(before, scores, count, temperature))
  soft = soft_losses(after, new_scores, count + 1, temperature)
  return SoftCount(soft - previous, after, soft)


def best_reference_log_rms(reference_log_rms: jax.Array, best: jax.Array) -> jax.Array:
  """(pairs, R, T) the references' log update RMS and (pairs,) the best one's index -> (pairs, T) its log RMS."""
  return jnp.take_along_axis(reference_log_rms, best[:, None, None], axis=1)[:, 0]


def step_gaps(learned_log_rms: jax.Array, target_log_rms: jax.Array) -> jax.Array:
  """Learned log update RMS (N, ..., T) and the best reference's (N, T) -> (N, ..., T) learned - reference, both
  bounded (positive: the learned optimizer steps larger). The axes between N and T (an antithetic pair's 2
  members) share their problem's target; (T,) and (T,) is one trajectory."""
  target = bounded_log_rms(target_log_rms)
  if learned_log_rms.ndim > target.ndim:
    target = jnp.expand_dims(target, tuple(range(1, 1 + learned_log_rms.ndim - target.ndim)))
  return bounded_log_rms(learned_log_rms) - target


def step_calibration_terms(gaps: jax.Array) -> jax.Array:
  """(pairs, 2, T) gaps -> (pairs, 2) their mean square over the truncation (before the factor lambda)."""
  return jnp.mean(jnp.square(gaps), axis=-1)


def start_references(unroll, learning_rates: tuple, keys: jax.Array, lengths: jax.Array):
  """(N,) problem keys and episode lengths -> (N, R) Adam episodes at step 0 on each problem, one per reference
  learning rate."""
  adam = reference_optimizer()

  def one(key, length, learning_rate):
    inner = init_inner(unroll.task, adam, key)
    hyperparams = {**inner.opt_state.hyperparams, "learning_rate": learning_rate}
    inner = inner._replace(opt_state=inner.opt_state._replace(hyperparams=hyperparams))
    return Episode(inner, length, jnp.asarray(jnp.nan, jnp.float32), jnp.zeros((), bool))
  per_problem = jax.vmap(one, in_axes=(None, None, 0))
  return jax.vmap(per_problem, in_axes=(0, 0, None))(keys, lengths, jnp.asarray(learning_rates, jnp.float32))


class ReferenceTruncation(NamedTuple):
  """What one truncation of the (N, R) references gives: meta_losses (N, R); log_rms (N, R, T) the log RMS of each
  step's update (None unless measured); references (N, R) advanced."""
  meta_losses: jax.Array
  log_rms: jax.Array | None
  references: Any


def advance_references(unroll, learning_rates: tuple, references, keys: jax.Array, lengths: jax.Array,
                       starting: jax.Array, *, measure_update: bool = False) -> ReferenceTruncation:
  """(N, R) references restarted where their problem's episode starts (``starting`` (N,); ``keys``, ``lengths``
  (N,) the problems), then advanced one truncation and scored as the learned optimizer's truncations are."""
  references = where_pairs(starting, start_references(unroll, learning_rates, keys, lengths), references)

  def one(reference):
    inner, out = advance(unroll.task, reference_optimizer(), reference.inner, unroll.schedule.truncation,
                         valid=unroll.objective == "valid", measure_update=measure_update)
    measured, log_rms = out if measure_update else (out, None)
    meta_loss, reference = unroll.score(reference, inner, measured)
    return ReferenceTruncation(meta_loss, log_rms, reference)
  return jax.vmap(jax.vmap(one))(references)


def advance_and_pick_references(unroll, learning_rates: tuple, window: str, weight_window: str, references, scores,
                                keys: jax.Array, lengths: jax.Array, steps: jax.Array, *,
                                measure_update: bool = False):
  """``advance_references`` from ``steps`` (N,) (0: the problem's episode starts), then each problem's best reference
  under ``window`` and its relative weight under ``weight_window`` -> (ReferenceTruncation, BestReference, the scores
  after it: (N, R) sums since the episode began for "episode", else None, weights (N,))."""
  truncation = advance_references(unroll, learning_rates, references, keys, lengths, steps == 0,
                                  measure_update=measure_update)
  if window == "episode":
    scores = episode_scores(scores, truncation.meta_losses, steps == 0)
  best = best_reference(truncation.meta_losses, scores)
  divisors = weight_divisors(best, scores, steps, unroll.schedule.truncation, weight_window)
  return truncation, best, scores, relative_weights(divisors)


@dataclass(frozen=True)
class Antithetic:
  """``lopt.api.GradientEstimator`` by antithetic perturbations of theta (see the module docstring)."""
  unroll: Unroller
  rule: NoiseRule
  num_tasks: int
  num_particles: int = 1
  sigma: float = 0.01
  l2_penalty: float = 0.0
  perturb_mask: tuple | None = None  # per leaf of theta (flattening order): False leaves are never perturbed
  reference_learning_rates: tuple = ()  # Adam references weighting each pair (see the module docstring)
  step_calibration: float = 0.0  # lambda of the step-calibration term (needs references; 0: off)
  reference_window: str = "truncation"  # which reference is the best: on this truncation or on the episode so far
  weight_window: str = "truncation"  # what divides the relative weight: that truncation's or the episode's mean
  win_temperature: float = 0.0  # tau of the soft count of lost problems (0: off, the relative objective)

  def __post_init__(self):
    check_references(self)

  @property
  def num_pairs(self) -> int:
    return self.num_tasks * self.num_particles

  @property
  def inner_steps_per_estimate(self) -> int:
    return (2 + len(self.reference_learning_rates)) * self.num_pairs * self.unroll.schedule.truncation

  def draw(self, theta, key):
    """(pairs, ...) eps ~ N(0, sigma^2 I) like theta."""
    leaves, treedef = jax.tree.flatten(theta)
    keys = jax.random.split(key, len(leaves))
    mask = self.perturb_mask or (True,) * len(leaves)
    # Drawn where the pairs live: each device generates only its pairs' noise.
    return sharding.constrain(jax.tree.unflatten(treedef, [
        self.sigma * jax.random.normal(k, (self.num_pairs,) + x.shape, x.dtype) if perturb
        else jnp.zeros((self.num_pairs,) + x.shape, x.dtype) for k, x, perturb in zip(keys, leaves, mask)]))

  def init(self, theta, key):
    u = self.unroll
    pairs = first_episodes(u.task, u.optimizer, theta, jax.random.split(key, self.num_tasks), u.schedule,
                           copies=self.num_particles)
    episodes = jax.tree.map(lambda x: jnp.stack([x, x], axis=1), pairs)  # both members start alike
    noise = self.rule.init(self.draw(theta, jax.random.fold_in(key, NOISE_STREAM)))
    if not self.reference_learning_rates:
      return AntitheticState(episodes, noise)
    scores = initial_scores(self.num_pairs, self.reference_learning_rates, self.reference_window)
    sums = jnp.zeros((self.num_pairs, 2), jnp.float32) if self.win_temperature else None
    return ReferencedState(episodes, noise, self.start_references(episodes), scores, sums)

  def start_references(self, episodes):
    """(pairs, R) Adam episodes at step 0 on each pair's problem, of its episode's length."""
    return start_references(self.unroll, self.reference_learning_rates, episodes.inner.key[:, 0],
                            episodes.length[:, 0])

  def advance_references(self, state: ReferencedState, episodes, *, measure_update: bool = False):
    """``advance_and_pick_references`` for the pairs' problems (their + members say where an episode starts)."""
    return advance_and_pick_references(self.unroll, self.reference_learning_rates, self.reference_window,
                                       self.weight_window, state.references, state.scores, episodes.inner.key[:, 0],
                                       episodes.length[:, 0], episodes.inner.step[:, 0],
                                       measure_update=measure_update)

  def prepare(self, theta, state: AntitheticState, key):
    """Restarts finished pairs (both members together), applies the noise rule: (episodes, noise state,
    perturbations (pairs, ...), weights (pairs, ...))."""
    u = self.unroll
    episodes = state.episodes
    pair_diverged = jnp.any(episodes.diverged, axis=1, keepdims=True)
    episodes = episodes._replace(diverged=jnp.broadcast_to(pair_diverged, episodes.diverged.shape))
    keys = restart_keys(key, self.num_tasks, copies=self.num_particles)
    restart = jax.vmap(jax.vmap(restart_finished, in_axes=(None, None, None, 0, None, None)),
                       in_axes=(None, None, None, 0, 0, None))
    episodes = restart(u.task, u.optimizer, theta, episodes, keys, u.schedule)
    starting = episodes.inner.step[:, 0] == 0
    noise, used, weight = self.rule.apply(state.noise, self.draw(theta, jax.random.fold_in(key, NOISE_STREAM)),
                                          starting)
    return episodes, noise, used, weight

  def perturbed(self, theta, used):
    """(pairs, 2, ...) meta-parameters theta + eps and theta - eps."""
    return jax.tree.map(lambda t, e: t + SIGNS.reshape((1, 2) + (1,) * t.ndim) * e[:, None], theta, used)

  def counted(self, state, meta_losses: jax.Array, scores: jax.Array | None, steps: jax.Array):
    """With ``win_temperature``: the soft count's (objective (pairs, 2), the members' sums after this truncation,
    {"soft_losses": the mean g_k}), from ``scores`` (pairs, R) the references' sums after it and ``steps`` (pairs,)
    where it started; otherwise (``meta_losses``, None, {})."""
    if not self.win_temperature:
      return meta_losses, None, {}
    count = soft_count_terms(state.learned_sums, meta_losses, state.scores, scores, steps,
                             self.unroll.schedule.truncation, self.win_temperature)
    return count.objective, count.sums, {"soft_losses": jnp.mean(count.soft)}

  def estimate(self, theta, state: AntitheticState | ReferencedState, key):
    if self.step_calibration > 0:
      return self.calibrated_estimate(theta, state, key)
    episodes, noise, used, weight = self.prepare(theta, state, key)
    steps, scores = episodes.inner.step[:, 0], None
    if self.reference_learning_rates:
      truncation, best, scores, pair_weights = self.advance_references(state, episodes)
      if not self.win_temperature:
        weight = jax.tree.map(lambda w: pair_weights.reshape((-1,) + (1,) * (w.ndim - 1)) * w, weight)
    meta_losses, episodes = jax.vmap(jax.vmap(self.unroll))(self.perturbed(theta, used), episodes)
    objective, sums, extra = self.counted(state, meta_losses, scores, steps)
    per_pair = es_terms(objective, weight, self.sigma)
    finite = jnp.isfinite(objective[:, 0] - objective[:, 1])
    grads = jax.tree.map(jnp.add, masked_mean(per_pair, finite), l2_penalty_gradient(theta, self.l2_penalty))
    metrics = Metrics(jnp.mean(meta_losses), jnp.sum(episodes.diverged), 2 * (self.num_pairs - jnp.sum(finite)),
                      2 * self.num_pairs, extra or None)
    if self.reference_learning_rates:
      return ReferencedState(episodes, noise, truncation.references, scores, sums), grads, metrics
    return AntitheticState(episodes, noise), grads, metrics

  def calibrated_estimate(self, theta, state: ReferencedState, key):
    """``estimate`` with the step-calibration term (module docstring): each trajectory's objective is its relative
    meta-loss plus lambda times its mean squared log-step gap to the pair's best reference. Metrics.extra holds
    the term's mean before lambda (``step_calibration``) and the mean signed gap (``step_log_gap``, in nats:
    positive, the learned optimizer steps larger than the best reference)."""
    episodes, noise, used, weight = self.prepare(theta, state, key)
    steps = episodes.inner.step[:, 0]
    truncation, best, scores, pair_weights = self.advance_references(state, episodes, measure_update=True)
    meta_losses, episodes, learned_log_rms = jax.vmap(jax.vmap(self.unroll.measured))(
        self.perturbed(theta, used), episodes)
    gaps = step_gaps(learned_log_rms, best_reference_log_rms(truncation.log_rms, best.index))
    terms = step_calibration_terms(gaps)
    losses, sums, extra = self.counted(state, meta_losses, scores, steps)
    if not self.win_temperature:
      losses = pair_weights[:, None] * meta_losses
    objective = losses + self.step_calibration * terms
    per_pair = es_terms(objective, weight, self.sigma)
    finite = jnp.isfinite(objective[:, 0] - objective[:, 1])
    grads = jax.tree.map(jnp.add, masked_mean(per_pair, finite), l2_penalty_gradient(theta, self.l2_penalty))
    metrics = Metrics(jnp.mean(meta_losses), jnp.sum(episodes.diverged), 2 * (self.num_pairs - jnp.sum(finite)),
                      2 * self.num_pairs,
                      {"step_calibration": jnp.mean(terms), "step_log_gap": jnp.mean(gaps), **extra})
    return ReferencedState(episodes, noise, truncation.references, scores, sums), grads, metrics


def check_references(estimator) -> None:
  """ValueError for reference fields that do not fit together (an estimator with references' fields)."""
  if estimator.step_calibration and not estimator.reference_learning_rates:
    raise ValueError("step_calibration needs reference_learning_rates: the step it calibrates to is the best "
                     "reference's")
  for name in ("reference_window", "weight_window"):
    if getattr(estimator, name) not in REFERENCE_WINDOWS:
      raise ValueError(f"{name} {getattr(estimator, name)!r}: expected one of {list(REFERENCE_WINDOWS)}")
  if getattr(estimator, "win_temperature", 0.0) and (not estimator.reference_learning_rates
                                                      or estimator.reference_window != "episode"):
    raise ValueError("win_temperature needs reference_learning_rates and reference_window 'episode' (the episode's "
                     "sums of the references' meta-losses)")
  if estimator.weight_window == "episode" and estimator.reference_window != "episode":
    raise ValueError("weight_window 'episode' needs reference_window 'episode' (the episode's sums of the "
                     "references' meta-losses)")


def es_terms(meta_losses: jax.Array, weight, sigma: float):
  """(pairs, 2) meta-losses and (pairs, ...) weights -> (pairs, ...) (L+ - L-) / (2 sigma^2) * w."""
  scale = (meta_losses[:, 0] - meta_losses[:, 1]) / (2 * sigma**2)
  return jax.tree.map(lambda w: scale.reshape((-1,) + (1,) * (w.ndim - 1)) * w, weight)


def build_antithetic(rule: NoiseRule, task, optimizer, values: dict, horizon: int | None) -> Antithetic:
  """The registry's constructors for es / pes / nres: validated fields -> Antithetic."""
  return Antithetic(Unroller.from_values(task, optimizer, values, horizon), rule, values["meta_batch_size"],
                    values["num_particles"], values["sigma"], values["l2_penalty"],
                    reference_learning_rates=tuple(values.get("reference_learning_rates", ())),
                    step_calibration=values.get("step_calibration", 0.0),
                    reference_window=values.get("reference_window", "truncation"),
                    weight_window=values.get("weight_window", "truncation"),
                    win_temperature=values.get("win_temperature", 0.0))


def build(task, optimizer, values: dict, horizon: int | None) -> Antithetic:
  return build_antithetic(ES_RULE, task, optimizer, values, horizon)
