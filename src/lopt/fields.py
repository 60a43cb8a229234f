"""Declared settings, JAX-free: a ``Field`` (default, check, what is allowed, help) and one validator, shared by
architectures (``lopt.architectures``), estimators (``lopt.meta.estimators``) and the run config."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

REQUIRED = object()  # a Field default meaning "no default: must be given"


# -- value checks shared by architectures (JSON gives ints for floats; booleans are never numbers) ------------------

def is_int(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def is_positive_finite(value) -> bool:
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    return False
  try:
    value = float(value)
  except OverflowError:  # an integer too large for a float
    return False
  return math.isfinite(value) and value > 0


def int_in(low: int, high: int) -> Callable[[Any], bool]:
  return lambda value: is_int(value) and low <= value <= high


def show(value, limit: int = 100) -> str:
  """repr, cut short: a hostile file's value (a megabyte string, a 5000-digit integer) stays a one-line message."""
  try:
    text = repr(value)
  except ValueError:  # an integer with more digits than Python converts to text
    return f"a {type(value).__name__} too large to show"
  return text if len(text) <= limit else text[:limit] + "..."


@dataclass(frozen=True)
class Field:
  """One configuration field of an architecture.

  default: the value when none is given (``REQUIRED``: none). check: ``value -> bool``. allowed: what ``check``
  accepts, in words (error messages). help: one line for ``--help`` and docs. normalize: turns a checked JSON value
  into the constructor's value (``float`` for scales, ``tuple`` for lists).
  """
  default: Any
  check: Callable[[Any], bool]
  allowed: str
  help: str
  normalize: Callable[[Any], Any] = lambda value: value


def validate_fields(fields: dict[str, Field], values, where: str, *, complete: bool = False,
                    error: type[Exception] = ValueError, ignore: tuple[str, ...] = (), prefix: str = "") -> dict:
  """Checks ``values`` against ``fields`` and returns every field, defaults filled in and normalized.

  ``complete``: every field must be given (as in files written by lopt). Keys in ``ignore`` (e.g. the
  ``architecture`` name itself) are skipped. Raises ``error`` naming ``where``, the field (after ``prefix``, e.g.
  ``optimizer.`` in files), found and allowed.
  """
  if not isinstance(values, dict):
    raise error(f"{where}: field {prefix.rstrip('.') or 'fields'!r} must be an object, found {type(values).__name__}")
  unknown = sorted(str(name) for name in set(values) - set(fields) - set(ignore))
  if unknown:
    raise error(f"{where}: field {prefix.rstrip('.') or 'fields'!r} has unknown entries {show(unknown)}; allowed: "
                f"{sorted(set(fields) | set(ignore))}")
  merged = {}
  for name, f in fields.items():
    if name in values:
      merged[name] = values[name]
    elif f.default is REQUIRED or complete:
      raise error(f"{where}: field '{prefix}{name}' is missing (must be {f.allowed})")
    else:
      merged[name] = f.default
  for name, f in fields.items():
    if not f.check(merged[name]):
      raise error(f"{where}: field '{prefix}{name}' must be {f.allowed}, found {show(merged[name])}")
  return {name: fields[name].normalize(value) for name, value in merged.items()}


def parse_option(text: str, fields: dict[str, Field], what: str, error: type[Exception] = ValueError,
                 source: str = "option") -> tuple[str, Any]:
  """``KEY=VALUE`` -> (key, value): VALUE read as JSON where it parses (numbers, lists, true), else a string."""
  import json
  if not isinstance(text, str) or "=" not in text:
    raise error(f"{source}: expected KEY=VALUE, got {show(text)}")
  key, raw = text.split("=", 1)
  if key not in fields:
    raise error(f"{source}: {what} has no field {key!r}; its fields: {', '.join(sorted(fields))}")
  try:
    return key, json.loads(raw)
  except ValueError:
    return key, raw


class Registry(dict):
  """Specs by name (architectures, estimators): ``register`` adds one, ``get`` finds one or names the known ones."""

  def __init__(self, what: str, error: type[Exception]):
    super().__init__()
    self.what, self.error = what, error

  def register(self, spec, *, replace: bool = False):
    """Adds ``spec`` under ``spec.name`` (a user's own too: files, the CLI and ``lopt.torch`` then know it)."""
    if spec.name in self and not replace and self[spec.name] is not spec:
      raise ValueError(f"a {self.what} named {spec.name!r} is already registered")
    self[spec.name] = spec
    return spec

  def get(self, name, source: str = "", error: type[Exception] | None = None):
    """The spec registered as ``name``; ``error`` (default: the registry's) listing the known names otherwise."""
    if not isinstance(name, str) or name not in self:
      where = f"{source}: " if source else ""
      raise (error or self.error)(f"{where}unknown {self.what} {show(name)}; known: {', '.join(sorted(self))}")
    return self[name]


def resolve(target):
  """A class or function given directly, or imported from a ``"module:Name"`` string (implementations are
  imported on first use, so that specs stay free of jax and torch)."""
  if isinstance(target, str):
    import importlib
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)
  return target
