"""Reverse engineering of the hierarchical optimizer's per-tensor LSTM: the learned step-size controller.

Per tensor, the hierarchical optimizer (``lopt.architectures.hierarchical``, module docstring) runs an LSTM over an
input vector x (the tensor's statistics, then the global loss and time features) and integrates its readout into
the tensor's log step:

  s = [h, c]   <- F(s, x) = lstm_cell(h, c, x)                                     (2 lstm_size,)
  log_step     <- clip(log_step + D(s, x), +-limit),  D(s, x) = w_s . h + b_s + a . x[alignment]
  step size     = step_scale * exp(log_step + schedule . x[time])

x itself carries log_step / limit (the controller sees its own output). This module works on that map as plain
arrays (a ``Controller``) and on the records of real runs (numpy), with the model-agnostic toolkit for the fixed
points (``find_fixed_points``) and linearization:

- ``typical_inputs``: the median input over tensors and steps, its quartiles, and per phase of training;
- ``fixed_point_analysis``: fixed points of s -> F(s, x*) at a typical input, each with the log step's drift
  D(s*, x*) there; at the main one, eigenvalues of dF/ds and time constants, and how each input feature moves the
  log step: immediately (w . J_in + a) and at steady state (w . (I - J_rec)^-1 J_in + a), per unit and per typical
  variation of the feature;
- ``drift_curve`` and ``log_step_equilibria``: the closed loop with the log step as a third state, where the drift
  vanishes (the log step the controller settles at for this input) and whether that equilibrium is stable;
- ``controller_trajectory``: the closed loop driven by a sequence of inputs (the autonomous schedule: statistics
  held at typical values, time advancing);
- ``step_size_schedule`` and ``validation_response``: what the records of real runs say.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lopt.architectures.hierarchical.optimizer import lstm_cell
from lopt.architectures.hierarchical.spec import LOG_STEP_LIMIT
from lopt.dynamics._precision import as_input, as_state, bind, precision
from lopt.dynamics.fixed_points import find_fixed_points
from lopt.dynamics.linearize import eig_sorted, linearize, time_constants
from lopt.dynamics.schedule import schedule_shape

PHASES = ("early", "middle", "late")  # thirds of the recorded steps
DRIFT_GRID = 33                       # log steps in [-limit, limit] for the drift curve (ours)
TOP_EIGENVALUES = 10


class Controller(NamedTuple):
  """The per-tensor step-size controller as arrays: the LSTM's weights (inputs + hidden, 4 hidden) and biases, the
  log-step readout (w_s, b_s), the direct gains on the alignment inputs, the schedule's weights on the time inputs,
  and where those inputs sit in x (column indices); with ``direct_step``, the direct head's gain on every input
  (``input_gain``, (F,); None without). ``log_step_limit`` scales the log step as an input; ``max_log_step`` bounds
  it from above (the optimizer's field)."""
  lstm_w: np.ndarray
  lstm_b: np.ndarray
  step_w: np.ndarray
  step_b: np.ndarray
  alignment_gain: np.ndarray
  schedule: np.ndarray
  alignment_index: tuple
  log_step_index: int
  time_index: tuple
  log_step_limit: float = LOG_STEP_LIMIT
  input_gain: np.ndarray | None = None
  max_log_step: float = LOG_STEP_LIMIT

  @property
  def size(self) -> int:
    """lstm_size (the state s has twice this)."""
    return int(np.shape(self.step_w)[0])

  @property
  def num_inputs(self) -> int:
    return int(np.shape(self.lstm_w)[0]) - self.size


def controller_from_theta(theta: dict, names: list[str], max_log_step: float = LOG_STEP_LIMIT) -> Controller:
  """The controller of a hierarchical optimizer's ``theta``, with ``names`` its LSTM inputs
  (``HierarchicalOptimizer.lstm_input_names``) and its ``max_log_step``, as float64 numpy arrays."""
  f64 = lambda x: np.asarray(x, np.float64)  # noqa: E731
  return Controller(
      lstm_w=f64(theta["lstm"]["w"]), lstm_b=f64(theta["lstm"]["b"]), step_w=f64(theta["step"]["w"]),
      step_b=f64(theta["step"]["b"]), alignment_gain=f64(theta["step"]["alignment"]),
      schedule=f64(theta["step"]["schedule"]),
      alignment_index=tuple(i for i, n in enumerate(names) if n.startswith("alignment_")),
      log_step_index=names.index("log_step"),
      time_index=tuple(i for i, n in enumerate(names) if n.startswith("time_")),
      input_gain=f64(theta["step"]["direct"]) if "direct" in theta["step"] else None, max_log_step=max_log_step)


# -- the maps ----------------------------------------------------------------------------------------------------------

def cell(controller: Controller, s, x):
  """F(s, x): one LSTM step of one tensor, s = [h, c] (2L,), x (F,) -> (2L,)."""
  size = controller.size
  h, c = lstm_cell({"w": controller.lstm_w, "b": controller.lstm_b}, s[:size], s[size:], x)
  return jnp.concatenate([h, c])


def drift(controller: Controller, s_new, x):
  """D: the change of the log step (before clipping) after the LSTM reached s_new = F(s, x)."""
  value = (s_new[:controller.size] @ jnp.asarray(controller.step_w).astype(s_new.dtype)
           + jnp.asarray(controller.step_b).astype(s_new.dtype)
           + x[jnp.asarray(controller.alignment_index, jnp.int32)] @ jnp.asarray(controller.alignment_gain).astype(
               x.dtype))
  if controller.input_gain is not None:
    value = value + x @ jnp.asarray(controller.input_gain, x.dtype)
  return value


def closed_loop(controller: Controller, z, x):
  """The controller with its log step as a third state: z = [h, c, log_step] (2L + 1,). The input's log-step
  column is replaced by the state's log_step / limit, as the optimizer feeds it."""
  limit = controller.log_step_limit
  x = x.at[controller.log_step_index].set(z[-1] / limit)
  s = cell(controller, z[:-1], x)
  log_step = jnp.clip(z[-1] + drift(controller, s, x), -limit, controller.max_log_step)
  return jnp.concatenate([s, log_step[None]])


def maps(controller: Controller):
  """(F, closed loop) as callables ``step(state, x)`` for the toolkit; keep them to reuse the compiled searches."""
  return functools.partial(cell, controller), functools.partial(closed_loop, controller)


def readout_vector(controller: Controller) -> np.ndarray:
  """(2L,) w such that D = w . F(s, x) + b_s + direct . x."""
  return np.concatenate([np.asarray(controller.step_w, np.float64), np.zeros(controller.size)])


def direct_gain(controller: Controller) -> np.ndarray:
  """(F,) the direct (not through the LSTM) gain of each input on D: the alignment gains, plus the direct step
  head's gains with ``direct_step`` (zero elsewhere)."""
  direct = np.zeros(controller.num_inputs)
  direct[list(controller.alignment_index)] = np.asarray(controller.alignment_gain, np.float64)
  if controller.input_gain is not None:
    direct += np.asarray(controller.input_gain, np.float64)
  return direct


# -- typical inputs ----------------------------------------------------------------------------------------------------

def typical_inputs(inputs, phases=PHASES) -> dict:
  """Typical LSTM inputs from what it saw.

  Args:
    inputs: (T, M, F) the input vectors at each of T steps for M tensors (of many problems).
    phases: names of equal parts of the T steps (early / middle / late).

  Returns:
    {"median": (F,) over steps and tensors, "quartiles": (2, F), "spread": (F,) the interquartile range (a typical
    variation of each feature), "phases": {name: (F,) median over that part}, "phase_steps": {name: [first, end)}}.
  """
  inputs = np.asarray(inputs, np.float64)
  steps = inputs.shape[0]
  flat = inputs.reshape(-1, inputs.shape[-1])
  quartiles = np.quantile(flat, [0.25, 0.75], axis=0)
  bounds = np.linspace(0, steps, len(phases) + 1).round().astype(int)
  parts = {name: (int(a), int(max(b, a + 1))) for name, a, b in zip(phases, bounds[:-1], bounds[1:])}
  return {"median": np.median(flat, axis=0), "quartiles": quartiles, "spread": quartiles[1] - quartiles[0],
          "phases": {name: np.median(inputs[a:b].reshape(-1, inputs.shape[-1]), axis=0)
                     for name, (a, b) in parts.items()},
          "phase_steps": {name: list(part) for name, part in parts.items()}}


# -- fixed points and linearization --------------------------------------------------------------------------------

def linearize_controller(controller: Controller, step, s_star, x_star) -> dict:
  """The LSTM linearized at (s*, x*) and the input features' effect on the log step there.

  Returns {"eigenvalues": (2L,) complex by decreasing modulus, "time_constants": (2L,) steps, "spectral_radius",
  "drift": D(s*, x*), "immediate_gain": (F,) dD/dx one step after a change of x (w . J_in + direct),
  "steady_gain": (F,) the change of D per unit change of x held until s settles (w . (I - J_rec)^-1 J_in + direct),
  "j_rec", "j_in"}. The log step integrates D, so a sustained change dx moves it by steady_gain . dx every step.
  """
  s_star = as_state(s_star)
  x_star = as_input(x_star, s_star.dtype)
  j_rec, j_in = linearize(step, s_star, x_star)
  j_rec, j_in = np.asarray(j_rec, np.float64), np.asarray(j_in, np.float64)
  eigen = eig_sorted(j_rec)
  w = readout_vector(controller)
  direct = direct_gain(controller)
  identity = np.eye(j_rec.shape[0])
  steady = w @ np.linalg.lstsq(identity - j_rec, j_in, rcond=None)[0] + direct
  s_new = bind(step, s_star.dtype)(s_star, x_star)  # = s* at a fixed point (nearly, at a slow point)
  d = float(drift_values(controller, np.asarray(s_new)[None], np.asarray(x_star)[None])[0])
  return {"eigenvalues": eigen.eigenvalues, "time_constants": time_constants(eigen.eigenvalues),
          "spectral_radius": float(np.max(np.abs(eigen.eigenvalues))), "drift": d,
          "immediate_gain": w @ j_in + direct, "steady_gain": steady, "j_rec": j_rec, "j_in": j_in}


def fixed_point_analysis(controller: Controller, step, x_star, seeds, *, dtype=np.float64) -> dict:
  """Fixed points of s -> F(s, x*) from ``seeds`` (N, 2L) (visited states), the drift of the log step at each, and
  the linearization (``linearize_controller``) at the main one (``FixedPoints.best``: the slowest stable point).

  Returns {"fixed": FixedPoints, "drifts": (K,) D at each point, "best": index or None, "linearization": dict or
  None}.
  """
  with precision(dtype):
    fixed = find_fixed_points(step, np.asarray(seeds, dtype), np.asarray(x_star, dtype), dtype=dtype)
    xs = np.repeat(np.asarray(x_star, np.float64)[None], len(fixed.points), axis=0)
    drifts = drift_values(controller, fixed.points, xs) if len(fixed.points) else np.zeros(0)
    best = fixed.best() if len(fixed.points) else None
    linear = (linearize_controller(controller, step, fixed.points[best].astype(dtype), np.asarray(x_star, dtype))
              if best is not None else None)
  return {"fixed": fixed, "drifts": drifts, "best": best, "linearization": linear}


def drift_curve(controller: Controller, step, x_star, seed_state, *, grid=None, dtype=np.float64) -> dict:
  """The drift D of the log step against the log step L the controller sees (x*'s log-step column set to
  L / limit), each at the fixed point of F there that iterating F from ``seed_state`` reaches (the attracting one,
  which the optimizer's own dynamics visit), polished with Newton steps.

  Returns {"log_step": (G,), "drift": (G,) (NaN where the iteration did not converge), "states": (G, 2L)}. Where
  the curve crosses zero going down, the log step is at a stable equilibrium for this input
  (``log_step_equilibria``).
  """
  limit = controller.log_step_limit
  grid = np.linspace(-limit, limit, DRIFT_GRID) if grid is None else np.asarray(grid, np.float64)
  states, values, found = _drift_at(controller, step, x_star, seed_state, grid, dtype)
  return {"log_step": grid, "drift": np.where(found, values, np.nan), "states": states}


ITERATIONS = 2000     # iterations of F from the seed before polishing (drift curve)
POLISH_STEPS = 3      # Newton steps after them
CONVERGED = 1e-10     # |s - F(s)| <= this times max(1, |s|): a fixed point (drift curve)


def _drift_at(controller: Controller, step, x_star, seed_state, log_steps, dtype):
  """(states (G, 2L), drifts (G,), converged (G,)) at the log steps ``log_steps`` (G,)."""
  xs = np.repeat(np.asarray(x_star, np.float64)[None], len(log_steps), axis=0)
  xs[:, controller.log_step_index] = np.asarray(log_steps) / controller.log_step_limit
  seeds = np.repeat(np.asarray(seed_state, np.float64)[None], len(log_steps), axis=0)
  with precision(dtype):
    dtype = np.dtype(dtype)
    states, residual = _settle(bind(step, dtype), jnp.asarray(seeds, dtype), jnp.asarray(xs, dtype))
    states, residual = np.asarray(states, np.float64), np.asarray(residual, np.float64)
  values = drift_values(controller, states, xs)
  scale = np.maximum(1.0, np.linalg.norm(states, axis=1))
  tolerance = max(CONVERGED, 1e3 * float(np.finfo(dtype).eps))
  return states, values, np.isfinite(residual) & (residual <= tolerance * scale)


def drift_values(controller: Controller, states, xs) -> np.ndarray:
  """D for a batch (numpy, float64): states (N, 2L) after the LSTM step, inputs xs (N, F) -> (N,)."""
  states, xs = np.asarray(states, np.float64), np.asarray(xs, np.float64)
  values = (states[:, :controller.size] @ np.asarray(controller.step_w, np.float64) + float(controller.step_b)
            + xs[:, list(controller.alignment_index)] @ np.asarray(controller.alignment_gain, np.float64))
  if controller.input_gain is not None:
    values = values + xs @ np.asarray(controller.input_gain, np.float64)
  return values


@functools.partial(jax.jit, static_argnames=("step",))
def _settle(step, seeds, xs):
  """Iterates F on the batch until every residual is at rounding level (or ITERATIONS), then Newton-polishes."""
  batch = jax.vmap(step)
  floor = 1e2 * jnp.finfo(seeds.dtype).eps

  def residuals(s):
    return jnp.linalg.norm(s - batch(s, xs), axis=1) / jnp.maximum(1.0, jnp.linalg.norm(s, axis=1))

  def cond(carry):
    s, t = carry
    r = residuals(s)
    return (t < ITERATIONS) & ~jnp.all((r <= floor) | ~jnp.isfinite(r))

  s, _ = jax.lax.while_loop(cond, lambda carry: (batch(carry[0], xs), carry[1] + 1), (seeds, 0))

  def newton(s, x):
    residual = s - step(s, x)
    jac = jnp.eye(s.shape[0], dtype=s.dtype) - jax.jacfwd(step)(s, x)
    new = s - jnp.linalg.solve(jac, residual)
    return jnp.where(jnp.all(jnp.isfinite(new)), new, s)

  s = jax.lax.fori_loop(0, POLISH_STEPS, lambda _, s: jax.vmap(newton)(s, xs), s)
  new = batch(s, xs)
  return new, jnp.linalg.norm(s - new, axis=1)


REFINEMENTS = 8  # rounds of refining a zero crossing on a sub-grid of DRIFT_GRID points (ours): width / 32^8


def log_step_equilibria(controller: Controller, closed, step, x_star, curve: dict, *,
                        dtype=np.float64) -> list[dict]:
  """Equilibria of the closed loop z = [h, c, log_step] at input x* (the log step the controller settles at when its
  inputs stay at x*), from the drift curve: where it crosses zero (refined on sub-grids), and the ends where it
  pushes the log step into its +-limit clip; each with the closed loop (``closed``) linearized at [s*(L*), L*].

  Returns a list of {"log_step", "at_limit", "stable", "spectral_radius", "eigenvalues" (the largest moduli first),
  "drift_slope" (dD/dL, interior equilibria only)}, by log step.
  """
  limit = controller.log_step_limit
  grid, values, states = curve["log_step"], curve["drift"], curve["states"]
  size = len(grid)

  def at(log_steps, state):  # padded to the grid's size: one compiled shape for every call
    log_steps = np.atleast_1d(np.asarray(log_steps, np.float64))
    padded = np.concatenate([log_steps, np.full(size - len(log_steps), log_steps[-1])])
    s, v, ok = _drift_at(controller, step, x_star, state, padded, dtype)
    return s[:len(log_steps)], v[:len(log_steps)], ok[:len(log_steps)]

  def crossing(v):  # the first interval [k, k + 1] where v changes sign (or reaches zero), or None
    changes = np.flatnonzero((v[:-1] != 0) & ((v[1:] == 0) | (np.sign(v[:-1]) != np.sign(v[1:]))))
    return int(changes[0]) if len(changes) else None

  candidates = []  # (log step, state near it, at the limit)
  ok = np.isfinite(values)
  for k in range(size - 1):
    if ok[k] and ok[k + 1] and crossing(values[k:k + 2]) is not None:
      low, high, state = grid[k], grid[k + 1], states[k]
      for _ in range(REFINEMENTS):
        sub = np.linspace(low, high, size)
        sub_states, sub_values, found = at(sub, state)
        j = crossing(sub_values) if np.all(found) else None
        if j is None:
          break
        low, high, state = sub[j], sub[j + 1], sub_states[j]
      candidates.append((0.5 * (low + high), state, False))
  if ok[-1] and values[-1] > 0:
    candidates.append((limit, states[-1], True))
  if ok[0] and values[0] < 0:
    candidates.append((-limit, states[0], True))
  out = []
  with precision(dtype):
    for log_step, state, at_limit in candidates:
      settled, _, _ = at(log_step, state)
      z = np.concatenate([settled[0], [log_step]]).astype(dtype)
      j_rec, _ = linearize(closed, z, np.asarray(x_star, dtype))
      eigenvalues = eig_sorted(np.asarray(j_rec)).eigenvalues
      radius = float(np.max(np.abs(eigenvalues)))
      entry = {"log_step": float(log_step), "at_limit": at_limit, "stable": radius < 1.0, "spectral_radius": radius,
               "eigenvalues": eigenvalues[:TOP_EIGENVALUES]}
      if not at_limit:
        h = 1e-6 * limit
        _, around, _ = at([log_step - h, log_step + h], state)
        entry["drift_slope"] = float((around[1] - around[0]) / (2 * h))
      out.append(entry)
  return sorted(out, key=lambda e: e["log_step"])


# -- the closed loop over time -----------------------------------------------------------------------------------------

def controller_trajectory(controller: Controller, closed, inputs, z0=None) -> dict:
  """The closed loop driven by ``inputs`` (T, F) (their log-step column is ignored: the loop feeds its own) from
  z0 (default zeros: h = c = 0, log step 0, as the optimizer starts).

  Returns {"log_step": (T,) after each step, "schedule_term": (T,) schedule . x_t[time], "effective_log_step": (T,)
  their sum (the tensor's step size is step_scale * exp of it), "states": (T, 2L + 1)}.
  """
  inputs = np.asarray(inputs, np.float64)
  z0 = np.zeros(2 * controller.size + 1) if z0 is None else np.asarray(z0, np.float64)
  dtype = inputs.dtype if jax.config.jax_enable_x64 else np.float32
  states = np.asarray(_trajectory(bind(closed, np.dtype(dtype)), jnp.asarray(z0, dtype), jnp.asarray(inputs, dtype)),
                      np.float64)
  schedule = inputs[:, list(controller.time_index)] @ np.asarray(controller.schedule, np.float64)
  return {"log_step": states[:, -1], "schedule_term": schedule, "effective_log_step": states[:, -1] + schedule,
          "states": states}


@functools.partial(jax.jit, static_argnames=("closed",))
def _trajectory(closed, z0, inputs):
  def body(z, x):
    z = closed(z, x)
    return z, z
  return jax.lax.scan(body, z0, inputs)[1]


# -- what real runs say ------------------------------------------------------------------------------------------------

def step_size_schedule(effective_log_steps, step_scale: float) -> dict:
  """The learned step-size schedule along real runs.

  Args:
    effective_log_steps: (P, T, n) per problem, step and tensor: log step + schedule term of each update.
    step_scale: the optimizer's (the step size is step_scale * exp(effective log step)).

  Returns {"per_tensor": (T, n) median over problems of the effective learning rate, "median": (T,) its median
  over tensors, **schedule_shape(median), "per_tensor_shape": [schedule_shape of each tensor's curve]}.
  """
  rate = step_scale * np.exp(np.asarray(effective_log_steps, np.float64))
  per_tensor = np.median(rate, axis=0)
  median = np.median(per_tensor, axis=1)
  return {"per_tensor": per_tensor, "median": median, **schedule_shape(median),
          "per_tensor_shape": [schedule_shape(per_tensor[:, i]) for i in range(per_tensor.shape[1])]}


def validation_response(branches: dict, step_scale: float, reference: str = "flat") -> dict:
  """Ratios of effective learning rates between continuations of the same runs.

  Args:
    branches: {name: (P, K, n) effective log steps over the K steps after the branch point}, one of them
      ``reference`` (validation loss flat).
    step_scale: the optimizer's.

  Returns {"rates": {name: (K, n) median over problems}, "log_ratio": {name: (K, n) median over problems of
  log(rate / reference rate)}, "final_ratio": {name: (n,) exp of the last log ratio per tensor},
  "final_ratio_median": {name: median over tensors}} for every branch but the reference.
  """
  ref = np.asarray(branches[reference], np.float64)
  out = {"rates": {name: np.median(step_scale * np.exp(np.asarray(b, np.float64)), axis=0)
                   for name, b in branches.items()},
         "log_ratio": {}, "final_ratio": {}, "final_ratio_median": {}}
  for name, b in branches.items():
    if name == reference:
      continue
    log_ratio = np.median(np.asarray(b, np.float64) - ref, axis=0)  # (K, n)
    out["log_ratio"][name] = log_ratio
    out["final_ratio"][name] = np.exp(log_ratio[-1])
    out["final_ratio_median"][name] = float(np.exp(np.median(log_ratio[-1])))
  return out
