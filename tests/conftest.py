"""Fixtures shared by test modules."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
  """A two-arm (RoPE, NoPE) run with checkpoints at steps 0 and 1, trained through train's API."""
  from train.config import load_experiment
  from train.paired import run_experiment
  out = tmp_path_factory.mktemp("runs")
  exp = load_experiment({
      "name": "tiny",
      "train": {"seed": 0, "steps": 1, "log_every": 1,
                "model": {"d_model": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "max_len": 48},
                "data": {"seq_len": 48, "batch_size": 2, "mixture": {"kb_facts": 1.0, "text": 1.0},
                         "facts_per_context": 2, "questions_per_context": 1},
                "checkpoint": {"every": 1}, "eval": {"n_per_family": 0}},
      "arms": {"rope": {}, "nope": {"model.position": "nope"}}})
  run_experiment(exp, str(out), progress=False)
  return out / "tiny"
