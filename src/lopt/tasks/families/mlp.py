"""MLP classifiers and regressors on scikit-learn's tables and generators (``lopt.data.datasets.TABULAR``)."""

from __future__ import annotations

import jax.numpy as jnp

from lopt.data import datasets
from lopt.tasks.families import _nn
from lopt.tasks.families.base import Choice, Family, IntRange, LogUniform

SPACE = {
    "dataset": Choice(tuple(datasets.TABULAR)),
    "data_seed": IntRange(0, 999),  # the train/valid split, and the draw of a generated dataset
    "depth": IntRange(1, 4),  # hidden layers
    "width": LogUniform(8, 512, integer=True),  # every hidden layer
    "activation": Choice(tuple(_nn.ACTIVATIONS)),
    "layer_norm": Choice((False, True)),
    "batch_size": LogUniform(8, 256, integer=True),
}


def sizes(shape: dict) -> list[int]:
  """(features, width x depth, classes or 1)."""
  features, classes = datasets.TABULAR[shape["dataset"]]
  return [features, *[shape["width"]] * shape["depth"], classes or 1]


def step_flops(shape: dict) -> float:
  return _nn.step_flops(_nn.chain_multiply_adds(sizes(shape)), shape["batch_size"])


def build(shape: dict):
  """Cross-entropy on class labels, or mean squared error on diabetes' standardized targets."""
  layer_sizes = sizes(shape)
  depth, activation, norm = shape["depth"], shape["activation"], shape["layer_norm"]
  regression = datasets.TABULAR[shape["dataset"]][1] == 0

  def predict(params, x):
    out = _nn.mlp_apply(params, x, activation, depth, norm)
    return out[:, 0] if regression else out

  objective = (lambda y_hat, y: jnp.mean(jnp.square(y_hat - y))) if regression else _nn.cross_entropy
  train, valid = datasets.tabular(shape["dataset"], shape["data_seed"])
  return _nn.supervised_task("mlp", train, valid, _nn.mlp_spec(layer_sizes, norm), predict, objective, shape["batch_size"])


FAMILY = Family(
    name="mlp",
    description="MLP classifier (cross-entropy) or regressor (diabetes: MSE) on a standardized table: digits, iris, "
                "wine, breast cancer, diabetes or a generated set",
    space=SPACE, build=build, step_flops=step_flops)
