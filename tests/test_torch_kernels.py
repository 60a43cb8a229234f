"""The hierarchical rule's Triton kernels (``lopt/architectures/hierarchical/triton_passes.py``) against its PyTorch
operations: the same steps to float32 rounding, through a learning-rate change and a state-dict reload. On the CPU
the kernels run in Triton's interpreter (a subprocess with TRITON_INTERPRET=1; skipped where Triton is not
installed, as in CI, or where its interpreter fails under NumPy >= 2.4); on a GPU (``-m gpu``) compiled, replayed
as CUDA graphs. The optimizer's side of a step skipped on the device runs everywhere, with a stand-in rule
(``DeviceSkippingRule``)."""

import io
import math
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

from lopt.torch import LearnedOptimizer

STEPS = 16
# As tests/test_general_pins.py: the displacement from the initial parameters, relative per tensor (float32
# rounding of reordered sums, through the LSTM and the clipping).
DISPLACEMENT_TOLERANCE = 2e-5
# Every kind of tensor the kernels index: matrices (several of one shape: one group; and one with rows longer than a
# block: a block spans at most two of them), a conv kernel factored over its axes 1 and 3, a tensor with axes after
# its factored ones, vectors longer than a block, a 0-d scalar.
SHAPES = [(37, 23), (37, 23), (3, 300), (3, 5, 3, 3), (2, 7, 5, 3), (23,), (23,), (700,), ()]


def model(device: str) -> list:
  generator = torch.Generator().manual_seed(0)
  return [torch.nn.Parameter((0.3 * torch.randn(s, generator=generator)).to(device)) for s in SHAPES]


def run(device: str, kernels: bool, decay: bool = False, name="general",
        tensors: bool = False) -> tuple[list, LearnedOptimizer]:
  """STEPS steps of general: growing gradients with a spike (the clipping), a NaN gradient at step 6 (skipped: on
  the device, with the kernels), a validation loss every third step, lr halved at step 8, and the optimizer rebuilt
  from its state dict at step 11. ``decay``: the vectors in a group of their own, with weight decay (two buckets:
  the verdict is computed before the update rather than inside it); ``name`` the learned optimizer (a name or a path);
  ``tensors``: the losses given as tensors on the device."""
  params = model(device)
  groups = [{"params": params[:5]}, {"params": params[5:], "weight_decay": 0.1}] if decay else params
  make = lambda: LearnedOptimizer(groups, name, num_steps=30, kernels=kernels)  # noqa: E731
  optimizer = make()
  generator = torch.Generator().manual_seed(1)
  for t in range(STEPS):
    if t == 8:
      optimizer.param_groups[0]["lr"] = 0.5
    if t == 11:
      saved = io.BytesIO()
      torch.save(optimizer.state_dict(), saved)
      saved.seek(0)
      optimizer = make()
      optimizer.load_state_dict(torch.load(saved))
    for p in params:
      p.grad = ((1 + 0.2 * t) * (30.0 if t == 4 else 1.0) * torch.randn(p.shape, generator=generator)).to(device)
    if t == 6:  # a step to skip (on the device where the kernels run)
      params[2].grad.view(-1)[5] = math.nan
    loss, valid_loss = 2.0 * np.exp(-0.05 * t), 2.2 if t % 3 == 0 else None
    if tensors:
      loss = torch.tensor(loss, device=device)
      valid_loss = None if valid_loss is None else torch.tensor(valid_loss, device=device)
    optimizer.step(loss=loss, valid_loss=valid_loss)
  assert optimizer.skipped_steps == 1
  return [p.detach().cpu() for p in params], optimizer


def worst_error(device: str, decay: bool = False, name="general", tensors: bool = False) -> float:
  """The largest relative displacement error between the kernels' run and the PyTorch operations' run."""
  eager, reference = run(device, kernels=False, decay=decay, name=name, tensors=tensors)
  fast, optimizer = run(device, kernels=True, decay=decay, name=name, tensors=tensors)
  assert optimizer.rule._constants[""].kernels
  # the skipped step left the global state alone, also where it was skipped on the device
  for name, value in reference.state["lopt_global"].items():
    assert torch.allclose(optimizer.state["lopt_global"][name], value, rtol=1e-6), name
  start = [p.detach().cpu() for p in model(device)]
  return max(float((a - b).norm() / (a - s).norm()) for a, b, s in zip(eager, fast, start))


INTERPRETER_NUMPY_BUG = "only 0-dimensional arrays can be converted to Python scalars"


def numpy_at_least(major: int, minor: int) -> bool:
  return tuple(int(part) for part in np.__version__.split(".")[:2]) >= (major, minor)


def test_kernels_match_pytorch_operations_in_the_interpreter():
  triton = pytest.importorskip("triton")
  result = subprocess.run([sys.executable, __file__], env={**os.environ, "TRITON_INTERPRET": "1"},
                          capture_output=True, text=True, timeout=600)
  if result.returncode and INTERPRETER_NUMPY_BUG in result.stderr and numpy_at_least(2, 4):
    # Triton's interpreter converts a runtime loop bound with int() of a 1-element array, which NumPy 2.4 refuses
    # (triton-lang/triton#9171); the compiled kernels are still checked on the GPU (-m gpu).
    pytest.skip(f"Triton {triton.__version__}'s interpreter fails under NumPy {np.__version__} "
                "(triton-lang/triton#9171)")
  assert result.returncode == 0, result.stderr[-3000:]
  errors = [float(x) for x in result.stdout.split()[-3:]]
  assert all(0 < error < DISPLACEMENT_TOLERANCE for error in errors), result.stdout  # (0: the kernels did not run)


@pytest.mark.gpu
def test_kernels_match_pytorch_operations_on_the_gpu():
  if not torch.cuda.is_available():
    pytest.skip("no CUDA device")
  assert worst_error("cuda") < DISPLACEMENT_TOLERANCE
  assert worst_error("cuda", decay=True) < DISPLACEMENT_TOLERANCE
  assert worst_error("cuda", tensors=True) < DISPLACEMENT_TOLERANCE
  _, optimizer = run("cuda", kernels=True)
  graphs = list(optimizer.rule._graphs.values())
  assert graphs and None not in graphs[0].graphs   # replayed as CUDA graphs


@pytest.mark.gpu
def test_kernels_take_tensors_beyond_a_grid_axis_limit():
  """Tensors with more blocks than CUDA allows on a grid's second and third axes (65535): a vector of 40M
  coordinates (78k blocks of 512) and a matrix of 1.1M rows (69k blocks of 16 rows in the row and column sums) step
  as the PyTorch operations do."""
  if not torch.cuda.is_available():
    pytest.skip("no CUDA device")
  shapes, results = [(40_000_000,), (1_100_000, 3)], []
  for kernels in (False, True):
    generator = torch.Generator(device="cuda").manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, device="cuda", generator=generator)) for s in shapes]
    start = [p.detach().clone() for p in params]
    optimizer = LearnedOptimizer(params, "general", kernels=kernels)
    for t in range(4):
      for p in params:
        p.grad = torch.randn(p.shape, device="cuda", generator=generator)
      optimizer.step(loss=1.0 / (t + 1))
    assert bool(optimizer.rule._graphs) == kernels
    results.append([p.detach() for p in params])
  for eager, fast, s in zip(*results, start):
    assert float((eager - fast).norm() / (eager - s).norm()) < DISPLACEMENT_TOLERANCE


@pytest.mark.gpu
def test_kernels_index_a_group_beyond_32_bits():
  """Three identical vectors of 400M coordinates, one group: their momenta hold 2.4B entries, beyond a 32-bit index
  (an LLM's same-shaped matrices add up to that). The last steps exactly as the first (34 GB of GPU memory)."""
  if not torch.cuda.is_available():
    pytest.skip("no CUDA device")
  n = 400_000_000
  first = torch.nn.Parameter(torch.linspace(-1, 1, n, device="cuda"))
  params = [first] + [torch.nn.Parameter(first.detach().clone()) for _ in range(2)]
  optimizer = LearnedOptimizer(params, "general")
  for t in range(3):
    g = torch.sin(torch.arange(n, device="cuda", dtype=torch.float32) * (1e-3 * (t + 1)))
    for p in params:
      p.grad = g.clone()
    optimizer.step(loss=1.0 / (t + 1))
  assert optimizer.rule._graphs and not torch.equal(first, torch.linspace(-1, 1, n, device="cuda"))
  assert torch.equal(params[2], first)


@pytest.mark.gpu
def test_kernels_fall_back_where_they_cannot_run():
  """A non-contiguous gradient or a bfloat16 bucket takes the PyTorch operations, with the same numbers."""
  if not torch.cuda.is_available():
    pytest.skip("no CUDA device")
  for dtype, transpose in ((torch.float32, True), (torch.bfloat16, False)):
    results = []
    for kernels in (False, True):
      p = torch.nn.Parameter(torch.ones(8, 6, device="cuda", dtype=dtype))
      optimizer = LearnedOptimizer([p], "general", kernels=kernels)
      for t in range(3):
        g = torch.linspace(-1, 1, 48, device="cuda", dtype=dtype).reshape(6, 8) * (t + 1)
        p.grad = g.t() if transpose else g.reshape(8, 6)
        optimizer.step(loss=1.0)
      results.append(p.detach().float().cpu())
      assert not optimizer.rule._graphs
    assert torch.equal(results[0], results[1])


class DeviceSkippingRule:
  """general's PyTorch rule claiming ``skips_on_device`` on the CPU (for CI, which has no Triton): given a verdict
  ``ok``, it steps and then undoes the step where ``ok`` is false -- what the kernels do by masking their writes --
  and with ``check`` it sets ``ok`` from the gradients itself. Everything else is the real rule's."""

  def __init__(self, rule):
    self.rule = rule

  def __getattr__(self, name):
    return getattr(self.rule, name)

  def skips_on_device(self, params):
    return True

  def start(self, key, params, states, lr, ok=None, check=False):
    self.rule.start(key, params, states, lr)

  def step(self, key, params, states, lr, ok=None, check=False):
    if check:
      ok.fill_(all(bool(p.grad.isfinite().all()) for p in params))
    saved = [p.detach().clone() for p in params], [{k: v.clone() for k, v in s.items()} for s in states]
    self.rule.step(key, params, states, lr)
    if ok is not None and not bool(ok):
      for p, value in zip(params, saved[0]):
        p.data.copy_(value)
      for state, values in zip(states, saved[1]):
        for name, value in values.items():
          state[name].copy_(value)


def test_a_step_skipped_on_the_device_is_undone_and_counted():
  """The optimizer's side of the device verdict, on the CPU: with a rule that skips on the device, a NaN gradient at
  step 5 of 12 is counted (``skipped_steps`` and ``state_dict`` settle it), its ``begin_step`` is undone and the
  parameters end as with the verdict read on the host -- for one bucket (the rule checks), two groups with weight
  decay (the optimizer's verdict) and losses given as tensors."""
  for decay, tensors in ((False, False), (True, False), (False, True)):
    results = []
    for on_device in (False, True):
      params = model("cpu")
      groups = [{"params": params[:5]}, {"params": params[5:], "weight_decay": 0.1}] if decay else params
      optimizer = LearnedOptimizer(groups, "general", num_steps=20, kernels=False)
      if on_device:
        optimizer.rule = DeviceSkippingRule(optimizer.rule)
      generator = torch.Generator().manual_seed(1)
      for t in range(12):
        for p in params:
          p.grad = (1 + 0.1 * t) * torch.randn(p.shape, generator=generator)
        if t == 5:
          params[1].grad.view(-1)[3] = math.inf
        loss = 2.0 * np.exp(-0.1 * t)
        optimizer.step(loss=torch.tensor(loss) if tensors else loss, valid_loss=1.5 if t % 4 == 0 else None)
        if t == 5:
          if on_device:
            assert optimizer._pending is not None   # left on the device: nothing read yet
          state = optimizer.state_dict()
          assert state["lopt"]["skipped_steps"] == 1 and int(state["state"]["lopt_global"]["step"]) == 5
      assert optimizer.skipped_steps == 1
      results.append(([p.detach().clone() for p in params], optimizer.state["lopt_global"]))
    (host, host_global), (device, device_global) = results
    for a, b in zip(host, device):
      torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    for name, value in host_global.items():
      torch.testing.assert_close(device_global[name], value)


def test_kernels_option_is_checked_and_changes_nothing_on_the_cpu():
  with pytest.raises(ValueError, match="kernels must be None"):
    LearnedOptimizer([torch.nn.Parameter(torch.zeros(2))], "general", kernels="yes")
  results = []
  for kernels in (None, True, False):
    p = torch.nn.Parameter(torch.linspace(-1, 1, 12).reshape(3, 4))
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")  # (kernels=True where Triton is missing warns: tested below)
      optimizer = LearnedOptimizer([p], "general", kernels=kernels)
    for t in range(3):
      p.grad = torch.cos(torch.arange(12.0) + t).reshape(3, 4)
      optimizer.step(loss=1.0)
    results.append(p.detach().clone())
  assert torch.equal(results[0], results[1]) and torch.equal(results[0], results[2])


def test_kernels_warn_where_they_cannot_be_used():
  from lopt.architectures.hierarchical.torch import _missing_triton
  optimizer = LearnedOptimizer([torch.nn.Parameter(torch.zeros(2))], "general", kernels=False)
  rule = optimizer.rule
  if _missing_triton():
    with pytest.warns(UserWarning, match="Triton cannot be imported"):
      rule.enable_kernels(True, warn=True)
  rule.values["hidden_size"] = 16  # wider than the kernels' MLP
  with pytest.warns(UserWarning, match="at most 8"):
    rule.enable_kernels(True, warn=True)
  assert not rule._constants[""].kernels


def other_optimizer(directory) -> str:
  """A hierarchical optimizer of other sizes than general's -- three momenta, the direct step head, an LSTM of 16
  units, 2 feedback outputs, 3 context units, 5 hidden units, a log step bounded at 1 (the random log steps climb
  to it within the run) -- with random meta-parameters, saved."""
  import jax

  from lopt.architectures.hierarchical.optimizer import HierarchicalOptimizer
  from lopt.io.checkpoint import save_optimizer
  optimizer = HierarchicalOptimizer(momentum_decays=(0.5, 0.9, 0.99), direct_step=True, lstm_size=16,
                                    feedback_size=2, context_size=3, hidden_size=5, max_log_step=1.0)
  rng = np.random.default_rng(3)
  theta = jax.tree.map(lambda x: np.asarray(x + 0.3 * rng.normal(size=x.shape), np.float32),
                       optimizer.init(jax.random.key(0)))
  return str(save_optimizer(os.path.join(directory, "other"), optimizer, theta))


if __name__ == "__main__":  # the interpreter check, run by the test above in a process with TRITON_INTERPRET=1
  import tempfile
  with tempfile.TemporaryDirectory() as directory:
    print(worst_error("cpu"), worst_error("cpu", decay=True),
          worst_error("cpu", name=other_optimizer(directory), tensors=True))
