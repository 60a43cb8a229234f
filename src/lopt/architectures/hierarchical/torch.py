"""The hierarchical optimizer in PyTorch: ``HierarchicalRule``, the equations of ``optimizer.py``, without JAX.

Per parameter tensor p of shape S with gradient g and its own step count t (t_new = t + 1); b_k = momentum_decays,
rho = rms_decay, e the clipping scale, decay = sigmoid(clip/decay_logit) (``optimizer.py`` has the full story):

  g    <- clip(g, +-exp(clip/log_multiplier) e / (1 - decay^t))   when t >= 1 and e > 0
  e    <- decay e + (1 - decay) RMS(g)
  m_k  <- b_k m_k + (1 - b_k) g;  v = Adafactor's g^2 estimate (ndim >= 2) or EMA of g^2
  rs    = rsqrt(v / (1 - rho^t_new) + 1e-12);  adam = m_1 rs / (1 - b_1^t_new)
  f     = [g, p, p - a, m_1..m_K, g rs, m_1 rs..m_K rs], each / sqrt(mean_S f^2 + 1e-12)
  LSTM  (one call over the tensors of a bucket) on [0.1 log RMS of g, p, adam, p - a; 0.1 last update ratio; spike;
        cos(g, old m_k rs); log_step / 8; shape; feedback; global loss and time features]
  log_step <- clip(log_step + w_s . h + b_s + alignment . cos [+ w_d . inputs], -8, 8);  context = tanh(h W_c + b_c)
  (d, mag, feedback) = MLP([f, context]) per coordinate;  feedback <- mean over S of tanh(feedback)
  u     = step_scale exp(log_step + schedule . time + magnitude_scale mag) (direction_scale d - adam);  p <- p + lr u
  a    <- average_decay a + (1 - average_decay) p;  ratio <- log(RMS u / (RMS u + RMS p) + 1e-30)   (p before the step)

The state of p (``state_shapes``): ``momentum`` S + (K,), ``rows``/``cols`` (``mlp.spec.factored_shapes``) when
ndim S >= 2 or else ``second_moment`` S, ``average`` S, all in p's dtype; the LSTM's ``h`` and ``c`` (lstm_size,),
``log_step``, ``gradient_rms`` (e), ``update_ratio`` () and ``feedback`` (feedback_size,) in p's dtype promoted to at
least float32 (the JAX layout: a bfloat16 model keeps a float32 recurrent state); ``step``, an int32 0-d count. Each
entry is a view of a buffer the rule shares between the tensors of a bucket (the state dict format is unchanged:
loaded entries are gathered into new buffers at the next step).

The optimizer-wide state -- the training and validation loss accumulators and the global step count, kept once in
the JAX ``HierarchicalState`` -- lives in the dict ``begin_step`` receives (``LearnedOptimizer`` keeps it under
``state["lopt_global"]``): ``step`` int32 (); ``train_seen``, ``train_first``, ``train_last`` float32 () and
``train_ema`` float32 (len(LOSS_DECAYS),); the same four for ``valid``; on the CPU, in float32 as in JAX (computed
as Python numbers rounded to float32: a few microseconds, where tiny tensor operations on the host took a quarter of a
millisecond per step).

The time features use the global step; the bias corrections and the clipping history use each tensor's own count,
which equals the global one whenever every tensor gets a gradient at every step (always, on the JAX side) -- and keeps
them right for a tensor that joins later or skips steps. Results agree with JAX to rounding: in float64 to ~1e-15
given the same global features, which both sides compute in float32 with their own tanh and log (~1e-7 apart).

How a step is computed (``update_bucket``; on a GPU an update of this kind is bound by kernel launches and memory
traffic rather than arithmetic): a bucket's tensors are processed by group of the same shape, each group a
(count, *shape) batch, so that every elementwise operation and every per-tensor reduction (a column's root sum of
squares, an alignment's dot product, the Adafactor row and column sums, the feedback means) is one call for the
group, not one per tensor -- a model of hundreds of tensors has a handful of shapes. The state lives in buffers shared
by a bucket's tensors (``Buffers``: per group the momenta, averages and second moments; per bucket the recurrent
state), each tensor's state entries views of them, so that the batches need no gathering and the recurrent state no
write-back per tensor; the gradients and parameters of a group of several tensors are stacked (one copy each) and
the updates added back with one multi-tensor call. Two passes per group: the clipped gradient, the second moment,
the momenta and the statistics; then -- after the LSTM ran once over the bucket's tensors -- the MLP and the update,
in eager mode as batched matrix products per tensor over chunks of at most MLP_CHUNK coordinates (bounding the
(count, units, size) temporaries). ``step`` never reads a device value on the host -- thresholds, bias corrections
and counts stay on the device -- the global features reach the device through pinned memory without a
synchronization, and constants are cached per (device, dtype) and per bucket layout. The normalizers divide the
first layer's rows, the context and the constant factors fold into the biases and the last layer: u = exp(y_1)
(y_0 - adam), y the MLP's output.

``kernels`` (``HierarchicalRule.enable_kernels``, on by default through ``LearnedOptimizer``): on a CUDA device, a
bucket of contiguous float32 tensors runs the per-coordinate passes as the Triton kernels of ``triton_passes``,
which read gradients and parameters through a table of their addresses (no stacking copies), and the whole update
is replayed as two CUDA graphs (``HierarchicalRule._replay``), the first half launched by ``start`` before the losses
are folded in; between the passes one kernel runs the LSTM and the rest of the per-tensor controller.

``compile`` (``HierarchicalRule.enable_compile``; ``LearnedOptimizer(..., compile=True)``) runs ``update_bucket``
through ``torch.compile``, one graph per bucket layout, with the per-coordinate MLP unrolled into coordinate-wise
expressions so that each group's coordinate update is one loop (the MLP computed once per coordinate, its
intermediate never stored). Without a compiler (Triton for CUDA, a C++ compiler for the CPU), or when compilation
fails, it warns once and stays eager.
"""

from __future__ import annotations

import importlib.util
import math
import operator
import os
import shutil
import types
import warnings
from itertools import chain
from typing import NamedTuple

import numpy as np
import torch
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary

from lopt.architectures.hierarchical.spec import (CORRECTION_FLOOR, FRACTION_POWERS, LOG_FLOOR, LOG_SCALE,
                                                  LOG_STEP_LIMIT, LOSS_DECAYS, MAX_DECAYS, NORM_EPSILON,
                                                  RSQRT_EPSILON, TIME_SCALES)
from lopt.architectures.mlp.spec import G2_EPSILON, factored_axes, factored_shapes  # (its second moment's)
from lopt.float32 import to_float32, to_float32s

RECURRENT = ("h", "c", "log_step", "gradient_rms", "update_ratio", "feedback")  # state kept in at least float32
UNROLL_LIMIT = 512  # compiled: the MLP unrolled into coordinate-wise expressions up to this many products
MLP_CHUNK = 1 << 24  # eager: the MLP over at most this many coordinates at once (more when one tensor is larger)
KERNEL_UNITS = 8  # the kernels' MLP width (``triton_passes``: fewer units padded with zero weights)
KERNEL_TENSORS = 65535  # the kernels' tensors per bucket at most (their grids' second axis, CUDA's limit there)
KERNEL_COORDINATES = (2 ** 31 - 1) // MAX_DECAYS  # and coordinates per tensor (a momentum's index is 32 bits)
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # Triton's interpreter: its kernels on CPU tensors (tests)


class Theta(NamedTuple):
  """Meta-parameters and constants in one (device, dtype)."""
  lstm_w: torch.Tensor          # (inputs + L, 4L)
  lstm_b: torch.Tensor          # (4L,)
  step_w: torch.Tensor          # (L,)
  step_b: torch.Tensor          # ()
  step_alignment: torch.Tensor  # (K,)
  step_schedule: torch.Tensor   # (time features,)
  context_w: torch.Tensor       # (L, context)
  context_b: torch.Tensor       # (context,)
  clip_multiplier: torch.Tensor  # () exp(log_multiplier)
  clip_decay: torch.Tensor      # () sigmoid(decay_logit)
  mlp: list                     # [(w, b), ...]
  decays: torch.Tensor          # (K,)
  one_minus_decays: torch.Tensor  # (K,)
  correction_bases: torch.Tensor  # (2, 1) [rho, b_1]: the bias corrections 1 - rho^t, 1 - b_1^t
  rsqrt_epsilon: torch.Tensor   # () RSQRT_EPSILON
  out_scale: torch.Tensor       # (2 + feedback,) [direction_scale, magnitude_scale, 1, ...]: the output's factors
  out_shift: torch.Tensor       # (2 + feedback,) [0, log(step_scale), 0, ...]
  magnitude: torch.Tensor       # (2 + feedback,) [0, 1, 0, ...]
  last_w: torch.Tensor          # the MLP's last layer times out_scale (its columns)
  last_b: torch.Tensor          # its bias times out_scale plus out_shift
  step_direct: torch.Tensor | None = None  # (LSTM inputs,) with ``direct_step``, else None
  power_bases: torch.Tensor | None = None    # (3, 1) [rho, b_1, clip_decay] and the offsets of their exponents
  power_offsets: torch.Tensor | None = None  # (3, 1) [1, 1, 0] from the counts: rho^t, b_1^t, decay^(t-1) (kernels)


def prepare_theta(tensors: dict, values: dict, decays: tuple, dtype: torch.dtype, device: torch.device) -> Theta:
  def convert(value):
    return torch.as_tensor(value).to(device=device, dtype=dtype)
  # The JAX side takes sigmoid(decay_logit) in theta's own dtype and then casts it; so does this.
  decay = torch.sigmoid(torch.as_tensor(tensors["clip/decay_logit"]))
  decay_tensor = torch.as_tensor(decays, dtype=dtype, device=device)
  mlp = [(convert(tensors[f"mlp/{i}/w"]), convert(tensors[f"mlp/{i}/b"])) for i in range(values["num_layers"] + 1)]
  outputs = mlp[-1][1].shape[0]
  scale = torch.ones(outputs, dtype=dtype, device=device)
  scale[0], scale[1] = values["direction_scale"], values["magnitude_scale"]
  magnitude = torch.zeros(outputs, dtype=dtype, device=device)
  magnitude[1] = 1
  return Theta(
      convert(tensors["lstm/w"]), convert(tensors["lstm/b"]), convert(tensors["step/w"]), convert(tensors["step/b"]),
      convert(tensors["step/alignment"]), convert(tensors["step/schedule"]), convert(tensors["context/w"]),
      convert(tensors["context/b"]), torch.exp(convert(tensors["clip/log_multiplier"])), convert(decay),
      mlp, decay_tensor, 1 - decay_tensor,
      torch.as_tensor([[values["rms_decay"]], [decays[0]]], dtype=dtype, device=device),
      torch.as_tensor(RSQRT_EPSILON, dtype=dtype, device=device), scale, magnitude * math.log(values["step_scale"]),
      magnitude, mlp[-1][0] * scale, mlp[-1][1] * scale + magnitude * math.log(values["step_scale"]),
      convert(tensors["step/direct"]) if "step/direct" in tensors else None,
      torch.stack([torch.as_tensor(values["rms_decay"], dtype=dtype), torch.as_tensor(decays[0], dtype=dtype),
                   decay.to(dtype)]).reshape(3, 1).to(device),
      torch.tensor([[1.0], [1.0], [0.0]], dtype=dtype, device=device))


class Constants(NamedTuple):
  """The architecture's numbers the update reads (Python values: constants of a compiled graph)."""
  decays: tuple
  rms_decay: float
  average_decay: float
  num_layers: int
  fused: str    # "" (eager: the MLP as matrix products); for torch.compile, "unrolled" (each unit of the MLP a
  #               coordinate-wise expression: one fused loop) or "matmul" (wide MLPs: the first layer as a broadcast
  #               sum, the others matrix products)
  kernels: bool = False  # eager: the per-coordinate passes of eligible buckets as Triton kernels (``triton_passes``)
  max_log_step: float = LOG_STEP_LIMIT  # the log step's upper bound (the spec's field)


class Group(NamedTuple):
  """The tensors of one shape in a bucket: positions ``start:stop`` of the bucket's group order, processed together
  as one (count, *shape) batch -- every elementwise operation and every per-tensor reduction one call for all of
  them."""
  shape: tuple
  start: int
  stop: int
  axes: tuple | None      # the factored axes (a, b) of ``shape``, or None (ndim < 2: a full second moment)
  size: int               # numel of one tensor
  chunks: tuple           # eager MLP: (start, stop) sub-batches of the group (relative), ~MLP_CHUNK coordinates each


class Layout(NamedTuple):
  """A bucket's shapes and what follows from them, cached per (device, dtype, shapes). The bucket's tensors are
  processed in group order: ``order[j]`` is the bucket index of the j-th tensor, grouped by shape (first appearance
  first); every (n, ...) per-tensor array below and in the state buffers is in that order."""
  shapes: tuple           # per tensor, bucket order
  order: tuple            # bucket indices in group order
  groups: tuple           # Group per distinct shape
  size: torch.Tensor      # (n,) numel per tensor, group order, in the recurrent dtype
  shape_features: torch.Tensor  # (n, 4) ``shape_features`` per tensor, group order, in the recurrent dtype


def make_layout(shapes: tuple, device: torch.device, rec: torch.dtype) -> Layout:
  by_shape: dict = {}
  for index, shape in enumerate(shapes):
    by_shape.setdefault(shape, []).append(index)
  order, groups = [], []
  for shape, indices in by_shape.items():
    size = math.prod(shape)
    chunks, first = [], 0
    for last in range(1, len(indices) + 1):  # greedy: close a chunk before it exceeds MLP_CHUNK coordinates
      if last == len(indices) or (last + 1 - first) * size > MLP_CHUNK:
        chunks.append((first, last))
        first = last
    groups.append(Group(shape, len(order), len(order) + len(indices), factored_axes(shape), size, tuple(chunks)))
    order += indices
  sizes = [math.prod(shapes[i]) for i in order]
  features = np.stack([shape_features(shapes[i]) for i in order])
  return Layout(shapes, tuple(order), tuple(groups), torch.tensor(sizes, dtype=torch.float64).to(device, rec),
                torch.from_numpy(features).to(device=device, dtype=rec))


class Buffers(NamedTuple):
  """A bucket's state, in buffers shared by its tensors (every entry of a tensor's state is a view of one of them):
  per group (count, *shape, K) momenta, (count, *shape) averages and (rows, cols) -- (count, *rows) (count, *cols)
  -- or (second moment,) (count, *shape); for the bucket, in group order, ``h`` and ``c`` (n, lstm_size),
  ``feedback`` (n, feedback_size), ``scalars`` (3, n) [gradient_rms, update_ratio, log_step] and ``steps`` (n,)
  int32. ``entries``: every value of the tensors' state dicts once bound (group order, each dict in its own order),
  the views among them, to recognize them next step (``_unchanged``)."""
  momenta: list
  seconds: list
  averages: list
  h: torch.Tensor
  c: torch.Tensor
  feedback: torch.Tensor
  scalars: torch.Tensor
  steps: torch.Tensor
  entries: list


_RECURRENT_DTYPES: dict = {}  # recurrent_dtype's results (promote_types dispatches an operation: ~1 us per call)


def recurrent_dtype(dtype: torch.dtype) -> torch.dtype:
  """The recurrent state's dtype for parameters of ``dtype``: at least float32 (JAX's result_type(dtype, float32))."""
  rec = _RECURRENT_DTYPES.get(dtype)
  if rec is None:
    rec = _RECURRENT_DTYPES[dtype] = torch.promote_types(dtype, torch.float32)
  return rec


def shape_features(shape: tuple[int, ...]) -> np.ndarray:
  """(4,) float32: is-scalar, is-vector, log(size) / 10, rank / 4 (``optimizer.shape_features``)."""
  size = math.prod(shape) if shape else 1
  return np.array([size == 1, len(shape) == 1, np.log(size) / 10, len(shape) / 4], np.float32)


# -- global features (float32 on the CPU, as the JAX side's) ---------------------------------------------------------

# float32 constants, as the JAX side's.
_DECAYS = tuple(to_float32(d) for d in LOSS_DECAYS)
_ONE_MINUS_DECAYS = tuple(float(np.float32(1) - np.float32(d)) for d in LOSS_DECAYS)
_LOG_FLOOR = to_float32(LOG_FLOOR)


def init_global_state() -> dict:
  zero = lambda *shape: torch.zeros(shape, dtype=torch.float32)  # noqa: E731
  state = {"step": torch.zeros((), dtype=torch.int32)}
  for name in ("train", "valid"):
    state.update({f"{name}_seen": zero(), f"{name}_first": zero(), f"{name}_last": zero(),
                  f"{name}_ema": zero(len(LOSS_DECAYS))})
  return state


def _array(state: dict, key: str) -> np.ndarray:
  """The float32 CPU tensor ``state[key]`` as a numpy array sharing its memory (the entry converted first when it
  is not one: a state dict loaded onto another device)."""
  value = state[key]
  if value.dtype is torch.float32:
    try:
      return value.numpy()
    except (TypeError, RuntimeError):  # on a device, or requiring a gradient
      pass
  value = state[key] = value.detach().to(device="cpu", dtype=torch.float32).clone()
  return value.numpy()


def _read(state: dict, key: str):
  """``state[key]`` as a float or a list of floats, float32 values (the entry converted first when it is not a
  float32 CPU tensor, as ``_array`` does); ``tolist`` reads a CPU tensor faster than numpy."""
  value = state[key]
  if value.dtype is not torch.float32 or not value.is_cpu:
    _array(state, key)
    value = state[key]
  return value.tolist()


def accumulate(state: dict, name: str, loss) -> None:
  """Folds ``loss`` (None, a float or a one-element tensor: float32 values) into the ``name`` accumulators of
  ``state``; a non-finite loss leaves them unchanged (``optimizer.accumulate``).

  Host arithmetic on a handful of numbers, as Python floats rounded to float32 after every operation: float32
  arithmetic exactly (double rounding is harmless for + - * /), log and tanh within an ulp of torch's, and ~50x
  cheaper than tensor operations on the host."""
  if loss is None:
    return
  loss = to_float32(float(loss))
  if not math.isfinite(loss):
    return
  seen, first, last, ema = (_array(state, f"{name}_{part}") for part in ("seen", "first", "last", "ema"))
  x = to_float32(math.log(max(loss, _LOG_FLOOR)))
  if seen > 0:
    ema[...] = [to_float32(to_float32(d * float(e)) + to_float32(c * x))
                for d, c, e in zip(_DECAYS, _ONE_MINUS_DECAYS, ema)]
  else:
    ema[...] = x
    first[...] = x
  seen[...] = 1.0
  last[...] = x


def loss_features(state: dict) -> list:
  """NUM_LOSS_FEATURES floats, float32 values (``optimizer.loss_features``)."""
  (train_seen, train_first, _, train_ema), (valid_seen, valid_first, valid_last, _) = accumulators = [
      [_read(state, f"{name}_{part}") for part in ("seen", "first", "last", "ema")] for name in ("train", "valid")]
  features = []
  for seen, first, last, ema in accumulators:
    features += [seen, seen * math.tanh(to_float32(last - first) / 4)]
    features += [seen * math.tanh(4 * to_float32(last - e)) for e in ema]
  gap = valid_seen * train_seen * math.tanh(to_float32(valid_last - train_ema[-1])
                                            - to_float32(valid_first - train_first))
  return to_float32s(features + [gap])


def time_features(step, num_steps) -> list:
  """len(TIME_SCALES) + len(FRACTION_POWERS) floats, float32 values, for the new global count ``step`` (a tensor or
  a number; ``optimizer.time_features``)."""
  t = to_float32(int(step))
  fraction = 0.0
  if num_steps is not None:
    horizon = to_float32(num_steps)
    if horizon > 0:
      fraction = min(max(to_float32(t / max(horizon, 1.0)), 0.0), 1.0)
  return to_float32s([math.tanh(to_float32(t / tau)) for tau in TIME_SCALES]
                     + [fraction ** q for q in FRACTION_POWERS])


def rms(x: torch.Tensor) -> torch.Tensor:
  return torch.sqrt(torch.mean(x * x) + LOG_FLOOR)


def clip(g: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
  """jnp.clip(g, -threshold, threshold) for a 0-d threshold (inf: no clipping)."""
  return torch.minimum(torch.maximum(g, -threshold), threshold)


# -- the update of one bucket ----------------------------------------------------------------------------------------

def _batch(tensors: list, shape: tuple) -> torch.Tensor:
  """(count, *shape): the tensors stacked (a copy), or one tensor as a view of itself (no copy: an in-place change of
  the batch changes it). The tensors of a group share their shape: ``shape``, or (1,) for the compiled update's views
  of 0-d tensors (then reshaped; a reshape per tensor is an operation per tensor in eager mode)."""
  if len(tensors) == 1:
    return tensors[0].reshape((1,) + shape)
  return torch.stack(tensors if tensors[0].shape == shape else [x.reshape(shape) for x in tensors])


def _kernel_bucket(params: list, grads: list) -> bool:
  """Whether a bucket's passes can run as ``triton_passes`` kernels: Triton importable, float32 tensors on a CUDA
  device (or Triton's interpreter), every parameter and gradient contiguous (the kernels index them flat), at most
  KERNEL_TENSORS of them, each of at most KERNEL_COORDINATES."""
  p = params[0]
  return (p.dtype is torch.float32 and (p.is_cuda or _INTERPRET) and len(params) <= KERNEL_TENSORS
          and max(map(_NUMEL, params)) <= KERNEL_COORDINATES and all(map(_CONTIGUOUS, params))
          and all(map(_CONTIGUOUS, grads)) and _missing_triton() is None)


_CONTIGUOUS, _ADDRESS, _NUMEL = torch.Tensor.is_contiguous, torch.Tensor.data_ptr, torch.Tensor.numel


def update_bucket(c: Constants, theta: Theta, rtheta: Theta, layout: Layout, features: torch.Tensor, lr,
                  params: list, grads: list, momenta: list, seconds: list, averages: list, h: torch.Tensor,
                  cell_state: torch.Tensor, feedback: torch.Tensor, scalars: torch.Tensor, steps: torch.Tensor) -> None:
  """p <- p + lr u for every p of one bucket (same device and dtype), the states updated in place.

  params, grads: the bucket's tensors in the layout's group order; momenta, seconds, averages, h, cell_state,
  feedback, scalars, steps: the bucket's state buffers (``Buffers``: per group, or (n, ...) in group order).
  theta / rtheta: the meta-parameters in p's dtype / the recurrent dtype; features: this step's global features in
  the recurrent dtype; lr: a number, or a 0-d tensor on the device (compiled: no recompilation when it changes).
  Never reads a value on the host. (The kernels' form of the same update: ``kernel_first_pass`` and
  ``kernel_second_pass``.)

  Per group of same-shaped tensors, two passes over the coordinates -- the clipped gradient, the second moment, the
  momenta and the statistics; after the LSTM ran once for the bucket, the MLP and the update -- each a handful of
  calls on (count, ...) batches with per-tensor values broadcast along the first axis."""
  n, k = len(params), len(c.decays)
  dtype, rec = params[0].dtype, h.dtype
  rho = c.rms_decay

  # Per tensor numbers, for the whole bucket at once (recurrent dtype, (n,) in group order).
  t = steps.add(1).to(rec)                                       # each tensor's new count
  old_rms, old_ratio, old_log_step = scalars.unbind(0)          # (the buffer is overwritten only at the end)
  decay = rtheta.clip_decay
  history = old_rms / torch.clamp(1 - decay ** (t - 1), min=CORRECTION_FLOOR)
  has_history = (t > 1) & (old_rms > 0)
  threshold = torch.where(has_history, rtheta.clip_multiplier * history, torch.full_like(history, math.inf))
  upper = threshold.to(dtype)
  lower = torch.neg(upper)
  moment_correction, adam_correction = (1 - torch.pow(rtheta.correction_bases, t)).unbind(0)  # 1 - rho^t, 1 - b_1^t
  raw_norms = torch.stack(torch._foreach_norm(grads, dtype=rec))  # |g| before clipping
  param_norms = torch.stack(torch._foreach_norm(params, dtype=rec))

  # Pass 1, per group: the clipped gradient, the second moment (factored: from its row and column sums of squares),
  # rs = rsqrt(v / (1 - rho^t) + eps), the momenta, and the statistics of the feature columns (root sums of squares)
  # and alignments. Kept for pass 2: the clipped gradient, rs and p of each group (count, *shape).
  kept, clipped_norms, drift_norms, gradient_norms, statistics = [], [], [], [], []
  for group, m, second, average in zip(layout.groups, momenta, seconds, averages):
    lo, hi, shape, count = group.start, group.stop, group.shape, group.stop - group.start
    per_tensor = lambda x: x[lo:hi].reshape((count,) + (1,) * len(shape))  # noqa: E731 -- (count,) broadcast
    flat = lambda x: x.reshape(count, -1)  # noqa: E731
    g = torch.clamp(_batch(grads[lo:hi], shape), per_tensor(lower), per_tensor(upper))
    p = _batch(params[lo:hi], shape)
    if group.axes is None:
      (moment,) = second
      moment.mul_(rho).addcmul_(g, g, value=1 - rho).add_((1 - rho) * G2_EPSILON)
      clipped_norms.append(torch.linalg.vector_norm(flat(g), dim=1, dtype=rec))
      # rsqrt(v / (1 - rho^t) + eps)
      scale, other = per_tensor(torch.reciprocal(moment_correction).to(dtype)), moment
    else:
      a, b = group.axes[0] + 1, group.axes[1] + 1  # in the batch
      rows, cols = second
      row_norms = torch.linalg.vector_norm(g, dim=b, keepdim=True, dtype=rec)
      col_norms = torch.linalg.vector_norm(g, dim=a, keepdim=True, dtype=rec)
      rows.mul_(rho).addcmul_(row_norms, row_norms, value=(1 - rho) / shape[b - 1]).add_((1 - rho) * G2_EPSILON)
      cols.mul_(rho).addcmul_(col_norms, col_norms, value=(1 - rho) / shape[a - 1]).add_((1 - rho) * G2_EPSILON)
      clipped_norms.append(torch.linalg.vector_norm(flat(col_norms), dim=1))
      # rsqrt(v / (1 - rho^t) + eps) = rsqrt(scale cols + eps), scale = rows / (mean_a rows (1 - rho^t))
      means = rows.mean(a, keepdim=True) * per_tensor(moment_correction.to(dtype))
      scale, other = rows / means, cols
    rs = torch.addcmul(theta.rsqrt_epsilon, scale, other).rsqrt_()
    grs = g * rs
    # cos(g, previous m_k rs) = (g rs) . m_k / (|g| |m_k rs|), from the momenta before this step's update.
    if c.fused:  # every statistic a reduction over one tensor's coordinates: fused loops
      old = m.unbind(-1)
      new = [torch.lerp(mk, g, theta.one_minus_decays[j]) for j, mk in enumerate(old)]
      norm = lambda value: torch.linalg.vector_norm(flat(value), dim=1, dtype=rec)  # noqa: E731
      statistics.append(torch.stack([torch.stack([norm(mk) for mk in new], dim=1),
                                     torch.stack([norm(mk * rs) for mk in new], dim=1),
                                     torch.stack([norm(mk * rs) for mk in old], dim=1),
                                     torch.stack([flat(grs * mk).sum(1) for mk in old], dim=1)], dim=1).to(rec))
      m.copy_(torch.stack(new, dim=-1))   # m_k <- b_k m_k + (1 - b_k) g
    else:
      by_tensor = m.view(count, group.size, k)
      dot = torch.bmm(flat(grs).unsqueeze(1), by_tensor).squeeze(1)
      scaled = m * rs.unsqueeze(-1)
      old_norm = torch.linalg.vector_norm(scaled.view(count, group.size, k), dim=1, dtype=rec)
      m.lerp_(g.unsqueeze(-1).expand_as(m), theta.one_minus_decays)   # m_k <- b_k m_k + (1 - b_k) g
      momentum_norm = torch.linalg.vector_norm(by_tensor, dim=1, dtype=rec)
      scaled = torch.mul(m, rs.unsqueeze(-1), out=scaled)
      statistics.append(torch.stack([momentum_norm, torch.linalg.vector_norm(
          scaled.view(count, group.size, k), dim=1, dtype=rec), old_norm, dot.to(rec)], dim=1))
    gradient_norms.append(torch.linalg.vector_norm(flat(grs), dim=1, dtype=rec))
    drift_norms.append(torch.linalg.vector_norm(flat(p - average), dim=1, dtype=rec))
    kept.append((g, p, rs))

  # The LSTM's inputs, the LSTM and its readouts: once for the bucket (recurrent dtype).
  # (5, n): |g| clipped, |g| raw, |p|, |p - a|, |g rs|;  (n, 4, K): |m_k|, |m_k rs|, |old m_k rs|, g rs . old m_k
  norms = torch.stack([torch.cat(clipped_norms), raw_norms, param_norms, torch.cat(drift_norms),
                       torch.cat(gradient_norms)])
  statistics = torch.cat(statistics)
  size, size_h = layout.size, h.shape[1]
  squares = norms.square()
  moment_squares = statistics[:, :3].square()
  # mean squares of the columns f (rows of squares by slices: an index list would be a host-to-device copy, which a
  # CUDA graph cannot capture)
  means = torch.cat([torch.cat([squares[:1], squares[2:4]]).t(), moment_squares[:, 0], squares[4, :, None],
                     moment_squares[:, 1]], dim=1) / size[:, None]
  new_rms = decay * old_rms + (1 - decay) * torch.sqrt(means[:, 0] + LOG_FLOOR)
  alignment = statistics[:, 3] / torch.sqrt(squares[0, :, None] * moment_squares[:, 2] + LOG_FLOOR)
  raw_rms = torch.sqrt(squares[1] / size + LOG_FLOOR)
  spike = torch.where(has_history, torch.clamp(torch.log(raw_rms + LOG_FLOOR) - torch.log(history + LOG_FLOOR), -5, 5)
                      / 5, torch.zeros_like(history))
  sizes_rms = torch.sqrt(torch.stack([means[:, 1], means[:, 4 + k] / adam_correction.square(), means[:, 2]], dim=1)
                         + LOG_FLOOR)                              # RMS of p, adam, p - a
  inputs = torch.cat([
      LOG_SCALE * torch.log(torch.cat([raw_rms[:, None], sizes_rms], dim=1) + LOG_FLOOR),
      old_ratio[:, None] * LOG_SCALE, spike[:, None], alignment, old_log_step[:, None] / LOG_STEP_LIMIT,
      layout.shape_features, feedback, features.expand(n, -1), h], dim=1)
  gates = torch.addmm(rtheta.lstm_b, inputs, rtheta.lstm_w)
  sigmoids = torch.sigmoid(gates)   # gates i, f, (g), o
  cell = torch.addcmul(sigmoids[:, size_h:2 * size_h] * cell_state, sigmoids[:, :size_h],
                       torch.tanh(gates[:, 2 * size_h:3 * size_h]))
  hidden = sigmoids[:, 3 * size_h:] * torch.tanh(cell)
  log_step = torch.addmv(torch.addmv(old_log_step + rtheta.step_b, hidden, rtheta.step_w), alignment,
                         rtheta.step_alignment)
  if rtheta.step_direct is not None:  # the LSTM's inputs without its own hidden state (the last columns)
    log_step = torch.addmv(log_step, inputs[:, :-size_h], rtheta.step_direct)
  log_step = log_step.clamp_(-LOG_STEP_LIMIT, c.max_log_step)
  schedule = features[-rtheta.step_schedule.shape[0]:] @ rtheta.step_schedule
  context = torch.tanh(torch.addmm(rtheta.context_b, hidden, rtheta.context_w))

  # The per-tensor first MLP layer (rows divided by the column norms, the context folded into the bias) and the
  # per-tensor last-layer bias (log step and schedule folded into the magnitude's): (n, ...) each.
  columns = 4 + 2 * k
  w0, b0 = theta.mlp[0]
  first_w = w0[:columns] / torch.sqrt(means + NORM_EPSILON).to(dtype)[:, :, None]   # (n, columns, units)
  first_b = torch.addmm(b0, context.to(dtype), w0[columns:])                          # (n, units)
  shift = (log_step + schedule).to(dtype)[:, None] * theta.magnitude   # (n, 2 + feedback)
  if c.num_layers == 0:
    first_w = first_w * theta.out_scale
    first_b = first_b * theta.out_scale + theta.out_shift + shift
    last_b = None
  else:
    last_b = theta.last_b + shift
  adam_factor = torch.reciprocal(adam_correction).neg_().to(dtype)    # (n,)

  # Pass 2, per group (eager: per chunk of its tensors, bounding the (count, units, size) temporaries): the MLP over
  # the coordinates, the update, the slow average. x: [direction_scale d, log(step_scale) + log step + schedule +
  # magnitude_scale mag, feedback...] per coordinate.
  update_norms, new_feedbacks = [], []
  for group, m, average, kept_group in zip(layout.groups, momenta, averages, kept):
    g, p, rs = kept_group
    chunks = ((0, group.stop - group.start),) if c.fused == "unrolled" else group.chunks
    for first, last in chunks:
      lo, hi, count, numel = group.start + first, group.start + last, last - first, group.size
      g_, p_, rs_, m_, a_ = g[first:last], p[first:last], rs[first:last], m[first:last], average[first:last]
      if c.fused == "unrolled":  # every unit of the MLP its own coordinate-wise expression: one fused loop
        per_tensor = lambda x: x.reshape(x.shape[:1] + (1,) * len(group.shape))  # noqa: E731
        scaled = [mk * rs_ for mk in m_.unbind(-1)]
        x = [g_, p_, p_ - a_, *m_.unbind(-1), g_ * rs_, *scaled]
        layers = [(first_w[lo:hi], first_b[lo:hi])] + theta.mlp[1:]
        for layer, (w, b) in enumerate(layers):
          if layer == c.num_layers and layer > 0:
            w, b = theta.last_w, last_b[lo:hi]
          if layer > 0:
            x = [torch.relu(unit) for unit in x]
          weight = (lambda j, o: per_tensor(w[:, j, o])) if layer == 0 else (lambda j, o: w[j, o])
          bias = (lambda o: per_tensor(b[:, o])) if b.dim() == 2 else (lambda o: b[o])
          x = [bias(o) + sum(unit * weight(j, o) for j, unit in enumerate(x)) for o in range(w.shape[-1])]
        update = torch.exp(x[1]) * torch.addcmul(x[0], scaled[0], per_tensor(adam_factor[lo:hi]))
        update = update.reshape(count, numel)
        new_feedbacks.append(torch.stack([torch.tanh(unit).reshape(count, numel).mean(1) for unit in x[2:]], dim=1)
                             if len(x) > 2 else update.new_zeros(count, 0))
      else:  # feature-major per tensor: (count, features, size) batches, matrix products per tensor
        by_tensor = m_.view(count, numel, k).transpose(1, 2)                    # (count, K, numel)
        rs_ = rs_.reshape(count, 1, numel)
        inputs = torch.empty(count, columns, numel, dtype=dtype, device=g.device)  # the columns, unnormalized
        inputs[:, 0] = g_.reshape(count, numel)
        inputs[:, 1] = p_.reshape(count, numel)
        torch.sub(p_.reshape(count, numel), a_.reshape(count, numel), out=inputs[:, 2])
        inputs[:, 3:3 + k] = by_tensor
        torch.mul(inputs[:, :1], rs_, out=inputs[:, 3 + k:4 + k])
        torch.mul(by_tensor, rs_, out=inputs[:, 4 + k:])
        if c.fused:  # wide MLPs, compiled: the first layer as a broadcast sum
          x = first_b[lo:hi, :, None] + sum(first_w[lo:hi, j, :, None] * inputs[:, j:j + 1] for j in range(columns))
        else:  # (the bias added in place: baddbmm would first copy the broadcast bias into its output)
          x = torch.bmm(first_w[lo:hi].transpose(1, 2), inputs).add_(first_b[lo:hi, :, None])
        for layer, (w, b) in enumerate(theta.mlp[1:], start=1):
          w, b = (theta.last_w, last_b[lo:hi, :, None]) if layer == c.num_layers else (w, b[:, None])
          x = torch.bmm(w.t().expand(count, -1, -1), x.relu_()).add_(b)
        # x: (count, 2 + feedback, numel); the Adam term from the column m_1 rs
        update = torch.exp(x[:, 1]).mul_(torch.addcmul(x[:, 0], inputs[:, 4 + k], adam_factor[lo:hi, None]))
        new_feedbacks.append(torch.tanh(x[:, 2:]).mean(2))
      update_norms.append(torch.linalg.vector_norm(update, dim=1, dtype=rec))
      # The average and the update ratio read p before the update (the decayed p, as JAX's params).
      a_.lerp_(p_, 1 - c.average_decay)
      targets = params[lo:hi]
      updates = update.view((count,) + group.shape).unbind(0)   # one view for the group, not one per tensor
      if isinstance(lr, torch.Tensor):
        for q, u in zip(targets, updates):
          q.addcmul_(u, lr)
      else:
        torch._foreach_add_(targets, updates, alpha=lr)

  # The recurrent state, written back for the whole bucket.
  update_rms = torch.sqrt(torch.cat(update_norms).square_() / size + LOG_FLOOR)
  ratio = torch.log(update_rms / (update_rms + sizes_rms[:, 0] + LOG_FLOOR) + LOG_FLOOR)
  scalars.copy_(torch.stack([new_rms, ratio, log_step]))
  h.copy_(hidden)
  cell_state.copy_(cell)
  feedback.copy_(torch.cat(new_feedbacks))
  steps.add_(1)


class FirstPass(NamedTuple):
  """What the kernels' first pass leaves for the second (``kernel_first_pass``): powers (3, n) [rho^t, b_1^t,
  decay^(t-1)], upper (n,) the clipping thresholds, sums (n, 4K + 5) the statistics, and per group (v, scale) from
  which the second pass recomputes rs."""
  powers: torch.Tensor
  upper: torch.Tensor
  sums: torch.Tensor
  kept: list


def kernel_first_pass(c: Constants, theta: Theta, rtheta: Theta, layout: Layout, momenta: list, seconds: list,
                      averages: list, scalars: torch.Tensor, steps: torch.Tensor, tables: torch.Tensor,
                      ok: torch.Tensor | None = None, check: bool = False) -> FirstPass:
  """The first half of ``update_bucket`` as the Triton kernels of ``triton_passes`` (float32, contiguous; one hidden
  layer of at most KERNEL_UNITS units). tables: (2, n) int64 on the device, the addresses of the gradients and the
  parameters (group order), read where they lie; ok: None, or a 0-d bool device tensor, the step's verdict on its
  gradients -- when false nothing is changed (a step skipped without the host reading it); check: ``ok`` is first
  set here, from the gradients. Reads neither the global features nor the learning rate, so that it can run before
  ``begin_step``.

  The verdict on the gradients (``check``); rho^t, b_1^t and decay^(t-1) (torch's pow, as the eager update); the
  clipping thresholds and bias corrections (``prepare``); per group the factored second moment's row and column sums
  and the statistics pass, whose per-tensor sums go to rows of one (n, 4K + 5) array."""
  from lopt.architectures.hierarchical import triton_passes
  n, k, rho = layout.size.shape[0], len(c.decays), c.rms_decay
  if check:  # the verdict, before anything is written
    ok.fill_(True)
    for group in layout.groups:
      triton_passes.check_finite(tables[0, group.start:group.stop], group.stop - group.start, group.size, ok)
  powers = torch.pow(rtheta.power_bases, steps.to(rtheta.power_bases.dtype) + rtheta.power_offsets)    # (3, n)
  upper, moment_correction = triton_passes.prepare(scalars, steps, powers, rtheta.clip_multiplier)
  # Per group: the second moment (factored: its rows and columns updated from the clipped g^2 sums), the momenta,
  # the statistics. rs = rsqrt(scale v + eps) is recomputed by the second pass from (v, scale).
  sums = torch.empty((n, 4 * k + 5), dtype=torch.float32, device=steps.device)
  kept = []
  for group, m, second, average in zip(layout.groups, momenta, seconds, averages):
    lo, hi, shape, count = group.start, group.stop, group.shape, group.stop - group.start
    if group.axes is None:
      (v,) = second
      scale = torch.reciprocal(moment_correction[lo:hi])     # rs = rsqrt(v / (1 - rho^t) + eps)
    else:
      a, b = group.axes[0] + 1, group.axes[1] + 1
      rows, cols = second
      row_sums, col_sums = triton_passes.factored_sums(tables[0, lo:hi], upper[lo:hi], count, shape, group.axes)
      for accumulator, total, length in ((rows, row_sums, shape[b - 1]), (cols, col_sums, shape[a - 1])):
        new = accumulator.mul_(rho) if ok is None else accumulator.mul(rho)  # (skippable: into a new tensor)
        new.add_(total.view(accumulator.shape), alpha=(1 - rho) / length).add_((1 - rho) * G2_EPSILON)
        if ok is not None:
          accumulator.copy_(torch.where(ok, new, accumulator))
      correction = moment_correction[lo:hi].reshape((count,) + (1,) * len(shape))
      scale, v = rows / (rows.mean(a, keepdim=True) * correction), cols
    triton_passes.statistics(tables[0, lo:hi], tables[1, lo:hi], upper[lo:hi], average, m, v, scale,
                             theta.one_minus_decays, group.axes, rho, G2_EPSILON, RSQRT_EPSILON, ok, out=sums[lo:hi])
    kept.append((v, scale))
  return FirstPass(powers, upper, sums, kept)


def kernel_second_pass(c: Constants, theta: Theta, rtheta: Theta, layout: Layout, features: torch.Tensor,
                       lr: torch.Tensor, momenta: list, averages: list, h: torch.Tensor, cell_state: torch.Tensor,
                       feedback: torch.Tensor, scalars: torch.Tensor, steps: torch.Tensor, tables: torch.Tensor,
                       ok: torch.Tensor | None, first: FirstPass) -> None:
  """The controller once for the bucket -- the LSTM, the log step, the MLP's per-tensor constants; h, c, the
  gradient RMS and the log step written there -- then per group the update pass (the MLP, p <- p + lr u, the slow
  average), then the update ratio, the feedback and the counts (``finish``)."""
  from lopt.architectures.hierarchical import triton_passes
  n = layout.size.shape[0]
  first_w, first_b, last_b, adam_factor, p_rms = triton_passes.controller(
      first.sums, first.powers, scalars, steps, h, cell_state, feedback, layout.size, layout.shape_features,
      features, rtheta, theta.mlp[0], theta.last_b, theta.magnitude, ok, c.max_log_step)
  update_sums = torch.empty((n, feedback.shape[1] + 1), dtype=torch.float32, device=h.device)
  for group, m, average, (v, scale) in zip(layout.groups, momenta, averages, first.kept):
    lo, hi = group.start, group.stop
    triton_passes.update(tables[0, lo:hi], tables[1, lo:hi], first.upper[lo:hi], average, m, v, scale,
                         first_w[lo:hi], first_b[lo:hi], theta.last_w, last_b[lo:hi], adam_factor[lo:hi], lr,
                         group.axes, RSQRT_EPSILON, 1 - c.average_decay, ok, out=update_sums[lo:hi])
  triton_passes.finish(update_sums, p_rms, layout.size, scalars, feedback, steps, ok)


class _Bucket(NamedTuple):
  """One bucket's bookkeeping for one step (``HierarchicalRule._bucket``): the tensors in group order, the state
  buffers and the update's arguments from them; for the kernels' update the verdict, the address tables on the device
  and the binding's CUDA graphs (None: eager)."""
  key: tuple
  device: torch.device
  dtype: torch.dtype
  rec: torch.dtype
  theta: Theta
  rtheta: Theta
  layout: Layout
  params: list
  grads: list
  buffers: Buffers
  arguments: tuple      # momenta, seconds, averages, h, c, feedback, scalars, steps
  compiled: object      # the compiled update, or None
  kernels: bool
  ok: torch.Tensor | None = None
  check: bool = False
  tables: torch.Tensor | None = None
  graphs: _Graphs | None = None
  first: FirstPass | None = None   # the first half's outputs, once it ran


class _Graphs:
  """A binding's two CUDA graphs (the halves of the kernels' update) and their static inputs: the buffers and layout
  bound, the verdict buffer, the device table of addresses (and what it holds), the first half's outputs; ``eager``:
  whether each half ran eagerly once (the binding's first step)."""

  def __init__(self, buffers: Buffers, layout: Layout, ok: torch.Tensor | None):
    self.buffers, self.layout, self.ok = buffers, layout, ok
    self.tables: torch.Tensor | None = None
    self.addresses: list | None = None    # the addresses last uploaded into ``tables``
    self.first: FirstPass | None = None
    self.graphs: list = [None, None]
    self.eager = [False, False]


class HierarchicalRule:
  """The hierarchical update for ``lopt.torch``: ``begin_step`` once per optimizer step (the losses, the horizon and
  the global state), then ``step`` per bucket of parameters (same group, device and dtype), changing parameters and
  their states in place; optionally ``start`` per bucket before ``begin_step``, to launch the update's first half
  early (the kernels'), and a verdict on the gradients given on the device (``ok``, ``skips_on_device``).

  Args:
    values: the architecture's fields, validated and normalized (``SPEC.validate``'s result).
    tensors: meta-parameters by key path (``spec.param_shapes``), float32 or float64; kept on the CPU as given and
      converted once per (device, dtype) that parameters use.
  """

  def __init__(self, values: dict, tensors: dict[str, torch.Tensor]):
    self.values = dict(values)
    self._decays = tuple(float(b) for b in values["momentum_decays"])
    self._tensors = {name: torch.as_tensor(value).detach().clone() for name, value in tensors.items()}
    self._theta_cache: dict = {}
    self._layout_cache: dict = {}
    self._global: list | None = None           # this step's global features (floats, float32 values)
    self._global_cache: dict = {}              # ... converted per (device, dtype, persistent)
    self._features: dict = {}                  # ... under CUDA graphs: one buffer per (device, dtype), kept
    self._staging = WeakIdKeyDictionary()      # per device buffer uploaded to: a pinned host buffer and an event
    self._lr_cache: dict = {}                  # the learning rate as a device tensor per bucket: compiled
    self._verdicts: dict = {}                  # under CUDA graphs: the step's gradient verdict, a buffer per device
    self._verdict_sources: dict = {}           # ... and the verdict last copied into it (kept: its identity is unique)
    self._graphs: dict = {}                    # kernels: per (bucket key, verdict, check), ``_Graphs``
    self._started: dict = {}                   # per bucket key, the ``_Bucket`` ``start`` prepared (and launched)
    self.graphs = True                         # kernels on CUDA: the update replayed as CUDA graphs (``_replay``)
    self._buffers: dict = {}                   # the state buffers (``Buffers``) per bucket key
    self._compile_mode: str | None = None      # None: eager
    self._compile_options: dict = {}           # torch.compile's keyword arguments
    self._cudagraphs = False                   # whether the compiled update runs as CUDA graphs
    self._compile_failed = False
    self._compiled: dict = {}                  # the compiled update per bucket layout
    self._views = WeakIdKeyDictionary()        # (1,) views of 0-d parameters, for the compiled update
    self._static: dict = {}                    # per bucket key, the (Buffers, Layout) whose tensors are marked static
    # The numbers the update reads, per form of the MLP ("": eager; the compiled update's form): built once.
    self._fused = "unrolled" if self._mlp_products() <= UNROLL_LIMIT else "matmul"
    self._constants = {fused: Constants(self._decays, self.values["rms_decay"], self.values["average_decay"],
                                        self.values["num_layers"], fused, max_log_step=self.values["max_log_step"])
                       for fused in ("", self._fused)}

  # -- states ------------------------------------------------------------------------------------------------------

  def state_shapes(self, p: torch.Tensor) -> dict[str, tuple[int, ...]]:
    """The shape every state entry of parameter ``p`` must have (loaded state dicts are checked against these)."""
    shape = tuple(p.shape)
    shapes = {"momentum": shape + (len(self._decays),)}
    if len(shape) >= 2:
      rows, cols = factored_shapes(shape)
      shapes.update(rows=rows, cols=cols)
    else:
      shapes["second_moment"] = shape
    size = self.values["lstm_size"]
    shapes.update(average=shape, h=(size,), c=(size,), log_step=(), gradient_rms=(), update_ratio=(),
                  feedback=(self.values["feedback_size"],), step=())
    return shapes

  def state_dtypes(self, p: torch.Tensor) -> dict[str, torch.dtype]:
    """The entries not kept in p's dtype (torch's ``load_state_dict`` casts every floating state tensor to it)."""
    dtype = recurrent_dtype(p.dtype)
    return {name: dtype for name in RECURRENT} | {"step": torch.int32}

  def init_state(self, p: torch.Tensor) -> dict[str, torch.Tensor]:
    """Zero momenta, second moments and recurrent states, the slow average at p, step 0 (``init_state`` of the
    JAX side). ``LearnedOptimizer`` calls it before the step changes p (weight decay included), as JAX initializes
    from the parameters before the first update."""
    dtypes = self.state_dtypes(p)
    state = {name: torch.zeros(shape, dtype=dtypes.get(name, p.dtype), device=p.device)
             for name, shape in self.state_shapes(p).items()}
    state["average"] = p.detach().clone()
    return state

  def reset(self) -> None:
    """Called after a state dict was loaded: forgets this step's global features (``begin_step`` recomputes them)
    and the state buffers (the next step gathers the loaded entries into new ones)."""
    self._global = None
    self._global_cache.clear()
    self._buffers.clear()
    self._static.clear()
    self._graphs.clear()
    self._started.clear()

  # -- compilation -------------------------------------------------------------------------------------------------

  def enable_compile(self, mode: str | dict | None = None) -> None:
    """Runs ``step`` through ``torch.compile``, one graph per bucket layout: ``mode`` is torch.compile's (None: its
    default), or a dict of its keyword arguments (``{"options": {"combo_kernels": True}}``, ``{"backend": ...}``).
    Falls back to eager, with one warning, where no compiler is available or compilation fails. Meant for GPUs
    (Triton); on the CPU the compiled update is correct but not faster than the eager one."""
    self._compile_options = dict(mode) if isinstance(mode, dict) else {"mode": mode}
    self._compile_mode = self._compile_options.get("mode") or "default"
    self._cudagraphs = self._compile_mode in ("reduce-overhead", "max-autotune") or bool(
        (self._compile_options.get("options") or {}).get("triton.cudagraphs"))
    self._compile_failed = False
    self._compiled.clear()
    self._static.clear()
    self._graphs.clear()
    self._started.clear()

  def _compiled_update(self, key: tuple):
    """The compiled ``update_bucket`` for the bucket layout ``key`` (device, dtype, shapes), or None (eager) with a
    warning when it cannot be compiled here. Each layout compiles its own copy of the function: torch.compile keeps
    its graphs, and its limit on their number, per code object."""
    if self._compile_mode is None or self._compile_failed:
      return None
    compiled = self._compiled.get(key)
    if compiled is None:
      missing = _missing_compiler(key[0])
      if missing:
        self._compile_failed = True
        warnings.warn(f"HierarchicalRule: compile requested but {missing}; running eager", stacklevel=3)
        return None
      if len(self._compiled) >= 64:
        self._compiled.clear()
      compiled = self._compiled[key] = torch.compile(_copy_function(update_bucket, len(self._compiled)),
                                                     **{"fullgraph": True, "dynamic": False, **self._compile_options})
    return compiled

  def enable_kernels(self, enabled: bool = True, warn: bool = False) -> None:
    """Runs the per-coordinate passes of eligible buckets (float32 tensors on a CUDA device, ``_kernel_bucket``)
    as the Triton kernels of ``triton_passes`` in the eager update (a compiled update keeps its own). Where Triton
    cannot be imported they stay off, with a warning when ``warn``."""
    if enabled and (self.values["num_layers"] != 1 or self.values["hidden_size"] > KERNEL_UNITS):
      if warn:
        warnings.warn(f"HierarchicalRule: the kernels take an MLP of one hidden layer of at most {KERNEL_UNITS} "
                      f"units, this one has {self.values['num_layers']} of {self.values['hidden_size']}; running "
                      f"PyTorch operations", stacklevel=3)
      enabled = False
    if enabled and warn:
      missing = _missing_triton()
      if missing:
        warnings.warn(f"HierarchicalRule: kernels requested but {missing}; running PyTorch operations", stacklevel=3)
    self._constants[""] = self._constants[""]._replace(kernels=enabled)
    self._graphs.clear()
    self._started.clear()

  # -- the update --------------------------------------------------------------------------------------------------

  @torch.no_grad()
  def begin_step(self, state: dict, *, loss=None, valid_loss=None, num_steps=None) -> None:
    """Once per optimizer step, before ``step``: folds the losses (None, or float32 values: floats or 0-d tensors;
    non-finite: none this step) into the accumulators of ``state`` (the optimizer-wide dict, filled on first use),
    counts the step, and computes the global features every tensor's LSTM reads this step."""
    if not state:
      state.update(init_global_state())
    accumulate(state, "train", loss)
    accumulate(state, "valid", valid_loss)
    step = state["step"]
    if step.dtype is torch.int32 and step.is_cpu:  # (in place, through numpy: a tenth of a tensor operation's time)
      step.numpy()[...] += 1
    else:  # a state dict loaded onto another device or in another dtype
      state["step"] = step.to(device="cpu", dtype=torch.int32) + 1
    self._global = loss_features(state) + time_features(state["step"], num_steps)
    self._global_cache.clear()

  def skips_on_device(self, params: list) -> bool:
    """Whether ``step`` takes the step's verdict on its gradients as a device flag (``ok``) for this bucket: the
    kernels' update (float32 contiguous tensors on a CUDA device, no ``compile``)."""
    return ((self._compile_mode is None or self._compile_failed) and self._constants[""].kernels
            and _kernel_bucket(params, [p.grad for p in params]))

  @torch.no_grad()
  def start(self, key, params: list[torch.Tensor], states: list[dict], lr: float,
            ok: torch.Tensor | None = None, check: bool = False) -> None:
    """Optional, before ``begin_step`` (arguments as ``step``'s, which must follow for the same bucket in this
    optimizer step): launches the part of the bucket's update that reads neither the losses nor the learning rate
    -- for the kernels' update, the first pass -- so that the device works on it while the host folds the losses
    into the global state. Other buckets only have their bookkeeping done here."""
    bucket = self._bucket(key, params, states, ok, check)
    self._started[key] = self._first_pass(bucket) if bucket.kernels else bucket  # (``step`` reuses it)

  @torch.no_grad()
  def step(self, key, params: list[torch.Tensor], states: list[dict], lr: float,
           ok: torch.Tensor | None = None, check: bool = False) -> None:
    """p <- p + lr * update for every p of one bucket (each has p.grad), updating ``states[i]`` (created here if
    ``init_state`` was not called). ``ok``: None, or -- for a bucket ``skips_on_device`` accepts -- a 0-d bool tensor
    on its device, false when the step is to change nothing (a non-finite gradient), read there, not on the host;
    ``check``: ``ok`` is a buffer (the same from step to step) this step sets from the bucket's gradients first.

    The bucket's state lives in buffers shared by its tensors (``Buffers``; each state entry a view of one), so that
    the update (``update_bucket``) runs per group of same-shaped tensors rather than per tensor."""
    if self._global is None:
      raise RuntimeError("HierarchicalRule.step: call begin_step first (once per optimizer step)")
    if not params:
      return
    bucket = self._started.pop(key, None)
    if bucket is None:
      bucket = self._bucket(key, params, states, ok, check)
      if bucket.kernels:
        bucket = self._first_pass(bucket)
    if bucket.kernels:
      self._second_pass(bucket, lr)
      return
    device, dtype, rec, layout, buffers = bucket.device, bucket.dtype, bucket.rec, bucket.layout, bucket.buffers
    theta, rec_theta, params, grads = bucket.theta, bucket.rtheta, bucket.params, bucket.grads
    compiled = bucket.compiled
    constants = self._constants["" if compiled is None else self._fused]
    static = compiled is not None and self._cudagraphs  # CUDA graphs: static inputs are not copied at each replay
    features = self._global_features(device, rec, persistent=static)
    arguments = bucket.arguments
    if compiled is not None:
      from torch._dynamo.exc import FailOnRecompileLimitHit, TorchDynamoException
      # torch.compile (2.13, Inductor on the CPU) loses in-place updates of 0-d float64 inputs: (1,) views of them
      inputs = (self._unit_views(layout, params), self._unit_views(layout, grads), *arguments)
      rate = self._lr(lr, key, device, dtype)
      marked = self._static.get(key)
      if static and (marked is None or marked[0] is not buffers or marked[1] is not layout):
        # once per binding: the same parameters, buffers and constants until the next
        self._mark_static([*inputs[0], *tree_leaves(arguments), *tree_leaves((theta, rec_theta)), layout.size,
                           layout.shape_features, features, rate])
        self._static[key] = (buffers, layout)
      try:  # fullgraph: a compiler failure surfaces before the graph runs, nothing has changed yet
        compiled(constants, theta, rec_theta, layout, features, rate, *inputs)
        return
      except (TorchDynamoException, FailOnRecompileLimitHit) as error:
        self._compile_failed = True
        warnings.warn(f"HierarchicalRule: torch.compile failed ({type(error).__name__}: {str(error)[:200]}); "
                      f"running eager", stacklevel=2)
        constants = constants._replace(fused="")
    update_bucket(constants, theta, rec_theta, layout, features, lr, params, grads, *arguments)

  # -- helpers -----------------------------------------------------------------------------------------------------

  def _bucket(self, key, params: list, states: list, ok: torch.Tensor | None, check: bool) -> _Bucket:
    """A bucket's bookkeeping for this step: states created where missing, the meta-parameters and layout, the
    tensors in group order, the state buffers bound, which update runs; for the kernels' update, the addresses of
    the gradients and parameters (read where they lie) and its CUDA graphs' entry."""
    for p, state in zip(params, states):
      if not state:
        state.update(self.init_state(p))
    device, dtype = params[0].device, params[0].dtype
    rec = recurrent_dtype(dtype)
    layout = self._layout(params, device, rec)
    params, states = list(map(params.__getitem__, layout.order)), list(map(states.__getitem__, layout.order))
    buffers = self._bind(key, layout, params, states)
    compiled = self._compiled_update((device, dtype, layout.shapes))
    grads = [p.grad for p in params]
    kernels = compiled is None and self._constants[""].kernels and _kernel_bucket(params, grads)
    if ok is not None and not kernels:
      raise RuntimeError("HierarchicalRule.step: a device verdict (ok) needs the kernels' update (skips_on_device)")
    arguments = (buffers.momenta, buffers.seconds, buffers.averages, buffers.h, buffers.c, buffers.feedback,
                 buffers.scalars, buffers.steps)
    bucket = _Bucket(key, device, dtype, rec, self._theta(device, dtype), self._theta(device, rec), layout, params,
                     grads, buffers, arguments, compiled, kernels)
    if not kernels:
      return bucket
    addresses = [list(map(_ADDRESS, grads)), list(map(_ADDRESS, params))]
    if not (self.graphs and device.type == "cuda"):
      return bucket._replace(ok=ok, check=check, tables=torch.tensor(addresses, dtype=torch.int64).to(device))
    verdict = None if ok is None else ok if check else self._verdict(ok)
    graphs = self._graphs.get((key, ok is not None, check))
    if graphs is None or graphs.buffers is not buffers or graphs.layout is not layout or graphs.ok is not verdict:
      graphs = self._graphs[(key, ok is not None, check)] = _Graphs(buffers, layout, verdict)  # a new binding
      tables = torch.tensor(addresses, dtype=torch.int64).to(device)  # (its first step runs eagerly)
    elif addresses == graphs.addresses:  # (the usual case: the caching allocator hands out the same blocks)
      tables = graphs.tables
    else:
      if graphs.tables is None:
        graphs.tables = torch.empty((2, len(grads)), dtype=torch.int64, device=device)
      tables = self._upload(addresses, graphs.tables)
      graphs.addresses = addresses
    return bucket._replace(ok=verdict, check=check, tables=tables, graphs=graphs)

  def _first_pass(self, bucket: _Bucket) -> _Bucket:
    """The first half of the kernels' update (``kernel_first_pass``), eagerly or as a CUDA graph (``_replay``):
    ``bucket`` with its outputs."""
    b = bucket
    run = lambda: kernel_first_pass(  # noqa: E731
        self._constants[""], b.theta, b.rtheta, b.layout, *b.arguments[:3], *b.arguments[6:], b.tables, b.ok,
        b.check)
    first = run() if b.graphs is None else self._replay(b.graphs, 0, run)
    return b._replace(first=b.graphs.first if first is None else first)

  def _second_pass(self, bucket: _Bucket, lr: float) -> None:
    """The second half (``kernel_second_pass``), after ``begin_step``: eagerly, or as a CUDA graph."""
    b = bucket
    features = self._global_features(b.device, b.rec, persistent=b.graphs is not None)
    rate = self._lr(lr, b.key, b.device, b.dtype)
    run = lambda: kernel_second_pass(  # noqa: E731
        self._constants[""], b.theta, b.rtheta, b.layout, features, rate, b.arguments[0], b.arguments[2],
        *b.arguments[3:], b.tables, b.ok, b.first)
    if b.graphs is None:
      run()
    else:
      self._replay(b.graphs, 1, run)

  def _replay(self, graphs: _Graphs, half: int, run):
    """Runs one half of the kernels' update of a binding (these buffers, layout and verdict) as a CUDA graph. The
    binding's first step runs eagerly -- on a side stream, as capture needs, compiling the kernels -- its second
    captures the half and every later one replays it. The kernels read the gradients and parameters through the
    binding's table of their addresses (refreshed before each replay: a backward pass makes new gradient tensors),
    the learning rate from a device tensor and the global features and the verdict from persistent buffers, so
    that nothing needs a new graph; the first half's outputs stay the graph's, read by the second. A replay costs
    the host one call where the eager update costs it about a hundred operations. Returns ``run()``'s result where
    it ran (eagerly or captured), None where it was replayed."""
    device = graphs.layout.size.device
    if not graphs.eager[half]:
      stream = torch.cuda.Stream(device)
      stream.wait_stream(torch.cuda.current_stream(device))
      with torch.cuda.stream(stream):
        result = run()
      torch.cuda.current_stream(device).wait_stream(stream)
      graphs.eager[half] = True
      return result
    result = None
    if graphs.graphs[half] is None:
      graph = torch.cuda.CUDAGraph()
      with torch.cuda.graph(graph, capture_error_mode="thread_local"):
        result = run()
      graphs.graphs[half] = graph
      if half == 0:
        graphs.first = result
    graphs.graphs[half].replay()
    return result

  def _mlp_products(self) -> int:
    """Multiplications per coordinate in the MLP's layers (the context folded into the first layer's bias)."""
    shapes = [tuple(self._tensors[f"mlp/{i}/w"].shape) for i in range(self.values["num_layers"] + 1)]
    return sum(fan_in * fan_out for fan_in, fan_out in shapes) - self.values["context_size"] * shapes[0][1]

  def _bind(self, key, layout: Layout, params: list, states: list) -> Buffers:
    """The bucket's state buffers: last step's when every state entry is still the view handed out then (the usual
    case), else new ones gathered from the entries -- at the first step, after a state dict was loaded, when the
    bucket's tensors changed (a parameter without a gradient) -- in the dtype and on the device each entry needs,
    and every entry replaced by its view. ``params`` and ``states`` in the layout's group order."""
    buffers = self._buffers.get(key)
    if buffers is not None and _unchanged(states, buffers.entries):
      return buffers
    p = params[0]
    device, dtype, rec = p.device, p.dtype, recurrent_dtype(p.dtype)
    gather = lambda name, chosen, kind=dtype: torch.stack(  # noqa: E731
        [state[name].to(device=device, dtype=kind) for state in chosen])
    momenta, seconds, averages = [], [], []
    for group in layout.groups:
      chosen = states[group.start:group.stop]
      momenta.append(gather("momentum", chosen))
      averages.append(gather("average", chosen))
      names = ("second_moment",) if group.axes is None else ("rows", "cols")
      seconds.append(tuple(gather(name, chosen) for name in names))
    scalars = torch.stack([gather(name, states, rec) for name in ("gradient_rms", "update_ratio", "log_step")])
    buffers = Buffers(momenta, seconds, averages, gather("h", states, rec), gather("c", states, rec),
                      gather("feedback", states, rec), scalars, gather("step", states, torch.int32), [])
    for group, m, second, average in zip(layout.groups, momenta, seconds, averages):
      names = ("second_moment",) if group.axes is None else ("rows", "cols")
      for j, index in enumerate(range(group.start, group.stop)):
        states[index].update({
            "momentum": m[j], "average": average[j], **{name: v[j] for name, v in zip(names, second)},
            "h": buffers.h[index], "c": buffers.c[index], "feedback": buffers.feedback[index],
            "gradient_rms": scalars[0, index], "update_ratio": scalars[1, index], "log_step": scalars[2, index],
            "step": buffers.steps[index]})
    buffers.entries.extend(chain.from_iterable(map(dict.values, states)))
    self._buffers[key] = buffers
    return buffers

  def _mark_static(self, tensors: list) -> None:
    """Under CUDA graphs (modes "reduce-overhead", "max-autotune"), the compiled update's tensor inputs that keep
    their address from step to step marked as static addresses: every tensor the update changes (cudagraphs accept
    in-place updates only there), and the meta-parameters, the layout's constants, the learning rate and the global
    features' buffer -- a replay reads these in place, where it copies every other input into the graph's own
    (host work per input and step). Only the gradients remain (new tensors at every backward pass)."""
    from torch._dynamo import mark_static_address
    for value in tensors:
      if getattr(value, "_dynamo_static_input_type", None) is None:
        mark_static_address(value)

  def _unit_views(self, layout: Layout, tensors: list) -> list:
    """``tensors`` (group order) with the 0-d ones as (1,) views (``_unit_view``); no call per tensor when the
    layout has none."""
    tensors = list(tensors)
    for group in layout.groups:
      if not group.shape:
        tensors[group.start:group.stop] = map(self._unit_view, tensors[group.start:group.stop])
    return tensors

  def _unit_view(self, value: torch.Tensor) -> torch.Tensor:
    """A 0-d tensor as a (1,) view, cached per tensor (the compiled update's inputs keep their identity from step to
    step); others as they are."""
    if value.dim() != 0:
      return value
    view = self._views.get(value)
    if view is None:
      view = self._views[value] = value.detach().view(1)
    return view

  def _global_features(self, device: torch.device, dtype: torch.dtype, persistent: bool = False) -> torch.Tensor:
    """This step's global features on ``device`` in ``dtype`` (converted once per step); ``persistent`` (CUDA
    graphs): copied into a buffer kept from step to step, a static input of the graphs."""
    key = (device, dtype, persistent)
    value = self._global_cache.get(key)
    if value is None:
      shape = (len(self._global),)
      if persistent:
        buffer = self._features.get(key[:2])
        if buffer is None or buffer.shape != shape:
          buffer = self._features[key[:2]] = torch.empty(shape, dtype=dtype, device=device)
        value = self._upload(self._global, buffer)
      elif device.type == "cuda":  # through pinned memory: a copy that does not wait for the device
        value = torch.tensor(self._global, dtype=dtype, pin_memory=True).to(device=device, non_blocking=True)
      else:
        value = torch.tensor(self._global, dtype=dtype)
      self._global_cache[key] = value
    return value

  def _verdict(self, ok: torch.Tensor) -> torch.Tensor:
    """``ok`` copied into its device's persistent buffer (a static input of the graphs), once per verdict (the
    buckets of a step share one)."""
    device = ok.device
    buffer = self._verdicts.get(device)
    if buffer is None:
      buffer = self._verdicts[device] = torch.ones((), dtype=torch.bool, device=device)
    if self._verdict_sources.get(device) is not ok:
      buffer.copy_(ok)
      self._verdict_sources[device] = ok
    return buffer

  def _upload(self, value, target: torch.Tensor) -> torch.Tensor:
    """``target`` (a device buffer) <- ``value`` (a CPU tensor, or nested lists of numbers) of target's shape, on
    a CUDA device through a pinned buffer kept per target, so that the copy does not wait for the device; the pinned
    buffer is refilled once its previous copy is done (an event; long done by then, as a rule)."""
    if target.device.type != "cuda":
      return target.copy_(torch.as_tensor(value, dtype=target.dtype))
    staging = self._staging.get(target)
    if staging is None:
      staging = self._staging[target] = (torch.empty(target.shape, dtype=target.dtype, pin_memory=True),
                                         torch.cuda.Event())
    pinned, copied = staging
    copied.synchronize()
    if isinstance(value, torch.Tensor):
      pinned.copy_(value)
    else:  # (through numpy: a fraction of a tensor's construction)
      pinned.numpy()[...] = value
    target.copy_(pinned, non_blocking=True)
    copied.record(torch.cuda.current_stream(target.device))
    return target

  def _lr(self, lr: float, key, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """lr as a 0-d device tensor per bucket ``key`` (compiled: a new value is no new graph), refilled when it
    changes."""
    key = (key, device, dtype)
    cached = self._lr_cache.get(key)
    if cached is None:
      cached = self._lr_cache[key] = [None, torch.zeros((), dtype=dtype, device=device)]
    if cached[0] != lr:
      cached[1].fill_(lr)
      cached[0] = lr
    return cached[1]

  def _theta(self, device: torch.device, dtype: torch.dtype) -> Theta:
    key = (device, dtype)
    if key not in self._theta_cache:
      self._theta_cache[key] = prepare_theta(self._tensors, self.values, self._decays, dtype, device)
    return self._theta_cache[key]

  def _layout(self, params: list[torch.Tensor], device: torch.device, rec: torch.dtype) -> Layout:
    key = (device, rec, tuple(map(_SHAPE, params)))  # (torch.Size: a tuple, hashed and compared as one)
    layout = self._layout_cache.get(key)
    if layout is None:
      if len(self._layout_cache) > 64:
        self._layout_cache.clear()
      layout = self._layout_cache[key] = make_layout(tuple(map(tuple, key[2])), device, rec)
    return layout


_SHAPE = operator.attrgetter("shape")


def _unchanged(states: list, entries: list) -> bool:
  """Whether the values of the dicts ``states``, in order, are the objects ``entries`` -- by identity, in one pass of
  C loops: a bucket's state has a dozen entries per tensor, compared at every step."""
  return (sum(map(len, states)) == len(entries)
          and all(map(operator.is_, chain.from_iterable(map(dict.values, states)), entries)))


def _copy_function(function, index: int):
  """``function`` with a code object of its own (named ``<name>_<index>``)."""
  code = function.__code__
  code = code.replace(co_name=f"{code.co_name}_{index}", **(
      {"co_qualname": f"{code.co_qualname}_{index}"} if hasattr(code, "co_qualname") else {}))
  return types.FunctionType(code, function.__globals__, code.co_name, function.__defaults__, function.__closure__)


_TRITON: list = []  # [None] once ``triton_passes`` imported, [reason] once it failed (tried once per process)


def _missing_triton() -> str | None:
  """Why ``triton_passes`` cannot run here, or None (imported on first use)."""
  if not _TRITON:
    try:
      from lopt.architectures.hierarchical import triton_passes  # noqa: F401
      _TRITON.append(None)
    except Exception as error:  # ImportError, or Triton failing to initialize
      _TRITON.append(f"Triton cannot be imported ({type(error).__name__}: {str(error)[:120]})")
  return _TRITON[0]


def _missing_compiler(device: torch.device) -> str | None:
  """Why torch.compile cannot compile for ``device`` here, or None."""
  if not hasattr(torch, "compile"):
    return "this torch has no torch.compile"
  if device.type == "cuda":
    return None if importlib.util.find_spec("triton") is not None else "Triton is not installed"
  if device.type == "cpu":
    compilers = [os.environ.get("CXX"), "g++", "c++", "clang++"]
    return None if any(name and shutil.which(name) for name in compilers) else "no C++ compiler was found"
  return None
