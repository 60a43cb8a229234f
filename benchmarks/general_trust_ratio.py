"""An experimental step-size controller on top of `general`: the trust-region ratio of the training loss.

After each step, the loss's actual change L(t+1) - L(t) is compared with the change the update predicted to first
order, g(t) . u(t) (summed over every tensor). For a quadratic along u the ratio rho = actual / predicted is 1 for a
tiny step, 1/2 at the best step and 0 at twice it, so a global log-multiplier of every update follows

    s <- clip(s + eta clip(rho - target, -1, 1), -4.6, 4.6),   rho = EMA(actual) / EMA(predicted)  (EMAs: decay 0.9)

starting at 0 (the plain `general`). Minibatch noise makes the predicted change too optimistic (u is built from the
same batch's g), so rho falls and the step shrinks where gradients are noisy. The controller is not meta-trained.

  python benchmarks/general_trust_ratio.py family [--count 24] [--seed 880000] [--max-horizon 600] [--out F]
  python benchmarks/general_trust_ratio.py [--eta 0.05] [--target 0.25] benchmark general --quick --out DIR

``family``: the fresh problems of the training families of ``general_family_problems.py`` (a development set: it
leaves the benchmark untouched), `general` and three settings of (eta, target) side by side against tuned Adam;
prints each one's ratio of mean training loss over the run and its final multiplier exp(s). The second form runs
``lopt benchmark`` with `general` wrapped by the controller (one setting); the baselines are unchanged, so give it an
``--out`` directory of its own (or delete ``cache/*general*``).
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import lopt
from general_family_problems import family_problem, fed_valid_loss, mean_loss, report  # this folder
from wrapped_benchmark import benchmark_wrapped  # this folder

SETTINGS = ((0.0, 0.5), (0.05, 0.5), (0.05, 0.25), (0.1, 0.5))  # (eta, target); eta 0 is the plain `general`
LOG_LIMIT = 4.6  # the multiplier stays within [1/100, 100]


class TrustState(NamedTuple):
  inner: Any
  log_scale: jax.Array   # () s
  last_loss: jax.Array   # () L(t), NaN before the first finite loss
  predicted: jax.Array   # () g(t) . u(t) of the last update
  ema_actual: jax.Array  # ()
  ema_predicted: jax.Array  # ()


def predicted_change(grads, updates) -> jax.Array:
  """() the loss's change that ``updates`` predict to first order, g . u summed over every tensor (float32)."""
  return sum(jnp.vdot(g.astype(jnp.float32), u.astype(jnp.float32))
             for g, u in zip(jax.tree.leaves(grads), jax.tree.leaves(updates)))


def controlled(inner: optax.GradientTransformationExtraArgs, eta=0.05, target=0.25,
               decay: float = 0.9) -> optax.GradientTransformationExtraArgs:
  """``inner`` (called with ``value=`` the training loss) with every update scaled by exp(s), s the controller's
  state; eta and target may be traced arrays (one compilation for every setting)."""
  def init(params):
    zero = jnp.zeros((), jnp.float32)
    return TrustState(inner.init(params), zero, jnp.full((), jnp.nan, jnp.float32), zero, zero, zero)

  def update(grads, state, params=None, value=None, **extra):
    loss = jnp.asarray(value, jnp.float32)
    known = jnp.isfinite(loss) & jnp.isfinite(state.last_loss)
    ema_actual = jnp.where(known, decay * state.ema_actual + (1 - decay) * (loss - state.last_loss),
                           state.ema_actual)
    ema_predicted = jnp.where(known, decay * state.ema_predicted + (1 - decay) * state.predicted,
                              state.ema_predicted)
    descent = ema_predicted < 0
    rho = ema_actual / jnp.where(descent, ema_predicted, -1.0)
    change = jnp.where(known & descent, eta * jnp.clip(rho - target, -1.0, 1.0), 0.0)
    log_scale = jnp.clip(state.log_scale + change, -LOG_LIMIT, LOG_LIMIT)
    updates, inner_state = inner.update(grads, state.inner, params, value=value, **extra)
    factor = jnp.exp(log_scale)
    updates = jax.tree.map(lambda u: u * factor.astype(u.dtype), updates)
    predicted = predicted_change(grads, updates)
    return updates, TrustState(inner_state, log_scale, jnp.where(jnp.isfinite(loss), loss, state.last_loss),
                               jnp.where(jnp.isfinite(predicted), predicted, 0.0), ema_actual, ema_predicted)
  return optax.GradientTransformationExtraArgs(init, update)


def controlled_runner(task, horizon: int, inner, wrap=None):
  """jitted (key, *settings) -> (training losses (horizon,), log multipliers (horizon,)); ``wrap(inner, *settings)``
  builds the controlled optimizer (default ``controlled``: settings eta, target), whose state has ``log_scale``."""
  wrap = controlled if wrap is None else wrap

  @jax.jit
  def run(key, *settings):
    optimizer = wrap(inner, *settings)
    params = task.init(key)

    def step(carry, t):
      params, state = carry
      loss, grads = jax.value_and_grad(task.loss)(params, key, t)
      valid = fed_valid_loss(task, params, key, t, loss.dtype)
      updates, state = optimizer.update(grads, state, params, value=loss, valid_loss=valid, num_steps=horizon)
      return (optax.apply_updates(params, updates), state), (loss, state.log_scale)
    return jax.lax.scan(step, (params, optimizer.init(params)), jnp.arange(horizon))[1]
  return run


def family_comparison(argv, wrap, settings, names, prog: str) -> int:
  """The ``family`` command: `general` wrapped by ``wrap(inner, *setting)`` for each of ``settings`` (labelled
  ``names``) on fresh family problems, against tuned Adam; the wrapper's state must have ``log_scale``."""
  parser = argparse.ArgumentParser(prog=prog)
  parser.add_argument("--count", type=int, default=24)
  parser.add_argument("--seed", type=int, default=880000)
  parser.add_argument("--max-horizon", type=int, default=600)
  parser.add_argument("--out")
  args = parser.parse_args(argv)
  inner = lopt.load("general").as_optax()
  keys = [jax.random.key(1000 + k) for k in range(2)]
  rows, start = [], time.time()
  for i in range(args.count):
    config, task, horizon, adam_losses, best = family_problem(args.seed + i, args.max_horizon, keys)
    run = controlled_runner(task, horizon, inner, wrap)
    ratios, multipliers = {}, {}
    for name, setting in zip(names, settings):
      outputs = [run(k, *map(jnp.float32, setting)) for k in keys]
      ratios[name] = float(np.mean([mean_loss(losses) for losses, _ in outputs]) / adam_losses[best])
      multipliers[name] = float(np.mean([np.exp(float(scales[-1])) for _, scales in outputs]))
    rows.append({"seed": args.seed + i, "family": config["family"], "horizon": horizon, "adam_learning_rate": best,
                 "ratios": ratios, "final_multipliers": multipliers})
    print(f"{config['family']:20s} T={horizon:4d} adam lr={best:.2g}  "
          + "  ".join(f"{ratios[n]:.3g} (x{multipliers[n]:.2g})" for n in names) + f"  ({time.time() - start:.0f} s)",
          flush=True)
  report(rows, names, args.out, " ".join([f"python benchmarks/{prog}", *argv]), time.time() - start)
  return 0


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  if argv[:1] == ["family"]:
    names = [f"eta={eta:g},target={target:g}" for eta, target in SETTINGS]
    return family_comparison(argv[1:], controlled, SETTINGS, names, "general_trust_ratio.py family")
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--eta", type=float, default=0.05)
  parser.add_argument("--target", type=float, default=0.25)
  args, rest = parser.parse_known_args(argv)
  return benchmark_wrapped(lambda trained, transformation: controlled(transformation, args.eta, args.target),
                           f"trust-region ratio, eta {args.eta:g}, target {args.target:g}", rest)


if __name__ == "__main__":
  sys.exit(main())
