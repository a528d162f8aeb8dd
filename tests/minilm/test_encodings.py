"""The position encodings' pairings: NoPE is labelled as the half-layout convention."""
import numpy as np
import pytest

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
