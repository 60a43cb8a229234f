"""Runs for tests/test_sharding.py, in a process started with two host-platform devices (the device count is fixed
when JAX starts): ``python sharding_scenarios.py OUT_DIR`` writes OUT_DIR/results.json and run directories."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import jax
import numpy as np

from lopt.meta import sharding
from lopt.meta.config import PRESETS, EstimatorSection, OptimizerSection, TaskSection
from lopt.meta.train import load_metrics, meta_train

# The run every scenario varies: two task groups, NRES, a 4-unit GRU (``config`` spells it as a library call). The
# two-process test runs NRES on linear regression (``LINEAR``): cheaper to compile, and it still shards a state.
SMALL = ["--horizon", "10", "--optimizer", "gru", "--hidden-size", "4", "--input-scale", "0.1", "--output-scale", "10",
         "--truncation", "5", "--meta-batch-size", "4", "--eval-every", "2", "--checkpoint-every", "2",
         "--log-every", "1", "--eval-problems", "2"]
ARGS = ["train", "--task-family", "logistic_regression", "--task-option", "num_groups=2", "--task-option",
        "max_step_flops=2e5", "--estimator", "nres", *SMALL]
LINEAR = ["train", "linear_regression", "--estimator", "nres", *SMALL]
FAMILY = TaskSection(name="logistic_regression", family="logistic_regression", horizon=10,
                     options={"num_groups": 2, "max_step_flops": 2e5})
TINY_GRU = OptimizerSection("gru", {"hidden_size": 4, "input_scale": 0.1, "output_scale": 10.0})


def config(estimator: str, steps: int, **fields):
  """``ARGS``'s run with another estimator (for 'full': on linear regression, a paper task) and step count."""
  task = TaskSection(name="linear_regression", horizon=10) if estimator == "full" else FAMILY
  fields = {"meta_batch_size": 4, **({} if estimator == "full" else {"truncation": 5}), **fields}
  return PRESETS["demo"].replace(task=task, optimizer=TINY_GRU, estimator=EstimatorSection(estimator, fields),
                                 num_steps=steps, eval_every=2, checkpoint_every=2, log_every=1,
                                 num_eval_problems=2)


def final_theta(run: Path) -> list:
  """Theta of the run's last checkpoint, leaves in key-path order, read back from the file as a resumed run would."""
  from safetensors.numpy import load_file
  path = sorted((run / "checkpoints").glob("step_*.safetensors"))[-1]
  tensors = load_file(str(path))
  return [tensors[k].tolist() for k in sorted(tensors) if k.startswith("theta/")]


def summary(out: Path, started: float) -> dict:
  return {"theta": final_theta(out), "meta_loss": [r["meta_loss"] for r in load_metrics(out)],
          "seconds": round(time.perf_counter() - started, 1)}


def train(out: Path, estimator: str, devices: int, steps: int = 4, resume: bool = False) -> dict:
  started = time.perf_counter()
  meta_train(config(estimator, steps), out, resume=resume, progress=False, devices=devices)
  return summary(out, started)


def population_theta(out: Path, devices: int, size: int = 4) -> list:
  """Final member meta-parameters of a tiny self-training (``size`` members, one PBT judging) on ``devices``
  devices."""
  from lopt.meta import selftrain
  meta = selftrain.PRESET.replace(task=FAMILY, num_steps=3, eval_every=2, checkpoint_every=2, log_every=1,
                                  num_eval_problems=2, estimator=EstimatorSection("nres", {"meta_batch_size": 2,
                                                                                           "truncation": 5}))
  config = selftrain.SelfTrainConfig(meta, selftrain.PopulationSection(size=size)).validate("scenario")
  state = selftrain.selftrain(config, out, progress=False, devices=devices)
  return [np.asarray(x).tolist() for x in jax.tree.leaves(state.theta)]


def main(out: Path, slow: bool) -> None:
  assert jax.local_device_count() == 2, jax.devices()
  from lopt.cli import main as cli
  started = time.perf_counter()
  assert cli([*ARGS, "--steps", "4", "--devices", "1", "--out", str(out / "nres-1")]) == 0
  results = {"nres/1": summary(out / "nres-1", started)}
  started = time.perf_counter()
  assert cli([*LINEAR, "--steps", "4", "--devices", "1", "--out", str(out / "linear-1")]) == 0
  results["linear/1"] = summary(out / "linear-1", started)
  results["nres/2"] = train(out / "nres-2", "nres", 2)
  # Checkpointed at step 2 on one count, resumed to step 4 on the other.
  for first, then in ((2, 1), (1, 2)) if slow else ((2, 1),):
    run = out / f"nres-{first}to{then}"
    train(run, "nres", first, steps=2)
    results[f"nres/{first}to{then}"] = train(run, "nres", then, resume=True)
  try:  # 3 problems per group do not split over 2 devices
    meta_train(config("nres", 1, meta_batch_size=6), None, progress=False, devices=2)
    results["indivisible"] = None
  except sharding.ShardingError as e:
    results["indivisible"] = str(e)
  # Without --devices: the most devices the per-problem (or population) axes split over.
  results["default_devices"] = {str(size): sharding.layout(None, (size,)).size for size in (3, 4)}
  if slow:  # (about a minute of compilation: with the slow tests)
    results["selftrain"] = {str(d): population_theta(out / f"self-{d}", d) for d in (1, 2)}
  try:  # 3 members on 2 devices: an error before the run directory exists
    population_theta(out / "self-indivisible", 2, size=3)
    results["population_indivisible"] = None
  except sharding.ShardingError as e:
    results["population_indivisible"] = [str(e), (out / "self-indivisible").exists()]
  for estimator in ("full", "pes") if slow else ():
    for devices in (1, 2):
      results[f"{estimator}/{devices}"] = train(out / f"{estimator}-{devices}", estimator, devices)
  (out / "results.json").write_text(json.dumps(results))


if __name__ == "__main__":
  main(Path(sys.argv[1]), slow="--slow" in sys.argv)
