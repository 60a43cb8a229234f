"""Divergence: NaN/inf losses and non-finite gradients in part of the meta-batch do not poison meta-training.

The faulty tasks are registered only inside these tests. A problem is faulty when a key-derived coin says so; from
``after_step`` on, its loss is NaN or inf, or its gradient is NaN (injected with a custom VJP, the forward value is
clean). Training must go on, theta must stay finite, and the counts must reach metrics.jsonl and the progress line.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lopt.cli
from lopt import tasks
from lopt.meta.config import MetaTrainConfig
from lopt.meta.train import build_outer_step, load_metrics, meta_train, optimizer_from, outer_optimizer_from
from lopt.tasks.base import Task

TINY = dict(hidden_size=4, horizon=10, meta_batch_size=8, num_steps=4, eval_every=2, log_every=1,
            checkpoint_every=2, num_eval_problems=4, seed=5)


@jax.custom_vjp
def _poison_gradient(x, bad):
  return x


_poison_gradient.defvjp(lambda x, bad: (x, bad), lambda bad, g: (jnp.where(bad, jnp.nan, g), None))


def faulty_quadratic(kind: str = "nan_loss", fraction: float = 0.5, after_step: int = 3, horizon: int = 10) -> Task:
  """A 3-d quadratic whose problems fail, with probability ``fraction``, in the way ``kind`` says."""

  def init(key):
    return jax.random.normal(jax.random.fold_in(key, 0), (3,))

  def loss(x, key, step):
    bad = (jax.random.uniform(jax.random.fold_in(key, 12345)) < fraction) & (step >= after_step)
    if kind == "nan_gradient":
      x = _poison_gradient(x, bad)
    clean = 0.5 * jnp.sum(x**2) + 1.0
    if kind == "nan_loss":
      return jnp.where(bad, jnp.nan, clean)
    if kind == "inf_loss":
      return jnp.where(bad, jnp.inf, clean)
    return clean

  options = dict(kind=kind, fraction=fraction, after_step=after_step, horizon=horizon)
  return Task("faulty_quadratic", init, loss, horizon, options=options)


@pytest.fixture(autouse=True)
def registered(monkeypatch):
  monkeypatch.setitem(tasks.REGISTRY, "faulty_quadratic", faulty_quadratic)


def _finite(theta) -> bool:
  return all(bool(np.all(np.isfinite(np.asarray(v)))) for v in theta.values())


@pytest.mark.parametrize("kind", ["nan_loss", "inf_loss", "nan_gradient"])
def test_training_continues_with_part_of_the_batch_diverging(kind, tmp_path):
  config = MetaTrainConfig(task="faulty_quadratic", task_options={"kind": kind}, **TINY)
  records = []
  state = meta_train(config, tmp_path, progress=lambda step, total, record: records.append(record))
  assert state.step == config.num_steps
  assert _finite(state.theta) and _finite(state.best_theta)
  logged = load_metrics(tmp_path)
  assert [r["step"] for r in logged] == [1, 2, 3, 4]
  assert all(0 < r["diverged_problems"] < config.meta_batch_size for r in logged)
  assert all(r["skipped"] == 0 for r in logged)  # some problems stayed healthy: every step made progress
  for field in ("diverged_problems", "dropped_problems", "skipped", "total_skipped_steps"):
    assert all(field in r for r in logged + records)
  if kind == "nan_gradient":  # NaN parameters give NaN meta-gradients: those problems are left out and counted
    assert all(r["dropped_problems"] > 0 for r in logged)
  assert state.dropped_problems == sum(r["dropped_problems"] for r in logged)
  theta = jax.tree.map(np.asarray, state.theta)
  initial = optimizer_from(config).init(jax.random.key(config.seed))
  assert any(not np.array_equal(theta[k], np.asarray(initial[k])) for k in theta), "theta never moved"


def test_a_step_where_every_problem_fails_is_skipped_and_counted():
  task = faulty_quadratic("nan_gradient", fraction=1.0, after_step=0)
  config = MetaTrainConfig(**TINY)
  optimizer, outer = optimizer_from(config), outer_optimizer_from(config)
  theta = optimizer.init(jax.random.key(0))
  outer_state = outer.init(theta)
  step = build_outer_step(task, optimizer, outer, horizon=10)
  keys = jax.random.split(jax.random.key(1), 4)
  new_theta, new_state, metrics = step(theta, outer_state, keys)
  assert int(metrics.skipped) == 1 and int(metrics.dropped_problems) == 4 and int(metrics.diverged_problems) == 4
  for k in theta:
    np.testing.assert_array_equal(np.asarray(new_theta[k]), np.asarray(theta[k]))
  # The outer optimizer's state (Adam moments, step count) is not advanced by a skipped step either.
  for a, b in zip(jax.tree.leaves(new_state), jax.tree.leaves(outer_state)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_dropped_problems_leave_the_mean_of_the_healthy_ones():
  """Known answer: with the failing problems dropped, the step equals a step on the healthy problems alone."""
  task = faulty_quadratic("nan_gradient", fraction=0.5, after_step=2)
  config = MetaTrainConfig(**TINY)
  optimizer, outer = optimizer_from(config), outer_optimizer_from(config)
  theta = optimizer.init(jax.random.key(0))
  theta = {**theta, "readout_weights": 0.1 * jnp.ones_like(theta["readout_weights"])}  # so the unroll matters
  keys = jax.random.split(jax.random.key(2), 8)
  bad = np.asarray(jax.vmap(lambda k: jax.random.uniform(jax.random.fold_in(k, 12345)) < 0.5)(keys))
  assert 0 < bad.sum() < 8
  step = build_outer_step(task, optimizer, outer, horizon=10, l2_penalty=0.0)
  mixed, _, metrics = step(theta, outer.init(theta), keys)
  healthy, _, _ = step(theta, outer.init(theta), keys[~bad])
  assert int(metrics.dropped_problems) == int(bad.sum()) and int(metrics.skipped) == 0
  for k in theta:
    np.testing.assert_allclose(np.asarray(mixed[k]), np.asarray(healthy[k]), rtol=1e-5, atol=1e-7)


def test_skip_step_leaves_theta_and_counts_every_problem_dropped():
  """on_nonfinite="skip_step": a non-finite batch meta-gradient skips the outer step (no per-problem fallback); a
  finite one gives the default's step exactly."""
  task = faulty_quadratic("nan_gradient", fraction=0.5, after_step=2)
  config = MetaTrainConfig(**TINY)
  optimizer, outer = optimizer_from(config), outer_optimizer_from(config)
  theta = optimizer.init(jax.random.key(0))
  theta = {**theta, "readout_weights": 0.1 * jnp.ones_like(theta["readout_weights"])}
  keys = jax.random.split(jax.random.key(2), 8)
  bad = np.asarray(jax.vmap(lambda k: jax.random.uniform(jax.random.fold_in(k, 12345)) < 0.5)(keys))
  skipping = build_outer_step(task, optimizer, outer, horizon=10, l2_penalty=0.0, on_nonfinite="skip_step")
  dropping = build_outer_step(task, optimizer, outer, horizon=10, l2_penalty=0.0)
  new, _, metrics = skipping(theta, outer.init(theta), keys)
  assert int(metrics.dropped_problems) == 8 and int(metrics.skipped) == 1
  for k in theta:
    np.testing.assert_array_equal(np.asarray(new[k]), np.asarray(theta[k]))
  healthy, _, metrics = skipping(theta, outer.init(theta), keys[~bad])
  assert int(metrics.dropped_problems) == 0 and int(metrics.skipped) == 0
  reference, _, _ = dropping(theta, outer.init(theta), keys[~bad])
  for k in theta:
    np.testing.assert_array_equal(np.asarray(healthy[k]), np.asarray(reference[k]))


def test_counts_reach_the_progress_line(tmp_path, capsys):
  code = lopt.cli.main(["train", "faulty_quadratic", "--out", str(tmp_path / "run"), "--task-option",
                        "kind=nan_gradient", "--steps", "4", "--hidden-size", "4", "--horizon", "10",
                        "--meta-batch-size", "8", "--eval-every", "2", "--seed", "5"])
  err = capsys.readouterr().err
  assert code == 0, err
  lines = [line for line in err.splitlines() if line.startswith("meta-training: step")]
  assert lines and all("diverged" in line and "dropped" in line and "skipped" in line for line in lines)
  diverged = [int(line.split("diverged ")[1].split()[0]) for line in lines]
  assert all(d > 0 for d in diverged)
  records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
  assert [r["diverged_problems"] for r in records] == diverged
  lopt.load_optimizer(tmp_path / "run")  # the export is finite (load_optimizer refuses non-finite weights)
