"""The component-wise GRU's recurrent map and readout in PyTorch, on a flat batch of coordinates.

Same equations as ``lopt.architectures.gru.optimizer.GRUOptimizer.cell`` / ``readout`` (docs/CHECKPOINT_FORMAT.md):

  x  = encode(g)                                  # input_scale * g, or [log1p|input_scale g|, sign(input_scale g)]
  u  = sigmoid(A_u x + W_u h + b_u),  r = sigmoid(A_r x + W_r h + b_r)
  c  = tanh(A_c x + W_c (r * h) + b_c)
  h' = u * h + (1 - u) * c
  dx = output_scale * (w . h' + b)

The column blocks of ``input_weights`` / ``recurrent_weights`` / ``bias`` are [update | reset | candidate].
Results agree with JAX to rounding (matrix products may sum in another order, fused multiply-adds may differ).
"""

from __future__ import annotations

import torch


def prepare_theta(tensors: dict, dtype: torch.dtype, device: torch.device) -> dict[str, torch.Tensor]:
  """Meta-parameters on ``device`` in ``dtype``, with input weights, recurrent weights and bias pre-split into their
  gate [update | reset] and candidate blocks, each contiguous: every product below is then one plain GEMM written
  straight into a contiguous (N, 2H) or (N, H) buffer, with no strided copies."""
  theta = {name: torch.as_tensor(value).to(device=device, dtype=dtype) for name, value in tensors.items()}
  size = theta["initial_state"].shape[0]
  for name in ("input_weights", "recurrent_weights", "bias"):
    theta[name + "_gates"] = theta[name][..., :2 * size].contiguous()       # (I or H, 2H) / (2H,)
    theta[name + "_candidate"] = theta[name][..., 2 * size:].contiguous()   # (I or H, H) / (H,)
    del theta[name]  # only the split blocks are used: do not keep a second copy on the device
  return theta


def encode(gradient: torch.Tensor, input_scale: float, input_encoding: str) -> torch.Tensor:
  """(N,) gradients -> (N, num_inputs) network inputs."""
  scaled = input_scale * gradient
  if input_encoding == "scale":
    return scaled[:, None]
  return torch.stack([torch.log1p(scaled.abs()), torch.sign(scaled)], dim=-1)


def input_projection(theta: dict, inputs: torch.Tensor, block: str) -> torch.Tensor:
  """bias + inputs @ input_weights for one block: (N, I) -> (N, 2H) or (N, H), contiguous. (A K=1 GEMM measured
  faster on CPU than the equivalent broadcasting addcmul.)"""
  return torch.addmm(theta["bias_" + block], inputs, theta["input_weights_" + block])


def cell(theta: dict, hidden: torch.Tensor, gradient: torch.Tensor, input_scale: float,
         input_encoding: str) -> torch.Tensor:
  """h' = F(h, g): hidden (N, H), gradient (N,) -> new hidden (N, H), one batched computation for all N.

  h' = u*h + (1-u)*c is computed as lerp(c, h, u) = c + u*(h - c): the same value in one pass (rounding may differ
  in the last bit)."""
  size = hidden.shape[-1]
  inputs = encode(gradient, input_scale, input_encoding)
  gates = input_projection(theta, inputs, "gates").addmm_(hidden, theta["recurrent_weights_gates"]).sigmoid_()
  update_gate, reset_gate = gates[:, :size], gates[:, size:]
  candidate = input_projection(theta, inputs, "candidate")
  candidate.addmm_(reset_gate * hidden, theta["recurrent_weights_candidate"]).tanh_()
  return torch.lerp(candidate, hidden, update_gate)


def readout(theta: dict, hidden: torch.Tensor, output_scale: float) -> torch.Tensor:
  """dx = R(h): hidden (N, H) -> parameter changes (N,)."""
  return torch.addmm(theta["readout_bias"], hidden, theta["readout_weights"])[:, 0].mul_(output_scale)


CHUNK_ELEMENTS = 1 << 24  # hidden-state numbers per chunk: each (chunk, H) temporary is at most 64 MiB in float32


class GRURule:
  """The GRU as ``lopt.torch.LearnedOptimizer`` runs it: per bucket of parameters (same group, device and dtype), every
  gradient is flattened into one (N,) vector, the GRU runs on the (N, H) hidden states chunk by chunk, and the (N,)
  updates are split back (views, no copies) and added with one foreach call.

  The state of parameter p is ``hidden`` of shape p.shape + (H,) (the layout of the JAX optimizer's state) and a
  ``step`` count; the per-parameter ``hidden`` tensors are views into one (N, H) buffer of the rule's, which each
  step updates in place, ``chunk_size`` coordinates at a time (default: CHUNK_ELEMENTS / H): the transient memory
  is a few (chunk_size, H) temporaries however many coordinates there are -- a 256-unit GRU at 10M parameters keeps
  10 GB of hidden states in float32, and an unchunked step would add five times that.
  """

  def __init__(self, values: dict, tensors: dict):
    self.hidden_size = values["hidden_size"]
    self.input_scale, self.output_scale = values["input_scale"], values["output_scale"]
    self.input_encoding = values["input_encoding"]
    self.chunk_size = max(1, CHUNK_ELEMENTS // self.hidden_size)
    self._tensors = tensors  # on the CPU in the stored dtype; converted once per (device, dtype) that parameters use
    self._theta_cache: dict = {}
    self._flat_hidden: dict = {}

  def state_shapes(self, p: torch.Tensor) -> dict:
    return {"hidden": (*p.shape, self.hidden_size)}

  def reset(self) -> None:
    """Forgets the views between steps (after a state dict was loaded)."""
    self._flat_hidden.clear()

  def step(self, key, params: list, states: list, lr: float) -> None:
    """The GRU on all coordinates of ``params`` (one bucket), chunk by chunk; p += lr * update."""
    theta = self._theta(params[0].device, params[0].dtype)
    size = self.hidden_size
    gradients = torch.cat([p.grad.reshape(-1) for p in params])                    # (N,)
    hidden = self._gather_hidden(key, params, states, theta["initial_state"])       # (N, H), the rule's own buffer
    updates = torch.empty_like(gradients)
    for start in range(0, hidden.shape[0], self.chunk_size):
      chunk = slice(start, start + self.chunk_size)
      new_hidden = cell(theta, hidden[chunk], gradients[chunk], self.input_scale, self.input_encoding)
      updates[chunk] = readout(theta, new_hidden, self.output_scale)
      hidden[chunk] = new_hidden  # in place: a coordinate's new state depends on its old one only
    sizes = [p.numel() for p in params]
    torch._foreach_add_(params, [u.view_as(p) for u, p in zip(updates.split(sizes), params)], alpha=lr)
    steps = []
    for p, state, h in zip(params, states, hidden.split(sizes)):
      state["hidden"] = h.view(*p.shape, size)  # a view into the buffer: the next step gathers it for free
      steps.append(state.setdefault("step", torch.zeros((), dtype=torch.float32)))
    torch._foreach_add_(steps, 1.0)
    self._flat_hidden[key] = hidden

  def _gather_hidden(self, key, params: list, states: list, initial_state: torch.Tensor) -> torch.Tensor:
    """(N, H) hidden states of ``params`` in order: the previous step's buffer when the per-parameter states are
    still its consecutive views (the usual case), else a concatenation (first step, after load_state_dict, or a
    change in which parameters have gradients) -- a new buffer either way that no one else holds (a loaded state
    dict's tensors are copied, never changed). New parameters start from the learned initial state h0."""
    size = self.hidden_size
    flat = self._flat_hidden.get(key)
    if flat is not None and _are_views_of(flat, params, states):
      return flat
    rows = []
    for p, state in zip(params, states):
      hidden = state.get("hidden")
      rows.append(initial_state.expand(p.numel(), size) if hidden is None else hidden.reshape(-1, size))
    return torch.cat(rows)

  def _theta(self, device: torch.device, dtype: torch.dtype) -> dict:
    key = (device, dtype)
    if key not in self._theta_cache:
      self._theta_cache[key] = prepare_theta(self._tensors, dtype, device)
    return self._theta_cache[key]


def _are_views_of(flat: torch.Tensor, params: list, states: list) -> bool:
  offset, row_bytes = 0, flat.stride(0) * flat.element_size()
  for p, state in zip(params, states):
    hidden = state.get("hidden")
    if hidden is None or hidden._base is not flat or hidden.data_ptr() != flat.data_ptr() + offset * row_bytes:
      return False
    offset += p.numel()
  return offset == flat.shape[0]
