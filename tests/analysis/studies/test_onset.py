"""The onset study (analysis.studies.onset): the law recovers a planted slope, onsets are right or
honestly None, the table reads a traced store and its run, and bad input is one line."""
from __future__ import annotations

import json
import math
import os
import shutil

import numpy as np
import pytest
from flax import nnx

from analysis.massive import pipeline as PL
from analysis.massive import stats as S
from analysis.massive import store as ST
from analysis.massive import trace as T
from analysis.studies import onset
from helpers import planted_law as planted
from minilm import atomic
from minilm.model import Decoder, count_params
from minilm.schema import override, to_dict
from train import checkpoints as ck
from train.config import TrainConfig


def test_fit_recovers_a_planted_law_and_its_onset():
  fit = onset.fit_law(planted(), "rope", "pair_max_mean", n_boot=300)
  assert (fit.n_arms, fit.n_sizes, fit.n_points) == (9, 3, 90)   # tokens = 0 is left out
  np.testing.assert_allclose(fit.coef, [1.0, 0.25, 0.5], atol=0.03)
  lo, hi = fit.ci()[1]
  assert lo <= 0.25 <= hi and hi - lo < 0.02
  n, level = 4e5, 20.0
  want = 2 ** ((level - fit.coef[0] - fit.coef[2] * math.log2(n)) / fit.coef[1])
  tokens, why = onset.reach(fit, n, level)
  assert tokens == pytest.approx(want) and why == ""
  assert onset.predict(fit, n, tokens) == pytest.approx(level)
  o = onset.onset(fit, n, level)
  assert o["ci"][0] <= tokens <= o["ci"][1] and o["replicates_reaching"] == 1.0
  tokens, why = onset.reach(fit, n, level, horizon=want / 2)
  assert tokens is None and "horizon" in why


def test_onset_is_none_for_a_falling_law_and_c_is_fixed_with_one_size():
  fit = onset.fit_law(planted(b=-0.1, sizes=(1e6,)), "rope", "pair_max_mean", n_boot=50)
  assert fit.coef[1] < 0 and fit.coef[2] == 0 and "c not identified" in fit.note
  tokens, why = onset.reach(fit, 1e6, 50.0)
  assert tokens is None and "<= 0" in why
  assert onset.onset(fit, 1e6, 50.0)["ci"] == [None, None]
  assert onset.fit_law(planted(sizes=(1e6,)), "nope", "pair_max_mean") is None   # no arm of that kind


def test_arm_bootstrap_resamples_whole_arms():
  """Two sizes, one arm each: every kept replicate holds both arms, so the interval has no width."""
  fit = onset.fit_law(planted(seeds=1, sizes=(1e5, 1e6)), "rope", "pair_max_mean", n_boot=100)
  assert 0 < fit.dropped < 100 and len(fit.boot) == 100 - fit.dropped
  np.testing.assert_allclose(fit.boot, np.broadcast_to(fit.coef, fit.boot.shape), atol=1e-9)


def test_prediction_holds_for_new_arms_of_the_law_and_fails_for_a_steeper_one():
  """Fit on tokens up to 2^19; new seeds of the same law two doublings further are inside the
  widened interval, arms of a law twice as steep are above it, and the verdict says so."""
  fit = onset.fit_law(planted(noise=0.05), "rope", "pair_max_mean", n_boot=300)
  assert 0.02 < fit.resid_sd < 0.1   # the planted arm-to-arm spread (0.05 per point)
  far = [r for r in planted(noise=0.05, seed=1, sizes=(4e5,)) if r["tokens"] > 0]
  for r in far:
    r["tokens"] *= 4
    r["pair_max_mean"] += 0.25 * 2   # the law at four times the tokens
  tested = onset.check_prediction(far, [fit])
  (v,) = tested["verdicts"]
  assert (v["verdict"], v["arms"]) == ("holds", 3) and len(tested["points"]) == 30
  steep = [dict(r, pair_max_mean=r["pair_max_mean"] + 0.25 * math.log2(r["tokens"])) for r in far]
  (v,) = onset.check_prediction(steep, [fit])["verdicts"]
  assert v["verdict"] == "fails" and set(v["sides"].values()) == {"above"}


def test_a_law_that_cannot_place_an_arm_is_inconclusive_and_unfitted_kinds_are_listed():
  """A law fitted on one arm has no resid_sd (NaN): its interval places nothing, so the verdict is
  inconclusive, not 'fails' (NaN compared false and read as 'below'). A kind with no law is untested."""
  one = [r for r in planted(seeds=1, sizes=(1e5,)) if r["tokens"] > 0]
  fit = onset.fit_law(one, "rope", "pair_max_mean", n_boot=50)
  assert fit.n_arms == 1 and math.isnan(fit.resid_sd)
  alibi = [dict(r, kind="alibi", arm="alibi_0") for r in one]
  tested = onset.check_prediction(one + alibi, [fit])
  (v,) = tested["verdicts"]
  assert v["verdict"] == "inconclusive" and set(v["sides"].values()) == {"untestable"}
  assert tested["untested"] == {"alibi": ["alibi_0"]}
  assert "prediction alibi: untested, no law of this kind in the fit (alibi_0)" in onset.prediction_lines(tested)


def test_the_data_s_own_crossing_is_reported_beside_the_law_and_left_out_rows_are_counted():
  """One arm jumps to 6 at its last checkpoint: the law (flat elsewhere) does not reach 5, the data
  does, and the summary says so. A NaN checkpoint is counted, not silently dropped; a statistic
  with no variation says its law is a constant."""
  rows = planted(b=0.0, c=0.0, noise=0.01, sizes=(1e5,))
  last = max(r["tokens"] for r in rows)
  jumped = next(r for r in rows if r["arm"] == "rope_100000_0" and r["tokens"] == last)
  jumped["pair_max_mean"] = 6.0
  next(r for r in rows if r["arm"] == "rope_100000_1" and r["tokens"] == 1024)["pair_max_mean"] = math.nan
  (seen,) = [o for o in onset.observed(rows) if o["stat"] == "pair_max_mean"]
  assert seen["first_tokens"] == {"rope_100000_0": last, "rope_100000_1": None, "rope_100000_2": None}
  fit = onset.fit_law(rows, "rope", "pair_max_mean", n_boot=50)
  assert fit.excluded == 1 and fit.n_points == 29 and onset.onset(fit, 1e5, 5.0)["tokens"] is None
  lines = onset.summary_lines({"observed": onset.observed(rows), "fits": []})
  assert f"rope: pair_max_mean at or above 5 in the checkpoints of 1 of 3 arms (first at {last:.3g} tokens)" in lines
  flat = onset.fit_law(rows, "rope", "share5_post", n_boot=50)
  assert "no variation: every value is 0" in flat.note


@pytest.fixture(scope="module")
def traced(tmp_path_factory):
  """A traced store of untrained models standing in for checkpoints (rope and nope, d16; one rope at
  d32), with each arm's TrainConfig and an eval.jsonl in the run folder the store records."""
  root = tmp_path_factory.mktemp("onset")
  run, out = str(root / "run"), str(root / "trace")
  probes = np.random.default_rng(0).integers(0, 64, (4, 16))
  store = ST.open_store(out, probes, np.ones(probes.shape), False, S.StatConfig(), {"run_dir": run})
  for arm, kind, d in (("a", "rope", 16), ("b", "nope", 16), ("c", "rope", 32)):
    tc = override(TrainConfig(), {"model.d_model": d, "model.n_layers": 2, "model.n_heads": 2, "model.position": kind,
                                  "model.max_len": 16, "data.seq_len": 16, "data.batch_size": 2, "seed": 7,
                                  "data.mixture": {"text": 1.0}})
    atomic.write_json(os.path.join(run, arm, "config.json"), to_dict(tc))
    with open(os.path.join(run, arm, "eval.jsonl"), "w") as f:
      f.write(json.dumps({"step": 2, "passkey": 0.5, "conflict.other": 0.1}) + "\n")
    for step in (0, 1, 2):
      T.record_step(store, Decoder(tc.model, rngs=nnx.Rngs(step)), arm, step, context=16, final=step == 2,
                    batch_size=4)
  T.rebuild(store, n_boot=10)
  return root


def test_table_and_outputs_from_a_traced_store(traced, tmp_path):
  rows = onset.table(str(traced / "trace"))
  assert [(r["arm"], r["step"]) for r in rows] == [(a, s) for a in "abc" for s in (0, 1, 2)]
  a2 = rows[2]
  assert (a2["kind"], a2["context"], a2["seed"], a2["tokens"]) == ("rope", 16, 7, 2 * 2 * 16)
  model = override(TrainConfig(), {"model.d_model": 16, "model.n_layers": 2, "model.n_heads": 2}).model
  assert a2["params"] == count_params(Decoder(model, rngs=nnx.Rngs(0)))
  assert a2["eval_passkey"] == 0.5 and "eval_conflict.other" not in a2 and "eval_passkey" not in rows[1]
  for point in ("pre", "post", "pair"):
    assert a2[f"{point}_max_mean"] >= 1 and all(0 <= a2[f"share{l}_{point}"] <= 1 for l in (3, 4, 5))
  assert a2["post_max_mean"] >= a2["pair_max_mean"]   # per dim >= per pair, the rule's premise
  assert a2["j_ctx"] is not None and rows[3]["j_ctx"] is None and rows[3]["peak_minus_ctx"] is None
  data = onset.write(rows, str(tmp_path), n_boot=20, sizes=[1e7])
  assert sorted(os.listdir(tmp_path)) == ["concentration.png", "fit.json", "onset_table.csv", "pair_profile.png",
                                         "scores.png"]   # a2 has a held-out score
  assert not onset.scores_figure([{k: v for k, v in r.items() if not k.startswith("eval_")} for r in rows],
                                 str(tmp_path / "none.png"))   # no score: no figure
  assert {(f["kind"], f["stat"]) for f in data["fits"]} == {(k, s) for k in ("rope", "nope") for s in onset.FITTED}
  assert data["rule"] == onset.RULE and [o["params"] for o in data["fits"][0]["onset"]][-1] == 10 ** 7
  assert onset.load_fits(str(tmp_path / "fit.json"))[0].boot.shape == (len(data["fits"][0]["boot"]), 3)


def test_cli_writes_and_bad_input_is_one_line(traced, tmp_path, capsys):
  from analysis.lab.cli import main
  assert main(["onset", str(traced / "trace"), "--out", str(tmp_path / "out"), "--n-boot", "10"]) == 0
  assert "wrote" in capsys.readouterr().out and os.path.exists(tmp_path / "out" / "fit.json")
  assert main(["onset", str(traced / "trace"), "--out", str(tmp_path / "again"), "--n-boot", "10",
               "--predict", str(tmp_path / "out" / "fit.json")]) == 0
  assert "prediction rope pair_max_mean: the law" in capsys.readouterr().out
  tested = json.loads((tmp_path / "again" / "prediction.json").read_text())
  assert tested["rule"] == onset.PREDICTION_RULE and {v["kind"] for v in tested["verdicts"]} == {"rope", "nope"}
  alibi = tmp_path / "alibi"
  shutil.copytree(traced / "trace", alibi)
  meta = json.loads((alibi / "meta.json").read_text())
  for facts in meta["arms"].values():
    facts["position"] = "alibi"
  (alibi / "meta.json").write_text(json.dumps(meta))
  for args, field in (([str(tmp_path / "nowhere")], "trace_dir"), ([str(alibi)], "trace_dir"),
                      ([str(traced / "trace"), "--run-dir", str(tmp_path)], "--run-dir"),
                      ([str(traced / "trace"), "--n-boot", "0"], "--n-boot"),
                      ([str(traced / "trace"), "--predict", str(tmp_path / "nofit.json")], "--predict")):
    assert main(["onset", *args, "--out", str(tmp_path / "x")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {field}: "), lines
    assert field != "trace_dir" or args[0] != str(alibi) or "'rope' or 'nope'" in lines[0]
  assert not os.path.exists(tmp_path / "x")


def test_a_run_dir_of_another_training_is_refused(traced, tmp_path, capsys):
  """--run-dir gives each arm's batch, context and scores: a run whose arm trained otherwise than the
  one traced (what meta.json records of it) would give another training's token counts."""
  from analysis.lab.cli import main
  trace, run = tmp_path / "trace", tmp_path / "run"
  shutil.copytree(traced / "trace", trace)
  shutil.copytree(json.loads((trace / "meta.json").read_text())["run_dir"], run)
  meta = json.loads((trace / "meta.json").read_text())
  for arm, facts in meta["arms"].items():   # what trace_run records of each arm
    tc = ck.load_config(str(run / arm))
    facts.update(seed=tc.seed, run_key=PL.run_key(tc))
  (trace / "meta.json").write_text(json.dumps(meta))
  assert main(["onset", str(trace), "--run-dir", str(run), "--out", str(tmp_path / "ok"), "--n-boot", "10"]) == 0
  capsys.readouterr()
  config = json.loads((run / "a" / "config.json").read_text())
  config["data"]["batch_size"] = 8
  (run / "a" / "config.json").write_text(json.dumps(config))
  assert main(["onset", str(trace), "--run-dir", str(run), "--out", str(tmp_path / "x"), "--n-boot", "10"]) == 2
  lines = capsys.readouterr().err.strip().splitlines()
  assert lines == [f"error: --run-dir: {run}/a is not the training the trace was made from (its seed or settings "
                   "differ from those meta.json records); pass the run the trace was made from"]
  assert not os.path.exists(tmp_path / "x")


def test_a_predict_file_that_is_no_fit_json_is_one_line_naming_it(traced, tmp_path, capsys):
  from analysis.lab.cli import main
  given = "is not a fit.json of `python -m analysis onset`"
  for text, why in (("{}", f"{given} (no 'fits')"), ("[]", f"{given} (no 'fits')"),
                    ('{"fits": [{}]}', f"{given} (a fit is missing a field or holds a wrong value: 'kind')"),
                    ('{"fits": 3}', f"{given} (a fit is missing a field"),
                    ("# a README", f"{given} (not valid JSON: "), ("[" * 100_000, f"{given} (not valid JSON: "),
                    ('{"fits": []}', "holds no fit")):
    bad = tmp_path / "bad.json"
    bad.write_text(text)
    assert main(["onset", str(traced / "trace"), "--out", str(tmp_path / "x"), "--predict", str(bad)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: --predict: {bad} {why}"), lines
  assert not os.path.exists(tmp_path / "x")


def test_the_command_builds_the_study_a_caller_would(traced, tmp_path):
  import argparse
  ap = argparse.ArgumentParser()
  onset.add_arguments(ap)
  args = ap.parse_args([str(traced / "trace"), "--out", "x", "--params", "1e7", "--n-boot", "5"])
  cfg = onset.OnsetStudy(str(traced / "trace"), params=(1e7,), n_boot=5)
  assert onset.study_from_args(args) == cfg
  data, tested = onset.run(cfg, str(tmp_path / "out"))
  assert tested is None and [o["params"] for o in data["fits"][0]["onset"]][-1] == 10 ** 7
