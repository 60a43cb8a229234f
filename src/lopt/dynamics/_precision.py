"""Float64 on request: a context that turns JAX's 64-bit mode on only while the analysis runs."""

from __future__ import annotations

import contextlib

import jax
import numpy as np


def wants_float64(dtype) -> bool:
  return dtype is not None and np.dtype(dtype) == np.float64


@contextlib.contextmanager
def precision(dtype):
  """Enables 64-bit JAX inside the block when ``dtype`` is float64 (a no-op otherwise, or when already enabled).

  JAX silently truncates float64 arrays to float32 unless 64-bit mode is on, so asking for float64 without this
  would quietly give float32 answers.
  """
  if wants_float64(dtype) and not jax.config.jax_enable_x64:
    with jax.enable_x64(True):
      yield
  else:
    yield


def default_dtype(dtype):
  """The floating dtype computations run in: ``dtype`` if given, else float64 when 64-bit mode is on, else float32."""
  if dtype is not None:
    return np.dtype(dtype)
  return np.dtype(np.float64) if jax.config.jax_enable_x64 else np.dtype(np.float32)
