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
