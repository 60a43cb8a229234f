"""Fixed-point finding: lopt vs a minimal hand-written Adam + Newton loop, and vs plain Adam (as in renn).

GRU with 256 units (the paper's size; random fan-in weights, the GRU optimizer's cell), 1024 seeds from states visited
under random gradients, input g* = 0, float64.

- lopt: ``find_fixed_points`` (Adam <= 200 steps, damped Newton / Levenberg-Marquardt polishing until every point is
  done, then deduplication, classification and the eigenvalues at every distinct point).
- minimal: the primary baseline, the least a search with the same stages can do: one jitted function running 200
  Adam steps on q(h) = 1/2 ||F(h, 0) - h||^2, vmapped over seeds, then 8 plain Newton iterations solving
  (J - I) dh = -(F(h) - h); no stopping rule, damping, deduplication or classification.
- plain Adam (lr 0.01, the authors' method) until every point has q < 1e-12 or its step budget ends
  (``--adam-steps 0`` leaves it out: on a 2-core CPU 2000 steps take about a minute).

Reported: wall time after compilation (the best of ``--repeats`` calls, the methods taking turns), the first call's
time (compilation included; lopt's is the first call in the process), fraction of points with q < 1e-12, and the
ratios.

  python benchmarks/fixed_points_speed.py [--units 256] [--seeds 1024] [--adam-steps 20000] [--repeats 3] [--write]
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


def minimal_search(step, adam_steps: int = 200, newton_steps: int = 8, learning_rate: float = 0.01):
  """The minimal loop: jitted seeds (N, H) -> (states, q), Adam then plain Newton, all seeds in one batch."""
  g_star = jnp.zeros((), jnp.float64)
  residual = lambda h: step(h, g_star) - h  # noqa: E731
  speed = lambda h: 0.5 * jnp.sum(residual(h)**2)  # noqa: E731
  grad = jax.vmap(jax.grad(speed))
  jacobian = jax.vmap(jax.jacfwd(residual))  # J - I

  @jax.jit
  def search(h):
    def adam(t, carry):  # Adam, by hand (b1 0.9, b2 0.999, eps 1e-8)
      h, m, v = carry
      g = grad(h)
      m, v = 0.9 * m + 0.1 * g, 0.999 * v + 0.001 * g * g
      m_hat, v_hat = m / (1 - 0.9**(t + 1.0)), v / (1 - 0.999**(t + 1.0))
      return h - learning_rate * m_hat / (jnp.sqrt(v_hat) + 1e-8), m, v

    h, _, _ = jax.lax.fori_loop(0, adam_steps, adam, (h, jnp.zeros_like(h), jnp.zeros_like(h)))

    def newton(_, h):
      return h + jnp.linalg.solve(jacobian(h), -jax.vmap(residual)(h)[..., None])[..., 0]

    h = jax.lax.fori_loop(0, newton_steps, newton, h)
    return h, jax.vmap(speed)(h)

  return search


def timed(fn):
  start = time.perf_counter()
  out = jax.block_until_ready(fn())
  return out, time.perf_counter() - start


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--units", type=int, default=256)
  parser.add_argument("--seeds", type=int, default=1024)
  parser.add_argument("--adam-steps", type=int, default=20000, help="plain Adam's step budget (0: leave it out)")
  parser.add_argument("--repeats", type=int, default=3, help="timed calls per method (the best is reported)")
  parser.add_argument("--write", action="store_true", help="append results to benchmarks/results/")
  args = parser.parse_args()
  with jax.enable_x64(True):
    step, seeds = build(args.units, args.seeds)
    jax.block_until_ready(seeds)
    target = jnp.asarray(TARGET, jnp.float64)
    minimal = minimal_search(step)
    found = {}

    def lopt_method():
      fixed = dynamics.find_fixed_points(step, seeds, 0.0, dtype=np.float64, tolerance=TARGET / 10)
      found["lopt"] = fixed
      return jnp.asarray(fixed.seed_speeds)

    def minimal_method():
      return minimal(seeds)[1]

    def adam_method():
      _, q, t = dynamics.adam_minimize(step, seeds, 0.0, target, max_steps=args.adam_steps, learning_rate=0.01)
      return q, t

    # First calls (compilation included; lopt's first, nothing of it compiled before), then the timed calls.
    _, lopt_first = timed(lopt_method)
    _, minimal_first = timed(minimal_method)
    lopt_times, minimal_times = [], []
    for _ in range(args.repeats):
      q_lopt, t = timed(lopt_method)
      lopt_times.append(t)
      q_minimal, t = timed(minimal_method)
      minimal_times.append(t)
    lopt_time, minimal_time = min(lopt_times), min(minimal_times)
    if args.adam_steps > 0:
      _, adam_first = timed(lambda: dynamics.adam_minimize(step, seeds, 0.0, target, max_steps=2,
                                                           learning_rate=0.01))
      (q_adam, adam_steps), adam_time = timed(adam_method)
  fixed = found["lopt"]
  q_lopt, q_minimal = np.asarray(q_lopt), np.asarray(q_minimal)
  rows = {
      f"lopt (Adam <= 200 steps + Newton, {fixed.newton_steps} iterations; dedup, classification)":
          (lopt_time, q_lopt, lopt_first),
      "minimal (Adam 200 steps + Newton 8 iterations)": (minimal_time, q_minimal, minimal_first),
  }
  if args.adam_steps > 0:  # Adam cut off by its budget: its time is a lower bound
    rows[f"plain Adam lr 0.01 ({int(adam_steps)} steps)"] = (adam_time, np.asarray(q_adam), adam_first)
  device = jax.devices()[0]
  lines = [f"## {datetime.datetime.now().isoformat(timespec='seconds')} on {device.platform}: "
           f"{getattr(device, 'device_kind', '')}",
           f"- machine: {platform.node()}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; "
           f"python {platform.python_version()}, jax {jax.__version__}, numpy {np.__version__}",
           f"- GRU {args.units} units, {args.seeds} seeds, g* = 0, float64, target q < {TARGET:g}; best of "
           f"{args.repeats} calls",
           f"- lopt found {len(fixed.points)} distinct points ({fixed.num_converged} converged, "
           f"{int(np.sum(fixed.stable))} stable)", "",
           "| method | time (s) | fraction with q < 1e-12 | max q | first call incl. compile (s) |",
           "|---|---|---|---|---|"]
  for name, (t, q, first) in rows.items():
    lines.append(f"| {name} | {t:.2f} | {np.mean(q < TARGET):.3f} | {np.max(q):.2e} | {first:.2f} |")
  lines.append("")
  lines.append(f"**time ratio, lopt / minimal: {lopt_time / minimal_time:.2f}x** (all calls: lopt "
               f"{', '.join(f'{t:.2f}' for t in lopt_times)} s; minimal {', '.join(f'{t:.2f}' for t in minimal_times)}"
               f" s)")
  if args.adam_steps > 0:
    lines.append(f"time ratio, plain Adam / lopt: {adam_time / lopt_time:.1f}x (Adam converged "
                 f"{np.mean(q_adam < TARGET):.1%} of points, lopt {np.mean(q_lopt < TARGET):.1%})")
    if np.mean(q_adam < TARGET) < 1:
      lines.append(f"(plain Adam ran out of its {args.adam_steps}-step budget before every point reached q < "
                   f"{TARGET:g}: its time is a lower bound on the time it needs)")
  text = "\n".join(lines)
  print(text)
  if args.write:
    path = Path(__file__).parent / "results" / "fixed_points_speed.md"
    header = "# Fixed-point finding speed: lopt vs a minimal loop and plain Adam (renn)\n\n" if not path.exists() else ""
    with open(path, "a") as f:
      f.write(header + text + "\n\n")


if __name__ == "__main__":
  main()
