"""The on-disk cache of derived data ($MINILM_CACHE, default ~/.cache/minilm): dequantized GGUF
tensors (minilm.importers.gguf), encoded text streams (train.text) and XLA's compiled programs
(`keep_compiled`).

Entries are keyed by the contents of the files they come from, never by their paths or times: a
package's files sit at another path, with another modification time, in every virtual environment
it is installed into, and a key of paths would store the same 545 MB of SmolLM2 tensors once per
checkout. Each entry is written whole under a temporary name and renamed into place. Compiled
programs are jax's entries, under jax's key of each program, in a folder per machine.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
import sys

import jax
import jaxlib

from minilm import machine

CHUNK = 1 << 22
COMPILED = {
    "jax_compilation_cache_max_size": 2 << 30,        # bytes; jax evicts the least recently used beyond it
    "jax_persistent_cache_min_compile_time_secs": 0,   # every program: loading beats compiling a small one too
}
"""`keep_compiled`'s settings of jax's persistent cache, where the environment sets none (the
default lab keeps 265 programs in 7.7 MB)."""


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


def keep_compiled() -> str | None:
  """Keep XLA's compiled programs in $MINILM_CACHE/xla/<machine> (jax's persistent compilation
  cache), so that a later command, or a worker beside this one, loads a program an earlier one
  compiled instead of compiling it again. Returns the folder, or None where none is kept.

  jax's own settings come first, each of them: JAX_COMPILATION_CACHE_DIR names another folder,
  JAX_ENABLE_COMPILATION_CACHE=false keeps none, and the environment's settings of COMPILED's
  fields replace those. The folder is named by the jax and jaxlib versions
  and the CPU's model and flags: a program compiled for AVX-512 or AMX must never load on a CPU
  without them, wherever a home folder is shared between machines. The settings also go into the
  environment, so the processes this one starts keep the same folder. jax writes and reads the
  programs under a file lock, and a damaged entry is compiled again (with a warning), never run.
  """
  if not jax.config.jax_enable_compilation_cache:
    return None
  folder = jax.config.jax_compilation_cache_dir
  if not folder:
    folder = compiled_folder()
    try:
      os.makedirs(folder, exist_ok=True)
    except OSError as err:   # the cache is a saving, never a reason to stop
      print(f"note: compiled programs not kept ({err.strerror or err}): {folder}", file=sys.stderr)
      return None
  for name, value in {"jax_compilation_cache_dir": folder, **COMPILED}.items():
    if name.upper() not in os.environ:
      jax.config.update(name, value)
      os.environ[name.upper()] = str(value)
  return folder


def compiled_folder() -> str:
  """$MINILM_CACHE/xla/<16 hex digits of the jax and jaxlib versions, the architecture, the CPU's
  model and its flags>: `keep_compiled`'s folder on this machine."""
  model, flags = machine.cpu_info()
  return os.path.join(root(), "xla", key(jax.__version__, jaxlib.__version__, platform.machine(), model, sorted(flags)))
