"""``lopt reproduce``: the paper's results regenerated from the shipped (or retrained) optimizers, offline.

For each task: take the shipped optimizer (``lopt.pretrained``) or meta-train one with its shipped training config,
tune the baselines, evaluate everything on the same fresh problems, run every dynamics analysis, and write
``DIR/TASK/{comparison,analysis}/``. Then one self-contained ``DIR/reproduce.html`` with the paper's figure set for
every task, and the findings table as ``DIR/findings.json`` and ``DIR/findings.md``.

Baseline tuning on a 2-core CPU. The full grid (25 learning rates x the beta-type grids, 375 candidates in all, on
32 problems) takes seconds on linear regression and Rosenbrock but hours on the network tasks (SGD's 25 candidates
alone: ~190 s on two moons, ~360 s on the digits CNN). ``--tuning auto`` therefore tunes the quadratic-like tasks on
the full grid and, on the network tasks, re-tunes each baseline's learning rate locally around the shipped optimum
(found with the full grid on the GPU, recorded in the optimizer's ``info``): a check that it is still the optimum.
"""

from __future__ import annotations

import functools
import json
import time
from pathlib import Path

import numpy as np

from lopt.errors import UserError
from lopt.report.findings import PAPER, findings_markdown  # noqa: F401 (PAPER: re-export)

TASKS = ("linear_regression", "rosenbrock", "two_moons", "digits_cnn")
NETWORK_TASKS = ("two_moons", "digits_cnn")  # thousands of parameters: slow to tune on a CPU, big states, and
                                             # evaluated one problem at a time (faster on a CPU, see problem_runner)
TUNING_MODES = ("auto", "full", "local", "shipped")
BASELINES = ("sgd", "momentum", "rmsprop", "adam")

LOCAL_DECADES = 0.5            # local re-tuning: learning rates within this many decades of the shipped optimum ...
LOCAL_STEPS_PER_DECADE = 4     # ... on the full grid's spacing (4 per decade): 5 points
LOCAL_TUNING_PROBLEMS = 8      # tuning problems for the local check (the full grid uses 32)
FULL_TUNING_PROBLEMS = 32

# Analysis sizes (ours). The fixed-point searches dominate: their Newton polishing costs O(seeds H^3) per iteration,
# and the adaptation sweep runs 30 of them, so `lopt analyze`'s 1024 seeds (256 per g*) take well over ten minutes
# per 256-unit optimizer on a 2-core CPU. The sweep continues each point from the previous g*, so few seeds suffice.
# Network tasks keep 512 random coordinates per problem so the (T, coordinates, H) states stay small (8,577
# parameters x 200 steps x 64 units would be 440 MB per problem).
ANALYSIS_PROBLEMS = {"default": 4, "network": 2}
ANALYSIS_COORDINATES = 512
ANALYSIS_SEEDS = 32
ADAPTATION_SEEDS = 4



def _say(progress, message: str) -> None:
  if progress is not None:
    progress(message)


# -- the optimizer of a task -----------------------------------------------------------------------------------------

def check_tasks(names) -> list[str]:
  """The tasks to run (all four when none named); UserError for an unknown or repeated name."""
  names = list(names) or list(TASKS)
  unknown = [n for n in names if n not in TASKS]
  if unknown:
    raise UserError(f"unknown task {', '.join(map(repr, unknown))}; choose from: {', '.join(TASKS)}")
  if len(set(names)) != len(names):
    raise UserError(f"a task is named twice: {' '.join(names)}")
  return names


def learned_optimizer(name: str, out: Path, retrain: bool, progress=None):
  """(optimizer, theta, info, source): the shipped optimizer, or one meta-trained into ``out/name/run``."""
  from lopt import pretrained
  from lopt.io.checkpoint import load_optimizer
  optimizer, theta, config = pretrained.load(name)
  info = config["info"]
  if not retrain:
    return optimizer, theta, info, f"shipped (lopt.pretrained {name!r})"
  from lopt.meta.config import MetaTrainConfig
  from lopt.meta.train import meta_train
  from lopt.progress import training_bar
  training = MetaTrainConfig.from_dict(info["training"])
  run_dir = out / name / "run"
  resume = (run_dir / "config.json").exists()  # a killed --retrain continues where it stopped
  if name in NETWORK_TASKS:
    _say(progress, f"warning: meta-training {name} on a CPU is slow (the shipped run took "
                   f"{info['compute']['training_seconds']} s on an H100)")
  _say(progress, f"meta-training {name} for {training.num_steps} outer steps -> {run_dir}")
  with training_bar(training.num_steps, f"meta-training {name}") as update:
    meta_train(training, run_dir, resume=resume, progress=update)
  optimizer, theta, _ = load_optimizer(run_dir)
  return optimizer, theta, info, f"retrained ({run_dir})"


def task_for(info: dict):
  """The task the optimizer was trained (and is evaluated) on, from its shipped training config."""
  from lopt.meta.config import MetaTrainConfig
  from lopt.meta.train import task_from
  return task_from(MetaTrainConfig.from_dict(info["training"]))


# -- baselines -------------------------------------------------------------------------------------------------------

def tuning_mode(name: str, requested: str) -> str:
  """The tuning actually used on task ``name``: ``auto`` means full on the small tasks, local on network tasks."""
  if requested != "auto":
    return requested
  return "local" if name in NETWORK_TASKS else "full"


def local_candidates(shipped: dict) -> dict:
  """Learning rates within ±LOCAL_DECADES of the shipped optimum (same spacing as the full grid), other
  hyperparameters kept at their shipped values."""
  offsets = np.arange(-LOCAL_DECADES, LOCAL_DECADES + 1e-9, 1.0 / LOCAL_STEPS_PER_DECADE)
  rates = shipped["learning_rate"] * 10.0**offsets
  return {k: (rates if k == "learning_rate" else np.full(rates.shape, v)) for k, v in shipped.items()}


def compare_task(task, learned, info: dict, mode: str, num_eval_problems: int, progress=None) -> dict:
  """Tunes the baselines as ``mode`` says and evaluates them and ``learned`` (optax) on the evaluation problems.

  Returns the structure of ``lopt.evaluation.compare.compare`` with ``settings["tuning_mode"]`` and the shipped
  full-grid tuning (budget and hyperparameters) added.
  """
  from lopt.evaluation import compare as evaluate
  shipped_eval = info.get("evaluation", {})
  shipped = {n: shipped_eval.get("results", {}).get(n, {}).get("hyperparameters") for n in BASELINES}
  if mode == "full":
    comparison = evaluate.compare(task, {"learned": learned}, num_eval_problems=num_eval_problems,
                                  num_tuning_problems=FULL_TUNING_PROBLEMS, progress=progress)
  else:
    missing = [n for n, h in shipped.items() if not h]
    if missing:
      raise UserError(f"{task.name}: the shipped optimizer records no tuned {', '.join(missing)}; use --tuning full")
    comparison = _compare_from_shipped(task, learned, shipped, mode, num_eval_problems, progress)
  comparison["settings"].update({
      "tuning_mode": mode,
      "shipped_tuning": {"budget": shipped_eval.get("settings", {}).get("tuning_budget"),
                         "num_tuning_problems": shipped_eval.get("settings", {}).get("num_tuning_problems"),
                         "hyperparameters": shipped, "device": info.get("compute", {}).get("device")}})
  return comparison


def _compare_from_shipped(task, learned, shipped: dict, mode: str, num_eval_problems: int, progress) -> dict:
  """``compare`` with each baseline's hyperparameters from the shipped ones: as is (``shipped``) or re-tuned over
  the local learning-rate grid (``local``)."""
  from lopt.evaluation import compare as evaluate
  from lopt import baselines
  horizon = task.horizon
  eval_keys = evaluate.problem_keys(evaluate.EVALUATION_SEED, num_eval_problems)
  tuning_keys = evaluate.problem_keys(evaluate.TUNING_SEED, LOCAL_TUNING_PROBLEMS)
  one_at_a_time = bool(task.traits.get("network"))
  _say(progress, f"evaluating learned on {num_eval_problems} problems")
  results = {"learned": evaluate.evaluate_learned(task, learned, eval_keys, horizon, one_at_a_time=one_at_a_time)}
  tuning = {}
  for name in BASELINES:
    hyperparameters = shipped[name]
    # One compiled unroll per baseline (hyperparameters traced) for its re-tuning and its evaluation.
    runner = evaluate.problem_runner(task, functools.partial(baselines.build, name), horizon,
                                     one_at_a_time=one_at_a_time)
    if mode == "local":
      _say(progress, f"re-tuning {name}'s learning rate locally (5 rates around the shipped "
                     f"{hyperparameters['learning_rate']:.3g}, {LOCAL_TUNING_PROBLEMS} problems)")
      tuning[name] = evaluate.tune_baseline(task, name, tuning_keys, horizon,
                                            candidates=local_candidates(hyperparameters), runner=runner)
      tuning[name]["local_optimum_is_shipped"] = bool(
          np.isclose(tuning[name]["best"]["learning_rate"], hyperparameters["learning_rate"], rtol=1e-3))
      hyperparameters = tuning[name]["best"]
    _say(progress, f"evaluating {mode} {name} on {num_eval_problems} problems")
    results[name] = evaluate.evaluate_baseline(task, name, hyperparameters, eval_keys, horizon, runner=runner)
  evaluate.add_ranks(results)
  learning_rates = sorted({float(x) for t in tuning.values() for x in t["candidates"]["learning_rate"]})
  settings = {"task": task.name, "task_options": task.options, "horizon": horizon,
              "num_tuning_problems": LOCAL_TUNING_PROBLEMS if mode == "local" else 0,
              "tuning_seed": evaluate.TUNING_SEED, "num_eval_problems": num_eval_problems,
              "evaluation_seed": evaluate.EVALUATION_SEED, "learning_rates": learning_rates,
              "grids": {n: baselines.GRIDS[n] for n in BASELINES},
              "tuning_budget": {n: t["num_candidates"] * LOCAL_TUNING_PROBLEMS for n, t in tuning.items()}}
  return {"results": results, "tuning": tuning, "settings": settings}


# -- findings --------------------------------------------------------------------------------------------------------

def comparison_findings(comparison: dict) -> dict:
  """Learned vs each tuned baseline: normalized mean losses ± s.e., ratio, paired difference, verdict."""
  from lopt.evaluation.compare import paired_ratio, verdict
  results = comparison["results"]
  learned = results["learned"]
  rows = {}
  for name in BASELINES:
    base = results[name]
    paired = paired_ratio(learned, base)
    rows[name] = {"baseline": base["normalized_mean_loss"], "baseline_se": base["normalized_mean_loss_se"],
                  "hyperparameters": base.get("hyperparameters"), "ratio": paired["ratio"],
                  "difference": paired["difference"], "difference_se": paired["difference_se"],
                  "verdict": verdict(paired)}
  beaten = [n for n in ("momentum", "rmsprop", "adam") if rows[n]["verdict"] == "better"]
  status = "reproduced" if len(beaten) == 3 else "partly reproduced" if beaten else "did not reproduce"
  return {"learned": learned["normalized_mean_loss"], "learned_se": learned["normalized_mean_loss_se"],
          "baselines": rows, "num_eval_problems": learned["num_problems"], "status": status,
          "tuning_mode": comparison["settings"].get("tuning_mode", "full")}


def momentum_findings(summary: dict) -> dict:
  """Dominant momentum mode; on linear regression its distance from the optimal heavy ball's beta*."""
  momentum = summary.get("momentum")
  if not momentum:
    return {"beta": None, "time_constant": None, "status": "did not reproduce",
            "why": "no convergence fixed point found at g = 0"}
  out = {"beta": momentum["beta"], "beta_abs": momentum["beta_abs"], "time_constant": momentum["time_constant"],
         "weight_fraction": momentum["weight_fraction"]}
  heavy = momentum.get("heavy_ball")
  is_momentum = 0 < momentum["beta"] < 1 and abs(momentum.get("beta_angle") or 0.0) < 0.1
  if heavy:
    out["optimal_beta"] = heavy["optimal_beta"]
    close = abs(heavy["beta_difference"]) <= 0.05
    out["status"] = "reproduced" if close else "partly reproduced" if is_momentum else "did not reproduce"
    out["criterion"] = "|beta - beta*| <= 0.05 (reproduced); a real beta in (0, 1) elsewhere (partly)"
  else:
    out["status"] = "reproduced" if is_momentum and momentum["beta"] > 0.5 else \
        "partly reproduced" if is_momentum else "did not reproduce"
    out["criterion"] = "a real dominant beta in (0.5, 1) (reproduced); in (0, 0.5] (partly)"
  return out


def clipping_findings(summary: dict) -> dict:
  """The saturation threshold against the gradients seen: which fraction of them lies beyond it."""
  clipping = summary.get("clipping") or {}
  threshold, beyond = clipping.get("threshold"), clipping.get("fraction_beyond_threshold")
  out = {"threshold": threshold, "fraction_beyond_threshold": beyond, "range": clipping.get("limit"),
         "criterion": "saturates with 0 < fraction of seen gradients beyond the threshold < 0.5 (reproduced); "
                      "saturates but never or mostly active (partly)"}
  if threshold is None:
    out["status"] = "did not reproduce"
  elif beyond is not None and 0 < beyond < 0.5:
    out["status"] = "reproduced"
  else:
    out["status"] = "partly reproduced"
  return out


def schedule_findings(summary: dict) -> dict:
  """Shape of the autonomous alpha_eff schedule from h0."""
  schedule = summary.get("schedule") or {}
  out = {k: schedule.get(k) for k in ("shape", "initial", "peak", "peak_step", "final", "warmup_steps",
                                       "decay_ratio", "decay_half_life")}
  out["status"] = "did not reproduce" if out["shape"] in (None, "flat") else "reproduced"
  out["criterion"] = "a non-flat shape (warm-up and/or decay)"
  return out


def adaptation_findings(summary: dict) -> dict:
  """Whether alpha_eff at the fixed points h*(g*) falls with |g*| on both arms, and the RMSProp fit."""
  adaptation = summary.get("adaptation") or {}
  arms = adaptation.get("arms") or {}
  ratios = {}
  for name, arm in arms.items():
    alpha = [a for a in arm["alpha_eff"] if a is not None]
    ratios[name] = alpha[-1] / alpha[0] if len(alpha) >= 2 and alpha[0] else None
  falling = [r is not None and r < 0.8 for r in ratios.values()]
  fit = adaptation.get("rmsprop_fit")
  status = "reproduced" if falling and all(falling) else "partly reproduced" if any(falling) else "did not reproduce"
  return {"falls": adaptation.get("falls"), "alpha_ratio_largest_to_smallest": ratios,
          "rmsprop_fit_r2": fit.get("r2") if fit else None, "status": status,
          "criterion": "alpha_eff at the largest |g*| below 0.8x its value at the smallest, on both arms"}


def task_findings(comparison: dict, summary: dict) -> dict:
  return {"comparison": comparison_findings(comparison), "momentum": momentum_findings(summary),
          "clipping": clipping_findings(summary), "schedule": schedule_findings(summary),
          "adaptation": adaptation_findings(summary)}


# -- the whole run ---------------------------------------------------------------------------------------------------

def reproduce(tasks=(), *, out: str | Path = "lopt-reproduce", retrain: bool = False, eval_problems: int = 128,
              tuning: str = "auto", analysis_seeds: int = ANALYSIS_SEEDS, analysis_problems: int | None = None,
              progress=None) -> dict:
  """Runs everything for ``tasks`` (default: all four) into ``out``; returns the findings (also written)."""
  names = check_tasks(tasks)
  if tuning not in TUNING_MODES:
    raise UserError(f"unknown tuning mode {tuning!r}; choose from: {', '.join(TUNING_MODES)}")
  out = Path(out)
  if out.exists() and not out.is_dir():
    raise UserError(f"{out}: exists and is not a directory")
  started = time.perf_counter()
  findings = {"tasks": {}, "settings": {"eval_problems": eval_problems, "tuning": tuning, "retrain": retrain,
                                        "analysis_seeds": analysis_seeds, "paper": PAPER}}
  for name in names:
    findings["tasks"][name] = reproduce_task(name, out, retrain, eval_problems, tuning, analysis_seeds,
                                             analysis_problems, progress)
  findings["settings"]["seconds"] = round(time.perf_counter() - started, 1)
  write_findings(out, findings)
  from lopt.report.reproduce_report import write_reproduce_report
  path = write_reproduce_report(out, findings)
  _say(progress, f"reproduce finished in {findings['settings']['seconds']:.0f} s: {path}, {out / 'findings.md'}")
  return findings


def reproduce_task(name: str, out: Path, retrain: bool, eval_problems: int, tuning: str, analysis_seeds: int,
                   analysis_problems: int | None, progress) -> dict:
  """One task: optimizer, comparison (DIR/TASK/comparison/), analysis (DIR/TASK/analysis/); returns its findings."""
  from lopt.optax_adapter import as_optax
  from lopt.pipeline.analyze import analyze_optimizer
  from lopt.report.comparison import write_comparison
  started = time.perf_counter()
  optimizer, theta, info, source = learned_optimizer(name, out, retrain, progress)
  task = task_for(info)
  mode = tuning_mode(name, tuning)
  _say(progress, f"{name}: {source}; baselines tuned '{mode}'")
  comparison = compare_task(task, as_optax(optimizer, theta), info, mode, eval_problems, progress)
  comparison["settings"]["seconds"] = round(time.perf_counter() - started, 1)
  write_comparison(out / name / "comparison", comparison)
  network = bool(task.traits.get("network"))
  problems = analysis_problems or ANALYSIS_PROBLEMS["network" if network else "default"]
  summary = analyze_optimizer(optimizer, theta, task, out / name / "analysis", source=source, num_problems=problems,
                              num_coordinates=ANALYSIS_COORDINATES if network else None, num_seeds=analysis_seeds,
                              adaptation_seeds=min(ADAPTATION_SEEDS, analysis_seeds), progress=progress)
  result = task_findings(comparison, summary)
  result["source"] = source
  result["hidden_size"] = optimizer.config().get("hidden_size")
  from lopt import architectures
  spec = architectures.get(optimizer.config()["architecture"])
  result["architecture_text"] = spec.describe(spec.validate(optimizer.config()))
  result["seconds"] = round(time.perf_counter() - started, 1)
  _say(progress, f"{name} done in {result['seconds']:.0f} s: learned {result['comparison']['learned']:.4g} "
                 f"({result['comparison']['status']})")
  return result


def write_findings(out: Path, findings: dict) -> None:
  from lopt.io.checkpoint import atomic_write_bytes
  atomic_write_bytes(out / "findings.json", json.dumps(_plain(findings), indent=1).encode())
  atomic_write_bytes(out / "findings.md", findings_markdown(findings).encode())


def _plain(value):
  """JSON-ready: numpy scalars to Python, non-finite floats to None."""
  from lopt.dynamics.summary import _clean
  return _clean(value)
