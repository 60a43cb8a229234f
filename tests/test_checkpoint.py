"""Trained-optimizer files: round trip, and precise errors for wrong, truncated or altered files."""

import json

import jax
import numpy as np
import pytest

import lopt
from lopt.checkpoint import CheckpointError, save_optimizer
from lopt.optimizers import GRUOptimizer


@pytest.fixture
def saved(tmp_path):
  optimizer = GRUOptimizer(hidden_size=6, input_scale=0.1, output_scale=10.0)
  theta = optimizer.init(jax.random.key(0))
  path = save_optimizer(tmp_path / "opt", optimizer, theta, {"note": "test"})
  return path, optimizer, theta


def test_round_trip(saved):
  path, optimizer, theta = saved
  loaded, loaded_theta, config = lopt.load_optimizer(path)
  assert loaded == optimizer and config["info"] == {"note": "test"}
  for name in theta:
    np.testing.assert_array_equal(loaded_theta[name], np.asarray(theta[name]))


def test_flipped_byte_is_detected(saved):
  path = saved[0]
  weights = path / "weights.safetensors"
  raw = bytearray(weights.read_bytes())
  raw[-5] ^= 0xFF
  weights.write_bytes(bytes(raw))
  with pytest.raises(CheckpointError, match=r"weights.safetensors: checksum mismatch \(file is truncated or altered\)"):
    lopt.load_optimizer(path)


def test_truncated_file_is_detected(saved):
  path = saved[0]
  weights = path / "weights.safetensors"
  weights.write_bytes(weights.read_bytes()[:100])
  with pytest.raises(CheckpointError, match=r"weights.safetensors: .*truncated"):
    lopt.load_optimizer(path)


def test_wrong_shape_with_matching_checksum_is_detected(saved, tmp_path):
  path, optimizer, theta = saved
  wrong = GRUOptimizer(hidden_size=7, input_scale=0.1, output_scale=10.0)
  save_optimizer(tmp_path / "other", wrong, wrong.init(jax.random.key(0)))
  config = json.loads((path / "config.json").read_text())
  (path / "weights.safetensors").write_bytes((tmp_path / "other" / "weights.safetensors").read_bytes())
  config["weights_sha256"] = json.loads((tmp_path / "other" / "config.json").read_text())["weights_sha256"]
  (path / "config.json").write_text(json.dumps(config))
  with pytest.raises(CheckpointError, match=r"weights.safetensors: tensor '\w+' has shape \((1, )?21,?\), expected \((1, )?18,?\)"):
    lopt.load_optimizer(path)


def test_missing_files_and_bad_config(saved, tmp_path):
  path = saved[0]
  with pytest.raises(CheckpointError, match="nowhere: not a directory"):
    lopt.load_optimizer(tmp_path / "nowhere")
  config = json.loads((path / "config.json").read_text())
  config["optimizer"]["architecture"] = "lstm"
  (path / "config.json").write_text(json.dumps(config))
  with pytest.raises(CheckpointError, match="config.json: field 'optimizer' does not describe a known optimizer"):
    lopt.load_optimizer(path)
  (path / "config.json").write_text("{not json")
  with pytest.raises(CheckpointError, match="config.json: optimizer config is not valid JSON"):
    lopt.load_optimizer(path)
  (path / "config.json").unlink()
  with pytest.raises(CheckpointError, match="config.json: optimizer config not found"):
    lopt.load_optimizer(path)
