"""Random linear regression: a quadratic with log-uniform Hessian spectrum (the paper's "Quadratic" task)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lopt.tasks.base import Task


def sample_quadratic(key, dim: int, log10_min_eig: float, log10_max_eig: float):
  """Samples one problem: ``(hessian (dim, dim), linear (dim,), offset ())`` with a minimum loss of exactly 0.

  The eigenvalues are 10**u with u ~ Uniform[log10_min_eig, log10_max_eig] i.i.d. (not a grid), rotated by a random
  orthogonal matrix, as in the paper's task.
  """
  eig_key, rot_key, lin_key = jax.random.split(jax.random.fold_in(key, 1), 3)
  eigenvalues = 10.0**jax.random.uniform(eig_key, (dim,), minval=log10_min_eig, maxval=log10_max_eig)
  rotation = jax.nn.initializers.orthogonal()(rot_key, (dim, dim))
  hessian = (rotation * eigenvalues) @ rotation.T
  linear = jax.random.normal(lin_key, (dim,))
  # Offset so that min_x loss(x) = 0: x* = -H^{-1} v, loss(x*) = -1/2 v^T H^{-1} v.
  minimizer = -(rotation @ ((rotation.T @ linear) / eigenvalues))
  offset = -0.5 * minimizer @ hessian @ minimizer - linear @ minimizer
  return hessian, linear, offset


def linear_regression(dim: int = 5, log10_min_eig: float = -3.0, log10_max_eig: float = 0.0,
                      horizon: int = 200) -> Task:
  """Random linear regression ``1/2 x^T H x + v^T x + c`` (paper: dim 5, eigenvalues in [1e-3, 1]).

  The default horizon of 200 steps is ours; the paper unrolls 201 steps (200 updates).
  """
  if dim < 1:
    raise ValueError(f"linear_regression: dim must be >= 1, got {dim}")
  if not log10_min_eig <= log10_max_eig:
    raise ValueError(f"linear_regression: log10_min_eig ({log10_min_eig}) must be <= log10_max_eig ({log10_max_eig})")

  def init(key):
    return jax.random.normal(jax.random.fold_in(key, 0), (dim,))

  def sample(key):
    return sample_quadratic(key, dim, log10_min_eig, log10_max_eig)

  def loss_from_sample(x, problem, step=0):
    del step  # deterministic: the whole problem is the quadratic
    hessian, linear, offset = problem
    hx = jnp.matmul(hessian, x, precision=jax.lax.Precision.HIGHEST)
    return 0.5 * x @ hx + linear @ x + offset

  def loss(x, key, step=0):
    return loss_from_sample(x, sample(key), step)

  options = dict(dim=dim, log10_min_eig=log10_min_eig, log10_max_eig=log10_max_eig, horizon=horizon)
  traits = {"heavy_ball": heavy_ball_optimum(10.0**log10_min_eig, 10.0**log10_max_eig)}
  return Task("linear_regression", init, loss, horizon, options=options, sample=sample,
              loss_from_sample=loss_from_sample, traits=traits)


def heavy_ball_optimum(min_eig: float = 1e-3, max_eig: float = 1.0) -> dict:
  """Optimal constant heavy-ball and gradient-descent settings for a quadratic with spectrum in [min_eig, max_eig]."""
  sqrt_min, sqrt_max = min_eig**0.5, max_eig**0.5
  return {
      "gd_learning_rate": 2.0 / (min_eig + max_eig),
      "momentum_learning_rate": 4.0 / (sqrt_min + sqrt_max)**2,
      "momentum_beta": ((sqrt_max - sqrt_min) / (sqrt_max + sqrt_min))**2,
  }
