"""The registry of position encodings: one frozen config class per encoding, each building its module.

A position module may do three things, each a no-op by default:
  embed(positions_BxT)        -> an additive input embedding [B, T, d_model] (sinusoidal, learned)
  rotate(x_BxTxHxD, pos_BxT)  -> q or k after rotation (rope)
  bias(q_pos_BxT, k_pos_BxS)  -> an additive attention-logit bias [B, H, T, S] (alibi)
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, ClassVar, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from minilm import positions as P


class PositionModule(nnx.Module):
  """No position information at all (NoPE); subclasses override one hook each."""
  bounded: ClassVar[bool] = False  # True: positions >= max_len have no representation

  def embed(self, positions_BxT):
    return None

  def rotate(self, x_BxTxHxD, positions_BxT):
    return x_BxTxHxD

  def bias(self, q_pos_BxT, k_pos_BxS):
    return None


@dataclasses.dataclass(frozen=True)
class PositionConfig:
  kind: ClassVar[str] = ""

  def validate(self, model) -> None:
    """Cross-field checks against the ModelConfig; raise ConfigError."""

  def build(self, model, rngs: nnx.Rngs) -> PositionModule:
    raise NotImplementedError


REGISTRY: dict[str, type[PositionConfig]] = {}


def register(cls):
  REGISTRY[cls.kind] = cls
  return cls


def position_from_dict(data: Any, where: str, from_dict: Callable) -> PositionConfig:
  """{'kind': 'rope', 'base': 1e5} or just 'rope' -> the registered config class."""
  from minilm.config import check, check_choice
  if isinstance(data, str):
    data = {"kind": data}
  check(isinstance(data, Mapping) and "kind" in data, where,
        f"expected a position kind, one of {', '.join(map(repr, REGISTRY))}; got {data!r}")
  check_choice(f"{where}.kind", data["kind"], REGISTRY)
  rest = {k: v for k, v in data.items() if k != "kind"}
  return from_dict(REGISTRY[data["kind"]], rest, where + ".")


# ----------------------------------------------------------------------------------------- NoPE

@register
@dataclasses.dataclass(frozen=True)
class NoPE(PositionConfig):
  kind: ClassVar[str] = "nope"

  def build(self, model, rngs):
    return PositionModule()


# ----------------------------------------------------------------------------------------- RoPE

class RotaryModule(PositionModule):
  def __init__(self, cfg: "RoPE"):
    self.cfg = cfg

  def rotate(self, x_BxTxHxD, positions_BxT):
    c = self.cfg
    return P.apply_rope(x_BxTxHxD, positions_BxT, base=c.base, fraction=c.fraction,
                        partial=c.partial, layout=c.layout, theta=c.frequencies(x_BxTxHxD.shape[-1]))


@register
@dataclasses.dataclass(frozen=True)
class RoPE(PositionConfig):
  """Rotary embedding of q and k (Su et al.), with partial variants, both pair layouts and the
  context-extension scalings of HF's rope_scaling (linear, llama3)."""
  kind: ClassVar[str] = "rope"
  base: float = 10000.0
  fraction: float = 1.0
  partial: str = "neox"   # neox | p-rope
  layout: str = "half"    # half | interleaved
  scaling: str = "none"   # none | linear | llama3
  factor: float = 1.0     # linear, llama3: how many times slower the scaled pairs turn
  low_freq_factor: float = 1.0     # llama3: wavelengths beyond original_max_len / this are scaled
  high_freq_factor: float = 4.0    # llama3: wavelengths below original_max_len / this are kept
  original_max_len: int = 8192     # llama3: the context length of pretraining

  def __post_init__(self):
    from minilm.config import check, check_choice
    check(self.base > 1.0, "model.position.base", f"must be > 1; got {self.base}")
    check(0.0 < self.fraction <= 1.0, "model.position.fraction", f"must be in (0, 1]; got {self.fraction}")
    check_choice("model.position.partial", self.partial, P.PARTIAL_STYLES)
    check_choice("model.position.layout", self.layout, P.LAYOUTS)
    check_choice("model.position.scaling", self.scaling, P.ROPE_SCALINGS)
    check(self.factor > 0.0, "model.position.factor", f"must be > 0; got {self.factor}")
    check(0.0 < self.low_freq_factor < self.high_freq_factor, "model.position.high_freq_factor",
          f"must exceed low_freq_factor={self.low_freq_factor} > 0; got {self.high_freq_factor}")
    check(self.original_max_len >= 1, "model.position.original_max_len", f"must be >= 1; got {self.original_max_len}")

  def frequencies(self, head_dim: int):
    """theta of every rotated pair, float64, scaled as `scaling` says."""
    theta = P.rope_frequencies(head_dim, self.base, self.fraction, self.partial)
    return P.scale_frequencies(theta, self.scaling, self.factor, self.low_freq_factor,
                               self.high_freq_factor, self.original_max_len)

  def validate(self, model):
    from minilm.config import check
    d = model.dim_per_head
    check(d % 2 == 0, "model.head_dim", f"RoPE needs an even head_dim; got {d}")
    try:
      P.rotary_pairs(d, self.fraction, self.partial)
    except ValueError as err:
      check(False, "model.position.fraction", f"{err} (head_dim={d})".split(": ", 1)[1])

  def build(self, model, rngs):
    return RotaryModule(self)


# ---------------------------------------------------------------------------------------- ALiBi

class AlibiModule(PositionModule):
  def __init__(self, n_heads: int):
    self.n_heads = n_heads

  def bias(self, q_pos_BxT, k_pos_BxS):
    return P.alibi_bias(P.alibi_slopes(self.n_heads), q_pos_BxT, k_pos_BxS)


@register
@dataclasses.dataclass(frozen=True)
class ALiBi(PositionConfig):
  """Linear distance penalties on attention logits (Press et al. 2022)."""
  kind: ClassVar[str] = "alibi"

  def build(self, model, rngs):
    return AlibiModule(model.n_heads)


# ----------------------------------------------------------------------------- absolute encodings

class SinusoidalModule(PositionModule):
  bounded = True

  def __init__(self, max_len: int, d_model: int):
    self.max_len, self.d_model = max_len, d_model

  def embed(self, positions_BxT):
    return jnp.asarray(P.sinusoidal_table(self.max_len, self.d_model))[positions_BxT]


@register
@dataclasses.dataclass(frozen=True)
class Sinusoidal(PositionConfig):
  """Fixed sin/cos table added to the token embedding (Vaswani et al. 2017)."""
  kind: ClassVar[str] = "sinusoidal"

  def validate(self, model):
    from minilm.config import check
    check(model.d_model % 2 == 0, "model.d_model", f"sinusoidal positions need an even d_model; got {model.d_model}")

  def build(self, model, rngs):
    return SinusoidalModule(model.max_len, model.d_model)


class LearnedModule(PositionModule):
  bounded = True

  def __init__(self, rows: int, d_model: int, init_std: float, offset: int, rngs: nnx.Rngs):
    init = jax.nn.initializers.normal(init_std)
    self.offset = offset
    self.table = nnx.Param(init(rngs.params(), (rows, d_model), jnp.float32))

  def embed(self, positions_BxT):
    return self.table[...][positions_BxT + self.offset if self.offset else positions_BxT]


@register
@dataclasses.dataclass(frozen=True)
class Learned(PositionConfig):
  """A trained absolute position embedding table: position t reads row t + offset of
  max_len + offset rows (OPT keeps offset=2 rows in front, once meant for padding)."""
  kind: ClassVar[str] = "learned"
  offset: int = 0

  def __post_init__(self):
    from minilm.config import check
    check(self.offset >= 0, "model.position.offset", f"must be >= 0; got {self.offset}")

  def build(self, model, rngs):
    return LearnedModule(model.max_len + self.offset, model.d_model, model.init_std, self.offset, rngs)
