"""Verdicts from stores of synthetic per-prompt sums with known truth, and the fixed rules themselves."""
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest

from analysis.massive import claims as CL
from analysis.massive import stats as S
from analysis.massive import store as ST
from helpers import ROOT
from minilm import encodings, hooks
from minilm.config import ModelConfig
from minilm.schema import ConfigError, to_dict

L, H, K, D, N = 4, 4, 2, 32, 24
LF_PAIR = 13                      # in the lowest-frequency quarter (pairs 12..15 of 16)


def _facts(position):
  return {"position": position.kind, "position_cfg": to_dict(ModelConfig(position=position))["position"],
          "n_layers": L, "n_heads": H, "kv_heads": K, "head_dim": D, "context": 64.0}


def _sums(rng, planted_layers, spread=False, heads=None, v_factor=None):
  """Per-prompt sums of squares of every layer and tensor; q/k and rot_q/rot_k of `planted_layers` get
  both dims of pair LF_PAIR (half layout) 400x the energy in every head (or in `heads`: {head: pair}).
  spread=True plants in dim LF_PAIR alone before RoPE and lets the rotation share the pair's energy
  equally between its two dims after it, as RoPE does over many positions. v_factor: v of those
  layers gets one dim (LF_PAIR) that many times the energy in every head."""
  sums = {}
  for layer in range(L):
    for tensor in ("q", "k", "v"):
      sums[hooks.name(layer, tensor)] = rng.chisquare(8, (N, H if "q" in tensor else K, D))
    if v_factor and layer in planted_layers:
      sums[hooks.name(layer, "v")][:, :, LF_PAIR] *= v_factor
    for tensor in ("q", "k"):
      s = sums[hooks.name(layer, tensor)]
      if layer in planted_layers:
        for h, j in (heads or dict.fromkeys(range(H), LF_PAIR)).items():
          if h < s.shape[1]:                   # k has K < H heads
            s[:, h, [j] if spread else [j, j + D // 2]] *= 400
      rot = s.copy()
      if spread:
        rot[..., [LF_PAIR, LF_PAIR + D // 2]] = s[..., [LF_PAIR, LF_PAIR + D // 2]].mean(-1, keepdims=True)
      sums[f"{layer}.rot_{tensor}"] = rot
  return {k: v.astype(np.float32) for k, v in sums.items()}


def _store(path, rope_layers, nope_layers, arms=("rope", "nope"), rope=encodings.RoPE(), cfg=S.StatConfig(),
           **plant):
  rng = np.random.default_rng(0)
  probes = np.zeros((N, 64), np.int32)
  store = ST.open_store(str(path), probes, np.ones(probes.shape), False, cfg)
  meta = store.meta()
  positions = {"rope": (rope, rope_layers), "nope": (encodings.NoPE(), nope_layers)}
  for arm in arms:
    position, planted = positions[arm]
    meta["arms"][arm] = _facts(position)
    for step in (0, 10):
      store.save_sums(arm, step, _sums(rng, planted if step == 10 else (), **plant))
  store.write_json("meta.json", meta)
  return store


def _verdicts(store, **kw):
  return {v.claim: v for v in CL.judge(store, n_boot=400, **kw)}


def test_planted_rope_concentration_supports_c1_to_c4(tmp_path):
  v = _verdicts(_store(tmp_path, rope_layers=range(L), nope_layers=()))
  assert {c: x.verdict for c, x in v.items()} == {c: "supported" for c in ("C1", "C2", "C3", "C3-lowfreq", "C4")}
  assert v["C1"].value == 1.0 and v["C1"].reference_value == 0.0 and v["C1"].step == 10      # every Q/K head, none in NoPE
  assert v["C1"].points["pre"]["value"] == v["C1"].points["pair"]["value"] == 1.0
  assert "massive pair 1.000" in v["C3"].notes and "(none: " not in v["C3"].notes
  judged = [p for p in v["C1"].parts if p["verdict"]]
  assert {p["key"] for p in judged} == {"share_Q", "share_K", "recurrence_Q", "recurrence_K"}
  assert all(p["point"] == "post" for p in judged)
  rec_q = next(p for p in judged if p["key"] == "recurrence_Q")
  assert rec_q["observed"] == L * 6 * 2 and rec_q["p"] == 1 / (CL.N_PERM + 1)   # 4 heads: 6 pairs, 2 dims each
  assert v["C3"].point == "pair" and v["C3"].ci[0] > 0 and v["C3"].reference == "arm nope"
  assert v["C3"].diff == v["C3"].points["pair"]["diff"]
  for c in ("C1", "C3", "C3-lowfreq"):                 # exact: the same float64 subtraction
    assert v[c].diff == v[c].value - v[c].reference_value > 0, c
  assert v["C3-lowfreq"].value > 0.9 and abs(v["C3-lowfreq"].reference_value - 0.25) < 0.05   # sampling spread around the null
  assert v["C4"].value == 0 and [p["value"] for p in v["C4"].parts if p["verdict"]] == [0, 0]


def test_c3_is_judged_where_the_rotation_cannot_bias_it(tmp_path):
  """Both arms equally concentrated before RoPE (the same sums); the rotation shares the RoPE arm's
  massive dim with its pair partner, lowering the per-dim max/mean after RoPE in the RoPE arm only."""
  store = _store(tmp_path, rope_layers=range(L), nope_layers=range(L), spread=True)
  nope_10 = store.load_sums("rope", 10)
  store.save_sums("nope", 10, {**nope_10, **{k: nope_10[k.replace("rot_", "")] for k in nope_10 if "rot_" in k}})
  v = _verdicts(store)["C3"]
  assert v.points["pre"]["diff"] == 0 and v.points["pair"]["diff"] == 0       # identical before RoPE and per pair
  assert v.points["post"]["ci"][1] < 0                                          # the paper's view: RoPE looks lower
  assert v.verdict == "inconclusive" and v.ci[0] < 0 < v.ci[1]                 # heads resampled per arm
  # float64: (post - pre) - (post' - pre) against post - post', a few ulps; approx's 1e-6 is ample
  assert v.rotation["of"] == "diff" and v.rotation["value"] == pytest.approx(v.points["post"]["diff"])
  assert v.rotation["ci"][1] < 0                                                # all of the gap is the rotation
  assert "100% of the post-RoPE per-dim difference" in CL.rotation_text(v)


def test_v_more_concentrated_than_q_and_k_makes_c2_opposite(tmp_path):
  """C2 is a gap: Q/K's max/mean minus V's. V with one dim 4000x (Q/K: a pair 400x) reverses it."""
  v = _verdicts(_store(tmp_path, rope_layers=range(L), nope_layers=(), v_factor=4000))["C2"]
  assert v.verdict == "opposite" and v.ci[1] < 0
  assert v.value == pytest.approx(v.points["post"]["value"]) and "V max/mean" in v.notes


def test_c2_is_judged_after_rope_not_before(tmp_path):
  """Q/K massive in one dim before RoPE, shared with its pair partner after it (spread); V with one dim
  200x: more concentrated than Q/K after RoPE, less than before it. The rule reads the paper's view (post)."""
  v = _verdicts(_store(tmp_path, rope_layers=range(L), nope_layers=(), spread=True, v_factor=200))["C2"]
  # gaps about +2.4 before and -2.4 after RoPE, with intervals about +-0.5 around them (fixed seeds)
  assert v.points["pre"]["value_ci"][0] > 0 and v.points["post"]["value_ci"][1] < 0
  assert v.verdict == "opposite"


def test_recurrence_uses_the_trace_s_lambda(tmp_path):
  """A trace made with lambda 12 (planted Q/K heads reach max/mean ~9): no massive dim anywhere, so no
  head can share one, at every point."""
  v = _verdicts(_store(tmp_path, rope_layers=range(L), nope_layers=(), cfg=S.StatConfig(lam=12.0)))["C1"]
  assert v.verdict == "not supported" and v.value == 0
  recurrence = [p for p in v.parts if p["key"].startswith("recurrence")]
  assert len(recurrence) == 6 and all(p["observed"] == 0 and p["testable"] == 0 for p in recurrence)


def test_heads_with_massive_dims_at_different_indices_do_not_recur(tmp_path):
  store = _store(tmp_path, rope_layers=range(L), nope_layers=(), heads={0: 1, 1: 13, 2: 6, 3: 9})
  v = _verdicts(store)["C1"]
  by = {p["key"]: p for p in v.parts if p["verdict"]}
  assert by["share_Q"]["value"] == 1.0 and by["share_Q"]["verdict"] == "supported"
  assert by["recurrence_Q"]["observed"] == 0 and by["recurrence_Q"]["verdict"] == "not supported"
  assert v.verdict == "not supported"


def test_concentration_in_the_nope_arm_only_is_opposite(tmp_path):
  v = _verdicts(_store(tmp_path, rope_layers=(), nope_layers=range(L)))
  assert v["C3"].verdict == "opposite" and v["C3"].ci[1] < 0
  assert "share of q/k heads with a massive pair 0.000" in v["C3"].notes and "(none: " in v["C3"].notes
  assert v["C3-lowfreq"].verdict == "opposite"
  assert v["C1"].verdict == "not supported" and v["C4"].verdict == "inconclusive"
  assert v["C4"].value == L                                                      # no layer reaches the level
  # a replicate in which no layer reaches it counts as past the last layer, not as layer 0
  assert v["C4"].value_ci == [L, L] and all(p["ci"] == [L, L] for p in v["C4"].parts)


def test_a_share_of_exactly_half_the_heads_reaches_the_level(tmp_path):
  """'Reaches 0.5' is >=: Q heads 0 and 2 of 4 (so K head 0 of 2) massive in every layer put every
  layer's share at exactly the level, so C4's first layer is layer 0."""
  v = _verdicts(_store(tmp_path, rope_layers=range(L), nope_layers=(), heads={0: LF_PAIR, 2: LF_PAIR}))
  shares = {p["key"]: p["value"] for p in v["C1"].parts if p["verdict"] and p["key"].startswith("share")}
  assert shares == {"share_Q": 0.5, "share_K": 0.5}                            # exact: 8 of 16, 4 of 8 heads
  assert v["C4"].value == 0 and [p["value"] for p in v["C4"].parts if p["verdict"]] == [0, 0]


def test_c4_locates_the_first_layer_where_q_and_k_both_reach_the_level(tmp_path):
  """Q massive from layer 0, K only from layer 2: C4's value is layer 2 (both), and K alone, past
  the first quarter, makes it not supported."""
  store = _store(tmp_path, rope_layers=range(L), nope_layers=())
  last, first = store.load_sums("rope", 10), store.load_sums("rope", 0)       # step 0: nothing planted
  store.save_sums("rope", 10, {**last, **{hooks.name(layer, t): first[hooks.name(layer, t)]
                                         for layer in (0, 1) for t in ("k", "rot_k")}})
  v = _verdicts(store)["C4"]
  assert v.value == 2 and v.value_ci == [2, 2]
  assert [(p["key"], p["value"]) for p in v.parts if p["verdict"]] == [("first_Q", 0), ("first_K", 2)]
  assert v.verdict == "not supported"


def test_late_only_concentration_does_not_support_early(tmp_path):
  v = _verdicts(_store(tmp_path, rope_layers=(1, 2, 3), nope_layers=()))["C4"]
  assert v.verdict == "not supported" and v.value == 1
  assert "layer 1 (25% of the depth)" in v.notes
  first = [p for p in v.parts if p["verdict"]]
  assert [p["value"] for p in first] == [1, 1] and all(p["ci"] == [1, 1] for p in first)


def test_a_nope_reference_is_paired_with_the_rope_arms_layout(tmp_path):
  store = _store(tmp_path, rope_layers=(), nope_layers=(), rope=encodings.RoPE(layout="interleaved"))
  a = CL._Arms(store, None, None, 10)
  assert a.pairing("nope").label == a.pairing("rope").label == "rope interleaved base=10000"


def test_single_rope_arm_uses_the_null_as_reference(tmp_path):
  v = _verdicts(_store(tmp_path, rope_layers=range(L), nope_layers=(), arms=("rope",)))
  assert v["C3"].verdict == "inconclusive" and v["C3"].reference_value is None
  assert v["C3-lowfreq"].reference == "null 0.25" and v["C3-lowfreq"].verdict == "supported"
  lf = v["C3-lowfreq"]                                   # exact: the same float64 subtraction
  assert lf.diff == lf.value - 0.25 > 0 and lf.ci == [x - 0.25 for x in lf.value_ci]
  assert v["C1"].verdict == "supported" and v["C1"].reference == ""
  assert v["C3"].rotation["of"] == "value"


def test_rules_are_fixed_functions_of_the_interval():
  assert CL.direction([0.1, 0.5]) == "supported"
  assert CL.direction([-0.5, -0.1]) == "opposite"
  assert CL.direction([-0.1, 0.5]) == "inconclusive"
  assert CL.direction([-0.5, -0.1], predicted=-1) == "supported"
  assert CL.direction([float("nan"), 1.0]) == "inconclusive"
  assert CL.direction([0.0, 0.5]) == CL.direction([-0.5, 0.0]) == CL.direction([0.0, 0.0]) == "inconclusive"
  assert CL.direction([-0.1, 0.5], predicted=-1) == "inconclusive"
  assert CL.direction([0.1, 0.5], predicted=-1) == "opposite"
  assert CL.at_least([1.0, 3.0], 1.0) == "supported"
  assert CL.at_least([0.0, 0.9], 1.0) == "not supported"
  assert CL.at_least([0.5, 1.5], 1.0) == "inconclusive"
  assert CL.recurs({"testable": 3, "p": 0.001, "p_best": 0.001}) == "supported"
  assert CL.recurs({"testable": 3, "p": 0.2, "p_best": 0.001}) == "not supported"
  assert CL.recurs({"testable": 3, "p": 0.2, "p_best": 0.02}) == "inconclusive"   # could not have been supported
  assert CL.recurs({"testable": 0, "p": float("nan"), "p_best": float("nan")}) == "inconclusive"
  assert CL.recurs({"testable": 3, "p": CL.ALPHA, "p_best": 0.001}) == "not supported"   # p < ALPHA, strictly
  assert CL.early(0, [0, 0], 8) == CL.early(1, [0, 1], 8) == "supported"      # early layers: 0, 1 of 8
  assert CL.early(2, [2, 5], 8) == "not supported" and CL.early(1, [1, 2], 8) == "inconclusive"
  assert CL.early(8, [8, 8], 8) == "inconclusive"                              # never reached
  assert CL.early(0, [0, 0], 1) == CL.early(0, [0, 0], 2) == "supported"      # at least layer 0 is early
  assert CL.early(1, [1, 1], 2) == "not supported"
  assert CL.all_of(["supported", "supported"]) == "supported"
  assert CL.all_of(["supported", "inconclusive"]) == "inconclusive"
  assert CL.all_of(["inconclusive", "not supported"]) == "not supported"
  with pytest.raises(ValueError, match="verdict: must be one of"):
    CL.Verdict("C1", "t", "q", "maybe", "rule")


def test_write_claims_keeps_other_claims_so_c5_c6_can_be_added(tmp_path):
  store = _store(tmp_path, rope_layers=range(L), nope_layers=())
  c5 = CL.Verdict("C5", "Function", "passkey accuracy drop", "supported", "a C5 rule", value=0.9, ci=[0.8, 1.0])
  CL.write_claims([c5], str(tmp_path))
  CL.write_claims(CL.judge(store, n_boot=100), str(tmp_path))
  claims = json.loads((tmp_path / "claims.json").read_text())["claims"]
  assert [c["claim"] for c in claims] == ["C1", "C2", "C3", "C3-lowfreq", "C4", "C5"]
  md = (tmp_path / "claims.md").read_text()
  assert "| C5 Function |" in md and "a C5 rule" in md and CL.RULE_C3 in md and "None" not in md
  assert "per rotary pair (pair energy, rotation-invariant) (judged)" in md
  assert CL.load_claims(str(tmp_path))[-1] == c5


def test_claims_json_with_the_old_field_names_is_a_one_line_error(tmp_path):
  (tmp_path / "claims.json").write_text(json.dumps({"claims": [{"claim": "C5", "title": "t", "quantity": "q",
                                                                "verdict": "supported", "rule": "r", "rope": 0.9}]}))
  with pytest.raises(ConfigError, match=r"claims\.json: unknown verdict field 'rope' .* run the analysis"):
    CL.load_claims(str(tmp_path))
  c5 = CL.Verdict("C5", "Function", "passkey accuracy drop", "supported", "a C5 rule", value=0.8, ci=[0.7, 0.9])
  CL.write_claims([c5], str(tmp_path))   # replacing the old verdict never reads it
  assert CL.load_claims(str(tmp_path)) == [c5]
  for text, why in (('{"claims": [', "damaged, not valid JSON ("), ("[]", "damaged, holds no list of verdicts"),
                    ('{"claims": [3]}', "damaged, holds no list of verdicts")):
    (tmp_path / "claims.json").write_text(text)
    with pytest.raises(ConfigError, match=re.escape(f"{tmp_path / 'claims.json'}: {why}")):
      CL.load_claims(str(tmp_path))


def test_docs_state_every_rule_as_the_code_applies_it():
  docs = (Path(ROOT) / "docs" / "claims.md").read_text()
  for rule in (CL.RULE_C1, CL.RULE_C2, CL.RULE_C3, CL.RULE_C3_LF, CL.RULE_C4):
    assert rule in docs
  assert f"Level of the share of heads for C1 and C4: {CL.SHARE_LEVEL:g}" in docs
  assert f"{CL.N_PERM} permutations, seed {CL.PERM_SEED}, level {CL.ALPHA:g}" in docs


def test_the_reference_is_the_nope_arm_of_the_tested_arm_s_seed(tmp_path):
  """rope_s1 is judged against nope_s1, never against nope_s0 (another seed), though that comes first."""
  def store(path, arms, seeds=True):
    rng = np.random.default_rng(0)
    s = ST.open_store(str(path), np.zeros((N, 64), np.int32), np.ones((N, 64)), False, S.StatConfig())
    meta = s.meta()
    for name, seed in arms:
      position = encodings.NoPE() if name.startswith("nope") else encodings.RoPE()
      meta["arms"][name] = _facts(position) | ({"seed": seed} if seeds else {})
      s.save_sums(name, 10, _sums(rng, range(L) if name.startswith("rope") else ()))
    s.write_json("meta.json", meta)
    return s
  v = {x.claim: x for x in CL.judge(store(tmp_path / "a", [("nope_s0", 0), ("rope_s1", 1), ("nope_s1", 1)]), n_boot=50)}
  assert v["C3"].reference == "arm nope_s1"
  v = {x.claim: x for x in CL.judge(store(tmp_path / "b", [("nope_s0", 0), ("rope_s1", 1)]), n_boot=50)}
  assert v["C3"].verdict == "inconclusive" and v["C3"].notes.startswith("no NoPE arm of seed 1 traced; ")
  # a store that does not know its arms' seeds (an older trace) pairs them as before: the first NoPE arm
  v = {x.claim: x for x in CL.judge(store(tmp_path / "c", [("nope_s0", 0), ("rope_s1", 1)], seeds=False), n_boot=50)}
  assert v["C3"].reference == "arm nope_s0"


def test_arms_without_a_common_traced_step_are_one_line(tmp_path):
  """The claims compare the arms at one step: arms traced at different steps only (tracing while
  training goes on) are refused in one line naming each arm's steps, not a KeyError from inside."""
  store = _store(tmp_path, rope_layers=range(L), nope_layers=())
  os.remove(store.sums_path("nope", 10))
  os.remove(store.sums_path("rope", 0))
  with pytest.raises(ConfigError, match=r"^arms: 'rope' \(traced at steps \[10\]\) and 'nope' \(traced at steps "
                                        r"\[0\]\) share no traced step in .*: trace the arms at a common one$"):
    CL.judge(store, n_boot=10)


def test_the_claims_command_refuses_arms_the_rules_cannot_compare(tmp_path, capsys):
  """The rules judge a RoPE arm against a NoPE arm of its seed: an arm against itself, a NoPE arm
  against ALiBi or a NoPE arm of another seed would be written over the folder's verdicts as RoPE
  minus NoPE."""
  from analysis.lab.cli import main
  store = _store(tmp_path, rope_layers=range(L), nope_layers=())
  meta = store.meta()
  meta["arms"]["alibi"] = _facts(encodings.ALiBi())
  meta["arms"]["rope"]["seed"] = 0
  meta["arms"]["nope_s1"] = {**meta["arms"]["nope"], "seed": 1}
  store.write_json("meta.json", meta)
  store.write_json("summary.json", {})
  earlier = json.dumps({"level": 0.95, "claims": []})   # the verdicts of an earlier trace
  (tmp_path / "claims.json").write_text(earlier)
  for argv, err in ((["--rope-arm", "nope", "--nope-arm", "nope"], "--rope-arm: 'nope' is not a RoPE arm; RoPE arms: rope"),
                    (["--rope-arm", "nope", "--nope-arm", "alibi"], "--rope-arm: 'nope' is not a RoPE arm; RoPE arms: rope"),
                    (["--nope-arm", "alibi"], "--nope-arm: 'alibi' is not a NoPE arm; NoPE arms: nope, nope_s1"),
                    (["--rope-arm", "bogus"], f"--rope-arm: 'bogus' is not an arm of {tmp_path}; arms: rope, nope, alibi, "
                                              "nope_s1"),
                    (["--rope-arm", "rope", "--nope-arm", "nope_s1"],
                     "--nope-arm: 'nope_s1' trained at seed 1, 'rope' at seed 0: an arm is judged against the NoPE arm "
                     "of its own seed")):
    assert main(["claims", str(tmp_path), *argv]) == 2
    assert capsys.readouterr().err.strip() == f"error: {err}"
  assert (tmp_path / "claims.json").read_text() == earlier
  assert main(["claims", str(tmp_path), "--rope-arm", "rope", "--nope-arm", "nope"]) == 0
  assert {v.reference for v in CL.load_claims(str(tmp_path)) if v.claim == "C3"} == {"arm nope"}


@pytest.mark.parametrize("damage", [b"", b"PK\x03\x04x", b"garbage", "nan"])
def test_a_damaged_sums_file_is_one_line_naming_it_and_the_verdicts_stay(tmp_path, capsys, damage):
  """claims reads the traced sums as they are (trace redoes damaged ones): a file cut short, not a
  zip, not numpy's, or holding NaN is one line naming it, not a traceback or NaN verdicts, and the
  earlier verdicts stay."""
  from analysis.lab.cli import main
  store = _store(tmp_path, rope_layers=range(L), nope_layers=())
  store.write_json("summary.json", {})
  earlier = json.dumps({"level": 0.95, "claims": []})
  (tmp_path / "claims.json").write_text(earlier)
  if damage == "nan":
    store.save_sums("rope", 10, {k: np.full_like(v, np.nan) for k, v in store.load_sums("rope", 10).items()})
  else:
    with open(store.sums_path("rope", 10), "wb") as f:
      f.write(damage)
  assert main(["claims", str(tmp_path)]) == 2
  lines = capsys.readouterr().err.strip().splitlines()
  why = "holds values that are not finite" if damage == "nan" else "cannot be read ("
  assert len(lines) == 1 and lines[0].startswith(f"error: {store.sums_path('rope', 10)}: {why}"), lines
  assert lines[0].endswith("trace again into this folder (damaged steps are redone) or into a new one"), lines
  assert (tmp_path / "claims.json").read_text() == earlier


def test_a_trace_without_arms_is_refused_and_the_verdicts_stay(tmp_path, capsys):
  from analysis.lab.cli import main
  store = _store(tmp_path, rope_layers=range(L), nope_layers=())
  store.write_json("summary.json", {})
  store.write_json("meta.json", {**store.meta(), "arms": {}})
  earlier = json.dumps({"level": 0.95, "claims": []})
  (tmp_path / "claims.json").write_text(earlier)
  assert main(["claims", str(tmp_path)]) == 2
  lines = capsys.readouterr().err.strip().splitlines()
  assert len(lines) == 1 and "is not a traced directory (no meta.json with arms" in lines[0], lines
  assert (tmp_path / "claims.json").read_text() == earlier
