"""Noise-reuse evolution strategies (Li et al. 2023; ES-Single, Vicol et al. 2023): one perturbation per pair per
episode, reused by every truncation of the episode and weighting each. Unbiased for the Gaussian-smoothed meta-loss;
unlike PES its variance does not grow with the number of truncations."""

from __future__ import annotations

from lopt.meta.estimators.es import NoiseRule, build_antithetic, where_pairs


def _reuse(stored, eps, starting):
  """A new eps only at an episode's start; the truncation runs at theta +- it and is weighted by it."""
  stored = where_pairs(starting, eps, stored)
  return stored, stored, stored


NRES_RULE = NoiseRule("nres", init=lambda eps: eps, apply=_reuse)


def build(task, optimizer, values: dict, horizon: int | None):
  return build_antithetic(NRES_RULE, task, optimizer, values, horizon)
