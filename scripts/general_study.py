"""How the general-purpose learned optimizer (``lopt.load("general")``) behaves outside its meta-training
distribution, against Adam with its learning rate tuned (the claims of Metz et al. 2020, "Tasks, stability,
architecture, and compute"):

1. width: x1, x2, x4, x10 of a base MLP (2 hidden layers of 32, ReLU), at a fixed horizon;
2. batch size: 2, 8, 32, 128, 512 on the base MLP;
3. horizon: 1x, 4x, 10x a base horizon (500 -> 2000 -> 5000; the families draw 100..2000), the learned optimizer
   told num_steps = the horizon;
4. the validation/training gap (implicit regularization) of every run above: the final parameters' loss on the
   held-out split minus their loss on the whole training split; the base data set is small (512 training rows of
   make_hastie_10_2, 410 held-out rows), so the nets can overfit;
5. 1/2 (x - y)^2 on two parameters from 12 starting points: where each optimizer ends on the minimum line x = y
   (the projection of the start, as gradient descent, or nearer the origin, as Metz 2020 saw).

Protocol (``lopt.evaluation.benchmark``'s, reused): Adam's learning rate is chosen from a 9-point log grid 1e-4..1 by
the mean training loss over the run on tuning seeds (every (rate, seed) in vmapped unrolls), then Adam at that rate
and the learned optimizer run on other (evaluation) seeds, the same keys for both (paired). The learned optimizer
gets value=, valid_loss= (every 10 steps) and num_steps= at every step. Ratios are the learned optimizer's over tuned
Adam's (< 1: the learned optimizer is better).

  python scripts/general_study.py --quick                    # smoke run, 1 seed, short horizons: minutes
  python scripts/general_study.py --out docs/images          # the full study (3 seeds)
  python scripts/general_study.py --optimizer runs/X/optimizer --out /tmp/study --cache /tmp/study

Writes OUT/general_study.json (every number) and OUT/general_study_{width,batch,horizon,gap,xy}.png.
"""

from __future__ import annotations

import argparse
import datetime
import io
import math
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lopt.evaluation import benchmark as bm
from lopt.evaluation import suite
from lopt.io.checkpoint import atomic_write_bytes, atomic_write_json, read_json
from lopt.tasks.base import Task
from lopt.tasks.families import _nn

FORMAT, FORMAT_VERSION = "lopt-general-study", 1
LEARNING_RATES = tuple(float(x) for x in 10.0**np.arange(-4.0, 0.0 + 1e-9, 0.5))  # 9: 1e-4 .. 1
DATA, TRAIN_ROWS = "hastie_10_2", 512      # small enough for a wide MLP to overfit; the 410 validation rows are kept
BASE_WIDTH, DEPTH, ACTIVATION = 32, 2, "relu"
BASE_BATCH = 32
BASE_HORIZON, QUICK_BASE_HORIZON = 500, 100
WIDTHS = (1, 2, 4, 10)                     # multipliers of BASE_WIDTH
BATCH_SIZES = (2, 8, 32, 128, 512)         # 512 = the whole training split (full batch)
HORIZONS = (1, 4, 10)                      # multipliers of the base horizon
SEEDS, QUICK_SEEDS = 3, 1
XY_STEPS = 500
XY_RING = tuple((2 * math.cos(a), 2 * math.sin(a)) for a in np.arange(8) * math.pi / 4)  # radius 2, every 45 deg
XY_OFF_AXIS = ((3.0, 1.0), (-1.0, -4.0), (0.5, 3.0), (-3.0, 1.0))
XY_STARTS = XY_RING + XY_OFF_AXIS
XY_LAYOUTS = ("scalars", "vector")         # two scalar tensors x, y; or one (2,) tensor
STUDIES = ("width", "batch", "horizon")


# -- the problems ----------------------------------------------------------------------------------------------------

def config(width: int = 1, batch_size: int = BASE_BATCH, horizon: int = BASE_HORIZON) -> dict:
  """One run's settings: width multiplier of BASE_WIDTH, minibatch rows, steps."""
  return {"width": width, "batch_size": batch_size, "horizon": horizon}


def config_name(c: dict) -> str:
  return f"w{c['width']}_b{c['batch_size']}_t{c['horizon']}"


def study_configs(base_horizon: int, widths=WIDTHS, batch_sizes=BATCH_SIZES, horizons=HORIZONS) -> dict:
  """{study: [config, ...]}; every study varies one setting of the base (x1 width, batch BASE_BATCH, base horizon),
  so the base run is shared."""
  return {"width": [config(w, BASE_BATCH, base_horizon) for w in widths],
          "batch": [config(1, b, base_horizon) for b in batch_sizes],
          "horizon": [config(1, BASE_BATCH, m * base_horizon) for m in horizons]}


def unique_configs(studies: dict) -> list[dict]:
  seen = {}
  for rows in studies.values():
    for c in rows:
      seen.setdefault(config_name(c), c)
  return list(seen.values())


def mlp_task(c: dict, data: str = DATA, rows: int = TRAIN_ROWS) -> Task:
  """An MLP of DEPTH hidden layers of BASE_WIDTH x width units on the first ``rows`` training rows of the suite's
  ``data`` split (``suite.dataset``), minibatches of batch_size rows (the whole split when not fewer), validation
  loss on the whole held-out split; the suite's losses (``suite.supervised``)."""
  train, valid, classes = suite.dataset(data)
  train = type(train)(train.inputs[:rows], train.labels[:rows])
  hidden = [BASE_WIDTH * c["width"]] * DEPTH
  spec = _nn.mlp_spec([train.inputs.shape[1], *hidden, classes or 1])
  predict = lambda params, x: _nn.mlp_apply(params, x, ACTIVATION, len(hidden))
  loss, valid_loss = suite.supervised(train, valid, predict, suite.objective(classes), c["batch_size"])
  return Task(config_name(c), lambda key: _nn.materialize(key, spec), loss, c["horizon"], valid_loss=valid_loss,
              options={"data": data, "rows": rows, "hidden": hidden, "activation": ACTIVATION, **c})


# -- running one configuration ---------------------------------------------------------------------------------------

def unroll_with_endpoint(task, optimizer, key, horizon: int, full_train_loss, feed_valid: bool = True):
  """``benchmark.training_scan`` (the same scan, the same hints to the optimizer), also returning the final
  parameters' loss on the whole training split and on the held-out split: (train (T,), valid (T,), (2,))."""
  params, losses, valids = bm.training_scan(task, optimizer, key, horizon, feed_valid)
  return losses, valids, jnp.stack([full_train_loss(params, key), task.valid_loss(params, key, horizon)])


def endpoint_runner(task, build, horizon: int, lanes: int, full_train_loss):
  """``benchmark.lane_runner`` on ``unroll_with_endpoint``: ``run(hyperparameters, keys, report) -> (train, valid)``
  as benchmark.run_job expects; ``run.extras[0]`` holds the (n, 2) final losses (whole training split, held-out
  split) of its last call (in run_job: the evaluation)."""
  def unroll(task, optimizer, key, horizon, feed_valid):
    return unroll_with_endpoint(task, optimizer, key, horizon, full_train_loss, feed_valid)
  return bm.lane_runner(task, build, horizon, lanes, unroll=unroll)


def run_job(task, horizon: int, plan: dict, runner, tuning_keys, eval_keys) -> dict:
  """``benchmark.run_job`` (tuning, then evaluation), its record with the evaluation's endpoint losses added."""
  record = bm.run_job(task, horizon, plan, runner, tuning_keys, eval_keys, lambda *_: None)
  record["endpoints"] = bm._json_rows(runner.extras[0])
  return record


def seed_metrics(record: dict, horizon: int) -> dict:
  """Per evaluation seed: mean and final training loss (``benchmark``'s: minibatch losses, the final one averaged
  over the last 5% of steps), the final parameters' loss on the whole training split (end_train_loss) and on the
  held-out split (end_valid_loss), the gap end_valid_loss - end_train_loss, benchmark's windowed gap
  (final_valid_loss - final_loss), and whether it diverged."""
  train, valid, ends = (bm._floats(record[k]) for k in ("train", "valid", "endpoints"))
  final, final_valid = bm.final_loss(train), bm.final_valid_loss(valid, horizon)
  with np.errstate(invalid="ignore"):
    return bm.clean({"mean_loss": bm.mean_loss(train), "final_loss": final, "final_valid_loss": final_valid,
                     "end_train_loss": ends[:, 0], "end_valid_loss": ends[:, 1], "gap": ends[:, 1] - ends[:, 0],
                     "gap_window": final_valid - final, "diverged": bm.diverged(train)})


def metrics(record: dict, horizon: int) -> dict:
  """``benchmark.optimizer_metrics`` without its curves (its "gap" renamed "gap_window"), plus the per-seed numbers
  (``seed_metrics``) and the seed means of the endpoint losses and their gap."""
  out = bm.optimizer_metrics(record, horizon)
  for key in ("curve", "valid_curve"):
    out.pop(key, None)
  out["gap_window"] = out.pop("gap", None)
  out["per_seed"] = seed_metrics(record, horizon)
  for key in ("end_train_loss", "end_valid_loss", "gap"):
    values = np.array([np.nan if v is None else v for v in out["per_seed"][key]], np.float64)
    out[key] = float(np.mean(values))
  return bm.clean(out)


def ratios(learned: dict, adam: dict, learned_train: np.ndarray, adam_train: np.ndarray) -> dict:
  """Learned over tuned Adam: mean-loss, final-loss and end-of-run held-out-loss ratios of the seed means, the
  per-seed (paired) ratios, and benchmark's speedup on the seed-mean curves."""
  with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
    ratio = lambda a, b: float(bm._inf(a) / bm._inf(b)) if np.isfinite(b) and b > 0 else float("nan")
    per_seed = lambda key: [ratio(a, b) for a, b in zip(learned["per_seed"][key], adam["per_seed"][key])]
    curve = lambda t: bm._inf(np.mean(bm._inf(t), 0))
    return bm.clean({"mean_loss": ratio(learned["mean_loss"], adam["mean_loss"]),
                     "final_loss": ratio(learned["final_loss"], adam["final_loss"]),
                     "end_valid_loss": ratio(learned["end_valid_loss"], adam["end_valid_loss"]),
                     **{f"{key}_per_seed": per_seed(key) for key in ("mean_loss", "final_loss", "end_valid_loss")},
                     "speedup": bm.speedup(curve(learned_train), curve(adam_train))})


def _cached(cache: Path | None, name: str, label: str, identity: dict, compute):
  """``compute()``'s record, read from / written to CACHE/NAME.LABEL.HASH.json when ``cache`` is given."""
  if cache is None:
    return compute()
  path = bm.cache_path(cache, name, label, identity)
  if path.is_file():
    return read_json(path, "cached study result")
  record = compute()
  atomic_write_json(path, record)
  return record


def run_config(c: dict, trained, *, seeds: int, learning_rates=LEARNING_RATES, lanes: int = bm.LANES,
               cache: Path | None = None, identity: dict | None = None, say=print) -> dict:
  """The learned optimizer and tuned Adam on one configuration: both optimizers' metrics and the ratios."""
  task, horizon = mlp_task(c), c["horizon"]
  full_train_loss = mlp_task({**c, "batch_size": TRAIN_ROWS}).loss  # the whole training split
  tuning_keys, eval_keys = bm.seed_keys(bm.TUNING_SEED, seeds), bm.seed_keys(bm.EVALUATION_SEED, seeds)
  plan = bm.baseline_plan("adam_tuned", learning_rates)
  common = {"format": FORMAT_VERSION, "config": c, "data": DATA, "rows": TRAIN_ROWS, "base_width": BASE_WIDTH,
            "depth": DEPTH, "activation": ACTIVATION, "seeds": seeds, "valid_every": bm.VALID_EVERY}
  records = {}
  started = time.perf_counter()
  adam_runner = lambda: endpoint_runner(task, bm.adam, horizon, seeds * max(1, round(lanes / seeds)),
                                        full_train_loss)
  records["adam"] = _cached(cache, config_name(c), "adam_tuned", {**common, "candidates": plan["candidates"]},
                            lambda: run_job(task, horizon, plan, adam_runner(), tuning_keys, eval_keys))
  learned_runner = lambda: endpoint_runner(task, lambda: trained.as_optax(num_steps=horizon), horizon,
                                           min(lanes, seeds), full_train_loss)
  records["learned"] = _cached(cache, config_name(c), "learned", {**common, "optimizer": identity},
                               lambda: run_job(task, horizon, {"learned": True}, learned_runner(), tuning_keys,
                                               eval_keys))
  adam, learned = metrics(records["adam"], horizon), metrics(records["learned"], horizon)
  out = {"config": c, "num_params": task.num_params(), "adam": adam, "learned": learned,
         "ratio": ratios(learned, adam, bm._floats(records["learned"]["train"]), bm._floats(records["adam"]["train"])),
         "seconds": round(time.perf_counter() - started, 1)}
  say(f"  {config_name(c):>16}  {out['num_params']:>7,} params  adam lr {adam['hyperparameters']['learning_rate']:.2g}"
      f"  ratio {_num(out['ratio']['mean_loss'])}  gap learned {_num(learned['gap'])} adam {_num(adam['gap'])}"
      f"  ({out['seconds']:.0f} s)")
  return bm.clean(out)


# -- 1/2 (x - y)^2 ---------------------------------------------------------------------------------------------------

def xy_params(point, layout: str = "scalars"):
  """A point (x, y) as the problem's parameters: two scalar tensors {"x", "y"}, or one (2,) tensor."""
  point = jnp.asarray(point, jnp.float32)
  return {"x": point[0], "y": point[1]} if layout == "scalars" else point


def xy_point(params):
  return jnp.stack([params["x"], params["y"]]) if isinstance(params, dict) else params


def xy_loss(params):
  x, y = xy_point(params)
  return 0.5 * jnp.square(x - y)


def xy_trajectory(optimizer, start, steps: int = XY_STEPS, layout: str = "scalars"):
  """(positions (steps + 1, 2), losses (steps,)) of ``optimizer`` (an optax transformation; extra arguments are
  dropped by plain ones) minimizing 1/2 (x - y)^2 from ``start``; it gets value= (the loss) and num_steps= each step.
  """
  optimizer = optax.with_extra_args_support(optimizer)
  params = xy_params(start, layout)

  def step(carry, _):
    params, state = carry
    loss, grads = jax.value_and_grad(xy_loss)(params)
    updates, state = optimizer.update(grads, state, params, value=loss, num_steps=steps)
    params = optax.apply_updates(params, updates)
    return (params, state), (xy_point(params), loss)

  _, (positions, losses) = jax.lax.scan(step, (params, optimizer.init(params)), None, length=steps)
  return jnp.concatenate([jnp.asarray(start, jnp.float32)[None], positions]), losses


def xy_distances(final, start) -> dict:
  """Where ``final`` lies: distance to the origin, to the line x = y, to the start's projection onto the line (the
  nearest minimum, where gradient descent goes), and ``along``: its coordinate along the line over the
  projection's (1: the projection, 0: the origin; None for a start whose projection is the origin)."""
  (x, y), (x0, y0) = np.asarray(final, np.float64), np.asarray(start, np.float64)
  middle = (x0 + y0) / 2
  return {"final": [x, y], "origin": math.hypot(x, y), "line": abs(x - y) / math.sqrt(2),
          "projection": math.hypot(x - middle, y - middle), "nearest_minimum": [middle, middle],
          "along": (x + y) / (x0 + y0) if abs(x0 + y0) > 1e-6 else None}


def xy_run(build, starts, steps: int, layout: str = "scalars", learning_rates=None):
  """Trajectories (n, steps + 1, 2) and losses (n, steps) from every start, all in one vmapped call: ``build()`` a
  transformation, or ``build(learning_rate)`` for each of ``learning_rates`` (then (rates, n, ...))."""
  starts = jnp.asarray(starts, jnp.float32)
  if learning_rates is None:
    run = jax.jit(jax.vmap(lambda s: xy_trajectory(build(), s, steps, layout)))
    return tuple(np.asarray(a, np.float64) for a in run(starts))
  run = jax.jit(jax.vmap(lambda rate: jax.vmap(lambda s: xy_trajectory(build(rate), s, steps, layout))(starts)))
  return tuple(np.asarray(a, np.float64) for a in run(jnp.asarray(learning_rates, jnp.float32)))


def xy_summary(trajectories: np.ndarray, losses: np.ndarray, starts, points: int = 51) -> dict:
  """Distances per start, their means, and each trajectory at ``points`` steps (for the figure)."""
  keep = np.unique(np.round(np.linspace(0, trajectories.shape[1] - 1, points)).astype(int))
  rows = [{"start": list(map(float, s)), **xy_distances(t[-1], s), "final_loss": float(l[-1])}
          for s, t, l in zip(starts, trajectories, losses)]
  moving = [r for r in rows if r["along"] is not None]  # starts whose nearest minimum is not the origin
  mean = lambda key, rows=rows: float(np.mean([r[key] for r in rows])) if rows else None
  return bm.clean({"starts": rows, "mean_origin": mean("origin"), "mean_line": mean("line"),
                   "mean_projection": mean("projection"), "mean_along": mean("along", moving),
                   "steps_kept": keep.tolist(),
                   "trajectories": np.round(trajectories[:, keep], 4).tolist()})


def xy_study(trained, steps: int = XY_STEPS, starts=XY_STARTS, learning_rates=LEARNING_RATES, say=print) -> dict:
  """The learned optimizer (each layout) and Adam, its rate tuned on this problem (mean loss over the steps and the
  starts), from every start."""
  out = {"steps": steps, "adam_learning_rates": list(learning_rates)}
  trajectories, losses = xy_run(optax.adam, starts, steps, learning_rates=learning_rates)
  scores = bm.mean_loss(losses).mean(1)
  best = int(np.argmin(scores))
  out["adam"] = {"learning_rate": learning_rates[best], "tuning_scores": bm.clean(scores),
                 **xy_summary(trajectories[best], losses[best], starts)}
  for layout in XY_LAYOUTS:
    trajectories, losses = xy_run(lambda: trained.as_optax(num_steps=steps), starts, steps, layout)
    out[f"learned_{layout}"] = {"layout": layout, **xy_summary(trajectories, losses, starts)}
  for label in ("adam", *(f"learned_{layout}" for layout in XY_LAYOUTS)):
    r = out[label]
    say(f"  xy {label:>16}: mean distance to the origin {_num(r['mean_origin'])}, to the line {_num(r['mean_line'])}"
        f", to the nearest minimum {_num(r['mean_projection'])}; along (1 = nearest, 0 = origin) "
        f"{_num(r['mean_along'])}")
  return bm.clean(out)


# -- figures ---------------------------------------------------------------------------------------------------------

def _num(x, digits: int = 3) -> str:
  return bm._num(x, digits)


def _save(fig, path: Path) -> None:
  import matplotlib.pyplot as plt
  buffer = io.BytesIO()
  fig.savefig(buffer, format="png", dpi=120)
  plt.close(fig)
  atomic_write_bytes(path, buffer.getvalue())


def _pyplot():
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


STUDY_AXES = {"width": ("hidden width (units per layer)", lambda c: BASE_WIDTH * c["width"]),
              "batch": ("batch size (rows; 512 = full batch)", lambda c: c["batch_size"]),
              "horizon": ("horizon (steps; learned optimizer told num_steps)", lambda c: c["horizon"])}


def ratio_figure(study: str, rows: list[dict], label: str, path: Path) -> None:
  """Mean-, final-training- and end-held-out-loss ratios (learned / tuned Adam) against the study's setting, per-seed ratios as range bars,
  a line at 1, tuned Adam's rate written at each point."""
  plt = _pyplot()
  xlabel, value = STUDY_AXES[study]
  xs = np.array([value(r["config"]) for r in rows], np.float64)
  fig, ax = plt.subplots(figsize=(6, 4))
  for key, marker, name in (("mean_loss", "o-", "mean training loss"), ("final_loss", "s--", "final training loss"),
                            ("end_valid_loss", "^:", "held-out loss at the end")):
    mid = np.array([np.nan if r["ratio"][key] is None else r["ratio"][key] for r in rows], np.float64)
    seeds = [np.array([np.nan if v is None else v for v in r["ratio"][f"{key}_per_seed"]]) for r in rows]
    low = np.array([np.nanmin(s) if np.isfinite(s).any() else np.nan for s in seeds])
    high = np.array([np.nanmax(s) if np.isfinite(s).any() else np.nan for s in seeds])
    ax.errorbar(xs, mid, yerr=[np.maximum(mid - low, 0), np.maximum(high - mid, 0)], fmt=marker, capsize=3,
                label=f"{name} ratio")
  for x, r in zip(xs, rows):
    ax.annotate(f"Adam lr {r['adam']['hyperparameters']['learning_rate']:.2g}", (x, r["ratio"]["mean_loss"] or 1),
                textcoords="offset points", xytext=(0, 8), ha="center", fontsize=7)
  ax.axhline(1.0, color="k", lw=1, ls=":")
  ax.set_xscale("log")
  ax.set_yscale("log")
  ax.set_xticks(xs)
  ax.set_xticklabels([f"{x:g}" for x in xs])
  ax.xaxis.set_minor_formatter(plt.NullFormatter())
  ax.set(xlabel=xlabel, ylabel=f"{label} / tuned Adam (< 1: {label} better)",
         title=f"{label} vs tuned Adam: {study} (bars: range over seeds)")
  ax.legend(fontsize=8)
  ax.grid(alpha=0.3)
  fig.tight_layout()
  _save(fig, path)


def gap_figure(configs: dict, label: str, path: Path) -> None:
  """The final parameters' held-out loss minus their loss on the whole training split, every configuration, learned
  optimizer and tuned Adam side by side, per-seed ranges as bars."""
  plt = _pyplot()
  names = list(configs)
  xs = np.arange(len(names))
  fig, ax = plt.subplots(figsize=(max(6, 0.7 * len(names) + 2), 4))
  for offset, key, name in ((-0.2, "learned", label), (0.2, "adam", "tuned Adam")):
    mid = np.array([np.nan if configs[n][key]["gap"] is None else configs[n][key]["gap"] for n in names])
    seeds = [np.array([np.nan if v is None else v for v in configs[n][key]["per_seed"]["gap"]]) for n in names]
    low = np.array([np.nanmin(s) if np.isfinite(s).any() else np.nan for s in seeds])
    high = np.array([np.nanmax(s) if np.isfinite(s).any() else np.nan for s in seeds])
    ax.bar(xs + offset, mid, 0.4, label=name, yerr=[np.maximum(mid - low, 0), np.maximum(high - mid, 0)], capsize=2)
  ax.axhline(0.0, color="k", lw=0.8)
  ax.set_xticks(xs)
  ax.set_xticklabels([n.replace("_", "\n") for n in names], fontsize=7)
  ax.set(ylabel="held-out - training loss (final parameters)", xlabel="configuration (width multiplier, batch, steps)",
         title=f"Generalization gap, {DATA} ({TRAIN_ROWS} training rows)")
  ax.legend(fontsize=8)
  ax.grid(alpha=0.3, axis="y")
  fig.tight_layout()
  _save(fig, path)


def xy_figure(xy: dict, label: str, path: Path) -> None:
  """Trajectories in the (x, y) plane: one panel per optimizer, the minimum line x = y, starts (o), ends (x) and
  each start's nearest minimum (small dot)."""
  plt = _pyplot()
  panels = [(f"learned_{layout}", f"{label} ({'two scalar tensors' if layout == 'scalars' else 'one (2,) tensor'})")
            for layout in XY_LAYOUTS] + [("adam", f"Adam, lr {xy['adam']['learning_rate']:.2g} (tuned)")]
  fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.4))
  limit = 1.1 * max(max(abs(v) for v in r["start"]) for r in xy["adam"]["starts"])
  for ax, (key, title) in zip(np.atleast_1d(axes), panels):
    ax.plot([-limit, limit], [-limit, limit], "k-", lw=1, alpha=0.5, label="minima x = y")
    for i, (row, path_xy) in enumerate(zip(xy[key]["starts"], xy[key]["trajectories"])):
      color = plt.cm.tab20(i % 20)
      p = np.asarray(path_xy)
      ax.plot(p[:, 0], p[:, 1], "-", color=color, lw=1.2)
      ax.plot(*row["start"], "o", color=color, ms=4)
      ax.plot(*row["final"], "x", color=color, ms=7, mew=2)
      ax.plot(*row["nearest_minimum"], ".", color=color, ms=4, alpha=0.6)
    ax.plot(0, 0, "k+", ms=10)
    ax.set(xlim=(-limit, limit), ylim=(-limit, limit), aspect="equal", xlabel="x", ylabel="y",
           title=f"{title}\nmean along-line position {_num(xy[key]['mean_along'], 2)} (1 nearest, 0 origin)")
    ax.title.set_fontsize(8)
    ax.grid(alpha=0.3)
  fig.suptitle(f"1/2 (x - y)^2, {xy['steps']} steps: o start, x end, . nearest minimum", fontsize=9)
  fig.tight_layout()
  _save(fig, path)


# -- the study -------------------------------------------------------------------------------------------------------

def summary_text(result: dict) -> str:
  label = result["optimizer"]["label"]
  lines = [f"{label} / tuned Adam ({result['settings']['seeds']} seed(s); < 1: {label} better): mean and final "
           f"training loss, held-out loss of the final parameters (valid); gap: held-out - training-split loss of the "
           f"final parameters"]
  header = f"{'study':<8} {'config':<16} {'params':>8} {'adam lr':>8} {'mean':>6} {'final':>8} {'valid':>6} " \
           f"{'gap ' + label[:8]:>14} {'gap adam':>9}"
  lines += [header, "-" * len(header)]
  for study, names in result["studies"].items():
    for name in names:
      r = result["configs"][name]
      diverged = sum(r["learned"]["per_seed"]["diverged"])
      lines.append(f"{study:<8} {name:<16} {r['num_params']:>8,} {r['adam']['hyperparameters']['learning_rate']:>8.2g} "
                   f"{_num(r['ratio']['mean_loss']):>6} {_num(r['ratio']['final_loss']):>8} "
                   f"{_num(r['ratio']['end_valid_loss']):>6} "
                   f"{_num(r['learned']['gap']):>14} {_num(r['adam']['gap']):>9}"
                   + (f"  ({diverged} seed(s) diverged)" if diverged else ""))
  if "xy" in result:
    xy = result["xy"]
    lines.append(f"1/2 (x - y)^2, {xy['steps']} steps, {len(xy['adam']['starts'])} starts: mean final distance to "
                 f"the origin / the line / the nearest minimum; along (1 nearest minimum, 0 origin)")
    for key in ("adam", *(f"learned_{layout}" for layout in XY_LAYOUTS)):
      r = xy[key]
      lines.append(f"  {key:<16} {_num(r['mean_origin']):>6} / {_num(r['mean_line']):>8} / "
                   f"{_num(r['mean_projection']):>6}; along {_num(r['mean_along'])}")
  return "\n".join(lines)


def run_study(optimizer: str, out: Path, *, quick: bool = False, seeds: int | None = None,
              base_horizon: int | None = None, studies: dict | None = None, learning_rates=LEARNING_RATES,
              xy_steps: int = XY_STEPS, xy_starts=XY_STARTS, lanes: int = bm.LANES, cache: Path | None = None,
              say=print) -> dict:
  """Runs every configuration and the (x, y) study, writes OUT/general_study.json and the figures; returns the
  JSON's content. ``studies`` (``study_configs``' form) overrides the configurations (tests)."""
  import lopt
  trained = lopt.load(optimizer)
  path = Path(trained.path)
  label = path.parent.name if path.name == "optimizer" else path.name
  identity = {"architecture": trained.optimizer.config(), "sha256": trained.config.get("weights_sha256")}
  seeds = seeds or (QUICK_SEEDS if quick else SEEDS)
  base_horizon = base_horizon or (QUICK_BASE_HORIZON if quick else BASE_HORIZON)
  studies = studies or study_configs(base_horizon)
  started = time.perf_counter()
  say(f"general study of {label} ({path}); {seeds} seed(s), base horizon {base_horizon} -> {out}")
  configs = {}
  for c in unique_configs(studies):
    configs[config_name(c)] = run_config(c, trained, seeds=seeds, learning_rates=learning_rates, lanes=lanes,
                                         cache=cache, identity=identity, say=say)
  xy = xy_study(trained, xy_steps, xy_starts, learning_rates, say=say) if xy_steps else None
  result = bm.clean({
      "format": FORMAT, "format_version": FORMAT_VERSION,
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "machine": bm.machine(),
      "optimizer": {"name": optimizer, "label": label, "path": str(path), **identity},
      "settings": {"quick": quick, "seeds": seeds, "base_horizon": base_horizon, "data": DATA,
                   "train_rows": TRAIN_ROWS, "base_width": BASE_WIDTH, "depth": DEPTH, "activation": ACTIVATION,
                   "base_batch": BASE_BATCH, "adam_learning_rates": list(learning_rates),
                   "tuning_seed": bm.TUNING_SEED, "evaluation_seed": bm.EVALUATION_SEED,
                   "valid_every": bm.VALID_EVERY, "final_fraction": bm.FINAL_FRACTION,
                   "xy_steps": xy_steps, "xy_layouts": list(XY_LAYOUTS)},
      "studies": {study: [config_name(c) for c in rows] for study, rows in studies.items()},
      "configs": configs, **({"xy": xy} if xy else {})})
  result["seconds"] = round(time.perf_counter() - started, 1)
  out.mkdir(parents=True, exist_ok=True)
  for study, names in result["studies"].items():
    ratio_figure(study, [configs[n] for n in names], label, out / f"general_study_{study}.png")
  gap_figure(configs, label, out / "general_study_gap.png")
  if xy:
    xy_figure(xy, label, out / "general_study_xy.png")
  atomic_write_json(out / "general_study.json", result)
  return result


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--optimizer", default="general", help="learned optimizer: a shipped name or a path")
  parser.add_argument("--out", type=Path, default=Path("docs/images"), help="figures and general_study.json")
  parser.add_argument("--quick", action="store_true", help=f"smoke run: {QUICK_SEEDS} seed, base horizon "
                      f"{QUICK_BASE_HORIZON} (horizons {', '.join(str(m * QUICK_BASE_HORIZON) for m in HORIZONS)})")
  parser.add_argument("--seeds", type=int, help=f"evaluation (and tuning) seeds per configuration (default {SEEDS})")
  parser.add_argument("--base-horizon", type=int, help=f"steps of the width and batch studies (default "
                      f"{BASE_HORIZON})")
  parser.add_argument("--xy-steps", type=int, default=XY_STEPS, help="steps of the 1/2 (x - y)^2 study (0: skip)")
  parser.add_argument("--lanes", type=int, default=bm.LANES, help="unrolls per vmapped call")
  parser.add_argument("--cache", type=Path, help="keep each finished (configuration, optimizer) under CACHE/cache/ "
                      "and reuse it on a rerun")
  args = parser.parse_args(argv)
  for name in ("seeds", "base_horizon", "lanes"):
    value = getattr(args, name)
    if value is not None and value < 1:
      parser.error(f"--{name.replace('_', '-')} must be positive")
  result = run_study(args.optimizer, args.out, quick=args.quick, seeds=args.seeds, base_horizon=args.base_horizon,
                     xy_steps=args.xy_steps, lanes=args.lanes, cache=args.cache)
  print(summary_text(result))
  print(f"{result['seconds']:.0f} s; wrote {args.out / 'general_study.json'} and the general_study_*.png figures")
  return 0


if __name__ == "__main__":
  sys.exit(main())
