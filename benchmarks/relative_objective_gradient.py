"""Where the meta-objective relative to a tuned Adam points `general`'s step-size heads, beside the plain one.

At the shipped `general`'s meta-parameters (fixed), NRES on all six task families estimates the meta-gradient of the
trainable heads (``--trainable step,clip``) E times, with and without ``reference_learning_rates``, from the same
keys: the same problems, perturbations and restarts, so that the two differ only in how each pair is weighted.
Printed per meta-parameter: the mean estimate and its standard error for both, and the cosine between the two mean
gradients. A negative gradient on ``step/b`` (the log step's bias) means "step larger".

``--log-objective`` adds a third estimate from the same keys: each pair's term divided by its own mean meta-loss,
(L+ - L-) / ((L+ + L-) / 2), the gradient of the mean *log* truncation loss. Every problem's relative progress then
counts alike, as a win rate counts problems, whatever its loss level or its reference's.

  python benchmarks/relative_objective_gradient.py [--pairs 96] [--estimates 12] [--truncation 50]
      [--family all] [--task-option KEY=VALUE ...]  (as `lopt train` takes them, e.g. param_scale_range=[1,10])
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import time

import jax
import numpy as np

from lopt.meta import estimators
from lopt.meta.estimators import es
from lopt.meta.config import MetaTrainConfig
from lopt.meta.train import initial_theta, optimizer_from, task_from, trainable_mask
from lopt.pytree import flatten_by_path

CONFIG = {
    "task": {"family": "all", "name": "all", "horizon": None,
             "options": {"batch_noise": True, "num_groups": 6, "max_step_flops": 2e6}},
    "optimizer": {"architecture": "hierarchical"},
    "outer": {"init_from": "general", "trainable": "step,clip", "seed": 3},
}


def estimates(config, references, count: int, seed: int) -> dict[str, np.ndarray]:
  """{meta-parameter path: (count, ...) estimates} of the trainable ones, at the initial theta."""
  task, optimizer = task_from(config), optimizer_from(config)
  theta = initial_theta(config, optimizer)
  mask = trainable_mask(config, theta)
  fields = {**config.estimator.fields, "reference_learning_rates": references}
  estimator = estimators.restrict(
      estimators.get("nres").create(task, optimizer, fields, config.task.horizon), mask)
  state = estimator.init(theta, jax.random.key(seed))
  step = jax.jit(estimator.estimate)
  out = []
  for k in range(count):
    state, grads, _ = step(theta, state, jax.random.key(seed + 1 + k))
    out.append({p: np.asarray(v) for p, v in flatten_by_path(grads).items()})
  trainable = {p for p, m in flatten_by_path(mask).items() if bool(np.all(m))}
  return {p: np.stack([o[p] for o in out]) for p in sorted(trainable)}


def log_es_terms(meta_losses, weight, sigma: float):
  """``es.es_terms`` of the log meta-losses, to first order: each pair's difference over its mean (floored)."""
  mean = jax.numpy.maximum(0.5 * (meta_losses[:, 0] + meta_losses[:, 1]), 1e-6)
  return PLAIN_TERMS(meta_losses / mean[:, None], weight, sigma)


PLAIN_TERMS = es.es_terms


def add_diagnostic_arguments(parser: argparse.ArgumentParser) -> None:
  """What the step-gradient diagnostics share: the estimates' size and the families' distribution."""
  parser.add_argument("--pairs", type=int, default=96)
  parser.add_argument("--estimates", type=int, default=12)
  parser.add_argument("--truncation", type=int, default=50)
  parser.add_argument("--sigma", type=float, default=0.05)
  parser.add_argument("--seed", type=int, default=11)
  parser.add_argument("--family", default="all", help="task families, as `lopt train --task-family` takes them")
  parser.add_argument("--task-option", action="append", default=[], metavar="KEY=VALUE")
  parser.add_argument("--out", help="write the results as JSON here")


def config_from(args) -> MetaTrainConfig:
  """CONFIG with the parsed ``add_diagnostic_arguments``: NRES on the families at `general`'s heads."""
  options = {**CONFIG["task"]["options"]}
  for text in args.task_option:
    key, value = text.split("=", 1)
    options[key] = json.loads(value)
  task = {**CONFIG["task"], "family": args.family, "name": args.family, "options": options}
  return MetaTrainConfig.from_dict({**CONFIG, "task": task, "estimator": {
      "name": "nres", "meta_batch_size": args.pairs, "truncation": args.truncation, "sigma": args.sigma,
      "num_particles": 1}})


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  add_diagnostic_arguments(parser)
  parser.add_argument("--references", default="0.001,0.01,0.1")
  parser.add_argument("--log-objective", action="store_true", help="add the estimate of the mean log loss")
  args = parser.parse_args(argv)
  config = config_from(args)
  references = [float(x) for x in args.references.split(",")]
  start = time.time()
  plain = estimates(config, [], args.estimates, args.seed)
  relative = estimates(config, references, args.estimates, args.seed)
  results = {"plain": plain, "relative": relative}
  if args.log_objective:
    es.es_terms = log_es_terms
    try:
      results["log"] = estimates(config, [], args.estimates, args.seed)
    finally:
      es.es_terms = PLAIN_TERMS
  rows, flat = {}, {name: [] for name in results}
  print(f"{'meta-parameter':24s}" + "".join(f"{name + ': mean +- s.e.':>28s}" for name in results))
  for path in plain:
    row = {}
    for name, values in results.items():
      mean = values[path].mean(0)
      error = values[path].std(0, ddof=1) / np.sqrt(len(values[path]))
      row[name] = {"mean": mean.ravel().tolist(), "standard_error": error.ravel().tolist()}
      flat[name].append(mean.ravel())
    rows[path] = row
    if len(row["plain"]["mean"]) <= 2:
      for i in range(len(row["plain"]["mean"])):
        label = path if len(row["plain"]["mean"]) == 1 else f"{path}[{i}]"
        print(f"{label:24s}" + "".join(f"{row[n]['mean'][i]:+13.4g} +- {row[n]['standard_error'][i]:<10.3g}"
                                       for n in results))
  means = {name: np.concatenate(parts) for name, parts in flat.items()}
  cosines = {f"plain/{name}": float(means["plain"] @ m / (np.linalg.norm(means["plain"]) * np.linalg.norm(m)))
             for name, m in means.items() if name != "plain"}
  cosine = cosines["plain/relative"]
  print(f"cosines between the mean gradients over all {means['plain'].size} trainable meta-parameters: "
        + ", ".join(f"{k} {v:.3f}" for k, v in cosines.items()))
  print(f"{time.time() - start:.0f} s")
  if args.out:
    result = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "machine": {"platform": platform.platform(), "backend": jax.default_backend(),
                          "jax": jax.__version__}, "settings": vars(args), "cosine": cosine, "cosines": cosines,
              "gradients": rows}
    with open(args.out, "w") as f:
      json.dump(result, f, indent=1)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
