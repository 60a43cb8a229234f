"""The per-parameter MLP learned optimizer: one small MLP on every coordinate, over Adam/Adafactor-like features.

The same MLP (meta-parameters theta: a few hundred to a few thousand numbers) runs on every scalar parameter. Its
features are normalized per tensor, so one theta optimizes tensors of any size and any gradient scale; unlike the
component-wise GRU, a coordinate's update therefore depends on its whole tensor (through the normalizers and the
factored second moment). For a parameter tensor p of shape S with gradient g, at step t (t_new = t + 1):

  m_k  <- b_k m_k + (1 - b_k) g                         k = 1..K, b = momentum_decays       stored as S + (K,)
  g2    = g * g + 1e-30
  ndim S >= 2, Adafactor-factored over the two largest axes a < b (``spec.factored_axes``; rho = rms_decay):
    r  <- rho r + (1 - rho) mean(g2, b)                                                   S with b -> 1
    c  <- rho c + (1 - rho) mean(g2, a)                                                   S with a -> 1
    v   = r c / mean(r, a)                                    (broadcasting; means keep their axis)
  ndim S < 2 (vectors, scalars):
    v  <- rho v + (1 - rho) g2                                                            S
  rs    = rsqrt(v / (1 - rho^t_new) + 1e-12)                 bias-corrected, as Adam's: v is (1 - rho^t) g^2 early on
  f     = [g, p, m_1..m_K, g rs, m_1 rs..m_K rs]                                          S + (3 + 2K,)
  f_j  <- f_j / sqrt(mean over S of f_j^2 + 1e-12)      each feature to unit RMS over its tensor
  x     = [f, tanh(t_new / tau) for tau in TIME_SCALES]                                   S + (num_inputs,)
  x    <- relu(x W_i + b_i)                              each hidden layer i
  (d, a) = x W_L + b_L                                   last layer: direction d, log-magnitude a
  u     = d * exp(magnitude_scale * a) * step_scale      added to p (optax convention: p + u)

Scale invariance: g -> c g for one tensor (every step) scales m by c and v by c^2 (up to the 1e-30), so g rs and
m rs are unchanged and the per-tensor normalization removes c from g and m: the update does not change (up to the
epsilons). ``torch.py`` implements the same equations in PyTorch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lopt.architectures.mlp.spec import (G2_EPSILON, NORM_EPSILON, RSQRT_EPSILON, SPEC, TIME_SCALES, factored_axes,
                                         factored_shapes, num_inputs)

Theta = dict[str, Any]  # {"layers": [{"w": (fan_in, fan_out), "b": (fan_out,)}, ...]}: key paths 'layers/i/w'


class Factored(NamedTuple):
  """Adafactor's second moment of a tensor of shape S (ndim >= 2), over its two largest axes a < b: rows S with b
  set to 1, cols S with a set to 1 (``spec.factored_shapes``)."""
  rows: jax.Array
  cols: jax.Array


class MLPState(NamedTuple):
  """momentum: like params, a leaf of shape S becomes S + (K,) (the decays on the last axis, as the features use
  them); second_moment: like params, a leaf becomes ``Factored`` when ndim >= 2, else an array of shape S;
  step: int32 scalar, the steps taken."""
  momentum: Any
  second_moment: Any
  step: jax.Array


# -- the per-tensor pieces (pure functions of arrays) --------------------------------------------------------------

def init_second_moment(p: jax.Array):
  """Zeros: ``Factored`` (``spec.factored_shapes``) for ndim >= 2, else an array of shape S."""
  if p.ndim >= 2:
    rows, cols = factored_shapes(p.shape)
    return Factored(jnp.zeros(rows, p.dtype), jnp.zeros(cols, p.dtype))
  return jnp.zeros_like(p)


def update_momentum(momentum: jax.Array, g: jax.Array, decays: jax.Array) -> jax.Array:
  """m_k <- b_k m_k + (1 - b_k) g: momentum S + (K,), g S, decays (K,) -> S + (K,)."""
  return decays * momentum + (1 - decays) * g[..., None]


def update_second_moment(second_moment, g: jax.Array, decay: float):
  """(new second moment, its estimate v of g^2 of shape S); factored (a (rows, cols) pair) when g.ndim >= 2."""
  g2 = g * g + G2_EPSILON
  if g.ndim >= 2:
    a, b = factored_axes(g.shape)
    rows, cols = second_moment
    rows = decay * rows + (1 - decay) * jnp.mean(g2, axis=b, keepdims=True)
    cols = decay * cols + (1 - decay) * jnp.mean(g2, axis=a, keepdims=True)
    # r_i c_j / mean(r) = R_i C_j / sum(g2) with row and column sums R, C: Adafactor's rank-1 estimate.
    estimate = rows * cols / jnp.mean(rows, axis=a, keepdims=True)
    return Factored(rows, cols), estimate
  full = decay * second_moment + (1 - decay) * g2
  return full, full


def normalize(features: jax.Array) -> jax.Array:
  """(N, F) -> (N, F): each column divided by its root mean square over the N coordinates of the tensor."""
  return features / jnp.sqrt(jnp.mean(features * features, axis=0) + NORM_EPSILON)


def time_features(step: jax.Array, dtype) -> jax.Array:
  """int step (the new count, t + 1) -> (len(TIME_SCALES),): tanh(t / tau), from 0 towards 1 at t ~ tau."""
  return jnp.tanh(step.astype(dtype) / jnp.asarray(TIME_SCALES, dtype))


def raw_features(g: jax.Array, p: jax.Array, momentum: jax.Array, estimate: jax.Array) -> jax.Array:
  """The per-tensor features before normalization: g, p, estimate S, momentum S + (K,) -> (N, 3 + 2K)."""
  n, k = g.size, momentum.shape[-1]
  rs = jax.lax.rsqrt(estimate + RSQRT_EPSILON)
  return jnp.concatenate([g.reshape(n, 1), p.reshape(n, 1), momentum.reshape(n, k), (g * rs).reshape(n, 1),
                          (momentum * rs[..., None]).reshape(n, k)], axis=1)


def features(g: jax.Array, p: jax.Array, momentum: jax.Array, estimate: jax.Array, step: jax.Array) -> jax.Array:
  """The MLP's inputs for one tensor: g, p, estimate S, momentum S + (K,), step int -> (N, num_inputs), N = size of S
  (1 for a 0-d tensor, whose normalized features are then their signs). The equations as written; ``update``
  computes ``mlp(layers, features(...))`` in an equivalent, faster order."""
  n = g.size
  time = time_features(step, g.dtype)
  return jnp.concatenate([normalize(raw_features(g, p, momentum, estimate)),
                          jnp.broadcast_to(time, (n, time.shape[0]))], axis=1)


def mlp(layers: list, x: jax.Array) -> jax.Array:
  """(N, num_inputs) -> (N, 2): relu hidden layers, linear last layer."""
  for layer in layers[:-1]:
    x = jax.nn.relu(x @ layer["w"] + layer["b"])
  return x @ layers[-1]["w"] + layers[-1]["b"]


# -- the optimizer -------------------------------------------------------------------------------------------------

def _default(name: str):
  return SPEC.fields[name].default


@dataclass(frozen=True)
class MLPOptimizer:
  """Per-parameter MLP optimizer; the fields, their defaults and allowed values are ``spec.SPEC``'s.

  Attributes:
    hidden_size: MLP width.
    num_layers: hidden layers (0: a linear map of the features).
    momentum_decays: the decays b_k of the K momentum features.
    rms_decay: the decay rho of the (factored) second-moment estimate.
    step_scale: multiplies every update (the step size at zero log-magnitude).
    magnitude_scale: multiplies the log-magnitude output (small: exp(magnitude_scale * a) stays near 1 early in
      meta-training, and so does its meta-gradient).
  """
  hidden_size: int = _default("hidden_size")
  num_layers: int = _default("num_layers")
  momentum_decays: tuple[float, ...] = _default("momentum_decays")
  rms_decay: float = _default("rms_decay")
  step_scale: float = _default("step_scale")
  magnitude_scale: float = _default("magnitude_scale")

  def __post_init__(self):
    # One validation (the spec's, raising OptimizerConfigError); its normalized values (a list of decays -> tuple,
    # ints -> floats) replace the given ones so that the optimizer stays hashable, e.g. as a static jit argument.
    for name, value in SPEC.validate(asdict(self), type(self).__name__).items():
      object.__setattr__(self, name, value)

  @property
  def num_inputs(self) -> int:
    return num_inputs(asdict(self))

  def config(self) -> dict:
    """JSON-serializable constructor arguments, plus the architecture name."""
    return SPEC.config(asdict(self))

  # -- meta-parameters -------------------------------------------------------------------------------------------

  def param_shapes(self) -> dict[str, tuple[int, ...]]:
    """Key paths ('layers/i/w', 'layers/i/b') and shapes of the meta-parameters (``spec.param_shapes``)."""
    return SPEC.param_shapes(asdict(self))

  def init(self, key: jax.Array) -> Theta:
    """He-normal hidden weights w ~ N(0, 2 / fan_in), zero biases, zero last layer.

    The inputs have unit RMS per feature (the normalization) or lie in [0, 1) (time), and He scaling keeps the
    mean square of relu activations about constant with depth, so the meta-gradient of the last layer does not
    shrink with num_layers. The zero last layer makes an untrained optimizer inert (zero updates), like the GRU's
    zero readout.
    """
    shapes = self.param_shapes()
    count = self.num_layers + 1
    layers = []
    for i, layer_key in enumerate(jax.random.split(key, count)):
      fan_in, fan_out = shapes[f"layers/{i}/w"]
      if i < count - 1:
        weights = jax.random.normal(layer_key, (fan_in, fan_out)) * jnp.sqrt(2.0 / fan_in)
      else:
        weights = jnp.zeros((fan_in, fan_out))
      layers.append({"w": weights, "b": jnp.zeros((fan_out,))})
    return {"layers": layers}

  # -- the optimizer ---------------------------------------------------------------------------------------------

  def init_state(self, theta: Theta, params: Any) -> MLPState:
    """Zero momenta and second moments in each parameter's dtype, step 0. theta is unused (no learned state)."""
    del theta
    k = len(self.momentum_decays)
    momentum = jax.tree.map(lambda p: jnp.zeros(p.shape + (k,), p.dtype), params)
    return MLPState(momentum, jax.tree.map(init_second_moment, params), jnp.zeros((), jnp.int32))

  def update(self, theta: Theta, state: MLPState, grads: Any, params: Any, *, loss=None, valid_loss=None,
             step=None, num_steps=None) -> tuple[Any, MLPState]:
    """One step for every tensor: returns (updates like grads, in each gradient's dtype, to add to params; new state).

    params are required (the parameter value is a feature). loss, valid_loss, step and num_steps are accepted for
    the ``LearnedOptimizer`` contract and unused: the time features come from the state's own step count.
    Empty nodes of params (``optax.MaskedNode()``, None) have no state and stay empty nodes in the updates.
    """
    del loss, valid_loss, step, num_steps
    if params is None:
      raise ValueError("MLPOptimizer.update needs params: the parameter value is one of the MLP's features")
    new_step = state.step + 1
    leaves, treedef = jax.tree.flatten(params)
    per_leaf = [self._first_layer(theta["layers"], new_step, p, g, m, v) for p, g, m, v in zip(
        leaves, treedef.flatten_up_to(grads), treedef.flatten_up_to(state.momentum),
        treedef.flatten_up_to(state.second_moment))]
    # The deeper layers run once over every coordinate of every tensor of one dtype: a few large products instead
    # of one small product per tensor (the per-tensor part is all in the first layer).
    updates = [None] * len(leaves)
    for dtype in dict.fromkeys(pre.dtype for pre, _, _ in per_leaf):
      chosen = [i for i, (pre, _, _) in enumerate(per_leaf) if pre.dtype == dtype]
      out = self._deeper_layers(theta["layers"], jnp.concatenate([per_leaf[i][0] for i in chosen]))
      update = out[:, 0] * jnp.exp(self.magnitude_scale * out[:, 1]) * self.step_scale
      for i, piece in zip(chosen, jnp.split(update, np.cumsum([leaves[i].size for i in chosen])[:-1].tolist())):
        updates[i] = piece.reshape(leaves[i].shape)
    momentum = [m for _, m, _ in per_leaf]
    second_moment = [v for _, _, v in per_leaf]
    return treedef.unflatten(updates), MLPState(treedef.unflatten(momentum), treedef.unflatten(second_moment),
                                                new_step)

  def _first_layer(self, layers: list, step: jax.Array, p: jax.Array, g: jax.Array, momentum: jax.Array,
                   second_moment) -> tuple:
    """One tensor: (its coordinates' first-layer pre-activations (N, H0) in g's dtype, new momentum, new second
    moment in their stored dtypes).

    ``features(...) @ W0 + b0`` computed without forming the normalized features: the per-tensor normalizers scale
    W0's rows, and the time features (the same for every coordinate) fold into the bias. Everything is computed in
    g's dtype, theta included, so a float32 theta drives a float64 model in float64 and the updates never change
    dtype."""
    dtype = g.dtype
    first = jax.tree.map(lambda w: w.astype(dtype), layers[0])
    new_momentum = update_momentum(momentum.astype(dtype), g, jnp.asarray(self.momentum_decays, dtype))
    new_second_moment, estimate = update_second_moment(jax.tree.map(lambda v: v.astype(dtype), second_moment), g,
                                                       self.rms_decay)
    # Bias correction: without it v ~ (1 - rho) g^2 in the first steps, below RSQRT_EPSILON for gradients under
    # ~3e-5, and the g/sqrt(v) features would lose their scale invariance exactly where small gradients are common.
    estimate = estimate / (1 - jnp.power(jnp.asarray(self.rms_decay, dtype), step.astype(dtype)))
    rs = jax.lax.rsqrt(estimate + RSQRT_EPSILON)
    momenta = [new_momentum[..., k] for k in range(new_momentum.shape[-1])]
    raw = [g, p.astype(dtype), *momenta, g * rs, *(m * rs for m in momenta)]  # raw_features' columns, each S
    # Each column's per-tensor normalizer scales its row of W0, and the time features fold into the bias; the few
    # columns enter as a sum of broadcast products, which XLA fuses into one pass (faster than a dot of depth 9 on
    # CPU and GPU alike).
    weights = first["w"][:len(raw)] * jnp.stack([jax.lax.rsqrt(jnp.mean(f * f) + NORM_EPSILON) for f in raw])[:, None]
    bias = first["b"] + time_features(step, dtype) @ first["w"][len(raw):]
    pre = bias + sum(f[..., None] * w for f, w in zip(raw, weights))
    pre = pre.reshape(-1, pre.shape[-1])
    new_second_moment = jax.tree.map(lambda new, old: new.astype(old.dtype), new_second_moment, second_moment)
    return pre, new_momentum.astype(momentum.dtype), new_second_moment

  @staticmethod
  def _deeper_layers(layers: list, pre: jax.Array) -> jax.Array:
    """(N, H0) first-layer pre-activations -> (N, 2) outputs (with no hidden layer the first layer is the last)."""
    if len(layers) == 1:
      return pre
    x = jax.nn.relu(pre)
    for layer in layers[1:-1]:
      x = jax.nn.relu(x @ layer["w"].astype(x.dtype) + layer["b"].astype(x.dtype))
    return x @ layers[-1]["w"].astype(x.dtype) + layers[-1]["b"].astype(x.dtype)
