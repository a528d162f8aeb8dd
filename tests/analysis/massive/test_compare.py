"""Experiments with seeds: each arm is paired with its same-seed NoPE arm, and each recipe seen under
two or more seeds is pooled over seeds with a t interval (analysis.massive.compare; the `seeded`
fixture in conftest.py); and arms.json, one row per arm of a sweep with its own boundary pair (the
`sweep_dir` fixture)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from analysis.massive import claims as CL
from analysis.massive import compare as CMP
from analysis.massive import store as ST
from helpers import SWEEP, first_pair_beyond

# t quantile 0.975 with 1 and 2 degrees of freedom, from a table (not from scipy, which compare uses).
T975 = {1: 12.706204736174707, 2: 4.302652729911275}
EPS32 = float(np.finfo(np.float32).eps)


def test_every_arm_is_paired_with_the_nope_arm_of_its_own_seed(seeded):
  _, _, out = seeded
  pairs = {r["arm"]: r["reference"] for r in out["comparisons"]}
  assert pairs == {"rope": "nope", "alibi": "nope", "rope_s1": "nope_s1", "rope_s2": None, "alibi_s2": None}
  recipes = {r["arm"]: r["recipe"] for r in out["comparisons"]}
  assert recipes["rope"] == recipes["rope_s1"] == recipes["rope_s2"] == "shared config"
  assert recipes["alibi"] == 'model.position="alibi"'


def test_a_comparison_holds_the_verdicts_of_that_pair_alone(seeded):
  _, store, out = seeded
  row = next(r for r in out["comparisons"] if r["arm"] == "rope_s1")
  direct = CL.judge(store, rope_arm="rope_s1", nope_arm="nope_s1", n_boot=CL.N_BOOT)
  assert [v["claim"] for v in row["verdicts"]] == [v.claim for v in direct]
  for got, want in zip(row["verdicts"], direct):   # exact: the same function on the same stored sums
    assert got["value"] == want.value and got["diff"] == want.diff


def test_a_recipe_under_several_seeds_is_pooled_with_a_t_interval(seeded):
  _, _, out = seeded
  group = next(g for g in out["seed_groups"] if g["recipe"] == "shared config")
  assert group["arms"] == ["rope", "rope_s1", "rope_s2"]
  rows = {r["arm"]: r for r in out["comparisons"]}
  for claim, c in group["claims"].items():
    assert c["seeds"] == [0, 1, 2] and c["steps"] == [0, 0, 0]
    per_arm = [next(v for v in rows[a]["verdicts"] if v["claim"] == claim) for a in group["arms"]]
    # The value the claim's rule judges is pooled; a difference only where every seed has one.
    key = CL.READS[claim] if all(v[CL.READS[claim]] is not None for v in per_arm) else "value"
    assert c["measure"] == key and c["values"] == [v[key] for v in per_arm]
    assert c["pooled"]["value"]["values"] == [v["value"] for v in per_arm]
    if claim == "C3-lowfreq":
      continue                                 # mixed references, tested below
    x = np.asarray(c["values"], np.float64)
    assert c["mean"] == x.mean()                  # exact: np.mean of the same float64 values
    half = T975[2] * x.std(ddof=1) / np.sqrt(3)
    assert c["ci"] == pytest.approx([x.mean() - half, x.mean() + half])   # float64; T975 holds ~11 digits
    assert c["verdicts"] == [v["verdict"] for v in per_arm]


def test_each_claim_pools_the_value_its_rule_judges(seeded):
  _, _, out = seeded
  group = next(g for g in out["seed_groups"] if g["recipe"] == "shared config")
  # C2's rule reads the RoPE arm's own Q/K-minus-V gap, not its difference from NoPE's gap; C1 and
  # C4 read the arm's own count. C3 would read the difference, but rope_s2 has no reference.
  assert {c: group["claims"][c]["measure"] for c in ("C1", "C2", "C3", "C4")} == {
      "C1": "value", "C2": "value", "C3": "value", "C4": "value"}
  lowfreq = group["claims"]["C3-lowfreq"]       # against NoPE in seeds 0 and 1, the 0.25 null in seed 2
  assert lowfreq["measure"] == "diff" and lowfreq["mean"] is None and lowfreq["why"] == "references differ"
  assert group["claims"]["C3"]["pooled"]["diff"]["mean"] is None


def test_every_point_and_part_is_pooled_over_seeds(seeded):
  _, _, out = seeded
  group = next(g for g in out["seed_groups"] if g["recipe"] == "shared config")
  rows = {r["arm"]: {v["claim"]: v for v in r["verdicts"]} for r in out["comparisons"]}
  c3 = group["claims"]["C3"]
  for point in CL.POINTS:
    assert c3["points"][point]["value"]["values"] == [rows[a]["C3"]["points"][point]["value"] for a in group["arms"]]
  assert c3["points"]["pair"]["diff"]["why"] == "a seed has no value"          # rope_s2 has no NoPE arm
  assert c3["points"]["rotation"]["why"] == "references differ"                 # of 'diff' twice, of 'value' once
  shares = group["claims"]["C1"]["parts"]["share_Q@post"]
  assert shares["values"] == [next(p["value"] for p in rows[a]["C1"]["parts"] if (p["key"], p["point"]) ==
                                   ("share_Q", "post")) for a in group["arms"]]
  assert shares["mean"] == np.mean(shares["values"])                          # exact: np.mean of the same values
  assert group["claims"]["C3-lowfreq"]["points"] is None


def test_the_arms_table_has_every_concentration_statistic_at_three_points(seeded):
  root, _, _ = seeded
  rows = {r["arm"]: r for r in json.loads((root / "trace" / "arms.json").read_text())["arms"]}
  for stat in CMP.POINT_STATS:
    for key in (f"pre_{stat}", stat, f"pair_{stat}"):
      assert rows["rope"][key] is not None and rows["nope"][key] is not None, key
  # No rotation in NoPE: the same values, summed at worst in another order (n = 4 x 32 squares of one
  # sign: n*eps/2 per sum; max/mean is a ratio of such sums). RoPE moves it by ~0.5%.
  assert rows["nope"]["pre_max_mean"] == pytest.approx(rows["nope"]["max_mean"], rel=2 * 128 * EPS32)
  assert rows["rope"]["pre_max_mean"] != pytest.approx(rows["rope"]["max_mean"], rel=2 * 128 * EPS32)


def test_an_arm_without_a_same_seed_nope_arm_is_not_compared_with_another_seeds(seeded):
  _, _, out = seeded
  rows = {r["arm"]: {v["claim"]: v for v in r["verdicts"]} for r in out["comparisons"]}
  c3 = rows["rope_s2"]["C3"]
  assert c3["diff"] is None and c3["reference_value"] is None and c3["verdict"] == "inconclusive"
  assert rows["rope"]["C3"]["diff"] is not None                      # where a reference exists, it is used
  group = next(g for g in out["seed_groups"] if g["recipe"] == "shared config")
  assert group["claims"]["C3"]["measure"] == "value"


def test_seeds_at_different_steps_are_listed_but_not_pooled(seeded):
  _, _, out = seeded
  group = next(g for g in out["seed_groups"] if g["recipe"] == 'model.position="alibi"')
  assert group["arms"] == ["alibi", "alibi_s2"]
  for c in group["claims"].values():
    assert c["steps"] == [0, 3] and len(c["values"]) == 2
    assert c["mean"] is None and c["ci"] is None


def test_the_reference_is_the_same_seed_nope_arm_whose_config_differs_least():
  """Two NoPE arms of seed 0: the one differing from the RoPE arm in one setting (the position) is its
  reference, not the one differing in two (position and context), whichever comes first."""
  flat = {"model.position.kind": "rope", "model.max_len": 32}
  facts = {"nope_ctx64": {"seed": 0, "position": "nope", "flat": {"model.position.kind": "nope", "model.max_len": 64}},
           "nope": {"seed": 0, "position": "nope", "flat": {**flat, "model.position.kind": "nope"}},
           "rope": {"seed": 0, "position": "rope", "flat": flat},
           "rope_s1": {"seed": 1, "position": "rope", "flat": flat}}
  assert CMP.pairs(facts) == [("rope", "nope"), ("rope_s1", None)]


def test_differences_against_each_seed_s_own_nope_arm_are_pooled(monkeypatch):
  """Seeds 0 and 1 are each judged against their own NoPE arm (nope, nope_s1): the same kind of
  reference, so the differences are pooled over seeds though the arms' names differ."""
  facts = {arm: {"seed": seed, "position": arm.split("_")[0], "recipe": "shared config", "flat": {}}
           for arm, seed in (("rope", 0), ("nope", 0), ("rope_s1", 1), ("nope_s1", 1))}
  diff = {"rope": 0.1, "rope_s1": 0.3}

  def judge(store, rope_arm, nope_arm, find_nope):
    return [CL.Verdict("C3", "t", "q", "supported", "r", value=1.0, diff=diff[rope_arm], reference=f"arm {nope_arm}",
                       step=10)]

  class Store:
    def meta(self):
      return {"arms": facts}

    def write_json(self, name, obj):
      pass

  monkeypatch.setattr(CMP, "arm_facts", lambda run_dir: facts)
  monkeypatch.setattr(CMP, "arm_table", lambda store: {})
  monkeypatch.setattr(CL, "judge", judge)
  c3 = CMP.compare(Store(), "runs")["seed_groups"][0]["claims"]["C3"]
  assert c3["measure"] == "diff" and c3["why"] is None and c3["values"] == [0.1, 0.3]
  assert c3["mean"] == np.mean([0.1, 0.3])                 # exact: np.mean of the same values


def test_seed_interval_against_a_hand_computed_one():
  lo, hi = CMP.seed_interval([1.0, 2.0, 3.0])            # mean 2, sd 1; float64, T975 to ~11 digits: approx's 1e-6
  assert (lo, hi) == pytest.approx((2 - T975[2] / np.sqrt(3), 2 + T975[2] / np.sqrt(3)))
  assert CMP.seed_interval([1.0, None, 3.0]) == pytest.approx([2 - T975[1], 2 + T975[1]])  # n 2, sd sqrt(2)
  assert CMP.seed_interval([4.0]) is None and CMP.seed_interval([]) is None


def test_arms_json_has_one_row_per_arm_with_its_own_boundary_pair(sweep_dir):
  trace = sweep_dir / "trace"
  assert (trace / "comparisons.json").exists()
  table = json.loads((trace / "arms.json").read_text())
  rows = {r["arm"]: r for r in table["arms"]}
  assert [r["arm"] for r in table["arms"]] == list(SWEEP) and table["tensors"] == ["rot_q", "rot_k"]
  expected = {"rope_b1e2": 6, "rope_b1e4": 3, "rope_ctx128": 6, "neox_0.5": 2, "prope_0.25": 4}
  csv_rows = ST.read_table(str(trace / "table.csv"))
  for arm, (position, context) in SWEEP.items():
    r = rows[arm]
    assert r["context"] == context and r["position"] == position.kind
    assert r["step"] == (5 if arm == "rope_b1e4" else 0)
    assert r["max_mean"] is not None and r["massive"] is not None and r["lf_share"] is not None
    lo, hi = r["max_mean_ci"]
    assert lo <= r["max_mean"] <= hi
    if position.kind == "nope":
      continue
    j = first_pair_beyond(position.base, context, position.fraction, position.partial)
    assert r["j_ctx"] == j == expected[arm], arm
    assert r["j_2ctx"] == first_pair_beyond(position.base, 2 * context, position.fraction, position.partial)
    assert r["base"] == position.base and r["fraction"] == position.fraction
    peaks = [float(c["peak_pair"]) for c in csv_rows if c["arm"] == arm and int(c["step"]) == r["step"]
             and c["tensor"] in ("rot_q", "rot_k")]
    assert r["peak_pair"] == pytest.approx(np.mean(peaks))          # head mean, as the table has it (float64: ulps)
    assert r["peak_minus_ctx"] == pytest.approx(r["peak_pair"] - j)
  assert rows["prope_0.25"]["j_ctx"] == rows["prope_0.25"]["n_pairs"] == 4     # no rotated pair is long enough
  assert rows["rope_b1e4"]["unrot_share"] is None and rows["rope_b1e4"]["partial"] is None
  assert rows["neox_0.5"]["unrot_null"] == 0.5 and rows["prope_0.25"]["unrot_null"] == 0.75
  assert rows["neox_0.5"]["partial"] == "neox" and 0 <= rows["neox_0.5"]["unrot_share"] <= 1
  nope = rows["nope"]
  for field in ("base", "fraction", "partial", "n_pairs", "j_ctx", "j_2ctx", "peak_pair", "peak_pair_ci",
                "peak_minus_ctx", "peak_minus_2ctx", "unrot_share", "unrot_null"):
    assert nope[field] is None, field
  assert nope["lf_null"] == 0.25 and nope["pairing"].startswith("convention")

