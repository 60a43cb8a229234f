"""The hierarchical learned optimizer (Metz et al. 2020): per-coordinate MLP, per-tensor LSTM, global loss features.

For every parameter tensor p of shape S with gradient g, at step t (t_new = t + 1), b_1..b_K = momentum_decays,
rho = rms_decay:

  clipping (meta-learned, per tensor): e = EMA of RMS(clipped g) with decay sigmoid(clip/decay_logit);
    g <- clip(g, +-exp(clip/log_multiplier) * e / (1 - decay^t))       (from the second step on; e > 0)
  m_k  <- b_k m_k + (1 - b_k) g                               K momenta, S + (K,)
  v     = Adafactor's factored estimate of g^2 (ndim >= 2), else an EMA of g^2; rs = rsqrt(v / (1 - rho^t_new))
  a     = slow average of p (decay average_decay), updated after the step
  columns  f = [g, p, p - a, m_1..m_K, g rs, m_1 rs..m_K rs], each over its tensor to unit RMS  (N, 4 + 2K)
  adam  = m_1 rs / (1 - b_1^t_new)                             Adam's direction (Adafactor's second moment)

Per tensor, an LSTM (shared by all tensors) reads the tensor's statistics -- log RMS of g, p, adam and p - a, its
previous update's size relative to p, the gradient's RMS against its average (spikes), the alignment of g with each
previous momentum direction cos(g, m_k rs), its own log step, its shape, a feedback vector the MLP wrote last step --
and the global features: the training and the validation loss, each through its own accumulators (the drop of the
log loss since its first value, its deviation from two EMAs, whether one was ever given, and the change of the
validation-training gap) and the time (tanh(t / tau), and (t / num_steps)^q when a horizon hint is given). Then

  (h, c)   <- LSTM((h, c), inputs)
  log_step <- clip(log_step + w_s . h + b_s + alignment_gain . cos(g, m rs), -LOG_STEP_LIMIT, LOG_STEP_LIMIT)
  context   = tanh(h W_c + b_c)                                (context_size,) for every coordinate of the tensor
  (d, mag, feedback) = MLP([f, context])                        per coordinate; feedback averaged over the tensor
  u = step_scale * exp(log_step + schedule . time + magnitude_scale * mag) * (direction_scale * d - adam)

u is added to p (optax's convention): w <- w + exp(A) B with A the log step, B the direction (Metz 2020's form).
With the MLP's last layer, the LSTM's step readout and the schedule at zero (``init``), the untrained optimizer is
Adam with Adafactor's second moment at learning rate step_scale, whose per-tensor step size follows the alignment
of successive gradients (a hypergradient rule: steps that keep going the same way grow, steps that reverse shrink)
-- a sound starting point that meta-training then changes everywhere.

Without a loss (``loss=None``) or validation loss, their features stay zero ("never seen"); a non-finite value means
"none this step" (the validation loss is typically measured every few steps). Without ``num_steps`` the horizon
features are zero, as at the start of a run: the learned schedule does not decay.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lopt.architectures.hierarchical.spec import FRACTION_POWERS, LOSS_DECAYS, SPEC, TIME_SCALES
from lopt.architectures.mlp.optimizer import init_second_moment, update_momentum, update_second_moment

Theta = dict[str, Any]

RSQRT_EPSILON = 1e-12   # as the mlp architecture: v + eps under the rsqrt
NORM_EPSILON = 1e-12    # a column's mean square + eps: an all-zero column stays zero
LOG_FLOOR = 1e-30       # log(x + LOG_FLOOR) for RMS values that may be zero
LOG_STEP_LIMIT = 8.0    # the per-tensor log step stays within +-8: step sizes from 3e-4 to 3e3 times step_scale
LOG_SCALE = 0.1         # log-magnitude features enter the LSTM as LOG_SCALE * log(x): O(1) for x in [1e-9, 1e4]
ALIGNMENT_GAIN_INIT = 0.5  # hypergradient gain on cos(g, m_1 rs) at initialization (then meta-learned)


class Accumulator(NamedTuple):
  """One loss's accumulators, each () float32: seen (1 once a finite value arrived), first and last log loss, and
  EMAs of the log loss at ``LOSS_DECAYS`` (K,)."""
  seen: jax.Array
  first: jax.Array
  last: jax.Array
  ema: jax.Array


class TensorState(NamedTuple):
  """The per-tensor recurrent state, leaves () or (n,): LSTM hidden h and cell c (lstm_size,), the log step, the
  EMA of the clipped gradient's RMS (the clipping scale), the log of the last update's size relative to p, and the
  feedback vector (feedback_size,)."""
  h: jax.Array
  c: jax.Array
  log_step: jax.Array
  gradient_rms: jax.Array
  update_ratio: jax.Array
  feedback: jax.Array


class HierarchicalState(NamedTuple):
  """momentum: like params, S + (K,); second_moment: like params, ``Factored`` for ndim >= 2 else S; average: like
  params (the slow average of p); tensors: like params, a ``TensorState`` per tensor; train, valid: the loss
  ``Accumulator``s; step: () int32."""
  momentum: Any
  second_moment: Any
  average: Any
  tensors: Any
  train: Accumulator
  valid: Accumulator
  step: jax.Array


# -- global features ------------------------------------------------------------------------------------------------

def init_accumulator() -> Accumulator:
  # Distinct buffers (not one zero three times), so that a state can be donated to a jitted step.
  zero = lambda: jnp.zeros((), jnp.float32)  # noqa: E731
  return Accumulator(zero(), zero(), zero(), jnp.zeros((len(LOSS_DECAYS),), jnp.float32))


def accumulate(acc: Accumulator, loss) -> Accumulator:
  """Folds ``loss`` (a scalar, or None) into ``acc``; a non-finite or absent loss leaves it unchanged."""
  if loss is None:
    return acc
  loss = jnp.asarray(loss, jnp.float32)
  given = jnp.isfinite(loss)
  x = jnp.log(jnp.maximum(jnp.where(given, loss, 1.0), LOG_FLOOR))
  decays = jnp.asarray(LOSS_DECAYS, jnp.float32)
  seen = acc.seen > 0
  ema = jnp.where(seen, decays * acc.ema + (1 - decays) * x, x)
  return Accumulator(jnp.where(given, 1.0, acc.seen), jnp.where(given & ~seen, x, acc.first),
                     jnp.where(given, x, acc.last), jnp.where(given, ema, acc.ema))


def loss_features(train: Accumulator, valid: Accumulator) -> jax.Array:
  """(NUM_LOSS_FEATURES,) float32: per loss [seen, tanh((last - first) / 4), tanh(4 (last - ema_k))...], then the
  change of the validation-training gap since their first values, tanh'd; zeros for a loss never seen."""
  def one(acc):
    return jnp.concatenate([acc.seen[None], acc.seen * jnp.tanh((acc.last - acc.first) / 4)[None],
                            acc.seen * jnp.tanh(4 * (acc.last - acc.ema))])
  gap = valid.seen * train.seen * jnp.tanh((valid.last - train.ema[-1]) - (valid.first - train.first))
  return jnp.concatenate([one(train), one(valid), gap[None]])


def time_features(step: jax.Array, num_steps) -> jax.Array:
  """(len(TIME_SCALES) + len(FRACTION_POWERS),) float32: tanh(t / tau), then (t / num_steps)^q clipped to [0, 1]
  (zeros when ``num_steps`` is None or not positive). ``step`` is the new count t + 1."""
  t = step.astype(jnp.float32)
  absolute = jnp.tanh(t / jnp.asarray(TIME_SCALES, jnp.float32))
  if num_steps is None:
    fraction = jnp.zeros(())
  else:
    horizon = jnp.asarray(num_steps, jnp.float32)
    fraction = jnp.where(horizon > 0, jnp.clip(t / jnp.maximum(horizon, 1.0), 0.0, 1.0), 0.0)
  return jnp.concatenate([absolute, fraction ** jnp.asarray(FRACTION_POWERS, jnp.float32)])


def shape_features(shape: tuple[int, ...]) -> np.ndarray:
  """(SHAPE_FEATURES,): is-scalar, is-vector, log(size) / 10, rank / 4 (static: numpy)."""
  size = int(np.prod(shape)) if shape else 1
  return np.array([size == 1, len(shape) == 1, np.log(size) / 10, len(shape) / 4], np.float32)


# -- the per-tensor pieces --------------------------------------------------------------------------------------------

def lstm_cell(lstm: dict, h: jax.Array, c: jax.Array, x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(n, L) h, c and (n, F) inputs -> new (h, c); gates in the order input, forget, cell, output."""
  gates = jnp.concatenate([x, h], axis=-1) @ lstm["w"].astype(x.dtype) + lstm["b"].astype(x.dtype)
  i, f, g, o = jnp.split(gates, 4, axis=-1)
  c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
  return jax.nn.sigmoid(o) * jnp.tanh(c), c


def rms(x: jax.Array) -> jax.Array:
  """Root mean square; the floor keeps its derivative finite at an all-zero tensor (meta-gradients stay finite)."""
  return jnp.sqrt(jnp.mean(x * x) + LOG_FLOOR)


def _default(name: str):
  return SPEC.fields[name].default


@dataclass(frozen=True)
class HierarchicalOptimizer:
  """The hierarchical optimizer; fields, defaults and allowed values are ``spec.SPEC``'s (module docstring: the
  equations)."""
  hidden_size: int = _default("hidden_size")
  num_layers: int = _default("num_layers")
  lstm_size: int = _default("lstm_size")
  context_size: int = _default("context_size")
  feedback_size: int = _default("feedback_size")
  momentum_decays: tuple[float, ...] = _default("momentum_decays")
  rms_decay: float = _default("rms_decay")
  average_decay: float = _default("average_decay")
  step_scale: float = _default("step_scale")
  magnitude_scale: float = _default("magnitude_scale")
  direction_scale: float = _default("direction_scale")

  def __post_init__(self):
    for name, value in SPEC.validate(asdict(self), type(self).__name__).items():
      object.__setattr__(self, name, value)

  def config(self) -> dict:
    return SPEC.config(asdict(self))

  def param_shapes(self) -> dict[str, tuple[int, ...]]:
    return SPEC.param_shapes(asdict(self))

  # -- meta-parameters ---------------------------------------------------------------------------------------------

  def init(self, key: jax.Array) -> Theta:
    """LSTM weights N(0, 1 / fan_in) with forget-gate bias 1; the context map N(0, 1 / lstm_size); MLP hidden
    layers He-normal; zero for the MLP's last layer, the step readout and the schedule (the untrained optimizer is
    Adam with a hypergradient step size, module docstring); clipping at 10x the gradient's RMS EMA of decay 0.99."""
    shapes = self.param_shapes()
    keys = iter(jax.random.split(key, 3 + self.num_layers))
    hidden = self.lstm_size
    fan_in = shapes["lstm/w"][0]
    lstm_b = jnp.zeros((4 * hidden,)).at[hidden:2 * hidden].set(1.0)
    theta = {
        "lstm": {"w": jax.random.normal(next(keys), shapes["lstm/w"]) / jnp.sqrt(fan_in), "b": lstm_b},
        "step": {"w": jnp.zeros((hidden,)), "b": jnp.zeros(()),
                 "alignment": jnp.zeros(shapes["step/alignment"]).at[0].set(ALIGNMENT_GAIN_INIT),
                 "schedule": jnp.zeros(shapes["step/schedule"])},
        "context": {"w": jax.random.normal(next(keys), shapes["context/w"]) / jnp.sqrt(hidden),
                    "b": jnp.zeros(shapes["context/b"])},
        "clip": {"log_multiplier": jnp.log(jnp.asarray(10.0)), "decay_logit": jnp.log(jnp.asarray(99.0))},
        "mlp": [],
    }
    for i in range(self.num_layers + 1):
      w_shape = shapes[f"mlp/{i}/w"]
      weights = (jax.random.normal(next(keys), w_shape) * jnp.sqrt(2.0 / w_shape[0]) if i < self.num_layers
                 else jnp.zeros(w_shape))
      theta["mlp"].append({"w": weights, "b": jnp.zeros(shapes[f"mlp/{i}/b"])})
    return theta

  # -- the optimizer -----------------------------------------------------------------------------------------------

  def _init_tensor(self, theta: Theta, p: jax.Array) -> TensorState:
    dtype = jnp.result_type(p.dtype, jnp.float32)
    zeros = lambda *shape: jnp.zeros(shape, dtype)  # noqa: E731 (distinct buffers: donation-safe)
    return TensorState(zeros(self.lstm_size), zeros(self.lstm_size), zeros(), zeros(), zeros(),
                       zeros(self.feedback_size))

  def init_state(self, theta: Theta, params: Any) -> HierarchicalState:
    """Zero momenta, second moments and recurrent states; the slow average starts at p; step 0."""
    k = len(self.momentum_decays)
    return HierarchicalState(
        momentum=jax.tree.map(lambda p: jnp.zeros(p.shape + (k,), p.dtype), params),
        second_moment=jax.tree.map(init_second_moment, params),
        average=jax.tree.map(lambda p: jnp.array(p, copy=True), params),  # its own buffer: donation-safe
        tensors=jax.tree.map(lambda p: self._init_tensor(theta, p), params),
        train=init_accumulator(), valid=init_accumulator(), step=jnp.zeros((), jnp.int32))

  def update(self, theta: Theta, state: HierarchicalState, grads: Any, params: Any, *, loss=None,
             valid_loss=None, step=None, num_steps=None) -> tuple[Any, HierarchicalState]:
    """One step of every tensor: (updates like grads in their dtypes, to add to params; new state).

    loss / valid_loss: the current training / validation loss (scalars; None or non-finite: none this step).
    num_steps: the horizon hint (None or <= 0: unknown). ``step`` is unused: the state counts its own steps."""
    del step
    if params is None:
      raise ValueError("HierarchicalOptimizer.update needs params: the parameter value is one of its features")
    new_step = state.step + 1
    train = accumulate(state.train, loss)
    valid = accumulate(state.valid, valid_loss)
    global_features = jnp.concatenate([loss_features(train, valid), time_features(new_step, num_steps)])

    leaves, treedef = jax.tree.flatten(params)
    flat = lambda tree: treedef.flatten_up_to(tree)  # noqa: E731
    stats = [self._statistics(theta, new_step, p, g, m, v, a, ts) for p, g, m, v, a, ts in zip(
        leaves, flat(grads), flat(state.momentum), flat(state.second_moment), flat(state.average),
        flat(state.tensors))]

    # The LSTM runs once per dtype over the stacked tensors (the same weights for every tensor).
    recurrent = [None] * len(leaves)
    for dtype in dict.fromkeys(s["tensor"].h.dtype for s in stats):
      chosen = [i for i, s in enumerate(stats) if s["tensor"].h.dtype == dtype]
      inputs = jnp.stack([jnp.concatenate([stats[i]["inputs"], global_features.astype(dtype)]) for i in chosen])
      h, c = lstm_cell(theta["lstm"], jnp.stack([stats[i]["tensor"].h for i in chosen]),
                       jnp.stack([stats[i]["tensor"].c for i in chosen]), inputs)
      alignment = jnp.stack([stats[i]["alignment"] for i in chosen])
      old_log_step = jnp.stack([stats[i]["tensor"].log_step for i in chosen])
      cast = lambda x: x.astype(dtype)  # noqa: E731
      log_step = jnp.clip(old_log_step + h @ cast(theta["step"]["w"]) + cast(theta["step"]["b"])
                          + alignment @ cast(theta["step"]["alignment"]), -LOG_STEP_LIMIT, LOG_STEP_LIMIT)
      schedule = global_features[-theta["step"]["schedule"].shape[0]:].astype(dtype) @ cast(theta["step"]["schedule"])
      context = jnp.tanh(h @ cast(theta["context"]["w"]) + cast(theta["context"]["b"]))
      for j, i in enumerate(chosen):
        recurrent[i] = (h[j], c[j], log_step[j], schedule, context[j])

    updates, momentum, second_moment, average, tensors = [], [], [], [], []
    for p, s, (h, c, log_step, schedule, context) in zip(leaves, stats, recurrent):
      u, feedback = self._coordinate_update(theta, s, context, log_step + schedule)
      updates.append(u.astype(s["g"].dtype))
      momentum.append(s["momentum"])
      second_moment.append(s["second_moment"])
      average.append(s["average"])
      ratio = jnp.log(rms(u) / (rms(u) + rms(p.astype(u.dtype)) + LOG_FLOOR) + LOG_FLOOR)
      tensors.append(TensorState(h, c, log_step, s["tensor"].gradient_rms, ratio.astype(h.dtype),
                                 feedback.astype(h.dtype)))
    unflatten = treedef.unflatten
    return unflatten(updates), HierarchicalState(unflatten(momentum), unflatten(second_moment), unflatten(average),
                                                 unflatten(tensors), train, valid, new_step)

  # -- analysis helpers (``lopt.dynamics.hierarchical``): pure, read-only; ``update`` does not use them -------------

  def lstm_inputs(self, theta: Theta, state: HierarchicalState, grads: Any, params: Any, *, loss=None,
                  valid_loss=None, num_steps=None) -> jax.Array:
    """(tensors, num_tensor_inputs) float32: what the per-tensor LSTM reads in ``update`` with the same arguments,
    one row per leaf of ``params`` in tree order -- the tensor's statistics, then the global loss and time features
    (``lstm_input_names`` names the columns)."""
    new_step = state.step + 1
    losses = loss_features(accumulate(state.train, loss), accumulate(state.valid, valid_loss))
    global_features = jnp.concatenate([losses, time_features(new_step, num_steps)])
    leaves, treedef = jax.tree.flatten(params)
    flat = lambda tree: treedef.flatten_up_to(tree)  # noqa: E731
    rows = [self._statistics(theta, new_step, p, g, m, v, a, ts)["inputs"].astype(jnp.float32)
            for p, g, m, v, a, ts in zip(leaves, flat(grads), flat(state.momentum), flat(state.second_moment),
                                         flat(state.average), flat(state.tensors))]
    return jnp.stack([jnp.concatenate([row, global_features.astype(jnp.float32)]) for row in rows])

  def lstm_input_names(self) -> list[str]:
    """Names of the columns of ``lstm_inputs`` (the rows of ``theta["lstm"]["w"]`` before the hidden ones)."""
    statistics = (["log_rms_gradient", "log_rms_param", "log_rms_adam", "log_rms_drift", "update_ratio",
                   "gradient_spike"] + [f"alignment_m{b:g}" for b in self.momentum_decays]
                  + ["log_step", "shape_is_scalar", "shape_is_vector", "shape_log_size", "shape_rank"]
                  + [f"feedback_{i}" for i in range(self.feedback_size)])
    losses = [f"{name}_{what}" for name in ("train", "valid")
              for what in ["seen", "drop"] + [f"vs_ema{d:g}" for d in LOSS_DECAYS]] + ["gap_change"]
    times = [f"time_tanh_t/{tau:g}" for tau in TIME_SCALES] + [f"time_fraction^{q:g}" for q in FRACTION_POWERS]
    return statistics + losses + times

  def effective_log_steps(self, theta: Theta, state: HierarchicalState, num_steps=None) -> jax.Array:
    """(tensors,) the log step of each tensor's last update (``state`` as ``update`` returned it), before the
    per-coordinate magnitude: its log step plus the learned schedule at the state's step count; the step size is
    step_scale * exp(this). Leaves of ``state.tensors`` in tree order."""
    schedule = time_features(state.step, num_steps) @ jnp.asarray(theta["step"]["schedule"], jnp.float32)
    return jnp.stack([ts.log_step.astype(jnp.float32) + schedule for ts in jax.tree.leaves(
        state.tensors, is_leaf=lambda x: isinstance(x, TensorState))])

  def _statistics(self, theta: Theta, step: jax.Array, p, g, momentum, second_moment, average,
                  tensor: TensorState) -> dict:
    """One tensor's first pass: clipping, new momenta and second moment, its feature columns and normalizers, and
    the LSTM inputs (everything in g's dtype; the recurrent state in its own)."""
    dtype = g.dtype
    t = step.astype(dtype)
    # Meta-learned dynamic clipping against the bias-corrected EMA of the (clipped) gradient's RMS.
    decay = jax.nn.sigmoid(theta["clip"]["decay_logit"]).astype(dtype)
    history = tensor.gradient_rms.astype(dtype) / jnp.maximum(1 - decay ** (t - 1), 1e-12)
    has_history = (step > 1) & (tensor.gradient_rms > 0)
    threshold = jnp.where(has_history, jnp.exp(theta["clip"]["log_multiplier"].astype(dtype)) * history, jnp.inf)
    raw_rms = rms(g)
    spike = jnp.where(has_history, jnp.clip(jnp.log(raw_rms + LOG_FLOOR) - jnp.log(history + LOG_FLOOR), -5, 5) / 5,
                      0)
    g = jnp.clip(g, -threshold, threshold)
    gradient_rms = decay * tensor.gradient_rms.astype(dtype) + (1 - decay) * rms(g)

    decays = jnp.asarray(self.momentum_decays, dtype)
    old_momentum = momentum.astype(dtype)
    new_momentum = update_momentum(old_momentum, g, decays)
    new_second_moment, estimate = update_second_moment(jax.tree.map(lambda v: v.astype(dtype), second_moment), g,
                                                       self.rms_decay)
    estimate = estimate / (1 - jnp.power(jnp.asarray(self.rms_decay, dtype), t))
    rs = jax.lax.rsqrt(estimate + RSQRT_EPSILON)
    p = p.astype(dtype)
    drift = p - average.astype(dtype)
    momenta = [new_momentum[..., k] for k in range(len(self.momentum_decays))]
    columns = [g, p, drift, *momenta, g * rs, *(m * rs for m in momenta)]
    norms = jnp.stack([jnp.sqrt(jnp.mean(f * f) + NORM_EPSILON) for f in columns])
    adam = momenta[0] * rs / (1 - decays[0] ** t)
    # cos(g, previous m_k rs): > 0 while successive steps keep going the same way (the hypergradient's sign).
    previous = [old_momentum[..., k] * rs for k in range(len(self.momentum_decays))]
    alignment = jnp.stack([jnp.sum(g * m) / jnp.sqrt(jnp.sum(g * g) * jnp.sum(m * m) + LOG_FLOOR) for m in previous])
    rec = tensor.h.dtype
    inputs = jnp.concatenate([
        LOG_SCALE * jnp.log(jnp.stack([raw_rms, rms(p), rms(adam), rms(drift)]) + LOG_FLOOR),
        tensor.update_ratio.astype(dtype)[None] * LOG_SCALE, spike[None], alignment,
        tensor.log_step.astype(dtype)[None] / LOG_STEP_LIMIT, jnp.asarray(shape_features(p.shape), dtype),
        tensor.feedback.astype(dtype)]).astype(rec)
    average = self.average_decay * average + (1 - self.average_decay) * p.astype(average.dtype)
    cast_back = lambda new, old: new.astype(old.dtype)  # noqa: E731
    return {"g": g, "columns": columns, "norms": norms, "adam": adam, "alignment": alignment.astype(rec),
            "inputs": inputs, "tensor": tensor._replace(gradient_rms=gradient_rms.astype(rec)),
            "momentum": new_momentum.astype(momentum.dtype),
            "second_moment": jax.tree.map(cast_back, new_second_moment, second_moment), "average": average}

  def _coordinate_update(self, theta: Theta, s: dict, context: jax.Array, log_step: jax.Array):
    """One tensor's second pass: the per-coordinate MLP over the normalized columns and the LSTM's context
    -> (update S, feedback (feedback_size,)). The normalizers scale the first layer's rows and the context folds
    into its bias, so the normalized columns are never formed."""
    dtype = s["g"].dtype
    layers = [jax.tree.map(lambda w: w.astype(dtype), layer) for layer in theta["mlp"]]
    columns = s["columns"]
    first = layers[0]
    count = len(columns)
    weights = first["w"][:count] / s["norms"][:, None]
    bias = first["b"] + context.astype(dtype) @ first["w"][count:]
    x = bias + sum(f[..., None] * w for f, w in zip(columns, weights))
    x = x.reshape(-1, x.shape[-1])
    for layer in layers[1:]:
      x = jax.nn.relu(x) @ layer["w"] + layer["b"]
    direction, magnitude, feedback = x[:, 0], x[:, 1], x[:, 2:]
    shape = s["g"].shape
    scale = self.step_scale * jnp.exp(log_step.astype(dtype) + self.magnitude_scale * magnitude.reshape(shape))
    update = scale * (self.direction_scale * direction.reshape(shape) - s["adam"])
    return update, jnp.mean(jnp.tanh(feedback), axis=0)

