"""The held-out benchmark suite (``lopt benchmark``): problems unlike anything the meta-training families sample.

Each problem differs from every family (``lopt.tasks.families``) in kind, data or size: wider or deeper networks,
longer horizons, batch sizes outside 8..256, sequence tasks that are not language modelling, a transformer that
sorts, convex least squares, matrix completion, a CNN on generated shapes. ``held_out_reasons`` says why, from the
families' own ranges. Everything is generated from a seed or ships with scikit-learn: nothing is downloaded.

A problem is a row of ``PROBLEMS`` (a builder and its options); ``Problem.task(quick)`` builds its ``Task``
(init, loss, valid_loss on held-out data or fresh sequences, horizon). One key is one initialization and one
minibatch order; a table, image set or matrix is the same for every key, sequences are drawn from (key, step).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from lopt.data.datasets import Dataset, Regression
from lopt.tasks.base import Task
from lopt.tasks.families import _nn
from lopt.tasks.families.rnn_lm import gru_step, lstm_step

SUITE_VERSION = 1      # part of every cached result's key: bump it when a problem's definition changes
DATA_SEED = 0          # every generated dataset of the suite (problem keys vary initialization and minibatches)
VALID_ROWS = 512       # a validation loss reads at most this many held-out rows (or fresh sequences)
NUM_ROWS = 2048        # rows of a generated table


# -- data ------------------------------------------------------------------------------------------------------------

def _shapes(seed: int, num: int = NUM_ROWS, side: int = 12) -> Dataset:
  """(num, side, side, 1) noisy images of 4 classes: horizontal bar, vertical bar, cross, Gaussian blob; random
  position, size and brightness, pixel noise 0.3."""
  rng = np.random.default_rng([seed, 0x5A9E])
  labels = rng.integers(0, 4, num)
  rows, cols = np.mgrid[:side, :side]
  images = np.zeros((num, side, side), np.float32)
  for image, label in zip(images, labels):
    r, c = rng.integers(2, side - 2, 2)
    length, bright = rng.integers(3, 6), rng.uniform(0.6, 1.4)
    horizontal = (rows == r) & (np.abs(cols - c) <= length)
    vertical = (cols == c) & (np.abs(rows - r) <= length)
    if label == 0:
      image[horizontal] = bright
    elif label == 1:
      image[vertical] = bright
    elif label == 2:
      image[(horizontal | vertical) & (np.abs(rows - r) <= 2) & (np.abs(cols - c) <= 2)] = bright
    else:
      image[:] = bright * np.exp(-((rows - r)**2 + (cols - c)**2) / (2 * rng.uniform(1.0, 2.0)**2))
  images += rng.normal(0, 0.3, images.shape).astype(np.float32)
  return Dataset(images[..., None], labels.astype(np.int32))


def _checkerboard(seed: int, num: int = 8 * NUM_ROWS, cells: int = 4) -> Dataset:
  """Points uniform in [-1, 1]^2 labelled by the colour of a cells x cells checkerboard (no noise)."""
  x = np.random.default_rng([seed, 0xC4EC]).uniform(-1, 1, (num, 2))
  cell = np.floor((x + 1) * cells / 2).astype(int)
  return Dataset(x.astype(np.float32), (cell.sum(1) % 2).astype(np.int32))


def _least_squares_data(seed: int, num: int = 640, features: int = 100) -> Regression:
  """make_regression on low-rank features (effective rank 10, tail 0.02: condition number ~2e4), rescaled so the
  largest eigenvalue of X^T X / n is 1; targets with noise."""
  from sklearn.datasets import make_regression
  x, y = make_regression(n_samples=num, n_features=features, n_informative=features, effective_rank=10,
                         tail_strength=0.02, noise=1.0, random_state=seed)
  x = x / np.linalg.norm(x, 2) * math.sqrt(num)
  return Regression(x.astype(np.float32), y.astype(np.float32))


def _sklearn(name: str, seed: int):
  from sklearn import datasets as sk
  make = {
      "hastie_10_2": lambda: sk.make_hastie_10_2(NUM_ROWS, random_state=seed),
      "swiss_roll": lambda: sk.make_swiss_roll(NUM_ROWS, noise=0.1, random_state=seed),
      "s_curve": lambda: sk.make_s_curve(NUM_ROWS, noise=0.05, random_state=seed),
      "friedman1": lambda: sk.make_friedman1(NUM_ROWS, n_features=10, noise=0.5, random_state=seed),
      "gaussian_quantiles": lambda: sk.make_gaussian_quantiles(n_samples=NUM_ROWS, n_features=6, n_classes=4,
                                                               random_state=seed),
  }[name]
  x, y = make()
  if name == "hastie_10_2":
    return Dataset(x.astype(np.float32), (y > 0).astype(np.int32))
  if name == "gaussian_quantiles":
    return Dataset(x.astype(np.float32), y.astype(np.int32))
  return Regression(x.astype(np.float32), y.astype(np.float32))  # swiss roll, S curve: the position along it


# name -> (draw(seed), how inputs are standardized: per "feature", "global"ly (images), or not at all (None))
DATA = {
    **{name: (functools.partial(_sklearn, name), "feature")
       for name in ("hastie_10_2", "swiss_roll", "s_curve", "friedman1", "gaussian_quantiles")},
    "checkerboard": (_checkerboard, "feature"),
    "shapes": (_shapes, "global"),
    "low_rank_regression": (_least_squares_data, None),
}


@functools.lru_cache(maxsize=None)
def dataset(name: str, seed: int = DATA_SEED, valid_fraction: float = 0.2):
  """(train, valid, classes) of ``DATA[name]``: a fixed split, inputs standardized with the train split's
  statistics, regression targets (classes 0) too."""
  draw, scaling = DATA[name]
  data = draw(seed)
  order = np.random.default_rng([seed, 0x5917]).permutation(len(data.labels))
  cut = int(round(valid_fraction * len(order)))
  train, valid = (type(data)(data.inputs[i], data.labels[i]) for i in (order[cut:], order[:cut]))
  if scaling is not None:
    axis = None if scaling == "global" else 0
    mean, std = train.inputs.mean(axis), np.maximum(train.inputs.std(axis), 1e-6)
    train, valid = (type(d)((d.inputs - mean) / std, d.labels) for d in (train, valid))
  regression = isinstance(data, Regression)
  if regression:
    mean, std = train.labels.mean(), train.labels.std()
    train, valid = (Regression(d.inputs, (d.labels - mean) / std) for d in (train, valid))
  classes = 0 if regression else int(data.labels.max()) + 1
  as32 = lambda d: type(d)(d.inputs.astype(np.float32), d.labels.astype(np.float32 if regression else np.int32))
  return as32(train), as32(valid), classes


# -- losses on data --------------------------------------------------------------------------------------------------

def mean_squared_error(prediction, target):
  """prediction (batch, 1) or (batch,), target (batch,)."""
  return jnp.mean(jnp.square(prediction.reshape(target.shape) - target))


def objective(classes: int):
  return _nn.cross_entropy if classes else mean_squared_error


def supervised(train, valid, predict, loss, batch_size: int | None, penalty=None):
  """(loss, valid_loss) of ``loss(predict(params, x), y)`` on minibatches of ``batch_size`` rows drawn from (key,
  step) (None: the whole training split), and on up to ``VALID_ROWS`` held-out rows (plus ``penalty(params)``)."""
  def on(split, stream, size):
    x, y = jnp.asarray(split.inputs), jnp.asarray(split.labels)
    rows = y.shape[0]

    def value(params, key, step=0):
      if size is not None and size < rows:
        index = _nn.batch_index(key, step, stream, size, rows)
        xb, yb = x[index], y[index]
      else:  # the whole split: deterministic
        xb, yb = x, y
      out = loss(predict(params, xb), yb)
      return out if penalty is None else out + penalty(params)
    return value
  return on(train, _nn.TRAIN_STREAM, batch_size), on(valid, _nn.VALID_STREAM, VALID_ROWS)


def sequences(draw, predict, loss, batch_size: int):
  """(loss, valid_loss) on sequences ``draw(key, count) -> (inputs, targets)``: fresh ones each step (training) and
  from another stream (validation: data never trained on)."""
  def on(stream, size):
    def value(params, key, step=0):
      inputs, targets = draw(jax.random.fold_in(jax.random.fold_in(key, stream), step), size)
      return loss(predict(params, inputs), targets)
    return value
  return on(_nn.TRAIN_STREAM, batch_size), on(_nn.VALID_STREAM, VALID_ROWS // 2)


# -- builders: options -> (parameter spec, loss, valid_loss) ---------------------------------------------------------

def mlp(o: dict):
  """Dense -> activation per hidden layer, linear output (classes, or 1 for regression)."""
  train, valid, classes = dataset(o["data"])
  hidden = list(o["hidden"])
  spec = _nn.mlp_spec([train.inputs.shape[1], *hidden, classes or 1])
  predict = lambda params, x: _nn.mlp_apply(params, x, o["activation"], len(hidden))
  return (spec, *supervised(train, valid, predict, objective(classes), o["batch_size"]))


def residual_mlp(o: dict):
  """dense(width) -> blocks x + dense(act(LayerNorm x)) -> LayerNorm -> dense(classes)."""
  train, valid, classes = dataset(o["data"])
  width, act = o["width"], _nn.ACTIVATIONS[o["activation"]]
  spec = {"input": _nn.dense_spec(train.inputs.shape[1], width), "final_norm": _nn.norm_spec(width),
          "output": _nn.dense_spec(width, classes or 1),
          "blocks": [{**_nn.norm_spec(width), **_nn.dense_spec(width, width)} for _ in range(o["blocks"])]}

  def predict(params, x):
    x = _nn.dense(params["input"], x)
    for block in params["blocks"]:
      x = x + _nn.dense(block, act(_nn.layer_norm(block, x)))
    return _nn.dense(params["output"], _nn.layer_norm(params["final_norm"], x))
  return (spec, *supervised(train, valid, predict, objective(classes), o["batch_size"]))


def patches(x, stride: int):
  """(batch, side, side, c) -> (batch, side', side', c * 9): the 3x3 neighbourhoods ('SAME' padding, as
  lax.conv_general_dilated_patches orders them: channel, row, column) at every ``stride``-th position. Built from
  slices because a convolution with per-problem kernels, vmapped over problems, becomes a grouped convolution that
  runs ~5-10x slower on a CPU; slices and a matrix product vmap well."""
  side = x.shape[1]
  out = -(-side // stride)
  low = max((out - 1) * stride + 3 - side, 0) // 2
  padded = jnp.pad(x, ((0, 0), (low, 2), (low, 2), (0, 0)))
  span = stride * (out - 1) + 1
  shifted = [padded[:, i:i + span:stride, j:j + span:stride, :] for i in range(3) for j in range(3)]
  return jnp.stack(shifted, -1).reshape(*x.shape[:1], out, out, -1)


def cnn(o: dict):
  """Conv(channels[i], 3x3, strides[i], SAME) -> ReLU per layer, global average pool, dense(classes)."""
  train, valid, classes = dataset(o["data"])
  channels = [train.inputs.shape[-1], *o["channels"]]
  spec = {"convs": [{"w": _nn.Normal((3, 3, a, b), 1 / math.sqrt(9 * a)), "b": np.zeros(b, np.float32)}
                    for a, b in zip(channels[:-1], channels[1:])],
          "output": _nn.dense_spec(channels[-1], classes)}

  def predict(params, x):
    """x (batch, side, side, 1) -> (batch, classes)."""
    for layer, stride in zip(params["convs"], o["strides"]):
      kernel = jnp.transpose(layer["w"], (2, 0, 1, 3)).reshape(-1, layer["w"].shape[-1])  # (c_in * 9, c_out)
      x = jax.nn.relu(patches(x, stride) @ kernel + layer["b"])
    return _nn.dense(params["output"], jnp.mean(x, axis=(1, 2)))
  return (spec, *supervised(train, valid, predict, _nn.cross_entropy, o["batch_size"]))


def linear(o: dict):
  """A linear model: softmax regression with a ridge penalty l2/2 ||w||^2 (classes), or least squares 1/2 MSE
  (regression); convex."""
  train, valid, classes = dataset(o["data"])
  features = int(np.prod(train.inputs.shape[1:]))
  flat = lambda d: type(d)(d.inputs.reshape(len(d.labels), features), d.labels)
  l2 = o.get("l2", 0.0)
  penalty = (lambda params: 0.5 * l2 * jnp.sum(jnp.square(params["w"]))) if l2 else None
  loss = _nn.cross_entropy if classes else lambda p, y: 0.5 * mean_squared_error(p, y)
  return (_nn.dense_spec(features, classes or 1),
          *supervised(flat(train), flat(valid), _nn.dense, loss, o["batch_size"], penalty))


def _attention(params, x, heads: int):
  """Bidirectional multi-head self-attention: x (batch, length, d) -> (batch, length, d)."""
  batch, length, d = x.shape
  q, k, v = (t.reshape(batch, length, heads, d // heads) for t in jnp.split(_nn.dense(params["qkv"], x), 3, -1))
  weights = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(d // heads), axis=-1)
  return _nn.dense(params["proj"], jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(batch, length, d))


def sort_transformer(o: dict):
  """Encoder-only transformer (pre-LayerNorm, no causal mask) reading ``length`` tokens of ``vocab``; position i
  predicts the i-th smallest token (cross-entropy)."""
  d, vocab, length = o["d_model"], o["vocab"], o["length"]
  spec = {"embed": _nn.Normal((vocab, d), 1.0), "position": _nn.Normal((length, d), 0.1),
          "final_norm": _nn.norm_spec(d), "output": _nn.dense_spec(d, vocab),
          "blocks": [{"norm_1": _nn.norm_spec(d), "qkv": _nn.dense_spec(d, 3 * d), "proj": _nn.dense_spec(d, d),
                      "norm_2": _nn.norm_spec(d), "mlp_in": _nn.dense_spec(d, 2 * d),
                      "mlp_out": _nn.dense_spec(2 * d, d)} for _ in range(o["layers"])]}

  def predict(params, tokens):
    """tokens (batch, length) int -> logits (batch, length, vocab)."""
    x = params["embed"][tokens] + params["position"]
    for block in params["blocks"]:
      x = x + _attention(block, _nn.layer_norm(block["norm_1"], x), o["heads"])
      x = x + _nn.dense(block["mlp_out"], jax.nn.gelu(_nn.dense(block["mlp_in"], _nn.layer_norm(block["norm_2"], x))))
    return _nn.dense(params["output"], _nn.layer_norm(params["final_norm"], x))

  def draw(key, count):
    tokens = jax.random.randint(key, (count, length), 0, vocab)
    return tokens, jnp.sort(tokens, axis=1)
  return (spec, *sequences(draw, predict, _nn.cross_entropy, o["batch_size"]))


def _recurrent_spec(inputs: int, hidden: int, gates: int, outputs: int, forget_bias: bool = False) -> dict:
  bias = np.zeros(gates * hidden, np.float32)
  if forget_bias:
    bias[hidden:2 * hidden] = 1.0  # LSTM forget gate open at first
  return {"cell": {"wx": _nn.Normal((inputs, gates * hidden), 1 / math.sqrt(inputs)),
                   "wh": _nn.Normal((hidden, gates * hidden), 1 / math.sqrt(hidden)), "b": bias},
          "output": _nn.dense_spec(hidden, outputs)}


def adding_gru(o: dict):
  """The adding problem (Hochreiter & Schmidhuber 1997): (length, 2) inputs, a value in [0, 1] and a marker on two
  positions (one in each half); a GRU's last state regresses the sum of the two marked values (MSE; predicting the
  mean scores 1/6)."""
  hidden, length = o["hidden"], o["length"]
  spec = _recurrent_spec(2, hidden, 3, 1)

  def predict(params, x):
    """x (batch, length, 2) -> (batch, 1)."""
    x_proj = jnp.swapaxes(x, 0, 1) @ params["cell"]["wx"] + params["cell"]["b"]
    last, _ = jax.lax.scan(lambda h, xp: (gru_step(params["cell"], h, xp), None), jnp.zeros((x.shape[0], hidden)),
                           x_proj)
    return _nn.dense(params["output"], last)

  def draw(key, count):
    value_key, first_key, second_key = jax.random.split(key, 3)
    values = jax.random.uniform(value_key, (count, length))
    first = jax.random.randint(first_key, (count,), 0, length // 2)
    second = jax.random.randint(second_key, (count,), length // 2, length)
    markers = jax.nn.one_hot(first, length) + jax.nn.one_hot(second, length)
    return jnp.stack([values, markers], -1), jnp.sum(values * markers, 1)
  return (spec, *sequences(draw, predict, mean_squared_error, o["batch_size"]))


def parity_lstm(o: dict):
  """Running parity: an LSTM reads ``length`` random bits and predicts, at every position, the parity of the bits so
  far (cross-entropy, ln 2 by chance)."""
  hidden, length = o["hidden"], o["length"]
  spec = _recurrent_spec(1, hidden, 4, 2, forget_bias=True)

  def predict(params, bits):
    """bits (batch, length) -> logits (batch, length, 2)."""
    x_proj = bits.T[..., None] @ params["cell"]["wx"] + params["cell"]["b"]
    zeros = jnp.zeros((bits.shape[0], hidden))
    def step(carry, xp):
      carry = lstm_step(params["cell"], carry, xp)
      return carry, carry[0]
    _, states = jax.lax.scan(step, (zeros, zeros), x_proj)
    return _nn.dense(params["output"], jnp.swapaxes(states, 0, 1))

  def draw(key, count):
    bits = jax.random.bernoulli(key, 0.5, (count, length)).astype(jnp.int32)
    return bits.astype(jnp.float32), jnp.cumsum(bits, 1) % 2
  return (spec, *sequences(draw, predict, _nn.cross_entropy, o["batch_size"]))


def matrix_completion(o: dict):
  """Low-rank matrix completion (non-neural, nonconvex): M (rows, cols) from make_low_rank_matrix (effective rank 5,
  scaled to unit entry variance), factors U (rows, rank), V (cols, rank) from N(0, init^2); the loss is the mean
  squared error of U V^T on the observed entries (full batch), the validation loss on held-out entries."""
  from sklearn.datasets import make_low_rank_matrix
  rows, cols, rank = o["rows"], o["cols"], o["rank"]
  target = make_low_rank_matrix(rows, cols, effective_rank=5, tail_strength=0.05, random_state=DATA_SEED)
  target = jnp.asarray(target / target.std(), jnp.float32)
  split = np.random.default_rng([DATA_SEED, 0x3A7]).uniform(size=(rows, cols))
  observed, held_out = (jnp.asarray(m, jnp.float32) for m in (split < o["observed"], split > 0.9))
  spec = {"u": _nn.Normal((rows, rank), o["init"]), "v": _nn.Normal((cols, rank), o["init"])}

  def on(mask):
    def value(params, key=None, step=0):
      del key, step  # full batch
      error = params["u"] @ params["v"].T - target
      return jnp.sum(mask * error**2) / jnp.sum(mask)
    return value
  return spec, on(observed), on(held_out)


# -- the suite -------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Problem:
  """A benchmark problem: ``builder(options) -> (parameter spec, loss, valid_loss)``, its full horizon and the
  horizon of its quick variant (None: not in the quick subset); ``family``: the meta-training family it is nearest
  to (None: no family samples anything of its kind) and ``view``: its fields in that family's terms."""
  name: str
  kind: str
  description: str
  builder: Callable
  options: dict
  horizon: int
  quick_horizon: int | None = None
  family: str | None = None
  view: dict = field(default_factory=dict)
  traits: dict = field(default_factory=dict)

  @property
  def batch_size(self) -> int | None:
    """Rows or sequences per training step (None: full batch)."""
    return self.options.get("batch_size")

  def task(self, quick: bool = False, horizon: int | None = None) -> Task:
    """The Task: the quick variant's horizon with ``quick``, or ``horizon`` when given."""
    spec, loss, valid_loss = self.builder(self.options)
    steps = horizon or (self.quick_horizon if quick and self.quick_horizon else self.horizon)
    return Task(self.name, lambda key: _nn.materialize(key, spec), loss, steps, valid_loss=valid_loss,
                options={"problem": self.name, "quick": quick, **self.options},
                traits={"kind": self.kind, "network": self.builder not in (linear, matrix_completion), **self.traits})


def _mlp_view(data, depth, width, activation, batch_size, **_):
  return {"dataset": data, "depth": depth, "width": width, "activation": activation, "batch_size": batch_size}


P = Problem
PROBLEMS = {p.name: p for p in [
    P("wide_mlp", "wide MLP", "MLP 10-1024-2 (ReLU) on make_hastie_10_2: twice the families' widest layer",
      mlp, dict(data="hastie_10_2", hidden=(1024,), activation="relu", batch_size=128), 1000, 300, "mlp",
      _mlp_view("hastie_10_2", 1, 1024, "relu", 128)),
    P("swiss_roll_long", "long horizon", "MLP 3-32-32-1 (tanh) regressing the position along a Swiss roll, 8000 "
      "steps: 4x the families' longest horizon", mlp, dict(data="swiss_roll", hidden=(32, 32), activation="tanh",
                                                           batch_size=32), 8000, None, "mlp",
      _mlp_view("swiss_roll", 2, 32, "tanh", 32)),
    P("s_curve_batch2", "batch size 2", "MLP 3-64-64-1 (ReLU) regressing the position along an S curve from "
      "minibatches of 2 rows", mlp, dict(data="s_curve", hidden=(64, 64), activation="relu", batch_size=2), 2000,
      500, "mlp", _mlp_view("s_curve", 2, 64, "relu", 2)),
    P("checkerboard_batch1024", "batch size 1024", "MLP 2-64-64-2 (ReLU) classifying a 4x4 checkerboard from "
      "minibatches of 1024 points", mlp, dict(data="checkerboard", hidden=(64, 64), activation="relu",
                                              batch_size=1024), 1000, None, "mlp",
      _mlp_view("checkerboard", 2, 64, "relu", 1024)),
    P("friedman_mlp", "MLP, unseen data", "MLP 10-64-64-1 (GELU) on make_friedman1 regression", mlp,
      dict(data="friedman1", hidden=(64, 64), activation="gelu", batch_size=64), 1500, 400, "mlp",
      _mlp_view("friedman1", 2, 64, "gelu", 64)),
    P("residual_mlp_deep", "deep residual MLP", "8 residual blocks x + W relu(LayerNorm x), width 32, classifying "
      "make_gaussian_quantiles (6-D, 4 classes)", residual_mlp,
      dict(data="gaussian_quantiles", width=32, blocks=8, activation="relu", batch_size=64), 1000, 300, "mlp",
      _mlp_view("gaussian_quantiles", 8, 32, "relu", 64)),
    P("shapes_cnn", "CNN, unseen images", "CNN 8-16-16 channels (3x3, strides 1-2-2), global average pool, on "
      "generated 12x12 images of bars, crosses and blobs", cnn,
      dict(data="shapes", channels=(8, 16, 16), strides=(1, 2, 2), batch_size=32), 1000, 300, "cnn",
      {"dataset": "shapes", "depth": 3, "channels": 16, "kernel": 3, "batch_size": 32}),
    P("sort_transformer", "transformer, sorting", "encoder-only transformer (2 layers, d 32, 4 heads, no causal "
      "mask) sorting 8 tokens of 16", sort_transformer,
      dict(d_model=32, heads=4, layers=2, vocab=16, length=8, batch_size=32), 1500, 400, "transformer_lm",
      {"data": "sort", "layers": 2, "d_model": 32, "heads": 4, "seq_len": 8, "batch_size": 32}),
    P("adding_gru", "RNN, adding problem", "GRU (32 units) summing the two marked values of 30 (the adding "
      "problem), MSE", adding_gru, dict(hidden=32, length=30, batch_size=32), 2000, 500, "rnn_lm",
      {"data": "adding", "cell": "gru", "hidden": 32, "seq_len": 30, "batch_size": 32}),
    P("parity_lstm", "RNN, running parity", "LSTM (16 units) predicting the running parity of 16 random bits",
      parity_lstm, dict(hidden=16, length=16, batch_size=32), 1500, None, "rnn_lm",
      {"data": "parity", "cell": "lstm", "hidden": 16, "seq_len": 16, "batch_size": 32}),
    P("least_squares", "convex, ill-conditioned", "least squares (full batch) on 100 low-rank features from "
      "make_regression (effective rank 10, condition number ~2e4)", linear,
      dict(data="low_rank_regression", batch_size=None), 3000, 800, "logistic_regression",
      {"dataset": "low_rank_regression"}, {"convex": True}),
    P("ridge_softmax_shapes", "convex, ridge", "softmax regression of the flattened 12x12 shapes (144 features, "
      "4 classes) with ridge penalty 1e-3", linear, dict(data="shapes", l2=1e-3, batch_size=128), 2000, None,
      "logistic_regression", {"dataset": "shapes", "l2": 1e-3, "batch_size": 128}, {"convex": True}),
    P("matrix_completion", "nonconvex, non-neural", "rank-10 factorization U V^T completing a 120x100 low-rank "
      "matrix from 40% of its entries (full batch), small initialization", matrix_completion,
      dict(rows=120, cols=100, rank=10, observed=0.4, init=0.1), 2000, 600, None, {}),
]}
QUICK = tuple(name for name, p in PROBLEMS.items() if p.quick_horizon)


def get(name: str) -> Problem:
  """The problem ``name``; KeyError naming the known ones."""
  if name not in PROBLEMS:
    raise KeyError(f"unknown benchmark problem {name!r}; known: {', '.join(PROBLEMS)}")
  return PROBLEMS[name]


# Data a family draws on without a field for it (the others name theirs in a 'dataset' or 'data' field).
IMPLICIT_DATA = {"cnn": ("digits",)}


def held_out_reasons(problem: Problem) -> list[str]:
  """Why no meta-training family can sample ``problem``: no family of its kind, or fields of its nearest family's
  terms (``view``) and its horizon outside what that family draws. Empty when it could be sampled."""
  from lopt.tasks import families
  from lopt.tasks.families.base import Choice, IntRange, LogUniform, Sometimes
  if problem.family is None:
    return [f"no family samples a {problem.kind} problem"]
  family = families.get(problem.family)
  space = {**family.space, "horizon": family.problem_space["horizon"]}
  implicit = IMPLICIT_DATA.get(family.name)
  if implicit:
    space["dataset"] = Choice(implicit)
  reasons = []
  for name, value in {**problem.view, "horizon": problem.horizon}.items():
    dist = space.get(name) or space.get({"dataset": "data", "data": "dataset"}.get(name, ""))
    if dist is None:
      continue  # a field the family does not vary
    if isinstance(dist, Sometimes):
      inside = value == dist.otherwise or dist.distribution.low <= value <= dist.distribution.high
    elif isinstance(dist, (IntRange, LogUniform)):
      inside = dist.low <= value <= dist.high
    else:
      inside = value in dist.options
    if not inside:
      reasons.append(f"{name} {value} outside family {family.name!r}'s {dist.describe()}")
  return reasons


def num_params(problem: Problem) -> int:
  spec = problem.builder(problem.options)[0]
  leaves = jax.tree.leaves(spec, is_leaf=lambda x: isinstance(x, _nn.Normal))
  return sum(math.prod(leaf.shape) for leaf in leaves)


def listing(names=None) -> str:
  """``lopt benchmark --list``: one row per problem (name, kind, parameters, horizon and the quick variant's, batch
  size, whether in --quick), then its description."""
  rows = [["problem", "kind", "params", "horizon", "quick", "batch", "description"]]
  for name in names or PROBLEMS:
    p = PROBLEMS[name]
    rows.append([name, p.kind, f"{num_params(p):,}", str(p.horizon), str(p.quick_horizon or "-"),
                 str(p.batch_size or "full"), p.description])
  widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
  line = lambda row: "  ".join(c.ljust(w) for c, w in zip(row, widths)) + "  " + row[-1]
  note = (f"quick: the --quick subset ({len(QUICK)} problems) and its horizon; '-': not in it. Data are generated from "
          f"a seed or ship with scikit-learn.")
  return "\n".join([line(rows[0])] + [line(row) for row in rows[1:]] + ["", note])
