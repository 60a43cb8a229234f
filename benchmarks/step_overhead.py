"""Time of one optimizer step: the learned GRU optimizer versus Adam, in JAX and in PyTorch, side by side.

The model is an MLP whose widths give about 1M and 10M parameters; gradients are fixed random tensors, so only the
optimizer step is timed (in JAX a jitted update + apply_updates with donated buffers; in PyTorch ``step()``; Adam is
``optax.adam`` / ``torch.optim.Adam(fused=True)``, each framework's fastest Adam). The GRU's cost grows
with hidden_size H: it keeps H numbers per parameter and does O(H^2) work per parameter per step.

  python benchmarks/step_overhead.py                      # CPU, writes benchmarks/results/step_overhead.md
  python benchmarks/step_overhead.py --device cuda --out benchmarks/results/step_overhead_gpu.md
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

SIZES = {"1M": (512, 768, 64), "10M": (1024, 2688, 64)}  # MLP in -> hidden -> hidden -> out (see layer_shapes)


def layer_shapes(widths) -> list[tuple[int, ...]]:
  """in -> h -> h -> out dense layers with biases: "1M" is 1.03M and "10M" 10.2M parameters."""
  d_in, d_hidden, d_out = widths
  return [(d_in, d_hidden), (d_hidden,), (d_hidden, d_hidden), (d_hidden,), (d_hidden, d_out), (d_out,)]


def timed(step, repeats: int, warmup: int, synchronize) -> float:
  """Median seconds of ``step()`` over ``repeats`` calls after ``warmup`` calls."""
  for _ in range(warmup):
    step()
  synchronize()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    step()
    synchronize()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def make_checkpoint(hidden_size: int, directory: Path) -> Path:
  """A GRU optimizer with random (non-zero) readout: the timing does not depend on the values."""
  import jax
  from lopt.checkpoint import save_optimizer
  from lopt.optimizers import GRUOptimizer
  optimizer = GRUOptimizer(hidden_size)
  theta = {k: np.asarray(v) for k, v in optimizer.init(jax.random.key(0)).items()}
  theta["readout_weights"] = np.full((hidden_size, 1), 1e-3, np.float32)
  return save_optimizer(directory, optimizer, theta)


def jax_times(shapes, path, device: str, repeats: int, warmup: int) -> dict:
  import jax
  import jax.numpy as jnp
  import optax
  import lopt
  try:
    backend = jax.devices("gpu" if device == "cuda" else "cpu")[0]
  except RuntimeError as e:  # e.g. a CPU-only jaxlib on the GPU machine: still time PyTorch, say why JAX is missing
    print(f"JAX has no {device} backend ({e}); JAX columns left empty", flush=True)
    return {"adam": float("nan"), "learned": float("nan")}
  rng = np.random.default_rng(0)
  results = {}
  for name, transformation in [("learned", lopt.load(path).as_optax()), ("adam", optax.adam(1e-3))]:
    params = [jax.device_put(jnp.asarray(rng.standard_normal(s), jnp.float32), backend) for s in shapes]
    grads = [jax.device_put(jnp.asarray(rng.standard_normal(s), jnp.float32), backend) for s in shapes]
    state = transformation.init(params)

    @jax.jit
    def step(params, state, grads, transformation=transformation):
      updates, state = transformation.update(grads, state, params)
      return optax.apply_updates(params, updates), state

    step = jax.jit(step.__wrapped__, donate_argnums=(0, 1))
    carry = [params, state]

    def run():
      carry[0], carry[1] = step(carry[0], carry[1], grads)

    results[name] = timed(run, repeats, warmup, lambda: jax.block_until_ready(carry))
    del carry, params, grads, state
  return results


def torch_times(shapes, path, device: str, repeats: int, warmup: int) -> dict:
  import torch
  from lopt.torch import LearnedOptimizer
  generator = torch.Generator().manual_seed(0)
  synchronize = torch.cuda.synchronize if device == "cuda" else (lambda: None)
  results = {}
  for name in ("learned", "adam"):
    params = [torch.randn(s, generator=generator).to(device).requires_grad_(True) for s in shapes]
    for p in params:
      p.grad = torch.randn(p.shape, generator=generator).to(device)
    # Adam at its fastest: the fused kernel (CPU and CUDA since torch 2.4); the CPU default is a per-tensor loop.
    optimizer = LearnedOptimizer(params, path) if name == "learned" else torch.optim.Adam(params, lr=1e-3, fused=True)
    results[name] = timed(optimizer.step, repeats, warmup, synchronize)
    del optimizer, params
  return results


def machine_description(device: str) -> str:
  import jax
  import optax
  import torch
  cpu = platform.processor() or platform.machine()
  try:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("model name"):
        cpu = line.split(":", 1)[1].strip()
        break
  except OSError:
    pass
  import os
  lines = [f"- date: {datetime.datetime.now().isoformat(timespec='seconds')}",
           f"- CPU: {cpu}, {os.cpu_count()} logical cores visible; load average at the end "
           f"{', '.join(f'{x:.1f}' for x in os.getloadavg())} (other processes share these cores: timings are noisy)",
           f"- python {platform.python_version()}, jax {jax.__version__} ({jax.default_backend()}), "
           f"optax {optax.__version__}, torch {torch.__version__}, numpy {np.__version__}"]
  if device == "cuda":
    lines.append(f"- GPU: {torch.cuda.get_device_name(0)}; jax devices: {jax.devices()}")
  return "\n".join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
  parser.add_argument("--hidden-size", type=int, default=16, help="GRU units (paper: 256; lopt's demo preset: 32)")
  parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--warmup", type=int, default=1)
  parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "step_overhead.md"))
  args = parser.parse_args(argv)

  rows = []
  with tempfile.TemporaryDirectory() as directory:
    path = make_checkpoint(args.hidden_size, Path(directory) / "optimizer")
    for size in args.sizes:
      shapes = layer_shapes(SIZES[size])
      count = sum(int(np.prod(s)) for s in shapes)
      jax_result = jax_times(shapes, path, args.device, args.repeats, args.warmup)
      torch_result = torch_times(shapes, path, args.device, args.repeats, args.warmup)
      row = (size, count, jax_result["adam"], jax_result["learned"], torch_result["adam"], torch_result["learned"])
      rows.append(row)
      print(f"{size} ({count:,} params): JAX adam {row[2] * 1e3:.2f} ms, learned {row[3] * 1e3:.2f} ms "
            f"(x{row[3] / row[2]:.1f}); PyTorch adam {row[4] * 1e3:.2f} ms, learned {row[5] * 1e3:.2f} ms "
            f"(x{row[5] / row[4]:.1f}); learned PyTorch/JAX x{row[5] / row[3]:.2f}", flush=True)

  table = ["| model | parameters | JAX Adam (ms) | JAX learned (ms) | learned/Adam JAX | PyTorch Adam (ms) | "
           "PyTorch learned (ms) | learned/Adam PyTorch | learned PyTorch/JAX |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
  for size, count, jax_adam, jax_learned, torch_adam, torch_learned in rows:
    table.append(f"| {size} | {count:,} | {jax_adam * 1e3:.2f} | {jax_learned * 1e3:.2f} | "
                 f"{jax_learned / jax_adam:.1f} | {torch_adam * 1e3:.2f} | {torch_learned * 1e3:.2f} | "
                 f"{torch_learned / torch_adam:.1f} | {torch_learned / jax_learned:.2f} |")
  report = "\n".join([
      f"# One optimizer step: learned GRU (hidden size {args.hidden_size}) versus Adam ({args.device})", "",
      machine_description(args.device), "",
      f"Command: `python benchmarks/step_overhead.py --device {args.device} --hidden-size {args.hidden_size}`; "
      f"median of {args.repeats} steps after {args.warmup} warm-up steps; float32; fixed random gradients, so only "
      "the optimizer step (update + apply) is timed.", "", *table, ""])
  out = Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(report)
  print(f"wrote {out}")


if __name__ == "__main__":
  main()
