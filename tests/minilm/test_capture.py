"""minilm.capture and minilm.hooks: capture off lowers to the plain forward's program, a captured
point does not, capture leaves the logits as they are, and the cache is keyed by the names
minilm.hooks builds."""
from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx

from helpers import EPS32
from helpers import small_decoder as make
from helpers import small_tokens as tokens
from minilm import capture, hooks
from minilm.config import ModelConfig
from minilm.model import Decoder

ENCODINGS = ["rope", "nope", "alibi", "sinusoidal", "learned"]


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



@pytest.mark.parametrize("position", ENCODINGS)
def test_capture_does_not_change_logits(position):
  model = make(position)
  graphdef, state = nnx.split(model)
  plain = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t))
  captured = jax.jit(lambda s, t: capture.run(nnx.merge(graphdef, s), t)[0])
  toks = tokens()
  # Captured probabilities take the einsum path, the plain call the default one: per layer,
  # attention's sums over D = 8 and T = 12 may run in another order, each within n*eps.
  ref = np.asarray(plain(state, toks))
  np.testing.assert_allclose(np.asarray(captured(state, toks)), ref, rtol=0,
                             atol=2 * (8 + 2 * 12) * EPS32 * np.abs(ref).max())
