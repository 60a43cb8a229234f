"""Convex quadratics of chosen conditioning: linear least squares on generated features whose covariance has a given
condition number (opt-in: not in the "all" mix, whose draws every recorded run depends on).

The feature covariance's eigenvalues are spaced evenly in log from 1 down to 1 / ``condition``, in a random basis,
so the Hessian of the mean squared error has that condition number: Adam's best learning rate and how far a run
gets depend on it. Targets are a random linear map of the features plus noise.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from lopt.tasks.families import _nn
from lopt.tasks.families.base import Family, IntRange, LogUniform

NUM_TRAIN, NUM_VALID = 2048, 512

SPACE = {
    "features": LogUniform(8, 256, integer=True),
    "condition": LogUniform(1.0, 1e3),  # of the feature covariance, so of the loss's Hessian (the bias aside)
    "noise": LogUniform(1e-3, 0.3),  # the targets' noise standard deviation (their signal has unit variance)
    "data_seed": IntRange(0, 999),  # the basis, the features, the true weights and the noise
    "batch_size": LogUniform(8, 256, integer=True),
}


def data(shape: dict) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
  """((x, y) train, (x, y) valid): x (n, features) float32 with covariance Q diag(lambda) Q^T, lambda log-spaced
  from 1 to 1/condition; y (n,) = x w* + noise, w* scaled so that x w* has unit variance."""
  d, rng = shape["features"], np.random.default_rng(shape["data_seed"])
  eigenvalues = np.geomspace(1.0, 1.0 / shape["condition"], d)
  basis, _ = np.linalg.qr(rng.normal(size=(d, d)))
  x = rng.normal(size=(NUM_TRAIN + NUM_VALID, d)) * np.sqrt(eigenvalues) @ basis.T
  w = rng.normal(size=d)
  w /= np.sqrt(np.sum(eigenvalues * np.square(basis.T @ w)))  # var(x w*) = w^T Q diag(lambda) Q^T w = 1
  y = x @ w + shape["noise"] * rng.normal(size=NUM_TRAIN + NUM_VALID)
  x, y = x.astype(np.float32), y.astype(np.float32)
  return (x[:NUM_TRAIN], y[:NUM_TRAIN]), (x[NUM_TRAIN:], y[NUM_TRAIN:])


def step_flops(shape: dict) -> float:
  return _nn.step_flops(shape["features"], shape["batch_size"])


def build(shape: dict):
  """Half the mean squared error of x @ w + b against y."""
  train, valid = data(shape)
  predict = lambda params, x: _nn.dense(params, x)[:, 0]  # noqa: E731
  objective = lambda y_hat, y: 0.5 * jnp.mean(jnp.square(y_hat - y))  # noqa: E731
  return _nn.supervised_task("ill_conditioned_regression", train, valid, _nn.dense_spec(shape["features"], 1),
                             predict, objective, shape["batch_size"])


FAMILY = Family(
    name="ill_conditioned_regression",
    description="convex: linear least squares on generated features whose covariance has condition number 1..1e3 "
                "(opt-in: name it, e.g. 'all,ill_conditioned_regression')",
    space=SPACE, build=build, step_flops=step_flops)
