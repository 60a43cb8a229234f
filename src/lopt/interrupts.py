"""Ctrl-C (SIGINT) that never crashes: interrupts land only at safe points, and an interrupted CLI process ends
with ``os._exit`` instead of tearing the interpreter down under running XLA threads.

Why (reproduced by scripts/sigint_torture.py and tests/test_interrupts.py):

* Python turns SIGINT into ``KeyboardInterrupt`` in the main thread wherever it is. JAX polls for signals while it
  waits for a compilation or a computation, so the exception routinely abandons a compilation that keeps running on
  an XLA worker thread. When ``main()`` then returns 130, ``Py_FinalizeEx`` garbage-collects the JAX client
  (``~PjRtClient``) while that worker still uses the client's devices: a segmentation fault *after* the
  "interrupted" line (core dump: worker in ``PjRtLoadedExecutable::Create -> SingleDeviceSharding::Create``, main
  thread in ``Py_FinalizeEx -> ~PjRtClient``).
* A SIGINT during the imports that ``main()`` does before its ``try`` (``build_parser`` imports jax) prints a
  ``KeyboardInterrupt`` traceback; one that lands while a C extension initializes (jaxlib's ``_jax``) even comes out
  as ``ImportError: Encountered an error while initializing the extension``, which ``except KeyboardInterrupt``
  does not catch.

The API (stdlib only, so it can be imported and installed before anything heavy):

``install(message)``
    Once, first thing in the CLI's ``main()``. The process's SIGINT handler becomes ours: a first Ctrl-C sets the
    interrupted flag and, outside a ``deferred()`` region, raises ``KeyboardInterrupt`` at once (as Python does);
    inside one it only sets the flag. A second Ctrl-C prints ``message`` (if not printed yet) and ends the process
    with exit code 130 immediately (``os._exit``: nothing on disk is half-written, since every lopt file write is
    atomic and kill-safe). A SIGINT that was ignored when the process started (``nohup``, ``cmd &`` in a script)
    stays ignored.
``deferred()``
    A context manager for code that must not be cut mid-way: imports, and the training loop, which polls
    ``interrupted()`` between outer steps, writes a checkpoint and raises ``KeyboardInterrupt`` itself. Leaving the
    region after a SIGINT raises ``KeyboardInterrupt`` there (a safe point), unless an exception already propagates.
    Regions nest (only the outermost raises on leaving). In other threads a region changes nothing. Without ``install()`` (lopt used as a library, e.g. in a notebook), the region temporarily
    installs the same flag handler when Python's default handler is in place in the main thread, and a second
    Ctrl-C raises ``KeyboardInterrupt`` as usual instead of ending the process; elsewhere it changes nothing.
``interrupted()``
    Whether a SIGINT arrived (since ``install()``, ``clear()`` or, in library mode, the outermost region's start).
``check()``
    Raises ``KeyboardInterrupt`` if ``interrupted()``: an explicit safe point.
``exit_interrupted(message=None)``
    The end of an interrupted CLI run, called from ``except KeyboardInterrupt``: prints the one line (once), then,
    after ``install()``, flushes stdio and logging and calls ``os._exit(130)`` -- the interpreter's teardown (the
    crash site) is skipped, and with it the atexit callbacks (logging.shutdown, done by the flush; jax's backend
    clean-up, the crash site itself; filelock's release, done by the kernel). Without ``install()`` it returns 130.
``finish(code)``
    The end of a CLI run that did not get interrupted (exit 0, or 2 for a user error): ``exiting()``, flush, then
    ``os._exit(code)`` -- a Ctrl-C can no longer land in the interpreter's teardown. Without ``install()`` it
    returns ``code``.
``exiting()``
    Called by the CLI just before ``main()`` returns normally: a SIGINT during the interpreter's teardown then ends
    the process with the line and 130 at once, instead of a traceback from an atexit callback.
``is_interrupt(error)``
    Whether an exception is, or was caused by, a ``KeyboardInterrupt``.
``uninstall()``, ``clear()``
    Restore the previous handler; forget a past interrupt (tests, long-lived processes).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from typing import Iterator, NoReturn

EXIT_CODE = 130  # 128 + SIGINT, what shells report for an interrupted command
DEFAULT_MESSAGE = "lopt: interrupted"

# Module state. Signal handlers run in the main thread between bytecodes, so plain attributes suffice; the lock only
# orders install/uninstall against regions entered from other threads.
_lock = threading.Lock()
_installed = False          # install() was called: this process is the CLI and may end itself
_previous = None            # the handler install() replaced (restored by uninstall())
_message = DEFAULT_MESSAGE
_count = 0                  # SIGINTs received since install() / clear()
_depth = 0                  # nesting depth of deferred() regions (main thread)
_said = False               # the interrupt line was printed
_exiting = False            # exiting() was called: the work is over, no safe point lies ahead


def _handler(signum, frame) -> None:  # noqa: ARG001 -- signal handler signature
  global _count
  _count += 1
  if _installed and (_count >= 2 or _exiting):
    _stop_now()
  if _count >= 2:
    raise KeyboardInterrupt  # library mode: a second Ctrl-C behaves as Python's default does
  if _depth == 0 and not _in_gc_callback(frame):
    raise KeyboardInterrupt
  # Inside deferred(), or inside a garbage-collector callback (JAX registers one), where Python would print the
  # exception as "ignored" and drop it: only the flag; the code polls interrupted() at its next safe point.


def _in_gc_callback(frame) -> bool:
  """Whether ``frame`` (the frame a signal interrupted) runs inside one of ``gc.callbacks``."""
  import gc
  codes = {getattr(callback, "__code__", None) for callback in gc.callbacks}
  while frame is not None:
    if frame.f_code in codes:
      return True
    frame = frame.f_back
  return False


def install(message: str = DEFAULT_MESSAGE) -> bool:
  """Makes this process's SIGINT handling ours (see the module docstring); call it first thing in the CLI.

  Calling it again only updates ``message``. Returns False (and changes nothing) outside the main thread or when
  SIGINT is ignored, True otherwise.
  """
  global _installed, _previous, _message
  with _lock:
    _message = message
    if _installed:
      return True
    if threading.current_thread() is not threading.main_thread():
      return False
    current = signal.getsignal(signal.SIGINT)
    if current is signal.SIG_IGN:
      return False
    _previous = current if current is not _handler else signal.default_int_handler
    signal.signal(signal.SIGINT, _handler)
    _installed = True
    return True


def uninstall() -> None:
  """Restores the handler ``install()`` replaced and forgets any interrupt."""
  global _installed, _previous
  with _lock:
    if _installed and threading.current_thread() is threading.main_thread():
      signal.signal(signal.SIGINT, _previous if _previous is not None else signal.default_int_handler)
    _installed, _previous = False, None
  clear()


def installed() -> bool:
  return _installed


def interrupted() -> bool:
  """Whether a SIGINT arrived; what a deferred region polls at its safe points."""
  return _count > 0


def check() -> None:
  """A safe point: raises ``KeyboardInterrupt`` if a SIGINT arrived."""
  if _count > 0:
    raise KeyboardInterrupt


def clear() -> None:
  """Forgets a past interrupt (the next Ctrl-C is a first one again)."""
  global _count, _said, _exiting
  _count, _said, _exiting = 0, False, False


def exiting() -> None:
  """The command's work is done and the process is about to exit normally: from now on a SIGINT ends it at once
  (the interrupt line, exit 130) instead of raising ``KeyboardInterrupt`` into the interpreter's teardown, where it
  would print an "Exception ignored in atexit callback" traceback. Only after ``install()``."""
  global _exiting
  _exiting = True


def finish(code: int = 0) -> int:
  """Ends a CLI run that completed: after ``install()``, flushes stdio and logging and calls ``os._exit(code)``.

  The interpreter's teardown is skipped for the same reason as in ``exit_interrupted``, and one more: late in
  ``Py_FinalizeEx`` Python resets SIGINT to the default action, so a Ctrl-C arriving then killed the process by the
  signal (exit -2, no line) although its work was done (seen once in 20 torture trials). Without ``install()`` it
  returns ``code``."""
  exiting()
  if not _installed:
    return code
  _flush_everything()
  os._exit(code)


@contextlib.contextmanager
def deferred(*, raise_on_exit: bool = True) -> Iterator[None]:
  """A region in which SIGINT only sets the flag (see the module docstring).

  The code inside polls ``interrupted()`` at safe points (the training loop: after every outer step) and ends
  itself. On leaving, if a SIGINT arrived and no exception propagates, raises ``KeyboardInterrupt`` (set
  ``raise_on_exit=False`` to handle it yourself).
  """
  global _depth
  temporary = None
  main = threading.current_thread() is threading.main_thread()
  if main and not _installed and _depth == 0 and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
    clear()
    temporary = signal.signal(signal.SIGINT, _handler)
  if main:
    _depth += 1
  propagating = True
  try:
    yield
    propagating = False
  finally:
    if main:
      _depth -= 1
    if temporary is not None:
      signal.signal(signal.SIGINT, temporary)
    if not propagating and raise_on_exit and main and _depth == 0 and _count > 0:
      if temporary is not None:
        clear()
      raise KeyboardInterrupt
    if temporary is not None:
      clear()


def _say(message: str, *, raw: bool = False) -> None:
  """Prints the interrupt line once. ``raw``: straight to fd 2 (from a signal handler, where a buffered write may
  be half done and must not be re-entered)."""
  global _said
  if _said or not message:
    return
  _said = True
  line = message.rstrip("\n") + "\n"
  if raw:
    with contextlib.suppress(OSError):
      os.write(2, line.encode(errors="replace"))
    return
  try:
    sys.stderr.write(line)
    sys.stderr.flush()
  except (OSError, ValueError, RuntimeError):
    with contextlib.suppress(OSError):
      os.write(2, line.encode(errors="replace"))


def _flush_everything() -> None:
  for stream in (sys.stdout, sys.stderr):
    with contextlib.suppress(Exception):
      stream.flush()
  with contextlib.suppress(Exception):
    import logging
    for handler in list(logging.getLogger().handlers):
      handler.flush()


def _stop_now() -> NoReturn:
  """Second Ctrl-C (from the signal handler): one line at most, then exit without teardown."""
  with contextlib.suppress(Exception):
    signal.signal(signal.SIGINT, signal.SIG_IGN)
  _flush_everything()
  if not _said:
    with contextlib.suppress(OSError):
      if os.isatty(2):  # a live progress bar may hold the line and have hidden the cursor
        os.write(2, b"\x1b[?25h\r\n")
  _say(_message, raw=True)
  os._exit(EXIT_CODE)


def exit_interrupted(message: str | None = None, code: int = EXIT_CODE) -> int:
  """Ends an interrupted CLI run: the interrupt line once, then ``os._exit(code)`` after ``install()``.

  ``os._exit`` is deliberate: the normal exit (``sys.exit`` -> ``Py_FinalizeEx``) destroys the JAX client while
  XLA worker threads may still run a compilation or computation the interrupt abandoned, which is what crashed.
  What lopt keeps on disk does not need the teardown: every write is atomic (fsync + rename) and the run lock is
  an ``flock`` the kernel releases. Stdio and logging handlers are flushed first. Without ``install()`` (library or
  in-process tests) it only prints and returns ``code``.
  """
  if _installed and threading.current_thread() is threading.main_thread():
    with contextlib.suppress(Exception):
      signal.signal(signal.SIGINT, signal.SIG_IGN)  # a late Ctrl-C must not interrupt the exit itself
  _say(message if message is not None else _message)
  if not _installed:
    return code
  _flush_everything()
  os._exit(code)


def is_interrupt(error: BaseException) -> bool:
  """True for KeyboardInterrupt and for exceptions caused by one (an ImportError raised because a KeyboardInterrupt
  hit a C extension's initialization): what an ``except`` clause of the CLI should treat as Ctrl-C."""
  seen = set()
  while error is not None and id(error) not in seen:
    if isinstance(error, KeyboardInterrupt):
      return True
    seen.add(id(error))
    error = error.__cause__ or error.__context__
  return False


__all__ = ["EXIT_CODE", "install", "uninstall", "installed", "deferred", "interrupted", "check", "clear", "exiting",
           "finish", "exit_interrupted", "is_interrupt"]
