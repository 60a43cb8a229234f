"""The shipped `general` against Adam with a tuned learning rate on fresh problems of its own training families.

`lopt benchmark` probes problems unlike the training tasks; this probes the training distribution itself: do the
six families' configurations that meta-training never drew (seeds it never used) come out as well as the ones it
selected on? It is also a development set that leaves the benchmark untouched.

  python benchmarks/general_family_problems.py [--count 24] [--seed 880000] [--max-horizon 600] [--family NAME]
      [--relative-reference R] [--update-cap K] [--candidate NAME|PATH ...] [--out results.json]

Each problem is ``lopt.tasks.families.sample(seed + i, max_step_flops=1e6)`` (``--family``: of that family only,
an opt-in one too), run for min(its horizon,
--max-horizon) steps on 2 keys. `general` gets ``num_steps`` and the validation loss every 10 steps, as in
``lopt benchmark``; Adam's learning rate is the best of 8 (1e-4..0.3, half decades) on the same keys (an optimistic
Adam: tuned on the keys it is scored on). Printed per problem: the family, the horizon, Adam's learning rate, and the
ratio of general's mean training loss over the run to tuned Adam's; then the win rate and the geometric mean.

``--relative-reference R`` adds an experimental variant: every update of general scaled by clip(RMS0 / R, 1e-2, 1e2),
RMS0 the root mean square of the problem's weight matrices at initialization (1 when they are all zero), so that
its step follows the parameters' scale (families' median RMS0 at param_scale 1: 0.33). ``--update-cap K`` adds
another: each tensor's update scaled down to at most K times its parameters' RMS (a trust-ratio clip; none for an
all-zero tensor). ``--candidate`` adds trained optimizers (a meta-training run's exported optimizer, say), each run
exactly as `general` is.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import lopt
from lopt.tasks import families

LEARNING_RATES = tuple(float(x) for x in 10.0 ** np.arange(-4.0, -0.4, 0.5))
VALID_EVERY = 10
KEYS = 2


def weight_rms(params) -> jax.Array:
  """() the RMS over every parameter tensor of at least two axes (0 without any)."""
  weights = [x for x in jax.tree.leaves(params) if x.ndim >= 2]
  if not weights:
    return jnp.zeros(())
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in weights) / sum(x.size for x in weights))


def relative_factor(params, reference) -> jax.Array:
  """() the experimental step factor clip(RMS0 / reference, 1e-2, 1e2), RMS0 = ``weight_rms(params)``; 1 where the
  weights are all zero, or with ``reference`` <= 0 (the variant off)."""
  rms = weight_rms(params)
  on = (reference > 0) & (rms > 0)
  return jnp.where(on, jnp.clip(rms / jnp.where(on, reference, 1.0), 1e-2, 1e2), 1.0)


def fed_valid_loss(task, params, key, t, dtype) -> jax.Array:
  """The validation loss a practitioner feeds at step t: the task's every VALID_EVERY steps, NaN ("none") between
  and for tasks without one; () in ``dtype``. A real branch, so the other steps do not compute it."""
  none = jnp.full((), jnp.nan, dtype)
  if task.valid_loss is None:
    return none
  return jax.lax.cond(t % VALID_EVERY == 0, lambda: task.valid_loss(params, key, t).astype(dtype), lambda: none)


def family_problem(seed: int, max_horizon: int, keys: list, family: str | None = None) -> tuple:
  """A fresh family problem (of the mix, or of ``family``) and tuned Adam on it: (config, task, horizon, {learning
  rate: mean training loss over ``keys``}, the best learning rate)."""
  config = families.sample(seed, family, max_step_flops=1e6)
  task = families.task(config)
  horizon = min(int(config["horizon"]), max_horizon)
  adam = adam_runner(task, horizon)
  adam_losses = {lr: np.mean([mean_loss(adam(jnp.float32(lr), k)) for k in keys]) for lr in LEARNING_RATES}
  return config, task, horizon, adam_losses, min(adam_losses, key=adam_losses.get)


def general_runner(task, horizon: int, optimizer):
  """jitted (theta, key, reference, cap) -> training losses (horizon,); reference 0 and cap 0: the plain update."""
  @jax.jit
  def run(theta, key, reference, cap):
    params = task.init(key)
    factor = relative_factor(params, reference)

    def step(carry, t):
      params, state = carry
      loss, grads = jax.value_and_grad(task.loss)(params, key, t)
      valid = fed_valid_loss(task, params, key, t, loss.dtype)
      updates, state = optimizer.update(theta, state, grads, params, loss=loss, valid_loss=valid, num_steps=horizon)
      updates = jax.tree.map(lambda u: u * factor.astype(u.dtype), updates)
      updates = jax.tree.map(lambda u, p: capped(u, p, cap), updates, params)
      return (optax.apply_updates(params, updates), state), loss
    return jax.lax.scan(step, (params, optimizer.init_state(theta, params)), jnp.arange(horizon))[1]
  return run


def capped(update, param, cap):
  """``update`` scaled down to RMS(update) <= cap * RMS(param) where the parameter is not all zero (cap 0: off)."""
  rms = lambda x: jnp.sqrt(jnp.mean(jnp.square(x.astype(jnp.float32))))  # noqa: E731
  limit = cap * rms(param)
  scale = jnp.where((cap > 0) & (limit > 0), jnp.minimum(1.0, limit / jnp.maximum(rms(update), 1e-30)), 1.0)
  return update * scale.astype(update.dtype)


def adam_runner(task, horizon: int):
  """jitted (learning rate, key) -> training losses (horizon,)."""
  @jax.jit
  def run(learning_rate, key):
    params = task.init(key)
    adam = optax.adam(1.0)  # Adam's update is linear in its learning rate: one compile for every rate

    def step(carry, t):
      params, state = carry
      loss, grads = jax.value_and_grad(task.loss)(params, key, t)
      updates, state = adam.update(grads, state, params)
      return (optax.apply_updates(params, jax.tree.map(lambda u: learning_rate * u, updates)), state), loss
    return jax.lax.scan(step, (params, adam.init(params)), jnp.arange(horizon))[1]
  return run


def mean_loss(losses) -> float:
  """The mean training loss over the run; inf when any is not finite (a divergence)."""
  losses = np.asarray(losses, np.float64)
  return float(np.mean(losses)) if np.all(np.isfinite(losses)) else float("inf")


def report(rows: list, names: list, out: str | None, command: str, seconds: float) -> dict:
  """Prints and returns each variant's win rate against tuned Adam and its geometric mean, median and worst ratio
  over ``rows`` (each with ``ratios`` by name); with ``out``, writes them with the rows, the machine and
  ``command`` as JSON."""
  summary = {}
  for name in names:
    r = np.array([row["ratios"][name] for row in rows])
    summary[name] = {"win_rate": float(np.mean(r < 1)), "geometric_mean_ratio": float(np.exp(np.mean(np.log(r)))),
                     "median_ratio": float(np.median(r)), "worst_ratio": float(np.max(r))}
    print(f"{name}: wins {summary[name]['win_rate']:.0%} against tuned Adam (mean loss over the run), geometric "
          f"mean ratio {summary[name]['geometric_mean_ratio']:.3f}, median {summary[name]['median_ratio']:.3f}, "
          f"worst {summary[name]['worst_ratio']:.3g}")
  if out:
    result = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "machine": {"platform": platform.platform(), "python": platform.python_version(), "jax": jax.__version__,
                          "backend": jax.default_backend(), "cpu_count": os.cpu_count()},
              "command": command, "seconds": round(seconds, 1), "problems": rows, "summary": summary}
    with open(out, "w") as f:
      json.dump(result, f, indent=1)
  return summary


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--count", type=int, default=24)
  parser.add_argument("--seed", type=int, default=880000)
  parser.add_argument("--max-horizon", type=int, default=600)
  parser.add_argument("--family", help="draw the problems from this family only (default: the mix)")
  parser.add_argument("--relative-reference", type=float, default=0.0)
  parser.add_argument("--update-cap", type=float, default=0.0)
  parser.add_argument("--candidate", action="append", default=[], metavar="NAME|PATH")
  parser.add_argument("--out")
  args = parser.parse_args(argv)
  shipped = lopt.load("general")
  theta = jax.tree.map(jnp.asarray, shipped.theta)
  # name -> (optimizer, meta-parameters, relative reference, update cap)
  variants = {"general": (shipped.optimizer, theta, 0.0, 0.0)}
  if args.relative_reference > 0:
    variants[f"general_relative_{args.relative_reference:g}"] = (shipped.optimizer, theta, args.relative_reference,
                                                                 0.0)
  if args.update_cap > 0:
    variants[f"general_cap_{args.update_cap:g}"] = (shipped.optimizer, theta, 0.0, args.update_cap)
  for name in args.candidate:
    candidate = lopt.load(name)
    path = os.path.normpath(name)  # a run's exported optimizer is named after its run
    label = os.path.basename(os.path.dirname(path) if os.path.basename(path) == "optimizer" else path)
    variants[label] = (candidate.optimizer, jax.tree.map(jnp.asarray, candidate.theta), 0.0, 0.0)
  keys = [jax.random.key(1000 + k) for k in range(KEYS)]
  rows, start = [], time.time()
  for i in range(args.count):
    config, task, horizon, adam_losses, best = family_problem(args.seed + i, args.max_horizon, keys, args.family)
    runners = {}  # one compilation per distinct optimizer configuration
    for optimizer, *_ in variants.values():
      runners.setdefault(optimizer, general_runner(task, horizon, optimizer))
    ratios = {name: np.mean([mean_loss(runners[opt](weights, k, jnp.float32(ref), jnp.float32(cap))) for k in keys])
              / adam_losses[best] for name, (opt, weights, ref, cap) in variants.items()}
    rows.append({"seed": args.seed + i, "family": config["family"], "horizon": horizon,
                 "param_scale": config["param_scale"], "adam_learning_rate": best, "ratios": ratios})
    print(f"{config['family']:20s} T={horizon:4d} scale={config['param_scale']:.3g} adam lr={best:.2g}  "
          + "  ".join(f"{name} {r:.3g}" for name, r in ratios.items()) + f"  ({time.time() - start:.0f} s)",
          flush=True)
  command = " ".join(["python benchmarks/general_family_problems.py", *(sys.argv[1:] if argv is None else argv)])
  report(rows, list(variants), args.out, command, time.time() - start)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
