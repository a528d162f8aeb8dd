"""What the GGUF and HF importers share: a ModelConfig from Llama hyper-parameters, the Q/K row
orders of the two RoPE layouts, and filling a Decoder's parameters from a checkpoint by a name table.

A name table maps every minilm parameter path (with `{i}` for the block index) to the checkpoint's
tensor name. Checkpoints store linear weights as [out, in]; nnx.Linear kernels are [in, out], so
kernels are transposed. The expected shapes come from the minilm model itself, so a mismatch between
metadata and tensors is caught before any array is used.
"""
from __future__ import annotations

import re
from typing import Callable, Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from minilm.config import ModelConfig
from minilm.encodings import RoPE
from minilm.model import Decoder


def model_config(*, vocab_size: int, d_model: int, n_layers: int, n_heads: int, n_kv_heads: int,
                 head_dim: int, d_ff: int, rope_base: float, norm_eps: float, max_len: int,
                 tie_embeddings: bool, layout: str = "half", qkv_bias: bool = False) -> ModelConfig:
  """A Llama block: RMSNorm, SwiGLU, grouped-query attention with full-width RoPE (Qwen2: q/k/v biases)."""
  return ModelConfig(vocab_size=vocab_size, d_model=d_model, n_layers=n_layers, n_heads=n_heads,
                     n_kv_heads=n_kv_heads, head_dim=head_dim, d_ff=d_ff, max_len=max_len, norm="rms",
                     norm_eps=norm_eps, mlp="swiglu", tie_embeddings=tie_embeddings, qkv_bias=qkv_bias,
                     position=RoPE(base=rope_base, layout=layout))


def reorder_rows(w_Ox: np.ndarray, heads: int, src: str, dst: str) -> np.ndarray:
  """Move each head's Q or K rows (weight [out, in] or bias [out]) between the RoPE pair layouts.

  half: pair j is rows (j, j + D/2) of the head; interleaved: rows (2j, 2j + 1). llama.cpp stores
  interleaved rows (it permutes HF's half-split weights on conversion); HF stores half-split ones.
  """
  if src == dst:
    return w_Ox
  D, rest = w_Ox.shape[0] // heads, w_Ox.shape[1:]
  split = (heads, 2, D // 2) if src == "half" else (heads, D // 2, 2)
  return w_Ox.reshape(split + rest).swapaxes(1, 2).reshape(w_Ox.shape)


def _template(path: tuple) -> tuple[str, int | None]:
  """('blocks', 3, 'attn', 'q', 'kernel') -> ('blocks.{i}.attn.q.kernel', 3)."""
  target = ".".join(map(str, path))
  layer = path[1] if path[0] == "blocks" else None
  return re.sub(r"^blocks\.\d+\.", "blocks.{i}.", target), layer


def build_decoder(cfg: ModelConfig, names: Mapping[str, str], shapes: Mapping[str, tuple],
                  fetch: Callable[[str], np.ndarray], *, source: str, native_layout: str,
                  ignore: Callable[[str], bool] = lambda name: False) -> Decoder:
  """A Decoder whose every parameter is read from the checkpoint (no random init is ever run).

  names: minilm path template -> tensor name template; shapes: tensor name -> shape as stored
  ([out, in]); fetch(name) -> float array; native_layout: the checkpoint's Q/K row order.
  Every checkpoint tensor must be used or ignored: a tensor minilm has no place for (a bias, RoPE
  scaling factors) would otherwise be dropped silently and change the model.
  """
  graphdef, state = nnx.split(nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0))))
  values, used = nnx.to_pure_dict(state), set()
  heads = {"q": cfg.n_heads, "k": cfg.kv_heads}
  for path, variable in nnx.to_flat_state(state):
    template, layer = _template(path)
    name = names[template].format(i=layer)
    kernel = path[-1] == "kernel"
    want = tuple(variable.get_value().shape)[::-1] if kernel else tuple(variable.get_value().shape)
    if name not in shapes:
      raise ValueError(f"{source}: missing tensor {name!r} (minilm parameter {'.'.join(map(str, path))})")
    if tuple(shapes[name]) != want:
      raise ValueError(f"{source}: tensor {name!r} has shape {list(shapes[name])}; the config "
                       f"(d_model={cfg.d_model}, heads={cfg.n_heads}/{cfg.kv_heads}, head_dim="
                       f"{cfg.dim_per_head}, d_ff={cfg.ff_dim}, vocab={cfg.vocab_size}) needs {list(want)}")
    array = np.asarray(fetch(name), np.float32)
    if len(path) > 2 and path[-3] == "attn" and path[-2] in heads:
      array = reorder_rows(array, heads[path[-2]], native_layout, cfg.position.layout)
    node = values
    for key in path[:-1]:
      node = node[key]
    node[path[-1]] = jnp.asarray(array.T if kernel else array)
    used.add(name)
  extra = sorted(n for n in shapes if n not in used and not ignore(n))
  if extra:
    raise ValueError(f"{source}: unexpected tensor {extra[0]!r} ({len(extra)} in all); minilm's Llama "
                     f"block has no place for it")
  nnx.replace_by_pure_dict(state, values)
  return nnx.merge(graphdef, state)
