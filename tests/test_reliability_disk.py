"""Disk problems: an unwritable or full output directory gives a clear error (exit 2, no traceback) and leaves the
checkpoints already written intact (issue 6). We run as root, so chmod cannot block writes: an unwritable directory
is a path under a regular file, and a full disk is os.replace / os.write raising ENOSPC."""

import errno
import os

import jax
import pytest

import lopt.cli
from lopt.checkpoint import WriteError, atomic_write_bytes
from lopt.meta.config import MetaTrainConfig
from lopt.meta.run import RunDirectory
from lopt.meta.train import TrainState, optimizer_from, outer_optimizer_from

CONFIG = MetaTrainConfig(hidden_size=4, horizon=10, meta_batch_size=4, num_steps=6, checkpoint_every=3)
TRAIN = ["train", "linear_regression", "--steps", "6", "--hidden-size", "4", "--horizon", "10", "--meta-batch-size",
         "4", "--checkpoint-every", "3", "--eval-every", "3"]


def _state(step):
  optimizer, outer = optimizer_from(CONFIG), outer_optimizer_from(CONFIG)
  theta = optimizer.init(jax.random.key(step))
  return TrainState(step, theta, outer.init(theta), theta, 0.5, step)


def _disk_full(monkeypatch, when=lambda path: True):
  real = os.replace

  def replace(src, dst, *args, **kwargs):
    if when(str(dst)):
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return real(src, dst, *args, **kwargs)
  monkeypatch.setattr(os, "replace", replace)


def test_full_disk_during_an_atomic_write_keeps_the_old_file(tmp_path, monkeypatch):
  target = tmp_path / "file.bin"
  target.write_bytes(b"old")
  _disk_full(monkeypatch)
  with pytest.raises(WriteError, match="No space left on device"):
    atomic_write_bytes(target, b"new")
  assert target.read_bytes() == b"old"
  assert sorted(p.name for p in tmp_path.iterdir()) == ["file.bin"]  # no temporary file left behind


def test_full_disk_during_a_checkpoint_keeps_earlier_checkpoints(tmp_path, monkeypatch):
  run = RunDirectory(tmp_path / "run")
  run.open(CONFIG, resume=False)
  run.checkpoint(_state(3))
  before = {p.name: p.read_bytes() for p in run.checkpoints.iterdir()}
  _disk_full(monkeypatch)
  with pytest.raises(WriteError) as error:
    run.checkpoint(_state(6))
  assert "earlier checkpoints" in str(error.value) and "--resume" in str(error.value)
  assert {p.name: p.read_bytes() for p in run.checkpoints.iterdir()} == before
  assert run.restore(_state(0)).step == 3


def test_output_under_a_file_is_a_clear_error(tmp_path, capsys):
  (tmp_path / "file").write_text("x")
  code = lopt.cli.main(TRAIN + ["--out", str(tmp_path / "file" / "run")])
  err = capsys.readouterr().err
  assert code == 2 and "Traceback" not in err and "cannot create the run directory" in err


def test_training_on_a_full_disk_exits_2_and_resumes_later(tmp_path, monkeypatch, capsys):
  """The disk fills after the first checkpoint: exit 2 with a message, checkpoint 3 intact, then --resume works."""
  out = tmp_path / "run"
  _disk_full(monkeypatch, when=lambda path: "step_00000006" in path)
  code = lopt.cli.main(TRAIN + ["--out", str(out)])
  err = capsys.readouterr().err
  assert code == 2 and "Traceback" not in err and "No space left on device" in err, err
  assert [p.name for p in (out / "checkpoints").iterdir()] == ["step_00000003.safetensors"]
  monkeypatch.undo()
  assert lopt.cli.main(TRAIN + ["--out", str(out), "--resume"]) == 0
  assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000003.safetensors",
                                                                     "step_00000006.safetensors"]
  lopt.load_optimizer(out)


def test_metrics_on_a_full_disk(tmp_path, monkeypatch):
  run = RunDirectory(tmp_path / "run")
  run.open(CONFIG, resume=False)
  real_open = open

  def full_open(path, mode="r", *args, **kwargs):
    if str(path).endswith("metrics.jsonl") and "a" in mode:
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    return real_open(path, mode, *args, **kwargs)
  monkeypatch.setattr("builtins.open", full_open)
  with pytest.raises(WriteError, match="metrics.jsonl: cannot append metrics"):
    run.log({"step": 1})
