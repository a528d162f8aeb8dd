"""Atomic outputs: every file the lab writes appears whole or not at all.

A file is written to a temporary name in its own folder (same filesystem) and moved over the final
name with os.replace only when complete, so a kill, a full disk or an exception never leaves a
truncated file where a result used to be. A study that writes a whole folder writes it into a
staging folder that replaces the old one in one step (`staged_dir`), so a failed run leaves the
previous output untouched.
"""
from __future__ import annotations

import contextlib
import fcntl
import fnmatch
import json
import os
import shutil
import tempfile
from typing import Any, Callable, Iterator

import numpy as np

from minilm.schema import ConfigError, check

PARTIAL = ".partial"
"""Suffix of a folder being written; it replaces the final folder when complete."""
OLD = ".old"
"""Suffix of the folder being replaced, during the two renames of `staged_dir`."""
MARK = ".minilm-staging"
"""A file inside a `.partial` or `.old` folder that `staged_dir` made: only such folders are ever
restored or removed (a user's own `<out>.old` is refused, never deleted)."""


@contextlib.contextmanager
def path(final: str) -> Iterator[str]:
  """Yield a temporary path beside `final`; on success it is moved over `final`, on failure removed.

  The temporary name keeps the final extension (numpy and matplotlib pick formats by it)."""
  folder, name = os.path.split(os.path.abspath(final))
  os.makedirs(folder, exist_ok=True)
  tmp = os.path.join(folder, f".{name}.tmp{os.getpid()}{os.path.splitext(name)[1]}")
  try:
    yield tmp
    os.replace(tmp, final)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def write_text(final: str, text: str) -> None:
  with path(final) as tmp, open(tmp, "w") as f:
    f.write(text)
    f.flush()
    os.fsync(f.fileno())   # the rename must not reach the disk before the data does


def write_json(final: str, data: Any, **kw) -> None:
  write_text(final, json.dumps(data, **{"indent": 1, **kw}) + "\n")


def read_json(path: str, default: Any = None) -> Any:
  """The JSON of `path`, or `default` where the file is missing, unreadable or not valid JSON (for
  records that are optional: a reader shows what there is)."""
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError, RecursionError):   # ValueError: JSONDecodeError, UnicodeDecodeError
    return default


def parse_json(path: str, fail: Callable[[str], Exception]) -> Any:
  """The JSON of a file that must be valid; where it is not (or is nested too deep to parse), the
  one-line error fail(reason) of the caller's kind, which says what to do."""
  try:
    with open(path) as f:
      return json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:   # RecursionError: nested too deep
    raise fail(str(err)) from None


def read_jsonl(path: str) -> tuple[list[tuple[str, dict]], bool]:
  """((line, row) of each line of a JSON-lines log, whether a partial last line was left out); none
  when the file is missing. Logs are appended a line at a time, so only the last line can be cut
  short by a kill (whoever resumes writes it again); a damaged line before it is a one-line
  ValueError naming the file and the line."""
  if not os.path.exists(path):
    return [], False
  with open(path) as f:
    lines = [line.rstrip("\n") for line in f if line.strip()]
  rows = []
  for i, line in enumerate(lines):
    try:
      rows.append((line, json.loads(line)))
    except json.JSONDecodeError:
      if i < len(lines) - 1:
        raise ValueError(f"{path}: line {i + 1} is not JSON; delete that line and run again") from None
      return rows, True
  return rows, False


def save_npz(final: str, **arrays) -> None:
  with path(final) as tmp:
    np.savez(tmp, **arrays)


def save_npy(final: str, array) -> None:
  with path(final) as tmp:
    np.save(tmp, array)


def savefig(fig, final: str, **kw) -> None:
  with path(final) as tmp:
    fig.savefig(tmp, **kw)


def _ours(folder: str) -> bool:
  return os.path.exists(os.path.join(folder, MARK))


def _mark(folder: str) -> None:
  open(os.path.join(folder, MARK), "w").close()


def _unmark(folder: str) -> None:
  if _ours(folder):
    os.remove(os.path.join(folder, MARK))


def _check_leftovers(final: str) -> None:
  """A `<final>.old` or `<final>.partial` that `staged_dir` did not make is a one-line ConfigError:
  it is someone's, and in the way."""
  for leftover in (final + OLD, final + PARTIAL):
    check(not os.path.exists(leftover) or _ours(leftover), leftover,
          f"is in the way of writing {final} (its staging names are {os.path.basename(final + PARTIAL)} and "
          f"{os.path.basename(final + OLD)}), and not a folder this program made; move or rename it")


def _lock(path: str, refusal: Callable[[int], str]) -> int:
  """An fd holding an exclusive flock on `path` (created) until it is closed; the lock ends with its
  process, also when killed. While another process holds it: a ConfigError of refusal(fd)."""
  fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    message = refusal(fd)
    os.close(fd)
    raise ConfigError(message) from None
  return fd


def _hold(staging: str) -> int:
  """Create `staging` and its MARK, and hold the MARK (`_lock`); a staging folder another live
  process holds is a one-line ConfigError."""
  os.makedirs(staging, exist_ok=True)
  into = os.path.basename(staging)
  return _lock(os.path.join(staging, MARK), lambda fd: f"{staging[:-len(PARTIAL)]}: another process is writing it "
               f"(into {into}); let it end or stop it, then run the same command again")


def _recover(final: str, keep_partial: bool) -> None:
  if not os.path.exists(final) and os.path.isdir(final + OLD):
    os.replace(final + OLD, final)
  if os.path.isdir(final):
    _unmark(final)
  if os.path.isdir(final + OLD):
    shutil.rmtree(final + OLD)
  if not keep_partial and os.path.isdir(final + PARTIAL):
    clear_staging(final + PARTIAL)


def recover_dir(final: str, keep_partial: bool = False) -> None:
  """Finish or undo a `staged_dir` swap cut short between its two renames: if `final` is missing
  but its old copy is there, the old copy comes back. A leftover staging folder is emptied unless
  `keep_partial` (a resumable stage goes on filling it). Refused in one line while another process
  writes `final`, or where `<final>.old` or `<final>.partial` is a folder this program did not make."""
  final = os.path.abspath(final)
  _check_leftovers(final)
  fd = _hold(final + PARTIAL) if os.path.isdir(final + PARTIAL) else None
  try:
    _recover(final, keep_partial=True)
    if fd is not None and not keep_partial:
      shutil.rmtree(final + PARTIAL)   # while held: no other process can be filling it
  finally:
    if fd is not None:
      os.close(fd)


def _check_replaceable(final: str, owns: tuple[str, ...]) -> None:
  """`final` may be replaced when it is empty, or an earlier output of this kind: it holds a name
  matching owns[0] (the kind's own mark) and nothing that no pattern of `owns` (every name such an
  output holds) matches. Otherwise a one-line ConfigError: replacing it would delete someone's files,
  the study's inputs, or another command's output that shares some of its names."""
  if not os.path.isdir(final):
    return
  entries = sorted(os.listdir(final))
  foreign = [e for e in entries if not any(fnmatch.fnmatchcase(e, p) for p in owns)]
  replaceable = not entries or (not foreign and any(fnmatch.fnmatchcase(e, owns[0]) for e in entries))
  listed = foreign or entries
  check(replaceable, final, f"holds files this command did not write ({', '.join(listed[:3])}"
        f"{', ...' if len(listed) > 3 else ''}), which writing there would delete; choose a new or empty folder")


@contextlib.contextmanager
def staged_dir(final: str, keep_partial: bool = False, owns: tuple[str, ...] | None = None) -> Iterator[str]:
  """Yield a staging folder; when the block succeeds it replaces `final` (old contents and all),
  when it fails `final` stays as it was. The staging folder starts empty and is removed on failure,
  unless `keep_partial`: then a resumable stage finds what an interrupted attempt left in it.
  Staging and old folders hold a MARK file while they exist (`final` never keeps one); the process
  writing holds the MARK (flock), so a second process writing the same `final` is refused in one
  line, and the lock ends with its holder, even a killed one. `owns` (for a folder the user names):
  fnmatch patterns of every name an earlier output of this kind holds, its own mark first; any
  other non-empty `final` is refused, not replaced (`_check_replaceable`)."""
  final = os.path.abspath(final)
  _check_leftovers(final)
  if owns is not None:
    _check_replaceable(final, owns)
  staging = final + PARTIAL
  fd = _hold(staging)
  try:
    _recover(final, keep_partial)
    try:
      yield staging
    except BaseException:
      if not keep_partial:
        shutil.rmtree(staging, ignore_errors=True)
      raise
    if os.path.exists(final):
      if os.path.isdir(final):
        _mark(final)   # as final.old it is ours to restore or remove
      os.replace(final, final + OLD)
    os.replace(staging, final)
    _unmark(final)
    shutil.rmtree(final + OLD, ignore_errors=True)
  finally:
    os.close(fd)


def clear_staging(staging: str) -> None:
  """Empty a `staged_dir` staging folder (e.g. an interrupted attempt's with other settings), keeping
  it marked as a staging folder."""
  for name in os.listdir(staging):
    if name != MARK:
      entry = os.path.join(staging, name)
      shutil.rmtree(entry) if os.path.isdir(entry) and not os.path.islink(entry) else os.remove(entry)


LOCK = ".lock"
"""The file in a folder that one process at a time holds while it writes there (`exclusive`)."""


@contextlib.contextmanager
def exclusive(folder: str) -> Iterator[None]:
  """Hold `<folder>/.lock` for the block (creating the folder): another process asking for it meanwhile
  gets a one-line ConfigError naming the holder. The lock (flock) ends with its process, also when
  killed, so a stale file never blocks."""
  os.makedirs(folder, exist_ok=True)
  holder = lambda fd: os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
  fd = _lock(os.path.join(folder, LOCK), lambda fd: f"{os.path.abspath(folder)}: another process (pid {holder(fd)}) "
             f"is writing it; let it end or stop it, then run the same command again")
  try:
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    yield
  finally:
    os.close(fd)   # releases the lock


@contextlib.contextmanager
def serialized(folder: str) -> Iterator[None]:
  """Hold an flock on the (existing) folder itself for the block, waiting while another process
  holds it: for a read-merge-write of a file in it that several processes may update at the same
  moment. No file is added to the folder."""
  fd = os.open(folder, os.O_RDONLY)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX)
    yield
  finally:
    os.close(fd)   # releases the lock


def check_out_dir(out: str, field: str = "--out") -> None:
  """A one-line ConfigError, before any work, for an output folder that cannot be one: a file, a
  folder inside a file, or a place where no file can be created (read-only, no permission)."""
  check(out != "", field, "names no folder; give one (e.g. runs)")   # '' would mean the current folder
  out = os.path.abspath(out)
  check(not os.path.exists(out) or os.path.isdir(out), field, f"{out} is a file, not a folder")
  nearest = out
  while not os.path.exists(nearest):
    nearest = os.path.dirname(nearest)
  check(os.path.isdir(nearest), field, f"{nearest} is a file, so {out} cannot be a folder")
  try:
    with tempfile.TemporaryFile(dir=nearest):
      pass
  except OSError as err:
    raise ConfigError(f"{field}: cannot write in {nearest} ({err.strerror})") from None


def describe(err: OSError) -> str:
  """One line for an OSError from the filesystem: the path and what went wrong (e.g. disk full)."""
  return f"{err.filename or 'output'}: {err.strerror or err}"
