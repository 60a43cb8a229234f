"""What one PyTorch step of the shipped `general` costs on the CPU, against torch Adam: ATen operations per step (a
proxy for the kernel launches of a GPU step), the compiled step's kernel calls, and ms per step.

  python benchmarks/torch_step_ops.py [--params 1_000_000] [--tensors 16] [--repeats 20] [--compile] [--threads 1]

The model is benchmarks/general_step_cost.py's: square matrices and biases (--tensors / 2 of each) adding up to
about --params scalars. Eager: the ATen operations one step dispatches (views excluded: they launch nothing),
counted with a TorchDispatchMode. --compile: also the compiled step (torch.compile's default mode, Inductor's C++
backend), whose kernels are counted in the code Inductor generated (its fused loops and the library calls it makes).
Prints one JSON line per measurement.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lopt.torch import LearnedOptimizer


class CountOps(TorchDispatchMode):
  """Counts the ATen operations dispatched under it, views and metadata-only operations excluded."""

  def __init__(self):
    super().__init__()
    self.count = 0

  def __torch_dispatch__(self, func, types, args=(), kwargs=None):
    if not func.is_view and func.overloadpacket not in (torch.ops.aten.detach, torch.ops.aten.lift_fresh):
      self.count += 1
    return func(*args, **(kwargs or {}))


def model(num_params: int, tensors: int) -> list[torch.nn.Parameter]:
  width = int(math.sqrt(num_params / (tensors // 2)))
  torch.manual_seed(0)
  shapes = [s for _ in range(tensors // 2) for s in ((width, width), (width,))]
  params = [torch.nn.Parameter(torch.randn(s) * 0.05) for s in shapes]
  for p in params:
    p.grad = torch.randn_like(p) * 1e-3
  return params


def median_ms(run, repeats: int) -> float:
  run(); run()  # noqa: E702 -- warm-up (compilation, state creation)
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    run()
    times.append(time.perf_counter() - start)
  return 1e3 * sorted(times)[len(times) // 2]


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--params", type=int, default=1_000_000)
  parser.add_argument("--tensors", type=int, default=16)
  parser.add_argument("--repeats", type=int, default=20)
  parser.add_argument("--compile", action="store_true")
  parser.add_argument("--threads", type=int, default=1, help="torch's CPU threads (1: steadier on a shared machine)")
  args = parser.parse_args()
  torch.set_num_threads(args.threads)
  modes = [False] + ([True] if args.compile else [])
  for name in ["adam"] + [f"general{'_compiled' if mode else ''}" for mode in modes]:
    params = model(args.params, args.tensors)
    if name == "adam":
      optimizer = torch.optim.Adam(params, lr=1e-3, foreach=True)
      run = optimizer.step
    else:
      optimizer = LearnedOptimizer(params, "general", compile=name.endswith("compiled"))
      run = lambda: optimizer.step(loss=1.0)  # noqa: E731
    ms = median_ms(run, args.repeats)
    result = {"optimizer": name, "params": sum(p.numel() for p in params), "tensors": len(params),
              "threads": torch.get_num_threads(), "ms": round(ms, 3)}
    counter = CountOps()
    if name.endswith("compiled"):
      from torch._inductor.utils import run_and_get_code
      torch._dynamo.reset()
      optimizer.rule.enable_compile(None)
      _, codes = run_and_get_code(run)
      calls = [line for code in codes for line in code[code.index("def call("):].splitlines()
               if re.search(r"\b(cpp_fused_\w+|extern_kernels\.\w+|aten\.\w+)\(", line)]
      result["compiled_kernel_calls"] = len(calls)
    else:
      with counter:
        run()
      result["aten_ops"] = counter.count
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
  main()
