"""The component-wise GRU's recurrent map and readout in PyTorch, on a flat batch of coordinates.

Same equations as ``lopt.optimizers.gru.GRUOptimizer.cell`` / ``readout`` (docs/CHECKPOINT_FORMAT.md):

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
  """Meta-parameters on ``device`` in ``dtype``, the recurrent matrix pre-split into its gate and candidate blocks
  (contiguous, so each product is one plain GEMM)."""
  theta = {name: torch.as_tensor(value).to(device=device, dtype=dtype) for name, value in tensors.items()}
  size = theta["initial_state"].shape[0]
  theta["recurrent_gates"] = theta["recurrent_weights"][:, :2 * size].contiguous()       # (H, 2H)
  theta["recurrent_candidate"] = theta["recurrent_weights"][:, 2 * size:].contiguous()   # (H, H)
  return theta


def encode(gradient: torch.Tensor, input_scale: float, input_encoding: str) -> torch.Tensor:
  """(N,) gradients -> (N, num_inputs) network inputs."""
  scaled = input_scale * gradient
  if input_encoding == "scale":
    return scaled[:, None]
  return torch.stack([torch.log1p(scaled.abs()), torch.sign(scaled)], dim=-1)


def cell(theta: dict, hidden: torch.Tensor, gradient: torch.Tensor, input_scale: float,
         input_encoding: str) -> torch.Tensor:
  """h' = F(h, g): hidden (N, H), gradient (N,) -> new hidden (N, H), one batched computation for all N."""
  size = hidden.shape[-1]
  from_input = torch.addmm(theta["bias"], encode(gradient, input_scale, input_encoding), theta["input_weights"])
  gates = from_input[:, :2 * size].addmm_(hidden, theta["recurrent_gates"]).sigmoid_()   # in place: (N, 3H) once
  update_gate, reset_gate = gates[:, :size], gates[:, size:]
  candidate = from_input[:, 2 * size:].addmm_(reset_gate * hidden, theta["recurrent_candidate"]).tanh_()
  return torch.addcmul((1.0 - update_gate).mul_(candidate), update_gate, hidden)


def readout(theta: dict, hidden: torch.Tensor, output_scale: float) -> torch.Tensor:
  """dx = R(h): hidden (N, H) -> parameter changes (N,)."""
  return torch.addmm(theta["readout_bias"], hidden, theta["readout_weights"])[:, 0].mul_(output_scale)
