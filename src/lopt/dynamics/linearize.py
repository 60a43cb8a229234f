"""Linearization of a recurrent map around a point, eigendecomposition and time constants (SPEC §5.5).

Near (h*, x*): h_{t+1} ~ h* + J_rec (h_t - h*) + J_in (x_t - x*), with J_rec = dF/dh and J_in = dF/dx.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import numpy as np

from lopt.dynamics._precision import as_input, as_state, bind


def linearize(step, h_star, x_star=0.0):
  """Jacobians of ``step`` at (h*, x*), in the dtype of h* (as the current 64-bit mode has it).

  Args:
    step: ``F(h, x)``, (H,), x -> (H,).
    h_star: (H,) the expansion point (usually a fixed point).
    x_star: the input there (a scalar for the optimizers; any shape works).

  Returns:
    (J_rec (H, H), J_in (H,) + x.shape) as JAX arrays. Jitted with ``step`` static (one compilation per callable
    and dtype).
  """
  h_star = as_state(h_star)
  return _linearize(bind(step, h_star.dtype), h_star, as_input(x_star, h_star.dtype))


@functools.partial(jax.jit, static_argnames=("step",))
def _linearize(step, h_star, x_star):
  """``linearize`` for a ``step`` already bound to the dtype of ``h_star``."""
  j_rec = jax.jacfwd(step, argnums=0)(h_star, x_star)
  j_in = jax.jacfwd(step, argnums=1)(h_star, x_star)
  return j_rec, j_in


class Eigen(NamedTuple):
  """Eigendecomposition J = R diag(eigenvalues) L^T, sorted by |eigenvalue|, largest first.

  eigenvalues: (H,) complex.
  right: (H, H) complex, column i is the right eigenvector r_i (J r_i = lambda_i r_i), unit norm.
  left: (H, H) complex, column i is the left eigenvector l_i (l_i^T J = lambda_i l_i^T), with L^T R = I.
  """
  eigenvalues: np.ndarray
  right: np.ndarray
  left: np.ndarray


def eig_sorted(matrix) -> Eigen:
  """Eigenvalues by decreasing modulus with right and left eigenvectors; ``L = inv(R)^T`` so ``J = R diag(l) L^T``.

  Computed in float64 with numpy whatever the input dtype: the eigenvalues near the unit circle are the ones the
  analysis reads time constants from, and float32 rounding shifts them visibly.
  """
  matrix = np.asarray(matrix, dtype=np.float64)
  eigenvalues, right = np.linalg.eig(matrix)
  # Sort by modulus; ties (complex pairs) keep the positive imaginary part first so the order is deterministic.
  order = np.lexsort((-eigenvalues.imag, -np.abs(eigenvalues)))
  eigenvalues, right = eigenvalues[order], right[:, order]
  left = np.linalg.inv(right).T
  return Eigen(eigenvalues, right, left)


def time_constants(eigenvalues) -> np.ndarray:
  """tau_i = -1 / ln|lambda_i| in steps: a mode decays by e every tau steps (|lambda| = 0.9 -> 9.5 steps).

  |lambda| >= 1 (marginal or unstable) gives inf; lambda = 0 gives 0.
  """
  modulus = np.abs(np.asarray(eigenvalues))
  with np.errstate(divide="ignore"):
    tau = -1.0 / np.log(np.where(modulus > 0, modulus, 1.0))
  tau = np.where(modulus >= 1.0, np.inf, tau)
  return np.where(modulus == 0, 0.0, tau)
