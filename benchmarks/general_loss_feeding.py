"""How `general` reacts to the losses it is fed: the same runs with the training loss, the validation loss, both or
neither given, and with the (smooth) validation loss given in place of the (noisy) training loss.

`general` reads both losses through accumulators (docs/GENERAL.md, "The architecture"). At batch size 2 it loses to
Adam at 1e-3 with both given and beats it with neither; this script measures which feed does it, side by side with
Adam at a few learning rates on the same problems and keys (the benchmark's evaluation keys, quick horizons).

  python benchmarks/general_loss_feeding.py s_curve_batch2 friedman_mlp --ablate --snr --json OUT.json

``--benchmark FEED`` runs `lopt benchmark` instead (the rest of the command line), with `general` given only what
FEED says ("validation loss only", "training loss only", "neither"; the baselines are unchanged):

  python benchmarks/general_loss_feeding.py --benchmark "validation loss only" benchmark general --quick --out DIR

``--benchmark-blind FEATURE`` does the same with `general` blind to one loss feature (its LSTM's input weights of
that feature zeroed), e.g. "training loss: drop".
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import lopt
from lopt.evaluation import benchmark, suite

# feed -> (training loss given, validation loss given, the validation loss given as the training loss)
FEEDS = {
    "both (as the benchmark runs it)": (True, True, False),
    "validation loss only": (False, True, False),
    "training loss only": (True, False, False),
    "neither": (False, False, False),
    "validation loss as the training loss": (False, True, True),
}
ADAM_RATES = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1)


def unroll(task, optimizer, key, horizon: int, feed: str | None = None):
  """(horizon,) training losses of one problem, run as `lopt benchmark` runs it (``benchmark.training_scan``); with
  ``feed`` (a FEEDS label) the optimizer is given only what that feed names. The one feed the benchmark's scan cannot
  give, the validation loss in the training loss's place, needs the validation loss at every step: its own scan."""
  if feed is None or not FEEDS[feed][2]:
    given = optax.with_extra_args_support(optimizer) if feed is None else fed_only(optimizer, feed)
    return benchmark.training_scan(task, given, key, horizon)[1]
  params = task.init(key)

  def step(carry, t):
    params, state = carry
    loss, grads = jax.value_and_grad(task.loss)(params, key, t)
    valid = task.valid_loss(params, key, t)
    fed = jnp.where(t % benchmark.VALID_EVERY == 0, valid, jnp.full((), jnp.nan, loss.dtype))
    updates, state = optimizer.update(grads, state, params, value=valid, valid_loss=fed, num_steps=horizon)
    return (optax.apply_updates(params, updates), state), loss

  _, losses = jax.lax.scan(step, (params, optimizer.init(params)), jnp.arange(horizon))
  return losses


def loss_feature_rows() -> dict[str, list[int]]:
  """{feature: rows of general's 'lstm/w'} for the loss features (``hierarchical.optimizer.loss_features``: per
  loss seen, drop, EMA deviations; then the validation-training gap), which follow the per-tensor inputs."""
  from lopt.architectures.hierarchical.spec import LOSS_DECAYS, NUM_LOSS_FEATURES, num_time_features, num_tensor_inputs
  first = num_tensor_inputs(lopt.load("general").optimizer.config()) - NUM_LOSS_FEATURES - num_time_features()
  per_loss = 2 + len(LOSS_DECAYS)
  rows = {}
  for i, loss in enumerate(("training", "validation")):
    base = first + i * per_loss
    rows[f"{loss} loss: drop"] = [base + 1]
    rows[f"{loss} loss: EMA deviations"] = list(range(base + 2, base + per_loss))
  rows["validation-training gap"] = [first + 2 * per_loss]
  return rows


def ablated(rows: list[int], trained=None):
  """``trained`` (default `general`; optax) with its LSTM's input weights of ``rows`` zeroed: blind to those
  features."""
  from lopt.optax_adapter import as_optax
  from lopt.pytree import flatten_by_path, unflatten_by_path
  trained = trained or lopt.load("general")
  flat = dict(flatten_by_path(trained.theta))
  flat["lstm/w"] = jnp.asarray(flat["lstm/w"]).at[jnp.asarray(rows, jnp.int32)].set(0.0)
  return as_optax(trained.optimizer, unflatten_by_path(flat, trained.theta))


def signal_to_noise(task, learning_rate: float, keys, horizon: int, fractions=(0.1, 0.3, 0.6, 0.99)) -> list[float]:
  """Adam's median over tensors of mean(m^2) / mean(v) (bias-corrected; about (1 - b1) / (1 + b1) = 0.05 for pure
  noise, 1 for a constant gradient) at ``fractions`` of the run, averaged over ``keys``."""
  optimizer = optax.with_extra_args_support(optax.adam(learning_rate))

  def median_ratio(updates, state):
    adam = state[0]
    t = adam.count.astype(jnp.float32)  # steps taken, this one included
    first, second = 1 - 0.9 ** t, 1 - 0.999 ** t
    ratios = jnp.stack([jnp.mean((m / first) ** 2) / (jnp.mean(v / second) + 1e-30)
                        for m, v in zip(jax.tree.leaves(adam.mu), jax.tree.leaves(adam.nu))])
    return jnp.median(ratios)

  def run(key):
    return benchmark.training_scan(task, optimizer, key, horizon, measure=median_ratio)[3]

  ratios = np.asarray(jax.jit(jax.vmap(run))(keys)).mean(0)
  return [float(ratios[int(f * (horizon - 1))]) for f in fractions]


def measure(name: str, seeds: int, ablate: bool = False, snr: bool = False) -> dict:
  """{label: {"mean_loss", "final_loss"}} for every feed of `general` and Adam at ``ADAM_RATES`` on problem
  ``name`` (means over ``seeds`` evaluation keys; the final loss over the last tenth); with ``ablate`` also `general`
  blind to each loss feature (both losses fed), with ``snr`` Adam's signal-to-noise ratio at its best rate here."""
  problem = suite.get(name)
  task, horizon = problem.task(), problem.quick_horizon or problem.horizon
  keys = benchmark.seed_keys(benchmark.EVALUATION_SEED, seeds)
  general = lopt.load("general").as_optax()
  runs = {f"general, {feed}": (general, feed) for feed in FEEDS}
  if ablate:
    runs.update({f"general blind to the {feature}": (ablated(rows), "both (as the benchmark runs it)")
                 for feature, rows in loss_feature_rows().items()})
  runs.update({f"adam {rate:g}": (optax.adam(rate), None) for rate in ADAM_RATES})
  out = {}
  for label, (optimizer, feed) in runs.items():
    losses = np.asarray(jax.jit(jax.vmap(lambda k: unroll(task, optimizer, k, horizon, feed)))(keys))
    out[label] = {"mean_loss": float(np.mean(losses)), "final_loss": float(np.mean(losses[:, -horizon // 10:]))}
  if snr:
    best = min(ADAM_RATES, key=lambda rate: out[f"adam {rate:g}"]["mean_loss"])
    out["signal-to-noise of Adam at its best rate, at 10/30/60/99% of the run"] = {
        "learning_rate": best, "ratios": signal_to_noise(task, best, keys, horizon)}
  return out


def fed_only(inner: optax.GradientTransformationExtraArgs, feed: str) -> optax.GradientTransformationExtraArgs:
  """``inner`` given only the losses ``FEEDS[feed]`` names (the others dropped from its update's arguments)."""
  train, valid, _ = FEEDS[feed]

  def update(updates, state, params=None, **extra):
    extra = {k: v for k, v in extra.items() if (k != "value" or train) and (k != "valid_loss" or valid)}
    return inner.update(updates, state, params, **extra)
  return optax.GradientTransformationExtraArgs(inner.init, update)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--benchmark", choices=[f for f, (_, _, instead) in FEEDS.items() if not instead],
                      help="run `lopt benchmark` (the rest of the command line) with general given only this")
  parser.add_argument("problems", nargs="*", default=["s_curve_batch2"], help="`lopt benchmark --list` names")
  parser.add_argument("--seeds", type=int, default=3)
  parser.add_argument("--ablate", action="store_true", help="also general blind to each loss feature")
  parser.add_argument("--snr", action="store_true", help="also Adam's signal-to-noise ratio at its best rate")
  parser.add_argument("--benchmark-blind", choices=list(loss_feature_rows()),
                      help="run `lopt benchmark` (the rest of the command line) with general blind to this feature")
  parser.add_argument("--json", help="write the results here")
  args, rest = parser.parse_known_args(argv)
  if args.benchmark or args.benchmark_blind:
    from wrapped_benchmark import benchmark_wrapped  # this folder (on the path when the script runs)
    if args.benchmark:
      wrap, name = lambda trained, transformation: fed_only(transformation, args.benchmark), args.benchmark
    else:
      rows = loss_feature_rows()[args.benchmark_blind]
      wrap, name = lambda trained, transformation: ablated(rows, trained), f"blind to {args.benchmark_blind}"
    return benchmark_wrapped(wrap, name, args.problems + rest)  # the positionals took "benchmark general ..."
  if rest:
    parser.error(f"unrecognized arguments: {' '.join(rest)}")
  started, results = time.time(), {}
  for name in args.problems:
    results[name] = measure(name, args.seeds, args.ablate, args.snr)
    best_adam = min(v["mean_loss"] for k, v in results[name].items() if k.startswith("adam "))
    print(f"{name}: mean training loss (final), and / the best Adam rate's mean")
    for label, value in results[name].items():
      if "ratios" in value:
        print(f"  {label} (rate {value['learning_rate']:g}): " + " ".join(f"{r:.3f}" for r in value["ratios"]))
        continue
      print(f"  {label:48s} {value['mean_loss']:.4g} ({value['final_loss']:.4g})  "
            f"{value['mean_loss'] / best_adam:6.3f}", flush=True)
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"what": __doc__.splitlines()[0], "command": "python benchmarks/general_loss_feeding.py "
                 + " ".join(argv if argv is not None else sys.argv[1:]), "machine": benchmark.machine(),
                 "date": time.strftime("%Y-%m-%d"), "seconds": round(time.time() - started),
                 "seeds": args.seeds, "problems": results}, f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
