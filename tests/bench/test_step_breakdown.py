"""bench/step_breakdown.py: its parts are the model's own linears and layers (the PyTorch side needs
the bench extra, which the tests do not install)."""
from __future__ import annotations

import os
from collections import Counter

import pytest
from flax import nnx

from helpers import ROOT
from minilm.config import ModelConfig
from minilm.encodings import Learned
from minilm.model import Decoder


@pytest.fixture()
def breakdown(monkeypatch):
  monkeypatch.syspath_prepend(os.path.join(ROOT, "bench"))
  import step_breakdown
  return step_breakdown


@pytest.mark.parametrize("size", ["1m", "5m", "25m"])
def test_the_timed_linears_are_the_models(breakdown, size):
  cfg = ModelConfig(vocab_size=512, max_len=256, **breakdown.SIZES[size], **breakdown.GPT_ARCH, position=Learned())
  model = nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0)))   # shapes only
  kernels = Counter(tuple(m.kernel.shape) for _, m in nnx.iter_modules(model) if isinstance(m, nnx.Linear))
  kernels[(cfg.d_model, cfg.vocab_size)] += 1   # the tied head: the embedding, transposed
  timed = Counter((c_in, c_out) for c_in, c_out, _ in
                  breakdown.linears(cfg.d_model, fused_qkv=False) * cfg.n_layers + [(cfg.d_model, cfg.vocab_size, True)])
  assert timed == kernels
  # and each is timed on the backward path the model gives it
  paths = Counter(m.dot_general.keywords["transpose_x"] for _, m in nnx.iter_modules(model.blocks[0])
                  if isinstance(m, nnx.Linear))
  assert paths == Counter(transpose_x for _, _, transpose_x in breakdown.linears(cfg.d_model, fused_qkv=False))


def test_minilm_parts_at_tiny_shapes(breakdown):
  attention, fwd, bwd = breakdown.jax_parts(B=2, T=16, d=16, L=2, H=2, vocab=32, reps=2)
  assert attention > 0 and fwd > 0 and bwd > 0
