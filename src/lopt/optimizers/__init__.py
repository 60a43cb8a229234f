"""Compatibility module (lopt 0.1's layout): architectures live in ``lopt.architectures``, the optax adapter in
``lopt.optax_adapter``, the hand-designed baselines in ``lopt.baselines``."""

from lopt import baselines
from lopt.architectures import REGISTRY as ARCHITECTURES, from_config
from lopt.architectures.gru.optimizer import GRUOptimizer, GRUState
from lopt.optax_adapter import as_optax

__all__ = ["GRUOptimizer", "GRUState", "as_optax", "baselines", "from_config", "ARCHITECTURES"]
