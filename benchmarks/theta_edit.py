"""A copy of a learned optimizer with some meta-parameters multiplied (or a bound set), for `lopt benchmark` to run
beside the original.

A probe, not a training method: it asks what one meta-parameter does on problems the optimizer never saw, e.g.
the hierarchical optimizer's hypergradient gain (how fast its per-tensor log step follows the alignment of
successive gradients). The copy records the edit in its config's ``info.edit``.

  python benchmarks/theta_edit.py SOURCE OUT KEY=FACTOR [KEY=FACTOR ...]
  python benchmarks/theta_edit.py general /tmp/general-gain2 step/alignment=2
  lopt benchmark general /tmp/general-gain2 --quick --out /tmp/bench
  python benchmarks/theta_edit.py general /tmp/general-limit-8/optimizer max_log_step=8

KEY is a meta-parameter's key path as ``lopt.load(SOURCE).optimizer.param_shapes()`` lists it, multiplied by
FACTOR; or a field of the architecture that shapes no meta-parameter (``ArchitectureSpec.unshaped_fields``, e.g.
the hierarchical optimizer's ``max_log_step``), set to the value.
"""

from __future__ import annotations

import sys

import numpy as np

import lopt
from lopt import architectures
from lopt.errors import UserError
from lopt.io.checkpoint import save_optimizer
from lopt.pytree import flatten_by_path, unflatten_by_path


def parse_edits(items: list[str]) -> dict[str, float]:
  """["step/alignment=2", ...] -> {"step/alignment": 2.0}; a clear error for anything else."""
  edits = {}
  for item in items:
    key, sep, factor = item.partition("=")
    try:
      edits[key] = float(factor)
    except ValueError:
      sep = ""
    if not sep or not key:
      raise SystemExit(f"theta_edit: {item!r} is not KEY=FACTOR (e.g. step/alignment=2)")
  return edits


def edited_theta(theta, edits: dict[str, float]):
  """theta with each named leaf multiplied by its factor (leaves keep their dtype)."""
  flat = flatten_by_path(theta)
  unknown = sorted(set(edits) - set(flat))
  if unknown:
    raise SystemExit(f"theta_edit: no meta-parameter {', '.join(unknown)}; known: {', '.join(sorted(flat))}")
  return unflatten_by_path({k: (np.asarray(v) * edits[k]).astype(np.asarray(v).dtype) if k in edits else v
                            for k, v in flat.items()}, theta)


def with_fields(optimizer, fields: dict[str, float]):
  """The same architecture with ``fields`` set (validated by its spec: a clear error for a value it refuses)."""
  if not fields:
    return optimizer
  config = optimizer.config()
  try:
    return architectures.get(config["architecture"]).build({**config, **fields}, "theta_edit")
  except UserError as error:
    raise SystemExit(f"theta_edit: {error}") from None


def main(argv: list[str]) -> int:
  if len(argv) < 3:
    raise SystemExit(__doc__)
  source, out, edits = argv[0], argv[1], parse_edits(argv[2:])
  trained = lopt.load(source)
  unshaped = architectures.get(trained.optimizer.config()["architecture"]).unshaped_fields
  fields = {k: v for k, v in edits.items() if k in unshaped}
  factors = {k: v for k, v in edits.items() if k not in unshaped}
  record = {"source": source, "multiplied": factors, **({"set": fields} if fields else {})}
  optimizer = with_fields(trained.optimizer, fields)
  theta = edited_theta(trained.theta, factors)
  save_optimizer(out, optimizer, theta, {**trained.config.get("info", {}), "edit": record})
  print(f"{out}: {source} with " + ", ".join([f"{k} x{v:g}" for k, v in factors.items()]
                                             + [f"{k} = {v:g}" for k, v in fields.items()]))
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
