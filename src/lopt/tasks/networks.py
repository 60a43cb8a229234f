"""Neural-network tasks: the two-moons MLP and the digit-classification CNN (sklearn digits or a local MNIST file)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from lopt import data as datasets
from lopt.tasks.base import Task


def _dense_init(key, fan_in, fan_out):
  """Glorot-normal weights and N(0, 1e-2^2) biases (the stax defaults the paper's code used)."""
  w_key, b_key = jax.random.split(key)
  w = jax.nn.initializers.glorot_normal()(w_key, (fan_in, fan_out))
  return {"w": w, "b": 1e-2 * jax.random.normal(b_key, (fan_out,))}


def _l2_norm(tree):
  return jnp.sqrt(sum(jnp.sum(x**2) for x in jax.tree.leaves(tree)))


def two_moons(hidden: tuple[int, ...] = (64, 64, 64), num_points: int = 1024, noise: float = 0.1,
              l2_penalty: float = 5e-3, horizon: int = 200) -> Task:
  """MLP 2 -> hidden... -> 1 with tanh on a fixed two-moons set, full batch; logistic loss + l2_penalty * ||theta||_2.

  Each key gives a fresh initialization; the data are the same for every key (paper).
  """
  data = datasets.moons(num_points, noise, seed=0)
  inputs, labels = jnp.asarray(data.inputs), jnp.asarray(data.labels, jnp.float32)
  sizes = (2, *hidden, 1)

  def init(key):
    keys = jax.random.split(key, len(sizes) - 1)
    return [_dense_init(k, a, b) for k, a, b in zip(keys, sizes[:-1], sizes[1:])]

  def logits(params, x):
    for layer in params[:-1]:
      x = jnp.tanh(x @ layer["w"] + layer["b"])
    return (x @ params[-1]["w"] + params[-1]["b"])[:, 0]

  def loss(params, key=None, step=0):
    del key, step  # full batch
    z = logits(params, inputs)
    return jnp.mean(jax.nn.softplus(z) - labels * z) + l2_penalty * _l2_norm(params)

  options = dict(hidden=list(hidden), num_points=num_points, noise=noise, l2_penalty=l2_penalty, horizon=horizon)
  return Task("two_moons", init, loss, horizon, options=options, traits={"network": True})


def _conv_init(key, kernel, in_channels, out_channels):
  w_key, b_key = jax.random.split(key)
  w = jax.nn.initializers.glorot_normal(in_axis=(0, 1, 2), out_axis=3)(
      w_key, (kernel, kernel, in_channels, out_channels))
  return {"w": w, "b": 1e-2 * jax.random.normal(b_key, (out_channels,))}


def _cnn_task(name, train, valid, image_side, layers, batch_size, horizon, options) -> Task:
  """Conv(c, k, stride s, SAME)-ReLU per layer, flatten, dense(10); cross-entropy on minibatches."""
  train_x, train_y = jnp.asarray(train.inputs), jnp.asarray(train.labels)
  valid_x, valid_y = jnp.asarray(valid.inputs), jnp.asarray(valid.labels)
  side = image_side
  for _, _, stride in layers:
    side = math.ceil(side / stride)
  flat = side * side * layers[-1][0]

  def init(key):
    keys = jax.random.split(key, len(layers) + 1)
    channels = [1] + [c for c, _, _ in layers]
    convs = [_conv_init(k, kern, cin, cout) for k, (cout, kern, _), cin in zip(keys, layers, channels[:-1])]
    return {"conv": convs, "dense": _dense_init(keys[-1], flat, 10)}

  def logits(params, x):
    for layer, (_, _, stride) in zip(params["conv"], layers):
      x = jax.lax.conv_general_dilated(x, layer["w"], (stride, stride), "SAME",
                                       dimension_numbers=("NHWC", "HWIO", "NHWC"))
      x = jax.nn.relu(x + layer["b"])
    return x.reshape(x.shape[0], -1) @ params["dense"]["w"] + params["dense"]["b"]

  def batch_loss(params, x, y):
    log_probs = jax.nn.log_softmax(logits(params, x))
    return -jnp.mean(jnp.take_along_axis(log_probs, y[:, None], axis=1))

  def sample(x, y, key, step):
    # The batch at `step` is fixed by (problem key, step): deterministic and reproducible.
    index = jax.random.randint(jax.random.fold_in(jax.random.fold_in(key, 7), step), (batch_size,), 0, y.shape[0])
    return x[index], y[index]

  def loss(params, key, step=0):
    return batch_loss(params, *sample(train_x, train_y, key, step))

  def valid_loss(params, key, step=0):
    return batch_loss(params, *sample(valid_x, valid_y, jax.random.fold_in(key, 1), step))

  return Task(name, init, loss, horizon, valid_loss=valid_loss, options=options, traits={"network": True})


PAPER_CNN_LAYERS = ((32, 5, 2), (16, 3, 2), (16, 3, 2))  # (channels, kernel, stride), the paper's 4-layer network


def digits_cnn(batch_size: int = 32, valid_fraction: float = 0.2, horizon: int = 200) -> Task:
  """The paper's MNIST CNN on scikit-learn's 8x8 digits (shipped offline), with a fixed held-out split."""
  if batch_size < 1:
    raise ValueError(f"digits_cnn: batch_size must be >= 1, got {batch_size}")
  train, valid = datasets.split(datasets.digits(), valid_fraction)
  options = dict(batch_size=batch_size, valid_fraction=valid_fraction, horizon=horizon)
  return _cnn_task("digits_cnn", train, valid, 8, PAPER_CNN_LAYERS, batch_size, horizon, options)


def mnist_cnn(path: str, batch_size: int = 32, valid_fraction: float = 1 / 7, horizon: int = 200) -> Task:
  """The paper's MNIST CNN on a local MNIST file (idx or npz; see ``lopt.data.load_mnist``). Nothing is downloaded."""
  data = datasets.load_mnist(path)
  train, valid = datasets.split(data, valid_fraction)
  options = dict(path=str(path), batch_size=batch_size, valid_fraction=valid_fraction, horizon=horizon)
  return _cnn_task("mnist_cnn", train, valid, data.inputs.shape[1], PAPER_CNN_LAYERS, batch_size, horizon, options)
