"""`lopt benchmark` with `general`'s every update multiplied by a constant and, optionally, a decay over the horizon.

A diagnostic of what a fixed rule on top of the learned step size would give: the factor is
``scale * schedule(t / num_steps)``, with the schedule 1 (``--schedule none``), a cosine from 1 to ``--floor`` or a
linear ramp to it, t the update's count and num_steps the horizon hint the benchmark passes. The rest is `lopt
benchmark`'s command line, run in this process with `general` wrapped; the baselines are unchanged, so an ``--out``
directory holding their cache reuses it (delete ``cache/*general*`` there first: the variant's results must not share
a cache with the plain `general`'s).

  python benchmarks/general_step_multiplier.py --scale 2 --schedule cosine --floor 0.1 benchmark general --quick --out DIR
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

import lopt.trained
from lopt.cli import main as lopt_main


class MultipliedState(NamedTuple):
  inner: Any
  count: jax.Array  # () int32, updates so far


def factor(count, horizon, scale: float, schedule: str, floor: float):
  """() the multiplier at update ``count`` of ``horizon``."""
  if schedule == "none" or horizon is None:
    return jnp.float32(scale)
  fraction = jnp.minimum(count.astype(jnp.float32) / jnp.float32(horizon), 1.0)
  if schedule == "cosine":
    return scale * (floor + (1 - floor) * 0.5 * (1 + jnp.cos(jnp.pi * fraction)))
  return scale * (1 - (1 - floor) * fraction)


def multiplied(inner: optax.GradientTransformationExtraArgs, scale: float, schedule: str,
               floor: float) -> optax.GradientTransformationExtraArgs:
  """``inner`` with every update multiplied by ``factor``."""
  def init(params):
    return MultipliedState(inner.init(params), jnp.zeros((), jnp.int32))

  def update(updates, state, params=None, **extra):
    updates, inner_state = inner.update(updates, state.inner, params, **extra)
    f = factor(state.count, extra.get("num_steps"), scale, schedule, floor)
    return (jax.tree.map(lambda u: u * f.astype(u.dtype), updates),
            MultipliedState(inner_state, state.count + 1))
  return optax.GradientTransformationExtraArgs(init, update)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--scale", type=float, default=1.0)
  parser.add_argument("--schedule", choices=("none", "cosine", "linear"), default="none")
  parser.add_argument("--floor", type=float, default=0.1, help="the schedule's last value, relative to its first")
  args, rest = parser.parse_known_args(argv)
  as_optax = lopt.trained.TrainedOptimizer.as_optax
  lopt.trained.TrainedOptimizer.as_optax = lambda self, **kw: multiplied(as_optax(self, **kw), args.scale,
                                                                        args.schedule, args.floor)
  return lopt_main(rest)


if __name__ == "__main__":
  sys.exit(main())
