"""The host (Python) cost of one PyTorch step of the shipped `general` against torch Adam, on tensors so small that
the time is almost all Python and dispatch, and the host synchronizations a step would make on a GPU.

  PYTHONPATH=src python benchmarks/torch_host_overhead.py [--repeats 500] [--threads 1] [--compile] [--profile 25]

Two models: "16 tensors" (8 matrices 32x32 and 8 biases 32) and "100 tensors" (a small transformer's shapes, width
8: token and position embeddings, 8 blocks of layer norms, attention and MLP weights with biases, a final layer
norm; 7.3k parameters in 9 distinct shapes).
Gradients are fixed random tensors and the loss a 0-d float32 tensor, as a training loop hands them over;
``LearnedOptimizer(params, "general").step(loss=loss)`` against ``torch.optim.Adam(foreach=True).step()``, the median
ms per step over --repeats steps after a warm-up, the optimizers taking turns in blocks of 25 steps (a shared
machine's load changes alike for all); --clock thread: this thread's CPU time instead of elapsed time. --compile adds
``compile=True`` (Inductor's C++ backend: the compiled kernels' arithmetic plus the host work around the graph --
guards, wrappers -- and the step's Python outside it).

Host synchronizations per step: every tensor computed from the parameters, the gradients or the loss stands for a
device tensor (taint tracking through a TorchDispatchMode); a read of one on the host -- ``.item()``, ``float()``,
``bool()`` (a Python ``if`` on a tensor), ``.tolist()``, ``.numpy()``, or a blocking copy to the CPU
(``.to("cpu")``, ``.cpu()``) -- is one synchronization on a GPU. Counted over one steady-state step.

--profile N: cProfile's N most expensive functions (own time) of 200 steps of `general` per model.
Prints one JSON line per measurement.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import json
import pstats
import statistics
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakTensorKeyDictionary

from lopt.torch import LearnedOptimizer


def transformer_shapes(vocab: int = 32, context: int = 8, width: int = 8, blocks: int = 8) -> list[tuple]:
  """100 tensors for the defaults: embeddings, per block 12 (2 layer norms, qkv, attention output, MLP), final norm."""
  shapes = [(vocab, width), (context, width)]
  for _ in range(blocks):
    shapes += [(width,), (width,), (3 * width, width), (3 * width,), (width, width), (width,),
               (width,), (width,), (4 * width, width), (4 * width,), (width, 4 * width), (width,)]
  return shapes + [(width,), (width,)]


MODELS = {"16 tensors": [(32, 32)] * 8 + [(32,)] * 8, "100 tensors": transformer_shapes()}


def model(shapes: list[tuple]) -> list[torch.nn.Parameter]:
  torch.manual_seed(0)
  params = [torch.nn.Parameter(0.05 * torch.randn(shape)) for shape in shapes]
  for p in params:
    p.grad = 1e-3 * torch.randn_like(p)
  return params


def make_step(name: str, params: list):
  if name == "adam":
    return torch.optim.Adam(params, lr=1e-3, foreach=True).step
  optimizer = LearnedOptimizer(params, "general", num_steps=10_000, compile=name == "general_compiled")
  loss = torch.tensor(2.5)
  return lambda: optimizer.step(loss=loss)


def median_ms(steps: dict, repeats: int, clock, warmup: int = 20, block: int = 25) -> dict:
  """The median ms per step of each of ``steps`` (name: step function) over ``repeats`` steps, timed in turns of
  ``block`` steps: a shared machine's load changes alike for all, and each runs with its own data in the caches."""
  for step in steps.values():
    for _ in range(warmup):  # compilation, state creation, caches
      step()
  times: dict = {name: [] for name in steps}
  for _ in range(max(1, repeats // block)):
    for name, step in steps.items():
      for _ in range(block):
        start = clock()
        step()
        times[name].append(clock() - start)
  return {name: 1e3 * statistics.median(values) for name, values in times.items()}


class HostReads(TorchDispatchMode):
  """Counts host reads of "device" tensors: those computed from the ``sources`` (parameters, gradients, loss)."""

  def __init__(self, sources):
    super().__init__()
    self.device = WeakTensorKeyDictionary()
    for tensor in sources:
      self.device[tensor] = True
    self.count = 0
    self.where: list[str] = []

  def tainted(self, value) -> bool:
    return isinstance(value, torch.Tensor) and value in self.device

  def read(self, what: str) -> None:
    import traceback
    self.count += 1
    frames = [f for f in traceback.extract_stack() if "/lopt/" in f.filename]
    self.where.append(f"{what} at {frames[-1].name}:{frames[-1].lineno}" if frames else what)

  def __torch_dispatch__(self, func, types, args=(), kwargs=None):
    kwargs = kwargs or {}
    result = func(*args, **kwargs)
    inputs, _ = tree_flatten((args, kwargs))
    if any(self.tainted(x) for x in inputs):
      if func is torch.ops.aten._local_scalar_dense.default:
        self.read("item/float/bool")
      for x in tree_flatten(result)[0]:
        if isinstance(x, torch.Tensor):
          self.device[x] = True
    return result

  @contextlib.contextmanager
  def patched(self):
    """Tensor methods that read on the host without an ATen operation this mode would see."""
    originals = {name: getattr(torch.Tensor, name) for name in ("numpy", "tolist", "cpu", "to")}

    def watch(name):
      original = originals[name]

      def method(tensor, *args, **kwargs):
        to_host = name == "cpu" or (name == "to" and _to_cpu(args, kwargs))
        if self.tainted(tensor) and (name in ("numpy", "tolist") or to_host):
          if not kwargs.get("non_blocking", False):
            self.read(name)
        result = original(tensor, *args, **kwargs)
        if self.tainted(tensor) and isinstance(result, torch.Tensor):
          if to_host:  # a host copy (on the CPU ``to`` may return the tensor itself: a copy stands for the transfer)
            result = result.clone() if result is tensor else result
            self.device.pop(result, None)
          else:
            self.device[result] = True
        return result
      return method
    for name in originals:
      setattr(torch.Tensor, name, watch(name))
    try:
      with self:
        yield self
    finally:
      for name, original in originals.items():
        setattr(torch.Tensor, name, original)


def _to_cpu(args, kwargs) -> bool:
  device = kwargs.get("device", args[0] if args and isinstance(args[0], (str, torch.device)) else None)
  return device is not None and torch.device(device).type == "cpu"


def host_syncs(shapes: list[tuple], compile: bool) -> tuple[int, list[str]]:
  """Host reads of device values in one steady-state step of `general`."""
  params = model(shapes)
  optimizer = LearnedOptimizer(params, "general", num_steps=10_000, compile=compile)
  loss = torch.tensor(2.5)
  for _ in range(3):
    optimizer.step(loss=loss)
  if compile:  # a dispatch mode stops torch.compile: the compiled graphs (fullgraph: no host reads) run outside it
    from torch.utils._python_dispatch import _disable_current_modes
    compiled = optimizer.rule._compiled
    assert compiled and not optimizer.rule._compile_failed, "the update did not compile"

    def outside(function):
      def run(*args, **kwargs):
        with _disable_current_modes():
          return function(*args, **kwargs)
      return run
    for key, function in list(compiled.items()):
      compiled[key] = outside(function)
  reads = HostReads([*params, *(p.grad for p in params), loss])
  with reads.patched():
    optimizer.step(loss=loss)
  return reads.count, reads.where


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=500)
  parser.add_argument("--threads", type=int, default=1, help="torch's CPU threads (1: steadier on a shared machine)")
  parser.add_argument("--compile", action="store_true", help="also general with compile=True")
  parser.add_argument("--profile", type=int, default=0, help="print cProfile's N most expensive functions")
  parser.add_argument("--clock", choices=("wall", "thread"), default="wall",
                      help="wall: elapsed time; thread: this thread's CPU time (with --threads 1 every operation "
                           "runs on it), which leaves out the time other jobs hold the core")
  args = parser.parse_args()
  torch.set_num_threads(args.threads)
  clock = time.thread_time if args.clock == "thread" else time.perf_counter
  names = ["adam", "general"] + (["general_compiled"] if args.compile else [])
  for model_name, shapes in MODELS.items():
    times = median_ms({name: make_step(name, model(shapes)) for name in names}, args.repeats, clock)
    for name in names:
      result = {"model": model_name, "tensors": len(shapes), "params": sum(p.numel() for p in model(shapes)),
                "optimizer": name, "threads": torch.get_num_threads(), "clock": args.clock,
                "ms": round(times[name], 4)}
      if name != "adam":
        syncs, where = host_syncs(shapes, compile=name == "general_compiled")
        result.update(vs_adam=round(times[name] / times["adam"], 2), host_syncs=syncs, sync_sites=where)
      print(json.dumps(result), flush=True)
    if args.profile:
      step = make_step("general", model(shapes))
      for _ in range(20):  # warm-up
        step()
      profile = cProfile.Profile()
      profile.runcall(lambda: [step() for _ in range(200)])
      print(f"-- cProfile, general, {model_name}, 200 steps")
      pstats.Stats(profile).sort_stats("tottime").print_stats(args.profile)


if __name__ == "__main__":
  main()
