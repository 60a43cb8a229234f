"""Gradient estimators (``lopt.api.GradientEstimator``), one module each, found by name in ``REGISTRY``.

This module is JAX-free (the CLI and the run config validate estimator settings through it); an estimator's
implementation is imported when it is built. A new estimator is a new module plus one ``register`` call.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lopt.errors import UserError
from lopt.fields import Field, Registry, int_in, is_positive_finite, parse_option, resolve, validate_fields

META_LOSS_NAMES = ("mean", "log_mean")  # the keys of lopt.meta.objectives.META_LOSSES (a test keeps them equal)


class EstimatorConfigError(UserError, ValueError):
  """An estimator setting of the wrong type or out of range; the message names the source and the field."""


@dataclass(frozen=True)
class EstimatorSpec:
  """An estimator: ``name``, its ``fields`` and ``build`` (a function, or a ``"module:function"`` string),
  ``build(task, optimizer, values, horizon) -> GradientEstimator``."""
  name: str
  description: str
  fields: dict[str, Field]
  build: Any

  def validate(self, values, source: str = "estimator options", *, complete: bool = False,
               error: type[Exception] = EstimatorConfigError) -> dict:
    return validate_fields(self.fields, values, f"{source}: estimator {self.name!r}", complete=complete,
                           error=error, ignore=("name",))

  def parse_option(self, text: str, source: str = "--estimator-option"):
    return parse_option(text, self.fields, f"estimator {self.name!r}", EstimatorConfigError, source)

  def create(self, task, optimizer, values: dict, horizon: int):
    """The estimator object (imports its module, and jax)."""
    return resolve(self.build)(task, optimizer, self.validate(values), horizon)


REGISTRY = Registry("gradient estimator", EstimatorConfigError)
register, get = REGISTRY.register, REGISTRY.get


# Settings every unrolling estimator shares: the meta-batch and the meta-objective.
PROBLEM_FIELDS = {
    "meta_batch_size": Field(32, int_in(1, 2**24), "a positive integer", "sampled problems per outer step"),
    "meta_loss": Field("mean", lambda v: v in META_LOSS_NAMES, f"one of {list(META_LOSS_NAMES)}",
                       "'mean' (mean loss_t/loss_0, the paper's) or 'log_mean'"),
    "loss_cap": Field(10.0, is_positive_finite, "a positive finite number",
                      "a problem's normalized loss is capped here (divergence guard)", float),
    "l2_penalty": Field(1e-6, lambda v: is_positive_finite(v) or (v == 0 and not isinstance(v, bool)
                                                                  and isinstance(v, (int, float))),
                        "a non-negative finite number",
                        "penalty on the L2 norm of the meta-parameters, part of the meta-objective", float),
}

register(EstimatorSpec(
    name="full",
    description="backpropagation through the whole unroll (the paper's), or its first-order variant",
    fields={
        **PROBLEM_FIELDS,
        "remat": Field(True, lambda v: isinstance(v, bool), "true or false",
                       "rematerialize each inner step in the backward pass (memory O(T |params|))"),
        "meta_gradient": Field("full", lambda v: v in ("full", "first_order"), "one of ['full', 'first_order']",
                               "'full' (through the inner gradients) or 'first_order' (inner gradients as constants)"),
    },
    build="lopt.meta.estimators.full_bptt:build",
))

__all__ = ["EstimatorSpec", "EstimatorConfigError", "REGISTRY", "register", "get", "META_LOSS_NAMES"]
