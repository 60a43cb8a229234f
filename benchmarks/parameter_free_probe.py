"""`lopt benchmark` with a hand-designed learning-rate-free optimizer in `general`'s place.

A diagnostic: how close does a method that estimates its own step size from the run (Prodigy, DoG, D-Adaptation,
from ``optax.contrib``, at their published defaults) come to a learning-rate-tuned Adam on the suite? Where one does
well, the quantity it estimates (the distance to the solution, relative to the gradients' scale) is a feature worth
giving the learned optimizer, which today can only grow its step by the alignment of successive gradients. The rest
of the command line is `lopt benchmark`'s; the learned slot keeps its label, so give each method its own ``--out``
(copy the baselines' cache files between them to skip rerunning the baselines).

  python benchmarks/parameter_free_probe.py --method prodigy --schedule cosine benchmark general --quick --out DIR
"""

from __future__ import annotations

import argparse
import sys

import optax
import optax.contrib

from general_step_multiplier import multiplied  # (this folder is on the path when the script runs)
from wrapped_benchmark import benchmark_wrapped

METHODS = {"prodigy": optax.contrib.prodigy, "dog": optax.contrib.dog, "dadapt_adamw": optax.contrib.dadapt_adamw}


def method(name: str, schedule: str) -> optax.GradientTransformationExtraArgs:
  """``name`` at its default settings; its updates times 1 or a cosine to 0 over the ``num_steps`` the benchmark
  passes (Prodigy's authors advise a cosine)."""
  return multiplied(optax.with_extra_args_support(METHODS[name]()), 1.0, schedule, 0.0)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--method", choices=sorted(METHODS), default="prodigy")
  parser.add_argument("--schedule", choices=("none", "cosine"), default="none")
  args, rest = parser.parse_known_args(argv)
  return benchmark_wrapped(lambda trained, transformation: method(args.method, args.schedule),
                           f"{args.method}, schedule {args.schedule}", rest)


if __name__ == "__main__":
  sys.exit(main())
