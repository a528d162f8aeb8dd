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


def test_the_profile_finds_every_matmul_of_the_step_once(breakdown):
  """--profile maps the profiler's per-op events onto the compiled step's HLO: the matmuls it finds
  carry exactly the step's FLOPs (the forward and both backward products of every linear and of the
  tied head; six products of attention a layer, the full masked softmax at T below one block)."""
  from train import sharding
  from train.config import OptimConfig
  d, L, H, V, B, T = 16, 2, 2, 32, 2, 16
  cfg = ModelConfig(vocab_size=V, max_len=T, d_model=d, n_layers=L, n_heads=H, **breakdown.GPT_ARCH,
                    position=Learned())
  step_ms, parts, ops = breakdown.jax_op_profile(cfg, OptimConfig(), sharding.make_mesh(1), B, T, steps=2)
  assert parts["linear matmuls"][1] == 6 * B * T * (L * (4 * d * d + 2 * 4 * d * d) + d * V)
  assert parts["attention matmuls"][1] == L * 6 * 2 * B * H * T * T * (d // H)
  assert step_ms > 0 and all(ms >= 0 for ms, _ in parts.values())
  assert sum(ms for ms, *_ in ops) == pytest.approx(sum(ms for ms, _ in parts.values()))


def test_the_peers_ops_in_parts(breakdown):
  ops = {"aten::mm": [2.0, 10.0], "aten::addmm": [1.0, 5.0], "aten::bmm": [0.5, 1.0], "aten::gelu": [4.0, 0.0],
         "aten::_scaled_dot_product_flash_attention_for_cpu": [3.0, 0.0], "aten::copy_": [1.5, 0.0]}
  assert breakdown.torch_op_parts(ops) == {"linear matmuls": [3.5, 16.0], "attention (SDPA)": [3.0, 0.0],
                                          "rest": [5.5, 0.0]}
