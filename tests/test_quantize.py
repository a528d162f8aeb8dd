"""Quantization schemes (analysis/studies/quantize.py), their application to a Decoder and the C6 driver."""
from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from analysis.studies import quantization as QS
from analysis.studies import quantize as Q
from analysis.studies import quantize_model as QM
from minilm import generate
from minilm.config import ModelConfig
from minilm.schema import ConfigError
from minilm.model import Decoder



EPS32 = float(np.finfo(np.float32).eps)

def correlated_inputs(rng, n, d, outlier=None):
  """Rows with strongly correlated features (a low-rank mix plus noise), optionally one loud channel."""
  x = rng.normal(size=(n, d // 4)) @ rng.normal(size=(d // 4, d)) + 0.1 * rng.normal(size=(n, d))
  if outlier is not None:
    x[:, outlier] *= 30
  return x.astype(np.float32)


@pytest.mark.parametrize("bits", [8, 4, 3])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("group_size", [0, 16])
def test_rtn_error_within_half_step(bits, symmetric, group_size):
  rng = np.random.default_rng(bits)
  w = rng.standard_t(3, size=(64, 24)).astype(np.float32)  # heavy tails: a few large weights
  spec = Q.QuantSpec(bits, symmetric, group_size)
  w_hat = Q.rtn(w, spec)
  groups = w.reshape(spec.groups(64), -1, 24)
  for g, g_hat in zip(groups, w_hat.reshape(groups.shape)):
    scale, _ = Q.grid(g, spec)
    assert np.all(np.abs(g - g_hat) <= scale / 2 * (1 + 1e-5) + 1e-7)
    levels = max(len(np.unique(g_hat[:, j])) for j in range(24))
    assert levels <= 2 ** bits
  if bits == 3:  # and rounding really happened
    assert np.abs(w - w_hat).max() > 0


def test_spec_rejects_bad_values():
  with pytest.raises(ConfigError, match="quant.bits"):
    Q.QuantSpec(bits=1)
  with pytest.raises(ConfigError, match="quant.group_size"):
    Q.rtn(np.zeros((10, 3)), Q.QuantSpec(4, group_size=4))
  with pytest.raises(ConfigError, match="scheme.method"):
    QM.Scheme("int4")


def test_kept_columns_come_back_exactly():
  rng = np.random.default_rng(0)
  w = rng.normal(size=(32, 16)).astype(np.float32)
  keep = np.zeros(16, bool)
  keep[[2, 9]] = True
  spec = Q.QuantSpec(3, group_size=8)
  w_hat = Q.rtn_keep(w, spec, keep)
  np.testing.assert_array_equal(w_hat[:, keep], w[:, keep])
  np.testing.assert_array_equal(w_hat[:, ~keep], Q.rtn(w, spec)[:, ~keep])


@pytest.mark.parametrize("bits,group_size", [(4, 0), (3, 0), (3, 32)])
def test_gptq_beats_rtn_on_correlated_inputs(bits, group_size):
  rng = np.random.default_rng(1)
  x = correlated_inputs(rng, 1024, 128)
  w = rng.normal(size=(128, 48)).astype(np.float32) * 0.05
  spec = Q.QuantSpec(bits, group_size=group_size)
  err_rtn = Q.output_error(x, w, Q.rtn(w, spec))
  err_gptq = Q.output_error(x, w, Q.gptq(w, x.T @ x, spec, block=32))
  assert err_gptq < 0.8 * err_rtn
  # the result is on the grid: each column still takes at most 2^bits values per group
  q = Q.gptq(w, x.T @ x, spec)
  assert max(len(np.unique(c)) for c in q.reshape(spec.groups(128), -1, 48).transpose(0, 2, 1).reshape(-1, 128 // spec.groups(128))) <= 2 ** bits


def test_gptq_zeroes_dead_inputs():
  rng = np.random.default_rng(2)
  x = correlated_inputs(rng, 256, 32)
  x[:, 5] = 0
  q = Q.gptq(rng.normal(size=(32, 8)), x.T @ x, Q.QuantSpec(4))
  assert np.all(q[5] == 0) and np.all(np.isfinite(q))


def gptq_reference(w_IxO, h_IxI, spec, damp=0.01, block=128):
  """GPTQ as a plain row loop in numpy float64 (H^-1 by a full inverse), the definition the
  library's blocked, jitted version must reproduce."""
  W, H = np.array(w_IxO, np.float64), np.array(h_IxI, np.float64)
  I, O = W.shape
  group = I // spec.groups(I)
  dead = np.diag(H) == 0
  H[dead, dead] = 1.0
  W[dead] = 0.0
  H[np.diag_indices(I)] += damp * np.mean(np.diag(H))
  U = np.linalg.cholesky(np.linalg.inv(H)).T
  scale, zero = Q.grid(W, spec)
  if group < I:
    block = max(group, block - block % group)
  out = np.zeros((I, O), np.float32)
  for b0 in range(0, I, block):
    b1 = min(b0 + block, I)
    Wb, Err = W[b0:b1].copy(), np.zeros((b1 - b0, O))
    for i in range(b1 - b0):
      row = b0 + i
      if group < I and row % group == 0:
        scale, zero = Q.grid(Wb[i:i + group], spec)
      out[row] = Q.fake_quant(Wb[i], scale, zero, spec)
      Err[i] = (Wb[i] - out[row]) / U[row, row]
      Wb[i:] -= np.outer(U[row, row:b1], Err[i])
    W[b1:] -= U[b0:b1, b1:].T @ Err
  return out


@pytest.mark.parametrize("bits,group_size,symmetric,block", [(4, 0, False, 128), (3, 16, False, 32), (8, 16, True, 40),
                                                             (4, 32, False, 8), (3, 0, True, 48)])
def test_gptq_equals_the_reference_loop(bits, group_size, symmetric, block):
  """Both run in float64 and round the same float32 values with the same grids; they differ only
  in how U is factored (one Cholesky + triangular inverse vs a full inverse + Cholesky) and in the
  summation order, ~1e-12 relative here (cond(H) * 1e-16). A float32 rounding can flip only for a
  value that close to a grid midpoint, which no element of these seeded matrices is, so the
  results are asserted equal, element for element."""
  rng = np.random.default_rng(bits + group_size)
  x = correlated_inputs(rng, 512, 96)
  x[:, 10] = 0  # a dead input
  w = rng.normal(size=(96, 40)).astype(np.float32) * 0.05
  spec = Q.QuantSpec(bits, symmetric, group_size)
  np.testing.assert_array_equal(Q.gptq(w, x.T @ x, spec, block=block), gptq_reference(w, x.T @ x, spec, block=block))


def test_gptq_on_side_by_side_linears_equals_gptq_on_each():
  rng = np.random.default_rng(7)
  x = correlated_inputs(rng, 512, 64)
  ws = [rng.normal(size=(64, o)).astype(np.float32) for o in (24, 8, 8)]
  spec = Q.QuantSpec(3, group_size=16)
  together = QM._split_columns(Q.gptq(np.concatenate(ws, axis=1), x.T @ x, spec), ws)
  for w, q in zip(ws, together):
    np.testing.assert_array_equal(q, Q.gptq(w, x.T @ x, spec))


def test_inverse_cholesky_factors_the_inverse():
  rng = np.random.default_rng(8)
  x = correlated_inputs(rng, 256, 48)
  h = Q.damped(x.T.astype(np.float64) @ x, 0.01)
  U = Q.inverse_cholesky(h)
  np.testing.assert_array_equal(U, np.triu(U))
  np.testing.assert_allclose(U, np.linalg.cholesky(np.linalg.inv(h)).T, rtol=1e-9, atol=1e-12)


def test_awq_never_worse_than_rtn_on_its_objective():
  rng = np.random.default_rng(3)
  x = correlated_inputs(rng, 512, 64, outlier=7)
  ws = [rng.normal(size=(64, 32)).astype(np.float32) for _ in range(2)]
  spec = Q.QuantSpec(3, group_size=16)
  s, alpha, errors = Q.awq_search(x, ws, spec, n_grid=10)
  rtn_err = sum(Q.output_error(x, w, Q.rtn(w, spec)) for w in ws)
  # rtn_err and chosen come from output_error's float32 X @ dW (depth 64), the grid's errors from the
  # float64 Gram form: they agree to the float32 rounding of 64-term sums, 2 * 64 * eps32 relative.
  assert errors[0] == pytest.approx(rtn_err, rel=2 * 64 * EPS32)  # alpha = 0 is plain RTN
  chosen = sum(Q.output_error(x, w, Q.awq_scaled(w, s, spec)) for w in ws)
  assert chosen == pytest.approx(errors.min(), rel=2 * 64 * EPS32) and chosen <= rtn_err * (1 + 2 * 64 * EPS32)
  assert alpha > 0  # with a loud input channel, scaling helps


def test_gram_error_is_output_error():
  rng = np.random.default_rng(4)
  x, w = correlated_inputs(rng, 300, 40), rng.normal(size=(40, 12)).astype(np.float32)
  w_hat = Q.rtn(w, Q.QuantSpec(3))
  assert Q.gram_error(x.T.astype(np.float64) @ x, w, w_hat) == pytest.approx(Q.output_error(x, w, w_hat), rel=2 * 40 * EPS32)  # float32 sums of depth I = 40


def test_smoothing_is_exact_before_rounding_and_helps_w8a8():
  rng = np.random.default_rng(4)
  x = correlated_inputs(rng, 256, 64, outlier=3)
  w = rng.normal(size=(64, 32)).astype(np.float32)
  s = Q.smooth_scales(np.abs(x).max(0), np.abs(w).max(1), alpha=0.5)
  np.testing.assert_allclose((x / s) @ (w * s[:, None]), x @ w, rtol=1e-4, atol=1e-3)
  spec = Q.QuantSpec(8, symmetric=True)
  plain = np.sum((x @ w - Q.quant_tokens(x) @ Q.rtn(w, spec)) ** 2)
  smooth = np.sum((x @ w - Q.quant_tokens(x / s) @ Q.rtn(w * s[:, None], spec)) ** 2)
  assert smooth < plain


def test_kv_per_channel_and_per_token_grids():
  rng = np.random.default_rng(5)
  k = rng.normal(size=(2, 40, 3, 8)).astype(np.float32)
  k[..., 1] = k[..., 1] * 50 + 20  # an outlier channel, as keys have
  k[:, :, 0, 4] = 0.7              # a constant channel
  per_channel = np.asarray(QM.quant_keys(jnp.asarray(k), 3, "channel"))
  per_token = np.asarray(QM.quant_keys(jnp.asarray(k), 3, "token"))
  # per channel: each (batch, head, dim) takes <= 8 values over tokens; a constant channel is exact
  assert max(len(np.unique(per_channel[b, :, h, d])) for b in range(2) for h in range(3) for d in range(8)) <= 8
  np.testing.assert_allclose(per_channel[:, :, 0, 4], 0.7, rtol=1e-6)
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


def test_calibration_reads_the_true_linear_inputs(tiny):
  model, tokens = tiny
  x, _ = QM.embed(model, jnp.asarray(tokens))
  (_, block, inputs), *_ = list(QM.calibrate(model, tokens))
  np.testing.assert_allclose(inputs["attn.q"], np.asarray(block.attn_norm(x)).reshape(-1, 32), rtol=1e-6)
  # the inputs reproduce the linear's own output
  ref = np.asarray(block.mlp.down(jnp.asarray(inputs["mlp.down"])))
  np.testing.assert_allclose(inputs["mlp.down"] @ np.asarray(block.mlp.down.kernel[...]), ref, rtol=1e-4, atol=1e-6)


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
  keep = QM.massive_columns(model, tokens, scheme)
  assert log["kept_columns"]["0.attn.q"] == 4 * 2 and log["kept_columns"]["1.attn.k"] == 2 * 2
  for (layer, name), cols in keep.items():
    w = np.asarray(QM.block_linears(model.blocks[layer])[name].kernel[...])
    w_hat = np.asarray(QM.block_linears(quantized.blocks[layer])[name].kernel[...])
    np.testing.assert_array_equal(w_hat[:, cols], w[:, cols])
    np.testing.assert_array_equal(w_hat[:, ~cols], Q.rtn(w, scheme.spec)[:, ~cols])


# --- the study driver ---------------------------------------------------------------------------

def _record(mode, i, task, kind, success):
  return {"model": "m", "mode": mode, "example": i, "task": task, "kind": kind, "success": success}


def test_c6_verdict_follows_its_rule():
  schemes = QS.schemes(["awq", "gptq"], [4])
  names = {s.method: s.name for s in schemes}
  def records(awq, gptq, fp=1):
    out = []
    for i in range(40):
      task = "passkey" if i < 30 else "capitals"
      kind = "contextual" if i < 30 else "parametric"
      out += [_record("fp", i, task, kind, fp), _record(names["awq"], i, task, kind, int(i % 10 < awq)),
              _record(names["gptq"], i, task, kind, int(i % 10 < gptq))]
    return out
  v = {x.claim: x for x in QS.verdicts(records(9, 3), "m", schemes, n_boot=500)}
  assert v["C6"].verdict == "supported" and v["C6"].diff == pytest.approx(0.6)
  assert set(v) == {"C6"}  # rtn_keep / rtn and smoothquant / w8a8 were not run: no verdict, not 'inconclusive'
  assert QS.verdicts(records(3, 9), "m", schemes, n_boot=500)[0].verdict == "opposite"
  assert QS.verdicts(records(5, 5), "m", schemes, n_boot=500)[0].verdict == "inconclusive"
  assert QS.verdicts(records(9, 3, fp=0), "m", schemes, n_boot=500)[0].verdict == "inconclusive"  # fp cannot


def test_the_study_config_is_what_the_command_line_builds():
  import argparse
  ap = argparse.ArgumentParser()
  QS.add_arguments(ap)
  direct = QS.QuantStudy(model="random", methods="rtn,kv", bits="4", kv_bits="3", group_size=16, kv="post:token", n=4)
  assert QS.study_from_args(ap.parse_args(["--model", "random", "--out", "x", "--methods", "rtn,kv", "--bits", "4",
                                           "--kv-bits", "3", "--group-size", "16", "--kv", "post:token",
                                           "--n", "4"])) == direct
  default = QS.study_from_args(ap.parse_args(["--model", "random", "--out", "x"]))
  assert default == QS.QuantStudy("random") and (default.bits, default.group_size) == (QS.BITS, QS.GROUP_SIZE)
  schemes, calib, ppl = QS.plan(direct)
  assert [s.name for s in schemes] == ["fp", "rtn-4b-g16", "kv-post-token-3b"] and calib == ppl == (16, 256)
  with pytest.raises(ConfigError, match="^--kv-bits: "):
    QS.plan(QS.QuantStudy("random", kv_bits="4,one"))


@pytest.mark.slow   # every C6 scheme end to end
def test_study_cli_end_to_end_on_a_tiny_model(tmp_path, monkeypatch, capsys):
  import json
  from analysis.studies import disruption
  from analysis.lab import cli
  from analysis.studies import suites
  from train.tokenizer import ByteTokenizer
  tok = ByteTokenizer()
  model = Decoder(ModelConfig(vocab_size=tok.vocab_size, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                              max_len=128), rngs=nnx.Rngs(0))
  items = [suites.Item("ctx", "contextual", np.asarray(tok.encode(f"key {i}{i}: value"), np.int32), "", f"{i}", 2, {})
           for i in range(3)]
  items += [suites.Item("par", "parametric", np.asarray(tok.encode(f"fact {i}{i}: is!!"), np.int32), "", "x", 2, {})
            for i in range(3)]
  monkeypatch.setattr(disruption, "load_sources", lambda *a: [("tiny", model, tok, items, None, {})])
  out = tmp_path / "c6"
  assert cli.main(["quantize", "--model", "random", "--out", str(out), "--methods",
                   "rtn,rtn_keep,awq,gptq,smoothquant,kv", "--bits", "4", "--group-size", "16", "--top-k", "1",
                   "--kv", "pre:channel,post:token", "--kv-bits", "3", "--calib", "2x32", "--ppl", "2x32",
                   "--batch", "4"]) == 0
  report = json.loads((out / "summary.json").read_text())
  names = [s["name"] for s in report["schemes"]]
  assert names == ["fp", "rtn-4b-g16", "rtn_keep-4b-g16", "awq-4b-g16", "gptq-4b-g16", "smoothquant-a0.5-w8a8",
                   "kv-pre-channel-3b", "kv-post-token-3b"]
  lines = (out / "results.jsonl").read_text().splitlines()
  assert len(lines) == len(names) * len(items)
  tiny_report = report["models"]["tiny"]
  assert set(tiny_report["ppl"]) == set(names) and all(p["ppl"] > 1 for p in tiny_report["ppl"].values())
  m = tiny_report["m_change"]
  assert m["fp"]["q"]["rel_change"] == 0 and m["rtn-4b-g16"]["q"]["rel_change"] > 0
  # quantized keys move k directly, q only through later layers
  assert m["kv-pre-channel-3b"]["k"]["rel_change"] > 10 * m["kv-pre-channel-3b"]["q"]["rel_change"]
  claims = json.loads((out / "claims.json").read_text())["claims"]
  assert {c["claim"] for c in claims} == {"C6", "C6-keep"}   # no w8a8 row: SmoothQuant has nothing to be compared with
  assert (out / "c6.png").stat().st_size > 0 and "perplexity" in (out / "table.md").read_text()
  assert cli.main(["quantize", "--model", "random", "--out", str(out), "--methods", "kv", "--kv-bits", "4,one"]) == 2
  assert capsys.readouterr().err.startswith("error: --kv-bits: ")
