"""minilm.cache: entries keyed by what files hold, whatever their path or modification time, and
XLA's compiled programs kept per machine."""
import hashlib
import json
import os
import shutil
import subprocess
import sys

import jax
import pytest

from helpers import ROOT
from minilm import cache, machine


def test_a_file_s_digest_is_its_contents_wherever_it_lies(tmp_path):
  a = tmp_path / "a" / "model.bin"
  a.parent.mkdir()
  a.write_bytes(b"weights" * 1000)
  b = tmp_path / "b" / "other_name.bin"
  b.parent.mkdir()
  shutil.copyfile(a, b)
  os.utime(b, ns=(1, 1))   # another modification time, as a copy installed elsewhere has
  assert cache.digest(str(a)) == cache.digest(str(b)) == hashlib.sha256(a.read_bytes()).hexdigest()


def test_a_changed_file_gets_a_new_digest_in_the_same_process(tmp_path):
  f = tmp_path / "corpus.txt"
  f.write_text("abcd")
  before = cache.digest(str(f))
  f.write_text("abce")                      # same size
  os.utime(f, ns=(10**18, 10**18))          # a new modification time, however coarse the clock
  assert cache.digest(str(f)) != before
  assert cache.digest(str(f)) == hashlib.sha256(b"abce").hexdigest()


def test_a_folder_s_digest_follows_its_files_names_and_contents(tmp_path):
  def folder(name, files):
    root = tmp_path / name
    for rel, text in files.items():
      (root / rel).parent.mkdir(parents=True, exist_ok=True)
      (root / rel).write_text(text)
    return cache.digest(str(root))
  base = folder("x", {"a.txt": "one", "sub/b.txt": "two"})
  assert folder("y", {"sub/b.txt": "two", "a.txt": "one"}) == base        # written in another order
  assert folder("z", {"a.txt": "one", "sub/b.txt": "tw0"}) != base        # a file's contents
  assert folder("w", {"a.txt": "one", "sub/c.txt": "two"}) != base        # a file's name
  assert folder("v", {"a.txt": "one", "b.txt": "two"}) != base            # a file's folder


def test_the_root_is_minilm_cache_or_the_home_folder_s(monkeypatch, tmp_path):
  monkeypatch.setenv("MINILM_CACHE", str(tmp_path))
  assert cache.root() == str(tmp_path)
  monkeypatch.delenv("MINILM_CACHE")
  assert cache.root() == os.path.join(os.path.expanduser("~"), ".cache", "minilm")


def test_a_folder_s_digest_reads_only_its_regular_files_and_follows_links(tmp_path):
  root = tmp_path / "corpus"
  (root / "sub").mkdir(parents=True)
  (root / "a.txt").write_text("one")
  before = cache.digest(str(root))
  os.mkfifo(root / "pipe")                                   # opened, it would block forever
  os.symlink(tmp_path / "absent.txt", root / "dangling.txt")
  assert cache.digest(str(root)) == before
  (tmp_path / "elsewhere").mkdir()
  (tmp_path / "elsewhere" / "b.txt").write_text("two")
  os.symlink(tmp_path / "elsewhere", root / "linked")         # a linked folder's files count
  linked = cache.digest(str(root))
  assert linked != before
  (tmp_path / "elsewhere" / "b.txt").write_text("tw0")
  os.utime(tmp_path / "elsewhere" / "b.txt", ns=(10**18, 10**18))
  assert cache.digest(str(root)) != linked


def test_an_entry_s_key_follows_every_part_in_order():
  base = cache.key(1, "text", ["abc", "def"])
  assert len(base) == 16 and base == cache.key(1, "text", ["abc", "def"])
  assert base not in {cache.key(2, "text", ["abc", "def"]), cache.key(1, "json", ["abc", "def"]),
                      cache.key(1, "text", ["def", "abc"])}


# --- compiled programs (keep_compiled) -----------------------------------------------------------

KEEP = """
import json, os
import jax, jax.numpy as jnp
from jax import monitoring
from minilm import cache
hits = []
monitoring.register_event_listener(lambda event, **kw: hits.append(event) if event.endswith("/cache_hits") else None)
folder = cache.keep_compiled()
y = jax.jit(lambda x: jnp.tanh(x @ x.T).sum(0))(jnp.arange(12.0).reshape(3, 4) / 10)
print(json.dumps({"folder": folder, "y": [float(v) for v in y], "hits": len(hits),
                  "env": os.environ.get("JAX_COMPILATION_CACHE_DIR")}))
"""


def _keep(tmp_path, **env):
  """KEEP run as a command with the suite's switch-off taken out: (its JSON line, its stderr). Its
  program compiles in well under jax's default second, so only keep_compiled's setting keeps it."""
  base = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_COMPILATION_CACHE", "JAX_PERSISTENT_CACHE"))
          and k != "JAX_ENABLE_COMPILATION_CACHE"}
  proc = subprocess.run([sys.executable, "-c", KEEP], cwd=ROOT, capture_output=True, text=True,
                        env={**base, "MINILM_CACHE": str(tmp_path / "cache"), **env})
  assert proc.returncode == 0, proc.stderr
  return json.loads(proc.stdout.splitlines()[-1]), proc.stderr


def _entries(folder) -> list[str]:
  return sorted(f for f in os.listdir(folder) if f.endswith("-cache"))


@pytest.mark.slow
def test_a_second_command_loads_the_program_the_first_compiled_and_gets_the_same_result(tmp_path):
  first, _ = _keep(tmp_path)
  assert first["folder"] == str(tmp_path / "cache" / "xla" / os.path.basename(first["folder"]))
  assert first["env"] == first["folder"]     # the processes it starts keep the same folder
  assert first["hits"] == 0 and _entries(first["folder"])
  second, _ = _keep(tmp_path)
  assert second["hits"] >= 1 and second["y"] == first["y"] and second["folder"] == first["folder"]


@pytest.mark.slow
def test_a_damaged_compiled_program_is_compiled_again_never_run(tmp_path):
  first, _ = _keep(tmp_path)
  for name in _entries(first["folder"]):
    path = os.path.join(first["folder"], name)
    with open(path, "r+b") as f:
      f.truncate(os.path.getsize(path) // 2)   # as a write cut short would leave it
  again, stderr = _keep(tmp_path)
  assert again["hits"] == 0 and again["y"] == first["y"]
  assert "persistent compilation cache" in stderr


@pytest.mark.slow
def test_jax_s_own_settings_come_before_the_kept_folder(tmp_path):
  elsewhere = tmp_path / "elsewhere"
  named, _ = _keep(tmp_path, JAX_COMPILATION_CACHE_DIR=str(elsewhere))
  assert named["folder"] == str(elsewhere) and _entries(elsewhere)
  slow_only, _ = _keep(tmp_path, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="60")
  assert slow_only["folder"] and not _entries(slow_only["folder"])   # no program took a minute
  off, _ = _keep(tmp_path / "off", JAX_ENABLE_COMPILATION_CACHE="false")
  assert off["folder"] is None and off["env"] is None
  assert not (tmp_path / "off").exists()


@pytest.mark.slow
def test_a_cache_folder_that_cannot_be_made_is_one_note_and_the_command_goes_on(tmp_path):
  (tmp_path / "cache").write_text("a file where the folder would be")
  out, stderr = _keep(tmp_path)
  assert out["folder"] is None and out["y"]
  notes = [line for line in stderr.splitlines() if line.startswith("note: compiled programs not kept")]
  assert len(notes) == 1


def test_the_compiled_folder_differs_with_the_cpu_s_flags(monkeypatch, tmp_path):
  monkeypatch.setenv("MINILM_CACHE", str(tmp_path))
  monkeypatch.setattr(machine, "cpu_info", lambda: ("Some CPU", frozenset({"avx2", "avx512f"})))
  avx512 = cache.compiled_folder()
  monkeypatch.setattr(machine, "cpu_info", lambda: ("Some CPU", frozenset({"avx2"})))
  avx2 = cache.compiled_folder()
  assert avx512 != avx2 and os.path.dirname(avx512) == os.path.dirname(avx2) == str(tmp_path / "xla")
  monkeypatch.setattr(machine, "cpu_info", lambda: ("Some CPU", frozenset({"avx512f", "avx2"})))
  assert cache.compiled_folder() == avx512    # flags as a set


def test_the_suite_itself_keeps_no_compiled_program():
  """tests/compilation.py turns jax's persistent cache off before jax is imported, in every worker
  and the commands tests start: no test's result comes from a program an earlier run compiled."""
  assert not jax.config.jax_enable_compilation_cache
  assert os.environ["JAX_ENABLE_COMPILATION_CACHE"] == "false"
