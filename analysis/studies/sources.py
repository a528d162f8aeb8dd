"""Where the studies get models and natural text: imported models, a tiny random decoder, and
Shakespeare windows in a model's own tokenizer."""
from __future__ import annotations

import numpy as np
from flax import nnx

from minilm import importers
from minilm.config import ModelConfig
from minilm.model import Decoder
from minilm.schema import check
from train.text import shakespeare_files
from train.tokenizer import ByteTokenizer


TINY = ModelConfig(vocab_size=ByteTokenizer().vocab_size, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                  max_len=2048)
"""`tiny_random`'s config."""


def tiny_random(seed: int = 0) -> tuple[Decoder, ByteTokenizer]:
  """An untrained RoPE decoder on the byte tokenizer, long enough for every built-in task: plumbing
  checks only."""
  return Decoder(TINY, rngs=nnx.Rngs(seed)), ByteTokenizer()


def model_config(spec: str, layout: str = "half") -> ModelConfig:
  """The config `load(spec, layout)` gives its model, read without the weights."""
  return TINY if spec == "random" else importers.model_config(spec, layout=layout)


def load(spec: str, layout: str = "half"):
  """(Decoder, tokenizer, info) for 'smollm2', a .gguf file, an HF directory, or 'random' (`tiny_random`)."""
  if spec == "random":
    model, tok = tiny_random()
    return model, tok, {"name": "random-tiny", "source": "random", "format": "none"}
  return importers.load(spec, layout=layout)


def text_windows(tokenizer, n: int, length: int, heldout: bool, field: str = "text") -> np.ndarray:
  """[n, length] token windows of Shakespeare, calibration (first play) or held-out (last play's tail);
  `field`: the setting that asked for them, as an error names it."""
  files = shakespeare_files()
  text = open(files[-1] if heldout else files[0], encoding="utf-8", errors="ignore").read()
  ids = np.asarray(tokenizer.encode(text), np.int32)
  check(len(ids) >= n * length, field, f"{n} windows of {length} tokens need {n * length} tokens; "
        f"the {'held-out' if heldout else 'calibration'} text has {len(ids)}")
  ids = ids[len(ids) - n * length:] if heldout else ids[:n * length]
  return ids.reshape(n, length)
