"""The shipped optimizers (lopt.pretrained): they load offline, have the right shapes, and actually optimize."""

import jax
import numpy as np
import pytest

import lopt
from lopt import pretrained, tasks
from lopt.meta.evaluate import EVALUATION_SEED, problem_keys, run_problems, scores
from lopt.optimizers import as_optax

TASKS = ("digits_cnn", "linear_regression", "rosenbrock", "two_moons")  # the paper's task-specific GRUs
GENERAL = ("general", "general-v1")  # the general-purpose optimizers (tests/test_hierarchical.py, docs/GENERAL.md)
# Problems x steps per check, sized for a 2-core CPU: the networks run the GRU on ~8,000 coordinates per problem, so
# they get fewer problems and a shorter horizon than the 2- and 5-parameter tasks (the full-horizon numbers on 128
# problems are in each config's info and docs/REPRODUCTION.md).
BUDGET = {"linear_regression": (16, None), "rosenbrock": (16, None), "two_moons": (4, 50), "digits_cnn": (2, 30)}


def test_lists_the_four_tasks_and_general():
  assert pretrained.list() == sorted(TASKS + GENERAL)


def test_general_is_general_v1_with_the_leaves_its_graft_record_names():
  """The shipped `general` is what its config says: `general-v1`'s fields and meta-parameters but for the leaves
  ``info.graft.taken``, which are the donor run's (the LSTM differs; the context map was not trained in that run, so
  it is `general-v1`'s either way)."""
  from lopt.pytree import flatten_by_path
  general, v1 = lopt.load("general"), lopt.load("general-v1")
  graft = general.config["info"]["graft"]
  assert graft["base"] == "general-v1" and graft["weight"] == 1.0
  assert general.optimizer == v1.optimizer
  ours, theirs = flatten_by_path(general.theta), flatten_by_path(v1.theta)
  assert sorted(ours) == sorted(theirs)
  differing = {k for k in ours if not np.array_equal(ours[k], theirs[k])}
  assert {"lstm/w", "lstm/b"} <= differing <= set(graft["taken"])


def test_unknown_name_lists_the_available_ones():
  with pytest.raises(ValueError, match="available: digits_cnn"):
    pretrained.load("no_such_task")


@pytest.mark.parametrize("name", TASKS)
def test_loads_with_the_shapes_of_its_architecture(name):
  optimizer, theta, config = pretrained.load(name)
  assert {k: tuple(v.shape) for k, v in theta.items()} == optimizer.param_shapes()
  assert all(np.all(np.isfinite(v)) for v in theta.values())
  info = config["info"]
  assert info["training"]["task"] == name
  assert info["training"]["hidden_size"] == optimizer.hidden_size
  assert info["training"]["input_scale"] == optimizer.input_scale
  assert set(info["evaluation"]["results"]) == {"learned", "sgd", "momentum", "rmsprop", "adam"}
  assert info["evaluation"]["results"]["learned"]["num_problems"] == 128


@pytest.mark.parametrize("name", TASKS)
def test_optimizes_its_task(name):
  optimizer, theta, config = pretrained.load(name)
  count, horizon = BUDGET[name]
  task = tasks.get(name, **config["info"]["training"]["task_options"])
  keys = problem_keys(EVALUATION_SEED, count)
  score = scores(run_problems(task, as_optax(optimizer, theta), keys, horizon or task.horizon))
  # An untrained (zero-readout) optimizer scores exactly 1; below 1 means the loss went down on every problem's
  # average, and finite means no problem diverged.
  assert np.all(np.isfinite(score))
  assert float(np.mean(score)) < 1.0
  if horizon is None:
    # Full horizon, the evaluation problems: close to the recorded 128-problem mean (CPU here vs the GPU there).
    recorded = config["info"]["evaluation"]["results"]["learned"]
    assert abs(float(np.mean(score)) - recorded["normalized_mean_loss"]) < 0.5 * recorded["normalized_mean_loss"] + 0.02


def test_shipped_optimizers_give_the_numbers_lopt_0_1_gave():
  """Pinned with lopt 0.1.0 before the redesign (tests/data/shipped_optimizer_pins.json): each shipped optimizer,
  loaded through today's reader (format 1 files, architecture registry), gives the same loss curves."""
  import json
  from pathlib import Path

  from lopt.meta.config import MetaTrainConfig
  from lopt.meta.train import task_from
  from lopt.meta.unroll import unroll
  pins = json.loads((Path(__file__).parent / "data" / "shipped_optimizer_pins.json").read_text())["pins"]
  assert sorted(pins) == sorted(TASKS)
  for name, pin in pins.items():
    trained = lopt.load(name)
    assert trained.config["format_version"] == 1  # the shipped files are lopt 0.1's
    task = task_from(MetaTrainConfig.from_dict(trained.config["info"]["training"]))
    keys = jax.random.split(jax.random.key(pin["seed"]), pin["problems"])
    tx = trained.as_optax()
    losses = np.asarray(jax.jit(jax.vmap(lambda k: unroll(task, tx, k, pin["steps"])))(keys))
    pinned = np.asarray(pin["losses"])
    # The pins were recorded on another CPU: its vector width changes float32 rounding, which hundreds of steps
    # amplify to ~1e-5 of a loss, and a loss that has fallen a million-fold is rounding alone. A changed
    # optimizer moves the curves by far more than either tolerance.
    np.testing.assert_allclose(losses, pinned, rtol=1e-4, atol=1e-6 * float(np.abs(pinned).max()), err_msg=name)
