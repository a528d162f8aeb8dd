"""What the GGUF and HF importers share: a ModelConfig from Llama hyper-parameters, the Q/K row
orders of the two RoPE layouts, and filling a Decoder's parameters from a checkpoint by a name table.

A name table maps every minilm parameter path (with `{i}` for the block index) to the checkpoint's
tensor name, or to a `Tensor` for a slice of a fused tensor or a transposed (Conv1D) one.
Checkpoints store linear weights as [out, in]; nnx.Linear kernels are [in, out], so kernels are
transposed. The expected shapes come from the minilm model itself, so a mismatch between metadata
and tensors is caught before any array is used.
"""
from __future__ import annotations

import dataclasses
import functools
import re
from typing import Callable, Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from minilm.config import ModelConfig
from minilm.encodings import RoPE
from minilm.model import Decoder
from minilm.positions import rotary_pairs


def model_config(*, vocab_size: int, d_model: int, n_layers: int, n_heads: int, n_kv_heads: int,
                 head_dim: int, d_ff: int, norm_eps: float, max_len: int, tie_embeddings: bool,
                 position: RoPE, qkv_bias: bool = False) -> ModelConfig:
  """A Llama block: RMSNorm, SwiGLU, grouped-query attention with RoPE (Qwen2: q/k/v biases)."""
  return ModelConfig(vocab_size=vocab_size, d_model=d_model, n_layers=n_layers, n_heads=n_heads,
                     n_kv_heads=n_kv_heads, head_dim=head_dim, d_ff=d_ff, max_len=max_len, norm="rms",
                     norm_eps=norm_eps, mlp="swiglu", tie_embeddings=tie_embeddings, qkv_bias=qkv_bias,
                     position=position)


@dataclasses.dataclass(frozen=True)
class Tensor:
  """A minilm parameter's place in a checkpoint beyond a plain name.

  part/parts: the parameter is slice `part` of a tensor fusing `parts` of them along its rows
  (q, k, v); the rows are ordered (parts, rows), or (heads, parts, head_dim) when per_head
  (GPT-NeoX). conv1d: the weight is stored [in, out] (GPT-2's Conv1D).
  """
  name: str
  part: int = 0
  parts: int = 1
  per_head: bool = False
  conv1d: bool = False

  def stored_shape(self, want: tuple) -> tuple:
    """The checkpoint shape holding a parameter of [out, in] (or [out]) shape `want`."""
    fused = (want[0] * self.parts,) + tuple(want[1:])
    return fused[::-1] if self.conv1d else fused

  def select(self, array: np.ndarray, heads: int) -> np.ndarray:
    """This parameter, [out, in] or [out], from the stored tensor."""
    rows = array.T if self.conv1d else array
    if self.parts == 1:
      return rows
    groups = heads if self.per_head else 1
    return rows.reshape((groups, self.parts, -1) + rows.shape[1:])[:, self.part].reshape((-1,) + rows.shape[1:])


def reorder_rows(w_Ox: np.ndarray, heads: int, src: str, dst: str, span: int = 0) -> np.ndarray:
  """Move each head's Q or K rows (weight [out, in] or bias [out]) between the RoPE pair layouts.

  half: pair j is rows (j, j + span/2) of the head; interleaved: rows (2j, 2j + 1). span: the
  rotary rows at the head's start (0: all; partial RoPE leaves the rest in place). llama.cpp stores
  interleaved rows (it permutes HF's half-split weights on conversion); HF stores half-split ones.
  """
  if src == dst:
    return w_Ox
  D, rest = w_Ox.shape[0] // heads, w_Ox.shape[1:]
  span = span or D
  w = w_Ox.reshape((heads, D) + rest)
  split = (heads, 2, span // 2) if src == "half" else (heads, span // 2, 2)
  rotary = w[:, :span].reshape(split + rest).swapaxes(1, 2).reshape((heads, span) + rest)
  return np.concatenate([rotary, w[:, span:]], axis=1).reshape(w_Ox.shape)


def _template(path: tuple) -> tuple[str, int | None]:
  """('blocks', 3, 'attn', 'q', 'kernel') -> ('blocks.{i}.attn.q.kernel', 3)."""
  target = ".".join(map(str, path))
  layer = path[1] if path[0] == "blocks" else None
  return re.sub(r"^blocks\.\d+\.", "blocks.{i}.", target), layer


def build_decoder(cfg: ModelConfig, names: Mapping[str, str | Tensor], shapes: Mapping[str, tuple],
                  fetch: Callable[[str], np.ndarray], *, source: str, native_layout: str,
                  ignore: Callable[[str], bool] = lambda name: False) -> Decoder:
  """A Decoder whose every parameter is read from the checkpoint (no random init is ever run).

  names: minilm path template -> tensor name template or Tensor; shapes: tensor name -> shape as
  stored; fetch(name) -> float array; native_layout: the checkpoint's Q/K row order.
  Every checkpoint tensor must be used or ignored: a tensor minilm has no place for (a bias, RoPE
  scaling factors) would otherwise be dropped silently and change the model.
  """
  graphdef, state = nnx.split(nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0))))
  values, used = nnx.to_pure_dict(state), set()
  fetch = functools.lru_cache(maxsize=2)(fetch)  # a fused q/k/v weight and bias are read once
  for path, variable in nnx.to_flat_state(state):
    template, layer = _template(path)
    spec = names[template] if isinstance(names[template], Tensor) else Tensor(names[template])
    name = spec.name.format(i=layer)
    kernel = path[-1] == "kernel"
    want = tuple(variable.get_value().shape)[::-1] if kernel else tuple(variable.get_value().shape)
    _check_shape(cfg, source, name, shapes, spec.stored_shape(want), path)
    array = _to_layout(cfg, path, spec.select(np.asarray(fetch(name), np.float32), cfg.n_heads), native_layout)
    node = values
    for key in path[:-1]:
      node = node[key]
    node[path[-1]] = jnp.asarray(array.T if kernel else array)
    used.add(name)
  extra = sorted(n for n in shapes if n not in used and not ignore(n))
  if extra:
    raise ValueError(f"{source}: unexpected tensor {extra[0]!r} ({len(extra)} in all); minilm has no "
                     f"parameter for it")
  nnx.replace_by_pure_dict(state, values)
  return nnx.merge(graphdef, state)


def _check_shape(cfg: ModelConfig, source: str, name: str, shapes: Mapping[str, tuple], want: tuple, path):
  if name not in shapes:
    raise ValueError(f"{source}: missing tensor {name!r} (minilm parameter {'.'.join(map(str, path))})")
  if tuple(shapes[name]) != want:
    raise ValueError(f"{source}: tensor {name!r} has shape {list(shapes[name])}; the config "
                     f"(d_model={cfg.d_model}, heads={cfg.n_heads}/{cfg.kv_heads}, head_dim="
                     f"{cfg.dim_per_head}, d_ff={cfg.ff_dim}, vocab={cfg.vocab_size}) needs {list(want)}")


def _to_layout(cfg: ModelConfig, path: tuple, array: np.ndarray, native_layout: str) -> np.ndarray:
  """Q and K rows (weights and biases) reordered from the checkpoint's RoPE layout to the config's."""
  heads = {"q": cfg.n_heads, "k": cfg.kv_heads}
  if not (isinstance(cfg.position, RoPE) and len(path) > 2 and path[-3] == "attn" and path[-2] in heads):
    return array
  span, _ = rotary_pairs(cfg.dim_per_head, cfg.position.fraction, cfg.position.partial)
  return reorder_rows(array, heads[path[-2]], native_layout, cfg.position.layout, span)
