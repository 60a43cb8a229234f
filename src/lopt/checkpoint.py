"""Atomic, validated files: trained optimizers (config.json + weights.safetensors) and training checkpoints.

Nothing here unpickles or executes anything: tensors are safetensors, everything else JSON. Every write goes to a
temporary file in the same directory, is fsynced and then renamed over the target, so a crash or a kill leaves
either the old file or the new one, never a torn one.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from lopt.errors import UserError

FORMAT_VERSION = 1
MAX_HEADER_BYTES = 16 * 1024 * 1024  # a safetensors header larger than this is refused before it is parsed
MAX_JSON_BYTES = 16 * 1024 * 1024


class CheckpointError(UserError, ValueError):
  """A file is missing, truncated, altered or of the wrong architecture; the message names the file and problem."""


# -- atomic writes ---------------------------------------------------------------------------------------------------

def atomic_write_bytes(path: str | Path, data: bytes) -> None:
  """Writes ``data`` to ``path`` atomically (temporary file, fsync, rename, fsync of the directory)."""
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    Path(tmp).unlink(missing_ok=True)
    raise
  dir_fd = os.open(path.parent, os.O_RDONLY)
  try:
    os.fsync(dir_fd)
  finally:
    os.close(dir_fd)


def atomic_write_json(path: str | Path, obj: Any) -> None:
  atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def read_json(path: str | Path, what: str = "JSON file") -> Any:
  """Reads a JSON file with a size limit; errors name the file."""
  path = Path(path)
  if not path.is_file():
    raise CheckpointError(f"{path}: {what} not found")
  if path.stat().st_size > MAX_JSON_BYTES:
    raise CheckpointError(f"{path}: {what} is {path.stat().st_size} bytes, more than the {MAX_JSON_BYTES} allowed")
  try:
    return json.loads(path.read_text())
  except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
    raise CheckpointError(f"{path}: {what} is not valid JSON ({e})") from None


# -- tensors ---------------------------------------------------------------------------------------------------------

def tensors_to_bytes(tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> bytes:
  from safetensors.numpy import save
  return save({k: np.ascontiguousarray(np.asarray(v)) for k, v in tensors.items()}, metadata=metadata)


def read_tensors(path: str | Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
  """Reads a safetensors file into numpy arrays, checking the header before trusting it."""
  from safetensors import SafetensorError
  from safetensors.numpy import load
  path = Path(path)
  if not path.is_file():
    raise CheckpointError(f"{path}: weights file not found")
  raw = path.read_bytes()
  if len(raw) < 8:
    raise CheckpointError(f"{path}: truncated ({len(raw)} bytes; a safetensors file starts with an 8-byte header size)")
  (header_size,) = struct.unpack("<Q", raw[:8])
  if header_size > MAX_HEADER_BYTES or 8 + header_size > len(raw):
    raise CheckpointError(f"{path}: header claims {header_size} bytes but the file holds {len(raw)} bytes "
                          f"(truncated or altered; limit {MAX_HEADER_BYTES})")
  try:
    header = json.loads(raw[8:8 + header_size])
    metadata = header.get("__metadata__", {}) or {}
    return load(raw), metadata
  except (SafetensorError, ValueError, RecursionError, AttributeError) as e:
    raise CheckpointError(f"{path}: not a valid safetensors file ({e})") from None


def sha256(path: str | Path) -> str:
  return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# -- trained optimizers ----------------------------------------------------------------------------------------------

def save_optimizer(directory: str | Path, optimizer, theta: dict, info: dict | None = None) -> Path:
  """Writes ``directory/weights.safetensors`` and ``directory/config.json`` (architecture, tensor shapes and dtypes,
  the weights' SHA-256, and free-form ``info`` such as the training config and evaluation results)."""
  from lopt import __version__
  directory = Path(directory)
  tensors = {k: np.asarray(v) for k, v in theta.items()}
  weights = tensors_to_bytes(tensors)
  atomic_write_bytes(directory / "weights.safetensors", weights)
  config = {
      "format": "lopt-optimizer",
      "format_version": FORMAT_VERSION,
      "lopt_version": __version__,
      "optimizer": optimizer.config(),
      "tensors": {k: {"shape": list(v.shape), "dtype": str(v.dtype)} for k, v in tensors.items()},
      "weights_sha256": hashlib.sha256(weights).hexdigest(),
      "info": info or {},
  }
  atomic_write_json(directory / "config.json", config)
  return directory


def load_optimizer(path: str | Path):
  """Loads a trained optimizer directory (or a run directory holding ``optimizer/``).

  Returns ``(optimizer, theta, config)``. Validates the format, architecture, checksum, and every tensor's name,
  shape and dtype; a problem raises ``CheckpointError`` naming the file and what was expected versus found.
  """
  from lopt.optimizers import from_config
  path = Path(path)
  if (path / "optimizer" / "config.json").is_file():  # a run directory
    path = path / "optimizer"
  if not path.is_dir():
    raise CheckpointError(f"{path}: not a directory (expected a trained-optimizer directory with config.json and "
                          f"weights.safetensors)")
  config_path, weights_path = path / "config.json", path / "weights.safetensors"
  config = read_json(config_path, "optimizer config")
  if not isinstance(config, dict) or config.get("format") != "lopt-optimizer":
    raise CheckpointError(f"{config_path}: field 'format' must be 'lopt-optimizer'")
  if config.get("format_version") != FORMAT_VERSION:
    raise CheckpointError(f"{config_path}: format_version {config.get('format_version')!r} is not supported "
                          f"(this lopt reads version {FORMAT_VERSION})")
  try:
    optimizer = from_config(config.get("optimizer", {}))
  except (TypeError, ValueError) as e:
    raise CheckpointError(f"{config_path}: field 'optimizer' does not describe a known optimizer ({e})") from None
  if not weights_path.is_file():
    raise CheckpointError(f"{weights_path}: weights file not found")
  digest = sha256(weights_path)
  if digest != config.get("weights_sha256"):
    raise CheckpointError(f"{weights_path}: checksum mismatch (file is truncated or altered): expected SHA-256 "
                          f"{config.get('weights_sha256')}, found {digest}")
  tensors, _ = read_tensors(weights_path)
  check_theta(tensors, optimizer, weights_path)
  return optimizer, tensors, config


def check_theta(tensors: dict, optimizer, where: str | Path) -> None:
  """Checks that ``tensors`` are exactly the meta-parameters ``optimizer`` expects (names, shapes, float dtype)."""
  expected = optimizer.param_shapes()
  missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
  if missing or extra:
    raise CheckpointError(f"{where}: tensors do not match the architecture {optimizer.config()}: missing {missing}, "
                          f"unexpected {extra}")
  for name, shape in expected.items():
    found = tensors[name]
    if tuple(found.shape) != tuple(shape):
      raise CheckpointError(f"{where}: tensor {name!r} has shape {tuple(found.shape)}, expected {tuple(shape)}")
    if found.dtype not in (np.float32, np.float64):
      raise CheckpointError(f"{where}: tensor {name!r} has dtype {found.dtype}, expected float32 or float64")
