"""Meta-objectives: what meta-training minimizes for one sampled problem."""

from __future__ import annotations

import jax.numpy as jnp

from lopt.meta.unroll import normalized_losses

# A problem whose normalized loss exceeds this (or is not finite) contributes exactly this, with zero gradient:
# a diverging problem costs a bounded amount and cannot dominate the meta-batch. (Ours; the paper uses no cap.)
DEFAULT_LOSS_CAP = 10.0


def bounded_normalized_losses(losses, cap: float = DEFAULT_LOSS_CAP):
  """(..., T) raw losses -> (..., T) loss_t / loss_0, with non-finite or > cap entries replaced by cap."""
  ratio = normalized_losses(losses)
  return jnp.where(jnp.isfinite(ratio) & (ratio < cap), ratio, cap)


def mean_normalized_loss(losses, cap: float = DEFAULT_LOSS_CAP):
  """The paper's meta-loss (renn ``losses.mean``), bounded: mean_t loss_t / loss_0. (..., T) -> (...)."""
  return jnp.mean(bounded_normalized_losses(losses, cap), axis=-1)


def mean_log_normalized_loss(losses, cap: float = DEFAULT_LOSS_CAP):
  """mean_t log(loss_t / loss_0): weighs late, small losses as much as early ones (Metz 2019's log-scaled loss)."""
  return jnp.mean(jnp.log(jnp.maximum(bounded_normalized_losses(losses, cap), 1e-12)), axis=-1)


META_LOSSES = {"mean": mean_normalized_loss, "log_mean": mean_log_normalized_loss}
