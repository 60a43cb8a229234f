"""`lopt benchmark` with an experimental variant of `general` whose step follows the parameters' scale.

Every update of the shipped `general` is multiplied by clip(RMS0 / R, 1e-2, 1e2), RMS0 the root mean square of the
model's weight matrices (every tensor of at least two axes) at initialization (factor 1 when they are all zero),
R the families' median RMS0 at parameter scale 1 (0.33 by default; ``general_family_problems.py`` has the
same variant on the training families' problems). The rest is ``lopt benchmark``'s command line, run in this process
with `general` wrapped; the baselines are unchanged, so an ``--out`` directory holding their cache reuses it (the
variant's results must not share a cache with the plain `general`'s: use a fresh directory or delete
``cache/*general*``).

  python benchmarks/general_relative_scale.py [--reference 0.33] benchmark general --quick --out DIR
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, NamedTuple

import jax
import optax

from general_family_problems import relative_factor  # this folder: the same variant
from wrapped_benchmark import benchmark_wrapped  # this folder


class RelativeState(NamedTuple):
  inner: Any
  factor: jax.Array  # () the scale factor, fixed at init


def relative(inner: optax.GradientTransformationExtraArgs, reference: float) -> optax.GradientTransformationExtraArgs:
  """``inner`` with every update scaled by clip(RMS0 / reference, 1e-2, 1e2) (1 for all-zero weights)."""
  def init(params):
    return RelativeState(inner.init(params), relative_factor(params, reference))

  def update(updates, state, params=None, **extra):
    updates, inner_state = inner.update(updates, state.inner, params, **extra)
    return jax.tree.map(lambda u: u * state.factor.astype(u.dtype), updates), RelativeState(inner_state, state.factor)
  return optax.GradientTransformationExtraArgs(init, update)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--reference", type=float, default=0.33)
  args, rest = parser.parse_known_args(argv)
  return benchmark_wrapped(lambda trained, transformation: relative(transformation, args.reference),
                           f"relative scale, reference {args.reference:g}", rest)


if __name__ == "__main__":
  sys.exit(main())
