"""Convolutional classifiers of scikit-learn's 8x8 digits."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from lopt.data import datasets
from lopt.tasks.families import _nn
from lopt.tasks.families.base import Choice, Family, IntRange, LogUniform

SIDE, CLASSES = 8, 10

SPACE = {
    "data_seed": IntRange(0, 999),  # the train/valid split
    "depth": IntRange(1, 3),  # conv layers
    "channels": LogUniform(4, 64, integer=True),  # every conv layer
    "kernel": Choice((1, 3, 5)),
    "stride": Choice((1, 2)),  # every conv layer; SAME padding, so sides 8 -> 4 -> 2 -> 1 with stride 2
    "activation": Choice(tuple(_nn.ACTIVATIONS)),
    "pool": Choice(("average", "flatten")),  # global average pool or flatten, then dense(10)
    "batch_size": LogUniform(8, 256, integer=True),
}


def sides(shape: dict) -> list[int]:
  """Image side after each conv layer (input first)."""
  out = [SIDE]
  for _ in range(shape["depth"]):
    out.append(math.ceil(out[-1] / shape["stride"]))
  return out


def readout_size(shape: dict) -> int:
  channels = shape["channels"] if shape["depth"] else 1
  return channels if shape["pool"] == "average" else channels * sides(shape)[-1] ** 2


def step_flops(shape: dict) -> float:
  channels = [1] + [shape["channels"]] * shape["depth"]
  convs = sum(side**2 * shape["kernel"]**2 * c_in * c_out
              for side, c_in, c_out in zip(sides(shape)[1:], channels[:-1], channels[1:]))
  return _nn.step_flops(convs + readout_size(shape) * CLASSES, shape["batch_size"])


def build(shape: dict):
  """Conv(channels, kernel, stride, SAME) -> activation per layer, pool or flatten, dense(10); cross-entropy."""
  depth, kernel, stride, width = shape["depth"], shape["kernel"], shape["stride"], shape["channels"]
  act = _nn.ACTIVATIONS[shape["activation"]]
  flat = readout_size(shape)

  channels = [1] + [width] * depth
  spec = {f"conv_{i}": {"w": _nn.Normal((kernel, kernel, c_in, c_out), 1 / math.sqrt(kernel * kernel * c_in)),
                        "b": np.zeros(c_out, np.float32)}
          for i, (c_in, c_out) in enumerate(zip(channels[:-1], channels[1:]))}
  spec["output"] = _nn.dense_spec(flat, CLASSES)

  def predict(params, x):
    """x (batch, 8, 8, 1) -> logits (batch, 10)."""
    for i in range(depth):
      layer = params[f"conv_{i}"]
      x = jax.lax.conv_general_dilated(x, layer["w"], (stride, stride), "SAME",
                                       dimension_numbers=("NHWC", "HWIO", "NHWC"))
      x = act(x + layer["b"])
    x = jnp.mean(x, axis=(1, 2)) if shape["pool"] == "average" else x.reshape(x.shape[0], -1)
    return _nn.dense(params["output"], x)

  train, valid = datasets.tabular("digits", shape["data_seed"])  # per-pixel standardized rows
  as_images = lambda d: type(d)(d.inputs.reshape(-1, SIDE, SIDE, 1), d.labels)
  return _nn.supervised_task("cnn", as_images(train), as_images(valid), spec, predict, _nn.cross_entropy,
                             shape["batch_size"])


FAMILY = Family(
    name="cnn",
    description="convolutional classifier of the 8x8 digits: conv layers of one width, global average pool or "
                "flatten, dense(10)",
    space=SPACE, build=build, step_flops=step_flops)
