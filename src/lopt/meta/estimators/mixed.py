"""Metz et al. (2019): the inverse-variance combination of reparameterization and evolution-strategies gradients of
the Gaussian-smoothed meta-loss.

Each antithetic pair (fresh eps per truncation, as ``es``) gives two estimates of the same gradient:
  ES              g_es = (L+ - L-) / (2 sigma^2) * eps
  reparameterized g_rp = d/d theta of (L(theta + eps) + L(theta - eps)) / 2   (backpropagation through the unroll)
Per coordinate, with means mu and variances s^2 over the pairs,
  g = (mu_es / s_es^2 + mu_rp / s_rp^2) / (1 / s_es^2 + 1 / s_rp^2),
so each coordinate leans on whichever estimate is less noisy there: backpropagation where the meta-loss is smooth,
ES where exploding inner gradients make it chaotic. Pairs whose reparameterized gradient is not finite count only in
the ES statistics.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp

from lopt.meta.estimators.es import ES_RULE, SIGNS, Antithetic, AntitheticState, es_terms
from lopt.meta.estimators.truncated import Metrics, Unroller, all_finite, l2_penalty_gradient

VARIANCE_FLOOR = 1e-30  # keeps 1/s^2 finite where every pair agrees exactly (a meta-parameter that has no effect)


def masked_moments(per_pair, keep):
  """Per-coordinate means and sample variances over the pairs where ``keep`` (pairs,): two pytrees like one pair."""
  count = jnp.sum(keep)
  mask = lambda x: keep.reshape((-1,) + (1,) * (x.ndim - 1))  # noqa: E731
  means = jax.tree.map(lambda x: jnp.sum(jnp.where(mask(x), x, 0.0), axis=0) / jnp.maximum(count, 1), per_pair)
  variances = jax.tree.map(lambda x, m: jnp.sum(jnp.where(mask(x), (x - m) ** 2, 0.0), axis=0)
                           / jnp.maximum(count - 1, 1), per_pair, means)
  return means, variances, count


@dataclass(frozen=True)
class Mixed(Antithetic):
  """``lopt.api.GradientEstimator``: see the module docstring. Needs at least two pairs (for the variances)."""

  def estimate(self, theta, state: AntitheticState, key):
    episodes, noise, used, weight = self.prepare(theta, state, key)

    def pair_loss(theta, eps, pair):
      thetas = jax.tree.map(lambda t, e: t + SIGNS.reshape((2,) + (1,) * t.ndim) * e, theta, eps)
      losses, pair = jax.vmap(self.unroll)(thetas, pair)
      return jnp.mean(losses), (losses, pair)

    grad = jax.vmap(jax.value_and_grad(pair_loss, has_aux=True), in_axes=(None, 0, 0))
    (_, (meta_losses, episodes)), reparameterized = grad(theta, used, episodes)
    evolution = es_terms(meta_losses, weight, self.sigma)
    es_ok = jnp.isfinite(meta_losses[:, 0] - meta_losses[:, 1])
    rp_ok = es_ok & jax.vmap(all_finite)(reparameterized)
    mu_es, var_es, _ = masked_moments(evolution, es_ok)
    mu_rp, var_rp, rp_count = masked_moments(reparameterized, rp_ok)

    def combine(mu_es, var_es, mu_rp, var_rp):
      w_es = 1 / (var_es + VARIANCE_FLOOR)
      w_rp = jnp.where(rp_count >= 2, 1 / (var_rp + VARIANCE_FLOOR), 0.0)  # too few finite ones: ES alone
      return (w_es * mu_es + w_rp * mu_rp) / (w_es + w_rp)

    combined = jax.tree.map(combine, mu_es, var_es, mu_rp, var_rp)
    grads = jax.tree.map(jnp.add, combined, l2_penalty_gradient(theta, self.l2_penalty))
    metrics = Metrics(jnp.mean(meta_losses), jnp.sum(episodes.diverged), 2 * (self.num_pairs - jnp.sum(es_ok)),
                      2 * self.num_pairs)
    return AntitheticState(episodes, noise), grads, metrics


def build(task, optimizer, values: dict, horizon: int | None) -> Mixed:
  return Mixed(Unroller.from_values(task, optimizer, values, horizon), ES_RULE, values["meta_batch_size"], values["num_particles"], values["sigma"],
               values["l2_penalty"])
