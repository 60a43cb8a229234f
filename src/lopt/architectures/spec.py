"""What an architecture is, JAX-free: its fields (defaults, validation), its meta-parameter shapes, where its JAX and
PyTorch implementations live, and whether it has a recurrent view for the dynamics toolkit.

One ``ArchitectureSpec`` per architecture is the single source of truth for its configuration: the run config, the
CLI (``--optimizer-option KEY=VALUE``), trained-optimizer files, ``lopt.load`` and ``lopt.torch`` all validate
through ``ArchitectureSpec.validate``. Neither jax nor torch is imported here: the implementations are imported on
first use (``jax_class`` / ``torch_class`` are classes, or ``"module:Name"`` strings resolved lazily).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Callable

from lopt.errors import UserError
from lopt.fields import REQUIRED, Field, Registry, parse_option, resolve, validate_fields  # noqa: F401 (REQUIRED)


class OptimizerConfigError(UserError, ValueError):
  """An architecture field of the wrong type or out of range; the message names the source and the field."""


@dataclass(frozen=True)
class ArchitectureSpec:
  """An architecture: ``name``, its ``fields``, ``param_shapes(values) -> {key path: shape}`` (the meta-parameters
  as stored in files, key paths joined with '/'), and its implementations.

  jax_class: the JAX ``LearnedOptimizer`` (constructed as ``jax_class(**values)``).
  torch_class: the PyTorch rule (``lopt.torch`` constructs it as ``torch_class(values, tensors)``), or None.
  recurrent: whether the JAX class implements ``lopt.api.RecurrentView`` (fixed points, momentum, adaptation).
  max_meta_parameters: a file declaring more meta-parameters is refused before its data is read.
  """
  name: str
  description: str
  fields: dict[str, Field]
  param_shapes: Callable[[dict], dict[str, tuple[int, ...]]]
  jax_class: Any
  torch_class: Any = None
  recurrent: bool = False
  max_meta_parameters: int = 2**28
  summary: Callable[[dict], str] = lambda values: ""  # a few words for reports: "GRU with 32 units"
  legacy_defaults: dict = field(default_factory=dict)  # filled in for files of format_version 1 (GRU only)
  # Fields added after files were written without them: the value such a file means (the behaviour it was saved with).
  added_fields: dict = field(default_factory=dict)
  # Fields that no meta-parameter depends on (a bound, not a weight): a run may start from an optimizer with another.
  unshaped_fields: tuple = ()

  def defaults(self) -> dict:
    """The fields that have defaults, with them."""
    return {name: f.default for name, f in self.fields.items() if f.default is not REQUIRED}

  def validate(self, values, source: str = "optimizer options", *, complete: bool = False,
               error: type[Exception] = OptimizerConfigError, in_file: bool = False) -> dict:
    """Checks ``values`` (a dict of fields, with or without ``architecture``) and returns every field, defaults
    filled in (``complete``: every field must be given, as in files) and normalized.

    Raises ``error`` naming ``source``, the field, what was found and what is allowed.
    """
    where = str(source) if in_file else f"{source}: optimizer {self.name!r}"
    return validate_fields(self.fields, values, where, complete=complete, error=error, ignore=("architecture",),
                           prefix="optimizer." if in_file else "")

  def configure(self, values, source: str = "optimizer options", *, complete: bool = False,
                error: type[Exception] = OptimizerConfigError, in_file: bool = False) -> "ArchitectureConfig":
    """``validate``, bundled with this spec."""
    return ArchitectureConfig(self, self.validate(values, source, complete=complete, error=error, in_file=in_file))

  def config(self, values: dict) -> dict:
    """The JSON form: ``{"architecture": name, **fields}`` (tuples as lists)."""
    return {"architecture": self.name, **json.loads(json.dumps(values))}

  def describe(self, values: dict) -> str:
    """The architecture in words for reports: its summary and meta-parameter count."""
    text = self.summary(values) or self.name
    return f"{text} ({self.num_meta_parameters(values):,} meta-parameters)"

  def num_meta_parameters(self, values: dict) -> int:
    return sum(math.prod(shape) for shape in self.param_shapes(values).values())

  def build(self, values: dict | None = None, source: str = "optimizer options"):
    """The JAX optimizer for ``values`` (validated here; imports jax)."""
    return resolve(self.jax_class)(**self.validate(values or {}, source))

  def parse_option(self, text: str, source: str = "--optimizer-option") -> tuple[str, Any]:
    """``KEY=VALUE`` -> (key, value), the key checked against this architecture's fields."""
    return parse_option(text, self.fields, f"optimizer {self.name!r}", OptimizerConfigError, source)


@dataclass(frozen=True)
class ArchitectureConfig:
  """An architecture with validated field values: what a trained-optimizer file describes, read without JAX.

  Fields read as attributes (``config.hidden_size``)."""
  spec: ArchitectureSpec
  values: dict

  @property
  def name(self) -> str:
    return self.spec.name

  def config(self) -> dict:
    return self.spec.config(self.values)

  def param_shapes(self) -> dict[str, tuple[int, ...]]:
    return self.spec.param_shapes(self.values)

  def build(self):
    """The JAX optimizer (imports jax)."""
    return resolve(self.spec.jax_class)(**self.values)

  def __getattr__(self, name):
    values = self.__dict__.get("values", {})
    if name in values:
      return values[name]
    raise AttributeError(f"{type(self).__name__} of {self.__dict__.get('spec').name!r} has no field {name!r}")


REGISTRY = Registry("learned-optimizer architecture", OptimizerConfigError)
register, get = REGISTRY.register, REGISTRY.get
