"""Truncated backpropagation through time: the gradient of each truncation's meta-loss, the carried inner state
held constant.

Cheap and low-variance, and biased toward short horizons: what an update does to losses beyond the truncation is
invisible to it (the short-horizon bias; Wu et al. 2018, Metz et al. 2019). A trajectory whose gradient is not finite
is left out (counted as dropped).

With ``reference_learning_rates`` and ``step_calibration`` (ours; es.py's module docstring) every problem is also
optimized by Adam at those rates, and each trajectory's objective becomes

  O = w * L + lambda * mean over the truncation's steps of (r_t - r*_t)^2,

w the problem's relative weight (1 / its best reference's meta-loss, normalized to mean 1), r_t the log RMS of the
learned update and r*_t the best reference's (the best on this truncation, or with ``reference_window="episode"``
on the episode so far: es.py's module docstring). Backpropagated, the term is an exact, dense regression of the step
size on the problem's best one, where ES gets only a noisy estimate of it for thousands of meta-parameters; it also
counters the short-horizon bias toward small steps.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from lopt.meta.estimators.es import (advance_and_pick_references, best_reference_log_rms, check_references,
                                     initial_scores, start_references, step_gaps)
from lopt.meta.estimators.truncated import (Metrics, Unroller, all_finite, first_episodes, l2_penalty_gradient,
                                            masked_mean, restart_finished, restart_keys)


class ReferencedEpisodes(NamedTuple):
  """The state with references: episodes (N,) and, per problem, its Adam references (N, R) and their meta-losses
  summed since the episode began (N, R) (``reference_window="episode"``; None otherwise)."""
  episodes: Any
  references: Any
  scores: Any = None


@dataclass(frozen=True)
class TruncatedBPTT:
  """``lopt.api.GradientEstimator``: ``num_tasks`` problems at staggered steps, each advanced ``unroll.schedule``'s
  truncation per estimate; the meta-gradient is the mean over problems of d(truncation meta-loss)/d theta."""
  unroll: Unroller
  num_tasks: int
  l2_penalty: float = 0.0
  reference_learning_rates: tuple = ()  # Adam references weighting each problem (es.py's module docstring)
  step_calibration: float = 0.0  # lambda of the step-calibration term (needs references; 0: off)
  reference_window: str = "truncation"  # which reference is the best: on this truncation or on the episode so far
  weight_window: str = "truncation"  # what divides the relative weight: that truncation's or the episode's mean

  def __post_init__(self):
    check_references(self)

  @property
  def inner_steps_per_estimate(self) -> int:
    return (1 + len(self.reference_learning_rates)) * self.num_tasks * self.unroll.schedule.truncation

  def init(self, theta, key):
    """(num_tasks,) episodes with staggered first lengths (and their references, where there are any)."""
    u = self.unroll
    episodes = first_episodes(u.task, u.optimizer, theta, jax.random.split(key, self.num_tasks), u.schedule)
    if not self.reference_learning_rates:
      return episodes
    scores = initial_scores(self.num_tasks, self.reference_learning_rates, self.reference_window)
    return ReferencedEpisodes(episodes, start_references(u, self.reference_learning_rates, episodes.inner.key,
                                                        episodes.length), scores)

  def estimate(self, theta, state, key):
    u = self.unroll
    episodes = state.episodes if self.reference_learning_rates else state
    keys = restart_keys(key, self.num_tasks)
    episodes = jax.vmap(restart_finished, in_axes=(None, None, None, 0, 0, None))(
        u.task, u.optimizer, theta, episodes, keys, u.schedule)
    episodes = jax.lax.stop_gradient(episodes)
    if self.reference_learning_rates:
      return self.referenced_estimate(theta, state, episodes)
    grad = jax.vmap(jax.value_and_grad(u, has_aux=True), in_axes=(None, 0))
    (meta_losses, episodes), grads = grad(theta, episodes)
    finite = jax.vmap(all_finite)(grads)
    mean = masked_mean(grads, finite)
    penalty = l2_penalty_gradient(theta, self.l2_penalty)
    metrics = Metrics(jnp.mean(meta_losses), jnp.sum(episodes.diverged), self.num_tasks - jnp.sum(finite),
                      self.num_tasks)
    return episodes, jax.tree.map(jnp.add, mean, penalty), metrics

  def referenced_estimate(self, theta, state: ReferencedEpisodes, episodes):
    """``estimate`` relative to the references, with the step-calibration term where lambda > 0. Metrics.extra
    then holds the term's mean before lambda (``step_calibration``) and the mean signed gap (``step_log_gap``, in
    nats: positive, the learned optimizer steps larger than the best reference)."""
    u, calibrating = self.unroll, self.step_calibration > 0
    truncation, best, scores, weights = advance_and_pick_references(
        u, self.reference_learning_rates, self.reference_window, self.weight_window, state.references, state.scores,
        episodes.inner.key, episodes.length, episodes.inner.step, measure_update=calibrating)
    targets = (best_reference_log_rms(truncation.log_rms, best.index) if calibrating
               else jnp.zeros((self.num_tasks, 0), jnp.float32))

    def objective(theta, episode, weight, target):
      if not calibrating:
        meta_loss, episode = u(theta, episode)
        return weight * meta_loss, (meta_loss, episode, jnp.zeros(()), jnp.zeros(()))
      meta_loss, episode, log_rms = u.measured(theta, episode)
      gaps = step_gaps(log_rms, target)
      term = jnp.mean(jnp.square(gaps))
      return weight * meta_loss + self.step_calibration * term, (meta_loss, episode, term, jnp.mean(gaps))

    grad = jax.vmap(jax.value_and_grad(objective, has_aux=True), in_axes=(None, 0, 0, 0))
    (_, (meta_losses, episodes, terms, gaps)), grads = grad(theta, episodes, weights, targets)
    finite = jax.vmap(all_finite)(grads)
    grads = jax.tree.map(jnp.add, masked_mean(grads, finite), l2_penalty_gradient(theta, self.l2_penalty))
    extra = {"step_calibration": jnp.mean(terms), "step_log_gap": jnp.mean(gaps)} if calibrating else None
    metrics = Metrics(jnp.mean(meta_losses), jnp.sum(episodes.diverged), self.num_tasks - jnp.sum(finite),
                      self.num_tasks, extra)
    return ReferencedEpisodes(episodes, truncation.references, scores), grads, metrics


def build(task, optimizer, values: dict, horizon: int | None) -> TruncatedBPTT:
  """The registry's constructor: validated fields -> TruncatedBPTT."""
  return TruncatedBPTT(Unroller.from_values(task, optimizer, values, horizon), values["meta_batch_size"],
                       values["l2_penalty"], tuple(values.get("reference_learning_rates", ())),
                       values.get("step_calibration", 0.0), values.get("reference_window", "truncation"),
                       values.get("weight_window", "truncation"))
