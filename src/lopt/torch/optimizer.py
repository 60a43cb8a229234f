"""``LearnedOptimizer``: a trained lopt checkpoint as a ``torch.optim.Optimizer``, in pure PyTorch.

Per parameter group and per (device, dtype), every gradient is flattened into one (N,) vector, the GRU runs once on
the (N, H) hidden states, and the (N,) updates are split back (views, no copies) and added with one foreach call.
The state of parameter p is ``hidden`` of shape p.shape + (H,) (the layout of the JAX optimizer's state) and a
``step`` count; between steps the per-parameter ``hidden`` tensors are views into the last step's (N, H) output,
so the next step gathers them without a copy.
"""

from __future__ import annotations

import os

import torch

from lopt.checkpoint import CheckpointError, check_theta
from lopt.gru_spec import GRUSpec, check_optimizer_fields
from lopt.torch import gru
from lopt.torch.checkpoint import read_trained_optimizer


class LearnedOptimizer(torch.optim.Optimizer):
  """A trained component-wise GRU optimizer.

  Args:
    params: parameters or parameter groups (dicts), as for any ``torch.optim.Optimizer``.
    optimizer: a trained-optimizer directory, a run directory holding ``optimizer/``, a name looked up as described in
      ``lopt.trained`` (``$LOPT_OPTIMIZER_PATH``, ``~/.cache/lopt/optimizers``), or an already loaded
      ``lopt.TrainedOptimizer``.
    lr: multiplies the learned update: p <- p + lr * dx. 1.0 reproduces the optimizer as trained (and the JAX
      transformation); learning-rate schedulers scale it like any other optimizer's ``lr``.

  ``step()`` changes parameters exactly as ``lopt.as_optax`` followed by ``optax.apply_updates`` does (to rounding).
  Raises ``CheckpointError`` naming the file, field or tensor, and expected versus found, when the checkpoint is
  missing or does not match.
  """

  def __init__(self, params, optimizer, lr: float = 1.0):
    if not isinstance(lr, (int, float)) or isinstance(lr, bool) or not lr >= 0.0:
      raise ValueError(f"LearnedOptimizer: lr must be a non-negative number, got {lr!r}")
    if isinstance(optimizer, (str, os.PathLike)):
      spec, tensors, config, _ = read_trained_optimizer(optimizer)
    elif hasattr(optimizer, "optimizer") and hasattr(optimizer, "theta"):  # a lopt.TrainedOptimizer
      spec = check_optimizer_fields(optimizer.optimizer.config(), type(optimizer).__name__)
      tensors = {name: torch.as_tensor(_to_numpy(value)) for name, value in optimizer.theta.items()}
      config = dict(getattr(optimizer, "config", {}) or {})
      _check_tensors(spec, tensors, type(optimizer).__name__)
    else:
      raise TypeError(f"LearnedOptimizer: optimizer must be a path, a name or a lopt.TrainedOptimizer, got "
                      f"{type(optimizer).__name__}")
    self.spec: GRUSpec = spec
    self.checkpoint_config: dict = config
    # Kept on the CPU in the stored dtype; converted once per (device, dtype) that parameters use.
    self._tensors = {name: torch.as_tensor(value).clone() for name, value in tensors.items()}
    self._theta_cache: dict = {}
    self._flat_hidden: dict = {}
    super().__init__(params, {"lr": lr})

  # -- the step ---------------------------------------------------------------------------------------------------

  @torch.no_grad()
  def step(self, closure=None):
    """One learned update of every parameter that has a gradient; returns ``closure()``'s loss when given."""
    loss = None
    if closure is not None:
      with torch.enable_grad():
        loss = closure()
    for group_index, group in enumerate(self.param_groups):
      buckets: dict = {}
      for p in group["params"]:
        if p.grad is None:
          continue
        if p.grad.is_sparse:
          raise RuntimeError("LearnedOptimizer does not support sparse gradients")
        if not p.is_floating_point():
          raise RuntimeError(f"LearnedOptimizer: parameters must be floating point, found {p.dtype}")
        buckets.setdefault((p.device, p.dtype), []).append(p)
      for (device, dtype), params in buckets.items():
        self._step_bucket((group_index, device, dtype), params, group["lr"], self._theta(device, dtype))
    return loss

  def _step_bucket(self, key, params: list, lr: float, theta: dict) -> None:
    """The GRU on all coordinates of ``params`` (same group, device and dtype) at once."""
    size, spec = self.spec.hidden_size, self.spec
    gradients = torch.cat([p.grad.reshape(-1) for p in params])                    # (N,)
    hidden = self._gather_hidden(key, params, theta["initial_state"])               # (N, H)
    new_hidden = gru.cell(theta, hidden, gradients, spec.input_scale, spec.input_encoding)
    updates = gru.readout(theta, new_hidden, spec.output_scale)                     # (N,)
    sizes = [p.numel() for p in params]
    torch._foreach_add_(params, [u.view_as(p) for u, p in zip(updates.split(sizes), params)], alpha=lr)
    steps = []
    for p, h in zip(params, new_hidden.split(sizes)):
      state = self.state[p]
      state["hidden"] = h.view(*p.shape, size)  # a view into new_hidden: the next step gathers it for free
      steps.append(state.setdefault("step", torch.zeros((), dtype=torch.float32)))
    torch._foreach_add_(steps, 1.0)
    self._flat_hidden[key] = new_hidden

  def _gather_hidden(self, key, params: list, initial_state: torch.Tensor) -> torch.Tensor:
    """(N, H) hidden states of ``params`` in order: the previous step's buffer when the per-parameter states are
    still its consecutive views (the usual case), else a concatenation (first step, after load_state_dict, or a
    change in which parameters have gradients). New parameters start from the learned initial state h0."""
    size = self.spec.hidden_size
    flat = self._flat_hidden.get(key)
    if flat is not None and self._are_views_of(flat, params):
      return flat
    rows = []
    for p in params:
      hidden = self.state[p].get("hidden")
      rows.append(initial_state.expand(p.numel(), size) if hidden is None else hidden.reshape(-1, size))
    return torch.cat(rows)

  def _are_views_of(self, flat: torch.Tensor, params: list) -> bool:
    offset, row_bytes = 0, flat.stride(0) * flat.element_size()
    for p in params:
      hidden = self.state[p].get("hidden")
      if hidden is None or hidden._base is not flat or hidden.data_ptr() != flat.data_ptr() + offset * row_bytes:
        return False
      offset += p.numel()
    return offset == flat.shape[0]

  def _theta(self, device: torch.device, dtype: torch.dtype) -> dict:
    key = (device, dtype)
    if key not in self._theta_cache:
      self._theta_cache[key] = gru.prepare_theta(self._tensors, dtype, device)
    return self._theta_cache[key]

  # -- state dicts ------------------------------------------------------------------------------------------------

  def state_dict(self):
    """torch's state dict, plus ``"lopt"``: the architecture and weights checksum, checked on load."""
    state = super().state_dict()
    state["lopt"] = {"optimizer": self.spec.config(), "weights_sha256": self.checkpoint_config.get("weights_sha256")}
    return state

  def load_state_dict(self, state_dict) -> None:
    """Loads a state dict from ``state_dict()``; raises ValueError when it was written by another learned optimizer
    or its hidden states do not have the shapes this optimizer's parameters need."""
    state_dict = dict(state_dict)
    saved = state_dict.pop("lopt", None)
    if saved is not None:
      if saved.get("optimizer") != self.spec.config():
        raise ValueError(f"LearnedOptimizer.load_state_dict: the state was written by optimizer "
                         f"{saved.get('optimizer')}, this one is {self.spec.config()}")
      mine = self.checkpoint_config.get("weights_sha256")
      if saved.get("weights_sha256") != mine:
        raise ValueError(f"LearnedOptimizer.load_state_dict: the state was written with weights SHA-256 "
                         f"{saved.get('weights_sha256')}, this optimizer's weights are {mine}")
    super().load_state_dict(state_dict)
    self._flat_hidden.clear()
    for group in self.param_groups:
      for index, p in enumerate(group["params"]):
        hidden = self.state[p].get("hidden") if p in self.state else None
        if hidden is not None and tuple(hidden.shape) != (*p.shape, self.spec.hidden_size):
          raise ValueError(f"LearnedOptimizer.load_state_dict: hidden state of parameter {index} has shape "
                           f"{tuple(hidden.shape)}, expected {(*p.shape, self.spec.hidden_size)}")


def _to_numpy(value):
  import numpy as np
  return np.asarray(value)


def _check_tensors(spec: GRUSpec, tensors: dict, where: str) -> None:
  check_theta({k: v.numpy() for k, v in tensors.items()}, spec, where)


__all__ = ["LearnedOptimizer", "CheckpointError"]
