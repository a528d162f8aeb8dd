"""The C6 study driver (analysis.studies.quantization): the verdict follows its rule, the study config is
what the command line builds, and the study runs end to end on a tiny model."""
from __future__ import annotations

import dataclasses
import os
import re

import jax
import numpy as np
import pytest
from flax import nnx

from analysis.studies import quantization as QS
from minilm.config import ModelConfig
from minilm.model import Decoder
from minilm.schema import ConfigError


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


def test_c6_keep_is_supported_only_above_its_random_keep_control():
  schemes = QS.schemes(["rtn", "rtn_keep", "rtn_keep_random"], [4])
  names = {s.method: s.name for s in schemes}
  def records(keep, rtn, control):
    return [_record(mode, i, "passkey", "contextual", int(mode == "fp" or i % 10 < hits))
            for i in range(40) for mode, hits in (("fp", 10), (names["rtn_keep"], keep), (names["rtn"], rtn),
                                                  (names["rtn_keep_random"], control))]
  def judged(keep, rtn, control, ran=schemes):
    return {v.claim: v for v in QS.verdicts(records(keep, rtn, control), "m", ran, n_boot=500)}
  v = judged(9, 3, 3)
  assert (v["C6-keep"].verdict, v["C6-keep-random"].verdict) == ("supported", "supported")
  assert v["C6-keep"].rule == QS.KEEP_RULE and v["C6-keep-random"].rule == QS.RULE
  v = judged(9, 3, 9)   # any channels kept in float help as much
  assert v["C6-keep-random"].verdict == "inconclusive" and v["C6-keep"].verdict == "inconclusive"
  assert v["C6-keep"].diff == pytest.approx(0.6) and "C6-keep-random inconclusive" in v["C6-keep"].notes
  v = judged(9, 3, 3, ran=schemes[:3])   # the control did not run
  assert set(v) == {"C6-keep"} and v["C6-keep"].verdict == "inconclusive"
  assert "rtn_keep_random) was not run" in v["C6-keep"].notes
  assert judged(3, 9, 0)["C6-keep"].verdict == "opposite"   # the control only ever withholds 'supported'


def test_a_comparison_s_interval_does_not_depend_on_which_others_ran():
  keep, awq = QS.schemes(["rtn", "rtn_keep"], [4]), QS.schemes(["rtn", "rtn_keep", "awq", "gptq"], [4])
  def records(schemes):
    return [{"model": "m", "mode": s.name, "example": i, "task": "passkey", "kind": "contextual",
             "success": int(s.name == "fp" or (i * 7 + len(s.name)) % 10 < 6)} for i in range(30) for s in schemes]
  alone = {v.claim: v for v in QS.verdicts(records(keep), "m", keep, n_boot=300)}
  beside = {v.claim: v for v in QS.verdicts(records(awq), "m", awq, n_boot=300)}
  assert set(alone) == {"C6-keep"} and set(beside) == {"C6", "C6-keep"}
  assert alone["C6-keep"].ci[0] < alone["C6-keep"].ci[1] and alone["C6-keep"].ci == beside["C6-keep"].ci


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
  with pytest.raises(ConfigError, match=r"^--jobs: must be in 1\.\.\d+ \(.*\); got 0$"):
    QS.plan(QS.QuantStudy("random", jobs=0))
  with pytest.raises(ConfigError, match=r"^quant.seed: must be in 0\.\.4294967295; got 4294967296$"):   # the lab's name
    QS.plan(QS.QuantStudy("random", seed=2 ** 32), name=lambda field: f"quant.{field}")


@pytest.mark.parametrize("flags, first", [
    (["--seed", "-1"], "error: --seed: must be in 0..4294967295; got -1"),
    (["--ppl", "2x1"], "error: --ppl: must read NxT with T >= 2"),   # no next token: a NaN perplexity
    (["--methods", ","], "error: --methods: names no method; give a comma list of rtn, "),
    (["--kv", ","], "error: --kv: must be a comma list of point:axis"),
    (["--methods", "rtn_keep", "--lam", "inf"], "error: scheme.lam: must be a finite number > 0; got inf"),
    (["--methods", "smoothquant", "--alpha", "2"], "error: scheme.alpha: must be in [0, 1]; got 2.0")])
def test_bad_settings_are_one_line_before_any_model_loads(tmp_path, capsys, flags, first):
  from analysis.lab import cli
  out = tmp_path / "c6"
  assert cli.main(["quantize", "--model", "random", "--n", "2", "--methods", "rtn", "--bits", "4",
                   "--calib", "2x32", "--ppl", "2x8", *flags, "--out", str(out)]) == 2
  lines = capsys.readouterr().err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith(first), lines
  assert not out.exists()


def _tiny_study(monkeypatch, out, *extra) -> int:
  """`python -m analysis quantize` with every C6 method on a tiny random model and six items."""
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
  return cli.main(["quantize", "--model", "random", "--out", str(out), "--methods", "rtn,rtn_keep,awq,gptq,smoothquant,kv",
                   "--bits", "4", "--group-size", "16", "--top-k", "1", "--kv", "pre:channel,post:token",
                   "--kv-bits", "3", "--calib", "2x32", "--ppl", "2x32", "--batch", "4", *extra])


@pytest.mark.slow   # every C6 scheme end to end
def test_study_cli_end_to_end_on_a_tiny_model(tmp_path, monkeypatch, capsys):
  import json
  from analysis.lab import cli
  out = tmp_path / "c6"
  assert _tiny_study(monkeypatch, out) == 0
  report = json.loads((out / "summary.json").read_text())
  names = [s["name"] for s in report["schemes"]]
  assert names == ["fp", "rtn-4b-g16", "rtn_keep-4b-g16", "awq-4b-g16", "gptq-4b-g16", "smoothquant-a0.5-w8a8",
                   "kv-pre-channel-3b", "kv-post-token-3b"]
  lines = (out / "results.jsonl").read_text().splitlines()
  assert len(lines) == len(names) * 6   # every scheme answers all six items
  tiny_report = report["models"]["tiny"]
  assert set(tiny_report["ppl"]) == set(names) and all(p["ppl"] > 1 for p in tiny_report["ppl"].values())
  m = tiny_report["m_change"]
  assert m["fp"]["q"]["rel_change"] == 0 and m["rtn-4b-g16"]["q"]["rel_change"] > 0
  # quantized keys move k directly, q only through later layers
  assert m["kv-pre-channel-3b"]["k"]["rel_change"] > 10 * m["kv-pre-channel-3b"]["q"]["rel_change"]
  claims = json.loads((out / "claims.json").read_text())["claims"]
  assert {c["claim"] for c in claims} == {"C6", "C6-keep"}   # no w8a8 row: SmoothQuant has nothing to be compared with
  table = (out / "table.md").read_text()
  assert (out / "c6.png").stat().st_size > 0 and "perplexity" in table
  verdict_lines = [line for line in table.splitlines() if line.startswith("C6")]
  assert len(verdict_lines) == 2 and all(re.search(r"\(diff (-|-?[\d.e+-]+ \[-?[\d.e+-]+, -?[\d.e+-]+\])\) ", line)
                                         and not re.search(r"\d\.\d{4}", line) for line in verdict_lines), verdict_lines
  assert cli.main(["quantize", "--model", "random", "--out", str(out), "--methods", "kv", "--kv-bits", "4,one"]) == 2
  assert capsys.readouterr().err.startswith("error: --kv-bits: ")


@pytest.mark.slow   # the study on two models
@pytest.mark.parametrize("order", [("rope", "nope"), ("nope", "rope")])
def test_the_rope_model_s_verdicts_are_the_claims_in_either_order(tmp_path, monkeypatch, order):
  import json
  from analysis.lab import cli
  from analysis.studies import disruption, suites
  from minilm.encodings import NoPE
  from train.tokenizer import ByteTokenizer
  tok = ByteTokenizer()
  cfg = ModelConfig(vocab_size=tok.vocab_size, d_model=32, n_layers=2, n_heads=4, max_len=64)
  models = {"rope": Decoder(cfg, rngs=nnx.Rngs(0)), "nope": Decoder(dataclasses.replace(cfg, position=NoPE()), rngs=nnx.Rngs(1))}
  items = [suites.Item("ctx", "contextual", np.asarray(tok.encode(f"key {i}{i}: value"), np.int32), "", f"{i}", 2, {})
           for i in range(3)]
  monkeypatch.setattr(disruption, "load_sources", lambda *a: [(m, models[m], tok, items, None, {}) for m in order])
  out = tmp_path / "c6"
  assert cli.main(["quantize", "--model", "random", "--out", str(out), "--methods", "rtn,rtn_keep", "--bits", "4",
                   "--group-size", "16", "--top-k", "1", "--n", "2", "--calib", "2x16", "--ppl", "2x16"]) == 0
  judged = json.loads((out / "summary.json").read_text())["verdicts"]
  assert sorted(v["title"].split("(")[-1] for v in judged) == ["nope)", "rope)"]
  claims = json.loads((out / "claims.json").read_text())["claims"]
  assert [(c["claim"], c["title"].split("(")[-1]) for c in claims] == [("C6-keep", "rope)")]


@pytest.mark.slow   # the study twice
@pytest.mark.skipif(len(getattr(os, "sched_getaffinity", lambda _: ())(0)) < 2, reason="two workers need two CPUs this process may use")
def test_schemes_side_by_side_in_two_workers_give_the_same_study(tmp_path, monkeypatch):
  import json
  assert _tiny_study(monkeypatch, tmp_path / "one") == 0 and _tiny_study(monkeypatch, tmp_path / "two", "--jobs", "2") == 0
  assert (tmp_path / "two" / "results.jsonl").read_text() == (tmp_path / "one" / "results.jsonl").read_text()
  one, two = (json.loads((tmp_path / d / "summary.json").read_text()) for d in ("one", "two"))
  assert (one["jobs"], two["jobs"]) == (1, 2)
  logs = []
  for r in (one, two):   # all but the timings and the setting itself
    del r["seconds_total"], r["jobs"]
    for m in r["models"].values():
      del m["seconds"]
      logs.append(m.pop("logs"))
  assert two == one
  # the quantizers' logged float64 errors: BLAS may sum them in another order on a worker's share of
  # the threads (relative 1e-16 per term); the choices they made are in the records, compared above
  assert _leaves(logs[1]) == [pytest.approx(x, rel=1e-9, abs=0) if isinstance(x, float) else x for x in _leaves(logs[0])]


def _leaves(tree) -> list:
  """A nested dict's leaves in key order."""
  return [x for k in sorted(tree) for x in _leaves(tree[k])] if isinstance(tree, dict) else [tree]


@pytest.mark.slow   # two decoding paths per axis; the grid test in test_quantize_model is the fast check
@pytest.mark.parametrize("axis", ["channel", "token"])
def test_padded_batches_answer_as_equal_length_batches(axis):
  """KV-quantized greedy answers of prompts of lengths 6, 11 and 17, right-padded to multiples of 16
  (the per-channel grid over the prompt tokens only), are those of equal-length batches."""
  from analysis.studies import quantize_model as QM
  from analysis.studies import suites
  from train.tokenizer import ByteTokenizer
  model = Decoder(ModelConfig(vocab_size=300, d_model=32, n_layers=2, n_heads=4, max_len=64), rngs=nnx.Rngs(0))
  rng = np.random.default_rng(2)
  items = [suites.Item(f"t{n}", "contextual", rng.integers(0, 300, n).astype(np.int32), "", "x", 5, {})
           for n in (6, 11, 17, 11, 6)]
  kw = dict(hook=QM.kv_hook, hook_args=QM.kv_args(QM.Scheme("kv", bits=2, kv_axis=axis)), label="m", scheme="kv")
  plain = QS.run_items(model, ByteTokenizer(), items, batch=2, **kw)
  padded = QS.run_items(model, ByteTokenizer(), items, batch=4, bucket=16, **kw)
  assert sorted(plain, key=lambda r: r["example"]) == sorted(padded, key=lambda r: r["example"])


def test_norms_are_those_of_a_capture_pass_with_and_without_a_hook():
  """The jitted norms equal M computed in float64 from an eager capture pass, under no hook and under
  a 2-bit KV key hook (same float32 forward, fused and reordered: 1e-5 of the largest M is ~80 eps);
  and the hook is applied (2-bit keys move k's M)."""
  import functools
  import jax.numpy as jnp
  from analysis.studies import quantize_model as QM
  from minilm import capture
  model = Decoder(ModelConfig(vocab_size=300, d_model=32, n_layers=2, n_heads=4, max_len=64), rngs=nnx.Rngs(0))
  toks = np.random.default_rng(3).integers(0, 300, (3, 20)).astype(np.int32)
  args = QM.kv_args(QM.Scheme("kv", bits=2, kv_point="pre", kv_axis="token"))
  got = {}
  for hook, hook_args in ((None, None), (QM.kv_hook, args)):
    got[hook] = QS.norms(model, toks, hook, hook_args)
    intervene = None if hook is None else functools.partial(hook, hook_args)
    _, cache = capture.run(model, jnp.asarray(toks), points=QS.M_POINTS, intervene=intervene)
    for p in QS.M_POINTS:
      want = np.stack([np.sqrt((np.asarray(x, np.float64) ** 2).sum((0, 1))) for x in cache.stack(p)])
      np.testing.assert_allclose(got[hook][p], want, rtol=0, atol=1e-5 * want.max(), err_msg=p)
  assert np.abs(got[QM.kv_hook]["k"] / got[None]["k"] - 1).max() > 1e-2


def test_c6_verdict_compares_the_4_bit_schemes_on_usable_contextual_items_only():
  """The verdict reads the VERDICT_BITS schemes (here listed after 8-bit ones, where the two methods
  tie), only the contextual items of tasks the fp model solves (a task at exactly USABLE counts;
  a task below it and the parametric items, where the ranking is reversed, do not), and reports the
  protecting scheme's mean as the value and the other's as the reference."""
  schemes = QS.schemes(["awq", "gptq"], [8, 4, 3])
  name = {(s.method, s.bits): s.name for s in schemes}
  out = []
  for i in range(70):
    task, kind, fp = (("passkey", "contextual", int(i % 10 < 8)) if i < 30 else   # fp at exactly USABLE
                      ("hard", "contextual", int(i % 10 < 5)) if i < 50 else
                      ("capitals", "parametric", 1))
    awq4, gptq4 = (int(i % 10 < 9), int(i % 10 < 3)) if task == "passkey" else (0, 1)
    out += [_record("fp", i, task, kind, fp), _record(name["awq", 4], i, task, kind, awq4),
            _record(name["gptq", 4], i, task, kind, gptq4)]
    out += [_record(name[m, b], i, task, kind, 1) for m in ("awq", "gptq") for b in (8, 3)]
  v, = QS.verdicts(out, "m", schemes, n_boot=500)
  assert v.verdict == "supported" and v.reference == name["gptq", 4]
  assert (v.value, v.reference_value, v.diff) == pytest.approx((0.9, 0.3, 0.6))
  assert v.value_ci[0] <= v.value <= v.value_ci[1] and v.reference_ci[0] <= v.reference_value <= v.reference_ci[1]


def test_massive_change_by_hand():
  """Hand values (one head of 16 dims, lambda 5): fp has massive dims {0, 1} (40 > 5 * 94/16), the
  quantized model {0, 15}; the ratios average over the fp-massive dims and the rest, the Jaccard
  overlap is 1 shared of 3."""
  before = np.ones((1, 1, 16)); before[..., :2] = 40
  after = np.ones((1, 1, 16)); after[..., 0] = after[..., 15] = 40
  got = QS.massive_change({"q": before}, {"q": after}, lam=5.0)["q"]
  assert got["n_massive_before"] == got["n_massive_after"] == 2
  assert got["ratio_massive"] == pytest.approx((1 + 1 / 40) / 2)          # float64 sums of a few terms
  assert got["ratio_other"] == pytest.approx((13 + 40) / 14)
  assert got["jaccard"] == pytest.approx(1 / 3)
  assert got["rel_change"] == pytest.approx(np.sqrt(2 * 39 ** 2) / np.sqrt(2 * 40 ** 2 + 14))


def test_perplexity_is_exp_of_the_mean_next_token_loss():
  """perplexity from first principles: logits at position t score token t + 1, the mean over every
  scored token of every window (windows of one length), exponentiated; float64 reference from the
  model's own float32 logits (the jitted forward differs by float32 rounding: rtol 1e-5)."""
  model = Decoder(ModelConfig(vocab_size=50, d_model=32, n_layers=2, n_heads=4, max_len=64), rngs=nnx.Rngs(0))
  windows = np.random.default_rng(4).integers(0, 50, (5, 12)).astype(np.int32)
  logits = np.asarray(model(windows), np.float64)
  logp = logits - logits.max(-1, keepdims=True)
  logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
  nll = -np.take_along_axis(logp[:, :-1], windows[:, 1:, None], axis=-1)
  got = QS.perplexity(model, windows, batch=2, n_boot=200)
  assert got["ppl"] == pytest.approx(np.exp(nll.mean()), rel=1e-5)
  assert got["ci"][0] <= got["ppl"] <= got["ci"][1]


def test_what_the_model_bounds_is_one_line_naming_the_flag(tmp_path, capsys):
  """The top-k dims rtn_keep keeps, the group size and the calibration windows are bounded by the model
  and its text: each error names its flag, not the function that found it."""
  from analysis.lab import cli
  out = tmp_path / "c6"
  for flags, line in ((["--methods", "rtn_keep", "--top-k", "9"],
                       "error: --top-k: must be at most the head_dim 8 of 'random-tiny' (0: the massive dims); got 9"),
                      (["--calib", "2x1000000"], "error: --calib: 2 windows of 1000000 tokens need 2000000 tokens; "
                                                 "the calibration text has "),
                      (["--group-size", "24"], "error: --group-size: must divide the linears' input dims 32, 96 of "
                                               "'random-tiny' (0: per output channel); got 24")):
    assert cli.main(["quantize", "--model", "random", "--n", "2", "--tasks", "capitals", "--methods", "rtn",
                     "--bits", "4", "--group-size", "16", "--calib", "2x32", "--ppl", "2x8", *flags, "--out", str(out)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(line), lines
  assert not out.exists()


def test_a_subject_s_keeping_schemes_share_one_capture_pass(monkeypatch):
  """rtn_keep and its control at every width choose from M of the same unquantized model over the
  same calibration tokens: the study measures it once per subject, and the weights are those that
  quantize_model gives measuring it itself."""
  from analysis.studies import quantize_model as QM
  model = Decoder(ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_len=64),
                  rngs=nnx.Rngs(0))
  calib = np.random.default_rng(0).integers(0, 64, (2, 16)).astype(np.int32)
  subject = QS.Subject("tiny", model, None, [], calib, calib, batch=4, bucket=0)
  passes, calib_norms = [], QM.calib_norms
  monkeypatch.setattr(QM, "calib_norms", lambda *a: passes.append(1) or calib_norms(*a))
  for scheme in (QM.Scheme(m, bits=b, group_size=16, top_k=1) for m in QM.KEEPING for b in (4, 3)):
    shared = QM.quantize_model(model, scheme, calib, subject.calib_M)[0]
    own = QM.quantize_model(model, scheme, calib)[0]
    for a, b in zip(jax.tree.leaves(nnx.state(shared)), jax.tree.leaves(nnx.state(own))):
      np.testing.assert_array_equal(a, b)
  assert len(passes) == 1 + 4   # the subject's, then each scheme's own
