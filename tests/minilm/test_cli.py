"""minilm.cli: how a command ends on bad input: one line on stderr, exit 2."""
import pytest

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
