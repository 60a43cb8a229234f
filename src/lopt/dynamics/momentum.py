"""Each eigenmode of the linearized optimizer is a momentum term (SPEC §5.6).

Around a fixed point (h*, g*) with J_rec = R diag(lambda) L^T, write v_i = l_i^T (h - h*). Then
v_i <- lambda_i v_i + (l_i^T J_in) g and the update is dx = U(h*) + sum_i (w^T r_i) v_i with w = dR/dh at h*.
Heavy ball (v <- beta v + g, dx = -alpha v) term by term: beta_i = lambda_i, alpha_i = -(w^T r_i)(l_i^T J_in).
Input and output scales are inside F and R, so alpha_i is already in parameter units per gradient unit.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import numpy as np

from lopt.dynamics._precision import as_input, as_state, bind
from lopt.dynamics.linearize import _linearize, eig_sorted, time_constants

HORIZON = 200  # steps over which a mode's contribution is weighed (ours: the default task horizon)


class MomentumModes(NamedTuple):
  """Modes sorted by |beta|, largest first; all (H,).

  betas: complex, beta_i = lambda_i.
  alphas: complex (conjugate pairs give conjugate alphas), the mode's learning rate.
  time_constants: -1/ln|beta_i| in steps.
  weights: |alpha_i| * sum_{t < HORIZON} |beta_i|^t, the mode's share of the impulse response: how much of the
    update it carries. The dominant mode has the largest weight.
  """
  betas: np.ndarray
  alphas: np.ndarray
  time_constants: np.ndarray
  weights: np.ndarray

  @property
  def dominant(self) -> int:
    return int(np.argmax(self.weights))


def momentum_modes(j_rec, j_in, readout_weights, scale: float = 1.0, horizon: int = HORIZON) -> MomentumModes:
  """Momentum terms of a linear(ized) recurrent optimizer.

  Args:
    j_rec: (H, H) recurrent Jacobian.
    j_in: (H,) input Jacobian (scalar input).
    readout_weights: (H,) w, the gradient of the readout at the state.
    scale: extra factor on alpha (e.g. output_scale * input_scale when F and R do not include them).
    horizon: steps over which mode weights are measured.
  """
  eigen = eig_sorted(j_rec)
  j_in = np.asarray(j_in, np.float64).reshape(-1)
  w = np.asarray(readout_weights, np.float64).reshape(-1)
  alphas = -(w @ eigen.right) * (eigen.left.T @ j_in) * scale
  modulus = np.abs(eigen.eigenvalues)
  # Sum of |beta|^t over the horizon; |beta| >= 1 counts every step.
  persistence = np.where(modulus < 1, (1 - modulus**horizon) / np.where(modulus < 1, 1 - modulus, 1), horizon)
  return MomentumModes(eigen.eigenvalues, alphas, time_constants(eigen.eigenvalues), np.abs(alphas) * persistence)


def momentum_modes_at(step, readout, h_star, x_star=0.0, horizon: int = HORIZON) -> MomentumModes:
  """Linearizes ``step`` at (h*, x*), takes w = dR/dh at F(h*, x*), and returns the momentum modes (h*'s dtype)."""
  h_star = as_state(h_star)
  step, readout = bind(step, h_star.dtype), bind(readout, h_star.dtype)
  x_star = as_input(x_star, h_star.dtype)
  j_rec, j_in = _linearize(step, h_star, x_star)
  return momentum_modes(j_rec, j_in, _readout_gradient(step, readout, h_star, x_star), horizon=horizon)


@functools.partial(jax.jit, static_argnames=("step", "readout"))
def _readout_gradient(step, readout, h_star, x_star):
  return jax.grad(readout)(step(h_star, x_star))


def impulse_response(modes: MomentumModes, num_steps: int) -> np.ndarray:
  """(num_steps,) update at step t after a unit gradient at step 0, from the modes: -sum_i alpha_i beta_i^t.

  For heavy ball this is -alpha beta^t; comparing it with the optimizer's actual response checks the linearization.
  """
  t = np.arange(num_steps)[:, None]
  return np.real(-(modes.alphas[None, :] * modes.betas[None, :]**t).sum(axis=1))


def dominant_mode(modes: MomentumModes) -> dict:
  """The mode carrying most of the update, as JSON-ready numbers (beta real part, |beta|, angle, alpha, tau)."""
  i = modes.dominant
  beta, alpha = complex(modes.betas[i]), complex(modes.alphas[i])
  return {"beta": beta.real, "beta_abs": abs(beta), "beta_angle": float(np.angle(beta)), "alpha": alpha.real,
          "alpha_abs": abs(alpha), "time_constant": float(modes.time_constants[i]), "index": i,
          "weight_fraction": float(modes.weights[i] / max(np.sum(modes.weights), 1e-300))}


def compare_with_heavy_ball(modes: MomentumModes, optimum: dict) -> dict:
  """The dominant mode against the optimal heavy ball of a task (``lopt.tasks.heavy_ball_optimum(...)``)."""
  mode = dominant_mode(modes)
  return {"beta": mode["beta"], "alpha": mode["alpha"], "optimal_beta": optimum["momentum_beta"],
          "optimal_alpha": optimum["momentum_learning_rate"],
          "beta_difference": mode["beta"] - optimum["momentum_beta"],
          "alpha_ratio": mode["alpha"] / optimum["momentum_learning_rate"]}
