"""Optimizers: the learned GRU optimizer, hand-designed baselines, and the optax adapter."""

from lopt.optimizers import baselines
from lopt.optimizers.gru import GRUOptimizer, GRUState
from lopt.optimizers.optax_adapter import as_optax

ARCHITECTURES = {"gru": GRUOptimizer}


def from_config(config: dict):
  """Rebuilds a learned optimizer from its ``config()`` dict."""
  config = dict(config)
  architecture = config.pop("architecture", None)
  if architecture not in ARCHITECTURES:
    raise ValueError(f"unknown learned-optimizer architecture {architecture!r}; known: {', '.join(ARCHITECTURES)}")
  return ARCHITECTURES[architecture](**config)


__all__ = ["GRUOptimizer", "GRUState", "as_optax", "baselines", "from_config", "ARCHITECTURES"]
