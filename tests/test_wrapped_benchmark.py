"""benchmarks/wrapped_benchmark.py: `lopt benchmark` with every trained optimizer replaced by a variant, cached apart
from the plain optimizer's results, the baselines shared."""

import json

import jax
import optax
import pytest

import lopt.trained
from conftest import load_script
from lopt.evaluation import benchmark

TINY = ["--problems", "least_squares,matrix_completion", "--tuning-seeds", "1", "--eval-seeds", "1", "--horizon", "30",
        "--learning-rates", "1e-2,1e-1", "--nadamw-trials", "2"]


@pytest.fixture(scope="module")
def wrapped():
  return load_script("benchmarks/wrapped_benchmark.py")


def frozen(trained, transformation):
  """A variant that never moves the parameters."""
  def update(updates, state, params=None, **extra):
    updates, state = transformation.update(updates, state, params, **extra)
    return jax.tree.map(lambda u: 0 * u, updates), state
  return optax.GradientTransformationExtraArgs(transformation.init, update)


def test_the_variant_is_undone_on_leaving_even_after_an_error(wrapped):
  plain = (lopt.trained.TrainedOptimizer.as_optax, benchmark.learned_optimizers)
  with pytest.raises(RuntimeError):
    with wrapped.variant(lambda trained, transformation: ("wrapped", trained.path), "tagged"):
      assert lopt.load("general").as_optax()[0] == "wrapped"
      assert benchmark.learned_optimizers(["general"])["general"]["identity"]["variant"] == "tagged"
      raise RuntimeError
  assert (lopt.trained.TrainedOptimizer.as_optax, benchmark.learned_optimizers) == plain
  assert "variant" not in benchmark.learned_optimizers(["general"])["general"]["identity"]


@pytest.mark.slow  # 44 s of CI; a development script
def test_a_variant_is_benchmarked_and_cached_apart_from_the_plain_optimizer(wrapped, tmp_path, monkeypatch):
  out = tmp_path / "bench"
  argv = ["benchmark", "general", "--out", str(out), *TINY]
  assert wrapped.benchmark_wrapped(lambda trained, transformation: transformation, "plain", argv) == 0
  plain = json.loads((out / "benchmark.json").read_text())
  cached = set((out / "cache").iterdir())
  assert wrapped.benchmark_wrapped(frozen, "frozen", argv) == 0   # the same directory: only general runs again
  still = json.loads((out / "benchmark.json").read_text())
  new = set((out / "cache").iterdir()) - cached
  assert sorted(p.name.split(".")[:2] for p in new) == [["least_squares", "general"], ["matrix_completion", "general"]]
  for name, problem in still["problems"].items():
    result, before = problem["results"]["general"], plain["problems"][name]["results"]["general"]
    assert result["mean_loss"] == pytest.approx(result["initial_loss"])   # the variant's curve, not the cache's
    assert before["mean_loss"] < before["initial_loss"]
    for baseline in benchmark.BASELINES:
      assert problem["results"][baseline] == plain["problems"][name]["results"][baseline]

  def no_work(*args, **kwargs):
    raise AssertionError("a cached result was recomputed")
  monkeypatch.setattr(benchmark, "run_job", no_work)   # each variant resumes from its own results
  assert wrapped.benchmark_wrapped(frozen, "frozen", argv) == 0
  assert wrapped.benchmark_wrapped(lambda trained, transformation: transformation, "plain", argv) == 0
