"""Meta-training sharded over devices and processes (lopt.meta.sharding): the same theta, to float tolerance, on 1
and 2 host-platform devices, across a resume that changes the device count, and in two ``jax.distributed``
processes; clear errors for counts that cannot work. The multi-device runs happen in subprocesses
(tests/sharding_scenarios.py): the device count is fixed when JAX starts."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lopt.cli import main
from lopt.meta import sharding

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from sharding_scenarios import ARGS, LINEAR  # noqa: E402

CLI = [sys.executable, "-c", "import sys; from lopt.cli import main; sys.exit(main())"]
# Float tolerance: sharded means add the per-device partial sums in another order.
TOLERANCE = {"rtol": 1e-4, "atol": 1e-6}


def environment(cache: Path, devices: int = 1) -> dict:
  """A child's environment: CPU, ``devices`` host devices, and a compilation cache shared by this module's children
  (the runs compile the same steps; the cache changes no number)."""
  flags = os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={devices}"
  return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=flags.strip(), JAX_COMPILATION_CACHE_DIR=str(cache),
              JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
              PYTHONPATH=os.pathsep.join(filter(None, [str(HERE.parent / "src"), os.environ.get("PYTHONPATH")])))


def run_scenarios(out: Path, cache: Path, *extra) -> dict:
  done = subprocess.run([sys.executable, str(HERE / "sharding_scenarios.py"), str(out), *extra], capture_output=True,
                        text=True, timeout=900, env=environment(cache, devices=2))
  assert done.returncode == 0, done.stderr[-4000:]
  return json.loads((out / "results.json").read_text())


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
  return tmp_path_factory.mktemp("compilation-cache")


@pytest.fixture(scope="module")
def scenarios(tmp_path_factory, cache):
  out = tmp_path_factory.mktemp("scenarios")
  return out, run_scenarios(out, cache)


def assert_same_run(a: dict, b: dict) -> None:
  assert len(a["theta"]) == len(b["theta"]) > 0
  for x, y in zip(a["theta"], b["theta"]):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), **TOLERANCE)
  np.testing.assert_allclose(a["meta_loss"], b["meta_loss"], **TOLERANCE)


def test_two_devices_train_to_the_same_theta_as_one(scenarios):
  _, results = scenarios
  one, two = results["nres/1"], results["nres/2"]
  assert len(one["meta_loss"]) == 4  # every step logged
  assert_same_run(one, two)
  # Not trivially equal: training moved theta away from its initialization.
  assert one["meta_loss"][0] != one["meta_loss"][-1]


def test_a_run_checkpointed_on_two_devices_resumes_on_one(scenarios):
  _, results = scenarios
  assert_same_run(results["nres/1"], results["nres/2to1"])


def test_problem_counts_that_do_not_split_over_the_devices_are_a_clear_error(scenarios):
  _, results = scenarios
  message = results["indivisible"]
  assert message is not None and "[3]" in message and "multiple of 2" in message and "--devices" in message


def test_the_default_device_count_splits_the_problems_and_an_indivisible_population_is_refused_early(scenarios):
  _, results = scenarios
  assert results["default_devices"] == {"3": 1, "4": 2}
  message, created = results["population_indivisible"]
  assert "--population 3" in message and "multiple of 2" in message and not created


@pytest.mark.slow
def test_full_backpropagation_pes_and_a_population_on_two_devices_match_one_and_resume_from_one_to_two(tmp_path,
                                                                                                       cache):
  results = run_scenarios(tmp_path, cache, "--slow")
  for estimator in ("full", "pes"):
    assert_same_run(results[f"{estimator}/1"], results[f"{estimator}/2"])
  assert_same_run(results["nres/1"], results["nres/1to2"])
  # A self-training population sharded over two devices trains its members as on one.
  one, two = results["selftrain"]["1"], results["selftrain"]["2"]
  assert len(one) == len(two) > 0
  for x, y in zip(one, two):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), **TOLERANCE)


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def start_two(tmp_path: Path, cache: Path, *extra) -> list:
  """Processes 0 and 1 of a two-process run (one CPU device each) on a localhost coordinator, started."""
  port = free_port()
  return [subprocess.Popen([*CLI, *LINEAR, *extra, "--out", str(tmp_path / f"process-{i}"), "--coordinator",
                            f"localhost:{port}", "--num-processes", "2", "--process-id", str(i)],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           env=environment(cache, devices=1)) for i in (0, 1)]


def finish(children: list, returncode: int = 0) -> list:
  """Waits for ``children``; asserts each exits with ``returncode``; returns their stderr."""
  try:
    outcomes = [child.communicate(timeout=600) for child in children]
  finally:
    for child in children:
      if child.poll() is None:
        child.kill()
  for child, (_, err) in zip(children, outcomes):
    assert child.returncode == returncode, err[-4000:]
  return [err for _, err in outcomes]


def launch_two(tmp_path: Path, cache: Path, *extra) -> None:
  finish(start_two(tmp_path, cache, *extra))


def test_two_processes_train_like_one(scenarios, cache, tmp_path):
  from sharding_scenarios import summary
  _, results = scenarios
  launch_two(tmp_path, cache, "--steps", "4")
  assert_same_run(results["linear/1"], summary(tmp_path / "process-0", 0.0))
  assert not (tmp_path / "process-1").exists()  # only process 0 writes


@pytest.mark.slow
def test_two_processes_resume_like_one(scenarios, cache, tmp_path):
  from sharding_scenarios import summary
  _, results = scenarios
  launch_two(tmp_path, cache, "--steps", "2")
  launch_two(tmp_path, cache, "--steps", "4", "--resume")  # process 1 has no run directory: process 0 shares it
  assert_same_run(results["linear/1"], summary(tmp_path / "process-0", 0.0))
  assert not (tmp_path / "process-1").exists()


# -- errors, in this (one-device) process ---------------------------------------------------------------------------

def test_more_devices_than_the_process_has_exit_2_with_one_line(tmp_path, capsys):
  assert main([*ARGS, "--steps", "1", "--devices", "3", "--out", str(tmp_path / "run")]) == 2
  err = capsys.readouterr().err.strip()
  assert "--devices 3" in err and "choose 1 to 1" in err and len(err.splitlines()) == 1, err
  assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize("options, environ, message", [
    ({"coordinator": "localhost:1234"}, {}, "not --num-processes (or $LOPT_NUM_PROCESSES), --process-id"),
    ({"coordinator": "localhost", "num_processes": 2, "process_id": 0}, {}, "is not HOST:PORT"),
    ({"coordinator": "h:99999", "num_processes": 2, "process_id": 0}, {}, "is not HOST:PORT"),
    ({"coordinator": "h:1", "num_processes": 2, "process_id": 2}, {}, "--process-id=2: process ids run from 0 to 1"),
    ({"coordinator": "h:1", "process_id": 0}, {"LOPT_NUM_PROCESSES": "two"}, "$LOPT_NUM_PROCESSES: 'two' is not"),
    ({}, {"JAX_COORDINATOR_ADDRESS": "h:1", "LOPT_NUM_PROCESSES": "2", "LOPT_PROCESS_ID": "-1"},
     "$LOPT_PROCESS_ID: '-1' is not an integer >= 0"),
])
def test_distributed_settings_that_cannot_work_are_clear_errors(options, environ, message):
  with pytest.raises(sharding.ShardingError, match=None) as error:
    sharding.distributed_settings(**options, environ=environ)
  assert message in str(error.value)


def test_distributed_settings_come_from_options_or_the_environment():
  assert sharding.distributed_settings(environ={}) is None
  environ = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "LOPT_NUM_PROCESSES": "4", "LOPT_PROCESS_ID": "3"}
  assert sharding.distributed_settings(environ=environ) == {"coordinator_address": "10.0.0.1:1234",
                                                             "num_processes": 4, "process_id": 3}
  assert sharding.distributed_settings(process_id=1, environ=environ)["process_id"] == 1  # the option wins


def test_one_device_changes_nothing():
  layout = sharding.layout()
  assert layout.mesh is None and not layout.sharded and layout.size == 1
  tree = {"a": np.ones(3)}
  assert layout.local(tree) is tree and layout.to_host(tree) is tree


@pytest.mark.slow
def test_the_scaling_benchmark_runs_on_two_host_devices(tmp_path, cache):
  out = tmp_path / "scaling.json"
  done = subprocess.run([sys.executable, str(HERE.parent / "benchmarks" / "scaling.py"), "--tiny", "--host-devices",
                         "2", "--rounds", "1", "--seconds", "0.1", "--json", str(out)], capture_output=True, text=True,
                        timeout=900, env=environment(cache, devices=2))
  assert done.returncode == 0, done.stderr[-4000:]
  result = json.loads(out.read_text())
  assert result["device"].startswith("2 x cpu") and result["nres"][0]["speedup"] > 0
  assert {row["meta_batch_size"] for row in result["paper"]} == {4, 8}
  assert all(row["milliseconds_per_outer_step"]["hand_2"] > 0 for row in result["paper"])


@pytest.mark.slow
def test_ctrl_c_in_one_of_two_processes_stops_both_at_one_checkpoint_and_they_resume(cache, tmp_path):
  """SIGINT to process 1 only (the one that writes nothing): both agree to stop after the same step, process 0
  checkpoints it, both exit 130 with one line; resumed, the run ends where one process running unbroken ends."""
  import signal
  import time

  from sharding_scenarios import summary
  children = start_two(tmp_path, cache, "--steps", "100000")
  metrics = tmp_path / "process-0" / "metrics.jsonl"
  deadline = time.monotonic() + 300
  while not (metrics.exists() and metrics.read_text().count("\n") >= 2) and time.monotonic() < deadline:
    time.sleep(0.2)
  children[1].send_signal(signal.SIGINT)
  for err in finish(children, returncode=130):
    assert "interrupted; a run resumes" in err and "Traceback" not in err
  steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
  assert 2 <= steps[-1] < 100000
  end = steps[-1] + 2
  launch_two(tmp_path, cache, "--steps", str(end), "--resume")
  assert subprocess.run([*CLI, *LINEAR, "--steps", str(end), "--devices", "1", "--out", str(tmp_path / "unbroken")],
                        capture_output=True, env=environment(cache, devices=1)).returncode == 0
  assert_same_run(summary(tmp_path / "unbroken", 0.0), summary(tmp_path / "process-0", 0.0))
