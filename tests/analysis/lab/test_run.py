"""minilm-lab (analysis.lab.run): stage hashes and reuse, settings passed to the analyses, errors, paths
recorded relative to the working directory, stages beside training, and a --quick run."""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time

import pytest

from analysis.lab import run as L
from analysis.studies import quantization
from minilm import atomic, machine
from minilm.schema import to_dict
from train import checkpoints as ck


def _lab(*argv):
  return L.build(L.parser().parse_args(["--quick", "--runs", "unused-runs", "--reports", "unused-reports",
                                        *argv]))


def test_help_says_any_experiment_config_runs_and_names_the_shipped_ones():
  text = L.parser().format_help()
  for word in ("all_encodings_3seeds", "rope_base_sweep", "partial_rope_sweep", "--quick", "--skip", "--include",
               "experiment config"):
    assert word in text, word


@pytest.mark.parametrize("argv, field", [
    (["--skip", "bogus"], "--skip: "),
    (["--lab-set", "trace.nope=1"], "trace.nope: unknown lab setting"),
    (["--lab-set", "trace.probes=1"], "trace.probes: must be >= 2"),
    # bounded by the pretrained model (SmolLM2: max_len 8192, head dim 64), read without its weights
    (["--lab-set", "pretrained.length=8193"], "pretrained.length: must be <= the model's max_len=8192; got 8193"),
    (["--lab-set", "trace.top_k=65", "--skip", "trace"], "trace.top_k: must be <= the head dim of SmolLM2"),
    # bounded by the lab's own arms (model 'run'), read from the experiment config before training
    (["--lab-set", "quant.group_size=7"], "quant.group_size: must divide the linears' input dims"),
    (["--lab-set", "quant.calib=2x1000000"], "quant.calib: 2 windows of 1000000 tokens need 2000000 tokens"),
    (["--lab-set", "quant.top_k=999", "quant.methods=rtn_keep"], "quant.top_k: must be at most the head_dim"),
    (["--lab-set", "disrupt.model=run", "disrupt.layers=0:999"], "disrupt.layers: must stop at most at the"),
    (["--lab-set", "disrupt.model=run", "disrupt.criterion=topk", "disrupt.top_k=999"],
     "disrupt.top_k: must be at most the head_dim"),
    (["--lab-set", "pretrained.model="], "pretrained.model: must be 'smollm2', 'random' or an existing path; got ''"),
    (["--lab-set", f"disrupt.model={__file__}"], "disrupt.model: must be 'smollm2', 'random', 'run', a run directory, a .gguf file or an HF model directory"),
    (["--set", "model.d_model=abc"], "model.d_model"),
    (["no_such_config"], "config: no file 'no_such_config'"),
])
def test_bad_input_ends_in_one_line_naming_the_field(argv, field, capsys):
  assert L.main([*argv, "--dry-run"]) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("error: ") and field in err and "\n" not in err, err


def test_a_prompts_file_longer_than_the_own_arms_context_is_refused_before_training(tmp_path, capsys):
  """C5 on the lab's own arms with a prompts file: each prompt, in the arms' byte tokens, with its new
  tokens, must fit the arms' max_len, checked before the arms train (not after, at the C5 stage)."""
  prompts = tmp_path / "prompts.jsonl"
  short = {"family": "mine", "kind": "contextual", "prompt": "key 7: value", "answer": "7"}
  prompts.write_text(json.dumps(short) + "\n" + json.dumps({**short, "prompt": "x" * 500}) + "\n")
  max_len = _lab()[0].exp.resolve("rope").model.max_len
  assert L.main(["--quick", "--runs", str(tmp_path / "runs"), "--reports", str(tmp_path / "reports"),
                 "--lab-set", "disrupt.model=run", f"disrupt.prompts={prompts}", "--dry-run"]) == 2
  err = capsys.readouterr().err
  assert err == (f"error: {prompts}:2: prompt: 500 tokens + 4 new exceed the context of arm 'rope' "
                 f"({max_len} tokens)\n"), err
  assert not (tmp_path / "runs").exists()
  prompts.write_text(json.dumps(short) + "\n")
  assert L.main(["--quick", "--runs", str(tmp_path / "runs"), "--reports", str(tmp_path / "reports"),
                 "--lab-set", "disrupt.model=run", f"disrupt.prompts={prompts}", "--dry-run"]) == 0


def test_a_changed_setting_changes_the_hash_of_exactly_the_stages_it_affects():
  base = _lab()[0].hashes

  def changed(*argv):
    return {s for s, h in _lab(*argv)[0].hashes.items() if h != base[s]}
  assert changed() == set()
  assert changed("--lab-set", "trace.lam=3") == {"trace", "pretrained", "report"}   # SmolLM2 at that lam too
  assert changed("--set", "steps=7") == {"train", "trace", "quant", "report"}   # quant reads the trained arms
  assert changed("--lab-set", "disrupt.n=3") == {"disrupt", "report"}
  assert changed("--lab-set", "disrupt.model=run") == {"disrupt", "report"}      # now hangs on the training
  assert changed("--lab-set", "pretrained.length=32") == {"pretrained", "report"}
  assert changed("--lab-set", "quant.bits=8") == {"quant", "report"}
  assert changed("--lab-set", "disrupt.rope=pre") == {"disrupt", "report"}
  assert changed("--lab-set", "trace.plots=false") == {"trace", "report"}
  assert changed("--lab-set", "trace.plots=true") == set()   # the default: earlier markers still match
  assert _lab()[0].stages["trace"].params == {"trace": {"probes": 8, "length": 0, "probe_seed": 0, "batch": 8,
                                                        "lam": 5.0, "top_k": 1, "agree_k": 2, "drop_first": False}}
  # the studies' settings hash as the lab's settings did before they were typed: earlier markers still match
  params = _lab()[0].stages["disrupt"].params
  assert params == {"disrupt": {"model": "smollm2", "suite": "templates", "n": 2, "modes": "off,smallest,massive",
                                "batch": 10, "seed": 0, "extra": []}, "model": "smollm2"}


def test_stage_selection_and_quick_experiment():
  lab, enabled, force = _lab("--skip", "pretrained", "--include", "quant", "--force", "trace")
  assert enabled == ["train", "trace", "disrupt", "quant", "report"] and force == {"trace"}
  assert _lab("--only", "train,report")[1] == ["train", "report"]
  assert _lab()[1] == ["train", "trace", "pretrained", "disrupt", "quant", "report"]
  assert lab.exp.name == "rope_vs_nope_quick" and lab.exp.train.steps == 6 and set(lab.exp.arms) == {"rope", "nope"}
  assert lab.report_dir == os.path.join("unused-reports", "rope_vs_nope_quick")


def test_an_experiment_config_runs_in_the_lab_with_default_settings():
  lab = _lab("rope_base_sweep")[0]
  assert lab.exp.name == "rope_base_sweep_quick" and "rope_b1e2" in lab.exp.arms
  assert lab.exp.resolve("rope_b1e2").model.position.base == 100.0 and lab.exp.train.model.d_model == 32


def test_study_settings_reach_the_studies_as_their_typed_configs(monkeypatch, tmp_path):
  from analysis.studies import disruption
  seen = {}
  monkeypatch.setattr(disruption, "run", lambda cfg, out: seen.setdefault("disrupt", (cfg, out)))
  monkeypatch.setattr(disruption, "print_report", lambda report, out: None)
  monkeypatch.setattr(quantization, "run", lambda cfg, out: seen.setdefault("quant", (cfg, out)))
  lab = L.build(L.parser().parse_args(["--runs", str(tmp_path / "runs"), "--reports", str(tmp_path / "rep"),
                                       "--lab-set", "disrupt.n=7", "disrupt.model=run", "disrupt.rope=pre",
                                       "disrupt.dose=true", "quant.methods=rtn,awq", "quant.bits=3", "trace.lam=3"]))[0]
  assert lab.cfg.disrupt == disruption.DisruptStudy(model="run", n=7, rope="pre", dose=True, batch=10)  # lab.json: batch 10
  lab.stages["disrupt"].run()
  lab.stages["quant"].run()
  (d, d_out), (q, q_out) = seen["disrupt"], seen["quant"]
  assert d == dataclasses.replace(lab.cfg.disrupt, model=lab.run_dir) and d_out == lab.path("disrupt")
  assert (q.methods, q.bits, q.model, q.n, q.group_size, q.top_k, q_out) == ("rtn,awq", "3", lab.run_dir, 32, 32, 2,
                                                                             lab.path("quant"))
  assert lab.study("pretrained").stats.lam == 3.0   # the pretrained model is analysed with the trace statistics


def test_a_partial_study_section_keeps_the_lab_defaults(tmp_path):
  path = tmp_path / "mine.json"
  path.write_text(json.dumps({"experiment": "default", "disrupt": {"rope": "pre"}, "quant": {"bits": "4"}}))
  cfg = L.read_config(str(path))[0]
  assert cfg.disrupt == dataclasses.replace(L.LabConfig().disrupt, rope="pre") and cfg.disrupt.n == 10
  assert cfg.quant == dataclasses.replace(L.LabConfig().quant, bits="4") and cfg.quant.model == L.RUN


def test_an_interrupted_stage_leaves_no_marker_and_says_how_to_resume(monkeypatch, tmp_path, capsys):
  def interrupted(self):
    raise KeyboardInterrupt
  monkeypatch.setattr(L.Lab, "_train", interrupted)
  argv = ["--quick", "--runs", str(tmp_path / "runs"), "--reports", str(tmp_path / "rep"), "--only", "train"]
  assert L.main(argv) == 130
  assert "interrupted during stage 'train'; run the same command again to resume" in capsys.readouterr().err
  assert not (tmp_path / "rep" / "rope_vs_nope_quick" / "stages" / "train.json").exists()


def test_a_second_lab_on_the_same_report_is_refused_in_one_line(monkeypatch, tmp_path, capsys):
  """While a lab writes reports/<name> (here: this process holds its lock), another is refused before
  any stage runs; the lab's own second lane (LANE_OF: its parent's pid) is not."""
  ran = []
  monkeypatch.setattr(L.Lab, "_train", lambda self: ran.append(os.environ.get(L.LANE_OF)))
  report = tmp_path / "rep" / "rope_vs_nope_quick"
  argv = ["--quick", "--runs", str(tmp_path / "runs"), "--reports", str(tmp_path / "rep"), "--only", "train"]
  with atomic.exclusive(str(report)):
    assert L.main(argv) == 2
    assert capsys.readouterr().err == (f"error: {report}: another process (pid {os.getpid()}) is writing it; let it "
                                       f"end or stop it, then run the same command again\n")
    assert ran == []
    monkeypatch.setenv(L.LANE_OF, str(os.getppid()))
    assert L.main(argv) == 0 and ran == [str(os.getppid())]


@pytest.mark.slow   # a --quick lab run
def test_quick_run_trains_traces_reports_then_reuses_everything(tmp_path, capsys):
  argv = ["--quick", "--runs", str(tmp_path / "runs"), "--reports", str(tmp_path / "reports"),
          "--skip", "pretrained,disrupt", "--set", "checkpoint.log_spaced=false", "--lab-set", "trace.probes=4"]
  assert L.main(argv) == 0
  out = capsys.readouterr().out
  report = tmp_path / "reports" / "rope_vs_nope_quick"
  assert f"report: {report / 'index.html'}" in out
  tail = out[out.index("\nreport: "):].splitlines()[2:7]
  assert tail[0].startswith("rope_vs_nope_quick (rope, nope;") and "C1 " in tail[0]
  assert tail[2].startswith("pretrained model: not analysed") and tail[3].startswith("C5 disruption: not run")
  assert tail[4].startswith("C6 quantization: ") and "not run" not in tail[4]   # C6 on the trained arms
  for stage in ("train", "trace", "quant", "report"):
    assert json.loads((report / "stages" / f"{stage}.json").read_text())["seconds"] > 0
  assert not (report / "stages" / "disrupt.json").exists() and not (report / "stages" / "pretrained.json").exists()
  assert (report / "trace" / "comparisons.json").exists() and (report / "figures" / "training.png").exists()
  page = (report / "index.html").read_text()
  assert "<h2 id=\"claims\">" in page and "trace/plots/heatmap_nope_6.png" in page
  lab = json.loads((report / "lab.json").read_text())
  assert lab["versions"]["jax"] and lab["versions"]["git_commit"] and "CPU cores" in lab["versions"]["machine"]
  assert f"({machine.describe_cpu()})" in lab["versions"]["machine"]
  assert float(lab["versions"]["float32 matmul"].split(" GFLOP/s")[0]) > 0

  assert L.main(argv) == 0                                   # nothing changed: everything is reused
  out = capsys.readouterr().out
  for i, stage in enumerate(("train", "trace", "quant"), 1):
    assert f"== [{i}/4] {stage}: reused" in out
  assert json.loads((report / "lab.json").read_text())["stages"]["train"]["status"] == "reused"

  assert L.main([*argv, "--lab-set", "trace.lam=3", "--dry-run"]) == 0
  plan = {line.split()[0]: line.split()[1] for line in capsys.readouterr().out.splitlines()}
  assert plan == {"train": "done", "trace": "to-run", "pretrained": "skipped", "disrupt": "skipped", "quant": "done",
                  "report": "to-run"}

  import shutil                                             # training not finished (one arm's last step missing):
  shutil.rmtree(tmp_path / "runs" / "rope_vs_nope_quick" / "nope" / "checkpoints" / "6")
  assert L.main([*argv, "--only", "trace", "--force", "trace", "--lab-set", "trace.plots=false"]) == 0
  assert "on incomplete inputs" in capsys.readouterr().out   # trace runs on what exists, but is not marked done
  assert not (report / "stages" / "trace.json").exists()


def test_the_lab_records_paths_relative_to_the_working_directory_and_keeps_its_hashes(tmp_path, monkeypatch):
  """lab.json, the stage markers and the trace's capture record runs/ and reports/ relative; the
  stage hashes are the ones the absolute paths gave (existing runs stay reused), and a trace captured
  with the absolute run_dir is still resumed."""
  args = ["--quick", "--runs", str(tmp_path / "runs"), "--reports", str(tmp_path / "reports")]
  before = L.build(L.parser().parse_args(args))[0]
  monkeypatch.chdir(tmp_path)
  lab = L.build(L.parser().parse_args(["--quick", "--runs", "runs", "--reports", "reports"]))[0]
  # the train stage hashes the absolute runs path, as before, whichever way --runs is spelled
  assert lab.hashes["train"] == before.hashes["train"] == L._hash(
      {"stage": "train", "params": {"experiment": to_dict(lab.exp), "runs": str(tmp_path / "runs")}, "deps": {}})
  assert (lab.hashes["trace"], lab.hashes["pretrained"]) == (before.hashes["trace"], before.hashes["pretrained"])
  lab.write_marker("train", 1.0)
  lab.record({"train": "ran"}, time.time(), ["--quick"])
  marker = json.loads(open(lab.marker_path("train")).read())
  assert marker["params"]["runs"] == "runs" and marker["hash"] == before.hashes["train"]
  record = json.loads(open(lab.path("lab.json")).read())
  assert (record["run_dir"], record["report_dir"]) == ("runs/rope_vs_nope_quick", "reports/rope_vs_nope_quick")
  capture = {"probes": 8, "run_dir": "runs/rope_vs_nope_quick"}
  os.makedirs("old_trace")
  with open(os.path.join("old_trace", L.CAPTURE), "w") as f:
    json.dump(capture | {"run_dir": str(tmp_path / "runs" / "rope_vs_nope_quick")}, f)
  assert L._holds("old_trace", capture) and not L._holds("old_trace", capture | {"probes": 9})


def test_the_pretrained_stage_reruns_when_the_trace_statistics_change():
  """It analyses SmolLM2 with trace's statistics; at the default ones its hash is the settings' alone
  (markers written before still match)."""
  lab = _lab()[0]
  assert lab.hashes["pretrained"] == L._hash({"stage": "pretrained", "deps": {},
                                              "params": {"pretrained": L._hashed("pretrained", lab.cfg.pretrained)}})
  for setting in ("trace.lam=3", "trace.top_k=2", "trace.drop_first=true"):
    assert _lab("--lab-set", setting)[0].hashes["pretrained"] != lab.hashes["pretrained"], setting
  assert _lab("--lab-set", "trace.probes=9")[0].hashes["pretrained"] == lab.hashes["pretrained"]


def test_the_stages_that_need_no_trained_arm_are_the_ones_beside_training():
  todo = ["train", "trace", "pretrained", "disrupt", "quant", "report"]
  assert _lab("--lab-set", "beside_train=on")[0].beside_train(todo) == ["pretrained", "disrupt"]
  lab = _lab("--lab-set", "beside_train=on", "disrupt.model=run", "quant.model=random")[0]
  assert lab.beside_train(todo) == ["pretrained", "quant"]
  assert lab.beside_train(["trace", "pretrained", "quant"]) == []          # nothing to train: all in turn
  assert _lab("--lab-set", "beside_train=off")[0].beside_train(todo) == []
  assert _lab()[0].beside_train(todo) == ["pretrained", "disrupt"]         # auto: on, on this CPU backend
  cmd = L.lane_command(L.parser().parse_args(["default", "--quick", "--set", "steps=7", "--lab-set", "disrupt.n=3",
                                              "--force", "disrupt,train"]), ["pretrained", "disrupt"], {"disrupt"})
  args = L.parser().parse_args(cmd[3:])
  assert cmd[1:3] == ["-m", "analysis.lab.run"] and args.config == "default" and args.quick
  assert (args.only, args.force, args.assignments, args.lab_assignments) == (
      "pretrained,disrupt", "disrupt", ["steps=7"], ["disrupt.n=3"])


def test_a_failed_second_process_is_a_one_line_error_naming_its_stages_and_log(tmp_path):
  lab = L.Lab(L.LabConfig(), _lab()[0].exp, runs=str(tmp_path / "runs"), reports=str(tmp_path / "rep"))
  code = "import sys; print('working'); print('error: disrupt.n: must be >= 1; got 0', file=sys.stderr); sys.exit(2)"
  spawn = lambda stages, out: subprocess.Popen([sys.executable, "-c", code], stdout=out, stderr=subprocess.STDOUT)
  lane = L._Lane(lab, ["pretrained", "disrupt"], spawn, log=lambda *a, **k: None)
  lane.start()
  with pytest.raises(ck.RunError, match=r"^pretrained, disrupt \(beside training\): disrupt.n: must be >= 1; got 0 "
                                        r"\(log: .*stages/beside_train.log\); run the same command again"):
    lane.wait()
  sleeper = L._Lane(lab, ["pretrained"], lambda stages, out: subprocess.Popen([sys.executable, "-c",
                                                                               "import time; time.sleep(60)"]), print)
  sleeper.start()
  sleeper.stop()                                   # the main process failed first: the second one ends too
  assert sleeper.proc.returncode is not None


@pytest.mark.slow   # a --quick lab run, then its beside stages again in turn
def test_stages_beside_training_give_what_they_give_in_turn(tmp_path, capsys):
  common = ["--quick", "--runs", str(tmp_path / "runs"), "--lab-set", "pretrained.model=random", "disrupt.model=random",
            "pretrained.plots=false", "disrupt.tasks=passkey,capitals"]
  assert L.main([*common, "beside_train=on", "--reports", str(tmp_path / "a"), "--skip", "trace,quant"]) == 0
  out = capsys.readouterr().out
  assert "beside training, in a second process: pretrained, disrupt" in out
  assert "pretrained done in" in out and "disrupt done in" in out
  a, b = tmp_path / "a" / "rope_vs_nope_quick", tmp_path / "b" / "rope_vs_nope_quick"
  lab = json.loads((a / "lab.json").read_text())
  assert lab["beside_train"] == ["pretrained", "disrupt"] and lab["wall_seconds"] > 0
  assert {s: lab["stages"][s]["status"] for s in ("train", "pretrained", "disrupt")} == {s: "ran" for s in
                                                                                        ("train", "pretrained", "disrupt")}
  assert "ran beside training" in (a / "index.html").read_text()
  assert L.main([*common, "beside_train=off", "--reports", str(tmp_path / "b"), "--only", "pretrained,disrupt"]) == 0
  assert (a / "disrupt" / "results.jsonl").read_text() == (b / "disrupt" / "results.jsonl").read_text()
  drop = lambda d: {k: v for k, v in d.items() if "seconds" not in k}
  assert drop(json.loads((a / "pretrained" / "pretrained.json").read_text())) == drop(
      json.loads((b / "pretrained" / "pretrained.json").read_text()))


@pytest.mark.parametrize("section", ['disrupt={"n":3}', "disrupt={}", "quant={}", 'quant={"n":3}'])
def test_a_partial_study_section_on_the_command_line_keeps_the_lab_settings(section):
  cfg = _lab("--lab-set", section)[0].cfg   # --quick: the lab's settings are QUICK's
  want = _lab()[0].cfg
  stage = section.split("=")[0]
  assert getattr(cfg, stage) == dataclasses.replace(getattr(want, stage), **json.loads(section.split("=", 1)[1]))
