"""analysis.massive.trace: the jitted capture equals an eager one, rows and summaries have the promised
shape and equal their definitions by hand, the token view is probe 0's, and a step's sums are written
last, by one model per arm."""
import os

import numpy as np
import pytest
from flax import nnx

from analysis.massive import stats as S
from analysis.massive import store as ST
from analysis.massive import trace as T
from minilm import atomic, capture, encodings, hooks
from minilm.config import ModelConfig
from minilm.model import Decoder
from minilm.schema import ConfigError

EPS32 = float(np.finfo(np.float32).eps)


def _decoder(position, seed=0, n_layers=2):
  cfg = ModelConfig(vocab_size=300, d_model=32, n_layers=n_layers, n_heads=4, n_kv_heads=2, max_len=64,
                    position=position)
  return Decoder(cfg, rngs=nnx.Rngs(seed))


def test_jitted_sums_equal_eager_capture_with_padding_and_a_ragged_last_batch():
  model = _decoder(encodings.RoPE(layout="interleaved", base=500.0))
  probes = np.random.default_rng(0).integers(0, 300, (7, 24))
  mask = np.ones(probes.shape, np.float32)
  mask[2, 20:] = 0
  sums = T.capture_sums(model, probes, mask, drop_first=True, batch_size=3)
  _, cache = capture.run(model, probes, points=hooks.QKV)
  assert set(sums) == {hooks.name(l, t) for l in range(2) for t in hooks.QKV}
  for key, got in sums.items():
    tensor = hooks.split(key)[1]
    x = np.asarray(cache[key], np.float64)   # the store's keys are the cache's hook names
    want = np.einsum("bthd,bt->bhd", x ** 2, mask * (np.arange(24) > 0))
    assert got.shape == (7, 4 if "q" in tensor else 2, 8)
    # The jitted forward (other batches, fused) and the eager one round differently: q of layer 1 ends
    # ~400 summed terms of random sign (4*sqrt(400)*eps = 80 eps of the tensor's scale), doubled by
    # squaring, plus a float32 sum of <= 23 squares (12 eps): 175 eps of the largest sum.
    np.testing.assert_allclose(got, want, rtol=0, atol=175 * EPS32 * np.abs(want).max())


@pytest.mark.parametrize("position", [encodings.NoPE(), encodings.ALiBi(), encodings.Learned()])
def test_trace_model_rows_cover_every_layer_tensor_and_head(position):
  model = _decoder(position)
  probes = np.random.default_rng(1).integers(0, 300, (5, 16))
  rows = T.trace_model(model, probes, arm="x", step=7, batch_size=4)
  assert len(rows) == 2 * (2 * 4 + 3 * 2)                        # q, rot_q: 4 heads; k, v, rot_k: 2
  assert {r["step"] for r in rows} == {7} and {r["pairing"] for r in rows} == {
      f"convention half base=10000 ({position.kind})"}
  by = {(r["layer"], r["tensor"], r["head"]): r for r in rows}
  for (layer, tensor, head), r in by.items():                    # no RoPE: rotation is the identity
    if tensor == "rot_q":
      # the same values, summed at worst in another order: n squares of one sign, n*eps/2 per sum, and
      # max/mean is a ratio of such sums
      assert r["max_mean"] == pytest.approx(by[layer, "q", head]["max_mean"], rel=2 * probes.size * EPS32)
  assert all(set(T.ROW_KEYS + S.PER_HEAD + T.NULL_KEYS) <= set(r) for r in rows)


def test_rows_are_norms_of_the_summed_squares_by_hand():
  """A row's norm is ||M[h]||_2 and its max_mean max_d M / mean_d M, with M[h, d] the square root of the
  sums of squares summed over prompts (docs/claims.md): sums read as M, or another norm, change both."""
  model = _decoder(encodings.NoPE(), n_layers=1)
  s = np.random.default_rng(4).random((3, 4, 8)).astype(np.float32) * 10
  rows = T.rows_for({hooks.name(0, "q"): s}, T.arm_facts(model, 16), S.StatConfig(), "a", 2)
  M = np.sqrt(s.astype(np.float64).sum(0))
  assert [(r["layer"], r["tensor"], r["head"], r["step"]) for r in rows] == [(0, "q", h, 2) for h in range(4)]
  # the same float64 sums in at most another order: a few ulps
  np.testing.assert_allclose([r["norm"] for r in rows], np.sqrt(s.astype(np.float64).sum((0, 2))), rtol=1e-12)
  np.testing.assert_allclose([r["max_mean"] for r in rows], M.max(-1) / M.mean(-1), rtol=1e-12)


def test_token_view_is_probe_zero_its_magnitudes_and_its_attention(tmp_path):
  """tokens/<arm>.npz holds probe 0, |x| of its TOKEN_POINTS and its attention with the queries on the
  rows (causal: zero above the diagonal), as an eager capture of probe 0 alone gives them."""
  model = _decoder(encodings.RoPE())
  probes = np.random.default_rng(3).integers(0, 300, (3, 12))
  store = ST.open_store(str(tmp_path), probes, np.ones(probes.shape, np.float32), False, S.StatConfig())
  T.save_tokens(store, model, "a", 4)
  _, cache = capture.run(model, probes[:1], points=ST.TOKEN_POINTS + ("attn",))
  with np.load(store.tokens_path("a")) as z:
    assert int(z["step"]) == 4 and (z["tokens"] == probes[0]).all()
    for t in ST.TOKEN_POINTS:
      # stored as float16: relative rounding 2^-11, and float16 subnormals are 6e-8 apart
      np.testing.assert_allclose(z[t], np.abs(np.asarray(cache.stack(t))[:, 0]), rtol=2 ** -10, atol=1e-7)
    attn = z["attn"].astype(np.float64)
    assert attn.shape == (2, 4, 12, 12) and (np.triu(attn, 1) == 0).all()
    np.testing.assert_allclose(attn, np.asarray(cache.stack("attn"))[:, 0], rtol=2 ** -10, atol=1e-7)


def test_record_step_refuses_another_model_under_an_arm(tmp_path):
  """An arm of a store is one model: a step of a model with other facts (more layers) under the same
  arm is refused before its sums are written, so the arm's steps never mix two models."""
  probes = np.random.default_rng(5).integers(0, 300, (2, 8))
  store = ST.open_store(str(tmp_path), probes, np.ones(probes.shape, np.float32), False, S.StatConfig())
  T.record_step(store, _decoder(encodings.NoPE(), n_layers=1), "a", 0, context=8, final=False)
  with pytest.raises(ConfigError, match="arm: 'a' .* traced from another model"):
    T.record_step(store, _decoder(encodings.NoPE(), n_layers=2), "a", 1, context=8, final=False)
  assert store.steps("a") == [0] and store.meta()["arms"]["a"]["n_layers"] == 1


def test_pair_share_is_the_head_mean_of_each_heads_energy_profile():
  """summary_for's pair_share: each head's energy per rotary pair (interleaved: dims 2j, 2j+1) as a share
  of that head's energy, then the mean over heads. By hand: head 0 holds all its energy in pair 0,
  head 1 spreads it evenly over the four pairs."""
  model = _decoder(encodings.RoPE(layout="interleaved"), n_layers=1)
  M2 = np.array([[2.0, 2.0, 0, 0, 0, 0, 0, 0], [1.0] * 8])    # M^2 of 2 heads, split over 2 prompts
  s = np.stack([M2 / 4, 3 * M2 / 4]).astype(np.float32)
  group, = T.summary_for({hooks.name(0, "k"): s}, T.arm_facts(model, 16), S.StatConfig(), "a", 0, n_boot=20)
  # quarters of powers of two: exact in float32, summed exactly
  np.testing.assert_allclose(group["pair_share"], [(1 + 0.25) / 2, 0.25 / 2, 0.25 / 2, 0.25 / 2], rtol=1e-12)
  assert (group["layer"], group["tensor"], group["heads"]) == (0, "k", 2)


def test_trace_model_compares_wavelengths_with_the_probe_length_by_default():
  """Without a context, trace_model's wavelength boundary is the probe length (tokens per prompt, not
  prompts): its rows equal those with context=T, and differ from those with context=N (the peak
  pair's wavelength is read in units of the context)."""
  model = _decoder(encodings.RoPE(), n_layers=1)
  probes = np.random.default_rng(6).integers(0, 300, (5, 16))
  default, by_length, by_count = (T.trace_model(model, probes, context=c, batch_size=5) for c in (None, 16, 5))
  assert default == by_length and [r["peak_wl_ctx"] for r in by_count] != [r["peak_wl_ctx"] for r in by_length]


def test_sums_are_written_last_so_a_failed_step_leaves_none(tmp_path, monkeypatch):
  """record_step writes a step's sums after its token view and its sinks: sums on disk mean a
  complete step (a resumed trace skips it), so a failure while writing either leaves no sums."""
  probes = np.random.default_rng(5).integers(0, 300, (2, 8))
  store = ST.open_store(str(tmp_path), probes, np.ones(probes.shape, np.float32), False, S.StatConfig())
  model, save_npz = _decoder(encodings.NoPE(), n_layers=1), atomic.save_npz

  def fail(*args, **kwargs):
    raise OSError("no space left on device")

  def fail_sinks(path, **arrays):
    if os.path.dirname(os.path.dirname(path)) == store.path("sinks"):
      fail()
    save_npz(path, **arrays)

  for target, replacement in ((T, ("save_tokens", fail)), (atomic, ("save_npz", fail_sinks))):
    with monkeypatch.context() as m:
      m.setattr(target, *replacement)
      with pytest.raises(OSError, match="no space"):
        T.record_step(store, model, "a", 0, context=8, final=True)
    assert store.steps("a") == []
  T.record_step(store, model, "a", 0, context=8, final=True)
  assert store.steps("a") == [0] and store.has_sinks("a", 0) and store.token_step("a") == 0
