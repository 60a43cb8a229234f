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
                     match=r"config.json: field 'optimizer.architecture': unknown learned-optimizer architecture 'lstm'; known: gru, hierarchical, mlp"):
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


# -- format 2: a nested theta (the mlp architecture) under the same guarantees ------------------------------------

@pytest.fixture
def saved_mlp(tmp_path):
  from lopt.architectures.mlp.optimizer import MLPOptimizer
  optimizer = MLPOptimizer(hidden_size=5, num_layers=1)
  theta = optimizer.init(jax.random.key(0))
  return save_optimizer(tmp_path / "mlp", optimizer, theta), optimizer, theta


def test_format_2_stores_theta_by_key_path_and_round_trips(saved_mlp):
  path, optimizer, theta = saved_mlp
  config = json.loads((path / "config.json").read_text())
  assert config["format_version"] == 2 and config["optimizer"]["architecture"] == "mlp"
  assert sorted(config["tensors"]) == ["layers/0/b", "layers/0/w", "layers/1/b", "layers/1/w"]
  loaded, loaded_theta, _ = lopt.load_optimizer(path)
  assert loaded == optimizer
  assert jax.tree.structure(loaded_theta) == jax.tree.structure(theta)
  for a, b in zip(jax.tree.leaves(theta), jax.tree.leaves(loaded_theta)):
    np.testing.assert_array_equal(np.asarray(a), b)


@pytest.mark.parametrize("edit, fragment", [
    (lambda c: c["optimizer"].pop("rms_decay"), "field 'optimizer.rms_decay' is missing"),
    (lambda c: c["optimizer"].update(color="red"), "field 'optimizer' has unknown entries ['color']"),
    (lambda c: c["optimizer"].update(momentum_decays=[1.5]), "field 'optimizer.momentum_decays' must be a list"),
    (lambda c: c["optimizer"].update(momentum_decays="0.9"), "field 'optimizer.momentum_decays' must be a list"),
    (lambda c: c["optimizer"].update(momentum_decays=[0.5] * 100), "field 'optimizer.momentum_decays' must be"),
    (lambda c: c["optimizer"].update(num_layers=True), "field 'optimizer.num_layers' must be an integer"),
    (lambda c: c["optimizer"].update(hidden_size=10**12), "field 'optimizer.hidden_size' must be an integer in"),
    (lambda c: c["optimizer"].update(step_scale=float("nan")), "field 'optimizer.step_scale' must be a positive"),
    (lambda c: c["optimizer"].update(hidden_size=6), "tensor 'layers/0/w' has shape (18, 5), expected (18, 6)"),
    (lambda c: c.update(format_version=3), "field 'format_version' must be one of [1, 2]"),
    (lambda c: c.update(format_version=1), "must be 'gru' (the only architecture of format_version 1)"),
    (lambda c: c["optimizer"].update(architecture=["mlp"]), "unknown learned-optimizer architecture ['mlp']"),
])
def test_format_2_hostile_config_fields_are_refused_alike_by_jax_and_torch(saved_mlp, edit, fragment):
  path = saved_mlp[0]
  config = json.loads((path / "config.json").read_text())
  edit(config)
  (path / "config.json").write_text(json.dumps(config))
  with pytest.raises(CheckpointError) as jax_error:
    lopt.load_optimizer(path)
  with pytest.raises(CheckpointError) as torch_error:
    load_with_torch(path)
  assert fragment in str(jax_error.value) and str(torch_error.value) == str(jax_error.value)
  assert str(jax_error.value).startswith(str(path)), str(jax_error.value)


def test_format_2_weights_of_another_architecture_are_refused_from_the_header(saved_mlp, saved):
  mlp_path, gru_path = saved_mlp[0], saved[0]
  config = json.loads((mlp_path / "config.json").read_text())
  (mlp_path / "weights.safetensors").write_bytes((gru_path / "weights.safetensors").read_bytes())
  config["weights_sha256"] = json.loads((gru_path / "config.json").read_text())["weights_sha256"]
  (mlp_path / "config.json").write_text(json.dumps(config))
  with pytest.raises(CheckpointError, match=r"missing \['layers/0/b'.*unexpected \['bias'"):
    lopt.load_optimizer(mlp_path)


def test_printing_a_loaded_optimizer_shows_no_weights(saved):
  text = repr(lopt.load(saved[0]))
  assert "GRUOptimizer(hidden_size=6" in text and "meta-parameters" in text and "Array" not in text
  assert len(text) < 300
