"""bench/torch_matmul.py: PyTorch's products inside jit compute the products XLA does. Runs where a C++
compiler and torch (the bench extra) are present; the tests' own install has no torch, so there the
module is skipped with that reason."""
from __future__ import annotations

import importlib.util
import os
import shutil
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers import ROOT
from minilm import layers, model as model_module
from minilm.config import ModelConfig
from minilm.model import Decoder

if shutil.which(os.environ.get("CXX", "g++")) is None or importlib.util.find_spec("torch") is None:
  pytest.skip("needs a C++ compiler and torch (pip install -e '.[bench]')", allow_module_level=True)

# Both sides sum K float32 products in different orders: each error is at most about K * 2^-24
# relative to the sum of |products|; K <= 96 here, so 1e-5 of the largest |C| bounds it with room.
RTOL = 1e-5
# float32 sums that differ in the last bits may round to neighbouring bfloat16 values: one ulp is 2^-8
# of the value, 2^-7 of the largest |C| with room
BF16_RTOL = 2 ** -7


@pytest.fixture(scope="module")
def torch_mm():
  sys.path.insert(0, os.path.join(ROOT, "bench"))
  try:
    import torch_matmul
  finally:
    sys.path.pop(0)
  torch_matmul.register()
  return torch_matmul


def _close(a, b, rtol=RTOL):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  assert a.shape == b.shape
  assert np.abs(a - b).max() <= rtol * np.abs(b).max()


@pytest.mark.parametrize("ta,tb", [(False, False), (True, False), (False, True), (True, True)])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_gemm_is_the_product_with_either_operand_transposed(torch_mm, ta, tb, dtype):
  a = jax.random.normal(jax.random.key(0), (48, 96) if not ta else (96, 48)).astype(dtype)
  b = jax.random.normal(jax.random.key(1), (96, 40) if not tb else (40, 96)).astype(dtype)
  want = jnp.matmul(a.T if ta else a, b.T if tb else b, preferred_element_type=jnp.float32)
  got = jax.jit(lambda a, b: torch_mm.gemm(a, b, ta, tb))(a, b)
  assert got.dtype == dtype
  _close(got, want, RTOL if dtype == jnp.float32 else BF16_RTOL)


def test_the_linear_products_gradients_are_jnp_matmuls(torch_mm):
  x = jax.random.normal(jax.random.key(2), (4, 12, 32))
  w = jax.random.normal(jax.random.key(3), (32, 24))
  loss = lambda f: lambda x, w: (jnp.sin(f(x, w)) ** 2).sum()
  got = jax.jit(jax.grad(loss(torch_mm.linear_product), argnums=(0, 1)))(x, w)
  want = jax.grad(loss(jnp.matmul), argnums=(0, 1))(x, w)
  for g, h in zip(got, want):
    _close(g, h)


def test_swapped_in_a_models_logits_stay_within_float_tolerance(torch_mm, monkeypatch):
  cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, max_len=16)
  model = Decoder(cfg, rngs=nnx.Rngs(0))
  tokens = jax.random.randint(jax.random.key(4), (2, 16), 0, 64)
  want = model(tokens)
  monkeypatch.setattr(layers, "matmul_for", layers.matmul_for)   # restored after the test
  monkeypatch.setattr(model_module, "matmul_for", model_module.matmul_for)
  torch_mm.swap_in()
  # traced anew (matmul_for is looked up at every call): every linear and the tied head on PyTorch
  assert str(jax.make_jaxpr(lambda t: model(t))(tokens)).count("torch_mm_f32") == 7 * cfg.n_layers + 1
  _close(model(tokens), want)


def test_bfloat16_linear_products_are_float32_sums_rounded_once(torch_mm):
  x = jax.random.normal(jax.random.key(5), (4, 12, 32)).astype(jnp.bfloat16)
  w = jax.random.normal(jax.random.key(6), (32, 24)).astype(jnp.bfloat16)
  got = jax.jit(torch_mm.linear_product)(x, w)
  want = jnp.matmul(x, w, preferred_element_type=jnp.float32)
  assert got.dtype == jnp.bfloat16
  _close(np.asarray(got, np.float32), want, BF16_RTOL)
  dx, dw = jax.jit(jax.grad(lambda x, w: torch_mm.linear_product(x, w).astype(jnp.float32).sum(), (0, 1)))(x, w)
  assert dx.dtype == dw.dtype == jnp.bfloat16 and dx.shape == x.shape and dw.shape == w.shape
  # d sum / dw = x^T 1: float32 sums of x's bfloat16 values, rounded once to bfloat16
  want_dw = np.asarray(x, np.float32).reshape(-1, 32).sum(0)[:, None] * np.ones((1, 24))
  _close(np.asarray(dw, np.float32), want_dw, BF16_RTOL)


def test_only_the_named_dtypes_are_swapped_in(torch_mm, monkeypatch):
  monkeypatch.setattr(layers, "matmul_for", layers.matmul_for)
  monkeypatch.setattr(model_module, "matmul_for", model_module.matmul_for)
  torch_mm.swap_in(("bfloat16",))
  tokens = jnp.zeros((2, 16), jnp.int32)
  for dtype, want in (("float32", 0), ("bfloat16", 7 * 2 + 1)):
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, max_len=16, dtype=dtype)
    model = Decoder(cfg, rngs=nnx.Rngs(0))
    jaxpr = str(jax.make_jaxpr(lambda t: model(t))(tokens))
    assert (jaxpr.count("torch_mm_bf16"), jaxpr.count("torch_mm_f32")) == (want, 0), dtype
