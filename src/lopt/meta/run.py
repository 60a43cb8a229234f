"""The run directory: config.json, metrics.jsonl, checkpoints/, optimizer/ — written atomically, resumable, locked.

  run_dir/
    config.json                  MetaTrainConfig, everything needed to rebuild the run
    metrics.jsonl                one JSON line per logged outer step
    checkpoints/step_XXXXXXXX.safetensors   theta, outer-optimizer state, best theta; step and counters in metadata
    optimizer/                   the trained optimizer (best on held-out problems): config.json + weights.safetensors
"""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path

import jax
import numpy as np

from lopt.checkpoint import (CheckpointError, atomic_write_bytes, atomic_write_json, read_json, read_tensors,
                             save_optimizer, tensors_to_bytes)
from lopt.errors import UserError
from lopt.meta.config import MetaTrainConfig

KEEP_CHECKPOINTS = 2


class RunError(UserError, RuntimeError):
  """A run directory cannot be used as asked (locked, exists without --resume, config differs)."""


class RunDirectory:
  """Owns one run directory for one process at a time (an exclusive lock on ``run_dir/.lock``)."""

  def __init__(self, path: str | Path):
    self.path = Path(path)
    self.checkpoints = self.path / "checkpoints"
    self._lock_fd = None

  # -- lifecycle -----------------------------------------------------------------------------------------------------

  def open(self, config: MetaTrainConfig, *, resume: bool) -> None:
    if self.path.exists() and not self.path.is_dir():
      raise RunError(f"{self.path}: exists and is not a directory")
    try:
      self.path.mkdir(parents=True, exist_ok=True)
      self._lock_fd = os.open(self.path / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
      raise RunError(f"{self.path}: cannot create the run directory ({e.strerror})") from None
    try:
      fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      os.close(self._lock_fd)
      self._lock_fd = None
      raise RunError(f"{self.path}: another lopt process is using this run directory (it holds {self.path}/.lock); "
                     f"wait for it to finish or use another --out") from None
    config_path = self.path / "config.json"
    if config_path.exists():
      if not resume:
        self.close()
        raise RunError(f"{self.path}: already holds a run; pass --resume to continue it, or choose another --out")
      saved = read_json(config_path, "run config")
      if saved != config.to_dict():
        differing = sorted(k for k in set(saved) | set(config.to_dict())
                           if saved.get(k) != config.to_dict().get(k))
        self.close()
        raise RunError(f"{config_path}: the saved run differs from the requested one in {differing}; resume with the "
                       f"same settings (or omit them: `lopt train --resume --out {self.path}` reuses the saved ones)")
    else:
      atomic_write_json(config_path, config.to_dict())

  def close(self) -> None:
    if self._lock_fd is not None:
      fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
      os.close(self._lock_fd)
      self._lock_fd = None

  # -- metrics -------------------------------------------------------------------------------------------------------

  def log(self, record: dict) -> None:
    with open(self.path / "metrics.jsonl", "a") as f:
      f.write(json.dumps(record) + "\n")
      f.flush()

  def _truncate_metrics(self, step: int) -> None:
    """Drops lines after ``step`` (written after the checkpoint we resume from) and any torn line."""
    path = self.path / "metrics.jsonl"
    if not path.exists():
      return
    kept = []
    for line in path.read_text().splitlines():
      try:
        if json.loads(line)["step"] <= step:
          kept.append(line)
      except (json.JSONDecodeError, KeyError, TypeError):
        continue
    atomic_write_bytes(path, "".join(line + "\n" for line in kept).encode())

  # -- checkpoints ---------------------------------------------------------------------------------------------------

  def checkpoint(self, state) -> Path:
    tensors = {f"theta/{k}": np.asarray(v) for k, v in state.theta.items()}
    tensors.update({f"best_theta/{k}": np.asarray(v) for k, v in state.best_theta.items()})
    for i, leaf in enumerate(jax.tree.leaves(state.outer_state)):
      tensors[f"outer_state/{i:04d}"] = np.asarray(leaf)
    metadata = {"step": str(state.step), "best_score": repr(state.best_score), "best_step": str(state.best_step),
                "skipped_steps": str(state.skipped_steps), "dropped_problems": str(state.dropped_problems)}
    path = self.checkpoints / f"step_{state.step:08d}.safetensors"
    atomic_write_bytes(path, tensors_to_bytes(tensors, metadata))
    for old in sorted(self.checkpoints.glob("step_*.safetensors"))[:-KEEP_CHECKPOINTS]:
      old.unlink(missing_ok=True)
    return path

  def restore(self, template):
    """Loads the newest readable checkpoint into a copy of ``template``; None when there is none."""
    from lopt.meta.train import TrainState
    for path in sorted(self.checkpoints.glob("step_*.safetensors"), reverse=True):
      try:
        tensors, meta = read_tensors(path)
        theta = {k: jax.numpy.asarray(tensors[f"theta/{k}"]) for k in template.theta}
        best = {k: jax.numpy.asarray(tensors[f"best_theta/{k}"]) for k in template.theta}
        leaves, treedef = jax.tree.flatten(template.outer_state)
        restored = [tensors[f"outer_state/{i:04d}"] for i in range(len(leaves))]
        for i, (a, b) in enumerate(zip(restored, leaves)):
          if a.shape != np.shape(b):
            raise CheckpointError(f"{path}: outer_state/{i:04d} has shape {a.shape}, expected {np.shape(b)}")
        outer_state = jax.tree.unflatten(treedef, [jax.numpy.asarray(x) for x in restored])
        state = TrainState(int(meta["step"]), theta, outer_state, best, float(meta["best_score"]),
                           int(meta["best_step"]), int(meta["skipped_steps"]), int(meta["dropped_problems"]))
      except (CheckpointError, KeyError, ValueError) as e:
        print(f"warning: skipping unreadable checkpoint {path}: {e}")
        continue
      self._truncate_metrics(state.step)
      return state
    self._truncate_metrics(0)
    return None

  def export(self, optimizer, state, config: MetaTrainConfig) -> Path:
    info = {"training": config.to_dict(), "best_step": state.best_step, "held_out_loss": state.best_score,
            "final_step": state.step, "skipped_steps": state.skipped_steps}
    return save_optimizer(self.path / "optimizer", optimizer, state.best_theta, info)
