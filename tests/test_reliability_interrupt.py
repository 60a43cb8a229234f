"""Ctrl-C of the real `lopt train`: exit 130, one line, no traceback; the resumed run equals an unbroken one bit for
bit (scripts/sigint_torture.py is the long version: random moments, terminals, double Ctrl-C)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

TRAIN = ["train", "linear_regression", "--steps", "40", "--hidden-size", "4", "--meta-batch-size", "4", "--horizon",
         "20", "--checkpoint-every", "10", "--eval-every", "10"]
CHILD = [sys.executable, "-c", "import sys; from lopt.cli import main; sys.exit(main())"]


def start(out, *extra):
  # A new session with SIGINT at its default (a shell's `cmd &` would start it ignored), as a terminal's Ctrl-C.
  return subprocess.Popen([*CHILD, *TRAIN, "--out", str(out), *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, start_new_session=True, env=dict(os.environ, JAX_PLATFORMS="cpu"),
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def weights(run):
  from safetensors.numpy import load_file
  return load_file(str(run / "optimizer" / "weights.safetensors"))


@pytest.mark.parametrize("moment", ["compilation", "training"])
def test_ctrl_c_exits_130_with_one_line_and_the_run_resumes_to_the_unbroken_weights(tmp_path, moment):
  run = tmp_path / "run"
  process = start(run)
  deadline = time.time() + 120
  if moment == "training":  # wait for the first logged step
    while not (run / "metrics.jsonl").exists() and time.time() < deadline and process.poll() is None:
      time.sleep(0.05)
  else:  # during start-up and the first compilation
    time.sleep(1.0)
  os.killpg(process.pid, signal.SIGINT)
  _, err = process.communicate(timeout=120)
  lines = [line for line in err.splitlines() if line.strip() and not line.startswith(("meta-training", "lopt meta",
                                                                                      "/", "steps"))]
  assert process.returncode == 130, err
  assert "Traceback" not in err and len(lines) == 1 and "interrupted" in lines[0], err
  resume = ["--resume"] if (run / "config.json").exists() else []
  resumed = start(run, *resume)
  _, err = resumed.communicate(timeout=300)
  assert resumed.returncode == 0, err
  unbroken = start(tmp_path / "unbroken")
  _, err = unbroken.communicate(timeout=300)
  assert unbroken.returncode == 0, err
  a, b = weights(run), weights(tmp_path / "unbroken")
  assert set(a) == set(b) and all(np.array_equal(a[k], b[k]) for k in a)
