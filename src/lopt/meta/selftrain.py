"""Self-training (Metz et al. 2021, SPEC §7): a population of randomly initialized learned optimizers that trains
itself from scratch with population-based training; no hand-designed optimizer anywhere in the loop.

Every outer step each member i gets a meta-gradient from the run's estimator (vmapped over the population) and the
update of it is made by a member of the population (``APPLIERS``), through the same ``lopt.meta.outer.learned_outer``
transformation `lopt train --outer-optimizer` uses, times the member's own step multiplier ``scale[i]``. Every
``eval_every`` steps the members are judged on held-out problems (``lopt.meta.train.held_out_tasks``: never the
training problems), and PBT acts: the worst ``exploit_fraction`` of the population become copies of members drawn from
the best fraction (exploit: theta, the outer state, the estimator state and the lineage), then each copy's multiplier
is multiplied or divided by ``perturb_factor`` and its theta gets N(0, perturb_noise^2) noise (explore).

Layout: every per-member array has the population as its leading axis (theta, outer state, estimator state, scale,
scores), so the scale issue can shard that axis over devices. Randomness is a pure function of (seed, step), so a
resumed run reproduces the uninterrupted one bit for bit on one device.

Why the initialization has noise (``init_noise``): the architectures initialize their readout at zero (an untrained
optimizer is inert), and an inert population could never move, whatever the rule. With N(0, init_noise^2) added to
every meta-parameter each member starts as a random, slightly moving update rule: some happen to descend, PBT
copies those, and once a member descends on the meta-loss its own updates of itself start to help (the feedback
loop). The step multipliers start log-uniform in ``scale_range`` for the same reason: exploration over step sizes
finds progress before meta-gradients do.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lopt import interrupts
from lopt.errors import UserError
from lopt.io.checkpoint import atomic_write_json, read_json, read_tensors, save_optimizer
from lopt.meta import run as run_files
from lopt.meta import sharding
from lopt.meta.config import (ConfigError, EstimatorSection, LoggingSection, MetaTrainConfig, OptimizerSection,
                              OuterSection, _check, _is_number, _positive, _positive_int)
from lopt.meta.estimators.full_bptt import Metrics
from lopt.meta.outer import learned_outer
from lopt.meta.train import (ESTIMATOR_INIT_STREAM, apply_meta_gradient, build_evaluator, estimator_from,
                             family_configs, held_out_keys, held_out_tasks, optimizer_from, step_key, task_from)
from lopt.pytree import flatten_by_path

# Who applies member i's meta-gradient (ours; see docs/SELF_TRAINING.md for what each did):
#   self  member i itself: each member is an independent self-training optimizer; PBT spreads the good ones.
#   best  the member with the best last held-out score: the best rule the population has trains everyone.
#   next  member i + 1 (mod K): each rule is judged by how well it trains another member, not only itself.
APPLIERS = ("self", "best", "next")
INIT_STREAM, EXPLORE_STREAM = 17, 23  # fold_in data of the population's initialization and of PBT's draws


def _fraction(value) -> bool:
  return _is_number(value) and 0 <= value <= 0.5


def _scale_range(value) -> bool:
  return (isinstance(value, (list, tuple)) and len(value) == 2 and all(_positive(v) for v in value)
          and value[0] <= value[1])


@dataclass(frozen=True)
class PopulationSection:
  """The population and its PBT rules (defaults ours; measured in docs/SELF_TRAINING.md)."""
  size: int = 8                   # members K
  applier: str = "self"           # who applies a member's meta-gradient: one of APPLIERS
  exploit_fraction: float = 0.25  # the worst quarter become copies of the best quarter (> 0: at least one member)
  perturb_factor: float = 1.25    # explore: a copy's step multiplier times or divided by this
  perturb_noise: float = 0.1      # explore: std of the Gaussian noise added to a copy's theta (0: none)
  init_noise: float = 0.5         # std of the Gaussian noise added to every member's initialization
  scale_range: tuple = (0.01, 1.0)  # the members' initial step multipliers, log-uniform

  RULES = {
      "size": (lambda v: _positive_int(v) and 2 <= v <= 4096, "an integer in [2, 4096]"),
      "applier": (lambda v: v in APPLIERS, f"one of {list(APPLIERS)}"),
      "exploit_fraction": (_fraction, "a number in [0, 0.5] (0: judge only, no exploit and explore)"),
      "perturb_factor": (lambda v: _is_number(v) and v >= 1, "a number >= 1 (1: no perturbation of the scale)"),
      "perturb_noise": (lambda v: _is_number(v) and v >= 0, "a non-negative finite number"),
      "init_noise": (lambda v: _is_number(v) and v >= 0, "a non-negative finite number"),
      "scale_range": (_scale_range, "two positive numbers [low, high] with low <= high"),
  }


@dataclass(frozen=True)
class SelfTrainConfig:
  """A self-training run: the meta-training sections (task, optimizer, estimator, outer: num_steps, clip_value,
  seed; logging) and the population. The outer section's Adam fields are unused: the population applies itself."""
  meta: MetaTrainConfig
  population: PopulationSection = field(default_factory=PopulationSection)

  def to_dict(self) -> dict:
    meta = self.meta.to_dict()
    meta["outer"] = {k: meta["outer"][k] for k in OUTER_FIELDS}
    return {**meta, "population": {**dataclasses.asdict(self.population),
                                   "scale_range": list(self.population.scale_range)}}

  def flat_items(self) -> dict:
    return {f"{section}.{key}": value for section, values in self.to_dict().items() for key, value in values.items()}

  @classmethod
  def from_dict(cls, values: dict, source: str = "self-training config") -> "SelfTrainConfig":
    if not isinstance(values, dict) or not isinstance(values.get("population"), dict):
      raise ConfigError(f"{source}: expected a self-training config (sections task, optimizer, estimator, outer, "
                        f"logging, population)")
    values = dict(values)
    part = values.pop("population")
    known = {f.name for f in dataclasses.fields(PopulationSection)}
    extra = sorted(map(str, set(part) - known))
    if extra:
      raise ConfigError(f"{source}: section 'population' has unknown field(s) {extra}; known: {sorted(known)}")
    population = PopulationSection(**{k: tuple(v) if k == "scale_range" and isinstance(v, list) else v
                                      for k, v in part.items()})
    return cls(MetaTrainConfig.from_dict(values, source), population).validate(source)

  def validate(self, source: str = "options") -> "SelfTrainConfig":
    self.meta.validate(source)
    _check(self.population, PopulationSection.RULES, source, "population")
    return self


# The starting settings of `lopt selftrain` (ours). The mlp's step_scale 0.01 and magnitude_scale 0.1 (defaults 1e-3
# and 1e-3) let a random member take Adam-sized steps (lr ~0.01) and learn its step size within a few hundred outer
# steps; with the defaults the population barely moves on a CPU budget. NRES with truncation 10 is cheap per member.
PRESET = MetaTrainConfig(
    optimizer=OptimizerSection("mlp", {"step_scale": 0.01, "magnitude_scale": 0.1}),
    estimator=EstimatorSection("nres", {"truncation": 10, "meta_batch_size": 8, "num_particles": 2}),
    outer=OuterSection(num_steps=500), logging=LoggingSection(eval_every=10, num_eval_problems=16, log_every=10))

OUTER_FIELDS = ("num_steps", "clip_value", "seed")  # what self-training reads of the outer section
RESUMABLE_CHANGES = ("outer.num_steps", "logging.log_every", "logging.checkpoint_every")


class PopulationState(NamedTuple):
  """theta, outer_state (a ``LearnedOuterState`` per member), estimator_state, scale (K,), score (K,) last held-out
  scores (inf before the first), founder (K,) int32 the initial member each lineage descends from: leading axis K.
  best_theta: the best member ever on held-out problems (what gets exported), with best_score, best_step."""
  step: int
  theta: Any
  outer_state: Any
  estimator_state: Any
  scale: Any
  score: Any
  founder: Any
  best_theta: Any
  best_score: float
  best_step: int
  skipped_steps: int = 0


def stacked(trees: list):
  """Per-member pytrees -> one pytree with the population as the leading axis of every leaf."""
  return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def member(tree, i: int):
  """Member ``i`` of a population pytree."""
  return jax.tree.map(lambda x: x[i], tree)


def initial_population(optimizer, section: PopulationSection, key: jax.Array) -> tuple[Any, jax.Array]:
  """(theta (K, ...), scale (K,)): each member the architecture's initialization from its own key plus
  N(0, init_noise^2) on every meta-parameter; multipliers log-uniform in ``scale_range``."""
  size, (low, high) = section.size, section.scale_range

  def one(k):
    init_key, noise_key = jax.random.split(k)
    theta = optimizer.init(init_key)
    leaves, treedef = jax.tree.flatten(theta)
    noise = jax.random.split(noise_key, len(leaves))
    return treedef.unflatten([x + section.init_noise * jax.random.normal(n, x.shape, x.dtype)
                              for x, n in zip(leaves, noise)])

  keys = jax.random.split(key, size + 1)
  theta = stacked([one(k) for k in keys[:size]])
  scale = jnp.exp(jax.random.uniform(keys[size], (size,), minval=math.log(low), maxval=math.log(high)))
  return theta, scale


def applier_index(rule: str, score: np.ndarray) -> np.ndarray:
  """(K,) int32: the member applying member i's meta-gradient under ``rule`` (scores: last held-out, inf unknown;
  ties and an all-unknown population go to the lowest index)."""
  size = len(score)
  if rule == "self":
    return np.arange(size, dtype=np.int32)
  if rule == "best":
    return np.full(size, int(np.argmin(np.where(np.isfinite(score), score, np.inf))), np.int32)
  return ((np.arange(size) + 1) % size).astype(np.int32)


def exploit_sources(score: np.ndarray, fraction: float, key: jax.Array) -> np.ndarray:
  """(K,) int32 ``source``: member i becomes a copy of member source[i]. The worst ``ceil(fraction * K)`` members
  (ranked by score, non-finite last, ties by index) copy members drawn uniformly from the best as many; everyone
  else keeps itself (everyone, for fraction 0)."""
  size = len(score)
  if fraction == 0:
    return np.arange(size, dtype=np.int32)
  count = max(1, math.ceil(fraction * size))
  order = np.lexsort((np.arange(size), np.where(np.isfinite(score), score, np.inf)))
  best, worst = order[:count], order[size - count:]
  source = np.arange(size, dtype=np.int32)
  picks = np.asarray(jax.random.randint(key, (count,), 0, count))
  source[worst] = best[picks]
  return source


def explore(theta, scale, replaced: np.ndarray, section: PopulationSection, key: jax.Array):
  """The copies (``replaced``, (K,) bool) perturbed: scale times or divided by ``perturb_factor`` (probability 1/2
  each), theta plus N(0, perturb_noise^2); the others unchanged."""
  scale_key, noise_key = jax.random.split(key)
  up = jax.random.bernoulli(scale_key, 0.5, scale.shape)
  factor = jnp.where(up, section.perturb_factor, 1.0 / section.perturb_factor)
  scale = jnp.where(jnp.asarray(replaced), scale * factor, scale)
  leaves, treedef = jax.tree.flatten(theta)
  noise_keys = jax.random.split(noise_key, len(leaves))

  def perturb(x, k):
    mask = jnp.asarray(replaced).reshape((-1,) + (1,) * (x.ndim - 1))
    return jnp.where(mask, x + section.perturb_noise * jax.random.normal(k, x.shape, x.dtype), x)

  return treedef.unflatten([perturb(x, k) for x, k in zip(leaves, noise_keys)]), scale


def build_population_step(estimator, optimizer, *, clip_value: float, num_steps: int) -> Callable:
  """``step(theta, outer_state, estimator_state, scale, appliers, key) -> (theta, outer_state, estimator_state,
  StepMetrics with (K,) leaves)``, jitted: the estimator vmapped over the population (member i's key: fold_in(key,
  i)), then member i's clipped meta-gradient applied by member ``appliers[i]`` times ``scale[i]``
  (``lopt.meta.train.apply_meta_gradient``: a non-finite meta-gradient is skipped, as in `lopt train`)."""
  static = {}

  def estimate(theta, state, key):
    state, grads, metrics = estimator.estimate(theta, state, key)
    static["num_problems"] = metrics.num_problems  # a Python int at trace time (vmap outputs arrays only)
    return state, grads, (metrics.meta_loss, metrics.diverged_problems, metrics.dropped_problems)

  def apply(applier, theta, outer_state, grads, metrics, scale):
    transformation = learned_outer(optimizer, applier, clip_value=clip_value, scale=scale, num_steps=num_steps)
    metrics = Metrics(*metrics, static["num_problems"])
    return apply_meta_gradient(transformation, theta, outer_state._replace(applier=applier), grads, metrics)

  @jax.jit
  def step(theta, outer_state, estimator_state, scale, appliers, key):
    keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(scale.shape[0]))
    estimator_state, grads, metrics = jax.vmap(estimate)(theta, estimator_state, keys)
    applying = jax.tree.map(lambda x: x[appliers], theta)
    theta, outer_state, step_metrics = jax.vmap(apply)(applying, theta, outer_state, grads, metrics, scale)
    return theta, outer_state, estimator_state, step_metrics

  return step


def build_population_evaluator(task, optimizer, horizon: int) -> Callable:
  """``evaluate(theta (K, ...), keys) -> (K,)`` mean held-out normalized losses (inf when a problem diverged)."""
  evaluate = build_evaluator(task, optimizer, horizon)
  return jax.jit(lambda theta, keys: jnp.mean(jax.vmap(evaluate, in_axes=(0, None))(theta, keys), axis=1))


def selftrain(config: SelfTrainConfig, run_dir: str | Path | None = None, *, resume: bool = False,
              progress: Callable | bool | None = None, devices: int | None = None) -> PopulationState:
  """Self-trains a population as ``config`` says; with ``run_dir`` writes a run directory (config.json,
  metrics.jsonl, checkpoints/, optimizer/ with the best member ever, loadable by ``lopt.load``).

  ``progress(step, total, record)`` after every logged step; None: a bar with ETA and the best held-out loss.
  ``devices``: local devices the population axis is sharded over (one process only; the population size must be a
  multiple of the count; None: the most devices it is a multiple of). Checkpoints hold whole arrays, so a run
  resumes on any count.
  """
  if progress is None:
    from lopt.progress import training_bar
    with training_bar(config.meta.num_steps, "self-training") as update:
      return selftrain(config, run_dir, resume=resume, progress=update, devices=devices)
  layout = sharding.layout(devices, (config.population.size,))  # the default: a count the population splits over
  if layout.sharded and config.population.size % layout.size:  # before the run directory exists
    raise sharding.ShardingError(f"--population {config.population.size} does not split over {layout.size} devices; "
                                 + POPULATION_FIX.format(devices=layout.size))
  if layout.several_processes:
    raise UserError("lopt selftrain runs in one process (its population is sharded over this process's devices); "
                    "start it without jax.distributed")
  with interrupts.deferred():  # Ctrl-C: the loop ends after its current outer step, with a checkpoint
    return _selftrain(config, run_dir, resume, progress, layout)


class Setup(NamedTuple):
  optimizer: Any
  estimator: Any
  step: Callable
  evaluate: Callable
  eval_keys: jax.Array
  initial: PopulationState


def setup(config: SelfTrainConfig) -> Setup:
  """Everything a run needs before its first step (tasks, estimator, jitted functions, the initial population).
  Cached per configuration: a resumed or repeated run in one process reuses the compiled functions."""
  return _setup(json.dumps(config.to_dict(), sort_keys=True))


@functools.lru_cache(maxsize=4)
def _setup(config_json: str) -> Setup:
  config = SelfTrainConfig.from_dict(json.loads(config_json))
  meta, section = config.meta, config.population
  task, optimizer = task_from(meta), optimizer_from(meta)
  estimator = estimator_from(meta, task, optimizer)

  @jax.jit
  def initialize(root):
    theta, scale = initial_population(optimizer, section, jax.random.fold_in(root, INIT_STREAM))
    init_keys = jax.random.split(jax.random.fold_in(root, ESTIMATOR_INIT_STREAM), section.size)
    estimator_state = jax.vmap(estimator.init)(theta, init_keys)
    outer_state = jax.vmap(learned_outer(optimizer, None, clip_value=meta.clip_value).init)(theta)
    return theta, scale, estimator_state, outer_state

  theta, scale, estimator_state, outer_state = initialize(jax.random.key(meta.seed))
  eval_task, eval_horizon = held_out_tasks(meta, task)
  inf = jnp.full((section.size,), jnp.inf, jnp.float32)
  initial = PopulationState(0, theta, outer_state, estimator_state, scale, inf,
                            jnp.arange(section.size, dtype=jnp.int32), member(theta, 0), float("inf"), 0)
  return Setup(optimizer, estimator,
               build_population_step(estimator, optimizer, clip_value=meta.clip_value, num_steps=meta.num_steps),
               build_population_evaluator(eval_task, optimizer, eval_horizon),
               held_out_keys(meta.seed, meta.num_eval_problems), initial)


def pbt_step(state: PopulationState, scores: np.ndarray, section: PopulationSection, seed: int) -> tuple:
  """Judging, exploit and explore at an evaluation: (new state, lineage events [{member, from, scale}])."""
  key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), EXPLORE_STREAM), state.step)
  pick_key, explore_key = jax.random.split(key)
  source = exploit_sources(scores, section.exploit_fraction, pick_key)
  replaced = source != np.arange(len(source))
  take = lambda tree: jax.tree.map(lambda x: x[jnp.asarray(source)], tree)  # noqa: E731
  theta, scale = explore(take(state.theta), take(state.scale), replaced, section, explore_key)
  # A copy's last score is its source's until it is judged again; its pending held-out hint too.
  new = state._replace(theta=theta, outer_state=take(state.outer_state), estimator_state=take(state.estimator_state),
                       scale=scale, score=jnp.asarray(scores)[jnp.asarray(source)], founder=take(state.founder))
  events = [{"member": int(i), "from": int(source[i]), "scale": float(scale[i])} for i in np.flatnonzero(replaced)]
  return new, events


def _with_valid_loss(outer_state, scores):
  return outer_state._replace(valid_loss=jnp.asarray(scores, jnp.float32))


POPULATION_FIX = "choose --population as a multiple of {devices}, or fewer --devices"


def placed(layout: sharding.Layout, state: PopulationState) -> tuple[PopulationState, Any]:
  """``state`` with every per-member array sharded by its population axis over ``layout`` (best_theta replicated),
  and those shardings; unchanged (and None) without a mesh. ShardingError when the population does not split."""
  if not layout.sharded:
    return state, None
  per_member = (state.theta, state.outer_state, state.estimator_state, state.scale, state.score, state.founder)
  shardings = layout.leading(per_member, "population", POPULATION_FIX)
  theta, outer_state, estimator_state, scale, score, founder = layout.put(per_member, shardings)
  best_theta = layout.put(state.best_theta, layout.replica)
  return state._replace(theta=theta, outer_state=outer_state, estimator_state=estimator_state, scale=scale,
                        score=score, founder=founder, best_theta=best_theta), shardings


def sharded_step(layout: sharding.Layout, step: Callable, shardings) -> Callable:
  """The population step with its per-member inputs and outputs sharded by member (metrics too: (K,) leaves), the
  appliers and the key replicated; ``step`` itself without a mesh."""
  if shardings is None:
    return step
  theta, outer_state, estimator_state, scale, _, _ = shardings
  return layout.jit(step, (theta, outer_state, estimator_state, scale, layout.replica, layout.replica),
                    (theta, outer_state, estimator_state, layout.split))


def _selftrain(config: SelfTrainConfig, run_dir, resume: bool, progress,
               layout: sharding.Layout | None = None) -> PopulationState:
  layout = layout or sharding.Layout(None)
  meta, section = config.meta, config.population
  run = None
  if run_dir is not None:  # a directory that cannot be used is an error before any compilation
    run = PopulationRun(run_dir)
    run.open(config, resume=resume)
  try:
    parts = setup(config)
  except BaseException:
    if run is not None:
      run.close()
    raise
  state = parts.initial
  if run is not None:
    if meta.task.family is not None:
      atomic_write_json(run.path / "task_groups.json", {"training": family_configs(meta.task, meta.seed),
                                                        "held_out": family_configs(meta.task, meta.seed,
                                                                                   held_out=True)})
    if resume:
      state = run.restore(state) or state
  try:
    state, shardings = placed(layout, state)
  except BaseException:
    if run is not None:
      run.close()
    raise
  population_step = sharded_step(layout, parts.step, shardings)
  inner_per_member = getattr(parts.estimator, "inner_steps_per_estimate", 0)
  started = time.perf_counter()
  # The appliers change only with the scores (at judgings), and the skipped-step count stays on the device between
  # logs: reading either every step would make the host wait for each step before dispatching the next.
  appliers = jnp.asarray(applier_index(section.applier, np.asarray(state.score)))
  skipped = jnp.asarray(state.skipped_steps)
  try:
    interrupts.check()
    while state.step < meta.num_steps:
      theta, outer_state, estimator_state, metrics = population_step(
          state.theta, state.outer_state, state.estimator_state, state.scale, appliers, step_key(meta.seed, state.step))
      state = state._replace(step=state.step + 1, theta=theta, outer_state=outer_state,
                             estimator_state=estimator_state)
      skipped = skipped + jnp.sum(metrics.skipped)
      record = None
      if state.step % meta.eval_every == 0 or state.step == meta.num_steps:
        scores = np.asarray(parts.evaluate(state.theta, parts.eval_keys))
        best = int(np.argmin(scores))
        if scores[best] < state.best_score:
          state = state._replace(best_theta=member(state.theta, best), best_score=float(scores[best]),
                                 best_step=state.step)
        record = {"held_out_losses": [float(s) for s in scores], "held_out_loss": float(scores[best]),
                  "median_held_out_loss": float(np.median(scores)), "best_member": best,
                  "founders": [int(f) for f in np.asarray(state.founder)], "scales": [float(s) for s in state.scale]}
        # PBT at every judging, the last one too: a run extended with --resume --steps continues as a longer run
        # would have (best_theta, the export, was taken above).
        state, events = pbt_step(state, scores, section, meta.seed)
        state = state._replace(outer_state=_with_valid_loss(state.outer_state, state.score))
        state, _ = placed(layout, state)  # the copies where their members live (eager indexing moved them)
        appliers = jnp.asarray(applier_index(section.applier, np.asarray(state.score)))
        record["exploit"] = events
      if record is not None or state.step % meta.log_every == 0:
        state = state._replace(skipped_steps=int(skipped))
        record = {"step": state.step, "meta_loss": float(jnp.mean(metrics.meta_loss)),
                  "meta_losses": [float(x) for x in metrics.meta_loss],
                  "diverged_problems": int(jnp.sum(metrics.diverged_problems)),
                  "dropped_problems": int(jnp.sum(metrics.dropped_problems)), "skipped": int(jnp.sum(metrics.skipped)),
                  "total_skipped_steps": state.skipped_steps, "best_held_out_loss": state.best_score,
                  "inner_steps": state.step * section.size * inner_per_member,
                  "seconds": round(time.perf_counter() - started, 3), **(record or {})}
        if run is not None:
          run.log(record)
        if progress:
          progress(state.step, meta.num_steps, record)
      due = state.step % meta.checkpoint_every == 0 or state.step == meta.num_steps
      if run is not None and (due or interrupts.interrupted()):
        state = state._replace(skipped_steps=int(skipped))
        run.checkpoint(state)
      interrupts.check()
    state = state._replace(skipped_steps=int(skipped))
    if run is not None:
      run.export(parts.optimizer, state, config)
  finally:
    if run is not None:
      run.close()
  return state


class PopulationRun(run_files.RunDirectory):
  """A self-training run directory: the layout of `lopt train`'s (lock, atomic files, metrics truncated on resume),
  with a population checkpoint (every per-member tensor with its leading population axis)."""

  def _check_config(self, config: SelfTrainConfig, *, resume: bool) -> None:
    path = self.path / "config.json"
    if not path.exists():
      if resume:
        raise run_files.RunError(f"{self.path}: holds no run to resume (no config.json); drop --resume to start a "
                                 f"new run there")
      atomic_write_json(path, config.to_dict())
      return
    if not resume:
      raise run_files.RunError(f"{self.path}: already holds a run; pass --resume to continue it, or choose another "
                               f"--out")
    saved = SelfTrainConfig.from_dict(read_json(path, "run config"), str(path)).flat_items()
    requested = config.flat_items()
    differing = sorted(k for k in set(saved) | set(requested)
                       if saved.get(k) != requested.get(k) and k not in RESUMABLE_CHANGES)
    if differing:
      raise run_files.RunError(f"{path}: the saved run differs from the requested one in {differing}; only "
                               f"{list(RESUMABLE_CHANGES)} may change on resume")
    if saved != requested:
      atomic_write_json(path, config.to_dict())

  def checkpoint(self, state: PopulationState) -> Path:
    tensors = {}
    for name in ("theta", "outer_state", "estimator_state", "scale", "score", "founder", "best_theta"):
      tensors.update({f"{name}/{k}": run_files._storable(v)
                      for k, v in flatten_by_path(getattr(state, name)).items()})
    metadata = {"step": str(state.step), "best_score": repr(state.best_score), "best_step": str(state.best_step),
                "skipped_steps": str(state.skipped_steps)}
    return self.write_checkpoint(state.step, tensors, metadata, "lopt selftrain")

  def restore(self, template: PopulationState):
    """The newest readable checkpoint as a state shaped like ``template`` (as ``RunDirectory.restore``)."""
    paths = sorted(self.checkpoints.glob("step_*.safetensors"), reverse=True)
    problems = []
    for path in paths:
      try:
        tensors, meta = read_tensors(path)
        parts = {name: run_files._restore_tree(tensors, name, getattr(template, name), path)
                 for name in ("theta", "outer_state", "estimator_state", "scale", "score", "founder", "best_theta")}
        state = template._replace(step=int(meta["step"]), best_score=float(meta["best_score"]),
                                  best_step=int(meta["best_step"]), skipped_steps=int(meta["skipped_steps"]), **parts)
      except (run_files.CheckpointError, KeyError, ValueError) as e:
        problems.append(str(e))
        continue
      self._truncate_metrics(state.step)
      return state
    if problems:
      raise run_files.RunError(f"{self.checkpoints}: no checkpoint is readable ({'; '.join(problems)}); move the "
                               f"directory aside to start over")
    self._truncate_metrics(0)
    return None

  def export(self, optimizer, state: PopulationState, config: SelfTrainConfig) -> Path:
    info = {"self_training": config.to_dict(), "best_step": state.best_step, "held_out_loss": state.best_score,
            "final_step": state.step}
    return save_optimizer(self.path / "optimizer", optimizer, state.best_theta, info)


__all__ = ["APPLIERS", "PRESET", "PopulationSection", "SelfTrainConfig", "PopulationState", "selftrain", "setup",
           "initial_population", "applier_index", "exploit_sources", "explore", "build_population_step"]
