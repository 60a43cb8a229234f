"""What every task family shares: distributions declared once (listed by ``lopt tasks``, drawn with numpy for JSON
configurations and with jax for per-problem draws inside a jitted loop), and the per-problem augmentations.

A configuration is ``{"family": name, **shape fields, **problem fields, "step_flops": estimate}``. Shape fields
(sizes, dataset, batch size, activation) fix the arrays' shapes; problem fields (initialization scale, parameter
scale, horizon, and with ``Family.with_batch_noise`` the batch fraction) do not. ``Family.group_task(config)`` is
the Task of *every* configuration sharing ``config``'s shape fields, drawing the problem fields from each problem
key, so that they are vmapped together; ``Family.task(config)`` is exactly one configuration.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from lopt.errors import UserError
from lopt.fields import show


class FamilyError(UserError, ValueError):
  """An unknown family, or a configuration a family cannot build; the message says what is allowed."""


def rng_from(key) -> np.random.Generator:
  """A numpy generator from an int, a sequence of ints or a jax PRNG key (its key data)."""
  if hasattr(key, "dtype") and "key" in str(key.dtype):
    import jax
    key = np.asarray(jax.random.key_data(key)).ravel().tolist()
  elif hasattr(key, "tolist"):
    key = np.asarray(key).ravel().tolist()
  return np.random.default_rng(key)


# -- distributions ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Choice:
  """One of ``options``, uniformly."""
  options: tuple

  def draw(self, rng: np.random.Generator):
    return self.options[int(rng.integers(len(self.options)))]

  def describe(self) -> str:
    return "one of " + ", ".join(map(_show_option, self.options))

  def allows(self, value) -> bool:
    # Same type too: True == 1 and 1.0 == 1 in Python, but a kernel of True or a layer_norm of 1 is a mistake.
    return any(type(value) is type(option) and value == option for option in self.options)


@dataclass(frozen=True)
class IntRange:
  """An integer in [low, high], uniformly."""
  low: int
  high: int

  def draw(self, rng: np.random.Generator) -> int:
    return int(rng.integers(self.low, self.high + 1))

  def describe(self) -> str:
    return f"integer {self.low}..{self.high}"

  def allows(self, value) -> bool:
    """Any integer from ``min(low, 1)`` up: sampling stays in [low, high], a built configuration may go beyond."""
    return _is_int(value) and value >= min(self.low, 1)


@dataclass(frozen=True)
class LogUniform:
  """exp(Uniform(log low, log high)); ``integer`` rounds it (widths, batch sizes, horizons); ``maximum`` bounds what
  a configuration may name (fractions: 1)."""
  low: float
  high: float
  integer: bool = False
  maximum: float = math.inf

  def draw(self, rng: np.random.Generator):
    value = math.exp(rng.uniform(math.log(self.low), math.log(self.high)))
    return int(round(value)) if self.integer else float(value)

  num_uniforms = 1

  def draw_jax(self, key):
    """The same distribution inside jit: () float32 (integers as floats, rounded)."""
    import jax
    return self.from_uniforms(jax.random.uniform(key, (self.num_uniforms,)))

  def from_uniforms(self, u):
    """The draw from u: (num_uniforms,) Uniform[0, 1) values (several fields from one random call: each call site
    adds compile time)."""
    import jax.numpy as jnp
    value = jnp.exp(math.log(self.low) + u[0] * (math.log(self.high) - math.log(self.low)))
    return jnp.round(value) if self.integer else value

  def describe(self) -> str:
    kind = "integer" if self.integer else "number"
    return f"log-uniform {kind} {self.low:g}..{self.high:g}"

  def allows(self, value) -> bool:
    """A positive integer (``integer``) or a positive finite number, inside or beyond [low, high], up to
    ``maximum``."""
    if self.integer:
      return _is_int(value) and 1 <= value <= self.maximum
    return _is_number(value) and 0 < value <= self.maximum

  def middle(self):
    """The geometric middle of the range (the value of a field a configuration leaves out)."""
    value = math.sqrt(self.low * self.high)
    return int(round(value)) if self.integer else value


@dataclass(frozen=True)
class Sometimes:
  """``distribution`` with probability ``probability``, else ``otherwise`` (parameter-scale augmentation: half
  the problems keep their natural scale)."""
  distribution: LogUniform
  probability: float = 0.5
  otherwise: float = 1.0

  def draw(self, rng: np.random.Generator):
    use = rng.uniform() < self.probability
    value = self.distribution.draw(rng)  # drawn either way: the stream does not depend on the coin
    return float(value) if use else self.otherwise

  @property
  def num_uniforms(self) -> int:
    return 1 + self.distribution.num_uniforms

  def draw_jax(self, key):
    import jax
    return self.from_uniforms(jax.random.uniform(key, (self.num_uniforms,)))

  def from_uniforms(self, u):
    """u[0] tosses the coin, the rest draws the distribution."""
    import jax.numpy as jnp
    return jnp.where(u[0] < self.probability, self.distribution.from_uniforms(u[1:]), self.otherwise)

  def describe(self) -> str:
    return f"{self.distribution.describe()} with probability {self.probability:g}, else {self.otherwise:g}"

  def allows(self, value) -> bool:
    return (_is_number(value) and value == self.otherwise) or self.distribution.allows(value)


def _is_int(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _show_option(option) -> str:
  return "true" if option is True else "false" if option is False else str(option)  # as JSON writes them


# Problem fields every family draws per problem (ours; Celo augments over LogUniform(1e-3, 1e3), which a learned
# optimizer whose step has a fixed absolute scale cannot follow -- widen it with the family's options).
PROBLEM_SPACE = {
    "init_scale": LogUniform(0.5, 2.0),
    "param_scale": Sometimes(LogUniform(0.1, 10.0)),
    "horizon": LogUniform(100, 2000, integer=True),
}

# Gradient-noise augmentation, opt-in (``Family.with_batch_noise``; meta-training's ``batch_noise`` option) so that
# draws without it stay what they were: the training loss counts only the first max(1, round(batch_fraction *
# batch_size)) examples of each minibatch, so that one shape group spans noise levels from a single example to its
# whole batch (ours; the batch sizes alone, each a compiled shape, span 4..256).
BATCH_NOISE_SPACE = {
    "batch_fraction": Sometimes(LogUniform(1 / 64, 1.0, maximum=1.0), probability=0.5, otherwise=1.0),
}
BATCH_FRACTION_TAG = 0xBA7C4  # fold_in data of a problem key's batch-fraction draw (problem_fields' is 0x5CA1E)

# Distance augmentation, opt-in (``Family.with_distance_scale``; meta-training's ``distance_scale_range`` option): the
# optimizer sees q and the task reads p = p0 + (q - q0) / d, q0 the initialization as the optimizer sees it and p0
# as the task does, so the solution lies d times farther from the start in the optimizer's coordinates while the
# start itself looks as usual. Unlike the parameter scale (q = s p, whose size the optimizer reads), nothing at the
# start tells d: only the run's dynamics do, as on a problem whose solution lies far from a small initialization (a
# regression started at zero). Ours.
DISTANCE_SPACE = {
    "distance_scale": Sometimes(LogUniform(1.0, 10.0), probability=0.5, otherwise=1.0),
}
DISTANCE_TAG = 0xD157A  # fold_in data of a problem key's distance-scale draw
OPT_IN_SPACE = {**BATCH_NOISE_SPACE, **DISTANCE_SPACE}  # drawn last, in this order, and only when a family draws them
OPT_IN_TAGS = {"batch_fraction": BATCH_FRACTION_TAG, "distance_scale": DISTANCE_TAG}


# -- families --------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Family:
  """A parametric distribution over tasks (``lopt.api.TaskFamily``).

  space: shape fields -> distributions; ``build(shape_config) -> Task`` (the unaugmented task: its init, training and
  validation loss); ``step_flops(shape_config)`` an estimate of one inner step's floating-point operations (forward
  and backward), so that sampling can be restricted to a compute budget (``max_step_flops``).
  """
  name: str
  description: str
  space: dict[str, Any]
  build: Callable[[dict], Any]
  step_flops: Callable[[dict], float]
  problem_space: dict[str, Any] = field(default_factory=lambda: dict(PROBLEM_SPACE))

  def sample(self, key, *, max_step_flops: float | None = None) -> dict:
    """A JSON configuration from ``key`` (an int, ints or a jax key); redrawn (up to 1000 times, from the same
    stream) until its step costs at most ``max_step_flops``. The opt-in fields (batch fraction, distance scale), when
    drawn, come last: the same configuration as without them, plus those fields."""
    rng = rng_from(key)
    opt_in = {name: self.problem_space[name] for name in OPT_IN_SPACE if name in self.problem_space}
    for _ in range(1000):
      shape = {name: dist.draw(rng) for name, dist in self.space.items()}
      problem = {name: dist.draw(rng) for name, dist in self.problem_space.items() if name not in opt_in}
      flops = float(self.step_flops(shape))
      if max_step_flops is None or flops <= max_step_flops:
        problem.update({name: dist.draw(rng) for name, dist in opt_in.items()})
        return {"family": self.name, **shape, **problem, "step_flops": flops}
    raise FamilyError(f"family {self.name!r}: no configuration within max_step_flops={max_step_flops:g} in 1000 "
                      f"draws")

  def shape_config(self, config: dict) -> dict:
    """The shape fields of ``config`` (FamilyError naming what is missing or unknown)."""
    if config.get("family", self.name) != self.name:
      raise FamilyError(f"a {config.get('family')!r} configuration given to family {self.name!r}")
    allowed = set(self.space) | set(self.problem_space) | set(OPT_IN_SPACE) | {"family", "step_flops"}
    unknown = sorted(set(config) - allowed)
    if unknown:
      raise FamilyError(f"family {self.name!r}: unknown field(s) {unknown}; its fields are {sorted(allowed)}")
    missing = sorted(set(self.space) - set(config))
    if missing:
      raise FamilyError(f"family {self.name!r}: configuration lacks field(s) {missing}")
    self._check(config, self.space)
    return {name: config[name] for name in self.space}

  def _check(self, config: dict, space: dict) -> None:
    for name, dist in space.items():
      if name in config and not (hasattr(dist, "allows") and dist.allows(config[name])):
        raise FamilyError(f"family {self.name!r}: field {name!r} must be {_allowed(dist)}, found "
                          f"{show(config[name])}")

  def task(self, config: dict):
    """The Task of exactly ``config`` (problem fields fixed to the configuration's values; a batch fraction or a
    distance scale only when the configuration names one or this family draws it)."""
    shape = self.shape_config(config)
    space = {**self.problem_space, **{name: dist for name, dist in OPT_IN_SPACE.items() if name in config}}
    self._check(config, space)
    fixed = {name: config.get(name, _default(dist)) for name, dist in space.items()}
    return augmented(self.build(shape), fixed, None, self.problem_space, config)

  def group_task(self, config: dict):
    """The Task of every configuration with ``config``'s shape fields: problem fields drawn from each problem key."""
    shape = self.shape_config(config)
    return augmented(self.build(shape), None, self.problem_space, self.problem_space,
                     {"family": self.name, **shape})

  def ranges(self) -> dict[str, str]:
    """Field -> its distribution in words (``lopt tasks``); the batch fraction too when this family does not draw
    it (what meta-training's batch_noise option draws, what a configuration may name)."""
    ranges = {name: dist.describe() for name, dist in {**self.space, **self.problem_space}.items()}
    for name, dist in BATCH_NOISE_SPACE.items():
      ranges.setdefault(name, f"{_default(dist):g} (with --task-option batch_noise=true: {dist.describe()})")
    for name, dist in DISTANCE_SPACE.items():
      ranges.setdefault(name, f"{_default(dist):g} (with --task-option distance_scale_range=[LOW,HIGH]: "
                              f"log-uniform LOW..HIGH with probability {dist.probability:g}, else 1)")
    return ranges

  def with_batch_noise(self) -> Family:
    """This family drawing a batch fraction per problem too (``BATCH_NOISE_SPACE``)."""
    return dataclasses.replace(self, problem_space={**self.problem_space, **BATCH_NOISE_SPACE})

  def with_param_scale_probability(self, probability: float) -> Family:
    """This family augmenting the parameter scale of a share ``probability`` of its problems (by default half)."""
    scale = dataclasses.replace(self.problem_space["param_scale"], probability=float(probability))
    return dataclasses.replace(self, problem_space={**self.problem_space, "param_scale": scale})

  def with_param_scale_range(self, low: float, high: float) -> Family:
    """This family drawing augmented parameter scales from LogUniform(low, high) (by default 0.1..10); above 1 the
    optimum lies farther from the initialization in units of the gradient's scale."""
    scale = self.problem_space["param_scale"]
    scale = dataclasses.replace(scale, distribution=LogUniform(float(low), float(high)))
    return dataclasses.replace(self, problem_space={**self.problem_space, "param_scale": scale})

  def with_init_scale_range(self, low: float, high: float) -> Family:
    """This family drawing the initialization's scale from LogUniform(low, high) (by default 0.5..2): below 1 the
    networks start near the saddle at zero, where progress needs the step to grow."""
    return dataclasses.replace(self, problem_space={**self.problem_space,
                                                    "init_scale": LogUniform(float(low), float(high))})

  def with_distance_scale(self, low: float, high: float, probability: float = 0.5) -> Family:
    """This family drawing a distance scale d per problem (``DISTANCE_SPACE``), from LogUniform(low, high) for a
    share ``probability`` of them (else 1): the solution lies d times farther from the start than the task's own, in
    the optimizer's coordinates."""
    dist = dataclasses.replace(DISTANCE_SPACE["distance_scale"], distribution=LogUniform(float(low), float(high)),
                               probability=float(probability))
    return dataclasses.replace(self, problem_space={**self.problem_space, "distance_scale": dist})

  def with_batch_size_range(self, low: int, high: int) -> Family:
    """This family drawing its batch size from LogUniform(low, high) (by default 8..256, 4..128 sequences): a shape
    field, so other shapes are drawn. Large batches are the low-noise problems (near full batch on the tables) that
    the default range lacks."""
    batch = dataclasses.replace(self.space["batch_size"], low=int(low), high=int(high))
    return dataclasses.replace(self, space={**self.space, "batch_size": batch})


def _default(dist):
  """A problem field's value when a configuration leaves it out: the natural parameter scale, the middle of a range
  (init_scale 1, horizon ~447; not 1.0 for every field, which made the horizon a single step)."""
  if isinstance(dist, Sometimes):
    return dist.otherwise
  return dist.middle() if isinstance(dist, LogUniform) else 1.0


def _allowed(dist) -> str:
  """What ``dist.allows`` accepts, in words (error messages)."""
  if isinstance(dist, Sometimes):
    return f"{dist.otherwise:g} or {_allowed(dist.distribution)}"
  if isinstance(dist, LogUniform):
    kind = "integer" if dist.integer else "number"
    bound = f"a positive {kind}" if dist.maximum == math.inf else f"a {kind} in (0, {dist.maximum:g}]"
    return f"{bound} ({dist.describe()} when sampled)"
  if isinstance(dist, IntRange):
    return f"an integer >= {min(dist.low, 1)} ({dist.describe()} when sampled)"
  return dist.describe()


def problem_fields(key, space: dict | None = None):
  """(init_scale, param_scale) of problem ``key`` as a group task draws them from ``space`` (default
  PROBLEM_SPACE): () float32 each, inside jit and vmap."""
  import jax
  space = PROBLEM_SPACE if space is None else space
  init_dist, scale_dist = space["init_scale"], space["param_scale"]
  u = jax.random.uniform(jax.random.fold_in(key, 0x5CA1E), (init_dist.num_uniforms + scale_dist.num_uniforms,))
  return init_dist.from_uniforms(u[:init_dist.num_uniforms]), scale_dist.from_uniforms(u[init_dist.num_uniforms:])


def opt_in_field(name: str, key, space: dict):
  """The opt-in field ``name`` (``OPT_IN_SPACE``) of problem ``key`` as a group task draws it from ``space[name]``:
  () float32, inside jit and vmap. Each field has its own fold_in tag, so the other fields' draws do not depend on
  whether it is drawn."""
  import jax
  return space[name].draw_jax(jax.random.fold_in(key, OPT_IN_TAGS[name]))


def batch_fraction(key, space: dict):
  """The batch fraction of problem ``key`` (``opt_in_field``)."""
  return opt_in_field("batch_fraction", key, space)


def distance_scale(key, space: dict):
  """The distance scale of problem ``key`` (``opt_in_field``)."""
  return opt_in_field("distance_scale", key, space)


def augmented(base, fixed: dict | None, drawn: dict | None, space: dict, options: dict):
  """``base`` with initialization scale and parameter-scale augmentation: the optimizer sees parameters q = s * p
  with p = init_scale * base.init(key), and the loss base.loss(q / s). Values from ``fixed`` or drawn per problem key
  from ``drawn`` (a distribution per field). With a batch fraction (fixed below 1, or drawn) the training loss is
  ``base.loss(q / s, key, step, batch_fraction=f)``; the validation loss stays the whole minibatch's. With a distance
  scale d (fixed other than 1, or drawn) every loss reads p0 + (q / s - p0) / d instead of q / s, p0 = init_scale *
  base.init(key) (``DISTANCE_SPACE``). A horizon range (``traits["horizon_range"]``) tells truncated estimators how
  long each problem's episode may be."""
  import jax

  from lopt.tasks.base import Task

  def scales(key):
    if fixed is not None:
      return float(fixed["init_scale"]), float(fixed["param_scale"])
    return problem_fields(key, drawn)

  def opt_in(name, key):
    """An opt-in field's value, or None where it has none (the loss then as without it, not merely equal)."""
    if fixed is not None:
      value = float(fixed.get(name, 1.0))
      return None if value == 1.0 else value
    return opt_in_field(name, key, drawn) if name in drawn else None

  def init(key):
    init_scale, param_scale = scales(key)
    return jax.tree.map(lambda p: p * (init_scale * param_scale), base.init(key))

  def unscaled(loss, noisy=False):
    def scaled_loss(params, key, step=0):
      init_scale, param_scale = scales(key)
      params = jax.tree.map(lambda q: q / param_scale, params)
      d = opt_in("distance_scale", key)
      if d is not None:  # the start p0 drawn again from the key: the loss has no other way to know it
        start = base.init(key)
        params = jax.tree.map(lambda p, p0: init_scale * p0 + (p - init_scale * p0) / d, params, start)
      f = opt_in("batch_fraction", key) if noisy else None
      return loss(params, key, step) if f is None else loss(params, key, step, batch_fraction=f)
    return scaled_loss

  horizon_dist = space["horizon"]
  if fixed is not None:
    horizon, horizon_range = int(fixed["horizon"]), (int(fixed["horizon"]), int(fixed["horizon"]))
  else:
    horizon_range = (int(horizon_dist.low), int(horizon_dist.high))
    horizon = int(round(math.sqrt(horizon_dist.low * horizon_dist.high)))
  valid = None if base.valid_loss is None else unscaled(base.valid_loss)
  traits = {**base.traits, "network": True, "family": options.get("family"), "horizon_range": horizon_range}
  return Task(base.name, init, unscaled(base.loss, noisy=True), horizon, valid_loss=valid, options=dict(options),
              traits=traits)
