"""analysis.massive.store: a store traced before its keys were hook names reads as hook names; a damaged
experiment.json of a run is one line naming it."""
import os
import shutil

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


def test_a_damaged_experiment_json_is_one_line_naming_it(tiny_run, tmp_path, capsys):
  from analysis.lab.cli import main
  run = tmp_path / "tiny"
  shutil.copytree(tiny_run, run)
  path = run / "experiment.json"
  for text, why in (("[1", "damaged, not valid JSON ("), ("[]", "damaged, not an experiment"),
                    ('{"arms": {"rope": 3}}', "damaged, not an experiment")):
    path.write_text(text)
    assert main(["trace", str(run), "--out", str(tmp_path / "out"), "--probes", "2", "--batch", "2"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {path}: {why}"), lines
  assert not os.path.exists(tmp_path / "out")
