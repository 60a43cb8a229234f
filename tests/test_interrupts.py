"""lopt.interrupts: Ctrl-C lands only at safe points and an interrupted CLI ends with exit 130, one line, no traceback.

Every signal test runs in a child process (signal handlers are process-wide; pytest's own must stay untouched). The
children load src/lopt/interrupts.py by path: it needs only the standard library, that is how early the CLI must
install it, and the children then start in ~50 ms. Signals are either sent by the child to itself (``os.kill`` of
the own pid runs the Python handler before it returns: deterministic) or by the test after the child said "ready".
"""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

MODULE = Path(__file__).resolve().parents[1] / "src" / "lopt" / "interrupts.py"
LINE = "lopt train: interrupted; a run resumes from its last checkpoint with --resume"

PRELUDE = f"""
import importlib.util, os, signal, sys, time
spec = importlib.util.spec_from_file_location("lopt_interrupts", {str(MODULE)!r})
interrupts = importlib.util.module_from_spec(spec); spec.loader.exec_module(interrupts)
LINE = {LINE!r}
def sigint():
  os.kill(os.getpid(), signal.SIGINT)
"""


def load_module():
  spec = importlib.util.spec_from_file_location("lopt_interrupts_test", MODULE)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def child(body: str, *, ignore_sigint: bool = False) -> subprocess.Popen:
  code = PRELUDE + textwrap.dedent(body)
  disposition = signal.SIG_IGN if ignore_sigint else signal.SIG_DFL
  return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          preexec_fn=lambda: signal.signal(signal.SIGINT, disposition))


def run(body: str, *, timeout: float = 20, ignore_sigint: bool = False) -> tuple[int, str, str]:
  process = child(body, ignore_sigint=ignore_sigint)
  out, err = process.communicate(timeout=timeout)
  return process.returncode, out, err


def assert_interrupted(code: int, err: str) -> None:
  assert code == 130, err
  assert err.splitlines() == [LINE], err
  assert "Traceback" not in err


def test_sigint_in_a_deferred_region_only_sets_the_flag_and_the_loop_stops_at_its_safe_point(tmp_path):
  checkpoint = tmp_path / "checkpoint"
  code, out, err = run(f"""
    interrupts.install(LINE)
    step = 0
    try:
      with interrupts.deferred():
        while step < 100:
          step += 1
          if step == 3:
            sigint()          # lands in the middle of "step 3": no exception here
            print("step 3 completed after the signal", flush=True)
          if interrupts.interrupted():
            open({str(checkpoint)!r}, "w").write(str(step))   # the loop's checkpoint
            raise KeyboardInterrupt
    except KeyboardInterrupt:
      interrupts.exit_interrupted()
    print("not reached")
  """)
  assert_interrupted(code, err)
  assert out.splitlines() == ["step 3 completed after the signal"]
  assert checkpoint.read_text() == "3"


def test_sigint_outside_a_region_raises_keyboardinterrupt_which_ends_as_130_with_one_line():
  code, out, err = run("""
    interrupts.install(LINE)
    try:
      sigint()
      print("not reached")
    except KeyboardInterrupt:
      interrupts.exit_interrupted()
  """)
  assert_interrupted(code, err)
  assert out == ""


def test_leaving_a_region_after_a_sigint_raises_there():
  # The CLI's imports: a SIGINT while an extension initializes must not surface as ImportError; it surfaces as a
  # KeyboardInterrupt once the imports are done.
  code, out, err = run("""
    interrupts.install(LINE)
    try:
      with interrupts.deferred():
        sigint()
        import json, decimal   # "the imports" go on
        print("imports finished", flush=True)
      print("not reached")
    except KeyboardInterrupt:
      interrupts.exit_interrupted()
  """)
  assert_interrupted(code, err)
  assert out.splitlines() == ["imports finished"]


def test_a_sigint_from_outside_during_a_training_like_loop():
  process = child("""
    interrupts.install(LINE)
    try:
      with interrupts.deferred():
        print("ready", flush=True)
        steps = 0
        while not interrupts.interrupted():
          time.sleep(0.01)   # an outer step
          steps += 1
        print("stopped at a step boundary", flush=True)
        raise KeyboardInterrupt
    except KeyboardInterrupt:
      interrupts.exit_interrupted()
  """)
  assert process.stdout.readline() == "ready\n"
  process.send_signal(signal.SIGINT)
  out, err = process.communicate(timeout=20)
  assert_interrupted(process.returncode, err)
  assert out == "stopped at a step boundary\n"


def test_a_second_sigint_stops_at_once_with_the_same_single_line():
  process = child("""
    interrupts.install(LINE)
    with interrupts.deferred():
      print("ready", flush=True)
      while True:          # never reaches a safe point (a long compilation, say)
        time.sleep(0.01)
  """)
  assert process.stdout.readline() == "ready\n"
  process.send_signal(signal.SIGINT)
  time.sleep(0.2)
  assert process.poll() is None, "a first SIGINT inside a region must not end the process"
  sent = time.monotonic()
  process.send_signal(signal.SIGINT)
  _, err = process.communicate(timeout=20)
  assert time.monotonic() - sent < 5
  assert_interrupted(process.returncode, err)


def test_after_exiting_a_late_sigint_ends_with_130_instead_of_a_traceback_in_teardown():
  code, out, err = run("""
    interrupts.install(LINE)
    interrupts.exiting()
    sigint()
    print("not reached")
  """)
  assert_interrupted(code, err)
  assert out == ""


def test_an_ignored_sigint_stays_ignored():
  code, out, err = run("""
    print(interrupts.install(LINE), signal.getsignal(signal.SIGINT) is signal.SIG_IGN, flush=True)
    sigint()
    print("still running")
  """, ignore_sigint=True)
  assert (code, out.splitlines(), err) == (0, ["False True", "still running"], "")


def test_library_mode_a_region_without_install_defers_then_restores_python_s_handler():
  code, out, err = run("""
    step = 0
    try:
      with interrupts.deferred():
        for step in range(1, 6):
          if step == 2:
            sigint()
          if interrupts.interrupted():
            break
    except KeyboardInterrupt:
      print("KeyboardInterrupt at the region's end after step", step)
    print(signal.getsignal(signal.SIGINT) is signal.default_int_handler, interrupts.interrupted())
    print(interrupts.exit_interrupted("a line"))   # without install(): prints, returns 130, does not exit
  """)
  assert code == 0, err
  assert out.splitlines() == ["KeyboardInterrupt at the region's end after step 2", "True False", "130"]
  assert err.splitlines() == ["a line"]


def test_regions_nest_and_only_the_outermost_raises():
  code, out, err = run("""
    interrupts.install(LINE)
    try:
      with interrupts.deferred():
        with interrupts.deferred():
          sigint()
        print("inner region left", interrupts.interrupted(), flush=True)
      print("not reached")
    except KeyboardInterrupt:
      interrupts.exit_interrupted()
  """)
  assert_interrupted(code, err)
  assert out.splitlines() == ["inner region left True"]


COMPILE = """
    import threading, jax, jax.numpy as jnp
    interrupts.install(LINE)
    def big(x):
      for i in range(40):
        x = jnp.tanh(x @ x + i) * jnp.sin(x)
      return jax.grad(lambda y: jnp.sum(jnp.cos(y) ** 2))(x)
    timer = threading.Timer(0.3, sigint)   # while jax compiles (~1-3 s): jax polls signals while it waits
    timer.daemon = True
"""


def test_a_sigint_during_a_jax_compilation_ends_as_130_without_the_teardown_crash():
  # The segfault: the KeyboardInterrupt abandons the compilation, which goes on on an XLA thread; sys.exit(130) then
  # runs Py_FinalizeEx, which destroys the JAX client under that thread (8 of 8 runs crashed with sys.exit here).
  # exit_interrupted() ends the process without that teardown.
  pytest.importorskip("jax")
  code, out, err = run(COMPILE + """
    try:
      timer.start()
      jax.jit(jax.vmap(big)).lower(jnp.ones((4, 64, 64))).compile()
      time.sleep(30)
    except KeyboardInterrupt:
      interrupts.exit_interrupted()
  """, timeout=90)
  assert_interrupted(code, err)


def test_a_sigint_during_a_jax_compilation_in_a_region_lets_the_compilation_finish():
  pytest.importorskip("jax")
  code, out, err = run(COMPILE + """
    try:
      with interrupts.deferred():
        timer.start()
        jax.jit(jax.vmap(big)).lower(jnp.ones((4, 64, 64))).compile()
        print("compiled", flush=True)
        while not interrupts.interrupted():   # the loop's next safe point
          time.sleep(0.01)
        raise KeyboardInterrupt
    except KeyboardInterrupt:
      interrupts.exit_interrupted()
  """, timeout=90)
  assert_interrupted(code, err)
  assert out == "compiled\n"


def test_is_interrupt_recognizes_an_error_caused_by_a_keyboardinterrupt():
  interrupts = load_module()
  try:
    try:
      raise KeyboardInterrupt
    except KeyboardInterrupt as e:
      raise ImportError("Encountered an error while initializing the extension.") from e
  except ImportError as e:
    assert interrupts.is_interrupt(e)
  assert not interrupts.is_interrupt(ValueError("x"))
  assert interrupts.is_interrupt(KeyboardInterrupt())
