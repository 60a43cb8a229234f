"""Several estimators as one: the groups of a task family (configurations of one shape each, vmapped together),
each with its share of the meta-batch. The meta-gradient is their mean weighted by the problems each unrolled."""

from __future__ import annotations

from dataclasses import dataclass

import jax

from lopt.meta.estimators.truncated import Metrics


@dataclass(frozen=True)
class Grouped:
  """``lopt.api.GradientEstimator`` over ``estimators`` (one per task group); state: a tuple of theirs."""
  estimators: tuple

  @property
  def inner_steps_per_estimate(self) -> int:
    return sum(e.inner_steps_per_estimate for e in self.estimators)

  def init(self, theta, key):
    return tuple(e.init(theta, jax.random.fold_in(key, g)) for g, e in enumerate(self.estimators))

  def estimate(self, theta, state, key):
    return combine([self.estimate_group(g, theta, s, key) for g, s in enumerate(state)])

  def estimate_group(self, group: int, theta, state, key):
    """Group ``group``'s estimate (its state, key folded with its index): what ``estimate`` combines."""
    return self.estimators[group].estimate(theta, state, jax.random.fold_in(key, group))


def combine(results):
  """[(state, grads, Metrics)] of the groups -> (tuple of states, grads, Metrics): the gradients and metrics are
  means weighted by the problems each group unrolled, the counts sums."""
  weights = [m.num_problems for _, _, m in results]
  total = sum(weights)
  grads = jax.tree.map(lambda *gs: sum(w * g for w, g in zip(weights, gs)) / total, *[g for _, g, _ in results])
  metrics = [m for _, _, m in results]
  mean = lambda values: sum(w * v for w, v in zip(weights, values)) / total  # noqa: E731
  extra = getattr(metrics[0], "extra", None)  # the groups share the estimator's settings: all have it or none
  extra = None if extra is None else {name: mean([m.extra[name] for m in metrics]) for name in metrics[0].extra}
  combined = Metrics(mean([m.meta_loss for m in metrics]), sum(m.diverged_problems for m in metrics),
                     sum(m.dropped_problems for m in metrics), total, extra)
  return tuple(s for s, _, _ in results), grads, combined
