"""Gradient estimators (``lopt.api.GradientEstimator``), one module each, found by name in ``REGISTRY``.

This module is JAX-free (the CLI and the run config validate estimator settings through it); an estimator's
implementation is imported when it is built. A new estimator is a new module plus one ``register`` call.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from lopt.errors import UserError
from lopt.fields import Field, Registry, int_in, is_positive_finite, parse_option, resolve, validate_fields

META_LOSS_NAMES = ("mean", "log_mean")  # the keys of lopt.meta.objectives.META_LOSSES (a test keeps them equal)
# which reference is a problem's best: the lowest meta-loss on this truncation, or summed since the episode began
REFERENCE_WINDOWS = ("truncation", "episode")


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
    where = f"{source}: estimator {self.name!r}"
    values = validate_fields(self.fields, values, where, complete=complete, error=error, ignore=("name",))
    check_fields(values, where, error)
    return values

  def parse_option(self, text: str, source: str = "--estimator-option"):
    return parse_option(text, self.fields, f"estimator {self.name!r}", EstimatorConfigError, source)

  def create(self, task, optimizer, values: dict, horizon: int | None):
    """The estimator object (imports its module, and jax). ``task`` may be a sequence of tasks (groups of a task
    family, one shape each): one estimator per group, the meta-batch split between them (``grouped.py``)."""
    values = self.validate(values)
    tasks = list(task) if isinstance(task, (list, tuple)) else [task]
    check_combination(self.name, values, tasks, horizon)
    build = resolve(self.build)
    if not isinstance(task, (list, tuple)):
      return build(task, optimizer, values, horizon)
    from lopt.meta.estimators.grouped import Grouped
    sizes = split_evenly(values["meta_batch_size"], len(tasks))
    return Grouped(tuple(build(t, optimizer, {**values, "meta_batch_size": n}, horizon)
                         for t, n in zip(tasks, sizes)))


def restrict(estimator, mask):
  """``estimator`` perturbing only the meta-parameters where ``mask`` (a pytree of bools like theta, or None: all)
  holds; estimators without perturbations are returned as they are (the outer update masks their gradients)."""
  if mask is None:
    return estimator
  import dataclasses
  if hasattr(estimator, "estimators"):  # Grouped
    return dataclasses.replace(estimator, estimators=tuple(restrict(e, mask) for e in estimator.estimators))
  if hasattr(estimator, "perturb_mask"):
    import jax
    return dataclasses.replace(estimator, perturb_mask=tuple(jax.tree.leaves(mask)))
  return estimator


def split_evenly(total: int, parts: int) -> list[int]:
  """``total`` problems over ``parts`` groups, the first ones one larger when it does not divide."""
  return [total // parts + (i < total % parts) for i in range(parts)]


def check_fields(values: dict, where: str, error: type[Exception] = EstimatorConfigError) -> None:
  """``error`` for fields that are valid alone but not together (whatever the tasks)."""
  if values.get("step_calibration", 0.0) > 0 and not values.get("reference_learning_rates"):
    raise error(f"{where}: step_calibration {values['step_calibration']} needs reference_learning_rates (the step "
                f"it calibrates to is the best reference Adam's); add e.g. --estimator-option "
                f"reference_learning_rates=[0.001,0.01,0.1], or set step_calibration=0")
  if values.get("reference_window", "truncation") != "truncation" and not values.get("reference_learning_rates"):
    raise error(f"{where}: reference_window {values['reference_window']!r} needs reference_learning_rates (it says "
                f"which reference is a problem's best); add e.g. --estimator-option "
                f"reference_learning_rates=[0.001,0.01,0.1], or leave reference_window out")
  if values.get("weight_window", "truncation") != "truncation" and values.get("reference_window") != "episode":
    raise error(f"{where}: weight_window {values['weight_window']!r} needs reference_window=episode (the episode's "
                f"sums of the references' meta-losses); add --estimator-option reference_window=episode (and "
                f"reference_learning_rates), or leave weight_window out")
  if values.get("win_temperature", 0.0) > 0 and values.get("reference_window") != "episode":
    raise error(f"{where}: win_temperature {values['win_temperature']} needs reference_window=episode (the soft "
                f"count compares a run's losses so far with the best reference's); add --estimator-option "
                f"reference_window=episode (and reference_learning_rates), or set win_temperature=0")


def check_combination(name: str, values: dict, tasks: list, horizon: int | None) -> None:
  """EstimatorConfigError for settings that are valid alone but not together, or not with these tasks."""
  where = f"estimator {name!r}"
  if len(tasks) > 1 and "meta_batch_size" not in values:
    raise EstimatorConfigError(f"{where} has no meta_batch_size to share between task groups; it cannot train on "
                               f"a task family")
  if len(tasks) > 1 and values["meta_batch_size"] < len(tasks):
    raise EstimatorConfigError(f"{where}: meta_batch_size {values['meta_batch_size']} is smaller than the "
                               f"{len(tasks)} task groups; give at least one problem per group")
  if values.get("objective") == "valid":
    lacking = sorted({t.name for t in tasks if t.valid_loss is None})
    if lacking:
      raise EstimatorConfigError(f"{where}: objective 'valid' needs a validation loss, which task(s) {lacking} do "
                                 f"not have; use objective=train")
  truncation = values.get("truncation")
  if truncation is not None:
    for t in tasks:
      longest = horizon if horizon is not None else t.traits.get("horizon_range", (t.horizon, t.horizon))[1]
      if truncation > longest:
        raise EstimatorConfigError(f"{where}: truncation {truncation} is longer than the horizon {longest} of task "
                                   f"{t.name!r}; use a truncation of at most {longest} (or none: whole episodes)")
  if name == "mixed":
    pairs = min(split_evenly(values["meta_batch_size"], len(tasks))) * values["num_particles"]
    if pairs < 2:
      raise EstimatorConfigError(f"{where}: needs at least 2 antithetic pairs per task group for its per-coordinate "
                                 f"variances, found {pairs}; raise meta_batch_size or num_particles")


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

def _optional_truncation(value) -> bool:
  return value is None or (isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 2**20)


def _truncation(default):
  return Field(default, _optional_truncation, "a positive integer, or null for whole episodes",
               "inner steps per estimate; episodes are cut into truncations (null: one truncation per episode)")


OBJECTIVE = Field("train", lambda v: v in ("train", "valid"), "one of ['train', 'valid']",
                  "meta-objective on the training loss or on the task's validation loss, normalized by its initial "
                  "value")
BACKPROPAGATION_FIELDS = {
    "remat": Field(False, lambda v: isinstance(v, bool), "true or false",
                   "rematerialize each inner step in the backward pass (memory O(T |params|))"),
    "meta_gradient": Field("full", lambda v: v in ("full", "first_order"), "one of ['full', 'first_order']",
                           "'full' (through the inner gradients) or 'first_order' (inner gradients as constants)"),
}
PERTURBATION_FIELDS = {
    "num_particles": Field(1, int_in(1, 2**20), "a positive integer", "antithetic pairs per problem"),
    "sigma": Field(0.01, is_positive_finite, "a positive finite number",
                   "standard deviation of the Gaussian perturbations of theta (the smoothing)", float),
}
TRUNCATED_PROBLEM_FIELDS = {
    **PROBLEM_FIELDS,
    "meta_batch_size": Field(8, int_in(1, 2**24), "a positive integer",
                             "problems optimized in parallel, at staggered steps"),
    "objective": OBJECTIVE,
    "valid_every": Field(10, int_in(0, 2**20), "a non-negative integer",
                         "feed the task's validation loss to the optimizer every this many inner steps (0: never); "
                         "architectures that read it (hierarchical) learn to use it"),
    "valid_withheld": Field(0.0, lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v <= 1,
                            "a number in [0, 1]",
                            "fraction of problems that never get the validation loss (drawn per problem), so the "
                            "optimizer also learns to work without one", float),
    "l2_penalty": dataclasses.replace(PROBLEM_FIELDS["l2_penalty"], default=0.0),
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
        "on_nonfinite": Field("drop_problems", lambda v: v in ("drop_problems", "skip_step"),
                              "one of ['drop_problems', 'skip_step']",
                              "when the batch meta-gradient is not finite: recompute it problem by problem and leave "
                              "out the non-finite ones, or skip the outer step (no device-side conditional: on a "
                              "GPU, about 13% faster on the paper's configuration)"),
    },
    build="lopt.meta.estimators.full_bptt:build",
))


def _non_negative_finite(value) -> bool:
  return is_positive_finite(value) or (value == 0 and not isinstance(value, bool) and isinstance(value, (int, float)))


def _learning_rates(value) -> bool:
  return isinstance(value, list) and len(value) <= 16 and all(
      isinstance(v, (int, float)) and not isinstance(v, bool) and is_positive_finite(v) for v in value)


REFERENCE_FIELDS = {
    "reference_learning_rates": Field([], _learning_rates, "a list of at most 16 positive numbers",
                                      "Adam learning rates run beside every problem; each problem (or pair) is "
                                      "weighted by 1 / the best one's meta-loss, so the meta-objective is relative to "
                                      "a tuned Adam (empty: off)", lambda v: [float(x) for x in v]),
    "step_calibration": Field(0.0, _non_negative_finite, "a non-negative finite number",
                              "lambda of a meta-objective term lambda * mean over the truncation of (log RMS of the "
                              "learned update - that of the best reference Adam)^2, pulling the step toward the "
                              "step of the problem's best learning rate; needs reference_learning_rates (0: off)",
                              float),
    "reference_window": Field("truncation", lambda v: v in REFERENCE_WINDOWS, f"one of {list(REFERENCE_WINDOWS)}",
                              "which reference is a problem's best, for its weight and its step-calibration target: "
                              "the lowest meta-loss on this truncation, or the lowest sum since the episode began "
                              "(one learning rate per run, as a tuner picks it)"),
    "weight_window": Field("truncation", lambda v: v in REFERENCE_WINDOWS, f"one of {list(REFERENCE_WINDOWS)}",
                           "what divides a problem's relative weight: its best reference's meta-loss on this "
                           "truncation (every truncation of a run weighs alike), or that reference's mean meta-loss "
                           "per truncation since the episode began (a run's early, high losses weigh most, as in "
                           "the mean loss over a run that lopt benchmark compares); episode needs "
                           "reference_window=episode"),
}

# The antithetic estimators only: their objective may be any function of the run so far (no gradient through it).
WIN_FIELDS = {
    "win_temperature": Field(0.0, _non_negative_finite, "a non-negative finite number",
                             "tau > 0: the objective is a soft count of the problems lost to the best reference, "
                             "sigmoid(log(the run's summed meta-losses so far / the best reference's) / tau), as lopt "
                             "benchmark counts wins, instead of the loss relative to it; needs "
                             "reference_window=episode (0: off)", float),
}

register(EstimatorSpec(
    name="tbptt",
    description="truncated backpropagation: the gradient of each truncation, carried state held constant (biased)",
    fields={**TRUNCATED_PROBLEM_FIELDS, "truncation": _truncation(50), **BACKPROPAGATION_FIELDS, **REFERENCE_FIELDS},
    build="lopt.meta.estimators.tbptt:build",
))

# The antithetic family differs only in its noise rule (and es in its default: whole episodes).
for _name, _description, _truncation_default in (
    ("es", "antithetic evolution strategies, a fresh perturbation per truncation (null truncation: full unrolls)",
     None),
    ("pes", "persistent evolution strategies (Vicol 2021): perturbations accumulated over the episode, unbiased", 50),
    ("nres", "noise-reuse evolution strategies (Li 2023): one perturbation per episode, unbiased, flat variance", 50),
):
  register(EstimatorSpec(
      name=_name, description=_description,
      fields={**TRUNCATED_PROBLEM_FIELDS, "truncation": _truncation(_truncation_default), **PERTURBATION_FIELDS,
              **REFERENCE_FIELDS, **WIN_FIELDS},
      build=f"lopt.meta.estimators.{_name}:build",
  ))
register(EstimatorSpec(
    name="mixed",
    description="Metz 2019: per-coordinate inverse-variance mix of backpropagation and ES gradients",
    fields={**TRUNCATED_PROBLEM_FIELDS, "truncation": _truncation(50), **PERTURBATION_FIELDS,
            "num_particles": dataclasses.replace(PERTURBATION_FIELDS["num_particles"], default=2),
            **BACKPROPAGATION_FIELDS},
    build="lopt.meta.estimators.mixed:build",
))

__all__ = ["EstimatorSpec", "EstimatorConfigError", "REGISTRY", "register", "get", "META_LOSS_NAMES"]
