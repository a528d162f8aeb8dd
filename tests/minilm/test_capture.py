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


def test_stack_puts_layer_l_at_index_l():
  """cache.stack(p)[l] is layer l's tensor (exact: the same arrays, stacked), not another layer's:
  a trace indexes layers by position in the stack."""
  _, cache = capture.run(_decoder(), _tokens(), points=("q", "rot_k", "resid"))
  for point in ("q", "rot_k", "resid"):
    stacked = np.asarray(cache.stack(point))
    for layer in range(2):
      np.testing.assert_array_equal(stacked[layer], np.asarray(cache[hooks.name(layer, point)]), err_msg=point)
  assert not np.array_equal(np.asarray(cache.stack("q"))[0], np.asarray(cache.stack("q"))[1])


def test_rot_points_are_the_rotation_of_the_captured_q_and_k_even_under_an_intervention():
  """rot_q/rot_k = RoPE(q/k) of what the q/k hook returned: an intervention before the rotation
  (disrupt's rope='pre') reaches the rotated tensors that attention uses."""
  from helpers import numpy_rope
  model = make("rope")
  pos = model.cfg.position
  assert (pos.fraction, pos.scaling) == (1.0, "none")  # plain RoPE: numpy_rope's rule applies

  def zero_dim3(name, x):
    return x.at[..., 3].set(0.0) if name.endswith(".q") or name.endswith(".k") else x

  toks = tokens()
  for intervene in (None, zero_dim3):
    _, cache = capture.run(model, toks, intervene=intervene)
    for layer in range(2):
      for plain, rot in (("q", "rot_q"), ("k", "rot_k")):
        x = np.asarray(cache[hooks.name(layer, plain)], np.float64)
        if intervene is not None:
          assert np.all(x[..., 3] == 0)
        want = np.stack([numpy_rope(xb, pos.base, pos.layout) for xb in x])
        # float32 angles t * theta (t <= 11: <= 2 * 11 eps of error in the angle), float32 cos/sin
        # (a few ulp) and two float32 products and a sum: <= 32 eps32 of the largest value.
        np.testing.assert_allclose(np.asarray(cache[hooks.name(layer, rot)]), want, rtol=0,
                                   atol=32 * EPS32 * np.abs(x).max(), err_msg=f"{layer} {rot}")


def test_stack_orders_layers_by_number_past_ten():
  """With 12 layers, stack(p)[l] is still layer l (numeric order: layer 10 after layer 9, not after 1)."""
  cfg = ModelConfig(vocab_size=64, d_model=16, n_layers=12, n_heads=2, n_kv_heads=1, max_len=64)
  _, cache = capture.run(Decoder(cfg, rngs=nnx.Rngs(0)), _tokens(1, 4), points=("resid",))
  stacked = np.asarray(cache.stack("resid"))
  assert stacked.shape == (12, 1, 4, 16)
  for layer in range(12):
    np.testing.assert_array_equal(stacked[layer], np.asarray(cache[hooks.name(layer, "resid")]), err_msg=str(layer))


def test_q_k_v_are_layer_0_projections_with_their_own_head_counts():
  """Layer 0's q, k, v are the block's projections of its normed input, k and v with K = 2 KV heads
  (not expanded to the H = 4 query heads, not q); rot_k keeps K heads too. The same eager operations
  on the same arrays: equal up to float32 rounding of a 32-term matmul (rtol 1e-5)."""
  model, toks = _decoder(), _tokens()
  _, cache = capture.run(model, toks, points=hooks.QKV)
  attn = model.blocks[0].attn
  h = model.blocks[0].attn_norm(model.stream_in(toks, np.broadcast_to(np.arange(8), (2, 8))))
  for point, proj, heads in (("q", attn.q, 4), ("k", attn.k, 2), ("v", attn.v, 2)):
    np.testing.assert_allclose(np.asarray(cache[hooks.name(0, point)]), np.asarray(proj(h)).reshape(2, 8, heads, 8),
                               rtol=1e-5, atol=1e-6, err_msg=point)
  assert cache[hooks.name(1, "k")].shape == cache[hooks.name(1, "rot_k")].shape == (2, 8, 2, 8)
  assert cache[hooks.name(1, "rot_q")].shape == (2, 8, 4, 8)


def test_sink_is_attention_on_key_0():
  """sink = attn[..., 0] (exact: the same probabilities), each row of attn sums to 1, and the first query,
  seeing only itself under causal attention, puts all of it on key 0. The row sum's float32 error: the
  softmax's sum of 8 exps (7 roundings of half an eps), each division or multiplication by its reciprocal
  (up to 2 roundings per term) and numpy's sum of the 8 (7 more): under 15 eps, 16 with room."""
  _, cache = capture.run(_decoder(), _tokens(), points=("attn", "sink"))
  for layer in range(2):
    attn, sink = np.asarray(cache[hooks.name(layer, "attn")]), np.asarray(cache[hooks.name(layer, "sink")])
    np.testing.assert_array_equal(sink, attn[..., 0])
    np.testing.assert_allclose(attn.sum(-1), 1.0, rtol=0, atol=16 * EPS32)
    np.testing.assert_array_equal(sink[:, :, 0], 1.0)
    assert (sink[:, :, 1:] < 1).all()
