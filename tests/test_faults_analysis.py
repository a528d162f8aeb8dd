"""Nothing lost on the analysis side: atomic files and folders, a trace that resumes from what is on
disk (damaged or missing pieces redone), and a failed study or stage that leaves earlier outputs and
the report as they were."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from analysis.lab import run as L
from analysis.studies import quantization
from analysis.massive import store as ST
from analysis.lab.cli import main as analysis_main
from minilm import atomic

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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


# ------------------------------------------------------------------------------------ atomic files

def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
  final = tmp_path / "summary.json"
  atomic.write_json(str(final), {"v": 1})
  with pytest.raises(RuntimeError):
    with atomic.path(str(final)) as tmp:
      with open(tmp, "w") as f:
        f.write('{"v": 2, "trunc')
      raise RuntimeError("killed mid-write")
  assert json.loads(final.read_text()) == {"v": 1} and os.listdir(tmp_path) == ["summary.json"]


def test_a_staged_folder_replaces_the_old_one_only_when_complete(tmp_path):
  out = tmp_path / "c5"
  with atomic.staged_dir(str(out)) as staging:
    atomic.write_text(os.path.join(staging, "table.md"), "first")
  with pytest.raises(ValueError):
    with atomic.staged_dir(str(out)) as staging:
      atomic.write_text(os.path.join(staging, "table.md"), "second, half done")
      raise ValueError("the study failed")
  assert (out / "table.md").read_text() == "first" and sorted(os.listdir(tmp_path)) == ["c5"]
  with atomic.staged_dir(str(out)) as staging:
    atomic.write_text(os.path.join(staging, "other.md"), "third")
  assert os.listdir(out) == ["other.md"]                   # the new output, not a merge with the old


def test_a_swap_cut_between_its_two_renames_is_undone(tmp_path):
  out = tmp_path / "quant"
  os.makedirs(str(out) + atomic.OLD)                       # killed after 'final -> final.old'
  (tmp_path / ("quant" + atomic.OLD) / "summary.json").write_text("{}")
  os.makedirs(str(out) + atomic.PARTIAL)
  atomic.recover_dir(str(out))
  assert os.listdir(out) == ["summary.json"] and sorted(os.listdir(tmp_path)) == ["quant"]


# ------------------------------------------------------------------------------------------ trace

TRACE = ["--probes", "4", "--batch", "4", "--no-plots"]


def test_trace_redoes_a_damaged_step_and_a_missing_token_view(tiny_run, tmp_path):
  out = tmp_path / "trace"
  assert analysis_main(["trace", str(tiny_run), "--out", str(out), *TRACE]) == 0
  want = json.loads((out / "summary.json").read_text())
  store = ST.Store(str(out))
  with open(store.sums_path("rope", 1), "r+b") as f:       # a file cut short (full disk, kill by hand)
    f.truncate(100)
  os.remove(store.tokens_path("nope"))                      # killed before the last step's token view
  assert analysis_main(["trace", str(tiny_run), "--out", str(out), *TRACE]) == 0
  timing = json.loads((out / "timing.jsonl").read_text().splitlines()[-1])
  assert timing["traced"] == 1 and timing["skipped"] == 3
  assert os.path.exists(store.sums_path("rope", 1) + ".damaged")   # kept aside, not deleted
  assert store.token_step("nope") == 1 and store.token_step("rope") == 1
  assert json.loads((out / "summary.json").read_text()) == want   # redone to the same numbers


def _lab_argv(tmp_path, *extra):
  return ["--quick", "--runs", str(tmp_path / "runs"), "--reports", str(tmp_path / "reports"),
          "--skip", "pretrained,disrupt", "--lab-set", "trace.probes=4", "quant.methods=rtn", "quant.bits=4", *extra]


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
  monkeypatch.setattr(quantization, "study", broken)
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
  assert "nope diverged</b>" in (report / "index.html").read_text()
  assert L.main(argv) == 0                                  # the diverged arm is finished: nothing reruns
  assert "== [1/4] train: reused" in capsys.readouterr().out
