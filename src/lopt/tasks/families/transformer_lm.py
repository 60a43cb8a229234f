"""Small decoder-only transformer language models (pre-LayerNorm, causal, learned positions)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lopt.tasks.families import _nn
from lopt.tasks.families.base import Choice, Family, FamilyError, IntRange, LogUniform

MLP_RATIO = 4

SPACE = {
    "data": Choice(_nn.LM_DATA),
    "data_seed": IntRange(0, 999),  # markov: the chain; text: the held-out tenth (data_seed % 10)
    "layers": IntRange(1, 2),
    "d_model": Choice((16, 24, 32, 48, 64, 96, 128)),  # multiples of 8: every head count divides them
    "heads": Choice((1, 2, 4)),
    "seq_len": LogUniform(8, 64, integer=True),
    "batch_size": LogUniform(4, 128, integer=True),
}


def step_flops(shape: dict) -> float:
  d, length = shape["d_model"], shape["seq_len"]
  per_layer = (4 + 2 * MLP_RATIO) * d * d + 2 * length * d  # qkv, projection, MLP; scores and mixing
  per_token = shape["layers"] * per_layer + d * _nn.lm_vocab(shape["data"])
  return _nn.step_flops(per_token * length, shape["batch_size"])


def attention(params, x, heads: int):
  """Causal multi-head self-attention: x (batch, length, d) -> (batch, length, d)."""
  batch, length, d = x.shape
  q, k, v = jnp.split(_nn.dense(params["qkv"], x), 3, axis=-1)
  split = lambda t: t.reshape(batch, length, heads, d // heads)
  q, k, v = split(q), split(k), split(v)
  scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(d // heads)
  causal = jnp.tril(jnp.ones((length, length), bool))
  weights = jax.nn.softmax(jnp.where(causal, scores, -1e9), axis=-1)
  mixed = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(batch, length, d)
  return _nn.dense(params["proj"], mixed)


def build(shape: dict):
  """token + position embedding -> [x + attn(LN x); x + MLP(LN x)] per layer -> LN -> dense(vocab)."""
  d, heads, layers, length = shape["d_model"], shape["heads"], shape["layers"], shape["seq_len"]
  if d % heads:
    raise FamilyError(f"family 'transformer_lm': heads ({heads}) must divide d_model ({d})")
  vocab = _nn.lm_vocab(shape["data"])

  spec = {"embed": _nn.Normal((vocab, d), 1.0), "position": _nn.Normal((length, d), 0.1),
          "final_norm": _nn.norm_spec(d), "output": _nn.dense_spec(d, vocab)}
  for i in range(layers):
    spec[f"block_{i}"] = {
        "norm_1": _nn.norm_spec(d), "qkv": _nn.dense_spec(d, 3 * d), "proj": _nn.dense_spec(d, d),
        "norm_2": _nn.norm_spec(d), "mlp_in": _nn.dense_spec(d, MLP_RATIO * d),
        "mlp_out": _nn.dense_spec(MLP_RATIO * d, d)}

  def logits(params, tokens):
    """tokens (batch, seq_len) int -> (batch, seq_len, vocab)."""
    x = params["embed"][tokens] + params["position"]
    for i in range(layers):
      block = params[f"block_{i}"]
      x = x + attention(block, _nn.layer_norm(block["norm_1"], x), heads)
      h = jax.nn.gelu(_nn.dense(block["mlp_in"], _nn.layer_norm(block["norm_2"], x)))
      x = x + _nn.dense(block["mlp_out"], h)
    return _nn.dense(params["output"], _nn.layer_norm(params["final_norm"], x))

  return _nn.lm_task("transformer_lm", shape["data"], shape["data_seed"], spec, logits, shape["batch_size"], length)


FAMILY = Family(
    name="transformer_lm",
    description="decoder-only transformer language model (pre-LayerNorm, causal, learned positions) of Python's "
                "documentation text or of a random Markov chain",
    space=SPACE, build=build, step_flops=step_flops)
