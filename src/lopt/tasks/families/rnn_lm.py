"""Recurrent language models (GRU or LSTM, plain jax under lax.scan) of characters or Markov-chain tokens."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from lopt.tasks.families import _nn
from lopt.tasks.families.base import Choice, Family, IntRange, LogUniform

GATES = {"gru": 3, "lstm": 4}

SPACE = {
    "data": Choice(_nn.LM_DATA),
    "data_seed": IntRange(0, 999),  # markov: the chain; text: the held-out tenth (data_seed % 10)
    "cell": Choice(tuple(GATES)),
    "embed": LogUniform(8, 128, integer=True),
    "hidden": LogUniform(16, 256, integer=True),
    "seq_len": LogUniform(8, 64, integer=True),
    "batch_size": LogUniform(4, 128, integer=True),
}


def step_flops(shape: dict) -> float:
  gated = GATES[shape["cell"]] * shape["hidden"]
  per_token = shape["embed"] * gated + shape["hidden"] * gated + shape["hidden"] * _nn.lm_vocab(shape["data"])
  return _nn.step_flops(per_token * shape["seq_len"], shape["batch_size"])


def gru_step(params, h, x_proj):
  """One GRU step (PyTorch's form): h (batch, hidden), x_proj (batch, 3 hidden) = x @ wx + b."""
  h_proj = h @ params["wh"]
  xz, xr, xn = jnp.split(x_proj, 3, axis=-1)
  hz, hr, hn = jnp.split(h_proj, 3, axis=-1)
  z, r = jax.nn.sigmoid(xz + hz), jax.nn.sigmoid(xr + hr)
  n = jnp.tanh(xn + r * hn)
  return (1 - z) * n + z * h


def lstm_step(params, carry, x_proj):
  """One LSTM step: carry (h, c) each (batch, hidden), x_proj (batch, 4 hidden) = x @ wx + b."""
  h, c = carry
  i, f, g, o = jnp.split(x_proj + h @ params["wh"], 4, axis=-1)
  c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
  return jnp.tanh(c) * jax.nn.sigmoid(o), c


def build(shape: dict):
  """embed -> cell over time (zero initial state) -> dense(vocab) per position; next-token cross-entropy."""
  cell, embed, hidden = shape["cell"], shape["embed"], shape["hidden"]
  vocab, gated = _nn.lm_vocab(shape["data"]), GATES[shape["cell"]] * shape["hidden"]

  bias = np.zeros(gated, np.float32)
  if cell == "lstm":
    bias[hidden:2 * hidden] = 1.0  # forget gate open at first: gradients flow through time
  spec = {"embed": _nn.Normal((vocab, embed), 1.0),
          "cell": {"wx": _nn.Normal((embed, gated), 1 / math.sqrt(embed)),
                   "wh": _nn.Normal((hidden, gated), 1 / math.sqrt(hidden)), "b": bias},
          "output": _nn.dense_spec(hidden, vocab)}

  def logits(params, tokens):
    """tokens (batch, seq_len) int -> (batch, seq_len, vocab)."""
    x_proj = params["embed"][tokens.T] @ params["cell"]["wx"] + params["cell"]["b"]  # (seq_len, batch, gated)
    zeros = jnp.zeros((tokens.shape[0], hidden))
    if cell == "gru":
      step = lambda h, x: (gru_step(params["cell"], h, x),) * 2
      _, states = jax.lax.scan(step, zeros, x_proj)
    else:
      def step(carry, x):
        carry = lstm_step(params["cell"], carry, x)
        return carry, carry[0]
      _, states = jax.lax.scan(step, (zeros, zeros), x_proj)
    return _nn.dense(params["output"], jnp.swapaxes(states, 0, 1))

  return _nn.lm_task("rnn_lm", shape["data"], shape["data_seed"], spec, logits, shape["batch_size"],
                     shape["seq_len"])


FAMILY = Family(
    name="rnn_lm",
    description="GRU or LSTM next-token language model of Python's documentation text (97 characters) or of a "
                "random Markov chain (32 tokens)",
    space=SPACE, build=build, step_flops=step_flops)
