"""Matplotlib figures (Agg backend, no display needed). Each function returns a Figure; ``to_png`` encodes it."""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

# One colour per optimizer, stable across figures (learned optimizers first).
COLORS = {"learned": "#d62728", "momentum": "#1f77b4", "rmsprop": "#2ca02c", "adam": "#ff7f0e", "sgd": "#7f7f7f"}


def color_for(name: str, kind: str = "baseline") -> str:
  return COLORS.get(name, COLORS["learned"] if kind == "learned" else "#9467bd")


def to_png(figure, dpi: int = 110) -> bytes:
  buffer = io.BytesIO()
  figure.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
  plt.close(figure)
  return buffer.getvalue()


def loss_curves(comparison: dict, title: str | None = None):
  """The paper's Figure 1 panel: normalized training loss (mean ± standard error over problems) against step."""
  figure, axis = plt.subplots(figsize=(6.0, 4.0))
  results = comparison["results"]
  for name, result in sorted(results.items(), key=lambda item: item[1]["kind"] != "learned"):
    mean, se = np.asarray(result["curve_mean"], float), np.asarray(result["curve_se"], float)
    steps = np.arange(mean.size)
    color = color_for(name, result["kind"])
    label = f"{name} ({result['normalized_mean_loss']:.3g})"
    axis.plot(steps, mean, color=color, lw=2.2 if result["kind"] == "learned" else 1.5, label=label)
    axis.fill_between(steps, np.clip(mean - se, 1e-12, None), mean + se, color=color, alpha=0.2, lw=0)
  axis.set_yscale("log")
  axis.set_xlabel("step")
  axis.set_ylabel("loss / initial loss")
  settings = comparison["settings"]
  axis.set_title(title or f"{settings['task']}: mean ± s.e. over {settings['num_eval_problems']} problems")
  axis.legend(title="optimizer (normalized mean loss)", fontsize=8, title_fontsize=8)
  axis.grid(alpha=0.3, which="both")
  return figure


def tuning_curves(comparison: dict):
  """Tuning score against learning rate for each baseline (best over its other hyperparameters)."""
  figure, axis = plt.subplots(figsize=(6.0, 4.0))
  for name, tuned in comparison["tuning"].items():
    rates = np.asarray(tuned["candidates"]["learning_rate"])
    scores = np.asarray(tuned["scores"], float)
    unique = np.unique(rates)
    best = [np.min(np.where(np.isfinite(scores[rates == r]), scores[rates == r], np.inf)) for r in unique]
    axis.plot(unique, np.where(np.isfinite(best), best, np.nan), marker="o", ms=3, color=color_for(name), label=name)
  axis.set_xscale("log")
  axis.set_yscale("log")
  axis.set_xlabel("learning rate")
  axis.set_ylabel("normalized mean loss (tuning problems)")
  axis.set_title("baseline tuning (diverged candidates omitted)")
  if comparison["tuning"]:  # empty when the baselines ran with given hyperparameters (lopt reproduce --tuning shipped)
    axis.legend(fontsize=8)
  axis.grid(alpha=0.3, which="both")
  return figure


def meta_training_curve(metrics: list[dict]):
  """Meta-loss (training batches) and held-out loss against outer step."""
  figure, axis = plt.subplots(figsize=(6.0, 3.5))
  steps = [m["step"] for m in metrics]
  axis.plot(steps, [m["meta_loss"] for m in metrics], lw=1, color="#7f7f7f", label="meta-loss (training batch)")
  held = [(m["step"], m["held_out_loss"]) for m in metrics if "held_out_loss" in m]
  if held:
    axis.plot(*zip(*held), marker="o", ms=3, color=COLORS["learned"], label="held-out normalized mean loss")
  axis.set_yscale("log")
  axis.set_xlabel("outer step")
  axis.set_ylabel("normalized mean loss")
  axis.legend(fontsize=8)
  axis.grid(alpha=0.3, which="both")
  return figure
