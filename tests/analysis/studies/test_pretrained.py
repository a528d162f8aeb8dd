"""analysis.studies.pretrained: `python -m analysis pretrained` analyses an imported model as one traced
step; bad settings, and an --out that holds other files, are one line before anything is written."""
from __future__ import annotations

import json
import os
import shutil

import pytest


@pytest.mark.slow
def test_pretrained_command_analyses_an_imported_model_as_one_traced_step(tmp_path, capsys):
  from analysis.lab.cli import main
  out = tmp_path / "pre"
  assert main(["pretrained", "--model", "random", "--out", str(out), "--probes", "3", "--length", "24",
               "--no-plots", "--lam", "3"]) == 0
  facts = json.loads((out / "pretrained.json").read_text())
  assert facts["name"] == "random-tiny" and facts["params"] > 0 and facts["probes"] == {
      "n": 3, "length": 24, "text": "Shakespeare held-out windows"}
  assert json.loads((out / "meta.json").read_text())["stats"]["lam"] == 3.0
  claims = {c["claim"]: c for c in json.loads((out / "claims.json").read_text())["claims"]}
  assert claims["C3"]["verdict"] == "inconclusive" and claims["C3-lowfreq"]["reference"].startswith("null")
  assert "| C1 Concentration |" in capsys.readouterr().out
  assert main(["pretrained", "--model", "random", "--out", str(tmp_path / "x"), "--length", "100000"]) == 2
  assert capsys.readouterr().err.startswith("error: length: must be <= the model's max_len=2048")


def test_bad_settings_are_one_line_before_writing(tmp_path, capsys, monkeypatch):
  """Before the model loads, too: those bounded by the model are checked against its config alone."""
  from analysis.lab.cli import main
  from analysis.studies import sources

  def no_load(*args):
    raise AssertionError("the model was loaded before its settings were checked")
  monkeypatch.setattr(sources, "load", no_load)
  out = tmp_path / "pre"
  for flags, first in ((["--context", "inf"], "error: context: must be a finite number >= 0"),
                       (["--lam", "inf"], "error: lam: must be a finite number > 0; got inf"),
                       (["--length", "2049"], "error: length: must be <= the model's max_len=2048; got 2049"),
                       (["--top-k", "9"], "error: top_k: must be <= the head dim of random-tiny (8); got 9"),
                       (["--agree-k", "9"], "error: agree_k: must be <= the head dim of random-tiny (8); got 9")):
    assert main(["pretrained", "--model", "random", "--out", str(out), *flags]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(first), lines
  assert not out.exists()


def test_an_out_folder_of_other_files_is_refused_not_replaced(tiny_run, tmp_path, capsys):
  from analysis.lab.cli import main
  arm = tmp_path / "rope"   # an arm of a training run: its checkpoints must not be replaced
  shutil.copytree(tiny_run / "rope", arm)
  before = sorted(os.listdir(arm))
  assert main(["pretrained", "--model", "random", "--out", str(arm)]) == 2
  lines = capsys.readouterr().err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith(f"error: {arm}: holds files this command did not write ("), lines
  assert sorted(os.listdir(arm)) == before
