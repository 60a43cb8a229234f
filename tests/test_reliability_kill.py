"""Kill-and-resume: SIGKILL `lopt train` at random moments, resume, and get the unbroken run's bits (issue 6).

The procedure lives in scripts/kill_torture.py (the long version, 20 kills, results in docs/RELIABILITY.md); these
tests run it with a few kills. Each child process starts in a few seconds thanks to a shared persistent JAX
compilation cache filled by the first, unbroken run.
"""

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "kill_torture.py"


def _torture_module():
  spec = importlib.util.spec_from_file_location("kill_torture", SCRIPT)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.fixture(scope="module")
def torture():
  return _torture_module()


def _assert_survived(results: dict, kills: int) -> None:
  assert results["kills"] == kills
  assert results["reference_processes_equal"], "two unbroken processes gave different bits"
  assert results["invalid_states"] == []
  assert results["mismatches"] == []
  assert results["runs_finished"] >= 1


def test_random_kills_resume_to_the_unbroken_result(torture, tmp_path):
  results = torture.torture(tmp_path, kills=3, seed=7, log=lambda line: None)
  _assert_survived(results, 3)


def test_second_process_on_a_run_directory_refuses(torture, tmp_path):
  code, stderr = torture.second_process_refused(tmp_path)
  assert code == 2
  assert "another lopt process is using this run directory" in stderr
  assert "Traceback" not in stderr


@pytest.mark.slow
def test_many_random_kills(torture, tmp_path):
  results = torture.torture(tmp_path, kills=10, seed=11, log=lambda line: None)
  _assert_survived(results, 10)
