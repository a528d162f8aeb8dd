"""minilm.capture and minilm.hooks: capture off lowers to the plain forward's program, a captured
point does not, and the cache is keyed by the names minilm.hooks builds."""
from __future__ import annotations

import jax
import numpy as np
from flax import nnx

from minilm import capture, hooks
from minilm.config import ModelConfig
from minilm.model import Decoder


def _decoder():
  cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_len=64)
  return Decoder(cfg, rngs=nnx.Rngs(0))


def _tokens(n=2, t=8):
  return np.random.default_rng(0).integers(0, 64, (n, t)).astype(np.int32)


def test_capture_off_lowers_to_the_plain_forward():
  graphdef, state = nnx.split(_decoder())
  toks = _tokens()
  plain = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t)).lower(state, toks).as_text()
  off = jax.jit(lambda s, t: capture.run(nnx.merge(graphdef, s), t, points=())[0]).lower(state, toks).as_text()
  assert off == plain
  with_sink = jax.jit(lambda s, t: capture.run(nnx.merge(graphdef, s), t, points=("sink",))[1].stack("sink"))
  assert with_sink.lower(state, toks).as_text() != plain


def test_the_cache_is_keyed_by_hook_names():
  _, cache = capture.run(_decoder(), _tokens(), points=("sink", "resid", "attn"))
  assert set(cache) == {hooks.name(l, p) for l in range(2) for p in ("sink", "resid", "attn")}
  assert hooks.name(1, "sink") == "blocks.1.attn.sink" and hooks.name(1, "resid") == "blocks.1.resid"
  assert all(hooks.split(hooks.name(l, p)) == (l, p) for l in range(3) for p in hooks.POINTS)
  assert cache[hooks.name(0, "sink")].shape == (2, 4, 8) and cache[hooks.name(0, "resid")].shape == (2, 8, 32)
  assert cache.stack("resid").shape == (2, 2, 8, 32)
