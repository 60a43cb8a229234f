"""Evaluation runners: one problem at a time gives the vmapped losses, one compilation serves every hyperparameter
value and number of problems, and tuning through a runner finds what the one-call grid finds."""

import functools

import numpy as np
import pytest

from lopt import tasks
from lopt.meta import evaluate
from lopt.optimizers import baselines

HORIZON = 50


@pytest.fixture(scope="module")
def task():
  return tasks.get("rosenbrock")


@pytest.mark.parametrize("name,hyperparameters", [("sgd", {"learning_rate": 1e-3}),
                                                  ("adam", {"learning_rate": 0.03, "b1": 0.9, "b2": 0.999})])
def test_one_at_a_time_gives_the_vmapped_losses(task, name, hyperparameters):
  keys = evaluate.problem_keys(evaluate.EVALUATION_SEED, 5)
  build = functools.partial(baselines.build, name)
  batched = evaluate.problem_runner(task, build, HORIZON)(hyperparameters, keys)
  single = evaluate.problem_runner(task, build, HORIZON, one_at_a_time=True)(hyperparameters, keys)
  assert single.shape == batched.shape == (5, HORIZON)
  np.testing.assert_allclose(single, batched, rtol=1e-4)
  # And both score as the plain evaluation with these hyperparameters as constants (which XLA may fold, e.g. a
  # division into a multiplication: the losses agree up to rounding that Adam's normalization amplifies).
  constants = evaluate.run_problems(task, baselines.build(name, **hyperparameters), keys, HORIZON)
  np.testing.assert_allclose(evaluate.scores(batched), evaluate.scores(constants), rtol=1e-4)


def test_one_compilation_serves_every_value_and_problem_count(task):
  traced = []

  def build(**hyperparameters):
    traced.append(hyperparameters)  # runs only while JAX traces the unroll
    return baselines.build("momentum", **hyperparameters)

  run = evaluate.problem_runner(task, build, HORIZON, one_at_a_time=True)
  keys = evaluate.problem_keys(evaluate.TUNING_SEED, 4)
  run({"learning_rate": 1e-3, "beta": 0.9}, keys)
  run({"learning_rate": np.float32(3e-3), "beta": np.float32(0.5)}, keys[:3])  # numpy scalars: the same input type
  assert len(traced) == 1


def test_tuning_through_a_runner_matches_the_one_call_grid(task):
  keys = evaluate.problem_keys(evaluate.TUNING_SEED, 4)
  candidates = {"learning_rate": np.array([1e-4, 1e-3, 3e-3, 1e-2]), "beta": np.full(4, 0.9)}
  grid = evaluate.tune_baseline(task, "momentum", keys, HORIZON, candidates=candidates)
  runner = evaluate.problem_runner(task, functools.partial(baselines.build, "momentum"), HORIZON, one_at_a_time=True)
  through = evaluate.tune_baseline(task, "momentum", keys, HORIZON, candidates=candidates, runner=runner)
  assert through["best"] == grid["best"]
  np.testing.assert_allclose(through["scores"], grid["scores"], rtol=1e-5)
  evaluated = evaluate.evaluate_baseline(task, "momentum", through["best"], keys, HORIZON, runner=runner)
  assert evaluated["normalized_mean_loss"] == pytest.approx(through["best_tuning_score"], rel=1e-5)
