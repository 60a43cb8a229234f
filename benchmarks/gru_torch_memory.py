"""A 256-unit GRU optimizer step on about 10M parameters in PyTorch on a GPU: time and peak memory above the parameters.

  python benchmarks/gru_torch_memory.py [--hidden 256] [--params 10_000_000]

The GRU keeps a (N, hidden) state, 256 floats per parameter; its step runs in chunks of coordinates
(``lopt.architectures.gru.torch``), so the transient memory stays a few (chunk, hidden) blocks. Prints one JSON line
(recorded: benchmarks/results/gru_torch_memory_h200.json). Needs CUDA.
"""

import argparse
import json
import time

import jax
import numpy as np
import torch

import lopt
from lopt.optimizers import GRUOptimizer
from lopt.torch import LearnedOptimizer


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--hidden", type=int, default=256)
  parser.add_argument("--params", type=int, default=10_000_000)
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args()
  optimizer = GRUOptimizer(hidden_size=args.hidden)
  trained = lopt.TrainedOptimizer(optimizer, jax.tree.map(np.asarray, optimizer.init(jax.random.key(0))), {})
  width = int((args.params / 8) ** 0.5)
  params = [torch.nn.Parameter(torch.randn(width, width, device="cuda") * 0.05) for _ in range(8)]
  for p in params:
    p.grad = torch.randn_like(p) * 1e-3
  torch.cuda.reset_peak_memory_stats()
  base = torch.cuda.memory_allocated()
  learned = LearnedOptimizer(params, trained)
  for _ in range(2):
    learned.step()
  torch.cuda.synchronize()
  start = time.perf_counter()
  for _ in range(args.repeats):
    learned.step()
  torch.cuda.synchronize()
  print(json.dumps({"gru_hidden": args.hidden, "params": 8 * width * width, "device": torch.cuda.get_device_name(),
                    "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
                    "ms_per_step": 1e3 * (time.perf_counter() - start) / args.repeats,
                    "peak_gib_above_params": (torch.cuda.max_memory_allocated() - base) / 2**30,
                    "state_gib": (torch.cuda.memory_allocated() - base) / 2**30}))


if __name__ == "__main__":
  main()
