"""minilm.atomic: a failed write leaves the old file and no temporary, a staged folder replaces the
old one only when complete, and a swap cut between its two renames is undone."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys

import pytest

from minilm import atomic
from minilm.schema import ConfigError


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
  final = tmp_path / "summary.json"
  atomic.write_json(str(final), {"v": 1})
  with pytest.raises(RuntimeError):
    with atomic.path(str(final)) as tmp:
      with open(tmp, "w") as f:
        f.write('{"v": 2, "trunc')
      raise RuntimeError("killed mid-write")
  assert json.loads(final.read_text()) == {"v": 1} and os.listdir(tmp_path) == ["summary.json"]


def test_a_staged_folder_replaces_the_old_one_only_when_complete(tmp_path):
  out = tmp_path / "c5"
  with atomic.staged_dir(str(out)) as staging:
    atomic.write_text(os.path.join(staging, "table.md"), "first")
  with pytest.raises(ValueError):
    with atomic.staged_dir(str(out)) as staging:
      atomic.write_text(os.path.join(staging, "table.md"), "second, half done")
      raise ValueError("the study failed")
  assert (out / "table.md").read_text() == "first" and sorted(os.listdir(tmp_path)) == ["c5"]
  with atomic.staged_dir(str(out)) as staging:
    atomic.write_text(os.path.join(staging, "other.md"), "third")
  assert os.listdir(out) == ["other.md"]                   # the new output, not a merge with the old


def test_a_swap_cut_between_its_two_renames_is_undone(tmp_path, monkeypatch):
  out = tmp_path / "quant"
  with atomic.staged_dir(str(out)) as staging:
    atomic.write_text(os.path.join(staging, "summary.json"), "{}")
  replace = os.replace
  def killed_after_the_first(src, dst):
    replace(src, dst)
    monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
  with pytest.raises(KeyboardInterrupt):   # killed after 'final -> final.old', before 'staging -> final'
    with atomic.staged_dir(str(out)) as staging:
      atomic.write_text(os.path.join(staging, "other.json"), "{}")
      monkeypatch.setattr(os, "replace", killed_after_the_first)
  monkeypatch.setattr(os, "replace", replace)
  assert sorted(os.listdir(tmp_path)) == ["quant.old", "quant.partial"]
  atomic.recover_dir(str(out))
  assert os.listdir(out) == ["summary.json"] and sorted(os.listdir(tmp_path)) == ["quant"]


def test_folders_named_like_staging_that_it_did_not_make_are_refused_untouched(tmp_path):
  """A user's own `<out>.old` (an earlier export kept by hand) or `<out>.partial` is never restored
  or deleted: one line names it, and nothing moves."""
  out = tmp_path / "rope_hf"
  for suffix in (atomic.OLD, atomic.PARTIAL):
    mine = tmp_path / f"rope_hf{suffix}"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    with pytest.raises(atomic.ConfigError, match=rf"^{mine}: is in the way of writing {out} \(its staging names"):
      with atomic.staged_dir(str(out)):
        raise AssertionError("not reached")
    assert (mine / "notes.txt").read_text() == "mine" and sorted(os.listdir(tmp_path)) == [mine.name]
    mine.rename(tmp_path / "kept")
    with atomic.staged_dir(str(out)) as staging:
      atomic.write_text(os.path.join(staging, "config.json"), "{}")
    assert os.listdir(out) == ["config.json"]   # the mark of a staging folder never stays in the output
    (tmp_path / "kept" / "notes.txt").unlink()
    (tmp_path / "kept").rmdir()
    out.joinpath("config.json").unlink()
    out.rmdir()


def test_read_jsonl_leaves_out_only_a_cut_last_line(tmp_path):
  path = tmp_path / "log.jsonl"
  assert atomic.read_jsonl(str(path)) == ([], False)
  path.write_text('{"step": 1}\n\n{"step": 2}\n{"step": 3, "lo')
  assert atomic.read_jsonl(str(path)) == ([('{"step": 1}', {"step": 1}), ('{"step": 2}', {"step": 2})], True)
  path.write_text('{"step": 1}\n{"st\n{"step": 3}\n')
  with pytest.raises(ValueError, match=rf"^{path}: line 2 is not JSON; delete that line and run again$"):
    atomic.read_jsonl(str(path))


HOLD_THEN_DIE = """
import os, signal, sys
from minilm import atomic
with atomic.exclusive(sys.argv[1]):
  print("held", flush=True)
  os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_folder_is_written_by_one_process_at_a_time_and_a_killed_holder_never_blocks(tmp_path):
  folder = tmp_path / "arm"
  with atomic.exclusive(str(folder)):
    with pytest.raises(atomic.ConfigError, match=rf"^{folder}: another process \(pid {os.getpid()}\) is writing it; "):
      with atomic.exclusive(str(folder)):
        raise AssertionError("not reached")
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  proc = subprocess.run([sys.executable, "-c", HOLD_THEN_DIE, str(folder)], cwd=root, capture_output=True, text=True,
                        timeout=60)
  assert proc.returncode == -signal.SIGKILL and proc.stdout == "held\n", proc.stderr
  with atomic.exclusive(str(folder)):   # the dead holder's lock went with it
    pass


def test_a_second_writer_of_a_staged_folder_is_refused_and_changes_nothing(tmp_path):
  out = tmp_path / "quant"
  with atomic.staged_dir(str(out)) as staging:
    atomic.write_text(os.path.join(staging, "first.md"), "first")
    for second in (lambda: atomic.staged_dir(str(out)).__enter__(), lambda: atomic.recover_dir(str(out))):
      with pytest.raises(atomic.ConfigError, match=rf"^{out}: another process is writing it \(into quant.partial\); "):
        second()
    assert sorted(os.listdir(staging)) == [atomic.MARK, "first.md"]
  assert os.listdir(out) == ["first.md"] and sorted(os.listdir(tmp_path)) == ["quant"]


def test_a_folder_with_files_a_study_did_not_write_is_refused_not_replaced(tmp_path):
  """A study's --out that holds other files (its own inputs, say a trained arm or a trace) is refused
  in one line and left as it was; an earlier output of the study (it holds `owns` only) is replaced."""
  out = tmp_path / "arm"
  out.mkdir()
  (out / "config.json").write_text("{}")
  (out / "checkpoints").mkdir()
  with pytest.raises(atomic.ConfigError, match=rf"^{out}: holds files this command did not write \(checkpoints, "
                                               rf"config.json\), which writing there would delete; choose a new"):
    with atomic.staged_dir(str(out), owns=("results.jsonl",)):
      raise AssertionError("not reached")
  assert sorted(os.listdir(out)) == ["checkpoints", "config.json"] and os.listdir(tmp_path) == ["arm"]
  shutil.rmtree(out)
  out.mkdir()
  (out / "results.jsonl").write_text("")   # an earlier output of the study
  with atomic.staged_dir(str(out), owns=("results.jsonl",)) as staging:
    atomic.write_text(os.path.join(staging, "results.jsonl"), "new")
  assert os.listdir(out) == ["results.jsonl"]


def test_an_earlier_output_with_other_files_beside_it_or_of_another_kind_is_refused(tmp_path):
  """An earlier output is replaced only when it holds nothing but what such an output holds (`owns`:
  its mark first, then every other name): a user's file beside it, or another study's output that
  shares some of its names (C5's and C6's results.jsonl), is refused in one line, and nothing is
  deleted."""
  c5, c6 = ("verdict.json", "results.jsonl", "summary.json", "c5.png"), ("c6*.png", "results.jsonl", "summary.json")
  out = tmp_path / "out"
  out.mkdir()
  for name in ("verdict.json", "results.jsonl", "summary.json", "c5.png"):   # a C5 output
    (out / name).write_text(name)
  (out / "thesis.txt").write_text("draft")
  (out / "data").mkdir()
  with pytest.raises(atomic.ConfigError, match=rf"^{out}: holds files this command did not write \(data, thesis.txt\), "):
    with atomic.staged_dir(str(out), owns=c5):
      raise AssertionError("not reached")
  shutil.rmtree(out / "data")
  os.remove(out / "thesis.txt")
  with pytest.raises(atomic.ConfigError, match=rf"^{out}: holds files this command did not write \(c5.png, verdict.json\), "):
    with atomic.staged_dir(str(out), owns=c6):   # C6 into C5's output
      raise AssertionError("not reached")
  assert sorted(os.listdir(out)) == ["c5.png", "results.jsonl", "summary.json", "verdict.json"]
  shared = tmp_path / "shared"   # only names that C6's output holds too, but not its mark
  shared.mkdir()
  (shared / "results.jsonl").write_text("")
  (shared / "summary.json").write_text("")
  with pytest.raises(atomic.ConfigError, match=rf"^{shared}: holds files this command did not write \(results.jsonl, "
                                               rf"summary.json\), "):
    with atomic.staged_dir(str(shared), owns=c6):
      raise AssertionError("not reached")
  with atomic.staged_dir(str(out), owns=c5) as staging:   # C5 again: replaced
    atomic.write_text(os.path.join(staging, "verdict.json"), "new")
  assert os.listdir(out) == ["verdict.json"]
  (out / "c6_rope.png").write_text("")   # a pattern: c6.png, or one per model
  os.remove(out / "verdict.json")
  with atomic.staged_dir(str(out), owns=c6) as staging:
    atomic.write_text(os.path.join(staging, "c6.png"), "new")
  assert os.listdir(out) == ["c6.png"]


def test_json_readers_optional_and_required(tmp_path):
  """read_json: an optional record, its default wherever the file cannot give JSON (missing, a
  folder, cut short, not UTF-8, nested too deep); parse_json: the caller's one-line error for each
  of those that is the file's content, the reason inside."""
  good, cut, binary, deep = (tmp_path / n for n in ("good.json", "cut.json", "binary.json", "deep.json"))
  good.write_text('{"a": 1}')
  cut.write_text('{"a": ')
  binary.write_bytes(b'{"a": "\xff"}')
  deep.write_text("[" * 100_000)
  for path in (tmp_path / "missing.json", tmp_path, cut, binary, deep):
    assert atomic.read_json(str(path), {"default": True}) == {"default": True}, path
  assert atomic.read_json(str(good)) == {"a": 1} == atomic.parse_json(str(good), ValueError)
  for path in (cut, binary, deep):
    with pytest.raises(ConfigError, match=r"^bad: \S") as err:
      atomic.parse_json(str(path), lambda why: ConfigError(f"bad: {why}"))
    assert "\n" not in str(err.value)
