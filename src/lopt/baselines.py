"""Hand-designed baselines (via optax) and the grids they are tuned over (SPEC §4)."""

from __future__ import annotations

import itertools

import numpy as np
import optax

# Learning rates: 4 points per decade over 6 decades, 1e-4 .. 1e2 (25 values). The upper end matters: on the
# quadratic task the optimal heavy-ball learning rate is ~3.8.
LEARNING_RATES = tuple(float(x) for x in 10.0**np.arange(-4.0, 2.0 + 1e-9, 0.25))


def sgd(learning_rate):
  return optax.sgd(learning_rate)


def momentum(learning_rate, beta):
  """Heavy ball: v <- beta v + g; x <- x - lr v."""
  return optax.sgd(learning_rate, momentum=beta)


def rmsprop(learning_rate, decay):
  return optax.rmsprop(learning_rate, decay=decay, eps=1e-8)


def adam(learning_rate, b1, b2):
  return optax.adam(learning_rate, b1=b1, b2=b2, eps=1e-8)


BASELINES = {"sgd": sgd, "momentum": momentum, "rmsprop": rmsprop, "adam": adam}

# The non-learning-rate hyperparameters searched for each baseline (SPEC §4).
GRIDS = {
    "sgd": {},
    "momentum": {"beta": (0.5, 0.8, 0.9, 0.95, 0.99)},
    "rmsprop": {"decay": (0.9, 0.99, 0.999)},
    "adam": {"b1": (0.8, 0.9, 0.95), "b2": (0.99, 0.999)},
}


def grid(name: str, learning_rates=LEARNING_RATES) -> dict[str, np.ndarray]:
  """All candidates of baseline ``name`` as {hyperparameter: (num_candidates,) array}, learning rate included."""
  axes = {"learning_rate": tuple(learning_rates), **GRIDS[name]}
  combos = list(itertools.product(*axes.values()))
  return {k: np.array([c[i] for c in combos], np.float32) for i, k in enumerate(axes)}


def build(name: str, **hyperparameters) -> optax.GradientTransformation:
  """``build("momentum", learning_rate=3.2, beta=0.9)``; values may be traced JAX scalars (for vmapped tuning)."""
  return BASELINES[name](**hyperparameters)
