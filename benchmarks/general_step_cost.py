"""The `general` optimizer's step against Adam's at N parameters, in JAX and in PyTorch, side by side.

  python benchmarks/general_step_cost.py [--params 10_000_000 [100_000_000 ...]] [--repeats 50]
                                         [--compile MODE ...] [--frameworks jax torch] [--kernels]
                                         [--group-limit N] [--triton auto|on|off ...] [--tensor-loss]
                                         [--jax-passes pallas|xla ...] [--layers dense|conv] [--profile N]

The model is a list of square weight matrices and bias vectors adding up to about --params scalars (--layers conv:
3 x 3 convolution kernels laid out (H, W, in, out), with biases); gradients are random and fixed. JAX: one jitted
step (update + apply_updates, state donated) of optax.adam(1e-3) and of lopt.load("general").as_optax() with the loss
passed as ``value=``. PyTorch: torch.optim.Adam (fused where the
device supports it, else foreach) and lopt.torch.LearnedOptimizer(params, "general") with ``step(loss=...)``.
Prints ms per step (median of --repeats after warm-up) and the ratio to Adam, as JSON lines, one per framework,
size and compile mode. --compile runs the PyTorch optimizer through torch.compile (``none`` for eager, ``default``,
a torch.compile mode such as ``reduce-overhead``, or a JSON dict of its keyword arguments); several modes give a
line each; the compilation happens in the warm-up. --kernels adds what each step launches: for JAX, the compiled
step's top-level fusions, copies and library calls (custom-call, dot) and the bytes their operands and results
take (an upper bound on the memory traffic: every kernel reads its operands and writes its result once); for
PyTorch on a GPU, the kernels one step launches (torch.profiler). --group-limit overrides the JAX step's
``GROUP_LIMIT`` (on accelerators, tensors of one shape with up to N coordinates are stacked and stepped as one batch),
to compare batching choices on one machine. --triton on/off forces the PyTorch optimizer's hand-written Triton
kernels on or off (``kernels=``; auto, the default, uses them on a GPU when no --compile is given). --tensor-loss
passes PyTorch's loss as a 0-d tensor on the device (as a training loop does) rather than a number. --jax-passes
xla makes the JAX step's large matrices take XLA's passes instead of the Pallas kernels (on GPUs; several: a line
each, to compare them on one machine). --profile N adds the JAX step's N costliest GPU kernels (µs per step and
launches per step, from a jax.profiler trace of 10 steps) and its total kernel time.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import re
import time

_BYTES = {"f64": 8, "f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "pred": 1, "s64": 8, "u8": 1, "s8": 1}


def shapes_for(num_params: int, layers: str = "dense") -> list[tuple[int, ...]]:
  """8 layers with biases, about num_params scalars in all: square matrices, or 3 x 3 convolution kernels with as
  many input as output channels."""
  if layers == "conv":
    channels = int(math.sqrt(num_params / 72))
    return [s for _ in range(8) for s in ((3, 3, channels, channels), (channels,))]
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


def _array_bytes(text: str) -> int:
  """Bytes of every array type (``f32[1118,1118]{1,0}``) in an HLO type string."""
  total = 0
  for dtype, dims in re.findall(r"\b(\w+)\[([\d,]*)\]", text):
    if dtype in _BYTES:
      total += _BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d)
  return total


def hlo_kernels(compiled_text: str) -> dict:
  """What the entry computation of an optimized HLO module launches: fusions, copies and library calls (counts),
  and the bytes of their results and operands (the memory traffic if every kernel reads its operands and writes
  its result once)."""
  entry = compiled_text[compiled_text.index("\nENTRY"):]
  shapes, counts, traffic = {}, {"fusion": 0, "copy": 0, "custom-call": 0, "dot": 0}, 0
  for line in entry.splitlines():
    match = re.match(r"\s*(?:ROOT )?(%[\w.\-]+) = (.+?) ([\w\-]+)\((.*)$", line)
    if not match:
      continue
    name, result, op, rest = match.groups()
    shapes[name] = _array_bytes(result)
    if op in counts:
      counts[op] += 1
      operands = re.findall(r"(%[\w.\-]+)", rest.split("), ")[0])
      traffic += shapes[name] + sum(shapes.get(o, 0) for o in operands)
  return {**{f"{k}s": v for k, v in counts.items()}, "traffic_mb": round(traffic / 1e6, 1)}


def gpu_kernel_times(run, steps: int, top: int) -> dict:
  """The GPU kernels of ``steps`` calls of ``run`` (which waits for its result) from a jax.profiler trace: total µs
  per step, launches per step, and the ``top`` costliest kernels as {name: [µs per step, launches per step]}."""
  import collections
  import glob
  import gzip
  import tempfile
  import jax
  with tempfile.TemporaryDirectory() as folder:
    with jax.profiler.trace(folder, create_perfetto_trace=True):
      for _ in range(steps):
        run()
    events = json.load(gzip.open(glob.glob(f"{folder}/**/*.trace.json.gz", recursive=True)[0]))["traceEvents"]
  devices = {e["pid"] for e in events
             if e.get("ph") == "M" and e.get("name") == "process_name" and "/device:GPU" in e["args"]["name"]}
  total, launches = collections.Counter(), collections.Counter()
  for e in events:
    if e.get("ph") == "X" and e["pid"] in devices:
      total[e["name"]] += e["dur"]
      launches[e["name"]] += 1
  return {"kernel_us": round(sum(total.values()) / steps, 1), "launches": sum(launches.values()) / steps,
          "top": {name: [round(t / steps, 1), launches[name] / steps] for name, t in total.most_common(top)}}


def jax_times(shapes, repeats: int, kernels: bool = False, passes: str = "pallas", profile: int = 0) -> dict:
  import jax
  import jax.numpy as jnp
  import optax
  import lopt
  from lopt.architectures.hierarchical import optimizer
  optimizer.PALLAS = "auto" if passes == "pallas" else "off"
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
    if kernels:
      out[f"{name}_kernels"] = hlo_kernels(step.lower(state[0], state[1], grads).compile().as_text())

    def run():
      state[0], state[1] = step(state[0], state[1], grads)
    out[name] = median_ms(run, repeats, lambda: jax.block_until_ready(state[0]))
    if profile and jax.default_backend() == "gpu":
      out[f"{name}_profile"] = gpu_kernel_times(lambda: (run(), jax.block_until_ready(state[0])), 10, profile)
  return out


def torch_times(shapes, repeats: int, compile=False, kernels: bool = False, triton=None,
                tensor_loss: bool = False) -> dict:
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
      opt = LearnedOptimizer(params, "general", compile=compile, kernels=triton)
      loss = torch.tensor(1.0, device=device) if tensor_loss else 1.0
      run = lambda: opt.step(loss=loss)  # noqa: E731
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    out[name] = median_ms(run, repeats, sync)
    if kernels and device == "cuda":
      from torch.profiler import ProfilerActivity, profile
      with profile(activities=[ProfilerActivity.CUDA]) as prof:
        run()
        sync()
      out[f"{name}_kernels"] = sum(e.count for e in prof.key_averages() if e.device_type.name == "CUDA")
  return out


def compile_mode(text: str | None):
  """--compile's value as LearnedOptimizer's ``compile`` argument."""
  if text is None or text == "none":
    return False
  if text == "default":
    return True
  return json.loads(text) if text.startswith("{") else text


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--params", type=int, nargs="+", default=[10_000_000])
  parser.add_argument("--repeats", type=int, default=50)
  parser.add_argument("--compile", nargs="+", default=[None],
                      help="torch.compile the PyTorch optimizer: none, default, a mode, or JSON (several: a line each)")
  parser.add_argument("--frameworks", nargs="+", default=["jax", "torch"], choices=["jax", "torch"])
  parser.add_argument("--kernels", action="store_true", help="count the kernels (and JAX's HLO traffic) of a step")
  parser.add_argument("--group-limit", type=int, help="the JAX step's GROUP_LIMIT (default: the optimizer's own)")
  parser.add_argument("--triton", nargs="+", default=["auto"], choices=["auto", "on", "off"],
                      help="the PyTorch optimizer's hand-written kernels (LearnedOptimizer's kernels=None/True/False; "
                           "several: a line each)")
  parser.add_argument("--tensor-loss", action="store_true", help="PyTorch: the loss as a device tensor")
  parser.add_argument("--jax-passes", nargs="+", default=["pallas"], choices=["pallas", "xla"],
                      help="the JAX step's passes over large matrices: Pallas kernels (GPUs) or XLA's fusions")
  parser.add_argument("--layers", choices=["dense", "conv"], default="dense",
                      help="the model's layers: square matrices or 3 x 3 convolution kernels")
  parser.add_argument("--profile", type=int, default=0, metavar="N",
                      help="JAX on a GPU: the step's N costliest kernels and its kernel time, from a profiler trace")
  args = parser.parse_args()
  if args.group_limit is not None:
    from lopt.architectures.hierarchical import optimizer
    optimizer.GROUP_LIMIT = args.group_limit
  import jax
  import torch
  common = {"date": time.strftime("%Y-%m-%d"), "python": platform.python_version(), "jax": jax.__version__,
            "torch": torch.__version__, "jax_device": str(jax.devices()[0].device_kind),
            "torch_device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}
  for num_params in args.params:
    shapes = shapes_for(num_params, args.layers)
    count = sum(math.prod(s) for s in shapes)
    runs = []
    if "jax" in args.frameworks:
      for passes in args.jax_passes:
        extra = ({} if args.group_limit is None else {"group_limit": args.group_limit}) | (
            {"jax_passes": passes} if args.jax_passes != ["pallas"] else {})
        runs.append(("jax", extra, lambda passes=passes: jax_times(shapes, args.repeats, args.kernels, passes,
                                                                            args.profile)))
    if "torch" in args.frameworks:
      for mode in args.compile:
        for triton in args.triton:
          extra = ({"compile": mode} if mode not in (None, "none") else {}) | (
              {"triton": triton} if triton != "auto" else {}) | ({"tensor_loss": True} if args.tensor_loss else {})
          runs.append(("torch", extra, lambda mode=mode, triton=triton: torch_times(
              shapes, args.repeats, compile_mode(mode), args.kernels, {"auto": None, "on": True, "off": False}[triton],
              args.tensor_loss)))
    for framework, extra, measure in runs:
      times = measure()
      kernels = {k: v for k, v in times.items() if k.endswith(("_kernels", "_profile"))}
      extra = extra | ({"layers": args.layers} if args.layers != "dense" else {})
      print(json.dumps({"params": count, **common, "framework": framework, **extra,
                        "adam_ms": round(times["adam"], 4), "general_ms": round(times["general"], 4),
                        "ratio": round(times["general"] / times["adam"], 2), **kernels}), flush=True)


if __name__ == "__main__":
  main()
