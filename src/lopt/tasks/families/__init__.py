"""Task families for meta-training general-purpose learned optimizers (Metz et al. 2020): distributions over
architectures, datasets and batch sizes (shape fields) and over initialization and parameter scale (problem fields;
opt-in, ``Family.with_batch_noise``: the fraction of each minibatch the training loss counts).

``sample(key)`` draws a JSON configuration (a uniform mix of the families unless ``family`` is named);
``OPT_IN`` families are never in that mix, nor in "all": every recorded run's draws depend on the mix, so a new kind
joins a run only when the run names it (``names_from("all,ill_conditioned_regression")``);
``task(config)`` builds exactly that problem and ``group_task(config)`` every problem sharing its shape fields, drawn
per problem key (for vmap). ``lopt tasks`` lists the families and samples configurations.
"""

from __future__ import annotations

import functools
import itertools

from lopt.fields import Registry, show
from lopt.tasks.families import (autoencoder, cnn, deep_linear_regression, ill_conditioned_regression,
                                 logistic_regression, mlp, rnn_lm, transformer_lm)
from lopt.tasks.families.base import (BATCH_NOISE_SPACE, DISTANCE_SPACE, PROBLEM_SPACE, Choice, Family, FamilyError,
                                      IntRange, LogUniform, Sometimes, augmented, batch_fraction, distance_scale,
                                      problem_fields, rng_from)

FAMILIES = Registry("task family", FamilyError)
for _module in (mlp, cnn, rnn_lm, transformer_lm, autoencoder, logistic_regression):
  FAMILIES.register(_module.FAMILY)
OPT_IN = Registry("opt-in task family", FamilyError)  # named by a run, never drawn by "all" or the default mix
for _module in (ill_conditioned_regression, deep_linear_regression):
  OPT_IN.register(_module.FAMILY)


def known() -> list[str]:
  """Every family name, those in "all" and the opt-in ones, sorted."""
  return sorted({*FAMILIES, *OPT_IN})


def get(name: str, source: str = "") -> Family:
  """The family registered as ``name``, in "all" or opt-in (FamilyError listing the known ones otherwise)."""
  for registry in (FAMILIES, OPT_IN):
    if isinstance(name, str) and name in registry:
      return registry[name]
  where = f"{source}: " if source else ""
  raise FamilyError(f"{where}unknown task family {show(name)}; known: {', '.join(known())}")


def names_from(text: str, source: str = "task family") -> list[str]:
  """Family names from ``"mlp"``, ``"mlp, cnn"``, ``"all"`` (every family of the default mix, sorted) or a list
  with "all" in it (``"all,ill_conditioned_regression"``: the mix, then the others); FamilyError naming an unknown
  one and the known ones."""
  if not isinstance(text, str) or not text.strip():
    raise FamilyError(f"{source}: expected family names (comma-separated, or 'all'); known: {', '.join(known())}")
  names = []
  for name in (name.strip() for name in text.split(",") if name.strip()):
    names.extend(sorted(FAMILIES) if name == "all" else [get(name, source).name])
  return list(dict.fromkeys(names))  # each once, in the order given


def sample(key, family: str | None = None, *, max_step_flops: float | None = None) -> dict:
  """A configuration from ``key`` (an int, ints or a jax key). ``family`` None: a family uniformly, skipping those
  whose cheapest step exceeds ``max_step_flops`` (and, rarely, one whose 1000 redraws find none within it); a named
  family draws exactly what ``get(family).sample(key)`` does, and so does the mix once it has chosen that family."""
  if family is not None:
    return get(family).sample(key, max_step_flops=max_step_flops)
  chooser = rng_from(key).spawn(1)[0]  # independent of the stream the family draws its fields from
  for name in chooser.permutation(sorted(FAMILIES)):
    if max_step_flops is not None and min_step_flops(name) > max_step_flops:
      continue
    try:
      return FAMILIES[name].sample(key, max_step_flops=max_step_flops)
    except FamilyError:  # feasible but rare under this budget: the next family
      continue
  raise FamilyError(f"no task family has a configuration within max_step_flops={max_step_flops:g} (the cheapest "
                    f"steps: {', '.join(f'{n} {min_step_flops(n):.3g}' for n in sorted(FAMILIES))})")


@functools.lru_cache(maxsize=None)
def min_step_flops(name: str) -> float:
  """The cheapest step of family ``name``: every choice and both ends of every range (costs grow with sizes)."""
  family = get(name)
  candidates = {field: _extremes(dist) for field, dist in family.space.items()}
  return min(float(family.step_flops(dict(zip(candidates, values))))
             for values in itertools.product(*candidates.values()))


def _extremes(dist) -> tuple:
  if isinstance(dist, Choice):
    return dist.options
  if isinstance(dist, Sometimes):
    return (dist.otherwise, dist.distribution.low, dist.distribution.high)
  if isinstance(dist, IntRange) or dist.integer:
    return (int(round(dist.low)), int(round(dist.high)))
  return (dist.low, dist.high)


def _family_of(config) -> Family:
  if not isinstance(config, dict) or "family" not in config:
    raise FamilyError(f"a task-family configuration must be an object with a 'family' field; known families: "
                      f"{', '.join(sorted(FAMILIES))}")
  return get(config["family"], "configuration")


def task(config: dict):
  """The Task of exactly ``config`` (a configuration ``sample`` or ``lopt tasks --sample`` wrote)."""
  return _family_of(config).task(config)


def group_task(config: dict):
  """The Task of every configuration with ``config``'s shape fields, problem fields drawn per problem key."""
  return _family_of(config).group_task(config)


__all__ = ["BATCH_NOISE_SPACE", "DISTANCE_SPACE", "FAMILIES", "OPT_IN", "Family", "FamilyError", "PROBLEM_SPACE",
           "Choice", "IntRange", "LogUniform", "Sometimes", "augmented", "batch_fraction", "distance_scale", "get",
           "group_task", "known", "min_step_flops", "names_from", "problem_fields", "sample", "task"]
