"""Deep linear networks: x W_1 W_2 ... W_depth (no nonlinearity, no biases) fit by half the mean squared error to
targets x A* + noise, A* (features, outputs) of low rank, started near the saddle at zero (opt-in: not in the "all"
mix, whose draws every recorded run depends on).

The loss is nonconvex in the weights though the model is linear in x: a small start sits near the saddle at the
origin, where the gradient shrinks with the initialization's gain to the power depth - 1, and the rank of A* sets how
many directions must escape it (Saxe et al. 2014). Unlike the benchmark's ``least_squares`` (one linear layer) and
``matrix_completion`` (entries of a matrix), this is a product of layers regressing generated minibatches.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from lopt.tasks.families import _nn
from lopt.tasks.families.base import Family, IntRange, LogUniform

NUM_TRAIN, NUM_VALID = 2048, 512

SPACE = {
    "features": LogUniform(8, 128, integer=True),
    "outputs": LogUniform(1, 32, integer=True),
    "rank": IntRange(1, 8),  # of A*, at most min(features, outputs) (features and width are at least 8)
    "depth": IntRange(2, 4),  # dense layers, so depth - 1 hidden ones
    "width": LogUniform(8, 128, integer=True),  # every hidden layer
    "init_gain": LogUniform(0.1, 1.0),  # each layer's LeCun initialization times this: the start's nearness to 0
    "noise": LogUniform(1e-3, 0.3),  # the targets' noise standard deviation (their signal has unit variance)
    "data_seed": IntRange(0, 999),  # the features, A* and the noise
    "batch_size": LogUniform(8, 256, integer=True),
}


def rank(shape: dict) -> int:
  """A*'s rank: the drawn one, capped by its smaller side."""
  return min(shape["rank"], shape["features"], shape["outputs"])


def _streams(shape: dict) -> tuple[np.random.Generator, np.random.Generator]:
  """(A*'s, the rows') generators of ``data_seed``: A* does not depend on how many rows are drawn."""
  map_rng, row_rng = np.random.default_rng(shape["data_seed"]).spawn(2)
  return map_rng, row_rng


def target_map(shape: dict) -> np.ndarray:
  """A* (features, outputs) float64 = U V^T, U and V Gaussian with ``rank(shape)`` columns, each column of A*
  scaled to unit norm so that x A* has unit variance per output for unit-covariance x (the scaling keeps the rank)."""
  rng, r = _streams(shape)[0], rank(shape)
  a = rng.normal(size=(shape["features"], r)) @ rng.normal(size=(r, shape["outputs"]))
  return a / np.linalg.norm(a, axis=0)


def data(shape: dict) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
  """((x, y) train, (x, y) valid): x (n, features) float32 standard Gaussian; y (n, outputs) float32 = x A* + noise."""
  rng, n = _streams(shape)[1], NUM_TRAIN + NUM_VALID
  x = rng.normal(size=(n, shape["features"]))
  y = x @ target_map(shape) + shape["noise"] * rng.normal(size=(n, shape["outputs"]))
  x, y = x.astype(np.float32), y.astype(np.float32)
  return (x[:NUM_TRAIN], y[:NUM_TRAIN]), (x[NUM_TRAIN:], y[NUM_TRAIN:])


def sizes(shape: dict) -> list[int]:
  """(features, width x (depth - 1), outputs)."""
  return [shape["features"], *[shape["width"]] * (shape["depth"] - 1), shape["outputs"]]


def spec(shape: dict) -> dict:
  """{"layer_i": {"w": (fan_in, fan_out) ~ N(0, init_gain^2 / fan_in)}} for i < depth: no biases, so the network is
  exactly the product map and zero is a saddle of it."""
  gain = shape["init_gain"]
  return {f"layer_{i}": {"w": _nn.Normal((fan_in, fan_out), gain / math.sqrt(fan_in))}
          for i, (fan_in, fan_out) in enumerate(zip(sizes(shape)[:-1], sizes(shape)[1:]))}


def predict(params: dict, x):
  """x (batch, features) -> (batch, outputs) through the layers in order."""
  for i in range(len(params)):
    x = x @ params[f"layer_{i}"]["w"]
  return x


def step_flops(shape: dict) -> float:
  return _nn.step_flops(_nn.chain_multiply_adds(sizes(shape)), shape["batch_size"])


def build(shape: dict):
  """Half the mean (over examples and outputs) squared error of the product map against y."""
  train, valid = data(shape)
  objective = lambda y_hat, y: 0.5 * jnp.mean(jnp.square(y_hat - y))  # noqa: E731
  return _nn.supervised_task("deep_linear_regression", train, valid, spec(shape), predict, objective,
                             shape["batch_size"])


FAMILY = Family(
    name="deep_linear_regression",
    description="nonconvex: a deep linear network (2-4 layers, no nonlinearity) started near the saddle at zero, "
                "regressing a rank 1-8 linear map of Gaussian features (opt-in: name it, e.g. "
                "'all,deep_linear_regression')",
    space=SPACE, build=build, step_flops=step_flops)
