"""Frozen, validated configs and their dict/JSON form.

Every config is a frozen dataclass that checks itself on construction and fails with a one-line
`ConfigError` naming the field and what is allowed. `from_dict` / `to_dict` / `override` give every
config in the lab (model, data, training, analysis) the same JSON and command-line form.
"""
from __future__ import annotations

import dataclasses
import json
import typing
from typing import Any, Mapping

from minilm import encodings


class ConfigError(ValueError):
  """A bad config value; str(err) is one line: '<field>: <what is wrong>'."""


def check(ok: bool, field: str, message: str) -> None:
  if not ok:
    raise ConfigError(f"{field}: {message}")


def check_choice(field: str, value: Any, allowed: typing.Iterable[Any]) -> None:
  allowed = tuple(allowed)
  check(value in allowed, field, f"must be one of {', '.join(map(repr, allowed))}; got {value!r}")


DTYPES = ("float32", "bfloat16")
MLPS = ("swiglu", "gelu", "gelu_erf", "relu")
BLOCKS = ("pre", "parallel", "post")
ATTENTIONS = ("auto", "einsum", "blocked", "dot_product")
MATMULS = ("auto", "plain", "barrier")
# A field added after runs were written: to_dict leaves it out while it has its default, so the
# config.json, checkpoints and stage hashes of those runs stay what they were.
OPTIONAL = {"optional": True}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """A decoder: blocks of grouped-query causal attention and an MLP, pre-norm by default."""
  section: typing.ClassVar[str] = "model"  # error messages name fields as 'model.<field>'
  vocab_size: int = 512
  d_model: int = 128
  n_layers: int = 4
  n_heads: int = 4
  n_kv_heads: int = 0          # 0: as many as n_heads (plain multi-head attention)
  head_dim: int = 0            # 0: d_model // n_heads
  d_ff: int = 0                # 0: 8/3*d_model rounded up to 32 (swiglu) or 4*d_model (the rest)
  max_len: int = 256           # longest sequence for learned/sinusoidal; a soft limit for the rest
  norm: str = "rms"            # rms | layer
  norm_eps: float = 1e-5
  mlp: str = "swiglu"          # swiglu | gelu (tanh approximation, GPT-2's gelu_new) | gelu_erf | relu
  block: str = "pre"           # pre | parallel (x + attn + mlp, GPT-NeoX) | post (norm after add, no final norm)
  tie_embeddings: bool = True
  embed_dim: int = 0           # 0: d_model; else tokens embed at this width, projected in and out (OPT)
  qkv_bias: bool = False       # biases on the q/k/v projections (Qwen2)
  bias: bool = False           # biases on every linear layer but the head (GPT-2, OPT, GPT-NeoX)
  dtype: str = "float32"       # compute dtype; parameters are always float32
  init_std: float = 0.02
  position: encodings.PositionConfig = dataclasses.field(default_factory=encodings.RoPE)
  # How, not what: implementations of the same math, equal up to float rounding (minilm.layers).
  # 'auto': the CPU paths on CPU, the plain ones on GPU/TPU, by jax.default_backend() when traced.
  # attention: einsum (full masked softmax) | blocked (einsum in blocks of queries, the upper
  #   triangle skipped; training's causal pass only) | dot_product (jax.nn.dot_product_attention,
  #   cuDNN flash on GPU). Capturing attention probabilities always takes einsum.
  attention: str = dataclasses.field(default="auto", metadata=OPTIONAL)
  # matmul: plain | barrier (the weight gradient from an explicitly transposed input, XLA:CPU's fast path)
  matmul: str = dataclasses.field(default="auto", metadata=OPTIONAL)
  remat: bool = dataclasses.field(default=False, metadata=OPTIONAL)   # recompute each block in backward

  def __post_init__(self):
    for name in ("vocab_size", "d_model", "n_layers", "n_heads", "max_len"):
      check(getattr(self, name) >= 1, f"model.{name}", f"must be >= 1; got {getattr(self, name)}")
    for name in ("n_kv_heads", "head_dim", "d_ff", "embed_dim"):
      check(getattr(self, name) >= 0, f"model.{name}", f"must be >= 0 (0 = default); got {getattr(self, name)}")
    check_choice("model.norm", self.norm, ("rms", "layer"))
    check_choice("model.mlp", self.mlp, MLPS)
    check_choice("model.block", self.block, BLOCKS)
    check_choice("model.dtype", self.dtype, DTYPES)
    check_choice("model.attention", self.attention, ATTENTIONS)
    check_choice("model.matmul", self.matmul, MATMULS)
    check(self.n_heads % self.kv_heads == 0, "model.n_kv_heads",
          f"must divide n_heads={self.n_heads}; got {self.kv_heads}")
    if not self.head_dim:
      check(self.d_model % self.n_heads == 0, "model.n_heads",
            f"must divide d_model={self.d_model} when head_dim is 0; got {self.n_heads}")
    check(isinstance(self.position, encodings.PositionConfig), "model.position",
          f"must be one of {', '.join(map(repr, encodings.REGISTRY))}; got {self.position!r}")
    self.position.validate(self)

  @property
  def kv_heads(self) -> int:
    return self.n_kv_heads or self.n_heads

  @property
  def dim_per_head(self) -> int:
    return self.head_dim or self.d_model // self.n_heads

  @property
  def token_dim(self) -> int:
    return self.embed_dim or self.d_model

  @property
  def ff_dim(self) -> int:
    if self.d_ff:
      return self.d_ff
    if self.mlp != "swiglu":
      return 4 * self.d_model
    return -(-8 * self.d_model // 3 // 32) * 32


# ---------------------------------------------------------------- dict / JSON / command-line form

def _field_types(cls) -> dict[str, Any]:
  return typing.get_type_hints(cls)


def _prefix(cls) -> str:
  section = getattr(cls, "section", "")
  return f"{section}." if section else ""


def from_dict(cls, data: Mapping[str, Any], prefix: str | None = None):
  """Build config `cls` from a (nested) dict, naming unknown fields and bad types in the error."""
  if isinstance(data, cls):
    return data
  prefix = _prefix(cls) if prefix is None else prefix
  where = prefix.rstrip(".") or cls.__name__
  if encodings.PositionConfig in getattr(cls, "__mro__", ()) and cls is encodings.PositionConfig:
    return encodings.position_from_dict(data, where, from_dict)
  check(isinstance(data, Mapping), where, f"expected a mapping; got {data!r}")
  types = _field_types(cls)
  fields = {f.name for f in dataclasses.fields(cls) if f.init}
  unknown = sorted(set(data) - fields)
  check(not unknown, f"{prefix}{unknown[0]}" if unknown else where,
        f"unknown field; allowed: {', '.join(sorted(fields))}")
  kwargs = {name: _coerce(types[name], value, f"{prefix}{name}") for name, value in data.items()}
  return cls(**kwargs)


def _coerce(tp, value, field: str):
  if dataclasses.is_dataclass(tp) or tp is encodings.PositionConfig:
    return from_dict(tp, value, field + ".")
  origin = typing.get_origin(tp)
  if tp is bool:
    check(isinstance(value, bool), field, f"expected true or false; got {value!r}")
  elif tp is int:
    check(isinstance(value, int) and not isinstance(value, bool) or
          isinstance(value, float) and value.is_integer(), field, f"expected an integer; got {value!r}")
    return int(value)
  elif tp is float:
    check(isinstance(value, (int, float)) and not isinstance(value, bool), field, f"expected a number; got {value!r}")
    return float(value)
  elif tp is str:
    check(isinstance(value, str), field, f"expected a string; got {value!r}")
  elif origin in (tuple, list):
    check(isinstance(value, (list, tuple)), field, f"expected a list; got {value!r}")
    args = typing.get_args(tp)
    item = args[0] if args else Any
    return tuple(_coerce(item, v, f"{field}[{i}]") for i, v in enumerate(value)) if item is not Any else tuple(value)
  elif origin in (dict, Mapping) or tp is dict:
    check(isinstance(value, Mapping), field, f"expected a mapping; got {value!r}")
    _, item = typing.get_args(tp) or (str, Any)
    return {str(k): (v if item is Any else _coerce(item, v, f"{field}.{k}")) for k, v in value.items()}
  return value


def to_dict(cfg, *, every: bool = False) -> dict[str, Any]:
  """Nested plain dict of a config (position configs carry their 'kind'); OPTIONAL fields at their
  default are left out unless `every`."""
  out = {}
  for f in dataclasses.fields(cfg):
    value = getattr(cfg, f.name)
    if f.metadata.get("optional") and not every and value == f.default:
      continue
    if dataclasses.is_dataclass(value):
      value = to_dict(value, every=every)
      if isinstance(getattr(cfg, f.name), encodings.PositionConfig):
        value = {"kind": getattr(cfg, f.name).kind, **value}
    elif isinstance(value, tuple):
      value = list(value)
    out[f.name] = value
  return out


def parse_value(text: str) -> Any:
  """A command-line value: JSON when it parses (1e5, true, [1,2], {"a":1}), else the raw string."""
  try:
    return json.loads(text)
  except json.JSONDecodeError:
    return text


def override(cfg, assignments: Mapping[str, Any]):
  """Return cfg with dotted fields replaced, e.g. {'model.position.base': 1e5, 'model.position': 'nope'}."""
  data, prefix = to_dict(cfg, every=True), _prefix(type(cfg))
  for dotted, value in assignments.items():
    node, keys = data, dotted.split(".")
    for i, key in enumerate(keys[:-1]):
      check(isinstance(node.get(key), dict), prefix + ".".join(keys[: i + 1]),
            f"unknown field; allowed: {', '.join(sorted(node))}")
      node = node[key]
    check(keys[-1] in node, prefix + dotted, f"unknown field; allowed: {', '.join(sorted(node))}")
    node[keys[-1]] = value
  return from_dict(type(cfg), data)
