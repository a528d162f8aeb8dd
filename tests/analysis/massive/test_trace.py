"""analysis.massive.trace: the jitted capture equals an eager one, and rows have the promised shape."""
import numpy as np
import pytest
from flax import nnx

from analysis.massive import stats as S
from analysis.massive import trace as T
from minilm import capture, encodings, hooks
from minilm.config import ModelConfig
from minilm.model import Decoder

EPS32 = float(np.finfo(np.float32).eps)


def _decoder(position, seed=0, n_layers=2):
  cfg = ModelConfig(vocab_size=300, d_model=32, n_layers=n_layers, n_heads=4, n_kv_heads=2, max_len=64,
                    position=position)
  return Decoder(cfg, rngs=nnx.Rngs(seed))


def test_jitted_sums_equal_eager_capture_with_padding_and_a_ragged_last_batch():
  model = _decoder(encodings.RoPE(layout="interleaved", base=500.0))
  probes = np.random.default_rng(0).integers(0, 300, (7, 24))
  mask = np.ones(probes.shape, np.float32)
  mask[2, 20:] = 0
  sums = T.capture_sums(model, probes, mask, drop_first=True, batch_size=3)
  _, cache = capture.run(model, probes, points=hooks.QKV)
  assert set(sums) == {hooks.name(l, t) for l in range(2) for t in hooks.QKV}
  for key, got in sums.items():
    tensor = hooks.split(key)[1]
    x = np.asarray(cache[key], np.float64)   # the store's keys are the cache's hook names
    want = np.einsum("bthd,bt->bhd", x ** 2, mask * (np.arange(24) > 0))
    assert got.shape == (7, 4 if "q" in tensor else 2, 8)
    # The jitted forward (other batches, fused) and the eager one round differently: q of layer 1 ends
    # ~400 summed terms of random sign (4*sqrt(400)*eps = 80 eps of the tensor's scale), doubled by
    # squaring, plus a float32 sum of <= 23 squares (12 eps): 175 eps of the largest sum.
    np.testing.assert_allclose(got, want, rtol=0, atol=175 * EPS32 * np.abs(want).max())


@pytest.mark.parametrize("position", [encodings.NoPE(), encodings.ALiBi(), encodings.Learned()])
def test_trace_model_rows_cover_every_layer_tensor_and_head(position):
  model = _decoder(position)
  probes = np.random.default_rng(1).integers(0, 300, (5, 16))
  rows = T.trace_model(model, probes, arm="x", step=7, batch_size=4)
  assert len(rows) == 2 * (2 * 4 + 3 * 2)                        # q, rot_q: 4 heads; k, v, rot_k: 2
  assert {r["step"] for r in rows} == {7} and {r["pairing"] for r in rows} == {
      f"convention half base=10000 ({position.kind})"}
  by = {(r["layer"], r["tensor"], r["head"]): r for r in rows}
  for (layer, tensor, head), r in by.items():                    # no RoPE: rotation is the identity
    if tensor == "rot_q":
      # the same values, summed at worst in another order: n squares of one sign, n*eps/2 per sum, and
      # max/mean is a ratio of such sums
      assert r["max_mean"] == pytest.approx(by[layer, "q", head]["max_mean"], rel=2 * probes.size * EPS32)
  assert all(set(T.ROW_KEYS + S.PER_HEAD + T.NULL_KEYS) <= set(r) for r in rows)
