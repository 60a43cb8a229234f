"""Learned-optimizer architectures, one folder each, found by name in ``REGISTRY``.

Each folder holds ``spec.py`` (fields, defaults, validation and meta-parameter shapes; JAX-free, shared by the JAX
and PyTorch sides), ``optimizer.py`` (the JAX ``lopt.api.LearnedOptimizer``) and ``torch.py`` (the PyTorch rule).
A new architecture is a new folder plus one ``register`` call (or a test's own ``register``).
"""

from lopt.architectures.spec import (REGISTRY, REQUIRED, ArchitectureSpec, Field, OptimizerConfigError, get,
                                     register)
from lopt.architectures import gru, hierarchical, mlp  # noqa: E402 (registered below, after the registry exists)

register(gru.SPEC)
register(mlp.SPEC)
register(hierarchical.SPEC)


def from_config(config: dict, source: str = "optimizer config"):
  """The JAX optimizer a ``config()`` dict ({"architecture": name, **fields}) describes."""
  if not isinstance(config, dict):
    raise OptimizerConfigError(f"{source}: expected an object, found {type(config).__name__}")
  return get(config.get("architecture"), source).build(config, source)


__all__ = ["REGISTRY", "REQUIRED", "ArchitectureSpec", "Field", "OptimizerConfigError", "get", "register",
           "from_config"]
