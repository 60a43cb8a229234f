"""lopt's meta-training outer step vs a minimal hand-written JAX loop of the same computation, side by side.

Both do: sample a meta-batch of random quadratics, unroll the component-wise GRU with full backpropagation through a
rematerialized lax.scan, meta-loss mean(loss_t / loss_0) + l2 * ||theta||, element-wise clipping, Adam with decay.
lopt's step adds what a library needs (bounded losses, a finite-gradient guard with per-problem fallback); it is
timed as configured by default and with ``on_nonfinite="skip_step"`` (the guard without its ``lax.cond``).

  python benchmarks/meta_train_speed.py                 # the demo configuration (CPU)
  python benchmarks/meta_train_speed.py --paper         # hidden 256, meta-batch 64, 201 steps (GPU)
"""

import argparse
import json
import platform
import time
from datetime import date

import jax
import jax.numpy as jnp
import optax

from lopt.meta.config import PRESETS
from lopt.meta.train import build_outer_step, optimizer_from, outer_optimizer_from, step_keys, task_from
from lopt.tasks.quadratic import sample_quadratic


def hand_written_step(config):
  """The same outer step written directly in JAX, with no library code (the baseline to beat)."""
  hidden, dim = config.hidden_size, 5

  def cell(theta, h, g):
    x = (config.input_scale * g)[..., None]
    z = x @ theta["input_weights"] + theta["bias"]
    w = theta["recurrent_weights"]
    ur = jax.nn.sigmoid(z[..., :2 * hidden] + h @ w[:, :2 * hidden])
    u, r = ur[..., :hidden], ur[..., hidden:]
    c = jnp.tanh(z[..., 2 * hidden:] + (r * h) @ w[:, 2 * hidden:])
    return u * h + (1 - u) * c

  def problem_loss(theta, key):
    hessian, linear, offset = sample_quadratic(key, dim, -3.0, 0.0)
    loss = lambda x: 0.5 * x @ jnp.matmul(hessian, x, precision="highest") + linear @ x + offset  # noqa: E731
    x0 = jax.random.normal(jax.random.fold_in(key, 0), (dim,))

    @jax.checkpoint
    def step(carry, _):
      x, h = carry
      f, g = jax.value_and_grad(loss)(x)
      h = cell(theta, h, g)
      dx = config.output_scale * (h @ theta["readout_weights"] + theta["readout_bias"])[..., 0]
      return (x + dx, h), f

    h0 = jnp.broadcast_to(theta["initial_state"], (dim, hidden))
    _, fs = jax.lax.scan(step, (x0, h0), None, length=config.horizon)
    return jnp.mean(fs / fs[0])

  def batch_loss(theta, keys):
    norm = jnp.sqrt(sum(jnp.sum(v**2) for v in jax.tree.leaves(theta)))
    return jnp.mean(jax.vmap(problem_loss, (None, 0))(theta, keys)) + config.l2_penalty * norm

  outer = outer_optimizer_from(config)

  @jax.jit
  def outer_step(theta, state, keys):
    loss, grads = jax.value_and_grad(batch_loss)(theta, keys)
    updates, state = outer.update(grads, state, theta)
    return optax.apply_updates(theta, updates), state, loss

  return outer_step


def time_steps(step, theta, state, config, repeats):
  theta, state, out = step(theta, state, step_keys(config.seed, 0, config.meta_batch_size))  # compile
  jax.block_until_ready((theta, out))
  started = time.perf_counter()
  for i in range(1, repeats + 1):
    theta, state, out = step(theta, state, step_keys(config.seed, i, config.meta_batch_size))
  jax.block_until_ready((theta, out))
  return (time.perf_counter() - started) / repeats


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--paper", action="store_true", help="the paper's configuration (hidden 256, batch 64, 201)")
  parser.add_argument("--repeats", type=int, default=20, help="timed outer steps per round")
  parser.add_argument("--rounds", type=int, default=3, help="alternating rounds; the median ratio is reported")
  parser.add_argument("--json", help="write the numbers to this file")
  args = parser.parse_args()
  config = PRESETS["paper" if args.paper else "demo"]
  config = config.replace(horizon=config.horizon or 200)
  task, optimizer = task_from(config), optimizer_from(config)
  common = dict(horizon=config.horizon, meta_loss=config.meta_loss, loss_cap=config.loss_cap,
                l2_penalty=config.l2_penalty)
  lopt_step = build_outer_step(task, optimizer, outer_optimizer_from(config), **common)
  # The same with on_nonfinite="skip_step": no per-problem fallback, so no lax.cond (a host sync per step on a GPU).
  skip_step = build_outer_step(task, optimizer, outer_optimizer_from(config), **common, on_nonfinite="skip_step")
  plain_step = hand_written_step(config)
  theta = optimizer.init(jax.random.key(config.seed))
  theta["readout_weights"] = 0.01 * jnp.ones_like(theta["readout_weights"])  # a moving, non-trivial optimizer
  state = outer_optimizer_from(config).init(theta)
  lopt_state = (theta, state)
  rows = []
  for _ in range(args.rounds):  # alternate, so that drifts in machine load hit all equally
    t_lopt = time_steps(lopt_step, *lopt_state, config, args.repeats)
    t_plain = time_steps(plain_step, theta, state, config, args.repeats)
    t_skip = time_steps(skip_step, *lopt_state, config, args.repeats)
    rows.append((t_lopt, t_plain, t_skip))
  median = lambda values: sorted(values)[len(values) // 2]  # noqa: E731
  ratios = sorted(a / b for a, b, _ in rows)
  skip_ratios = sorted(c / b for _, b, c in rows)
  t_lopt, t_plain, t_skip = (median([row[i] for row in rows]) for i in range(3))
  result = {
      "config": "paper" if args.paper else "demo", "hidden_size": config.hidden_size,
      "meta_batch_size": config.meta_batch_size, "horizon": config.horizon, "device": str(jax.devices()[0]),
      "platform": platform.platform(), "jax": jax.__version__, "optax": optax.__version__, "date": str(date.today()),
      "lopt_seconds_per_step": t_lopt, "hand_written_seconds_per_step": t_plain,
      "ratio_lopt_over_hand_written": ratios[len(ratios) // 2], "ratios": ratios,
      "lopt_seconds_for_5000_steps": 5000 * t_lopt,
      "lopt_skip_step_seconds_per_step": t_skip, "ratio_skip_step_over_hand_written": median(skip_ratios),
      "skip_step_ratios": skip_ratios,
  }
  print(f"{result['config']} config (hidden {config.hidden_size}, meta-batch {config.meta_batch_size}, "
        f"{config.horizon} steps) on {result['device']}")
  print(f"  lopt outer step:         {1e3 * t_lopt:8.2f} ms")
  print(f"  hand-written outer step: {1e3 * t_plain:8.2f} ms")
  print(f"  ratio lopt / hand-written: {result['ratio_lopt_over_hand_written']:.3f} (per round: "
        f"{', '.join(f'{r:.3f}' for r in ratios)})")
  print(f"  5000 outer steps with lopt: {5000 * t_lopt / 60:.1f} min")
  print(f"  lopt with on_nonfinite=skip_step: {1e3 * t_skip:8.2f} ms, ratio {median(skip_ratios):.3f} (per round: "
        f"{', '.join(f'{r:.3f}' for r in skip_ratios)})")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(result, f, indent=1)


if __name__ == "__main__":
  main()
