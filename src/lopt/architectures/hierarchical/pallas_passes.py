"""The JAX step's statistics and update passes over float32 matrices as Pallas kernels (GPU, Triton).

XLA fuses each pass of ``HierarchicalOptimizer.update`` into its own kernels, but over a large matrix it writes the
per-coordinate MLP's hidden units once and reads them back, and runs its statistics pass well below the memory
bandwidth (H200, 100M parameters: statistics 1.48 ms and update ~2.1 ms of a 5.4 ms step). Here each pass is one
kernel over tiles of the matrix that reads each tensor once and writes only what the step returns; every
tile writes its partial sums, which XLA adds up afterwards (the same step: statistics 0.58 ms, update 1.67 ms;
docs/GENERAL.md, "The JAX step's passes as Pallas kernels").

The arithmetic is ``optimizer.py``'s ``_coordinates`` and ``_mlp_update`` (unit by unit), in their order. The
per-tensor scalars arrive as one float32 vector (``statistics_constants``, ``update_constants``), so that a group of
same-shaped tensors steps as one vmapped call (Pallas adds the group as a grid axis). A tensor of more axes whose
second moment is factored over its last two (a convolution's (H, W, in, out) kernel) is a stack of such matrices,
each with its own second moment's mean: the same kernels, vmapped over the leading axes. ``interpret=True`` runs the
kernels in Pallas's interpreter (any backend; the tests' CPU check of the arithmetic).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from lopt.architectures.hierarchical.spec import RSQRT_EPSILON

# Each kernel's launch shape: (rows, columns) of a program's tile, and its warps.
STATISTICS = (1, 256, 1)
UPDATE = (1, 128, 1)


@functools.cache
def available() -> bool:
  """Whether this JAX has Pallas's Triton backend (deprecated in JAX 0.11; without it the step keeps XLA's passes)."""
  try:
    from jax.experimental.pallas import triton  # noqa: F401
  except ImportError:
    return False
  return True


def statistics_constants(threshold, mean_rows, rms_correction, adam_correction, decays) -> jax.Array:
  """(..., 4 + 2K) float32: the clipping threshold, mean(rows) of the factored second moment (one per matrix of the
  tensor: shape (...)), 1 - rho^t, 1 - b_1^t, the momentum decays b_k and 1 - b_k (K each)."""
  mean_rows = jnp.asarray(mean_rows, jnp.float32)
  every = lambda x: jnp.broadcast_to(jnp.asarray(x, jnp.float32), mean_rows.shape)  # noqa: E731
  decays = jnp.asarray(decays, jnp.float32)
  complements = 1 - decays
  return jnp.stack([every(threshold), mean_rows, every(rms_correction), every(adam_correction),
                    *(every(b) for b in decays), *(every(c) for c in complements)], axis=-1)


def update_constants(statistics: jax.Array, log_step, scales: tuple, weights: jax.Array, bias: jax.Array,
                     layers: list) -> jax.Array:
  """(..., n) the update kernel's constants: ``statistics_constants``'s rows, each followed by the log step,
  ``scales`` = (step_scale, magnitude_scale, direction_scale, average_decay, 1 - average_decay) (Python floats:
  rounded as XLA rounds them), the first layer's weights already divided by the columns' normalizers (columns, H)
  and its bias with the context folded in (H,), then each further layer's w (fan_in, fan_out) and b (fan_out,)."""
  parts = [jnp.asarray(log_step, jnp.float32).reshape(1), jnp.asarray(scales, jnp.float32), weights.reshape(-1),
           bias.reshape(-1)]
  for layer in layers:
    parts += [layer["w"].astype(jnp.float32).reshape(-1), layer["b"].astype(jnp.float32).reshape(-1)]
  rest = jnp.concatenate(parts)
  return jnp.concatenate([statistics, jnp.broadcast_to(rest, statistics.shape[:-1] + rest.shape)], axis=-1)


def _tile(shape: tuple, block: tuple, interpret: bool):
  """Loads and stores of this program's ``block`` tile of a (rows, cols) matrix, masked at the edges, and the masks.
  The interpreter pads its blocks, so there a load reads whatever lies beyond the edge and is zeroed."""
  rows, cols = shape
  i, j = pl.program_id(0), pl.program_id(1)
  row = i * block[0] + jax.lax.broadcasted_iota(jnp.int32, (block[0], 1), 0)
  col = j * block[1] + jax.lax.broadcasted_iota(jnp.int32, (1, block[1]), 1)
  valid_row, valid_col = row < rows, col < cols
  valid = valid_row & valid_col

  def view(ref, index):
    return ref.at[(slice(None), slice(None), index)] if index is not None else ref

  def load(ref, index=None, mask=valid):
    if interpret:
      return jnp.where(mask, view(ref, index)[...], 0.0)
    from jax.experimental.pallas import triton as plt
    return plt.load(view(ref, index), mask=mask, other=0.0)

  def store(ref, value, index=None):
    if interpret:
      view(ref, index)[...] = value
      return
    from jax.experimental.pallas import triton as plt
    plt.store(view(ref, index), value, mask=valid)

  return load, store, valid, valid_row, valid_col


def _coordinates(load, valid_row, valid_col, p_ref, g_ref, m_ref, a_ref, r_ref, c_ref, k_ref, K: int) -> dict:
  """``HierarchicalOptimizer._coordinates`` on one tile: the raw and clipped gradient, the new momenta, the feature
  columns, the previous momenta times rs, Adam's direction."""
  threshold, mean_rows, rms_correction, adam_correction = (k_ref[i] for i in range(4))
  decays = [k_ref[4 + k] for k in range(K)]
  complements = [k_ref[4 + K + k] for k in range(K)]
  raw = load(g_ref)
  g = jnp.minimum(jnp.maximum(raw, -threshold), threshold)
  old = [load(m_ref, k) for k in range(K)]
  momenta = [decays[k] * old[k] + complements[k] * g for k in range(K)]
  rows, cols = load(r_ref, mask=valid_row), load(c_ref, mask=valid_col)
  estimate = rows * cols / mean_rows / rms_correction
  rs = jax.lax.rsqrt(estimate + RSQRT_EPSILON)
  p, average = load(p_ref), load(a_ref)
  return {"raw": raw, "g": g, "p": p, "average": average, "momenta": momenta,
          "columns": [g, p, p - average, *momenta, g * rs, *(m * rs for m in momenta)],
          "previous": [m * rs for m in old], "adam": momenta[0] * rs / adam_correction}


def _write_sums(out_ref, sums: list, valid) -> None:
  """The tile's sums of each term (zero beyond the matrix's edge) into its row of partial sums."""
  width = out_ref.shape[-1]
  lane = jax.lax.broadcasted_iota(jnp.int32, (1, 1, width), 2)
  total = jnp.zeros((1, 1, width), jnp.float32)
  for k, term in enumerate(sums):
    total = total + jnp.where(lane == k, jnp.sum(jnp.where(valid, term, 0.0)), 0.0)
  out_ref[...] = total


def _statistics_kernel(p_ref, g_ref, m_ref, a_ref, r_ref, c_ref, k_ref, out_ref, *, shape, K, interpret):
  load, _, valid, valid_row, valid_col = _tile(shape, STATISTICS, interpret)
  c = _coordinates(load, valid_row, valid_col, p_ref, g_ref, m_ref, a_ref, r_ref, c_ref, k_ref, K)
  terms = ([c["raw"] * c["raw"]] + [f * f for f in c["columns"]] + [c["g"] * m for m in c["previous"]]
           + [m * m for m in c["previous"]])
  _write_sums(out_ref, terms, valid)


def _update_kernel(p_ref, g_ref, m_ref, a_ref, r_ref, c_ref, k_ref, u_ref, m_out, a_out, s_out, *, shape, K,
                   sizes, interpret):
  load, store, valid, valid_row, valid_col = _tile(shape, UPDATE, interpret)
  c = _coordinates(load, valid_row, valid_col, p_ref, g_ref, m_ref, a_ref, r_ref, c_ref, k_ref, K)
  at = 4 + 2 * K
  log_step, step_scale, magnitude_scale, direction_scale, average_decay, average_complement = (
      k_ref[at + i] for i in range(6))
  at += 6
  columns = c["columns"]
  hidden = sizes[0][1]
  # The first layer: unit j = bias_j + sum_i column_i w_ij, summed in the columns' order as optimizer.py does.
  units = []
  for j in range(hidden):
    total = columns[0] * k_ref[at + j]
    for i in range(1, len(columns)):
      total = total + columns[i] * k_ref[at + i * hidden + j]
    units.append(k_ref[at + len(columns) * hidden + j] + total)
  at += len(columns) * hidden + hidden
  for fan_in, fan_out in sizes[1:]:
    outputs = []
    for o in range(fan_out):
      total = jnp.maximum(units[0], 0.0) * k_ref[at + o]
      for j in range(1, fan_in):
        total = total + jnp.maximum(units[j], 0.0) * k_ref[at + j * fan_out + o]
      outputs.append(total + k_ref[at + fan_in * fan_out + o])
    at += fan_in * fan_out + fan_out
    units = outputs
  direction, magnitude, feedback = units[0], units[1], units[2:]
  scale = step_scale * jnp.exp(log_step + magnitude_scale * magnitude)
  update = scale * (direction_scale * direction - c["adam"])
  store(u_ref, update)
  for k, m in enumerate(c["momenta"]):
    store(m_out, m, k)
  store(a_out, average_decay * c["average"] + average_complement * c["p"])
  _write_sums(s_out, [update * update] + [jnp.tanh(f) for f in feedback], valid)


def _specs(block: tuple, K: int, num_constants: int) -> list:
  """The BlockSpecs of p, g, momentum, average, rows, cols and the constants."""
  rows, cols = block[:2]
  tile = pl.BlockSpec((rows, cols), lambda i, j: (i, j))
  return [tile, tile, pl.BlockSpec((rows, cols, K), lambda i, j: (i, j, 0)), tile,
          pl.BlockSpec((rows, 1), lambda i, j: (i, 0)), pl.BlockSpec((1, cols), lambda i, j: (0, j)),
          pl.BlockSpec((num_constants,), lambda i, j: (0,))]


def _grid(shape: tuple, block: tuple) -> tuple[int, int]:
  return pl.cdiv(shape[0], block[0]), pl.cdiv(shape[1], block[1])


def _lanes(count: int) -> int:
  return max(2, 1 << (count - 1).bit_length())  # Triton's tensors have power-of-two sizes


def _compiler_params(block: tuple, interpret: bool):
  if interpret:
    return None
  from jax.experimental.pallas import triton as plt
  return plt.CompilerParams(num_warps=block[2])


def _over_matrices(one, g, arrays: tuple, interpret: bool):
  """``one(*arrays)`` for a matrix (R, C), or vmapped over the matrices of a tensor (..., R, C): each array's leading
  axes (those of g before its last two) flattened to one, then restored."""
  lead = g.shape[:-2]
  if not lead:
    return one(*arrays, interpret=interpret)
  flat = lambda x: x.reshape((math.prod(lead),) + x.shape[len(lead):])  # noqa: E731
  return jax.vmap(functools.partial(one, interpret=interpret))(*map(flat, arrays))


def statistics_sums(p, g, momentum, average, rows, cols, constants, *, interpret: bool = False) -> jax.Array:
  """(1 + (4 + 2K) + 2K,) float32 sums over the tensor of g^2, each feature column squared, g m_k rs and (m_k rs)^2
  with the previous momenta: ``tensor_means``' terms in ``_statistics``, times the size. p, g, average (..., R, C);
  momentum (..., R, C, K); rows (..., R, 1), cols (..., 1, C): the new second moment, factored over the last two
  axes; constants (..., n): ``statistics_constants``."""
  sums = _over_matrices(_matrix_statistics_sums, g, (p, g, momentum, average, rows, cols, constants), interpret)
  return sums.reshape(-1, sums.shape[-1]).sum(axis=0)


def _matrix_statistics_sums(p, g, momentum, average, rows, cols, constants, *, interpret: bool) -> jax.Array:
  shape, K = g.shape, momentum.shape[-1]
  count = 1 + (4 + 2 * K) + 2 * K
  grid = _grid(shape, STATISTICS)
  sums = pl.pallas_call(
      functools.partial(_statistics_kernel, shape=shape, K=K, interpret=interpret), grid=grid,
      in_specs=_specs(STATISTICS, K, constants.shape[0]),
      out_specs=pl.BlockSpec((1, 1, _lanes(count)), lambda i, j: (i, j, 0)),
      out_shape=jax.ShapeDtypeStruct(grid + (_lanes(count),), jnp.float32),
      compiler_params=_compiler_params(STATISTICS, interpret), interpret=interpret, name="hierarchical_statistics",
  )(p, g, momentum, average, rows, cols, constants)
  return jnp.sum(sums, axis=(0, 1))[:count]


def coordinate_update(p, g, momentum, average, rows, cols, constants, sizes: tuple, *,
                      interpret: bool = False) -> tuple:
  """(update like g, new momentum like momentum, new average like average, sums (1 + feedback,) of update^2 and of
  each tanh(feedback unit) over the tensor): ``_coordinate_update``'s per-coordinate work, shapes as in
  ``statistics_sums``. sizes: the MLP's layers as (fan_in, fan_out) pairs, the first over the feature columns only;
  constants (..., n): ``update_constants``."""
  one = functools.partial(_matrix_update, sizes=sizes)
  update, new_momentum, new_average, sums = _over_matrices(
      one, g, (p, g, momentum, average, rows, cols, constants), interpret)
  return (update.reshape(g.shape), new_momentum.reshape(momentum.shape), new_average.reshape(average.shape),
          sums.reshape(-1, sums.shape[-1]).sum(axis=0))


def _matrix_update(p, g, momentum, average, rows, cols, constants, *, sizes: tuple, interpret: bool) -> tuple:
  shape, K = g.shape, momentum.shape[-1]
  count = 1 + sizes[-1][1] - 2
  grid = _grid(shape, UPDATE)
  tile = pl.BlockSpec(UPDATE[:2], lambda i, j: (i, j))
  update, new_momentum, new_average, sums = pl.pallas_call(
      functools.partial(_update_kernel, shape=shape, K=K, sizes=sizes, interpret=interpret), grid=grid,
      in_specs=_specs(UPDATE, K, constants.shape[0]),
      out_specs=[tile, pl.BlockSpec(UPDATE[:2] + (K,), lambda i, j: (i, j, 0)), tile,
                 pl.BlockSpec((1, 1, _lanes(count)), lambda i, j: (i, j, 0))],
      out_shape=[jax.ShapeDtypeStruct(shape, jnp.float32), jax.ShapeDtypeStruct(momentum.shape, jnp.float32),
                 jax.ShapeDtypeStruct(shape, jnp.float32),
                 jax.ShapeDtypeStruct(grid + (_lanes(count),), jnp.float32)],
      # The new momenta and average overwrite the old ones where they lie: each program reads its tile of them
      # before writing it, and without the aliases XLA copied every output into the donated state (H200, 100M
      # parameters: 1.0 ms a step).
      input_output_aliases={2: 1, 3: 2},
      compiler_params=_compiler_params(UPDATE, interpret), interpret=interpret, name="hierarchical_update",
  )(p, g, momentum, average, rows, cols, constants)
  return update, new_momentum, new_average, jnp.sum(sums, axis=(0, 1))[:count]
