"""Plain-English task suites: the paper's passkey prompt, balanced sets, equal lengths, strict scoring."""
import collections
from types import SimpleNamespace

import numpy as np
import pytest

from analysis.studies import suites as T
from minilm.schema import ConfigError
from train.tokenizer import ByteTokenizer

TOK = ByteTokenizer()  # bytes: every test here runs without a pretrained model


def test_passkey_is_the_papers_prompt_with_depth_swept():
  items = T.passkey(TOK, 5, 600, 6, seed=0)
  assert {len(it.prompt) for it in items} == {len(items[0].prompt)} and len(items[0].prompt) <= 600
  for it in items:
    assert it.text.startswith(T.PASSKEY_INTRO) and it.text.endswith(T.PASSKEY_QUESTION)
    assert T.PASSKEY_NEEDLE.format(key=it.answer) in it.text and T.PASSKEY_FILLER in it.text
    assert len(it.answer) == 6 and it.answer.isdigit() and it.kind == "contextual"
  depths = [it.meta["depth"] for it in items]
  assert depths[0] == 0.0 and 0.9 < depths[-1] < 1.0 and depths == sorted(depths) and len(set(depths)) == 5
  assert items[-1].text.endswith("There and back again. " + T.PASSKEY_QUESTION)  # filler after the needle
  assert T.passkey(TOK, 5, 600, 6, seed=0)[2].answer == items[2].answer  # fixed by seed
  with pytest.raises(ConfigError, match="passkey.length"):
    T.passkey(TOK, 2, 100, 6, seed=0)


def test_sets_are_balanced():
  yn = T.capitals_yesno(TOK, 10, seed=0)
  assert collections.Counter(it.answer for it in yn) == {"yes": 5, "no": 5}
  for it in yn:  # a 'no' pairs the country with another country's capital
    city, country = it.text.splitlines()[-1][:-1].split(" is the capital of ")
    assert ((city, country) in [(k, c) for c, k in T.CAPITALS]) == (it.answer == "yes")
  facts = T.context_facts(TOK, 8, seed=0)
  assert collections.Counter(it.meta["asked"] for it in facts) == {0: 2, 1: 2, 2: 2, 3: 2}
  conflict = T.conflict(TOK, 6, seed=0)
  assert all(it.answer != it.meta["memory"] and f"is {it.answer}." in it.text for it in conflict)


def test_prompts_of_a_task_share_one_length():
  items = T.suite(TOK, "quick", 6, seed=1, lengths=((400, 6),))
  lengths = collections.defaultdict(set)
  for it in items:
    lengths[it.task].add(len(it.prompt))
  assert set(lengths) == {"passkey_400x6", "context_facts", "recall", "capitals", "capitals_yesno", "conflict"}
  assert all(len(v) == 1 for v in lengths.values()), lengths


def _ids(text):
  return TOK.encode(text)


def test_scoring_is_strict():
  key = T.Item("passkey", "contextual", np.zeros(1, np.int32), "", "123456", 9, {})
  assert T.verdict(key, _ids(" 123456. The"), TOK) == "correct"
  assert T.verdict(key, _ids(" 1234567"), TOK) == "wrong"
  assert T.verdict(key, _ids(" The pass key is 123456"), TOK) == "wrong"  # later text is not searched
  city = T.Item("capitals", "parametric", np.zeros(1, np.int32), "", "Mexico City", 5, {})
  assert T.verdict(city, _ids(' "mexico city".'), TOK) == "correct"
  assert T.verdict(city, _ids(" Mexico"), TOK) == "wrong"
  # digits are compared without spaces, and still strictly
  assert [T.verdict(key, _ids(s), TOK) for s in (" 123 456.", " 1 2 3 4 5 6", "\n123456", " 12345 67")] == \
      ["correct", "correct", "correct", "wrong"]
  assert T.verdict(key, _ids(" 12345"), TOK) == "wrong" and T.verdict(key, _ids(" key 123456"), TOK) == "wrong"
  c = T.Item("conflict", "conflict", np.zeros(1, np.int32), "", "Rome", 3, {"memory": "Paris"})
  assert [T.verdict(c, _ids(s), TOK) for s in (" Rome.", " Paris<eos>", " London")] == ["context", "memory", "other"]
  assert T.success(c, "context") and not T.success(c, "memory")
  no_memory = T.Item("conflict", "conflict", np.zeros(1, np.int32), "", "Rome", 3, {})
  assert T.verdict(no_memory, _ids(" Paris"), TOK) == "other"


def test_lab_examples_are_scored_by_ids():
  ex = {"passkey": [SimpleNamespace(prompt=np.array([257, 5]), answer=np.array([7, 8]), text="x", meta={})],
        "conflict": [SimpleNamespace(prompt=np.array([257, 6]), answer=np.array([9]), text="y",
                                     meta={"context_answer": np.array([9]), "memory_answer": np.array([4])})]}
  pk, cf = T.from_examples(ex, TOK)
  assert pk.max_new == 2 and T.verdict(pk, [7, 8, 1], TOK) == "correct" and T.verdict(pk, [7, 1], TOK) == "wrong"
  assert [T.verdict(cf, [t], TOK) for t in (9, 4, 5)] == ["context", "memory", "other"]
  with pytest.raises(ConfigError, match="family"):
    T.from_examples({"bogus": []}, TOK)


def test_suite_options():
  quick = T.suite(TOK, "quick", 2, seed=0, lengths=((400, 6), (500, 12)))
  assert [it.task for it in quick].count("passkey_500x12") == 2
  assert {len(it.answer) for it in quick if it.task == "passkey_500x12"} == {12}
  known = [("France", "Paris"), ("Japan", "Tokyo")]
  assert {it.meta["memory"] for it in T.suite(TOK, "quick", 4, 0, known=known, lengths=((400, 6),))
          if it.kind == "conflict"} <= {"Paris", "Tokyo"}
  with pytest.raises(ConfigError, match="suite"):
    T.suite(TOK, "huge")


def test_templates_suite_has_five_templates_per_family_that_differ():
  known = [("France", "Paris"), ("Japan", "Tokyo"), ("Spain", "Madrid")]
  items = T.suite(TOK, "templates", 3, seed=0, known=known, lengths=((700, 6),))
  by_task = collections.defaultdict(list)
  for it in items:
    by_task[it.task].append(it)
  families = collections.defaultdict(list)
  for task in by_task:
    families[task.split("/")[0]].append(task)
  assert {f: len(ts) for f, ts in families.items()} == {f: 5 for f in
                                                       ("passkey", "context_facts", "capitals", "capitals_padded", "conflict")}
  for family, tasks in families.items():
    first_prompts = [by_task[t][0].text for t in tasks]
    assert len(set(first_prompts)) == 5, family      # every template words the same item differently
    assert all(len(by_task[t]) == 3 for t in tasks)
  # t0 is the built-in prompt
  assert by_task["passkey/t0"][0].text == T.passkey(TOK, 3, 700, 6, 0)[0].text
  assert by_task["conflict/t0"][1].text == T.conflict(TOK, 3, 0, pairs=known)[1].text
  # closed-book items ask the known pairs; padded ones are the short ones behind neutral filler, at most
  # the passkey length and longer than the longest passkey prompt minus one filler sentence
  for i in range(5):
    short, padded = by_task[f"capitals/t{i}"], by_task[f"capitals_padded/t{i}"]
    assert {(it.answer) for it in short} <= {k for _, k in known}
    for s, p in zip(short, padded):
      assert p.text.endswith(" " + s.text) and p.answer == s.answer and p.kind == s.kind == "parametric"
      assert p.text[:-len(s.text)].strip() in " ".join([T.PASSKEY_TEMPLATES[i].filler] * 20)
      assert 700 - len(TOK.encode(" " + T.PASSKEY_TEMPLATES[i].filler)) < len(p.prompt) <= 700
  assert all(it.answer.isdigit() and T.PASSKEY_TEMPLATES[3].needle.format(key=it.answer) in it.text
             for it in by_task["passkey/t3"])


def test_own_prompts_become_items_scored_like_the_built_in_ones(tmp_path):
  path = tmp_path / "mine.jsonl"
  path.write_text('{"family": "pk", "kind": "contextual", "prompt": "key 42. key:", "answer": 482913}\n\n'
                  '{"family": "cf", "kind": "conflict", "prompt": "x", "answer": "Rome", "memory": "Paris", '
                  '"max_new_tokens": 3, "source": "atlas"}\n')
  rows = T.read_prompts(str(path))
  assert [r["line"] for r in rows] == [1, 3]
  pk, cf = T.from_prompts(rows, TOK)
  assert (pk.task, pk.kind, pk.answer, pk.max_new) == ("pk", "contextual", "482913", len(TOK.encode(" 482913")) + 2)
  assert T.verdict(pk, _ids(" 482 913"), TOK) == "correct"
  assert cf.max_new == 3 and cf.meta["source"] == "atlas" and cf.meta["memory"] == "Paris"
  assert T.verdict(cf, _ids(" Paris"), TOK) == "memory"
  empty = tmp_path / "empty.jsonl"
  empty.write_text("\n")
  with pytest.raises(ConfigError, match="holds no prompt"):
    T.read_prompts(str(empty))
  with pytest.raises(ConfigError, match="--prompts: .* is not a file"):
    T.read_prompts(str(tmp_path / "missing.jsonl"))
