"""bench/onset_gpu.py, the onset study's accelerator script: it stops at its deadline with a
checkpoint, its estimate's arithmetic, and the whole script end to end on CPU."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from analysis.studies import onset
from helpers import ROOT
from helpers import planted_law as planted
from minilm.schema import override, to_dict

BENCH = os.path.join(ROOT, "bench")


@pytest.fixture()
def gpu_script(monkeypatch):
  monkeypatch.syspath_prepend(BENCH)
  import onset_gpu
  return onset_gpu


def test_gpu_script_stops_at_its_deadline_with_a_checkpoint(gpu_script, tmp_path):
  from train import paired
  from train.config import load_experiment
  exp = load_experiment(json.load(open(os.path.join(ROOT, "configs", "onset_gpu.json"))))
  exp = override(exp, {"train": to_dict(override(exp.train, gpu_script.TINY))})
  arms = gpu_script.train_arms(paired.plan(exp, str(tmp_path)), end=time.monotonic())
  assert set(arms) == {"rope", "nope"}
  assert all(a["stopped_by_deadline"] and a["last_checkpoint"] == 0 and a["steps_trained"] == 0 for a in arms.values())


def test_gpu_estimate_arithmetic(gpu_script, capsys):
  gpu_script.main(["--estimate", "--budget-s", "480"])
  est = json.loads(capsys.readouterr().out)
  L, T, d, B, ff = 8, 1024, 384, 32, 1024   # configs/onset_gpu.json; SwiGLU's default d_ff = 8/3 d
  n = L * (4 * d * d + 3 * d * ff + 2 * d) + d   # q, k, v, o; gate, up, down; two norms a block; final norm
  assert est["non_embedding"] == n and est["params"] == n + 512 * d   # the tied byte-level embedding
  assert est["flops_per_step"] == (6 * n + 12 * L * T * d) * B * T
  # 480 s less 180 for the trace and 30 per arm for compiling, halved; a step at 30% of 989 TFLOP/s
  step_s = max(est["flops_per_step"] / (0.3 * 989e12), est["batch_s_measured"])
  assert est["train_s_per_arm"] == (480 - 180 - 2 * 30) / 2 and est["step_s"] == pytest.approx(step_s, rel=1e-12)
  assert est["steps_reachable"] == int(120 / est["step_s"]) and "30%" in est["assumed"]


@pytest.mark.slow
def test_gpu_script_end_to_end_on_cpu(tmp_path):
  """The whole script on a tiny model, tested against a planted law of another run (--fit)."""
  fit = onset.fit_law(planted(), "rope", "pair_max_mean", n_boot=50)
  (tmp_path / "fit.json").write_text(json.dumps({"fits": [onset.fit_dict(fit, [1e6])]}))
  got = subprocess.run([sys.executable, os.path.join(BENCH, "onset_gpu.py"), "--tiny", "--probes", "4", "--out",
                        str(tmp_path / "out"), "--work", str(tmp_path / "work"), "--fit", str(tmp_path / "fit.json")],
                       capture_output=True, text=True, cwd=ROOT, timeout=600)
  assert got.returncode == 0, got.stderr[-3000:]
  files = os.listdir(tmp_path / "out")
  assert len(files) <= 8 and all(os.path.getsize(tmp_path / "out" / f) < 16 * 2 ** 20 for f in files)
  assert {"run.json", "claims.json", "fit.json", "onset_table.csv", "concentration.png"} <= set(files)
  run = json.loads((tmp_path / "out" / "run.json").read_text())
  assert {a["last_checkpoint"] for a in run["arms"].values()} == {4} and run["estimate"]["flops_per_step"] > 0
  (v,) = run["prediction"]["verdicts"]   # the rope arm against the planted rope law
  (p,) = [p for p in run["prediction"]["points"] if p["last"]]
  assert (v["kind"], v["arms"], p["arm"], p["stat"], p["tokens"]) == ("rope", 1, "rope", "pair_max_mean", 4 * 4 * 64)
  assert p["predicted"] == pytest.approx(onset.predict(fit, p["params"], p["tokens"]))
