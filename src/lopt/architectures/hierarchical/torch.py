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
``train_ema`` float32 (len(LOSS_DECAYS),); the same four for ``valid``; on the CPU, in float32 as in JAX.

The time features use the global step; the bias corrections and the clipping history use each tensor's own count,
which equals the global one whenever every tensor gets a gradient at every step (always, on the JAX side) -- and keeps
them right for a tensor that joins later or skips steps. Results agree with JAX to rounding: in float64 to ~1e-15
given the same global features, which both sides compute in float32 with their own tanh and log (~1e-7 apart).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch

from lopt.architectures.hierarchical.spec import FRACTION_POWERS, LOSS_DECAYS, TIME_SCALES
from lopt.architectures.mlp.spec import factored_axes, factored_shapes
from lopt.architectures.mlp.torch import update_momentum_, update_second_moment_

# optimizer.py's constants (it says why).
RSQRT_EPSILON = 1e-12
NORM_EPSILON = 1e-12
LOG_FLOOR = 1e-30
LOG_STEP_LIMIT = 8.0
LOG_SCALE = 0.1

RECURRENT = ("h", "c", "log_step", "gradient_rms", "update_ratio", "feedback")  # state kept in at least float32


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


def prepare_theta(tensors: dict, num_layers: int, decays: tuple, dtype: torch.dtype, device: torch.device) -> Theta:
  def convert(value):
    return torch.as_tensor(value).to(device=device, dtype=dtype)
  # The JAX side takes sigmoid(decay_logit) in theta's own dtype and then casts it; so does this.
  decay = torch.sigmoid(torch.as_tensor(tensors["clip/decay_logit"]))
  decay_tensor = torch.as_tensor(decays, dtype=dtype, device=device)
  return Theta(
      convert(tensors["lstm/w"]), convert(tensors["lstm/b"]), convert(tensors["step/w"]), convert(tensors["step/b"]),
      convert(tensors["step/alignment"]), convert(tensors["step/schedule"]), convert(tensors["context/w"]),
      convert(tensors["context/b"]), torch.exp(convert(tensors["clip/log_multiplier"])), convert(decay),
      [(convert(tensors[f"mlp/{i}/w"]), convert(tensors[f"mlp/{i}/b"])) for i in range(num_layers + 1)],
      decay_tensor, 1 - decay_tensor)


def recurrent_dtype(dtype: torch.dtype) -> torch.dtype:
  """The recurrent state's dtype for parameters of ``dtype``: at least float32 (JAX's result_type(dtype, float32))."""
  return torch.promote_types(dtype, torch.float32)


def shape_features(shape: tuple[int, ...]) -> np.ndarray:
  """(4,) float32: is-scalar, is-vector, log(size) / 10, rank / 4 (``optimizer.shape_features``)."""
  size = math.prod(shape) if shape else 1
  return np.array([size == 1, len(shape) == 1, np.log(size) / 10, len(shape) / 4], np.float32)


# -- global features (float32 on the CPU, as the JAX side's) ---------------------------------------------------------

def init_global_state() -> dict:
  zero = lambda *shape: torch.zeros(shape, dtype=torch.float32)  # noqa: E731
  state = {"step": torch.zeros((), dtype=torch.int32)}
  for name in ("train", "valid"):
    state.update({f"{name}_seen": zero(), f"{name}_first": zero(), f"{name}_last": zero(),
                  f"{name}_ema": zero(len(LOSS_DECAYS))})
  return state


def accumulate(state: dict, name: str, loss) -> None:
  """Folds ``loss`` (None, or a float32 0-d tensor) into the ``name`` accumulators of ``state``; a non-finite loss
  leaves them unchanged (``optimizer.accumulate``)."""
  if loss is None:
    return
  loss = torch.as_tensor(loss).to(device=state[f"{name}_seen"].device, dtype=torch.float32)
  given = torch.isfinite(loss)
  x = torch.log(torch.clamp(torch.where(given, loss, torch.ones_like(loss)), min=LOG_FLOOR))
  decays = torch.tensor(LOSS_DECAYS, dtype=torch.float32, device=loss.device)
  seen = state[f"{name}_seen"] > 0
  ema = torch.where(seen, decays * state[f"{name}_ema"] + (1 - decays) * x, x)
  state[f"{name}_first"] = torch.where(given & ~seen, x, state[f"{name}_first"])
  state[f"{name}_seen"] = torch.where(given, torch.ones_like(loss), state[f"{name}_seen"])
  state[f"{name}_last"] = torch.where(given, x, state[f"{name}_last"])
  state[f"{name}_ema"] = torch.where(given, ema, state[f"{name}_ema"])


def loss_features(state: dict) -> torch.Tensor:
  """(NUM_LOSS_FEATURES,) float32 (``optimizer.loss_features``)."""
  def one(name):
    seen, first, last, ema = (state[f"{name}_{part}"] for part in ("seen", "first", "last", "ema"))
    return torch.cat([seen[None], (seen * torch.tanh((last - first) / 4))[None], seen * torch.tanh(4 * (last - ema))])
  gap = state["valid_seen"] * state["train_seen"] * torch.tanh(
      (state["valid_last"] - state["train_ema"][-1]) - (state["valid_first"] - state["train_first"]))
  return torch.cat([one("train"), one("valid"), gap[None]])


def time_features(step: torch.Tensor, num_steps) -> torch.Tensor:
  """(len(TIME_SCALES) + len(FRACTION_POWERS),) float32 for the new global count ``step``
  (``optimizer.time_features``)."""
  t = step.to(torch.float32)
  absolute = torch.tanh(t / torch.tensor(TIME_SCALES, dtype=torch.float32, device=t.device))
  if num_steps is None:
    fraction = torch.zeros((), dtype=torch.float32, device=t.device)
  else:
    horizon = torch.tensor(num_steps, dtype=torch.float32, device=t.device)
    fraction = torch.where(horizon > 0, torch.clamp(t / torch.clamp(horizon, min=1.0), 0.0, 1.0),
                           torch.zeros_like(t))
  return torch.cat([absolute, fraction ** torch.tensor(FRACTION_POWERS, dtype=torch.float32, device=t.device)])


def rms(x: torch.Tensor) -> torch.Tensor:
  return torch.sqrt(torch.mean(x * x) + LOG_FLOOR)


def clip(g: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
  """jnp.clip(g, -threshold, threshold) for a 0-d threshold (inf: no clipping)."""
  return torch.minimum(torch.maximum(g, -threshold), threshold)


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
    self._global: torch.Tensor | None = None   # this step's global features (float32, CPU)
    self._global_cache: dict = {}              # ... converted per (device, dtype)

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
    """Called after a state dict was loaded: forgets this step's global features (``begin_step`` recomputes them)."""
    self._global = None
    self._global_cache.clear()

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

    Two passes, as the JAX side: per tensor its statistics (the momenta and second moment updated in place, only a
    few numbers kept), then the LSTM once over the bucket's tensors, then per tensor the coordinate update, which
    recomputes its columns from the state -- so at most one tensor's temporaries exist at a time."""
    del key
    if self._global is None:
      raise RuntimeError("HierarchicalRule.step: call begin_step first (once per optimizer step)")
    if not params:
      return
    for p, state in zip(params, states):
      if not state:
        state.update(self.init_state(p))
      self._conform(p, state)
    device, dtype = params[0].device, params[0].dtype
    rec = recurrent_dtype(dtype)
    theta, rec_theta = self._theta(device, dtype), self._theta(device, rec)
    stats = [self._statistics(theta, p, state) for p, state in zip(params, states)]

    # The per-tensor LSTM, shared by all tensors: one call over the bucket's stacked tensors.
    features = self._global_features(device, rec)
    inputs = torch.cat([torch.stack([s["inputs"] for s in stats]), features.expand(len(params), -1)], dim=1)
    h_old = torch.stack([state["h"] for state in states])
    c_old = torch.stack([state["c"] for state in states])
    gates = torch.addmm(rec_theta.lstm_b, torch.cat([inputs, h_old], dim=1), rec_theta.lstm_w)
    i, f, g, o = gates.chunk(4, dim=1)
    c = torch.sigmoid(f) * c_old + torch.sigmoid(i) * torch.tanh(g)
    h = torch.sigmoid(o) * torch.tanh(c)
    alignment = torch.stack([s["alignment"] for s in stats])
    old_log_step = torch.stack([state["log_step"] for state in states])
    log_step = torch.clamp(old_log_step + h @ rec_theta.step_w + rec_theta.step_b
                           + alignment @ rec_theta.step_alignment, -LOG_STEP_LIMIT, LOG_STEP_LIMIT)
    schedule = features[-rec_theta.step_schedule.shape[0]:] @ rec_theta.step_schedule
    context = torch.tanh(h @ rec_theta.context_w + rec_theta.context_b)

    average_decay = self.values["average_decay"]
    for j, (p, state, s) in enumerate(zip(params, states, stats)):
      update, feedback = self._coordinate_update(theta, p, state, s, context[j], log_step[j] + schedule)
      # The average and the update ratio read p before the update (the decayed p, as JAX's params).
      size_u, size_p = rms(update), rms(p)
      ratio = torch.log(size_u / (size_u + size_p + LOG_FLOOR) + LOG_FLOOR)
      state["average"].mul_(average_decay).add_(p * (1 - average_decay))
      p.add_(update, alpha=lr)
      state["h"].copy_(h[j])
      state["c"].copy_(c[j])
      state["log_step"].copy_(log_step[j])
      state["gradient_rms"].copy_(s["gradient_rms"])
      state["update_ratio"].copy_(ratio)
      state["feedback"].copy_(feedback)
      state["step"].add_(1)

  def _statistics(self, theta: Theta, p: torch.Tensor, state: dict) -> dict:
    """One tensor's first pass (``optimizer._statistics``): the clipping threshold, the momenta and second moment
    (updated in place), the columns' normalizers and the LSTM inputs -- a few numbers, no tensor of p's size."""
    g = p.grad
    dtype = g.dtype
    rec = state["h"].dtype
    t = (state["step"] + 1).to(dtype)  # this tensor's new count
    decay = theta.clip_decay
    old_rms = state["gradient_rms"].to(dtype)
    history = old_rms / torch.clamp(1 - decay ** (t - 1), min=1e-12)
    has_history = (t > 1) & (state["gradient_rms"] > 0)
    threshold = torch.where(has_history, theta.clip_multiplier * history, torch.full_like(history, math.inf))
    raw_rms = rms(g)
    spike = torch.where(has_history, torch.clamp(torch.log(raw_rms + LOG_FLOOR) - torch.log(history + LOG_FLOOR), -5, 5) / 5,
                        torch.zeros_like(history))
    g = clip(g, threshold)
    gradient_rms = decay * old_rms + (1 - decay) * rms(g)

    update_second_moment_(state, g, self.values["rms_decay"])
    rs = self._rsqrt_estimate(p, state, t)
    # cos(g, previous m_k rs), from the momenta before this step's update.
    k = len(self._decays)
    previous = (state["momentum"] * rs.unsqueeze(-1)).reshape(-1, k)
    flat_g = g.reshape(-1, 1)
    alignment = (flat_g * previous).sum(0) / torch.sqrt((flat_g * flat_g).sum() * (previous * previous).sum(0)
                                                         + LOG_FLOOR)
    del previous
    momenta = update_momentum_(state["momentum"], g, theta).unbind(-1)
    drift = p - state["average"]
    mean_squares = [torch.mean(f * f) for f in (g, p, drift, *momenta)]
    mean_squares += [torch.mean(torch.square(f * rs)) for f in (g, *momenta)]
    norms = torch.sqrt(torch.stack(mean_squares) + NORM_EPSILON)
    adam = momenta[0] * rs / (1 - theta.decays[0] ** t)
    inputs = torch.cat([
        LOG_SCALE * torch.log(torch.stack([raw_rms, rms(p), rms(adam), rms(drift)]) + LOG_FLOOR),
        state["update_ratio"].to(dtype)[None] * LOG_SCALE, spike[None], alignment,
        state["log_step"].to(dtype)[None] / LOG_STEP_LIMIT,
        torch.as_tensor(shape_features(tuple(p.shape)), device=g.device).to(dtype),
        state["feedback"].to(dtype)]).to(rec)
    return {"threshold": threshold, "norms": norms, "alignment": alignment.to(rec), "inputs": inputs,
            "gradient_rms": gradient_rms.to(rec)}

  def _coordinate_update(self, theta: Theta, p: torch.Tensor, state: dict, s: dict, context: torch.Tensor,
                         log_step: torch.Tensor):
    """One tensor's second pass (``optimizer._coordinate_update``): its columns again (from the state the first
    pass left: the same values), the per-coordinate MLP -> (update S, feedback (feedback_size,)). The normalizers
    scale the first layer's rows and the context folds into its bias."""
    g = clip(p.grad, s["threshold"])
    dtype = g.dtype
    t = (state["step"] + 1).to(dtype)
    rs = self._rsqrt_estimate(p, state, t)
    momenta = state["momentum"].unbind(-1)
    columns = [g, p, p - state["average"], *momenta, g * rs, *(m * rs for m in momenta)]
    columns = torch.stack([f.reshape(-1) for f in columns], dim=1)   # (N, 4 + 2K)
    adam = momenta[0] * rs / (1 - theta.decays[0] ** t)
    count = columns.shape[1]
    w, b = theta.mlp[0]
    x = torch.addmm(b + context.to(dtype) @ w[count:], columns, w[:count] / s["norms"][:, None])
    del columns
    for w, b in theta.mlp[1:]:
      x = torch.addmm(b, torch.relu(x), w)
    direction, magnitude, feedback = x[:, 0], x[:, 1], x[:, 2:]
    scale = self.values["step_scale"] * torch.exp(log_step.to(dtype)
                                                 + self.values["magnitude_scale"] * magnitude.view(g.shape))
    update = scale * (self.values["direction_scale"] * direction.view(g.shape) - adam)
    return update, torch.tanh(feedback).mean(0)

  def _rsqrt_estimate(self, p: torch.Tensor, state: dict, t: torch.Tensor) -> torch.Tensor:
    """rsqrt(v / (1 - rho^t) + eps) from the (already updated) second moment of p in ``state``."""
    if p.dim() >= 2:
      rows, cols = state["rows"], state["cols"]
      a, _ = factored_axes(tuple(p.shape))
      estimate = rows * cols / rows.mean(a, keepdim=True)
    else:
      estimate = state["second_moment"]
    rho = torch.as_tensor(self.values["rms_decay"], dtype=t.dtype, device=t.device)
    return torch.rsqrt(estimate / (1 - torch.pow(rho, t)) + RSQRT_EPSILON)

  # -- helpers -----------------------------------------------------------------------------------------------------

  def _conform(self, p: torch.Tensor, state: dict) -> None:
    """Brings entries whose dtype or device differ from what p needs (a state dict loaded by torch's own rules, or
    a model moved since) to them."""
    dtypes = self.state_dtypes(p)
    for name, value in state.items():
      dtype = dtypes.get(name, p.dtype)
      if value.dtype != dtype or value.device != p.device:
        state[name] = value.to(device=p.device, dtype=dtype)

  def _global_features(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    key = (device, dtype)
    if key not in self._global_cache:
      self._global_cache[key] = self._global.to(device=device, dtype=dtype)
    return self._global_cache[key]

  def _theta(self, device: torch.device, dtype: torch.dtype) -> Theta:
    key = (device, dtype)
    if key not in self._theta_cache:
      self._theta_cache[key] = prepare_theta(self._tensors, self.values["num_layers"], self._decays, dtype, device)
    return self._theta_cache[key]

