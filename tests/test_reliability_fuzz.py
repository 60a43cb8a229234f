"""Fuzzed command lines and config files: every invalid input gets a one-paragraph message and exit code 2, never a
traceback; every valid one is accepted (issue 6).

The commands run in-process through `lopt.cli.main` with the real work (training, comparing) replaced by a recorder,
so these tests cover parsing and validation. Validity is decided by an oracle written here from the documented
rules, independently of the code under test.
"""

import json
import math

import jax
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lopt.cli
from lopt.checkpoint import save_optimizer
from lopt.meta.config import LEGACY_FIELDS, MetaTrainConfig
from lopt.optimizers import GRUOptimizer

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))


# -- the oracle: what each option accepts -------------------------------------------------------------------------

def _as_int(text):
  try:
    return int(text)
  except ValueError:
    return None


def _as_float(text):
  try:
    return float(text)
  except ValueError:
    return None


def positive_int(text):
  value = _as_int(text)
  return value is not None and value >= 1


def positive_float(text):
  value = _as_float(text)
  return value is not None and math.isfinite(value) and value > 0


def nonnegative_float(text):
  value = _as_float(text)
  return value is not None and math.isfinite(value) and value >= 0


OPTIONS = {
    "--steps": positive_int, "--meta-batch-size": lambda t: positive_int(t) and int(t) <= 2**24,
    "--horizon": positive_int,
    "--hidden-size": lambda t: positive_int(t) and int(t) <= 65536,
    "--input-scale": positive_float, "--output-scale": positive_float,
    "--input-encoding": lambda t: t in ("scale", "log1p_sign"),
    "--learning-rate": positive_float, "--decay-rate": positive_float, "--decay-steps": positive_int,
    "--clip-value": positive_float, "--l2-penalty": nonnegative_float,
    "--meta-loss": lambda t: t in ("mean", "log_mean"), "--loss-cap": positive_float,
    "--seed": lambda t: _as_int(t) is not None and -2**31 <= int(t) < 2**31,
    "--eval-every": positive_int, "--checkpoint-every": positive_int,
}

VALUE_TEXT = st.one_of(
    st.integers(-2**40, 2**40).map(str), st.integers(1, 500).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr), st.floats(1e-6, 1e3).map(repr),
    st.sampled_from(["", " ", "abc", "1.5", "1e400", "-0", "0x10", "nan", "-inf", "scale", "log1p_sign", "mean",
                     "log_mean", "1_000", "\x00", "0" * 50, "\u0661\u0662", "[1]", "{}", "None", "true"]),
    st.text(max_size=12))


@pytest.fixture
def recorded(monkeypatch):
  """Replaces the real work of `train` and `compare` with a recorder of what they were given."""
  calls = []
  monkeypatch.setattr(lopt.cli, "_train", lambda config, out, resume: calls.append(("train", config)))
  monkeypatch.setattr(lopt.cli, "_compare", lambda run_dir, task, optimizer, theta, args: calls.append(
      ("compare", task)))
  return calls


def run_cli(argv, capsys):
  """(exit code, stderr) of `lopt ARGV`, whether it returns or argparse exits."""
  capsys.readouterr()
  try:
    code = lopt.cli.main(argv)
  except SystemExit as e:
    code = e.code
  return code, capsys.readouterr().err


def assert_clear_error(code, err):
  assert code == 2, err
  assert "Traceback" not in err, err
  assert "\n\n" not in err.strip(), err  # one paragraph (argparse adds its one-line usage before the message)
  assert "error:" in err, err


# -- command-line options -----------------------------------------------------------------------------------------

@FUZZ
@given(values=st.dictionaries(st.sampled_from(sorted(OPTIONS)), VALUE_TEXT, min_size=1, max_size=4))
def test_train_options(values, tmp_path_factory, capsys, recorded):
  out = tmp_path_factory.mktemp("run")
  argv = ["train", "linear_regression", "--out", str(out / "run")] + [f"{k}={v}" for k, v in values.items()]
  valid = all(OPTIONS[flag](text) for flag, text in values.items())
  recorded.clear()
  code, err = run_cli(argv, capsys)
  if valid:
    assert code == 0 and len(recorded) == 1, err
  else:
    assert_clear_error(code, err)
    assert not recorded


def _valid_eigenvalue_range(options):
  low, high = options.get("log10_min_eig", -3.0), options.get("log10_max_eig", 0.0)
  return low <= high


TASK_OPTION_VALUES = st.one_of(st.integers(-3, 30), st.floats(-5, 2), st.text(max_size=5), st.none(),
                               st.lists(st.integers(), max_size=2), st.booleans())


@FUZZ
@given(options=st.dictionaries(st.sampled_from(["dim", "log10_min_eig", "log10_max_eig", "horizon", "size"]),
                               TASK_OPTION_VALUES, max_size=3))
def test_task_options_never_crash(options, tmp_path_factory, capsys, recorded):
  """Any KEY=VALUE: either accepted (and the task builds) or exit 2 with a message; never a traceback."""
  out = tmp_path_factory.mktemp("run")
  argv = ["train", "linear_regression", "--out", str(out / "run")]
  for key, value in options.items():
    argv += ["--task-option", f"{key}={json.dumps(value)}"]
  code, err = run_cli(argv, capsys)
  assert code in (0, 2) and "Traceback" not in err, err
  if code == 2:
    assert_clear_error(code, err)
  clean = (set(options) <= {"dim", "log10_min_eig", "log10_max_eig", "horizon"}
           and all(type(options.get(k, 1)) is int and options.get(k, 1) >= 1 for k in ("dim", "horizon"))
           and all(type(options.get(k, 0.0)) in (int, float) for k in ("log10_min_eig", "log10_max_eig"))
           and _valid_eigenvalue_range(options))
  if clean:
    assert code == 0, err


@pytest.mark.parametrize("argv", [
    [], ["nope"], ["train"], ["train", "nope", "--out", "x"], ["train", "linear_regression"],
    ["train", "linear_regression", "--out", ""], ["train", "linear_regression", "--out", "a\x00b"],
    ["train", "linear_regression", "--out", "x", "--task-option", "novalue"],
    ["train", "linear_regression", "--out", "x", "--preset", "huge"],
    ["compare"], ["compare", "/nonexistent/run"], ["compare", "x", "--eval-problems", "0"],
    ["demo", "--steps", "-1"],
])
def test_malformed_command_lines(argv, capsys, recorded):
  code, err = run_cli(argv, capsys)
  assert_clear_error(code, err)


# -- run config files (`lopt train --resume`, `lopt compare`) -----------------------------------------------------

FIELD_ORACLE = {
    "hidden_size": lambda v: type(v) is int and 1 <= v <= 65536,
    "meta_batch_size": lambda v: type(v) is int and 1 <= v <= 2**24,
    "num_steps": lambda v: type(v) is int and v >= 1,
    "horizon": lambda v: v is None or (type(v) is int and v >= 1),
    "learning_rate": lambda v: type(v) in (int, float) and math.isfinite(float(v)) and v > 0,
    "b1": lambda v: type(v) in (int, float) and 0 <= v < 1,
    "l2_penalty": lambda v: type(v) in (int, float) and math.isfinite(float(v)) and v >= 0,
    "remat": lambda v: type(v) is bool,
    "input_encoding": lambda v: v in ("scale", "log1p_sign"),
    "seed": lambda v: type(v) is int and -2**31 <= v < 2**31,
}
JSON_VALUES = st.one_of(st.integers(-10, 10), st.integers(-2**70, 2**70), st.floats(allow_nan=False), st.booleans(),
                        st.none(), st.text(max_size=6), st.lists(st.integers(), max_size=2),
                        st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
                        st.sampled_from(["scale", "log1p_sign", 0.5, 1e-3, 4]))


@pytest.fixture(scope="module")
def optimizer_dir(tmp_path_factory):
  directory = tmp_path_factory.mktemp("optimizer")
  optimizer = GRUOptimizer(4)
  save_optimizer(directory, optimizer, {k: np.asarray(v) for k, v in optimizer.init(jax.random.key(0)).items()})
  return directory


def _run_directory(tmp_path_factory, optimizer_dir, config: dict, text: str | None = None):
  run_dir = tmp_path_factory.mktemp("run")
  (run_dir / "config.json").write_text(text if text is not None else json.dumps(config))
  (run_dir / "optimizer").mkdir()
  for name in ("config.json", "weights.safetensors"):
    (run_dir / "optimizer" / name).write_bytes((optimizer_dir / name).read_bytes())
  return run_dir


@FUZZ
@given(changes=st.dictionaries(st.sampled_from(sorted(FIELD_ORACLE)), JSON_VALUES, min_size=1, max_size=3),
       unknown=st.booleans())
def test_run_config_files(changes, unknown, tmp_path_factory, optimizer_dir, capsys, recorded):
  # lopt 0.1's flat run config (still read, and upgraded to sections on resume), with fuzzed fields.
  base = MetaTrainConfig(hidden_size=4, horizon=10)
  config = {**{name: getattr(base, name) for name in LEGACY_FIELDS}, "task": base.task.name, **changes}
  if unknown:
    config["not_a_setting"] = 1
  run_dir = _run_directory(tmp_path_factory, optimizer_dir, config)
  valid = not unknown and all(FIELD_ORACLE[name](value) for name, value in changes.items())
  for argv in (["compare", str(run_dir)], ["train", "linear_regression", "--resume", "--out", str(run_dir)]):
    recorded.clear()
    code, err = run_cli(argv, capsys)
    if valid:
      assert code == 0 and len(recorded) == 1, (argv, err)
    else:
      assert_clear_error(code, err)
      assert str(run_dir / "config.json") in err
      bad = ["not_a_setting"] if unknown else [n for n, v in changes.items() if not FIELD_ORACLE[n](v)]
      assert any(f"'{name}'" in err for name in bad), err  # the message names a field that is wrong


@FUZZ
@given(text=st.one_of(st.text(max_size=40), st.binary(max_size=40).map(lambda b: b.decode("latin-1")),
                      st.sampled_from(["[" * 5000, "{" * 5000, '{"a":' * 3000 + "1" + "}" * 3000, "null", "[]",
                                       "1e999", '{"hidden_size": 1e999}'])))
def test_garbage_run_config_text(text, tmp_path_factory, optimizer_dir, capsys, recorded):
  run_dir = _run_directory(tmp_path_factory, optimizer_dir, {}, text=text)
  try:
    valid = isinstance(json.loads(text), dict) and not json.loads(text)  # "{}": all defaults, valid
  except (ValueError, RecursionError):
    valid = False
  for argv in (["compare", str(run_dir)], ["train", "linear_regression", "--resume", "--out", str(run_dir)]):
    code, err = run_cli(argv, capsys)
    if valid:
      assert code == 0, err
    else:
      assert_clear_error(code, err)
      assert str(run_dir / "config.json") in err, err
