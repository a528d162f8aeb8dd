"""analysis.studies.disruption (claim C5): the C5 rule and its pooled intervals, random draws and
doses, own prompt files (their one-line errors before any model loads), the study config the
command line builds, and the study end to end."""
import dataclasses
import json

import numpy as np
import pytest

from analysis.lab import cli
from analysis.studies import disruption
from analysis.studies.disrupt import DisruptConfig
from helpers import ROOT, write_checkpoint
from minilm.schema import ConfigError


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
  pooled = disruption.pool(_records({"passkey": ("contextual", good), "capitals": ("parametric", {"off": 10, "massive": 9})},
                                    templates=1), "m", n_boot=500)
  assert disruption.c5_verdict(pooled, "m")["summary"].endswith(
      "contextual pool: 1 usable template in 1 family (passkey: one template, an anecdote)")
  # both 'not supported' (no contextual drop) and 'opposite' hold: the rule's order says the first
  assert _status({**good, "massive": 10}, {"off": 10, "massive": 0}) == "not supported"
  assert _status({**good, "off": 5}, {"off": 10, "massive": 9}) == "inconclusive"              # cannot do the task
  assert _status({"off": 10, "massive": 1}, {"off": 10, "massive": 9}) == "inconclusive"       # no random control
  # Wilson at z = 1.96 by hand for 5 of 10: (0.5 + 0.19208 -+ 1.96 sqrt(0.025 + 0.009604)) / 1.38416
  assert disruption.wilson(5, 10) == pytest.approx((0.236590, 0.763410), abs=1e-6)
  assert disruption.wilson(0, 10)[0] == 0.0


def test_the_first_rope_model_decides_c5_whatever_comes_before_it():
  spec = lambda massive: {"passkey": ("contextual", {"off": 10, "massive": massive, "random.0": 10}),
                          "capitals": ("parametric", {"off": 10, "massive": 9})}
  verdicts, pools = [], {}
  for model, massive in (("alibi_s0", 10), ("rope_s1", 1), ("nope_s1", 10)):
    records = [{**r, "model": model} for r in _records(spec(massive))]
    pools[model] = disruption.pool(records, model, n_boot=500)
    verdicts.append(disruption.c5_verdict(pools[model], model))
  positions = {"alibi_s0": "alibi", "rope_s1": "rope", "nope_s1": "nope"}
  c5 = disruption.claim(verdicts, pools, positions)
  assert (c5.verdict, c5.notes.split(":")[0], c5.reference) == ("supported", "rope_s1", "arm nope_s1")
  # without a RoPE model the first model's verdict is the claim's
  c5 = disruption.claim(verdicts[::2], pools, positions)
  assert (c5.verdict, c5.notes.split(":")[0]) == ("not supported", "alibi_s0")


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


def test_a_family_s_interval_does_not_depend_on_the_other_families_run():
  passkey = {"passkey": ("contextual", {"off": 10, "massive": [2, 4, 3, 5, 1], "random.0": 9})}
  capitals = {"capitals": ("parametric", {"off": 10, "massive": 9})}
  alone = disruption.pool(_records(passkey), "m", n_boot=300)["families"]["passkey"]["acc"]["massive"]
  after = disruption.pool(_records({**capitals, **passkey}), "m", n_boot=300)["families"]["passkey"]["acc"]["massive"]
  np.testing.assert_array_equal(alone[1], after[1])


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
  # a str row is written as it is, with lone surrogates as the bytes they escape (text that is not UTF-8)
  path.write_bytes("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)
                   .encode("utf-8", "surrogateescape"))
  return str(path)


PROMPTS = [{"family": "needle", "kind": "contextual", "prompt": "The key is 4821. The key is", "answer": "4821"},
           {"family": "needle", "kind": "contextual", "prompt": "The key is 9930. The key is", "answer": "9930"},
           {"family": "atlas", "kind": "parametric", "prompt": "The capital of France is", "answer": "Paris",
            "max_new_tokens": 4, "id": "a1"},
           {"family": "atlas", "kind": "parametric", "prompt": "The capital of Spain is", "answer": "Madrid"},
           {"family": "clash", "kind": "conflict", "prompt": "Here the capital of France is Rome. It is",
            "answer": "Rome", "memory": "Paris"}]


@pytest.mark.slow
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


@pytest.mark.slow
def test_an_hf_directory_is_imported_and_disrupted(tmp_path, capsys):
  """C5 on weights to import: an HF directory loads through the importer under its own name (a run's
  arm, config.json beside checkpoints/, is not taken for one)."""
  model_dir = tmp_path / "tiny_hf"
  model_dir.mkdir()
  write_checkpoint(model_dir)
  arm = tmp_path / "run" / "rope"
  (arm / "checkpoints").mkdir(parents=True)
  (arm / "config.json").write_text("{}")
  (tmp_path / "w.gguf").write_text("")
  assert disruption.imported(str(model_dir)) and disruption.imported(str(tmp_path / "w.gguf"))
  assert not disruption.imported(str(arm)) and not disruption.imported(str(tmp_path / "none.gguf"))
  out = tmp_path / "c5"
  prompts = _write_prompts(tmp_path / "mine.jsonl", PROMPTS)
  assert cli.main(["disrupt", "--model", str(model_dir), "--prompts", prompts, "--modes", "off,massive",
                   "--batch", "5", "--out", str(out)]) == 0, capsys.readouterr().err
  lines = [json.loads(l) for l in (out / "results.jsonl").read_text().splitlines()]
  assert len(lines) == 2 * len(PROMPTS) and {l["model"] for l in lines} == {"tiny_hf"}


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
    ("[" * 100_000, "json: nested deeper than the parser goes"),
    ('{"family": "x", "kind": "contextual", "prompt": "caf\udce9", "answer": "a"}', "not UTF-8 text (invalid"),
    # token ids in place of the answer would score every output against them (an empty list: all correct)
    ('{"family": "x", "kind": "contextual", "prompt": "p", "answer": "5", "answer_ids": []}',
     "answer_ids: is a name the study gives its own fields; rename it"),
    ('{"family": "x", "kind": "contextual", "prompt": "p", "answer": "5", "text": "hi"}', "text: is a name the study"),
    ('{"family": "x", "kind": "contextual", "prompt": "p", "answer": "5", "line": 3}', "line: is a name the study"),
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
  assert capsys.readouterr().err.startswith("error: --modes: must be one of")
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


def test_a_bad_seed_or_lam_is_one_line_before_any_model_loads(tmp_path, capsys):
  out = tmp_path / "c5"
  for flags, line in ((["--seed", "-1"], "error: --seed: must be in 0..4294967295; got -1"),
                      (["--lam", "inf"], "error: disrupt.lam: must be a finite number > 0; got inf")):
    assert cli.main(["disrupt", "--model", "random", *flags, "--out", str(out)]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [line] and not out.exists()
  with pytest.raises(ConfigError, match=r"^disrupt.seed: must be in 0\.\.4294967295; got 4294967296$"):
    disruption.plan(disruption.DisruptStudy("random", seed=2 ** 32), name=lambda field: f"disrupt.{field}")


def test_the_c5_rule_is_written_in_the_docs_verbatim():
  from pathlib import Path
  docs = (Path(ROOT) / "docs" / "claims.md").read_text()
  assert disruption.RULE in docs


def test_layers_flag_is_start_inclusive_stop_exclusive_in_every_condition():
  """--layers 1:3 disrupts layers 1 and 2 (stop exclusive, as its help says) in every condition."""
  base, conds = disruption.config_from(disruption.DisruptStudy("random", layers="1:3", modes="off,massive,random",
                                                               draws=2, dose=True))
  assert (base.layer_start, base.layer_stop) == (1, 3) and base.layers(4) == range(1, 3)
  assert all((c.layer_start, c.layer_stop) == (1, 3) for c in conds.values())
  assert disruption.config_from(disruption.DisruptStudy("random"))[0].layers(4) == range(0, 4)


def test_a_template_at_exactly_the_usable_accuracy_counts():
  """usable: undisrupted accuracy >= USABLE (8 of 10 at 0.8 counts, 7 of 10 does not)."""
  assert disruption.USABLE == 0.8
  spec = {"passkey": ("contextual", {"off": [8, 7, 8, 7, 10], "massive": 1})}
  pooled = disruption.pool(_records(spec), "m", n_boot=50)
  assert pooled["families"]["passkey"]["usable"] == ["passkey/t0", "passkey/t2", "passkey/t4"]


def test_the_pooled_random_control_is_the_mean_over_its_draws():
  """Every draw counts: draws at 10/10 and 0/10 pool to 0.5 per template (exact: means of 0/1)."""
  spec = {"passkey": ("contextual", {"off": 10, "massive": 1, "random.0": 10, "random.1": 0})}
  pooled = disruption.pool(_records(spec), "m", n_boot=50)
  assert pooled["families"]["passkey"]["acc"]["random"][0] == 0.5
  assert "random.0" not in pooled["families"]["passkey"]["acc"]


def test_heads_the_random_control_cannot_match_are_reported_beside_the_verdict():
  """The random records' `unmatched` (disrupt.unmatched) pools like the energy: a mean per family over
  its items, then over a kind's families. It shows in the pooled table, and the verdict's summary
  says so where the contextual pool has such heads; the status is the rule's either way."""
  spec = {"passkey": ("contextual", {"off": 10, "massive": 1, "random.0": 10, "random.1": 9}),
          "capitals": ("parametric", {"off": 10, "massive": 9, "random.0": 10})}
  plain = _records(spec)
  records = [dict(r, unmatched={"rot_q": 0.5 if r["example"] < 5 else 0.0, "rot_k": 0.0})
             if r["mode"].startswith("random.") else r for r in plain]
  pooled = disruption.pool(records, "m", n_boot=200)
  assert pooled["families"]["passkey"]["unmatched"] == {"rot_q": 0.25, "rot_k": 0.0}
  assert pooled["kinds"]["contextual"]["unmatched"] == {"rot_q": 0.25, "rot_k": 0.0}
  row = next(l for l in disruption.pooled_table(pooled, "m", ("off", "massive", "random")).splitlines()
             if l.startswith("| all contextual"))
  assert row.endswith("| q 25% k 0% |")
  verdict = disruption.c5_verdict(pooled, "m")
  assert "cannot reach the massive dims' energy in q 25% of the contextual heads" in verdict["summary"]
  assert verdict["evidence"]["random_unmatched"] == {"rot_q": 0.25, "rot_k": 0.0}
  matched = disruption.c5_verdict(disruption.pool(plain, "m", n_boot=200), "m")
  assert verdict["status"] == matched["status"] == "supported" and "cannot reach" not in matched["summary"]


def test_what_the_model_bounds_and_the_model_itself_are_one_line_naming_the_flag(tmp_path, capsys):
  """An empty --model is no path (not the working directory), a file or a folder without arms is no
  run; a layer range and a top-k beyond the model's are caught before any work, each naming its own
  flag."""
  out = tmp_path / "c5"
  a_file = tmp_path / "notes.txt"
  a_file.write_text("not a run")
  no_arm = tmp_path / "empty"
  no_arm.mkdir()
  must = "error: --model: must be 'smollm2', 'random', a run directory, a .gguf file or an HF model directory"
  for flags, line in ((["--model", ""], f"{must}; got ''"),
                      (["--model", str(a_file)], f"{must}; got {str(a_file)!r}"),
                      (["--model", str(no_arm)], f"error: --model: {no_arm} has no arm (a folder with config.json and "
                                                 "checkpoints/)"),
                      (["--model", "random", "--layers", "0:9"],
                       "error: --layers: must stop at most at the 2 layers of 'random-tiny'; got '0:9'"),
                      (["--model", "random", "--criterion", "topk", "--top-k", "9"],
                       "error: --top-k: must be at most the head_dim 8 of 'random-tiny' (criterion topk); got 9")):
    assert cli.main(["disrupt", *flags, "--n", "2", "--tasks", "conflict", "--out", str(out)]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [line] and not out.exists()
