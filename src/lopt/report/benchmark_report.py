"""``OUT/report.html`` of ``lopt benchmark``: one self-contained page drawn from ``OUT/benchmark.json``.

Sections: the summary (win rates, speedup IQM with its interval, ratios), per-problem numbers, loss curves, ratios to
tuned Adam, the speedup distribution, the validation/training gap and the tuned hyperparameters.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from lopt.report import figures
from lopt.report.html import Section, escape, table, write

BASELINE_STYLE = {"adam_tuned": ("#ff7f0e", "-"), "nadamw_cosine": ("#2ca02c", "-"), "adam_1e-3": ("#7f7f7f", "--")}
LEARNED_COLORS = ("#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22")


def _style(label: str, learned: list[str]) -> tuple[str, str]:
  if label in learned:
    return LEARNED_COLORS[learned.index(label) % len(LEARNED_COLORS)], "-"
  return BASELINE_STYLE.get(label, ("#1f77b4", "-"))


def _num(x, digits: int = 3) -> str:
  return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.{digits}g}"


def _array(values) -> np.ndarray:
  return np.array([np.nan if v is None else v for v in values], np.float64)


def _grid(count: int, columns: int = 3, size=(4.2, 3.0)):
  import matplotlib.pyplot as plt
  columns = min(columns, count)
  rows = int(math.ceil(count / columns))
  figure, axes = plt.subplots(rows, columns, figsize=(size[0] * columns, size[1] * rows), squeeze=False)
  for axis in axes.ravel()[count:]:
    axis.set_visible(False)
  return figure, axes.ravel()


def loss_curves(result: dict):
  """One panel per problem: training loss (mean over evaluation seeds) against step, every optimizer, log y."""
  from matplotlib.ticker import NullFormatter
  learned = list(result["summary"])
  problems = result["problems"]
  figure, axes = _grid(len(problems))
  for axis, (name, p) in zip(axes, problems.items()):
    steps = np.asarray(p["curve_steps"]) + 1
    for label, r in p["results"].items():
      color, dash = _style(label, learned)
      curve = _array(r["curve"])
      axis.plot(steps, np.where(curve > 0, curve, np.nan), color=color, ls=dash, lw=1.8 if label in learned else 1.2,
                label=label + (" (diverged)" if r["diverged_seeds"] else ""))
    axis.set_yscale("log")
    axis.yaxis.set_minor_formatter(NullFormatter())  # labels on every minor tick crowd a narrow panel
    axis.set_title(f"{name} ({p['kind']})", fontsize=9)
    axis.set_xlabel("step", fontsize=8)
    axis.grid(alpha=0.3, which="both")
    axis.tick_params(labelsize=7)
  axes[0].set_ylabel("training loss (mean over seeds)", fontsize=8)
  axes[0].legend(fontsize=7)
  figure.tight_layout()
  return figure


def ratio_figure(result: dict):
  """Per problem, mean training loss / tuned Adam's (log scale, 1 = tie): each learned optimizer, and the other
  baselines for reference."""
  import matplotlib.pyplot as plt
  learned = list(result["summary"])
  names = list(result["problems"])
  figure, axis = plt.subplots(figsize=(7.0, 0.35 * len(names) + 1.5))
  y = np.arange(len(names))
  for offset, label in zip(np.linspace(-0.25, 0.25, len(learned) + 2), [*learned, "nadamw_cosine", "adam_1e-3"]):
    color, _ = _style(label, learned)
    ratios = []
    for name in names:
      r = result["problems"][name]["results"]
      mine, adam = r[label]["mean_loss"], r["adam_tuned"]["mean_loss"]
      ratios.append(mine / adam if mine is not None and adam else np.nan)
    ratios = np.asarray(ratios, np.float64)
    axis.scatter(np.where(np.isfinite(ratios), ratios, np.nan), y + offset, color=color,
                 marker="o" if label in learned else "x", s=30 if label in learned else 18, label=label, zorder=3)
  axis.axvline(1.0, color="black", lw=1)
  axis.set_xscale("log")
  axis.set_yticks(y, names, fontsize=8)
  axis.invert_yaxis()
  axis.set_xlabel("mean training loss / tuned Adam's (< 1: better than tuned Adam)")
  axis.grid(alpha=0.3, axis="x", which="both")
  axis.legend(fontsize=7, loc="best")
  figure.tight_layout()
  return figure


def speedup_figure(result: dict):
  """The per-problem speedups over tuned Adam (log scale), their IQM and its 95% bootstrap interval."""
  import matplotlib.pyplot as plt
  learned = list(result["summary"])
  figure, axis = plt.subplots(figsize=(7.0, 1.0 + 0.8 * len(learned)))
  for row, label in enumerate(learned):
    s = result["summary"][label]
    color, _ = _style(label, learned)
    values = _array(s["speedups"])
    jitter = np.random.default_rng(row).uniform(-0.15, 0.15, values.size)
    axis.scatter(values, row + jitter, color=color, alpha=0.7, s=22)
    low, high = s["speedup_interval"]
    axis.plot([low, high], [row, row], color="black", lw=3, alpha=0.5)
    axis.plot([s["speedup_iqm"]], [row], marker="D", color="black", ms=7)
  axis.axvline(1.0, color="gray", lw=1, ls="--")
  axis.set_xscale("log")
  axis.set_yticks(range(len(learned)), learned, fontsize=8)
  axis.set_ylim(-0.6, len(learned) - 0.4)
  axis.set_xlabel("speedup over tuned Adam (steps; > 1: faster). Diamond: IQM; bar: 95% bootstrap interval")
  axis.grid(alpha=0.3, axis="x", which="both")
  figure.tight_layout()
  return figure


def gap_figure(result: dict):
  """Validation minus training loss at the end of the run, per problem and optimizer."""
  import matplotlib.pyplot as plt
  learned = list(result["summary"])
  names = list(result["problems"])
  labels = [*learned, "adam_tuned", "nadamw_cosine", "adam_1e-3"]
  figure, axis = plt.subplots(figsize=(7.0, 0.35 * len(names) + 1.5))
  y = np.arange(len(names))
  for offset, label in zip(np.linspace(-0.3, 0.3, len(labels)), labels):
    color, _ = _style(label, learned)
    gaps = [result["problems"][n]["results"][label].get("gap") for n in names]
    axis.barh(y + offset, _array(gaps), height=0.6 / len(labels), color=color, label=label)
  axis.axvline(0.0, color="black", lw=1)
  axis.set_xscale("symlog", linthresh=1e-3)
  axis.set_yticks(y, names, fontsize=8)
  axis.invert_yaxis()
  axis.set_xlabel("final validation loss - final training loss")
  axis.grid(alpha=0.3, axis="x")
  axis.legend(fontsize=7)
  figure.tight_layout()
  return figure


def adam_tuning_figure(result: dict):
  """Tuning score (mean training loss on the tuning seeds) of each Adam learning rate, relative to the best, per
  problem: an optimum inside the grid, not at its edge, is what a fair tuning needs."""
  import matplotlib.pyplot as plt
  figure, axis = plt.subplots(figsize=(7.0, 4.0))
  for name, p in result["problems"].items():
    tuning = p["results"]["adam_tuned"].get("tuning")
    if not tuning:
      continue
    scores = _array(tuning["scores"])
    best = np.nanmin(np.where(np.isfinite(scores), scores, np.nan))
    axis.plot(tuning["candidates"]["learning_rate"], scores / best, marker="o", ms=3, lw=1, label=name)
  axis.set_xscale("log")
  axis.set_yscale("log")
  axis.set_xlabel("Adam learning rate")
  axis.set_ylabel("tuning score / best (diverged omitted)")
  axis.grid(alpha=0.3, which="both")
  axis.legend(fontsize=6, ncol=2)
  figure.tight_layout()
  return figure


def summary_rows(result: dict) -> list[list[str]]:
  rows = []
  for label, s in result["summary"].items():
    wins = [f"{100 * s['win_rate'][b]['mean_loss']:.0f}% / {100 * s['win_rate'][b]['final_loss']:.0f}%"
            for b in ("adam_tuned", "nadamw_cosine", "adam_1e-3")]
    low, high = s["speedup_interval"]
    rows.append([label, *wins, f"{_num(s['speedup_iqm'])} [{_num(low)}, {_num(high)}]",
                 _num(s["median_ratio_mean_loss"]), _num(s["geometric_mean_ratio_mean_loss"]),
                 ", ".join(s["diverged_on"]) or "none"])
  return rows


def problem_rows(result: dict) -> list[list[str]]:
  learned = list(result["summary"])
  rows = []
  for name, p in result["problems"].items():
    r = p["results"]
    adam = r["adam_tuned"]["mean_loss"]
    cells = [name, p["kind"], p["num_params"], p["horizon"], p["batch_size"] or "full", _num(adam, 4)]
    for label in ["nadamw_cosine", "adam_1e-3", *learned]:
      mine = r[label]["mean_loss"]
      cells.append(_num(mine / adam if mine is not None and adam else None) + ("!" if r[label]["diverged_seeds"]
                                                                                 else ""))
    for label in learned:
      c = p["learned"][label]
      cells += [_num(c["ratio_final_loss"]), _num(c["speedup"])]
    rows.append(cells)
  return rows


def gap_rows(result: dict) -> list[list[str]]:
  labels = [*result["summary"], "adam_tuned", "nadamw_cosine", "adam_1e-3"]
  rows = []
  for name, p in result["problems"].items():
    cells = [name]
    for label in labels:
      r = p["results"][label]
      cells.append(f"{_num(r.get('final_valid_loss'))} / {_num(r['final_loss'])} ({_num(r.get('gap'), 2)})")
    rows.append(cells)
  return rows


def hyperparameter_rows(result: dict) -> list[list[str]]:
  rows = []
  for name, p in result["problems"].items():
    adam = p["results"]["adam_tuned"]["hyperparameters"]
    nadamw = p["results"]["nadamw_cosine"]["hyperparameters"]
    rows.append([name, _num(adam["learning_rate"], 2), _num(nadamw["learning_rate"], 2), _num(nadamw["b1"], 3),
                 _num(nadamw["b2"], 4), _num(nadamw["weight_decay"], 2), _num(nadamw["warmup_fraction"], 2)])
  return rows


def sections(result: dict) -> list[Section]:
  settings, machine = result["settings"], result["machine"]
  learned = list(result["summary"])
  summary = Section("Summary")
  summary.paragraphs.append(
      f"{len(result['problems'])} held-out problems{' (quick subset)' if settings['quick'] else ''}; baselines "
      f"tuned on {settings['tuning_seeds']} tuning seeds by the mean training loss over the run (Adam: "
      f"{len(settings['adam_learning_rates'])} learning rates; NAdamW with cosine decay: "
      f"{len(settings['nadamw_trials']['learning_rate'])} random-search trials), every optimizer evaluated on "
      f"{settings['eval_seeds']} other seeds. The learned optimizers run as trained (no learning rate). Win: a lower "
      f"metric averaged over the evaluation seeds (tie: half). Speedup: steps tuned Adam needs to reach the learned "
      f"optimizer's loss, over the learned optimizer's (curves smoothed over "
      f"{100 * settings['final_fraction']:.0f}% of the horizon; 'final' is the mean over that last stretch).")
  summary.paragraphs.append(table(
      ["learned optimizer", "wins vs tuned Adam (mean / final)", "vs NAdamW-cosine", "vs Adam 1e-3",
       "speedup IQM [95% interval]", "median mean-loss ratio", "geometric mean ratio", "diverged on"],
      summary_rows(result)))
  summary.paragraphs.append(
      f"Machine: {escape(machine['platform'])}, {machine['cpu_cores']} cores, {escape(machine['jax_backend'])}; "
      f"versions: " + ", ".join(f"{k} {escape(v)}" for k, v in machine["versions"].items())
      + f"; {escape(result['date'])}; {result['seconds']:.0f} s (cached results excluded).")

  problems = Section("Per problem", figures=[(figures.to_png(ratio_figure(result)),
                                              "mean training loss relative to tuned Adam (log scale; 1 = tie)")])
  headers = ["problem", "kind", "parameters", "horizon", "batch", "tuned Adam mean loss", "NAdamW-cosine / Adam",
             "Adam 1e-3 / Adam", *[f"{label} / Adam" for label in learned]]
  for label in learned:
    headers += [f"{label} final / Adam", f"{label} speedup"]
  problems.paragraphs.append(table(headers, problem_rows(result)))
  problems.paragraphs.append("Ratios of the mean training loss over the run to tuned Adam's (< 1: better); '!' marks "
                             "diverged seeds (a non-finite loss, or a final loss above 10x the initial one).")
  problems.paragraphs.append(table(["problem", "description"],
                                   [[n, p["description"]] for n, p in result["problems"].items()]))

  curves = Section("Loss curves", figures=[(figures.to_png(loss_curves(result)),
                                            "training loss, mean over the evaluation seeds (log scale)")])
  speed = Section("Speedup over tuned Adam", figures=[(figures.to_png(speedup_figure(result)),
                                                       "per-problem speedups, their IQM and its bootstrap interval")])
  gap = Section("Validation and training loss", figures=[(figures.to_png(gap_figure(result)),
                                                           "final validation minus final training loss")])
  gap.paragraphs.append(table(["problem", *[f"{label}: valid / train (gap)" for label in
                                            [*learned, "adam_tuned", "nadamw_cosine", "adam_1e-3"]]],
                              gap_rows(result)))
  tuned = Section("Tuned hyperparameters", figures=[(figures.to_png(adam_tuning_figure(result)),
                                                     "Adam's learning-rate sweep on the tuning seeds")])
  tuned.paragraphs.append(table(["problem", "Adam lr", "NAdamW lr", "b1", "b2", "weight decay", "warmup fraction"],
                                hyperparameter_rows(result)))
  return [summary, problems, curves, speed, gap, tuned]


def write_benchmark_report(out: str | Path, result: dict | None = None) -> Path:
  """Writes OUT/report.html from ``result`` (default: OUT/benchmark.json)."""
  out = Path(out)
  if result is None:
    result = json.loads((out / "benchmark.json").read_text())
  names = ", ".join(result["summary"]) or "no learned optimizer"
  return write(out / "report.html", f"Held-out benchmark: {names}", sections(result),
               "Learned optimizers against tuned Adam, NAdamW with cosine decay and Adam at 1e-3 on problems unlike "
               "those they were meta-trained on.")
