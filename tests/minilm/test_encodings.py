"""The position encodings' pairings: NoPE is labelled as the half-layout convention."""
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from minilm import encodings, positions


def test_nope_uses_the_labelled_half_layout_convention():
  pairing = encodings.NoPE().pairing(16)
  assert not pairing.is_rope and "convention" in pairing.label
  np.testing.assert_array_equal(pairing.pair_index, positions.rope_pair_index(16, "half"))


@pytest.mark.parametrize("layout", ["half", "interleaved"])
@pytest.mark.parametrize("scaling", [{}, {"scaling": "linear", "factor": 8.0},
                                     {"scaling": "llama3", "factor": 8.0, "original_max_len": 64}])
def test_a_pair_turns_by_its_pairing_s_theta_per_token(layout, scaling):
  """The statistics' pairing is the rotation the model applies: rotating a pair's first dim by one
  position turns it, within the pair, by that pair's theta (RoPE scaled or not)."""
  import jax.numpy as jnp
  cfg = encodings.RoPE(base=500.0, layout=layout, **scaling)
  D = 32
  pairing = cfg.pairing(D)
  x = jnp.asarray(np.eye(D, dtype=np.float32))[None, None]   # [1, 1(T), D(H: one dim per head), D]
  turned = np.asarray(cfg.build(None, None).rotate(x, jnp.ones((1, 1), jnp.int32)))[0, 0]
  for j in range(pairing.n_pairs):
    a, b = np.flatnonzero(pairing.pair_index == j)
    angle = abs(np.arctan2(turned[a, b], turned[a, a]))
    # float32 cos/sin of theta (relative error ~1e-7; the vectorised sin/cos differ by CPU) read back
    # by atan2: 1e-5 leaves them two orders of magnitude, while a wrong scaling is off by x8 or more
    assert angle == pytest.approx(pairing.theta[j], rel=1e-5, abs=1e-6), (j, angle, pairing.theta[j])
  if scaling:
    assert pairing.theta[-1] < encodings.RoPE(base=500.0, layout=layout).pairing(D).theta[-1]


MODEL = types.SimpleNamespace(max_len=6, d_model=4, n_heads=6, init_std=0.02)   # what build reads


@pytest.mark.parametrize("offset", [0, 2])
def test_learned_position_t_reads_row_t_plus_offset_and_trains_it(offset):
  """OPT's layout: position t is row t + offset of max_len + offset rows; the gradient of a position
  embedding lands on exactly the rows read (repeated positions add up), none elsewhere."""
  module = encodings.Learned(offset=offset).build(MODEL, nnx.Rngs(0))
  table = np.asarray(module.table[...])
  assert table.shape == (6 + offset, 4)
  pos = jnp.asarray([[5, 1, 3, 3]])
  np.testing.assert_array_equal(module.embed(pos)[0], table[[5 + offset, 1 + offset, 3 + offset, 3 + offset]])   # exact: a gather
  w = jax.random.normal(jax.random.key(0), (1, 4, 4))
  graphdef, state = nnx.split(module)
  grad = jax.grad(lambda s: (nnx.merge(graphdef, s).embed(pos) * w).sum())(state)["table"][...]
  expected = np.zeros_like(table)
  expected[5 + offset], expected[1 + offset] = w[0, 0], w[0, 1]
  expected[3 + offset] = np.float32(w[0, 2]) + np.float32(w[0, 3])
  np.testing.assert_array_equal(grad, expected)   # exact: one float32 sum of two terms, either order


def test_sinusoidal_module_reads_the_table_row_of_each_position():
  module = encodings.Sinusoidal().build(MODEL, None)
  pos = jnp.asarray([[0, 5, 2], [1, 1, 4]])
  np.testing.assert_array_equal(module.embed(pos), positions.sinusoidal_table(6, 4)[np.asarray(pos)])   # exact: a gather


@pytest.mark.parametrize("n_heads", [6, 8])
def test_alibi_module_gives_head_h_the_h_th_slope(n_heads):
  """Head h's bias is -slope_h * (q - k) with alibi_slopes' order (BLOOM's and HF's: head 0 steepest
  for powers of two; the interleaved extra slopes after them otherwise)."""
  module = encodings.ALiBi().build(types.SimpleNamespace(n_heads=n_heads), None)
  pos = jnp.arange(5)[None]
  bias = np.asarray(module.bias(pos, pos))[0]   # [H, T, S]
  dist = np.arange(5)[:, None] - np.arange(5)[None, :]
  for h, slope in enumerate(positions.alibi_slopes(n_heads)):
    # float32 slope (rounded once, eps/2) times a small integer distance (rounded once): 2 eps relative
    np.testing.assert_allclose(bias[h], -slope * dist, rtol=2 * float(np.finfo(np.float32).eps), err_msg=str(h))
  assert np.asarray(module.bias(pos, pos))[0, 0, 4, 0] == -4 * 2 ** (-8 / (8 if n_heads == 8 else 4))
