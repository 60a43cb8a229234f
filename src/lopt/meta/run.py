"""The run directory: config.json, metrics.jsonl, checkpoints/, optimizer/ — written atomically, resumable, locked.

  run_dir/
    config.json                  MetaTrainConfig, everything needed to rebuild the run
    metrics.jsonl                one JSON line per logged outer step
    checkpoints/step_XXXXXXXX.safetensors   theta and best theta (by key path), outer-optimizer state (by leaf
                                 index), estimator state (by key path); step and counters in metadata
    meta_checkpoint.safetensors  the newest checkpoint without the estimator state (theta, best theta, outer state,
                                 counters): small enough to keep with the run's logs when checkpoints/ (the inner
                                 problems' states, up to hundreds of MB) cannot travel, so that a run continues in
                                 another working period on another machine, its inner problems starting new episodes
    optimizer/                   the trained optimizer (best on held-out problems): config.json + weights.safetensors
"""

from __future__ import annotations

import fcntl
import json
import os
import sys
from pathlib import Path

import jax
import numpy as np

from lopt.architectures.hierarchical.optimizer import upgrade_legacy_states
from lopt.io.checkpoint import (TMP_SUFFIX, CheckpointError, WriteError, atomic_write_bytes, atomic_write_json,
                                read_json, read_tensors, save_optimizer, tensors_to_bytes)
from lopt.errors import UserError
from lopt.meta.config import RESUMABLE_CHANGES, MetaTrainConfig
from lopt.meta.state import TrainState
from lopt.pytree import flatten_by_path

KEEP_CHECKPOINTS = 2
META_CHECKPOINT = "meta_checkpoint.safetensors"


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
    except (OSError, ValueError) as e:
      raise RunError(f"{self.path}: cannot create the run directory ({getattr(e, 'strerror', None) or e})") from None
    try:
      fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      os.close(self._lock_fd)
      self._lock_fd = None
      raise RunError(f"{self.path}: another lopt process is using this run directory (it holds {self.path}/.lock); "
                     f"wait for it to finish or use another --out") from None
    try:
      self._check_config(config, resume=resume)
    except BaseException:
      self.close()
      raise
    self._remove_stale_temporaries()

  def _check_config(self, config: MetaTrainConfig, *, resume: bool) -> None:
    config_path = self.path / "config.json"
    if config_path.exists():
      if not resume:
        raise RunError(f"{self.path}: already holds a run; pass --resume to continue it, or choose another --out")
      raw = read_json(config_path, "run config")
      saved = MetaTrainConfig.from_dict(raw, str(config_path)).flat_items()
      requested = config.flat_items()
      differing = sorted(k for k in set(saved) | set(requested)
                         if saved.get(k) != requested.get(k) and k not in RESUMABLE_CHANGES)
      if differing:
        raise RunError(f"{config_path}: the saved run differs from the requested one in {differing}; resume with the "
                       f"same settings (or omit them: `lopt train --resume --out {self.path}` reuses the saved ones); "
                       f"only {list(RESUMABLE_CHANGES)} may change on resume")
      if saved != requested or not isinstance(raw.get("task"), dict):
        atomic_write_json(config_path, config.to_dict())  # also upgrades lopt 0.1's flat record to sections
    else:
      if resume:
        raise RunError(f"{self.path}: holds no run to resume (no config.json); drop --resume to start a new run "
                       f"there")
      atomic_write_json(config_path, config.to_dict())

  def _remove_stale_temporaries(self) -> None:
    """Deletes temporary files left by a process killed mid-write; safe because we hold the lock."""
    for folder in (self.path, self.checkpoints, self.path / "optimizer"):
      for tmp in folder.glob(f".*{TMP_SUFFIX}"):
        tmp.unlink(missing_ok=True)

  def close(self) -> None:
    if self._lock_fd is not None:
      fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
      os.close(self._lock_fd)
      self._lock_fd = None

  # -- metrics -------------------------------------------------------------------------------------------------------

  def log(self, record: dict) -> None:
    """Appends one line. A kill can tear only this last line, which resume drops (``_truncate_metrics``)."""
    path = self.path / "metrics.jsonl"
    try:
      with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
    except OSError as e:
      raise WriteError(f"{path}: cannot append metrics ({e.strerror or e}); checkpoints so far are intact, resume "
                       f"with --resume once the disk is fixed") from None

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
    """checkpoints/step_STEP.safetensors (the whole state), then meta_checkpoint.safetensors (all but the estimator's
    state); both atomic."""
    tensors = {f"theta/{k}": np.asarray(v) for k, v in flatten_by_path(state.theta).items()}
    tensors.update({f"best_theta/{k}": np.asarray(v) for k, v in flatten_by_path(state.best_theta).items()})
    for i, leaf in enumerate(jax.tree.leaves(state.outer_state)):
      tensors[f"outer_state/{i:04d}"] = np.asarray(leaf)
    meta_tensors = dict(tensors)
    for k, v in flatten_by_path(state.estimator_state).items():
      tensors[f"estimator_state/{k}"] = _storable(v)
    metadata = {"step": str(state.step), "best_score": repr(state.best_score), "best_step": str(state.best_step),
                "skipped_steps": str(state.skipped_steps), "dropped_problems": str(state.dropped_problems)}
    path = self.write_checkpoint(state.step, tensors, metadata)
    try:
      atomic_write_bytes(self.path / META_CHECKPOINT, tensors_to_bytes(meta_tensors, metadata))
    except WriteError as e:
      raise WriteError(f"{e}; the checkpoint {path} is intact: free space or fix permissions, then continue with "
                       f"`lopt train --resume --out {self.path}`") from None
    return path

  def write_checkpoint(self, step: int, tensors: dict, metadata: dict, command: str = "lopt train") -> Path:
    """checkpoints/step_STEP.safetensors, atomically; then all but the newest KEEP_CHECKPOINTS go. A write that
    fails is a WriteError saying the earlier checkpoints are intact and how to continue (``command --resume``)."""
    path = self.checkpoints / f"step_{step:08d}.safetensors"
    try:
      atomic_write_bytes(path, tensors_to_bytes(tensors, metadata))
    except WriteError as e:
      raise WriteError(f"{e}; earlier checkpoints in {self.checkpoints} are intact: free space or fix permissions, "
                       f"then continue with `{command} --resume --out {self.path}`") from None
    # Older checkpoints go only once the new one is safely on disk.
    for old in sorted(self.checkpoints.glob("step_*.safetensors"))[:-KEEP_CHECKPOINTS]:
      old.unlink(missing_ok=True)
    return path

  def restore(self, template, fresh_estimator_state=None):
    """Loads the newest readable checkpoint into a copy of ``template``; None when there is none.

    An unreadable checkpoint (only possible if something outside lopt altered it: writes are atomic) is skipped with
    a warning for the next older one; when checkpoints exist but none is readable, RunError, rather than silently
    starting over. Without checkpoints/ (a run carried to another machine with its logs only) the state comes from
    meta_checkpoint.safetensors, with the estimator's state ``fresh_estimator_state(theta, step)`` (the template's
    when not given): the meta-parameters and the outer optimizer continue exactly, the inner problems start new
    episodes, and a warning says so.
    """
    paths = sorted(self.checkpoints.glob("step_*.safetensors"), reverse=True)
    problems = []
    for path in paths:
      try:
        state = _state_from_checkpoint(path, template)
      except (CheckpointError, KeyError, ValueError) as e:
        problems.append(str(e))
        print(f"lopt: warning: skipping unreadable checkpoint {path}: {e}", file=sys.stderr)
        continue
      self._truncate_metrics(state.step)
      return state
    if problems:
      raise RunError(f"{self.checkpoints}: no checkpoint is readable ({'; '.join(problems)}); move the directory "
                     f"aside to start over")
    meta = self.path / META_CHECKPOINT
    if meta.exists():
      try:
        state = _state_from_checkpoint(meta, template, with_estimator=False)
      except (CheckpointError, KeyError, ValueError) as e:
        raise RunError(f"{meta}: unreadable ({e}), and {self.checkpoints} holds no checkpoint; move the directory "
                       f"aside to start over") from None
      if fresh_estimator_state is not None:
        state.estimator_state = fresh_estimator_state(state.theta, state.step)
      print(f"lopt: resuming {self.path} at outer step {state.step} from {META_CHECKPOINT} ({self.checkpoints} holds "
            f"no checkpoint): the meta-parameters and the outer optimizer continue exactly; the inner problems start "
            f"new episodes", file=sys.stderr)
      self._truncate_metrics(state.step)
      return state
    self._truncate_metrics(0)
    return None

  def export(self, optimizer, state, config: MetaTrainConfig) -> Path:
    info = {"training": config.to_dict(), "best_step": state.best_step, "held_out_loss": state.best_score,
            "final_step": state.step, "skipped_steps": state.skipped_steps}
    return save_optimizer(self.path / "optimizer", optimizer, state.best_theta, info)


def _is_key(leaf) -> bool:
  return jax.dtypes.issubdtype(getattr(leaf, "dtype", None), jax.dtypes.prng_key)


def _storable(leaf) -> np.ndarray:
  """A leaf as a numpy array: typed PRNG keys (in estimator states) as their key data."""
  return np.asarray(jax.random.key_data(leaf) if _is_key(leaf) else leaf)


def _state_from_checkpoint(path: Path, template: TrainState, *, with_estimator: bool = True) -> TrainState:
  """A TrainState from one checkpoint file, every tensor checked against ``template`` (names, shapes, dtypes); without
  the estimator's state (a meta checkpoint), the template's."""
  tensors, meta = read_tensors(path)
  theta = _restore_tree(tensors, "theta", template.theta, path)
  best = _restore_tree(tensors, "best_theta", template.theta, path)
  leaves, treedef = jax.tree.flatten(template.outer_state)
  restored = _matching(tensors, "outer_state", {f"{i:04d}": leaf for i, leaf in enumerate(leaves)}, path)
  outer_state = jax.tree.unflatten(treedef, [restored[f"{i:04d}"] for i in range(len(leaves))])
  estimator_state = (_restore_tree(tensors, "estimator_state", template.estimator_state, path) if with_estimator
                     else template.estimator_state)
  try:
    return TrainState(int(meta["step"]), theta, outer_state, best, float(meta["best_score"]), int(meta["best_step"]),
                      int(meta["skipped_steps"]), int(meta["dropped_problems"]), estimator_state)
  except KeyError as e:
    raise CheckpointError(f"{path}: metadata field {e} missing") from None


def _restore_tree(tensors: dict, prefix: str, template, path: Path):
  """The pytree shaped like ``template`` from ``tensors[prefix/key path]`` (PRNG keys rewrapped)."""
  flat = flatten_by_path(template)
  # Checkpoints written by lopt 0.2-0.4 hold the hierarchical optimizer's states one tensor at a time.
  storable = {name: _storable(leaf) for name, leaf in flat.items()}
  tensors = upgrade_legacy_states(tensors, {f"{prefix}/{name}": np.shape(x) for name, x in storable.items()})
  found = _matching(tensors, prefix, storable, path)
  restored = [jax.random.wrap_key_data(found[name], impl=jax.random.key_impl(leaf)) if _is_key(leaf) else found[name]
              for name, leaf in flat.items()]
  return jax.tree.unflatten(jax.tree.structure(template), restored)


def _matching(tensors: dict, prefix: str, template: dict, path: Path) -> dict:
  """``tensors[prefix/name]`` for every name of ``template``, as jax arrays, with the template's shape and dtype."""
  out = {}
  for name, like in template.items():
    key = f"{prefix}/{name}"
    if key not in tensors:
      raise CheckpointError(f"{path}: tensor {key!r} missing")
    found, like = tensors[key], np.asarray(like)
    if like.shape == () and found.shape == (1,):
      found = found.reshape(())  # checkpoints written before lopt kept scalars scalar stored them as shape (1,)
    if found.shape != like.shape or found.dtype != like.dtype:
      raise CheckpointError(f"{path}: tensor {key!r} is {found.dtype}{list(found.shape)}, expected "
                            f"{like.dtype}{list(like.shape)}")
    out[name] = jax.numpy.asarray(found)
  return out
