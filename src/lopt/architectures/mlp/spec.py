"""The per-parameter MLP optimizer's fields and meta-parameter shapes (SPEC §6), JAX-free.

Per coordinate, the MLP sees normalized Adam/Adafactor-like features and a step embedding and outputs a direction d
and a log-magnitude a; the update is d * exp(magnitude_scale * a) * step_scale (small scales: an untrained optimizer
takes small steps, and the meta-gradient of the magnitude stays tame). See ``optimizer.py`` for the equations.
"""

from __future__ import annotations

from lopt.architectures.spec import ArchitectureSpec
from lopt.fields import Field, int_in, is_positive_finite

# Time features: tanh(t / tau) for these tau (steps), the same for every coordinate (ours; a log-spaced bank).
TIME_SCALES = (1.0, 3.0, 10.0, 30.0, 100.0, 300.0, 1000.0, 3000.0, 10000.0)
MAX_WIDTH = 4096
MAX_DECAYS = 8

# Numbers of the update, read by optimizer.py (JAX) and torch.py (PyTorch).
G2_EPSILON = 1e-30     # added to g*g: an all-zero gradient keeps mean(r) > 0 (Adafactor's eps1)
RSQRT_EPSILON = 1e-12  # added to v before rsqrt: a coordinate that never had a gradient gets a large, finite rs
NORM_EPSILON = 1e-12   # added to a feature's mean square: an all-zero feature (zero-initialized biases) stays 0


def factored_axes(shape: tuple[int, ...]) -> tuple[int, int] | None:
  """The two axes Adafactor's second moment is factored over: the two largest (ties: the later axis), in index
  order; None for a tensor of fewer than two axes. The largest, not the last two, so that a conv kernel factors over
  its channels in any layout (PyTorch's OIHW as JAX's HWIO) rather than over its 3x3 window."""
  if len(shape) < 2:
    return None
  first, second = sorted(sorted(range(len(shape)), key=lambda axis: (shape[axis], axis))[-2:])
  return first, second


def factored_shapes(shape: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """(rows, cols) accumulator shapes for a tensor of ``shape`` with at least two axes: ``shape`` with the second
  (rows) or the first (cols) factored axis set to 1."""
  a, b = factored_axes(shape)
  return (tuple(1 if i == b else n for i, n in enumerate(shape)),
          tuple(1 if i == a else n for i, n in enumerate(shape)))


def num_inputs(values: dict) -> int:
  """Per-coordinate features: g, p, K momenta, g/sqrt(v), K momenta/sqrt(v), and the time features."""
  decays = len(values["momentum_decays"])
  return 3 + 2 * decays + len(TIME_SCALES)


def param_shapes(values: dict) -> dict[str, tuple[int, ...]]:
  """Key paths 'layers/i/w' (fan_in, fan_out) and 'layers/i/b' (fan_out,); the last layer has 2 outputs."""
  sizes = [num_inputs(values)] + [values["hidden_size"]] * values["num_layers"] + [2]
  shapes = {}
  for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
    shapes[f"layers/{i}/w"] = (fan_in, fan_out)
    shapes[f"layers/{i}/b"] = (fan_out,)
  return shapes


def _decays(value) -> bool:
  return (isinstance(value, (list, tuple)) and 1 <= len(value) <= MAX_DECAYS
          and all(is_positive_finite(v) and v < 1 for v in value))


SPEC = ArchitectureSpec(
    name="mlp",
    description="per-parameter MLP over normalized momentum, Adafactor second-moment and step features",
    fields={
        "hidden_size": Field(32, int_in(1, MAX_WIDTH), f"an integer in [1, {MAX_WIDTH}]", "MLP width"),
        "num_layers": Field(2, int_in(0, 8), "an integer in [0, 8]", "hidden layers of the MLP"),
        "momentum_decays": Field((0.9, 0.99, 0.999), _decays, f"a list of 1 to {MAX_DECAYS} numbers in (0, 1)",
                                 "decays of the momentum features", lambda v: tuple(float(x) for x in v)),
        "rms_decay": Field(0.999, lambda v: is_positive_finite(v) and v < 1, "a number in (0, 1)",
                           "decay of the (factored) second-moment estimate", float),
        "step_scale": Field(1e-3, is_positive_finite, "a positive finite number",
                            "multiplier on every update (the step size at zero log-magnitude)", float),
        "magnitude_scale": Field(1e-3, is_positive_finite, "a positive finite number",
                                 "multiplier on the log-magnitude output", float),
    },
    param_shapes=param_shapes,
    jax_class="lopt.architectures.mlp.optimizer:MLPOptimizer",
    torch_class="lopt.architectures.mlp.torch:MLPRule",
    recurrent=False,
    summary=lambda values: (f"per-parameter MLP, {values['num_layers']} hidden layer(s) of {values['hidden_size']}, "
                            f"{len(values['momentum_decays'])} momenta"),
)
