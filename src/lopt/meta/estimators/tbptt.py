"""Truncated backpropagation through time: the gradient of each truncation's meta-loss, the carried inner state
held constant.

Cheap and low-variance, and biased toward short horizons: what an update does to losses beyond the truncation is
invisible to it (the short-horizon bias; Wu et al. 2018, Metz et al. 2019). A trajectory whose gradient is not finite
is left out (counted as dropped).
"""

from __future__ import annotations

from dataclasses import dataclass
import jax
import jax.numpy as jnp

from lopt.meta.estimators.truncated import (Metrics, Unroller, all_finite, first_episodes, l2_penalty_gradient,
                                            masked_mean, restart_finished, restart_keys)


@dataclass(frozen=True)
class TruncatedBPTT:
  """``lopt.api.GradientEstimator``: ``num_tasks`` problems at staggered steps, each advanced ``unroll.schedule``'s
  truncation per estimate; the meta-gradient is the mean over problems of d(truncation meta-loss)/d theta."""
  unroll: Unroller
  num_tasks: int
  l2_penalty: float = 0.0

  @property
  def inner_steps_per_estimate(self) -> int:
    return self.num_tasks * self.unroll.schedule.truncation

  def init(self, theta, key):
    """(num_tasks,) episodes with staggered first lengths."""
    u = self.unroll
    return first_episodes(u.task, u.optimizer, theta, jax.random.split(key, self.num_tasks), u.schedule)

  def estimate(self, theta, episodes, key):
    u = self.unroll
    keys = restart_keys(key, self.num_tasks)
    episodes = jax.vmap(restart_finished, in_axes=(None, None, None, 0, 0, None))(
        u.task, u.optimizer, theta, episodes, keys, u.schedule)
    episodes = jax.lax.stop_gradient(episodes)
    grad = jax.vmap(jax.value_and_grad(u, has_aux=True), in_axes=(None, 0))
    (meta_losses, episodes), grads = grad(theta, episodes)
    finite = jax.vmap(all_finite)(grads)
    mean = masked_mean(grads, finite)
    penalty = l2_penalty_gradient(theta, self.l2_penalty)
    metrics = Metrics(jnp.mean(meta_losses), jnp.sum(episodes.diverged), self.num_tasks - jnp.sum(finite),
                      self.num_tasks)
    return episodes, jax.tree.map(jnp.add, mean, penalty), metrics


def build(task, optimizer, values: dict, horizon: int | None) -> TruncatedBPTT:
  """The registry's constructor: validated fields -> TruncatedBPTT."""
  return TruncatedBPTT(Unroller.from_values(task, optimizer, values, horizon), values["meta_batch_size"],
                       values["l2_penalty"])
