"""Verdicts from stores of synthetic per-prompt sums with known truth, and the fixed rules themselves."""
import json

import numpy as np
import pytest

from analysis import claims as CL
from analysis import stats as S
from analysis import trace as T
from minilm import encodings
from minilm.config import ModelConfig, to_dict

L, H, K, D, N = 4, 4, 2, 32, 24
LF_PAIR = 13                      # in the lowest-frequency quarter (pairs 12..15 of 16)


def _facts(position):
  return {"position": position.kind, "position_cfg": to_dict(ModelConfig(position=position))["position"],
          "n_layers": L, "n_heads": H, "kv_heads": K, "head_dim": D, "context": 64.0}


def _sums(rng, planted_layers):
  """Per-prompt sums of squares of every layer and tensor; rot_q/rot_k of `planted_layers` get both
  dims of pair LF_PAIR (half layout) 400x the energy in every head."""
  sums = {}
  for layer in range(L):
    for tensor in T.TENSORS:
      s = rng.chisquare(8, (N, H if "q" in tensor else K, D))
      if tensor in CL.QK and layer in planted_layers:
        s[:, :, [LF_PAIR, LF_PAIR + D // 2]] *= 400
      sums[f"{layer}.{tensor}"] = s.astype(np.float32)
  return sums


def _store(path, rope_layers, nope_layers, arms=("rope", "nope")):
  rng = np.random.default_rng(0)
  probes = np.zeros((N, 64), np.int32)
  store = T.open_store(str(path), probes, np.ones(probes.shape), False, S.StatConfig())
  meta = store.meta()
  positions = {"rope": (encodings.RoPE(), rope_layers), "nope": (encodings.NoPE(), nope_layers)}
  for arm in arms:
    position, planted = positions[arm]
    meta["arms"][arm] = _facts(position)
    for step in (0, 10):
      store.save_sums(arm, step, _sums(rng, planted if step == 10 else ()))
  store.write_json("meta.json", meta)
  return store


def _verdicts(store, **kw):
  return {v.claim: v for v in CL.evaluate(store, n_boot=400, **kw)}


def test_planted_rope_concentration_supports_c1_to_c4(tmp_path):
  v = _verdicts(_store(tmp_path, rope_layers=range(L), nope_layers=()))
  assert {c: x.verdict for c, x in v.items()} == {c: "supported" for c in ("C1", "C2", "C3", "C3-lowfreq", "C4")}
  assert v["C1"].rope == pytest.approx(2.0) and v["C1"].nope == 0.0 and v["C1"].step == 10
  assert v["C3"].ci[0] > 0 and v["C3"].reference == "arm nope"
  assert v["C3-lowfreq"].rope > 0.9 and abs(v["C3-lowfreq"].nope - 0.25) < 0.05


def test_concentration_in_the_nope_arm_only_is_opposite(tmp_path):
  v = _verdicts(_store(tmp_path, rope_layers=(), nope_layers=range(L)))
  assert v["C3"].verdict == "opposite" and v["C3"].ci[1] < 0
  assert v["C3-lowfreq"].verdict == "opposite"
  assert v["C1"].verdict == "not supported" and v["C4"].verdict == "inconclusive"


def test_late_only_concentration_does_not_support_early(tmp_path):
  v = _verdicts(_store(tmp_path, rope_layers=(3,), nope_layers=()))
  assert v["C4"].verdict == "not supported" and "[3]" in v["C4"].notes


def test_single_rope_arm_uses_the_null_as_reference(tmp_path):
  v = _verdicts(_store(tmp_path, rope_layers=range(L), nope_layers=(), arms=("rope",)))
  assert v["C3"].verdict == "inconclusive" and v["C3"].nope is None
  assert v["C3-lowfreq"].reference == "null 0.25" and v["C3-lowfreq"].verdict == "supported"
  assert v["C1"].verdict == "supported"


def test_rules_are_fixed_functions_of_the_interval():
  assert CL.direction([0.1, 0.5]) == "supported"
  assert CL.direction([-0.5, -0.1]) == "opposite"
  assert CL.direction([-0.1, 0.5]) == "inconclusive"
  assert CL.direction([-0.5, -0.1], predicted=-1) == "supported"
  assert CL.direction([float("nan"), 1.0]) == "inconclusive"
  assert CL.at_least([1.0, 3.0], 1.0) == "supported"
  assert CL.at_least([0.0, 0.9], 1.0) == "not supported"
  assert CL.at_least([0.5, 1.5], 1.0) == "inconclusive"
  with pytest.raises(ValueError, match="verdict: must be one of"):
    CL.Verdict("C1", "t", "q", "maybe", "rule")


def test_write_claims_keeps_other_claims_so_c5_c6_can_be_added(tmp_path):
  store = _store(tmp_path, rope_layers=range(L), nope_layers=())
  c5 = CL.Verdict("C5", "Function", "passkey accuracy drop", "supported", "a C5 rule", rope=0.9, ci=[0.8, 1.0])
  CL.write_claims([c5], str(tmp_path))
  CL.write_claims(CL.evaluate(store, n_boot=100), str(tmp_path))
  claims = json.loads((tmp_path / "claims.json").read_text())["claims"]
  assert [c["claim"] for c in claims] == ["C1", "C2", "C3", "C3-lowfreq", "C4", "C5"]
  md = (tmp_path / "claims.md").read_text()
  assert "| C5 Function |" in md and "a C5 rule" in md and CL.RULE_C3 in md
  assert CL.load_claims(str(tmp_path))[-1] == c5
