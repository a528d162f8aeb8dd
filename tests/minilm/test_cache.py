"""minilm.cache: entries keyed by what files hold, whatever their path or modification time."""
import hashlib
import os
import shutil

from minilm import cache


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
