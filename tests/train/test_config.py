"""train.config: settings that cannot train are one-line config errors naming the field."""
import pytest

from helpers import smoke
from minilm import schema as C


def test_bounded_positions_refuse_seq_len_beyond_max_len():
  with pytest.raises(C.ConfigError, match=r"^data.seq_len: must be <= model.max_len=64 .*'learned'"):
    smoke(**{"model.position": "learned", "model.max_len": 64})
  with pytest.raises(C.ConfigError, match=r"^data.seq_len: .*'sinusoidal'"):
    smoke(**{"model.position": "sinusoidal", "model.max_len": 64})
  assert smoke(**{"model.max_len": 64}).model.max_len == 64  # RoPE has no table: a soft limit


def test_non_finite_or_too_small_settings_are_config_errors():
  for field, value in (("optim.lr", float("inf")), ("optim.lr", float("nan")), ("optim.eps", float("inf"))):
    with pytest.raises(C.ConfigError, match=rf"^{field}: must be a finite number"):
      smoke(**{field: value})
  with pytest.raises(C.ConfigError, match=r"^model.vocab_size: must be >= 512, the tokenizer's ids 0..511"):
    smoke(**{"model.vocab_size": 300})
  assert smoke(**{"optim.lr": 1e6}).optim.lr == 1e6   # legal: it diverges while training, see train/test_cli.py
