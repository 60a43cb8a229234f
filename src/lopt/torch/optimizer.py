"""``LearnedOptimizer``: a trained lopt optimizer of any registered architecture as a ``torch.optim.Optimizer``, in
pure PyTorch.

The architecture's spec (``lopt.architectures``) names its PyTorch rule; the rule does the arithmetic, this class
does what every torch optimizer does: parameter groups, ``lr``, buckets per (device, dtype), closures and state dicts.

A rule is constructed as ``rule(values, tensors)`` and has

  state_shapes(p) -> {name: shape}      every state entry of parameter p (loaded state dicts are checked against it)
  reset()                               after a state dict was loaded: forget anything cached between steps
  step(key, params, states, lr)         p <- p + lr * update for one bucket (same group, device and dtype), in place

and optionally

  init_state(p) -> dict                 p's initial state, taken before the step changes anything (weight decay
                                        included), as a JAX optimizer's ``init_state`` sees the parameters before
                                        the first update; without it ``step`` creates states on first use
  state_dtypes(p) -> {name: dtype}      entries not kept in p's dtype: torch's ``load_state_dict`` casts every
                                        floating state tensor to p's dtype, these are re-read from the state dict
  begin_step(state, *, loss, valid_loss, num_steps)
                                        once per optimizer step that updates anything (not for a step skipped
                                        on the host; one skipped on the device has its changes undone), before the
                                        buckets: the losses (None, or Python floats holding float32 values), the
                                        horizon hint, and ``state``, the optimizer-wide dict the rule keeps its
                                        global state in (``self.state["lopt_global"]``, saved in state dicts as is)
  start(key, params, states, lr, **kw)  called for every bucket before ``begin_step`` (after weight decay), then
                                        ``step`` as usual: launches what needs no losses, so that the device works
                                        while the host computes the global state
  skips_on_device(params) -> bool       whether ``step`` of this bucket takes ``ok=``, the step's verdict on its
                                        gradients as a 0-d bool tensor on the device, changing nothing where it is
                                        false: then the optimizer never waits for the device (below)

(the gru and mlp rules need none of these: they ignore losses and horizon, as their JAX optimizers do).

A step whose gradients are not all finite is skipped whole. Usually the optimizer reads that verdict on the host (one
synchronization per step). Where every bucket is on one device and its rule ``skips_on_device`` (and the losses are
numbers or tensors on that device), the verdict stays on the device: the rule skips the step there, and the
optimizer reads it when the next step begins (long done by then) -- undoing that step's ``begin_step`` on the global
state and counting it -- or when ``skipped_steps`` or ``state_dict`` is read. Losses given as tensors are then read
after ``start`` launched the device's first work, so that reading them waits for the backward pass, not the update.
"""

from __future__ import annotations

import copy
import math
import numbers
import os
import warnings
from typing import NamedTuple

import torch

from lopt.architectures.spec import ArchitectureConfig, resolve
from lopt.float32 import to_float32
from lopt.io.checkpoint import CheckpointError, check_theta
from lopt.torch.checkpoint import read_trained_optimizer

GLOBAL_STATE = "lopt_global"  # the key of the rule's optimizer-wide state in ``LearnedOptimizer.state``


class LearnedOptimizer(torch.optim.Optimizer):
  """A trained learned optimizer.

  Args:
    params: parameters or parameter groups (dicts), as for any ``torch.optim.Optimizer``.
    optimizer: a trained-optimizer directory, a run directory holding ``optimizer/``, a name looked up as described in
      ``lopt.trained`` (``$LOPT_OPTIMIZER_PATH``, ``~/.cache/lopt/optimizers``, then the shipped optimizers), or an
      already loaded ``lopt.TrainedOptimizer``.
    lr: multiplies the learned update: p <- p + lr * dx. 1.0 reproduces the optimizer as trained (and the JAX
      transformation); learning-rate schedulers scale it like any other optimizer's ``lr``.
    weight_decay: decoupled weight decay, applied first: p <- p (1 - lr * weight_decay), then the learned update of
      the decayed parameters (as AdamW decays before its step). 0 by default.
    num_steps: the horizon hint, the number of steps the run will take (None: unknown), for architectures whose
      update reads it (hierarchical); kept in the state dict and restored by ``load_state_dict`` (set
      ``optimizer.num_steps`` after loading to change it).
    compile: run the update through ``torch.compile`` -- True, a ``torch.compile`` mode (``"reduce-overhead"``: CUDA
      graphs), or a dict of its keyword arguments -- for architectures whose rule supports it (hierarchical): far
      fewer kernel launches on a GPU, after a compilation at the first step of each parameter layout (minutes for a
      large model). Without a compiler (Triton for CUDA, a C++ compiler for the CPU), or where compilation fails,
      the rule warns once and runs eagerly.
    kernels: run the per-coordinate work as hand-written Triton kernels, for architectures whose rule has them
      (hierarchical: its two passes over the coordinates, float32 tensors on a CUDA device) -- None (the default):
      where Triton is installed (PyTorch's CUDA builds ship it) and no ``compile`` is asked for; True: the same, with a
      warning where they cannot run; False: never. Same numbers as without, to float32 rounding (sums in another
      order); several times fewer kernel launches than the eager update.

  ``step(closure=None, *, loss=None, valid_loss=None)``: the training loss is ``closure()``'s result when a closure
  is given, else ``loss`` (a number or a one-element tensor); ``valid_loss`` a validation loss (None or non-finite:
  none this step). Architectures that do not read losses (gru, mlp) ignore both.

  ``step()`` changes parameters exactly as ``lopt.load(...).as_optax(learning_rate=lr, weight_decay=...)`` followed
  by ``optax.apply_updates`` does (to rounding). A step in which any gradient is not finite is skipped whole -- no
  parameter and no state changes -- and counted in ``skipped_steps`` (kept in the state dict). Parameter groups
  accept ``params``, ``lr`` and ``weight_decay``; any other key is refused rather than silently ignored. Raises
  ``CheckpointError`` naming the file, field or tensor, and expected versus found, when the checkpoint is missing or
  does not match.
  """

  GROUP_KEYS = ("params", "lr", "weight_decay", "param_names")  # param_names: torch's own, for named parameters

  def __init__(self, params, optimizer, lr: float = 1.0, weight_decay: float = 0.0, num_steps: int | None = None,
               compile: bool | str | dict = False, kernels: bool | None = None):  # noqa: A002 -- torch's word
    _check_rate("lr", lr)
    _check_rate("weight_decay", weight_decay)
    if not isinstance(compile, (bool, str, dict)):
      raise ValueError(f"LearnedOptimizer: compile must be a bool, a torch.compile mode or a dict of its keyword "
                       f"arguments, got {compile!r}")
    if kernels is not None and not isinstance(kernels, bool):
      raise ValueError(f"LearnedOptimizer: kernels must be None (automatic), True or False, got {kernels!r}")
    self.num_steps = num_steps
    self._pending = None  # a step whose verdict is still on the device: (pinned flag, event, global state before)
    self._host_verdict = None  # (a pinned host flag, a CUDA event): where the verdict is read, reused
    self._device_verdict = None  # the buffer a rule sets the verdict in (``check``), reused
    self._host_losses = None  # (a pinned (2,) float32 buffer, a CUDA event): where tensor losses are read, reused
    self.skipped_steps = 0
    if isinstance(optimizer, (str, os.PathLike)):
      architecture, tensors, config, _ = read_trained_optimizer(optimizer)
    elif hasattr(optimizer, "optimizer") and hasattr(optimizer, "theta"):  # a lopt.TrainedOptimizer
      from lopt.io.checkpoint import architecture_config
      from lopt.pytree import flatten_by_path
      where = type(optimizer).__name__
      architecture = architecture_config(optimizer.optimizer.config(), where)
      tensors = {name: _to_numpy(value) for name, value in flatten_by_path(optimizer.theta).items()}
      check_theta(tensors, architecture, where)
      config = dict(getattr(optimizer, "config", {}) or {})
    else:
      raise TypeError(f"LearnedOptimizer: optimizer must be a path, a name or a lopt.TrainedOptimizer, got "
                      f"{type(optimizer).__name__}")
    rule_class = architecture.spec.torch_class
    if rule_class is None:
      raise CheckpointError(f"architecture {architecture.name!r} has no PyTorch implementation")
    self.architecture: ArchitectureConfig = architecture
    self.checkpoint_config: dict = config
    # Kept on the CPU in the stored dtype; the rule converts them once per (device, dtype) that parameters use.
    self.rule = resolve(rule_class)(architecture.values,
                                    {name: torch.as_tensor(value).clone() for name, value in tensors.items()})
    if compile:
      enable_compile = getattr(self.rule, "enable_compile", None)
      if enable_compile is None:
        warnings.warn(f"LearnedOptimizer: architecture {architecture.name!r} has no compiled update; "
                      f"compile={compile!r} ignored", stacklevel=2)
      else:
        enable_compile(None if compile is True else compile)
    enable_kernels = getattr(self.rule, "enable_kernels", None)
    if kernels and enable_kernels is None:
      warnings.warn(f"LearnedOptimizer: architecture {architecture.name!r} has no hand-written kernels; "
                    f"kernels=True ignored", stacklevel=2)
    elif enable_kernels is not None:
      enable_kernels(kernels if kernels is not None else not compile, warn=bool(kernels))
    super().__init__(params, {"lr": lr, "weight_decay": weight_decay})

  def add_param_group(self, param_group: dict) -> None:
    """torch's ``add_param_group``, refusing keys this optimizer would ignore (a typo such as ``weight_decy``, or a
    setting of another optimizer such as ``momentum``) and checking ``lr`` and ``weight_decay``."""
    unknown = sorted(set(param_group) - set(self.GROUP_KEYS))
    if unknown:
      raise ValueError(f"LearnedOptimizer: parameter group {len(self.param_groups)} has unknown key(s) {unknown}; "
                       f"a group takes {', '.join(self.GROUP_KEYS[:3])}")
    for name in ("lr", "weight_decay"):
      if name in param_group:
        _check_rate(f"parameter group {len(self.param_groups)}: {name}", param_group[name])
    super().add_param_group(param_group)

  @property
  def num_steps(self) -> int | None:
    """The horizon hint (None: unknown)."""
    return self._num_steps

  @num_steps.setter
  def num_steps(self, value) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1):
      raise ValueError(f"LearnedOptimizer: num_steps must be None or a positive integer, got {value!r}")
    self._num_steps = None if value is None else int(value)

  @property
  def skipped_steps(self) -> int:
    """The steps skipped because a gradient was not finite (waits for the last step's verdict when it is still on
    the device)."""
    self._settle()
    return self._skipped_steps

  @skipped_steps.setter
  def skipped_steps(self, value: int) -> None:
    self._settle()
    self._skipped_steps = int(value)

  @property
  def spec(self) -> ArchitectureConfig:
    """The architecture and its fields (``spec.hidden_size`` for a GRU); lopt 0.1's name for ``architecture``."""
    return self.architecture

  @torch.no_grad()
  def step(self, closure=None, *, loss=None, valid_loss=None):
    """One learned update of every parameter that has a gradient; returns ``closure()``'s loss when given.

    loss: the training loss when there is no closure; valid_loss: a validation loss (class docstring)."""
    result = None
    if closure is not None:
      if loss is not None:
        raise ValueError("LearnedOptimizer.step: give the training loss as the closure's result or as loss=, "
                         "not both")
      with torch.enable_grad():
        result = loss = closure()
    begin_step = getattr(self.rule, "begin_step", None)
    if begin_step is not None or closure is None:  # a closure may return anything to a rule that ignores losses
      loss = _scalar("loss", loss, convert=begin_step is not None)
    valid_loss = _scalar("valid_loss", valid_loss, convert=begin_step is not None)
    groups = []
    for group in self.param_groups:
      buckets: dict = {}
      for p in group["params"]:
        grad = p.grad
        if grad is None:
          continue
        if grad.is_sparse:
          raise RuntimeError("LearnedOptimizer does not support sparse gradients")
        if not p.is_floating_point():
          raise RuntimeError(f"LearnedOptimizer: parameters must be floating point, found {p.dtype}")
        buckets.setdefault((p.device, p.dtype), []).append(p)
      groups.append(buckets)
    if not any(groups):  # no gradient at all: nothing to update, nothing to count
      return result
    losses = [loss, valid_loss] if begin_step is not None else []
    self._settle()
    verdict, check = self._verdict_on_device(groups, losses)
    if verdict is None and not _read_on_host(_max_norms(groups), losses):
      self._skipped_steps += 1
      return result
    sent = None if verdict is None else self._send_losses(losses)
    init_state = getattr(self.rule, "init_state", None)
    buckets = []  # (group index, group, device, dtype, parameters, their states): each state looked up once
    for group_index, (group, by_key) in enumerate(zip(self.param_groups, groups)):
      for (device, dtype), params in by_key.items():
        states = [self.state[p] for p in params]
        if init_state is not None:  # before weight decay changes p
          for p, state in zip(params, states):
            if not state:
              state.update(init_state(p))
        buckets.append((group_index, group, device, dtype, params, states))
    for group_index, group, device, dtype, params, states in buckets:
      decay = group.get("weight_decay", 0.0)  # absent from groups of state dicts saved by lopt 0.2
      if decay:  # (a skipped step: times 1)
        factor = 1 - group["lr"] * decay
        torch._foreach_mul_(params, factor if verdict is None else torch.where(verdict, factor, 1.0))
    start = getattr(self.rule, "start", None)
    verdict_arguments = {} if verdict is None else {"ok": verdict, "check": check}
    if start is not None:  # what the device can do before the losses are folded in, launched first
      for group_index, group, device, dtype, params, states in buckets:
        start((group_index, device, dtype), params, states, group["lr"], **verdict_arguments)
    if sent is not None:
      _receive_losses(losses, sent)
    before = None if verdict is None else _snapshot(self.state[GLOBAL_STATE])
    if begin_step is not None:
      begin_step(self.state[GLOBAL_STATE], loss=losses[0], valid_loss=losses[1], num_steps=self.num_steps)
    for group_index, group, device, dtype, params, states in buckets:
      self.rule.step((group_index, device, dtype), params, states, group["lr"], **verdict_arguments)
    if verdict is not None:
      self._defer(verdict, before)
    return result

  def _verdict_on_device(self, groups: list, losses: list) -> tuple[torch.Tensor | None, bool]:
    """(the step's verdict on its gradients as a 0-d bool tensor on their device, check) where the rule can skip
    a step there (module docstring), else (None, False). check: one bucket, no weight decay -- the rule sets the
    verdict itself, in a buffer kept from step to step (for the kernels: inside the update's CUDA graph)."""
    skips = getattr(self.rule, "skips_on_device", None)
    buckets = [(group, params) for group, by_key in zip(self.param_groups, groups) for params in by_key.values()]
    devices = {params[0].device for _, params in buckets}
    if (skips is None or len(devices) != 1 or any(isinstance(x, torch.Tensor) and x.device not in devices
                                                  for x in losses) or not all(skips(params) for _, params in buckets)):
      return None, False
    device = buckets[0][1][0].device
    if len(buckets) == 1 and not buckets[0][0].get("weight_decay", 0.0):  # (weight decay comes before the check)
      if self._device_verdict is None or self._device_verdict.device != device:
        self._device_verdict = torch.ones((), dtype=torch.bool, device=device)
      return self._device_verdict, True
    (values,) = _max_norms(groups).values()
    if not values:  # every gradient empty
      return torch.ones((), dtype=torch.bool, device=device), False
    return torch.stack(values).isfinite().all(), False

  def _send_losses(self, losses: list) -> tuple | None:
    """The losses given as (float32 0-d) device tensors, copied to pinned host memory behind an event -- queued
    before the update's first half, so that reading them (``_receive_losses``, after it was launched) waits for the
    backward pass but not for the update -- as (indices, pinned values, event); None without such losses."""
    indices = [i for i, x in enumerate(losses) if isinstance(x, torch.Tensor)]
    if not indices:
      return None
    values = torch.stack([losses[i] for i in indices])
    if values.device.type != "cuda":
      return indices, values, None
    if self._host_losses is None:
      self._host_losses = (torch.empty(2, dtype=torch.float32, pin_memory=True), torch.cuda.Event())
    pinned, event = self._host_losses
    pinned[:len(indices)].copy_(values, non_blocking=True)
    event.record()
    return indices, pinned, event

  def _defer(self, verdict: torch.Tensor, before: dict) -> None:
    """Leaves this step's verdict on the device: copied to pinned host memory behind an event, read by ``_settle``;
    ``before``: the global state before this step, restored if it is skipped."""
    if self._host_verdict is None:
      pinned = verdict.device.type == "cuda"
      self._host_verdict = (torch.empty((), dtype=torch.bool, pin_memory=pinned),
                            torch.cuda.Event() if pinned else None)
    flag, event = self._host_verdict
    flag.copy_(verdict, non_blocking=event is not None)
    if event is not None:
      event.record()
    self._pending = (flag, event, before)

  def _settle(self) -> None:
    """Reads the verdict of a step left on the device (waiting for it, if the device has not got there): when the
    step was skipped, its changes to the global state are undone and it is counted."""
    pending, self._pending = self._pending, None
    if pending is None:
      return
    flag, event, before = pending
    if event is not None:
      event.synchronize()
    if not bool(flag):
      self.state[GLOBAL_STATE] = _restore(before)
      self._skipped_steps += 1

  # -- state dicts ------------------------------------------------------------------------------------------------

  def state_dict(self):
    """torch's state dict, plus ``"lopt"``: the architecture and weights checksum, checked on load."""
    self._settle()
    state = super().state_dict()
    if GLOBAL_STATE in state["state"]:  # torch keeps a non-parameter entry as is: a copy, not the live dict
      state["state"][GLOBAL_STATE] = _copy(state["state"][GLOBAL_STATE])
    state["lopt"] = {"optimizer": self.architecture.config(),
                     "weights_sha256": self.checkpoint_config.get("weights_sha256"),
                     "skipped_steps": self._skipped_steps, "num_steps": self.num_steps}
    return state

  def load_state_dict(self, state_dict) -> None:
    """Loads a state dict from ``state_dict()`` (``skipped_steps``, ``num_steps`` and the rule's global state
    included; torch's rules restore the groups' ``lr`` and ``weight_decay``); raises ValueError when it was written by
    another learned optimizer or its state tensors do not have the shapes this optimizer's parameters need."""
    self._settle()
    state_dict = dict(state_dict)
    saved = state_dict.pop("lopt", None)
    mine = self.architecture.config()
    if saved is not None:
      if saved.get("optimizer") != mine:
        raise ValueError(f"LearnedOptimizer.load_state_dict: the state was written by optimizer "
                         f"{saved.get('optimizer')}, this one is {mine}")
      digest = self.checkpoint_config.get("weights_sha256")
      if saved.get("weights_sha256") != digest:
        raise ValueError(f"LearnedOptimizer.load_state_dict: the state was written with weights SHA-256 "
                         f"{saved.get('weights_sha256')}, this optimizer's weights are {digest}")
    super().load_state_dict(state_dict)
    self.skipped_steps = int((saved or {}).get("skipped_steps", 0))
    if saved is not None and "num_steps" in saved:
      self.num_steps = saved["num_steps"]
    if GLOBAL_STATE in self.state:  # loaded as is by torch: a copy, so the given state dict is never changed
      self.state[GLOBAL_STATE] = _copy(self.state[GLOBAL_STATE])
    state_dtypes = getattr(self.rule, "state_dtypes", None)
    if state_dtypes is not None:  # re-read the entries torch cast to the parameter's dtype, in their own dtype
      saved_ids = [i for group in state_dict["param_groups"] for i in group["params"]]
      params = [p for group in self.param_groups for p in group["params"]]
      for saved_id, p in zip(saved_ids, params):
        entries = state_dict["state"].get(saved_id)
        if entries is None or p not in self.state:
          continue
        for name, dtype in state_dtypes(p).items():
          if isinstance(entries.get(name), torch.Tensor):
            self.state[p][name] = entries[name].to(device=p.device, dtype=dtype)
    self.rule.reset()
    for group in self.param_groups:
      for index, p in enumerate(group["params"]):
        state = self.state[p] if p in self.state else {}
        for name, shape in self.rule.state_shapes(p).items():
          value = state.get(name)
          if value is not None and tuple(value.shape) != tuple(shape):
            raise ValueError(f"LearnedOptimizer.load_state_dict: {name} state of parameter {index} has shape "
                             f"{tuple(value.shape)}, expected {tuple(shape)}")


def _check_rate(name: str, value) -> None:
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < float("inf"):
    raise ValueError(f"LearnedOptimizer: {name} must be a non-negative finite number, got {value!r}")


def _scalar(name: str, value, convert: bool):
  """Checks a loss: None, a real number (numpy's and 0-d arrays included) or a one-element tensor; with ``convert``,
  returns a number as a Python float rounded to float32 and a tensor as a float32 0-d tensor on its device (read on
  the host by ``_read_on_host``, with the gradients' check), else as given."""
  if value is None:
    return None
  if isinstance(value, torch.Tensor):
    if value.numel() != 1:
      raise ValueError(f"LearnedOptimizer.step: {name} must be a scalar, got a tensor of shape {tuple(value.shape)}")
    return value.detach().reshape(()).to(dtype=torch.float32) if convert else value
  try:
    if isinstance(value, (bool, str, bytes)) or getattr(value, "ndim", 0) != 0:
      raise TypeError
    number = float(value)
  except (TypeError, ValueError):
    raise TypeError(f"LearnedOptimizer.step: {name} must be a number or a one-element tensor, got "
                    f"{type(value).__name__}") from None
  return to_float32(number) if convert else value


def _receive_losses(losses: list, sent: tuple) -> None:
  """``losses``' tensors replaced by their float32 values as Python floats, from ``_send_losses``'s copy."""
  indices, values, event = sent
  if event is not None:
    event.synchronize()
  for i, value in zip(indices, values.tolist()):
    losses[i] = value


def _max_norms(groups: list) -> dict:
  """{device: [max |g| of each non-empty gradient, 0-d tensors]} of the buckets in ``groups``: one multi-tensor
  reduction per bucket (NaN propagates)."""
  by_device: dict = {}
  for buckets in groups:
    for (device, _), params in buckets.items():
      grads = [p.grad for p in params if p.grad.numel()]
      by_device.setdefault(device, []).extend(torch._foreach_norm(grads, ord=math.inf) if grads else ())
  return by_device


def _read_on_host(norms: dict, losses: list) -> bool:
  """Whether every gradient is finite, given each tensor's max |g| per device (``norms``); then the float32 0-d
  tensors among ``losses`` replaced by Python floats.

  These are a step's host reads -- on a GPU each waits for the device -- one per device: its gradients' check, the
  price of never letting a NaN or inf into the state, with the losses held on that device read in the same copy
  (a loss on a device without gradients is read on its own)."""
  for device, values in norms.items():
    mine = [i for i, x in enumerate(losses) if isinstance(x, torch.Tensor) and x.device == device]
    if not values and not mine:
      continue
    flag = torch.stack(values).isfinite().all() if values else torch.ones((), dtype=torch.bool, device=device)
    read = torch.stack([flag] + [losses[i] for i in mine]).tolist()  # (a bool and float32 values: float32, exactly)
    if not read[0]:
      return False
    for i, value in zip(mine, read[1:]):
      losses[i] = value
  for i, x in enumerate(losses):
    if isinstance(x, torch.Tensor):
      losses[i] = float(x)
  return True


def _copy(state):
  return {name: value.clone() if isinstance(value, torch.Tensor) else copy.deepcopy(value)
          for name, value in state.items()}


class _Values(NamedTuple):
  """A CPU tensor's values in a snapshot (``tolist``: a fifth of a clone's time), made a tensor again if restored."""
  dtype: torch.dtype
  shape: torch.Size    # (an empty tensor's list does not keep it)
  values: object


def _snapshot(state: dict) -> dict:
  """What ``_restore`` needs to give back the global state as it is now, if the step is skipped: CPU tensors as
  their values, others copied as ``_copy`` does."""
  return {name: _Values(value.dtype, value.shape, value.tolist()) if isinstance(value, torch.Tensor) and value.is_cpu
          and not value.requires_grad else _copy({name: value})[name] for name, value in state.items()}


def _restore(snapshot: dict) -> dict:
  """The global state ``_snapshot`` saw."""
  return {name: torch.tensor(value.values, dtype=value.dtype).reshape(value.shape) if isinstance(value, _Values)
          else value for name, value in snapshot.items()}


def _to_numpy(value):
  import numpy as np
  return np.asarray(value)


__all__ = ["LearnedOptimizer", "CheckpointError"]
