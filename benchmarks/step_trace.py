"""The training loss and the update's size along a run of one benchmark problem, optimizer by optimizer.

A diagnostic of *where* in a run one optimizer falls behind another: printed at a few steps, the loss and the RMS
of the update over all parameters, averaged over seeds. Learned optimizers get what ``lopt benchmark`` gives them
(the loss, a validation loss every 10 steps, the horizon).

  python benchmarks/step_trace.py wide_mlp general runs/X/optimizer adam:0.01 [--seeds 2] [--full]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

import lopt
from lopt.evaluation import suite
from lopt.evaluation.benchmark import training_scan


def transformation(name: str) -> optax.GradientTransformationExtraArgs:
  """``adam:LR`` or a learned optimizer's name or path."""
  if name.startswith("adam:"):
    return optax.with_extra_args_support(optax.adam(float(name[5:])))
  return optax.with_extra_args_support(lopt.load(name).as_optax())


def update_rms(updates, state=None) -> jax.Array:
  """() the RMS of an update over all parameters (``training_scan``'s ``measure``; the state is not read)."""
  leaves = jax.tree.leaves(updates)
  return jnp.sqrt(sum(jnp.sum(u.astype(jnp.float32) ** 2) for u in leaves) / sum(u.size for u in leaves))


def trace(task, tx, key, horizon: int):
  """(losses (T,), update RMS (T,)) of one run, as ``lopt benchmark`` runs it."""
  run = jax.jit(lambda: training_scan(task, tx, key, horizon, measure=update_rms))
  _, losses, _, sizes = run()
  return np.asarray(losses), np.asarray(sizes)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("problem", choices=sorted(suite.PROBLEMS))
  parser.add_argument("optimizers", nargs="+", help="names or paths of learned optimizers, or adam:LR")
  parser.add_argument("--seeds", type=int, default=2)
  parser.add_argument("--full", action="store_true", help="the full horizon rather than the quick one")
  args = parser.parse_args(argv)
  problem = suite.PROBLEMS[args.problem]
  quick = not args.full and problem.quick_horizon is not None
  task = problem.task(quick=quick)
  horizon = problem.quick_horizon if quick else problem.horizon
  points = sorted({0, 5, 20, 50, *(round(horizon * f) for f in (0.1, 0.25, 0.5, 0.75)), horizon - 1})
  print(f"{args.problem}, {horizon} steps, {args.seeds} seeds: step: loss / update RMS")
  for name in args.optimizers:
    tx = transformation(name)
    losses, sizes = (np.mean(x, 0) for x in zip(*[trace(task, tx, jax.random.key(s), horizon)
                                                   for s in range(args.seeds)]))
    label = Path(name).parent.name if Path(name).name == "optimizer" else name
    print(f"{label}: mean loss {losses.mean():.4g} | "
          + " ".join(f"{t}: {losses[t]:.3g} / {sizes[t]:.2g}" for t in points), flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
