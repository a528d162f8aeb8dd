"""minilm.cli: how a command ends on bad input: one line on stderr, exit 2."""
import subprocess
import sys

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
  with pytest.raises(RuntimeError, match="INTERNAL"):   # any other failure is a bug: its traceback is shown
    guarded(fails(RuntimeError("INTERNAL: something else")))
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


def test_an_interrupt_raised_where_python_ignores_exceptions_is_delivered_again():
  done = subprocess.run([sys.executable, "-c", SWALLOWED], cwd=ROOT, capture_output=True, text=True, timeout=60)
  assert (done.stdout, done.stderr) == ("interrupted\n", "")
