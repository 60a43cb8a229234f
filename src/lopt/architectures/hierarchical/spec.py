"""The hierarchical optimizer's fields and meta-parameter shapes (SPEC §6, Metz et al. 2020), JAX-free.

Three levels. Per coordinate, a small MLP over normalized Adam/Adafactor-like features proposes a direction and a
log-magnitude; per tensor, an LSTM over the tensor's statistics, the training and validation losses and the time
sets the tensor's log step size and a context for the MLP; globally, the losses pass through their own accumulators.
The update is exp(log step) * (learned direction - Adam's direction). ``optimizer.py`` has the equations.
"""

from __future__ import annotations

from lopt.architectures.spec import ArchitectureSpec
from lopt.fields import Field, int_in, is_positive_finite

# Absolute-time features tanh(t / tau), as the mlp architecture's, and horizon-fraction features (t / num_steps)^q.
TIME_SCALES = (1.0, 3.0, 10.0, 30.0, 100.0, 300.0, 1000.0, 3000.0, 10000.0)
FRACTION_POWERS = (1.0, 2.0, 4.0)
MAX_WIDTH = 1024
MAX_DECAYS = 4

# Global loss features: for the training loss and for the validation loss, each through its own accumulators.
LOSS_DECAYS = (0.9, 0.99)          # EMAs of the log loss
NUM_LOSS_FEATURES = 2 * (2 + len(LOSS_DECAYS)) + 1  # per loss: drop since its first value, a seen flag, and
#                                                  the deviation from each EMA; plus the change of the valid-train gap
SHAPE_FEATURES = 4                 # is-scalar, is-vector, log size, rank

# Numbers of the update, read by optimizer.py (JAX), torch.py (PyTorch) and triton_passes.py (its kernels).
RSQRT_EPSILON = 1e-12   # as the mlp architecture: v + eps under the rsqrt
NORM_EPSILON = 1e-12    # a column's mean square + eps: an all-zero column stays zero
LOG_FLOOR = 1e-30       # log(x + LOG_FLOOR) for RMS values that may be zero
LOG_STEP_LIMIT = 8.0    # the per-tensor log step stays within +-8: step sizes from 3e-4 to 3e3 times step_scale
LOG_SCALE = 0.1         # log-magnitude features enter the LSTM as LOG_SCALE * log(x): O(1) for x in [1e-9, 1e4]
CORRECTION_FLOOR = 1e-12  # the gradient-RMS history's bias correction 1 - decay^(t-1), at least this (none at t = 1)


def num_time_features() -> int:
  return len(TIME_SCALES) + len(FRACTION_POWERS)


def num_coordinate_features(values: dict) -> int:
  """Per coordinate: g, p, p - slow average of p, K momenta, g / sqrt(v), K momenta / sqrt(v)."""
  return 4 + 2 * len(values["momentum_decays"])


def num_tensor_inputs(values: dict) -> int:
  """The LSTM's input per tensor: log RMS of g, p, the Adam direction and p - slow average (4); the previous
  update's size relative to p (1); gradient spike (1); K alignments; the tensor's log step (1); shape; feedback;
  the global loss and time features."""
  k = len(values["momentum_decays"])
  return 6 + k + 1 + SHAPE_FEATURES + values["feedback_size"] + NUM_LOSS_FEATURES + num_time_features()


def param_shapes(values: dict) -> dict[str, tuple[int, ...]]:
  """Key paths: 'lstm/w' (inputs + hidden, 4 hidden), 'lstm/b' (4 hidden,); 'step/w' (hidden,), 'step/b' (),
  'step/alignment' (K,), 'step/schedule' (time features,); 'context/w' (hidden, context), 'context/b' (context,);
  'mlp/i/w', 'mlp/i/b' (the per-coordinate MLP; the last layer has 2 + feedback outputs); 'clip/log_multiplier',
  'clip/decay_logit' (); with ``direct_step``, 'step/direct' (the LSTM's inputs,)."""
  hidden, context, k = values["lstm_size"], values["context_size"], len(values["momentum_decays"])
  shapes = {"lstm/w": (num_tensor_inputs(values) + hidden, 4 * hidden), "lstm/b": (4 * hidden,),
            "step/w": (hidden,), "step/b": (), "step/alignment": (k,), "step/schedule": (num_time_features(),),
            "context/w": (hidden, context), "context/b": (context,),
            "clip/log_multiplier": (), "clip/decay_logit": ()}
  if values.get("direct_step"):
    shapes["step/direct"] = (num_tensor_inputs(values),)
  sizes = ([num_coordinate_features(values) + context] + [values["hidden_size"]] * values["num_layers"]
           + [2 + values["feedback_size"]])
  for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
    shapes[f"mlp/{i}/w"] = (fan_in, fan_out)
    shapes[f"mlp/{i}/b"] = (fan_out,)
  return shapes


def _decays(value) -> bool:
  return (isinstance(value, (list, tuple)) and 1 <= len(value) <= MAX_DECAYS
          and all(is_positive_finite(v) and v < 1 for v in value))


def _log_step_bound(value) -> bool:
  return is_positive_finite(value) and value <= LOG_STEP_LIMIT


def _fraction(value) -> bool:
  return is_positive_finite(value) and value < 1


SPEC = ArchitectureSpec(
    name="hierarchical",
    description="per-parameter MLP + per-tensor LSTM + training/validation-loss features (Metz 2020)",
    fields={
        "hidden_size": Field(8, int_in(1, MAX_WIDTH), f"an integer in [1, {MAX_WIDTH}]",
                             "width of the per-coordinate MLP"),
        "num_layers": Field(1, int_in(0, 4), "an integer in [0, 4]", "hidden layers of the per-coordinate MLP"),
        "lstm_size": Field(32, int_in(1, MAX_WIDTH), f"an integer in [1, {MAX_WIDTH}]", "per-tensor LSTM units"),
        "context_size": Field(4, int_in(0, 64), "an integer in [0, 64]",
                              "per-tensor LSTM outputs fed to every coordinate's MLP"),
        "feedback_size": Field(4, int_in(0, 64), "an integer in [0, 64]",
                               "MLP outputs averaged over the tensor and fed back to its LSTM"),
        "momentum_decays": Field((0.9, 0.99), _decays, f"a list of 1 to {MAX_DECAYS} numbers in (0, 1)",
                                 "decays of the momentum features; the first is Adam's beta1",
                                 lambda v: tuple(float(x) for x in v)),
        "rms_decay": Field(0.999, _fraction, "a number in (0, 1)",
                           "decay of the (factored) second-moment estimate", float),
        "average_decay": Field(0.99, _fraction, "a number in (0, 1)",
                               "decay of the slow parameter average (the past-parameter feature)", float),
        "step_scale": Field(1e-2, is_positive_finite, "a positive finite number",
                            "the step size at zero log step (Adam's learning rate of the untrained optimizer)",
                            float),
        "magnitude_scale": Field(1e-2, is_positive_finite, "a positive finite number",
                                 "multiplier on the per-coordinate log-magnitude output", float),
        "direction_scale": Field(1e-1, is_positive_finite, "a positive finite number",
                                 "multiplier on the per-coordinate learned direction", float),
        # Off by default, so that optimizers saved before it existed keep their meta-parameters and numbers.
        "direct_step": Field(False, lambda v: isinstance(v, bool), "true or false",
                             "the log step also reads the LSTM's inputs through a linear head ('step/direct', zero "
                             "at initialization), so that meta-training the step-size heads alone can use every "
                             "statistic the LSTM reads (a weight on the log step's own input makes it revert to a "
                             "level)"),
        # 8 by default, the limit optimizers saved before it existed were stepped with (their numbers unchanged).
        "max_log_step": Field(LOG_STEP_LIMIT, _log_step_bound, f"a number in (0, {LOG_STEP_LIMIT:g}]",
                              "the largest per-tensor log step: step sizes up to step_scale * exp(max_log_step). "
                              "A lower bound stops a runaway step (one that climbs while the loss sits at zero and "
                              "the gradients vanish) short of the sizes that wreck a network", float),
    },
    param_shapes=param_shapes,
    jax_class="lopt.architectures.hierarchical.optimizer:HierarchicalOptimizer",
    torch_class="lopt.architectures.hierarchical.torch:HierarchicalRule",
    recurrent=False,
    # lopt 0.4: optimizers saved before have no direct step head; 0.5: nor a log-step bound below the limit
    added_fields={"direct_step": False, "max_log_step": LOG_STEP_LIMIT},
    unshaped_fields=("max_log_step",),
    summary=lambda values: (f"hierarchical: per-tensor LSTM of {values['lstm_size']}, per-coordinate MLP "
                            f"{values['num_layers']}x{values['hidden_size']}"),
)
