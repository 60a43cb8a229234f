"""Hand-written Triton kernels for the hierarchical update (``torch.py``): its per-coordinate passes and the
per-tensor controller between them.

``update_bucket`` runs each group of same-shaped tensors as a (count, *shape) batch; eagerly each pass is a dozen
PyTorch calls, each a kernel that re-reads its inputs, plus copies that stack the group's gradients and parameters.
Here the passes read every gradient and parameter where it lies, through a table of their addresses ((count,) int64
on the device, so that a CUDA graph captured once reads new gradient tensors at every replay), and each is one kernel:

  check_finite   whether every gradient is finite, into a flag on the device (a step to skip, decided there)
  factored_sums  (tensors of >= 2 axes) the clipped gradient's squares summed over each row and each column
  statistics     clips g, updates the momenta (and, unfactored, the second moment v); returns per tensor the sums
                 the LSTM reads: |m_k|^2, |m_k rs|^2, |old m_k rs|^2, (g rs) . old m_k, |g rs|^2, |p - a|^2,
                 |g|^2 clipped and raw, |p|^2
  update         the per-coordinate MLP (one hidden layer of at most 8 units); p <- p + lr u and the slow average in
                 place; returns per tensor |u|^2 and the sums of tanh of the feedback outputs

and, one program per tensor (``kernel_first_pass`` and ``kernel_second_pass`` in ``torch.py`` put them in order):

  prepare        before the passes: the clipping thresholds and 1 - rho^t
  controller     between them: the LSTM's inputs from the statistics, the LSTM, the log step, the context and the
                 MLP's per-tensor first layer and biases (the eager update's ~110 small operations)
  finish         after them: the update ratio, the feedback means, the counts

Clipping is g <- clip(g, +-upper) per tensor (upper = inf: none). rs = rsqrt(scale * v + eps) is recomputed, never
stored: factored, ``scale`` is the row accumulator over its mean along the first factored axis and the bias
correction, one value per row, and v the column accumulator; unfactored, ``scale`` is 1 / (1 - rho^t) per tensor and
v the second moment. A coordinate's row and column follow from its flat index with the tensor seen as
(n0, na, n1, nb, n2), na and nb the factored axes: rows are the tensor without axis nb, columns without axis na.

A step whose gradients are not all finite can be skipped on the device: given a flag (a 0-d bool tensor), the
passes write nothing when it is false, so that the host need not wait to read it (``kernel_first_pass``'s ``ok``).

Per-tensor sums are written as partial sums per block of coordinates and added up by one torch call (no atomics: a
step is deterministic). The arithmetic follows ``update_bucket``'s eager form (lerp, the order of the second
moment's terms); sums differ from torch's by their order only, a float32 rounding.

Importing this module imports Triton. With TRITON_INTERPRET=1 set before Triton is imported, the kernels run on CPU
tensors (numpy), which the tests use.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lopt.architectures.hierarchical.spec import CORRECTION_FLOOR, LOG_FLOOR, LOG_SCALE, LOG_STEP_LIMIT, NORM_EPSILON

# Coordinates and warps per program of each per-coordinate pass, the best of 128..4096 and 1..8 on the H200 at 10M
# and 100M parameters: one warp where a block's sums are many (no reduction across warps). The grids are (blocks,
# tensors): a group may hold up to 65535 tensors (CUDA's limit on a grid's second axis), each of up to 2^31 / 4
# coordinates (32-bit offsets within a tensor, 64-bit ones across the group; torch.py's KERNEL_TENSORS and
# KERNEL_COORDINATES).
FINITE, STATISTICS, UPDATE = (1024, 4), (256, 1), (128, 1)
ROWS, COLUMNS = 16, 128      # factored_sums: a program's rows, and the columns it reads at once
# spec.py's numbers of the update, as the kernels' compile-time constants
FLOOR, NORM, SCALE, STEP_LIMIT, CORRECTION = map(tl.constexpr, (LOG_FLOOR, NORM_EPSILON, LOG_SCALE, LOG_STEP_LIMIT,
                                                                CORRECTION_FLOOR))


@triton.jit
def _gradient(g_table, upper_ptr, tensor, offsets, mask):
  """(raw g, clipped g) at ``offsets`` of tensor ``tensor``, read through the address table."""
  g_ptr = tl.load(g_table + tensor).to(tl.pointer_type(tl.float32))
  raw = tl.load(g_ptr + offsets, mask=mask, other=0.0)
  upper = tl.load(upper_ptr + tensor)
  return raw, tl.minimum(tl.maximum(raw, -upper), upper)


@triton.jit
def _rs(v, tensor, offsets, mask, na, n1, nb, n2, rows_size, cols_size, scale_ptr, columns_ptr, rsqrt_epsilon,
        FACTORED: tl.constexpr, MATRIX: tl.constexpr, BLOCK: tl.constexpr):
  """rsqrt(scale * v + eps) at the flat ``offsets`` of tensor ``tensor``, a program's BLOCK consecutive ones.
  Factored, the tensor is (n0, na, n1, nb, n2): scale from the row accumulator's (``scale_ptr`` (count, rows_size):
  the tensor without nb) and v from the column accumulator (``columns_ptr`` (count, cols_size): without na).
  Unfactored: scale per tensor (``scale_ptr`` (count,)) and v the values given. MATRIX: the tensor is an (na, nb)
  matrix with nb >= BLOCK, so that a block spans at most two rows: one division per program rather than four per
  coordinate (the update pass is bound by its instructions). (Programs over rows of the factored view instead, free
  of the divisions, measured slower on the H200: more partial sums and part-empty blocks.)"""
  if MATRIX:
    start = tl.program_id(0) * BLOCK               # the block's first offset (``_coordinates``)
    row = start // nb
    column = start - row * nb + tl.arange(0, BLOCK)
    wrapped = column >= nb
    ia = row + wrapped.to(tl.int32)
    ib = tl.where(wrapped, column - nb, column)
    scale = tl.load(scale_ptr + tensor * rows_size + ia, mask=mask, other=1.0)
    v = tl.load(columns_ptr + tensor * cols_size + ib, mask=mask, other=1.0)
  elif FACTORED:
    i2 = offsets % n2
    rest = offsets // n2
    ib = rest % nb
    rest = rest // nb
    i1 = rest % n1
    rest = rest // n1
    ia = rest % na
    i0 = rest // na
    scale = tl.load(scale_ptr + tensor * rows_size + ((i0 * na + ia) * n1 + i1) * n2 + i2, mask=mask, other=1.0)
    v = tl.load(columns_ptr + tensor * cols_size + ((i0 * n1 + i1) * nb + ib) * n2 + i2, mask=mask, other=1.0)
  else:
    scale = tl.load(scale_ptr + tensor)
  return tl.where(mask, tl.rsqrt(rsqrt_epsilon + scale * v), 0.0)


@triton.jit
def _gate(ok_ptr, offsets, size, GATED: tl.constexpr):
  """The mask of the coordinates a pass may write: those below ``size``, or none when GATED and the step's flag at
  ``ok_ptr`` (a 0-d bool: every gradient finite) is false -- a skipped step decided on the device."""
  if GATED:
    return offsets < size * tl.load(ok_ptr).to(tl.int32)
  else:
    return offsets < size


@triton.jit
def _coordinates(g_table, p_table, upper_ptr, a_ptr, ok_ptr, size, GATED: tl.constexpr, BLOCK: tl.constexpr):
  """A program's share of a per-coordinate pass (grid (blocks, tensors)): (tensor, offsets, mask, the mask of the
  coordinates it may write, the tensor's offset in the group's state buffers, raw g, clipped g, p's address, p, the
  slow average a) at its BLOCK coordinates."""
  tensor = tl.program_id(1)
  offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
  mask = offsets < size
  base = tensor.to(tl.int64) * size   # (64 bits: a group's state may hold more than 2^31 entries)
  raw, g = _gradient(g_table, upper_ptr, tensor, offsets, mask)
  p_ptr = tl.load(p_table + tensor).to(tl.pointer_type(tl.float32))
  p = tl.load(p_ptr + offsets, mask=mask, other=0.0)
  a = tl.load(a_ptr + base + offsets, mask=mask, other=0.0)
  return tensor, offsets, mask, _gate(ok_ptr, offsets, size, GATED), base, raw, g, p_ptr, p, a


@triton.jit
def _momentum(m_ptr, base, offsets, mask, k: tl.constexpr, K: tl.constexpr):
  """Momentum k at the coordinates (zeros for k >= K); the momenta are interleaved: (..., K)."""
  if k < K:
    return tl.load(m_ptr + base * K + offsets * K + k, mask=mask, other=0.0)
  else:
    return offsets.to(tl.float32) * 0.0


@triton.jit
def _finite_kernel(g_table, ok_ptr, size, BLOCK: tl.constexpr):
  tensor = tl.program_id(1)
  offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
  g_ptr = tl.load(g_table + tensor).to(tl.pointer_type(tl.float32))
  g = tl.load(g_ptr + offsets, mask=offsets < size, other=0.0)
  bad = tl.sum(((tl.abs(g) == float("inf")) | (g != g)).to(tl.int32), axis=0)   # (|NaN| == inf is false)
  lanes = tl.arange(0, BLOCK)  # one lane writes false where the block has a bad value (many may: the same value)
  tl.store(ok_ptr + lanes * 0, tl.zeros([BLOCK], tl.int1), mask=lanes < tl.minimum(bad, 1))


@triton.jit
def _factored_sums_kernel(g_table, upper_ptr, row_sums_ptr, col_partial_ptr, n1, n2, na, nb, rows_size, cols_size,
                          blocks, ROWS: tl.constexpr, COLUMNS: tl.constexpr):
  tensor = tl.program_id(1)
  outer = tl.program_id(0) // blocks   # (i0, i1, i2) flattened
  block = tl.program_id(0) % blocks    # a block of ROWS indices along axis na
  i2 = outer % n2
  i1 = (outer // n2) % n1
  i0 = outer // (n2 * n1)
  ia = block * ROWS + tl.arange(0, ROWS)
  row_mask = ia < na
  g_ptr = tl.load(g_table + tensor).to(tl.pointer_type(tl.float32))
  upper = tl.load(upper_ptr + tensor)
  row_total = tl.zeros([ROWS], dtype=tl.float32)
  partial = col_partial_ptr + (tensor * blocks + block) * cols_size
  for start in range(0, nb, COLUMNS):
    ib = start + tl.arange(0, COLUMNS)
    mask = row_mask[:, None] & (ib < nb)[None, :]
    offsets = (((i0 * na + ia[:, None]) * n1 + i1) * nb + ib[None, :]) * n2 + i2
    g = tl.load(g_ptr + offsets, mask=mask, other=0.0)
    g = tl.minimum(tl.maximum(g, -upper), upper)
    square = g * g
    row_total += tl.sum(square, axis=1)
    tl.store(partial + ((i0 * n1 + i1) * nb + ib) * n2 + i2, tl.sum(square, axis=0), mask=ib < nb)
  tl.store(row_sums_ptr + tensor * rows_size + ((i0 * na + ia) * n1 + i1) * n2 + i2, row_total, mask=row_mask)


@triton.jit
def _statistics_kernel(g_table, p_table, upper_ptr, a_ptr, m_ptr, v_ptr, scale_ptr, one_minus_decays_ptr,
                       partial_ptr, ok_ptr, size, na, n1, nb, n2, rows_size, cols_size, rho, g2_epsilon,
                       rsqrt_epsilon, K: tl.constexpr, FACTORED: tl.constexpr, MATRIX: tl.constexpr,
                       GATED: tl.constexpr, BLOCK: tl.constexpr):
  tensor, offsets, mask, written, base, raw, g, _, p, a = _coordinates(g_table, p_table, upper_ptr, a_ptr, ok_ptr,
                                                                      size, GATED, BLOCK)
  if FACTORED:
    v = g  # (unused: rs reads the column accumulator)
  else:  # v <- rho v + (1 - rho) g^2 + (1 - rho) eps, in the eager update's order
    v = tl.load(v_ptr + base + offsets, mask=mask, other=0.0)
    v = v * rho
    v = v + (1.0 - rho) * (g * g)
    v = v + (1.0 - rho) * g2_epsilon
    tl.store(v_ptr + base + offsets, v, mask=written)
  rs = _rs(v, tensor, offsets, mask, na, n1, nb, n2, rows_size, cols_size, scale_ptr, v_ptr, rsqrt_epsilon,
           FACTORED, MATRIX, BLOCK)
  grs = g * rs
  blocks = tl.num_programs(0)
  out = partial_ptr + tensor * (4 * K + 5) * blocks + tl.program_id(0)   # sum j of this block at out + j * blocks
  for k in tl.static_range(K):
    m = tl.load(m_ptr + base * K + offsets * K + k, mask=mask, other=0.0)
    old = m * rs
    tl.store(out + (2 * K + k) * blocks, tl.sum(old * old, axis=0))
    tl.store(out + (3 * K + k) * blocks, tl.sum(grs * m, axis=0))
    m = m + tl.load(one_minus_decays_ptr + k) * (g - m)     # lerp(m, g, 1 - b_k), a weight below 1/2
    tl.store(m_ptr + base * K + offsets * K + k, m, mask=written)
    new = m * rs
    tl.store(out + k * blocks, tl.sum(m * m, axis=0))
    tl.store(out + (K + k) * blocks, tl.sum(new * new, axis=0))
  drift = p - a
  tl.store(out + (4 * K) * blocks, tl.sum(grs * grs, axis=0))
  tl.store(out + (4 * K + 1) * blocks, tl.sum(drift * drift, axis=0))
  tl.store(out + (4 * K + 2) * blocks, tl.sum(g * g, axis=0))
  tl.store(out + (4 * K + 3) * blocks, tl.sum(raw * raw, axis=0))
  tl.store(out + (4 * K + 4) * blocks, tl.sum(p * p, axis=0))


@triton.jit
def _tanh(x):
  t = tl.exp(-2.0 * tl.abs(x))
  y = (1.0 - t) / (1.0 + t)
  return tl.where(x < 0, -y, y)


@triton.jit
def _unit(u: tl.constexpr, g, p, drift, grs, rs, m0, m1, m2, m3, w1, b1, K: tl.constexpr, UNITS: tl.constexpr):
  """Hidden unit u (0 for u >= UNITS): relu of the first layer over the columns [g, p, p - a, m_1..m_K, g rs,
  m_1 rs..m_K rs]; w1 the tensor's (columns, UNITS) rows, b1 its (UNITS,) bias."""
  if u < UNITS:
    x = tl.load(b1 + u) + g * tl.load(w1 + u) + p * tl.load(w1 + UNITS + u) + drift * tl.load(w1 + 2 * UNITS + u)
    x += grs * tl.load(w1 + (3 + K) * UNITS + u)
    x += m0 * tl.load(w1 + 3 * UNITS + u) + (m0 * rs) * tl.load(w1 + (4 + K) * UNITS + u)
    if K > 1:
      x += m1 * tl.load(w1 + 4 * UNITS + u) + (m1 * rs) * tl.load(w1 + (5 + K) * UNITS + u)
    if K > 2:
      x += m2 * tl.load(w1 + 5 * UNITS + u) + (m2 * rs) * tl.load(w1 + (6 + K) * UNITS + u)
    if K > 3:
      x += m3 * tl.load(w1 + 6 * UNITS + u) + (m3 * rs) * tl.load(w1 + (7 + K) * UNITS + u)
    return tl.maximum(x, 0.0)
  else:
    return tl.zeros_like(g)


@triton.jit
def _output(o: tl.constexpr, h0, h1, h2, h3, h4, h5, h6, h7, w2, b2, UNITS: tl.constexpr, OUTPUTS: tl.constexpr):
  """Output o of the last layer (w2 (UNITS, OUTPUTS), b2 the tensor's (OUTPUTS,) bias) from the hidden units."""
  y = tl.load(b2 + o) + h0 * tl.load(w2 + o)
  if UNITS > 1:
    y += h1 * tl.load(w2 + OUTPUTS + o)
  if UNITS > 2:
    y += h2 * tl.load(w2 + 2 * OUTPUTS + o)
  if UNITS > 3:
    y += h3 * tl.load(w2 + 3 * OUTPUTS + o)
  if UNITS > 4:
    y += h4 * tl.load(w2 + 4 * OUTPUTS + o)
  if UNITS > 5:
    y += h5 * tl.load(w2 + 5 * OUTPUTS + o)
  if UNITS > 6:
    y += h6 * tl.load(w2 + 6 * OUTPUTS + o)
  if UNITS > 7:
    y += h7 * tl.load(w2 + 7 * OUTPUTS + o)
  return y


@triton.jit
def _update_kernel(g_table, p_table, upper_ptr, a_ptr, m_ptr, v_ptr, scale_ptr, first_w_ptr, first_b_ptr,
                   last_w_ptr, last_b_ptr, adam_factor_ptr, lr, partial_ptr, ok_ptr, size, na, n1, nb, n2,
                   rows_size, cols_size, rsqrt_epsilon, average_weight, K: tl.constexpr, UNITS: tl.constexpr,
                   OUTPUTS: tl.constexpr, FACTORED: tl.constexpr, MATRIX: tl.constexpr, GATED: tl.constexpr,
                   BLOCK: tl.constexpr):
  tensor, offsets, mask, written, base, _, g, p_ptr, p, a = _coordinates(g_table, p_table, upper_ptr, a_ptr, ok_ptr,
                                                                        size, GATED, BLOCK)
  if FACTORED:
    v = g
  else:
    v = tl.load(v_ptr + base + offsets, mask=mask, other=1.0)
  rs = _rs(v, tensor, offsets, mask, na, n1, nb, n2, rows_size, cols_size, scale_ptr, v_ptr, rsqrt_epsilon,
           FACTORED, MATRIX, BLOCK)
  m0 = _momentum(m_ptr, base, offsets, mask, 0, K)
  m1 = _momentum(m_ptr, base, offsets, mask, 1, K)
  m2 = _momentum(m_ptr, base, offsets, mask, 2, K)
  m3 = _momentum(m_ptr, base, offsets, mask, 3, K)
  # The hidden layer as eight (BLOCK,) vectors (fewer units: zeros), so that a coordinate's whole MLP stays in its
  # thread's registers; the first layer's rows are already divided by the columns' RMS.
  drift = p - a
  grs = g * rs
  w1 = first_w_ptr + tensor * (4 + 2 * K) * UNITS
  b1 = first_b_ptr + tensor * UNITS
  h0 = _unit(0, g, p, drift, grs, rs, m0, m1, m2, m3, w1, b1, K, UNITS)
  h1 = _unit(1, g, p, drift, grs, rs, m0, m1, m2, m3, w1, b1, K, UNITS)
  h2 = _unit(2, g, p, drift, grs, rs, m0, m1, m2, m3, w1, b1, K, UNITS)
  h3 = _unit(3, g, p, drift, grs, rs, m0, m1, m2, m3, w1, b1, K, UNITS)
  h4 = _unit(4, g, p, drift, grs, rs, m0, m1, m2, m3, w1, b1, K, UNITS)
  h5 = _unit(5, g, p, drift, grs, rs, m0, m1, m2, m3, w1, b1, K, UNITS)
  h6 = _unit(6, g, p, drift, grs, rs, m0, m1, m2, m3, w1, b1, K, UNITS)
  h7 = _unit(7, g, p, drift, grs, rs, m0, m1, m2, m3, w1, b1, K, UNITS)
  b2 = last_b_ptr + tensor * OUTPUTS
  direction = _output(0, h0, h1, h2, h3, h4, h5, h6, h7, last_w_ptr, b2, UNITS, OUTPUTS)
  magnitude = _output(1, h0, h1, h2, h3, h4, h5, h6, h7, last_w_ptr, b2, UNITS, OUTPUTS)
  update = tl.exp(magnitude) * (direction + (m0 * rs) * tl.load(adam_factor_ptr + tensor))
  update = tl.where(mask, update, 0.0)
  blocks = tl.num_programs(0)
  out = partial_ptr + tensor * (OUTPUTS - 1) * blocks + tl.program_id(0)
  tl.store(out, tl.sum(update * update, axis=0))
  for o in tl.static_range(2, OUTPUTS):
    y = _output(o, h0, h1, h2, h3, h4, h5, h6, h7, last_w_ptr, b2, UNITS, OUTPUTS)
    tl.store(out + (o - 1) * blocks, tl.sum(tl.where(mask, _tanh(y), 0.0), axis=0))
  # The average reads p before the update (lerp, a weight below 1/2); lr is a 0-d device tensor, so that a new
  # value needs no new kernel or graph.
  tl.store(a_ptr + base + offsets, a + average_weight * drift, mask=written)
  tl.store(p_ptr + offsets, p + update * tl.load(lr), mask=written)


@triton.jit
def _prepare_kernel(scalars_ptr, steps_ptr, powers_ptr, clip_multiplier_ptr, out_ptr, n):
  """Per tensor i: the clipping threshold (inf without a history) and 1 - rho^t, into out (2, n)."""
  i = tl.program_id(0)
  t = tl.load(steps_ptr + i).to(tl.float32) + 1.0
  old_rms = tl.load(scalars_ptr + i)
  history = old_rms / tl.maximum(1.0 - tl.load(powers_ptr + 2 * n + i), CORRECTION)
  has_history = (t > 1.0) & (old_rms > 0.0)
  tl.store(out_ptr + i, tl.where(has_history, tl.load(clip_multiplier_ptr) * history, float("inf")))
  tl.store(out_ptr + n + i, 1.0 - tl.load(powers_ptr + i))


@triton.jit
def _sigmoid(x):
  return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _lstm_gate(q: tl.constexpr, x, h, d, l_rows, units, lstm_w_ptr, lstm_b_ptr, x_mask, h_mask, unit_mask,
               D: tl.constexpr, L: tl.constexpr):
  """Gate q's (L,) pre-activation: bias + x W[:D] + h W[D:], W (D + L, 4L) row-major."""
  columns = q * L + units
  wx = tl.load(lstm_w_ptr + d[:, None] * (4 * L) + columns[None, :], mask=x_mask, other=0.0)
  wh = tl.load(lstm_w_ptr + (D + l_rows)[:, None] * (4 * L) + columns[None, :], mask=h_mask, other=0.0)
  return (tl.load(lstm_b_ptr + columns, mask=unit_mask, other=0.0) + tl.sum(x[:, None] * wx, axis=0)
          + tl.sum(h[:, None] * wh, axis=0))


@triton.jit
def _keep(ok_ptr, GATED: tl.constexpr):
  """1 where this step's changes are to be written, 0 where it is skipped (the flag at ok_ptr false)."""
  if GATED:
    return tl.load(ok_ptr).to(tl.int32)
  else:
    return 1


@triton.jit
def _controller_kernel(
    sums_ptr, powers_ptr, scalars_ptr, steps_ptr, h_ptr, c_ptr, feedback_ptr, size_ptr, shape_ptr, features_ptr,
    lstm_w_ptr, lstm_b_ptr, step_w_ptr, step_b_ptr, step_alignment_ptr, step_schedule_ptr, step_direct_ptr,
    context_w_ptr, context_b_ptr, clip_decay_ptr, w0_ptr, b0_ptr, last_b_ptr, magnitude_ptr,
    first_w_out, first_b_out, last_b_out, adam_factor_out, p_rms_out, ok_ptr, n,
    K: tl.constexpr, F: tl.constexpr, G: tl.constexpr, T: tl.constexpr, L: tl.constexpr, C: tl.constexpr,
    UNITS: tl.constexpr, OUTPUTS: tl.constexpr, DIRECT: tl.constexpr, GATED: tl.constexpr, MAX_STEP: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_U: tl.constexpr,
    BLOCK_O: tl.constexpr, BLOCK_COL: tl.constexpr):
  i = tl.program_id(0)
  S: tl.constexpr = 4 * K + 5          # the statistics pass's sums per tensor
  COLUMNS: tl.constexpr = 4 + 2 * K    # the MLP's feature columns
  D: tl.constexpr = 11 + K + F + G     # the LSTM's inputs before its hidden state
  row = sums_ptr + i * S
  size = tl.load(size_ptr + i)
  clipped2, raw2, p2 = tl.load(row + 4 * K + 2), tl.load(row + 4 * K + 3), tl.load(row + 4 * K + 4)
  drift2, m1rs2 = tl.load(row + 4 * K + 1), tl.load(row + K)
  # this tensor's count and history (``prepare``'s), its bias correction
  t = tl.load(steps_ptr + i).to(tl.float32) + 1.0
  old_rms, old_ratio, old_log_step = tl.load(scalars_ptr + i), tl.load(scalars_ptr + n + i), tl.load(
      scalars_ptr + 2 * n + i)
  decay = tl.load(clip_decay_ptr)
  history = old_rms / tl.maximum(1.0 - tl.load(powers_ptr + 2 * n + i), CORRECTION)
  has_history = (t > 1.0) & (old_rms > 0.0)
  adam_correction = 1.0 - tl.load(powers_ptr + n + i)
  new_rms = decay * old_rms + (1.0 - decay) * tl.sqrt(clipped2 / size + FLOOR)
  raw_rms = tl.sqrt(raw2 / size + FLOOR)
  spike = tl.minimum(tl.maximum(tl.log(raw_rms + FLOOR) - tl.log(history + FLOOR), -5.0), 5.0) / 5.0
  spike = tl.where(has_history, spike, 0.0)
  p_rms = tl.sqrt(p2 / size + FLOOR)
  adam_rms = tl.sqrt(m1rs2 / size / (adam_correction * adam_correction) + FLOOR)
  drift_rms = tl.sqrt(drift2 / size + FLOOR)
  # The LSTM's inputs x (D,): [0.1 log RMS of g, p, adam, p - a; 0.1 ratio; spike; alignments (K); log step / 8;
  # shape (4); feedback (F); global features (G)]
  d = tl.arange(0, BLOCK_D)
  x = tl.where(d == 0, SCALE * tl.log(raw_rms + FLOOR), 0.0)
  x = tl.where(d == 1, SCALE * tl.log(p_rms + FLOOR), x)
  x = tl.where(d == 2, SCALE * tl.log(adam_rms + FLOOR), x)
  x = tl.where(d == 3, SCALE * tl.log(drift_rms + FLOOR), x)
  x = tl.where(d == 4, old_ratio * SCALE, x)
  x = tl.where(d == 5, spike, x)
  in_alignment = (d >= 6) & (d < 6 + K)
  dot = tl.load(row + 3 * K + d - 6, mask=in_alignment, other=0.0)
  old2 = tl.load(row + 2 * K + d - 6, mask=in_alignment, other=0.0)
  alignment = dot / tl.sqrt(clipped2 * old2 + FLOOR)
  x = tl.where(in_alignment, alignment, x)
  x = tl.where(d == 6 + K, old_log_step / STEP_LIMIT, x)
  x += tl.load(shape_ptr + i * 4 + d - 7 - K, mask=(d >= 7 + K) & (d < 11 + K), other=0.0)
  x += tl.load(feedback_ptr + i * F + d - 11 - K, mask=(d >= 11 + K) & (d < 11 + K + F), other=0.0)
  x += tl.load(features_ptr + d - 11 - K - F, mask=(d >= 11 + K + F) & (d < D), other=0.0)
  # The LSTM (gates i, f, g, o of L units each), over [x, h]
  l_rows = tl.arange(0, BLOCK_L)
  units = tl.arange(0, BLOCK_L)
  unit_mask = units < L
  h = tl.load(h_ptr + i * L + l_rows, mask=l_rows < L, other=0.0)
  x_mask = (d < D)[:, None] & unit_mask[None, :]
  h_mask = (l_rows < L)[:, None] & unit_mask[None, :]
  input_gate = _lstm_gate(0, x, h, d, l_rows, units, lstm_w_ptr, lstm_b_ptr, x_mask, h_mask, unit_mask, D, L)
  forget_gate = _lstm_gate(1, x, h, d, l_rows, units, lstm_w_ptr, lstm_b_ptr, x_mask, h_mask, unit_mask, D, L)
  cell_gate = _lstm_gate(2, x, h, d, l_rows, units, lstm_w_ptr, lstm_b_ptr, x_mask, h_mask, unit_mask, D, L)
  output_gate = _lstm_gate(3, x, h, d, l_rows, units, lstm_w_ptr, lstm_b_ptr, x_mask, h_mask, unit_mask, D, L)
  cell = _sigmoid(forget_gate) * tl.load(c_ptr + i * L + units, mask=unit_mask, other=0.0) + _sigmoid(
      input_gate) * _tanh(cell_gate)
  hidden = tl.where(unit_mask, _sigmoid(output_gate) * _tanh(cell), 0.0)
  # The log step and the context
  log_step = old_log_step + tl.load(step_b_ptr) + tl.sum(hidden * tl.load(step_w_ptr + units, mask=unit_mask,
                                                                                  other=0.0), axis=0)
  log_step += tl.sum(tl.where(in_alignment, alignment * tl.load(step_alignment_ptr + d - 6, mask=in_alignment,
                                                                  other=0.0), 0.0), axis=0)
  if DIRECT:
    log_step += tl.sum(x * tl.load(step_direct_ptr + d, mask=d < D, other=0.0), axis=0)
  log_step = tl.minimum(tl.maximum(log_step, -STEP_LIMIT), MAX_STEP)
  schedule = tl.sum(tl.load(features_ptr + G - T + d, mask=d < T, other=0.0)
                    * tl.load(step_schedule_ptr + d, mask=d < T, other=0.0), axis=0)
  cs = tl.arange(0, BLOCK_C)
  context_w = tl.load(context_w_ptr + units[:, None] * C + cs[None, :], mask=unit_mask[:, None] & (cs < C)[None, :],
                      other=0.0)
  context = _tanh(tl.load(context_b_ptr + cs, mask=cs < C, other=0.0) + tl.sum(hidden[:, None] * context_w, axis=0))
  context = tl.where(cs < C, context, 0.0)
  # The per-tensor MLP constants: the first layer's rows over the columns' RMS, its bias with the context folded in,
  # the last layer's bias with the log step and schedule folded into the magnitude's
  col = tl.arange(0, BLOCK_COL)
  u = tl.arange(0, BLOCK_U)
  source = tl.where(col == 0, 4 * K + 2, tl.where(col == 1, 4 * K + 4, tl.where(col == 2, 4 * K + 1, tl.where(
      col < 3 + K, col - 3, tl.where(col == 3 + K, 4 * K, col - 4)))))
  means = tl.load(row + source, mask=col < COLUMNS, other=0.0) / size
  w_mask = (col < COLUMNS)[:, None] & (u < UNITS)[None, :]
  w0 = tl.load(w0_ptr + col[:, None] * UNITS + u[None, :], mask=w_mask, other=0.0)
  tl.store(first_w_out + i * COLUMNS * UNITS + col[:, None] * UNITS + u[None, :],
           w0 / tl.sqrt(means + NORM)[:, None], mask=w_mask)
  wc = tl.load(w0_ptr + (COLUMNS + cs)[:, None] * UNITS + u[None, :], mask=(cs < C)[:, None] & (u < UNITS)[None, :],
               other=0.0)
  tl.store(first_b_out + i * UNITS + u, tl.load(b0_ptr + u, mask=u < UNITS, other=0.0)
           + tl.sum(context[:, None] * wc, axis=0), mask=u < UNITS)
  o = tl.arange(0, BLOCK_O)
  shift = (log_step + schedule) * tl.load(magnitude_ptr + o, mask=o < OUTPUTS, other=0.0)
  tl.store(last_b_out + i * OUTPUTS + o, tl.load(last_b_ptr + o, mask=o < OUTPUTS, other=0.0) + shift,
           mask=o < OUTPUTS)
  tl.store(adam_factor_out + i, -1.0 / adam_correction)
  tl.store(p_rms_out + i, p_rms)
  # The new recurrent state (the update ratio and the feedback: ``finish``, after the update)
  keep = _keep(ok_ptr, GATED)
  tl.store(h_ptr + i * L + units, hidden, mask=units < L * keep)
  tl.store(c_ptr + i * L + units, cell, mask=units < L * keep)
  lane = tl.arange(0, 2)
  tl.store(scalars_ptr + lane * 2 * n + i, tl.where(lane == 0, new_rms, log_step), mask=lane < 2 * keep)


@triton.jit
def _finish_kernel(update_sums_ptr, p_rms_ptr, size_ptr, scalars_ptr, feedback_ptr, steps_ptr, ok_ptr, n,
                   F: tl.constexpr, GATED: tl.constexpr, BLOCK_F: tl.constexpr):
  i = tl.program_id(0)
  size = tl.load(size_ptr + i)
  update_rms = tl.sqrt(tl.load(update_sums_ptr + i * (F + 1)) / size + FLOOR)
  ratio = tl.log(update_rms / (update_rms + tl.load(p_rms_ptr + i) + FLOOR) + FLOOR)
  keep = _keep(ok_ptr, GATED)
  f = tl.arange(0, BLOCK_F)
  tl.store(feedback_ptr + i * F + f, tl.load(update_sums_ptr + i * (F + 1) + 1 + f, mask=f < F, other=0.0) / size,
           mask=f < F * keep)
  lane = tl.arange(0, 2)  # (scalars stored through two lanes, the first masked by keep)
  tl.store(scalars_ptr + n + i + lane * 0, ratio + lane * 0.0, mask=lane < keep)
  tl.store(steps_ptr + i + lane * 0, tl.load(steps_ptr + i) + 1 + lane * 0, mask=lane < keep)


def shape_layout(shape: tuple, axes) -> tuple:
  """(na, n1, nb, n2, rows_size, cols_size) of one tensor of ``shape`` factored over ``axes`` (None: ones and the
  size twice)."""
  size = 1
  for n in shape:
    size *= n
  if axes is None:
    return 1, 1, 1, 1, size, size
  a, b = axes
  n1 = n2 = 1
  for n in shape[a + 1:b]:
    n1 *= n
  for n in shape[b + 1:]:
    n2 *= n
  return shape[a], n1, shape[b], n2, size // shape[b], size // shape[a]


def _matrix(axes, na: int, n1: int, nb: int, n2: int, rows_size: int, block: int) -> bool:
  """Whether a factored tensor is an (na, nb) matrix with rows of at least ``block`` (``_rs``'s MATRIX)."""
  return axes is not None and n1 == n2 == 1 and rows_size == na and nb >= block


def check_finite(g_table: torch.Tensor, count: int, size: int, ok: torch.Tensor) -> None:
  """Sets ``ok`` (a 0-d bool device tensor) to false where any of the ``count`` gradients (contiguous float32,
  ``size`` coordinates each, addresses in g_table) holds a NaN or an infinity; leaves it as it is otherwise."""
  if size:
    block, warps = FINITE
    _finite_kernel[(triton.cdiv(size, block), count)](g_table, ok, size, BLOCK=block, num_warps=warps)


def factored_sums(g_table: torch.Tensor, upper: torch.Tensor, count: int, shape: tuple, axes) -> tuple:
  """The clipped gradients' squares summed over every row and every column: ((count, rows), (count, cols))
  float32 (rows: the tensor without axis ``axes[1]``, cols: without ``axes[0]``, flattened). g_table (count,) int64
  addresses of contiguous float32 tensors of ``shape``, upper (count,) their clipping thresholds."""
  na, n1, nb, n2, rows_size, cols_size = shape_layout(shape, axes)
  n0 = rows_size // (na * n1 * n2)
  blocks = triton.cdiv(na, ROWS)
  row_sums = torch.empty((count, rows_size), dtype=torch.float32, device=upper.device)
  col_partial = torch.empty((count, blocks, cols_size), dtype=torch.float32, device=upper.device)
  _factored_sums_kernel[(blocks * n0 * n1 * n2, count)](
      g_table, upper, row_sums, col_partial, n1, n2, na, nb, rows_size, cols_size, blocks, ROWS=ROWS,
      COLUMNS=COLUMNS)
  return row_sums, col_partial.sum(1)


def statistics(g_table: torch.Tensor, p_table: torch.Tensor, upper: torch.Tensor, a: torch.Tensor, m: torch.Tensor,
               v: torch.Tensor, scale: torch.Tensor, one_minus_decays: torch.Tensor, axes, rho: float,
               g2_epsilon: float, rsqrt_epsilon: float, ok: torch.Tensor | None = None,
               out: torch.Tensor | None = None) -> torch.Tensor:
  """The statistics pass over one group of ``count`` tensors: a (count, *shape) the averages, m (count, *shape, K)
  the momenta (updated in place); factored, v (count, *cols) the column accumulators and scale (count, *rows);
  unfactored, v (count, *shape) the second moments (updated in place) and scale (count,); ok None, or a 0-d bool
  device tensor: when false nothing is written. Returns (count, 4K + 5) sums (into ``out`` when given): |m_k|^2,
  |m_k rs|^2, |old m_k rs|^2, (g rs) . old m_k, |g rs|^2, |p - a|^2, |g|^2, |raw g|^2, |p|^2."""
  count, k, size = a.shape[0], m.shape[-1], a[0].numel()
  na, n1, nb, n2, rows_size, cols_size = shape_layout(tuple(a.shape[1:]), axes)
  block, warps = STATISTICS
  blocks = triton.cdiv(size, block)
  partial = torch.empty((count, 4 * k + 5, blocks), dtype=torch.float32, device=a.device)
  _statistics_kernel[(blocks, count)](
      g_table, p_table, upper, a, m, v, scale, one_minus_decays, partial, upper if ok is None else ok, size, na, n1,
      nb, n2, rows_size, cols_size, rho, g2_epsilon, rsqrt_epsilon, K=k, FACTORED=axes is not None,
      MATRIX=_matrix(axes, na, n1, nb, n2, rows_size, block), GATED=ok is not None, BLOCK=block, num_warps=warps)
  return torch.sum(partial, 2, out=out)  # (along the last axis: a reduction over contiguous partials)


def update(g_table: torch.Tensor, p_table: torch.Tensor, upper: torch.Tensor, a: torch.Tensor, m: torch.Tensor,
           v: torch.Tensor, scale: torch.Tensor, first_w: torch.Tensor, first_b: torch.Tensor, last_w: torch.Tensor,
           last_b: torch.Tensor, adam_factor: torch.Tensor, lr: torch.Tensor, axes, rsqrt_epsilon: float,
           average_weight: float, ok: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
  """The update pass over one group (arguments as ``statistics``'s), p and a changed in place: first_w (count,
  4 + 2K, units), first_b (count, units), last_w (units, outputs), last_b (count, outputs), adam_factor (count,),
  contiguous float32, units at most 8; lr a 0-d float32 device tensor; ok and out as ``statistics``'s. Returns
  (count, outputs - 1): |u|^2 and the sums of tanh of the feedback outputs."""
  count, k, size = a.shape[0], m.shape[-1], a[0].numel()
  na, n1, nb, n2, rows_size, cols_size = shape_layout(tuple(a.shape[1:]), axes)
  units, outputs = last_w.shape
  block, warps = UPDATE
  blocks = triton.cdiv(size, block)
  partial = torch.empty((count, outputs - 1, blocks), dtype=torch.float32, device=a.device)
  _update_kernel[(blocks, count)](
      g_table, p_table, upper, a, m, v, scale, first_w, first_b, last_w, last_b, adam_factor, lr, partial,
      lr if ok is None else ok, size, na, n1, nb, n2, rows_size, cols_size, rsqrt_epsilon, average_weight, K=k,
      UNITS=units, OUTPUTS=outputs, FACTORED=axes is not None,
      MATRIX=_matrix(axes, na, n1, nb, n2, rows_size, block), GATED=ok is not None, BLOCK=block, num_warps=warps)
  return torch.sum(partial, 2, out=out)


def prepare(scalars: torch.Tensor, steps: torch.Tensor, powers: torch.Tensor,
            clip_multiplier: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
  """Per tensor, before the passes: (the clipping thresholds (n,), 1 - rho^t (n,)). scalars (3, n) the recurrent
  scalars [gradient_rms, update_ratio, log_step], steps (n,) int32 the counts before this step, powers (3, n)
  [rho^t, b_1^t, decay^(t-1)] for the new counts t, clip_multiplier 0-d."""
  n = steps.shape[0]
  out = torch.empty((2, n), dtype=torch.float32, device=steps.device)
  _prepare_kernel[(n,)](scalars, steps, powers, clip_multiplier, out, n, num_warps=1)
  return out[0], out[1]


def controller(sums: torch.Tensor, powers: torch.Tensor, scalars: torch.Tensor, steps: torch.Tensor, h: torch.Tensor,
               cell: torch.Tensor, feedback: torch.Tensor, size: torch.Tensor, shape_features: torch.Tensor,
               features: torch.Tensor, theta, first_layer: tuple, last_b: torch.Tensor, magnitude: torch.Tensor,
               ok: torch.Tensor | None, max_log_step: float = LOG_STEP_LIMIT) -> tuple:
  """The per-tensor controller between the two passes, one program per tensor: from the statistics pass's sums
  (n, 4K + 5) and the recurrent state -- scalars (3, n), steps (n,), h and cell (n, L), feedback (n, F) -- the
  LSTM's inputs, the LSTM, the log step and the context; h, cell, the gradient RMS and the log step are written
  in place (not where ``ok`` is false). size (n,) and shape_features (n, 4) the layout's, features (G,) the global
  ones, theta the meta-parameters (``Theta``), first_layer (w, b) the MLP's first layer, last_b and magnitude
  (outputs,), max_log_step the log step's upper bound. Returns the update pass's per-tensor constants: first_w
  (n, 4 + 2K, units), first_b (n, units), last_b (n, outputs), adam_factor (n,), and the parameters' RMS (n,) for
  ``finish``."""
  n, k, size_l = steps.shape[0], (sums.shape[1] - 5) // 4, h.shape[1]
  w0, b0 = first_layer
  units, outputs, columns = w0.shape[1], last_b.shape[0], 4 + 2 * k
  device = h.device
  first_w = torch.empty((n, columns, units), dtype=torch.float32, device=device)
  first_b = torch.empty((n, units), dtype=torch.float32, device=device)
  new_last_b = torch.empty((n, outputs), dtype=torch.float32, device=device)
  rest = torch.empty((2, n), dtype=torch.float32, device=device)
  direct = theta.step_direct is not None
  f, g, t, c = feedback.shape[1], features.shape[0], theta.step_schedule.shape[0], theta.context_b.shape[0]
  _controller_kernel[(n,)](
      sums, powers, scalars, steps, h, cell, feedback, size, shape_features, features, theta.lstm_w, theta.lstm_b,
      theta.step_w, theta.step_b, theta.step_alignment, theta.step_schedule,
      theta.step_direct if direct else theta.step_w, theta.context_w, theta.context_b, theta.clip_decay, w0, b0,
      last_b, magnitude, first_w, first_b, new_last_b, rest[0], rest[1], sums if ok is None else ok, n,
      K=k, F=f, G=g, T=t, L=size_l, C=c, UNITS=units, OUTPUTS=outputs, DIRECT=direct, GATED=ok is not None,
      MAX_STEP=float(max_log_step),
      BLOCK_D=triton.next_power_of_2(11 + k + f + g), BLOCK_L=triton.next_power_of_2(size_l),
      BLOCK_C=triton.next_power_of_2(c), BLOCK_U=triton.next_power_of_2(units),
      BLOCK_O=triton.next_power_of_2(outputs), BLOCK_COL=triton.next_power_of_2(columns), num_warps=4)
  return first_w, first_b, new_last_b, rest[0], rest[1]


def finish(update_sums: torch.Tensor, p_rms: torch.Tensor, size: torch.Tensor, scalars: torch.Tensor,
           feedback: torch.Tensor, steps: torch.Tensor, ok: torch.Tensor | None) -> None:
  """After the update pass, per tensor: the update ratio log(RMS u / (RMS u + RMS p)) into scalars[1], the feedback
  means into feedback (n, F), the count + 1 (none where ``ok`` is false); update_sums (n, F + 1) the update pass's
  sums, p_rms (n,) ``controller``'s."""
  n, f = steps.shape[0], feedback.shape[1]
  _finish_kernel[(n,)](update_sums, p_rms, size, scalars, feedback, steps, update_sums if ok is None else ok, n,
                       F=f, GATED=ok is not None, BLOCK_F=max(triton.next_power_of_2(f), 2), num_warps=1)
