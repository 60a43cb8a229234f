"""Pieces the task families share: initializers, layers, losses, minibatches chosen from (key, step), the data
choices of the language models, and FLOP counts. Not a family itself."""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lopt.data import datasets
from lopt.tasks.base import Task

ACTIVATIONS = {"relu": jax.nn.relu, "tanh": jnp.tanh, "gelu": jax.nn.gelu}
TRAIN_STREAM, VALID_STREAM = 7, 1  # fold_in tags: the training and held-out minibatches of a problem differ


# -- parameters and layers -------------------------------------------------------------------------------------------

class Normal(NamedTuple):
  """A parameter drawn from N(0, std^2) at init (a leaf of a parameter spec)."""
  shape: tuple
  std: float


def materialize(key, spec):
  """The parameters of ``spec`` (a pytree whose leaves are numpy arrays, kept, or ``Normal``, drawn): float32 arrays.
  Every Normal leaf comes from one draw, because each random call site adds ~0.1-0.3 s to a CPU compile and a
  network has dozens."""
  leaves, treedef = jax.tree.flatten(spec, is_leaf=lambda x: isinstance(x, Normal))
  sizes = [math.prod(leaf.shape) for leaf in leaves if isinstance(leaf, Normal)]
  chunks = iter(jnp.split(jax.random.normal(key, (sum(sizes),)), np.cumsum(sizes)[:-1].tolist()) if sizes else ())
  return treedef.unflatten([leaf.std * next(chunks).reshape(leaf.shape) if isinstance(leaf, Normal)
                            else jnp.asarray(leaf, jnp.float32) for leaf in leaves])


def dense_spec(fan_in: int, fan_out: int) -> dict:
  """w: (fan_in, fan_out) ~ N(0, 1/fan_in) (LeCun: unit-variance outputs for unit-variance inputs); b: (fan_out,) 0."""
  return {"w": Normal((fan_in, fan_out), 1 / math.sqrt(fan_in)), "b": np.zeros(fan_out, np.float32)}


def dense(params: dict, x):
  """(..., fan_in) -> (..., fan_out)."""
  return x @ params["w"] + params["b"]


def norm_spec(size: int) -> dict:
  return {"scale": np.ones(size, np.float32), "offset": np.zeros(size, np.float32)}


def layer_norm(params: dict, x, eps: float = 1e-5):
  """LayerNorm over the last axis of x (..., size)."""
  mean = jnp.mean(x, -1, keepdims=True)
  var = jnp.mean(jnp.square(x - mean), -1, keepdims=True)
  return (x - mean) * jax.lax.rsqrt(var + eps) * params["scale"] + params["offset"]


def mlp_spec(sizes: list[int], layer_norm_hidden: bool = False) -> dict:
  """{"layer_i": dense (+ LayerNorm scale/offset) for each hidden layer, "output": dense}; sizes (in, hidden...,
  out)."""
  params = {f"layer_{i}": {**dense_spec(fan_in, fan_out), **(norm_spec(fan_out) if layer_norm_hidden else {})}
            for i, (fan_in, fan_out) in enumerate(zip(sizes[:-2], sizes[1:-1]))}
  return {**params, "output": dense_spec(sizes[-2], sizes[-1])}


def mlp_apply(params: dict, x, activation: str, num_hidden: int, layer_norm_hidden: bool = False):
  """x (batch, in) -> (batch, out): dense [-> LayerNorm] -> activation per hidden layer, then a linear output."""
  act = ACTIVATIONS[activation]
  for i in range(num_hidden):
    layer = params[f"layer_{i}"]
    x = dense(layer, x)
    x = act(layer_norm(layer, x) if layer_norm_hidden else x)
  return dense(params["output"], x)


# -- losses and minibatches ------------------------------------------------------------------------------------------

def cross_entropy(logits, labels):
  """Mean cross-entropy of logits (..., classes) against int labels (...)."""
  log_probs = jax.nn.log_softmax(logits)
  return -jnp.mean(jnp.take_along_axis(log_probs, labels[..., None].astype(jnp.int32), axis=-1))


def fraction_mean(objective, predictions, targets, batch_fraction=None):
  """``objective(predictions, targets)`` (a mean over the leading batch axis and any others); with ``batch_fraction``
  (() float, may be traced) the mean of each example's objective over the first k = max(1, round(batch_fraction *
  batch)) examples only. A mask, not a slice, so every fraction has the same shapes (problems of one compiled
  group differ in their gradient noise)."""
  if batch_fraction is None:
    return objective(predictions, targets)  # exactly the unaugmented value
  batch = targets.shape[0]
  each = jax.vmap(lambda p, t: objective(p[None], t[None]))(predictions, targets)  # (batch,) one example at a time
  count = jnp.maximum(1.0, jnp.round(batch_fraction * batch))
  # where, not a product: an overflowing example left out does not turn the mean into 0 * inf = nan
  return jnp.sum(jnp.where(jnp.arange(batch) < count, each, 0.0)) / count


def batch_index(key, step, stream: int, batch_size: int, count: int):
  """(batch_size,) rows in [0, count): minibatch ``step`` of problem ``key``, a pure function of both. Random bits
  modulo count (bias < count / 2^32, negligible) compile faster than randint's two draws."""
  bits = jax.random.bits(jax.random.fold_in(jax.random.fold_in(key, stream), step), (batch_size,), jnp.uint32)
  return (bits % count).astype(jnp.int32)


def supervised_task(name: str, train, valid, spec, predict, objective, batch_size: int, penalty=None) -> Task:
  """The Task of ``objective(predict(params, x), y)`` (a mean over the batch) on minibatches of the (train, valid)
  split (numpy arrays, captured as constants), parameters drawn from ``spec``. ``penalty(params)`` is added to both
  losses. The training loss takes ``batch_fraction=f`` too: the mean over the minibatch's first examples
  (``fraction_mean``); the penalty is not per example and stays whole."""
  train_x, train_y, valid_x, valid_y = (jnp.asarray(a) for a in (*train, *valid))

  def batch_loss(params, x, y, key, step, stream, batch_fraction=None):
    index = batch_index(key, step, stream, batch_size, y.shape[0])
    value = fraction_mean(objective, predict(params, x[index]), y[index], batch_fraction)
    return value if penalty is None else value + penalty(params)

  def loss(params, key, step=0, batch_fraction=None):
    return batch_loss(params, train_x, train_y, key, step, TRAIN_STREAM, batch_fraction)

  def valid_loss(params, key, step=0):
    return batch_loss(params, valid_x, valid_y, key, step, VALID_STREAM)

  return Task(name, lambda key: materialize(key, spec), loss, 200, valid_loss=valid_loss, traits={"network": True})


# -- language-model data ---------------------------------------------------------------------------------------------

LM_DATA = ("text", "markov")
VALID_CHUNKS = 10


def lm_vocab(data: str) -> int:
  return datasets.TEXT_VOCAB if data == "text" else datasets.MARKOV_VOCAB


def lm_streams(data: str, data_seed: int) -> tuple[np.ndarray, np.ndarray]:
  """(train, valid) uint8 token streams. text: the corpus in 10 chunks, chunk ``data_seed % 10`` held out; markov: the
  chain of ``data_seed``, its last tenth held out."""
  if data == "text":
    stream = datasets.text_corpus()
    size = len(stream) // VALID_CHUNKS
    start = (data_seed % VALID_CHUNKS) * size
    return np.concatenate([stream[:start], stream[start + size:]]), stream[start:start + size]
  stream = datasets.markov_sequences(data_seed)
  cut = len(stream) - len(stream) // VALID_CHUNKS
  return stream[:cut], stream[cut:]


def lm_task(name: str, data: str, data_seed: int, spec, logits_fn, batch_size: int, seq_len: int) -> Task:
  """Next-token cross-entropy of ``logits_fn(params, tokens (batch, seq_len)) -> (batch, seq_len, vocab)`` on windows
  of seq_len + 1 tokens starting at positions drawn from (key, step); parameters drawn from ``spec``. The training
  loss takes ``batch_fraction=f`` too: the mean over the first sequences of the batch (``fraction_mean``)."""
  train, valid = (jnp.asarray(s, jnp.int32) for s in lm_streams(data, data_seed))
  offsets = jnp.arange(seq_len + 1)

  def window_loss(params, stream, key, step, tag, batch_fraction=None):
    starts = batch_index(key, step, tag, batch_size, stream.shape[0] - seq_len)
    tokens = stream[starts[:, None] + offsets]
    return fraction_mean(cross_entropy, logits_fn(params, tokens[:, :-1]), tokens[:, 1:], batch_fraction)

  def loss(params, key, step=0, batch_fraction=None):
    return window_loss(params, train, key, step, TRAIN_STREAM, batch_fraction)

  def valid_loss(params, key, step=0):
    return window_loss(params, valid, key, step, VALID_STREAM)

  return Task(name, lambda key: materialize(key, spec), loss, 200, valid_loss=valid_loss, traits={"network": True})


# -- cost ------------------------------------------------------------------------------------------------------------

def step_flops(multiply_adds_per_example: float, batch_size: int) -> float:
  """Forward and backward of one minibatch: 2 FLOPs per multiply-add, backward ~2x forward."""
  return 3.0 * 2.0 * multiply_adds_per_example * batch_size


def chain_multiply_adds(sizes: list[int]) -> int:
  """Multiply-adds of dense layers sizes[0] -> sizes[1] -> ... for one example."""
  return sum(a * b for a, b in zip(sizes[:-1], sizes[1:]))
