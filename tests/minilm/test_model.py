"""The decoder with every position encoding: causality, shapes, init, dtypes, capture points, hooks,
cache, and every attention/matmul implementation of one model."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers import SMALL
from helpers import forward
from helpers import small_decoder as make
from helpers import small_tokens as tokens
from minilm import capture
from minilm.model import init_cache

ENCODINGS = ["rope", "nope", "alibi", "sinusoidal", "learned"]
EPS32 = float(np.finfo(np.float32).eps)


@pytest.mark.parametrize("position", ENCODINGS)
def test_causality_zero_gradient_from_future_tokens(position):
  """d loss_t / d x_s == 0 exactly for every s > t (nanodo's test), through the input embeddings."""
  model = make(position)
  toks = tokens(1, 10)
  emb = model.embed(toks)
  graphdef, state = nnx.split(model)

  def loss_at(embeds, t):
    logits = nnx.merge(graphdef, state)(toks, embeds_BxTxC=embeds)
    return jax.nn.log_softmax(logits[0, t])[toks[0, (t + 1) % 10]]

  grad = jax.jit(jax.grad(loss_at))   # compiled once for every t, as training runs it
  for t in [0, 4, 8]:
    g = np.asarray(grad(emb, t))[0]  # [T, C]
    assert np.all(g[t + 1:] == 0.0), f"position {t} sees the future"   # exact: masked weights are exactly 0
    assert np.abs(g[: t + 1]).sum() > 0


@pytest.mark.parametrize("position", ENCODINGS)
def test_shapes(position):
  model = make(position)
  logits, cache = capture.run(model, tokens(3, 9))
  assert logits.shape == (3, 9, 64) and logits.dtype == jnp.float32
  assert cache.stack("q").shape == (2, 3, 9, 4, 8)
  assert cache.stack("rot_k").shape == (2, 3, 9, 2, 8)  # GQA: 2 KV heads
  assert cache["blocks.1.attn.v"].shape == (3, 9, 2, 8)
  assert cache["blocks.0.attn.attn"].shape == (3, 4, 9, 9)
  assert cache.stack("resid").shape == (2, 3, 9, 32)


@pytest.mark.parametrize("position", ENCODINGS)
def test_deterministic_init(position):
  a, b, c = (nnx.state(make(position, seed=s), nnx.Param) for s in (0, 0, 1))
  jax.tree.map(np.testing.assert_array_equal, a, b)   # exact: same seed, same program
  assert any(not np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(c)))


def test_paired_arms_share_every_common_tensor():
  """Arms that differ only in position encoding start from identical shared weights."""
  flat = {p: dict(nnx.to_flat_state(nnx.state(make(p), nnx.Param))) for p in ENCODINGS}
  for p in ENCODINGS[1:]:
    common = set(flat["rope"]) & set(flat[p])
    assert len(common) == len(flat["rope"])
    for key in common:
      np.testing.assert_array_equal(flat["rope"][key][...], flat[p][key][...])   # exact: same RNG stream


@pytest.mark.parametrize("position", ENCODINGS)
def test_float32_and_bfloat16_forward_agree(position):
  """Same float32 params, bf16 compute: logits within a few bf16 steps (2^-8 relative) of float32."""
  f32 = make(position)
  bf16 = make(position, dtype="bfloat16")
  nnx.update(bf16, nnx.state(f32, nnx.Param))
  toks = tokens()
  a, b = np.asarray(forward(f32, toks)), np.asarray(forward(bf16, toks))
  # bf16 rounds each of ~20 stages on a logit's path (norms, projections, scores, softmax, MLP, head)
  # to 2^-8: random signs give ~sqrt(20) * 2^-8 = 0.018 of the largest logit; 0.05 is ~3x that.
  assert np.abs(a - b).max() <= 0.05 * np.abs(a).max()
  assert not np.array_equal(a, b)  # bf16 really was used


def test_rot_equals_plain_for_encodings_without_rope():
  for position in ["nope", "alibi", "sinusoidal", "learned"]:
    _, cache = capture.run(make(position), tokens())
    np.testing.assert_array_equal(cache["blocks.0.attn.rot_q"], cache["blocks.0.attn.q"])   # exact: the same array
  _, cache = capture.run(make("rope"), tokens())
  assert not np.allclose(cache["blocks.0.attn.rot_q"], cache["blocks.0.attn.q"])


def test_intervention_hook_sees_every_point_and_changes_the_output():
  model = make("rope")
  seen = []

  def record(name, x):
    seen.append((name, x.shape))
    return x

  np.testing.assert_array_equal(model(tokens(), intervene=record), model(tokens()))   # exact: identity hook, same ops
  assert [n for n, _ in seen] == [f"blocks.{l}.attn.{p}" for l in range(2) for p in ("q", "k", "v", "rot_q", "rot_k")]

  def zero_dim3(name, x):
    return x.at[..., 3].set(0.0) if name == "blocks.1.attn.rot_k" else x

  logits, cache = capture.run(model, tokens(), intervene=zero_dim3)
  assert np.all(np.asarray(cache["blocks.1.attn.rot_k"])[..., 3] == 0)
  assert not np.allclose(logits, model(tokens()))


def assert_cache_decoding_matches_full_forward(model):
  toks = tokens(2, 14)
  full = np.asarray(forward(model, toks))
  cache = init_cache(model.cfg, 2, 20)
  pre, cache = forward(model, toks[:, :9], cache=cache)
  steps = [pre]
  for t in range(9, 14):
    out, cache = forward(model, toks[:, t:t + 1], cache=cache)
    steps.append(out)
  # Cached decoding sums in other orders and shapes. A logit ends ~740 summed terms of random sign
  # (2 layers: norms and q/k/v/o/MLP matmuls of depth 32-128, attention over <= 20 keys; final norm,
  # head): rounding ~sqrt(n)*eps of the largest logit, 4x that as the bound.
  np.testing.assert_allclose(np.concatenate(steps, axis=1), full, rtol=0,
                             atol=4 * np.sqrt(740) * EPS32 * np.abs(full).max())


@pytest.mark.parametrize("position", ENCODINGS)
def test_kv_cache_matches_full_forward(position):
  assert_cache_decoding_matches_full_forward(make(position))


@pytest.mark.parametrize("position", ["learned", "sinusoidal"])
def test_absolute_positions_refuse_sequences_beyond_max_len(position):
  with pytest.raises(ValueError, match=r"^tokens: length 40 exceeds model.max_len=32"):
    make(position)(tokens(1, 40))
  make("rope")(tokens(1, 40))  # relative encodings have no hard limit


@pytest.mark.parametrize("position", ["learned", "sinusoidal"])
def test_absolute_positions_take_exactly_max_len(position):
  assert forward(make(position), tokens(1, SMALL["max_len"])).shape == (1, SMALL["max_len"], SMALL["vocab_size"])


@pytest.mark.parametrize("position", ENCODINGS)
def test_bfloat16_residual_stream_stays_bfloat16(position):
  """An input position embedding (float32 table) is cast to the compute dtype, not promoting the stream."""
  _, cache = capture.run(make(position, dtype="bfloat16"), tokens(), ["resid"])
  assert cache["blocks.0.resid"].dtype == jnp.bfloat16 and cache["blocks.1.resid"].dtype == jnp.bfloat16


def test_explicit_positions_take_the_masked_path_even_when_long():
  """Explicit positions need not increase along T; the blocked path (a mask by index) is for default
  positions only: with positions reversed, the blocked model equals the einsum one."""
  toks = tokens(1, 70)   # > one 64-row block
  pos = jnp.arange(70, dtype=jnp.int32)[::-1][None]
  ref = np.asarray(forward(make("rope", max_len=80, attention="einsum"), toks, pos))
  got = np.asarray(forward(make("rope", max_len=80, attention="blocked"), toks, pos))
  # the same program but for XLA's choices: rounding only, far below the change a wrong mask makes
  np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5 * np.abs(ref).max())


@pytest.mark.parametrize("layout", ["half", "interleaved"])
@pytest.mark.parametrize("partial", [("neox", 0.5), ("p-rope", 0.5), ("neox", 1.0)])
def test_rope_variants_build_and_run(layout, partial):
  model = make({"kind": "rope", "layout": layout, "partial": partial[0], "fraction": partial[1], "base": 500.0})
  assert np.isfinite(np.asarray(model(tokens()))).all()


@pytest.mark.parametrize("norm,mlp,tie", [("layer", "gelu", False), ("rms", "swiglu", True), ("layer", "relu", True),
                                          ("layer", "gelu_erf", False)])
def test_architecture_switches(norm, mlp, tie):
  model = make("rope", norm=norm, mlp=mlp, tie_embeddings=tie)
  assert hasattr(model, "lm_head") != tie
  assert np.isfinite(np.asarray(model(tokens()))).all()


# The settings the HF importers use (GPT-NeoX, OPT-350m, Llama 3.1), each on a small model.
IMPORTED = {
    "neox": dict(block="parallel", norm="layer", mlp="gelu_erf", bias=True, tie_embeddings=False,
                 position={"kind": "rope", "fraction": 0.25}),
    "opt350m": dict(block="post", norm="layer", mlp="relu", bias=True, embed_dim=16,
                    position={"kind": "learned", "offset": 2}),
    "llama3": dict(position={"kind": "rope", "scaling": "llama3", "factor": 8.0, "original_max_len": 16}),
}


@pytest.mark.parametrize("name", sorted(IMPORTED))
def test_imported_architectures_are_causal_and_decode_with_the_cache(name):
  model = make(**IMPORTED[name])
  toks = tokens(2, 14)
  edited = toks.at[:, 10].set((toks[:, 10] + 1) % SMALL["vocab_size"])
  a, b = np.asarray(forward(model, toks)), np.asarray(forward(model, edited))
  # exact: same program and shapes; the edit reaches earlier rows only through masked weights (0)
  np.testing.assert_array_equal(a[:, :10], b[:, :10])
  assert not np.allclose(a[:, 10:], b[:, 10:])
  assert_cache_decoding_matches_full_forward(model)


def param_names(model) -> set[str]:
  return {".".join(map(str, path)) for path, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def test_default_config_has_no_parameters_of_the_imported_settings():
  names = param_names(make())
  assert not [n for n in names if n.endswith("bias") or n.startswith("project")] and "final_norm.scale" in names
  opt = param_names(make(**IMPORTED["opt350m"]))
  assert {"project_in.kernel", "project_out.kernel", "blocks.0.attn.o.bias", "blocks.0.mlp.up.bias"} <= opt
  # bias=True puts biases on q, k and v too (GPT-2, OPT, GPT-NeoX), not only where qkv_bias says (Qwen2)
  assert {"blocks.0.attn.q.bias", "blocks.0.attn.k.bias", "blocks.0.attn.v.bias"} <= opt
  assert "final_norm.scale" not in opt


@pytest.mark.slow   # compiles every attention path with gradients
@pytest.mark.parametrize("position", ["rope", "alibi"])
def test_model_block_path_matches_full_path_and_stays_causal(position):
  """T=150 > one 64-row block: the default call (block-causal) equals the call with explicit
  positions (full path), and no position receives gradient from a later token."""
  model = make(position, max_len=160)
  toks = tokens(1, 150)
  explicit = jnp.arange(150, dtype=jnp.int32)[None]
  # The paths differ in attention alone: per layer, sums over D = 8 and T = 150 in another order (as above).
  full = np.asarray(model(toks, explicit))
  np.testing.assert_allclose(model(toks), full, rtol=0, atol=2 * (8 + 2 * 150) * EPS32 * np.abs(full).max())
  emb = model.embed(toks)
  graphdef, state = nnx.split(model)

  def loss_at(embeds, t):
    return jax.nn.log_softmax(nnx.merge(graphdef, state)(toks, embeds_BxTxC=embeds)[0, t])[0]

  for t in [63, 64, 100]:
    g = np.asarray(jax.grad(loss_at)(emb, t))[0]
    assert np.all(g[t + 1:] == 0.0) and np.any(g[t] != 0.0), f"position {t}"


# Implementations of one model (model.attention, model.matmul, model.remat); the first is the reference.
IMPLEMENTATIONS = [dict(attention="einsum", matmul="plain"), dict(attention="blocked", matmul="barrier"),
                   dict(attention="dot_product", matmul="plain"), dict(attention="dot_product", remat=True),
                   dict(attention="blocked", matmul="barrier", remat=True)]


@pytest.mark.slow   # compiles every attention path with gradients
@pytest.mark.parametrize("position", ["rope", "alibi"])
def test_every_implementation_gives_the_same_logits_and_gradients(position):
  """Default positions (the training path: blocked skips the upper triangle, dot_product is causal),
  explicit positions (masked paths) and gradients of a loss, T=150 > one 64-row block."""
  B, T = 2, 150
  toks = tokens(B, T)
  explicit = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
  out = []
  for kw in IMPLEMENTATIONS:
    graphdef, state = nnx.split(make(position, max_len=160, **kw))
    loss = lambda s: (nnx.merge(graphdef, s)(toks) * jnp.cos(jnp.arange(SMALL["vocab_size"]))).mean()
    grads = jax.grad(loss)(state)
    model = nnx.merge(graphdef, state)
    out.append((np.asarray(model(toks)), np.asarray(model(toks, explicit)), [np.asarray(g) for g in jax.tree.leaves(grads)]))
  # The paths compute the same sums in another order or blocking: per layer, attention's contractions
  # over D (q.k) and S (softmax normaliser, probs.v), each within n*eps relative of its magnitude
  # (recursive summation); L layers of them. The weight gradients add the sum over the B*T tokens
  # (barrier's transposed-input matmul sums them in another order).
  L, D = SMALL["n_layers"], SMALL["d_model"] // SMALL["n_heads"]
  forward = L * (D + 2 * T) * EPS32
  backward = forward + B * T * EPS32
  ref_logits, _, ref_grads = out[0]
  scale = np.abs(ref_logits).max()
  for kw, (logits, logits_explicit, grads) in zip(IMPLEMENTATIONS, out):
    np.testing.assert_allclose(logits, ref_logits, rtol=0, atol=forward * scale, err_msg=str(kw))
    np.testing.assert_allclose(logits_explicit, ref_logits, rtol=0, atol=forward * scale, err_msg=str(kw))
    for g, r in zip(grads, ref_grads):
      np.testing.assert_allclose(g, r, rtol=0, atol=backward * np.abs(r).max(), err_msg=str(kw))


def test_dot_product_keeps_captured_probabilities_and_decodes_with_the_cache():
  model = make("alibi", attention="dot_product")
  logits, cache = capture.run(model, tokens())
  # Captured probabilities take the einsum path: per layer, attention's sums over D = 8 and T = 12 reordered.
  np.testing.assert_allclose(logits, model(tokens()), rtol=0, atol=2 * (8 + 2 * 12) * EPS32 * np.abs(logits).max())
  probs = np.asarray(cache["blocks.0.attn.attn"])
  # T = 12 probabilities: the normaliser (one sign, T*eps/2), each rounded quotient and their sum (T*eps/2)
  np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=12 * EPS32)
  assert_cache_decoding_matches_full_forward(model)


def test_remat_recomputes_blocks_in_the_backward_pass():
  for remat in (False, True):
    graphdef, state = nnx.split(make("rope", remat=remat))
    jaxpr = str(jax.make_jaxpr(jax.grad(lambda s: nnx.merge(graphdef, s)(tokens()).sum()))(state))
    assert ("checkpoint" in jaxpr or "remat" in jaxpr) == remat
