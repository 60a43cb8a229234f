"""Which phases of training and which families decide where the meta-gradient points `general`'s log step.

`relative_objective_gradient.py` measured that every variant of the families' distribution pushes the log step's bias
`step/b` down (descent makes the step smaller). This splits that estimate into its parts. At `general`'s
meta-parameters (the heads trainable, the same configuration and keys as there), NRES on the six families runs E
estimates; every antithetic pair's term of the `step/b` estimate, (L+ - L-) / (2 sigma^2) * eps[step/b] (times the
pair's weight relative to its best Adam reference with --relative), is recorded with the pair's phase (the
truncation's first inner step over its episode's length) and its family. The estimate is the mean of the terms, so
each part's sum over the whole count is its share: the parts add up to the estimate.

  python benchmarks/step_gradient_phases.py [--pairs 96] [--estimates 12] [--relative] [--family all]
      [--task-option KEY=VALUE ...] [--out results.json]

Printed: the estimate (positive: descent shrinks the step) and its parts by phase of the episode (the first
truncation alone, then ranges of the phase), by family, and by family within the first truncation, each with its
standard error over the pairs and the share of pairs in it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

from lopt.meta import estimators
from lopt.meta.estimators import es
from lopt.meta.train import family_configs, initial_theta, optimizer_from, task_from, trainable_mask
from lopt.pytree import flatten_by_path
from relative_objective_gradient import add_diagnostic_arguments, config_from

PATH = "step/b"
PHASES = [(0.0, 0.1), (0.1, 0.25), (0.25, 0.5), (0.5, 1.0)]


def pair_terms(group: es.Antithetic):
  """jitted (theta, state, key) -> (state, (pairs,) terms of the PATH estimate, (pairs,) phases, (pairs,) finite):
  ``group.estimate`` taken apart where its pairs are summed."""

  def run(theta, state, key):
    episodes, noise, used, weight = group.prepare(theta, state, key)
    pair_weight = jnp.ones(episodes.length.shape[0])
    if group.reference_learning_rates:
      reference_losses, references = group.advance_references(state.references, episodes)
      pair_weight = es.relative_weights(jnp.min(reference_losses, axis=1))
    meta_losses, advanced = jax.vmap(jax.vmap(group.unroll))(group.perturbed(theta, used), episodes)
    scale = (meta_losses[:, 0] - meta_losses[:, 1]) / (2 * group.sigma**2) * pair_weight
    terms = scale * flatten_by_path(weight)[PATH].reshape(scale.shape[0], -1)[:, 0]
    phase = episodes.inner.step[:, 0] / episodes.length[:, 0]
    finite = jnp.isfinite(meta_losses[:, 0] - meta_losses[:, 1])
    state = (es.ReferencedState(advanced, noise, references) if group.reference_learning_rates
             else es.AntitheticState(advanced, noise))
    return state, jnp.where(finite, terms, 0.0), phase, finite

  return jax.jit(run)


def collect(config, references, count: int, seed: int) -> dict:
  """{terms, phases, families, finite}: one entry per pair and estimate."""
  task, optimizer = task_from(config), optimizer_from(config)
  theta = initial_theta(config, optimizer)
  fields = {**config.estimator.fields, "reference_learning_rates": references}
  grouped = estimators.restrict(estimators.get("nres").create(task, optimizer, fields, config.task.horizon),
                                trainable_mask(config, theta))
  families = [c["family"] for c in family_configs(config.task, config.seed)]
  groups = grouped.estimators
  runs = [pair_terms(g) for g in groups]
  states = list(grouped.init(theta, jax.random.key(seed)))
  out = {"terms": [], "phases": [], "families": [], "finite": []}
  for k in range(count):
    key = jax.random.key(seed + 1 + k)
    for g, run in enumerate(runs):  # the keys Grouped.estimate gives its groups
      states[g], terms, phases, finite = run(theta, states[g], jax.random.fold_in(key, g))
      out["terms"].append(np.asarray(terms))
      out["phases"].append(np.asarray(phases))
      out["finite"].append(np.asarray(finite))
      out["families"].extend([families[g]] * len(terms))
  return {k: np.concatenate(v) if k != "families" else np.asarray(v) for k, v in out.items()}


def parts(data: dict) -> dict:
  """The estimate and its additive parts: {label: (part, standard error, share of pairs)}."""
  terms, phases, count = data["terms"], data["phases"], max(int(data["finite"].sum()), 1)
  # Grouped weighs each group by its problems and every group has the same number, so the estimate is the plain
  # mean of the finite pairs' terms; each part is its pairs' sum over the same count.

  def part(mask):
    selected = np.where(mask, terms, 0.0)  # a pair outside the part counts as a zero term
    return float(selected.sum() / count), float(selected.std(ddof=1) / np.sqrt(count)), float(mask.mean())

  rows = {"estimate": part(np.ones_like(phases, bool)), "first truncation (phase 0)": part(phases == 0)}
  for low, high in PHASES:  # after the first truncation
    label = f"phase ({low:g}, {high:g})" if high < 1 else f"phase [{low:g}, 1)"
    rows[label] = part((phases > low if low == 0 else phases >= low) & (phases < high))
  for family in sorted(set(data["families"])):
    rows[family] = part(data["families"] == family)
  for family in sorted(set(data["families"])):
    rows[f"{family}, phase 0"] = part((data["families"] == family) & (phases == 0))
  return rows


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  add_diagnostic_arguments(parser)
  parser.add_argument("--relative", action="store_true", help="weigh pairs relative to Adam at 1e-3, 1e-2, 1e-1")
  args = parser.parse_args(argv)
  config = config_from(args)
  started = time.time()
  data = collect(config, [0.001, 0.01, 0.1] if args.relative else [], args.estimates, args.seed)
  rows = parts(data)
  print(f"{PATH} (positive: descent shrinks the step), {len(data['terms'])} pair terms:")
  print(f"{'part':<32}{'sum':>10}{'s.e.':>10}{'pairs':>8}")
  for label, (value, error, share) in rows.items():
    print(f"{label:<32}{value:>+10.3f}{error:>10.3f}{share:>8.0%}")
  print(f"{time.time() - started:.0f} s")
  if args.out:
    with open(args.out, "w") as f:
      json.dump({"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                 "machine": {"platform": platform.platform(), "backend": jax.default_backend(),
                             "jax": jax.__version__},
                 "settings": vars(args), "parts": {k: dict(zip(("sum", "standard_error", "share"), v))
                                                   for k, v in rows.items()}}, f, indent=1)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
