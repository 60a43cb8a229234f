"""``lopt analyze``: run every dynamics analysis on a trained optimizer and write ``analysis/`` (JSON + PNGs).

This is the glue between files (run directories, saved optimizers, tasks) and the model-agnostic toolkit: it binds
a recurrent architecture's cell and readout (``lopt.api.RecurrentView``) to its weights and hands plain callables to
``lopt.dynamics``. Architectures without a recurrent view get the update-function analyses
(``lopt.pipeline.update_analysis``): clipping and the learned schedule; the hierarchical optimizer also gets its
per-tensor LSTM reverse-engineered (``lopt.pipeline.hierarchical_analysis``: hierarchical.json and four figures).
"""

from __future__ import annotations

import functools
import json
import time
from pathlib import Path

import numpy as np

from lopt.io.checkpoint import atomic_write_bytes, load_optimizer, read_json
from lopt.errors import UserError

ANALYSIS_SEED = 30_000  # problems for the analysis: a stream distinct from training, tuning and evaluation
NUM_PROBLEMS = 8        # test problems whose states are collected (ours; the paper's notebook used a handful)
FIGURES = ("clipping", "momentum", "schedule", "adaptation", "pca")
RECURRENT_ANALYSES = ("fixed_points", "momentum", "adaptation", "pca")  # need a RecurrentView
UPDATE_ANALYSES = ("clipping", "schedule")                              # any architecture
ANALYSES = UPDATE_ANALYSES + RECURRENT_ANALYSES


def is_recurrent(optimizer) -> bool:
  """Whether ``optimizer`` offers the ``lopt.api.RecurrentView`` the recurrent analyses need."""
  from lopt.api import RecurrentView
  return isinstance(optimizer, RecurrentView)


def check_analyses(optimizer, requested) -> None:
  """UserError when a recurrent analysis is asked of an architecture without a recurrent view."""
  unknown = sorted(set(requested or ()) - set(ANALYSES))
  if unknown:
    raise UserError(f"unknown analysis {', '.join(map(repr, unknown))}; choose from: {', '.join(ANALYSES)}")
  wanted = sorted(set(requested or ()) & set(RECURRENT_ANALYSES))
  if wanted and not is_recurrent(optimizer):
    name = optimizer.config().get("architecture", type(optimizer).__name__)
    raise UserError(f"the {', '.join(wanted)} analysis needs a recurrent architecture (one with a state map "
                    f"h' = F(h, g) and a readout, such as 'gru'); {name!r} is not recurrent. Its update-function "
                    f"analyses ({', '.join(UPDATE_ANALYSES)}) run with `lopt analyze DIR`")


def resolve(path: str | Path, task_name: str | None = None, task_options: dict | None = None):
  """(optimizer, theta, task) from a run directory (its config names the task) or a saved optimizer + task name."""
  from lopt import tasks
  from lopt.meta.config import MetaTrainConfig
  from lopt.meta.train import representative_task, task_from
  from lopt.trained import resolve_optimizer_path
  path = resolve_optimizer_path(path)  # a path, or a name as lopt.load takes it (shipped optimizers included)
  if not path.is_dir():
    raise UserError(f"{path}: no such directory (expected a run directory or a saved optimizer directory)")
  optimizer, theta, saved = load_optimizer(path)
  if task_name is not None:
    try:
      task = tasks.get(task_name, **(task_options or {}))
    except (TypeError, ValueError) as e:
      raise UserError(str(e)) from None
  elif (path / "config.json").is_file() and (path / "optimizer").is_dir():
    task = task_from(MetaTrainConfig.from_dict(read_json(path / "config.json", "run config")))
  elif "training" in saved.get("info", {}):
    task = task_from(MetaTrainConfig.from_dict(saved["info"]["training"]))
  else:
    raise UserError(f"{path}: a saved optimizer without its training config; name the task with --task "
                    f"(one of: {', '.join(tasks.REGISTRY)})")
  return optimizer, theta, representative_task(task)


def heavy_ball_reference(task) -> dict | None:
  """The optimal heavy ball, for tasks whose traits know it in closed form (quadratics)."""
  return (getattr(task, "traits", None) or {}).get("heavy_ball")


def analyze_directory(path: str | Path, task_name: str | None = None, task_options: dict | None = None, *,
                      num_problems: int = NUM_PROBLEMS, dtype=np.float64, progress=None, analyses=None,
                      out: str | Path | None = None) -> dict:
  """Analyzes the optimizer in ``path`` (or named ``path``, as ``lopt.load`` takes it) and writes ``out`` (default
  ``path/analysis/``; ``./analysis-NAME/`` for a name): summary.json and one PNG per figure.

  Returns the summary dict (also written). Analyses run in float64 by default (fixed points to machine precision).
  ``analyses``: the ones asked for by name (a recurrent one on a non-recurrent architecture is a UserError).
  """
  from lopt.pipeline.hierarchical_analysis import training_settings
  from lopt.trained import resolve_optimizer_path
  optimizer, theta, task = resolve(path, task_name, task_options)
  check_analyses(optimizer, analyses)
  source = resolve_optimizer_path(path)
  if out is None:
    out = source / "analysis" if Path(path).exists() else Path(f"analysis-{Path(str(path)).name}")
  hints = training_settings(source)  # the run's horizon (unless --task names another task) and valid_every
  if task_name is not None:
    hints["horizon"] = None
  return analyze_optimizer(optimizer, theta, task, out, source=source, num_problems=num_problems,
                           dtype=dtype, progress=progress, hints=hints)


def analyze_optimizer(optimizer, theta, task, out: str | Path, *, source: str | Path | None = None,
                      num_problems: int = NUM_PROBLEMS, num_coordinates: int | None = None,
                      num_seeds: int | None = None, adaptation_seeds: int | None = None, dtype=np.float64,
                      progress=None, hints: dict | None = None) -> dict:
  """Runs every analysis of ``optimizer`` (weights ``theta``) on ``task`` and writes ``out`` (summary.json + PNGs).

  Args:
    source: where the optimizer came from (recorded in the summary); default ``out``'s parent.
    num_problems: test problems whose states are collected.
    num_coordinates: keep only this many random coordinates per problem (network tasks: thousands of parameters
      times T steps times H units would not fit in memory); None keeps all.
    num_seeds: fixed-point seeds (default ``lopt.dynamics.analysis.MAX_SEEDS``); fewer is faster and coarser.
    adaptation_seeds: seeds per g* of the adaptation sweep (default: as many as the sweep takes).
    hints: {"horizon", "valid_every"} of meta-training (``hierarchical_analysis.training_settings``), for the
      hierarchical optimizer's analyses (None: the task's horizon, validation loss every 10 steps).
  """
  import jax

  from lopt import dynamics
  from lopt.dynamics.analysis import MAX_SEEDS
  from lopt.evaluation.compare import problem_keys
  from lopt.report import dynamics_figures as figs
  from lopt.report.figures import to_png
  say = progress or (lambda message: None)
  started = time.perf_counter()
  out = Path(out)
  path = Path(source) if source is not None else out.parent
  if not is_recurrent(optimizer):
    return _analyze_updates(optimizer, theta, task, out, path, num_problems, progress=say, started=started,
                            hints=hints)
  coordinates = _coordinate_subset(task, num_coordinates)

  kept = "" if coordinates is None else f" ({len(coordinates)} coordinates each)"
  say(f"collecting optimizer states on {num_problems} {task.name} problems{kept}")
  collected = dynamics.collect_states(task, optimizer, theta, problem_keys(ANALYSIS_SEED, num_problems),
                                      coordinates=coordinates)
  if not np.all(np.isfinite(collected.hidden)):
    raise UserError(f"{path}: the optimizer's states became non-finite on {task.name}; nothing to analyze")
  # Analyses run in float64: bind float64 weights (the cell promotes to its inputs' dtype).
  with jax.enable_x64(True):
    weights = {k: jax.numpy.asarray(np.asarray(v, np.float64)) for k, v in theta.items()}
  step = functools.partial(optimizer.cell, weights)
  readout = functools.partial(optimizer.readout, weights)
  h0 = np.asarray(optimizer.initial_hidden(weights), np.float64)
  say("fixed points, linearization, clipping, schedule and adaptation")
  with jax.enable_x64(True):
    results = dynamics.analyze(step, readout, h0, visited_states=collected.visited_states.astype(np.float64),
                               gradients=collected.gradients, heavy_ball=heavy_ball_reference(task),
                               schedule_steps=task.horizon, num_seeds=num_seeds or MAX_SEEDS,
                               adaptation_seeds=adaptation_seeds, dtype=dtype)
    results["visited"] = collected.visited_states[::max(1, len(collected.visited_states) // 4000)]
    summary = dynamics.summarize(results)
    say("drawing figures")
    drawn = {
        "clipping": lambda: figs.clipping_figure(results),
        "momentum": lambda: figs.momentum_figure(results, step, readout) if results["momentum"] else None,
        "schedule": lambda: figs.schedule_figure(results),
        "adaptation": lambda: figs.adaptation_figure(results, step, readout),
        "pca": lambda: figs.pca_figure(results, collected.hidden),
    }
    written = []
    for name in FIGURES:
      figure = drawn[name]()
      if figure is not None:
        atomic_write_bytes(out / f"{name}.png", to_png(figure))
        written.append(f"{name}.png")
  losses = collected.losses
  summary["source"] = {"path": str(path), "out": str(out), "task": task.name, "task_options": task.options,
                       "optimizer": optimizer.config(), "num_problems": num_problems, "horizon": task.horizon,
                       "coordinates_per_problem": None if coordinates is None else len(coordinates),
                       "fixed_point_seeds": num_seeds or MAX_SEEDS, "adaptation_seeds": adaptation_seeds,
                       "normalized_final_loss_median": float(np.median(losses[:, -1] / losses[:, 0])),
                       "figures": written, "seconds": round(time.perf_counter() - started, 1)}
  atomic_write_bytes(out / "summary.json", json.dumps(summary, indent=1).encode())
  return summary


def _analyze_updates(optimizer, theta, task, out: Path, path: Path, num_problems: int, *, progress, started,
                     hints: dict | None = None) -> dict:
  """The update-function analyses of an architecture without a recurrent view: clipping and the learned schedule;
  for the hierarchical optimizer also its per-tensor LSTM (``lopt.pipeline.hierarchical_analysis``)."""
  from lopt.pipeline import hierarchical_analysis
  from lopt import dynamics
  from lopt.evaluation.compare import problem_keys
  from lopt.pipeline import update_analysis
  from lopt.report import dynamics_figures as figs
  from lopt.report.figures import to_png
  then = ("; its per-tensor LSTM next" if hierarchical_analysis.is_hierarchical(optimizer)
          else "; fixed points, momentum and adaptation need a recurrent architecture")
  progress(f"probing the update function on {num_problems} {task.name} problems (no recurrent view: clipping and "
           f"schedule{then})")
  results = update_analysis.analyze_updates(task, optimizer, theta, problem_keys(ANALYSIS_SEED, num_problems))
  summary = dynamics.summarize({"clipping": results["clipping"], "schedule": results["schedule"]})
  written = []
  for name, draw in (("clipping", lambda: figs.clipping_figure(results)),
                     ("schedule", lambda: figs.learned_schedule_figure(results))):
    atomic_write_bytes(out / f"{name}.png", to_png(draw()))
    written.append(f"{name}.png")
  if hierarchical_analysis.is_hierarchical(optimizer):
    hints = hints or {}
    summary["hierarchical"] = hierarchical_analysis.analyze_hierarchical(
        optimizer, theta, task, out, num_problems=num_problems, horizon=hints.get("horizon"),
        valid_every=hints.get("valid_every"), seed=ANALYSIS_SEED, progress=progress)
    written.extend(summary["hierarchical"]["settings"]["figures"])
  losses = results["probes"]["losses"]
  summary["source"] = {"path": str(path), "out": str(out), "task": task.name, "task_options": task.options,
                       "optimizer": optimizer.config(), "num_problems": num_problems, "horizon": task.horizon,
                       "recurrent": False, "not_applicable": list(RECURRENT_ANALYSES),
                       "probed_coordinates": len(results["probed_coordinates"]),
                       "normalized_final_loss_median": float(np.median(losses[:, -1] / losses[:, 0])),
                       "figures": written, "seconds": round(time.perf_counter() - started, 1)}
  atomic_write_bytes(out / "summary.json", json.dumps(summary, indent=1).encode())
  return summary


def _coordinate_subset(task, count: int | None):
  """Sorted random coordinates of one problem's flattened parameters (all of them when ``count`` covers them)."""
  if count is None:
    return None
  import jax
  from jax.flatten_util import ravel_pytree
  size = int(jax.eval_shape(lambda k: ravel_pytree(task.init(k))[0], jax.random.key(0)).shape[0])
  if count >= size:
    return None
  return np.sort(np.random.default_rng(ANALYSIS_SEED).choice(size, count, replace=False))
