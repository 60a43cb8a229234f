"""What the truncated estimators share: many problems at staggered inner steps, each advanced one truncation per
estimate and restarted at the end of its own episode.

An *episode* is one problem (a fresh key: instance, initialization, and for a task family its problem fields)
optimized from step 0 for ``length`` steps, a multiple of the truncation, so that episodes end exactly at truncation
boundaries: an estimate never straddles two episodes of one trajectory, and the per-episode accumulators of PES and
NRES reset at the start of an estimate. Episode lengths are drawn per problem, log-uniformly over the task's horizon
range and rounded to the truncation; the first episode of every trajectory is cut to a uniformly drawn number of
truncations, so that after a few estimates the problems are spread over all phases of training (staggered) instead
of all being at step 0 together.

The meta-loss of a truncation is the mean over its steps of the bounded ratio loss_t / loss_0 (or its log), loss_0
being the objective at the episode's first step: the same normalization by the initial loss as full unrolls use.
A trajectory whose ratio leaves [0, cap) or turns non-finite contributes ``cap`` and is restarted at the next
estimate, so a divergence never carries NaNs from one estimate into the next.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from lopt.meta import sharding
from lopt.meta.estimators.full_bptt import all_finite  # noqa: F401 (the estimators' one finiteness check)
from lopt.meta.unroll import InnerState, advance, init_inner
from lopt.optax_adapter import as_optax

RESTART_STREAM, LENGTH_STREAM, FIRST_LENGTH_STREAM, NOISE_STREAM = 1, 2, 3, 4  # fold_in data of the key streams


class Episode(NamedTuple):
  """One trajectory: its inner state, the episode's length (() int32, a multiple of the truncation), the objective
  at its first step (() float, NaN until measured) and whether it diverged in its last truncation (() bool)."""
  inner: InnerState
  length: jax.Array
  initial_loss: jax.Array
  diverged: jax.Array


@dataclass(frozen=True)
class Truncation:
  """How episodes are cut: ``truncation`` inner steps per estimate, episode lengths drawn log-uniformly from
  ``horizon_range`` (inclusive) and rounded to a multiple of the truncation (at least one truncation)."""
  truncation: int
  horizon_range: tuple[int, int]

  def draw_length(self, key: jax.Array) -> jax.Array:
    low, high = self.horizon_range
    if low == high:
      return jnp.asarray(self.rounded(low), jnp.int32)
    horizon = jnp.exp(jax.random.uniform(key, (), minval=math.log(low), maxval=math.log(high)))
    return (jnp.maximum(jnp.round(horizon / self.truncation), 1) * self.truncation).astype(jnp.int32)

  def rounded(self, horizon: int) -> int:
    return max(1, round(horizon / self.truncation)) * self.truncation

  def first_length(self, key: jax.Array) -> jax.Array:
    """A first episode of 1..n truncations (n of a full one), uniformly: the stagger."""
    full_key, cut_key = jax.random.split(key)
    full = self.draw_length(full_key) // self.truncation
    return (jax.random.randint(cut_key, (), 1, full + 1) * self.truncation).astype(jnp.int32)


def truncation_for(task, truncation: int | None, horizon: int | None) -> Truncation:
  """The episode schedule: the run's ``horizon`` when given, else the task's horizon range (a task family's
  ``traits["horizon_range"]``) or its horizon; ``truncation`` None means whole episodes (full unrolls)."""
  if horizon is not None:
    horizon_range = (horizon, horizon)
  else:
    horizon_range = tuple(task.traits.get("horizon_range", (task.horizon, task.horizon)))
  if truncation is None:
    return Truncation(horizon_range[1], (horizon_range[1], horizon_range[1]))
  return Truncation(truncation, horizon_range)


def start_episode(task, optimizer, theta, key: jax.Array, length: jax.Array) -> Episode:
  """A new problem ``key`` at step 0 (its optimizer state from ``theta``)."""
  inner = init_inner(task, as_optax(optimizer, theta), key)
  return Episode(inner, jnp.asarray(length, jnp.int32), jnp.asarray(jnp.nan, jnp.float32), jnp.zeros((), bool))


def select(flag: jax.Array, new, old):
  """``new`` where ``flag`` (a scalar) else ``old``, leaf by leaf (PRNG keys included)."""
  def pick(a, b):
    if jnp.issubdtype(a.dtype, jax.dtypes.prng_key):
      return jax.random.wrap_key_data(jnp.where(flag, jax.random.key_data(a), jax.random.key_data(b)))
    return jnp.where(flag, a, b)
  return jax.tree.map(pick, new, old)


def restart_finished(task, optimizer, theta, episode: Episode, key: jax.Array, schedule: Truncation) -> Episode:
  """``episode`` itself, or a new one (problem ``key``) if it reached its length or diverged."""
  finished = (episode.inner.step >= episode.length) | episode.diverged
  fresh = start_episode(task, optimizer, theta, key, schedule.draw_length(jax.random.fold_in(key, LENGTH_STREAM)))
  return select(finished, fresh, episode)


def first_episodes(task, optimizer, theta, slot_keys: jax.Array, schedule: Truncation, copies: int = 1) -> Episode:
  """(S * copies,) episodes: slot s's problem in ``copies`` consecutive trajectories (an antithetic pair, particles
  on one problem), with staggered first lengths."""
  def one(key):
    return start_episode(task, optimizer, theta, key, schedule.first_length(jax.random.fold_in(key, FIRST_LENGTH_STREAM)))
  return jax.vmap(one)(jnp.repeat(slot_keys, copies, axis=0))


def restart_keys(key: jax.Array, num_slots: int, copies: int = 1) -> jax.Array:
  """(num_slots * copies,) problem keys for this estimate's restarts: trajectories of one slot share a problem."""
  keys = jnp.repeat(jax.random.split(jax.random.fold_in(key, RESTART_STREAM), num_slots), copies, axis=0)
  return sharding.constrain(keys)  # split over the devices like the trajectories they restart


def bounded_ratio(losses: jax.Array, initial: jax.Array, cap: float) -> tuple[jax.Array, jax.Array]:
  """(T,) objective values and the episode's initial one -> (T,) ratios bounded to cap, and () diverged."""
  ratio = losses / initial
  ok = jnp.isfinite(ratio) & (ratio < cap)
  return jnp.where(ok, ratio, cap), ~jnp.all(ok)


def truncation_meta_loss(ratios: jax.Array, kind: str) -> jax.Array:
  """Mean of the bounded ratios ('mean'), or of their logs ('log_mean', Metz 2019's log scaling). (T,) -> ()."""
  if kind == "log_mean":
    return jnp.mean(jnp.log(jnp.maximum(ratios, 1e-12)))
  return jnp.mean(ratios)


@dataclass(frozen=True)
class Unroller:
  """Advances one trajectory by one truncation and scores it: the piece every truncated estimator differentiates
  (truncated backpropagation) or evaluates at perturbed meta-parameters (evolution strategies)."""
  task: Any
  optimizer: Any
  schedule: Truncation
  meta_loss: str = "mean"
  loss_cap: float = 10.0
  objective: str = "train"
  remat: bool = False
  first_order: bool = False
  valid_every: int = 0
  valid_withheld: float = 0.0

  @classmethod
  def from_values(cls, task, optimizer, values: dict, horizon: int | None) -> "Unroller":
    """From an estimator's validated fields (``remat`` and ``meta_gradient`` only where it backpropagates)."""
    return cls(task, optimizer, truncation_for(task, values["truncation"], horizon), values["meta_loss"],
               values["loss_cap"], values["objective"], values.get("remat", False),
               values.get("meta_gradient") == "first_order", values.get("valid_every", 0),
               values.get("valid_withheld", 0.0))

  def __call__(self, theta, episode: Episode) -> tuple[jax.Array, Episode]:
    """(meta-loss of this truncation (), the episode after it); differentiable in theta. The optimizer gets the
    episode's length as its ``num_steps`` hint, and a validation loss every ``valid_every`` steps."""
    inner, measured = self.advance_inner(theta, episode)
    return self.score(episode, inner, measured)

  def measured(self, theta, episode: Episode) -> tuple[jax.Array, Episode, jax.Array]:
    """``__call__`` that also returns the (T,) log RMS of each step's update (``unroll.log_update_rms``): (meta-loss
    (), the episode after it, log RMS (T,))."""
    inner, (measured, log_rms) = self.advance_inner(theta, episode, measure_update=True)
    meta_loss, episode = self.score(episode, inner, measured)
    return meta_loss, episode, log_rms

  def advance_inner(self, theta, episode: Episode, *, measure_update: bool = False):
    """``unroll.advance`` of ``episode`` by one truncation under theta, with this unroller's settings."""
    return advance(self.task, as_optax(self.optimizer, theta), episode.inner, self.schedule.truncation,
                   remat=self.remat, first_order=self.first_order, valid=self.objective == "valid",
                   valid_every=self.valid_every, horizon=episode.length, valid_withheld=self.valid_withheld,
                   measure_update=measure_update)

  def score(self, episode: Episode, inner: InnerState, measured: jax.Array) -> tuple[jax.Array, Episode]:
    """The meta-loss () of a truncation that took ``episode`` to ``inner``, from what ``advance`` measured, and the
    episode after it (its initial loss set at step 0, its divergence flag)."""
    losses = measured[:, 1] if self.objective == "valid" else measured
    initial = jax.lax.stop_gradient(jnp.where(episode.inner.step == 0, losses[0], episode.initial_loss))
    ratios, diverged = bounded_ratio(losses, initial, self.loss_cap)
    return truncation_meta_loss(ratios, self.meta_loss), Episode(inner, episode.length, initial, diverged)


def masked_mean(per_trajectory, keep: jax.Array):
  """Mean over the leading axis of a pytree, over the entries where ``keep`` (N,) holds (0 when none does)."""
  count = jnp.maximum(jnp.sum(keep), 1)
  def mean(x):
    mask = keep.reshape((-1,) + (1,) * (x.ndim - 1))
    return jnp.sum(jnp.where(mask, x, 0.0), axis=0) / count
  return jax.tree.map(mean, per_trajectory)


def l2_penalty_gradient(theta, weight: float):
  """Gradient of weight * ||theta||_2 (the meta-objective's penalty, as full backpropagation adds it)."""
  norm = jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(theta)))
  return jax.tree.map(lambda x: weight * x / jnp.maximum(norm, 1e-30), theta)


class Metrics(NamedTuple):
  meta_loss: jax.Array          # mean meta-loss of the truncations unrolled (at the unperturbed or mean theta)
  diverged_problems: jax.Array  # trajectories that diverged in this truncation (restarted next time)
  dropped_problems: jax.Array   # trajectories left out of the gradient (non-finite)
  num_problems: int             # trajectories per estimate (static)
  extra: Any = None             # {name: () mean over the trajectories} of optional terms (logged as they are), or None
