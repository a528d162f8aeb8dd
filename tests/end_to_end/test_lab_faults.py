"""Faults across minilm-lab (training, trace, studies and report in one run): the lab killed between
trace steps resumes to the uninterrupted result, a failed stage leaves the earlier outputs and the
report as they were, and a diverged arm is shown and gets no verdict. (Atomic files are tested in
minilm/test_atomic.py, a trace that redoes damaged pieces in analysis/massive/test_pipeline.py.)"""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from analysis.lab import run as L
from analysis.studies import quantization
from helpers import ROOT, children, left_running, started, stop


def snapshot(*folders) -> dict[str, str]:
  """{path: sha256} of every file below `folders`: what 'nothing changed' is checked against."""
  out = {}
  for folder in folders:
    for dirpath, _, files in os.walk(folder):
      for name in files:
        path = os.path.join(dirpath, name)
        with open(path, "rb") as f:
          out[path] = hashlib.sha256(f.read()).hexdigest()
  return out


def _lab_argv(tmp_path, *extra):
  """A --quick lab run without its figures (no test here looks at them; drawing is most of a trace)."""
  return ["--quick", "--runs", str(tmp_path / "runs"), "--reports", str(tmp_path / "reports"),
          "--skip", "pretrained,disrupt", "--lab-set", "trace.probes=4", "trace.plots=false", "quant.methods=rtn",
          "quant.bits=4", *extra]


@pytest.mark.slow
def test_the_lab_killed_between_trace_steps_resumes_to_the_uninterrupted_result(tmp_path):
  """SIGKILL the lab (a real process) once some but not all (arm, step) sums are on disk; the same
  command then finishes, and its trace equals that of a run never interrupted."""
  argv = _lab_argv(tmp_path, "--skip", "pretrained,disrupt,quant")
  report = tmp_path / "reports" / "rope_vs_nope_quick"
  cmd = [sys.executable, "-c", "import sys; from analysis.lab.run import main; sys.exit(main(sys.argv[1:]))", *argv]
  proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None:
    done = [f for d, _, fs in os.walk(report) if os.path.basename(os.path.dirname(d)) == "sums"
            for f in fs if f.endswith(".npz") and f[:-4].isdigit()]
    if len(done) >= 2:
      proc.send_signal(signal.SIGKILL)
      break
    time.sleep(0.05)
  assert proc.wait() == -signal.SIGKILL, "the lab finished before it could be killed between trace steps"
  assert L.main(argv) == 0
  resumed = json.loads((report / "trace" / "summary.json").read_text())
  assert json.loads((report / "trace" / "timing.jsonl").read_text().splitlines()[-1])["skipped"] >= 2
  assert L.main([*argv, "--force", "trace", "--reports", str(tmp_path / "clean")]) == 0
  clean = json.loads((tmp_path / "clean" / "rope_vs_nope_quick" / "trace" / "summary.json").read_text())
  assert resumed == clean


@pytest.mark.slow
@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGKILL])
def test_the_second_lane_stops_with_the_lab(tmp_path, how):
  """The lab stopped (SIGTERM: one line, exit 130) or killed (SIGKILL: the lane's parent-death signal)
  while its second process runs beside training: that process ends too."""
  argv = _lab_argv(tmp_path)
  argv[argv.index("--skip") + 1] = "disrupt"   # the pretrained stage runs beside training
  cmd = [sys.executable, "-c", "import sys; from analysis.lab.run import main; sys.exit(main(sys.argv[1:]))", *argv]
  with started(cmd, tmp_path / "stderr") as proc:
    lanes, deadline = [], time.time() + 120
    while not lanes and time.time() < deadline and proc.poll() is None:
      lanes = children(proc.pid)
      time.sleep(0.1)
    stderr = (tmp_path / "stderr").read_text()[-2000:]
    assert lanes, f"no second lane seen; the lab's exit code {proc.poll()}: {stderr}"
    time.sleep(1.0)   # the lane is past its start-up
    stop(proc, how)
  assert not left_running(lanes)
  if how == signal.SIGTERM:
    assert "interrupted during stage 'train'; run the same command again to resume" in (tmp_path / "stderr").read_text()


# ------------------------------------------------------------------------------ failed stages

@pytest.mark.slow   # two --quick lab runs
def test_a_failed_stage_leaves_the_previous_output_and_the_report_intact(tmp_path, monkeypatch, capsys):
  argv = _lab_argv(tmp_path)
  assert L.main(argv) == 0
  capsys.readouterr()
  report = tmp_path / "reports" / "rope_vs_nope_quick"
  before = snapshot(report / "quant", report / "trace")
  page = (report / "index.html").read_text()

  def broken(*args, **kw):
    raise OSError(28, "No space left on device", str(report / "quant.partial" / "results.jsonl"))
  monkeypatch.setattr(quantization, "run_scheme", broken)
  assert L.main([*argv, "--force", "quant"]) == 2
  err = capsys.readouterr().err.strip().splitlines()   # the progress bars of the reused stages, then:
  assert err[-1:] == [f"error: {report / 'quant.partial' / 'results.jsonl'}: No space left on device"]
  assert snapshot(report / "quant", report / "trace") == before and (report / "index.html").read_text() == page
  assert not (report / "quant.partial").exists() and not (report / "stages" / "quant.json").exists()
  for link in ("quant/table.md", "trace/summary.json"):
    assert (report / link).exists()


@pytest.mark.slow
def test_a_diverged_arm_is_shown_and_gets_no_verdict(tmp_path, capsys):
  arms = 'arms={"rope": {}, "nope": {"model.position": "nope", "optim.lr": 1e6}}'
  argv = _lab_argv(tmp_path, "--set", arms)
  assert L.main(argv) == 0
  out = capsys.readouterr().out
  assert "rope_vs_nope_quick/nope: diverged at step" in out and "gives no verdict for nope" in out
  report = tmp_path / "reports" / "rope_vs_nope_quick"
  assert set(json.loads((report / "lab.json").read_text())["diverged"]) == {"nope"}
  assert set(json.loads((report / "trace" / "summary.json").read_text())["arms"]) == {"rope"}
  assert set(json.loads((report / "quant" / "summary.json").read_text())["models"]) == {"rope"}
  claims = {c["claim"]: c for c in json.loads((report / "trace" / "claims.json").read_text())["claims"]}
  assert claims["C3"]["verdict"] == "inconclusive" and claims["C3"]["reference"] != "arm nope"
  page = (report / "index.html").read_text()
  assert "nope diverged</b>" in page and "Figures of trace/ were not drawn (plots off)" in page
  assert not (report / "trace" / "plots").exists() and "was not produced" not in page
  assert L.main(argv) == 0                                  # the diverged arm is finished: nothing reruns
  assert "== [1/4] train: reused" in capsys.readouterr().out
