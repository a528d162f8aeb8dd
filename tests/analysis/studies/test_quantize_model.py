"""Quantization applied to a Decoder (analysis.studies.quantize_model): KV-cache grids and hooks (one
compilation for every KV scheme), calibration on the true linear inputs, every linear quantized in a
copy, calibrated schemes, and massive columns kept in Q and K."""
from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np
import pytest
import threadpoolctl
from flax import nnx

from analysis.studies import quantize as Q
from analysis.studies import quantize_model as QM
from minilm import generate
from minilm.config import ModelConfig
from minilm.model import Decoder
from minilm.schema import ConfigError


def test_kv_per_channel_and_per_token_grids():
  rng = np.random.default_rng(5)
  k = rng.normal(size=(2, 40, 3, 8)).astype(np.float32)
  k[..., 1] = k[..., 1] * 50 + 20  # an outlier channel, as keys have
  k[:, :, 0, 4] = 0.7              # a constant channel
  per_channel = np.asarray(QM.quant_keys(jnp.asarray(k), 3, "channel"))
  per_token = np.asarray(QM.quant_keys(jnp.asarray(k), 3, "token"))
  # per channel: each (batch, head, dim) takes <= 8 values over tokens; a constant channel is exact
  assert max(len(np.unique(per_channel[b, :, h, d])) for b in range(2) for h in range(3) for d in range(8)) <= 8
  np.testing.assert_allclose(per_channel[:, :, 0, 4], 0.7, rtol=1e-6)   # 0.7 through a float32 scale and back
  # per token: each (batch, token, head) vector takes <= 8 values over dims
  assert max(len(np.unique(per_token[b, t, h])) for b in range(2) for t in range(40) for h in range(3)) <= 8
  # KVQuant's point: an outlier channel wrecks per-token grids for the other channels, not per-channel
  others = [d for d in range(8) if d != 1]
  err = lambda q: np.abs(q - k)[..., others].mean()
  assert err(per_channel) < 0.2 * err(per_token)


def test_kv_hook_touches_only_its_point():
  x = jnp.asarray(np.random.default_rng(6).normal(size=(1, 5, 2, 4)), jnp.float32)
  pre = QM.kv_args(QM.Scheme("kv", bits=3, kv_point="pre"))
  post = QM.kv_args(QM.Scheme("kv", bits=3, kv_point="post", kv_axis="token"))
  np.testing.assert_array_equal(QM.kv_hook(pre, "blocks.2.attn.k", x), QM.quant_keys(x, 3, "channel"))
  for name in ("blocks.2.attn.rot_k", "blocks.2.attn.q", "blocks.2.attn.v"):
    assert np.array_equal(QM.kv_hook(pre, name, x), x)
  np.testing.assert_array_equal(QM.kv_hook(post, "blocks.0.attn.rot_k", x), QM.quant_keys(x, 3, "token"))
  assert np.array_equal(QM.kv_hook(post, "blocks.0.attn.k", x), x)


def test_per_channel_key_grid_leaves_the_padding_out():
  """Keys of 5 prompt tokens right-padded with 3 huge ones: the per-channel grid (min and max over
  the tokens) is the unpadded one, so the prompt's quantized keys are exactly the unpadded ones."""
  x = jnp.asarray(np.random.default_rng(7).normal(size=(1, 5, 2, 4)), jnp.float32)
  padded = jnp.concatenate([x, jnp.full((1, 3, 2, 4), 1e3, jnp.float32)], axis=1)
  valid = jnp.asarray(generate.valid_tokens([5], 8))
  np.testing.assert_array_equal(QM.quant_keys(padded, 3, "channel", valid)[:, :5], QM.quant_keys(x, 3, "channel"))
  assert not np.array_equal(QM.quant_keys(padded, 3, "channel")[:, :5], QM.quant_keys(x, 3, "channel"))
  args = {**QM.kv_args(QM.Scheme("kv", bits=3, kv_point="pre")), "valid": valid}
  np.testing.assert_array_equal(QM.kv_hook(args, "blocks.0.attn.k", padded)[:, :5], QM.quant_keys(x, 3, "channel"))


def test_kv_schemes_share_one_compilation():
  """The scheme travels in traced args: a second KV scheme reuses the compiled hooked prefill."""
  cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, max_len=32)
  model = Decoder(cfg, rngs=nnx.Rngs(0))
  prompt = np.random.default_rng(1).integers(0, 64, (2, 8)).astype(np.int32)
  outs, compiled = [], generate._greedy._cache_size()
  for scheme in (QM.Scheme("kv", bits=2, kv_point="pre"), QM.Scheme("kv", bits=3, kv_point="post", kv_axis="token")):
    outs.append(generate.greedy(model, prompt, 4, hook=QM.kv_hook, hook_args=QM.kv_args(scheme)))
  assert generate._greedy._cache_size() == compiled + 1
  intervened = [np.asarray(model(prompt, intervene=functools.partial(QM.kv_hook, QM.kv_args(s)))[:, -1].argmax(-1))
                for s in (QM.Scheme("kv", bits=2, kv_point="pre"), QM.Scheme("kv", bits=3, kv_point="post", kv_axis="token"))]
  for out, first in zip(outs, intervened):  # the hooked prefill picks the same first token as the hooked forward
    np.testing.assert_array_equal(np.asarray(out)[:, 0], first)


@pytest.fixture(scope="module")
def tiny():
  cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_len=32)
  model = Decoder(cfg, rngs=nnx.Rngs(0))
  tokens = np.random.default_rng(0).integers(0, 64, (4, 16)).astype(np.int32)
  return model, tokens


@pytest.mark.parametrize("embed_dim", [16, 32])
def test_calibration_starts_from_the_stream_the_model_builds_with_a_projected_embedding(embed_dim):
  """OPT's layout: tokens embed at embed_dim and are projected in (also at d_model, where only a
  config built by hand has it). Layer 0's calibration input, through its q linear, gives the q
  that the model's own forward captures (one float32 norm and product in two programs: a few ulps)."""
  from minilm import capture
  cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, max_len=32, embed_dim=embed_dim)
  model = Decoder(cfg, rngs=nnx.Rngs(1))
  tokens = np.random.default_rng(1).integers(0, 64, (2, 8)).astype(np.int32)
  _, cache = capture.run(model, tokens, True)
  layer, block, inputs = next(iter(QM.calibrate(model, tokens)))
  assert layer == 0
  q = np.asarray(block.attn.q(jnp.asarray(inputs["attn.q"])))
  np.testing.assert_allclose(q.reshape(np.shape(cache["blocks.0.attn.q"])), np.asarray(cache["blocks.0.attn.q"]),
                             rtol=1e-5, atol=1e-5)


def test_calibration_reads_the_true_linear_inputs(tiny):
  """Every layer's, though all of them run layer 0's compiled program with their own weights."""
  model, tokens = tiny
  tokens = tokens[:3, :11]   # a shape no other test calibrates: its programs compile here
  x, pos = QM.embed(model, jnp.asarray(tokens))
  programs = QM._block_inputs._cache_size(), QM._block_output._cache_size()
  found = list(QM.calibrate(model, tokens))
  assert QM._block_inputs._cache_size() - programs[0] == 1 and QM._block_output._cache_size() - programs[1] == 1
  assert [layer for layer, *_ in found] == list(range(model.cfg.n_layers)) and model.cfg.n_layers > 1
  for layer, block, inputs in found:
    assert block is model.blocks[layer]
    # one float32 norm computed in two programs: a few ulps, fused differently by CPU
    np.testing.assert_allclose(inputs["attn.q"], np.asarray(block.attn_norm(x)).reshape(-1, 32), rtol=1e-5, atol=1e-6)
    # the inputs reproduce the linear's own output
    ref = np.asarray(block.mlp.down(jnp.asarray(inputs["mlp.down"])))
    # a float32 product over 128 terms summed in numpy's and XLA's orders: ~sqrt(128) ulps, 1e-4 ample
    np.testing.assert_allclose(inputs["mlp.down"] @ np.asarray(block.mlp.down.kernel[...]), ref, rtol=1e-4, atol=1e-6)
    x, _ = block(x, pos, model.position)


def test_quantize_model_copies_and_quantizes_every_linear(tiny):
  model, tokens = tiny
  before = {k: np.asarray(v) for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
  scheme = QM.Scheme("rtn", bits=3, group_size=16)
  quantized, _ = QM.quantize_model(model, scheme)
  for layer, (block, qblock) in enumerate(zip(model.blocks, quantized.blocks)):
    for name, lin in QM.block_linears(block).items():
      np.testing.assert_array_equal(np.asarray(QM.block_linears(qblock)[name].kernel[...]),
                                    Q.rtn(np.asarray(lin.kernel[...]), scheme.spec))
  after = {k: np.asarray(v) for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
  assert all(np.array_equal(before[k], after[k]) for k in before)  # the original is untouched
  np.testing.assert_array_equal(quantized.embed.embedding[...], model.embed.embedding[...])


@pytest.mark.parametrize("method", ["awq", "gptq", "smoothquant", "w8a8"])
def test_calibrated_schemes_run_and_stay_close(tiny, method):
  model, tokens = tiny
  scheme = QM.Scheme(method, bits=4)
  quantized, log = QM.quantize_model(model, scheme, tokens)
  ref = np.asarray(model(jnp.asarray(tokens)))
  out = np.asarray(quantized(jnp.asarray(tokens)))
  err = np.abs(out - ref).max()
  rtn_err = np.abs(np.asarray(QM.quantize_model(model, QM.Scheme("rtn", bits=4))[0](jnp.asarray(tokens))) - ref).max()
  assert 0 < err and np.isfinite(out).all()
  if method in ("smoothquant", "w8a8"):  # 8-bit everything: far closer than 4-bit weights
    assert err < rtn_err


def test_calibrated_scheme_needs_tokens(tiny):
  with pytest.raises(ConfigError, match="calib"):
    QM.quantize_model(tiny[0], QM.Scheme("gptq"))


def test_massive_columns_are_kept_in_q_and_k(tiny):
  model, tokens = tiny
  scheme = QM.Scheme("rtn_keep", bits=3, top_k=2)
  quantized, log = QM.quantize_model(model, scheme, tokens)
  keep = QM.massive_columns(QM.calib_norms(model, tokens), scheme)
  assert log["kept_columns"]["0.attn.q"] == 4 * 2 and log["kept_columns"]["1.attn.k"] == 2 * 2
  for (layer, name), cols in keep.items():
    w = np.asarray(QM.block_linears(model.blocks[layer])[name].kernel[...])
    w_hat = np.asarray(QM.block_linears(quantized.blocks[layer])[name].kernel[...])
    np.testing.assert_array_equal(w_hat[:, cols], w[:, cols])
    np.testing.assert_array_equal(w_hat[:, ~cols], Q.rtn(w, scheme.spec)[:, ~cols])


def test_the_random_keep_control_keeps_as_many_other_columns_of_each_head(tiny):
  """rtn_keep_random keeps, per head of W_q and W_k, as many columns as rtn_keep does, none of them
  rtn_keep's, drawn the same way every time; those stay float and the rest is RTN."""
  model, tokens = tiny
  scheme = QM.Scheme("rtn_keep_random", bits=3, top_k=2)
  quantized, log = QM.quantize_model(model, scheme, tokens)
  D = model.cfg.dim_per_head
  massive = QM.massive_columns(QM.calib_norms(model, tokens), scheme)
  drawn = QM.random_columns(massive, D)
  assert log["kept_columns"] == {f"{l}.{n}": int(m.sum()) for (l, n), m in massive.items()}
  draws = []
  for key, cols in drawn.items():
    m_HxD, d_HxD = massive[key].reshape(-1, D), cols.reshape(-1, D)
    np.testing.assert_array_equal(d_HxD.sum(1), m_HxD.sum(1))
    assert not (d_HxD & m_HxD).any()
    np.testing.assert_array_equal(QM.random_columns({key: massive[key]}, D)[key], cols)   # seeded by the key alone
    draws.append(tuple(np.flatnonzero(cols)))
    layer, name = key
    w = np.asarray(QM.block_linears(model.blocks[layer])[name].kernel[...])
    w_hat = np.asarray(QM.block_linears(quantized.blocks[layer])[name].kernel[...])
    np.testing.assert_array_equal(w_hat[:, cols], w[:, cols])
    np.testing.assert_array_equal(w_hat[:, ~cols], Q.rtn(w, scheme.spec)[:, ~cols])
  assert len(set(draws)) > 1   # each (layer, projection) draws its own columns


def _gram_bound(h_IxI, pairs) -> tuple[float, float]:
  """(sum of gram_error over pairs in float64, a bound on the float32 factor form's deviation from it)."""
  r = Q.gram_factor(h_IxI)
  want, bound = 0.0, 0.0
  for w, w_hat in pairs:
    one = Q.gram_error(h_IxI, w, w_hat)
    # as in test_quantize's gram test: each entry of R D off by e = (I + 3) eps32 |R| |D|
    e = (len(h_IxI) + 3) * float(np.finfo(np.float32).eps) * np.linalg.norm(np.abs(r) @ np.abs(w.astype(np.float64) - w_hat))
    want, bound = want + one, bound + 2 * np.sqrt(one) * e + e * e
  return want, bound


@pytest.mark.parametrize("method", ["awq", "gptq"])
def test_each_block_is_quantized_on_the_inputs_of_the_quantized_blocks_before_it(tiny, method):
  """Every linear of a block's q/k/v group is the scheme at its own bits applied to the fp kernel,
  calibrated on the group's input as the already-quantized earlier blocks produce it (sequential
  calibration), and the log holds that group's own errors. That input (the attention norm of the
  residual) does not depend on the block's own weights, so the quantized model replays it exactly."""
  model, tokens = tiny
  scheme = QM.Scheme(method, bits=3, group_size=16)
  spec = Q.QuantSpec(3, group_size=16)
  quantized, log = QM.quantize_model(model, scheme, tokens)
  names = ("attn.q", "attn.k", "attn.v")
  for layer, qblock, inputs in QM.calibrate(quantized, tokens):
    x, ws = inputs["attn.q"], [np.asarray(QM.block_linears(model.blocks[layer])[n].kernel[...]) for n in names]
    entry = log[f"{layer}.attn.q+attn.k+attn.v"]
    if method == "awq":
      s, alpha, errors = Q.awq_search(x, ws, spec, scheme.awq_grid)
      want = [Q.awq_scaled(w, s, spec) for w in ws]
      assert entry == {"alpha": alpha, "err_rtn": errors[0], "err_awq": errors.min()}
    else:
      with threadpoolctl.threadpool_limits(1, user_api="blas"):   # the library's H: x^T x in float32, one BLAS thread
        h = x.T @ x
        want = QM._split_columns(Q.gptq(np.concatenate(ws, axis=1), h, spec), ws)
      for key, pairs in (("err_rtn", [(w, Q.rtn(w, spec)) for w in ws]), ("err_gptq", list(zip(ws, want)))):
        value, bound = _gram_bound(h, pairs)
        assert abs(entry[key] - value) <= bound, (layer, key)
    for n, w_want in zip(names, want):
      np.testing.assert_array_equal(np.asarray(QM.block_linears(qblock)[n].kernel[...]), w_want, err_msg=f"{layer}.{n}")


def test_massive_columns_are_each_head_s_top_columns_of_x_w(tiny):
  """rtn_keep's columns from first principles: pre-RoPE q is x W_q with head h's dims in columns
  h * head_dim .. (h + 1) * head_dim, so M[h, d] is the norm over the calibration tokens of column
  h * head_dim + d of x W_q (k likewise, over the kv heads), and top_k keeps each head's largest."""
  model, tokens = tiny
  keep = QM.massive_columns(QM.calib_norms(model, tokens), QM.Scheme("rtn_keep", bits=3, top_k=2))
  D = model.cfg.d_model // model.cfg.n_heads
  for layer, block, inputs in QM.calibrate(model, tokens):
    for name in ("attn.q", "attn.k"):
      w = np.asarray(QM.block_linears(block)[name].kernel[...], np.float64)
      m_HxD = np.linalg.norm(inputs[name] @ w, axis=0).reshape(-1, D)
      ranked = np.sort(m_HxD, axis=1)
      # the library's M is a float32 forward (~1e-6 relative from this one): no near tie at the cut
      assert np.all(ranked[:, -2] > ranked[:, -3] * (1 + 1e-4))
      np.testing.assert_array_equal(keep[(layer, name)], (m_HxD >= ranked[:, -2:-1]).reshape(-1), err_msg=f"{layer}.{name}")
