"""The position encodings' pairings: NoPE is labelled as the half-layout convention."""
import numpy as np

from minilm import encodings, positions


def test_nope_uses_the_labelled_half_layout_convention():
  pairing = encodings.NoPE().pairing(16)
  assert not pairing.is_rope and "convention" in pairing.label
  np.testing.assert_array_equal(pairing.pair_index, positions.rope_pair_index(16, "half"))
