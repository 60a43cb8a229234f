"""The per-parameter MLP optimizer in PyTorch: ``MLPRule``, the equations of ``optimizer.py``, without JAX.

Per parameter tensor p of shape S, with gradient g, at step t (t_new = t + 1; rho = rms_decay):

  m_k  <- b_k m_k + (1 - b_k) g;   g2 = g * g + 1e-30
  ndim S >= 2, over the two largest axes a < b (``spec.factored_axes``):
                r <- rho r + (1 - rho) mean(g2, b),  c <- rho c + (1 - rho) mean(g2, a),  v = r c / mean(r, a)
                (the means keep their axis)
  ndim S < 2:   v <- rho v + (1 - rho) g2
  rs = rsqrt(v / (1 - rho^t_new) + 1e-12);  f = [g, p, m_1..m_K, g rs, m_1 rs..m_K rs], each f_j / sqrt(mean_S f_j^2 + 1e-12)
  x = [f, tanh(t_new / tau) for tau in TIME_SCALES];  x <- relu(x W_i + b_i);  (d, a) = x W_L + b_L
  p <- p + lr * d * exp(magnitude_scale * a) * step_scale

The state of p (``state_shapes``): ``momentum`` S + (K,), ``rows`` and ``cols`` (``spec.factored_shapes``) when
ndim S >= 2 or else ``second_moment`` S, all in p's dtype on p's device; ``step``, an int32 0-d tensor (exact at any
step count; torch's ``load_state_dict`` keeps a tensor named "step" as saved). The layouts are the JAX state's, so
states carry over. Each tensor is one batched computation over its coordinates; results agree with JAX to rounding
(reductions and matrix products may sum in another order).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from lopt.architectures.mlp.spec import (G2_EPSILON, NORM_EPSILON, RSQRT_EPSILON, TIME_SCALES, factored_axes,
                                         factored_shapes)


class Theta(NamedTuple):
  """Meta-parameters and constants in one (device, dtype): layers [(w (fan_in, fan_out), b (fan_out,)), ...],
  decays (K,), 1 - decays (K,) and the time scales (T,)."""
  layers: list
  decays: torch.Tensor
  one_minus_decays: torch.Tensor
  time_scales: torch.Tensor


def prepare_theta(tensors: dict, num_layers: int, decays: tuple, dtype: torch.dtype,
                  device: torch.device) -> Theta:
  """The key paths 'layers/i/w', 'layers/i/b' (i < num_layers + 1) as (w, b) pairs on ``device`` in ``dtype``."""
  def convert(value):  # straight to dtype: a tuple of Python floats must not round through float32 on the way
    return torch.as_tensor(value, dtype=dtype, device=device)
  layers = [(convert(tensors[f"layers/{i}/w"]), convert(tensors[f"layers/{i}/b"])) for i in range(num_layers + 1)]
  decay_tensor = convert(decays)
  # 1 - b computed in the parameters' dtype, as the JAX side does, so both round the same way.
  return Theta(layers, decay_tensor, 1 - decay_tensor, convert(TIME_SCALES))


def update_momentum_(momentum: torch.Tensor, g: torch.Tensor, theta: Theta) -> torch.Tensor:
  """In place m_k <- b_k m_k + (1 - b_k) g: momentum S + (K,), g S."""
  return momentum.mul_(theta.decays).add_(g.unsqueeze(-1) * theta.one_minus_decays)


def update_second_moment_(state: dict, g: torch.Tensor, decay: float) -> torch.Tensor:
  """Updates ``rows`` and ``cols`` (g.dim() >= 2) or ``second_moment`` in ``state`` in place; returns the estimate
  v of g^2, shape S."""
  g2 = g * g + G2_EPSILON
  if g.dim() >= 2:
    a, b = factored_axes(tuple(g.shape))
    rows, cols = state["rows"], state["cols"]
    rows.mul_(decay).add_(g2.mean(b, keepdim=True) * (1 - decay))
    cols.mul_(decay).add_(g2.mean(a, keepdim=True) * (1 - decay))
    return rows * cols / rows.mean(a, keepdim=True)
  return state["second_moment"].mul_(decay).add_(g2 * (1 - decay))


def features(g: torch.Tensor, p: torch.Tensor, momentum: torch.Tensor, estimate: torch.Tensor,
             step: torch.Tensor, theta: Theta) -> torch.Tensor:
  """(N, num_inputs) inputs for one tensor, N = p.numel(): the per-tensor features normalized over the N rows, then
  the time features of ``step`` (the new count)."""
  n, k = p.numel(), momentum.shape[-1]
  rs = torch.rsqrt(estimate + RSQRT_EPSILON)
  per_tensor = torch.cat([g.reshape(n, 1), p.reshape(n, 1), momentum.reshape(n, k), (g * rs).reshape(n, 1),
                          (momentum * rs.unsqueeze(-1)).reshape(n, k)], dim=1)
  # Mean over dim 0 of the (N, F) view: a 0-d tensor is one row (torch reads mean over dim=() as "all dims").
  per_tensor = per_tensor / torch.sqrt((per_tensor * per_tensor).mean(0) + NORM_EPSILON)
  time = torch.tanh(step.to(device=g.device, dtype=g.dtype) / theta.time_scales)
  return torch.cat([per_tensor, time.expand(n, -1)], dim=1)


def mlp(layers: list, x: torch.Tensor) -> torch.Tensor:
  """(N, num_inputs) -> (N, 2): relu hidden layers, linear last layer."""
  for w, b in layers[:-1]:
    x = torch.addmm(b, x, w).relu_()
  w, b = layers[-1]
  return torch.addmm(b, x, w)


class MLPRule:
  """The per-parameter MLP update for ``lopt.torch``: ``step`` changes parameters and their states in place.

  Args:
    values: the architecture's fields, validated and normalized (``SPEC.validate``'s result).
    tensors: meta-parameters by key path ('layers/i/w', 'layers/i/b'), float32 or float64; kept on the CPU as
      given and converted once per (device, dtype) that parameters use.
  """

  def __init__(self, values: dict, tensors: dict[str, torch.Tensor]):
    self.values = dict(values)
    self._decays = tuple(float(b) for b in values["momentum_decays"])
    self._tensors = {name: torch.as_tensor(value).detach().clone() for name, value in tensors.items()}
    self._theta_cache: dict = {}

  def state_shapes(self, p: torch.Tensor) -> dict[str, tuple[int, ...]]:
    """The shape every state entry of parameter ``p`` must have (loaded state dicts are checked against these)."""
    shape = tuple(p.shape)
    shapes = {"momentum": shape + (len(self._decays),)}
    if len(shape) >= 2:
      rows, cols = factored_shapes(shape)
      shapes.update(rows=rows, cols=cols)
    else:
      shapes["second_moment"] = shape
    shapes["step"] = ()
    return shapes

  def reset(self) -> None:
    """Called after a state dict was loaded: nothing to forget (the states are read from ``states`` every step;
    only theta is cached, and it does not change)."""

  @torch.no_grad()
  def step(self, key, params: list[torch.Tensor], states: list[dict], lr: float) -> None:
    """p <- p + lr * update for every p (each has p.grad), updating ``states[i]`` (created on first use).

    ``key`` (the caller's bucket id) is not needed: every tensor is computed on its own."""
    del key
    for p, state in zip(params, states):
      if not state:
        state.update(self._zero_state(p))
      theta = self._theta(p.device, p.dtype)
      g = p.grad
      momentum = update_momentum_(state["momentum"], g, theta)
      estimate = update_second_moment_(state, g, self.values["rms_decay"])
      state["step"].add_(1)
      decay = torch.as_tensor(self.values["rms_decay"], dtype=g.dtype, device=g.device)
      estimate = estimate / (1 - torch.pow(decay, state["step"].to(g.dtype)))  # bias correction, as in JAX
      out = mlp(theta.layers, features(g, p, momentum, estimate, state["step"], theta))
      update = out[:, 0] * torch.exp(self.values["magnitude_scale"] * out[:, 1]) * self.values["step_scale"]
      p.add_(update.view(p.shape), alpha=lr)

  def _zero_state(self, p: torch.Tensor) -> dict[str, torch.Tensor]:
    state = {name: torch.zeros(shape, dtype=p.dtype, device=p.device)
             for name, shape in self.state_shapes(p).items() if name != "step"}
    state["step"] = torch.zeros((), dtype=torch.int32, device=p.device)
    return state

  def _theta(self, device: torch.device, dtype: torch.dtype) -> Theta:
    key = (device, dtype)
    if key not in self._theta_cache:
      self._theta_cache[key] = prepare_theta(self._tensors, self.values["num_layers"], self._decays, dtype, device)
    return self._theta_cache[key]
