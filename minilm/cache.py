"""The on-disk cache of derived data ($MINILM_CACHE, default ~/.cache/minilm): dequantized GGUF
tensors (minilm.importers.gguf) and encoded text streams (train.text).

Entries are keyed by the contents of the files they come from, never by their paths or times: a
package's files sit at another path, with another modification time, in every virtual environment
it is installed into, and a key of paths would store the same 545 MB of SmolLM2 tensors once per
checkout. Each entry is written whole under a temporary name and renamed into place.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os

CHUNK = 1 << 22


def root() -> str:
  return os.environ.get("MINILM_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "minilm"))


def key(*parts) -> str:
  """16 hex digits naming an entry: the sha256 of `parts` (a version, the sources' digests, any
  setting the entry depends on) as JSON."""
  return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]


def digest(path: str) -> str:
  """sha256 of a file's bytes, or of a folder's regular files, symbolic links followed (their paths
  relative to it, and their digests, in sorted order). Computed once per process for each version
  of a file (its path, size and modification time); about 0.15 s per 100 MB."""
  path = os.path.abspath(path)
  if os.path.isdir(path):
    files = sorted(os.path.relpath(os.path.join(folder, name), path)
                   for folder, _, names in os.walk(path, followlinks=True) for name in names
                   if os.path.isfile(os.path.join(folder, name)))   # no pipes, sockets or dangling links
    h = hashlib.sha256()
    for rel in files:
      h.update(f"{rel}\0{digest(os.path.join(path, rel))}\0".encode())
    return h.hexdigest()
  stat = os.stat(path)
  return _file_digest(path, stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=None)   # a digest per file version: small
def _file_digest(path: str, size: int, mtime_ns: int) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    while chunk := f.read(CHUNK):
      h.update(chunk)
  return h.hexdigest()
