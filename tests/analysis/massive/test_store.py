"""analysis.massive.store: a store traced before its keys were hook names reads as hook names."""
import os

import numpy as np

from analysis.massive import store as ST
from minilm import hooks


def test_a_store_traced_before_keys_were_hook_names_reads_as_hook_names(tmp_path):
  store = ST.Store(str(tmp_path))
  old = {f"{l}.{t}": np.full((2, 1, 4), l + 1.0, np.float32) for l in range(2) for t in hooks.QKV}
  os.makedirs(os.path.dirname(store.sums_path("a", 0)))
  np.savez(store.sums_path("a", 0), **old)
  sums = store.load_sums("a", 0)
  assert set(sums) == {hooks.name(l, t) for l in range(2) for t in hooks.QKV}
  assert sums["blocks.1.attn.rot_k"][0, 0, 0] == 2.0
  assert ST.layer_tensor_keys(sums)[:2] == [(0, "q"), (0, "k")]
  os.makedirs(os.path.dirname(store.sinks_path("a", 0)))
  np.savez(store.sinks_path("a", 0), none=np.zeros(1))
  assert store.good_steps("a", set(sums)) == [0]   # not set aside as damaged and traced again
