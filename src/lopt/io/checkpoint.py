"""Atomic, validated files: trained optimizers (config.json + weights.safetensors) and training checkpoints.

Nothing here unpickles or executes anything: tensors are safetensors, everything else JSON. Every write goes to a
temporary file in the same directory, is fsynced and then renamed over the target, so a crash or a kill leaves
either the old file or the new one, never a torn one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import struct
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from lopt import architectures
from lopt.architectures.gru.spec import MAX_HIDDEN_SIZE  # noqa: F401 (re-export, lopt 0.1)
from lopt.architectures.spec import ArchitectureConfig
from lopt.fields import show
from lopt.errors import CheckpointError, UserError

FORMAT = "lopt-optimizer"  # config.json's 'format'
# Version 2: any registered architecture, theta any pytree stored by key path. Version 1 (lopt 0.1): the GRU only,
# with flat tensor names (which are also its key paths), so one reader serves both.
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
MAX_HEADER_BYTES = 16 * 1024 * 1024  # a safetensors header larger than this is refused before it is parsed
MAX_JSON_BYTES = 16 * 1024 * 1024


TMP_SUFFIX = ".tmp"  # temporary files of atomic writes: ``.NAME.XXXX.tmp`` beside the target
# safetensors dtypes numpy can hold, and their sizes in bytes (the header is checked against them before any load).
SAFETENSORS_DTYPES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8,
                      "U32": 4, "U16": 2, "U8": 1, "BOOL": 1}


class WriteError(UserError, OSError):
  """A file could not be written (disk full, read-only, permissions); the message names the file."""


# -- atomic writes ---------------------------------------------------------------------------------------------------

def atomic_write_bytes(path: str | Path, data: bytes) -> None:
  """Writes ``data`` to ``path`` atomically (temporary file, fsync, rename, fsync of the directory).

  A disk error (full, read-only, permissions) raises ``WriteError`` naming the file; the previous ``path``, if any,
  is left untouched and the temporary file is removed.
  """
  path = Path(path)
  tmp = None
  try:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
    with os.fdopen(fd, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
    tmp = None
    _fsync_directory(path.parent)
  except OSError as e:
    raise WriteError(f"{path}: cannot write ({e.strerror or e}); the previous version of the file, if any, is "
                     f"intact") from None
  finally:
    if tmp is not None:
      Path(tmp).unlink(missing_ok=True)


def _fsync_directory(directory: Path) -> None:
  """Makes the rename durable (without it a power cut can undo the rename on some file systems)."""
  dir_fd = os.open(directory, os.O_RDONLY)
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
  except (UnicodeDecodeError, ValueError, RecursionError) as e:  # ValueError: JSONDecodeError, or a 5000-digit integer
    raise CheckpointError(f"{path}: {what} is not valid JSON ({e})") from None


# -- tensors ---------------------------------------------------------------------------------------------------------

def tensors_to_bytes(tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> bytes:
  from safetensors.numpy import save
  # np.ascontiguousarray turns 0-d arrays into shape (1,); the reshape keeps scalars (Adam's step count) scalars.
  return save({k: np.ascontiguousarray(np.asarray(v)).reshape(np.shape(v)) for k, v in tensors.items()},
              metadata=metadata)


def read_header(path: str | Path) -> tuple[dict, dict[str, str], int]:
  """Reads and checks a safetensors header without reading the tensor data.

  Returns ``(entries, metadata, data_start)``: entries map names to ``{"dtype", "shape", "data_offsets"}``. The header
  size is checked against ``MAX_HEADER_BYTES`` and the file size before it is parsed, and every entry's dtype, shape
  and byte range are checked, so a hostile header can neither exhaust memory nor make the loader read out of range.
  """
  with _open_weights(path) as (f, file_size):
    entries, metadata, head = _read_header_from(f, Path(path), file_size)
  return entries, metadata, len(head)


@contextlib.contextmanager
def _open_weights(path: str | Path):
  """Yields ``(file, size)``: the one open of a safetensors file per read."""
  path = Path(path)
  if not path.is_file():
    raise CheckpointError(f"{path}: weights file not found")
  with open(path, "rb") as f:
    yield f, os.fstat(f.fileno()).st_size


def _read_header_from(f, path: Path, file_size: int) -> tuple[dict, dict[str, str], bytes]:
  """``read_header`` on a file opened at its start; returns ``(entries, metadata, head)``, ``head`` being the bytes
  read (size prefix and header), after which ``f`` stands at the start of the tensor data."""
  prefix = f.read(8)
  if len(prefix) < 8:
    raise CheckpointError(f"{path}: truncated ({file_size} bytes; a safetensors file starts with an 8-byte header "
                          f"size)")
  (header_size,) = struct.unpack("<Q", prefix)
  if header_size > MAX_HEADER_BYTES or 8 + header_size > file_size:
    raise CheckpointError(f"{path}: header claims {header_size} bytes but the file holds {file_size} bytes "
                          f"(truncated or altered; limit {MAX_HEADER_BYTES})")
  raw_header = f.read(header_size)
  try:
    header = json.loads(raw_header)
  except (UnicodeDecodeError, ValueError, RecursionError) as e:
    raise CheckpointError(f"{path}: header is not valid JSON ({type(e).__name__}: {str(e)[:200]})") from None
  if not isinstance(header, dict):
    raise CheckpointError(f"{path}: header must be a JSON object, found {type(header).__name__}")
  metadata = header.pop("__metadata__", None) or {}
  if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
    raise CheckpointError(f"{path}: header field '__metadata__' must map names to strings")
  data_size = file_size - 8 - header_size
  for name, entry in header.items():
    _check_entry(path, name, entry, data_size)
  covered = sum(entry["data_offsets"][1] - entry["data_offsets"][0] for entry in header.values())
  if covered != data_size:
    raise CheckpointError(f"{path}: tensors cover {covered} bytes but the file holds {data_size} bytes of data "
                          f"(truncated or altered)")
  return header, metadata, prefix + raw_header


def _check_entry(path: Path, name: str, entry, data_size: int) -> None:
  """One header entry: a known dtype, a shape of non-negative ints, and a byte range inside the data that fits it."""
  if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
    raise CheckpointError(f"{path}: header entry {name!r} must have exactly 'dtype', 'shape' and 'data_offsets'")
  dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
  if dtype not in SAFETENSORS_DTYPES:
    raise CheckpointError(f"{path}: tensor {name!r} has unknown dtype {dtype!r}")
  if not (isinstance(shape, list) and len(shape) <= 32 and all(_is_count(d) for d in shape)):
    raise CheckpointError(f"{path}: tensor {name!r} has an invalid shape {str(shape)[:100]}")
  if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)
          and offsets[0] <= offsets[1] <= data_size):
    raise CheckpointError(f"{path}: tensor {name!r} has byte range {str(offsets)[:100]} outside the file's "
                          f"{data_size} data bytes (truncated or altered)")
  expected = SAFETENSORS_DTYPES[dtype] * math.prod(shape)
  if offsets[1] - offsets[0] != expected:
    raise CheckpointError(f"{path}: tensor {name!r} of dtype {dtype} and shape {tuple(shape)} needs {expected} "
                          f"bytes, found {offsets[1] - offsets[0]}")


def _is_count(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def read_tensors(path: str | Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
  """Reads a safetensors file into numpy arrays, checking the header (``read_header``) before trusting it."""
  path = Path(path)
  with _open_weights(path) as (f, file_size):
    _, metadata, head = _read_header_from(f, path, file_size)
    data = head + f.read(file_size - len(head))
  return _parse_tensors(data, path), metadata


def _parse_tensors(data: bytes, path: Path) -> dict[str, np.ndarray]:
  from safetensors import SafetensorError
  from safetensors.numpy import load
  try:
    return load(data)
  except (SafetensorError, ValueError, TypeError) as e:
    raise CheckpointError(f"{path}: not a valid safetensors file ({e})") from None


def sha256(path: str | Path) -> str:
  """Streams the file (constant memory, whatever its size)."""
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


# -- trained optimizers ----------------------------------------------------------------------------------------------

def save_optimizer(directory: str | Path, optimizer, theta, info: dict | None = None) -> Path:
  """Writes ``directory/weights.safetensors`` (theta's leaves by key path) and ``directory/config.json``
  (architecture and its fields, tensor shapes and dtypes, the weights' SHA-256, and free-form ``info`` such as the
  training config and evaluation results)."""
  from lopt._version import __version__
  from lopt.pytree import flatten_by_path
  directory = Path(directory)
  tensors = {k: np.asarray(v) for k, v in flatten_by_path(theta).items()}
  weights = tensors_to_bytes(tensors)
  # config.json holds the weights' checksum: remove it first and write it last, so that a kill in between leaves an
  # unfinished export (no config.json) rather than a config that does not match its weights.
  try:
    (directory / "config.json").unlink(missing_ok=True)
  except OSError as e:
    raise WriteError(f"{directory / 'config.json'}: cannot replace ({e.strerror or e})") from None
  atomic_write_bytes(directory / "weights.safetensors", weights)
  config = {
      "format": FORMAT,
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

  Returns ``(optimizer, theta, config)``: theta is the architecture's pytree with numpy leaves. Validates the format,
  architecture, checksum, and every tensor's name, shape and dtype (``read_optimizer_directory``); a problem raises
  ``CheckpointError`` naming the file and what was expected versus found.
  """
  import jax

  from lopt.pytree import unflatten_by_path
  architecture, tensors, config, _ = read_optimizer_directory(path)
  optimizer = architecture.build()
  template = jax.eval_shape(optimizer.init, jax.random.key(0))
  return optimizer, unflatten_by_path(tensors, template), config


def architecture_config(fields, source: str | Path, format_version: int = FORMAT_VERSION) -> ArchitectureConfig:
  """Validates config.json's ``optimizer`` field ({"architecture": name, **fields}) through the architecture's spec.

  Version-2 files name any registered architecture and give every field but those added since they were written
  (``ArchitectureSpec.added_fields``); version-1 files (lopt 0.1) are GRUs whose scales and encoding may be missing.
  Raises ``CheckpointError`` naming the file, the field, found and allowed.
  """
  if not isinstance(fields, dict):
    raise CheckpointError(f"{source}: field 'optimizer' must be an object, found {type(fields).__name__}")
  name = fields.get("architecture")
  if format_version == 1:
    if name != "gru":
      raise CheckpointError(f"{source}: field 'optimizer.architecture' must be 'gru' (the only architecture of "
                            f"format_version 1), found {show(name)}")
    spec = architectures.get("gru")
    fields = {**spec.legacy_defaults, **fields}
  else:
    spec = architectures.get(name, f"{source}: field 'optimizer.architecture'", error=CheckpointError)
  fields = {**spec.added_fields, **fields}
  config = spec.configure(fields, str(source), complete=True, error=CheckpointError, in_file=True)
  count = spec.num_meta_parameters(config.values)
  if count > spec.max_meta_parameters:
    raise CheckpointError(f"{source}: optimizer {name!r} would have {count} meta-parameters, more than the "
                          f"{spec.max_meta_parameters} allowed")
  return config


def read_optimizer_directory(path: str | Path) -> tuple[ArchitectureConfig, dict[str, np.ndarray], dict, Path]:
  """Reads and validates a trained-optimizer directory (or a run directory holding ``optimizer/``) without JAX: the
  one reader behind ``load_optimizer`` and ``lopt.torch``, so both refuse the same files with the same messages.

  Returns ``(architecture, tensors, config, directory)``: ``architecture`` is the validated ``ArchitectureConfig``,
  tensors are numpy arrays by key path, named and shaped as ``architecture.param_shapes()``. Raises ``CheckpointError`` naming the file, the field or tensor, and what was expected
  versus found.
  """
  path = Path(path)
  if (path / "optimizer" / "config.json").is_file():  # a run directory
    path = path / "optimizer"
  elif any((path / name).exists() for name in ("checkpoints", "metrics.jsonl", "optimizer")):
    raise CheckpointError(f"{path}: a run directory that holds no trained optimizer yet (no optimizer/config.json: "
                          f"a run exports it when it finishes); finish the run with `lopt train TASK --out {path} "
                          f"--resume` (add --steps N to end it sooner)")
  if not path.is_dir():
    raise CheckpointError(f"{path}: not a directory (expected a trained-optimizer directory with config.json and "
                          f"weights.safetensors)")
  config_path, weights_path = path / "config.json", path / "weights.safetensors"
  config = read_json(config_path, "optimizer config")
  if not isinstance(config, dict):
    raise CheckpointError(f"{config_path}: expected a JSON object, found {type(config).__name__}")
  if config.get("format") != FORMAT:
    raise CheckpointError(f"{config_path}: field 'format' must be {FORMAT!r}, found {config.get('format')!r}")
  version = config.get("format_version")
  if isinstance(version, bool) or version not in READABLE_VERSIONS:
    raise CheckpointError(f"{config_path}: field 'format_version' must be one of {list(READABLE_VERSIONS)} (the "
                          f"versions this lopt reads), found {show(version)}")
  architecture = architecture_config(config.get("optimizer"), config_path, version)
  tensors = _read_weights(weights_path, architecture, config.get("weights_sha256"))
  return architecture, tensors, config, path


def _read_weights(path: Path, spec: ArchitectureConfig, expected_sha256) -> dict[str, np.ndarray]:
  """The weights file, opened and read once. Names, shapes and dtypes from the header first: a file for another
  architecture is refused before its data is read, so memory stays bounded by the architecture's size. Then the
  checksum and the tensors come from the same bytes."""
  with _open_weights(path) as (f, file_size):
    entries, _, head = _read_header_from(f, path, file_size)
    check_theta({k: _HeaderTensor(v) for k, v in entries.items()}, spec, path)
    data = head + f.read(file_size - len(head))
  digest = hashlib.sha256(data).hexdigest()
  if digest != expected_sha256:
    raise CheckpointError(f"{path}: checksum mismatch (file is truncated or altered): expected SHA-256 "
                          f"{expected_sha256} (config.json 'weights_sha256'), found {digest}")
  tensors = _parse_tensors(data, path)
  check_theta(tensors, spec, path)
  return tensors


class _HeaderTensor:
  """Shape and dtype of a header entry, enough for ``check_theta`` to judge a tensor before its data is read."""

  def __init__(self, entry: dict):
    self.shape = tuple(entry["shape"])
    self.dtype = np.dtype({"F64": np.float64, "F32": np.float32}.get(entry["dtype"], np.uint8))
    self.dtype_name = entry["dtype"]


def check_theta(tensors: dict, optimizer, where: str | Path) -> None:
  """Checks that ``tensors`` ({key path: array}) are exactly the meta-parameters ``optimizer`` (a JAX optimizer or an
  ``ArchitectureConfig``) expects: names, shapes, float dtype, finite values."""
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
      found_dtype = getattr(found, "dtype_name", found.dtype)
      raise CheckpointError(f"{where}: tensor {name!r} has dtype {found_dtype}, expected float32 or float64")
    if isinstance(found, np.ndarray) and not np.all(np.isfinite(found)):
      raise CheckpointError(f"{where}: tensor {name!r} holds {int(np.sum(~np.isfinite(found)))} non-finite values "
                            f"(NaN or inf)")
