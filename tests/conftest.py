"""Shared test helpers."""

import importlib.util
import os
from pathlib import Path

# Test files run in parallel workers (pyproject's addopts): on a GPU machine each worker must not take 75% of the
# GPU's memory up front, as JAX does by default. Set before JAX starts.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import pytest

ROOT = Path(__file__).resolve().parents[1]


def load_script(relative: str):
  """The module of a script that is not part of the package (``scripts/X.py``, ``benchmarks/X.py``)."""
  path = ROOT / relative
  spec = importlib.util.spec_from_file_location(path.stem, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.fixture
def key():
  return jax.random.key(0)


# Files whose module fixtures take minutes: collected first, so that the parallel workers start them at once and the
# rest of the suite runs beside them, instead of one of them running alone at the end.
HEAVY_FIRST = ("test_sharding.py", "test_reproduce.py")


def pytest_collection_modifyitems(config, items):
  rank = {name: i for i, name in enumerate(HEAVY_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the order within a file is kept
