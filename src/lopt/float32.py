"""Python floats rounded to float32, as torch and numpy round them: host arithmetic on a handful of numbers (a
learned optimizer's loss features, its losses) without building tensors, which costs ten times more."""

from __future__ import annotations

import array
import math
import struct

_FLOAT32 = struct.Struct("f")


def to_float32(value: float) -> float:
  """``value`` rounded to float32 (C's conversion; beyond float32's range: an infinity of its sign)."""
  try:
    return _FLOAT32.unpack(_FLOAT32.pack(value))[0]
  except OverflowError:
    return math.copysign(math.inf, value)


def to_float32s(values) -> list:
  """``values`` rounded to float32, all at once (as ``to_float32`` does each)."""
  return array.array("f", values).tolist()
