"""Meta-training configuration: one flat, JSON-serializable record, and named presets."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from lopt.errors import UserError
from lopt.gru_spec import ENCODINGS, MAX_HIDDEN_SIZE


@dataclass(frozen=True)
class MetaTrainConfig:
  """Everything needed to rebuild a meta-training run (stored as the run directory's ``config.json``).

  Defaults are the laptop-sized recipe (ours) for linear regression; ``PRESETS["paper"]`` is the paper's. What the
  recipe sweep measured (scripts/recipe_sweep.py; README "Meta-training recipe"): the input/output scales matter most.
  With input_scale 0.1 and output_scale 10 the GRU state stays in its near-linear range while still producing steps
  of size ~lr*velocity that heavy-ball needs (lr ~3, velocity ~10 g); with 1.0/1.0 training stalls near 0.09.
  """
  task: str = "linear_regression"
  task_options: dict = field(default_factory=dict)
  # The learned optimizer (SPEC §2).
  hidden_size: int = 32
  input_scale: float = 0.1
  output_scale: float = 10.0
  input_encoding: str = "scale"
  # The inner problem.
  horizon: int | None = None  # None: the task's default
  # The outer loop (SPEC §3): Adam with exponential learning-rate decay and element-wise meta-gradient clipping.
  num_steps: int = 1000
  meta_batch_size: int = 32
  learning_rate: float = 5e-3
  decay_rate: float = 0.5
  decay_steps: int = 400
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8
  clip_value: float = 0.1
  l2_penalty: float = 1e-6
  meta_loss: str = "mean"
  loss_cap: float = 10.0
  remat: bool = True
  # 'full': backpropagate through everything (the paper's); 'first_order': the inner gradients are constants (no
  # second derivatives), which keeps meta-gradients finite on the network tasks (see unroll's docstring).
  meta_gradient: str = "full"
  seed: int = 0
  # Book-keeping: held-out selection (the best theta on held-out problems is the one exported), logging, checkpoints.
  eval_every: int = 50
  num_eval_problems: int = 64
  log_every: int = 10
  checkpoint_every: int = 100

  def replace(self, **changes) -> "MetaTrainConfig":
    return dataclasses.replace(self, **changes)

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, values: dict, source: str = "run config") -> "MetaTrainConfig":
    """Builds a config from JSON values, checking every field's type and range first.

    ``source`` (usually the file's path) starts every error message, so a user knows which file to fix.
    """
    if not isinstance(values, dict):
      raise ConfigError(f"{source}: expected a JSON object of settings, found {type(values).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(map(str, set(values) - known))
    if unknown:
      raise ConfigError(f"{source}: unknown meta-training setting(s) {unknown}; known: {sorted(known)}")
    config = cls(**values)
    config.validate(source)
    return config

  def validate(self, source: str = "config") -> "MetaTrainConfig":
    """Raises ConfigError naming the first field whose type or range is wrong (expected vs found)."""
    for name, (check, expected) in FIELD_RULES.items():
      value = getattr(self, name)
      if not check(value):
        found = repr(value) if len(repr(value)) <= 80 else repr(value)[:77] + "..."
        raise ConfigError(f"{source}: field {name!r} must be {expected}, found {found}")
    return self


class ConfigError(UserError, ValueError):
  """A meta-training setting of the wrong type or out of range; the message names the source and the field."""


# Type and range of every field. JSON gives ints where floats are meant (1 for 1.0): numbers accept both, but never
# booleans (True is an int in Python) nor NaN/inf, which would silently poison training.
def _is_int(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
  # A huge JSON integer is a number Python cannot turn into a float (math.isfinite would raise): not finite either.
  return (_is_int(value) and abs(value) <= MAX_FLOAT) or (isinstance(value, float) and math.isfinite(value))


def _positive_int(value) -> bool:
  return _is_int(value) and value >= 1


def _positive(value) -> bool:
  return _is_number(value) and value > 0


def _nonnegative(value) -> bool:
  return _is_number(value) and value >= 0


def _beta(value) -> bool:
  return _is_number(value) and 0 <= value < 1


META_LOSS_NAMES = ("mean", "log_mean")  # keys of lopt.meta.objectives.META_LOSSES (not imported: no jax here)
ENCODING_NAMES = ENCODINGS  # the GRU's facts live in lopt.gru_spec (no jax there either)
META_GRADIENT_NAMES = ("full", "first_order")
MAX_FLOAT = 1.7976931348623157e308
SEED_LIMIT = 2**31  # jax.random.key takes int64; the held-out stream adds 1_000_003 to the seed

FIELD_RULES = {
    "task": (lambda v: isinstance(v, str) and v != "", "a task name (string)"),
    "task_options": (lambda v: isinstance(v, dict) and all(isinstance(k, str) for k in v),
                     "an object of task options"),
    "hidden_size": (lambda v: _positive_int(v) and v <= MAX_HIDDEN_SIZE, f"an integer in [1, {MAX_HIDDEN_SIZE}]"),
    "input_scale": (_positive, "a positive finite number"),
    "output_scale": (_positive, "a positive finite number"),
    "input_encoding": (lambda v: v in ENCODING_NAMES, f"one of {list(ENCODING_NAMES)}"),
    "horizon": (lambda v: v is None or _positive_int(v), "a positive integer or null (the task's default)"),
    "num_steps": (_positive_int, "a positive integer"),
    "meta_batch_size": (_positive_int, "a positive integer"),
    "learning_rate": (_positive, "a positive finite number"),
    "decay_rate": (_positive, "a positive finite number"),
    "decay_steps": (_positive_int, "a positive integer"),
    "b1": (_beta, "a number in [0, 1)"),
    "b2": (_beta, "a number in [0, 1)"),
    "eps": (_nonnegative, "a non-negative finite number"),
    "clip_value": (_positive, "a positive finite number"),
    "l2_penalty": (_nonnegative, "a non-negative finite number"),
    "meta_loss": (lambda v: v in META_LOSS_NAMES, f"one of {list(META_LOSS_NAMES)}"),
    "loss_cap": (_positive, "a positive finite number"),
    "remat": (lambda v: isinstance(v, bool), "true or false"),
    "meta_gradient": (lambda v: v in META_GRADIENT_NAMES, f"one of {list(META_GRADIENT_NAMES)}"),
    "seed": (lambda v: _is_int(v) and -SEED_LIMIT <= v < SEED_LIMIT, "an integer in [-2^31, 2^31)"),
    "eval_every": (_positive_int, "a positive integer"),
    "num_eval_problems": (_positive_int, "a positive integer"),
    "log_every": (_positive_int, "a positive integer"),
    "checkpoint_every": (_positive_int, "a positive integer"),
}


PRESETS = {
    # Sized for a 2-core laptop CPU: a couple of minutes on linear regression.
    "demo": MetaTrainConfig(),
    # The paper's linear-regression optimizer (renn config: seed 675, best of a random search).
    "paper": MetaTrainConfig(
        hidden_size=256, input_scale=1.0, output_scale=1.0, horizon=201, num_steps=5000, meta_batch_size=64, learning_rate=7.836616188084271e-4,
        decay_rate=0.5546520268275907, decay_steps=1000, b1=1 - 0.19360588076250435, b2=1 - 0.4064297061076916,
        eps=4.529839901619837e-06, clip_value=0.047261480715151634, l2_penalty=1e-6, seed=675),
}
