"""PyTorch path for trained lopt optimizers (``pip install "lopt[torch]"``): no JAX needed.

  from lopt.torch import LearnedOptimizer
  optimizer = LearnedOptimizer(model.parameters(), "runs/lr", lr=1.0)
"""

from lopt.torch.checkpoint import ArchitectureConfig, GRUSpec, read_trained_optimizer
from lopt.torch.optimizer import LearnedOptimizer

__all__ = ["LearnedOptimizer", "ArchitectureConfig", "GRUSpec", "read_trained_optimizer"]
