"""The minilm decoder: token embedding, position encoding, blocks, tied or separate head."""
from __future__ import annotations

from typing import Iterable

import jax
import jax.numpy as jnp
from flax import nnx

from minilm.config import ModelConfig
from minilm.hooks import POINTS
from minilm.layers import Block, Intervene, Norm, linear, matmul_for


def capture_set(capture: Iterable[str] | bool) -> frozenset:
  """Normalise a capture request: True = every point, or an iterable of point names."""
  if capture is True:
    return frozenset(POINTS)
  names = frozenset(capture or ())
  bad = sorted(names - set(POINTS))
  if bad:
    raise ValueError(f"capture: unknown point {bad[0]!r}; allowed: {', '.join(POINTS)}")
  return names


class Decoder(nnx.Module):
  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embed = nnx.Embed(cfg.vocab_size, cfg.token_dim, dtype=jnp.dtype(cfg.dtype),
                           param_dtype=jnp.float32,
                           embedding_init=jax.nn.initializers.normal(cfg.init_std), rngs=rngs)
    self.blocks = nnx.List([Block(cfg, i, rngs) for i in range(cfg.n_layers)])
    if cfg.block != "post":  # post-norm blocks end in a norm already
      self.final_norm = Norm(cfg)
    if not cfg.tie_embeddings:
      self.lm_head = linear(cfg.token_dim, cfg.vocab_size, cfg, rngs, cfg.init_std)
    if cfg.embed_dim:
      self.project_in = linear(cfg.embed_dim, cfg.d_model, cfg, rngs, cfg.init_std)
      self.project_out = linear(cfg.d_model, cfg.embed_dim, cfg, rngs, cfg.init_std)
    # Built last, so an encoding with parameters (learned) never shifts the init of shared tensors:
    # paired arms with one seed start from identical embeddings, attention and MLP weights.
    self.position = cfg.position.build(cfg, rngs)

  def stream_in(self, tokens_BxT, positions_BxT, embeds_BxTxC=None):
    """The residual stream entering block 0 [B, T, C]: token embeddings (looked up, or given),
    projected to the model width where the embedding is narrower, plus the position encoding's own."""
    x = self.embed(tokens_BxT) if embeds_BxTxC is None else embeds_BxTxC.astype(jnp.dtype(self.cfg.dtype))
    if self.cfg.embed_dim:
      x = self.project_in(x)
    extra = self.position.embed(positions_BxT)
    return x if extra is None else x + extra.astype(x.dtype)

  def __call__(self, tokens_BxT, positions_BxT=None, *, cache=None, lengths_B=None, logits_at_B=None,
               capture: Iterable[str] | bool = (), intervene: Intervene = None, embeds_BxTxC=None):
    """Logits [B, T, V] in float32; with `cache` (see `init_cache`) returns (logits, new_cache).

    capture: points to record with `nnx.sow` (read them with `minilm.capture.run`); a Python value
      fixed at trace time, so the default () compiles to the plain forward pass.
    intervene: f(hook_name, x) -> x applied at every q/k/v/rot_q/rot_k point (e.g. disruption).
    embeds_BxTxC: token embeddings to use instead of looking tokens up (gradients and patching
      with respect to the input); tokens_BxT then only gives the shape.
    lengths_B: with `cache`, rows are right-padded: tokens at t >= lengths_B[b] are padding, and their
      cache slots stay invisible to every later query. (Without a cache right padding needs nothing:
      causal attention never lets a real token see a later one.)
    logits_at_B: logits [B, 1, V] at one position per row only (a prefill that needs the next token
      only skips the head's T x V matmul, the largest of a big-vocabulary model's prefill).
    """
    capture = capture_set(capture)
    B, T = tokens_BxT.shape
    index = None if cache is None else cache["index"]
    # Block-causal attention needs keys at the query positions, increasing along T.
    rows = attention_block(T) if positions_BxT is None and cache is None else 0
    if positions_BxT is None:
      start = 0 if cache is None else index
      positions_BxT = jnp.broadcast_to(start + jnp.arange(T, dtype=jnp.int32), (B, T))
    if self.cfg.position.bounded and cache is None and T > self.cfg.max_len:
      raise ValueError(f"tokens: length {T} exceeds model.max_len={self.cfg.max_len} for "
                       f"position encoding {self.cfg.position.kind!r}")
    x = self.stream_in(tokens_BxT, positions_BxT, embeds_BxTxC)
    key_pos_BxS = None
    if cache is not None:
      written_BxT = positions_BxT if lengths_B is None else jnp.where(
          jnp.arange(T) < lengths_B[:, None], positions_BxT, NEVER)
      key_pos_BxS = jax.lax.dynamic_update_slice(cache["pos"], written_BxT.astype(jnp.int32), (0, index))
    layers = []
    for i, block in enumerate(self.blocks):
      if self.cfg.remat and cache is None and not capture and intervene is None:
        x = _remat_block(block, x, positions_BxT, self.position, rows)
        continue
      x, layer_cache = block(x, positions_BxT, self.position, cache=None if cache is None else cache["layers"][i],
                             index=index, key_pos_BxS=key_pos_BxS, block=rows, capture=capture, intervene=intervene)
      layers.append(layer_cache)
    if logits_at_B is not None:
      x = jnp.take_along_axis(x, logits_at_B[:, None, None], axis=1)
    if self.cfg.block != "post":
      x = self.final_norm(x)
    if self.cfg.embed_dim:
      x = self.project_out(x)
    if self.cfg.tie_embeddings:
      logits = matmul_for(self.cfg.matmul)(x, self.embed.embedding[...].astype(x.dtype).T).astype(jnp.float32)
    else:
      logits = self.lm_head(x).astype(jnp.float32)
    if cache is None:
      return logits
    return logits, {"index": index + T, "pos": key_pos_BxS, "layers": layers}


@nnx.remat(static_argnums=(4,))
def _remat_block(block: Block, x_BxTxC, positions_BxT, position, rows: int):
  """A block whose activations the backward pass recomputes instead of keeping (model.remat)."""
  return block(x_BxTxC, positions_BxT, position, block=rows)[0]


def attention_block(T: int) -> int:
  """Query rows per block of block-causal attention: 64, or T/16 for long T (bounds the unrolling)."""
  return max(64, -(-T // 16))


NEVER = 2 ** 30
"""The key position of a cache slot no query may see (unwritten, or padding): beyond every query's."""


def init_cache(cfg: ModelConfig, batch: int, length: int, dtype=jnp.float32) -> dict:
  """An empty KV cache of `length` slots per layer: post-RoPE keys and values, heads-major [B, K, S, D];
  the slots' key positions [B, S] (shared by the layers; NEVER until written); the next slot to write."""
  shape = (batch, cfg.kv_heads, length, cfg.dim_per_head)
  return {"index": jnp.zeros((), jnp.int32), "pos": jnp.full((batch, length), NEVER, jnp.int32),
          "layers": [{"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)} for _ in range(cfg.n_layers)]}


def count_params(model: nnx.Module) -> int:
  return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
