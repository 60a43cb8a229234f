"""Shared test helpers."""

import importlib.util
import os
import tempfile
from pathlib import Path

# Test files run in parallel workers (pyproject's addopts): on a GPU machine each worker must not take 75% of the
# GPU's memory up front, as JAX does by default. Set before JAX starts.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
# One compilation cache for the run, shared by the parallel workers and the `lopt` processes the tests start: the
# suite is mostly XLA compiling programs it has compiled before (a killed run's restart, a resumed run, the same toy
# problem in many tests). A cached program is the same program, so no number changes. LOPT_TEST_CACHE="" turns it off.
_cache = os.environ.get("LOPT_TEST_CACHE", str(Path(tempfile.gettempdir()) / f"lopt-tests-jax-cache-{os.getuid()}"))
if _cache:
  os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _cache)
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.3")
# XLA's CPU backend at optimization level 0: the suite compiles far more than it runs, and LLVM's optimizations take
# a third of the compile time. Results stay within float tolerance of an optimized build (the pins check that).
# LOPT_TEST_XLA_OPTIMIZE=1 tests the optimized build.
if os.environ.get("LOPT_TEST_XLA_OPTIMIZE") != "1" and "xla_backend_optimization_level" not in os.environ.get(
    "XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()

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
