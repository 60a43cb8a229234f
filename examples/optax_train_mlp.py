"""Train a small MLP on scikit-learn's 8x8 digits with a learned optimizer as an optax transformation (offline, ~10 s).

  python examples/optax_train_mlp.py                        # a hand-set GRU optimizer (see below)
  python examples/optax_train_mlp.py --optimizer runs/lr    # a trained one: a run or optimizer directory, or a name

Without --optimizer the script writes a one-unit GRU whose weights are set by hand to what the paper found trained
optimizers learn -- momentum on a clipped gradient:  h' = beta*h + (1-beta)*tanh(s*g),  dx = -alpha*h  -- saves it
like a trained one, and loads it back with ``lopt.load``: the same path a real checkpoint takes.
"""

import argparse
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_digits

import lopt
from lopt.checkpoint import save_optimizer


def hand_set_optimizer(directory: str, beta: float = 0.9, input_scale: float = 20.0, alpha: float = 0.02) -> str:
  """Writes a one-unit GRU optimizer: update gate fixed at beta (bias logit(beta)), candidate tanh(input_scale*g),
  no recurrent weights, readout -alpha."""
  optimizer = lopt.GRUOptimizer(hidden_size=1, input_scale=input_scale)
  theta = {
      "input_weights": np.array([[0.0, 0.0, 1.0]], np.float32),     # [update | reset | candidate]
      "recurrent_weights": np.zeros((1, 3), np.float32),
      "bias": np.array([np.log(beta / (1 - beta)), 0.0, 0.0], np.float32),
      "initial_state": np.zeros(1, np.float32),
      "readout_weights": np.array([[-alpha]], np.float32),
      "readout_bias": np.zeros(1, np.float32),
  }
  return str(save_optimizer(directory, optimizer, theta, info={"note": "hand-set momentum with tanh clipping"}))


def init_mlp(key, sizes=(64, 128, 10)):
  keys = jax.random.split(key, len(sizes) - 1)
  return [{"w": jax.random.normal(k, (m, n)) / jnp.sqrt(m), "b": jnp.zeros(n)}
          for k, m, n in zip(keys, sizes[:-1], sizes[1:])]


def logits_of(params, x):
  for layer in params[:-1]:
    x = jnp.tanh(x @ layer["w"] + layer["b"])
  return x @ params[-1]["w"] + params[-1]["b"]


def loss_fn(params, x, y):
  return optax.softmax_cross_entropy_with_integer_labels(logits_of(params, x), y).mean()


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--optimizer", help="trained optimizer: path or name (default: the hand-set one)")
  parser.add_argument("--steps", type=int, default=500)
  parser.add_argument("--batch-size", type=int, default=128)
  args = parser.parse_args()

  digits = load_digits()
  x, y = (digits.data / 16.0).astype(np.float32), digits.target
  order = np.random.default_rng(0).permutation(len(x))
  train, test = order[:1400], order[1400:]

  with tempfile.TemporaryDirectory() as directory:
    trained = lopt.load(args.optimizer or hand_set_optimizer(directory))
  print(f"optimizer: {trained.optimizer} from {trained.path}")

  # The learned transformation composes like any optax one: weight decay before it, a schedule after it.
  schedule = optax.cosine_decay_schedule(1.0, args.steps, alpha=0.1)
  transformation = optax.chain(optax.add_decayed_weights(1e-4), trained.as_optax(), optax.scale_by_schedule(schedule))

  @jax.jit
  def step(params, state, xb, yb):
    loss, grads = jax.value_and_grad(loss_fn)(params, xb, yb)
    updates, state = transformation.update(grads, state, params, value=loss)  # the loss, for optimizers that use it
    return optax.apply_updates(params, updates), state, loss

  params = init_mlp(jax.random.key(0))
  state = transformation.init(params)
  rng = np.random.default_rng(1)
  started = time.perf_counter()
  for t in range(args.steps + 1):
    batch = rng.choice(train, args.batch_size, replace=False)
    params, state, loss = step(params, state, x[batch], y[batch])
    if t % 100 == 0:
      accuracy = float(jnp.mean(jnp.argmax(logits_of(params, x[test]), -1) == y[test]))
      print(f"step {t:4d}  train loss {float(loss):.4f}  test accuracy {accuracy:.3f}")
  print(f"{args.steps} steps in {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
  main()
