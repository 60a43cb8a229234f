"""Update-function analyses for any learned-optimizer architecture, recurrent or not (SPEC §5.2, §5.7, §5.8).

An optimizer without a ``RecurrentView`` (the per-parameter MLP) has no state map to find fixed points of, but its
update is still a function of the gradient at every state it visits. While it optimizes test problems, this module
probes a fixed random set of coordinates: the update of coordinate j as a function of its own gradient g_j, every
other input held at what the optimizer actually saw, U_t,j(g). From it:

- clipping: U_0,j(g) over a wide range of g at the first step (``lopt.dynamics.clipping_profile`` on the probe);
- the learned schedule: alpha_eff(t) = -dU_t,j/dg at g = 0 (autodiff), its median over the probed coordinates
  against the step, and its shape (``lopt.dynamics.schedule_shape``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

from lopt.dynamics import clipping_profile
from lopt.dynamics.schedule import schedule_shape

PROBED_COORDINATES = 32  # coordinates probed per problem (ours)
PROBE_SEED = 30_001


def probe_coordinates(task, count: int = PROBED_COORDINATES) -> np.ndarray:
  """(K,) sorted random coordinates of one problem's flattened parameters."""
  size = int(jax.eval_shape(lambda k: ravel_pytree(task.init(k))[0], jax.random.key(0)).shape[0])
  return np.sort(np.random.default_rng(PROBE_SEED).choice(size, min(count, size), replace=False))


def _probe(optimizer, theta, state, grads, params, loss, step):
  """``update_of(j, g)``: coordinate j's update when its gradient is g and everything else is as given."""
  flat_grads, unravel = ravel_pytree(grads)

  def update_of(j, g):
    updates, _ = optimizer.update(theta, state, unravel(flat_grads.at[j].set(g)), params, loss=loss, step=step)
    return ravel_pytree(updates)[0][j]
  return update_of


def collect_probes(task, optimizer, theta, keys, coordinates: np.ndarray, num_steps: int | None = None) -> dict:
  """Runs ``optimizer`` on the problems ``keys`` and probes ``coordinates`` at every step.

  Returns {"losses": (P, T), "gradients": (P, T, K) the gradients seen, "alpha_eff": (P, T, K) -dU/dg at g = 0}.
  """
  num_steps = num_steps or task.horizon
  coordinates = jnp.asarray(coordinates)

  def run(key):
    params = task.init(key)
    state = optimizer.init_state(theta, params)

    def body(carry, t):
      params, state = carry
      loss, grads = jax.value_and_grad(task.loss)(params, key, t)
      update_of = _probe(optimizer, theta, state, grads, params, loss, t)
      zero = jnp.zeros((), ravel_pytree(grads)[0].dtype)
      alpha = -jax.vmap(lambda j: jax.grad(lambda g: update_of(j, g))(zero))(coordinates)
      updates, state = optimizer.update(theta, state, grads, params, loss=loss, step=t)
      seen = ravel_pytree(grads)[0][coordinates]
      return (optax.apply_updates(params, updates), state), (loss, seen, alpha)

    _, records = jax.lax.scan(body, (params, state), jnp.arange(num_steps))
    return records

  losses, gradients, alpha = jax.jit(jax.vmap(run))(keys)
  return {"losses": np.asarray(losses), "gradients": np.asarray(gradients), "alpha_eff": np.asarray(alpha)}


def first_step_probe(task, optimizer, theta, key, coordinate: int):
  """``(step, readout, h0)`` for ``lopt.dynamics`` from the first step of problem ``key``: step(h, g) -> (1,)
  holds U_0,j(g) (the state argument is unused: the optimizer's state is the one it had), readout(h) = h[0]."""
  params = task.init(key)
  state = optimizer.init_state(theta, params)
  loss, grads = jax.value_and_grad(task.loss)(params, key, 0)
  update_of = _probe(optimizer, theta, state, grads, params, loss, 0)
  step = jax.jit(lambda h, g: jnp.reshape(update_of(coordinate, g), (1,)) + 0.0 * h[:1])
  return step, (lambda h: h[0]), np.zeros(1, np.float32)


def analyze_updates(task, optimizer, theta, keys) -> dict:
  """Clipping at the first step and the learned schedule along real trajectories; results for
  ``lopt.dynamics.summarize`` (keys "clipping", "schedule") plus the raw probes."""
  coordinates = probe_coordinates(task)
  probes = collect_probes(task, optimizer, theta, keys, coordinates)
  # The clipping probe: the coordinate whose first gradient is the median in magnitude (a typical one).
  first = np.abs(probes["gradients"][0, 0])
  typical = int(coordinates[np.argsort(first)[len(first) // 2]])
  step, readout, h0 = first_step_probe(task, optimizer, theta, keys[0], typical)
  clipping = clipping_profile(step, readout, h0, probes["gradients"])
  per_step = np.moveaxis(probes["alpha_eff"], 1, 0).reshape(probes["alpha_eff"].shape[1], -1)  # (T, P * K)
  alpha = np.median(per_step, axis=1)
  quartiles = np.quantile(per_step, [0.25, 0.75], axis=1)
  schedule = {"alpha_eff": alpha, "alpha_eff_quartiles": quartiles, **schedule_shape(alpha)}
  return {"clipping": clipping, "schedule": schedule, "probes": probes, "probed_coordinates": coordinates}
