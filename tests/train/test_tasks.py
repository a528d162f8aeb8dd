"""Task generators (train.tasks): formats, answers, the knowledge base and held-out keys."""
import numpy as np
import pytest

from train import data, tasks
from train.tokenizer import BOS, EOS, ByteTokenizer

TOK = ByteTokenizer()
A0, E0, K0, V0 = (TOK.symbol(c, 0) for c in "AEKV")


def is_sym(t, letter):
  return TOK.symbol(letter, 0) <= t < TOK.symbol(letter, 0) + dict(zip("EAKV", (TOK.n_entities, TOK.n_attributes, TOK.n_keys, TOK.n_values)))[letter]


def draws(family, cfg, n, heldout, seed=0, budget=None):
  rng = np.random.default_rng(seed)
  return [tasks.BUILDERS[family](rng, cfg, budget or cfg.seq_len, heldout) for _ in range(n)]


def test_passkey_format_depth_and_answer():
  cfg = data.DataConfig(passkey_digits=6)
  ds = draws("passkey", cfg, 300, heldout=False)
  for d in ds:
    s = TOK.decode(d.toks)
    key = d.meta["key"]
    assert len(key) == 6 and key[0] != "0"
    assert s.startswith("<bos>") and s.endswith(f"What is the pass key? The pass key is {key}<eos>")
    assert f"The pass key is {key}. Remember it. {key} is the pass key." in s
    assert s.count("The grass is green.") >= 1
    answer = [t for t, f in zip(d.toks, d.flags) if f]
    assert answer == list(key.encode())
    assert d.flags[-1 - len(key):-1] == [1] * len(key) and sum(d.flags) == len(key)
    assert len(d.toks) <= cfg.seq_len
  depths = np.array([d.meta["depth"] for d in ds])
  assert depths.min() == 0.0 and depths.max() == 1.0 and 0.4 < depths.mean() < 0.6
  # training passkeys fill at least half of the room with filler; held-out ones all of it
  n_max = tasks.filler_fit(cfg.seq_len - tasks._passkey_overhead(6))
  assert min(d.meta["filler_sentences"] for d in ds) >= (n_max + 1) // 2
  assert {d.meta["filler_sentences"] for d in draws("passkey", cfg, 20, heldout=True)} == {n_max}


def test_filler_fit_is_the_most_sentences_that_fit():
  """filler_fit(b) sentences of the cycle fit in b tokens and one more does not: every builder sizes
  its filler with it, so one sentence too many overflows the row (or never lets a packer stop)."""
  for budget in range(-3, 400):
    n = tasks.filler_fit(budget)
    assert n >= 0 and len(tasks.filler(0, n)) <= max(budget, 0) < len(tasks.filler(0, n + 1)), budget


def test_heldout_passkeys_hide_the_key_in_a_full_context():
  """Held-out passkey examples measure retrieval over the whole context: the needle is stated once,
  before the question that ends the prompt, the answer is exactly the key's digits (which occur in the
  prompt only inside the needle), and the example leaves no room for one more filler sentence."""
  cfg = data.DataConfig(passkey_digits=5)
  longest = max(len(s) + 1 for s in tasks.FILLER)   # a sentence and its trailing space
  question = "What is the pass key? The pass key is "
  for ex in data.eval_examples(cfg, 2, 40, families=("passkey",))["passkey"]:
    key = ex.meta["key"]
    assert TOK.decode(ex.answer) == key and len(key) == cfg.passkey_digits
    assert ex.text.endswith(question)
    needle = f"The pass key is {key}. Remember it. {key} is the pass key. "
    assert ex.text.count(needle) == 1 and ex.text.index(needle) < ex.text.index(question)
    assert sum(c.isdigit() for c in ex.text) == 2 * len(key)   # the key twice in the needle, nowhere else
    used = len(ex.prompt) + len(ex.answer) + 1                  # + EOS
    assert cfg.seq_len - longest < used <= cfg.seq_len   # the next sentence, at most `longest`, did not fit


def test_passkey_keys_split_by_hash():
  cfg = data.DataConfig()
  train_keys = {int(d.meta["key"]) for d in draws("passkey", cfg, 500, heldout=False)}
  eval_keys = {int(d.meta["key"]) for d in draws("passkey", cfg, 100, heldout=True)}
  assert not any(tasks.passkey_is_heldout(k) for k in train_keys)
  assert all(tasks.passkey_is_heldout(k) for k in eval_keys)
  share = np.mean([tasks.passkey_is_heldout(k) for k in range(10_000, 100_000)])
  assert 0.09 < share < 0.11


def test_recall_answers_are_the_paired_values():
  cfg = data.DataConfig(recall_pairs=6, recall_queries=3)
  for ex in data.eval_examples(cfg, 3, 40, families=("recall",))["recall"]:
    p = ex.prompt.tolist()
    start = len(TOK.encode("<bos>Remember: "))
    pairs = {p[i]: p[i + 1] for i in range(start, start + 3 * 6, 3)}
    assert all(is_sym(k, "K") for k in pairs) and len(pairs) == 6
    assert is_sym(p[-1], "K") and ex.answer.tolist() == [pairs[p[-1]]]
    assert "Recall: " in ex.text and ex.text.index("Recall: ") > ex.text.index("Remember: ")


def stated_facts(prompt):
  """entity -> attribute of every statement or question in a prompt (nearest entity before A)."""
  facts, last_e = {}, None
  for t in prompt:
    if is_sym(t, "E"):
      last_e = t
    elif is_sym(t, "A"):
      facts.setdefault(last_e, []).append(t)
  return facts


def test_context_facts_answer_from_context_and_avoid_kb_entities():
  cfg = data.DataConfig()
  for ex in data.eval_examples(cfg, 1, 50, families=("context_facts",))["context_facts"]:
    facts = stated_facts(ex.prompt.tolist())
    asked = ex.prompt.tolist()[-len(TOK.encode(" lives in ")) - 1]
    assert ex.text.endswith(f"Where does {TOK.decode([asked])} live? {TOK.decode([asked])} lives in ")
    assert ex.answer.tolist() == [facts[asked][0]]
    assert all(e - E0 >= cfg.kb_entities for e in facts)


def test_recall_and_context_rows_are_unambiguous():
  """Training examples have one right answer per question: recall states distinct keys and asks
  distinct ones, each answered by its stated value; context facts state distinct entities and ask
  distinct stated ones, each answered by its stated attribute. Read from the tokens, not the meta."""
  cfg = data.DataConfig()
  recall_head, recall_q = len(TOK.encode("<bos>Remember: ")), TOK.encode("Recall: ")
  for d in draws("recall", cfg, 200, heldout=False, seed=4):
    t = d.toks
    pairs = [(t[i], t[i + 1]) for i in range(recall_head, recall_head + 3 * cfg.recall_pairs, 3)]
    assert len({k for k, _ in pairs}) == cfg.recall_pairs and all(is_sym(k, "K") and is_sym(v, "V") for k, v in pairs)
    q = max(i for i in range(len(t)) if t[i:i + len(recall_q)] == recall_q) + len(recall_q)
    asked = [(t[i], t[i + 1]) for i in range(q, q + 3 * cfg.recall_queries, 3)]
    assert len({k for k, _ in asked}) == cfg.recall_queries and set(asked) <= set(pairs)
    assert [v for v, f in zip(t, d.flags) if f] == [v for _, v in asked]
  for d in draws("context_facts", cfg, 200, heldout=False, seed=4):
    s = TOK.decode(d.toks)
    questions = TOK.encode(s[s.index("Where does "):])
    statements = d.toks[:len(d.toks) - len(questions)]
    stated = [t for t in statements if is_sym(t, "E")]
    assert len(stated) == len(set(stated)) == cfg.facts_per_context
    asked = [t for t in questions if is_sym(t, "E")][::2]   # each question names its entity twice
    assert len(set(asked)) == cfg.questions_per_context and set(asked) <= set(stated)
    facts = stated_facts(statements)
    assert [a for a, f in zip(d.toks, d.flags) if f] == [facts[e][0] for e in asked]


def test_knowledge_base_fixed_by_kb_seed_only():
  cfg = data.DataConfig()
  kb = tasks.knowledge_base(cfg.kb_seed, cfg.kb_entities, cfg.n_attributes)
  assert kb.shape == (64,) and kb.min() >= 0 and kb.max() < cfg.n_attributes
  assert len(set(kb.tolist())) > 10
  other = tasks.knowledge_base(1, cfg.kb_entities, cfg.n_attributes)
  assert not np.array_equal(kb, other)
  # same KB whatever the run seed: eval answers for two run seeds agree with it
  for seed in (0, 7):
    for ex in data.eval_examples(cfg, seed, 64, families=("kb_facts",))["kb_facts"]:
      assert ex.answer.tolist() == [A0 + kb[ex.meta["entity"]]]


def test_kb_facts_in_training_text_match_the_eval_questions():
  cfg = data.DataConfig(mixture={"kb_facts": 1})
  kb = tasks.knowledge_base(cfg.kb_seed, cfg.kb_entities, cfg.n_attributes)
  seen = set()
  templates = set()
  for step in range(20):
    b = data.train_batch(cfg, 5, step)
    for row in b["inputs"]:
      for e, attrs in stated_facts(row.tolist()).items():
        assert {a - A0 for a in attrs} == {kb[e - E0]}
        seen.add(e - E0)
      templates.update(t for t in ("lives in", "The home of", "has made a home in", "Where does")
                       if t in TOK.decode(row))
  assert seen == set(range(cfg.kb_entities))
  assert len(templates) == 4
  questions = data.eval_examples(cfg, 0, 1000)["kb_facts"]
  assert sorted(ex.meta["entity"] for ex in questions) == list(range(cfg.kb_entities))
  assert questions[0].text == f"<bos>Where does <E{questions[0].meta['entity']}> live? <E{questions[0].meta['entity']}> lives in "


def test_conflict_contradicts_the_kb_and_records_both_answers():
  cfg = data.DataConfig()
  kb = tasks.knowledge_base(cfg.kb_seed, cfg.kb_entities, cfg.n_attributes)
  exs = data.eval_examples(cfg, 0, 60)["conflict"]
  for ex in exs:
    e = ex.meta["entity"]
    assert e < cfg.kb_entities
    ctx, mem = ex.meta["context_answer"].tolist(), ex.meta["memory_answer"].tolist()
    assert mem == [A0 + kb[e]] and ctx != mem
    assert ex.answer.tolist() == ctx
    assert stated_facts(ex.prompt.tolist())[E0 + e][0] == ctx[0]   # the context states it
    assert ex.text.endswith(f"Where does <E{e}> live? <E{e}> lives in ")


@pytest.mark.parametrize("family", tasks.TASK_FAMILIES)
def test_builders_respect_budget_and_frame_examples(family):
  cfg = data.DataConfig()
  rng = np.random.default_rng(11)
  fitted = 0
  for budget in rng.integers(1, 300, size=200).tolist():
    d = tasks.BUILDERS[family](rng, cfg, budget, False)
    if budget >= tasks.min_length(family, cfg):
      assert d is not None
    if d is not None:
      fitted += 1
      assert len(d.toks) == len(d.flags) <= budget
      assert d.toks[0] == BOS and d.toks[-1] == EOS and EOS not in d.toks[:-1] and 0 < sum(d.flags)
  assert fitted > 50
