"""The model's config: a frozen, validated dataclass (its dict/JSON form: minilm.schema)."""
from __future__ import annotations

import dataclasses
import math
import typing

from minilm import encodings
from minilm.schema import OPTIONAL, check, check_choice


DTYPES = ("float32", "bfloat16")
MLPS = ("swiglu", "gelu", "gelu_erf", "relu")
BLOCKS = ("pre", "parallel", "post")
ATTENTIONS = ("auto", "einsum", "blocked", "dot_product")
MATMULS = ("auto", "plain", "barrier")


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
  # matmul: plain | barrier (row-major operands and float32 sums in every product, XLA:CPU's fast path)
  matmul: str = dataclasses.field(default="auto", metadata=OPTIONAL)
  remat: bool = dataclasses.field(default=False, metadata=OPTIONAL)   # recompute each block in backward

  def __post_init__(self):
    for name in ("vocab_size", "d_model", "n_layers", "n_heads", "max_len"):
      check(getattr(self, name) >= 1, f"model.{name}", f"must be >= 1; got {getattr(self, name)}")
    for name in ("n_kv_heads", "head_dim", "d_ff", "embed_dim"):
      check(getattr(self, name) >= 0, f"model.{name}", f"must be >= 0 (0 = default); got {getattr(self, name)}")
    for name in ("norm_eps", "init_std"):
      value = getattr(self, name)
      check(0 < value < math.inf, f"model.{name}", f"must be a finite number > 0; got {value}")
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
