"""Shared test helpers."""

import importlib.util
from pathlib import Path

import jax
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
