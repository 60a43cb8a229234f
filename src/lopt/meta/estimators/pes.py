"""Persistent evolution strategies (Vicol et al. 2021): a fresh perturbation per truncation, weighted by the sum of
the pair's perturbations since its episode began (reset with the episode). Unbiased for the Gaussian-smoothed
meta-loss of the whole episode, whatever the truncation; its variance grows with the truncations elapsed."""

from __future__ import annotations

import jax

from lopt.meta.estimators.es import NoiseRule, build_antithetic, where_pairs


def _accumulate(accumulated, eps, starting):
  """Zero at an episode's start, then + eps: the truncation runs at theta +- eps, weighted by the sum so far."""
  accumulated = where_pairs(starting, jax.tree.map(lambda e: 0 * e, eps), accumulated)
  accumulated = jax.tree.map(lambda a, e: a + e, accumulated, eps)
  return accumulated, eps, accumulated


PES_RULE = NoiseRule("pes", init=lambda eps: jax.tree.map(lambda e: 0 * e, eps), apply=_accumulate)


def build(task, optimizer, values: dict, horizon: int | None):
  return build_antithetic(PES_RULE, task, optimizer, values, horizon)
