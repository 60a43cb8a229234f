"""Reverse engineering of the hierarchical optimizer's per-tensor LSTM (lopt.dynamics.hierarchical,
lopt.pipeline.hierarchical_analysis): fixed points, linearization and gains against closed forms and finite
differences; the log step's equilibrium; the validation-response analysis on a hand-set theta whose log step falls
when the validation loss rises; and `lopt analyze` + `lopt report` on a small hierarchical run directory."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lopt.dynamics import hierarchical as hd

L, F = 3, 4  # hand-built controllers: 3 LSTM units, 4 inputs (alignment, log step, two time features)


def sigmoid(x):
  return 1 / (1 + np.exp(-x))


def controller(w_in, w_rec, bias, step_w=None, step_b=0.0, alignment_gain=0.0, schedule=(0.0, 0.0)) -> hd.Controller:
  return hd.Controller(lstm_w=np.concatenate([w_in, w_rec]), lstm_b=np.asarray(bias, np.float64),
                       step_w=np.zeros(L) if step_w is None else np.asarray(step_w, np.float64),
                       step_b=np.asarray(step_b, np.float64), alignment_gain=np.array([alignment_gain]),
                       schedule=np.asarray(schedule, np.float64), alignment_index=(0,), log_step_index=1,
                       time_index=(2, 3))


def test_zero_recurrent_weights_give_the_closed_form_fixed_point_and_spectrum():
  rng = np.random.default_rng(0)
  w_in, bias = rng.normal(size=(F, 4 * L)), rng.normal(size=4 * L)
  ctrl = controller(w_in, np.zeros((L, 4 * L)), bias, step_w=[0.5, -1.0, 2.0], step_b=0.1, alignment_gain=0.3)
  x = np.array([0.4, -0.2, 0.7, 0.1])
  i, f, g, o = np.split(x @ w_in + bias, 4)
  c_star = sigmoid(i) * np.tanh(g) / (1 - sigmoid(f))
  h_star = sigmoid(o) * np.tanh(c_star)
  cell, _ = hd.maps(ctrl)
  with jax.enable_x64(True):
    result = hd.fixed_point_analysis(ctrl, cell, x, rng.normal(size=(16, 2 * L)))
  fixed = result["fixed"]
  assert len(fixed.points) == 1 and fixed.num_converged == 1 and bool(fixed.stable[0])
  np.testing.assert_allclose(fixed.points[0], np.concatenate([h_star, c_star]), atol=1e-12)
  # J = [[0, dh'/dc], [0, diag(sigmoid(f))]]: eigenvalues sigmoid(f) and L zeros.
  linear = result["linearization"]
  expected = np.concatenate([np.sort(sigmoid(f))[::-1], np.zeros(L)])
  np.testing.assert_allclose(np.abs(linear["eigenvalues"]), expected, atol=1e-9)
  np.testing.assert_allclose(linear["time_constants"][:L], -1 / np.log(np.sort(sigmoid(f))[::-1]), rtol=1e-9)
  # The drift: w_s . h* + b_s + gain * alignment.
  assert linear["drift"] == pytest.approx(h_star @ ctrl.step_w + 0.1 + 0.3 * x[0], abs=1e-12)
  assert result["drifts"][0] == pytest.approx(linear["drift"], abs=1e-12)


def test_gains_match_finite_differences_of_the_fixed_point():
  rng = np.random.default_rng(1)
  ctrl = controller(rng.normal(size=(F, 4 * L)), 0.4 * rng.normal(size=(L, 4 * L)), rng.normal(size=4 * L),
                    step_w=rng.normal(size=L), step_b=0.05, alignment_gain=0.7)
  x = np.array([0.3, 0.1, -0.4, 0.6])
  cell, _ = hd.maps(ctrl)
  seeds = rng.normal(size=(8, 2 * L))
  with jax.enable_x64(True):
    linear = hd.fixed_point_analysis(ctrl, cell, x, seeds)["linearization"]
    point = lambda x: hd.fixed_point_analysis(ctrl, cell, x, seeds)  # noqa: E731
    eps = 1e-5
    for k in range(F):
      dx = eps * np.eye(F)[k]
      plus, minus = point(x + dx), point(x - dx)
      steady = (plus["drifts"][plus["best"]] - minus["drifts"][minus["best"]]) / (2 * eps)
      assert linear["steady_gain"][k] == pytest.approx(steady, abs=1e-6)
      # One step from the fixed point with the input moved: the immediate gain.
      s_star = point(x)["fixed"].points[0]
      step = lambda x_: float(hd.drift(ctrl, cell(jnp.asarray(s_star), jnp.asarray(x_)), jnp.asarray(x_)))  # noqa
      assert linear["immediate_gain"][k] == pytest.approx((step(x + dx) - step(x - dx)) / (2 * eps), abs=1e-6)
  assert linear["steady_gain"][0] != pytest.approx(linear["immediate_gain"][0])  # the LSTM's lag matters


def test_the_log_step_equilibrium_is_where_the_drift_vanishes():
  # No memory (forget gate shut), input and output gates open: h0 = s(o) tanh(s(i) tanh(a * L / 8)), and
  # D = -h0 + 0.1 vanishes at L* = 8 / a * atanh(atanh(0.1 / s(o)) / s(i)), with D falling in L: stable.
  a, bias = 2.0, np.zeros(4 * L)
  bias[:L], bias[L:2 * L], bias[3 * L:] = 3.0, -40.0, 4.0
  w_in = np.zeros((F, 4 * L))
  w_in[1, 2 * L] = a  # the log-step input (L / 8) into unit 0's cell candidate
  ctrl = controller(w_in, np.zeros((L, 4 * L)), bias, step_w=[-1.0, 0.0, 0.0], step_b=0.1)
  expected = 8 / a * np.arctanh(np.arctanh(0.1 / sigmoid(4.0)) / sigmoid(3.0))
  cell, closed = hd.maps(ctrl)
  x = np.zeros(F)
  with jax.enable_x64(True):
    curve = hd.drift_curve(ctrl, cell, x, np.zeros(2 * L))
    equilibria = hd.log_step_equilibria(ctrl, closed, cell, x, curve)
  assert np.all(np.isfinite(curve["drift"])) and np.all(np.diff(curve["drift"]) < 0)
  assert len(equilibria) == 1
  assert equilibria[0]["log_step"] == pytest.approx(expected, abs=1e-8)
  assert equilibria[0]["stable"] and not equilibria[0]["at_limit"]
  # The closed loop from zero reaches it; with b_s = 0.5 instead the drift stays positive: pinned at +8.
  with jax.enable_x64(True):
    trajectory = hd.controller_trajectory(ctrl, closed, np.zeros((400, F)))
    assert trajectory["log_step"][-1] == pytest.approx(expected, abs=1e-6)
    pinned = ctrl._replace(step_b=np.asarray(1.5))
    cell, closed = hd.maps(pinned)
    curve = hd.drift_curve(pinned, cell, x, np.zeros(2 * L))
    equilibria = hd.log_step_equilibria(pinned, closed, cell, x, curve)
  assert [e["at_limit"] for e in equilibria] == [True] and equilibria[0]["log_step"] == pytest.approx(8.0)


def test_the_direct_step_head_enters_the_drift_and_the_gains():
  """With ``direct_step`` the log step reads the inputs directly too. Without a readout of h, D = b_s + k . x, so both
  gains are k, and a negative gain on the log step's own input (x = L / 8) makes it revert to the level where D
  vanishes: here 0.1 + 0.2 * 0.5 - 0.5 L / 8 = 0 at L* = 3.2, a stable equilibrium."""
  rng = np.random.default_rng(2)
  gain = np.array([0.0, -0.5, 0.2, 0.0])  # on (alignment, log step, time 1, time 2)
  ctrl = controller(rng.normal(size=(F, 4 * L)), 0.3 * rng.normal(size=(L, 4 * L)), rng.normal(size=4 * L),
                    step_b=0.1)._replace(input_gain=gain)
  x = np.array([0.3, 0.0, 0.5, 0.1])
  cell, closed = hd.maps(ctrl)
  with jax.enable_x64(True):
    linear = hd.fixed_point_analysis(ctrl, cell, x, rng.normal(size=(8, 2 * L)))["linearization"]
    curve = hd.drift_curve(ctrl, cell, x, np.zeros(2 * L))
    equilibria = hd.log_step_equilibria(ctrl, closed, cell, x, curve)
  np.testing.assert_allclose(linear["immediate_gain"], gain, atol=1e-12)
  np.testing.assert_allclose(linear["steady_gain"], gain, atol=1e-12)
  assert len(equilibria) == 1 and equilibria[0]["stable"]
  assert equilibria[0]["log_step"] == pytest.approx(3.2, abs=1e-8)


def test_the_schedule_term_follows_the_time_inputs():
  ctrl = controller(np.zeros((F, 4 * L)), np.zeros((L, 4 * L)), np.zeros(4 * L), step_b=0.1, schedule=(2.0, -1.0))
  inputs = np.zeros((30, F))
  inputs[:, 2] = np.linspace(0, 1, 30)
  inputs[:, 3] = 0.5
  with jax.enable_x64(True):
    trajectory = hd.controller_trajectory(ctrl, hd.maps(ctrl)[1], inputs)
  np.testing.assert_allclose(trajectory["log_step"], 0.1 * np.arange(1, 31), atol=1e-12)
  np.testing.assert_allclose(trajectory["schedule_term"], 2 * inputs[:, 2] - 0.5, atol=1e-12)


def test_typical_inputs_per_phase():
  inputs = np.zeros((9, 2, 3))
  inputs[:, :, 0] = np.arange(9)[:, None]
  typical = hd.typical_inputs(inputs)
  assert typical["median"][0] == 4 and typical["phase_steps"] == {"early": [0, 3], "middle": [3, 6],
                                                                  "late": [6, 9]}
  assert [typical["phases"][p][0] for p in ("early", "middle", "late")] == [1, 4, 7]


def test_analysis_of_a_hand_set_theta_that_slows_down_when_validation_loss_rises(tmp_path):
  """The whole analysis (records, fixed points, schedule, validation response, JSON, figures, report section) on a
  one-tensor task with a theta whose log step falls when the validation loss rises, and moves for nothing else."""
  from lopt import tasks
  from lopt.architectures.hierarchical.optimizer import HierarchicalOptimizer
  from lopt.pipeline.hierarchical_analysis import FIGURES, analyze_hierarchical
  from lopt.report.dynamics_report import hierarchical_sections
  optimizer = HierarchicalOptimizer(lstm_size=2, hidden_size=2, context_size=0, feedback_size=0)
  theta = jax.tree.map(np.asarray, optimizer.init(jax.random.key(0)))
  names = optimizer.lstm_input_names()
  size = optimizer.lstm_size
  # LSTM: no memory, gates open, unit 0's cell candidate reads the validation loss against its fast EMA; the log
  # step falls with unit 0 (rising validation loss: the last value above its EMA). Nothing else moves the step.
  theta["lstm"]["w"] = np.zeros_like(theta["lstm"]["w"])
  theta["lstm"]["w"][names.index("valid_vs_ema0.9"), 2 * size] = 5.0
  bias = np.zeros(4 * size)
  bias[:size], bias[size:2 * size], bias[3 * size:] = 10.0, -10.0, 10.0
  theta["lstm"]["b"] = bias
  theta["step"]["w"] = np.array([-0.2, 0.0])
  theta["step"]["alignment"] = np.zeros(2)
  task = tasks.get("linear_regression")  # no validation loss of its own: the synthetic one starts at the train loss
  h = analyze_hierarchical(optimizer, theta, task, tmp_path, num_problems=2, horizon=200, num_steps=20,
                           num_seeds=16)
  full = json.loads((tmp_path / "hierarchical.json").read_text())
  assert full["settings"]["branch_step"] == 10 and full["settings"]["num_steps"] == 20
  ratio = full["validation"]["ratio_median"]
  assert ratio["rising"] < 0.5 and ratio["none"] == pytest.approx(1.0)  # flat and none: the log step stays 0
  assert all(r < 1 for r in full["validation"]["ratio_per_tensor"]["rising"].values())
  # Without a validation loss (the real run), nothing moves the step: the schedule is flat at step_scale.
  assert full["schedule"]["real"]["shape"] == "flat"
  assert full["schedule"]["real"]["final"] == pytest.approx(optimizer.step_scale, rel=1e-5)
  assert full["fixed_points"]["typical"]["distinct"] == 1 and full["main_kind"] == "vector"
  for name in FIGURES:
    assert (tmp_path / f"{name}.png").stat().st_size > 10_000
  sections = hierarchical_sections(tmp_path, h)
  text = " ".join(p for s in sections for p in s.paragraphs)
  assert len(sections) == 3 and sum(len(s.figures) for s in sections) == 4
  assert "the rising validation loss lowers the step size" in text


@pytest.fixture(scope="module")
def hierarchical_run(tmp_path_factory):
  """A run directory (config.json + optimizer/) of a small hierarchical optimizer with random weights, trained on
  one logistic-regression shape group with horizon 20 -- no meta-training needed to analyze it."""
  from lopt.architectures.hierarchical.optimizer import HierarchicalOptimizer
  from lopt.io.checkpoint import save_optimizer
  from lopt.meta.config import MetaTrainConfig
  run = tmp_path_factory.mktemp("hierarchical") / "run"
  optimizer = HierarchicalOptimizer(lstm_size=8)
  theta = jax.tree.map(np.asarray, optimizer.init(jax.random.key(0)))
  rng = np.random.default_rng(2)
  theta = jax.tree.map(lambda x: np.asarray(x + 0.1 * rng.normal(size=np.shape(x)), np.float32), theta)
  config = MetaTrainConfig.from_dict({
      "task": {"name": "all", "family": "logistic_regression", "options": {"num_groups": 1}, "horizon": 20},
      "optimizer": {"architecture": "hierarchical", "lstm_size": 8},
      "estimator": {"name": "nres", "truncation": 10, "meta_batch_size": 2}})
  run.mkdir(parents=True)
  (run / "config.json").write_text(json.dumps(config.to_dict()))
  save_optimizer(run / "optimizer", optimizer, theta)
  return run


@pytest.mark.slow  # ~40 s on a CPU: the update-function probes, the recording and the searches compile
def test_lopt_analyze_writes_the_hierarchical_analysis_and_report_section(hierarchical_run):
  from lopt.cli import main
  assert main(["analyze", str(hierarchical_run), "--problems", "2"]) == 0
  out = hierarchical_run / "analysis"
  full = json.loads((out / "hierarchical.json").read_text())
  summary = json.loads((out / "summary.json").read_text())
  h = summary["hierarchical"]
  assert full["settings"]["horizon"] == 20 and full["settings"]["num_steps"] == 20  # the run's horizon
  assert full["settings"]["branch_step"] == 10 and full["settings"]["valid_every"] == 10
  assert full["fixed_points"]["typical"]["distinct"] >= 1 and len(full["linearization"]["abs_eigenvalues"]) == 10
  assert len(full["typical_inputs"]["matrix"]["median"]) == len(full["input_names"])
  assert set(full["validation"]["ratio_median"]) == {"rising", "none"} and h["findings"]
  for name in ("hierarchical_inputs", "hierarchical_controller", "hierarchical_schedule", "hierarchical_validation"):
    assert (out / f"{name}.png").stat().st_size > 10_000 and f"{name}.png" in summary["source"]["figures"]
  assert main(["report", str(hierarchical_run)]) == 0
  html = (hierarchical_run / "report.html").read_text()
  assert "response to a rising validation loss" in html and "learned step-size schedule" in html
  assert "fixed point(s) from" in html


def test_training_settings_read_both_config_layouts(tmp_path):
  """The shipped paper optimizers record lopt 0.1's flat training config (the task as a name, the horizon at the top
  level); reading it crashed `lopt analyze linear_regression` before the analysis began."""
  from lopt import trained
  from lopt.pipeline.hierarchical_analysis import training_settings
  shipped = trained.resolve_optimizer_path("linear_regression")
  assert training_settings(shipped) == {"horizon": None, "valid_every": None}
  flat = tmp_path / "flat"
  flat.mkdir()
  (flat / "config.json").write_text(json.dumps({"info": {"training": {"task": "rosenbrock", "horizon": 40}}}))
  assert training_settings(flat) == {"horizon": 40, "valid_every": None}
  nested = tmp_path / "nested"
  nested.mkdir()
  (nested / "config.json").write_text(json.dumps({"info": {"training": {"task": {"horizon": 30},
                                                                        "estimator": {"valid_every": 10}}}}))
  assert training_settings(nested) == {"horizon": 30, "valid_every": 10}
