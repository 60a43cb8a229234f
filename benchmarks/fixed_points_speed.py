"""Fixed-point finding: lopt (bounded Adam, then Newton polishing) vs plain Adam (lr 0.01, as in the authors' renn).

GRU with 256 units (the paper's size; random fan-in weights, the GRU optimizer's cell), 1024 seeds from states visited
under random gradients, input g* = 0, float64. Each method runs until every point has q < 1e-12 (or its step
budget ends); reported: wall time after compilation, fraction of points with q < 1e-12, and the ratio.

  python benchmarks/fixed_points_speed.py [--units 256] [--seeds 1024] [--adam-steps 20000] [--write]
"""

from __future__ import annotations

import argparse
import datetime
import functools
import os
import platform
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from lopt import dynamics
from lopt.optimizers import GRUOptimizer

TARGET = 1e-12


def build(units: int, num_seeds: int):
  optimizer = GRUOptimizer(hidden_size=units)
  theta = optimizer.init(jax.random.key(0))
  theta = {k: jnp.asarray(np.asarray(v, np.float64)) for k, v in theta.items()}
  step = functools.partial(optimizer.cell, theta)
  # Seeds: states visited while the GRU reads random gradients (as the analysis seeds from visited states).
  steps = 64
  g = 0.5 * jax.random.normal(jax.random.key(1), (steps, num_seeds // 4), jnp.float64)
  h0 = jnp.broadcast_to(theta["initial_state"], (num_seeds // 4, units))
  _, hs = jax.lax.scan(lambda h, g_t: (step(h, g_t),) * 2, h0, g)
  seeds = hs[jnp.asarray([15, 31, 47, 63])].reshape(-1, units)
  return step, seeds


def timed(fn):
  start = time.perf_counter()
  out = jax.block_until_ready(fn())
  return out, time.perf_counter() - start


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--units", type=int, default=256)
  parser.add_argument("--seeds", type=int, default=1024)
  parser.add_argument("--adam-steps", type=int, default=20000, help="plain Adam's step budget")
  parser.add_argument("--write", action="store_true", help="append results to benchmarks/results/")
  args = parser.parse_args()
  with jax.enable_x64(True):
    step, seeds = build(args.units, args.seeds)
    target = jnp.asarray(TARGET, jnp.float64)

    def lopt_method():
      fixed = dynamics.find_fixed_points(step, seeds, 0.0, dtype=np.float64, tolerance=TARGET / 10)
      return jnp.asarray(fixed.seed_speeds)

    def adam_method():
      _, q, t = dynamics.adam_minimize(step, seeds, 0.0, target, max_steps=args.adam_steps, learning_rate=0.01)
      return q, t

    # Compile (and warm) both on the real shapes first; then time.
    _, lopt_compile = timed(lopt_method)
    _, adam_compile = timed(lambda: dynamics.adam_minimize(step, seeds, 0.0, target, max_steps=2,
                                                           learning_rate=0.01))
    q_lopt, lopt_time = timed(lopt_method)
    (q_adam, adam_steps), adam_time = timed(adam_method)
  q_lopt, q_adam = np.asarray(q_lopt), np.asarray(q_adam)  # Adam cut off by its budget: its time is a lower bound
  rows = {
      "lopt (Adam <= 200 steps + Newton)": (lopt_time, np.mean(q_lopt < TARGET), np.max(q_lopt), lopt_compile),
      f"plain Adam lr 0.01 ({int(adam_steps)} steps)": (adam_time, np.mean(q_adam < TARGET), np.max(q_adam),
                                                        adam_compile),
  }
  device = jax.devices()[0]
  lines = [f"## {datetime.datetime.now().isoformat(timespec='seconds')} on {device.platform}: "
           f"{getattr(device, 'device_kind', '')}",
           f"- machine: {platform.node()}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; "
           f"python {platform.python_version()}, jax {jax.__version__}, numpy {np.__version__}",
           f"- GRU {args.units} units, {args.seeds} seeds, g* = 0, float64, target q < {TARGET:g}", "",
           "| method | time (s) | fraction with q < 1e-12 | max q | first call incl. compile (s) |",
           "|---|---|---|---|---|"]
  for name, (t, frac, worst, compile_t) in rows.items():
    lines.append(f"| {name} | {t:.2f} | {frac:.3f} | {worst:.2e} | {compile_t:.2f} |")
  lines.append("")
  lines.append(f"**time ratio, plain Adam / lopt: {adam_time / lopt_time:.1f}x** (Adam converged "
               f"{np.mean(q_adam < TARGET):.1%} of points, lopt {np.mean(q_lopt < TARGET):.1%})")
  if np.mean(q_adam < TARGET) < 1:
    lines.append(f"(plain Adam ran out of its {args.adam_steps}-step budget before every point reached q < "
                 f"{TARGET:g}: its time is a lower bound on the time it needs)")
  text = "\n".join(lines)
  print(text)
  if args.write:
    path = Path(__file__).parent / "results" / "fixed_points_speed.md"
    header = "# Fixed-point finding speed: lopt vs plain Adam (renn)\n\n" if not path.exists() else ""
    with open(path, "a") as f:
      f.write(header + text + "\n\n")


if __name__ == "__main__":
  main()
