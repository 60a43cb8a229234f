"""Reading a trained-optimizer directory without JAX (docs/CHECKPOINT_FORMAT.md describes the files).

``lopt.io.checkpoint.read_optimizer_directory`` reads and checks the files, the same reader as ``lopt.load_optimizer``'s,
so both refuse the same files with the same messages; ``lopt.architectures`` holds each architecture's fields and
tensor shapes. Neither imports jax. This module only adds the lookup by name.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from lopt.architectures.spec import ArchitectureConfig
from lopt.io.checkpoint import read_optimizer_directory
from lopt.trained import resolve_optimizer_path

GRUSpec = ArchitectureConfig  # lopt 0.1's name, when the GRU was the only architecture


def read_trained_optimizer(path_or_name: str | os.PathLike) -> tuple[ArchitectureConfig, dict[str, np.ndarray], dict,
                                                                       Path]:
  """Reads and validates a trained optimizer by path or name (``lopt.trained.resolve_optimizer_path``).

  Returns ``(architecture, tensors, config, directory)``: tensors are numpy arrays by key path, named and shaped as
  ``architecture.param_shapes()``. Raises ``CheckpointError`` naming the file, the field or tensor, and what was
  expected versus found.
  """
  return read_optimizer_directory(resolve_optimizer_path(path_or_name))


__all__ = ["ArchitectureConfig", "GRUSpec", "read_trained_optimizer"]
