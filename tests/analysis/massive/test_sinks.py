"""Attention sinks and residual massive activations: the on-device reductions equal numpy on full tensors, planted sinks and activations are found, the
association rule reads its intervals as written, and the store keeps old traces readable. The planted
sink (helpers.plant_sink) makes the first probe token a sink for one head."""
from __future__ import annotations

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from analysis.massive import sinks as SK
from analysis.massive import stats as S
from analysis.massive import store as ST
from analysis.massive import trace as T
from helpers import FIRST, ROOT
from helpers import plant_sink as _plant_sink
from helpers import sink_decoder as _decoder
from helpers import sink_probes as _probes
from minilm import capture, encodings, hooks


def test_device_sink_share_equals_numpy_from_full_probabilities():
  model, probes = _decoder(encodings.RoPE(layout="interleaved")), _probes(7, 24)
  mask = np.ones(probes.shape, np.float32)
  mask[2, 20:] = 0
  out = T.capture_sums(model, probes, mask, batch_size=3, sinks=True)
  _, cache = capture.run(model, probes, points=("attn",))
  for layer in range(2):
    probs = np.asarray(cache[hooks.name(layer, "attn")], np.float64)      # [N, H, T, S]
    counted = mask * (np.arange(24) > 0)
    want = np.einsum("nht,nt->nh", probs[..., 0], counted) / counted.sum(1)[:, None]
    # float32 probabilities summed over <= 24 tokens in another order: a few ulps (1e-7) each, 1e-5 ample
    np.testing.assert_allclose(out[f"{layer}.sink"], want, rtol=1e-5, atol=1e-7)
  assert set(out) == {hooks.name(l, t) for l in range(2) for t in hooks.QKV} | {f"{l}.{f}" for l in range(2)
                                                                                 for f in SK.FIELDS}


def test_planted_sink_head_is_found():
  model = _decoder(encodings.NoPE(), qkv_bias=True)
  _plant_sink(model, layer=0, head=2)
  out = T.capture_sums(model, _probes(), batch_size=5, sinks=True)
  share = out["0.sink"].mean(0)
  assert share.argmax() == 2 and share[2] > 0.95
  assert np.delete(share, 2).max() < 0.5


def test_planted_massive_residual_activation_is_found():
  model, probes = _decoder(), _probes(4, 24)
  probes[:, 5] = 9                                   # token 9 only at position 5
  emb = np.asarray(model.embed.embedding[...]).copy()
  emb[9, 13] = 5000.0                                # carried by the residual stream through every block
  model.embed.embedding[...] = emb
  out = T.capture_sums(model, probes, batch_size=4, sinks=True)
  cfg = S.StatConfig()
  counts = S.prompt_counts(4, 50)
  for layer in range(2):
    assert (out[f"{layer}.resid_tok"][:, 0] == 5).all() and (out[f"{layer}.resid_dim"][:, 0] == 13).all()
    res = SK.resid_layer(out, layer, probes, cfg, counts)
    assert res["top_position"] == [5, 1.0] and res["top_dim"] == [13, 1.0] and res["top_token_id"] == [9, 1.0]
    assert res["n_sun"][0] == 1 and res["n_ratio"][0] == 1 and res["max_abs"][0] > 1000
  _, cache = capture.run(model, probes, points=("resid",))
  resid = np.abs(np.asarray(cache[hooks.name(1, "resid")]))
  # the median is one of the float32 values (or the mean of two): equal up to that mean's rounding
  np.testing.assert_allclose(out["1.resid_median"], np.median(resid.reshape(4, -1), axis=1), rtol=1e-5)
  np.testing.assert_allclose(np.abs(out["1.resid_top"]), -np.sort(-resid.reshape(4, -1), axis=1)[:, :SK.RESID_TOP],
                             rtol=1e-6)   # the same float32 values, sorted: their rounding only


def test_untrained_model_has_no_massive_residual_activation():
  model, probes = _decoder(), _probes(4, 24)
  out = T.capture_sums(model, probes, batch_size=4, sinks=True)
  res = SK.resid_layer(out, 1, probes, S.StatConfig(), S.prompt_counts(4, 50))
  assert res["n_ratio"][0] == 0 and res["max_ratio"][0] < S.StatConfig().resid_ratio


def test_spearman_and_the_rule():
  x = np.array([[1.0, 2.0, 3.0, 4.0], [4.0, 3.0, 2.0, 1.0], [1.0, 1.0, 1.0, 1.0]])
  np.testing.assert_allclose(SK.spearman(x, np.array([[1.0, 2.0, 3.0, 5.0]] * 3)), [1.0, -1.0, np.nan])
  assert np.isnan(SK.spearman(np.array([1.0, 2.0]), np.array([2.0, 1.0]))[0])
  assert SK.verdict({"rot_q": [0.5, 0.1, 0.8], "rot_k": [0.4, 0.01, 0.7]}) == "supported"
  assert SK.verdict({"rot_q": [0.5, 0.1, 0.8], "rot_k": [0.4, -0.01, 0.7]}) == "inconclusive"
  assert SK.verdict({"rot_q": [-0.5, -0.8, -0.1], "rot_k": [-0.4, -0.7, -0.01]}) == "opposite"
  assert SK.verdict({"rot_q": [np.nan] * 3, "rot_k": [0.4, 0.1, 0.7]}) == "inconclusive"


def _groups(sink_of_x, n_boot=200):
  """Eight heads whose sink share is sink_of_x(max/mean), with replicates jittered a little."""
  rng = np.random.default_rng(0)
  x = np.linspace(1.0, 8.0, 8)
  g = {"sink": (sink_of_x(x), sink_of_x(x) + rng.normal(0, 1e-3, (n_boot, 8)))}
  g.update({t: (x, x + rng.normal(0, 1e-3, (n_boot, 8))) for t in SK.ASSOCIATED})
  return [g]


def test_association_reads_monotone_heads():
  up = SK.association(_groups(lambda x: x / 10), 200)
  down = SK.association(_groups(lambda x: 1 - x / 10), 200)
  assert up["rot_q"][0] == pytest.approx(1.0) and up["rot_k"][1] > 0.5 and SK.verdict(up) == "supported"
  assert down["rot_k"][0] == pytest.approx(-1.0) and SK.verdict(down) == "opposite"
  # the per-pair association is reported beside it and does not enter the verdict
  groups = _groups(lambda x: x / 10)
  groups[0]["pair_q"] = tuple(v[..., ::-1] for v in groups[0]["pair_q"])
  mixed = SK.association(groups, 200)
  assert mixed["pair_q"][0] == pytest.approx(-1.0) and mixed["pair_k"][0] == pytest.approx(1.0)
  assert SK.verdict(mixed) == "supported"


def test_uniform_share():
  assert SK.uniform_share(np.ones((2, 3))) == pytest.approx((1 / 2 + 1 / 3) / 2)


def test_store_writes_sinks_and_keeps_old_stores_readable(tmp_path):
  model = _decoder(encodings.NoPE(), qkv_bias=True)
  _plant_sink(model, layer=1, head=0)
  probes = _probes(6, 24)
  store = ST.open_store(str(tmp_path), probes, np.ones(probes.shape, np.float32), False, S.StatConfig())
  for step in (0, 5):
    T.record_step(store, model, "planted", step, context=24, final=step == 5)
  T.rebuild(store, n_boot=100)
  summ = json.loads((tmp_path / "sinks.json").read_text())
  assert [s["step"] for s in summ["steps"]] == [0, 5] and summ["verdicts"][0]["step"] == 5
  layer1 = [g for g in summ["layers"] if (g["step"], g["layer"]) == (5, 1)][0]
  assert np.argmax(layer1["sink_per_head"]) == 0 and layer1["sink_per_head"][0] > 0.95
  assert len(ST.read_table(str(tmp_path / "sinks.csv"))) == 2 * 2 * 4
  assert len(ST.read_table(str(tmp_path / "resid.csv"))) == 2 * 2
  with np.load(store.tokens_path("planted")) as z:
    assert z["attn"].shape == (2, 4, 24, 24)                  # probes shorter than PATTERN_TOKENS
  from analysis.massive import plots as P
  names = {os.path.basename(p) for p in P.sink_figures(store)}
  assert {"sink_map.png", "residual.png", "sinks_over_steps.png", "attention_planted.png"} <= names
  os.remove(store.sinks_path("planted", 0))       # a step traced before sinks were captured
  keys = {hooks.name(l, t) for l in range(2) for t in hooks.QKV}
  assert store.good_steps("planted", keys) == [5] and store.steps("planted") == [0, 5]
  T.rebuild(store, n_boot=100)
  assert [s["step"] for s in json.loads((tmp_path / "sinks.json").read_text())["steps"]] == [5]


def test_rule_is_in_the_docs_verbatim():
  with open(os.path.join(ROOT, "docs", "claims.md")) as f:
    docs = f.read()
  assert SK.RULE in docs and f"sink share >= {SK.SINK_LEVEL}" in docs


def test_median_by_bisection_is_the_median():
  """Odd and even counts, ties, zeros, a row with one value and a row with none (NaN), against
  numpy's median of the counted values: the two middle values are found exactly, so only their
  float32 midpoint rounds (one ulp)."""
  rng = np.random.default_rng(0)
  x = np.abs(rng.standard_normal((6, 50))).astype(np.float32) * np.float32(10.0) ** rng.integers(-3, 4, (6, 1))
  x[2, :20] = 0.0
  x[3, 10:30] = x[3, 0]
  keep = rng.random((6, 50)) < 0.7
  keep[4] = False
  keep[4, 7] = True
  keep[5] = False
  got = np.asarray(SK.median_nonneg(jnp.asarray(np.where(keep, x, np.inf))))
  for row in range(5):
    np.testing.assert_allclose(got[row], np.median(x[row][keep[row]]), rtol=2 * np.finfo(np.float32).eps)
  assert np.isnan(got[5])


def test_residual_statistics_count_the_first_token_and_no_padding():
  """The largest |x| and the median |x| are over each prompt's counted tokens, token 0 included and
  padding left out, and the kept values are signed: a negative activation planted on the first token
  is found there with its sign, a larger one planted on padding is not found, and every kept value and
  the median equal numpy's over the counted tokens of an eager capture."""
  model, probes = _decoder(), _probes(4, 24)
  mask = np.ones(probes.shape, np.float32)
  mask[1, 20:] = 0
  probes[1, 20:] = 8                                 # token 8 only on padding
  emb = np.asarray(model.embed.embedding[...]).copy()
  emb[FIRST, 13], emb[8, 7] = -5000.0, 8000.0
  model.embed.embedding[...] = emb
  out = T.capture_sums(model, probes, mask, batch_size=4, sinks=True)
  _, cache = capture.run(model, probes, points=("resid",))
  for layer in range(2):
    resid = np.asarray(cache[hooks.name(layer, "resid")])                  # [N, T, C]
    top, tok, dim = (out[f"{layer}.resid_{f}"] for f in ("top", "tok", "dim"))
    assert (tok[:, 0] == 0).all() and (dim[:, 0] == 13).all() and (top[:, 0] < -1000).all()
    for n in range(4):
      mags = np.abs(resid[n][mask[n] > 0]).ravel()
      # the same float32 values from a jitted and an eager forward: their rounding only
      np.testing.assert_allclose(top[n], resid[n, tok[n], dim[n]], rtol=1e-6)
      np.testing.assert_allclose(np.abs(top[n]), -np.sort(-mags)[:SK.RESID_TOP], rtol=1e-6)
      np.testing.assert_allclose(out[f"{layer}.resid_median"][n], np.median(mags), rtol=1e-5)


def test_resid_layer_by_hand():
  """resid_layer on a hand-made sinks file: each prompt's ratio is to its own median; Sun et al.'s
  count needs |x| > resid_abs and the ratio (strictly), the scale-free count the ratio alone; token ids
  are read from each prompt's own probe; the first-token share counts position 0 only."""
  cfg = S.StatConfig(resid_abs=100.0, resid_ratio=1000.0)
  sinks = {"0.resid_top": np.array([[-500.0, 150.0, 50.0], [2000.0, -150.0, 20.0], [300.0, 200.0, 100.0]],
                                   np.float32),
           "0.resid_median": np.array([0.1, 1.0, 0.01], np.float32),
           "0.resid_tok": np.array([[0, 1, 2], [3, 0, 1], [1, 1, 0]]),
           "0.resid_dim": np.array([[5, 5, 1], [5, 2, 2], [2, 0, 0]])}
  probes = np.array([[7, 1, 2, 3], [4, 5, 6, 7], [8, 7, 9, 9]])   # the top tokens are all id 7
  res = SK.resid_layer(sinks, 0, probes, cfg, S.prompt_counts(3, 50))
  # ratios: 5000, 1500, 500 | 2000, 150, 20 | 30000, 20000, 10000
  want = {"n_sun": (2 + 1 + 2) / 3, "n_ratio": (2 + 1 + 3) / 3, "max_abs": (500 + 2000 + 300) / 3,
          "max_ratio": (5000 + 2000 + 30000) / 3, "median": (0.1 + 1.0 + 0.01) / 3}
  for key, value in want.items():
    # float32 medians and values: relative 6e-8 each
    assert res[key][0] == pytest.approx(value, rel=1e-6), key
    assert res[key][1] <= res[key][0] <= res[key][2]
  assert res["top_token_id"] == [7, 1.0] and res["top_position"] == [0, pytest.approx(1 / 3)]
  assert res["first_token_share"] == pytest.approx(1 / 3) and res["top_dim"] == [5, pytest.approx(2 / 3)]
  assert res["top_k"] == 3


def test_key_statistics_are_those_of_the_kv_head_each_query_head_reads():
  """With 4 query heads on 2 KV heads, query heads 0 and 1 read KV head 0, heads 2 and 3 KV head 1
  (minilm.layers: h // (H/K)): head_groups gives each query head the max/mean of M (the square root of
  the summed squares) of its own KV head, and of its own rot_q; the sink share is the prompts' mean."""
  model = _decoder(encodings.RoPE())
  rng = np.random.default_rng(0)
  sums = {hooks.name(0, t): rng.random((3, 4 if "q" in t else 2, 8)) for t in ("q", "k", "rot_q", "rot_k")}
  sums[hooks.name(0, "rot_k")][:, 1, 0] += 100.0      # KV head 1 has a massive dim
  sinks = {"0.sink": rng.random((3, 4))}
  g, = SK.head_groups(sums, sinks, ST.pairing_of(T.arm_facts(model, 24)), 24.0, S.StatConfig(),
                      S.prompt_counts(3, 20))
  M_k, M_q = (np.sqrt(sums[hooks.name(0, t)].sum(0)) for t in ("rot_k", "rot_q"))
  # the same float64 values in at most another order: a few ulps
  np.testing.assert_allclose(g["rot_k"][0], (M_k.max(-1) / M_k.mean(-1))[[0, 0, 1, 1]], rtol=1e-12)
  np.testing.assert_allclose(g["rot_q"][0], M_q.max(-1) / M_q.mean(-1), rtol=1e-12)
  reps = g["rot_k"][1]
  assert reps.shape == (20, 4) and (reps[:, 0] == reps[:, 1]).all() and (reps[:, 2] == reps[:, 3]).all()
  np.testing.assert_allclose(g["sink"][0], sinks["0.sink"].mean(0), rtol=1e-12)
