"""Kill-and-resume torture test for `lopt train`: SIGKILL at random moments, resume, compare with an unbroken run.

  python scripts/kill_torture.py                      # 20 random kills (a few minutes on a laptop CPU)
  python scripts/kill_torture.py --kills 5 --seed 1
  python scripts/kill_torture.py --update-doc docs/RELIABILITY.md   # also records the results in the doc
  python scripts/kill_torture.py --estimator pes --kills 5  # a truncated estimator (mlp optimizer, truncation 5):
                                                            # kills land mid-episode; estimator state compared too

What it does:
  1. Runs a tiny meta-training twice without interruption (the second run measures the time a run takes once the
     JAX compilation cache is warm, and checks that two processes give the same bits).
  2. Starts the same run as a child process and kills it with SIGKILL after a time drawn uniformly from that
     duration, then restarts it with --resume, until the run finishes; repeats in fresh run directories until the
     requested number of kills happened. The child sleeps briefly inside every atomic write (after the temporary file
     is written, before it is renamed) and after every outer step, so kills land in startup, in training and in
     checkpoint writes in proportion to those sleeps.
  3. After every kill, checks that every file in the run directory is valid (config.json, every checkpoint, the
     metrics, the exported optimizer if present); after every finished run, that the exported weights, the last
     checkpoint (theta, best theta, outer-optimizer state, counters) and the metrics equal the unbroken run's, bit
     for bit.
  4. Checks that a second process on a run directory in use refuses (exit 2, a message naming the lock).

The test suite runs a short version of the same functions (tests/test_reliability_kill.py).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path


# A tiny run: 30 outer steps, a checkpoint every 3 and a logged evaluation every 5.
NUM_STEPS = 30
TRAIN_ARGS = ["train", "linear_regression", "--steps", str(NUM_STEPS), "--hidden-size", "4", "--meta-batch-size",
              "4", "--horizon", "10", "--checkpoint-every", "3", "--eval-every", "5", "--seed", "3"]
STEP_DELAY = 0.03   # seconds the child sleeps after each outer step
WRITE_DELAY = 0.2   # seconds the child sleeps inside each atomic write, between writing and renaming


# -- the child: `lopt train` with sleeps and a phase file, so that a kill's moment can be told afterwards -----------

def child_main(argv: list[str]) -> int:
  """Runs lopt.cli.main(argv) with the sleeps installed; records the current phase in $LOPT_TORTURE_PHASE_FILE."""
  import lopt.cli
  import lopt.meta.train as train
  assert os.environ.get("PYTHONPATH", "").split(os.pathsep)[0] in lopt.cli.__file__, "not running the snapshot"
  phase_file = os.environ.get("LOPT_TORTURE_PHASE_FILE")
  step_delay = float(os.environ.get("LOPT_TORTURE_STEP_DELAY", "0"))
  write_delay = float(os.environ.get("LOPT_TORTURE_WRITE_DELAY", "0"))

  def phase(text: str) -> None:
    if phase_file:
      with open(phase_file, "w") as f:
        f.write(text)

  real_fsync = os.fsync

  def slow_fsync(fd):
    # Only the temporary files of atomic writes: a kill here leaves a complete or partial .tmp, never a torn target.
    name = os.readlink(f"/proc/self/fd/{fd}") if os.path.exists(f"/proc/self/fd/{fd}") else ""
    if name.endswith(".tmp"):
      target = Path(name).name[1:].rsplit(".", 2)[0]  # mkstemp names them .TARGET.RANDOM.tmp
      phase(f"write of {'a checkpoint' if target.startswith('step_') else target}")
      time.sleep(write_delay)
    real_fsync(fd)

  real_build = train.build_outer_step

  def build_slow_outer_step(*args, **kwargs):
    outer_step = real_build(*args, **kwargs)

    def slow_step(*step_args):
      result = outer_step(*step_args)
      phase("training steps")
      time.sleep(step_delay)
      return result
    return slow_step

  os.fsync = slow_fsync
  train.build_outer_step = build_slow_outer_step
  phase("startup (imports, compilation, restore)")
  return lopt.cli.main(argv)


# -- the parent ----------------------------------------------------------------------------------------------------

def snapshot_source(workdir: Path) -> Path:
  """Copies the lopt package once, so every child of one torture runs the same code even while the working tree is
  being edited (a mid-run edit would otherwise show up as a resume mismatch)."""
  import shutil
  import lopt
  target = workdir / "src"
  if not target.exists():
    shutil.copytree(Path(lopt.__file__).parent, target / "lopt", ignore=shutil.ignore_patterns("__pycache__"))
  return target


def child_environment(cache_dir: Path, phase_file: Path | None = None, *, step_delay: float = STEP_DELAY,
                      write_delay: float = WRITE_DELAY) -> dict:
  """CPU only (bit-exact comparisons), a shared persistent compilation cache (a process starts in ~3 s, not ~15),
  and the snapshot of the source beside the cache first on the path."""
  source = snapshot_source(cache_dir.parent)
  path = os.pathsep.join([str(source)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []))
  env = dict(os.environ, PYTHONPATH=path, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(cache_dir),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
             LOPT_TORTURE_STEP_DELAY=str(step_delay), LOPT_TORTURE_WRITE_DELAY=str(write_delay))
  if phase_file is not None:
    env["LOPT_TORTURE_PHASE_FILE"] = str(phase_file)
  return env


def start_train(out: Path, env: dict, extra: list[str] = ()) -> subprocess.Popen:
  # --resume once the run exists (lopt refuses --resume on a directory that holds no run).
  resume = ["--resume"] if (out / "config.json").exists() else []
  command = [sys.executable, str(Path(__file__).resolve()), "--child", *TRAIN_ARGS, "--out", str(out), *resume,
             *extra]
  return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def run_train(out: Path, env: dict, kill_after: float | None = None) -> tuple[bool, int, str]:
  """Runs the child; with ``kill_after`` sends SIGKILL after that many seconds. Returns (killed, exit code, stderr)."""
  process = start_train(out, env)
  try:
    _, stderr = process.communicate(timeout=kill_after)
    return False, process.returncode, stderr
  except subprocess.TimeoutExpired:
    process.send_signal(signal.SIGKILL)
    _, stderr = process.communicate()
    return True, process.returncode, stderr


def check_run_directory(out: Path, *, finished: bool = False) -> list[str]:
  """Every file valid: config.json parses and validates, every checkpoint loads with all its tensors, the metrics
  have strictly increasing steps (a torn last line allowed only before a resume), a present export loads."""
  from lopt.checkpoint import CheckpointError, load_optimizer, read_json, read_tensors
  from lopt.meta.config import MetaTrainConfig
  problems = []
  if (out / "config.json").exists():
    try:
      MetaTrainConfig.from_dict(read_json(out / "config.json"), "config.json")
    except CheckpointError as e:
      problems.append(str(e))
  elif list(out.glob("checkpoints/step_*")):
    problems.append("checkpoints without config.json")
  for path in sorted(out.glob("checkpoints/step_*.safetensors")):
    try:
      tensors, metadata = read_tensors(path)
      if int(metadata["step"]) != int(path.stem.split("_")[1]) or not any(k.startswith("outer_state/") for k in tensors):
        problems.append(f"{path.name}: metadata or tensors incomplete")
    except (CheckpointError, KeyError, ValueError) as e:
      problems.append(f"{path.name}: {e}")
  problems += _check_metrics(out / "metrics.jsonl", finished)
  if (out / "optimizer" / "config.json").exists():
    try:
      load_optimizer(out / "optimizer")
    except CheckpointError as e:
      problems.append(f"optimizer: {e}")
  if finished and list(out.rglob("*.tmp")):
    problems.append(f"temporary files left: {[p.name for p in out.rglob('*.tmp')]}")
  return problems


def _check_metrics(path: Path, finished: bool) -> list[str]:
  if not path.exists():
    return []
  lines = path.read_text().splitlines()
  steps = []
  for i, line in enumerate(lines):
    try:
      steps.append(json.loads(line)["step"])
    except (json.JSONDecodeError, KeyError):
      if finished or i != len(lines) - 1:
        return [f"metrics.jsonl line {i + 1} is torn: {line[:60]!r}"]
  if any(b <= a for a, b in zip(steps, steps[1:])):
    return [f"metrics.jsonl steps not strictly increasing: {steps}"]
  return []


def compare_runs(out: Path, reference: Path) -> list[str]:
  """Differences between a finished run and the reference: exported weights, the last checkpoint, the metrics."""
  from lopt.checkpoint import read_tensors
  from lopt.meta.train import load_metrics
  problems = []
  last = f"checkpoints/step_{NUM_STEPS:08d}.safetensors"
  for name in ("optimizer/weights.safetensors", last):
    (got, got_meta), (want, want_meta) = read_tensors(out / name), read_tensors(reference / name)
    if sorted(got) != sorted(want) or got_meta != want_meta:
      problems.append(f"{name}: tensor names or metadata differ")
      continue
    problems += [f"{name}: {k} differs" for k in want if got[k].tobytes() != want[k].tobytes()]
  strip = lambda records: [{k: v for k, v in r.items() if k != "seconds"} for r in records]  # noqa: E731
  if strip(load_metrics(out)) != strip(load_metrics(reference)):
    problems.append("metrics.jsonl differs from the unbroken run")
  return problems


def torture(workdir: Path, kills: int, seed: int, log=print) -> dict:
  """The whole procedure (see the module docstring); returns the counts for RELIABILITY.md."""
  rng = random.Random(seed)
  cache = workdir / "jax-cache"
  phase_file = workdir / "phase"
  env = child_environment(cache, phase_file)
  reference = workdir / "reference"
  killed, rc, stderr = run_train(reference, env)
  assert rc == 0, stderr
  started = time.perf_counter()
  killed, rc, stderr = run_train(workdir / "reference-warm", env)
  duration = time.perf_counter() - started
  assert rc == 0, stderr
  results = {"kills": 0, "runs_finished": 0, "phases": {}, "invalid_states": [], "mismatches": [],
             "seconds_per_run": round(duration, 2), "reference_processes_equal": not compare_runs(
                 workdir / "reference-warm", reference)}
  log(f"unbroken run: {duration:.1f} s per process with a warm cache")
  cycle, out = 0, workdir / "run-0"
  while results["kills"] < kills:
    phase_file.write_text("not started")
    was_killed, rc, stderr = run_train(out, env, kill_after=rng.uniform(0.0, duration))
    if "warning" in stderr:  # a resume that skipped a checkpoint lost work, even if the end result matches
      results["invalid_states"].append(f"after kill {results['kills']}: {stderr.strip()[-300:]}")
    if was_killed:
      results["kills"] += 1
      where = phase_file.read_text()
      results["phases"][where] = results["phases"].get(where, 0) + 1
      problems = check_run_directory(out)
      results["invalid_states"] += [f"kill {results['kills']}: {p}" for p in problems]
      log(f"kill {results['kills']}/{kills} in {where!r}: {'ok' if not problems else problems}")
      continue
    assert rc == 0, stderr
    problems = check_run_directory(out, finished=True) + compare_runs(out, reference)
    results["runs_finished"] += 1
    results["mismatches"] += [f"run {cycle}: {p}" for p in problems]
    log(f"run {cycle} finished: {'bit-identical to the unbroken run' if not problems else problems}")
    cycle, out = cycle + 1, workdir / f"run-{cycle + 1}"
  # The last run may have been killed: finish it and compare too.
  if out.exists():
    _, rc, stderr = run_train(out, env)
    assert rc == 0, stderr
    problems = check_run_directory(out, finished=True) + compare_runs(out, reference)
    results["runs_finished"] += 1
    results["mismatches"] += [f"run {cycle}: {p}" for p in problems]
    log(f"run {cycle} finished: {'bit-identical to the unbroken run' if not problems else problems}")
  return results


def second_process_refused(workdir: Path) -> tuple[int, str]:
  """Starts a slow run, waits until it trains, starts a second one on the same directory; returns its (rc, stderr).

  The first is killed afterwards; its directory must still be valid."""
  phase_file = workdir / "lock-phase"
  phase_file.write_text("not started")
  out = workdir / "locked"
  first = start_train(out, child_environment(workdir / "jax-cache", phase_file, step_delay=0.5))
  try:
    deadline = time.time() + 120
    while phase_file.read_text() != "training steps" and first.poll() is None and time.time() < deadline:
      time.sleep(0.1)
    second = subprocess.run([sys.executable, "-m", "lopt.cli", *TRAIN_ARGS, "--out", str(out), "--resume"],
                            env=child_environment(workdir / "jax-cache"), capture_output=True, text=True,
                            timeout=120)
  finally:
    first.kill()
    first.communicate()
  problems = check_run_directory(out)
  assert not problems, problems
  return second.returncode, second.stderr


DOC_BEGIN, DOC_END = "<!-- kill-torture:begin -->", "<!-- kill-torture:end -->"


def update_doc(path: Path, results: dict, lock: tuple[int, str], kills: int, seed: int) -> None:
  """Replaces the block between the kill-torture markers of RELIABILITY.md with these results."""
  phases = ", ".join(f"{count} in {name}" for name, count in sorted(results["phases"].items()))
  block = "\n".join([
      DOC_BEGIN,
      f"Last run: {time.strftime('%Y-%m-%d')}, `python scripts/kill_torture.py --kills {kills} --seed {seed}`, "
      f"{os.cpu_count()} CPU cores, {results['seconds_per_run']} s per unbroken process.",
      "",
      "| measure | result |",
      "|---|---|",
      f"| SIGKILLs | {results['kills']} ({phases}) |",
      f"| runs finished after resuming | {results['runs_finished']} |",
      f"| invalid file states seen after a kill | {len(results['invalid_states'])} |",
      f"| finished runs differing from the unbroken run (weights, last checkpoint, metrics) | "
      f"{len(results['mismatches'])} |",
      f"| two unbroken processes bit-identical | {results['reference_processes_equal']} |",
      f"| second process on a locked run directory | exit {lock[0]}: `{lock[1].strip().splitlines()[-1]}` |",
      DOC_END])
  text = path.read_text()
  start, end = text.index(DOC_BEGIN), text.index(DOC_END) + len(DOC_END)
  path.write_text(text[:start] + block + text[end:])


def main() -> int:
  if len(sys.argv) > 1 and sys.argv[1] == "--child":
    return child_main(sys.argv[2:])
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--kills", type=int, default=20)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--update-doc", type=Path, default=None, help="RELIABILITY.md to record the results in")
  parser.add_argument("--estimator", default=None, help="train with this truncated estimator (truncation 5, episodes "
                      "of 10 steps) and the mlp optimizer instead of the default full backpropagation of a GRU")
  args = parser.parse_args()
  if args.estimator is not None:
    TRAIN_ARGS.extend(["--optimizer", "mlp", "--optimizer-option", "num_layers=1", "--estimator", args.estimator,
                       "--truncation", "5"])
  with tempfile.TemporaryDirectory(prefix="lopt-torture-") as tmp:
    results = torture(Path(tmp), args.kills, args.seed)
    lock = second_process_refused(Path(tmp))
  print(json.dumps(results, indent=2))
  print(f"second process: exit {lock[0]}: {lock[1].strip()}")
  if args.update_doc:
    update_doc(args.update_doc, results, lock, args.kills, args.seed)
  ok = not results["invalid_states"] and not results["mismatches"] and lock[0] == 2 and \
      results["reference_processes_equal"]
  print("PASS" if ok else "FAIL")
  return 0 if ok else 1


if __name__ == "__main__":
  sys.exit(main())
