"""The component-wise GRU as trained-optimizer files describe it (docs/CHECKPOINT_FORMAT.md): config fields and their
allowed values, input encodings, tensor names and shapes, and ``check_optimizer_fields``, the one validator of
config.json's ``optimizer`` field.

Imports neither jax nor torch: ``lopt.checkpoint`` (so ``lopt.load_optimizer``), ``lopt.torch`` and
``lopt.optimizers.gru.GRUOptimizer`` all take these facts from here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from lopt.errors import CheckpointError

ARCHITECTURE = "gru"  # the only architecture of format_version 1
ENCODINGS = ("scale", "log1p_sign")
NUM_INPUTS = {"scale": 1, "log1p_sign": 2}  # input encoding -> I, the network inputs per coordinate
MAX_HIDDEN_SIZE = 65536  # far above the paper's 256; bounds what a hostile optimizer config can make us allocate
DEFAULTS = {"input_scale": 1.0, "output_scale": 1.0, "input_encoding": "scale"}  # hidden_size has no default


def _is_int(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _is_positive_finite(value) -> bool:
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    return False
  try:
    value = float(value)
  except OverflowError:  # an integer too large for a float
    return False
  return math.isfinite(value) and value > 0


# The fields of config.json's ``optimizer`` (besides ``architecture``): (is it allowed, what is allowed).
FIELDS = {
    "hidden_size": (lambda v: _is_int(v) and 1 <= v <= MAX_HIDDEN_SIZE, f"an integer in [1, {MAX_HIDDEN_SIZE}]"),
    "input_scale": (_is_positive_finite, "a positive finite number"),
    "output_scale": (_is_positive_finite, "a positive finite number"),
    "input_encoding": (lambda v: isinstance(v, str) and v in ENCODINGS, f"one of {list(ENCODINGS)}"),
}


def param_shapes(hidden_size: int, num_inputs: int) -> dict[str, tuple[int, ...]]:
  """The meta-parameters' names and shapes; blocks along the 3H axis are [update | reset | candidate]."""
  hidden, inputs = hidden_size, num_inputs
  return {"input_weights": (inputs, 3 * hidden), "recurrent_weights": (hidden, 3 * hidden), "bias": (3 * hidden,),
          "initial_state": (hidden,), "readout_weights": (hidden, 1), "readout_bias": (1,)}


@dataclass(frozen=True)
class GRUSpec:
  """A validated ``optimizer`` field of config.json (``check_optimizer_fields`` builds it; ``GRUOptimizer.config()``
  wrote it). Scales are floats."""
  hidden_size: int
  input_scale: float
  output_scale: float
  input_encoding: str

  @property
  def num_inputs(self) -> int:
    return NUM_INPUTS[self.input_encoding]

  def config(self) -> dict:
    return {"architecture": ARCHITECTURE, "hidden_size": self.hidden_size, "input_scale": self.input_scale,
            "output_scale": self.output_scale, "input_encoding": self.input_encoding}

  def param_shapes(self) -> dict[str, tuple[int, ...]]:
    return param_shapes(self.hidden_size, self.num_inputs)


def check_optimizer_fields(fields, source: str | Path) -> GRUSpec:
  """Validates config.json's ``optimizer`` field; ``source`` (the file, or what the fields came from) starts every
  message. Raises ``CheckpointError`` naming the field, what was found and what is allowed."""
  if not isinstance(fields, dict):
    raise CheckpointError(f"{source}: field 'optimizer' must be an object, found {type(fields).__name__}")
  architecture = fields.get("architecture")
  if architecture != ARCHITECTURE:
    raise CheckpointError(f"{source}: field 'optimizer.architecture' must be {ARCHITECTURE!r} (the only architecture "
                          f"of format_version 1), found {_show(architecture)}")
  unknown = sorted(str(name) for name in set(fields) - set(FIELDS) - {"architecture"})
  if unknown:
    raise CheckpointError(f"{source}: field 'optimizer' has unknown entries {_show(unknown)}; allowed: "
                          f"{['architecture', *sorted(FIELDS)]}")
  if "hidden_size" not in fields:
    raise CheckpointError(f"{source}: field 'optimizer.hidden_size' is missing (must be {FIELDS['hidden_size'][1]})")
  values = {**DEFAULTS, **{name: value for name, value in fields.items() if name != "architecture"}}
  for name, (allowed, what) in FIELDS.items():
    if not allowed(values[name]):
      raise CheckpointError(f"{source}: field 'optimizer.{name}' must be {what}, found {_show(values[name])}")
  return GRUSpec(hidden_size=values["hidden_size"], input_scale=float(values["input_scale"]),
                 output_scale=float(values["output_scale"]), input_encoding=values["input_encoding"])


def _show(value, limit: int = 100) -> str:
  """repr, cut short: a hostile file's value (a megabyte string, a 5000-digit integer) stays a one-line message."""
  try:
    text = repr(value)
  except ValueError:  # holds an integer with more digits than Python converts to text
    return f"a {type(value).__name__} too large to show"
  return text if len(text) <= limit else text[:limit] + "..."
