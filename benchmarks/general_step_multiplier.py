"""`lopt benchmark` with `general`'s every update multiplied by a constant and, optionally, a schedule over the horizon.

A diagnostic of what a fixed rule on top of the learned step size would give: the factor is
``scale * schedule(t / num_steps)``, with the schedule 1 (``--schedule none``), a cosine from 1 to ``--floor`` or a
linear ramp to it, t the update's count and num_steps the horizon hint the benchmark passes, optionally after a
linear warm-up over a fraction of the horizon (``--warmup``). The rest is `lopt
benchmark`'s command line, run in this process with `general` wrapped; the baselines are unchanged, so an ``--out``
directory holding their cache reuses it (delete ``cache/*general*`` there first: the variant's results must not share
a cache with the plain `general`'s).

  python benchmarks/general_step_multiplier.py --scale 2 --schedule cosine --floor 0.1 benchmark general --quick --out DIR

Several scales run one benchmark each, in ``DIR/x<scale>`` (the baselines computed once and their cache shared), then
an oracle: for every problem and learned optimizer, the scale whose run had the lowest mean loss relative to tuned
Adam, on the evaluation seeds themselves -- an optimistic bound on what a right step size alone would give, printed
and written to ``DIR/oracle.json``:

  python benchmarks/general_step_multiplier.py --scale 0.125,0.25,0.5,1,2,4,8 benchmark general --quick --out DIR
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from wrapped_benchmark import benchmark_wrapped, copy_baselines  # this folder


class MultipliedState(NamedTuple):
  inner: Any
  count: jax.Array  # () int32, updates so far


def factor(count, horizon, scale: float, schedule: str, floor: float, warmup: float = 0.0):
  """() the multiplier at update ``count`` (from 0) of ``horizon``: ``scale`` times the schedule, times a linear
  warm-up (count + 1) / (warmup * horizon) while that is below 1."""
  if horizon is None or (schedule == "none" and not warmup):
    return jnp.float32(scale)
  fraction = jnp.minimum(count.astype(jnp.float32) / jnp.float32(horizon), 1.0)
  ramp = jnp.minimum(1.0, (count.astype(jnp.float32) + 1) / jnp.maximum(warmup * jnp.float32(horizon), 1.0))
  if schedule == "cosine":
    return ramp * scale * (floor + (1 - floor) * 0.5 * (1 + jnp.cos(jnp.pi * fraction)))
  if schedule == "linear":
    return ramp * scale * (1 - (1 - floor) * fraction)
  return ramp * scale


def multiplied(inner: optax.GradientTransformationExtraArgs, scale: float, schedule: str,
               floor: float, warmup: float = 0.0) -> optax.GradientTransformationExtraArgs:
  """``inner`` with every update multiplied by ``factor``."""
  def init(params):
    return MultipliedState(inner.init(params), jnp.zeros((), jnp.int32))

  def update(updates, state, params=None, **extra):
    updates, inner_state = inner.update(updates, state.inner, params, **extra)
    f = factor(state.count, extra.get("num_steps"), scale, schedule, floor, warmup)
    return (jax.tree.map(lambda u: u * f.astype(u.dtype), updates),
            MultipliedState(inner_state, state.count + 1))
  return optax.GradientTransformationExtraArgs(init, update)


def oracle(results: dict[float, dict]) -> dict:
  """Per learned optimizer, per problem, the scale with the lowest mean loss relative to tuned Adam, from
  ``lopt benchmark``'s benchmark.json per scale; and the wins and geometric mean that choice gives."""
  first = next(iter(results.values()))
  out = {}
  for name in first["summary"]:
    ratios = {scale: {problem: entry["results"][name]["mean_loss"] / entry["results"]["adam_tuned"]["mean_loss"]
                      for problem, entry in result["problems"].items()} for scale, result in results.items()}
    best = {problem: min(ratios, key=lambda scale: ratios[scale][problem]) for problem in first["problems"]}
    chosen = [ratios[best[p]][p] for p in best]
    out[name] = {"ratio_mean_loss": ratios, "best_scale": best,
                 "wins_vs_tuned_adam": sum(r < 1 for r in chosen), "num_problems": len(chosen),
                 "geometric_mean": math.exp(sum(map(math.log, chosen)) / len(chosen))}
  return out


def print_oracle(table: dict) -> None:
  for name, entry in table.items():
    scales = list(entry["ratio_mean_loss"])
    print(f"{name}: mean loss / tuned Adam's at each scale, and the oracle's choice")
    print(f"{'problem':24s}" + "".join(f"{'x%g' % x:>8s}" for x in scales) + "    best")
    for problem, scale in entry["best_scale"].items():
      print(f"{problem:24s}" + "".join(f"{entry['ratio_mean_loss'][x][problem]:8.3f}" for x in scales)
            + f"    x{scale:g}")
    print(f"oracle: wins {entry['wins_vs_tuned_adam']} of {entry['num_problems']} against tuned Adam, "
          f"geometric mean {entry['geometric_mean']:.3f}")


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--scale", type=lambda text: [float(x) for x in text.split(",")], default=[1.0],
                      help="the constant factor; several, comma-separated: one benchmark each, then the oracle")
  parser.add_argument("--schedule", choices=("none", "cosine", "linear"), default="none")
  parser.add_argument("--floor", type=float, default=0.1, help="the schedule's last value, relative to its first")
  parser.add_argument("--warmup", type=float, default=0.0,
                      help="a linear warm-up over this fraction of the horizon (0: none)")
  args, rest = parser.parse_known_args(argv)

  def run(scale: float, argv: list[str]) -> int:
    name = f"x{scale:g}, schedule {args.schedule}, floor {args.floor:g}, warm-up {args.warmup:g}"
    return benchmark_wrapped(lambda trained, transformation: multiplied(
        transformation, scale, args.schedule, args.floor, args.warmup), name, argv)

  if len(args.scale) == 1:
    return run(args.scale[0], rest)
  if "--out" not in rest:
    parser.error("several scales need the benchmark's --out DIR")
  where = rest.index("--out") + 1
  out, results, previous = Path(rest[where]), {}, None
  for scale in args.scale:
    folder = out / f"x{scale:g}"
    if previous is not None and not (folder / "cache").exists():
      copy_baselines(previous, folder)
    code = run(scale, rest[:where] + [str(folder)] + rest[where + 1:])
    if code:
      return code
    results[scale] = json.loads((folder / "benchmark.json").read_text())
    previous = folder
  table = oracle(results)
  print_oracle(table)
  (out / "oracle.json").write_text(json.dumps({"scales": args.scale, "schedule": args.schedule,
                                               "floor": args.floor, "warmup": args.warmup, "oracle": table}, indent=1))
  return 0


if __name__ == "__main__":
  sys.exit(main())
