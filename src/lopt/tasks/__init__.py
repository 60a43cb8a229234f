"""Tasks: distributions of optimization problems. ``lopt.tasks.get(name, **options)`` builds one by name."""

from __future__ import annotations

import inspect

from lopt.errors import UserError
from lopt.tasks.base import Task
from lopt.tasks.networks import digits_cnn, mnist_cnn, two_moons
from lopt.tasks.quadratic import heavy_ball_optimum, linear_regression
from lopt.tasks.rosenbrock import rosenbrock

REGISTRY = {
    "linear_regression": linear_regression,
    "rosenbrock": rosenbrock,
    "two_moons": two_moons,
    "digits_cnn": digits_cnn,
    "mnist_cnn": mnist_cnn,
}


class TaskError(UserError, ValueError):
  """Unknown task name or option; the message lists what is allowed."""


def get(name: str, **options) -> Task:
  """Builds the task called ``name`` with keyword ``options`` (see each builder's signature)."""
  if name not in REGISTRY:
    raise TaskError(f"unknown task {name!r}; choose one of: {', '.join(REGISTRY)}")
  builder = REGISTRY[name]
  allowed = inspect.signature(builder).parameters
  unknown = sorted(set(options) - set(allowed))
  if unknown:
    raise TaskError(f"task {name!r} has no option {', '.join(map(repr, unknown))}; its options are: "
                    f"{', '.join(allowed)}")
  missing = [p for p, spec in allowed.items() if spec.default is inspect.Parameter.empty and p not in options]
  if missing:
    raise TaskError(f"task {name!r} needs option(s) {', '.join(missing)}")
  for option, value in options.items():
    check_option_type(name, option, value, allowed[option])
  return builder(**options)


def check_option_type(task: str, option: str, value, parameter: inspect.Parameter) -> None:
  """TaskError when ``value`` is not of the kind the builder's default (or annotation) says: an integer, a number,
  a string, a list, true/false. Bad types would otherwise fail deep inside the builder with a puzzling message."""
  default = parameter.default
  is_int = isinstance(value, int) and not isinstance(value, bool)
  if isinstance(default, bool):
    ok, kind = isinstance(value, bool), "true or false"
  elif isinstance(default, int):
    ok, kind = is_int, "an integer"
  elif isinstance(default, float):
    ok, kind = is_int or isinstance(value, float), "a number"
  elif isinstance(default, (tuple, list)):
    ok, kind = isinstance(value, (tuple, list)), "a list"
  elif isinstance(default, str) or "str" in str(parameter.annotation):
    ok, kind = isinstance(value, str), "a string"
  else:
    return
  if not ok:
    shown = repr(value) if len(repr(value)) <= 80 else repr(value)[:77] + "..."
    raise TaskError(f"task {task!r}: option {option!r} must be {kind}, found {shown}")


__all__ = ["Task", "TaskError", "get", "REGISTRY", "linear_regression", "rosenbrock", "two_moons", "digits_cnn",
           "mnist_cnn", "heavy_ball_optimum"]
