"""Tracing: the jitted capture equals an eager one, rows have the promised shape, and a tiny paired run
goes end to end through the CLI into table, summary, plots and claims (and resumes)."""
import json
import os

import numpy as np
import pytest
from flax import nnx

from analysis.massive import stats as S
from analysis.massive import pipeline as PL
from analysis.massive import store as ST
from analysis.massive import trace as T
from analysis.lab.cli import main
from minilm import capture, encodings, hooks
from minilm.config import ModelConfig
from minilm.schema import ConfigError
from minilm.model import Decoder

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


def test_analyze_model_treats_a_single_model_as_one_step(tmp_path):
  model = _decoder(encodings.RoPE(), n_layers=1)
  probes = np.random.default_rng(2).integers(0, 300, (6, 16))
  PL.analyze_model(model, probes, str(tmp_path), arm="pretrained", step=0, batch_size=6)
  rows = ST.read_table(str(tmp_path / "table.csv"))
  assert len(rows) == 2 * 4 + 3 * 2 and {r["arm"] for r in rows} == {"pretrained"}
  claims = json.loads((tmp_path / "claims.json").read_text())["claims"]
  assert [c["claim"] for c in claims] == ["C1", "C2", "C3", "C3-lowfreq", "C4"]
  c3 = {c["claim"]: c for c in claims}["C3"]
  assert c3["verdict"] == "inconclusive" and "no NoPE arm" in c3["notes"]
  for name in ("layer_profile", "heatmap_pretrained_0", "pair_energy_pretrained", "bars3d_pretrained"):
    assert (tmp_path / "plots" / f"{name}.png").stat().st_size > 0 and (tmp_path / "plots" / f"{name}.pdf").exists()
  assert not (tmp_path / "plots" / "emergence.png").exists()   # one step: nothing to emerge over
  with pytest.raises(ConfigError, match="out: .* other probes"):
    PL.analyze_model(model, probes[:3], str(tmp_path), arm="pretrained")


def test_cli_traces_a_paired_run_into_table_plots_and_claims_and_resumes(tiny_run, tmp_path):
  out = tmp_path / "analysis"
  assert main(["trace", str(tiny_run), "--out", str(out), "--probes", "6", "--batch", "4"]) == 0
  rows = ST.read_table(str(out / "table.csv"))
  assert len(rows) == 2 * 2 * 2 * (2 * 4 + 3 * 2)                # arms x steps x layers x heads
  assert {(r["arm"], r["step"]) for r in rows} == {(a, s) for a in ("rope", "nope") for s in ("0", "1")}
  assert np.load(out / "probes.npy").shape == (6, 48)
  assert [f["context"] for f in json.loads((out / "meta.json").read_text())["arms"].values()] == [48.0, 48.0]
  summary = json.loads((out / "summary.json").read_text())
  assert len(summary["groups"]) == 2 * 2 * 2 * 5
  lo_mid_hi = summary["groups"][0]["stats"]["max_mean"]
  assert lo_mid_hi[1] <= lo_mid_hi[0] <= lo_mid_hi[2]
  claims = json.loads((out / "claims.json").read_text())["claims"]
  assert {c["claim"] for c in claims} == {"C1", "C2", "C3", "C3-lowfreq", "C4"}
  assert all(c["reference"] == "arm nope" and c["step"] == 1 and c["ci"] is not None for c in claims)
  assert "| C3 RoPE causes it |" in (out / "claims.md").read_text()
  for name in ("emergence", "layer_profile", "heatmap_rope_0", "heatmap_nope_1", "pair_energy_rope", "bars3d_nope"):
    assert (out / "plots" / f"{name}.png").exists() and (out / "plots" / f"{name}.pdf").exists()
  assert main(["trace", str(tiny_run), "--out", str(out), "--probes", "6", "--no-plots", "--lam", "3"]) == 0
  first, second = [json.loads(line) for line in (out / "timing.jsonl").read_text().splitlines()]
  assert first["traced"] == 4 and first["forward_s"] + first["compile_forward_s"] > 0
  assert second["traced"] == 0 and second["skipped"] == 4
  assert json.loads((out / "meta.json").read_text())["stats"]["lam"] == 3.0   # table redone, no forward
  assert main(["trace", str(tiny_run), "--out", str(out), "--probes", "6", "--drop-first"]) == 2


def test_cli_reports_a_bad_run_dir_in_one_line(tmp_path, capsys):
  assert main(["trace", str(tmp_path / "missing")]) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("error: run_dir:") and "\n" not in err


def test_deep_models_show_evenly_spaced_heatmap_layers():
  from analysis.massive import plots as P
  assert P.shown_layers(4) == [0, 1, 2, 3]
  shown = P.shown_layers(30)
  assert len(shown) == P.MAX_HEATMAP_LAYERS and shown[0] == 0 and shown[-1] == 29 and shown == sorted(set(shown))



def test_a_public_trajectory_is_traced_as_the_steps_of_one_arm(tmp_path, capsys):
  """Three self-built GPT-NeoX checkpoints (partial rotary, as Pythia) in step<N> folders: traced as
  one arm over steps, resumable, with emergence over those steps; an ordered list of folders gives
  the same steps."""
  from helpers import NEOX_CFG, bpe_tokenizer, neox_shapes, random_tensors, save_checkpoint
  tok = bpe_tokenizer()
  for seed, step in enumerate((0, 512, 4096)):
    folder = tmp_path / "pythia-tiny" / f"step{step}"
    folder.mkdir(parents=True)
    save_checkpoint(folder, random_tensors(neox_shapes(NEOX_CFG, tok.get_vocab_size()), seed=seed),
                    {**NEOX_CFG, "vocab_size": tok.get_vocab_size()})
    tok.save(str(folder / "tokenizer.json"))
  out = tmp_path / "trace"
  argv = ["trace", str(tmp_path / "pythia-tiny"), "--out", str(out), "--probes", "3", "--length", "32", "--no-plots"]
  assert main(argv) == 0
  summary = json.loads((out / "summary.json").read_text())
  assert {(g["arm"], g["step"]) for g in summary["groups"]} == {("pythia-tiny", s) for s in (0, 512, 4096)}
  assert summary["arms"]["pythia-tiny"]["context"] == 64.0 and summary["arms"]["pythia-tiny"]["position"] == "rope"
  by_step = {g["step"]: g["stats"]["max_mean"][0] for g in summary["groups"] if (g["layer"], g["tensor"]) == (0, "q")}
  assert len(set(by_step.values())) == 3                        # three different models, not one read three times
  assert main(argv) == 0 and json.loads((out / "summary.json").read_text()) == summary   # resumed: nothing redone
  listed = tmp_path / "listed"
  assert main(["trace", *(str(tmp_path / "pythia-tiny" / f"step{s}") for s in (0, 512, 4096)), "--arm", "pythia-tiny",
               "--out", str(listed), "--probes", "3", "--length", "32", "--no-plots"]) == 0
  assert json.loads((listed / "summary.json").read_text())["groups"] == summary["groups"]
  capsys.readouterr()
  assert main(["trace", str(tmp_path / "pythia-tiny" / "step4096"), str(tmp_path / "pythia-tiny" / "step0"),
               "--out", str(tmp_path / "x")]) == 2
  assert capsys.readouterr().err.startswith("error: trajectory: the step<N> names must increase")


def test_a_store_traced_before_keys_were_hook_names_reads_as_hook_names(tmp_path):
  store = ST.Store(str(tmp_path))
  old = {f"{l}.{t}": np.full((2, 1, 4), l + 1.0, np.float32) for l in range(2) for t in hooks.QKV}
  os.makedirs(os.path.dirname(store.sums_path("a", 0)))
  np.savez(store.sums_path("a", 0), **old)
  sums = store.load_sums("a", 0)
  assert set(sums) == {hooks.name(l, t) for l in range(2) for t in hooks.QKV}
  assert sums["blocks.1.attn.rot_k"][0, 0, 0] == 2.0
  assert ST.layer_tensor_keys(sums)[:2] == [(0, "q"), (0, "k")]
  os.makedirs(os.path.dirname(store.sinks_path("a", 0)))
  np.savez(store.sinks_path("a", 0), none=np.zeros(1))
  assert store.good_steps("a", set(sums)) == [0]   # not set aside as damaged and traced again
