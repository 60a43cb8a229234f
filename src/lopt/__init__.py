"""lopt: learned optimizers — meta-train them, compare them fairly, use them anywhere, and reverse-engineer them."""

from lopt._version import __version__  # noqa: F401

# Every public name is resolved on first access (PEP 562): `import lopt` imports nothing heavy, so `import
# lopt.torch` works in a PyTorch-only process without jax, and the `lopt` command installs its Ctrl-C handling
# before numpy or jax load (an interrupt there would otherwise print a traceback).
_LAZY = {"load": "lopt.trained", "TrainedOptimizer": "lopt.trained", "load_optimizer": "lopt.io.checkpoint",
         "CheckpointError": "lopt.errors", "GRUOptimizer": "lopt.architectures.gru.optimizer",
         "as_optax": "lopt.optax_adapter"}


def __getattr__(name):
  import importlib
  if name in _LAZY:
    return getattr(importlib.import_module(_LAZY[name]), name)
  try:  # `import lopt; lopt.optimizers...` keeps working although subpackages are not imported eagerly
    return importlib.import_module(f"lopt.{name}")
  except ModuleNotFoundError as e:
    if e.name != f"lopt.{name}":
      raise
  raise AttributeError(f"module 'lopt' has no attribute {name!r}")


def __dir__():
  return sorted([*globals(), *_LAZY])


__all__ = ["__version__", "load_optimizer", "load", "TrainedOptimizer", "CheckpointError", "GRUOptimizer", "as_optax"]
