"""A copy of a learned optimizer with some of its meta-parameters taken from another of the same shapes, for
`lopt benchmark` to run beside both: which part of a meta-trained candidate carries what it learned?

  python benchmarks/theta_graft.py BASE DONOR OUT PREFIX[,PREFIX ...] [--weight W]
  python benchmarks/theta_graft.py general runs/general-hierarchical-h200-tbptt-illcond-8/optimizer \
      runs/general-hybrid-lstm-illcond-8/optimizer lstm,context

Every meta-parameter whose key path starts with one of the prefixes (``lstm``, ``context``, ``step``, ``clip``,
``mlp`` for the hierarchical optimizer; ``lopt.load(BASE).optimizer.param_shapes()`` lists them) comes from DONOR,
the rest from BASE; the copy has BASE's architecture fields (its ``max_log_step``, say). The copy records the graft in
its config's ``info.graft``, and leaves out the base's ``info.benchmark`` (not the copy's numbers).

``--weight W`` takes only part of the way to the donor: each grafted leaf is base + W·(donor − base), so 1 (the
default) is the donor's and 0 the base's. Interpolating weights means something only where DONOR was meta-trained
from BASE (``--init-from``), so that both lie in one basin.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

import lopt
from lopt.io.checkpoint import save_optimizer
from lopt.pytree import flatten_by_path, prefix_mask, unflatten_by_path


def grafted_theta(base, donor, prefixes: list[str], weight: float = 1.0) -> tuple[dict, list[str]]:
  """(base's theta with the leaves under ``prefixes`` moved ``weight`` of the way to donor's, the key paths taken).
  SystemExit naming the problem for a prefix that matches nothing or a leaf whose shape differs."""
  ours, theirs = flatten_by_path(base), flatten_by_path(donor)
  taken = []
  for prefix in prefixes:  # one at a time, so that the key paths taken keep the order the prefixes were named in
    mask, unmatched = prefix_mask(base, (prefix.rstrip("/"),))
    if unmatched:
      raise SystemExit(f"theta_graft: no meta-parameter under {prefix!r}; known: {', '.join(sorted(ours))}")
    taken += [k for k, selected in flatten_by_path(mask).items() if selected and k not in taken]
  for k in taken:
    if k not in theirs or np.shape(theirs[k]) != np.shape(ours[k]):
      found = np.shape(theirs[k]) if k in theirs else "nothing"
      raise SystemExit(f"theta_graft: the donor's {k} is {found}, the base's {np.shape(ours[k])}; they must match")
  def moved(ours_leaf, theirs_leaf):
    ours_leaf = np.asarray(ours_leaf)
    theirs_leaf = np.asarray(theirs_leaf, dtype=ours_leaf.dtype)
    if weight == 1.0:  # the donor's values exactly: base + (donor - base) can differ from donor in the last bit
      return theirs_leaf
    return (ours_leaf + weight * (theirs_leaf - ours_leaf)).astype(ours_leaf.dtype)
  merged = {k: (moved(v, theirs[k]) if k in taken else v) for k, v in ours.items()}
  return unflatten_by_path(merged, base), taken


def main(argv: list[str]) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("base")
  parser.add_argument("donor")
  parser.add_argument("out")
  parser.add_argument("prefixes", help="comma-separated key-path prefixes: lstm,context")
  parser.add_argument("--weight", type=float, default=1.0, help="how far to move toward the donor (default 1)")
  args = parser.parse_args(argv)
  if not np.isfinite(args.weight):
    parser.error(f"--weight must be a finite number, got {args.weight}")
  base_name, donor_name, out = args.base, args.donor, args.out
  prefixes = [p for p in args.prefixes.split(",") if p]
  base, donor = lopt.load(base_name), lopt.load(donor_name)
  if base.optimizer.config()["architecture"] != donor.optimizer.config()["architecture"]:
    raise SystemExit(f"theta_graft: {base_name} and {donor_name} are different architectures")
  theta, taken = grafted_theta(base.theta, donor.theta, prefixes, args.weight)
  graft = {"base": base_name, "donor": donor_name, "taken": taken, "weight": args.weight}
  # The base's recorded benchmark is not the copy's: leave it out rather than mislabel it.
  info = {k: v for k, v in base.config.get("info", {}).items() if k != "benchmark"}
  save_optimizer(out, base.optimizer, theta, {**info, "graft": graft})
  print(f"{out}: {base_name} with {', '.join(taken)} moved {args.weight:g} of the way to {donor_name}'s")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
