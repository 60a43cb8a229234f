"""Trained optimizers shipped inside the package: ``lopt.pretrained.list()`` and ``lopt.pretrained.load(name)``.

One directory per task (``<name>/config.json`` + ``<name>/weights.safetensors``), written by
``scripts/task_recipes.py`` on the GPU machine. Each ``config.json`` carries, under ``"info"``, the training config
(``"training"``), the search that chose it (``"search"``), the compute used (``"compute"``) and the comparison with
tuned baselines on 128 fresh problems (``"evaluation"``). docs/REPRODUCTION.md tabulates them, including where a
shipped optimizer does not beat a baseline. Nothing is downloaded: the files are package data.
"""

from __future__ import annotations

import builtins
from importlib import resources
from pathlib import Path

from lopt.io.checkpoint import CheckpointError, load_optimizer


def _root() -> Path:
  # Package data of a regular (non-zip) install: a real directory, which load_optimizer needs.
  return Path(str(resources.files(__name__)))


def list() -> builtins.list[str]:  # noqa: A001 - the public name the issue asks for
  """Names of the shipped optimizers (their task names), sorted."""
  return sorted(p.name for p in _root().iterdir() if (p / "config.json").is_file())


def path(name: str) -> Path:
  """The directory of the shipped optimizer ``name``; CheckpointError listing the names when there is none."""
  names = list()
  if name not in names:
    raise CheckpointError(f"no shipped optimizer named {name!r}; available: {', '.join(names)}")
  return _root() / name


def load(name: str):
  """Loads the shipped optimizer ``name``: returns ``(optimizer, theta, config)`` as ``lopt.io.checkpoint.load_optimizer``.

  ``optimizer.update`` / ``lopt.optimizers.as_optax(optimizer, theta)`` use it; ``config["info"]`` holds how it was
  trained and how it compared with tuned baselines.
  """
  return load_optimizer(path(name))


__all__ = ["list", "load", "path"]
