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
  log_step <- clip(log_step + w_s . h + b_s + alignment_gain . cos(g, m rs) [+ w_d . inputs], -LOG_STEP_LIMIT,
                   max_log_step)                       ([w_d . inputs]: with ``direct_step``, the inputs read directly)
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

import os
from dataclasses import asdict, dataclass
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lopt.architectures.hierarchical import pallas_passes
from lopt.architectures.hierarchical.spec import (CORRECTION_FLOOR, FRACTION_POWERS, LOG_FLOOR, LOG_SCALE,
                                                  LOG_STEP_LIMIT, LOSS_DECAYS, NORM_EPSILON, RSQRT_EPSILON, SPEC,
                                                  TIME_SCALES)
from lopt.architectures.mlp.optimizer import (Factored, init_second_moment, update_momentum,
                                              update_second_moment)
from lopt.architectures.mlp.spec import factored_axes
from lopt.errors import SettingError

Theta = dict[str, Any]

ALIGNMENT_GAIN_INIT = 0.5  # hypergradient gain on cos(g, m_1 rs) at initialization (then meta-learned)
GROUP_LIMIT = 1 << 21    # on accelerators, tensors of one shape with up to this many coordinates step as one batch
UNITS_LIMIT = 512        # on accelerators, per-coordinate MLPs with up to this many products are written unit by
                         # unit (see ``_units_form``); larger ones, and any on a CPU, as matrix products
PALLAS_MIN_SIZE = 1 << 16  # on GPUs, float32 tensors of at least this many coordinates may take the Pallas passes
PALLAS_MODES = ("auto", "off", "interpret")  # GPUs (see ``_pallas``); never; Pallas's interpreter anywhere (tests)
PALLAS = os.environ.get("LOPT_JAX_PALLAS", "auto")
# How the per-coordinate MLP is written (see ``_units_form``): units where small on accelerators; always as matrix
# products (half the equations to trace and differentiate: a meta-training run's start-up); units wherever small.
MLP_FORMS = ("auto", "matrix", "units")
MLP_FORM = os.environ.get("LOPT_JAX_MLP_FORM", "auto")


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
  """momentum, second_moment, average: tuples, one entry per ``coordinate_groups`` group (tensors of one shape and
  dtype) -- for a lone tensor momentum S + (K,), second_moment ``Factored`` for ndim >= 2 else S, average S (the slow
  average of p); for a group of n > 1 its tensors' entries stacked on a new first axis, (n,) + ...
  (``coordinate_states`` gives them per tensor); tensors: one ``TensorState`` for all T tensors, leaves (T,) or
  (T, n), rows in the tree order of params (``tensor_states``); train, valid: the loss ``Accumulator``s; step: ()
  int32.

  Stacked rather than one entry per tensor: an accelerator steps a group as one batch (``update``) that reads and
  writes the group's states where they lie, where states like params had to be stacked into copies and back at every
  step (H200, 10M parameters: 1.39-1.64 ms a step before, 1.16-1.28 after); and every array a jitted step takes and
  returns costs host time (about 3 us)."""
  momentum: tuple
  second_moment: tuple
  average: tuple
  tensors: Any
  train: Accumulator
  valid: Accumulator
  step: jax.Array


class CoordinateState(NamedTuple):
  """One tensor's per-coordinate state (``coordinate_states``): momentum S + (K,), second_moment (``Factored`` or
  S), average S."""
  momentum: jax.Array
  second_moment: Any
  average: jax.Array


# The rank of each TensorState field for one tensor (h: (lstm_size,), log_step: (), ...).
TENSOR_STATE_RANKS = {"h": 1, "c": 1, "log_step": 0, "gradient_rms": 0, "update_ratio": 0, "feedback": 1}


def upgrade_legacy_states(tensors: dict[str, np.ndarray], wanted: dict[str, tuple]) -> dict[str, np.ndarray]:
  """Checkpoint tensors of ``HierarchicalState``s written by earlier versions, in the current layout. lopt 0.2 kept
  one ``TensorState`` per tensor (``<state>/tensors/<param path>/<field>``, shapes B + F; now stacked:
  ``<state>/tensors/<field>``, B + (T,) + F); lopt 0.2-0.4 kept the per-coordinate states like params
  (``<state>/momentum/<param path>``, B + S + (K,); now one entry per ``coordinate_groups`` group:
  ``<state>/momentum/<k>``, B + S + (K,) for a group of one, else B + (n,) + S + (K,); the same for ``average`` and
  ``second_moment``). The tensors' tree order is that of a sibling tree like params in ``wanted`` (the estimator's
  inner parameters), else their paths' natural order. (Where every group has one tensor and the params are a list,
  the old names and shapes are the new ones, with the same contents.)

  wanted: name -> shape of every tensor the restoring template expects, in tree order. A current checkpoint is
  returned as it is; other tensors are passed through."""
  out = tensors
  owners = [name[:-len("tensors/h")] for name in wanted if name.endswith("/tensors/h") or name == "tensors/h"]
  for owner in owners:
    coordinates = {n: shape for n, shape in wanted.items() if n.startswith(tuple(
        owner + field + "/" for field in ("momentum", "average", "second_moment")))}
    fields = {n: shape for n, shape in wanted.items() if n.startswith(owner + "tensors/")}
    current = lambda names: all(n in tensors and np.shape(tensors[n]) == tuple(names[n]) for n in names)  # noqa: E731
    if current(coordinates) and current(fields):
      continue
    paths = _legacy_param_paths(tensors, wanted, owner)
    if not paths or owner + "step" not in tensors:
      continue
    batch = np.ndim(tensors[owner + "step"])
    out = dict(out) if out is tensors else out
    for name in fields:  # lopt 0.2: one TensorState per tensor
      field = name[len(owner + "tensors/"):]
      legacy = [f"{owner}tensors/{p}/{field}" for p in paths]
      if name not in tensors and field in TENSOR_STATE_RANKS and all(k in tensors for k in legacy):
        _put_stacked(out, name, [np.asarray(tensors[k]) for k in legacy], batch)
    averages = [np.asarray(tensors[f"{owner}average/{p}"]) for p in paths]
    leaves = [jax.ShapeDtypeStruct(x.shape[batch:], x.dtype) for x in averages]
    for k, group in enumerate(coordinate_groups(leaves)):
      for field in ("momentum", "average", "second_moment/rows", "second_moment/cols", "second_moment"):
        parent, _, part = field.partition("/")
        legacy = [f"{owner}{parent}/{paths[i]}" + (f"/{part}" if part else "") for i in group]
        name = f"{owner}{parent}/{k}" + (f"/{part}" if part else "")
        if name in wanted and all(n in tensors for n in legacy):
          _put_stacked(out, name, [np.asarray(tensors[n]) for n in legacy], batch)
  return out


def _put_stacked(out: dict, name: str, parts: list, axis: int) -> None:
  """``out[name]``: the one part, or the parts stacked on ``axis``; nothing where they do not stack (a damaged file,
  whose reader then reports the tensor missing)."""
  try:
    out[name] = parts[0] if len(parts) == 1 else np.stack(parts, axis=axis)
  except ValueError:
    pass


def _legacy_param_paths(tensors: dict, wanted: dict, owner: str) -> list[str]:
  """The parameter paths of a legacy ``HierarchicalState`` at ``owner`` (its ``average/<path>`` names), in tree
  order: that of the first tree in ``wanted`` that holds exactly these paths, else natural order (list indices as
  numbers)."""
  prefix = owner + "average/"
  paths = [n[len(prefix):] for n in tensors if n.startswith(prefix)]
  wanted_paths = set(paths)
  bases: dict = {}
  for name in wanted:
    for path in wanted_paths:
      if name.endswith("/" + path) or name == path:
        bases.setdefault(name[:len(name) - len(path)], []).append(path)
  for base, found in bases.items():
    if len(found) == len(paths) and set(found) == wanted_paths and not base.startswith(owner):
      return found
  natural = lambda p: [(0, int(c), "") if c.isdigit() else (1, 0, c) for c in p.split("/")]  # noqa: E731
  return sorted(paths, key=natural)


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


def tensor_means(*terms: jax.Array) -> jax.Array:
  """(len(terms),) the mean over all coordinates of each term (expressions of one shape S), in the terms' dtype.

  Separate means, written together: XLA fuses sibling reductions of one shape into kernels that read the tensors
  they share once. (Stacked into one reduction they were slower on an H200: on a first axis every row re-reads the
  inputs; on a last axis, XLA's column reduction of (N, terms) took 40 times as long.)"""
  return jnp.stack([jnp.mean(t) for t in terms])


def second_moment_estimate(second_moment, shape: tuple[int, ...]) -> jax.Array:
  """Adafactor's estimate of g^2 of shape S from a second moment (``update_second_moment``'s new state): the rank-1
  r_i c_j / mean(r) for a factored one, else the moment itself."""
  if isinstance(second_moment, Factored):
    a, _ = factored_axes(shape)
    return second_moment.rows * second_moment.cols / jnp.mean(second_moment.rows, axis=a, keepdims=True)
  return second_moment


def coordinate_groups(leaves: list) -> list[list[int]]:
  """Indices of the tensors whose per-coordinate states are stored together (``HierarchicalState``): tensors of at
  most GROUP_LIMIT coordinates with the same shape and dtype, in order of first appearance; every other tensor alone.
  A function of the shapes and dtypes only, the same on every backend, so that a state moves between them."""
  groups: dict = {}
  for i, x in enumerate(leaves):
    groups.setdefault((tuple(x.shape), x.dtype) if np.prod(x.shape) <= GROUP_LIMIT else i, []).append(i)
  return list(groups.values())


def _stack(items: list):
  """One pytree from a group's entries: the entry itself for a group of one, else its leaves stacked on a new first
  axis (the layout of ``HierarchicalState``'s per-coordinate states)."""
  return items[0] if len(items) == 1 else jax.tree.map(lambda *x: jnp.stack(x), *items)


def _unstack(tree, count: int) -> list:
  """The inverse of ``_stack``: a group's ``count`` entries from its pytree."""
  return [tree] if count == 1 else [_row(tree, j) for j in range(count)]


def _map_group(fn, p, g, entries: tuple, count: int, vmapped: bool):
  """``fn(p, g, *entries)`` for every tensor of a group of ``count``, its results as ``_stack`` lays them out. p, g,
  entries: as ``_stack`` lays them out, except p and g given as lists where not ``vmapped`` (one computation per
  tensor, not one batched computation)."""
  if count == 1:
    return fn(p, g, *entries)
  if vmapped:
    return jax.vmap(fn)(p, g, *entries)
  return _stack([fn(p[j], g[j], *_row(entries, j)) for j in range(count)])


def _as_rows(x: jax.Array, count: int) -> jax.Array:
  """A group's per-tensor values (count, ...) whatever its size: a group of one gets its leading axis."""
  return x[None] if count == 1 else x


def _from_rows(x: jax.Array, count: int) -> jax.Array:
  """The inverse of ``_as_rows``."""
  return x[0] if count == 1 else x


def recurrent_dtype(leaves: list) -> Any:
  """The dtype of the per-tensor recurrent states: float32, or wider where a parameter is (float64)."""
  return jnp.result_type(jnp.float32, *(x.dtype for x in leaves))


def _row(tree, i: int):
  """Row ``i`` of every leaf of ``tree``."""
  return jax.tree.map(lambda x: x[i], tree)


def _rows(tree, group: list[int]):
  """A group's rows of every leaf, as ``_stack`` lays them out: the row itself for a group of one, a slice for
  consecutive indices, else a gather."""
  if len(group) == 1:
    return _row(tree, group[0])
  if group == list(range(group[0], group[0] + len(group))):
    return jax.tree.map(lambda x: x[group[0]:group[0] + len(group)], tree)
  return jax.tree.map(lambda x: x[np.asarray(group)], tree)


def _with_derivatives_of(reference, fast):
  """``fast`` (same arguments and results as ``reference``, e.g. a Pallas kernel) with ``reference``'s reverse-mode
  derivatives: meta-gradients through a step differentiate XLA's arithmetic, which Pallas kernels lack rules for.
  Both take every traced value as an argument (the meta-parameters too): a custom VJP cannot differentiate what its
  function closes over."""
  function = jax.custom_vjp(fast)
  function.defvjp(lambda *args: (fast(*args), args), lambda args, cotangent: jax.vjp(reference, *args)[1](cotangent))
  return function


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
  direct_step: bool = _default("direct_step")
  max_log_step: float = _default("max_log_step")

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
    layers He-normal; zero for the MLP's last layer, the step readouts and the schedule (the untrained optimizer is
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
        "clip": {"log_multiplier": jnp.log(jnp.float32(10.0)), "decay_logit": jnp.log(jnp.float32(99.0))},
        "mlp": [],
    }
    if self.direct_step:
      theta["step"]["direct"] = jnp.zeros(shapes["step/direct"])
    for i in range(self.num_layers + 1):
      w_shape = shapes[f"mlp/{i}/w"]
      weights = (jax.random.normal(next(keys), w_shape) * jnp.sqrt(2.0 / w_shape[0]) if i < self.num_layers
                 else jnp.zeros(w_shape))
      theta["mlp"].append({"w": weights, "b": jnp.zeros(shapes[f"mlp/{i}/b"])})
    return theta

  # -- the optimizer -----------------------------------------------------------------------------------------------

  def _init_tensors(self, params: Any) -> TensorState:
    """Zero recurrent states for every tensor, stacked: leaves (T,) or (T, n) in ``recurrent_dtype``."""
    leaves = jax.tree.leaves(params)
    dtype = recurrent_dtype(leaves)
    zeros = lambda *shape: jnp.zeros((len(leaves),) + shape, dtype)  # noqa: E731 (distinct buffers: donation-safe)
    return TensorState(zeros(self.lstm_size), zeros(self.lstm_size), zeros(), zeros(), zeros(),
                       zeros(self.feedback_size))

  def tensor_states(self, state: HierarchicalState, params: Any) -> Any:
    """The per-tensor recurrent states as a tree like ``params``: one ``TensorState`` (leaves () or (n,)) per
    tensor."""
    leaves, treedef = jax.tree.flatten(params)
    return treedef.unflatten([_row(state.tensors, i) for i in range(len(leaves))])

  def coordinate_states(self, state: HierarchicalState, params: Any) -> Any:
    """The per-coordinate states as a tree like ``params``: one ``CoordinateState`` per tensor."""
    leaves, treedef = jax.tree.flatten(params)
    return treedef.unflatten(self._coordinate_rows(state, leaves))

  def _coordinate_rows(self, state: HierarchicalState, leaves: list) -> list[CoordinateState]:
    """One ``CoordinateState`` per leaf, in tree order, from the grouped state."""
    groups = self._check_groups(state, leaves)
    rows = [None] * len(leaves)
    for group, *entries in zip(groups, state.momentum, state.second_moment, state.average):
      for i, row in zip(group, _unstack(tuple(entries), len(group))):
        rows[i] = CoordinateState(*row)
    return rows

  def _check_groups(self, state: HierarchicalState, leaves: list) -> list[list[int]]:
    """The ``coordinate_groups`` of ``leaves``, after checking that the state's momenta were made for them."""
    groups = coordinate_groups(leaves)
    wanted = [(len(group),) * (len(group) > 1) + leaves[group[0]].shape + (len(self.momentum_decays),)
              for group in groups]
    found = [tuple(m.shape) for m in state.momentum]
    if found != wanted:
      raise ValueError(f"HierarchicalOptimizer: the state was not made for these parameters: its momenta have "
                       f"shapes {found}, theirs must be {wanted} (one per group of tensors of one shape and dtype; "
                       f"init_state makes them)")
    return groups

  def init_state(self, theta: Theta, params: Any) -> HierarchicalState:
    """Zero momenta, second moments and recurrent states; the slow average starts at p; step 0."""
    k = len(self.momentum_decays)
    leaves = jax.tree.leaves(params)
    groups = coordinate_groups(leaves)
    # Each group's arrays made once at their stacked shape (not per tensor, then stacked: twice the memory); the
    # average a copy of p, so that a step may donate the state.
    stacked = lambda group: (len(group),) if len(group) > 1 else ()  # noqa: E731
    return HierarchicalState(
        momentum=tuple(jnp.zeros(stacked(group) + leaves[group[0]].shape + (k,), leaves[group[0]].dtype)
                       for group in groups),
        second_moment=tuple(_stack([init_second_moment(leaves[i]) for i in group]) for group in groups),
        average=tuple(jnp.stack([leaves[i] for i in group]) if len(group) > 1 else
                      jnp.array(leaves[group[0]], copy=True) for group in groups),
        tensors=self._init_tensors(params),
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
    grads = treedef.flatten_up_to(grads)
    if not leaves:
      return params, state._replace(train=train, valid=valid, step=new_step)
    groups = self._check_groups(state, leaves)
    # On accelerators the tensors of a group step as one batch (``_batches_tensors``): a pass over the group is one
    # kernel where it was one per tensor, and its states are read and written where they lie; only the parameters
    # and gradients are stacked (and the updates unstacked). Elsewhere, and for a group of one, tensor by tensor.
    vmapped = [self._batches_tensors() and len({(grads[i].shape, grads[i].dtype) for i in group}) == 1
               for group in groups]
    by_group = lambda x: [  # noqa: E731
        _stack([x[i] for i in group]) if batch or len(group) == 1 else [x[i] for i in group]
        for group, batch in zip(groups, vmapped)]
    p, g = by_group(leaves), by_group(grads)
    m, a, v = state.momentum, state.average, state.second_moment
    ts = [_rows(state.tensors, group) for group in groups]
    counts = [len(group) for group in groups]
    # Three passes over each group: the clipping threshold and the new second moment; the statistics the LSTM reads;
    # after the LSTM, the per-coordinate update. Each pass recomputes the per-coordinate terms it needs from the
    # tensors (cheaper than writing and reading them), and reads them through an optimization barrier: XLA then
    # neither keeps an earlier pass's terms in memory nor writes the new momenta and average (the step's outputs)
    # before the last read of the old ones, which would make it copy the donated state. Each group's own per-tensor
    # values (recurrent states, thresholds, statistics, context) pass the barriers too: where the passes of several
    # groups read slices of one array, XLA merged their reductions into multi-output kernels that ran slower than
    # separate ones (H200, eight lone 12.5M-coordinate matrices: 1.9 ms against 1.3 ms).
    first_pass = lambda p, g, *args: self._first_pass(theta, new_step, g, *args)  # noqa: E731
    firsts = [_map_group(first_pass, *args) for args in zip(p, g, zip(v, ts), counts, vmapped)]
    p, g, m, a, v, ts, firsts = jax.lax.optimization_barrier((p, g, m, a, [f["second_moment"] for f in firsts], ts,
                                                               firsts))
    statistics = lambda *args: self._statistics(theta, new_step, *args)  # noqa: E731
    stats = [_map_group(statistics, *args) for args in zip(p, g, zip(m, a, v, ts, firsts), counts, vmapped)]

    # The LSTM runs once over every tensor (the same weights for every tensor): rows (T, ...) in group order.
    dtype = state.tensors.h.dtype
    cast = lambda x: x.astype(dtype)  # noqa: E731
    cat = lambda values: jnp.concatenate([_as_rows(x, n) for x, n in zip(values, counts)])  # noqa: E731
    tensors = [s["tensor"] for s in stats]
    inputs = cat([s["inputs"] for s in stats])
    inputs = jnp.concatenate([inputs, jnp.broadcast_to(cast(global_features), (len(leaves), global_features.shape[0]))],
                             axis=1)
    h, c = lstm_cell(theta["lstm"], cat([t.h for t in tensors]), cat([t.c for t in tensors]), inputs)
    # Summed in this order, as before the direct head existed, so that optimizers without it step bit for bit alike.
    log_step = (cat([t.log_step for t in tensors]) + h @ cast(theta["step"]["w"]) + cast(theta["step"]["b"])
                + cat([s["alignment"] for s in stats]) @ cast(theta["step"]["alignment"]))
    if "direct" in theta["step"]:
      log_step = log_step + inputs @ cast(theta["step"]["direct"])
    log_step = jnp.clip(log_step, -LOG_STEP_LIMIT, self.max_log_step)
    schedule = cast(global_features[-theta["step"]["schedule"].shape[0]:]) @ cast(theta["step"]["schedule"])
    context = jnp.tanh(h @ cast(theta["context"]["w"]) + cast(theta["context"]["b"]))
    offsets = np.cumsum([0] + [len(group) for group in groups])
    parts = lambda x: [_from_rows(x[offsets[k]:offsets[k + 1]], n) for k, n in enumerate(counts)]  # noqa: E731

    contexts, steps = parts(context), parts(log_step + schedule)
    p, g, m, a, v, firsts, stats, contexts, steps = jax.lax.optimization_barrier(
        (p, g, m, a, v, firsts, stats, contexts, steps))
    third_pass = lambda *args: self._coordinate_update(theta, new_step, *args)  # noqa: E731
    results = [_map_group(third_pass, *args) for args in
               zip(p, g, zip(m, a, v, firsts, stats, contexts, steps), counts, vmapped)]
    ratios = [jnp.log(rms / (rms + s["param_rms"] + LOG_FLOOR) + LOG_FLOOR) for (*_, rms), s in zip(results, stats)]
    new_tensors = TensorState(h, c, log_step, cat([t.gradient_rms for t in tensors]), cast(cat(ratios)),
                              cast(cat([feedback for _, _, _, feedback, _ in results])))
    # Back to tree order: the tensors' rows, and each tensor's update in its gradient's dtype.
    order = [i for group in groups for i in group]
    if order != sorted(order):
      new_tensors = jax.tree.map(lambda x: x[np.argsort(order)], new_tensors)
    updates = [None] * len(leaves)
    for group, (u, *_) in zip(groups, results):
      for i, row in zip(group, _unstack(u, len(group))):
        updates[i] = row.astype(grads[i].dtype)
    momentum = tuple(new for _, new, _, _, _ in results)
    average = tuple(new for _, _, new, _, _ in results)
    second_moment = tuple(jax.tree.map(lambda new, old: new.astype(old.dtype), f["second_moment"], old)
                          for f, old in zip(firsts, state.second_moment))
    return treedef.unflatten(updates), HierarchicalState(momentum, second_moment, average, new_tensors, train, valid,
                                                         new_step)

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
    rows = []
    for i, (p, g, own) in enumerate(zip(leaves, treedef.flatten_up_to(grads), self._coordinate_rows(state, leaves))):
      ts = _row(state.tensors, i)
      first = self._first_pass(theta, new_step, g, own.second_moment, ts)
      stats = self._statistics(theta, new_step, p, g, own.momentum, own.average, first["second_moment"], ts, first)
      rows.append(stats["inputs"].astype(jnp.float32))
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
    step_scale * exp(this). Tensors in the tree order of params."""
    schedule = time_features(state.step, num_steps) @ jnp.asarray(theta["step"]["schedule"], jnp.float32)
    return state.tensors.log_step.astype(jnp.float32) + schedule

  def _first_pass(self, theta: Theta, step: jax.Array, g, second_moment, tensor: TensorState) -> dict:
    """A tensor's first pass: the meta-learned clipping threshold against the bias-corrected EMA of the (clipped)
    gradient's RMS (from the state alone), and the new second moment of the clipped gradient (in g's dtype; a
    factored one takes row and column means of g^2, a read of g)."""
    dtype = g.dtype
    t = step.astype(dtype)
    decay = jax.nn.sigmoid(theta["clip"]["decay_logit"]).astype(dtype)
    history = tensor.gradient_rms.astype(dtype) / jnp.maximum(1 - decay ** (t - 1), CORRECTION_FLOOR)
    has_history = (step > 1) & (tensor.gradient_rms > 0)
    threshold = jnp.where(has_history, jnp.exp(theta["clip"]["log_multiplier"].astype(dtype)) * history, jnp.inf)
    second_moment, _ = update_second_moment(jax.tree.map(lambda v: v.astype(dtype), second_moment),
                                            jnp.clip(g, -threshold, threshold), self.rms_decay)
    return {"decay": decay, "history": history, "has_history": has_history, "threshold": threshold,
            "second_moment": second_moment}

  def _coordinates(self, step: jax.Array, p, g, momentum, average, second_moment, threshold) -> dict:
    """A tensor's per-coordinate terms, expressions of shape S in g's dtype: the clipped gradient g, the new momenta
    (S + (K,)), the feature columns [g, p, p - a, m_1..m_K, g rs, m_1 rs..m_K rs], the previous momenta times rs,
    Adam's direction m_1 rs / (1 - b_1^t) and its correction; rs = 1 / sqrt(v / (1 - rho^t)) with v the
    ``second_moment_estimate`` of the new second moment."""
    dtype = g.dtype
    t = step.astype(dtype)
    g = jnp.clip(g, -threshold, threshold)
    decays = jnp.asarray(self.momentum_decays, dtype)
    old_momentum = momentum.astype(dtype)
    new_momentum = update_momentum(old_momentum, g, decays)
    estimate = second_moment_estimate(second_moment, g.shape) / (1 - jnp.power(jnp.asarray(self.rms_decay, dtype), t))
    rs = jax.lax.rsqrt(estimate + RSQRT_EPSILON)
    p = p.astype(dtype)
    momenta = [new_momentum[..., i] for i in range(len(self.momentum_decays))]
    correction = 1 - decays[0] ** t
    return {"g": g, "momentum": new_momentum,
            "columns": [g, p, p - average.astype(dtype), *momenta, g * rs, *(m * rs for m in momenta)],
            "previous": [old_momentum[..., i] * rs for i in range(len(self.momentum_decays))],
            "adam": momenta[0] * rs / correction, "adam_correction": correction}

  def _statistics(self, theta: Theta, step: jax.Array, p, g, momentum, average, second_moment,
                  tensor: TensorState, first: dict) -> dict:
    """A tensor's second pass: the columns' normalizers (N, 4 + 2K) and the LSTM's inputs, every statistic a mean
    over the tensor, taken together (``tensor_means``); ``second_moment`` is the first pass's new one."""
    del theta
    dtype = g.dtype
    k = len(self.momentum_decays)
    count = 4 + 2 * k

    def reference(step, p, g, momentum, average, second_moment, threshold):
      c = self._coordinates(step, p, g, momentum, average, second_moment, threshold)
      # Means of: the raw g^2; each column squared (column 0 is the clipped g); g m_k rs and (m_k rs)^2 with the
      # previous momenta, for the alignments.
      return tensor_means(g * g, *(f * f for f in c["columns"]),
                          *(c["g"] * m for m in c["previous"]), *(m * m for m in c["previous"]))

    args = (step, p, g, momentum, average, second_moment, first["threshold"])
    if self._pallas(g, p, momentum, average, second_moment):
      def fast(step, p, g, momentum, average, second_moment, threshold):
        constants = self._pallas_constants(step, g, second_moment, threshold)
        return pallas_passes.statistics_sums(p, g, momentum, average, *second_moment, constants,
                                             interpret=PALLAS == "interpret") / g.size
      means = _with_derivatives_of(reference, fast)(*args)
    else:
      means = reference(*args)
    squares = means[1:1 + count]
    dots, previous_squares = means[1 + count:1 + count + k], means[1 + count + k:]
    # The RMS of a tensor with this mean square; the floor keeps its derivative finite at an all-zero tensor.
    floor_sqrt = lambda mean: jnp.sqrt(mean + LOG_FLOOR)  # noqa: E731
    raw_rms = floor_sqrt(means[0])
    history = first["history"]
    spike = jnp.where(first["has_history"],
                      jnp.clip(jnp.log(raw_rms + LOG_FLOOR) - jnp.log(history + LOG_FLOOR), -5, 5) / 5, 0)
    decay = first["decay"]
    gradient_rms = decay * tensor.gradient_rms.astype(dtype) + (1 - decay) * floor_sqrt(squares[0])
    correction = 1 - jnp.asarray(self.momentum_decays[0], dtype) ** step.astype(dtype)  # as ``_coordinates``'
    adam_rms = floor_sqrt(squares[4 + k] / (correction * correction))  # Adam's direction: column 4 + k, corrected
    param_rms, drift_rms = floor_sqrt(squares[1]), floor_sqrt(squares[2])
    # cos(g, previous m_k rs): > 0 while successive steps keep going the same way (the hypergradient's sign). The
    # sums' common factor n cancels; the floor, 1e-30 on the sums, stays a normal float32 at any n (0 for g = 0).
    alignment = dots / jnp.sqrt(squares[0] * previous_squares + max(LOG_FLOOR / g.size ** 2, 1e-37))
    rec = tensor.h.dtype
    inputs = jnp.concatenate([
        LOG_SCALE * jnp.log(jnp.stack([raw_rms, param_rms, adam_rms, drift_rms]) + LOG_FLOOR),
        tensor.update_ratio.astype(dtype)[None] * LOG_SCALE, spike[None], alignment,
        tensor.log_step.astype(dtype)[None] / LOG_STEP_LIMIT, jnp.asarray(shape_features(g.shape), dtype),
        tensor.feedback.astype(dtype)]).astype(rec)
    return {"norms": jnp.sqrt(squares + NORM_EPSILON), "alignment": alignment.astype(rec), "inputs": inputs,
            "param_rms": param_rms, "tensor": tensor._replace(gradient_rms=gradient_rms.astype(rec))}

  def _batches_tensors(self) -> bool:
    """Whether tensors of one shape are stepped as one batch: on accelerators, where a pass over a batch is one
    kernel launch where it was one per tensor; not on a CPU, where it saves nothing and costs compilation."""
    return jax.default_backend() != "cpu"

  def _units_form(self) -> bool:
    """Whether the per-coordinate MLP is written unit by unit, each unit an expression of shape S: on accelerators,
    for small MLPs (UNITS_LIMIT products per coordinate). There XLA fuses it with the reads of the tensors instead of
    writing and reading (N, width) products (H200, 100M parameters: 6.8 ms per step against 12.3 ms). On a CPU the
    matrix products compile in half the time when meta-gradients differentiate through the step.

    LOPT_JAX_MLP_FORM in the environment overrides the backend's choice: ``matrix`` everywhere (the units form has
    about twice the equations once differentiated, which a meta-training run traces at every start), ``units``
    everywhere the MLP is small (tests of the GPU form on a CPU). Same numbers to float32 rounding."""
    if MLP_FORM not in MLP_FORMS:
      raise SettingError(f"LOPT_JAX_MLP_FORM is {MLP_FORM!r}; allowed: {', '.join(MLP_FORMS)}")
    products = sum(w[0] * w[1] for name, w in self.param_shapes().items() if name.startswith("mlp/") and
                   name.endswith("/w"))
    if MLP_FORM == "matrix" or products > UNITS_LIMIT:
      return False
    return MLP_FORM == "units" or jax.default_backend() != "cpu"

  def _coordinate_update(self, theta: Theta, step: jax.Array, p, g, momentum, average, second_moment, first: dict,
                         s: dict, context: jax.Array, log_step: jax.Array):
    """A tensor's third pass: the per-coordinate MLP over the normalized columns and the LSTM's context -> (update S,
    new momentum S + (K,), new slow average S, feedback (feedback_size,), RMS of the update ()), the state in its
    own dtypes. The normalizers scale the first layer's rows and the context folds into its bias, so the normalized
    columns are never formed.

    On accelerators a small MLP is written unit by unit (``_units_form``); XLA fuses it with the reads of the
    tensors (on an H200 it still writes the hidden units once, to share them between the update and the feedback
    sums: splitting those into two passes was slower)."""
    def reference(theta, step, p, g, momentum, average, second_moment, threshold, norms, context, log_step):
      c = self._coordinates(step, p, g, momentum, average, second_moment, threshold)
      update, feedback = self._mlp_update(theta, c, norms, context, log_step)
      means = tensor_means(update * update, *(jnp.tanh(f) for f in feedback))
      new_average = self.average_decay * average + (1 - self.average_decay) * p.astype(average.dtype)
      return update, c["momentum"].astype(momentum.dtype), new_average, means

    args = (theta, step, p, g, momentum, average, second_moment, first["threshold"], s["norms"], context, log_step)
    if self._pallas(g, p, momentum, average, second_moment):
      def fast(theta, step, p, g, momentum, average, second_moment, threshold, norms, context, log_step):
        weights, bias, layers = self._first_layer(theta, norms, context, g.dtype)
        constants = pallas_passes.update_constants(
            self._pallas_constants(step, g, second_moment, threshold), log_step,
            (self.step_scale, self.magnitude_scale, self.direction_scale, self.average_decay,
             1 - self.average_decay), weights, bias, layers)
        sizes = (weights.shape,) + tuple(layer["w"].shape for layer in layers)
        *outputs, sums = pallas_passes.coordinate_update(p, g, momentum, average, *second_moment, constants, sizes,
                                                         interpret=PALLAS == "interpret")
        return (*outputs, sums / g.size)
      update, new_momentum, new_average, means = _with_derivatives_of(reference, fast)(*args)
    else:
      update, new_momentum, new_average, means = reference(*args)
    return update, new_momentum, new_average, means[1:], jnp.sqrt(means[0] + LOG_FLOOR)

  def _pallas(self, g, p, momentum, average, second_moment) -> bool:
    """Whether a tensor's statistics and update passes run as Pallas kernels (``pallas_passes``): on GPUs, for
    float32 tensors of at least PALLAS_MIN_SIZE coordinates whose second moment is factored over their last two axes
    (matrices; convolution kernels laid out (H, W, in, out)), with the MLP written unit by unit. XLA keeps the rest:
    small tensors cost it nothing extra, vectors have no factored second moment, and other layouts would need
    transposed copies. Derivatives (meta-
    gradients through the step) are XLA's (``_with_derivatives_of``; forward-mode derivatives of a step are not
    defined on those tensors). LOPT_JAX_PALLAS=off in the environment keeps XLA's passes everywhere."""
    if PALLAS not in PALLAS_MODES:
      raise SettingError(f"LOPT_JAX_PALLAS is {PALLAS!r}; allowed: {', '.join(PALLAS_MODES)}")
    if PALLAS == "off" or (PALLAS == "auto" and not (jax.default_backend() == "gpu" and pallas_passes.available())):
      return False
    arrays = [g, p, momentum, average, *jax.tree.leaves(second_moment)]
    return (g.ndim >= 2 and factored_axes(g.shape) == (g.ndim - 2, g.ndim - 1) and g.size >= PALLAS_MIN_SIZE
            and isinstance(second_moment, Factored)
            and all(x.dtype == jnp.float32 for x in arrays) and (self._units_form() or PALLAS == "interpret"))

  def _pallas_constants(self, step: jax.Array, g, second_moment: Factored, threshold) -> jax.Array:
    """``pallas_passes.statistics_constants`` of a float32 tensor (..., R, C) at the new step count, computed as
    ``_coordinates`` computes them: (..., n), one row per matrix (each has its own mean of the second moment's
    rows)."""
    t = step.astype(g.dtype)
    decays = jnp.asarray(self.momentum_decays, g.dtype)
    return pallas_passes.statistics_constants(
        threshold, jnp.mean(second_moment.rows, axis=-2)[..., 0],
        1 - jnp.power(jnp.asarray(self.rms_decay, g.dtype), t), 1 - decays[0] ** t, decays)

  def _first_layer(self, theta: Theta, norms: jax.Array, context: jax.Array, dtype) -> tuple:
    """The per-coordinate MLP's layers in ``dtype``, its first layer folded for one tensor: (weights over the feature
    columns divided by their normalizers (columns, H), bias with the context's contribution (H,), later layers)."""
    layers = [jax.tree.map(lambda w: w.astype(dtype), layer) for layer in theta["mlp"]]
    count = norms.shape[0]
    weights = layers[0]["w"][:count] / norms[:, None]
    bias = layers[0]["b"] + context.astype(dtype) @ layers[0]["w"][count:]
    return weights, bias, layers[1:]

  def _mlp_update(self, theta: Theta, c: dict, norms: jax.Array, context: jax.Array,
                  log_step: jax.Array) -> tuple[jax.Array, list]:
    """The per-coordinate MLP over ``_coordinates``' columns normalized by ``norms`` -> (update S, the feedback
    units [S] * feedback_size)."""
    dtype = c["g"].dtype
    columns = c["columns"]
    weights, bias, layers = self._first_layer(theta, norms, context, dtype)
    shape = c["g"].shape
    if self._units_form():
      units = [bias[j] + sum(f * weights[i, j] for i, f in enumerate(columns)) for j in range(bias.shape[0])]
      for layer in layers:
        w, b = layer["w"], layer["b"]
        units = [sum(jax.nn.relu(x) * w[j, o] for j, x in enumerate(units)) + b[o] for o in range(w.shape[1])]
      direction, magnitude, feedback = units[0], units[1], units[2:]
    else:
      x = bias + sum(f[..., None] * w for f, w in zip(columns, weights))
      x = x.reshape(-1, x.shape[-1])
      for layer in layers:
        x = jax.nn.relu(x) @ layer["w"] + layer["b"]
      direction, magnitude = x[:, 0].reshape(shape), x[:, 1].reshape(shape)
      feedback = [x[:, 2 + i].reshape(shape) for i in range(x.shape[1] - 2)]
    scale = self.step_scale * jnp.exp(log_step.astype(dtype) + self.magnitude_scale * magnitude)
    return scale * (self.direction_scale * direction - c["adam"]), feedback
