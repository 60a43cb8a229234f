"""Ctrl-C torture test for `lopt train`: SIGINT at random moments, then resume, then compare with an unbroken run.

  python scripts/sigint_torture.py                                # 20 trials of the real `lopt train` (working tree)
  python scripts/sigint_torture.py --git-ref HEAD --trials 10     # a commit instead (git archive: no git state changes)
  python scripts/sigint_torture.py --target lopt-cli-patched      # the real code, main() wrapped by lopt.interrupts
  python scripts/sigint_torture.py --target standalone-before     # the minimal reproduction, as lopt does it today
  python scripts/sigint_torture.py --target standalone-after      # the same loop using lopt.interrupts

What one trial does:
  1. Starts the target (by default the console script's code, `from lopt.cli import main; sys.exit(main())`, on a
     snapshot of the source, so edits in the working tree during the torture do not matter) as
     `train linear_regression --out DIR --steps 300 --checkpoint-every 25 --eval-every 50` in a new session, with
     stderr on a pipe or on a pseudo-terminal (`--terminal pty`: rich's live bar and its refresh thread are active).
  2. Sends SIGINT to its process group (what a terminal's Ctrl-C does) after a random delay: with probability
     --early-fraction in the first --early-window seconds (imports, compilation), otherwise anywhere in the run;
     in a --double-fraction of the trials a second SIGINT follows 0.05-1 s later (an impatient user).
  3. Records the exit code, a crash (negative exit = killed by a signal: -11 is a segmentation fault; "Fatal Python
     error"), a "Traceback", the stderr lines that are neither progress nor status (exactly one is wanted: the
     "interrupted" line), how long the process took to end after the last SIGINT, and whether the run directory is
     valid (config.json, every checkpoint readable, metrics in order).
  4. Resumes with `--resume` (no interrupt) and compares optimizer/weights.safetensors, the last checkpoint (tensors
     and metadata) and metrics.jsonl (without timings) with the unbroken reference run, bit for bit.

A trial passes when the process exited with 130, printed exactly one non-progress line (the interrupted line), no
traceback, no crash, left a valid directory, and its resumed run is bit-identical to the unbroken one. A SIGINT that
arrives after the run finished (exit 0 with the "done" line) is reported as such and not counted.

Targets:
  lopt                the console script on the snapshot: today's code, or the fixed code once it is integrated.
  lopt-cli-patched    for commits before lopt.interrupts was integrated (4bf3371): the real training code with only
                      the CLI half of the fix applied from outside: lopt.interrupts installed before lopt is
                      imported, lopt's imports in a deferred() region, and os._exit(130) after cli.main() returned
                      130. The loop itself is unchanged.
  standalone-before   a minimal reproduction of the structure (jitted outer step of a tiny learned optimizer in a
                      Python loop, atomic safetensors checkpoints, metrics.jsonl, a rich bar, try/except
                      KeyboardInterrupt around the training and `sys.exit(main())`), written as lopt is today.
  standalone-after    the same program using lopt.interrupts as cli.main() and the training loop should.

The cause this reproduces (see src/lopt/interrupts.py): a KeyboardInterrupt raised while JAX waits for a compilation
abandons the compilation on an XLA worker thread; when main() then returns 130, Py_FinalizeEx destroys the JAX client
under that thread (segmentation fault after the interrupted line). A SIGINT during the imports before main()'s try
prints a traceback (or an ImportError, when it hits jaxlib's extension initialization).

The last line of output is a JSON summary; the exit status is 0 when every counted trial passed.

To probe the start-up window before main() installs the handler (Python's own start, and `import lopt`, which
imports numpy while lopt/__init__.py is not lazy), use `--early-fraction 1 --early-window 0.3`.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NUM_STEPS = 300
TRAIN_ARGS = ["train", "linear_regression", "--steps", str(NUM_STEPS), "--checkpoint-every", "25", "--eval-every",
              "50"]
CONSOLE_SCRIPT = "import sys; from lopt.cli import main; sys.exit(main())"  # what the `lopt` console script runs
TARGETS = ("lopt", "lopt-cli-patched", "standalone-before", "standalone-after")
LOPT_MESSAGE = "lopt train: interrupted; a run resumes from its last checkpoint with --resume"
STANDALONE_MESSAGE = "standalone train: interrupted; a run resumes from its last checkpoint with --resume"

# `lopt-cli-patched`: the CLI half of the fix around the unchanged cli.main(), from outside src/.
PATCHED_CLI = f"""
import importlib.util, sys
spec = importlib.util.spec_from_file_location("lopt_interrupts", sys.argv.pop(1))
interrupts = importlib.util.module_from_spec(spec); spec.loader.exec_module(interrupts)
interrupts.install({LOPT_MESSAGE!r})
try:
  with interrupts.deferred():  # the imports main() does before its try (build_parser imports jax)
    import lopt.cli
    lopt.cli.build_parser()
  code = lopt.cli.main(sys.argv[1:])  # prints the interrupted line itself and returns 130
except KeyboardInterrupt:
  interrupts.exit_interrupted()
if code == interrupts.EXIT_CODE:
  interrupts.exit_interrupted(message="")  # the line is printed: flush, os._exit(130), no interpreter teardown
interrupts.exiting()
sys.exit(code)
"""


# -- the standalone reproduction (the child side) -------------------------------------------------------------------

def load_interrupts(path: Path):
  """lopt/interrupts.py loaded by path (stdlib only), so that it is installed before anything heavy is imported."""
  import importlib.util
  spec = importlib.util.spec_from_file_location("lopt_interrupts", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def standalone_main(argv: list[str]) -> int:
  """`--standalone-child before|after INTERRUPTS_PY train linear_regression --out DIR ... [--resume]`."""
  mode, interrupts_path, argv = argv[0], Path(argv[1]), argv[2:]
  parser = argparse.ArgumentParser(prog="standalone")
  parser.add_argument("command")
  parser.add_argument("task")
  parser.add_argument("--out", required=True)
  parser.add_argument("--steps", type=int, default=NUM_STEPS)
  parser.add_argument("--checkpoint-every", type=int, default=25)
  parser.add_argument("--eval-every", type=int, default=50)
  parser.add_argument("--resume", action="store_true")
  interrupts = None
  if mode == "after":
    interrupts = load_interrupts(interrupts_path)  # first thing, as cli.main() should
    interrupts.install(STANDALONE_MESSAGE)
  else:
    _heavy_imports()  # as today's cli.main(): build_parser() imports jax before the try
  try:
    if interrupts is not None:
      with interrupts.deferred():  # a SIGINT here surfaces as KeyboardInterrupt when the imports are done
        _heavy_imports()
    args = parser.parse_args(argv)
    _say(f"meta-training on {args.task} for {args.steps} outer steps -> {args.out}")
    with _training_bar(args.steps) as update:
      best = _standalone_train(args, update, interrupts)
    _say(f"done: best held-out loss {best:.4g}")
  except KeyboardInterrupt:
    if interrupts is not None:
      return interrupts.exit_interrupted()
    print(STANDALONE_MESSAGE, file=sys.stderr)
    return 130
  if interrupts is not None:
    interrupts.exiting()
  return 0


def _heavy_imports() -> None:
  import jax  # noqa: F401
  import jax.numpy  # noqa: F401
  import numpy  # noqa: F401
  import optax  # noqa: F401
  import rich.progress  # noqa: F401
  import safetensors.numpy  # noqa: F401


def _say(message: str) -> None:
  from rich.console import Console
  Console(stderr=True).print(f"[bold]lopt[/bold] {message}", highlight=False)


def _training_bar(total: int):
  """lopt.progress.training_bar, reduced: a rich live bar on a terminal, a line every 10% otherwise."""
  from contextlib import contextmanager

  from rich.console import Console
  from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

  @contextmanager
  def bar():
    console = Console(stderr=True)
    if not console.is_terminal:
      def update(step, record):
        if step % max(1, total // 10) == 0 or step == total:
          print(f"meta-training: step {step}/{total}  meta-loss {record['meta_loss']:.4g}", file=sys.stderr,
                flush=True)
      yield update
      return
    with Progress(TextColumn("meta-training"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("{task.fields[status]}"), console=console) as progress:
      task = progress.add_task("meta-training", total=total, status="")

      def update(step, record):
        progress.update(task, completed=step, status=f"meta-loss {record['meta_loss']:.4g}")
      yield update
  return bar()


def _atomic_write(path: Path, data: bytes) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
    tmp = None
  finally:
    if tmp is not None:
      Path(tmp).unlink(missing_ok=True)


def _standalone_train(args, update, interrupts) -> float:
  """A tiny learned optimizer (per-coordinate MLP on [gradient, momentum]) meta-trained on random linear regressions
  through a 20-step unroll; the loop, run directory and resume mirror lopt.meta.train / lopt.meta.run."""
  import contextlib
  import fcntl

  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax
  from safetensors.numpy import load, save

  out = Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  lock = os.open(out / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
  fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
  config = {"steps": args.steps, "checkpoint_every": args.checkpoint_every, "eval_every": args.eval_every, "seed": 3}
  if (out / "config.json").exists() and not args.resume:
    raise SystemExit(f"{out} already holds a run; pass --resume")
  _atomic_write(out / "config.json", json.dumps(config).encode())
  dim, horizon, hidden, batch, seed = 10, 20, 16, 8, 3
  outer = optax.adam(3e-3)

  def init(key):
    k1, k2 = jax.random.split(key)
    return {"w1": jax.random.normal(k1, (2, hidden)) * 0.5, "b1": jnp.zeros(hidden),
            "w2": jax.random.normal(k2, (hidden, 1)) * 0.01, "scale": jnp.asarray(0.05)}

  def problem(key):
    ka, kb, kx = jax.random.split(key, 3)
    a = jax.random.normal(ka, (32, dim))
    b = a @ jax.random.normal(kb, (dim,)) + 0.1 * jax.random.normal(kx, (32,))
    return a, b

  def inner_loss(x, a, b):
    return jnp.mean(jnp.square(a @ x - b))

  def unroll(theta, key):
    a, b = problem(key)
    x0 = jnp.zeros(dim)
    loss0 = inner_loss(x0, a, b)

    def step(carry, _):
      x, m = carry
      g = jax.grad(inner_loss)(x, a, b)
      m = 0.9 * m + g
      h = jnp.tanh(jnp.stack([g, m], -1) @ theta["w1"] + theta["b1"])
      x = x - theta["scale"] * (m + (h @ theta["w2"])[:, 0])
      return (x, m), inner_loss(x, a, b)

    _, losses = jax.lax.scan(step, (x0, jnp.zeros(dim)), None, length=horizon)
    return jnp.mean(jnp.minimum(losses / loss0, 10.0))

  @jax.jit
  def outer_step(theta, state, keys):
    loss, grads = jax.value_and_grad(lambda t: jnp.mean(jax.vmap(unroll, (None, 0))(t, keys)))(theta)
    updates, state = outer.update(grads, state, theta)
    return optax.apply_updates(theta, updates), state, loss

  @jax.jit
  def evaluate(theta, keys):
    return jnp.mean(jax.vmap(unroll, (None, 0))(theta, keys))

  eval_keys = jax.random.split(jax.random.key(seed + 1_000_003), 64)
  theta = init(jax.random.key(seed))
  state = outer.init(theta)
  best_theta, best_score, best_step, step = theta, float("inf"), 0, 0
  ckpt_dir = out / "checkpoints"
  if args.resume and sorted(ckpt_dir.glob("step_*.safetensors")):
    path = sorted(ckpt_dir.glob("step_*.safetensors"))[-1]
    data = path.read_bytes()
    tensors = load(data)
    meta = _safetensors_metadata(data)
    theta = {k: jnp.asarray(tensors[f"theta/{k}"]) for k in theta}
    best_theta = {k: jnp.asarray(tensors[f"best_theta/{k}"]) for k in theta}
    leaves, treedef = jax.tree.flatten(state)
    state = jax.tree.unflatten(treedef, [jnp.asarray(tensors[f"outer_state/{i:04d}"]) for i in range(len(leaves))])
    step, best_score, best_step = int(meta["step"]), float(meta["best_score"]), int(meta["best_step"])
  metrics = out / "metrics.jsonl"
  if metrics.exists():  # drop lines after the checkpoint we resume from, and a torn one
    kept = []
    for line in metrics.read_text().splitlines():
      with contextlib.suppress(ValueError, KeyError):
        if json.loads(line)["step"] <= step:
          kept.append(line)
    _atomic_write(metrics, "".join(line + "\n" for line in kept).encode())

  def checkpoint():
    tensors = {f"theta/{k}": np.asarray(v) for k, v in theta.items()}
    tensors.update({f"best_theta/{k}": np.asarray(v) for k, v in best_theta.items()})
    tensors.update({f"outer_state/{i:04d}": np.asarray(leaf) for i, leaf in enumerate(jax.tree.leaves(state))})
    _atomic_write(ckpt_dir / f"step_{step:08d}.safetensors", save(tensors, {
        "step": str(step), "best_score": repr(best_score), "best_step": str(best_step)}))
    for old in sorted(ckpt_dir.glob("step_*.safetensors"))[:-2]:
      old.unlink(missing_ok=True)

  region = interrupts.deferred() if interrupts is not None else contextlib.nullcontext()
  try:
    with region:  # after: SIGINT only sets a flag, polled below between outer steps
      if interrupts is not None:
        interrupts.check()
      while step < args.steps:
        keys = jax.random.split(jax.random.fold_in(jax.random.key(seed), step), batch)
        theta, state, loss = outer_step(theta, state, keys)
        step += 1
        record = None
        if step % args.eval_every == 0 or step == args.steps:
          score = float(evaluate(theta, eval_keys))
          if score < best_score:
            best_theta, best_score, best_step = theta, score, step
          record = {"held_out_loss": score}
        if record is not None or step % 10 == 0:
          record = {"step": step, "meta_loss": float(loss), "best_held_out_loss": best_score, **(record or {})}
          with open(metrics, "a") as f:
            f.write(json.dumps(record) + "\n")
          update(step, record)
        if step % args.checkpoint_every == 0 or step == args.steps:
          checkpoint()
        elif interrupts is not None and interrupts.interrupted():
          checkpoint()  # the interrupted step's state: a resume loses nothing
        if interrupts is not None and interrupts.interrupted():
          raise KeyboardInterrupt
      weights = {k: np.asarray(v) for k, v in best_theta.items()}
      _atomic_write(out / "optimizer" / "weights.safetensors", save(weights, {"best_step": str(best_step)}))
  finally:
    fcntl.flock(lock, fcntl.LOCK_UN)
    os.close(lock)
  return best_score


# -- the parent ----------------------------------------------------------------------------------------------------

def _safetensors_metadata(data: bytes) -> dict:
  size = int.from_bytes(data[:8], "little")
  return json.loads(data[8:8 + size]).get("__metadata__", {})


def snapshot_source(workdir: Path, git_ref: str | None) -> Path:
  """A copy of src/lopt (working tree, or `git archive GIT_REF` -- which changes no git state), with
  src/lopt/interrupts.py from the working tree added when the snapshot lacks it, and a copy of this script (the
  standalone children run it); returns the folder for PYTHONPATH. Edits made during a torture change nothing."""
  target = workdir / "src"
  if target.exists():
    shutil.rmtree(target)
  target.mkdir(parents=True)
  if git_ref:
    archive = subprocess.run(["git", "-C", str(REPO), "archive", git_ref, "src/lopt"], check=True,
                             capture_output=True).stdout
    extract = workdir / "git-archive"
    extract.mkdir(exist_ok=True)
    subprocess.run(["tar", "-x", "-C", str(extract)], input=archive, check=True)
    shutil.copytree(extract / "src" / "lopt", target / "lopt")
    shutil.rmtree(extract)
  else:
    shutil.copytree(REPO / "src" / "lopt", target / "lopt", ignore=shutil.ignore_patterns("__pycache__"))
  if not (target / "lopt" / "interrupts.py").exists():
    shutil.copy(REPO / "src" / "lopt" / "interrupts.py", target / "lopt" / "interrupts.py")
  shutil.copy(Path(__file__).resolve(), target / "sigint_torture.py")
  return target


def child_environment(source: Path, cache: Path | None) -> dict:
  path = os.pathsep.join([str(source)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []))
  # Wide lines: status lines are not wrapped (the line counts stay simple).
  env = dict(os.environ, PYTHONPATH=path, JAX_PLATFORMS="cpu", TERM="xterm-256color", COLUMNS="300", LINES="40")
  env.pop("PYTHONFAULTHANDLER", None)
  if cache is not None:
    env.update(JAX_COMPILATION_CACHE_DIR=str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  return env


def child_command(target: str, source: Path, out: Path, resume: bool) -> list[str]:
  args = [*TRAIN_ARGS, "--out", str(out), *(["--resume"] if resume else [])]
  interrupts_py = str(source / "lopt" / "interrupts.py")
  script = source / "sigint_torture.py"  # the standalone children run the snapshot's copy of this script
  if target == "lopt":
    return [sys.executable, "-c", CONSOLE_SCRIPT, *args]
  if target == "lopt-cli-patched":
    return [sys.executable, "-c", PATCHED_CLI, interrupts_py, *args]
  mode = target.split("-", 1)[1]
  return [sys.executable, str(script), "--standalone-child", mode, interrupts_py, *args]


class Child:
  """A child in its own session (Ctrl-C goes to a process group); stderr on a pipe or a pseudo-terminal."""

  def __init__(self, command: list[str], env: dict, terminal: str):
    self.chunks: list[bytes] = []
    master = slave = None
    if terminal == "pty":
      import fcntl
      import pty
      import struct
      import termios
      master, slave = pty.openpty()
      fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 300, 0, 0))
    # SIGINT back to its default in the child: a parent started as a background job may ignore it, and an ignored
    # SIGINT is inherited (Python then leaves it ignored and the torture would test nothing).
    self.process = subprocess.Popen(
        command, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=slave if slave is not None else subprocess.PIPE, start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    self.readers = [threading.Thread(target=self._drain, args=(self.process.stdout.fileno(), []), daemon=True)]
    if slave is not None:
      os.close(slave)
      self.readers.append(threading.Thread(target=self._drain, args=(master, self.chunks), daemon=True))
    else:
      self.readers.append(threading.Thread(target=self._drain, args=(self.process.stderr.fileno(), self.chunks),
                                           daemon=True))
    self.master = master
    for reader in self.readers:
      reader.start()

  @staticmethod
  def _drain(fd: int, sink: list) -> None:
    while True:
      try:
        data = os.read(fd, 65536)
      except OSError:  # EIO: the pty's other side is closed
        break
      if not data:
        break
      sink.append(data)

  def interrupt(self) -> None:
    try:
      os.killpg(self.process.pid, signal.SIGINT)
    except ProcessLookupError:
      pass

  def wait(self, timeout: float) -> tuple[int | None, str]:
    """(exit code, or None after a hang and SIGKILL; stderr text)."""
    try:
      code = self.process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
      os.killpg(self.process.pid, signal.SIGKILL)
      self.process.wait()
      code = None
    for reader in self.readers:
      reader.join(timeout=10)
    if self.master is not None:
      os.close(self.master)
    for stream in (self.process.stdout, self.process.stderr):
      if stream is not None:
        stream.close()
    return code, b"".join(self.chunks).decode(errors="replace")


ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b\][^\x07]*\x07|\x1b[()][A-Z0-9]|\x1b[=>78]")


def classify_lines(stderr: str) -> tuple[list[str], list[str]]:
  """(interrupt lines, other unexpected lines) of a child's stderr, without the progress bar and the status lines
  (``lopt MESSAGE`` from lopt.progress.say; the command's own lines are ``lopt train: ...``)."""
  text = ANSI.sub("", stderr)
  interrupt, other = [], []
  for raw in re.split(r"[\r\n]+", text):
    line = raw.strip()
    if "interrupted" in line:
      interrupt.append(line)
    elif not line or "meta-training" in line or line.startswith("steps; trained optimizer") or (
        line.startswith("lopt ") and not line.startswith(("lopt train:", "lopt: "))):
      continue
    else:
      other.append(line)
  return interrupt, other


def check_run_directory(out: Path) -> list[str]:
  """config.json parses, every checkpoint is a readable safetensors file with its step, metrics are in order."""
  from safetensors.numpy import load
  problems = []
  if (out / "config.json").exists():
    try:
      json.loads((out / "config.json").read_text())
    except ValueError as e:
      problems.append(f"config.json: {e}")
  for path in sorted(out.glob("checkpoints/step_*.safetensors")):
    try:
      data = path.read_bytes()
      load(data)
      if int(_safetensors_metadata(data)["step"]) != int(path.stem.split("_")[1]):
        problems.append(f"{path.name}: wrong step in metadata")
    except Exception as e:  # noqa: BLE001 -- any unreadable checkpoint is a finding
      problems.append(f"{path.name}: {type(e).__name__}: {e}")
  if (out / "metrics.jsonl").exists():
    steps = []
    lines = (out / "metrics.jsonl").read_text().splitlines()
    for i, line in enumerate(lines):
      try:
        steps.append(json.loads(line)["step"])
      except (ValueError, KeyError):
        if i != len(lines) - 1:
          problems.append(f"metrics.jsonl line {i + 1} torn")
    if any(b <= a for a, b in zip(steps, steps[1:])):
      problems.append("metrics.jsonl steps not increasing")
  return problems


def run_state(out: Path) -> str:
  """Where the interrupted run was, read from what it left: before the run directory, before the first logged
  step (compilation), or the last logged step."""
  if not (out / "config.json").exists():
    return "startup"
  steps = []
  if (out / "metrics.jsonl").exists():
    for line in (out / "metrics.jsonl").read_text().splitlines():
      try:
        steps.append(json.loads(line)["step"])
      except (ValueError, KeyError):
        pass
  return f"step {steps[-1]}" if steps else "compile"


def compare_runs(out: Path, reference: Path) -> list[str]:
  """Exported weights, last checkpoint (tensors and metadata) and metrics (without timings) versus the reference."""
  from safetensors.numpy import load
  problems = []
  for name in ("optimizer/weights.safetensors", f"checkpoints/step_{NUM_STEPS:08d}.safetensors"):
    if not (out / name).exists():
      problems.append(f"{name} missing")
      continue
    got_data, want_data = (out / name).read_bytes(), (reference / name).read_bytes()
    got, want = load(got_data), load(want_data)
    if sorted(got) != sorted(want) or _safetensors_metadata(got_data) != _safetensors_metadata(want_data):
      problems.append(f"{name}: tensor names or metadata differ")
      continue
    problems += [f"{name}: {k} differs" for k in want if got[k].tobytes() != want[k].tobytes()
                 or got[k].dtype != want[k].dtype or got[k].shape != want[k].shape]

  def records(run):
    rows = []
    for line in (run / "metrics.jsonl").read_text().splitlines():
      try:
        rows.append({k: v for k, v in json.loads(line).items() if k != "seconds"})
      except ValueError:
        pass
    return rows
  if records(out) != records(reference):
    problems.append("metrics.jsonl differs")
  return problems


def trial(target: str, source: Path, env: dict, out: Path, reference: Path, delays: list[float], terminal: str,
          hang_after: float) -> dict:
  row = {"terminal": terminal, "delays": [round(d, 2) for d in delays]}
  child = Child(child_command(target, source, out, resume=False), env, terminal)
  started = time.perf_counter()
  sent_last = None
  for delay in delays:
    remaining = started + delay - time.perf_counter()
    if remaining > 0 and child.process.poll() is None:
      try:
        child.process.wait(timeout=remaining)
      except subprocess.TimeoutExpired:
        pass
    if child.process.poll() is None:
      child.interrupt()
      sent_last = time.perf_counter()
  code, stderr = child.wait(hang_after)
  ended = time.perf_counter()
  interrupt_lines, other_lines = classify_lines(stderr)
  row.update(
      code=code, where=run_state(out), signals_delivered=sum(1 for _ in delays) if sent_last else 0,
      exit_after_signal=round(ended - sent_last, 2) if sent_last else None,
      finished_first=code == 0 and sent_last is None,
      traceback="Traceback" in stderr, hang=code is None, interrupt_lines=len(interrupt_lines),
      # A crash: killed by a signal other than SIGINT (-11: segmentation fault, -6: abort), or a fatal error report.
      # -2 is not a crash: an uncaught KeyboardInterrupt makes Python end itself with SIGINT (a failure all the same).
      crash=(code is not None and code < 0 and code != -signal.SIGINT) or "Fatal Python error" in stderr
      or "Segmentation fault" in stderr, died_of_sigint=code == -signal.SIGINT,
      other_lines=other_lines[:5], invalid=check_run_directory(out))
  row["tail"] = ANSI.sub("", stderr).strip().splitlines()[-3:] if not row["finished_first"] else []
  # --resume once the run exists: lopt refuses --resume on a directory that holds no run (an interrupt during start-up
  # may come before the run directory is written); then the "resume" is a fresh start.
  resumed = Child(child_command(target, source, out, resume=(out / "config.json").exists()), env, "pipe")
  code, stderr = resumed.wait(600)
  row["resume_code"] = code
  row["mismatches"] = compare_runs(out, reference) if code == 0 else [f"resume exited {code}: {stderr[-300:]}"]
  row["ok"] = (row["finished_first"] or (
      row["code"] == 130 and row["interrupt_lines"] == 1 and not row["other_lines"] and not row["traceback"]
      and not row["crash"])) and not row["invalid"] and not row["mismatches"]
  return row


def torture(target: str, trials: int, seed: int, workdir: Path, *, git_ref: str | None, terminal: str,
            early_fraction: float, early_window: float, double_fraction: float, cache: bool, log=print) -> dict:
  rng = random.Random(seed)
  if git_ref:  # pin the commit: a branch moves while the torture runs
    git_ref = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", f"{git_ref}^{{commit}}"], check=True,
                             capture_output=True, text=True).stdout.strip()
  source = snapshot_source(workdir, git_ref)
  env = child_environment(source, workdir / "jax-cache" if cache else None)
  if target.startswith("lopt"):
    probe = subprocess.run([sys.executable, "-c", "import lopt.cli; print(lopt.cli.__file__)"], env=env,
                           capture_output=True, text=True)
    assert probe.returncode == 0 and probe.stdout.startswith(str(source)), f"not running the snapshot: {probe}"
  reference = workdir / "reference"
  started = time.perf_counter()
  code, stderr = Child(child_command(target, source, reference, resume=False), env, "pipe").wait(900)
  duration = time.perf_counter() - started
  assert code == 0, f"the unbroken reference run failed ({code}):\n{stderr[-2000:]}"
  log(f"{target}: unbroken run {duration:.1f} s (source: {'git ' + git_ref if git_ref else 'working tree'} "
      f"snapshot in {source})")
  rows = []
  for i in range(trials):
    mode = terminal if terminal != "both" else ("pipe", "pty")[i % 2]
    first = rng.uniform(0, early_window) if rng.random() < early_fraction else rng.uniform(0, duration)
    delays = [first] + ([first + rng.uniform(0.05, 1.0)] if rng.random() < double_fraction else [])
    row = trial(target, source, env, workdir / f"run-{i}", reference, delays, mode, hang_after=180)
    row["trial"] = i
    rows.append(row)
    log(format_row(row))
  counted = [r for r in rows if not r["finished_first"]]
  summary = {
      "target": target, "source": f"git {git_ref}" if git_ref else "working tree", "trials": trials,
      "seed": seed, "seconds_per_unbroken_run": round(duration, 1), "interrupted": len(counted),
      "finished_before_the_signal": len(rows) - len(counted),
      "passed": sum(r["ok"] for r in counted),
      "exit_130": sum(r["code"] == 130 for r in counted),
      "crashes": sum(r["crash"] for r in counted),
      "died_of_sigint": sum(r["died_of_sigint"] for r in counted),
      "segfaults": sum(r["code"] == -11 for r in counted),
      "tracebacks": sum(r["traceback"] for r in counted),
      "hangs": sum(r["hang"] for r in counted),
      "wrong_line_count": sum(r["interrupt_lines"] != 1 or bool(r["other_lines"]) for r in counted),
      "invalid_directories": sum(bool(r["invalid"]) for r in rows),
      "resume_mismatches": sum(bool(r["mismatches"]) for r in rows),
      "exit_codes": {str(k): sum(r["code"] == k for r in counted) for k in sorted({r["code"] for r in counted},
                                                                              key=str)},
      "max_exit_after_second_sigint_s": max([r["exit_after_signal"] for r in counted if len(r["delays"]) > 1
                                             and r["exit_after_signal"] is not None], default=None),
      "failures": [{k: r[k] for k in ("trial", "terminal", "delays", "where", "code", "interrupt_lines",
                                      "other_lines", "traceback", "crash", "invalid", "mismatches", "tail")}
                   for r in counted if not r["ok"]],
  }
  return summary


HEADER = f"{'#':>3} {'tty':4} {'SIGINT at (s)':14} {'where':10} {'exit':>5} {'lines':>5} {'tb':>3} {'crash':>5} " \
         f"{'valid':>5} {'resume=ref':>10}  result"


def format_row(row: dict) -> str:
  delays = "+".join(f"{d:.2f}" for d in row["delays"])
  if row["finished_first"]:
    result = "finished before the signal (not counted)"
  else:
    result = "ok" if row["ok"] else "FAIL " + "; ".join(row["tail"])[:120]
  lines = row["interrupt_lines"] + len(row["other_lines"])
  return (f"{row['trial']:>3} {row['terminal']:4} {delays:14} {row['where']:10} {str(row['code']):>5} {lines:>5} "
          f"{'y' if row['traceback'] else '-':>3} {'y' if row['crash'] else '-':>5} "
          f"{'n' if row['invalid'] else 'y':>5} {'n' if row['mismatches'] else 'y':>10}  {result}")


def main() -> int:
  if len(sys.argv) > 1 and sys.argv[1] == "--standalone-child":
    return standalone_main(sys.argv[2:])
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                   formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  parser.add_argument("--target", choices=TARGETS, default="lopt")
  parser.add_argument("--trials", type=int, default=20)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--out-root", type=Path, default=None, help="work directory (kept); default: a temporary one")
  parser.add_argument("--git-ref", default=None, help="test this commit's src/lopt instead of the working tree")
  parser.add_argument("--terminal", choices=("pipe", "pty", "both"), default="both",
                      help="stderr on a pipe, on a pseudo-terminal (rich live bar), or alternating")
  parser.add_argument("--early-fraction", type=float, default=0.4, help="share of SIGINTs in the first seconds")
  parser.add_argument("--early-window", type=float, default=3.0, help="what 'the first seconds' means")
  parser.add_argument("--double-fraction", type=float, default=0.2, help="share of trials with a second SIGINT")
  parser.add_argument("--compile-cache", action="store_true",
                      help="share a persistent JAX compilation cache (faster, but shortens the compilation window)")
  args = parser.parse_args()
  with tempfile.TemporaryDirectory(prefix="lopt-sigint-") as tmp:
    workdir = args.out_root or Path(tmp)
    workdir.mkdir(parents=True, exist_ok=True)
    print(HEADER)
    summary = torture(args.target, args.trials, args.seed, workdir, git_ref=args.git_ref, terminal=args.terminal,
                      early_fraction=args.early_fraction, early_window=args.early_window,
                      double_fraction=args.double_fraction, cache=args.compile_cache)
  keys = ("interrupted", "passed", "exit_130", "segfaults", "crashes", "died_of_sigint", "tracebacks", "hangs",
          "wrong_line_count",
          "invalid_directories", "resume_mismatches", "finished_before_the_signal")
  print("\n" + "\n".join(f"{k:28} {summary[k]}" for k in keys))
  print(f"{'exit codes':28} {summary['exit_codes']}")
  print(json.dumps(summary))
  return 0 if summary["passed"] == summary["interrupted"] and not summary["resume_mismatches"] else 1


if __name__ == "__main__":
  sys.exit(main())
