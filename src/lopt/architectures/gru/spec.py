"""The component-wise GRU's fields, encodings and meta-parameter shapes (SPEC §2), JAX-free."""

from __future__ import annotations

from lopt.architectures.spec import ArchitectureSpec
from lopt.fields import Field, int_in, is_positive_finite

ENCODINGS = ("scale", "log1p_sign")
NUM_INPUTS = {"scale": 1, "log1p_sign": 2}  # input encoding -> I, the network inputs per coordinate
MAX_HIDDEN_SIZE = 65536  # far above the paper's 256; bounds what a hostile optimizer config can make us allocate


def param_shapes(values: dict) -> dict[str, tuple[int, ...]]:
  """The meta-parameters' names and shapes; blocks along the 3H axis are [update | reset | candidate]."""
  hidden, inputs = values["hidden_size"], NUM_INPUTS[values["input_encoding"]]
  return {"input_weights": (inputs, 3 * hidden), "recurrent_weights": (hidden, 3 * hidden), "bias": (3 * hidden,),
          "initial_state": (hidden,), "readout_weights": (hidden, 1), "readout_bias": (1,)}


SPEC = ArchitectureSpec(
    name="gru",
    description="component-wise GRU on every scalar parameter (Andrychowicz et al. 2016; the paper's optimizer)",
    fields={
        "hidden_size": Field(256, int_in(1, MAX_HIDDEN_SIZE), f"an integer in [1, {MAX_HIDDEN_SIZE}]",
                             "GRU units (paper: 256)"),
        "input_scale": Field(1.0, is_positive_finite, "a positive finite number",
                             "gradient multiplier before the GRU", float),
        "output_scale": Field(1.0, is_positive_finite, "a positive finite number",
                              "multiplier on the GRU readout", float),
        "input_encoding": Field("scale", lambda v: isinstance(v, str) and v in ENCODINGS, f"one of {list(ENCODINGS)}",
                                "'scale' (input_scale*g) or 'log1p_sign' ([log1p|g|, sign g])"),
    },
    param_shapes=param_shapes,
    jax_class="lopt.architectures.gru.optimizer:GRUOptimizer",
    torch_class="lopt.architectures.gru.torch:GRURule",
    recurrent=True,
    summary=lambda values: f"component-wise GRU with {values['hidden_size']} units",
    # Files of format_version 1 (lopt 0.1) could omit the scales and the encoding, never hidden_size.
    legacy_defaults={"input_scale": 1.0, "output_scale": 1.0, "input_encoding": "scale"},
)
