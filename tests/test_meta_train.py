"""Meta-training: the meta-gradient against finite differences, exact resume, robustness to divergence."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lopt import tasks
from lopt.meta.config import MetaTrainConfig
from lopt.meta.train import build_outer_step, load_metrics, meta_train, problem_meta_loss
from lopt.optimizers import GRUOptimizer
from lopt.tasks.base import Task

TINY = MetaTrainConfig(hidden_size=4, meta_batch_size=4, horizon=8, num_steps=12, eval_every=4, log_every=1,
                       checkpoint_every=4, num_eval_problems=4, task_options={"dim": 3})


def test_meta_gradient_matches_finite_differences_float64():
  with jax.enable_x64(True):
    task = tasks.get("linear_regression", dim=3, horizon=6)
    optimizer = GRUOptimizer(hidden_size=4, input_scale=0.3, output_scale=2.0)
    theta = optimizer.init(jax.random.key(0))
    theta["readout_weights"] = 0.2 * jax.random.normal(jax.random.key(1), theta["readout_weights"].shape)
    theta["initial_state"] = 0.3 * jax.random.normal(jax.random.key(2), theta["initial_state"].shape)
    key = jax.random.key(3)

    def loss(t):
      return problem_meta_loss(task, optimizer, t, key, horizon=6, remat=True)[0]

    grad = jax.grad(loss)(theta)
    for seed in range(3):
      direction = jax.tree.map(lambda x, k=jax.random.key(10 + seed): jax.random.normal(k, x.shape, x.dtype), theta)
      eps = 1e-6
      plus = loss(jax.tree.map(lambda t, d: t + eps * d, theta, direction))
      minus = loss(jax.tree.map(lambda t, d: t - eps * d, theta, direction))
      numeric = (plus - minus) / (2 * eps)
      analytic = sum(jnp.vdot(g, d) for g, d in zip(jax.tree.leaves(grad), jax.tree.leaves(direction)))
      assert abs(float(analytic)) > 1e-4  # a real, non-trivial derivative
      np.testing.assert_allclose(float(analytic), float(numeric), rtol=1e-6)


def test_first_order_meta_gradient_treats_inner_gradients_as_constants():
  # Independent construction: a task whose gradient is taken at stop_gradient(params) has, for autodiff, inner
  # gradients that do not depend on theta. Its meta-gradient must equal first_order's; the losses are unchanged and
  # the full meta-gradient (which has the second-order terms) must differ.
  with jax.enable_x64(True):
    task = tasks.get("linear_regression", dim=3, horizon=6)
    optimizer = GRUOptimizer(hidden_size=4, input_scale=0.3, output_scale=2.0)
    theta = optimizer.init(jax.random.key(0))
    theta["readout_weights"] = 0.2 * jax.random.normal(jax.random.key(1), theta["readout_weights"].shape)
    key = jax.random.key(3)

    def meta_loss(t, first_order):
      return problem_meta_loss(task, optimizer, t, key, horizon=6, first_order=first_order)[0]

    def frozen_gradient_meta_loss(t):
      from lopt.optimizers import as_optax
      inner = as_optax(optimizer, t)
      params = task.init(key)
      state, losses = inner.init(params), []
      for step in range(6):
        loss = task.loss(params, key, step)
        grads = jax.grad(task.loss)(jax.lax.stop_gradient(params), key, step)
        updates, state = inner.update(grads, state, params, value=jax.lax.stop_gradient(loss))
        params = optax.apply_updates(params, updates)
        losses.append(loss)
      losses = jnp.stack(losses)
      return jnp.mean(losses / losses[0])

    np.testing.assert_allclose(float(meta_loss(theta, True)), float(meta_loss(theta, False)), rtol=1e-12)
    np.testing.assert_allclose(float(meta_loss(theta, True)), float(frozen_gradient_meta_loss(theta)), rtol=1e-10)
    first = jax.grad(meta_loss)(theta, True)
    full = jax.grad(meta_loss)(theta, False)
    expected = jax.grad(frozen_gradient_meta_loss)(theta)
    for name in theta:
      np.testing.assert_allclose(np.asarray(first[name]), np.asarray(expected[name]), rtol=1e-8, atol=1e-12)
    difference = sum(float(jnp.sum((first[n] - full[n]) ** 2)) for n in theta)
    assert difference > 1e-8  # the second-order terms are really gone


def test_meta_training_reduces_the_held_out_loss(tmp_path):
  config = TINY.replace(num_steps=40, eval_every=20, learning_rate=1e-2, input_scale=0.1, output_scale=10.0)
  state = meta_train(config, tmp_path / "run")
  metrics = load_metrics(tmp_path / "run")
  held_out = [m["held_out_loss"] for m in metrics if "held_out_loss" in m]
  untrained = 1.0  # a zero readout leaves the loss at its initial value: normalized mean loss exactly 1
  assert held_out[-1] < 0.8 * untrained
  assert state.best_score == min(held_out)
  assert (tmp_path / "run" / "optimizer" / "weights.safetensors").exists()


class _Interrupt(Exception):
  pass


# In the slow run: the default run covers resuming after an interruption through the CLI (test_reliability_interrupt,
# test_reliability_kill) and mid-episode (test_truncated_training).
@pytest.mark.slow
def test_interrupted_run_resumes_to_the_same_theta(tmp_path):
  reference = meta_train(TINY, tmp_path / "reference")

  def stop_at_step_7(step, total, record):
    if step == 7:
      raise _Interrupt  # like a kill after the checkpoint at step 4: steps 5-7 are lost and redone

  with pytest.raises(_Interrupt):
    meta_train(TINY, tmp_path / "resumed", progress=stop_at_step_7)
  resumed = meta_train(TINY, tmp_path / "resumed", resume=True)
  for name in reference.theta:
    np.testing.assert_array_equal(np.asarray(reference.theta[name]), np.asarray(resumed.theta[name]))
    np.testing.assert_array_equal(np.asarray(reference.best_theta[name]), np.asarray(resumed.best_theta[name]))
  steps = [m["step"] for m in load_metrics(tmp_path / "resumed")]
  assert steps == sorted(set(steps)) == list(range(1, TINY.num_steps + 1))  # no duplicate or missing log lines
  reference_log = [m["meta_loss"] for m in load_metrics(tmp_path / "reference")]
  assert [m["meta_loss"] for m in load_metrics(tmp_path / "resumed")] == reference_log


def test_ctrl_c_exports_the_best_optimizer_so_far_and_resume_replaces_it(tmp_path):
  """A Ctrl-C after a held-out evaluation leaves the best theta so far as the run's optimizer (a device session
  that ends mid-run still brings a usable optimizer back); the finished run's export replaces it."""
  import os
  import signal

  from lopt import interrupts
  from lopt.checkpoint import read_json

  def ctrl_c_at_step_6(step, total, record):
    if step == 6:
      os.kill(os.getpid(), signal.SIGINT)

  run = tmp_path / "run"
  with pytest.raises(KeyboardInterrupt):
    meta_train(TINY, run, progress=ctrl_c_at_step_6)
  interrupts.clear()
  info = read_json(run / "optimizer" / "config.json", "optimizer")["info"]
  assert (info["best_step"], info["final_step"]) == (4, 6)
  best = [m["best_held_out_loss"] for m in load_metrics(run) if m["step"] == 6][0]
  assert info["held_out_loss"] == best
  finished = meta_train(TINY, run, resume=True)
  info = read_json(run / "optimizer" / "config.json", "optimizer")["info"]
  assert info["final_step"] == TINY.num_steps and info["best_step"] == finished.best_step


def test_existing_run_without_resume_is_refused(tmp_path):
  from lopt.meta.run import RunError
  meta_train(TINY.replace(num_steps=1), tmp_path / "run")
  with pytest.raises(RunError, match="pass --resume"):
    meta_train(TINY.replace(num_steps=1), tmp_path / "run")
  with pytest.raises(RunError, match=r"differs from the requested one in \['outer.learning_rate'\]"):
    meta_train(TINY.replace(num_steps=1, learning_rate=1e-3), tmp_path / "run", resume=True)


def test_resume_with_more_steps_extends_the_run(tmp_path):
  # --resume --steps N: the trajectory depends on the step alone, so 3 steps then 3 more equal 6 steps in one go.
  reference = meta_train(TINY.replace(num_steps=6), tmp_path / "reference")
  meta_train(TINY.replace(num_steps=3), tmp_path / "run")
  extended = meta_train(TINY.replace(num_steps=6), tmp_path / "run", resume=True)
  assert extended.step == 6
  for name in reference.theta:
    np.testing.assert_array_equal(np.asarray(reference.theta[name]), np.asarray(extended.theta[name]))
  from lopt.checkpoint import read_json
  assert read_json(tmp_path / "run" / "config.json", "run config")["outer"]["num_steps"] == 6


def _poisoned_task(bad_fraction=0.5):
  """Linear regression whose loss becomes NaN after step 2 on about ``bad_fraction`` of the problem keys."""
  base = tasks.get("linear_regression", dim=3, horizon=8)

  def loss(params, key, step):
    bad = jax.random.uniform(jax.random.fold_in(key, 99)) < bad_fraction
    return jnp.where(bad & (step > 2), jnp.nan, 1.0) * base.loss(params, key, step)

  return Task("poisoned", base.init, loss, 8)


@pytest.mark.parametrize("bad_fraction,expect_skip", [(0.5, False), (1.0, True)])
def test_diverging_problems_do_not_poison_theta(bad_fraction, expect_skip):
  optimizer = GRUOptimizer(hidden_size=4, input_scale=0.1, output_scale=10.0)
  outer = optax.adam(1e-2)
  step = build_outer_step(_poisoned_task(bad_fraction), optimizer, outer, horizon=8)
  theta = optimizer.init(jax.random.key(0))
  theta["readout_weights"] = 0.1 * jnp.ones_like(theta["readout_weights"])
  state = outer.init(theta)
  keys = jax.random.split(jax.random.key(1), 8)
  new_theta, _, metrics = step(theta, state, keys)
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(new_theta))
  assert int(metrics.diverged_problems) > 0
  assert int(metrics.skipped) == int(expect_skip)
  changed = any(not np.array_equal(new_theta[k], theta[k]) for k in theta)
  assert changed != expect_skip
  if not expect_skip:
    assert 0 < int(metrics.dropped_problems) < 8


def test_exploding_inner_problem_costs_a_bounded_loss():
  optimizer = GRUOptimizer(hidden_size=4, output_scale=1000.0)
  theta = optimizer.init(jax.random.key(0))
  theta["readout_weights"] = -jnp.ones_like(theta["readout_weights"])  # steps *up* the gradient: divergence
  task = tasks.get("linear_regression", dim=3)
  value, diverged = problem_meta_loss(task, optimizer, theta, jax.random.key(2), horizon=30, loss_cap=10.0)
  assert bool(diverged) and 1.0 < float(value) <= 10.0


def test_config_round_trip_and_unknown_keys():
  config = MetaTrainConfig().replace(hidden_size=7)
  assert MetaTrainConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
  with pytest.raises(ValueError, match="unknown meta-training setting"):
    MetaTrainConfig.from_dict({"hiden_size": 3})


def test_meta_train_from_python_shows_progress(tmp_path, capsys):
  meta_train(TINY.replace(num_steps=4), tmp_path / "run")
  err = capsys.readouterr().err
  assert "meta-training: step 4/4" in err and "meta-loss" in err
  meta_train(TINY.replace(num_steps=4), tmp_path / "quiet", progress=False)
  assert "meta-training" not in capsys.readouterr().err


def test_resume_of_a_directory_without_a_run_is_refused(tmp_path):
  from lopt.cli import main
  from lopt.meta.run import RunError
  with pytest.raises(RunError, match="holds no run to resume"):
    meta_train(TINY.replace(num_steps=1), tmp_path / "empty", resume=True)
  assert main(["train", "linear_regression", "--out", str(tmp_path / "empty2"), "--resume"]) == 2
  assert not (tmp_path / "empty2").exists()


def test_a_run_directory_written_by_lopt_0_1_loads_and_resumes(tmp_path):
  """tests/data/lopt_0_1_run: 3 steps of a tiny run written by lopt 0.1.0 (flat config.json, format-1 optimizer,
  checkpoints with theta by name). It loads, resumes to 6 steps, and ends where an unbroken run of today ends."""
  import shutil
  from pathlib import Path

  import lopt
  from lopt.checkpoint import read_json
  from lopt.meta.config import MetaTrainConfig
  old = tmp_path / "old"
  shutil.copytree(Path(__file__).parent / "data" / "lopt_0_1_run", old)
  saved = read_json(old / "config.json", "run config")
  assert saved["hidden_size"] == 4 and "outer" not in saved  # the flat record of lopt 0.1
  assert lopt.load(old).optimizer.hidden_size == 4
  config = MetaTrainConfig.from_dict(saved).replace(num_steps=6)
  resumed = meta_train(config, old, resume=True, progress=False)
  unbroken = meta_train(config, tmp_path / "new", progress=False)
  assert resumed.step == 6
  for name in unbroken.theta:
    # Not bit for bit: the saved steps ran on another CPU, whose vector width rounds float32 differently (exact
    # resume on one machine is tested elsewhere in this file).
    np.testing.assert_allclose(np.asarray(resumed.theta[name]), np.asarray(unbroken.theta[name]), rtol=1e-5, atol=1e-8)
  assert read_json(old / "config.json", "run config")["outer"]["num_steps"] == 6  # upgraded to sections
