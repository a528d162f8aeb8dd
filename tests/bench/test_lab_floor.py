"""bench/lab_floor.py: the FLOPs it counts hold at least the linear products of every step, batch and
condition it claims to count (a floor may leave work out, never count work twice)."""
from __future__ import annotations

import dataclasses
import os

import jax.numpy as jnp
import pytest
from flax import nnx

from helpers import ROOT
from train.config import load_experiment


@pytest.fixture()
def floor(monkeypatch):
  monkeypatch.syspath_prepend(os.path.join(ROOT, "bench"))
  import lab_floor
  return lab_floor


def kernel_params(model) -> int:
  return sum(m.kernel.size for _, m in nnx.iter_modules(model) if isinstance(m, nnx.Linear))


def test_a_matmul_counts_two_flops_per_multiply_add(floor):
  x, w = jnp.ones((64, 48)), jnp.ones((48, 80))
  assert floor.program_flops(lambda a, b: a @ b, x, w) == 2 * 64 * 48 * 80


def test_training_counts_every_step_of_every_arm_forward_and_backward(floor):
  exp = load_experiment({"name": "tiny", "arms": {"rope": {}, "nope": {"model.position": "nope"}},
                         "train": {"steps": 7, "model": {"vocab_size": 512, "d_model": 32, "n_layers": 2,
                                                         "n_heads": 2, "max_len": 32},
                                   "data": {"seq_len": 32, "batch_size": 4, "mixture": {"text": 1.0}}}})
  flops = floor.train_flops(exp)
  assert set(flops) == {"rope", "nope"}
  from minilm.model import Decoder
  cfg = exp.resolve("rope")
  model = nnx.eval_shape(lambda: Decoder(cfg.model, rngs=nnx.Rngs(0)))
  tokens = cfg.steps * cfg.data.batch_size * cfg.data.seq_len
  # forward x W, then dY W^T and X^T dY: 6 FLOPs per weight and token, and the tied head's product
  linears = 6 * (kernel_params(model) + cfg.model.vocab_size * cfg.model.d_model) * tokens
  # the rest of a step is far less: attention's products at most 12 x layers x T x d per token (a tenth
  # of the linears here), norms, activations and AdamW tens of FLOPs per activation or parameter
  for arm in flops:
    assert linears <= flops[arm] < 2 * linears, (arm, flops[arm] / linears)


def test_disruption_counts_every_batch_under_every_condition(floor):
  from analysis.studies.disruption import DisruptStudy, load_sources
  study = DisruptStudy(model="random", n=2, modes="off,massive", draws=1, batch=4, bucket=64)
  flops, conditions, shapes = floor.c5_flops(study)
  [(_, model, _, items, _, _)] = load_sources(study.model, study.suite, study.n, study.seed, study.batch,
                                               bucket=study.bucket)
  assert conditions == 2
  assert sum(B * count for (B, _, _), count in shapes.items()) >= len(items)
  prefill = 2 * kernel_params(model) * sum(B * T * count for (B, T, _), count in shapes.items())
  assert conditions * prefill <= flops
  # every condition runs the same program: one condition counts half of two
  alone, _, _ = floor.c5_flops(dataclasses.replace(study, modes="off"))
  assert flops == 2 * alone
