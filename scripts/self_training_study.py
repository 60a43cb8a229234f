"""The evidence of docs/SELF_TRAINING.md: a population of randomly initialized learned optimizers training itself
(`lopt selftrain`, no hand-designed optimizer) against Adam-trained meta-training (`lopt train`) of the same
architecture at equal training inner steps, and a small ablation of the applier rule, the population size and PBT.

  PYTHONPATH=src python scripts/self_training_study.py --out docs/images            # 2 CPU cores, ~15-25 minutes
  PYTHONPATH=src python scripts/self_training_study.py --out /tmp/study --quick     # a smoke run, ~3 minutes

Writes OUT/self_training_study.json (every curve and setting), OUT/self_training_curves.png and
OUT/self_training_ablation.png. Finished runs are kept in the JSON and skipped when the script runs again
(an interrupted study continues); run directories go to OUT/self_training_runs/ unless --runs says otherwise.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import shutil
import time
from pathlib import Path

import jax
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from lopt.io.checkpoint import atomic_write_json, read_json  # noqa: E402
from lopt.meta import selftrain  # noqa: E402
from lopt.meta.config import (EstimatorSection, LoggingSection, MetaTrainConfig, OptimizerSection,  # noqa: E402
                              OuterSection, TaskSection)
from lopt.meta.train import load_metrics, meta_train  # noqa: E402

# The small setting (ours): convex problems whose steps cost little, a per-parameter MLP of 8 units (~200
# meta-parameters), NRES truncations of 10 steps on 4 problems x 2 antithetic pairs per member.
TASK = TaskSection(name="logistic_regression", family="logistic_regression", horizon=40,
                   options={"num_groups": 2, "max_step_flops": 2e5})
OPTIMIZER = OptimizerSection("mlp", {"hidden_size": 8, "num_layers": 1, "step_scale": 0.01, "magnitude_scale": 0.1})
ESTIMATOR = EstimatorSection("nres", {"truncation": 10, "meta_batch_size": 4, "num_particles": 2})
EVAL_PROBLEMS = 8


def meta_config(seed: int, steps: int, eval_every: int) -> MetaTrainConfig:
  return MetaTrainConfig(task=TASK, optimizer=OPTIMIZER, estimator=ESTIMATOR, outer=OuterSection(num_steps=steps,
                         seed=seed), logging=LoggingSection(eval_every=eval_every, num_eval_problems=EVAL_PROBLEMS,
                                                            log_every=eval_every, checkpoint_every=10**6))


def run_population(runs: Path, name: str, seed: int, steps: int, eval_every: int, **population) -> dict:
  """One `lopt selftrain` run: (inner steps, best, median held-out loss) at every judging."""
  config = selftrain.SelfTrainConfig(meta_config(seed, steps, eval_every), selftrain.PopulationSection(**population))
  path = runs / name
  shutil.rmtree(path, ignore_errors=True)
  started = time.perf_counter()
  state = selftrain.selftrain(config, path, progress=False)
  seconds = time.perf_counter() - started
  judged = [r for r in load_metrics(path) if "held_out_losses" in r]
  return {"kind": "selftrain", "seed": seed, "population": config.to_dict()["population"], "steps": steps,
          "seconds": round(seconds, 1), "best_held_out_loss": state.best_score, "best_step": state.best_step,
          "curve": [{"inner_steps": r["inner_steps"], "best": r["held_out_loss"],
                     "median": r["median_held_out_loss"], "founders": r["founders"],
                     "replaced": len(r["exploit"])} for r in judged]}


def run_adam(runs: Path, name: str, seed: int, steps: int, eval_every: int) -> dict:
  """One `lopt train` run of the same architecture and estimator, Adam applying the meta-gradient."""
  config = meta_config(seed, steps, eval_every)
  path = runs / name
  shutil.rmtree(path, ignore_errors=True)
  started = time.perf_counter()
  state = meta_train(config, path, progress=False)
  seconds = time.perf_counter() - started
  judged = [r for r in load_metrics(path) if "held_out_loss" in r]
  return {"kind": "adam", "seed": seed, "steps": steps, "seconds": round(seconds, 1),
          "best_held_out_loss": state.best_score, "best_step": state.best_step,
          "learning_rate": config.outer.learning_rate,
          "curve": [{"inner_steps": r["inner_steps"], "held_out": r["held_out_loss"],
                     "best": r["best_held_out_loss"]} for r in judged]}


def plan(quick: bool) -> list[tuple[str, str, dict]]:
  """(name, kind, arguments) of every run; the population runs and Adam share seeds and training inner steps."""
  steps, size, every = (40, 8, 10) if quick else (120, 8, 10)
  seeds = (0,) if quick else (0, 1, 2)
  runs = []
  for seed in seeds:
    runs.append((f"self-p{size}-seed{seed}", "selftrain",
                 {"seed": seed, "steps": steps, "eval_every": every, "size": size}))
    # Equal training inner steps: one Adam-trained optimizer gets `size` times the outer steps of the population.
    runs.append((f"adam-seed{seed}", "adam", {"seed": seed, "steps": steps * size, "eval_every": every * size}))
  if not quick:
    for applier in ("best", "next"):
      runs.append((f"self-p{size}-{applier}-seed0", "selftrain",
                   {"seed": 0, "steps": steps, "eval_every": every, "size": size, "applier": applier}))
    runs.append((f"self-p{size}-nopbt-seed0", "selftrain",
                 {"seed": 0, "steps": steps, "eval_every": every, "size": size, "exploit_fraction": 0.0}))
    # Exploration alone: multipliers of 1e-6 leave the meta-gradient no effect; PBT's copies and noise do the work.
    runs.append((f"self-p{size}-nograd-seed0", "selftrain",
                 {"seed": 0, "steps": steps, "eval_every": every, "size": size, "scale_range": (1e-6, 1e-6),
                  "perturb_factor": 1.0}))
    runs.append(("self-p4-seed0", "selftrain", {"seed": 0, "steps": steps * 2, "eval_every": every, "size": 4}))
    # Twice as long for the two seeds still descending at the end (a run's first steps are the shorter run's:
    # randomness and the Adam schedule depend on the step alone, and the mlp ignores the horizon hint).
    for seed in (1, 2):
      runs.append((f"self-p{size}-long-seed{seed}", "selftrain",
                   {"seed": seed, "steps": 2 * steps, "eval_every": every, "size": size}))
      runs.append((f"adam-long-seed{seed}", "adam",
                   {"seed": seed, "steps": 2 * steps * size, "eval_every": every * size}))
  return runs


def by_seed(results: dict, kind: str) -> list[dict]:
  """One run per seed of the main comparison, the longer one where there is one."""
  prefix = "self-p8" if kind == "selftrain" else "adam"
  chosen = {}
  for name, run in results.items():
    if run["kind"] == kind and (name.startswith(f"{prefix}-seed") or name.startswith(f"{prefix}-long-seed")):
      if run["seed"] not in chosen or len(run["curve"]) > len(chosen[run["seed"]]["curve"]):
        chosen[run["seed"]] = run
  return [chosen[seed] for seed in sorted(chosen)]


def curves_figure(results: dict, out: Path) -> None:
  """One panel per seed: the population's best and median member against the Adam-trained optimizer."""
  selfs, adams = by_seed(results, "selftrain"), {r["seed"]: r for r in by_seed(results, "adam")}
  fig, axes = plt.subplots(1, len(selfs), figsize=(4.2 * len(selfs), 4.0), sharey=True, squeeze=False)
  for ax, run in zip(axes[0], selfs):
    xs = [c["inner_steps"] / 1e3 for c in run["curve"]]
    ax.plot(xs, [c["best"] for c in run["curve"]], "-o", ms=3, color="C0", label="self-training: best member")
    ax.plot(xs, [c["median"] if c["median"] <= CEILING else float("nan") for c in run["curve"]], "--", color="C0",
            alpha=0.7, label="self-training: median member")
    adam = adams.get(run["seed"])
    if adam is not None:
      ax.plot([0] + [c["inner_steps"] / 1e3 for c in adam["curve"]], [1.0] + [c["held_out"] for c in adam["curve"]],
              "-s", ms=3, color="C3", label="Adam-trained (lopt train)")
    ax.axhline(1.0, color="k", lw=0.6, ls=":")
    ax.set(xlabel="training inner steps (thousands)", yscale="log", ylim=(0.07, CEILING * 1.1),
           title=f"seed {run['seed']}")
    ax.grid(alpha=0.3, which="both")
  axes[0][0].set_ylabel("held-out normalized mean loss")
  axes[0][0].legend(fontsize=8, loc="lower left")
  fig.suptitle("8 randomly initialized learned optimizers training themselves vs Adam-trained meta-training, equal "
               "training inner steps", fontsize=10)
  fig.tight_layout()
  fig.savefig(out / "self_training_curves.png", dpi=120)
  plt.close(fig)


CEILING = 1.5  # the ablation plots stop here; a member beyond it (or diverged) is an x on the top edge


def ablation_figure(results: dict, out: Path) -> None:
  fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
  labels = {"self-p8-seed0": "K=8, applier self (default)", "self-p8-best-seed0": "K=8, applier best",
            "self-p8-next-seed0": "K=8, applier next", "self-p8-nopbt-seed0": "K=8, no exploit/explore",
            "self-p8-nograd-seed0": "K=8, exploit/explore only (no meta-gradient)",
            "self-p4-seed0": "K=4, applier self (2x the outer steps)"}
  for ax, what in zip(axes, ("best", "median")):
    for i, (name, label) in enumerate(labels.items()):
      if name not in results:
        continue
      curve = results[name]["curve"]
      xs = [c["inner_steps"] / 1e3 for c in curve]
      ys = [c[what] for c in curve]
      ax.plot(xs, [y if y <= CEILING else float("nan") for y in ys], "-o", ms=2.5, color=f"C{i}", label=label)
      over = [(x, CEILING) for x, y in zip(xs, ys) if not y <= CEILING]
      if over:
        ax.plot(*zip(*over), "x", ms=6, color=f"C{i}")
    ax.axhline(1.0, color="k", lw=0.6, ls=":")
    ax.set(xlabel="training inner steps (thousands)", yscale="log", ylim=(0.07, CEILING * 1.1),
           title=f"{what} member's held-out loss (seed 0)")
    ax.grid(alpha=0.3, which="both")
  axes[0].set_ylabel(f"held-out normalized loss (x: above {CEILING} or diverged)")
  axes[1].legend(fontsize=7.5, loc="lower left")
  fig.tight_layout()
  fig.savefig(out / "self_training_ablation.png", dpi=120)
  plt.close(fig)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--out", type=Path, required=True)
  parser.add_argument("--runs", type=Path, default=None, help="run directories (default OUT/self_training_runs)")
  parser.add_argument("--quick", action="store_true")
  args = parser.parse_args()
  args.out.mkdir(parents=True, exist_ok=True)
  runs = args.runs or args.out / "self_training_runs"
  results_path = args.out / "self_training_study.json"
  study = read_json(results_path, "study results") if results_path.exists() else {}
  if study.get("quick") != args.quick:
    study = {}
  study.update({"quick": args.quick, "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
                "cpu_cores": os.cpu_count(), "jax": jax.__version__,
                "note": "seconds are wall-clock on cores shared with other jobs: indicative only",
                "settings": {"task": dataclasses.asdict(TASK), "optimizer": OPTIMIZER.to_dict(),
                             "estimator": ESTIMATOR.to_dict(), "eval_problems": EVAL_PROBLEMS}})
  results = study.setdefault("runs", {})
  for name, kind, arguments in plan(args.quick):
    if name in results:
      continue
    print(f"{name} ...", flush=True)
    run = run_population if kind == "selftrain" else run_adam
    results[name] = run(runs, name, **arguments)
    print(f"  best held-out {results[name]['best_held_out_loss']:.4g} in {results[name]['seconds']} s", flush=True)
    atomic_write_json(results_path, study)
  curves_figure(results, args.out)
  ablation_figure(results, args.out)
  atomic_write_json(results_path, study)
  print(f"wrote {results_path}, {args.out / 'self_training_curves.png'}, {args.out / 'self_training_ablation.png'}")


if __name__ == "__main__":
  main()
