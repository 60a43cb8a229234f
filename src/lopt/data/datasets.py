"""Datasets as plain arrays: two moons and 8x8 digits from scikit-learn, MNIST from a local idx or npz file."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path
from typing import NamedTuple

import numpy as np

from lopt.errors import UserError


class Dataset(NamedTuple):
  """inputs: (n, ...) float32; labels: (n,) int32."""
  inputs: np.ndarray
  labels: np.ndarray


def moons(num_points: int = 1024, noise: float = 0.1, seed: int = 0) -> Dataset:
  """scikit-learn's two moons, (num_points, 2) inputs and {0, 1} labels (paper: 1024 points, noise 0.1, seed 0)."""
  from sklearn.datasets import make_moons
  x, y = make_moons(n_samples=num_points, shuffle=True, noise=noise, random_state=seed)
  return Dataset(x.astype(np.float32), y.astype(np.int32))


def digits() -> Dataset:
  """scikit-learn's 1797 8x8 digits as (n, 8, 8, 1) images in [0, 1] (shipped with scikit-learn, no download)."""
  from sklearn.datasets import load_digits
  bunch = load_digits()
  images = (bunch.images / 16.0).astype(np.float32)[..., None]
  return Dataset(images, bunch.target.astype(np.int32))


def split(data: Dataset, valid_fraction: float = 0.2, seed: int = 0) -> tuple[Dataset, Dataset]:
  """A fixed random (train, valid) split."""
  order = np.random.default_rng(seed).permutation(len(data.labels))
  num_valid = int(round(valid_fraction * len(order)))
  valid, train = order[:num_valid], order[num_valid:]
  return Dataset(data.inputs[train], data.labels[train]), Dataset(data.inputs[valid], data.labels[valid])


class DataFileError(UserError, ValueError):
  """A local data file is missing or malformed; the message names the file and the problem."""


def _read_idx(path: Path) -> np.ndarray:
  opener = gzip.open if path.suffix == ".gz" else open
  with opener(path, "rb") as f:
    raw = f.read()
  if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
    raise DataFileError(f"{path}: not an idx file (the first two bytes must be zero)")
  type_code, ndim = raw[2], raw[3]
  dtypes = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
  if type_code not in dtypes:
    raise DataFileError(f"{path}: unknown idx element type 0x{type_code:02x}")
  header = 4 + 4 * ndim
  if len(raw) < header:
    raise DataFileError(f"{path}: truncated idx header")
  shape = struct.unpack(f">{ndim}I", raw[4:header])
  dtype = np.dtype(dtypes[type_code])
  expected = int(np.prod(shape)) * dtype.itemsize
  if len(raw) - header != expected:
    raise DataFileError(f"{path}: idx header says shape {shape} ({expected} bytes) but the file holds "
                        f"{len(raw) - header} bytes of data")
  return np.frombuffer(raw, dtype, offset=header).reshape(shape)


def load_mnist(path: str | Path) -> Dataset:
  """Loads MNIST-format data from a local file: an ``.npz`` with arrays ``x``/``y`` (or ``images``/``labels``), or a
  directory / images path in idx format (``*-images-idx3-ubyte[.gz]`` beside ``*-labels-idx1-ubyte[.gz]``).

  Returns images as (n, 28, 28, 1) float32 in [0, 1] (any square size is accepted) and int32 labels.
  """
  path = Path(path)
  if not path.exists():
    raise DataFileError(f"{path}: file not found (expected an .npz file or an idx images file / directory)")
  if path.suffix == ".npz":
    try:
      with np.load(path, allow_pickle=False) as archive:
        names = set(archive.files)
        for xs, ys in (("x", "y"), ("images", "labels"), ("x_train", "y_train")):
          if {xs, ys} <= names:
            images, labels = archive[xs], archive[ys]
            break
        else:
          raise DataFileError(f"{path}: npz must hold arrays 'x' and 'y' (or 'images' and 'labels'); found "
                              f"{sorted(names)}")
    except (OSError, ValueError) as e:
      if isinstance(e, DataFileError):
        raise
      raise DataFileError(f"{path}: cannot read as npz ({e})") from None
  else:
    images_path = path
    if path.is_dir():
      candidates = sorted(path.glob("*images*idx3*"))
      if not candidates:
        raise DataFileError(f"{path}: directory holds no '*images*idx3*' file")
      images_path = candidates[0]
    labels_path = images_path.with_name(images_path.name.replace("images", "labels").replace("idx3", "idx1"))
    if not labels_path.exists():
      raise DataFileError(f"{labels_path}: labels file not found beside {images_path.name}")
    images, labels = _read_idx(images_path), _read_idx(labels_path)
  images, labels = np.asarray(images), np.asarray(labels)
  if images.ndim == 4 and images.shape[-1] == 1:
    images = images[..., 0]
  if images.ndim != 3 or images.shape[1] != images.shape[2]:
    raise DataFileError(f"{path}: images must have shape (n, side, side); found {images.shape}")
  if labels.shape != (images.shape[0],):
    raise DataFileError(f"{path}: labels must have shape ({images.shape[0]},); found {labels.shape}")
  if labels.size and (labels.min() < 0 or labels.max() > 9):
    raise DataFileError(f"{path}: labels must be digits 0..9; found range [{labels.min()}, {labels.max()}]")
  images = images.astype(np.float32)
  if images.size and images.max() > 1.0:
    images = images / 255.0
  return Dataset(images[..., None], labels.astype(np.int32))
