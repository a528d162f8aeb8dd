"""ModelConfig: bad configs fail on construction with one line naming the field and what is allowed;
round trips, overrides, and the implementation settings written only when set."""
import pytest

from helpers import SMALL
from minilm.config import ModelConfig
from minilm.schema import ConfigError, from_dict, override, parse_value, to_dict
from minilm.encodings import RoPE


def one_line_error(data):
  with pytest.raises(ConfigError) as err:
    from_dict(ModelConfig, data)
  message = str(err.value)
  assert "\n" not in message
  return message


def test_rope_with_odd_head_dim():
  assert one_line_error({"d_model": 28, "n_heads": 4}).startswith("model.head_dim: RoPE needs an even head_dim; got 7")
  from_dict(ModelConfig, {"d_model": 28, "n_heads": 4, "position": "nope"})  # fine without RoPE


def test_n_heads_not_divisible_by_n_kv_heads():
  assert one_line_error({"n_heads": 6, "n_kv_heads": 4, "d_model": 48}) == "model.n_kv_heads: must divide n_heads=6; got 4"


def test_unknown_encoding_name():
  message = one_line_error({"position": "xpos"})
  assert message.startswith("model.position.kind: must be one of 'nope', 'rope', 'alibi', 'sinusoidal', 'learned'")


def test_unknown_field_and_bad_choice_and_bad_type():
  assert one_line_error({"d_modle": 64}).startswith("model.d_modle: unknown field; allowed:")
  assert one_line_error({"norm": "batch"}) == "model.norm: must be one of 'rms', 'layer'; got 'batch'"
  assert one_line_error({"n_layers": "four"}) == "model.n_layers: expected an integer; got 'four'"
  assert one_line_error({"position": {"kind": "rope", "layout": "zigzag"}}).startswith(
      "model.position.layout: must be one of 'half', 'interleaved'")
  assert one_line_error({"position": {"kind": "rope", "fraction": 0.1}, "d_model": 64, "n_heads": 4}).startswith(
      "model.position.fraction:")
  assert one_line_error({"position": {"kind": "alibi", "base": 10.0}}).startswith("model.position.base: unknown field")


def test_round_trip_and_overrides():
  cfg = from_dict(ModelConfig, {"position": {"kind": "rope", "base": 1e5, "layout": "interleaved"}, "n_kv_heads": 2})
  assert from_dict(ModelConfig, to_dict(cfg)) == cfg
  nope = override(cfg, {"position": "nope"})
  assert nope.position.kind == "nope" and nope.n_kv_heads == 2
  assert override(cfg, {"position.base": parse_value("500")}).position == RoPE(base=500.0, layout="interleaved")
  with pytest.raises(ConfigError, match=r"^model.position.bse: unknown field"):
    override(cfg, {"position.bse": 1.0})
  # another kind by its dotted name starts from that kind's defaults; the same kind keeps the rest
  assert override(cfg, {"position.kind": "alibi"}).position.kind == "alibi"
  assert override(cfg, {"position.kind": "rope"}).position == cfg.position
  with pytest.raises(ConfigError, match=r"^model.position.base: unknown field; allowed: kind$"):
    override(cfg, {"position.kind": "alibi", "position.base": 3.0})
  assert override(nope, {"position.base": 5e5, "position.kind": "rope"}).position == RoPE(base=5e5)   # in any order


def test_a_kind_given_by_name_takes_the_fields_beside_it_in_any_order():
  cfg = from_dict(ModelConfig, {"position": {"kind": "rope", "base": 1e5}})
  assert override(cfg, {"position": "rope"}).position == RoPE()   # by name: the kind at its defaults
  for given in ({"position": "rope", "position.base": 500.0}, {"position.base": 500.0, "position": "rope"}):
    assert override(cfg, given).position == RoPE(base=500.0)
  with pytest.raises(ConfigError, match=r"^model.position.base: unknown field; allowed: kind$"):
    override(cfg, {"position": "nope", "position.base": 5.0})
  with pytest.raises(ConfigError, match=r"^model.position.kind: must be one of 'nope', "):
    override(cfg, {"position": "xpos"})


def test_a_section_that_is_not_a_mapping_is_named_by_its_field():
  from train.config import ExperimentConfig
  with pytest.raises(ConfigError, match=r"^train: expected a mapping; got 5$"):
    from_dict(ExperimentConfig, {"train": 5})
  with pytest.raises(ConfigError, match=r"^model.position: expected a kind, one of .*; got 5$"):
    override(from_dict(ModelConfig, {}), {"position": 5})


def test_implementation_settings_are_written_only_when_set():
  """Configs written before these settings existed read and compare the same (absent = default)."""
  cfg = from_dict(ModelConfig, SMALL)
  assert not {"attention", "matmul", "remat"} & set(to_dict(cfg))
  assert from_dict(ModelConfig, to_dict(cfg)) == cfg
  set_ = from_dict(ModelConfig, {**SMALL, "attention": "dot_product", "remat": True})
  assert to_dict(set_)["attention"] == "dot_product" and to_dict(set_)["remat"] is True
  assert to_dict(cfg, every=True)["attention"] == "auto"
  assert override(cfg, {"matmul": "plain"}).matmul == "plain"
  with pytest.raises(ConfigError, match=r"^model.attention: must be one of 'auto', 'einsum', 'blocked', 'dot_product'; got 'flash'$"):
    from_dict(ModelConfig, {**SMALL, "attention": "flash"})
