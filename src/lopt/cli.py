"""The ``lopt`` command: train, compare, demo, reproduce (and, from the dynamics toolkit, analyze and report)."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path

from lopt.errors import UserError

DEMO_DIR = "lopt-demo"


# -- option parsing helpers ------------------------------------------------------------------------------------------

def _positive_int(text: str) -> int:
  try:
    value = int(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
  if value < 1:
    raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
  return value


def _positive_float(text: str) -> float:
  try:
    value = float(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
  if not value > 0 or value == float("inf"):
    raise argparse.ArgumentTypeError(f"expected a positive finite number, got {text}")
  return value


def _unit_interval(text: str) -> float:
  value = _positive_float(text)
  if not value < 1:
    raise argparse.ArgumentTypeError(f"expected a number in (0, 1), got {text}")
  return value


def _nonnegative_float(text: str) -> float:
  try:
    value = float(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected a non-negative number, got {text!r}") from None
  if not 0 <= value < float("inf"):
    raise argparse.ArgumentTypeError(f"expected a non-negative finite number, got {text}")
  return value


def _run_directory(text: str) -> str:
  """A run directory path: not empty (that would be the current directory) and without NUL bytes."""
  if not text.strip():
    raise argparse.ArgumentTypeError("expected a directory path, got an empty string")
  if "\0" in text:
    raise argparse.ArgumentTypeError(f"a path cannot contain a NUL byte, got {text!r}")
  return text


def _task_option(text: str) -> tuple[str, object]:
  """KEY=VALUE, VALUE parsed as JSON when it can be (numbers, lists), else kept as a string (paths)."""
  if "=" not in text:
    raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
  key, value = text.split("=", 1)
  try:
    return key, json.loads(value)
  except json.JSONDecodeError:
    return key, value


def _key_value(text: str) -> tuple[str, object]:
  """KEY=VALUE for --optimizer-option / --estimator-option (checked against the chosen spec in command_train)."""
  if "=" not in text or not text.split("=", 1)[0]:
    raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
  return tuple(text.split("=", 1))


# The meta-training options the CLI exposes: (flag, lopt 0.1 config name, type, help). The optimizer and estimator
# shortcuts set one field of the chosen architecture / estimator, as --optimizer-option / --estimator-option would.
TRAIN_OPTIONS = [
    ("--steps", "num_steps", _positive_int, "outer (meta-training) steps"),
    ("--meta-batch-size", "meta_batch_size", _positive_int, "sampled problems per outer step"),
    ("--horizon", "horizon", _positive_int, "inner steps per unroll (default: the task's horizon)"),
    ("--hidden-size", "hidden_size", _positive_int, "optimizer units (GRU: paper 256; mlp: width)"),
    ("--input-scale", "input_scale", _positive_float, "GRU: gradient multiplier before the GRU"),
    ("--output-scale", "output_scale", _positive_float, "GRU: multiplier on the GRU readout"),
    ("--input-encoding", "input_encoding", str, "GRU: 'scale' (input_scale*g) or 'log1p_sign' ([log1p|g|, sign g])"),
    ("--learning-rate", "learning_rate", _positive_float, "outer Adam learning rate"),
    ("--decay-rate", "decay_rate", _positive_float, "learning rate multiplier every --decay-steps steps"),
    ("--decay-steps", "decay_steps", _positive_int, "steps per learning-rate decay"),
    ("--clip-value", "clip_value", _positive_float, "element-wise meta-gradient clipping"),
    ("--l2-penalty", "l2_penalty", _nonnegative_float, "penalty on the L2 norm of the meta-parameters"),
    ("--meta-loss", "meta_loss", str, "'mean' (mean loss_t/loss_0, the paper's) or 'log_mean'"),
    ("--meta-gradient", "meta_gradient", str,
     "'full' (backpropagate through the inner gradients, the paper's) or 'first_order' (treat them as constants)"),
    ("--loss-cap", "loss_cap", _positive_float, "a problem's normalized loss is capped here (divergence guard)"),
    ("--seed", "seed", int, "seed of the meta-parameters and the training problem stream"),
    ("--init-from", "init_from", str, "start theta from this trained optimizer (path or name) of the same "
     "architecture and fields, instead of the seed's initialization (warm start, fine-tuning)"),
    ("--trainable", "trainable", str, "meta-train only these meta-parameters: comma-separated key-path prefixes "
     "(e.g. 'step,clip'; `lopt info` lists an optimizer's); the others stay as initialized and are not perturbed"),
    ("--outer-optimizer", "outer_optimizer", str, "who applies the meta-gradient: 'adam' (hand-designed, the "
     "--learning-rate/--decay-* settings), 'self' (a copy of the optimizer being trained, refreshed every "
     "--outer-refresh steps) or a trained optimizer's path or name (as lopt.load takes it)"),
    ("--outer-refresh", "outer_refresh", _positive_int, "--outer-optimizer self: outer steps between refreshes of "
     "the copy that applies the meta-gradient"),
    ("--outer-scale", "outer_scale", _positive_float, "a learned --outer-optimizer: multiplier on its updates"),
    ("--eval-every", "eval_every", _positive_int, "outer steps between held-out evaluations"),
    ("--eval-problems", "num_eval_problems", _positive_int, "held-out problems of each evaluation (selection)"),
    ("--log-every", "log_every", _positive_int, "outer steps between lines of metrics.jsonl"),
    ("--checkpoint-every", "checkpoint_every", _positive_int, "outer steps between checkpoints"),
]


WHOLE_EPISODES = "none"  # --truncation none: the estimator's truncation null (one truncation per episode)


def _truncation(text: str):
  return WHOLE_EPISODES if text.lower() in ("none", "null") else _positive_int(text)


# Shortcuts for fields of the truncated estimators (``--estimator-option NAME=VALUE`` reaches them all); an estimator
# without the field rejects it by name.
ESTIMATOR_SHORTCUTS = [
    ("--truncation", "truncation", _truncation, "inner steps per estimate ('none': whole episodes)"),
    ("--num-particles", "num_particles", _positive_int, "antithetic pairs per problem (es, pes, nres, mixed)"),
    ("--sigma", "sigma", _positive_float, "standard deviation of the perturbations of theta (es, pes, nres, mixed)"),
    ("--objective", "objective", str, "'train' or 'valid': the loss the meta-objective normalizes"),
]


def build_parser() -> argparse.ArgumentParser:
  from lopt import architectures
  from lopt.meta import estimators
  from lopt.meta.config import PRESETS
  from lopt.tasks import REGISTRY
  parser = argparse.ArgumentParser(
      prog="lopt", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
      description="Learned optimizers: meta-train them, compare them with tuned baselines, and analyze them.")
  commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

  demo_defaults = PRESETS["demo"]
  train = commands.add_parser(
      "train", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
      help="meta-train a learned optimizer on a task",
      description="Meta-train a learned optimizer (any registered architecture, with any registered gradient "
                  "estimator). Defaults come from --preset; each option overrides it.")
  train.add_argument("task", nargs="?", default=None, metavar="TASK",
                     help=f"the task to meta-train on, one of: {', '.join(REGISTRY)} (or use --task-family)")
  train.add_argument("--task-family", default=None, metavar="NAME",
                     help="meta-train on problems sampled from task families instead: a family name, several "
                          "comma-separated, or 'all' (`lopt tasks` lists them); --task-option num_groups=N, "
                          "max_step_flops=X, eval_horizon=N (held-out selection unrolls, default 200), "
                          "batch_noise=true (training problems draw a batch_fraction: gradient noise), "
                          "param_scale_probability=P (the share of training problems with an augmented parameter "
                          "scale; default 0.5), param_scale_range=[LOW,HIGH] (their scales; default [0.1,10]), "
                          "batch_size_range=[LOW,HIGH] (the training shapes' batch sizes; default the families'), "
                          "init_scale_range=[LOW,HIGH] (their initialization scales; default [0.5,2]), "
                          "distance_scale_range=[LOW,HIGH] (a share of the training problems' solutions lie d times "
                          "farther from their start, d log-uniform in [LOW,HIGH]; default off), "
                          "distance_scale_probability=P (that share; default 0.5)")
  train.add_argument("--out", required=True, type=_run_directory, help="run directory (config.json, metrics.jsonl, checkpoints/, "
                     "optimizer/)")
  train.add_argument("--preset", choices=list(PRESETS), default="demo",
                     help="starting settings: 'demo' (laptop CPU) or 'paper' (the paper's linear-regression run)")
  train.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
  _add_scale_options(train)
  train.add_argument("--task-option", action="append", type=_task_option, default=[], metavar="KEY=VALUE",
                     help="a task option, e.g. path=mnist.npz for mnist_cnn or dim=10 for linear_regression")
  train.add_argument("--optimizer", default=None, metavar="NAME",
                     help=f"learned-optimizer architecture, one of: {', '.join(sorted(architectures.REGISTRY))} "
                          f"(preset demo: {demo_defaults.optimizer.architecture})")
  train.add_argument("--optimizer-option", action="append", type=_key_value, default=[], metavar="KEY=VALUE",
                     help="a field of the architecture, e.g. hidden_size=64 (see `lopt train --help` of each: "
                          + "; ".join(f"{name}: {', '.join(spec.fields)}"
                                      for name, spec in sorted(architectures.REGISTRY.items())) + ")")
  train.add_argument("--estimator", default=None, metavar="NAME",
                     help=f"gradient estimator, one of: {', '.join(sorted(estimators.REGISTRY))} (preset demo: "
                          f"{demo_defaults.estimator.name})")
  train.add_argument("--estimator-option", action="append", type=_key_value, default=[], metavar="KEY=VALUE",
                     help="a field of the estimator (" + "; ".join(
                         f"{name}: {', '.join(spec.fields)}" for name, spec in sorted(estimators.REGISTRY.items()))
                     + ")")
  for flag, name, kind, text in TRAIN_OPTIONS:
    default = getattr(demo_defaults, name, None)
    train.add_argument(flag, dest=name, type=kind, default=None, help=f"{text} (preset demo: {default})")
  for flag, name, kind, text in ESTIMATOR_SHORTCUTS:
    train.add_argument(flag, dest=name, type=kind, default=None, help=f"{text} (an estimator field)")

  compare = commands.add_parser(
      "compare", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
      help="tune the baselines and compare them with a trained optimizer",
      description="Tune SGD, momentum, RMSProp and Adam on tuning problems, then evaluate them and the run's learned "
                  "optimizer on fresh problems; writes DIR/comparison/.")
  compare.add_argument("run_dir", metavar="DIR", type=_run_directory, help="a run directory written by `lopt train`")
  compare.add_argument("--eval-problems", type=_positive_int, default=128, help="fresh evaluation problems")
  compare.add_argument("--tuning-problems", type=_positive_int, default=32, help="problems used to tune baselines")

  demo = commands.add_parser(
      "demo", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
      help="train on linear regression (laptop-sized), compare with tuned baselines, write a report",
      description="The whole pipeline in a few minutes on a CPU: meta-train, tune baselines, compare, report.")
  demo.add_argument("--out", default=DEMO_DIR, type=_run_directory, help="run directory")
  demo.add_argument("--steps", type=_positive_int, default=None,
                    help=f"outer steps (default {demo_defaults.num_steps})")
  demo.add_argument("--eval-problems", type=_positive_int, default=128, help="fresh evaluation problems")

  analyze = commands.add_parser(
      "analyze", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
      help="reverse-engineer a trained optimizer: fixed points, momentum, clipping, schedule, adaptation",
      description="Runs the dynamics analyses on a run directory or a saved optimizer directory; writes "
                  "DIR/analysis/summary.json and one PNG per mechanism.")
  analyze.add_argument("run_dir", metavar="DIR", help="a run directory (optimizer/ + config.json), a saved optimizer, "
                       "or a name as lopt.load takes it (a shipped optimizer's: results then go to ./analysis-NAME/)")
  analyze.add_argument("--analyses", default=None, metavar="NAMES",
                       help="comma-separated subset to insist on (clipping, schedule, fixed_points, momentum, "
                            "adaptation, pca); the recurrent ones need a recurrent architecture (default: every one "
                            "that applies)")
  analyze.add_argument("--task", choices=list(REGISTRY), default=None,
                       help="the task to collect states on (default: the one the optimizer was trained on)")
  analyze.add_argument("--task-option", action="append", type=_task_option, default=[], metavar="KEY=VALUE",
                       help="a task option (with --task)")
  analyze.add_argument("--problems", type=_positive_int, default=8, help="test problems whose states are collected")

  report = commands.add_parser(
      "report", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
      help="write DIR/report.html: comparison, meta-training and every analysis, self-contained",
      description="Assembles one self-contained HTML file (figures embedded, no external requests) from what DIR "
                  "holds: comparison/ (lopt compare), metrics.jsonl, analysis/ (lopt analyze).")
  report.add_argument("run_dir", metavar="DIR", help="a run directory")

  from lopt.pipeline import reproduce as rep
  reproduce = commands.add_parser(
      "reproduce", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
      help="regenerate the paper's results on the four tasks from the shipped optimizers (offline)",
      description="For each task: the shipped optimizer (or a retrained one), tuned baselines, evaluation on fresh "
                  "problems and every analysis; writes DIR/TASK/{comparison,analysis}/, DIR/reproduce.html and "
                  "DIR/findings.{json,md}.")
  reproduce.add_argument("tasks", nargs="*", default=[], metavar="TASK", help=f"tasks (default: all of {', '.join(rep.TASKS)})")
  reproduce.add_argument("--retrain", action="store_true",
                         help="meta-train each optimizer with its shipped training config (slow on a CPU for the "
                              "network tasks) instead of using the shipped one")
  reproduce.add_argument("--out", default="lopt-reproduce", type=_run_directory, help="output directory")
  reproduce.add_argument("--eval-problems", type=_positive_int, default=128, help="fresh evaluation problems")
  reproduce.add_argument("--tuning", choices=rep.TUNING_MODES, default="auto",
                         help="baseline tuning: 'full' grid; 'local' learning-rate check around the shipped optimum "
                              "(8 problems); 'shipped' hyperparameters as is; 'auto' = full on linear_regression "
                              "and rosenbrock, local on the network tasks")
  # Hidden: fewer fixed-point seeds / problems for the analyses (tests, quick looks).
  reproduce.add_argument("--analysis-seeds", type=_positive_int, default=rep.ANALYSIS_SEEDS, help=argparse.SUPPRESS)
  reproduce.add_argument("--analysis-problems", type=_positive_int, default=None, help=argparse.SUPPRESS)

  tasks = commands.add_parser(
      "tasks", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
      help="list the task families for general-purpose meta-training, or sample configurations of them",
      description="Without --sample: each task family, its description and the range of every field. With --sample "
                  "N: N configurations, one JSON object per line; sample i is drawn from the seed [SEED, i], so the "
                  "output is deterministic and a prefix of a longer sample.")
  tasks.add_argument("--sample", type=_positive_int, default=None, metavar="N", help="configurations to print")
  tasks.add_argument("--family", default=None, metavar="NAME",
                     help="only this family (default: a uniform mix of them)")
  tasks.add_argument("--seed", type=int, default=0, help="seed of the sample (a non-negative integer)")
  tasks.add_argument("--max-step-flops", type=_positive_float, default=None, metavar="X",
                     help="only configurations whose inner step (forward and backward) costs at most X FLOPs")
  _add_selftrain_parser(commands)
  from lopt.evaluation import benchmark as bench
  benchmark = commands.add_parser(
      "benchmark", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
      help="learned optimizers against tuned Adam and NAdamW on held-out problems unlike their training tasks",
      description="On every problem of the held-out suite (`--list`): each learned optimizer as trained (no learning "
                  "rate), Adam with its learning rate tuned over 13 values, NAdamW with cosine decay tuned by a "
                  "20-trial random search, and Adam at 1e-3; baselines tuned on tuning seeds, everything evaluated "
                  "on other seeds. Writes OUT/benchmark.json and OUT/report.html; finished results are cached in "
                  "OUT/cache/, so an interrupted run continues where it stopped.")
  benchmark.add_argument("names", nargs="*", default=[], metavar="NAME",
                         help="trained optimizers: names (shipped or in $LOPT_OPTIMIZER_PATH) or paths (default: "
                              f"{BENCHMARK_DEFAULT})")
  benchmark.add_argument("--quick", action="store_true",
                         help=f"the quick subset with shorter horizons, {bench.QUICK_TUNING_SEEDS} tuning and "
                              f"{bench.QUICK_EVAL_SEEDS} evaluation seeds (about 6 minutes on 2 CPU cores)")
  benchmark.add_argument("--problems", default=None, metavar="A,B",
                         help="comma-separated problems (default: all, or the quick subset)")
  benchmark.add_argument("--out", default="lopt-benchmark", type=_run_directory, help="output directory")
  benchmark.add_argument("--tuning-seeds", default=None, metavar="N",
                         help=f"seeds each baseline candidate is tuned on (default {bench.TUNING_SEEDS}; --quick "
                              f"{bench.QUICK_TUNING_SEEDS})")
  benchmark.add_argument("--eval-seeds", default=None, metavar="N",
                         help=f"evaluation seeds (default {bench.EVAL_SEEDS}; --quick {bench.QUICK_EVAL_SEEDS})")
  benchmark.add_argument("--list", action="store_true", help="list the problems and exit")
  benchmark.add_argument("--no-valid-loss", action="store_true",
                         help="give the learned optimizers no validation loss (by default one every 10 steps)")
  # Hidden: smaller runs for tests.
  benchmark.add_argument("--horizon", default=None, help=argparse.SUPPRESS)
  benchmark.add_argument("--learning-rates", default=None, help=argparse.SUPPRESS)
  benchmark.add_argument("--nadamw-trials", default=None, help=argparse.SUPPRESS)
  return parser


# `lopt train` options that mean nothing to self-training: the population applies its own meta-gradients.
SELFTRAIN_EXCLUDED = ("learning_rate", "decay_rate", "decay_steps", "init_from", "trainable", "outer_optimizer",
                      "outer_refresh", "outer_scale")


def _scale_range(text: str) -> tuple[float, float]:
  parts = text.split(",")
  if len(parts) != 2:
    raise argparse.ArgumentTypeError(f"expected LOW,HIGH (two positive numbers), got {text!r}")
  low, high = (_positive_float(p) for p in parts)
  if low > high:
    raise argparse.ArgumentTypeError(f"expected LOW <= HIGH, got {text!r}")
  return low, high


def _add_selftrain_parser(commands) -> None:
  """`lopt selftrain`: the options of `lopt train` that apply, and the population's."""
  from lopt import architectures
  from lopt.meta import estimators, selftrain
  from lopt.tasks import REGISTRY
  preset, population = selftrain.PRESET, selftrain.PopulationSection()
  parser = commands.add_parser(
      "selftrain",  # each help text names its default (argparse's own would print the None placeholders)
      help="a population of randomly initialized learned optimizers that trains itself (no hand-designed optimizer)",
      description="Population-based self-training (Metz et al. 2021): K randomly initialized learned optimizers; "
                  "each member's meta-gradient is applied by a member of the population (--applier), times its own "
                  "step multiplier; every --eval-every steps the members are judged on held-out problems, the worst "
                  "become copies of the best (exploit) and are perturbed (explore). The best member ever is "
                  "exported to OUT/optimizer/ (lopt.load(OUT)).")
  parser.add_argument("task", nargs="?", default=None, metavar="TASK",
                      help=f"the task, one of: {', '.join(REGISTRY)} (or use --task-family)")
  parser.add_argument("--task-family", default=None, metavar="NAME",
                      help="problems sampled from task families (as for `lopt train`)")
  parser.add_argument("--out", required=True, type=_run_directory, help="run directory")
  parser.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
  parser.add_argument("--task-option", action="append", type=_task_option, default=[], metavar="KEY=VALUE",
                      help="a task (or task family) option")
  parser.add_argument("--optimizer", default=None, metavar="NAME",
                      help=f"architecture, one of: {', '.join(sorted(architectures.REGISTRY))} (default "
                           f"{preset.optimizer.architecture} with {preset.optimizer.fields['step_scale']:g} step_scale "
                           f"and {preset.optimizer.fields['magnitude_scale']:g} magnitude_scale)")
  parser.add_argument("--optimizer-option", action="append", type=_key_value, default=[], metavar="KEY=VALUE",
                      help="a field of the architecture")
  parser.add_argument("--estimator", default=None, metavar="NAME",
                      help=f"gradient estimator, one of: {', '.join(sorted(estimators.REGISTRY))} (default "
                           f"{preset.estimator.name})")
  parser.add_argument("--estimator-option", action="append", type=_key_value, default=[], metavar="KEY=VALUE",
                      help="a field of the estimator")
  for flag, name, kind, text in TRAIN_OPTIONS:
    if name not in SELFTRAIN_EXCLUDED:
      if name == "eval_every":
        text = "outer steps between held-out judgings (exploit and explore)"
      parser.add_argument(flag, dest=name, type=kind, default=None,
                          help=f"{text} (default: {getattr(preset, name, None)})")
  parser.set_defaults(**{name: None for name in SELFTRAIN_EXCLUDED})
  for flag, name, kind, text in ESTIMATOR_SHORTCUTS:
    parser.add_argument(flag, dest=name, type=kind, default=None, help=f"{text} (an estimator field)")
  for flag, name, kind, text in POPULATION_OPTIONS:
    extra = ({"choices": selftrain.APPLIERS} if name == "applier" else
             {"type": kind, "metavar": {"size": "K", "scale_range": "LOW,HIGH"}.get(name, name.upper())})
    parser.add_argument(flag, dest=name, default=None, help=f"{text} (default {getattr(population, name)})", **extra)
  parser.add_argument("--devices", type=_positive_int, default=None, metavar="N",
                      help="local devices to shard the population over (a divisor of --population; default: the most "
                           "local devices the population splits over)")


# `lopt selftrain`'s population options: flag, field of selftrain.PopulationSection, type, help (the default is added).
POPULATION_OPTIONS = [
    ("--population", "size", _positive_int, "members"),
    ("--applier", "applier", str, "who applies member i's meta-gradient: itself, the current best member, or member "
                                  "i+1"),
    ("--exploit-fraction", "exploit_fraction", _nonnegative_float, "the worst fraction copies the best fraction; 0: "
                                                                   "judge only"),
    ("--perturb-factor", "perturb_factor", _positive_float, "explore: a copy's step multiplier times or divided by "
                                                            "this"),
    ("--perturb-noise", "perturb_noise", _nonnegative_float, "explore: std of the noise added to a copy's "
                                                             "meta-parameters"),
    ("--init-noise", "init_noise", _nonnegative_float, "std of the noise added to every member's initialization"),
    ("--scale-range", "scale_range", _scale_range, "initial step multipliers, log-uniform"),
]


def command_selftrain(args):
  import dataclasses

  from lopt.io.checkpoint import read_json
  from lopt.meta import selftrain
  from lopt.progress import say, training_bar
  saved_path = Path(args.out) / "config.json"
  if args.resume:
    if not saved_path.exists():
      raise UserError(f"{args.out}: holds no run to resume (no config.json there); drop --resume to start a new run")
    saved = selftrain.SelfTrainConfig.from_dict(read_json(saved_path, "run config"), str(saved_path))
    meta, population = saved.meta, saved.population
  else:
    meta, population = selftrain.PRESET.replace(task=_task_section(args)), selftrain.PopulationSection()
  meta = train_config(meta, args)
  changes = {name: getattr(args, name) for _, name, _, _ in POPULATION_OPTIONS if getattr(args, name) is not None}
  config = selftrain.SelfTrainConfig(meta, dataclasses.replace(population, **changes)).validate("options")
  _validate(meta)
  say(f"self-training {config.population.size} x {meta.optimizer.architecture} (applier "
      f"{config.population.applier}) with estimator {meta.estimator.name} on {meta.task.name} for {meta.num_steps} "
      f"outer steps -> {args.out}")
  with training_bar(meta.num_steps, "self-training") as update:
    state = selftrain.selftrain(config, args.out, resume=args.resume, progress=update, devices=args.devices)
  say(f"done: best held-out normalized mean loss {state.best_score:.4g} at step {state.best_step}; "
      f"{state.skipped_steps} skipped member steps; trained optimizer in {Path(args.out) / 'optimizer'}")
  return state


def _add_scale_options(parser) -> None:
  """Devices and hosts (docs/SCALING.md): the per-problem work is sharded over them (lopt.meta.sharding)."""
  parser.add_argument("--devices", type=_positive_int, default=None, metavar="N",
                      help="local devices to shard the meta-batch over; None: the most of this process's that the "
                           "per-problem axes split over (all of them with several processes)")
  parser.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                      help="several processes (jax.distributed): process 0's address and a free port"
                           "; None: $JAX_COORDINATOR_ADDRESS")
  parser.add_argument("--num-processes", type=_positive_int, default=None, metavar="N",
                      help="several processes: how many; None: $LOPT_NUM_PROCESSES")
  parser.add_argument("--process-id", type=int, default=None, metavar="I",
                      help="several processes: this one's index, 0 to N-1; 0 writes the run directory"
                           "; None: $LOPT_PROCESS_ID")


# -- commands --------------------------------------------------------------------------------------------------------

def _train(config, out: str, resume: bool, devices: int | None = None) -> None:
  import jax

  from lopt.meta.train import meta_train
  from lopt.progress import say, training_bar
  writer = jax.process_index() == 0  # with several processes, one progress bar and one set of messages
  if writer:
    say(f"meta-training {config.optimizer.architecture} with estimator {config.estimator.name} on "
        f"{config.task.name} for {config.num_steps} outer steps -> {out}")
  with training_bar(config.num_steps) if writer else contextlib.nullcontext(False) as update:
    state = meta_train(config, out, resume=resume, progress=update, devices=devices)
  if writer:
    say(f"done: best held-out normalized mean loss {state.best_score:.4g} at step {state.best_step}; "
        f"{state.skipped_steps} skipped steps; trained optimizer in {Path(out) / 'optimizer'}")


def command_train(args) -> None:
  from lopt.meta import sharding
  several = sharding.initialize(args.coordinator, args.num_processes, args.process_id)  # before any JAX work
  sharding.layout(args.devices)  # a device count this process does not have: an error before anything else
  if not several:
    config = _train_config_from(args)
  else:  # process 0 reads the saved config (resume) and decides; the others need no access to its files
    import jax
    shared = None
    if jax.process_index() == 0:
      try:
        shared = {"config": _train_config_from(args).to_dict()}
      except UserError as e:
        shared = {"error": str(e)}
    shared = sharding.broadcast_json(shared)
    if "error" in shared:
      raise UserError(shared["error"] if jax.process_index() == 0 else f"process 0: {shared['error']}")
    from lopt.meta.config import MetaTrainConfig
    config = MetaTrainConfig.from_dict(shared["config"], "process 0's config")
  _validate(config)
  from lopt.meta.train import optimizer_from, outer_optimizer_from
  outer_optimizer_from(config, optimizer_from(config))  # a trained --outer-optimizer that does not load: now
  _warn_if_inert_outer(config)
  chosen = {} if args.devices is None else {"devices": args.devices}  # _train(config, out, resume) stays callable
  _train(config, args.out, args.resume, **chosen)


def _train_config_from(args):
  """The run's config: the preset (or the saved config, on resume) with the command line's changes."""
  from lopt.io.checkpoint import read_json
  from lopt.meta.config import PRESETS, MetaTrainConfig
  saved_path = Path(args.out) / "config.json"
  if args.resume:
    if not saved_path.exists():
      raise UserError(f"{args.out}: holds no run to resume (no config.json there); drop --resume to start a new run")
    base = MetaTrainConfig.from_dict(read_json(saved_path, "run config"), str(saved_path))
  else:
    base = PRESETS[args.preset].replace(task=_task_section(args))
  config = train_config(base, args)
  if args.resume and (args.task is not None or args.task_family is not None):
    wanted = _task_section(args)
    if (config.task.family, config.task.family or config.task.name) != (wanted.family, wanted.family or wanted.name):
      trained = f"family {config.task.family!r}" if config.task.family else repr(config.task.name)
      asked = f"family {wanted.family!r}" if wanted.family else repr(wanted.name)
      raise UserError(f"{saved_path}: the run in {args.out} trains on {trained}, not {asked}")
  return config


def _warn_if_inert_outer(config) -> None:
  """``--outer-optimizer self`` from an architecture's own initialization never moves when that initialization
  makes zero updates (mlp, gru: a zero readout): say so before the run rather than after it."""
  from lopt.meta import outer
  if config.outer.outer_optimizer != outer.SELF or config.outer.init_from is not None:
    return
  import jax
  from lopt.meta.train import optimizer_from
  from lopt.progress import say
  optimizer = optimizer_from(config)
  if outer.is_inert(optimizer, optimizer.init(jax.random.key(config.seed))):
    say(f"warning: --outer-optimizer self: the untrained {config.optimizer.architecture!r} makes zero updates, so "
        f"theta will not change; start from a trained optimizer (--init-from) or use `lopt selftrain`")


def _task_section(args):
  """The task section the command line names: a registered task, or --task-family (exactly one of them)."""
  from lopt.meta.config import TaskSection
  from lopt.tasks import REGISTRY
  if (args.task is None) == (args.task_family is None):
    raise UserError("train: name a task (one of " + ", ".join(REGISTRY) + ") or --task-family NAME, "
                    + ("not both" if args.task is not None else "one of them"))
  if args.task_family is not None:
    return TaskSection(name=args.task_family, family=args.task_family)
  if args.task not in REGISTRY:
    raise UserError(f"train: unknown task {args.task!r}; choose one of: {', '.join(REGISTRY)} (or --task-family)")
  return TaskSection(name=args.task)


def train_config(base, args):
  """``base`` with the command line's changes: architecture / estimator (their preset fields dropped when the name
  changes), their KEY=VALUE fields and shortcuts, the task options and the outer and logging settings."""
  import dataclasses

  from lopt import architectures
  from lopt.meta import estimators
  from lopt.meta.config import LEGACY_FIELDS, EstimatorSection, OptimizerSection
  optimizer, estimator = base.optimizer, base.estimator
  if args.optimizer is not None and args.optimizer != optimizer.architecture:
    optimizer = OptimizerSection(architectures.get(args.optimizer, "--optimizer", error=UserError).name, {})
  if args.estimator is not None and args.estimator != estimator.name:
    estimator = EstimatorSection(estimators.get(args.estimator, "--estimator", error=UserError).name, {})
  optimizer_spec = architectures.get(optimizer.architecture, "optimizer", error=UserError)
  estimator_spec = estimators.get(estimator.name, "estimator", error=UserError)
  optimizer_fields, estimator_fields, flat = {}, {}, {}
  for _, name, _, _ in TRAIN_OPTIONS:
    value = getattr(args, name)
    if value is None:
      continue
    section = LEGACY_FIELDS[name][0]
    target = {"optimizer": optimizer_fields, "estimator": estimator_fields}.get(section, flat)
    target[name] = value
  for _, name, _, _ in ESTIMATOR_SHORTCUTS:
    value = getattr(args, name, None)
    if value is not None:
      estimator_fields[name] = None if value == WHOLE_EPISODES else value
  for text in args.optimizer_option:
    key, value = optimizer_spec.parse_option("=".join(text))
    optimizer_fields[key] = value
  for text in args.estimator_option:
    key, value = estimator_spec.parse_option("=".join(text))
    estimator_fields[key] = value
  for fields, spec, where in ((optimizer_fields, optimizer_spec, f"optimizer {optimizer_spec.name!r}"),
                              (estimator_fields, estimator_spec, f"estimator {estimator_spec.name!r}")):
    unknown = sorted(set(fields) - set(spec.fields))
    if unknown:
      hint = ""
      if "truncation" in unknown and spec is estimator_spec:
        hint = (" (it unrolls whole episodes: --horizon N sets their length; --estimator tbptt, es, pes, nres or "
                "mixed truncate them)")
      raise UserError(f"options: {where} has no field(s) {unknown}{hint}; its fields: {', '.join(spec.fields)}")
  optimizer = dataclasses.replace(optimizer, fields={**optimizer.fields, **optimizer_fields})
  estimator = dataclasses.replace(estimator, fields={**estimator.fields, **estimator_fields})
  config = base.replace(optimizer=optimizer, estimator=estimator, **flat)
  task_options = dict(args.task_option)
  if task_options:
    config = config.replace(task=dataclasses.replace(config.task, options={**config.task.options, **task_options}))
  return config


def _validate(config, source: str = "options") -> None:
  """Checks every setting and builds the task and optimizer once (tracing, not running, one loss evaluation), so
  that bad values surface as user errors before any work starts."""
  from lopt.meta.train import optimizer_from, task_from
  config.validate(source)
  try:
    optimizer_from(config)
  except (TypeError, ValueError) as e:
    raise UserError(f"{source}: {e}") from None
  try:
    task = task_from(config)
  except (TypeError, ValueError) as e:
    if isinstance(e, UserError):
      raise
    raise UserError(f"task {config.task.name!r} with options {config.task.options}: {e}") from None
  _check_task_builds(task, config)
  from lopt.meta.train import estimator_from
  estimator_from(config, task, optimizer_from(config))  # settings valid alone but not together: a clear error now


def _check_task_builds(task, config) -> None:
  """Task options of the wrong type (dim="abc", hidden=[[1]]) only fail when the problem is built or traced; doing
  that here with abstract values (jax.eval_shape: no memory, no compute) turns them into a clear error now instead
  of a traceback after compilation."""
  import jax
  if isinstance(task, tuple):  # the groups of a task-family run
    for group in task:
      _check_task_builds(group, config)
    return
  horizon = task.horizon
  if isinstance(horizon, bool) or not isinstance(horizon, int) or horizon < 1:
    raise UserError(f"task option 'horizon' must be a positive integer, found {horizon!r}")
  try:
    jax.eval_shape(lambda key: task.loss(task.init(key), key, 0), jax.random.key(0))
  except Exception as e:  # noqa: BLE001 -- any failure to build a problem is a bad option, reported as such
    options = config.task.options or "defaults"
    raise UserError(f"task {config.task.name!r} with options {options} cannot build a problem "
                    f"({type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''})") from None


def command_compare(args) -> dict:
  from lopt.io.checkpoint import load_optimizer, read_json
  from lopt.meta.config import MetaTrainConfig
  from lopt.meta.train import representative_task, task_from
  run_dir = Path(args.run_dir)
  if not run_dir.is_dir():
    raise UserError(f"{run_dir}: no such run directory (create one with `lopt train TASK --out {run_dir}`)")
  config_path = run_dir / "config.json"
  config = MetaTrainConfig.from_dict(read_json(config_path, "run config"), str(config_path))
  _validate(config, str(config_path))
  optimizer, theta, _ = load_optimizer(run_dir)
  return _compare(run_dir, representative_task(task_from(config)), optimizer, theta, args)


def _compare(run_dir: Path, task, optimizer, theta, args) -> dict:
  """The work of `lopt compare`, once its inputs are validated: tune, evaluate, write DIR/comparison/."""
  from lopt.evaluation.compare import compare
  from lopt.optax_adapter import as_optax
  from lopt.progress import say
  from lopt.report.comparison import text_table, verdicts, write_comparison
  started = time.perf_counter()
  comparison = compare(task, {"learned": as_optax(optimizer, theta)}, num_eval_problems=args.eval_problems,
                       num_tuning_problems=args.tuning_problems, progress=say)
  comparison["settings"]["seconds"] = round(time.perf_counter() - started, 1)
  paths = write_comparison(run_dir / "comparison", comparison)
  print(text_table(comparison))
  for line in verdicts(comparison):
    print(" -", line)
  say(f"results in {paths['results'].parent}/ (results.json, table.md, loss_curves.png, tuning.png)")
  return comparison


def command_demo(args) -> None:
  from lopt.meta.config import PRESETS
  from lopt.progress import say
  from lopt.report.build import write_report
  config = PRESETS["demo"]
  if args.steps is not None:
    config = config.replace(num_steps=args.steps)
  out = Path(args.out)
  resume = (out / "config.json").exists()
  if resume:
    say(f"{out} already holds a demo run: resuming it (delete the directory to start over)")
  started = time.perf_counter()
  _train(config, str(out), resume, devices=1)  # laptop-sized: one device, the same numbers everywhere
  command_compare(argparse.Namespace(run_dir=str(out), eval_problems=args.eval_problems, tuning_problems=32))
  command_analyze(argparse.Namespace(run_dir=str(out), task=None, task_option=[], problems=8, analyses=None))
  report = write_report(out)
  say(f"demo finished in {time.perf_counter() - started:.0f} s; open {report} (also: {out}/comparison/, "
      f"{out}/optimizer/, {out}/metrics.jsonl)")


def command_analyze(args) -> dict:
  from lopt.progress import say
  from lopt.pipeline.analyze import analyze_directory
  if args.task_option and args.task is None:
    raise UserError("--task-option needs --task")
  analyses = [a.strip() for a in args.analyses.split(",") if a.strip()] if getattr(args, "analyses", None) else None
  summary = analyze_directory(args.run_dir, args.task, dict(args.task_option), num_problems=args.problems,
                              progress=say, analyses=analyses)
  momentum, clipping = summary.get("momentum") or {}, summary.get("clipping") or {}
  found = [f"dominant momentum beta {momentum['beta']:.3g}"] if momentum.get("beta") is not None else []
  found.append(f"clipping threshold {clipping.get('threshold') if clipping.get('threshold') is not None else 'none'}")
  found.append(f"schedule {summary.get('schedule', {}).get('shape', '?')}")
  say(f"analysis in {summary['source']['out']}/ (summary.json, {', '.join(summary['source']['figures'])}); "
      + ", ".join(found))
  return summary


def command_report(args) -> Path:
  from lopt.progress import say
  from lopt.report.build import write_report
  run_dir = Path(args.run_dir)
  if not run_dir.is_dir():
    raise UserError(f"{run_dir}: no such directory")
  if not any((run_dir / name).exists() for name in ("comparison", "metrics.jsonl", "analysis")):
    raise UserError(f"{run_dir}: nothing to report (run `lopt compare {run_dir}` or `lopt analyze {run_dir}` first)")
  path = write_report(run_dir)
  say(f"report: {path}")
  return path


def command_reproduce(args) -> dict:
  from lopt.progress import say
  from lopt.pipeline.reproduce import reproduce
  return reproduce(args.tasks, out=args.out, retrain=args.retrain, eval_problems=args.eval_problems,
                   tuning=args.tuning, analysis_seeds=args.analysis_seeds, analysis_problems=args.analysis_problems,
                   progress=say)


def command_tasks(args) -> None:
  from lopt.tasks import families
  chosen = ([families.get(args.family, "--family")] if args.family is not None
            else [*families.FAMILIES.values(), *families.OPT_IN.values()])
  if args.sample is None:
    if args.seed != 0 or args.max_step_flops is not None:
      raise UserError("--seed and --max-step-flops go with --sample N")
    print(_families_table(chosen))
    return
  if args.seed < 0:
    raise UserError(f"--seed must be a non-negative integer, got {args.seed}")
  lines = (json.dumps(families.sample([args.seed, i], args.family, max_step_flops=args.max_step_flops))
           for i in range(args.sample))
  sys.stdout.write("".join(line + "\n" for line in lines))


def _families_table(chosen) -> str:
  """Each family: its name and description, then one row per field (shape fields first)."""
  blocks = []
  for family in chosen:
    ranges = family.ranges()
    width = max(map(len, ranges))
    rows = [f"  {name:<{width}}  {'shape' if name in family.space else 'problem':<7}  {text}"
            for name, text in ranges.items()]
    blocks.append("\n".join([f"{family.name}: {family.description}", *rows]))
  note = ("shape fields fix a problem's arrays and data (group_task vmaps every problem sharing them); problem fields "
          "are drawn per problem.\nbatch_fraction: the share of each minibatch the training loss counts "
          "(gradient noise; drawn only in `lopt train --task-family` runs with --task-option batch_noise=true).\n"
          "`lopt tasks --sample N` prints configurations, with each one's estimated step_flops.")
  return "\n\n".join(blocks + [note])


BENCHMARK_DEFAULT = "general"


def _count(text, flag: str) -> int | None:
  """A positive integer option of `lopt benchmark` (None: not given); a UserError (one line) otherwise."""
  if text is None:
    return None
  try:
    value = int(text)
  except ValueError:
    raise UserError(f"{flag}: expected a positive integer, got {text!r}") from None
  if value < 1:
    raise UserError(f"{flag}: expected a positive integer, got {value}")
  return value


def command_benchmark(args) -> dict | None:
  from lopt.evaluation import benchmark, suite
  from lopt.progress import say
  from lopt.report.benchmark_report import write_benchmark_report
  if args.list:
    print(suite.listing())
    return None
  problems = None
  if args.problems is not None:
    problems = [name.strip() for name in args.problems.split(",") if name.strip()]
    if not problems:
      raise UserError(f"--problems: expected comma-separated problem names; known: {', '.join(suite.PROBLEMS)}")
  learning_rates = benchmark.ADAM_LEARNING_RATES
  if args.learning_rates is not None:
    try:
      learning_rates = tuple(float(x) for x in args.learning_rates.split(","))
    except ValueError:
      raise UserError(f"--learning-rates: expected comma-separated numbers, got {args.learning_rates!r}") from None
  trials = _count(args.nadamw_trials, "--nadamw-trials") or benchmark.NADAMW_TRIALS
  result = benchmark.run_benchmark(
      args.names or [BENCHMARK_DEFAULT], args.out, problems=problems, quick=args.quick,
      tuning_seeds=_count(args.tuning_seeds, "--tuning-seeds"), eval_seeds=_count(args.eval_seeds, "--eval-seeds"),
      learning_rates=learning_rates, num_trials=trials, horizon=_count(args.horizon, "--horizon"),
      feed_valid=not args.no_valid_loss, say=say)
  report = write_benchmark_report(args.out, result)
  print(benchmark.text_table(result))
  for line in benchmark.summary_lines(result):
    print(line)
  say(f"benchmark finished in {result['seconds']:.0f} s: {Path(args.out) / 'benchmark.json'}, {report}")
  return result


COMMANDS = {"train": command_train, "compare": command_compare, "demo": command_demo, "analyze": command_analyze,
            "report": command_report, "reproduce": command_reproduce, "tasks": command_tasks,
            "benchmark": command_benchmark, "selftrain": command_selftrain}


def main(argv: list[str] | None = None) -> int:
  """The ``lopt`` command. Run as the console script (``argv`` None) it owns Ctrl-C (``lopt.interrupts``): an
  interrupt ends with one line and exit code 130, never a traceback or a crash, and a training run stops after its
  current outer step with a checkpoint (a second Ctrl-C ends the process at once; files are always consistent)."""
  from lopt import interrupts
  if argv is None:
    interrupts.install(f"lopt: {INTERRUPTED}")
  command = "lopt"
  try:
    with interrupts.deferred():  # the imports behind the parser (jax) are never cut half-way
      parser = build_parser()
    args = parser.parse_args(argv)
    command = f"lopt {args.command}"
    if argv is None:
      interrupts.install(f"{command}: {INTERRUPTED}")  # the line a second Ctrl-C prints names the command too
    COMMANDS[args.command](args)
  except UserError as e:
    print(f"{command}: error: {e}", file=sys.stderr)
    return interrupts.finish(2)
  except BrokenPipeError:  # `lopt tasks --sample 2000 | head`: the reader had enough, which is not an error
    try:
      sys.stdout = open(os.devnull, "w")  # noqa: SIM115 -- the interpreter flushes stdout at exit
    except OSError:
      pass
    return interrupts.finish(0)
  except OSError as e:
    if interrupts.is_interrupt(e):
      return interrupts.exit_interrupted(f"{command}: {INTERRUPTED}")
    # The environment, not a bug: a full or read-only disk, a missing permission. Say which file, not a traceback.
    where = f"{e.filename}: " if e.filename else ""
    print(f"{command}: error: {where}{e.strerror or e}", file=sys.stderr)
    return interrupts.finish(2)
  except BaseException as e:  # noqa: BLE001 -- Ctrl-C, or an error a Ctrl-C caused (in an extension's import)
    if interrupts.is_interrupt(e):
      return interrupts.exit_interrupted(f"{command}: {INTERRUPTED}")
    raise
  return interrupts.finish(0)


INTERRUPTED = "interrupted; a run resumes from its last checkpoint with --resume"


if __name__ == "__main__":
  sys.exit(main())
