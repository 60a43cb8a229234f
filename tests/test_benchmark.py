"""lopt benchmark: the held-out suite (every problem trains, none is a family sample), the metrics on hand-made curves,
a tiny end-to-end run with its report, resuming from the cache, and the command line's errors."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lopt.cli import main
from lopt.evaluation import benchmark as b
from lopt.evaluation import suite
from lopt.tasks import families


# -- the suite -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(suite.PROBLEMS))
def test_problem_builds_and_adam_reduces_its_loss(name):
  task = suite.get(name).task(horizon=30)
  key = jax.random.key(1)
  optimizer = optax.adam(1e-2)

  @jax.jit
  def check(params):
    """Initial loss, validation loss and gradient norm; the mean loss over the same 4 minibatches (their noise
    cancels) before and after 30 Adam steps."""
    batches = lambda p: jnp.mean(jnp.stack([task.loss(p, key, t) for t in range(4)]))
    loss, grads = jax.value_and_grad(task.loss)(params, key, 0)

    def step(carry, t):
      p, state = carry
      updates, state = optimizer.update(jax.grad(task.loss)(p, key, t), state, p)
      return (optax.apply_updates(p, updates), state), None
    (trained, _), _ = jax.lax.scan(step, (params, optimizer.init(params)), jnp.arange(30))
    norm = jnp.sqrt(sum(jnp.sum(g**2) for g in jax.tree.leaves(grads)))
    return loss, task.valid_loss(params, key, 0), norm, batches(params), batches(trained)
  loss, valid, norm, before, after = map(float, check(task.init(key)))
  assert np.isfinite(loss) and np.isfinite(valid) and 0 < norm < np.inf
  assert after < before


def test_suite_covers_what_the_benchmark_promises():
  problems = suite.PROBLEMS.values()
  assert len(suite.PROBLEMS) >= 12
  assert any(max(p.options.get("hidden", (0,))) >= 1024 for p in problems)  # wider than the families' 512
  assert any(p.horizon >= 4 * 2000 for p in problems)  # 4x the families' longest horizon
  assert {2, 1024} <= {p.batch_size for p in problems}
  assert any(p.builder is suite.residual_mlp and p.options["blocks"] >= 6 for p in problems)
  kinds = {p.builder for p in problems}
  assert {suite.sort_transformer, suite.linear, suite.adding_gru, suite.matrix_completion, suite.cnn} <= kinds
  quick = [suite.PROBLEMS[n] for n in suite.QUICK]
  assert len(quick) >= 6 and all(p.quick_horizon < p.horizon for p in quick)
  assert any(p.traits.get("convex") for p in quick) and any(p.builder is suite.sort_transformer for p in quick)


@pytest.mark.parametrize("name", list(suite.PROBLEMS))
def test_no_problem_is_a_configuration_a_family_samples(name):
  problem = suite.get(name)
  assert suite.held_out_reasons(problem), f"{name} could be sampled by family {problem.family!r}"
  if problem.family is not None:  # the view speaks the family's terms: every field it names is one of them
    family = families.get(problem.family)
    fields = {*family.space, "dataset", "data"}
    assert set(problem.view) <= fields, set(problem.view) - fields


def test_held_out_check_accepts_a_sampled_configuration():
  config = families.sample(3, "mlp")
  view = {k: config[k] for k in ("dataset", "depth", "width", "activation", "batch_size")}
  problem = suite.Problem("x", "k", "", suite.mlp, {}, config["horizon"], family="mlp", view=view)
  assert suite.held_out_reasons(problem) == []


# -- metrics ---------------------------------------------------------------------------------------------------------

def test_final_loss_divergence_and_validation():
  train = np.array([np.linspace(1.0, 0.1, 100), np.r_[1.0, np.nan, np.ones(98)], np.r_[1.0, np.full(99, 20.0)]])
  np.testing.assert_allclose(b.final_loss(train)[0], np.mean(train[0, -5:]))
  assert list(b.diverged(train)) == [False, True, True]
  assert b.mean_loss(train)[1] == np.inf
  valid = np.arange(10.0)[None]  # recorded at steps 0, 10, ..., 90 of 100: the last 5 steps hold none -> the last
  assert b.final_valid_loss(valid, 100)[0] == 9.0
  assert b.final_valid_loss(np.arange(100.0)[None], 1000)[0] == np.mean([95, 96, 97, 98, 99])


def test_win_and_win_rate():
  assert b.win(1.0, 2.0) == 1.0 and b.win(2.0, 1.0) == 0.0 and b.win(1.0, 1.0) == 0.5
  assert b.win(float("nan"), 1.0) == 0.0 and b.win(1.0, float("inf")) == 1.0 and b.win(np.inf, np.nan) == 0.5
  rows = [{"ratio_mean_loss": r, "speedup": s, "wins": {n: {"mean_loss": w, "final_loss": 1.0} for n in b.BASELINES}}
          for r, s, w in ((0.5, 2.0, 1.0), (2.0, 0.5, 0.0), (1.0, 1.0, 0.5), (0.8, 4.0, 1.0))]
  per_problem = {f"p{i}": {"learned": {"x": row}, "results": {"x": {"diverged_seeds": 0}}}
                 for i, row in enumerate(rows)}
  summary = b.summarize(per_problem, ["x"])["x"]
  assert summary["win_rate"]["adam_tuned"] == {"mean_loss": 0.625, "final_loss": 1.0}
  assert summary["median_ratio_mean_loss"] == pytest.approx(0.9)
  assert summary["geometric_mean_ratio_mean_loss"] == pytest.approx((0.5 * 2.0 * 1.0 * 0.8) ** 0.25)
  assert summary["speedup_iqm"] == pytest.approx(1.5)  # the middle two of 0.5, 1, 2, 4


def test_running_mean():
  np.testing.assert_allclose(b.running_mean(np.array([1.0, 2.0, 3.0, 4.0]), 2), [1.0, 1.5, 2.5, 3.5])
  np.testing.assert_array_equal(b.running_mean(np.array([1.0, np.nan, 3.0, 4.0]), 2), [1.0, np.inf, np.inf, 3.5])
  np.testing.assert_allclose(b.running_mean(np.array([2.0, 4.0]), 5), [2.0, 3.0])


def test_speedup_both_branches():
  reference = np.ones(100)
  reference[60:] = 0.5  # tuned Adam: final 0.5, first at step 61
  learned = np.ones(100)
  learned[25:] = 0.4  # reaches 0.5 at step 26 of 100
  assert b.speedup(learned, reference, fraction=0.01) == pytest.approx(61 / 26)  # both at 0.5: steps 61 and 26
  slow = np.ones(100)
  slow[-1] = 0.8  # ends at 0.8 (step 100); Adam first reaches 0.8 at step 61
  assert b.speedup(slow, reference, fraction=0.01) == pytest.approx(0.61)
  assert b.speedup(reference, reference, fraction=0.01) == pytest.approx(1.0)  # the same curve: no speedup
  assert b.speedup(np.r_[1.0, np.full(99, np.nan)], reference) == pytest.approx(1 / 100)  # diverged: the floor
  assert b.speedup(reference, slow, fraction=0.01) == pytest.approx(1 / 0.61)  # swapping the curves inverts it
  # Smoothed over 5% of the horizon (5 steps): the learned curve reaches 0.5 at step 30, Adam at step 65.
  assert b.speedup(learned, reference) == pytest.approx(65 / 30)


def test_iqm_and_bootstrap_interval():
  assert b.iqm([1, 2, 3, 4, 100, -50, 5, 6]) == pytest.approx(3.5)
  scipy_stats = pytest.importorskip("scipy.stats")
  values = np.random.default_rng(0).lognormal(size=13)
  assert b.iqm(values) == pytest.approx(scipy_stats.trim_mean(values, 0.25))
  low, high = b.bootstrap_interval(values)
  assert low <= b.iqm(values) <= high and low < high
  assert b.bootstrap_interval(values) == (low, high)  # seeded


def test_validation_losses_every_ten_steps_and_nan_between():
  task = suite.get("least_squares").task(horizon=25)
  seen = []

  def record(grads, state, params=None, **extra):
    seen.append(extra)
    return jax.tree.map(jnp.zeros_like, grads), state
  spy = optax.GradientTransformationExtraArgs(lambda p: (), record)
  train, valid = b.unroll_with_validation(task, spy, jax.random.key(0), 25)
  assert set(seen[0]) == {"value", "valid_loss", "num_steps"} and seen[0]["num_steps"] == 25
  valid = np.asarray(valid)
  assert np.all(np.isfinite(valid[::10])) and np.all(np.isnan(np.delete(valid, [0, 10, 20])))
  np.testing.assert_allclose(valid[::10], float(task.valid_loss(task.init(jax.random.key(0)), None)), rtol=1e-6)


def test_nadamw_trials_are_seeded_and_in_range():
  trials = b.nadamw_trials()
  assert all(len(v) == b.NADAMW_TRIALS for v in trials.values()) and b.NADAMW_TRIALS >= 20
  assert np.all((trials["learning_rate"] >= 1e-5) & (trials["learning_rate"] <= 1))
  assert np.any(trials["weight_decay"] == 0) and np.any(trials["warmup_fraction"] == 0)
  np.testing.assert_array_equal(trials["b1"], b.nadamw_trials()["b1"])
  assert len(b.ADAM_LEARNING_RATES) >= 13 and min(b.ADAM_LEARNING_RATES) == pytest.approx(1e-5)
  schedule_peak = b.nadamw_cosine(1e-2, 0.9, 0.999, 0.0, 0.1, horizon=100)  # builds with a warmup
  assert schedule_peak.init(jnp.zeros(3)) is not None


# -- end to end ------------------------------------------------------------------------------------------------------

TINY = ["--problems", "least_squares,matrix_completion", "--tuning-seeds", "1", "--eval-seeds", "1", "--horizon", "40",
        "--learning-rates", "1e-2,1e-1", "--nadamw-trials", "2"]


def test_tiny_benchmark_writes_results_and_report_then_resumes(tmp_path, monkeypatch, capsys):
  out = tmp_path / "bench"
  assert main(["benchmark", "two_moons", "--out", str(out), *TINY]) == 0
  printed = capsys.readouterr().out
  assert "two_moons/adam" in printed and "speedup over tuned Adam IQM" in printed
  result = json.loads((out / "benchmark.json").read_text())
  assert set(result["problems"]) == {"least_squares", "matrix_completion"}
  assert set(result["machine"]["versions"]) >= {"python", "jax", "optax", "lopt"}
  problem = result["problems"]["least_squares"]
  assert set(problem["results"]) == {"two_moons", *b.BASELINES}
  assert problem["results"]["adam_tuned"]["hyperparameters"]["learning_rate"] in (pytest.approx(1e-2),
                                                                                  pytest.approx(1e-1))
  assert len(problem["results"]["adam_tuned"]["tuning"]["scores"]) == 2
  assert set(problem["results"]["nadamw_cosine"]["hyperparameters"]) == {"learning_rate", "b1", "b2", "weight_decay",
                                                                          "warmup_fraction"}
  assert problem["results"]["adam_1e-3"]["hyperparameters"] == {"learning_rate": pytest.approx(1e-3)}
  assert "gap" in problem["results"]["two_moons"] and problem["learned"]["two_moons"]["speedup"] > 0
  assert set(result["summary"]["two_moons"]["win_rate"]) == set(b.BASELINES)
  html = (out / "report.html").read_text()
  assert html.count("data:image/png;base64") >= 5 and "Tuned hyperparameters" in html
  cached = sorted((out / "cache").iterdir())
  assert len(cached) == 8

  def no_work(*args, **kwargs):
    raise AssertionError("a cached result was recomputed")
  monkeypatch.setattr(b, "run_job", no_work)  # a rerun with the same settings reads every result from the cache
  assert main(["benchmark", "two_moons", "--out", str(out), *TINY]) == 0
  assert json.loads((out / "benchmark.json").read_text())["problems"] == result["problems"]
  assert sorted((out / "cache").iterdir()) == cached
  with pytest.raises(AssertionError, match="recomputed"):  # other settings are other results
    main(["benchmark", "two_moons", "--out", str(out), *TINY[:-2], "--nadamw-trials", "3"])


@pytest.mark.parametrize("arguments, message", [
    (["two_moons", "--problems", "no_such_problem"], "unknown benchmark problem"),
    (["no_such_optimizer", "--problems", "least_squares"], "no such trained optimizer"),
    (["two_moons", "--eval-seeds", "many"], "--eval-seeds: expected a positive integer"),
    (["two_moons", "--tuning-seeds", "0"], "--tuning-seeds: expected a positive integer"),
    (["two_moons", "--problems", " , "], "--problems"),
])
def test_bad_input_exits_2_with_one_line(arguments, message, tmp_path, capsys):
  assert main(["benchmark", *arguments, "--out", str(tmp_path / "x")]) == 2
  err = capsys.readouterr().err.strip()
  assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err
  assert not (tmp_path / "x").exists()


def test_list(capsys):
  assert main(["benchmark", "--list"]) == 0
  out = capsys.readouterr().out
  assert all(name in out for name in suite.PROBLEMS) and "quick" in out
