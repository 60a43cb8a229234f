"""Datasets as plain arrays: two moons and 8x8 digits from scikit-learn, MNIST from a local idx or npz file; for the
task families (``lopt.tasks.families``) scikit-learn's bundled tables and generators, Python's own documentation as a
text corpus and generated Markov-chain token streams. Nothing is downloaded."""

from __future__ import annotations

import bisect
import functools
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


class Regression(NamedTuple):
  """inputs: (n, d) float32; labels: (n,) float32 targets (the field is named as Dataset's, so that code choosing
  rows or standardizing serves both)."""
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


# -- tabular datasets for the task families --------------------------------------------------------------------------

# name -> (features, classes; 0 for regression): the families estimate step costs from these without loading anything.
TABULAR = {
    "digits": (64, 10), "iris": (4, 3), "wine": (13, 3), "breast_cancer": (30, 2), "diabetes": (10, 0),
    "classification": (16, 4), "blobs": (8, 5), "moons": (2, 2), "circles": (2, 2),
}
GENERATED = ("classification", "blobs", "moons", "circles")  # drawn from a seed; the others ship with scikit-learn
NUM_GENERATED = 1024
IMAGES = ("digits",)  # standardized over all features at once


def _frozen(data):
  """``data`` with read-only arrays: cached loaders hand out the same arrays to every caller."""
  for array in data:
    array.flags.writeable = False
  return data


def _bundled(loader) -> Dataset:
  x, y = loader(return_X_y=True)
  return _frozen(Dataset(x.astype(np.float32), y.astype(np.int32)))


@functools.lru_cache(maxsize=None)
def iris() -> Dataset:
  """scikit-learn's iris: (150, 4) inputs, 3 classes."""
  from sklearn.datasets import load_iris
  return _bundled(load_iris)


@functools.lru_cache(maxsize=None)
def wine() -> Dataset:
  """scikit-learn's wine: (178, 13) inputs, 3 classes."""
  from sklearn.datasets import load_wine
  return _bundled(load_wine)


@functools.lru_cache(maxsize=None)
def breast_cancer() -> Dataset:
  """scikit-learn's breast cancer (Wisconsin): (569, 30) inputs, 2 classes."""
  from sklearn.datasets import load_breast_cancer
  return _bundled(load_breast_cancer)


@functools.lru_cache(maxsize=None)
def diabetes() -> Regression:
  """scikit-learn's diabetes regression: (442, 10) inputs, float targets (disease progression, 25..346)."""
  from sklearn.datasets import load_diabetes
  x, y = load_diabetes(return_X_y=True)
  return _frozen(Regression(x.astype(np.float32), y.astype(np.float32)))


@functools.lru_cache(maxsize=None)
def digits_flat() -> Dataset:
  """The 8x8 digits as (1797, 64) rows in [0, 1]."""
  data = digits()
  return _frozen(Dataset(data.inputs.reshape(len(data.labels), -1), data.labels))


@functools.lru_cache(maxsize=64)
def classification(seed: int, num_points: int = NUM_GENERATED, num_features: int = 16,
                   num_classes: int = 4) -> Dataset:
  """scikit-learn's make_classification: half the features informative, a quarter redundant, 2 clusters per class."""
  from sklearn.datasets import make_classification
  x, y = make_classification(n_samples=num_points, n_features=num_features, n_informative=num_features // 2,
                             n_redundant=num_features // 4, n_classes=num_classes, random_state=seed)
  return _frozen(Dataset(x.astype(np.float32), y.astype(np.int32)))


@functools.lru_cache(maxsize=64)
def blobs(seed: int, num_points: int = NUM_GENERATED, num_features: int = 8, centers: int = 5,
          cluster_std: float = 3.0) -> Dataset:
  """Isotropic Gaussian blobs (make_blobs), wide enough (cluster_std 3 around centers in [-10, 10]) to overlap."""
  from sklearn.datasets import make_blobs
  x, y = make_blobs(n_samples=num_points, n_features=num_features, centers=centers, cluster_std=cluster_std,
                    random_state=seed)
  return _frozen(Dataset(x.astype(np.float32), y.astype(np.int32)))


@functools.lru_cache(maxsize=64)
def circles(seed: int, num_points: int = NUM_GENERATED, noise: float = 0.1, factor: float = 0.5) -> Dataset:
  """Two concentric noisy circles (make_circles), 2 classes."""
  from sklearn.datasets import make_circles
  x, y = make_circles(n_samples=num_points, noise=noise, factor=factor, random_state=seed)
  return _frozen(Dataset(x.astype(np.float32), y.astype(np.int32)))


def _table(name: str, seed: int):
  """The raw rows of ``name`` (``seed`` draws the generated ones)."""
  if name == "moons":
    return moons(NUM_GENERATED, 0.2, seed)
  loaders = {"digits": digits_flat, "iris": iris, "wine": wine, "breast_cancer": breast_cancer,
             "diabetes": diabetes}
  if name in loaders:
    return loaders[name]()
  if name in GENERATED:
    return {"classification": classification, "blobs": blobs, "circles": circles}[name](seed)
  raise UserError(f"unknown tabular dataset {name!r}; known: {', '.join(TABULAR)}")


def _rows(data, index):
  return type(data)(data.inputs[index], data.labels[index])


@functools.lru_cache(maxsize=128)
def tabular(name: str, seed: int = 0, valid_fraction: float = 0.2):
  """A fixed (train, valid) split of the table ``name`` (``TABULAR``), standardized with the train split's statistics:
  inputs (n, d) float32 with zero mean and unit variance per feature (digits: over all pixels at once); regression
  targets too. ``seed`` chooses the split and draws the generated tables."""
  data = _table(name, seed)
  order = np.random.default_rng([seed, 0x5917]).permutation(len(data.labels))
  num_valid = int(round(valid_fraction * len(order)))
  train, valid = _rows(data, order[num_valid:]), _rows(data, order[:num_valid])
  # Digits are pixels in one unit: standardized as a whole, since a per-pixel scale would blow up the rare ink of
  # nearly-blank border pixels in the validation split (a pixel of train std 0.01 would read 100).
  axis = None if name in IMAGES else 0
  mean, std = train.inputs.mean(axis), train.inputs.std(axis)
  std = np.where(std > 1e-6, std, 1.0)  # constant features become 0
  scale = lambda x: ((x - mean) / std).astype(np.float32)
  if isinstance(data, Regression):
    target_mean, target_std = train.labels.mean(), train.labels.std()
    target = lambda y: ((y - target_mean) / target_std).astype(np.float32)
    train, valid = (Regression(scale(d.inputs), target(d.labels)) for d in (train, valid))
  else:
    train, valid = (Dataset(scale(d.inputs), d.labels) for d in (train, valid))
  return _frozen(train), _frozen(valid)


# -- token streams for the language-model families -------------------------------------------------------------------

# Text: 0 any other character, 1 newline, 2..96 printable ASCII ' '..'~' (tab read as a space).
TEXT_VOCAB = 97
TEXT_LENGTH = 200_000
MARKOV_VOCAB = 32
MARKOV_LENGTH = 65_536


@functools.lru_cache(maxsize=None)
def text_corpus(max_chars: int = TEXT_LENGTH) -> np.ndarray:
  """(n,) uint8 character ids (``TEXT_VOCAB``) of the first ``max_chars`` characters of ``pydoc_data.topics``.

  Why this corpus: it is the text of Python's ``help()`` topics, installed with CPython itself (no download, no extra
  package), ~465k characters of real English prose mixed with code and grammar. Capped at 200k characters so the
  jitted tasks' constants stay small. Its content changes a little between Python versions.
  """
  try:
    from pydoc_data.topics import topics
  except ImportError:  # a stripped-down Python without its documentation
    raise UserError("the text corpus needs the standard library's pydoc_data module, which this Python lacks; use "
                    "data 'markov' instead") from None
  text = "\n\n".join(topics[name] for name in sorted(topics))[:max_chars]
  codes = np.frombuffer(text.encode("utf-32-le"), np.uint32)
  codes = np.where(codes == 9, 32, codes)
  ids = np.where((codes >= 32) & (codes <= 126), codes - 30, 0)
  ids = np.where(codes == 10, 1, ids).astype(np.uint8)
  ids.flags.writeable = False
  return ids


@functools.lru_cache(maxsize=64)
def markov_sequences(seed: int, vocab: int = MARKOV_VOCAB, order: int = 2, length: int = MARKOV_LENGTH,
                     branching: int = 4) -> np.ndarray:
  """(length,) uint8 tokens in [0, vocab) from a random sparse Markov chain of ``order``, fixed by ``seed``: each
  context (the last ``order`` tokens) has ``branching`` possible successors with Dirichlet(0.5) probabilities, so a
  model that learns the chain reaches a loss well below log(vocab)."""
  if not 2 <= vocab <= 256 or order < 1 or not 1 <= branching <= vocab:
    raise ValueError(f"markov_sequences: need 2 <= vocab <= 256, order >= 1 and 1 <= branching <= vocab; got vocab="
                     f"{vocab}, order={order}, branching={branching}")
  rng = np.random.default_rng([seed, 0x3A4C])
  contexts = vocab**order
  successors = rng.permuted(np.tile(np.arange(vocab), (contexts, 1)), axis=1)[:, :branching].tolist()
  cumulative = np.cumsum(rng.dirichlet(np.full(branching, 0.5), size=contexts), axis=1).tolist()
  uniforms = rng.random(length).tolist()
  tokens, context = [], int(rng.integers(contexts))
  for u in uniforms:  # plain Python: ~50 ms for 64k tokens, cached
    choice = min(bisect.bisect_right(cumulative[context], u), branching - 1)
    token = successors[context][choice]
    tokens.append(token)
    context = (context * vocab + token) % contexts
  stream = np.asarray(tokens, np.uint8)
  stream.flags.writeable = False
  return stream
