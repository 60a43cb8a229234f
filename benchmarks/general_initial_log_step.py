"""`lopt benchmark` with `general`'s per-tensor log step starting at a shift instead of 0.

A diagnostic of the first steps: `general`'s first update is about a tenth of tuned Adam's on the problems where
Adam's best rate is 0.1 (least squares, matrix completion: `step_trace.py`), and its LSTM raises the step over the
first few steps. Starting every tensor's log step at ``--shift`` (the LSTM then moves it as in any run, reading it
as an input) tells whether a larger first step alone would win those problems, and what it costs the others. The
rest is `lopt benchmark`'s command line, run in this process with `general` wrapped (``wrapped_benchmark.py``: the
variant's results are cached apart from the plain optimizer's; the baselines are shared):

  python benchmarks/general_initial_log_step.py --shift 1 benchmark general --quick --out DIR
"""

from __future__ import annotations

import argparse
import sys

import jax
import optax

from lopt.architectures.hierarchical.optimizer import TensorState
from wrapped_benchmark import benchmark_wrapped  # this folder


def shifted(state, shift: float):
  """``state`` (any pytree) with every ``TensorState``'s log step raised by ``shift``."""
  is_tensors = lambda x: isinstance(x, TensorState)  # noqa: E731
  return jax.tree.map(lambda x: x._replace(log_step=x.log_step + shift) if is_tensors(x) else x, state,
                      is_leaf=is_tensors)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--shift", type=float, required=True, help="the initial log step (natural log; 0: as shipped)")
  args, rest = parser.parse_known_args(argv)
  wrap = lambda trained, inner: optax.GradientTransformationExtraArgs(  # noqa: E731
      lambda params: shifted(inner.init(params), args.shift), inner.update)
  return benchmark_wrapped(wrap, f"initial log step {args.shift:g}", rest)


if __name__ == "__main__":
  sys.exit(main())
