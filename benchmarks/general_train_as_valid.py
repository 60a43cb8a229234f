"""`lopt benchmark --no-valid-loss` with the training loss fed in place of the validation loss every 10 steps.

`general` was meta-trained with a validation loss every 10 inner steps and steps about 6x smaller without one. This
asks whether the minibatch training loss can stand in for it (Metz et al. 2020 trained their optimizer with itself
that way): every VALID_EVERY-th step the learned optimizers get ``valid_loss=`` that step's training loss, NaN
(none) on the others. The rest is ``lopt benchmark``'s command line, run in this process; give it an ``--out``
directory of its own, or one whose cache holds only the baselines (they never read a validation loss).

  python benchmarks/general_train_as_valid.py benchmark general --quick --no-valid-loss --out DIR
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import optax

from lopt.cli import main as lopt_main
from lopt.evaluation import benchmark


def training_scan(task, optimizer, key, horizon: int, feed_valid: bool = True, measure=None):
  """``benchmark.training_scan`` with, when ``feed_valid`` is off, the training loss as the validation loss every
  VALID_EVERY steps (the recorded validation losses are still the task's)."""
  if feed_valid:
    return original(task, optimizer, key, horizon, feed_valid, measure)
  params = task.init(key)

  def step(carry, t):
    params, state = carry
    loss, grads = jax.value_and_grad(task.loss)(params, key, t)
    nan = jnp.full((), jnp.nan, loss.dtype)
    valid = nan if task.valid_loss is None else jax.lax.cond(
        t % benchmark.VALID_EVERY == 0, lambda: task.valid_loss(params, key, t).astype(loss.dtype), lambda: nan)
    stand_in = jnp.where(t % benchmark.VALID_EVERY == 0, loss, nan)
    updates, state = optimizer.update(grads, state, params, value=loss, valid_loss=stand_in, num_steps=horizon)
    measured = () if measure is None else (measure(updates),)
    return (optax.apply_updates(params, updates), state), (loss, valid, *measured)

  (params, _), outputs = jax.lax.scan(step, (params, optimizer.init(params)), jnp.arange(horizon))
  return (params, *outputs)


original = benchmark.training_scan

if __name__ == "__main__":
  benchmark.training_scan = training_scan
  sys.exit(lopt_main(sys.argv[1:]))
