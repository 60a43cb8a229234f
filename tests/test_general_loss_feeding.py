"""benchmarks/general_loss_feeding.py: the loss features' rows it blinds are the ones the losses reach, and the
benchmark wrapper gives `general` only the losses named."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lopt
from conftest import load_script


@pytest.fixture(scope="module")
def feeding():
  return load_script("benchmarks/general_loss_feeding.py")


def _updates(optimizer, losses, valid_losses=None):
  """The updates of three steps on a small tree, the training losses ``losses`` (and validation ones) fed."""
  params = {"w": jnp.linspace(-1.0, 1.0, 12).reshape(3, 4), "b": jnp.zeros(4)}
  grads = jax.tree.map(lambda p: 0.1 * jnp.cos(3 * p) + 0.01, params)
  state, out = optimizer.init(params), []
  for t, loss in enumerate(losses):
    valid = None if valid_losses is None else jnp.float32(valid_losses[t])
    updates, state = optimizer.update(grads, state, params, value=jnp.float32(loss), valid_loss=valid)
    out.append(updates)
  return out


def _same(a, b):
  return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_blinding_the_training_loss_rows_makes_general_ignore_its_values(feeding):
  rows = feeding.loss_feature_rows()
  blind = feeding.ablated(rows["training loss: drop"] + rows["training loss: EMA deviations"])
  plain = lopt.load("general").as_optax()
  falling, rising = [2.0, 1.0, 0.5], [2.0, 3.0, 5.0]
  assert not _same(_updates(plain, falling), _updates(plain, rising))  # the values matter to general...
  assert _same(_updates(blind, falling), _updates(blind, rising))  # ...and only through those rows
  # Blinding the validation loss's rows instead leaves the training loss's values in play.
  other = feeding.ablated(rows["validation loss: drop"] + rows["validation loss: EMA deviations"])
  assert not _same(_updates(other, falling), _updates(other, rising))


def test_the_benchmark_wrapper_drops_the_losses_not_named(feeding):
  seen = []

  def update(updates, state, params=None, **extra):
    seen.append(sorted(extra))
    return updates, state
  inner = optax.GradientTransformationExtraArgs(lambda params: (), update)
  for feed in ("both (as the benchmark runs it)", "validation loss only", "training loss only", "neither"):
    feeding.fed_only(inner, feed).update({}, (), None, value=1.0, valid_loss=2.0, num_steps=10)
  assert seen == [["num_steps", "valid_loss", "value"], ["num_steps", "valid_loss"], ["num_steps", "value"],
                  ["num_steps"]]
