"""`lopt benchmark` run in this process with every trained optimizer replaced by a variant of it.

The diagnostics in this folder benchmark a rule layered on a learned optimizer's updates, another feed of its losses
or an ablation exactly as the benchmark runs the optimizer itself (the same problems, seeds, baselines and report):

  benchmark_wrapped(lambda trained, transformation: my_rule(transformation), "my rule",
                    ["benchmark", "general", "--quick", "--out", "DIR"])

The variant's name joins the optimizer's identity, which keys its cached results: a variant never reads the plain
optimizer's results (or another variant's) from a shared output directory, and an interrupted run of it resumes.
The baselines' results do not depend on the variant and are shared.
"""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path

import lopt.trained
from lopt.evaluation import benchmark


@contextlib.contextmanager
def variant(wrap, name: str):
  """Within the block, ``TrainedOptimizer.as_optax(**options)`` returns ``wrap(trained, transformation)``, with
  ``transformation`` what it returns otherwise, and the benchmark's learned optimizers carry ``name`` in their
  identity; both restored on leaving the block."""
  as_optax, learned_optimizers = lopt.trained.TrainedOptimizer.as_optax, benchmark.learned_optimizers

  def learned(names):
    found = learned_optimizers(names)
    for entry in found.values():
      entry["identity"] = {**entry["identity"], "variant": name}
    return found

  lopt.trained.TrainedOptimizer.as_optax = lambda self, **options: wrap(self, as_optax(self, **options))
  benchmark.learned_optimizers = learned
  try:
    yield
  finally:
    lopt.trained.TrainedOptimizer.as_optax, benchmark.learned_optimizers = as_optax, learned_optimizers


def benchmark_wrapped(wrap, name: str, argv: list[str]) -> int:
  """``lopt`` with the command line ``argv`` (``["benchmark", NAME..., "--out", DIR, ...]``) under ``variant(wrap,
  name)``; its exit code."""
  from lopt.cli import main
  with variant(wrap, name):
    return main(argv)


def copy_baselines(previous: Path, out: Path) -> None:
  """The baselines' cached results of the run in ``previous`` copied into ``out``'s cache (made if missing): another
  output directory that need not tune them again."""
  cache = Path(out) / "cache"
  cache.mkdir(parents=True, exist_ok=True)
  for cached in (Path(previous) / "cache").glob("*.json"):
    if cached.name.split(".")[1] in benchmark.BASELINES:  # files PROBLEM.LABEL.HASH.json
      shutil.copy(cached, cache / cached.name)
