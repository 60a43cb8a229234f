"""Reading a trained-optimizer directory without JAX (docs/CHECKPOINT_FORMAT.md describes the files).

The checks are those of ``lopt.checkpoint.load_optimizer`` (format, version, checksum, tensor names, shapes and
dtypes), reusing its JAX-free helpers; only the architecture table is restated here, because the JAX one lives in
``lopt.optimizers`` and importing it would import jax.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lopt.checkpoint import FORMAT_VERSION, CheckpointError, check_theta, read_json, read_tensors, sha256
from lopt.trained import resolve_optimizer_path

GRU_ENCODINGS = ("scale", "log1p_sign")
GRU_FIELDS = {"hidden_size": int, "input_scale": float, "output_scale": float, "input_encoding": str}


@dataclass(frozen=True)
class GRUSpec:
  """The component-wise GRU's configuration, as stored in config.json's ``optimizer`` field (see
  ``lopt.optimizers.gru.GRUOptimizer``, whose ``config()`` wrote it)."""
  hidden_size: int
  input_scale: float
  output_scale: float
  input_encoding: str

  @property
  def num_inputs(self) -> int:
    return 1 if self.input_encoding == "scale" else 2

  def config(self) -> dict:
    return {"architecture": "gru", "hidden_size": self.hidden_size, "input_scale": self.input_scale,
            "output_scale": self.output_scale, "input_encoding": self.input_encoding}

  def param_shapes(self) -> dict[str, tuple[int, ...]]:
    hidden, inputs = self.hidden_size, self.num_inputs
    return {"input_weights": (inputs, 3 * hidden), "recurrent_weights": (hidden, 3 * hidden), "bias": (3 * hidden,),
            "initial_state": (hidden,), "readout_weights": (hidden, 1), "readout_bias": (1,)}


def gru_spec_from_config(fields, where: str | Path) -> GRUSpec:
  """Validates config.json's ``optimizer`` field; errors name the file, the field, and expected versus found."""
  if not isinstance(fields, dict):
    raise CheckpointError(f"{where}: field 'optimizer' must be an object, found {type(fields).__name__}")
  architecture = fields.get("architecture")
  if architecture != "gru":
    raise CheckpointError(f"{where}: field 'optimizer.architecture' is {architecture!r}; lopt.torch supports 'gru'")
  values = {"input_scale": 1.0, "output_scale": 1.0, "input_encoding": "scale"}  # GRUOptimizer's defaults
  unknown = sorted(set(fields) - set(GRU_FIELDS) - {"architecture"})
  if unknown:
    raise CheckpointError(f"{where}: field 'optimizer' has unknown entries {unknown}; expected {sorted(GRU_FIELDS)}")
  if "hidden_size" not in fields:
    raise CheckpointError(f"{where}: field 'optimizer.hidden_size' is missing")
  for name, kind in GRU_FIELDS.items():
    if name not in fields:
      continue
    value = fields[name]
    ok = isinstance(value, kind) and not isinstance(value, bool) if kind is not float else \
        isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok:
      raise CheckpointError(f"{where}: field 'optimizer.{name}' must be {kind.__name__}, found {value!r}")
    values[name] = float(value) if kind is float else value
  if values["hidden_size"] < 1:
    raise CheckpointError(f"{where}: field 'optimizer.hidden_size' must be >= 1, found {values['hidden_size']}")
  if values["input_encoding"] not in GRU_ENCODINGS:
    raise CheckpointError(f"{where}: field 'optimizer.input_encoding' must be one of {GRU_ENCODINGS}, found "
                          f"{values['input_encoding']!r}")
  return GRUSpec(**{name: values[name] for name in GRU_FIELDS})


def read_trained_optimizer(path_or_name: str | os.PathLike) -> tuple[GRUSpec, dict[str, np.ndarray], dict, Path]:
  """Reads and validates a trained GRU optimizer by path or name (``lopt.trained.resolve_optimizer_path``).

  Returns ``(spec, tensors, config, directory)``: tensors are numpy arrays named and shaped as ``spec.param_shapes()``.
  Raises ``CheckpointError`` naming the file, the field or tensor, and what was expected versus found.
  """
  path = resolve_optimizer_path(path_or_name)
  if (path / "optimizer" / "config.json").is_file():  # a run directory
    path = path / "optimizer"
  if not path.is_dir():
    raise CheckpointError(f"{path}: not a directory (expected a trained-optimizer directory with config.json and "
                          f"weights.safetensors)")
  config_path, weights_path = path / "config.json", path / "weights.safetensors"
  config = read_json(config_path, "optimizer config")
  if not isinstance(config, dict) or config.get("format") != "lopt-optimizer":
    found = config.get("format") if isinstance(config, dict) else type(config).__name__
    raise CheckpointError(f"{config_path}: field 'format' must be 'lopt-optimizer', found {found!r}")
  if config.get("format_version") != FORMAT_VERSION:
    raise CheckpointError(f"{config_path}: field 'format_version' is {config.get('format_version')!r}, expected "
                          f"{FORMAT_VERSION} (the version this lopt reads)")
  spec = gru_spec_from_config(config.get("optimizer"), config_path)
  if not weights_path.is_file():
    raise CheckpointError(f"{weights_path}: weights file not found")
  digest = sha256(weights_path)
  if digest != config.get("weights_sha256"):
    raise CheckpointError(f"{weights_path}: checksum mismatch (file is truncated or altered): expected SHA-256 "
                          f"{config.get('weights_sha256')} (config.json 'weights_sha256'), found {digest}")
  tensors, _ = read_tensors(weights_path)
  check_theta(tensors, spec, weights_path)
  return spec, tensors, config, path
