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
  log_step <- clip(log_step + w_s . h + b_s + alignment . cos, -8, 8);  context = tanh(h W_c + b_c)
  (d, mag, feedback) = MLP([f, context]) per coordinate;  feedback <- mean over S of tanh(feedback)
  u     = step_scale exp(log_step + schedule . time + magnitude_scale mag) (direction_scale d - adam);  p <- p + lr u
  a    <- average_decay a + (1 - average_decay) p;  ratio <- log(RMS u / (RMS u + RMS p) + 1e-30)   (p before the step)

The state of p (``state_shapes``): ``momentum`` S + (K,), ``rows``/``cols`` (``mlp.spec.factored_shapes``) when
ndim S >= 2 or else ``second_moment`` S, ``average`` S, all in p's dtype; the LSTM's ``h`` and ``c`` (lstm_size,),
``log_step``, ``gradient_rms`` (e), ``update_ratio`` () and ``feedback`` (feedback_size,) in p's dtype promoted to at
least float32 (the JAX layout: a bfloat16 model keeps a float32 recurrent state); ``step``, an int32 0-d count.

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

How a step is computed (``update_bucket``; on a GPU an update of this kind is bound by kernel launches and host-device
synchronizations rather than arithmetic): ``step`` never reads a device value on the host -- thresholds, bias
corrections and counts stay on the device -- the global features reach the device through pinned memory without a
synchronization, and constants are cached per (device, dtype) and per bucket layout. Everything per tensor that is a
number or a short vector (step counts, clipping thresholds, bias corrections, the LSTM's inputs, the LSTM and its
readouts, the MLP's per-tensor first-layer weights and last-layer bias, the state write-back) is computed once for
the bucket on stacked (tensors, ...) arrays or with ``torch._foreach_*`` (one launch for all tensors). Per tensor
remain three passes over its coordinates -- its second moment; its statistics and momenta; its coordinate update --
each a few reductions (vector norms, one matrix-vector product) and elementwise operations, with full-size
temporaries for one tensor at a time. The normalizers divide the first layer's rows, the context and the constant
factors fold into the biases and the last layer: u = exp(y_1) (y_0 - adam), y the MLP's output.

``compile`` (``HierarchicalRule.enable_compile``; ``LearnedOptimizer(..., compile=True)``) runs ``update_bucket``
through ``torch.compile``, one graph per bucket layout, with the per-coordinate MLP unrolled into coordinate-wise
expressions so that each tensor's coordinate update is one loop (the MLP computed once per coordinate, its
intermediate never stored). Without a compiler (Triton for CUDA, a C++ compiler for the CPU), or when compilation
fails, it warns once and stays eager.
"""

from __future__ import annotations

import importlib.util
import math
import os
import shutil
import types
import warnings
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.weak import WeakIdKeyDictionary

from lopt.architectures.hierarchical.spec import FRACTION_POWERS, LOSS_DECAYS, TIME_SCALES
from lopt.architectures.mlp.spec import factored_axes, factored_shapes

# optimizer.py's constants (it says why).
RSQRT_EPSILON = 1e-12
NORM_EPSILON = 1e-12
LOG_FLOOR = 1e-30
LOG_STEP_LIMIT = 8.0
LOG_SCALE = 0.1
G2_EPSILON = 1e-30  # the second moment's g^2 + eps (mlp architecture)

RECURRENT = ("h", "c", "log_step", "gradient_rms", "update_ratio", "feedback")  # state kept in at least float32
UNROLL_LIMIT = 512  # compiled: the MLP unrolled into coordinate-wise expressions up to this many products


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
      magnitude, mlp[-1][0] * scale, mlp[-1][1] * scale + magnitude * math.log(values["step_scale"]))


class Constants(NamedTuple):
  """The architecture's numbers the update reads (Python values: constants of a compiled graph)."""
  decays: tuple
  rms_decay: float
  average_decay: float
  num_layers: int
  fused: str    # "" (eager: the MLP as matrix products); for torch.compile, "unrolled" (each unit of the MLP a
  #               coordinate-wise expression: one fused loop) or "matmul" (wide MLPs: the first layer as a broadcast
  #               sum, the others matrix products)


class Layout(NamedTuple):
  """A bucket's shapes and what follows from them, cached per (device, dtype, shapes)."""
  shapes: tuple
  sizes: tuple            # numel per tensor
  axes: tuple             # factored axes (a, b) per tensor, or None (ndim < 2: a full second moment)
  size: torch.Tensor      # (n,) the sizes, in the recurrent dtype
  shape_features: torch.Tensor  # (n, 4) ``shape_features`` per tensor, in the recurrent dtype


def recurrent_dtype(dtype: torch.dtype) -> torch.dtype:
  """The recurrent state's dtype for parameters of ``dtype``: at least float32 (JAX's result_type(dtype, float32))."""
  return torch.promote_types(dtype, torch.float32)


def shape_features(shape: tuple[int, ...]) -> np.ndarray:
  """(4,) float32: is-scalar, is-vector, log(size) / 10, rank / 4 (``optimizer.shape_features``)."""
  size = math.prod(shape) if shape else 1
  return np.array([size == 1, len(shape) == 1, np.log(size) / 10, len(shape) / 4], np.float32)


# -- global features (float32 on the CPU, as the JAX side's) ---------------------------------------------------------

def _f32(value: float) -> float:
  return float(np.float32(value))


# float32 constants, as the JAX side's.
_DECAYS = tuple(_f32(d) for d in LOSS_DECAYS)
_ONE_MINUS_DECAYS = tuple(float(np.float32(1) - np.float32(d)) for d in LOSS_DECAYS)
_LOG_FLOOR = _f32(LOG_FLOOR)


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


def accumulate(state: dict, name: str, loss) -> None:
  """Folds ``loss`` (None, or a float32 0-d tensor) into the ``name`` accumulators of ``state``; a non-finite loss
  leaves them unchanged (``optimizer.accumulate``).

  Host arithmetic on a handful of numbers, as Python floats rounded to float32 after every operation: float32
  arithmetic exactly (double rounding is harmless for + - * /), log and tanh within an ulp of torch's, and ~50x
  cheaper than tensor operations on the host."""
  if loss is None:
    return
  loss = _f32(float(loss))
  if not math.isfinite(loss):
    return
  seen, first, last, ema = (_array(state, f"{name}_{part}") for part in ("seen", "first", "last", "ema"))
  x = _f32(math.log(max(loss, _LOG_FLOOR)))
  if seen > 0:
    ema[...] = [_f32(_f32(d * float(e)) + _f32(c * x)) for d, c, e in zip(_DECAYS, _ONE_MINUS_DECAYS, ema)]
  else:
    ema[...] = x
    first[...] = x
  seen[...] = 1.0
  last[...] = x


def loss_features(state: dict) -> torch.Tensor:
  """(NUM_LOSS_FEATURES,) float32 (``optimizer.loss_features``)."""
  def one(name):
    seen, first, last = (float(_array(state, f"{name}_{part}")) for part in ("seen", "first", "last"))
    ema = _array(state, f"{name}_ema").tolist()
    return ([seen, seen * math.tanh(_f32(last - first) / 4)]
            + [seen * math.tanh(4 * _f32(last - e)) for e in ema])
  value = lambda key: float(_array(state, key))  # noqa: E731
  gap = value("valid_seen") * value("train_seen") * math.tanh(
      _f32(value("valid_last") - float(_array(state, "train_ema")[-1]))
      - _f32(value("valid_first") - value("train_first")))
  return torch.tensor(one("train") + one("valid") + [gap], dtype=torch.float32)


def time_features(step, num_steps) -> torch.Tensor:
  """(len(TIME_SCALES) + len(FRACTION_POWERS),) float32 for the new global count ``step`` (a tensor or a number;
  ``optimizer.time_features``)."""
  t = _f32(int(step))
  fraction = 0.0
  if num_steps is not None:
    horizon = _f32(num_steps)
    if horizon > 0:
      fraction = min(max(_f32(t / max(horizon, 1.0)), 0.0), 1.0)
  return torch.tensor([math.tanh(_f32(t / tau)) for tau in TIME_SCALES] + [fraction ** q for q in FRACTION_POWERS],
                      dtype=torch.float32)  # rounded to float32 here


def rms(x: torch.Tensor) -> torch.Tensor:
  return torch.sqrt(torch.mean(x * x) + LOG_FLOOR)


def clip(g: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
  """jnp.clip(g, -threshold, threshold) for a 0-d threshold (inf: no clipping)."""
  return torch.minimum(torch.maximum(g, -threshold), threshold)


# -- the update of one bucket ----------------------------------------------------------------------------------------

def update_bucket(c: Constants, theta: Theta, rtheta: Theta, layout: Layout, features: torch.Tensor, lr,
                  params: list, grads: list, momenta: list, seconds: list, averages: list, hs: list, cs: list,
                  log_steps: list, gradient_rms: list, update_ratios: list, feedbacks: list, steps: list) -> None:
  """p <- p + lr u for every p of one bucket (same device and dtype), the states updated in place.

  theta / rtheta: the meta-parameters in p's dtype / the recurrent dtype; features: this step's global features in
  the recurrent dtype; lr: a number, or a 0-d tensor on the device (compiled: no recompilation when it changes);
  seconds: per tensor (rows, cols) when factored, else (second_moment,); the other lists: the state entries of each
  tensor (``HierarchicalRule.state_shapes``). Never reads a value on the host."""
  n, k = len(params), len(c.decays)
  dtype, rec = params[0].dtype, hs[0].dtype
  sizes, axes = layout.sizes, layout.axes
  size = layout.size
  rho = c.rms_decay
  factored = [i for i in range(n) if axes[i] is not None]
  full = [i for i in range(n) if axes[i] is None]

  # Per tensor numbers, for the whole bucket at once (recurrent dtype).
  t = torch.stack(steps).add(1).to(rec)                          # each tensor's new count
  scalars = torch.stack(gradient_rms + update_ratios + log_steps).view(3, n)
  old_rms, old_ratio, old_log_step = scalars.unbind(0)
  size_h, size_f = hs[0].numel(), feedbacks[0].numel()
  old_h, old_c, old_feedback = torch.cat(hs + cs + feedbacks).split([n * size_h, n * size_h, n * size_f])
  old_h, old_c, old_feedback = old_h.view(n, size_h), old_c.view(n, size_h), old_feedback.view(n, size_f)
  decay = rtheta.clip_decay
  history = old_rms / torch.clamp(1 - decay ** (t - 1), min=1e-12)
  has_history = (t > 1) & (old_rms > 0)
  threshold = torch.where(has_history, rtheta.clip_multiplier * history, torch.full_like(history, math.inf))
  upper = threshold.to(dtype)
  lower, upper = torch.neg(upper).unbind(0), upper.unbind(0)
  moment_correction, adam_correction = (1 - torch.pow(rtheta.correction_bases, t)).unbind(0)  # 1 - rho^t, 1 - b_1^t
  raw_norms = torch._foreach_norm(grads, dtype=rec)              # |g| before clipping
  param_norms = torch._foreach_norm(params, dtype=rec)

  # Pass 1: the second moment, from the clipped gradient (factored: its row and column sums of squares).
  clipped_norms = [None] * n
  full_moments = [seconds[i][0] for i in full]
  if full_moments:
    torch._foreach_mul_(full_moments, rho)
  accumulators, sums, weights = [], [], []
  for i in range(n):
    g = torch.clamp(grads[i], lower[i], upper[i])
    if axes[i] is None:
      seconds[i][0].addcmul_(g, g, value=1 - rho)
      clipped_norms[i] = torch.linalg.vector_norm(g, dtype=rec)
    else:
      a, b = axes[i]
      shape = params[i].shape
      accumulators += [seconds[i][0], seconds[i][1]]
      sums += [torch.linalg.vector_norm(g, dim=b, keepdim=True, dtype=rec),
               torch.linalg.vector_norm(g, dim=a, keepdim=True, dtype=rec)]
      weights += [(1 - rho) / shape[b], (1 - rho) / shape[a]]
  if factored:
    torch._foreach_mul_(accumulators, rho)
    torch._foreach_addcmul_(accumulators, sums, sums, weights)   # + (1 - rho) mean over the axis of g^2
    for i, norm in zip(factored, torch._foreach_norm(sums[1::2])):
      clipped_norms[i] = norm
  if accumulators or full_moments:
    torch._foreach_add_(accumulators + full_moments, (1 - rho) * G2_EPSILON)
  # rsqrt(v / (1 - rho^t) + eps) = rsqrt(scale other + eps): scale = rows / (mean_a rows (1 - rho^t)) and
  # other = cols when factored, else scale = 1 / (1 - rho^t) and other = the second moment.
  scales = [None] * n
  if factored:
    correction = moment_correction.to(dtype).unbind(0)
    means = [seconds[i][0].mean(axes[i][0], keepdim=True) for i in factored]
    torch._foreach_mul_(means, [correction[i] for i in factored])
    for i, scale in zip(factored, torch._foreach_div([seconds[i][0] for i in factored], means)):
      scales[i] = scale
  if full:
    inverse = torch.reciprocal(moment_correction).to(dtype).unbind(0)
    for i in full:
      scales[i] = inverse[i]

  def rsqrt_estimate(i):
    other = seconds[i][1] if axes[i] is not None else seconds[i][0]
    return torch.addcmul(theta.rsqrt_epsilon, scales[i], other).rsqrt_()

  # Pass 2: the momenta, and the statistics of every feature column (root sums of squares), alignments.
  drift_norms, gradient_norms, statistics = [], [], []
  for i in range(n):
    p, m, average, count = params[i], momenta[i], averages[i], sizes[i]
    g = torch.clamp(grads[i], lower[i], upper[i])
    rs = rsqrt_estimate(i)
    grs = g * rs
    # cos(g, previous m_k rs) = (g rs) . m_k / (|g| |m_k rs|), from the momenta before this step's update.
    if c.fused:  # every statistic a full reduction over the coordinates: one fused loop
      old = m.unbind(-1)
      new = [torch.lerp(mk, g, theta.one_minus_decays[j]) for j, mk in enumerate(old)]
      norm = lambda value: torch.linalg.vector_norm(value, dtype=rec)  # noqa: E731
      statistics += [torch.stack([norm(mk) for mk in new]), torch.stack([norm(mk * rs) for mk in new]),
                     torch.stack([norm(mk * rs) for mk in old]), torch.stack([(grs * mk).sum() for mk in old])]
      m.copy_(torch.stack(new, dim=-1))   # m_k <- b_k m_k + (1 - b_k) g
    else:
      dot = torch.mv(m.reshape(count, k).t(), grs.reshape(count))
      rs = rs.unsqueeze(-1)
      scaled = m * rs
      old_norm = torch.linalg.vector_norm(scaled.reshape(count, k), dim=0, dtype=rec)
      m.lerp_(g.unsqueeze(-1).expand_as(m), theta.one_minus_decays)   # m_k <- b_k m_k + (1 - b_k) g
      momentum_norm = torch.linalg.vector_norm(m.reshape(count, k), dim=0, dtype=rec)
      scaled = torch.mul(m, rs, out=scaled)
      statistics += [momentum_norm, torch.linalg.vector_norm(scaled.reshape(count, k), dim=0, dtype=rec), old_norm,
                     dot]
    gradient_norms.append(torch.linalg.vector_norm(grs, dtype=rec))
    drift_norms.append(torch.dist(p, average) if dtype == rec and not c.fused
                       else torch.linalg.vector_norm(p - average, dtype=rec))

  # The LSTM's inputs, the LSTM and its readouts: once for the bucket (recurrent dtype).
  # (5, n): |g| clipped, |g| raw, |p|, |p - a|, |g rs|;  (n, 4, K): |m_k|, |m_k rs|, |old m_k rs|, g rs . old m_k
  norms = torch.stack([*clipped_norms, *raw_norms, *param_norms, *drift_norms, *gradient_norms]).view(5, n)
  statistics = torch.cat(statistics).to(rec).view(n, 4, k)
  squares = norms.square()
  moment_squares = statistics[:, :3].square()
  means = torch.cat([squares[[0, 2, 3]].t(), moment_squares[:, 0], squares[4, :, None], moment_squares[:, 1]],
                    dim=1) / size[:, None]                         # mean squares of the columns f
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
      layout.shape_features, old_feedback, features.expand(n, -1), old_h], dim=1)
  gates = torch.addmm(rtheta.lstm_b, inputs, rtheta.lstm_w)
  sigmoids = torch.sigmoid(gates)   # gates i, f, (g), o
  cell = torch.addcmul(sigmoids[:, size_h:2 * size_h] * old_c, sigmoids[:, :size_h],
                       torch.tanh(gates[:, 2 * size_h:3 * size_h]))
  hidden = sigmoids[:, 3 * size_h:] * torch.tanh(cell)
  log_step = torch.addmv(torch.addmv(old_log_step + rtheta.step_b, hidden, rtheta.step_w), alignment,
                         rtheta.step_alignment).clamp_(-LOG_STEP_LIMIT, LOG_STEP_LIMIT)
  schedule = features[-rtheta.step_schedule.shape[0]:] @ rtheta.step_schedule
  context = torch.tanh(torch.addmm(rtheta.context_b, hidden, rtheta.context_w))

  # The per-tensor first MLP layer (rows divided by the column norms, the context folded into the bias) and the
  # per-tensor last-layer bias (log step and schedule folded into the magnitude's): (n, ...) each.
  columns = 4 + 2 * k
  w0, b0 = theta.mlp[0]
  first_w = w0[:columns] / torch.sqrt(means + NORM_EPSILON).to(dtype)[:, :, None]
  first_b = torch.addmm(b0, context.to(dtype), w0[columns:])
  shift = (log_step + schedule).to(dtype)[:, None] * theta.magnitude   # (n, 2 + feedback)
  if c.num_layers == 0:
    first_w = first_w * theta.out_scale
    first_b = first_b * theta.out_scale + theta.out_shift + shift
    last_b = None
  else:
    last_b = theta.last_b + shift
  adam_factor = torch.reciprocal(adam_correction).neg_().to(dtype).unbind(0)

  # Pass 3: per tensor, the MLP over its coordinates, the update, the slow average.
  update_norms, new_feedbacks = [], []
  for i in range(n):
    p, m, average, count = params[i], momenta[i], averages[i], sizes[i]
    g = torch.clamp(grads[i], lower[i], upper[i])
    rs = rsqrt_estimate(i)
    if c.fused == "unrolled":  # every unit of the MLP its own coordinate-wise expression: one fused loop
      scaled = [mk * rs for mk in m.unbind(-1)]
      x = [g, p, p - average, *m.unbind(-1), g * rs, *scaled]
      for layer, (w, b) in enumerate([(first_w[i], first_b[i])] + theta.mlp[1:]):
        if layer == c.num_layers and layer > 0:
          w, b = theta.last_w, last_b[i]
        if layer > 0:
          x = [torch.relu(unit) for unit in x]
        x = [b[o] + sum(unit * w[j, o] for j, unit in enumerate(x)) for o in range(w.shape[1])]
      # x: [direction_scale d, log(step_scale) + log step + schedule + magnitude_scale mag, fb...], each S
      update = torch.exp(x[1]) * torch.addcmul(x[0], scaled[0], adam_factor[i])
      new_feedbacks.append(torch.stack([torch.tanh(unit).mean() for unit in x[2:]]) if len(x) > 2
                           else x[0].new_zeros(0))
    else:  # feature-major: (features, N) matrices, every row contiguous
      scaled = m * rs.unsqueeze(-1)
      x = [g, p, p - average, *m.unbind(-1), g * rs, *scaled.unbind(-1)]
      if c.fused:  # the first layer as a broadcast sum (the columns never formed), the others matrix products
        x = first_b[i, :, None] + sum(first_w[i, j, :, None] * f.reshape(1, count) for j, f in enumerate(x))
      else:
        x = torch.addmm(first_b[i, :, None], first_w[i].t(), torch.stack(x).view(columns, count))
      for layer, (w, b) in enumerate(theta.mlp[1:], start=1):
        w, b = (theta.last_w, last_b[i]) if layer == c.num_layers else (w, b)
        x = torch.addmm(b[:, None], w.t(), x.relu_())
      # x: (2 + feedback, N) = [direction_scale d, log(step_scale) + log step + schedule + magnitude_scale mag, fb]
      update = torch.exp(x[1]).reshape(p.shape)
      update = update.mul_(torch.addcmul(x[0].reshape(p.shape), scaled[..., 0], adam_factor[i]))
      new_feedbacks.append(torch.tanh(x[2:]).mean(1))
    update_norms.append(torch.linalg.vector_norm(update, dtype=rec))
    # The average and the update ratio read p before the update (the decayed p, as JAX's params).
    average.lerp_(p, 1 - c.average_decay)
    if isinstance(lr, torch.Tensor):
      p.addcmul_(update, lr)
    else:
      p.add_(update, alpha=lr)

  # The recurrent state, written back for the whole bucket.
  update_rms = torch.sqrt(torch.stack(update_norms).square_() / size + LOG_FLOOR)
  ratio = torch.log(update_rms / (update_rms + sizes_rms[:, 0] + LOG_FLOOR) + LOG_FLOOR)
  new_feedback = torch.stack(new_feedbacks).to(rec)
  torch._foreach_copy_(gradient_rms + update_ratios + log_steps + hs + cs + feedbacks,
                       [*new_rms.unbind(0), *ratio.unbind(0), *log_step.unbind(0), *hidden.unbind(0),
                        *cell.unbind(0), *new_feedback.unbind(0)])
  torch._foreach_add_(steps, 1)


class HierarchicalRule:
  """The hierarchical update for ``lopt.torch``: ``begin_step`` once per optimizer step (the losses, the horizon and
  the global state), then ``step`` per bucket of parameters (same group, device and dtype), changing parameters and
  their states in place.

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
    self._global: torch.Tensor | None = None   # this step's global features (float32, CPU)
    self._global_cache: dict = {}              # ... converted per (device, dtype)
    self._lr_cache: dict = {}                  # the learning rate as a device tensor per bucket: compiled
    self._conformed = False                    # False after a state dict was loaded: check every entry once
    self._compile_mode: str | None = None      # None: eager
    self._compile_options: dict = {}           # torch.compile's keyword arguments
    self._compile_failed = False
    self._compiled: dict = {}                  # the compiled update per bucket layout
    self._views = WeakIdKeyDictionary()        # (1,) views of 0-d tensors, for the compiled update

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
    and checks every state entry's dtype and device again at the next step."""
    self._global = None
    self._global_cache.clear()
    self._conformed = False

  # -- compilation -------------------------------------------------------------------------------------------------

  def enable_compile(self, mode: str | dict | None = None) -> None:
    """Runs ``step`` through ``torch.compile``, one graph per bucket layout: ``mode`` is torch.compile's (None: its
    default), or a dict of its keyword arguments (``{"options": {"combo_kernels": True}}``, ``{"backend": ...}``).
    Falls back to eager, with one warning, where no compiler is available or compilation fails. Meant for GPUs
    (Triton); on the CPU the compiled update is correct but not faster than the eager one."""
    self._compile_options = dict(mode) if isinstance(mode, dict) else {"mode": mode}
    self._compile_mode = self._compile_options.get("mode") or "default"
    self._compile_failed = False
    self._compiled.clear()

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

  # -- the update --------------------------------------------------------------------------------------------------

  @torch.no_grad()
  def begin_step(self, state: dict, *, loss=None, valid_loss=None, num_steps=None) -> None:
    """Once per optimizer step, before ``step``: folds the losses (None, or float32 0-d tensors; non-finite: none
    this step) into the accumulators of ``state`` (the optimizer-wide dict, filled on first use), counts the step,
    and computes the global features every tensor's LSTM reads this step."""
    if not state:
      state.update(init_global_state())
    accumulate(state, "train", loss)
    accumulate(state, "valid", valid_loss)
    state["step"] = state["step"] + 1
    self._global = torch.cat([loss_features(state), time_features(state["step"], num_steps)]).cpu()
    self._global_cache.clear()

  @torch.no_grad()
  def step(self, key, params: list[torch.Tensor], states: list[dict], lr: float) -> None:
    """p <- p + lr * update for every p of one bucket (each has p.grad), updating ``states[i]`` (created here if
    ``init_state`` was not called).

    Three passes over each tensor's coordinates, as the JAX side's two (``update_bucket``): its second moment, its
    statistics and momenta, then -- after the LSTM ran once over the bucket's tensors -- its coordinate update, which
    recomputes its columns from the state (the same values), so that full-size temporaries exist for one tensor at
    a time."""
    if self._global is None:
      raise RuntimeError("HierarchicalRule.step: call begin_step first (once per optimizer step)")
    if not params:
      return
    for p, state in zip(params, states):
      if not state:
        state.update(self.init_state(p))
    self._conform(params, states)
    device, dtype = params[0].device, params[0].dtype
    rec = recurrent_dtype(dtype)
    theta, rec_theta = self._theta(device, dtype), self._theta(device, rec)
    layout = self._layout(params, device, rec)
    features = self._global_features(device, rec)
    compiled = self._compiled_update((device, dtype, layout.shapes))
    fused = "" if compiled is None else "unrolled" if self._mlp_products() <= UNROLL_LIMIT else "matmul"
    constants = Constants(self._decays, self.values["rms_decay"], self.values["average_decay"],
                          self.values["num_layers"], fused)
    factored = [s.get("rows") is not None for s in states]
    arguments = (
        [p.grad for p in params], [s["momentum"] for s in states],
        [(s["rows"], s["cols"]) if f else (s["second_moment"],) for s, f in zip(states, factored)],
        [s["average"] for s in states], *([s[name] for s in states] for name in RECURRENT),
        [s["step"] for s in states])
    if fused:
      from torch._dynamo.exc import FailOnRecompileLimitHit, TorchDynamoException
      inputs = self._compiled_inputs(params, arguments)
      try:  # fullgraph: a compiler failure surfaces before the graph runs, nothing has changed yet
        compiled(constants, theta, rec_theta, layout, features, self._lr(lr, key, device, dtype), *inputs)
        return
      except (TorchDynamoException, FailOnRecompileLimitHit) as error:
        self._compile_failed = True
        warnings.warn(f"HierarchicalRule: torch.compile failed ({type(error).__name__}: {str(error)[:200]}); "
                      f"running eager", stacklevel=2)
        constants = constants._replace(fused="")
    update_bucket(constants, theta, rec_theta, layout, features, lr, params, *arguments)

  # -- helpers -----------------------------------------------------------------------------------------------------

  def _mlp_products(self) -> int:
    """Multiplications per coordinate in the MLP's layers (the context folded into the first layer's bias)."""
    shapes = [tuple(self._tensors[f"mlp/{i}/w"].shape) for i in range(self.values["num_layers"] + 1)]
    return sum(fan_in * fan_out for fan_in, fan_out in shapes) - self.values["context_size"] * shapes[0][1]

  def _compiled_inputs(self, params: list, arguments: tuple) -> tuple:
    """``update_bucket``'s tensor arguments for the compiled update: a 0-d parameter's full-size tensors (p, its
    gradient, second moment and average; its momentum (K,)) as views of shape (1,) (1, K) -- torch.compile (2.13,
    Inductor on the CPU) loses in-place updates of 0-d float64 inputs -- the views cached, so that the inputs keep
    their identity from step to step; under CUDA graphs (mode "reduce-overhead", "max-autotune"), every tensor the
    update changes marked as a static address (where cudagraphs accept in-place updates)."""
    grads, momenta, seconds, averages, *rest = arguments
    if any(p.dim() == 0 for p in params):
      one = self._unit_view
      params = [one(p) if p.dim() == 0 else p for p in params]
      grads = [one(g) for g in grads]
      momenta = [one(m, keep_last=True) if m.dim() == 1 else m for m in momenta]
      seconds = [tuple(one(v) for v in pair) for pair in seconds]
      averages = [one(a) for a in averages]
    if self._compile_mode in ("reduce-overhead", "max-autotune") or (
        self._compile_options.get("options") or {}).get("triton.cudagraphs"):
      from torch._dynamo import mark_static_address
      for group in (params, momenta, averages, *rest, *zip(*seconds)):
        for value in group:
          if getattr(value, "_dynamo_static_input_type", None) is None:
            mark_static_address(value)
    return (params, grads, momenta, seconds, averages, *rest)

  def _unit_view(self, value: torch.Tensor, keep_last: bool = False) -> torch.Tensor:
    """A 0-d tensor as a (1,) view (or a (K,) one as (1, K) with ``keep_last``), cached per tensor; others as they
    are."""
    if value.dim() != (1 if keep_last else 0):
      return value
    view = self._views.get(value)
    if view is None:
      view = self._views[value] = value.detach().view(1, -1) if keep_last else value.detach().view(1)
    return view

  def _conform(self, params: list[torch.Tensor], states: list[dict]) -> None:
    """Brings entries whose dtype or device differ from what p needs (a state dict loaded by torch's own rules, or
    a model moved since) to them: every entry once after a state dict was loaded, else a quick look at two."""
    for p, state in zip(params, states):
      if (self._conformed and state["momentum"].device == p.device and state["momentum"].dtype == p.dtype
              and state["h"].dtype == recurrent_dtype(p.dtype) and state["h"].device == p.device):
        continue
      dtypes = self.state_dtypes(p)
      for name, value in state.items():
        dtype = dtypes.get(name, p.dtype)
        if value.dtype != dtype or value.device != p.device:
          state[name] = value.to(device=p.device, dtype=dtype)
    self._conformed = True

  def _global_features(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    key = (device, dtype)
    if key not in self._global_cache:
      value = self._global
      if device.type == "cuda":  # through pinned memory: a copy that does not wait for the device
        value = value.pin_memory().to(device=device, non_blocking=True)
      self._global_cache[key] = value.to(device=device, dtype=dtype)
    return self._global_cache[key]

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
    shapes = tuple(tuple(p.shape) for p in params)
    key = (device, rec, shapes)
    layout = self._layout_cache.get(key)
    if layout is None:
      if len(self._layout_cache) > 64:
        self._layout_cache.clear()
      sizes = tuple(math.prod(shape) for shape in shapes)
      features = np.stack([shape_features(shape) for shape in shapes])
      layout = self._layout_cache[key] = Layout(
          shapes, sizes, tuple(factored_axes(shape) for shape in shapes),
          torch.tensor(sizes, dtype=torch.float64).to(device=device, dtype=rec),
          torch.from_numpy(features).to(device=device, dtype=rec))
    return layout


def _copy_function(function, index: int):
  """``function`` with a code object of its own (named ``<name>_<index>``)."""
  code = function.__code__
  code = code.replace(co_name=f"{code.co_name}_{index}", **(
      {"co_qualname": f"{code.co_qualname}_{index}"} if hasattr(code, "co_qualname") else {}))
  return types.FunctionType(code, function.__globals__, code.co_name, function.__defaults__, function.__closure__)


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
