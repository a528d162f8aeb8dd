"""bench/onednn_matmul.py: oneDNN's matmul inside jit computes the products XLA does. Runs where a C++
compiler and oneDNN with its headers (pip install onednn-devel-cpu-gomp==2023.2.0) are present; the
tests' own install has no oneDNN, so there the module is skipped with that reason."""
from __future__ import annotations

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

NEEDS = (os.path.join(sys.prefix, "lib", "libdnnl.so.3"),
         os.path.join(sys.prefix, "include", "oneapi", "dnnl", "dnnl.hpp"))
if shutil.which(os.environ.get("CXX", "g++")) is None or not all(map(os.path.exists, NEEDS)):
  pytest.skip("needs a C++ compiler and oneDNN with its headers (pip install onednn-devel-cpu-gomp==2023.2.0)",
              allow_module_level=True)

# Both sides sum K float32 products in different orders: each error is at most about K * 2^-24
# relative to the sum of |products|; K <= 96 here, so 1e-5 of the largest |C| bounds it with room.
RTOL = 1e-5


@pytest.fixture(scope="module")
def onednn():
  sys.path.insert(0, os.path.join(ROOT, "bench"))
  try:
    import onednn_matmul
  finally:
    sys.path.pop(0)
  onednn_matmul.register()
  return onednn_matmul


def _close(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  assert a.shape == b.shape
  assert np.abs(a - b).max() <= RTOL * np.abs(b).max()


@pytest.mark.parametrize("ta,tb", [(False, False), (True, False), (False, True), (True, True)])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_gemm_is_the_product_with_either_operand_transposed(onednn, ta, tb, dtype):
  a = jax.random.normal(jax.random.key(0), (48, 96) if not ta else (96, 48)).astype(dtype)
  b = jax.random.normal(jax.random.key(1), (96, 40) if not tb else (40, 96)).astype(dtype)
  want = jnp.matmul(a.T if ta else a, b.T if tb else b, preferred_element_type=jnp.float32)
  got = jax.jit(lambda a, b: onednn.gemm(a, b, ta, tb))(a, b)
  assert got.dtype == jnp.float32
  _close(got, want)


def test_the_linear_products_gradients_are_jnp_matmuls(onednn):
  x = jax.random.normal(jax.random.key(2), (4, 12, 32))
  w = jax.random.normal(jax.random.key(3), (32, 24))
  loss = lambda f: lambda x, w: (jnp.sin(f(x, w)) ** 2).sum()
  got = jax.jit(jax.grad(loss(onednn.linear_product), argnums=(0, 1)))(x, w)
  want = jax.grad(loss(jnp.matmul), argnums=(0, 1))(x, w)
  for g, h in zip(got, want):
    _close(g, h)


def test_swapped_in_a_models_logits_stay_within_float_tolerance(onednn, monkeypatch):
  cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, max_len=16)
  model = Decoder(cfg, rngs=nnx.Rngs(0))
  tokens = jax.random.randint(jax.random.key(4), (2, 16), 0, 64)
  want = model(tokens)
  monkeypatch.setattr(layers, "matmul_for", layers.matmul_for)   # restored after the test
  monkeypatch.setattr(model_module, "matmul_for", model_module.matmul_for)
  onednn.swap_in()
  # traced anew (matmul_for is looked up at every call): every linear and the tied head on oneDNN
  assert str(jax.make_jaxpr(lambda t: model(t))(tokens)).count("onednn_sgemm") == 7 * cfg.n_layers + 1
  _close(model(tokens), want)


def test_bfloat16_linear_products_are_float32_sums_rounded_once(onednn):
  x = jax.random.normal(jax.random.key(5), (4, 12, 32)).astype(jnp.bfloat16)
  w = jax.random.normal(jax.random.key(6), (32, 24)).astype(jnp.bfloat16)
  got = jax.jit(onednn.linear_product)(x, w)
  want = jnp.matmul(x, w, preferred_element_type=jnp.float32)
  assert got.dtype == jnp.bfloat16
  # float32 sums that differ in the last bits may round to neighbouring bfloat16 values: one ulp, 2^-8
  assert np.abs(np.asarray(got, np.float32) - np.asarray(want)).max() <= 2 ** -7 * np.abs(np.asarray(want)).max()
  dx, dw = jax.jit(jax.grad(lambda x, w: onednn.linear_product(x, w).astype(jnp.float32).sum(), (0, 1)))(x, w)
  assert dx.dtype == dw.dtype == jnp.bfloat16 and dx.shape == x.shape and dw.shape == w.shape
  # d sum / dw = x^T 1: float32 sums of x's bfloat16 values, rounded once to bfloat16
  want_dw = np.asarray(x, np.float32).reshape(-1, 32).sum(0)[:, None] * np.ones((1, 24))
  assert np.abs(np.asarray(dw, np.float32) - want_dw).max() <= 2 ** -7 * np.abs(want_dw).max()
