"""Compatibility alias: the GRU optimizer lives in ``lopt.architectures.gru.optimizer``."""
from lopt.architectures.gru.optimizer import GRUOptimizer, GRUState, Theta  # noqa: F401
