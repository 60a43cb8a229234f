"""benchmarks/general_torch.py: its problems build, its runs give finite losses, divergence counts as inf."""

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from conftest import load_script


@pytest.fixture(scope="module")
def gt():
  return load_script("benchmarks/general_torch.py")


def test_every_problem_runs_with_general_and_adam(gt):
  for problem in gt.problems():
    for name, rate in (("general", None), ("adam", 1e-2)):
      losses = gt.run(problem, name, rate, seed=0, horizon=8, device="cpu")
      assert losses.shape == (8,) and np.all(np.isfinite(losses)), (problem.name, name)
    # The same seed gives the same run (data order and initialization are seeded).
    np.testing.assert_array_equal(gt.run(problem, "adam", 1e-2, 0, 6, "cpu"), gt.run(problem, "adam", 1e-2, 0, 6, "cpu"))


def test_summaries(gt):
  assert gt.summarize(np.array([2.0, 1.0, 0.5, 0.25])) == (0.9375, 0.25)
  assert gt.summarize(np.array([1.0, np.nan, np.nan])) == (math.inf, math.inf)
  assert gt.summarize(np.array([1.0, 11.0, 0.1])) == (math.inf, math.inf)  # left [0, 10 x the first loss]
