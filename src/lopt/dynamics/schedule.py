"""The learning-rate schedule implied by the autonomous dynamics h_{t+1} = F(h_t, 0) (SPEC §5.8)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from lopt.dynamics._precision import as_input, as_state, bind
from lopt.dynamics.update_functions import effective_learning_rate

WARMUP_FRACTION = 0.9  # warm-up ends when alpha_eff first reaches this fraction of its peak (ours)
FLAT_CHANGE = 0.1      # relative changes below this are "flat" when naming the shape (ours)


def autonomous_trajectory(step, h0, num_steps: int, x=0.0) -> jax.Array:
  """(num_steps + 1, H) states h_0 .. h_T of the map with a constant input (zero gradient by default), in h0's dtype."""
  h0 = as_state(h0)
  return _autonomous_trajectory(bind(step, h0.dtype), h0, num_steps, as_input(x, h0.dtype))


@functools.partial(jax.jit, static_argnames=("step", "num_steps"))
def _autonomous_trajectory(step, h0, num_steps, x):
  def body(h, _):
    h = step(h, x)
    return h, h

  _, states = jax.lax.scan(body, h0, None, length=num_steps)
  return jnp.concatenate([h0[None], states])


def schedule_shape(alpha: np.ndarray) -> dict:
  """Peak, warm-up and decay of an alpha_eff sequence (T+1,), as JSON-ready numbers.

  peak_step: argmax of alpha_eff. warmup_steps: first step where alpha_eff reaches WARMUP_FRACTION of the peak
  (0 when it starts there). decay_ratio: final / peak. decay_half_life: steps after the peak until alpha_eff is
  halfway between peak and final value (None without decay). shape: "warm-up then decay", "warm-up", "decay" or "flat".
  """
  alpha = np.asarray(alpha, np.float64)
  peak_step = int(np.argmax(alpha))
  peak, initial, final = float(alpha[peak_step]), float(alpha[0]), float(alpha[-1])
  warmup = int(np.argmax(alpha >= WARMUP_FRACTION * peak)) if peak > 0 else 0
  rises = peak > 0 and (peak - initial) > FLAT_CHANGE * abs(peak)
  decays = peak > 0 and (peak - final) > FLAT_CHANGE * abs(peak)
  half_life = None
  if decays:
    halfway = 0.5 * (peak + final)
    after = alpha[peak_step:]
    half_life = int(np.argmax(after <= halfway))
  shape = {(True, True): "warm-up then decay", (True, False): "warm-up", (False, True): "decay",
           (False, False): "flat"}[(bool(rises), bool(decays))]
  return {"initial": initial, "peak": peak, "peak_step": peak_step, "final": final, "warmup_steps": warmup,
          "decay_ratio": final / peak if peak != 0 else None, "decay_half_life": half_life, "shape": shape}


def learning_rate_schedule(step, readout, h0, num_steps: int) -> dict:
  """The autonomous trajectory from h0 and alpha_eff along it.

  Returns {"states": (T+1, H), "alpha_eff": (T+1,), **schedule_shape(alpha_eff)}.
  """
  states = autonomous_trajectory(step, h0, num_steps)
  alpha = np.asarray(effective_learning_rate(step, readout, states), np.float64)
  return {"states": np.asarray(states, np.float64), "alpha_eff": alpha, **schedule_shape(alpha)}
