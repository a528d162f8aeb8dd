"""minilm.layers: the CPU fast paths (block-causal attention with its hand-written backward pass, the
barrier matmul with the MLP's down projection on autodiff's dot) against the plain ones, at nanoGPT's
architecture (LayerNorm, GELU, biases, learned positions) and with an additive bias (ALiBi); which
path 'auto' picks on each backend."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers import numpy_attention
from minilm.config import ModelConfig
from minilm.encodings import Learned
from minilm.layers import attend, block_causal, heads_major
from minilm.model import Decoder

EPS32 = float(np.finfo(np.float32).eps)


def _qkv(B, T, H, K, D, seed=0):
  ks = jax.random.split(jax.random.key(seed), 4)
  q, k, v = (jax.random.normal(kk, (B, T, n, D)) for kk, n in zip(ks, (H, K, K)))
  return q, k, v, jax.random.normal(ks[3], (1, H, T, T))


def test_block_causal_backward_equals_autodiff_of_the_masked_softmax():
  """Values and gradients of q, k, v and the bias, grouped-query heads, a ragged last block."""
  B, T, H, K, D = 2, 150, 4, 2, 8
  q, k, v, bias = _qkv(B, T, H, K, D)
  pos = jnp.broadcast_to(jnp.arange(T), (B, T))

  def loss(q, k, v, bias, block):
    out, _ = attend(q, heads_major(k), heads_major(v), pos, pos, bias, block=block)
    return (out * jnp.cos(out)).sum(), out

  grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True), static_argnums=4)   # compiled, as trained
  (_, full), g_full = grad(q, k, v, bias, 0)
  (_, blk), g_blk = grad(q, k, v, bias, 64)
  # Both sum the same terms in another order: the contractions over D (q.k) and over the T keys
  # (softmax normaliser, probs.v), each within n*eps of its magnitude (recursive summation). The
  # backward pass sums as many again over queries or keys (dk, dv, the bias broadcast over B).
  forward = (D + 2 * T) * EPS32
  np.testing.assert_allclose(blk, full, rtol=0, atol=forward * np.abs(full).max())
  for name, a, b in zip("q k v bias".split(), g_blk, g_full):
    np.testing.assert_allclose(a, b, rtol=0, atol=(2 * forward + B * EPS32) * np.abs(b).max(), err_msg=name)


def test_block_causal_keeps_the_compute_dtype():
  B, T, H, D = 1, 130, 2, 8
  q, k, v, _ = (x.astype(jnp.bfloat16) for x in _qkv(B, T, H, H, D))
  heads = lambda x: x.transpose(0, 2, 1, 3)[:, :, None]   # B x K x G x T x D, B x K x S x D
  @jax.jit
  def value_and_grads(q, k, v):
    out, vjp = jax.vjp(lambda q, k, v: block_causal(q, k, v, None, 64), q, k, v)
    return out, vjp(jnp.ones_like(out))

  out, grads = value_and_grads(heads(q), k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3))
  assert out.dtype == jnp.bfloat16 and all(g.dtype == jnp.bfloat16 for g in grads)


GPT = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, max_len=160, norm="layer", mlp="gelu_erf", bias=True,
           position=Learned())
# model.attention / model.matmul; the first is the reference (full masked softmax, autodiff's dots).
PATHS = [dict(attention="einsum", matmul="plain"), dict(attention="blocked", matmul="barrier"),
         dict(attention="dot_product", matmul="plain"), dict(attention="blocked", matmul="plain")]


@pytest.mark.slow   # compiles four models with gradients
def test_every_path_gives_the_same_logits_and_gradients_at_nanogpt_architecture():
  B, T = 2, 150
  toks = jax.random.randint(jax.random.key(1), (B, T), 0, GPT["vocab_size"])
  out = []
  for kw in PATHS:
    graphdef, state = nnx.split(Decoder(ModelConfig(**GPT, **kw), rngs=nnx.Rngs(0)))
    loss = lambda s: (nnx.merge(graphdef, s)(toks) * jnp.cos(jnp.arange(GPT["vocab_size"]))).mean()
    grads = {jax.tree_util.keystr(path): np.asarray(g)
             for path, g in jax.tree_util.tree_flatten_with_path(jax.grad(loss)(state))[0]}
    out.append((np.asarray(nnx.merge(graphdef, state)(toks)), grads))
  # Per layer the paths reorder attention's sums over D (q.k) and S (normaliser, probs.v), within
  # n*eps relative each; L layers of them. Weight gradients add the sum over the B*T tokens
  # (the barrier's transposed-input matmul sums them in another order).
  L, D = GPT["n_layers"], GPT["d_model"] // GPT["n_heads"]
  forward = L * (D + 2 * T) * EPS32
  backward = forward + B * T * EPS32
  # The key bias adds q.b_k to a whole row of logits, which softmax ignores: its gradient is zero
  # but for rounding in sums of terms as large as the key kernel's gradient, its scale here.
  ref_logits, ref_grads = out[0]
  scale = {name: np.abs(ref_grads[name.replace("'bias'", "'kernel'")]
                        if "'k'" in name and "'bias'" in name else r).max() for name, r in ref_grads.items()}
  for kw, (logits, grads) in zip(PATHS, out):
    np.testing.assert_allclose(logits, ref_logits, rtol=0, atol=forward * np.abs(ref_logits).max(), err_msg=str(kw))
    for name, r in ref_grads.items():
      np.testing.assert_allclose(grads[name], r, rtol=0, atol=backward * scale[name], err_msg=f"{kw} {name}")


@pytest.mark.slow   # compiles every attention path with gradients
def test_block_causal_attention_matches_full_attention():
  """Training's block-causal path (blocks of 64 queries, ragged last block) equals the full masked
  softmax, values and gradients, with grouped-query heads and an additive bias."""
  from minilm.layers import attend, heads_major
  B, T, H, K, D = 2, 150, 4, 2, 8
  ks = jax.random.split(jax.random.key(0), 4)
  q, k, v = (jax.random.normal(kk, (B, T, n, D)) for kk, n in zip(ks, (H, K, K)))
  bias = jax.random.normal(ks[3], (1, H, T, T))
  pos = jnp.broadcast_to(jnp.arange(T), (B, T))

  def loss(q, k, v, block):
    out, _ = attend(q, heads_major(k), heads_major(v), pos, pos, bias, block=block)
    return (out * jnp.cos(out)).sum(), out

  (_, full), g_full = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v, 0)
  (_, blk), g_blk = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v, 64)
  # The blocks reorder the contractions over D (q.k) and T keys (softmax normaliser, probs.v), each
  # within n*eps of its magnitude; the backward sums as many again over queries or keys.
  forward = (D + 2 * T) * EPS32
  np.testing.assert_allclose(blk, full, rtol=0, atol=forward * np.abs(full).max())
  for a, b in zip(g_blk, g_full):
    np.testing.assert_allclose(a, b, rtol=0, atol=2 * forward * np.abs(b).max())


@pytest.mark.parametrize("transpose_x", [True, False])
def test_matmul_backward_equals_autodiff(transpose_x):
  from minilm.layers import matmul
  ks = jax.random.split(jax.random.key(1), 3)
  x, w, dy = jax.random.normal(ks[0], (3, 5, 7)), jax.random.normal(ks[1], (7, 4)), jax.random.normal(ks[2], (3, 5, 4))
  ours = jax.vjp(lambda x, w: matmul(x, w, transpose_x), x, w)[1](dy)
  ref = jax.vjp(jnp.matmul, x, w)[1](dy)
  for a, b in zip(ours, ref):   # sums of <= 15 products (dw over 3*5 rows) in any order: 15*eps of the largest
    np.testing.assert_allclose(a, b, rtol=0, atol=15 * EPS32 * np.abs(b).max())


@pytest.mark.parametrize("transpose_x", [True, False])
def test_bfloat16_matmul_sums_in_float32(transpose_x):
  """At bfloat16 every product of the CPU matmul is a float32 sum of the bfloat16 inputs' exact
  products, rounded once to bfloat16: within half a bfloat16 ulp (2^-8 relative) of the float32
  reference on the same (bfloat16-valued) inputs."""
  from minilm.layers import matmul
  ks = jax.random.split(jax.random.key(2), 3)
  x, w, dy = (jax.random.normal(k, s).astype(jnp.bfloat16) for k, s in zip(ks, [(4, 64, 96), (96, 32), (4, 64, 32)]))
  y, vjp = jax.vjp(lambda x, w: matmul(x, w, transpose_x), x, w)
  ref_y, ref_vjp = jax.vjp(jnp.matmul, *(t.astype(jnp.float32) for t in (x, w)))
  assert y.dtype == jnp.bfloat16
  # float32 sums of at most 256 products are exact to 256 eps32 relative to the largest, far inside
  # bfloat16's rounding; each output is rounded once: |err| <= 2^-8 |value| + that sum error.
  for a, b, n in zip((y, *vjp(dy)), (ref_y, *ref_vjp(dy.astype(jnp.float32))), (96, 32, 256)):
    a, b = np.asarray(a.astype(jnp.float32)), np.asarray(b)
    np.testing.assert_array_less(np.abs(a - b), 2.0**-8 * np.abs(b) + n * EPS32 * np.abs(b).max())


def test_bias_gradient_sums_rows_in_float32():
  """add_bias's gradient is the sum of dy over rows: autodiff's at float32; at bfloat16 the float32
  sum of the rows rounded once (within half a bfloat16 ulp plus the float32 sum's n eps)."""
  from minilm.layers import add_bias
  ks = jax.random.split(jax.random.key(3), 3)
  y, b, dy = jax.random.normal(ks[0], (4, 64, 8)), jax.random.normal(ks[1], (8,)), jax.random.normal(ks[2], (4, 64, 8))
  ours, ref = jax.vjp(add_bias, y, b)[1](dy), jax.vjp(jnp.add, y, b)[1](dy)
  np.testing.assert_array_equal(ours[0], ref[0])
  np.testing.assert_allclose(ours[1], ref[1], rtol=0, atol=256 * EPS32 * np.abs(dy).max())
  dy16 = dy.astype(jnp.bfloat16)
  db16 = np.asarray(jax.vjp(add_bias, y.astype(jnp.bfloat16), b.astype(jnp.bfloat16))[1](dy16)[1].astype(jnp.float32))
  exact = np.asarray(dy16.astype(jnp.float32)).sum((0, 1))
  np.testing.assert_array_less(np.abs(db16 - exact), 2.0**-8 * np.abs(exact) + 256 * EPS32 * np.abs(exact).max())


def test_auto_resolves_by_backend(monkeypatch):
  from minilm import layers
  assert layers.resolve("attention", "auto") == "blocked" and layers.resolve("matmul", "auto") == "barrier"
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  assert layers.resolve("attention", "auto") == "dot_product" and layers.resolve("matmul", "auto") == "plain"
  assert layers.resolve("attention", "einsum") == "einsum"


@pytest.mark.parametrize("platform, implementation", [("cuda 12.8", "cudnn"), ("rocm 6.4", None)])
def test_dot_product_asks_for_cudnn_on_nvidia_gpus_only(monkeypatch, platform, implementation):
  """On a GPU backend, causal bfloat16 attention asks jax for cuDNN's kernel on CUDA; ROCm (also
  backend 'gpu') has no cuDNN and gets jax's own choice."""
  from jax import extend
  from minilm import layers
  asked = []
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  monkeypatch.setattr(extend.backend, "get_backend", lambda: type("Backend", (), {"platform_version": platform})())
  monkeypatch.setattr(jax.nn, "dot_product_attention", lambda *a, implementation, **kw: asked.append(implementation))
  q, k, v, _ = (x.astype(jnp.bfloat16) for x in _qkv(1, 8, 2, 2, 16))
  pos = jnp.arange(8)[None]
  layers.fused_attend(q, k, v, pos, pos, causal=True)
  assert asked == [implementation]



@pytest.mark.parametrize("block", [0, 4])
def test_attend_equals_a_float64_softmax_reference(block):
  """Query head h reads KV head h // (H/K), logits scaled by 1/sqrt(D) plus the bias, key s visible
  to query t when s's position <= t's; against numpy in float64 (blocks of 4 rows: the custom path)."""
  B, T, H, K, D = 2, 10, 4, 2, 8
  q, k, v, bias = _qkv(B, T, H, K, D, seed=5)
  pos = jnp.broadcast_to(jnp.arange(T), (B, T))
  out, _ = attend(q, heads_major(k), heads_major(v), pos, pos, bias, block=block)
  q, k, v, bias = (np.asarray(a, np.float64) for a in (q, k, v, bias))
  # KV head h // (H/K) repeated for query head h
  bias = np.broadcast_to(bias, (B, H, T, T))
  ref = np.stack([numpy_attention(q[b], np.repeat(k[b], H // K, 1), np.repeat(v[b], H // K, 1), bias[b])
                  for b in range(B)]).reshape(B, T, H, D)
  # float32 sums over D = 8 (logits) and T = 10 keys (normaliser, probs.v): (D + 2T) eps of the largest
  # value, 4x that for exp's and the division's rounding.
  np.testing.assert_allclose(out, ref, rtol=0, atol=4 * (D + 2 * T) * EPS32 * np.abs(ref).max())


def test_attend_with_explicit_positions_masks_by_position_not_index():
  """A key is visible when its position <= the query's: with positions reversed, query t sees
  keys t..T-1 (the later ones), which an index-causal mask would hide."""
  B, T, H, D = 1, 6, 2, 4
  q, k, v, _ = _qkv(B, T, H, H, D, seed=6)
  pos = jnp.arange(T)[::-1][None]
  _, probs = attend(q, heads_major(k), heads_major(v), pos, pos, with_probs=True)
  np.testing.assert_array_equal(np.asarray(probs)[0, 0] > 0, np.triu(np.ones((T, T), bool)))


def _cfg(**kw):
  return ModelConfig(**{**dict(vocab_size=16, d_model=16, n_layers=2, n_heads=2, max_len=8), **kw})


@pytest.mark.parametrize("kind", ["rms", "layer"])
def test_norm_against_its_formula(kind):
  """RMSNorm x / sqrt(mean x^2 + eps) * g; LayerNorm (x - mean) / sqrt(var + eps) * g + b: eps inside
  the root, the variance of the centred x. Inputs of rms 0.1 and eps 0.01 make eps 100% of x^2 (the
  misplaced-eps forms differ by ~40%); an offset of 3 makes an uncentred variance 900x too large."""
  from minilm.layers import Norm
  cfg = _cfg(norm=kind, norm_eps=0.01)
  norm = Norm(cfg)
  rng = np.random.default_rng(7)
  norm.scale[...] = jnp.asarray(rng.normal(size=16), jnp.float32)
  x = (0.1 * rng.normal(size=(2, 3, 16)) + (3.0 if kind == "layer" else 0.0)).astype(np.float32)
  x64, g = x.astype(np.float64), np.asarray(norm.scale[...], np.float64)
  if kind == "layer":
    norm.bias[...] = jnp.asarray(rng.normal(size=16), jnp.float32)
    c = x64 - x64.mean(-1, keepdims=True)
    ref = c / np.sqrt((c * c).mean(-1, keepdims=True) + 0.01) * g + np.asarray(norm.bias[...], np.float64)
  else:
    ref = x64 / np.sqrt((x64 * x64).mean(-1, keepdims=True) + 0.01) * g
  # float32: a mean of 16 squares (16 eps), the root, the product; the centring cancels 3 against
  # 0.1-sized deviations, losing log2(30) bits: 1e-5 of the largest value covers both (~100x eps)
  np.testing.assert_allclose(norm(jnp.asarray(x)), ref, rtol=0, atol=1e-5 * np.abs(ref).max())


def _gelu_tanh(h):
  """GELU's tanh approximation in float64."""
  return 0.5 * h * (1 + np.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h ** 3)))


def test_activations_against_their_formulas():
  """gelu is the tanh approximation (GPT-2's gelu_new), gelu_erf the exact erf form; they differ by
  up to ~5e-4 near |h| = 2, far beyond float32's 1e-6 relative (tolerance: a few ulps of exp/tanh/erf)."""
  from minilm.layers import ACTIVATIONS
  h = np.linspace(-4, 4, 81)
  tanh = _gelu_tanh(h)
  erf = 0.5 * h * (1 + np.vectorize(math.erf)(h / math.sqrt(2)))
  for name, ref in [("gelu", tanh), ("gelu_erf", erf), ("relu", np.maximum(h, 0))]:
    np.testing.assert_allclose(ACTIVATIONS[name](jnp.asarray(h, jnp.float32)), ref, rtol=0, atol=1e-6 * 4, err_msg=name)   # 1e-6 of the largest |value| (4)


@pytest.mark.parametrize("mlp", ["swiglu", "gelu"])
def test_mlp_against_its_formula(mlp):
  """swiglu: down(silu(gate x) * up x); the rest: down(act(up x)), against numpy in float64."""
  from minilm.layers import MLP
  module = MLP(_cfg(mlp=mlp, bias=True, attention="einsum", matmul="plain"), nnx.Rngs(0))
  rng = np.random.default_rng(8)
  for layer in ([module.gate] if mlp == "swiglu" else []) + [module.up, module.down]:
    layer.kernel[...] = jnp.asarray(rng.normal(size=layer.kernel.shape) / math.sqrt(layer.kernel.shape[0]), jnp.float32)
    if layer.bias is not None:
      layer.bias[...] = jnp.asarray(rng.normal(size=layer.bias.shape), jnp.float32)
  x = rng.normal(size=(2, 3, 16)).astype(np.float32)
  w = lambda layer: np.asarray(layer.kernel[...], np.float64)
  b = lambda layer: 0 if layer.bias is None else np.asarray(layer.bias[...], np.float64)
  up = x @ w(module.up) + b(module.up)
  if mlp == "swiglu":
    gate = x @ w(module.gate) + b(module.gate)
    h = gate / (1 + np.exp(-gate)) * up
  else:
    h = _gelu_tanh(up)
  ref = h @ w(module.down) + b(module.down)
  # float32 sums of 16 and ff_dim (64) products of O(1) terms: (16 + 64) eps relative to the largest output, 4x
  np.testing.assert_allclose(module(jnp.asarray(x)), ref, rtol=0, atol=4 * 80 * EPS32 * np.abs(ref).max())


def test_output_projections_start_smaller_by_sqrt_2_layers():
  """GPT-2's init: the residual writers (attention's o, the MLP's down) have std init_std/sqrt(2L),
  every other kernel init_std. Sample stds of >= 4096 normal draws are within 3% (1/sqrt(2n) ~ 1.1%);
  the tolerance 10% is far from the factor sqrt(2L) = 2.8 at L = 4."""
  from minilm.layers import Block
  cfg = _cfg(n_layers=4, d_model=64, init_std=0.05)
  block = Block(cfg, 0, nnx.Rngs(0))
  for layer, std in [(block.attn.o, 0.05 / math.sqrt(8)), (block.mlp.down, 0.05 / math.sqrt(8)),
                     (block.attn.q, 0.05), (block.mlp.up, 0.05)]:
    assert np.std(np.asarray(layer.kernel[...])) == pytest.approx(std, rel=0.1)


@pytest.mark.parametrize("kind", ["pre", "parallel", "post"])
def test_block_composes_its_norms_attention_and_mlp(kind):
  """pre: x + attn(n1(x)) then + mlp(n2(.)); parallel: x + attn(n1(x)) + mlp(n2(x)) (GPT-NeoX's two
  norms); post: n1(x + attn(x)) then n2(. + mlp(.)). The two norms get different scales (at init
  both are 1, which would hide a swap). Same ops as the block's own: equal up to fusion, 1e-6."""
  from minilm.layers import Block
  from minilm.encodings import NoPE
  cfg = _cfg(block=kind, attention="einsum", matmul="plain")
  blk = Block(cfg, 0, nnx.Rngs(0))
  blk.attn_norm.scale[...] = jnp.full((16,), 0.5)
  blk.mlp_norm.scale[...] = jnp.full((16,), 2.0)
  x = jax.random.normal(jax.random.key(9), (1, 5, 16))
  pos = jnp.arange(5)[None]
  position = NoPE().build(cfg, None)
  attn = lambda h: blk.attn(h, pos, position)[0]
  if kind == "pre":
    y = x + attn(blk.attn_norm(x))
    ref = y + blk.mlp(blk.mlp_norm(y))
  elif kind == "parallel":
    ref = x + attn(blk.attn_norm(x)) + blk.mlp(blk.mlp_norm(x))
  else:
    y = blk.attn_norm(x + attn(x))
    ref = blk.mlp_norm(y + blk.mlp(y))
  out, _ = blk(x, pos, position)
  np.testing.assert_allclose(out, ref, rtol=0, atol=1e-6 * np.abs(ref).max())
