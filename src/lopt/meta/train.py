"""Meta-training: a jitted outer step (one estimate from a ``lopt.api.GradientEstimator``, applied by an outer optax
optimizer) and the loop around it, which owns the run directory, logging, held-out selection, checkpoints and
resume. Nothing here knows the architecture or the estimator: both come from their registries by name."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import json
import math
import os
import time
from pathlib import Path
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from lopt import architectures, interrupts, tasks as task_registry
from lopt.errors import UserError
from lopt.io.checkpoint import atomic_write_json
from lopt.meta import estimators
from lopt.meta import outer as learned_outer
from lopt.meta import run as run_files
from lopt.meta import sharding
from lopt.meta.config import MetaTrainConfig
from lopt.meta.estimators.full_bptt import FullBPTT, all_finite, problem_meta_loss  # noqa: F401 (re-export)
from lopt.meta.estimators.grouped import Grouped, combine as combine_groups
from lopt.meta.state import TrainState
from lopt.meta.unroll import normalized_score, unroll
from lopt.optax_adapter import as_optax


class StepMetrics(NamedTuple):
  meta_loss: jax.Array         # mean bounded meta-loss over the problems the estimator unrolled
  gradient_norm: jax.Array     # of the (unclipped) meta-gradient actually used
  diverged_problems: jax.Array  # problems whose loss left [0, cap * loss_0] or became non-finite
  dropped_problems: jax.Array  # problems whose meta-gradient was non-finite and was left out
  skipped: jax.Array           # 1 if no finite meta-gradient was left and theta was not changed
  extra: Any = None            # the estimator's optional terms ({name: ()}, e.g. step_calibration), logged as such


def build_outer_step(estimator, outer_optimizer: optax.GradientTransformation, *legacy, **legacy_options) -> Callable:
  """Returns ``outer_step(theta, outer_state, estimator_state, key) -> (theta, outer_state, estimator_state,
  StepMetrics)``, jitted: one estimate of the meta-gradient (``lopt.api.GradientEstimator``), applied by
  ``outer_optimizer``.

  A meta-gradient that is not finite, or one from which the estimator had to drop every problem, is never applied:
  theta and the outer state stay as they were and the step counts as skipped.

  lopt 0.1's form ``build_outer_step(task, optimizer, outer, horizon=..., meta_loss=..., loss_cap=..., l2_penalty=...,
  remat=..., first_order=..., on_nonfinite=...)`` still works: it returns ``outer_step(theta, outer_state, keys) ->
  (theta, outer_state, StepMetrics)`` with full backpropagation on the (B,) problem ``keys``.
  """
  if not hasattr(estimator, "estimate"):
    return _legacy_outer_step(estimator, outer_optimizer, *legacy, **legacy_options)
  if isinstance(estimator, Grouped) and len(estimator.estimators) > 1:
    return GroupedOuterStep(estimator, outer_optimizer)
  return jax.jit(_outer_step(estimator, outer_optimizer))


class GroupedOuterStep:
  """``build_outer_step``'s function for a task-family run of several shape groups: one program per group's
  estimate and one that combines them and applies the update, the same arithmetic as one program of the whole.

  Why: XLA compiles most of a program on one thread, and a run's single program grew with its groups (eight groups
  with backpropagated references had not compiled after nine minutes on the H200). Separate programs compile side
  by side on the first call, a thread each (XLA releases the GIL), and each is cached on its own. Only for one
  device: several devices keep one sharded program (threads could launch the groups' collectives in different
  orders)."""

  def __init__(self, grouped: Grouped, outer_optimizer: optax.GradientTransformation):
    self.estimates = [jax.jit(functools.partial(grouped.estimate_group, g)) for g in range(len(grouped.estimators))]
    self.finish = jax.jit(functools.partial(_finish_grouped, outer_optimizer))
    self.compiled = False

  def __call__(self, theta, outer_state, estimator_state, key):
    calls = [functools.partial(f, theta, s, key) for f, s in zip(self.estimates, estimator_state)]
    results = [call() for call in calls] if self.compiled else side_by_side(calls)
    self.compiled = True
    return self.finish(theta, outer_state, results)


def side_by_side(calls: list) -> list:
  """The results of ``calls`` (functions of no arguments), each run in a thread of its own: jitted functions called
  for the first time compile side by side (XLA releases the GIL while it compiles)."""
  with concurrent.futures.ThreadPoolExecutor(min(len(calls), os.cpu_count() or 1)) as pool:
    return list(pool.map(lambda call: call(), calls))


def _finish_grouped(outer_optimizer, theta, outer_state, results):
  estimator_state, grads, metrics = combine_groups(results)
  theta, outer_state, step_metrics = apply_meta_gradient(outer_optimizer, theta, outer_state, grads, metrics)
  return theta, outer_state, estimator_state, step_metrics


def _outer_step(estimator, outer_optimizer) -> Callable:
  def outer_step(theta, outer_state, estimator_state, key):
    estimator_state, grads, metrics = estimator.estimate(theta, estimator_state, key)
    theta, outer_state, step_metrics = apply_meta_gradient(outer_optimizer, theta, outer_state, grads, metrics)
    return theta, outer_state, estimator_state, step_metrics

  return outer_step


def build_sharded_outer_step(estimator, outer_optimizer: optax.GradientTransformation, layout: sharding.Layout,
                             estimator_state) -> Callable:
  """``build_outer_step``'s function over ``layout``'s devices: the leading (per-problem) axis of the estimator state
  (``estimator_state``: its arrays or shapes) sharded; theta, the outer state, the key and the metrics replicated
  (see ``lopt.meta.sharding``). ShardingError when the problem counts do not split over the devices."""
  states, replica = layout.leading(estimator_state), layout.replica
  return layout.jit(_outer_step(estimator, outer_optimizer), (replica, replica, states, replica),
                    (replica, replica, states, replica))


def apply_meta_gradient(outer_optimizer, theta, outer_state, grads, metrics):
  """One outer update with the estimator's ``grads``; skipped (theta and state unchanged) when not usable."""
  usable = all_finite(grads) & (metrics.dropped_problems < metrics.num_problems)
  safe_grads = jax.tree.map(lambda g: jnp.where(usable, g, 0.0), grads)
  # The meta-loss is the outer problem's loss (a learned outer optimizer reads it; Adam ignores it).
  extra = {"value": metrics.meta_loss} if isinstance(outer_optimizer, optax.GradientTransformationExtraArgs) else {}
  updates, new_state = outer_optimizer.update(safe_grads, outer_state, theta, **extra)
  new_theta = optax.apply_updates(theta, updates)
  keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(usable, a, b), new, old)  # noqa: E731
  step_metrics = StepMetrics(metrics.meta_loss, optax.tree_utils.tree_norm(safe_grads), metrics.diverged_problems,
                             metrics.dropped_problems, (~usable).astype(jnp.int32), getattr(metrics, "extra", None))
  return keep(new_theta, theta), keep(new_state, outer_state), step_metrics


def _legacy_outer_step(task, optimizer, outer_optimizer, *, horizon: int, meta_loss: str = "mean",
                       loss_cap: float = 10.0, l2_penalty: float = 0.0, remat: bool = True,
                       first_order: bool = False, on_nonfinite: str = "drop_problems") -> Callable:
  estimator = FullBPTT(task, optimizer, horizon, meta_loss=meta_loss, loss_cap=loss_cap, remat=remat,
                       first_order=first_order, l2_penalty=l2_penalty, on_nonfinite=on_nonfinite)

  @jax.jit
  def outer_step(theta, outer_state, keys):
    grads, metrics = estimator.estimate_on(theta, keys)
    return apply_meta_gradient(outer_optimizer, theta, outer_state, grads, metrics)

  return outer_step


def learning_rate_schedule(config: MetaTrainConfig) -> optax.Schedule:
  """The outer learning rate at each step: learning_rate * decay_rate ** (step / decay_steps) (not staircase)."""
  return optax.exponential_decay(config.learning_rate, config.decay_steps, config.decay_rate)


def outer_optimizer_from(config: MetaTrainConfig, optimizer=None) -> optax.GradientTransformation:
  """Element-wise meta-gradient clipping, then Adam with exponential learning-rate decay (the paper's outer loop);
  or, when ``config.outer.outer_optimizer`` is not "adam", a learned optimizer applying the clipped meta-gradient
  (``lopt.meta.outer``; ``self`` needs ``optimizer``, the one being trained)."""
  section = config.outer
  if section.outer_optimizer != learned_outer.ADAM:
    applying, applier = learned_outer.resolve(section.outer_optimizer, optimizer)
    return learned_outer.learned_outer(applying, applier, clip_value=section.clip_value, scale=section.outer_scale,
                                       refresh=section.outer_refresh, num_steps=section.num_steps)
  return optax.chain(optax.clip(config.clip_value),
                     optax.adam(learning_rate_schedule(config), config.b1, config.b2, config.eps))


def optimizer_from(config: MetaTrainConfig):
  """The learned optimizer the config's ``optimizer`` section describes (through the architecture registry)."""
  section = config.optimizer
  return architectures.get(section.architecture, "optimizer").build(section.fields)


# Options of a task-family run (config.task.options when config.task.family is set), with their defaults (ours).
FAMILY_OPTIONS = {
    "num_groups": 4,         # shapes sampled per run; each is one vmapped group of problems (one compilation each)
    "max_step_flops": None,  # restrict sampling to configurations whose inner step costs at most this many FLOPs
    "eval_horizon": 200,     # held-out problems are unrolled this long (unless the run sets a horizon)
    "batch_noise": False,    # training problems draw a batch fraction (gradient noise; families.BATCH_NOISE_SPACE)
    "param_scale_probability": None,  # the share of training problems with an augmented parameter scale (None: the
                                      # families' own, one half)
    "param_scale_range": None,  # [low, high] of the augmented parameter scales (None: the families' own, 0.1..10)
    "batch_size_range": None,   # [low, high] of the training shapes' batch sizes (None: the families' own)
    "init_scale_range": None,   # [low, high] of the training problems' initialization scales (None: 0.5..2)
    "distance_scale_range": None,  # [low, high]: a share of the training problems' solutions lie d times farther
                                   # from their start, d drawn from there (families.DISTANCE_SPACE; None: off)
    "distance_scale_probability": 0.5,  # that share (with distance_scale_range)
}
FAMILY_EVAL_HORIZON = FAMILY_OPTIONS["eval_horizon"]
HELD_OUT_STREAM = 1_000_003  # family configurations for held-out selection: never the training groups


def family_groups(section, seed: int, *, held_out: bool = False) -> tuple:
  """The task groups of a family run: ``num_groups`` shapes sampled from the families in turn, each a Task that
  draws its problem fields (initialization and parameter scale, horizon, the batch fraction with ``batch_noise``)
  per problem key."""
  return tuple(_family(c["family"], section, held_out).group_task(c)
               for c in family_configs(section, seed, held_out=held_out))


def family_configs(section, seed: int, *, held_out: bool = False) -> list[dict]:
  """The configurations behind ``family_groups`` (JSON; their problem fields are one draw, shown for reference:
  training draws them per problem). A pure function of the task section and the seed. ``batch_noise`` and
  ``distance_scale_range`` add a batch fraction and a distance scale to the training configurations, and
  ``param_scale_probability`` changes how often their parameter scale is augmented; none changes the shapes drawn,
  and held-out ones have none of them (selection compares optimizers on the problems as they are)."""
  from lopt.tasks import families
  names = families.names_from(section.family)
  options = family_options(section)
  stream = HELD_OUT_STREAM if held_out else 0
  return [_family(names[g % len(names)], section, held_out).sample([seed, stream, g],
                                                                   max_step_flops=options["max_step_flops"])
          for g in range(options["num_groups"])]


def _family(name: str, section, held_out: bool):
  """Family ``name`` as the run's training problems draw from it (the augmentation options), or as held-out
  selection does (the families as they are: selection compares optimizers on the problems themselves)."""
  from lopt.tasks import families
  family, options = families.get(name), family_options(section)
  if held_out:
    return family
  if options["batch_noise"]:
    family = family.with_batch_noise()
  if options["param_scale_probability"] is not None:
    family = family.with_param_scale_probability(options["param_scale_probability"])
  if options["param_scale_range"] is not None:
    family = family.with_param_scale_range(*options["param_scale_range"])
  if options["batch_size_range"] is not None:
    family = family.with_batch_size_range(*options["batch_size_range"])
  if options["init_scale_range"] is not None:
    family = family.with_init_scale_range(*options["init_scale_range"])
  if options["distance_scale_range"] is not None:
    family = family.with_distance_scale(*options["distance_scale_range"], options["distance_scale_probability"])
  return family


def family_options(section) -> dict:
  """The family options of a task section, defaults filled in (FamilyError naming a bad one)."""
  from lopt.tasks import families
  options = {**FAMILY_OPTIONS, **section.options}
  unknown = sorted(set(options) - set(FAMILY_OPTIONS))
  if unknown:
    raise families.FamilyError(f"task family options: unknown {unknown}; known: {sorted(FAMILY_OPTIONS)}")
  count = options["num_groups"]
  if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= 1024:
    raise families.FamilyError(f"task family option 'num_groups' must be an integer in [1, 1024], found {count!r}")
  horizon = options["eval_horizon"]
  if isinstance(horizon, bool) or not isinstance(horizon, int) or not 1 <= horizon <= 10**6:
    raise families.FamilyError(f"task family option 'eval_horizon' must be an integer in [1, 1e6], found {horizon!r}")
  budget = options["max_step_flops"]
  if budget is not None and (isinstance(budget, bool) or not isinstance(budget, (int, float)) or not budget > 0):
    raise families.FamilyError(f"task family option 'max_step_flops' must be a positive number, found {budget!r}")
  if not isinstance(options["batch_noise"], bool):
    raise families.FamilyError(f"task family option 'batch_noise' must be true or false, found "
                               f"{options['batch_noise']!r}")
  for name in ("param_scale_probability", "distance_scale_probability"):
    share = options[name]
    if share is not None and (isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 <= share <= 1):
      raise families.FamilyError(f"task family option {name!r} must be a number in [0, 1], found {share!r}")
  positive = lambda v: isinstance(v, (int, float)) and math.isfinite(v) and v > 0
  batch_size = lambda v: isinstance(v, int) and 1 <= v <= 65536
  for name, allowed, words in (("param_scale_range", positive, "two positive numbers"),
                               ("init_scale_range", positive, "two positive numbers"),
                               ("distance_scale_range", positive, "two positive numbers"),
                               ("batch_size_range", batch_size, "two integers in [1, 65536]")):
    bounds = options[name]
    if bounds is not None and not (isinstance(bounds, list) and len(bounds) == 2 and all(
        allowed(v) and not isinstance(v, bool) for v in bounds) and bounds[0] <= bounds[1]):
      raise families.FamilyError(f"task family option {name!r} must be [low, high], {words} with low <= high, "
                                 f"found {bounds!r}")
  return options


def task_from(config: MetaTrainConfig):
  """The config's Task, or for a task-family run a tuple of Tasks (one per shape group)."""
  if config.task.family is not None:
    return family_groups(config.task, config.seed)
  options = dict(config.task.options)
  if config.task.horizon is not None:
    options["horizon"] = config.task.horizon
  return task_registry.get(config.task.name, **options)


def representative_task(task):
  """One Task to compare or analyze on: the task itself, or a family run's first shape group (its problems drawn
  per key, as in training)."""
  return task[0] if isinstance(task, tuple) else task


def estimator_from(config: MetaTrainConfig, task, optimizer):
  """The gradient estimator the config's ``estimator`` section describes (through the estimator registry)."""
  section = config.estimator
  horizon = config.task.horizon if isinstance(task, tuple) else config.task.horizon or task.horizon
  return estimators.get(section.name).create(task, optimizer, section.fields, horizon)


ESTIMATOR_INIT_STREAM = 2**31 - 1  # fold_in data of the estimator's initial state: never an outer step


def step_key(seed: int, step: int) -> jax.Array:
  """The randomness of outer step ``step``: a pure function of (seed, step), so a resumed run sees the same
  problems and perturbations."""
  return jax.random.fold_in(jax.random.key(seed), step)


def step_keys(seed: int, step: int, batch_size: int) -> jax.Array:
  """The meta-batch full backpropagation samples at outer step ``step`` (``FullBPTT.estimate`` splits the key)."""
  return jax.random.split(step_key(seed, step), batch_size)


def held_out_keys(seed: int, count: int) -> jax.Array:
  """Problems for held-out selection during training, disjoint from the training stream and the evaluation seeds."""
  return jax.random.split(jax.random.fold_in(jax.random.key(seed + 1_000_003), 2**30), count)


def build_evaluator(task, optimizer, horizon: int) -> Callable:
  """``evaluate(theta, keys) -> (num_keys,)`` normalized mean losses (non-finite counted as inf), jitted. A tuple of
  tasks (groups) shares the keys out between them, in order."""
  if isinstance(task, tuple):
    groups = [build_evaluator(t, optimizer, horizon) for t in task]
    compiled = set()  # key counts whose programs exist: the first call with a count compiles them side by side

    def evaluate_groups(theta, keys):
      parts = jnp.array_split(jnp.arange(keys.shape[0]), len(groups))
      calls = [functools.partial(evaluate, theta, keys[p]) for evaluate, p in zip(groups, parts) if p.size]
      traced = isinstance(keys, jax.core.Tracer)  # inside another jit (a population's): tracing stays in this thread
      first = not traced and keys.shape[0] not in compiled
      if not traced:  # a traced call compiles nothing of these programs
        compiled.add(keys.shape[0])
      return jnp.concatenate(side_by_side(calls) if first else [call() for call in calls])

    return evaluate_groups

  @jax.jit
  def evaluate(theta, keys):
    losses = jax.vmap(lambda k: unroll(task, as_optax(optimizer, theta), k, horizon))(keys)
    return normalized_score(losses)

  return evaluate


def held_out_tasks(config: MetaTrainConfig, task):
  """The tasks held-out selection evaluates on, and their horizon: the training task itself, or for a family run
  other shapes from the same families (configurations never trained on)."""
  if not isinstance(task, tuple):
    return task, config.task.horizon or task.horizon
  horizon = family_options(config.task)["eval_horizon"]
  return family_groups(config.task, config.seed, held_out=True), config.task.horizon or horizon


def meta_train(config: MetaTrainConfig, run_dir: str | Path | None = None, *, resume: bool = False,
               progress: Callable | bool | None = None, devices: int | None = None) -> TrainState:
  """Meta-trains a learned optimizer as ``config`` says; with ``run_dir`` writes the run directory (see run.py).

  ``progress(step, total, metrics_dict)`` is called after every logged step; by default (None) a bar with ETA and
  the current meta-loss is drawn on stderr (a line every 10% when stderr is not a terminal); False shows nothing.
  Returns the final TrainState; ``best_theta`` (best on held-out problems) is what gets exported.

  ``devices``: local devices the per-problem work is sharded over (None: all; ``lopt.meta.sharding``); after
  ``jax.distributed`` initialization, every process runs this with the same arguments and only process 0 writes.
  """
  if progress is None:
    from lopt.progress import training_bar
    with training_bar(config.num_steps) as update:
      return meta_train(config, run_dir, resume=resume, progress=update, devices=devices)
  # Ctrl-C only sets a flag in here; the loop ends at its next safe point (after an outer step) with a checkpoint.
  with interrupts.deferred():
    return _meta_train(config, run_dir, resume, progress, devices)


def initial_theta(config: MetaTrainConfig, optimizer):
  """The seed's initialization, or the meta-parameters of the trained optimizer ``init_from``, which must have this
  run's architecture and fields (UserError otherwise) -- except fields added to the architecture since
  (``ArchitectureSpec.added_fields``) that the trained one has at their old value: the meta-parameters they add
  start at the seed's initialization (``direct_step``: a zero head, which changes no step); and fields that shape
  no meta-parameter (``unshaped_fields``, e.g. ``max_log_step``), which keep this run's value."""
  source = config.outer.init_from
  if source is None:
    return optimizer.init(jax.random.key(config.seed))
  from lopt.trained import load
  trained = load(source)
  theirs, ours = trained.optimizer.config(), optimizer.config()
  kind = ours.get("architecture")
  spec = architectures.get(kind) if kind is not None and kind == theirs.get("architecture") else None
  added = spec.added_fields if spec else {}
  differing = {k for k in set(theirs) | set(ours) if theirs.get(k) != ours.get(k)} - set(
      spec.unshaped_fields if spec else ())
  if not differing <= set(added) or any(theirs.get(k) != added[k] for k in differing):
    raise UserError(f"--init-from {source}: its optimizer is {theirs}, this run's is {ours}; they must match")
  if not differing:
    return jax.tree.map(jnp.asarray, trained.theta)
  from lopt.pytree import flatten_by_path, unflatten_by_path
  fresh, known = optimizer.init(jax.random.key(config.seed)), flatten_by_path(trained.theta)
  merged = {path: known.get(path, value) for path, value in flatten_by_path(fresh).items()}
  return jax.tree.map(jnp.asarray, unflatten_by_path(merged, fresh))


def trainable_mask(config: MetaTrainConfig, theta):
  """A pytree like theta of bools (True: meta-trained), from the outer section's ``trainable`` prefixes; None when
  all of theta is trained. UserError for a prefix that names no meta-parameter."""
  if config.outer.trainable is None:
    return None
  from lopt.pytree import flatten_by_path, prefix_mask
  prefixes = tuple(p.strip() for p in config.outer.trainable.split(","))
  mask, unmatched = prefix_mask(theta, prefixes)
  if unmatched:
    raise UserError(f"--trainable: {unmatched} name no meta-parameter of {config.optimizer.architecture!r}; its "
                    f"meta-parameters are {sorted(flatten_by_path(theta))}")
  return mask


def _meta_train(config: MetaTrainConfig, run_dir, resume: bool, progress, devices: int | None) -> TrainState:
  task, optimizer = task_from(config), optimizer_from(config)
  theta = initial_theta(config, optimizer)
  mask = trainable_mask(config, theta)
  estimator = estimators.restrict(estimator_from(config, task, optimizer), mask)
  outer, schedule = outer_optimizer_from(config, optimizer), learning_rate_schedule(config)
  if mask is not None:  # frozen meta-parameters get no update (and, above, no perturbation)
    outer = optax.chain(outer, optax.masked(optax.set_to_zero(), jax.tree.map(lambda m: not m, mask)))
  outer_step = build_outer_step(estimator, outer)
  eval_task, eval_horizon = held_out_tasks(config, task)
  evaluate = build_evaluator(eval_task, optimizer, eval_horizon)
  eval_keys = held_out_keys(config.seed, config.num_eval_problems)

  estimator_key = jax.random.fold_in(jax.random.key(config.seed), ESTIMATOR_INIT_STREAM)
  estimator_state = estimator.init(theta, estimator_key)
  state = TrainState(0, theta, outer.init(theta), theta, float("inf"), 0, estimator_state=estimator_state)
  # The default device count splits the per-problem axes; a given one that does not is a plain user error, raised
  # before the run directory exists.
  layout = sharding.layout(devices, sharding.leading_sizes(estimator_state))
  if layout.sharded:
    outer_step = build_sharded_outer_step(estimator, outer, layout, estimator_state)
  run = None
  if run_dir is not None and layout.writes:
    run = run_files.RunDirectory(run_dir)
    run.open(config, resume=resume)
    if config.task.family is not None:  # which shapes this run trains and selects on, for whoever reads the run
      atomic_write_json(run.path / "task_groups.json",
                        {"training": family_configs(config.task, config.seed),
                         "held_out": family_configs(config.task, config.seed, held_out=True)})
    if resume:
      # Resumed from a meta checkpoint alone, the inner problems start new episodes drawn for the step it stopped at.
      fresh = lambda theta, step: estimator.init(theta, jax.random.fold_in(estimator_key, step))  # noqa: E731
      restored = run.restore(state, fresh)
      if restored is not None:
        state = restored
  if resume and run_dir is not None and layout.several_processes:
    state = _share_restored(layout, state)
  if layout.sharded:
    state = _placed(layout, state)

  # The counters stay on the device between log steps: reading them every step would make the host wait for each
  # outer step to finish before dispatching the next one.
  skipped, dropped = jnp.asarray(state.skipped_steps), jnp.asarray(state.dropped_problems)

  def sync_counters():
    state.skipped_steps, state.dropped_problems = int(skipped), int(dropped)

  started = time.perf_counter()
  try:
    if _stop_requested(layout, True):  # a Ctrl-C during set-up ends here, before the first step's compilation
      raise KeyboardInterrupt
    while state.step < config.num_steps:
      theta, outer_state, estimator_state, metrics = outer_step(state.theta, state.outer_state,
                                                                state.estimator_state, step_key(config.seed, state.step))
      state.theta, state.outer_state, state.estimator_state = theta, outer_state, estimator_state
      metrics = layout.local(metrics)
      state.step += 1
      skipped, dropped = skipped + metrics.skipped, dropped + metrics.dropped_problems
      record = None
      if state.step % config.eval_every == 0 or state.step == config.num_steps:
        score = float(jnp.mean(evaluate(layout.local(state.theta), eval_keys)))
        if score < state.best_score:
          state.best_theta, state.best_score, state.best_step = state.theta, score, state.step
        state.outer_state = learned_outer.record_valid_loss(state.outer_state, score)  # a learned outer one's hint
        if layout.several_processes and config.outer.outer_optimizer != learned_outer.ADAM:
          state.outer_state = layout.put(state.outer_state, layout.replica)  # the score is a local array: now global
        record = {"held_out_loss": score, "best_held_out_loss": state.best_score}
      if record is not None or state.step % config.log_every == 0:
        sync_counters()
        record = {
            "step": state.step, "meta_loss": float(metrics.meta_loss), "gradient_norm": float(metrics.gradient_norm),
            "diverged_problems": int(metrics.diverged_problems), "dropped_problems": int(metrics.dropped_problems),
            "skipped": int(metrics.skipped), "total_skipped_steps": state.skipped_steps,
            **{name: float(value) for name, value in (metrics.extra or {}).items()},
            **({"learning_rate": float(schedule(state.step))} if config.outer.outer_optimizer == learned_outer.ADAM else
               {"outer_scale": config.outer.outer_scale}),
            "seconds": round(time.perf_counter() - started, 3), "best_held_out_loss": state.best_score,
            "inner_steps": state.step * getattr(estimator, "inner_steps_per_estimate", 0),
            **(record or {})}
        if run is not None:
          run.log(record)
        if progress:
          progress(state.step, config.num_steps, record)
      due = state.step % config.checkpoint_every == 0 or state.step == config.num_steps
      stop = _stop_requested(layout, due or state.step % config.log_every == 0)
      if (run is not None or layout.several_processes) and (due or stop):
        sync_counters()
        snapshot = _on_host(layout, state)  # with several processes a collective: every process takes part
        if run is not None:
          run.checkpoint(snapshot)
      if stop:  # with several processes, all of them (one that got no signal too) and only at the agreed step
        if run is not None and snapshot.best_step > 0:  # the best theta so far stays usable (resume replaces it)
          run.export(optimizer, snapshot, config)
        raise KeyboardInterrupt
    sync_counters()
    if run is not None:
      run.export(optimizer, dataclasses.replace(state, best_theta=layout.to_host(state.best_theta)), config)
  finally:
    if run is not None:
      run.close()
  return state


def _stop_requested(layout: sharding.Layout, sync_point: bool) -> bool:
  """Whether the loop stops after this step for a Ctrl-C. With several processes they must agree (each then writes
  its part of the checkpoint and stops), which costs a collective: asked only at log and checkpoint steps."""
  if not layout.several_processes:
    return interrupts.interrupted()
  return sync_point and layout.any_process(interrupts.interrupted())


def _placed(layout: sharding.Layout, state: TrainState) -> TrainState:
  """``state`` on the layout's devices: the estimator state sharded by its leading axis, the rest replicated."""
  replica = layout.replica
  return dataclasses.replace(state, theta=layout.put(state.theta, replica),
                             outer_state=layout.put(state.outer_state, replica),
                             best_theta=layout.put(state.best_theta, replica),
                             estimator_state=layout.put(state.estimator_state,
                                                        layout.leading(state.estimator_state)))


def _on_host(layout: sharding.Layout, state: TrainState) -> TrainState:
  """``state`` with whole host arrays: what process 0 writes (identity in one process, where that is free)."""
  if not layout.several_processes:
    return state
  return dataclasses.replace(state, theta=layout.to_host(state.theta), outer_state=layout.to_host(state.outer_state),
                             best_theta=layout.to_host(state.best_theta),
                             estimator_state=layout.to_host(state.estimator_state))


def _share_restored(layout: sharding.Layout, state: TrainState) -> TrainState:
  """Process 0's restored state (or its fresh one) on every process: the others need no access to its files."""
  import numpy as np
  trees = (state.theta, state.outer_state, state.best_theta, state.estimator_state)
  keys = [jax.dtypes.issubdtype(getattr(x, "dtype", None), jax.dtypes.prng_key) for x in jax.tree.leaves(trees)]
  leaves = [np.asarray(jax.random.key_data(x) if k else x) for x, k in zip(jax.tree.leaves(trees), keys)]
  counters = np.asarray([state.step, state.best_step, state.skipped_steps, state.dropped_problems], np.int64)
  leaves, counters, score = layout.from_writer((leaves, counters, np.asarray(state.best_score, np.float64)))
  like = jax.tree.leaves(trees)
  leaves = [jax.random.wrap_key_data(x, impl=jax.random.key_impl(t)) if k else jnp.asarray(x)
            for x, t, k in zip(leaves, like, keys)]
  theta, outer_state, best_theta, estimator_state = jax.tree.unflatten(jax.tree.structure(trees), leaves)
  step, best_step, skipped, dropped = (int(c) for c in counters)
  return TrainState(step, theta, outer_state, best_theta, float(score), best_step, skipped, dropped,
                    estimator_state)


def load_metrics(run_dir: str | Path) -> list[dict]:
  """Reads ``metrics.jsonl``, skipping a torn last line left by a kill."""
  lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
  out = []
  for line in lines:
    try:
      out.append(json.loads(line))
    except json.JSONDecodeError:
      continue
  return out


__all__ = ["build_outer_step", "meta_train", "MetaTrainConfig", "TrainState", "StepMetrics", "step_key", "step_keys",
           "build_evaluator", "learning_rate_schedule", "outer_optimizer_from", "optimizer_from", "task_from",
           "estimator_from", "load_metrics"]
