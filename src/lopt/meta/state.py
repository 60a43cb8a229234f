"""The meta-training loop's whole state: what a checkpoint holds and what a resumed run continues from."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class TrainState:
  """theta, the outer optimizer's state and the estimator's state (pytrees); the best theta on held-out problems
  (what gets exported) with its score and step; the outer step; counters of skipped steps and dropped problems."""
  step: int
  theta: Any
  outer_state: Any
  best_theta: Any
  best_score: float
  best_step: int
  skipped_steps: int = 0
  dropped_problems: int = 0
  estimator_state: Any = ()
