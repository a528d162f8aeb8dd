"""The one way a command ends on bad input: one line `error: <field or path>: <what is wrong>`, exit 2.

Ctrl-C and SIGTERM end a command the same way (`sigterm_as_interrupt`), and the processes a command
starts end with it (`child_env`, `end_with_parent`).

Bad settings raise ConfigError (or ValueError / FileNotFoundError) with that one line as message;
filesystem failures (full disk, read-only folder, a file where a folder should be) are OSErrors
named by their path. Neither ever reaches the user as a traceback.
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Callable, Iterator

from minilm import atomic

BAD_INPUT = 2
INTERRUPTED = 130   # Ctrl-C's exit code (128 + SIGINT)


def last_error(lines) -> str | None:
  """The last `error: ...` line among a command's output lines, without the prefix (None if none)."""
  found = [line.strip() for line in lines if line.startswith("error:")]
  return found[-1][len("error:"):].strip() if found else None


def guarded(run: Callable[[], object]) -> int:
  """Call `run`; return 0, or print the one-line error of bad input to stderr and return 2."""
  try:
    run()
  except (ValueError, OSError) as err:   # ConfigError is a ValueError
    # An OSError raised by the system carries an errno and a path; one raised by the lab carries
    # its own one-line message.
    text = atomic.describe(err) if isinstance(err, OSError) and err.errno is not None else str(err)
    print(f"error: {text}", file=sys.stderr)
    return BAD_INPUT
  except RuntimeError as err:   # jax's JaxRuntimeError: settings larger than the device's memory
    first = out_of_memory(err)
    if first is None:
      raise
    print(f"error: out of memory ({first}); lower the batch size, the sequence length or the "
          "model's size", file=sys.stderr)
    return BAD_INPUT
  return 0


def out_of_memory(err: BaseException) -> str | None:
  """The first line of jax's error for an allocation the device could not make; None for any other
  error (gRPC's RESOURCE_EXHAUSTED, say)."""
  first = str(err).splitlines()[0] if str(err) else ""
  return first if isinstance(err, RuntimeError) and "RESOURCE_EXHAUSTED" in first and "memory" in first.lower() \
      else None


_INTERRUPTS = {"raised": 0, "lost": 0}   # KeyboardInterrupts raised by `_interrupt`; those Python ignored


def _interrupt(signum, frame):
  _INTERRUPTS["raised"] += 1
  raise KeyboardInterrupt


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
  """Within the block SIGTERM raises KeyboardInterrupt as Ctrl-C does, so that cleanup (stopping
  child processes, closing checkpoint managers) runs. Only the main thread may set a handler;
  elsewhere SIGTERM keeps its default.

  An interrupt that lands in code whose exceptions Python ignores (a garbage-collection callback of
  jax's, a __del__) would be lost, and the command would go on: when no other interrupt is being
  handled, it is delivered again, to land in ordinary code."""
  if threading.current_thread() is not threading.main_thread():
    yield
    return
  _redeliver_lost()
  ctrl_c = signal.getsignal(signal.SIGINT) is signal.default_int_handler   # not where it is ignored
  handled = [signal.SIGTERM, signal.SIGINT] if ctrl_c else [signal.SIGTERM]
  previous = {s: signal.signal(s, _interrupt) for s in handled}
  try:
    yield
  finally:
    for s, handler in previous.items():
      signal.signal(s, handler)


def take_unraisable(takes: Callable[[object], bool]) -> None:
  """Put `takes` before Python's unraisable hook, for the rest of the process: an exception that
  Python ignores (in a __del__, a gc callback, a thread's callback) and `takes` returns True for is
  not shown; any other reaches the hook as before."""
  shown = sys.unraisablehook
  sys.unraisablehook = lambda unraisable: takes(unraisable) or shown(unraisable)


@functools.cache   # once per process; it acts only while a block holds the handler
def _redeliver_lost() -> None:
  take_unraisable(_take_lost)


def _take_lost(unraisable) -> bool:
  if not (isinstance(unraisable.exc_value, KeyboardInterrupt) and signal.getsignal(signal.SIGTERM) is _interrupt):
    return False
  _INTERRUPTS["lost"] += 1
  if _INTERRUPTS["lost"] == _INTERRUPTS["raised"]:   # none is being handled: the command would go on
    timer = threading.Timer(0.05, _deliver)
    timer.daemon = True
    timer.start()
  return True


def _deliver() -> None:
  if signal.getsignal(signal.SIGTERM) is _interrupt:   # the block has not ended meanwhile
    signal.pthread_kill(threading.main_thread().ident, signal.SIGTERM)


@contextlib.contextmanager
def uninterrupted() -> Iterator[None]:
  """Within the block Ctrl-C and SIGTERM are ignored (main thread only): for cleanup that must end,
  such as the threads of a save already interrupted once."""
  if threading.current_thread() is not threading.main_thread():
    yield
    return
  previous = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
  try:
    yield
  finally:
    for s, handler in previous.items():
      signal.signal(s, handler)


@contextlib.contextmanager
def deferred() -> Iterator[None]:
  """Within the block a first Ctrl-C or SIGTERM waits for the block to end and is raised there (as
  KeyboardInterrupt); a second one interrupts at once. For third-party work that must not be cut
  halfway by an exception it never expects: an orbax save or restore, where an interrupt landing in
  its event loop's set-up or in a callback from C++ leaves tracebacks at exit, or aborts the process."""
  if threading.current_thread() is not threading.main_thread():
    yield
    return
  previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
  interruptible = [s for s, h in previous.items() if h in (_interrupt, signal.default_int_handler)]
  pending = []

  def later(signum, frame):
    if pending:
      _interrupt(signum, frame)
    pending.append(signum)

  for s in interruptible:
    signal.signal(s, later)
  try:
    yield
  finally:
    for s in interruptible:
      signal.signal(s, previous[s])
  if pending:
    _interrupt(pending[0], None)


PARENT = "MINILM_PARENT_PID"
"""Set by `child_env` in a child command's environment: the pid it must not outlive."""


def child_env(env: dict | None = None) -> dict:
  """The environment of a child command that ends with this process (`end_with_parent`). A
  subprocess.Popen preexec_fn could set that up instead, but forking runs Python in the child of a
  multithreaded process (jax's), which can deadlock before exec."""
  return {**(os.environ if env is None else env), PARENT: str(os.getpid())}


def stop(procs: list[subprocess.Popen], grace_s: float = 10.0) -> None:
  """Terminate this command's still-running child commands (SIGTERM: each ends as on Ctrl-C, its
  checkpoint or output either complete or redone on resume), killing those that outlast `grace_s`."""
  for proc in procs:
    if proc.poll() is None:
      proc.terminate()
  deadline = time.monotonic() + grace_s
  for proc in procs:
    try:
      proc.wait(max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
      proc.kill()
      proc.wait()


def end_with_parent() -> None:
  """In a command started with `child_env`: get SIGTERM when the parent dies, even by SIGKILL (Linux's
  PR_SET_PDEATHSIG; elsewhere the parent ends its children itself), or now if it already has. The
  variable is dropped so that this command's own children are not tied to its parent."""
  parent = os.environ.pop(PARENT, None)
  if parent is None or not sys.platform.startswith("linux"):
    return
  ctypes.CDLL(None).prctl(1, signal.SIGTERM)   # 1: PR_SET_PDEATHSIG
  if os.getppid() != int(parent):   # it died before the line above
    os.kill(os.getpid(), signal.SIGTERM)
