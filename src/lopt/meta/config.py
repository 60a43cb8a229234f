"""Meta-training configuration in sections — task, optimizer, estimator, outer, logging — JSON-serializable, with
named presets. The run directory's ``config.json`` holds ``MetaTrainConfig.to_dict()``.

Run configs written by lopt 0.1 were one flat record (``{"task": "linear_regression", "hidden_size": 32, ...}``);
``MetaTrainConfig.from_dict`` still reads them, and the flat names still work as keyword arguments, in ``replace``
and as attributes (``config.num_steps``), each routed to its section (``LEGACY_FIELDS``).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from lopt import architectures
from lopt.architectures.spec import OptimizerConfigError
from lopt.errors import UserError
from lopt.meta import estimators


class ConfigError(UserError, ValueError):
  """A meta-training setting of the wrong type or out of range; the message names the source and the field."""


MAX_FLOAT = 1.7976931348623157e308
SEED_LIMIT = 2**31  # jax.random.key takes int64; the held-out stream adds 1_000_003 to the seed


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


def _check(section, rules: dict, source: str, section_name: str) -> None:
  for name, (check, expected) in rules.items():
    value = getattr(section, name)
    if not check(value):
      found = repr(value) if len(repr(value)) <= 80 else repr(value)[:77] + "..."
      raise ConfigError(f"{source}: field {name!r} (section {section_name!r}) must be {expected}, found {found}")


@dataclass(frozen=True)
class TaskSection:
  """The inner problems: a registered task, its options, and the unroll length (None: the task's default); or, with
  ``family`` (names of task families, comma-separated, or "all"), problems sampled from task families, ``options``
  then being the family options (``lopt.meta.train.FAMILY_OPTIONS``) and ``name`` unused."""
  name: str = "linear_regression"
  options: dict = field(default_factory=dict)
  horizon: int | None = None
  family: str | None = None

  RULES = {
      "name": (lambda v: isinstance(v, str) and v != "", "a task name (string)"),
      "options": (lambda v: isinstance(v, dict) and all(isinstance(k, str) for k in v), "an object of task options"),
      "horizon": (lambda v: v is None or _positive_int(v), "a positive integer or null (the task's default)"),
      "family": (lambda v: v is None or (isinstance(v, str) and v.strip() != ""),
                 "null or task family names (comma-separated, or 'all')"),
  }


@dataclass(frozen=True)
class OptimizerSection:
  """The learned optimizer: a registered architecture and its fields (validated and completed by its spec)."""
  architecture: str = "gru"
  fields: dict = field(default_factory=dict)

  def to_dict(self) -> dict:
    return architectures.get(self.architecture).config(self.fields)


@dataclass(frozen=True)
class EstimatorSection:
  """The gradient estimator: a registered name and its fields (validated and completed by its spec)."""
  name: str = "full"
  fields: dict = field(default_factory=dict)

  def to_dict(self) -> dict:
    return {"name": self.name, **self.fields}


@dataclass(frozen=True)
class OuterSection:
  """The outer loop (SPEC §3): Adam with exponential learning-rate decay, element-wise meta-gradient clipping, and
  the seed of theta and of the problem stream."""
  num_steps: int = 1000
  learning_rate: float = 5e-3
  decay_rate: float = 0.5
  decay_steps: int = 400
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8
  clip_value: float = 0.1
  seed: int = 0
  init_from: str | None = None  # a trained optimizer (path or name) whose meta-parameters theta starts from
  trainable: str | None = None  # comma-separated key-path prefixes of theta to meta-train (None: all of it)
  # Who applies the meta-gradient (lopt.meta.outer): "adam" (the fields above), "self" (a copy of theta refreshed
  # every outer_refresh steps; ours: 10) or a trained optimizer's path or name, its update times outer_scale.
  outer_optimizer: str = "adam"
  outer_refresh: int = 10
  outer_scale: float = 1.0

  RULES = {
      "num_steps": (_positive_int, "a positive integer"),
      "learning_rate": (_positive, "a positive finite number"),
      "decay_rate": (_positive, "a positive finite number"),
      "decay_steps": (_positive_int, "a positive integer"),
      "b1": (_beta, "a number in [0, 1)"),
      "b2": (_beta, "a number in [0, 1)"),
      "eps": (_nonnegative, "a non-negative finite number"),
      "clip_value": (_positive, "a positive finite number"),
      "seed": (lambda v: _is_int(v) and -SEED_LIMIT <= v < SEED_LIMIT, "an integer in [-2^31, 2^31)"),
      "init_from": (lambda v: v is None or (isinstance(v, str) and v != ""),
                    "null or the path or name of a trained optimizer"),
      "trainable": (lambda v: v is None or (isinstance(v, str) and all(p.strip() for p in v.split(","))),
                    "null or comma-separated key-path prefixes of the meta-parameters, e.g. 'step,clip'"),
      "outer_optimizer": (lambda v: isinstance(v, str) and v.strip() != "",
                          "'adam', 'self' or the path or name of a trained optimizer"),
      "outer_refresh": (_positive_int, "a positive integer"),
      "outer_scale": (_positive, "a positive finite number"),
  }


@dataclass(frozen=True)
class LoggingSection:
  """Book-keeping: held-out selection (the best theta on held-out problems is exported), logs, checkpoints."""
  eval_every: int = 50
  num_eval_problems: int = 64
  log_every: int = 10
  checkpoint_every: int = 100

  RULES = {name: (_positive_int, "a positive integer")
           for name in ("eval_every", "num_eval_problems", "log_every", "checkpoint_every")}


SECTIONS = ("task", "optimizer", "estimator", "outer", "logging")
# lopt 0.1's flat field names -> (section, field). The GRU and full-backpropagation fields were top-level then.
LEGACY_FIELDS = {
    "task": ("task", "name"), "task_options": ("task", "options"), "horizon": ("task", "horizon"),
    **{name: ("optimizer", name) for name in ("hidden_size", "input_scale", "output_scale", "input_encoding")},
    **{name: ("estimator", name) for name in ("meta_batch_size", "meta_loss", "loss_cap", "l2_penalty", "remat",
                                              "meta_gradient")},
    **{f.name: ("outer", f.name) for f in dataclasses.fields(OuterSection)},
    **{f.name: ("logging", f.name) for f in dataclasses.fields(LoggingSection)},
}
# Settings a resumed run may change: none alters the trajectory (step keys and the learning-rate schedule depend on
# the step alone), so `--resume --steps N` extends a run, or ends it at its last checkpoint and exports.
RESUMABLE_CHANGES = ("outer.num_steps", "logging.log_every", "logging.checkpoint_every")

# The demo preset's GRU (ours, see MetaTrainConfig): input 0.1 / output 10 keep the GRU near-linear while it
# takes heavy-ball-sized steps.
DEMO_OPTIMIZER = {"hidden_size": 32, "input_scale": 0.1, "output_scale": 10.0, "input_encoding": "scale"}


@dataclass(frozen=True, init=False)
class MetaTrainConfig:
  """Everything needed to rebuild a meta-training run (stored as the run directory's ``config.json``).

  Defaults are the laptop-sized recipe (ours) for linear regression; ``PRESETS["paper"]`` is the paper's. What the
  recipe sweep measured (scripts/recipe_sweep.py; README "Meta-training recipe"): the input/output scales matter most.
  With input_scale 0.1 and output_scale 10 the GRU state stays in its near-linear range while still producing steps
  of size ~lr*velocity that heavy-ball needs (lr ~3, velocity ~10 g); with 1.0/1.0 training stalls near 0.09.

  Construct with sections (``MetaTrainConfig(task=TaskSection(...), optimizer=OptimizerSection("mlp"))``) or with
  lopt 0.1's flat names (``MetaTrainConfig(hidden_size=4, num_steps=6)``); both can mix.
  """
  task: TaskSection
  optimizer: OptimizerSection
  estimator: EstimatorSection
  outer: OuterSection
  logging: LoggingSection

  def __init__(self, task: TaskSection | str | None = None, optimizer: OptimizerSection | None = None,
               estimator: EstimatorSection | None = None, outer: OuterSection | None = None,
               logging: LoggingSection | None = None, **flat):
    if isinstance(task, str):  # lopt 0.1: task was the task's name
      flat["task"], task = task, None
    sections = {"task": task or TaskSection(), "optimizer": optimizer or OptimizerSection("gru", DEMO_OPTIMIZER),
                "estimator": estimator or EstimatorSection(), "outer": outer or OuterSection(),
                "logging": logging or LoggingSection()}
    sections = _apply_flat(sections, flat)
    sections["optimizer"] = _complete_optimizer(sections["optimizer"])
    sections["estimator"] = _complete_estimator(sections["estimator"])
    for name, value in sections.items():
      object.__setattr__(self, name, value)

  def __getattr__(self, name):
    """lopt 0.1's flat names read through to their sections (``config.num_steps``, ``config.hidden_size``)."""
    if name in LEGACY_FIELDS:
      section, key = LEGACY_FIELDS[name]
      part = object.__getattribute__(self, section)
      if isinstance(part, (OptimizerSection, EstimatorSection)):
        if key in part.fields:
          return part.fields[key]
      else:
        return getattr(part, key)
    raise AttributeError(f"MetaTrainConfig has no setting {name!r}")

  def replace(self, **changes) -> "MetaTrainConfig":
    """A copy with sections replaced (``task=TaskSection(...)``) or flat fields changed (``num_steps=10``)."""
    sections = {name: getattr(self, name) for name in SECTIONS}
    if isinstance(changes.get("task"), str):  # lopt 0.1: the task's name
      sections["task"] = dataclasses.replace(self.task, name=changes.pop("task"))
    for name in SECTIONS:
      if name in changes:
        sections[name] = changes.pop(name)
    return MetaTrainConfig(**sections, **changes)

  def to_dict(self) -> dict:
    return {"task": dataclasses.asdict(self.task), "optimizer": self.optimizer.to_dict(),
            "estimator": self.estimator.to_dict(), "outer": dataclasses.asdict(self.outer),
            "logging": dataclasses.asdict(self.logging)}

  def flat_items(self) -> dict:
    """{"section.field": value}: what resume compares, and what a table of settings shows."""
    return {f"{section}.{key}": value for section, values in self.to_dict().items() for key, value in values.items()}

  @classmethod
  def from_dict(cls, values: dict, source: str = "run config") -> "MetaTrainConfig":
    """Builds a config from JSON values (sectioned, or lopt 0.1's flat record), checking every field first.

    ``source`` (usually the file's path) starts every error message, so a user knows which file to fix.
    """
    if not isinstance(values, dict):
      raise ConfigError(f"{source}: expected a JSON object of settings, found {type(values).__name__}")
    try:
      if not isinstance(values.get("task"), dict):  # lopt 0.1's flat record
        unknown = sorted(map(str, set(values) - set(LEGACY_FIELDS)))
        if unknown:
          raise ConfigError(f"{source}: unknown meta-training setting(s) {unknown}; known: {sorted(LEGACY_FIELDS)}")
        config = cls(optimizer=OptimizerSection("gru", {}), **values)
      else:
        config = cls(**_sections_from_dict(values, source))
    except (TypeError, OptimizerConfigError, estimators.EstimatorConfigError) as e:
      message = str(e)  # a ConfigError from a section already names the source
      raise ConfigError(message if message.startswith(str(source)) else f"{source}: {message}") from None
    return config.validate(source)

  def validate(self, source: str = "config") -> "MetaTrainConfig":
    """Raises ConfigError naming the first field whose type or range is wrong (expected vs found)."""
    for name in ("task", "outer", "logging"):
      _check(getattr(self, name), type(getattr(self, name)).RULES, source, name)
    try:
      architectures.get(self.optimizer.architecture, source).validate(self.optimizer.fields, source)
      estimators.get(self.estimator.name, source).validate(self.estimator.fields, source)
    except (OptimizerConfigError, estimators.EstimatorConfigError) as e:
      raise ConfigError(str(e)) from None
    return self


def _apply_flat(sections: dict, flat: dict) -> dict:
  """Routes lopt 0.1's flat names to their sections."""
  unknown = sorted(set(flat) - set(LEGACY_FIELDS))
  if unknown:
    raise ConfigError(f"unknown meta-training setting(s) {unknown}; known: {sorted(LEGACY_FIELDS)}")
  for name, value in flat.items():
    section, key = LEGACY_FIELDS[name]
    part = sections[section]
    if isinstance(part, (OptimizerSection, EstimatorSection)):
      sections[section] = dataclasses.replace(part, fields={**part.fields, key: value})
    else:
      sections[section] = dataclasses.replace(part, **{key: value})
  return sections


def _complete_optimizer(section: OptimizerSection) -> OptimizerSection:
  """Fills in the architecture's defaults (unknown names and bad values surface in ``validate``)."""
  spec = architectures.REGISTRY.get(section.architecture)
  if spec is None:
    return section
  return dataclasses.replace(section, fields={**spec.defaults(), **section.fields})


def _complete_estimator(section: EstimatorSection) -> EstimatorSection:
  spec = estimators.REGISTRY.get(section.name)
  if spec is None:
    return section
  defaults = {name: f.default for name, f in spec.fields.items()}
  return dataclasses.replace(section, fields={**defaults, **section.fields})


def _sections_from_dict(values: dict, source: str) -> dict:
  unknown = sorted(map(str, set(values) - set(SECTIONS)))
  if unknown:
    raise ConfigError(f"{source}: unknown section(s) {unknown}; known: {list(SECTIONS)}")
  parts = {}
  for name, kind in (("task", TaskSection), ("outer", OuterSection), ("logging", LoggingSection)):
    part = values.get(name, {})
    if not isinstance(part, dict):
      raise ConfigError(f"{source}: section {name!r} must be an object, found {type(part).__name__}")
    known = {f.name for f in dataclasses.fields(kind)}
    extra = sorted(map(str, set(part) - known))
    if extra:
      raise ConfigError(f"{source}: section {name!r} has unknown field(s) {extra}; known: {sorted(known)}")
    parts[name] = kind(**part)
  optimizer = dict(values.get("optimizer", {"architecture": "gru"}))
  estimator = dict(values.get("estimator", {"name": "full"}))
  for name, part in (("optimizer", optimizer), ("estimator", estimator)):
    if not isinstance(part, dict):
      raise ConfigError(f"{source}: section {name!r} must be an object, found {type(part).__name__}")
  parts["optimizer"] = OptimizerSection(optimizer.pop("architecture", None), optimizer)
  parts["estimator"] = EstimatorSection(estimator.pop("name", None), estimator)
  return parts


PRESETS = {
    # Sized for a 2-core laptop CPU: a couple of minutes on linear regression.
    "demo": MetaTrainConfig(),
    # The paper's linear-regression optimizer (renn config: seed 675, best of a random search).
    "paper": MetaTrainConfig(
        hidden_size=256, input_scale=1.0, output_scale=1.0, horizon=201, num_steps=5000, meta_batch_size=64, learning_rate=7.836616188084271e-4,
        decay_rate=0.5546520268275907, decay_steps=1000, b1=1 - 0.19360588076250435, b2=1 - 0.4064297061076916,
        eps=4.529839901619837e-06, clip_value=0.047261480715151634, l2_penalty=1e-6, seed=675),
}
