"""Compatibility module: the GRU's facts live in ``lopt.architectures.gru.spec`` (lopt 0.1 imported them from here).

``check_optimizer_fields`` validates config.json's ``optimizer`` field as files of format_version 1 wrote it.
"""

from __future__ import annotations

from pathlib import Path

from lopt.architectures.gru.spec import ENCODINGS, MAX_HIDDEN_SIZE, NUM_INPUTS, SPEC
from lopt.architectures.spec import ArchitectureConfig

ARCHITECTURE = SPEC.name
DEFAULTS = dict(SPEC.legacy_defaults)  # what a format_version-1 file may omit (hidden_size has no default there)
GRUSpec = ArchitectureConfig  # the validated fields of a GRU file (attributes hidden_size, input_scale, ...)


def param_shapes(hidden_size: int, num_inputs: int) -> dict[str, tuple[int, ...]]:
  encoding = {count: name for name, count in NUM_INPUTS.items()}[num_inputs]
  return SPEC.param_shapes({"hidden_size": hidden_size, "input_encoding": encoding})


def check_optimizer_fields(fields, source: str | Path) -> ArchitectureConfig:
  """Validates a format_version-1 ``optimizer`` field (a GRU); raises ``CheckpointError`` naming the field."""
  from lopt.io.checkpoint import architecture_config
  return architecture_config(fields, source, format_version=1)


__all__ = ["ARCHITECTURE", "DEFAULTS", "ENCODINGS", "MAX_HIDDEN_SIZE", "NUM_INPUTS", "GRUSpec", "param_shapes",
           "check_optimizer_fields"]
