"""The registry of position encodings: one frozen config class per encoding, each building its module
and answering what the analyses ask of an encoding (`bounded`, `pairing`).

A position module may do three things, each a no-op by default:
  embed(positions_BxT)        -> an additive input embedding [B, T, d_model] (sinusoidal, learned)
  rotate(x_BxTxHxD, pos_BxT)  -> q or k after rotation (rope)
  bias(q_pos_BxT, k_pos_BxS)  -> an additive attention-logit bias [B, H, T, S] (alibi)
"""
from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from minilm import positions as P
from minilm.schema import check, check_choice


class PositionModule(nnx.Module):
  """No position information at all (NoPE); subclasses override one hook each."""

  def embed(self, positions_BxT):
    return None

  def rotate(self, x_BxTxHxD, positions_BxT):
    return x_BxTxHxD

  def bias(self, q_pos_BxT, k_pos_BxS):
    return None


CONVENTION_BASE = 10000.0
"""Pairing of encodings without RoPE: half layout, base 1e4. A labelled convention only: the dim
order of a NoPE model means nothing, so its low-frequency share has the null expectation."""


@dataclasses.dataclass(frozen=True)
class Pairing:
  """Which rotary pair every dim belongs to (-1: unrotated) and each pair's frequency theta_j."""
  pair_index: np.ndarray   # [D] int, -1 for unrotated dims (partial RoPE)
  theta: np.ndarray        # [P] rad/token of the rotated pairs, decreasing (low frequency = large j)
  label: str               # e.g. 'rope half base=10000' or 'convention half base=10000 (nope)'
  is_rope: bool

  @property
  def n_pairs(self) -> int:
    return len(self.theta)

  @property
  def wavelength(self) -> np.ndarray:
    return 2 * np.pi / self.theta

  @property
  def dim_order(self) -> np.ndarray:
    """Dims sorted by rotary frequency (pair 0 first, both dims of a pair adjacent), unrotated last."""
    key = np.where(self.pair_index < 0, self.n_pairs, self.pair_index)
    return np.argsort(key, kind="stable")


REGISTRY: dict[str, type["PositionConfig"]] = {}


@dataclasses.dataclass(frozen=True)
class PositionConfig:
  kind: ClassVar[str] = ""
  registry: ClassVar[dict] = REGISTRY   # minilm.schema reads and writes a position as {'kind': ..., ...}
  bounded: ClassVar[bool] = False       # True: positions >= max_len have no representation

  def validate(self, model) -> None:
    """Cross-field checks against the ModelConfig; raise ConfigError."""

  def build(self, model, rngs: nnx.Rngs) -> PositionModule:
    raise NotImplementedError

  def pairing(self, head_dim: int) -> Pairing:
    """The rotary pairs the statistics group dims by; an encoding that rotates nothing gets the
    labelled convention."""
    return Pairing(P.rope_pair_index(head_dim, "half"), P.rope_frequencies(head_dim, CONVENTION_BASE),
                   f"convention half base={CONVENTION_BASE:g} ({self.kind})", False)


def register(cls):
  REGISTRY[cls.kind] = cls
  return cls


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
    check(1.0 < self.base < math.inf, "model.position.base", f"must be a finite number > 1; got {self.base}")
    check(0.0 < self.fraction <= 1.0, "model.position.fraction", f"must be in (0, 1]; got {self.fraction}")
    check_choice("model.position.partial", self.partial, P.PARTIAL_STYLES)
    check_choice("model.position.layout", self.layout, P.LAYOUTS)
    check_choice("model.position.scaling", self.scaling, P.ROPE_SCALINGS)
    check(0.0 < self.factor < math.inf, "model.position.factor", f"must be a finite number > 0; got {self.factor}")
    check(0.0 < self.low_freq_factor < self.high_freq_factor < math.inf, "model.position.high_freq_factor",
          f"must be finite and exceed low_freq_factor={self.low_freq_factor} > 0; got {self.high_freq_factor}")
    check(self.original_max_len >= 1, "model.position.original_max_len", f"must be >= 1; got {self.original_max_len}")

  def frequencies(self, head_dim: int):
    """theta of every rotated pair, float64, scaled as `scaling` says."""
    theta = P.rope_frequencies(head_dim, self.base, self.fraction, self.partial)
    return P.scale_frequencies(theta, self.scaling, self.factor, self.low_freq_factor,
                               self.high_freq_factor, self.original_max_len)

  def pairing(self, head_dim: int) -> Pairing:
    """The pairs with the frequencies the model rotates them by (scaled, where `scaling` says)."""
    index = P.rope_pair_index(head_dim, self.layout, self.fraction, self.partial)
    extra = "" if (self.fraction, self.partial) == (1.0, "neox") else f" fraction={self.fraction} {self.partial}"
    extra += "" if self.scaling == "none" else f" {self.scaling} x{self.factor:g}"
    return Pairing(index, self.frequencies(head_dim), f"rope {self.layout} base={self.base:g}{extra}", True)

  def validate(self, model):
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
  def __init__(self, max_len: int, d_model: int):
    self.max_len, self.d_model = max_len, d_model

  def embed(self, positions_BxT):
    return jnp.asarray(P.sinusoidal_table(self.max_len, self.d_model))[positions_BxT]


@register
@dataclasses.dataclass(frozen=True)
class Sinusoidal(PositionConfig):
  """Fixed sin/cos table added to the token embedding (Vaswani et al. 2017)."""
  kind: ClassVar[str] = "sinusoidal"
  bounded: ClassVar[bool] = True

  def validate(self, model):
    check(model.d_model % 2 == 0, "model.d_model", f"sinusoidal positions need an even d_model; got {model.d_model}")

  def build(self, model, rngs):
    return SinusoidalModule(model.max_len, model.d_model)


class LearnedModule(PositionModule):
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
  bounded: ClassVar[bool] = True
  offset: int = 0

  def __post_init__(self):
    check(self.offset >= 0, "model.position.offset", f"must be >= 0; got {self.offset}")

  def build(self, model, rngs):
    return LearnedModule(model.max_len + self.offset, model.d_model, model.init_std, self.offset, rngs)
