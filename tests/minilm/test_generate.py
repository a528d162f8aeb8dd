"""Greedy decoding with the KV cache equals the argmax loop over full forwards."""
import jax.numpy as jnp
import numpy as np

from helpers import small_decoder as make
from helpers import small_tokens as tokens
from minilm.generate import greedy


def test_greedy_matches_argmax_loop():
  model = make("alibi")
  prompt = tokens(2, 6)
  out = np.asarray(greedy(model, prompt, 4))
  seq = np.asarray(prompt)
  for _ in range(4):
    seq = np.concatenate([seq, np.asarray(model(jnp.asarray(seq)))[:, -1].argmax(-1)[:, None]], 1)
  np.testing.assert_array_equal(out, seq[:, 6:])
