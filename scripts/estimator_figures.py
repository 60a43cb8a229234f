"""Figures for docs/ESTIMATORS.md that need no GPU: PES's and NRES's gradient variance against the truncation index
on the closed-form problem of tests/test_estimators.py (measured, and the exact prediction), and the held-out curve
of a recorded general run.

  python scripts/estimator_figures.py --run runs/general-pes-h200-1 --out docs/images
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import jax.numpy as jnp
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import test_estimators as toy  # noqa: E402  (the problem whose smoothed gradients are known exactly)


def variance_figure(out: Path) -> dict:
  pairs = 16
  _, pes = toy.episode_gradients("pes", replicates=400, pairs=pairs, sigma=toy.SIGMA, seed=3)
  _, nres = toy.episode_gradients("nres", replicates=400, pairs=pairs, sigma=toy.SIGMA, seed=3)
  rows = []
  for k in range(toy.TRUNCATIONS):
    scale_pes = toy.expected_square_difference(
        lambda t: toy.truncation_losses(jnp.pad(t, (0, toy.TRUNCATIONS - k - 1)))[k], k + 1) / (4 * toy.SIGMA**2)
    scale_nres = toy.expected_square_difference(
        lambda t: toy.truncation_losses(jnp.full(toy.TRUNCATIONS, t[0]))[k], 1) / (4 * toy.SIGMA**2)
    rows.append({"truncation": k + 1, "pes": float(pes[:, k].var() * pairs / scale_pes),
                 "nres": float(nres[:, k].var() * pairs / scale_nres)})
  fig, ax = plt.subplots(figsize=(5.5, 3.8))
  ks = [r["truncation"] for r in rows]
  ax.plot(ks, [r["pes"] for r in rows], "o-", label="PES (measured)")
  ax.plot(ks, [r["nres"] for r in rows], "s-", label="NRES (measured)")
  ax.plot(ks, ks, "k--", lw=1, label="k (PES, predicted)")
  ax.plot(ks, [1] * len(ks), "k:", lw=1, label="1 (NRES, predicted)")
  ax.set(xlabel="truncation k of the episode", ylabel="noise variance / E[(L+ - L-)^2] sigma^-2 / 4",
         title="Noise on a meta-parameter without effect")
  ax.legend()
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(out / "estimators_variance_by_truncation.png", dpi=120)
  plt.close(fig)
  return {"variance_by_truncation": rows}


def run_figure(run: Path, out: Path) -> dict:
  records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
  held = [(r["inner_steps"] / 1e6, r["held_out_loss"]) for r in records if "held_out_loss" in r]
  train = [(r["inner_steps"] / 1e6, r["meta_loss"]) for r in records]
  fig, ax = plt.subplots(figsize=(6, 3.8))
  ax.plot(*zip(*train), label="training meta-loss (truncations)", alpha=0.7)
  ax.plot(*zip(*held), "o-", label="held-out meta-loss (unseen shapes, 200 steps)")
  ax.plot([0], [1.0], "k*", label="untrained (inert): 1.0")
  ax.set(xlabel="inner steps (millions)", ylabel="normalized mean loss", ylim=(0, 1.2),
         title="mlp optimizer, PES on all six task families (H200)")
  ax.legend(fontsize=8)
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(out / "general_run_h200.png", dpi=120)
  plt.close(fig)
  return {"held_out": held}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--run", default="runs/general-pes-h200-1")
  parser.add_argument("--out", default="docs/images")
  args = parser.parse_args()
  out = Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  print(json.dumps({**variance_figure(out), **run_figure(Path(args.run), out)}, indent=1))


if __name__ == "__main__":
  main()
