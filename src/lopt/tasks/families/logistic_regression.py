"""Convex problems: linear softmax classifiers of standardized tables, with an optional L2 penalty."""

from __future__ import annotations

import jax.numpy as jnp

from lopt.data import datasets
from lopt.tasks.families import _nn
from lopt.tasks.families.base import Choice, Family, IntRange, LogUniform, Sometimes

CLASSIFICATION = tuple(name for name, (_, classes) in datasets.TABULAR.items() if classes)

SPACE = {
    "dataset": Choice(CLASSIFICATION),
    "data_seed": IntRange(0, 999),  # the train/valid split, and the draw of a generated dataset
    "l2": Sometimes(LogUniform(1e-5, 1e-1), probability=0.5, otherwise=0.0),  # 0: unregularized
    "batch_size": LogUniform(8, 256, integer=True),
}


def step_flops(shape: dict) -> float:
  features, classes = datasets.TABULAR[shape["dataset"]]
  return _nn.step_flops(features * classes, shape["batch_size"])


def build(shape: dict):
  """softmax(x @ w + b), cross-entropy + l2 / 2 * ||w||^2 (the bias is not penalized)."""
  features, classes = datasets.TABULAR[shape["dataset"]]
  l2 = float(shape["l2"])

  penalty = (lambda params: 0.5 * l2 * jnp.sum(jnp.square(params["w"]))) if l2 else None
  train, valid = datasets.tabular(shape["dataset"], shape["data_seed"])
  return _nn.supervised_task("logistic_regression", train, valid, _nn.dense_spec(features, classes), _nn.dense, _nn.cross_entropy,
                             shape["batch_size"], penalty)


FAMILY = Family(
    name="logistic_regression",
    description="convex: linear softmax classifier of a standardized table, L2 penalty on the weights half the time",
    space=SPACE, build=build, step_flops=step_flops)
