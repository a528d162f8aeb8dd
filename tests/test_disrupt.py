"""Disruption (claim C5): each mode replaces exactly the dims it names, controls pick the right dims,
'off' is bit-identical, the KV cache holds the disrupted keys, and the experiment runs end to end."""
import dataclasses
import functools
import json

import numpy as np
import pytest
from flax import nnx

from analysis.lab import cli
from analysis.studies import disrupt
from analysis.studies import disruption
from analysis.studies.disrupt import DisruptConfig
from minilm import capture, generate
from minilm.config import ModelConfig
from minilm.schema import ConfigError
from minilm.model import Decoder

EPS32 = float(np.finfo(np.float32).eps)
CFG = ModelConfig(vocab_size=64, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, max_len=64)
BIG = 13  # the dim given massive values (rotary pair 5 with dim 5 in the half layout)


@pytest.fixture(scope="module")
def model():
  """A random decoder whose Q and K get one planted massive dim per head (x20), so the paper's
  lambda=5 criterion has something to find."""
  m = Decoder(CFG, rngs=nnx.Rngs(0))
  D = CFG.dim_per_head
  for block in m.blocks:
    for lin in (block.attn.q, block.attn.k):
      w = np.asarray(lin.kernel[...]).copy()
      w[:, BIG::D] *= 20.0
      lin.kernel[...] = w
  return m


@pytest.fixture(scope="module")
def tokens():
  return np.random.default_rng(1).integers(0, 64, (2, 12)).astype(np.int32)


def _captured(model, tokens, args=None):
  kw = {} if args is None else {"intervene": functools.partial(disrupt.hook, args)}
  _, cache = capture.run(model, tokens, True, **kw)
  return {k: np.asarray(v) for k, v in cache.items()}


@pytest.mark.parametrize("mode", ["massive", "massive_zero", "top2", "smallest", "random", "v"])
@pytest.mark.parametrize("rope", ["post", "pre"])
def test_each_mode_changes_exactly_the_named_dims(model, tokens, mode, rope):
  layer = 1
  cfg = DisruptConfig(mode=mode, rope=rope, layer_start=layer, layer_stop=layer + 1)
  M, S = disrupt.norms_and_spread(model, tokens, cfg)
  args, counts = disrupt.hook_args(M, cfg, CFG.n_layers, S)
  assert sum(c.sum() for c in counts.values()) > 0
  if mode == "massive" and rope == "pre":  # exactly the planted dim, in every head of Q and K
    qp, kp, _ = cfg.points()
    for p in (qp, kp):
      assert np.flatnonzero(np.asarray(args["masks"][f"blocks.{layer}.attn.{p}"]).any((0, 1))).tolist() == [BIG]
  clean, hit = _captured(model, tokens), _captured(model, tokens, args)
  for name in clean:
    if name.startswith("blocks.0."):  # upstream of the disrupted layer: untouched
      np.testing.assert_array_equal(hit[name], clean[name], err_msg=name)
  for point in cfg.points():
    name = f"blocks.{layer}.attn.{point}"
    mask_BxHxD = np.asarray(args["masks"][name])
    changed_BxHxD = np.any(hit[name] != clean[name], axis=1)
    np.testing.assert_array_equal(changed_BxHxD, mask_BxHxD, err_msg=name)
    # replaced by each dim's own mean over the prompt tokens (or zero), constant over tokens
    want_Bx1xHxD = 0.0 * clean[name][:, :1] if mode == "massive_zero" else clean[name].mean(1, keepdims=True)
    got = np.where(mask_BxHxD[:, None], hit[name], 0)
    want = np.broadcast_to(np.where(mask_BxHxD[:, None], want_Bx1xHxD, 0), got.shape)
    # the mean over T tokens is summed in another order (XLA vs numpy): T * eps32 of the largest value
    np.testing.assert_allclose(got, want, rtol=0, atol=tokens.shape[1] * EPS32 * np.abs(want).max())
  # queries and keys are disrupted together, V only in mode 'v'
  qp, kp, vp = cfg.points()
  assert (counts[vp].sum() > 0) == (mode == "v")
  assert (counts[qp].sum() > 0 and counts[kp].sum() > 0) == (mode != "v")


def test_controls_pick_the_right_dims():
  # one head, 8 dims; 'massive' = top-2 = dims 0 and 1
  M = np.array([[[100.0, 90.0, 5.0, 4.9, 1.0, 1.2, 30.0, 2.0]]])
  top2 = DisruptConfig(criterion="topk", top_k=2)
  sel = lambda mode: np.flatnonzero(disrupt.select(M, dataclasses.replace(top2, mode=mode))[0, 0]).tolist()
  assert sel("massive") == [0, 1]
  assert sel("smallest") == [4, 5]
  # lambda criterion: mean 29.26, so lam=3 -> dims with M > 87.8 -> 0 and 1 again
  assert np.flatnonzero(disrupt.massive(M, DisruptConfig(lam=3.0))[0, 0]).tolist() == [0, 1]
  with pytest.raises(ConfigError, match="spread S"):
    disrupt.select(M, dataclasses.replace(top2, mode="random"))


def test_random_control_is_disjoint_seeded_and_matched_on_energy():
  rng = np.random.default_rng(0)
  M = rng.gamma(2.0, size=(4, 50, 32))
  cfg = DisruptConfig(lam=3.0, mode="random")
  massive = disrupt.massive(M, cfg)
  # spread to the mean: a share of each dim's norm, smaller for the massive dims (nearly constant)
  S = M * np.where(massive, 0.3, rng.uniform(0.2, 1.0, M.shape))
  pick = lambda seed: disrupt.select(M, cfg, S, np.random.default_rng(seed))
  chosen = pick(0)
  assert massive.sum() > 0 and not np.any(massive & chosen)
  np.testing.assert_array_equal(chosen, pick(0))
  assert np.any(chosen != pick(1))
  # per head, the lost energy of the chosen dims is close to that of the massive dims
  target, got = (np.where(massive, S ** 2, 0)).sum(-1), np.where(chosen, S ** 2, 0).sum(-1)
  has = massive.any(-1)
  assert np.all(got[~has] == 0) and np.all(chosen[~has].sum(-1) == 0)
  reachable = has & (np.where(massive, 0, S ** 2).sum(-1) >= target)
  assert reachable.sum() > 0.9 * has.sum() and np.median(np.abs(got[reachable] / target[reachable] - 1)) < 0.35
  # random, not the shoulder of the massive dims: chosen dims' M rank among the free dims is central
  rank = np.argsort(np.argsort(np.where(massive, -np.inf, M), -1), -1) / (M.shape[-1] - 1)
  assert 0.3 < rank[chosen].mean() < 0.7


def test_v_mode_uses_the_same_dims_as_the_k_massive_ones(model, tokens):
  cfg = DisruptConfig(mode="v", criterion="topk", top_k=3)
  M = disrupt.dim_norms(model, tokens, cfg)
  chosen = disrupt.masks(M, cfg, CFG.n_layers)
  for layer in range(CFG.n_layers):
    v = chosen[f"blocks.{layer}.attn.v"]
    np.testing.assert_array_equal(v, disrupt.stats.top_k_mask(M[f"blocks.{layer}.attn.rot_k"], 3))
    assert not np.array_equal(v, disrupt.stats.top_k_mask(M[f"blocks.{layer}.attn.v"], 3))
    assert not chosen[f"blocks.{layer}.attn.rot_k"].any() and not chosen[f"blocks.{layer}.attn.rot_q"].any()


def test_off_is_bit_identical_and_empty_masks_change_nothing(model, tokens):
  plain = np.asarray(generate.greedy(model, tokens, 6))
  (off, counts) = disrupt.disrupted_greedy(model, tokens, 6, DisruptConfig(mode="off"))
  np.testing.assert_array_equal(np.asarray(off), plain)
  assert all(c.sum() == 0 for c in counts.values())
  # the hook itself is exact where no dim is chosen: a layer range with nothing left to disrupt
  cfg = DisruptConfig(mode="massive", lam=1e9)
  args, counts = disrupt.hook_args(disrupt.dim_norms(model, tokens, cfg), cfg, CFG.n_layers)
  assert all(c.sum() == 0 for c in counts.values())
  empty = generate.greedy(model, tokens, 6, hook=disrupt.hook, hook_args=args)
  np.testing.assert_array_equal(np.asarray(empty), plain)


def test_every_mode_of_a_prompt_shape_shares_one_compiled_prefill(model):
  """Compilation dominates the disruption run of a 30-layer model: 'off' goes through the same hook
  (all-False masks) as the disrupting modes, so a new prompt shape compiles greedy decoding once."""
  from train.tokenizer import ByteTokenizer
  from analysis.studies import suites
  tok = ByteTokenizer()
  items = [suites.Item("ctx", "contextual", np.full(13, 7 + i, np.int32), "", "x", 3, {}) for i in range(2)]
  compiled = generate._greedy._cache_size()
  conds = disruption.conditions(DisruptConfig(criterion="topk", top_k=1), disruption.TABLE_MODES, dose=True)
  disruption.score_conditions(model, tok, items, conds, batch=2)
  assert generate._greedy._cache_size() == compiled + 1


@pytest.mark.parametrize("rope", ["post", "pre"])
def test_kv_cache_holds_exactly_the_disrupted_keys(model, tokens, rope):
  cfg = DisruptConfig(mode="top2", rope=rope)
  M = disrupt.dim_norms(model, tokens, cfg)
  args, _ = disrupt.hook_args(M, cfg, CFG.n_layers)
  (out, cache), _ = disrupt.disrupted_greedy(model, tokens, 3, cfg, M=M, return_cache=True)
  hit, clean = _captured(model, tokens, args), _captured(model, tokens)
  T = tokens.shape[1]
  for layer in range(CFG.n_layers):
    keys = np.asarray(cache["layers"][layer]["k"])[:, :T]
    np.testing.assert_allclose(keys, hit[f"blocks.{layer}.attn.rot_k"], atol=1e-5, rtol=1e-5)
    assert np.abs(keys - clean[f"blocks.{layer}.attn.rot_k"]).max() > 1e-3  # and they were disrupted
  if rope == "post":  # replaced post-RoPE dims are constant over the prompt in the cache
    mask = np.asarray(args["masks"]["blocks.0.attn.rot_k"])
    keys = np.asarray(cache["layers"][0]["k"])[:, :T]
    spread = np.where(mask[:, None], keys - keys[:, :1], 0)
    assert np.abs(spread).max() < 1e-6


def test_probe_source_fixes_one_mask_for_every_prompt(model, tokens):
  cfg = DisruptConfig(mode="top1", source="probe")
  probe = disrupt.probe_norms(model, [tokens[0], tokens[1], tokens[0][:7]], cfg)
  assert probe["blocks.0.attn.rot_q"].shape == (1, CFG.n_heads, CFG.dim_per_head)
  M = disrupt.dim_norms(model, tokens, cfg, probe)
  chosen = disrupt.masks(M, cfg, CFG.n_layers)
  np.testing.assert_array_equal(chosen["blocks.1.attn.rot_k"][0], chosen["blocks.1.attn.rot_k"][1])
  with pytest.raises(ConfigError, match="disrupt.source"):
    disrupt.dim_norms(model, tokens, cfg)


def test_bad_config_is_one_line():
  for kw, field in [({"mode": "bogus"}, "disrupt.mode"), ({"rope": "mid"}, "disrupt.rope"),
                    ({"layer_start": 3, "layer_stop": 2}, "disrupt.layer_stop")]:
    with pytest.raises(ConfigError, match=field) as err:
      DisruptConfig(**kw)
    assert "\n" not in str(err.value)
  with pytest.raises(ConfigError, match="n_layers=2"):
    DisruptConfig(layer_stop=5).layers(2)


def _records(spec: dict, templates: int = 5, n: int = 10) -> list[dict]:
  """Synthetic records: {family: (kind, {mode: correct examples of n, per template (int or list)})}."""
  recs = []
  for family, (kind, counts) in spec.items():
    for t in range(templates):
      for mode, k in counts.items():
        k = k[t] if isinstance(k, list) else k
        recs += [{"model": "m", "mode": mode, "task": f"{family}/t{t}", "family": family, "example": e, "kind": kind,
                  "verdict": "correct" if e < k else "wrong", "success": e < k,
                  "energy_removed": {"rot_q": 0.02 if mode == "massive" else 0.01, "rot_k": 0.01}}
                 for e in range(n)]
  return recs


def _status(passkey: dict, capitals: dict, padded: dict | None = None) -> str:
  spec = {"passkey": ("contextual", passkey), "capitals": ("parametric", capitals)}
  if padded:
    spec["capitals_padded"] = ("parametric", padded)
  return disruption.c5_verdict(disruption.pool(_records(spec), "m", n_boot=500), "m")["status"]


def test_c5_rule():
  good = {"off": 10, "massive": 1, "random.0": 10, "random.1": 9}
  assert _status(good, {"off": 10, "massive": 9}, {"off": 10, "massive": 10}) == "supported"
  # the equal-length parametric family is judged too: hurt as much, so no longer supported
  assert _status(good, {"off": 10, "massive": 9}, {"off": 10, "massive": 2}) == "inconclusive"
  assert _status({**good, "random.0": 1, "random.1": 1}, {"off": 10, "massive": 9}) == "not supported"  # control as bad
  assert _status({**good, "massive": 3, "random.0": 0, "random.1": 0}, {"off": 10, "massive": 9}) == "not supported"
  assert _status({**good, "massive": 3, "random.0": 5, "random.1": 6}, {"off": 10, "massive": 9}) == "supported"
  assert _status({**good, "massive": 10}, {"off": 10, "massive": 9}) == "not supported"        # massive does nothing
  assert _status({**good, "massive": 5}, {"off": 10, "massive": 0}) == "opposite"              # parametric hurt more
  assert _status({**good, "off": 5}, {"off": 10, "massive": 9}) == "inconclusive"              # cannot do the task
  assert _status({"off": 10, "massive": 1}, {"off": 10, "massive": 9}) == "inconclusive"       # no random control
  assert disruption.wilson(0, 10)[0] == 0.0 and 0.2 < disruption.wilson(5, 10)[0] < 0.5


def test_pooled_interval_resamples_templates_as_well_as_items():
  """Two families with the same mean drop: templates that disagree give the wider interval."""
  spec = {"same": ("contextual", {"off": 10, "massive": 5}),
          "split": ("contextual", {"off": 10, "massive": [0, 10, 0, 10, 5]})}
  pooled = disruption.pool(_records(spec), "m", n_boot=1000)
  width = {f: np.diff(disruption._ci(disruption._drop(pooled["families"][f], "massive")))[0] for f in spec}
  point = {f: disruption._drop(pooled["families"][f], "massive")[0] for f in spec}
  assert point["same"] == point["split"] == 0.5
  assert width["split"] > 1.5 * width["same"]
  # the kind pools its families; the energy of each condition is reported per family
  assert pooled["kinds"]["contextual"]["families"] == ["same", "split"]
  assert pooled["families"]["same"]["energy"]["massive"] == {"rot_q": 0.02, "rot_k": 0.01}


def test_random_draws_pool_into_one_row_per_task():
  recs = _records({"passkey": ("contextual", {"off": 10, "random.0": 4, "random.1": 6})}, templates=1)
  for r in recs:
    r.update(dims_replaced={"rot_q": 0}, energy_removed={"rot_q": 0.0})
  rows = {r["mode"]: r for r in disruption.summarize(recs)}
  assert set(rows) == {"off", "random.0", "random.1", "random"}
  assert rows["random"]["n"] == 10 and rows["random"]["acc"] == 0.5 and rows["random"]["draws"] == 2
  assert rows["random.0"]["k"] == 4 and rows["random.0"]["n"] == 10


def test_conditions_expand_draws_and_doses_without_running_one_twice():
  conds = disruption.conditions(DisruptConfig(), ("off", "massive", "random"), draws=3, dose=True)
  assert list(conds)[:5] == ["off", "massive", "random.0", "random.1", "random.2"]
  assert [c.draw for l, c in conds.items() if l.startswith("random")] == [0, 1, 2]
  assert "lam5" not in conds and {"lam3", "lam4", "lam6", "top1", "top2", "top4"} <= set(conds)
  assert conds["lam3"].lam == 3.0 and conds["lam3"].mode == "massive"
  assert disruption.dose_labels(conds)["lam5"] == "massive"


def _write_prompts(path, rows):
  path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
  return str(path)


PROMPTS = [{"family": "needle", "kind": "contextual", "prompt": "The key is 4821. The key is", "answer": "4821"},
           {"family": "needle", "kind": "contextual", "prompt": "The key is 9930. The key is", "answer": "9930"},
           {"family": "atlas", "kind": "parametric", "prompt": "The capital of France is", "answer": "Paris",
            "max_new_tokens": 4, "id": "a1"},
           {"family": "atlas", "kind": "parametric", "prompt": "The capital of Spain is", "answer": "Madrid"},
           {"family": "clash", "kind": "conflict", "prompt": "Here the capital of France is Rome. It is",
            "answer": "Rome", "memory": "Paris"}]


def test_own_prompts_end_to_end(tmp_path, capsys):
  out = tmp_path / "c5"
  prompts = _write_prompts(tmp_path / "mine.jsonl", PROMPTS)
  assert cli.main(["disrupt", "--model", "random", "--prompts", prompts, "--batch", "2", "--draws", "2",
                   "--out", str(out)]) == 0
  lines = [json.loads(l) for l in (out / "results.jsonl").read_text().splitlines()]
  conds = ["off", "smallest", "massive", "random.0", "random.1", "v"]
  assert len(lines) == len(PROMPTS) * len(conds) and {l["mode"] for l in lines} == set(conds)
  assert {l["task"] for l in lines} == {"needle", "atlas", "clash"}
  summary = json.loads((out / "summary.json").read_text())
  rows = summary["summary"]
  assert all({"task", "kind", "mode", "n", "k", "acc", "ci"} <= set(r) for r in rows)
  assert {(r["task"], r["kind"]) for r in rows} == {("needle", "contextual"), ("atlas", "parametric"), ("clash", "conflict")}
  assert {r["mode"] for r in rows} == set(conds) | {"random"}
  assert next(l for l in lines if l["task"] == "atlas" and l["meta"].get("id") == "a1")["output"] is not None
  table = (out / "table.md").read_text()
  assert "| needle (2) |" in table and "Pooled over the usable templates" in table and "Rule: " in table
  claim = json.loads((out / "claims.json").read_text())["claims"]
  assert [c["claim"] for c in claim] == ["C5"] and claim[0]["verdict"] == "inconclusive"  # untrained: no usable task
  assert "needle" in capsys.readouterr().out


@pytest.mark.parametrize("bad, message", [
    ('{"family": "x", "kind": "contextual", "prompt": "p"}', "answer: is missing"),
    ('{"family": "x", "kind": "contextual", "prompt": "p", "answer": "  ."}', "answer: holds no letter or digit"),
    ('{"family": "x", "kind": "factual", "prompt": "p", "answer": "a"}', "kind: must be one of"),
    ('{"family": "needle", "kind": "parametric", "prompt": "p", "answer": "a"}', "kind: family 'needle' is 'contextual'"),
    ('{"family": "x", "kind": "contextual", "prompt": "", "answer": "a"}', "prompt: must be a non-empty string"),
    ('{"family": "x", "kind": "contextual", "prompt": "p", "answer": "a", "max_new_tokens": 0}', "max_new_tokens: must be"),
    ('{"family": "x", "kind": "conflict", "prompt": "p", "answer": "a", "memory": ["b"]}', "memory: must be a string"),
    ('{"family": "x", "kind": "contextual", "prompt": "p", "answer": "a"', "json: "),
    ('["x"]', "line: must be a JSON object"),
])
def test_bad_prompt_lines_are_one_error_before_any_model_loads(tmp_path, capsys, monkeypatch, bad, message):
  out = tmp_path / "c5"
  out.mkdir()
  (out / "old.txt").write_text("earlier results")
  prompts = _write_prompts(tmp_path / "mine.jsonl", PROMPTS[:2] + ["", bad])
  monkeypatch.setattr(disruption, "load_sources", lambda *a: pytest.fail("a model was loaded"))
  assert cli.main(["disrupt", "--model", "random", "--prompts", prompts, "--out", str(out)]) == 2
  err = capsys.readouterr().err
  assert err.startswith(f"error: {prompts}:4: {message}") and err.count("\n") == 1, err
  assert [p.name for p in out.iterdir()] == ["old.txt"]


def test_a_prompt_longer_than_the_context_fails_before_writing(tmp_path, capsys):
  out = tmp_path / "c5"
  out.mkdir()
  (out / "old.txt").write_text("earlier results")
  long = {"family": "x", "kind": "contextual", "prompt": "word " * 500, "answer": "a"}  # bytes: 2500 > 2048
  prompts = _write_prompts(tmp_path / "mine.jsonl", [PROMPTS[0], long])
  assert cli.main(["disrupt", "--model", "random", "--prompts", prompts, "--out", str(out)]) == 2
  assert capsys.readouterr().err.startswith(f"error: {prompts}:2: prompt: 2500 tokens")
  assert [p.name for p in out.iterdir()] == ["old.txt"]
  assert cli.main(["disrupt", "--model", "random", "--prompts", prompts, "--tasks", "y", "--out", str(out)]) == 2
  assert "--tasks: 'y' names no task; tasks start with one of needle, x" in capsys.readouterr().err


@pytest.mark.slow   # the whole C5 study end to end
def test_end_to_end_templates_on_a_tiny_random_decoder(tmp_path, capsys):
  out = tmp_path / "c5"
  assert cli.main(["disrupt", "--model", "random", "--n", "2", "--batch", "2", "--tasks", "conflict",
                   "--modes", "off,massive,random", "--draws", "2", "--out", str(out)]) == 0
  lines = [json.loads(l) for l in (out / "results.jsonl").read_text().splitlines()]
  assert {l["task"] for l in lines} == {f"conflict/t{i}" for i in range(5)} and {l["family"] for l in lines} == {"conflict"}
  assert len(lines) == 5 * 2 * 4
  assert all(l["verdict"] in ("context", "memory", "other") for l in lines)
  assert all(l["dims_replaced"]["rot_q"] == l["dims_replaced"]["rot_k"] == 0 for l in lines if l["mode"] == "off")
  table = (out / "table.md").read_text()
  assert "massive disrupted" in table and "C5 [random-tiny]" in table and "| conflict (0/5) |" in table
  verdict = json.loads((out / "verdict.json").read_text())
  assert verdict[0]["claim"] == "C5" and verdict[0]["status"] == "inconclusive"
  assert (out / "c5.png").stat().st_size > 0
  assert "massive disrupted" in capsys.readouterr().out
  assert cli.main(["disrupt", "--model", "random", "--modes", "off,bogus", "--out", str(out)]) == 2
  assert "disrupt.mode" in capsys.readouterr().err
  assert cli.main(["disrupt", "--model", "random", "--modes", "massive", "--out", str(out)]) == 2
  assert "--modes: must include 'off'" in capsys.readouterr().err


def test_the_study_config_is_what_the_command_line_builds():
  import argparse
  ap = argparse.ArgumentParser()
  disruption.add_arguments(ap)
  direct = disruption.DisruptStudy(model="random", n=4, modes="off,massive", rope="pre", top_k=2, dose=True)
  assert disruption.study_from_args(ap.parse_args(["--model", "random", "--out", "x", "--n", "4", "--modes",
                                                   "off,massive", "--rope", "pre", "--top-k", "2", "--dose"])) == direct
  assert disruption.study_from_args(ap.parse_args(["--model", "random", "--out", "x"])) == disruption.DisruptStudy("random")
  base, conds, prompts = disruption.plan(direct)
  assert (base.rope, base.top_k, prompts) == ("pre", 2, None) and {"off", "massive", "lam3", "top4"} <= set(conds)
  with pytest.raises(ConfigError, match="^--n: must be >= 2"):
    disruption.plan(dataclasses.replace(direct, n=1))
  with pytest.raises(ConfigError, match="^disrupt.modes: must include 'off'"):   # as the lab names a field
    disruption.plan(dataclasses.replace(direct, modes="massive"), name=lambda field: f"disrupt.{field}")


def test_the_c5_rule_is_written_in_the_docs_verbatim():
  from pathlib import Path
  docs = (Path(__file__).parents[1] / "docs" / "claims.md").read_text()
  assert disruption.RULE in docs
