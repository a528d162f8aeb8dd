"""minilm.cli: how a command ends on bad input: one line on stderr, exit 2."""
import signal
import subprocess
import sys
import time

import pytest

from helpers import ROOT
from minilm.cli import BAD_INPUT, guarded
from minilm.schema import ConfigError


def fails(err: Exception):
  def run():
    raise err
  return run


def test_bad_input_and_out_of_memory_end_in_one_line(capsys):
  assert guarded(fails(ConfigError("model.d_model: must be >= 1; got 0"))) == BAD_INPUT
  assert capsys.readouterr().err == "error: model.d_model: must be >= 1; got 0\n"
  # jax's JaxRuntimeError is a RuntimeError; its message runs over many lines
  oom = RuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 75278634107140 bytes.\nat frame ...")
  assert guarded(fails(oom)) == BAD_INPUT
  assert capsys.readouterr().err == ("error: out of memory (RESOURCE_EXHAUSTED: Out of memory allocating "
                                     "75278634107140 bytes.); lower the batch size, the sequence length or the "
                                     "model's size\n")
  for other in ("INTERNAL: something else", "RESOURCE_EXHAUSTED: a gRPC quota"):   # a bug: its traceback is shown
    with pytest.raises(RuntimeError, match=other):
      guarded(fails(RuntimeError(other)))
  assert guarded(lambda: None) == 0


SWALLOWED = """
import os, signal, time
from minilm.cli import sigterm_as_interrupt

class Collected:
  def __del__(self):   # Python ignores an exception raised here: the handler's interrupt would be lost
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(1)

try:
  with sigterm_as_interrupt():
    Collected()
    time.sleep(20)
  print("went on")
except KeyboardInterrupt:
  print("interrupted")
"""


# The first interrupt is being handled (cleanup runs) when a second one is lost: that one is not
# delivered again, and the cleanup ends. Within `uninterrupted` no signal interrupts at all.
SECOND_LOST = """
import os, signal, threading, time
from minilm.cli import sigterm_as_interrupt, uninterrupted

class Collected:
  def __del__(self):
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(1)

try:
  with sigterm_as_interrupt():
    try:
      threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGTERM)).start()
      time.sleep(20)
    finally:
      Collected()
      time.sleep(1)
      with uninterrupted():
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.5)
      print("cleaned up")
except KeyboardInterrupt:
  print("interrupted")
"""


@pytest.mark.parametrize("script, printed", [(SWALLOWED, "interrupted\n"), (SECOND_LOST, "cleaned up\ninterrupted\n")])
def test_an_interrupt_raised_where_python_ignores_exceptions_is_delivered_again_if_none_is_handled(script, printed):
  done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60)
  assert (done.stdout, done.stderr) == (printed, "")


DEFERRED = """
import os, signal, time
from minilm.cli import deferred, sigterm_as_interrupt

with sigterm_as_interrupt():
  try:
    with deferred():
      os.kill(os.getpid(), signal.SIGTERM)
      time.sleep(0.5)
      print("block ended")
    print("went on")
  except KeyboardInterrupt:
    print("interrupted after the block")
  try:
    with deferred():
      os.kill(os.getpid(), signal.SIGTERM)
      time.sleep(0.2)
      os.kill(os.getpid(), signal.SIGTERM)   # not SIGINT: a test runner's worker may pass it on ignored
      time.sleep(20)
      print("not reached")
  except KeyboardInterrupt:
    print("the second interrupted at once")
  with deferred():
    print("nothing pending")
  print("went on")
"""


def test_a_deferred_block_ends_before_the_first_interrupt_and_not_the_second():
  """An orbax save runs in `deferred`: a first Ctrl-C or SIGTERM lets it end, then stops the command;
  a second one does not wait."""
  done = subprocess.run([sys.executable, "-c", DEFERRED], cwd=ROOT, capture_output=True, text=True, timeout=60)
  assert (done.stdout, done.stderr) == ("block ended\ninterrupted after the block\nthe second interrupted at once\n"
                                        "nothing pending\nwent on\n", "")


def test_stop_terminates_children_and_kills_those_that_ignore_it():
  """One way to stop a command's children (--jobs' arms, the lab's second lane): SIGTERM first, and a
  child that ignores it is killed once the grace period is over."""
  from minilm.cli import stop
  polite = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
  deaf = subprocess.Popen([sys.executable, "-c", "import signal, sys, time\n"
                           "signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); time.sleep(60)"],
                          stdout=subprocess.PIPE, text=True)
  assert deaf.stdout.readline() == "ready\n"   # its handler is set
  start = time.monotonic()
  stop([polite, deaf], grace_s=1.0)
  assert polite.returncode == -signal.SIGTERM and deaf.returncode == -signal.SIGKILL
  assert time.monotonic() - start < 30
  stop([polite, deaf])   # already ended: nothing to do
