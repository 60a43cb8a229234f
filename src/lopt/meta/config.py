"""Meta-training configuration: one flat, JSON-serializable record, and named presets."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


@dataclass(frozen=True)
class MetaTrainConfig:
  """Everything needed to rebuild a meta-training run (stored as the run directory's ``config.json``).

  Defaults are the laptop-sized recipe (ours) for linear regression; ``PRESETS["paper"]`` is the paper's.
  """
  task: str = "linear_regression"
  task_options: dict = field(default_factory=dict)
  # The learned optimizer (SPEC §2).
  hidden_size: int = 32
  input_scale: float = 1.0
  output_scale: float = 1.0
  input_encoding: str = "scale"
  # The inner problem.
  horizon: int | None = None  # None: the task's default
  # The outer loop (SPEC §3): Adam with exponential learning-rate decay and element-wise meta-gradient clipping.
  num_steps: int = 1500
  meta_batch_size: int = 32
  learning_rate: float = 3e-3
  decay_rate: float = 0.5
  decay_steps: int = 500
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8
  clip_value: float = 1.0
  l2_penalty: float = 1e-6
  meta_loss: str = "mean"
  loss_cap: float = 10.0
  remat: bool = True
  seed: int = 0
  # Book-keeping: held-out selection (the best theta on held-out problems is the one exported), logging, checkpoints.
  eval_every: int = 100
  num_eval_problems: int = 64
  log_every: int = 10
  checkpoint_every: int = 100

  def replace(self, **changes) -> "MetaTrainConfig":
    return dataclasses.replace(self, **changes)

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, values: dict) -> "MetaTrainConfig":
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
      raise ValueError(f"unknown meta-training setting(s) {unknown}; known: {sorted(known)}")
    return cls(**values)


PRESETS = {
    # Sized for a 2-core laptop CPU: a couple of minutes on linear regression.
    "demo": MetaTrainConfig(),
    # The paper's linear-regression optimizer (renn config: seed 675, best of a random search).
    "paper": MetaTrainConfig(
        hidden_size=256, horizon=201, num_steps=5000, meta_batch_size=64, learning_rate=7.836616188084271e-4,
        decay_rate=0.5546520268275907, decay_steps=1000, b1=1 - 0.19360588076250435, b2=1 - 0.4064297061076916,
        eps=4.529839901619837e-06, clip_value=0.047261480715151634, l2_penalty=1e-6, seed=675),
}
