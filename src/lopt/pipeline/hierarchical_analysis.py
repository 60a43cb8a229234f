"""``lopt analyze`` on a hierarchical optimizer: run it on test problems, record its per-tensor LSTM, and hand the
records and the LSTM's weights to ``lopt.dynamics.hierarchical`` (the analyses, pure) and
``lopt.report.hierarchical_figures`` (the figures). Writes ``hierarchical.json`` and four PNGs.

One jitted rollout per problem (vmap over problems) runs the real run -- the real training loss every step, the
real validation loss every ``valid_every`` steps (as meta-training feeds it), the horizon hint -- and records per
step the loss, each tensor's LSTM input vector (``HierarchicalOptimizer.lstm_inputs``), its LSTM state before the
step, its log step and its effective log step (``effective_log_steps``). Alongside, three more optimizer states
("branches") see the same gradients and parameters but are fed other losses:

- ``flat`` / ``rising``: as the run until ``branch_step``, then synthetic losses: the training loss falling
  TRAIN_FALL per step from its recent real value (an EMA), the validation loss fed every ``valid_every`` steps,
  flat at its last real value (the training loss's EMA for a task without one) or rising VALID_RISE per
  measurement;
- ``none``: no validation loss ever (from the first step), the same training losses as ``flat``.

The branches do not move the parameters (they follow the run's), so their differences are the controller's reaction
to the losses fed, not the divergence of separate trajectories.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lopt.errors import UserError
from lopt.io.checkpoint import atomic_write_bytes, read_json

MAX_STEPS = 1000          # recorded steps at most (the horizon when shorter)
CONTINUATION_STEPS = 100  # steps after the branch point (10 validation measurements at valid_every 10)
VALID_RISE = 0.01         # the rising validation loss: +1% per measurement
TRAIN_FALL = 0.001        # the synthetic training loss: -0.1% per step
DEFAULT_VALID_EVERY = 10  # meta-training's default (estimators' valid_every)
ANCHOR_DECAY = 0.9        # the synthetic training loss starts from this EMA of the real one (about 10 steps)
NUM_SEEDS = 128           # fixed-point seeds: visited LSTM states
ANALYSIS_SEED = 30_000    # test problems: lopt.pipeline.analyze's stream (distinct from training and evaluation)
BRANCHES = ("flat", "rising", "none")
FIGURES = ("hierarchical_inputs", "hierarchical_controller", "hierarchical_schedule", "hierarchical_validation")
KINDS = ("scalar", "vector", "matrix")  # tensors by rank: 0, 1, >= 2


def is_hierarchical(optimizer) -> bool:
  from lopt.architectures.hierarchical.optimizer import HierarchicalOptimizer
  return isinstance(optimizer, HierarchicalOptimizer)


def training_settings(source: str | Path | None) -> dict:
  """{"horizon": the run's horizon override or None, "valid_every": how often meta-training fed the validation
  loss or None} from a run directory's config.json or a saved optimizer's training info (None where unknown)."""
  config = None
  if source is not None:
    source = Path(source)
    if (source / "config.json").is_file() and (source / "optimizer").is_dir():
      config = read_json(source / "config.json", "run config")
    elif (source / "config.json").is_file():
      config = (read_json(source / "config.json", "optimizer config").get("info") or {}).get("training")
  if not isinstance(config, dict):
    return {"horizon": None, "valid_every": None}
  task, estimator = config.get("task"), config.get("estimator")
  # The optimizers shipped with lopt 0.1 record a flat config: the task's name and the horizon at the top level.
  horizon = task.get("horizon") if isinstance(task, dict) else config.get("horizon")
  return {"horizon": horizon, "valid_every": estimator.get("valid_every") if isinstance(estimator, dict) else None}


def tensor_table(task) -> list[dict]:
  """Name (key path), shape, size and kind of each parameter tensor of one problem, in tree order."""
  shapes = jax.eval_shape(task.init, jax.random.key(0))
  rows = []
  for path, leaf in jax.tree_util.tree_flatten_with_path(shapes)[0]:
    shape = tuple(int(d) for d in leaf.shape)
    rows.append({"name": jax.tree_util.keystr(path, simple=True, separator="/"), "shape": list(shape),
                 "size": int(np.prod(shape)) if shape else 1, "kind": KINDS[min(len(shape), 2)]})
  return rows


def controls(num_steps: int, branch_step: int, valid_every: int, has_valid: bool) -> dict:
  """What each branch is fed, per branch (flat, rising, none) and step (B, T): train_factor (NaN: the real loss;
  else the last real loss before the branch times it), valid_code (0: none, 1: the real validation loss, 2:
  synthetic) and valid_factor (the synthetic validation loss over the last real one); and the run's own valid_code
  (T,) (the real validation loss every ``valid_every`` steps, when the task has one)."""
  steps = np.arange(num_steps)
  after = steps - branch_step
  measured = (steps % valid_every == 0).astype(np.int32) * (1 if has_valid else 0)
  fed_after = (after >= 0) & (after % valid_every == 0)
  train = np.full((len(BRANCHES), num_steps), np.nan)
  code = np.zeros((len(BRANCHES), num_steps), np.int32)
  factor = np.ones((len(BRANCHES), num_steps))
  for b, name in enumerate(BRANCHES):
    train[b] = np.where(after >= 0, (1 - TRAIN_FALL) ** (after + 1), np.nan)
    if name == "none":
      continue
    code[b] = np.where(after >= 0, 2 * fed_after, measured)
    if name == "rising":
      factor[b] = (1 + VALID_RISE) ** (np.maximum(after, 0) // valid_every + 1)
  return {"train_factor": train, "valid_code": code, "valid_factor": factor, "run_valid_code": measured}


def record_runs(task, optimizer, theta, keys, *, num_steps: int, horizon: int, valid_every: int,
                branch_step: int) -> dict:
  """Runs every problem of ``keys`` (the real run) and, alongside, the branches' optimizer states on the same
  gradients and parameters. Returns numpy arrays with leading axes (P, T): "loss" (the training loss before each
  update), "fed_valid" (NaN: none), "inputs" (n, F), "h", "c" (n, L) before the update, "log_step",
  "effective_log_step" (n,) after it; and per branch "branch_fed_train", "branch_fed_valid" (B,),
  "branch_effective_log_step" (B, n)."""
  plan = controls(num_steps, branch_step, valid_every, task.valid_loss is not None)
  nan = jnp.asarray(jnp.nan, jnp.float32)

  def rollout(key):
    loss_of = task.bind(key)
    params = task.init(key)
    state = optimizer.init_state(theta, params)
    shadows = jax.tree.map(lambda x: jnp.stack([x] * len(BRANCHES)), state)

    def body(carry, xs):
      params, state, shadows, anchor_train, anchor_valid = carry
      t, run_code, train_factor, valid_code, valid_factor = xs
      loss, grads = jax.value_and_grad(loss_of)(params, t)
      loss = loss.astype(jnp.float32)
      wanted = (run_code == 1) | jnp.any(valid_code == 1)
      if task.valid_loss is not None:
        real_valid = jax.lax.cond(wanted, lambda: task.valid_loss(params, key, t).astype(jnp.float32), lambda: nan)
      else:
        real_valid = nan
      before = t < branch_step
      # The synthetic losses start from a smoothed training loss (an EMA of its log, not one noisy minibatch).
      smoothed = jnp.where(jnp.isfinite(anchor_train), ANCHOR_DECAY * jnp.log(anchor_train)
                           + (1 - ANCHOR_DECAY) * jnp.log(jnp.maximum(loss, 1e-30)), jnp.log(loss))
      anchor_train = jnp.where(before, jnp.exp(smoothed), anchor_train)
      anchor_valid = jnp.where(before & (run_code == 1) & jnp.isfinite(real_valid), real_valid, anchor_valid)
      run_valid = jnp.where(run_code == 1, real_valid, nan)
      hints = {"loss": loss, "valid_loss": run_valid, "num_steps": horizon}
      inputs = optimizer.lstm_inputs(theta, state, grads, params, **hints)
      h, c = state.tensors.h.astype(jnp.float32), state.tensors.c.astype(jnp.float32)
      updates, state = optimizer.update(theta, state, grads, params, **hints)
      log_step = state.tensors.log_step
      effective = optimizer.effective_log_steps(theta, state, horizon)
      # The branches: the same gradients and parameters, other losses fed.
      fed_train = jnp.where(jnp.isfinite(train_factor), anchor_train * train_factor, loss)
      base = jnp.where(jnp.isfinite(anchor_valid), anchor_valid, anchor_train)
      fed_valid = jnp.where(valid_code == 1, real_valid, jnp.where(valid_code == 2, base * valid_factor, nan))

      def shadow(st, fed_loss, fed_valid_loss):
        st = optimizer.update(theta, st, grads, params, loss=fed_loss, valid_loss=fed_valid_loss,
                              num_steps=horizon)[1]
        return st, optimizer.effective_log_steps(theta, st, horizon)

      shadows, shadow_effective = jax.vmap(shadow)(shadows, fed_train, fed_valid)
      record = (loss, run_valid, inputs, h, c, log_step.astype(jnp.float32), effective, fed_train, fed_valid,
                shadow_effective)
      return (optax.apply_updates(params, updates), state, shadows, anchor_train, anchor_valid), record

    xs = (jnp.arange(num_steps), jnp.asarray(plan["run_valid_code"]), jnp.asarray(plan["train_factor"].T, jnp.float32),
          jnp.asarray(plan["valid_code"].T), jnp.asarray(plan["valid_factor"].T, jnp.float32))
    return jax.lax.scan(body, (params, state, shadows, nan, nan), xs)[1]

  records = jax.jit(jax.vmap(rollout))(keys)
  names = ("loss", "fed_valid", "inputs", "h", "c", "log_step", "effective_log_step", "branch_fed_train",
           "branch_fed_valid", "branch_effective_log_step")
  return {name: np.asarray(value) for name, value in zip(names, records)}


def _seeds(states: np.ndarray, count: int, seed: int = 0) -> np.ndarray:
  """(count, 2L): zeros (the initial state), then distinct visited states (a random subset; repeated when there are
  fewer: every search then has the same shape and reuses one compilation)."""
  states = np.unique(states[np.all(np.isfinite(states), axis=1)], axis=0)
  rng = np.random.default_rng(seed)
  if len(states) > count - 1:
    states = states[rng.choice(len(states), count - 1, replace=False)]
  elif len(states):
    states = states[np.resize(rng.permutation(len(states)), count - 1)]
  else:
    states = np.zeros((count - 1, states.shape[1]))
  return np.concatenate([np.zeros((1, states.shape[1])), states])


def analyze_hierarchical(optimizer, theta, task, out: str | Path, *, num_problems: int, horizon: int | None = None,
                         valid_every: int | None = None, num_steps: int | None = None, num_seeds: int = NUM_SEEDS,
                         seed: int = ANALYSIS_SEED, progress=None) -> dict:
  """Records real runs and reverse-engineers the per-tensor LSTM; writes ``out/hierarchical.json`` and the
  figures; returns the condensed numbers (for summary.json and the report).

  Args:
    horizon: the horizon hint (num_steps=) given to the optimizer (default: the task's).
    valid_every: validation loss fed every this many steps (default: meta-training's, else 10).
    num_steps: recorded steps (default: the horizon, at most MAX_STEPS).
    num_seeds: fixed-point seeds per search.
    seed: the stream of test problems (``lopt.evaluation.compare.problem_keys``).
  """
  from lopt.architectures.hierarchical.optimizer import time_features
  from lopt.dynamics import hierarchical as hd
  from lopt.evaluation.compare import problem_keys
  from lopt.report import hierarchical_figures as figs
  from lopt.report.figures import to_png
  from lopt.report.findings import hierarchical_findings
  say = progress or (lambda message: None)
  started = time.perf_counter()
  out = Path(out)
  horizon = int(horizon or task.horizon)
  valid_every = int(valid_every or DEFAULT_VALID_EVERY)
  num_steps = int(num_steps or min(horizon, MAX_STEPS))
  branch_step = max(1, num_steps // 2)
  total_steps = max(num_steps, branch_step + CONTINUATION_STEPS)
  tensors = tensor_table(task)
  names = optimizer.lstm_input_names()

  say(f"hierarchical: recording the per-tensor LSTM on {num_problems} {task.name} problems over {total_steps} steps "
      f"(real run; flat / rising / no validation loss after step {branch_step})")
  records = record_runs(task, optimizer, theta, problem_keys(seed, num_problems), num_steps=total_steps,
                        horizon=horizon, valid_every=valid_every, branch_step=branch_step)
  run = records
  finite = np.all(np.isfinite(run["effective_log_step"][:, :num_steps]), axis=(1, 2)) & np.all(
      np.isfinite(run["h"][:, :num_steps]), axis=(1, 2, 3))
  if not np.any(finite):
    raise UserError(f"the hierarchical optimizer's states became non-finite on every {task.name} problem; nothing "
                    f"to analyze")

  # 1. Typical inputs, by kind of tensor; the main kind holds the most parameters.
  kinds = {kind: [i for i, t in enumerate(tensors) if t["kind"] == kind] for kind in KINDS}
  kinds = {kind: index for kind, index in kinds.items() if index}
  main = max(kinds, key=lambda kind: sum(tensors[i]["size"] for i in kinds[kind]))
  inputs = run["inputs"][finite, :num_steps]           # (P, T, n, F)
  states = np.concatenate([run["h"], run["c"]], axis=-1)[finite, :num_steps]  # (P, T, n, 2L)

  def by_kind(array, kind):  # (P, T, n, ...) -> (T, P * n_kind, ...)
    chosen = np.moveaxis(array[:, :, kinds[kind]], 0, 1)
    return chosen.reshape(chosen.shape[0], -1, *chosen.shape[3:])

  typical = {kind: hd.typical_inputs(by_kind(inputs, kind)) for kind in kinds}
  x_star = typical[main]["median"]

  say("hierarchical: fixed points of the LSTM at typical inputs, linearization, the log step's equilibria")
  controller = hd.controller_from_theta(theta, names, optimizer.max_log_step)
  cell, closed = hd.maps(controller)
  with jax.enable_x64(True):
    seeds = {kind: _seeds(by_kind(states, kind).reshape(-1, states.shape[-1]).astype(np.float64), num_seeds)
             for kind in kinds}
    analysis = hd.fixed_point_analysis(controller, cell, x_star, seeds[main])
    at_inputs = {f"{main}, {phase}": hd.fixed_point_analysis(controller, cell, x, seeds[main])
                 for phase, x in typical[main]["phases"].items()}
    at_inputs.update({kind: hd.fixed_point_analysis(controller, cell, typical[kind]["median"], seeds[kind])
                      for kind in kinds if kind != main})
    start = analysis["fixed"].points[analysis["best"]] if analysis["best"] is not None else seeds[main][0]
    curve = hd.drift_curve(controller, cell, x_star, start)
    equilibria = hd.log_step_equilibria(controller, closed, cell, x_star, curve)

    # 3. The autonomous schedule: statistics and losses held at x*, time advancing (or frozen at the first step).
    times = np.asarray(jax.vmap(lambda t: time_features(t, horizon))(jnp.arange(1, horizon + 1)), np.float64)
    drive = np.repeat(x_star[None], horizon, axis=0)
    drive[:, list(controller.time_index)] = times
    frozen = np.repeat(x_star[None], horizon, axis=0)
    frozen[:, list(controller.time_index)] = times[0]
    autonomous = {"time": hd.controller_trajectory(controller, closed, drive),
                  "frozen": hd.controller_trajectory(controller, closed, frozen)}

  step_scale = float(optimizer.step_scale)
  schedule = hd.step_size_schedule(run["effective_log_step"][finite, :num_steps], step_scale)
  schedule_term = times[:num_steps] @ controller.schedule
  response_steps = slice(branch_step, branch_step + CONTINUATION_STEPS)
  branches = {name: records["branch_effective_log_step"][finite, response_steps, b]
              for b, name in enumerate(BRANCHES)}
  response = hd.validation_response(branches, step_scale)
  highlighted = _highlighted(tensors)

  results = {"tensors": tensors, "main_kind": main, "kinds": kinds, "names": names, "typical": typical,
             "fixed": analysis, "fixed_at": at_inputs, "curve": curve, "equilibria": equilibria,
             "autonomous": autonomous, "schedule": schedule, "schedule_term": schedule_term, "response": response,
             "highlighted": highlighted, "step_scale": step_scale, "branch_step": branch_step,
             "log_step_limit": controller.log_step_limit,
             "fed": {name: {"train": records["branch_fed_train"][finite][0, :, b],
                            "valid": records["branch_fed_valid"][finite][0, :, b]} for b, name in enumerate(BRANCHES)},
             "num_steps": num_steps, "horizon": horizon, "valid_every": valid_every}
  say("hierarchical: drawing figures")
  written = []
  for name, draw in zip(FIGURES, (figs.inputs_figure, figs.controller_figure, figs.schedule_figure,
                                  figs.validation_figure)):
    atomic_write_bytes(out / f"{name}.png", to_png(draw(results)))
    written.append(f"{name}.png")

  full = numbers(results)
  full["settings"] = {"task": task.name, "num_problems": num_problems, "finite_problems": int(np.sum(finite)),
                      "num_steps": num_steps, "horizon": horizon, "valid_every": valid_every,
                      "branch_step": branch_step, "continuation_steps": CONTINUATION_STEPS,
                      "valid_rise_per_measurement": VALID_RISE, "train_fall_per_step": TRAIN_FALL,
                      "fixed_point_seeds": num_seeds, "step_scale": step_scale, "figures": written,
                      "seconds": round(time.perf_counter() - started, 1)}
  summary = condensed(full)
  summary["findings"] = full["findings"] = hierarchical_findings(summary)
  for line in summary["findings"]:
    say(f"hierarchical: {line}")
  atomic_write_bytes(out / "hierarchical.json", json.dumps(full, indent=1).encode())
  return summary


def _highlighted(tensors: list[dict]) -> list[int]:
  """Up to three tensors to draw: the largest, the median-sized and the smallest."""
  order = sorted(range(len(tensors)), key=lambda i: (tensors[i]["size"], i))
  return list(dict.fromkeys([order[-1], order[len(order) // 2], order[0]]))


# -- numbers -----------------------------------------------------------------------------------------------------------

def _fixed_numbers(analysis: dict) -> dict:
  fixed = analysis["fixed"]
  out = {"seeds": int(len(fixed.seed_speeds)), "distinct": int(len(fixed.points)),
         "converged": int(np.sum(fixed.converged)), "slow": int(np.sum(fixed.slow)),
         "stable": int(np.sum(fixed.stable)), "outliers": int(np.sum(fixed.outlier)),
         "failed_seeds": int(np.sum(fixed.assignment < 0)), "speeds": fixed.speeds[:20],
         "max_abs_eigenvalue": fixed.max_abs_eigenvalue[:20], "counts": fixed.counts[:20],
         "drifts": analysis["drifts"][:20], "best": analysis["best"], "tolerance": fixed.tolerance}
  if analysis["best"] is not None:
    point = fixed.points[analysis["best"]]
    half = len(point) // 2
    out["best_point"] = {"h": point[:half], "c": point[half:], "norm": float(np.linalg.norm(point))}
  return out


def _best_drift(analysis: dict | None):
  return None if analysis is None or analysis["best"] is None else float(analysis["drifts"][analysis["best"]])


def numbers(results: dict) -> dict:
  """Everything ``analyze_hierarchical`` measured, JSON-ready (hierarchical.json)."""
  from lopt.dynamics.hierarchical import TOP_EIGENVALUES as top_count
  from lopt.dynamics.schedule import schedule_shape
  from lopt.dynamics.summary import _clean
  names = results["names"]
  main = results["main_kind"]
  typical = results["typical"]
  out = {"tensors": results["tensors"], "main_kind": main, "input_names": names}
  out["typical_inputs"] = {kind: {"median": t["median"], "quartiles": t["quartiles"], "phases": t["phases"],
                                  "phase_steps": t["phase_steps"], "tensors": len(results["kinds"][kind])}
                           for kind, t in typical.items()}
  t = typical[main]
  change = (t["phases"]["late"] - t["phases"]["early"]) / np.maximum(t["spread"], 1e-6)
  statistics = [i for i, name in enumerate(names) if not name.startswith("time_")]  # time moves by construction
  out["typical_inputs"]["largest_changes"] = [
      {"feature": names[i], "early": t["phases"]["early"][i], "late": t["phases"]["late"][i],
       "change_in_spreads": change[i]} for i in sorted(statistics, key=lambda i: -abs(change[i]))[:6]]
  fixed = {"typical": _fixed_numbers(results["fixed"])}
  fixed.update({name: _fixed_numbers(a) for name, a in results["fixed_at"].items()})
  out["fixed_points"] = fixed
  linear = results["fixed"]["linearization"]
  if linear is not None:
    effect = linear["steady_gain"] * t["spread"]
    gains = [{"feature": names[i], "immediate": linear["immediate_gain"][i], "steady": linear["steady_gain"][i],
              "spread": t["spread"][i], "steady_times_spread": effect[i]} for i in range(len(names))]
    top = sorted(gains, key=lambda g: -abs(g["steady_times_spread"]))
    log_step = names.index("log_step")
    # Which inputs' change from the early to the late third moves the drift (linearly, at the main fixed point).
    shift = linear["steady_gain"] * (t["phases"]["late"] - t["phases"]["early"])
    fixed_early, fixed_late = results["fixed_at"].get(f"{main}, early"), results["fixed_at"].get(f"{main}, late")
    out["linearization"] = {
        "eigenvalues": [complex(v) for v in linear["eigenvalues"][:top_count]],
        "abs_eigenvalues": np.abs(linear["eigenvalues"][:top_count]),
        "time_constants": linear["time_constants"][:top_count], "spectral_radius": linear["spectral_radius"],
        "drift": linear["drift"], "gains": gains, "top_gains": top[:8],
        # d(drift)/d(log step): the input column is log_step / limit.
        "log_step_feedback": linear["steady_gain"][log_step] / results["log_step_limit"],
        "phase_attribution": {
            "predicted_change": float(np.sum(shift)),
            "drift_early": _best_drift(fixed_early), "drift_late": _best_drift(fixed_late),
            "top": [{"feature": names[i], "change": shift[i]} for i in np.argsort(-np.abs(shift))[:6]]}}
  curve = results["curve"]
  out["log_step_equilibria"] = {"grid": curve["log_step"], "drift": curve["drift"],
                                "equilibria": results["equilibria"]}
  schedule = results["schedule"]
  out["schedule"] = {
      "real": {k: v for k, v in schedule.items() if k not in ("per_tensor", "median", "per_tensor_shape")},
      "real_median": schedule["median"][:: max(1, len(schedule["median"]) // 200)],
      "per_tensor": [{"tensor": results["tensors"][i]["name"], **shape}
                     for i, shape in enumerate(schedule["per_tensor_shape"])],
      "schedule_term": {"initial": results["schedule_term"][0], "final": results["schedule_term"][-1],
                        "min": np.min(results["schedule_term"]), "max": np.max(results["schedule_term"]),
                        "factor_final_over_initial": float(np.exp(results["schedule_term"][-1]
                                                                  - results["schedule_term"][0]))},
      "autonomous": {}}
  step_scale = results["step_scale"]
  for name, trajectory in results["autonomous"].items():
    rate = step_scale * np.exp(trajectory["effective_log_step"])
    out["schedule"]["autonomous"][name] = {**schedule_shape(rate),
                                           "final_log_step": trajectory["log_step"][-1],
                                           "final_schedule_term": trajectory["schedule_term"][-1]}
  time_rate = out["schedule"]["autonomous"]["time"]["final"]
  frozen_rate = out["schedule"]["autonomous"]["frozen"]["final"]
  out["schedule"]["autonomous"]["time_effect_at_horizon"] = time_rate / frozen_rate if frozen_rate else None
  response = results["response"]
  out["validation"] = {
      "branch_step": results["branch_step"], "steps": CONTINUATION_STEPS,
      "ratio_median": response["final_ratio_median"],
      "ratio_at_branch_median": {name: float(np.exp(np.median(r[0]))) for name, r in response["log_ratio"].items()},
      "ratio_per_tensor": {name: {results["tensors"][i]["name"]: r for i, r in enumerate(ratios)}
                           for name, ratios in response["final_ratio"].items()},
      "ratio_range": {name: [np.min(r), np.max(r)] for name, r in response["final_ratio"].items()}}
  return _clean(out)


def condensed(full: dict) -> dict:
  """The numbers the report's paragraphs need (summary.json's "hierarchical")."""
  keep = {"settings", "main_kind", "validation"}
  out = {k: v for k, v in full.items() if k in keep}
  out["fixed_points"] = {name: {k: v for k, v in f.items() if k not in ("best_point",)}
                         for name, f in full["fixed_points"].items()}
  if "linearization" in full:
    out["linearization"] = {k: v for k, v in full["linearization"].items() if k != "gains"}
  out["log_step_equilibria"] = full["log_step_equilibria"]["equilibria"]
  out["largest_input_changes"] = full["typical_inputs"]["largest_changes"]
  out["schedule"] = {k: v for k, v in full["schedule"].items() if k not in ("per_tensor", "real_median")}
  return out
