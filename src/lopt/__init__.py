"""lopt: learned optimizers — meta-train them, compare them fairly, use them anywhere, and reverse-engineer them."""

__version__ = "0.1.0"

from lopt.checkpoint import CheckpointError, load_optimizer  # noqa: E402
from lopt.optimizers import GRUOptimizer, as_optax  # noqa: E402

__all__ = ["__version__", "load_optimizer", "CheckpointError", "GRUOptimizer", "as_optax"]
