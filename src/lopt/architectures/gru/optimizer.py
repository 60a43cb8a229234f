"""The component-wise GRU learned optimizer (Andrychowicz et al. 2016; the paper's optimizer).

One small GRU runs independently on every scalar parameter: parameters live on the batch axis, so the same
meta-parameters optimize any pytree of any size. Per coordinate, with gradient g and state h (size H):

  x  = encode(g)                                  # input_scale * g, or [log1p|g|, sign g]
  u  = sigmoid(A_u x + W_u h + b_u)               # update gate
  r  = sigmoid(A_r x + W_r h + b_r)               # reset gate
  c  = tanh(A_c x + W_c (r * h) + b_c)            # candidate
  h' = u * h + (1 - u) * c
  dx = output_scale * (w . h' + b)                # readout of the *new* state, zero at initialization
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp

from lopt.architectures.gru.spec import NUM_INPUTS, SPEC

Theta = dict[str, jax.Array]  # flat {name: array}: maps one-to-one onto a safetensors file
_DEFAULT = {name: field.default for name, field in SPEC.fields.items()}


class GRUState(NamedTuple):
  """hidden: a pytree like params, each leaf of shape leaf.shape + (hidden_size,); step: int32 scalar."""
  hidden: Any
  step: jax.Array


@dataclass(frozen=True)
class GRUOptimizer:
  """Component-wise GRU optimizer.

  Attributes:
    hidden_size: GRU units (paper: 256).
    input_scale: the gradient is multiplied by this before encoding (paper, linear regression: 1.0).
    output_scale: the readout is multiplied by this (paper, linear regression: 1.0).
    input_encoding: "scale" (1 input: input_scale*g) or "log1p_sign" (2 inputs: [log1p|input_scale*g|, sign g]).
  """
  hidden_size: int = _DEFAULT["hidden_size"]
  input_scale: float = _DEFAULT["input_scale"]
  output_scale: float = _DEFAULT["output_scale"]
  input_encoding: str = _DEFAULT["input_encoding"]
  spec: ClassVar = SPEC

  def __post_init__(self):
    SPEC.validate(asdict(self), "GRUOptimizer")

  @property
  def num_inputs(self) -> int:
    return NUM_INPUTS[self.input_encoding]

  def config(self) -> dict:
    """JSON-serializable constructor arguments, plus the architecture name."""
    return SPEC.config(asdict(self))

  # -- meta-parameters --------------------------------------------------------------------------------------------

  def init(self, key: jax.Array) -> Theta:
    """Fan-in normal GRU weights, zero biases, zero initial state, zero readout (an untrained optimizer is inert)."""
    in_key, rec_key = jax.random.split(key)
    shapes = self.param_shapes()
    return {
        "input_weights": jax.random.normal(in_key, shapes["input_weights"]) / jnp.sqrt(self.num_inputs),
        "recurrent_weights": jax.random.normal(rec_key, shapes["recurrent_weights"]) / jnp.sqrt(self.hidden_size),
        **{name: jnp.zeros(shapes[name]) for name in ("bias", "initial_state", "readout_weights", "readout_bias")},
    }

  def param_shapes(self) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the meta-parameters (the spec's, which the file format shares)."""
    return SPEC.param_shapes(asdict(self))

  # -- the recurrent map F(h, g) and readout R(h), for training and for the dynamics toolkit -------------------------

  def encode(self, gradient: jax.Array) -> jax.Array:
    """(...) gradients -> (..., num_inputs) network inputs."""
    scaled = self.input_scale * gradient
    if self.input_encoding == "scale":
      return scaled[..., None]
    return jnp.stack([jnp.log1p(jnp.abs(scaled)), jnp.sign(scaled)], axis=-1)

  def cell(self, theta: Theta, hidden: jax.Array, gradient: jax.Array) -> jax.Array:
    """h' = F(h, g): hidden (..., H), gradient (...) -> new hidden (..., H)."""
    size = self.hidden_size
    from_input = self.encode(gradient) @ theta["input_weights"] + theta["bias"]  # (..., 3H)
    weights = theta["recurrent_weights"]
    gates = jax.nn.sigmoid(from_input[..., :2 * size] + hidden @ weights[:, :2 * size])
    update_gate, reset_gate = gates[..., :size], gates[..., size:]
    candidate = jnp.tanh(from_input[..., 2 * size:] + (reset_gate * hidden) @ weights[:, 2 * size:])
    return update_gate * hidden + (1.0 - update_gate) * candidate

  def readout(self, theta: Theta, hidden: jax.Array) -> jax.Array:
    """dx = R(h): hidden (..., H) -> parameter change (...)."""
    return self.output_scale * (hidden @ theta["readout_weights"] + theta["readout_bias"])[..., 0]

  # -- the optimizer ---------------------------------------------------------------------------------------------

  def init_state(self, theta: Theta, params: Any) -> GRUState:
    """Every coordinate starts from the learned initial state h0."""
    h0 = theta["initial_state"]
    hidden = jax.tree.map(lambda p: jnp.broadcast_to(h0, p.shape + h0.shape).astype(p.dtype), params)
    return GRUState(hidden, jnp.zeros((), jnp.int32))

  def update(self, theta: Theta, state: GRUState, grads: Any, params: Any = None, *, loss=None, valid_loss=None,
             step=None, num_steps=None):
    """One step for every coordinate: returns (updates like grads, new state). Only the gradient enters (the
    paper's optimizer): params, losses, step and the horizon hint are accepted and unused."""
    del params, loss, valid_loss, step, num_steps
    new_hidden = jax.tree.map(lambda h, g: self.cell(theta, h, g), state.hidden, grads)
    updates = jax.tree.map(lambda h: self.readout(theta, h), new_hidden)
    return updates, GRUState(new_hidden, state.step + 1)

  # -- RecurrentView (lopt.api): what the dynamics toolkit needs ---------------------------------------------------

  def initial_hidden(self, theta: Theta) -> jax.Array:
    """h0 (H,), shared by every coordinate."""
    return theta["initial_state"]

  def hidden(self, state: GRUState) -> Any:
    """The per-coordinate states: a pytree like params, leaves leaf.shape + (H,)."""
    return state.hidden
