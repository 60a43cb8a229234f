"""Corrupted and hostile files: every one is refused with an error naming the file and what was expected vs found.

Trained optimizers are files people pass to each other. Each case below mutates a valid optimizer directory (or run
config, or checkpoint) and checks `lopt.load_optimizer` and `lopt compare DIR`: a CheckpointError / exit 2 with a
precise message, never a traceback; nothing is unpickled; memory stays bounded.
"""

import hashlib
import json
import pickle
import struct
import tracemalloc

import jax
import numpy as np
import pytest

import lopt
import lopt.cli
from lopt.checkpoint import MAX_HEADER_BYTES, MAX_JSON_BYTES, CheckpointError, save_optimizer, tensors_to_bytes
from lopt.meta.config import MetaTrainConfig
from lopt.meta.run import RunDirectory, RunError
from lopt.meta.train import TrainState, optimizer_from, outer_optimizer_from
from lopt.optimizers import GRUOptimizer

CONFIG = MetaTrainConfig(hidden_size=4, horizon=10, meta_batch_size=4, num_steps=6, checkpoint_every=3)
OPTIMIZER = GRUOptimizer(4)


@pytest.fixture(autouse=True)
def no_unpickling(monkeypatch):
  """Any attempt to unpickle fails the test: a hostile file must never reach pickle."""
  def refuse(*args, **kwargs):
    raise AssertionError("something tried to unpickle")
  monkeypatch.setattr(pickle, "loads", refuse)
  monkeypatch.setattr(pickle, "load", refuse)
  monkeypatch.setattr(pickle, "Unpickler", refuse)


@pytest.fixture
def run_dir(tmp_path, monkeypatch):
  """A run directory with a valid run config and trained optimizer; `lopt compare` stops before the real work."""
  (tmp_path / "config.json").write_text(json.dumps(CONFIG.to_dict()))
  theta = {k: np.asarray(v) for k, v in OPTIMIZER.init(jax.random.key(0)).items()}
  save_optimizer(tmp_path / "optimizer", OPTIMIZER, theta)
  monkeypatch.setattr(lopt.cli, "_compare", lambda *args: {"compared": True})
  return tmp_path


def weights(run_dir):
  return run_dir / "optimizer" / "weights.safetensors"


def optimizer_config(run_dir):
  return run_dir / "optimizer" / "config.json"


def refresh_checksum(run_dir):
  """What an adversary who knows the format does: make config.json's checksum match the altered weights."""
  config = json.loads(optimizer_config(run_dir).read_text())
  config["weights_sha256"] = hashlib.sha256(weights(run_dir).read_bytes()).hexdigest()
  optimizer_config(run_dir).write_text(json.dumps(config))


def edit_optimizer_config(run_dir, change):
  config = json.loads(optimizer_config(run_dir).read_text())
  change(config)
  optimizer_config(run_dir).write_text(json.dumps(config))


def replace_tensors(run_dir, change):
  theta = {k: np.array(v) for k, v in OPTIMIZER.init(jax.random.key(0)).items()}
  change(theta)
  weights(run_dir).write_bytes(tensors_to_bytes(theta))
  refresh_checksum(run_dir)


def assert_refused(run_dir, capsys, *fragments, path=None):
  """load_optimizer raises CheckpointError and `lopt compare` exits 2, both with a message naming the file and
  containing every fragment; no traceback."""
  path = path or weights(run_dir)
  with pytest.raises(CheckpointError) as error:
    lopt.load_optimizer(run_dir)
  message = str(error.value)
  assert str(path) in message, message
  for fragment in fragments:
    assert fragment in message, message
  capsys.readouterr()
  assert lopt.cli.main(["compare", str(run_dir)]) == 2
  err = capsys.readouterr().err
  assert "Traceback" not in err and str(path) in err and err.count("\n") == 1, err
  return message


def test_valid_directory_loads_and_compares(run_dir, capsys):
  optimizer, theta, _ = lopt.load_optimizer(run_dir)
  assert optimizer == OPTIMIZER and sorted(theta) == sorted(OPTIMIZER.param_shapes())
  assert lopt.cli.main(["compare", str(run_dir)]) == 0


@pytest.mark.parametrize("keep", [0, 4, 8, 20, 100, -200, -1])
def test_truncated_weights(run_dir, capsys, keep):
  data = weights(run_dir).read_bytes()
  weights(run_dir).write_bytes(data[:keep])
  assert_refused(run_dir, capsys)


@pytest.mark.parametrize("keep", [0, 4, 8, 20, 100, -200, -1])
def test_truncated_weights_with_matching_checksum(run_dir, capsys, keep):
  data = weights(run_dir).read_bytes()
  weights(run_dir).write_bytes(data[:keep])
  refresh_checksum(run_dir)
  assert_refused(run_dir, capsys)


def test_every_flipped_byte_is_refused(run_dir):
  """Flip each byte of the weights in turn (a few hundred cases): the checksum catches every one."""
  data = weights(run_dir).read_bytes()
  for position in range(len(data)):
    flipped = bytearray(data)
    flipped[position] ^= 0xFF
    weights(run_dir).write_bytes(bytes(flipped))
    with pytest.raises(CheckpointError, match="checksum mismatch|header|tensor|safetensors"):
      lopt.load_optimizer(run_dir)


def test_flipped_bytes_with_matching_checksum_never_crash(run_dir):
  """With the checksum forged, a flip in the header is refused by the header checks; a flip in the data either
  makes another finite float (loaded, right shapes) or a NaN/inf (refused). Never anything but CheckpointError."""
  data = weights(run_dir).read_bytes()
  header_end = 8 + struct.unpack("<Q", data[:8])[0]
  outcomes = {"refused": 0, "loaded": 0}
  for position in range(len(data)):
    flipped = bytearray(data)
    flipped[position] ^= 0x5A
    weights(run_dir).write_bytes(bytes(flipped))
    refresh_checksum(run_dir)
    try:
      _, theta, _ = lopt.load_optimizer(run_dir)
    except CheckpointError:
      outcomes["refused"] += 1
      continue
    outcomes["loaded"] += 1
    assert position >= header_end or data[position:position + 1] in b" ", position  # only data or whitespace
    assert all(np.all(np.isfinite(v)) for v in theta.values())
  assert outcomes["refused"] > 0


@pytest.mark.parametrize("dtype,found", [(np.float16, "F16"), (np.int32, "I32"), (np.uint8, "U8")])
def test_wrong_dtype(run_dir, capsys, dtype, found):
  replace_tensors(run_dir, lambda theta: theta.update(bias=theta["bias"].astype(dtype)))
  assert_refused(run_dir, capsys, "'bias'", f"dtype {found}", "expected float32 or float64")


def test_wrong_shape(run_dir, capsys):
  replace_tensors(run_dir, lambda theta: theta.update(readout_weights=np.zeros((4, 2), np.float32)))
  assert_refused(run_dir, capsys, "'readout_weights'", "shape (4, 2)", "expected (4, 1)")


def test_missing_tensor(run_dir, capsys):
  replace_tensors(run_dir, lambda theta: theta.pop("initial_state"))
  assert_refused(run_dir, capsys, "missing ['initial_state']")


def test_extra_tensor(run_dir, capsys):
  replace_tensors(run_dir, lambda theta: theta.update(payload=np.zeros(3, np.float32)))
  assert_refused(run_dir, capsys, "unexpected ['payload']")


def test_non_finite_weights(run_dir, capsys):
  replace_tensors(run_dir, lambda theta: theta["bias"].__setitem__(0, np.nan))
  assert_refused(run_dir, capsys, "'bias'", "non-finite")


@pytest.mark.parametrize("fields,fragments", [
    ({"hidden_size": 8}, ["'input_weights'", "shape (1, 12)", "expected (1, 24)"]),  # weights of a smaller GRU
    ({"input_encoding": "log1p_sign"}, ["'input_weights'", "shape (1, 12)", "expected (2, 12)"]),
])
def test_different_architecture(run_dir, capsys, fields, fragments):
  edit_optimizer_config(run_dir, lambda config: config["optimizer"].update(fields))
  assert_refused(run_dir, capsys, *fragments)


@pytest.mark.parametrize("change,fragments", [
    (lambda c: c["optimizer"].update(architecture="lstm"), ["field 'optimizer.architecture'", "'lstm'"]),
    (lambda c: c["optimizer"].update(hidden_size="abc"), ["optimizer.hidden_size", "'abc'"]),
    (lambda c: c["optimizer"].update(hidden_size=10**12), ["optimizer.hidden_size", str(10**12)]),
    (lambda c: c["optimizer"].update(hidden_size=True), ["optimizer.hidden_size", "True"]),
    (lambda c: c["optimizer"].update(input_scale="1"), ["optimizer.input_scale", "'1'"]),
    (lambda c: c["optimizer"].update(payload="os.system('x')"), ["field 'optimizer'", "payload"]),
    (lambda c: c.update(optimizer=[1, 2]), ["field 'optimizer' must be an object", "list"]),
    (lambda c: c.update(format="pickle"), ["field 'format'", "'pickle'"]),
    (lambda c: c.update(format_version=99), ["field 'format_version'", "found 99"]),
])
def test_hostile_optimizer_config_fields(run_dir, capsys, change, fragments):
  edit_optimizer_config(run_dir, change)
  assert_refused(run_dir, capsys, *fragments, path=optimizer_config(run_dir))


def test_nan_in_optimizer_config(run_dir, capsys):
  text = optimizer_config(run_dir).read_text().replace('"output_scale": 1.0', '"output_scale": NaN')
  optimizer_config(run_dir).write_text(text)
  assert_refused(run_dir, capsys, "optimizer.output_scale", "nan", path=optimizer_config(run_dir))


@pytest.mark.parametrize("text", ["", "{", "[]", "null", "\x00\xff\xfe", "[" * 100_000 + "]" * 100_000,
                                  '{"a":' * 50_000 + "1" + "}" * 50_000, '{"format_version": ' + "9" * 5000 + "}"])
def test_unreadable_optimizer_config(run_dir, capsys, text):
  optimizer_config(run_dir).write_bytes(text.encode("latin-1"))
  assert_refused(run_dir, capsys, path=optimizer_config(run_dir))


def test_oversized_json_is_refused_unparsed(run_dir, capsys, monkeypatch):
  optimizer_config(run_dir).write_bytes(b" " * (MAX_JSON_BYTES + 1))
  real_loads = json.loads

  def guarded_loads(text, *args, **kwargs):
    assert len(text) <= MAX_JSON_BYTES, "parsed an oversized file"
    return real_loads(text, *args, **kwargs)
  monkeypatch.setattr(json, "loads", guarded_loads)
  assert_refused(run_dir, capsys, "more than the", path=optimizer_config(run_dir))


def _write_raw_safetensors(path, header: bytes, data: bytes = b"") -> None:
  path.write_bytes(struct.pack("<Q", len(header)) + header + data)


@pytest.mark.parametrize("claimed", [MAX_HEADER_BYTES + 1, 2**40, 2**64 - 1])
def test_huge_header_size_is_refused_before_reading(run_dir, capsys, claimed):
  weights(run_dir).write_bytes(struct.pack("<Q", claimed) + b"{}")
  refresh_checksum(run_dir)
  assert_refused(run_dir, capsys, f"header claims {claimed} bytes")


def test_deeply_nested_header(run_dir, capsys):
  _write_raw_safetensors(weights(run_dir), b'{"a":' + b"[" * 200_000 + b"]" * 200_000 + b"}")
  refresh_checksum(run_dir)
  assert_refused(run_dir, capsys, "header")


@pytest.mark.parametrize("header", [
    b"[]", b'{"bias": 5}', b'{"bias": {"dtype": "F32", "shape": [12], "data_offsets": [0, 10**20]}}',
    b'{"bias": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 0]}}',
    b'{"bias": {"dtype": "OBJECT", "shape": [1], "data_offsets": [0, 8]}}',
    b'{"bias": {"dtype": "F32", "shape": [1000000000000], "data_offsets": [0, 48]}}',
    b'{"__metadata__": {"a": [1]}}',
])
def test_hostile_header_entries(run_dir, capsys, header):
  _write_raw_safetensors(weights(run_dir), header, b"\x00" * 48)
  refresh_checksum(run_dir)
  assert_refused(run_dir, capsys)


def test_memory_stays_bounded_for_a_huge_declared_tensor(run_dir):
  """A header that declares a 4 TB tensor is refused from the header alone: peak memory stays small."""
  header = json.dumps({"bias": {"dtype": "F32", "shape": [10**12], "data_offsets": [0, 4 * 10**12]}}).encode()
  _write_raw_safetensors(weights(run_dir), header, b"\x00" * 64)
  refresh_checksum(run_dir)
  tracemalloc.start()
  with pytest.raises(CheckpointError, match="byte range"):
    lopt.load_optimizer(run_dir)
  _, peak = tracemalloc.get_traced_memory()
  tracemalloc.stop()
  assert peak < 5 * 2**20


def test_a_pickle_file_in_place_of_the_weights(run_dir, capsys):
  weights(run_dir).write_bytes(b"\x80\x04\x95" + b"cos\nsystem\n(S'echo pwned'\ntR." + b"\x00" * 64)
  refresh_checksum(run_dir)
  assert_refused(run_dir, capsys)


@pytest.mark.parametrize("text,fragments", [
    ("", ["not valid JSON"]), ('{"hidden_size": 4', ["not valid JSON"]), ("[" * 100_000, ["not valid JSON"]),
    ('{"hidden_size": "abc"}', ["field 'hidden_size'", "an integer in [1, 65536]", "'abc'"]),
    ('{"meta_batch_size": -4}', ["field 'meta_batch_size'", "-4"]),
    ('{"learning_rate": NaN}', ["field 'learning_rate'", "nan"]),
    ('{"remat": "yes"}', ["field 'remat'", "'yes'"]),
    ('{"optimiser": "adam"}', ["unknown meta-training setting", "optimiser"]),
    ('"linear_regression"', ["expected a JSON object", "str"]),
    ('{"task": "nope"}', ["unknown task 'nope'"]),
    ('{"task_options": {"dim": 0}}', ["dim must be >= 1"]),
    ('{"task_options": {"dim": "abc"}}', ["linear_regression", "abc"]),
])
def test_hostile_run_config(run_dir, capsys, text, fragments):
  (run_dir / "config.json").write_text(text)
  capsys.readouterr()
  assert lopt.cli.main(["compare", str(run_dir)]) == 2
  err = capsys.readouterr().err
  assert "Traceback" not in err and err.count("\n") == 1, err
  for fragment in fragments:
    assert fragment in err, err


# -- training checkpoints ------------------------------------------------------------------------------------------

def _state(step: int) -> TrainState:
  optimizer, outer = optimizer_from(CONFIG), outer_optimizer_from(CONFIG)
  theta = optimizer.init(jax.random.key(step))
  return TrainState(step, theta, outer.init(theta), theta, 0.5, step)


def _run_with_checkpoints(tmp_path, steps=(3, 6)) -> RunDirectory:
  run = RunDirectory(tmp_path / "run")
  run.open(CONFIG, resume=False)
  for step in steps:
    run.checkpoint(_state(step))
  return run


def test_checkpoint_round_trip_keeps_every_tensor_and_scalar(tmp_path):
  run = _run_with_checkpoints(tmp_path)
  restored = run.restore(_state(0))
  original = _state(6)
  assert restored.step == 6
  for a, b in zip(jax.tree.leaves((restored.theta, restored.outer_state)),
                  jax.tree.leaves((original.theta, original.outer_state))):
    assert np.shape(a) == np.shape(b) and np.asarray(a).dtype == np.asarray(b).dtype
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_corrupt_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, capsys):
  run = _run_with_checkpoints(tmp_path)
  newest = run.checkpoints / "step_00000006.safetensors"
  newest.write_bytes(newest.read_bytes()[:-10])
  restored = run.restore(_state(0))
  assert restored.step == 3
  assert "skipping unreadable checkpoint" in capsys.readouterr().err


@pytest.mark.parametrize("damage", ["truncate", "architecture"])
def test_no_readable_checkpoint_is_an_error_not_a_silent_restart(tmp_path, damage):
  run = _run_with_checkpoints(tmp_path)
  for path in run.checkpoints.glob("step_*"):
    if damage == "truncate":
      path.write_bytes(path.read_bytes()[:100])
    else:  # a checkpoint of another architecture: hidden size 8 instead of 4
      theta = GRUOptimizer(8).init(jax.random.key(0))
      path.write_bytes(tensors_to_bytes({f"theta/{k}": np.asarray(v) for k, v in theta.items()},
                                        {"step": "3"}))
  with pytest.raises(RunError, match="no checkpoint is readable") as error:
    run.restore(_state(0))
  if damage == "architecture":
    assert "tensor 'theta/bias' is float32[24], expected float32[12]" in str(error.value)


def test_without_checkpoints_the_meta_checkpoint_resumes_with_fresh_estimator_state(tmp_path, capsys):
  """A run carried to another machine without checkpoints/ continues from meta_checkpoint.safetensors: the newest
  theta, best theta, outer state and counters exactly, the estimator's state made fresh for that step."""
  import shutil
  run = _run_with_checkpoints(tmp_path)
  shutil.rmtree(run.checkpoints)
  calls = []
  restored = run.restore(_state(0), lambda theta, step: calls.append(step) or {"fresh": np.float32(step)})
  original = _state(6)
  assert restored.step == 6 and restored.best_score == 0.5 and calls == [6]
  assert restored.estimator_state == {"fresh": np.float32(6)}
  for a, b in zip(jax.tree.leaves((restored.theta, restored.outer_state, restored.best_theta)),
                  jax.tree.leaves((original.theta, original.outer_state, original.best_theta)), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  err = capsys.readouterr().err
  assert "from meta_checkpoint.safetensors" in err and "start new episodes" in err, err


def test_a_damaged_meta_checkpoint_without_checkpoints_is_an_error(tmp_path):
  import shutil
  run = _run_with_checkpoints(tmp_path)
  shutil.rmtree(run.checkpoints)
  meta = run.path / "meta_checkpoint.safetensors"
  meta.write_bytes(meta.read_bytes()[:100])
  with pytest.raises(RunError, match="meta_checkpoint.safetensors: unreadable"):
    run.restore(_state(0))
