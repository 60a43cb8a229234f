"""A trained optimizer loaded from disk, ready to use: ``lopt.load(path_or_name).as_optax()``.

This module imports neither jax nor torch at module level: ``resolve_optimizer_path`` is shared with
``lopt.torch``, which must work in a PyTorch-only process.

Names. A ``path_or_name`` that is an existing path is used as is (a trained-optimizer directory, or a run directory
holding ``optimizer/``). Otherwise it is a name, looked up as ``<dir>/<name>`` in each directory of the environment
variable ``LOPT_OPTIMIZER_PATH`` (``os.pathsep``-separated), then in ``~/.cache/lopt/optimizers`` *(ours)*, and
last among the optimizers shipped in the package (``lopt.pretrained``: ``lopt.load("linear_regression")``).
Nothing is ever downloaded: a name is a local directory someone put there (``lopt train ... --out`` or a copy) or
package data.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lopt.io.checkpoint import CheckpointError

OPTIMIZER_PATH_VARIABLE = "LOPT_OPTIMIZER_PATH"
DEFAULT_OPTIMIZER_DIRECTORY = Path("~/.cache/lopt/optimizers")


def optimizer_search_directories() -> list[Path]:
  """Where names are looked up, in order: ``$LOPT_OPTIMIZER_PATH`` entries, then the per-user default."""
  entries = [e for e in os.environ.get(OPTIMIZER_PATH_VARIABLE, "").split(os.pathsep) if e]
  return [Path(e).expanduser() for e in entries] + [DEFAULT_OPTIMIZER_DIRECTORY.expanduser()]


def resolve_optimizer_path(path_or_name: str | os.PathLike) -> Path:
  """An existing path as is; otherwise the first ``<dir>/<name>`` that exists. Raises CheckpointError listing the
  places searched when nothing matches."""
  path = Path(path_or_name).expanduser()
  if path.exists():
    return path
  name = str(path_or_name)
  separators = [sep for sep in (os.sep, os.altsep) if sep]
  is_plain_name = bool(name) and not any(sep in name for sep in separators) and name not in (".", "..")
  searched = []
  if is_plain_name:
    for directory in optimizer_search_directories():
      candidate = directory / name
      if candidate.exists():
        return candidate
      searched.append(str(candidate))
    shipped = _shipped_path(name)
    if shipped is not None:
      return shipped
  where = f"; also looked for the name in {searched} (set ${OPTIMIZER_PATH_VARIABLE} to add directories) and among the shipped optimizers" \
      if searched else ""
  raise CheckpointError(f"{path}: no such trained optimizer (expected a directory with config.json and "
                        f"weights.safetensors, or a run directory holding optimizer/){where}")


def _shipped_path(name: str) -> Path | None:
  """The directory of the shipped optimizer ``name`` (``lopt.pretrained``), or None. Looked up after local paths so
  that a user's own optimizer of the same name wins."""
  from lopt import pretrained  # no jax at import: it only lists package data
  return pretrained.path(name) if name in pretrained.list() else None


@dataclass(frozen=True)
class TrainedOptimizer:
  """A learned optimizer with its trained meta-parameters.

  Attributes:
    optimizer: the architecture (e.g. ``GRUOptimizer``), rebuilt from the checkpoint's config.
    theta: meta-parameters, the architecture's pytree with numpy leaves (for the GRU ``{name: array}``), with the
      shapes ``optimizer.param_shapes()`` gives by key path.
    config: the checkpoint's ``config.json`` (format, versions, tensor table, checksum, free-form ``info``).
    path: the directory the weights were read from.
  """
  optimizer: Any
  theta: Any = field(repr=False)
  config: dict = field(repr=False)
  path: Path | None = None

  def __repr__(self) -> str:
    shapes = self.optimizer.param_shapes() if hasattr(self.optimizer, "param_shapes") else {}
    count = sum(math.prod(shape) for shape in shapes.values())
    return f"TrainedOptimizer({self.optimizer!r}, {count} meta-parameters, path={str(self.path)!r})"

  def as_optax(self, *, learning_rate: float | None = None, weight_decay: float | None = None,
               skip_nonfinite: bool = False, num_steps: int | None = None):
    """An ``optax.GradientTransformationExtraArgs`` (see ``lopt.optax_adapter.as_optax``).

    With ``learning_rate`` (a multiplier, 1 reproduces the optimizer as trained), ``weight_decay`` (decoupled) or
    ``skip_nonfinite`` it is wrapped as ``lopt.optax_adapter.guarded`` does -- the same rules as
    ``lopt.torch.LearnedOptimizer`` -- and its state becomes a ``GuardedState`` (``skipped_steps`` counts skipped
    steps). Without them it is the bare learned update, whose state is the architecture's own. ``num_steps``: the
    run's horizon, a hint for architectures with a learned schedule (``hierarchical``; others ignore it)."""
    from lopt.optax_adapter import as_optax, guarded
    transformation = as_optax(self.optimizer, self.theta, num_steps=num_steps)
    if learning_rate is None and weight_decay is None and not skip_nonfinite:
      return transformation
    return guarded(transformation, learning_rate=1.0 if learning_rate is None else learning_rate,
                   weight_decay=weight_decay or 0.0)

  def __iter__(self):
    """Unpacks like ``load_optimizer``: ``optimizer, theta, config = lopt.load(path)``."""
    return iter((self.optimizer, self.theta, self.config))


def load(path_or_name: str | os.PathLike) -> TrainedOptimizer:
  """Loads and validates a trained optimizer (see ``lopt.io.checkpoint.load_optimizer``) by path or name."""
  from lopt.io.checkpoint import load_optimizer
  path = resolve_optimizer_path(path_or_name)
  optimizer, theta, config = load_optimizer(path)
  if (path / "optimizer" / "config.json").is_file():  # load_optimizer accepted a run directory
    path = path / "optimizer"
  return TrainedOptimizer(optimizer, theta, config, path)
