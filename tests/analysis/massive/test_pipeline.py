"""analysis.massive.pipeline: a single model is analysed as one traced step, and a tiny paired run goes
end to end through `python -m analysis trace` into table, summary, plots and claims, resumes, and
redoes a damaged step and a missing token view; a bad run directory is one line."""
import json
import os
import shutil

import numpy as np
import pytest
from flax import nnx

from analysis.lab.cli import main
from analysis.lab.cli import main as analysis_main
from analysis.massive import pipeline as PL
from analysis.massive import store as ST
from minilm import atomic
from minilm import encodings
from minilm.config import ModelConfig
from minilm.model import Decoder
from minilm.schema import ConfigError


def _decoder(position, seed=0, n_layers=2):
  cfg = ModelConfig(vocab_size=300, d_model=32, n_layers=n_layers, n_heads=4, n_kv_heads=2, max_len=64,
                    position=position)
  return Decoder(cfg, rngs=nnx.Rngs(seed))


def test_analyze_model_treats_a_single_model_as_one_step(tmp_path):
  model = _decoder(encodings.RoPE(), n_layers=1)
  probes = np.random.default_rng(2).integers(0, 300, (6, 16))
  PL.analyze_model(model, probes, str(tmp_path), arm="pretrained", step=0, batch_size=6)
  rows = ST.read_table(str(tmp_path / "table.csv"))
  assert len(rows) == 2 * 4 + 3 * 2 and {r["arm"] for r in rows} == {"pretrained"}
  claims = json.loads((tmp_path / "claims.json").read_text())["claims"]
  assert [c["claim"] for c in claims] == ["C1", "C2", "C3", "C3-lowfreq", "C4"]
  c3 = {c["claim"]: c for c in claims}["C3"]
  assert c3["verdict"] == "inconclusive" and "no NoPE arm" in c3["notes"]
  for name in ("layer_profile", "heatmap_pretrained_0", "pair_energy_pretrained", "bars3d_pretrained"):
    assert (tmp_path / "plots" / f"{name}.png").stat().st_size > 0 and (tmp_path / "plots" / f"{name}.pdf").exists()
  assert not (tmp_path / "plots" / "emergence.png").exists()   # one step: nothing to emerge over
  with pytest.raises(ConfigError, match="out: .* other probes"):
    PL.analyze_model(model, probes[:3], str(tmp_path), arm="pretrained")


@pytest.mark.slow
def test_cli_traces_a_paired_run_into_table_plots_and_claims_and_resumes(tiny_run, tmp_path, capsys):
  out = tmp_path / "analysis"
  assert main(["trace", str(tiny_run), "--out", str(out), "--probes", "6", "--batch", "4"]) == 0
  rows = ST.read_table(str(out / "table.csv"))
  assert len(rows) == 2 * 2 * 2 * (2 * 4 + 3 * 2)                # arms x steps x layers x heads
  assert {(r["arm"], r["step"]) for r in rows} == {(a, s) for a in ("rope", "nope") for s in ("0", "1")}
  assert np.load(out / "probes.npy").shape == (6, 48)
  arms = json.loads((out / "meta.json").read_text())["arms"].values()
  assert [(f["context"], f["seed"]) for f in arms] == [(48.0, 0), (48.0, 0)]   # the seeds pair the claims' arms
  summary = json.loads((out / "summary.json").read_text())
  assert len(summary["groups"]) == 2 * 2 * 2 * 5
  lo_mid_hi = summary["groups"][0]["stats"]["max_mean"]
  assert lo_mid_hi[1] <= lo_mid_hi[0] <= lo_mid_hi[2]
  claims = json.loads((out / "claims.json").read_text())["claims"]
  assert {c["claim"] for c in claims} == {"C1", "C2", "C3", "C3-lowfreq", "C4"}
  assert all(c["reference"] == "arm nope" and c["step"] == 1 and c["ci"] is not None for c in claims)
  assert "| C3 RoPE causes it |" in (out / "claims.md").read_text()
  for name in ("emergence", "layer_profile", "heatmap_rope_0", "heatmap_nope_1", "pair_energy_rope", "bars3d_nope"):
    assert (out / "plots" / f"{name}.png").exists() and (out / "plots" / f"{name}.pdf").exists()
  assert main(["trace", str(tiny_run), "--out", str(out), "--probes", "6", "--no-plots", "--lam", "3"]) == 0
  first, second = [json.loads(line) for line in (out / "timing.jsonl").read_text().splitlines()]
  assert first["traced"] == 4 and first["forward_s"] + first["compile_forward_s"] > 0
  assert second["traced"] == 0 and second["skipped"] == 4
  assert json.loads((out / "meta.json").read_text())["stats"]["lam"] == 3.0   # table redone, no forward
  assert not (out / "plots").exists()            # the figures drawn at the other lam are not left beside it
  assert main(["trace", str(tiny_run), "--out", str(out), "--probes", "6", "--drop-first"]) == 2
  assert main(["trace", str(tiny_run), "--out", str(out), "--probes", "6", "--no-plots", "--no-claims"]) == 0
  capsys.readouterr()
  assert not (out / "claims.json").exists() and not (out / "claims.md").exists()   # the verdicts of other tables
  for argv, first in ((["--probes", "8"], "error: --out: "), (["--probes", "6", "--probe-seed", "5"], "error: --out: "),
                      (["--probes", "6", "--steps"], "error: --steps: names no step")):
    probes = (out / "probes.npy").read_bytes()
    assert main(["trace", str(tiny_run), "--out", str(out), *argv]) == 2
    assert capsys.readouterr().err.startswith(first) and (out / "probes.npy").read_bytes() == probes
  for steps, first in ((["3"], "error: --steps: no arm holds step 3; traced: 0, 1"),
                       ([], "error: --steps: names no step; traced: 0, 1")):
    assert main(["plots", str(out), "--steps", *steps]) == 2
    assert capsys.readouterr().err.startswith(first)
  with atomic.exclusive(str(out)):   # another trace (here: this process) writes the folder
    assert main(["trace", str(tiny_run), "--out", str(out), "--probes", "6", "--no-plots"]) == 2
    assert capsys.readouterr().err.startswith(f"error: {out}: another process (pid {os.getpid()}) is writing it")
  (out / "summary.json").write_text("{bad")
  assert main(["plots", str(out)]) == 2
  assert capsys.readouterr().err.startswith(f"error: {out / 'summary.json'}: damaged, not valid JSON")


def test_cli_reports_a_bad_run_dir_in_one_line(tmp_path, capsys):
  assert main(["trace", str(tmp_path / "missing")]) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("error: run_dir:") and "\n" not in err


def test_a_probe_seed_outside_32_bits_is_one_line_before_writing(tiny_run, tmp_path, capsys):
  out = tmp_path / "out"
  for seed in ("-1", str(2 ** 32)):
    assert main(["trace", str(tiny_run), "--out", str(out), "--probe-seed", seed]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == [f"error: --probe-seed: must be in 0..4294967295; got {seed}"]
  assert not out.exists()


def test_top_k_beyond_the_head_dim_is_one_line_before_writing(tiny_run, tmp_path, capsys):
  out = tmp_path / "out"
  for flag, field in (("--top-k", "top_k"), ("--agree-k", "agree_k")):   # the tiny run's heads are 32 / 4 = 8 wide
    assert main(["trace", str(tiny_run), "--out", str(out), flag, "9"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == [f"error: {field}: must be <= the head dim of arm 'rope' (8); got 9"]
  assert not out.exists()


TRACE = ["--probes", "4", "--batch", "4", "--no-plots"]


def test_no_plots_removes_only_the_figures_a_trace_drew(tiny_run, tmp_path):
  out = tmp_path / "mine"
  (out / "plots").mkdir(parents=True)
  own = {"notes.txt": "mine", "emergence_sketch.png": "mine too"}
  for name, text in own.items():
    (out / "plots" / name).write_text(text)
  (out / "plots" / "emergence.png").write_text("a figure of an earlier trace")
  (out / "plots" / "heatmap_rope_0.pdf").write_text("another")
  assert main(["trace", str(tiny_run), "--out", str(out), *TRACE]) == 0
  assert {p.name: p.read_text() for p in (out / "plots").iterdir()} == own


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
  os.remove(store.sums_path("rope", 0))
  assert analysis_main(["trace", str(tiny_run), "--out", str(out), *TRACE, "--steps", "0"]) == 0
  assert store.token_step("rope") == 1   # the token view stays at the trace's last step, not this run's


def test_a_trace_of_another_run_is_refused_before_anything_is_written(tiny_run, tmp_path, capsys):
  """Resuming skips the (arm, step) pairs a folder holds: those of another run (another folder, or the
  same folder trained again at another seed) would stay in it as this run's."""
  out = tmp_path / "trace"
  assert main(["trace", str(tiny_run), "--out", str(out), *TRACE]) == 0
  table = (out / "table.csv").read_bytes()
  meta = (out / "meta.json").read_bytes()
  other = tmp_path / "other"
  shutil.copytree(tiny_run, other)
  assert main(["trace", str(other), "--out", str(out), *TRACE]) == 2
  assert capsys.readouterr().err.strip() == f"error: --out: {out} holds a trace of {tiny_run}; give another --out or remove it"
  moved = tmp_path / "moved"                      # the run's folder renamed: known by its arms' seeds and configs
  again = tmp_path / "again"
  shutil.copytree(out, again)
  data = json.loads((again / "meta.json").read_text())
  (again / "meta.json").write_text(json.dumps(data | {"run_dir": str(moved)}))
  other.rename(moved)
  assert main(["trace", str(moved), "--out", str(again), *TRACE]) == 0
  config = json.loads((moved / "rope" / "config.json").read_text())
  (moved / "rope" / "config.json").write_text(json.dumps(config | {"seed": 1}))   # trained again at another seed
  assert main(["trace", str(moved), "--out", str(again), *TRACE]) == 2
  assert capsys.readouterr().err.strip() == (f"error: --out: {again} holds a trace of another run of {moved} "
                                             "(arm 'rope': another seed or config); give another --out or remove it")
  assert (out / "table.csv").read_bytes() == table and (out / "meta.json").read_bytes() == meta


def test_a_probe_length_of_0_and_an_unknown_claims_arm_are_one_line_before_tracing(tiny_run, tmp_path, capsys):
  out = tmp_path / "out"
  for argv, err in ((["--length", "0"], "error: --length: must be >= 2; got 0"),
                    (["--rope-arm", "bogus"], f"error: --rope-arm: 'bogus' is not an arm of {tiny_run}; arms: rope, nope"),
                    (["--nope-arm", "rope"], "error: --nope-arm: 'rope' is not a NoPE arm; NoPE arms: nope")):
    assert main(["trace", str(tiny_run), "--out", str(out), *TRACE, *argv]) == 2
    assert capsys.readouterr().err.strip() == err
  assert not out.exists()
