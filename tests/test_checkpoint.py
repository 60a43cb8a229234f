"""Trained-optimizer files: round trip, and precise errors for wrong, truncated or altered files."""

import json

import jax
import numpy as np
import pytest

import lopt
from lopt.checkpoint import CheckpointError, save_optimizer
from lopt.errors import UserError
from lopt.gru_spec import DEFAULTS, check_optimizer_fields
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
  with pytest.raises(CheckpointError,
                     match=r"config.json: field 'optimizer.architecture': unknown learned-optimizer architecture 'lstm'; known: gru, mlp"):
    lopt.load_optimizer(path)
  (path / "config.json").write_text("{not json")
  with pytest.raises(CheckpointError, match="config.json: optimizer config is not valid JSON"):
    lopt.load_optimizer(path)
  (path / "config.json").unlink()
  with pytest.raises(CheckpointError, match="config.json: optimizer config not found"):
    lopt.load_optimizer(path)


# -- one reader for JAX and PyTorch -------------------------------------------------------------------------------

def load_with_torch(path):
  torch_checkpoint = pytest.importorskip("lopt.torch.checkpoint")  # needs torch (the lopt[torch] extra)
  return torch_checkpoint.read_trained_optimizer(path)


@pytest.mark.parametrize("field, value, fragments", [
    ("input_scale", float("nan"), ["found nan"]),
    ("input_scale", float("inf"), ["found inf"]),
    ("input_scale", 10**400, ["found 1000"]),  # an integer no float holds
    ("output_scale", 0, ["found 0"]),
    ("output_scale", -1.5, ["found -1.5"]),
    ("hidden_size", 65537, ["an integer in [1, 65536]", "found 65537"]),
    ("input_encoding", "cube", ["one of ['scale', 'log1p_sign']", "found 'cube'"]),
    ("hidden_size", None, ["is missing"]),  # None: the field is removed
])
def test_jax_and_torch_refuse_a_bad_optimizer_field_alike(saved, field, value, fragments):
  path = saved[0]
  config = json.loads((path / "config.json").read_text())
  if value is None:
    del config["optimizer"][field]
  else:
    config["optimizer"][field] = value
  (path / "config.json").write_text(json.dumps(config))
  with pytest.raises(CheckpointError) as jax_error:
    lopt.load_optimizer(path)
  with pytest.raises(CheckpointError) as torch_error:
    load_with_torch(path)
  message = str(jax_error.value)
  assert isinstance(torch_error.value, UserError) and str(torch_error.value) == message
  assert message.startswith(f"{path / 'config.json'}: field 'optimizer.{field}'"), message
  for fragment in fragments:
    assert fragment in message, message


def test_weights_file_is_opened_once_per_load(saved, monkeypatch):
  """Header check, checksum and parse all come from one open and one read of weights.safetensors."""
  import builtins
  import io
  import os
  opened = []

  def spy(real):
    def open_and_count(file, *args, **kwargs):
      if str(file).endswith("weights.safetensors"):
        opened.append(file)
      return real(file, *args, **kwargs)
    return open_and_count
  path = saved[0]
  load_with_torch(path)  # imports lopt.torch before the spies are in place
  for module, name in [(builtins, "open"), (io, "open"), (os, "open")]:
    monkeypatch.setattr(module, name, spy(getattr(module, name)))
  lopt.load_optimizer(path)
  assert len(opened) == 1, opened
  load_with_torch(path)
  assert len(opened) == 2, opened


@pytest.mark.parametrize("encoding", ["scale", "log1p_sign"])
def test_gru_optimizer_and_file_spec_agree(encoding):
  optimizer = GRUOptimizer(hidden_size=5, input_encoding=encoding)
  spec = check_optimizer_fields(optimizer.config(), "test")
  assert spec.config() == optimizer.config() and spec.param_shapes() == optimizer.param_shapes()
  assert {k: v.shape for k, v in optimizer.init(jax.random.key(0)).items()} == optimizer.param_shapes()
  defaults = GRUOptimizer()
  assert {name: getattr(defaults, name) for name in DEFAULTS} == DEFAULTS
