"""Noise-reuse evolution strategies (Li et al. 2023; ES-Single, Vicol et al. 2023): one perturbation per pair per
episode, reused by every truncation of the episode and weighting each. Unbiased for the Gaussian-smoothed meta-loss;
unlike PES its variance does not grow with the number of truncations."""

from __future__ import annotations

from lopt.meta.estimators.es import NoiseRule, _where_pairs, build_antithetic


def _reuse(stored, eps, starting):
  stored = _where_pairs(starting, eps, stored)
  return stored, stored, stored


NRES_RULE = NoiseRule("nres", init=lambda eps: eps, apply=_reuse)


def build(task, optimizer, values: dict, horizon: int | None):
  return build_antithetic(NRES_RULE, task, optimizer, values, horizon)
