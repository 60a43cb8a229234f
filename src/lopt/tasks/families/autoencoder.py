"""MLP autoencoders of standardized tables: reconstruction through a narrow bottleneck."""

from __future__ import annotations

import jax.numpy as jnp

from lopt.data import datasets
from lopt.tasks.families import _nn
from lopt.tasks.families.base import Choice, Family, IntRange, LogUniform

SPACE = {
    "dataset": Choice(("digits", "breast_cancer", "wine", "classification")),  # 64, 30, 13, 16 features
    "data_seed": IntRange(0, 999),  # the train/valid split, and the draw of a generated dataset
    "depth": IntRange(1, 3),  # hidden layers of the encoder (the decoder mirrors them)
    "width": LogUniform(16, 256, integer=True),
    "bottleneck": LogUniform(2, 32, integer=True),
    "activation": Choice(tuple(_nn.ACTIVATIONS)),
    "batch_size": LogUniform(8, 256, integer=True),
}


def sizes(shape: dict) -> tuple[list[int], list[int]]:
  """Encoder (features, width..., bottleneck) and decoder (bottleneck, width..., features) sizes."""
  features = datasets.TABULAR[shape["dataset"]][0]
  hidden = [shape["width"]] * shape["depth"]
  return [features, *hidden, shape["bottleneck"]], [shape["bottleneck"], *hidden, features]


def step_flops(shape: dict) -> float:
  encoder, decoder = sizes(shape)
  return _nn.step_flops(_nn.chain_multiply_adds(encoder) + _nn.chain_multiply_adds(decoder), shape["batch_size"])


def build(shape: dict):
  """encoder MLP (linear bottleneck) -> decoder MLP (linear output); mean squared reconstruction error."""
  encoder_sizes, decoder_sizes = sizes(shape)
  depth, activation = shape["depth"], shape["activation"]

  def reconstruct(params, x):
    code = _nn.mlp_apply(params["encoder"], x, activation, depth)
    return _nn.mlp_apply(params["decoder"], code, activation, depth)

  objective = lambda x_hat, x: jnp.mean(jnp.square(x_hat - x))
  train, valid = datasets.tabular(shape["dataset"], shape["data_seed"])
  as_targets = lambda d: (d.inputs, d.inputs)  # the inputs are their own targets
  spec = {"encoder": _nn.mlp_spec(encoder_sizes), "decoder": _nn.mlp_spec(decoder_sizes)}
  return _nn.supervised_task("autoencoder", as_targets(train), as_targets(valid), spec, reconstruct, objective,
                             shape["batch_size"])


FAMILY = Family(
    name="autoencoder",
    description="MLP autoencoder of a standardized table (digits, breast cancer, wine, generated), mean squared "
                "reconstruction error",
    space=SPACE, build=build, step_flops=step_flops)
