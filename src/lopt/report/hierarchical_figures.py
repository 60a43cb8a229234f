"""Figures of the hierarchical optimizer's per-tensor LSTM (``lopt.pipeline.hierarchical_analysis``; matplotlib
Agg, see ``figures.to_png``). Each function takes that module's results dict and returns a Figure."""

from __future__ import annotations

import numpy as np

from lopt.report.figures import COLORS, plt

LEARNED = COLORS["learned"]
BRANCH_COLORS = {"flat": "#1f77b4", "rising": LEARNED, "none": "#7f7f7f"}
BRANCH_LABELS = {"flat": "validation loss flat", "rising": "validation loss rising", "none": "no validation loss"}
PHASE_COLORS = {"early": "#9ecae1", "middle": "#4292c6", "late": "#08306b"}


def inputs_figure(results: dict):
  """The typical LSTM input of the main kind of tensor: median and quartiles of each feature, and the median per
  phase of training."""
  names, main = results["names"], results["main_kind"]
  typical = results["typical"][main]
  count = len(names)
  figure, axis = plt.subplots(figsize=(7.5, 0.22 * count + 1.6))
  y = np.arange(count)[::-1]
  low, high = typical["quartiles"]
  axis.hlines(y, low, high, color="#bbb", lw=5, label="quartiles (all steps)")
  axis.plot(typical["median"], y, "|", ms=12, mew=2, color="k", label="median (x*)")
  for phase, x in typical["phases"].items():
    axis.plot(x, y, "o", ms=4, color=PHASE_COLORS.get(phase, "#555"), label=f"median, {phase}")
  axis.set_yticks(y)
  axis.set_yticklabels(names, fontsize=7)
  axis.axvline(0, color="#999", lw=0.6)
  axis.set_xlabel("input value")
  axis.set_title(f"inputs of the per-tensor LSTM ({main} tensors, {results['num_steps']} steps)")
  axis.legend(fontsize=7, loc="lower right")
  axis.grid(alpha=0.3, axis="x")
  figure.tight_layout()
  return figure


def controller_figure(results: dict):
  """Eigenvalues of dF/ds at the main fixed point, the log step's steady-state sensitivity to each input (per typical
  variation), and the drift of the log step against the log step (the closed loop's equilibria)."""
  figure, (eigen, gains, curve) = plt.subplots(1, 3, figsize=(16.0, 4.8))
  linear = results["fixed"]["linearization"]
  circle = np.linspace(0, 2 * np.pi, 400)
  eigen.plot(np.cos(circle), np.sin(circle), color="#999", lw=1)
  if linear is not None:
    values = linear["eigenvalues"]
    eigen.scatter(values.real, values.imag, s=18, color=LEARNED, zorder=3)
    eigen.set_title(f"eigenvalues of dF/ds at the fixed point (radius {linear['spectral_radius']:.3f})")
  else:
    eigen.set_title("no fixed point found at the typical input")
  eigen.set_aspect("equal")
  eigen.set_xlabel("Re λ")
  eigen.set_ylabel("Im λ")
  eigen.grid(alpha=0.3)
  if linear is not None:
    names = results["names"]
    effect = linear["steady_gain"] * results["typical"][results["main_kind"]]["spread"]
    order = np.argsort(-np.abs(effect))[:12][::-1]
    y = np.arange(len(order))
    gains.barh(y, effect[order], color=[LEARNED if v < 0 else "#1f77b4" for v in effect[order]])
    gains.set_yticks(y)
    gains.set_yticklabels([names[i] for i in order], fontsize=8)
    gains.axvline(0, color="#999", lw=0.6)
  gains.set_xlabel("change of the log step per step\n(steady state, per interquartile range of the input)")
  gains.set_title("what moves the log step")
  gains.grid(alpha=0.3, axis="x")
  c = results["curve"]
  curve.plot(c["log_step"], c["drift"], "o-", ms=3, color=LEARNED, label="drift D at the LSTM's fixed point")
  curve.axhline(0, color="#999", lw=0.8)
  for e in results["equilibria"]:
    marker = dict(marker="o", ms=9, mfc=LEARNED if e["stable"] else "white", mec="k")
    curve.plot([e["log_step"]], [0.0], ls="none", **marker)
  curve.plot([], [], "o", ms=8, mfc=LEARNED, mec="k", label="equilibrium, stable (open: unstable)")
  curve.set_xlabel("log step seen by the LSTM")
  curve.set_ylabel("change of the log step per step")
  curve.set_title("the log step's drift at the typical input")
  curve.legend(fontsize=8)
  curve.grid(alpha=0.3)
  figure.tight_layout()
  return figure


def schedule_figure(results: dict):
  """Left: the effective learning rate step_scale * exp(log step + schedule term) of every tensor along real runs
  (median over problems), highlighted tensors named. Right: the closed loop with statistics held at their typical
  values, time advancing vs frozen at the first step, and the schedule term alone."""
  figure, (real, autonomous) = plt.subplots(1, 2, figsize=(13.0, 4.5))
  schedule, tensors = results["schedule"], results["tensors"]
  per_tensor = schedule["per_tensor"]
  steps = np.arange(1, per_tensor.shape[0] + 1)
  for i in range(per_tensor.shape[1]):
    real.plot(steps, per_tensor[:, i], color="#ccc", lw=0.7)
  cmap = plt.get_cmap("tab10")
  for k, i in enumerate(results["highlighted"]):
    label = f"{tensors[i]['name']} {tuple(tensors[i]['shape'])}"
    real.plot(steps, per_tensor[:, i], color=cmap(k), lw=1.4, label=label)
  real.plot(steps, schedule["median"], color=LEARNED, lw=2.4, label="median over tensors")
  step_scale = results["step_scale"]
  real.plot(steps, step_scale * np.exp(results["schedule_term"]), ":", color="k", lw=1.2,
            label="step_scale · exp(schedule term)")
  real.set_yscale("log")
  real.set_xlabel("step")
  real.set_ylabel("effective learning rate")
  real.set_title(f"along real runs: {schedule['shape']}")
  real.legend(fontsize=7)
  real.grid(alpha=0.3, which="both")
  for name, color, label in (("time", LEARNED, "time advancing"), ("frozen", "#1f77b4", "time frozen at step 1")):
    trajectory = results["autonomous"][name]
    t = np.arange(1, len(trajectory["effective_log_step"]) + 1)
    autonomous.plot(t, step_scale * np.exp(trajectory["effective_log_step"]), color=color, lw=2, label=label)
  trajectory = results["autonomous"]["time"]
  autonomous.plot(np.arange(1, len(trajectory["schedule_term"]) + 1), step_scale * np.exp(trajectory["schedule_term"]),
                  ":", color="k", lw=1.2, label="schedule term alone")
  autonomous.set_yscale("log")
  autonomous.set_xlabel("step (horizon hint: {})".format(results["horizon"]))
  autonomous.set_ylabel("effective learning rate")
  autonomous.set_title(f"autonomous: inputs held at typical values ({results['main_kind']} tensors)")
  autonomous.legend(fontsize=8)
  autonomous.grid(alpha=0.3, which="both")
  figure.tight_layout()
  return figure


def validation_figure(results: dict):
  """From a state of real runs: the fed losses (first problem), the effective learning rate (median over tensors
  and problems) under each continuation, and the final ratio to the flat continuation per tensor."""
  figure, (fed, rates, ratios) = plt.subplots(1, 3, figsize=(16.0, 4.5))
  branch = results["branch_step"]
  response = results["response"]
  for name in ("flat", "rising", "none"):
    valid = results["fed"][name]["valid"]
    t = np.arange(len(valid))
    given = np.isfinite(valid)
    if np.any(given):
      fed.plot(t[given], valid[given], "o-", ms=3, color=BRANCH_COLORS[name], label=f"{BRANCH_LABELS[name]} (fed)")
  train = results["fed"]["flat"]["train"]
  fed.plot(np.arange(len(train)), train, color="k", lw=1, label="training loss (fed)")
  fed.axvline(branch, color="#999", ls=":", label=f"branch at step {branch}")
  fed.set_yscale("log")
  fed.set_xlabel("step")
  fed.set_ylabel("loss fed to the optimizer")
  fed.set_title("the continuations (first problem)")
  fed.legend(fontsize=7)
  fed.grid(alpha=0.3, which="both")
  for name in ("rising", "none"):
    ratio = np.exp(response["log_ratio"][name])  # (K, n)
    steps_after = branch + np.arange(ratio.shape[0])
    rates.plot(steps_after, ratio, color=BRANCH_COLORS[name], lw=0.5, alpha=0.35)
    rates.plot(steps_after, np.exp(np.median(response["log_ratio"][name], axis=1)), color=BRANCH_COLORS[name], lw=2.2,
               label=f"{BRANCH_LABELS[name]} / flat (median over tensors; thin: each)")
  rates.axhline(1, color="k", lw=0.8)
  rates.set_xlabel("step")
  rates.set_ylabel("effective learning rate / flat branch's")
  rates.set_title("step size after the branch point")
  rates.legend(fontsize=8)
  rates.grid(alpha=0.3)
  tensors = results["tensors"]
  y = np.arange(len(tensors))
  for k, name in enumerate(("rising", "none")):
    ratio = response["final_ratio"][name]
    ratios.barh(y + (k - 0.5) * 0.4, ratio, height=0.4, color=BRANCH_COLORS[name],
                label=f"{BRANCH_LABELS[name]} / flat")
  ratios.axvline(1, color="k", lw=0.8)
  ratios.set_yticks(y)
  ratios.set_yticklabels([t["name"] for t in tensors], fontsize=7)
  ratios.set_xlabel(f"effective learning rate ratio after {len(steps_after)} steps")
  ratios.set_title("per tensor, at the end")
  ratios.legend(fontsize=8)
  ratios.grid(alpha=0.3, axis="x", which="both")
  figure.tight_layout()
  return figure
