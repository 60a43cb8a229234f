"""The `general` optimizer's step against Adam's at N parameters, in JAX and in PyTorch, side by side.

  python benchmarks/general_step_cost.py [--params 10_000_000] [--repeats 50] [--compile MODE]

The model is a list of square weight matrices and bias vectors adding up to about --params scalars; gradients are
random and fixed. JAX: one jitted step (update + apply_updates, state donated) of optax.adam(1e-3) and of
lopt.load("general").as_optax() with the loss passed as ``value=``. PyTorch: torch.optim.Adam (fused where the
device supports it, else foreach) and lopt.torch.LearnedOptimizer(params, "general") with ``step(loss=...)``.
Prints ms per step (median of --repeats after warm-up) and the ratio to Adam, as JSON lines. --compile runs the
PyTorch optimizer through torch.compile (``default``, a torch.compile mode such as ``reduce-overhead``, or a JSON
dict of its keyword arguments); the compilation happens in the warm-up.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time


def shapes_for(num_params: int) -> list[tuple[int, ...]]:
  """8 square layers with biases, about num_params scalars in all."""
  width = int(math.sqrt(num_params / 8))
  return [s for _ in range(8) for s in ((width, width), (width,))]


def median_ms(run, repeats: int, sync) -> float:
  run(); run(); sync()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    run()
    sync()
    times.append(time.perf_counter() - start)
  times.sort()
  return 1e3 * times[len(times) // 2]


def jax_times(shapes, repeats: int) -> dict:
  import jax
  import jax.numpy as jnp
  import optax
  import lopt
  keys = jax.random.split(jax.random.key(0), len(shapes))
  params = [jax.random.normal(k, s) * 0.05 for k, s in zip(keys, shapes)]
  grads = [jax.random.normal(k, s) * 1e-3 for k, s in zip(jax.random.split(jax.random.key(1), len(shapes)), shapes)]
  out = {}
  for name, tx in (("adam", optax.adam(1e-3)), ("general", lopt.load("general").as_optax())):
    own = [jnp.array(x) for x in params]  # a copy per optimizer: the step donates its inputs
    state = [own, tx.init(own)]

    def step(p, s, g):
      updates, s = tx.update(g, s, p, value=jnp.float32(1.0))
      return optax.apply_updates(p, updates), s
    step = jax.jit(step, donate_argnums=(0, 1))

    def run():
      state[0], state[1] = step(state[0], state[1], grads)
    out[name] = median_ms(run, repeats, lambda: jax.block_until_ready(state[0]))
  return out


def torch_times(shapes, repeats: int, compile=False) -> dict:
  import torch
  from lopt.torch import LearnedOptimizer
  device = "cuda" if torch.cuda.is_available() else "cpu"
  torch.manual_seed(0)
  out = {}
  for name in ("adam", "general"):
    params = [torch.nn.Parameter(torch.randn(s, device=device) * 0.05) for s in shapes]
    for p in params:
      p.grad = torch.randn_like(p) * 1e-3
    if name == "adam":
      fused = device == "cuda"
      opt = torch.optim.Adam(params, lr=1e-3, fused=fused, foreach=None if fused else True)
      run = opt.step
    else:
      opt = LearnedOptimizer(params, "general", compile=compile)
      run = lambda: opt.step(loss=1.0)  # noqa: E731
    out[name] = median_ms(run, repeats, torch.cuda.synchronize if device == "cuda" else (lambda: None))
  return out


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--params", type=int, default=10_000_000)
  parser.add_argument("--repeats", type=int, default=50)
  parser.add_argument("--compile", default=None, help="torch.compile the PyTorch optimizer: default, a mode, or JSON")
  args = parser.parse_args()
  compile = False if args.compile is None else True if args.compile == "default" else (
      json.loads(args.compile) if args.compile.startswith("{") else args.compile)
  shapes = shapes_for(args.params)
  count = sum(math.prod(s) for s in shapes)
  import jax
  import torch
  common = {"params": count, "date": time.strftime("%Y-%m-%d"), "python": platform.python_version(),
            "jax": jax.__version__, "torch": torch.__version__, "jax_device": str(jax.devices()[0].device_kind),
            "torch_device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}
  for framework, times in (("jax", jax_times(shapes, args.repeats)),
                           ("torch", torch_times(shapes, args.repeats, compile))):
    extra = {"compile": args.compile} if framework == "torch" and args.compile else {}
    print(json.dumps({**common, "framework": framework, **extra, "adam_ms": round(times["adam"], 4),
                      "general_ms": round(times["general"], 4),
                      "ratio": round(times["general"] / times["adam"], 2)}), flush=True)


if __name__ == "__main__":
  main()
