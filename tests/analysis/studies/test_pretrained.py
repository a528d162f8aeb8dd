"""analysis.studies.pretrained: `python -m analysis pretrained` analyses an imported model as one traced
step."""
from __future__ import annotations

import json

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
