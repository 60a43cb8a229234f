"""lopt: learned optimizers — meta-train them, compare them fairly, use them anywhere, and reverse-engineer them."""

from lopt._version import __version__  # noqa: E402,F401

from lopt.io.checkpoint import CheckpointError, load_optimizer  # noqa: E402
from lopt.trained import TrainedOptimizer, load  # noqa: E402

# Names whose modules import jax are resolved on first access (PEP 562), so that `import lopt.torch` works in a
# PyTorch-only process without importing jax.
_LAZY = {"GRUOptimizer": "lopt.architectures.gru.optimizer", "as_optax": "lopt.optax_adapter"}


def __getattr__(name):
  import importlib
  if name in _LAZY:
    return getattr(importlib.import_module(_LAZY[name]), name)
  try:  # `import lopt; lopt.optimizers...` keeps working although subpackages are no longer imported eagerly
    return importlib.import_module(f"lopt.{name}")
  except ModuleNotFoundError as e:
    if e.name != f"lopt.{name}":
      raise
  raise AttributeError(f"module 'lopt' has no attribute {name!r}")


__all__ = ["__version__", "load_optimizer", "load", "TrainedOptimizer", "CheckpointError", "GRUOptimizer", "as_optax"]
