"""analysis.massive.store: a store traced before its keys were hook names reads as hook names; a damaged
experiment.json of a run is one line naming it; steps read in numeric order, and sums missing a key or
not finite are set aside to be traced again."""
import os
import shutil

import numpy as np
import pytest

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


def _save(path, **arrays):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  np.savez(path, **arrays)


def test_steps_are_in_numeric_order(tmp_path):
  """An arm's steps read in numeric order (10 after 9), whatever the order the files are listed in;
  files set aside as damaged are not steps."""
  store = ST.Store(str(tmp_path))
  for step in (10, 2, 100, 9):
    _save(store.sums_path("a", step), x=np.zeros(1))
  _save(store.sums_path("a", 3), x=np.zeros(1))
  os.replace(store.sums_path("a", 3), store.sums_path("a", 3) + ".damaged")
  assert store.steps("a") == [2, 9, 10, 100] and store.steps("b") == []


def test_good_steps_redo_sums_missing_a_key_or_not_finite(tmp_path):
  """A sums file lacking a key asked for, or holding a NaN, is set aside as damaged (its step is traced
  again); a whole sums file whose sinks file is missing is redone in place, not set aside."""
  store = ST.Store(str(tmp_path))
  keys = {hooks.name(0, t) for t in hooks.QKV}
  whole = {k: np.ones((2, 1, 4), np.float32) for k in keys}
  nan = dict(whole)
  nan[hooks.name(0, "v")] = np.array(whole[hooks.name(0, "v")])
  nan[hooks.name(0, "v")][1, 0, 2] = np.nan
  files = {0: whole, 1: {k: v for k, v in whole.items() if k != hooks.name(0, "rot_k")}, 2: nan, 3: whole}
  for step, sums in files.items():
    _save(store.sums_path("a", step), **sums)
    if step != 3:
      _save(store.sinks_path("a", step), none=np.zeros(1))
  assert store.good_steps("a", keys) == [0]
  assert [os.path.exists(store.sums_path("a", s) + ".damaged") for s in range(4)] == [False, True, True, False]
  assert store.steps("a") == [0, 3]


def test_a_store_refuses_other_probes_with_the_same_checksum(tmp_path):
  """meta.json's probe checksum is a sum, so probes in another order (or padding moved between
  prompts) share it; reopening compares the stored probes and mask themselves."""
  from analysis.massive import stats as S
  from minilm.schema import ConfigError
  probes, mask = np.array([[1, 2, 3], [4, 5, 6]]), np.array([[1, 1, 1], [1, 1, 0]])
  ST.open_store(str(tmp_path), probes, mask, False, S.StatConfig())
  ST.open_store(str(tmp_path), probes.copy(), mask.astype(np.float64), False, S.StatConfig())   # the same: reopens
  for other, other_mask in ((probes[:, ::-1], mask), (probes[::-1], mask), (probes, mask[::-1])):
    with pytest.raises(ConfigError, match="holds a trace with other probes"):
      ST.open_store(str(tmp_path), other, other_mask, False, S.StatConfig())
  np.testing.assert_array_equal(np.load(tmp_path / "probes.npy"), probes)   # nothing overwritten


@pytest.mark.parametrize("damage", [b"", b"\x93NUMPY garbage", b"PK\x03\x04x"])
def test_damaged_probes_and_tokens_are_one_line_naming_the_file(tmp_path, damage):
  """Every table of a trace is of its probes, so damaged probes are not redone but named, with what to
  do; a damaged token view (read by the figures) likewise."""
  from minilm.schema import ConfigError
  store = ST.Store(str(tmp_path))
  os.makedirs(store.path("tokens"))
  for path in (store.path("probes.npy"), store.path("mask.npy"), store.tokens_path("a")):
    with open(path, "wb") as f:
      f.write(damage)
  for read, path, advice in ((store.probes, store.path("probes.npy"), "the trace's probes are lost: trace into a new folder"),
                             (store.mask, store.path("mask.npy"), "the trace's probes are lost: trace into a new folder"),
                             (lambda: store.load_tokens("a"), store.tokens_path("a"), ST.REDO)):
    with pytest.raises(ConfigError) as err:
      read()
    assert str(err.value).startswith(f"{path}: cannot be read (") and str(err.value).endswith(advice)
    assert "\n" not in str(err.value)
