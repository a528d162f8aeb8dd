"""Fixtures shared by test modules: a tiny trained run and a small synthetic lab report."""
from __future__ import annotations

import json
import shutil

import matplotlib
import numpy as np
import pytest
from flax import nnx

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)

from analysis.lab import report as R  # noqa: E402
from analysis.massive import claims as CL  # noqa: E402
from analysis.massive import pipeline as PL  # noqa: E402
from minilm.config import ModelConfig  # noqa: E402
from minilm.model import Decoder  # noqa: E402
from train.config import load_experiment  # noqa: E402
from train.paired import run_experiment  # noqa: E402


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
  """A two-arm (RoPE, NoPE) run with checkpoints at steps 0 and 1, trained through train's API."""
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


@pytest.fixture(scope="session")
def report_dir(tmp_path_factory):
  """A small report from synthetic inputs: a traced tiny model (real table, plots, claims) as the
  run and as the pretrained model, a C5 table/plot/verdict, no quantization (not run)."""
  root = tmp_path_factory.mktemp("report")
  model = Decoder(ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, max_len=32), rngs=nnx.Rngs(0))
  probes = np.random.default_rng(0).integers(0, 64, (4, 32))
  PL.analyze_model(model, probes, str(root / "trace"), arm="rope", step=0)
  shutil.copytree(root / "trace", root / "pretrained")
  (root / "pretrained" / "pretrained.json").write_text(json.dumps(
      {"name": "tiny-pretrained", "params": 12345, "source": "synthetic", "format": "none", "layout": "half",
       "probes": {"n": 4, "length": 32, "text": "random tokens"}, "context": 32}))
  disrupt = root / "disrupt"
  disrupt.mkdir()
  (disrupt / "table.md").write_text("| tiny: task (n) | original | massive disrupted |\n|---|---|---|\n"
                                    "| passkey (4) | 100 [51, 100] | 25 [5, 70] |\n\nC5 [tiny]: inconclusive (synthetic)\n")
  fig, ax = plt.subplots(figsize=(3, 2))
  ax.bar([0, 1], [1.0, 0.25])
  fig.savefig(disrupt / "c5.png")
  plt.close(fig)
  (disrupt / "summary.json").write_text(json.dumps({"suite": "quick", "n": 4, "disrupt": {"rope": "post"}}))
  CL.write_claims([CL.Verdict("C5", "Function", "contextual drop", "inconclusive", "synthetic rule", value=0.75,
                              value_ci=[0.3, 1.0], notes="tiny: synthetic")], str(disrupt))
  (root / "lab.json").write_text(json.dumps({
      "name": "synthetic", "command": "minilm-lab --synthetic", "experiment": {"name": "synthetic", "arms": {"rope": {}}},
      "stages": {"train": {"status": "ran", "seconds": 1.5, "what": "x"}, "quant": {"status": "skipped"}},
      "versions": {"jax": "0", "python": "3"}}))
  R.build(str(root))
  return root
