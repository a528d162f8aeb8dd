"""`python -m train`: run layout, extending a run, one-line errors (exit 2), the GPU config on CPU."""
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from flax import nnx

from helpers import ROOT, children, left_running, started, stop
from minilm import atomic
from minilm import schema as C
from train import checkpoints, cli, loop, paired


def run(capsys, *argv):
  code = cli.main(list(argv))
  return code, capsys.readouterr().err


@pytest.mark.slow
def test_trains_the_smoke_experiment_then_extends_it(tmp_path, capsys):
  out = str(tmp_path)
  code, _ = run(capsys, "smoke", "--out", out, "--arms", "rope", "--no-progress")
  assert code == 0
  exp_dir = tmp_path / "smoke"
  assert json.load(open(exp_dir / "experiment.json"))["arms"] == {"rope": {}, "nope": {"model.position": "nope"}}
  arm = exp_dir / "rope"
  assert sorted(os.listdir(arm)) == [".lock", "checkpoints", "config.json", "eval.jsonl", "metrics.jsonl"]
  assert json.load(open(arm / "config.json"))["name"] == "smoke/rope"
  assert checkpoints.available_steps(str(arm)) == [0, 1, 2, 4, 6]
  assert [json.loads(l)["step"] for l in open(arm / "eval.jsonl")] == [4, 6]
  assert not (exp_dir / "nope").exists()
  # a damaged log row is refused before config.json or experiment.json says the run goes on
  logs = {name: (arm / name).read_text() for name in ("metrics.jsonl", "eval.jsonl")}
  records = [open(p).read() for p in (arm / "config.json", exp_dir / "experiment.json")]
  for name, text in logs.items():
    lines = text.splitlines(keepends=True)
    (arm / name).write_text("".join(lines[:1] + ["garbage{\n"] + lines[1:]))
    code, err = run(capsys, "smoke", "--out", out, "--arms", "rope", "--no-progress", "--set", "steps=8")
    assert code == 2 and err == f"error: {arm / name}: line 2 is not JSON; delete that line and run again\n", err
    assert [open(p).read() for p in (arm / "config.json", exp_dir / "experiment.json")] == records
    (arm / name).write_text(text)
  code, err = run(capsys, "smoke", "--out", out, "--arms", "rope", "--no-progress", "--set", "steps=8")
  assert code == 0
  assert err.startswith(f"note: {arm}: steps 6 -> 8 in config.json; training goes on from step 6"), err
  assert checkpoints.available_steps(str(arm)) == [0, 1, 2, 4, 6, 8]
  assert [json.loads(l)["step"] for l in open(arm / "metrics.jsonl")][-2:] == [6, 8]
  before = open(arm / "config.json").read()
  code, err = run(capsys, "smoke", "--out", out, "--arms", "rope", "--no-progress", "--set", "steps=5")
  assert code == 2 and err.startswith(f"error: steps: run directory {arm} holds 8 trained steps; steps=5"), err
  assert open(arm / "config.json").read() == before


@pytest.mark.slow
def test_score_checkpoints_puts_the_training_scores_beside_every_checkpoint(tmp_path, capsys):
  out, arm = str(tmp_path), tmp_path / "smoke" / "rope"
  code, err = run(capsys, "smoke", "--out", out, "--score-checkpoints")
  assert code == 2 and err.startswith(f"error: --out: {tmp_path / 'smoke' / 'rope'} holds no run of arm 'rope'"), err
  assert run(capsys, "smoke", "--out", out, "--arms", "rope", "--no-progress")[0] == 0
  trained = open(arm / "eval.jsonl").read().splitlines()
  assert [json.loads(l)["step"] for l in trained] == [4, 6]
  (arm / "eval.jsonl").write_text(trained[1] + "\n")   # the loop's row of step 4 must come back
  assert run(capsys, "smoke", "--out", out, "--arms", "rope", "--score-checkpoints")[0] == 0
  rows = open(arm / "eval.jsonl").read().splitlines()
  assert [json.loads(l)["step"] for l in rows] == [0, 1, 2, 4, 6]
  assert json.loads(rows[3]) == json.loads(trained[0]) and rows[4] == trained[1]
  code = cli.main(["smoke", "--out", out, "--arms", "rope", "--score-checkpoints"])
  assert code == 0 and "[rope] scored 0 checkpoint(s)" in capsys.readouterr().out
  assert open(arm / "eval.jsonl").read().splitlines() == rows

  # while another process writes the arm (here: this one, holding its lock), both commands are refused
  files = {p: p.read_bytes() for p in arm.rglob("*") if p.is_file()}
  with atomic.exclusive(str(arm)):
    for extra in (["--score-checkpoints"], ["--no-progress", "--set", "steps=8"]):
      code, err = run(capsys, "smoke", "--out", out, "--arms", "rope", *extra)
      assert code == 2 and err == (f"error: {arm}: another process (pid {os.getpid()}) is writing it; let it end "
                                   f"or stop it, then run the same command again\n"), err
  assert {p: p.read_bytes() for p in arm.rglob("*") if p.is_file() and p.name != ".lock"} == \
         {p: b for p, b in files.items() if p.name != ".lock"}


BAD = {
    "unknown field": (["--set", "model.d_modle=3"], "error: model.d_modle: unknown field; allowed: "),
    "bad value": (["--set", "model.d_model=-1"], "error: model.d_model: must be >= 1; got -1"),
    "negative seed": (["--set", "seed=-1"], "error: seed: must be in 0..4294967295; got -1"),
    "seed beyond 32 bits": (["--set", "seed=4294967301"], "error: seed: must be in 0..4294967295; got 4294967301"),
    "eval seed": (["--set", "eval.seed=-3"], "error: eval.seed: must be in 0..4294967295; got -3"),
    "bad type": (["--set", "optim.lr=fast"], "error: optim.lr: expected a number; got 'fast'"),
    "bad choice": (["--set", "parallel.strategy=tp"], "error: parallel.strategy: must be one of 'data', 'fsdp'"),
    "missing data path": (["--set", "data.text_source=text", 'data.text_files=["/no/such/corpus.txt"]'],
                          "error: data.text_files: no file matches '/no/such/corpus.txt'"),
    "seq_len beyond a table": (["--set", "model.position=learned", "model.max_len=64"],
                               "error: data.seq_len: must be <= model.max_len=64 for position encoding 'learned'"),
    "bad arm override": (["--set", 'arms={"x": {"model.position.base": 0.5}}'],
                         "error: arms.x.model.position.base: must be a finite number > 1; got 0.5"),
    "integer beyond a float": (["--set", "optim.lr=1" + "0" * 400],
                               "error: optim.lr: must be a finite number; got 1000"),
    "NaN": (["--set", "model.norm_eps=NaN"], "error: model.norm_eps: must be a finite number; got nan"),
    "negative init": (["--set", "model.init_std=-1"], "error: model.init_std: must be a finite number > 0; got -1.0"),
    "infinite base": (["--set", 'model.position={"kind": "rope", "base": Infinity}'],
                      "error: model.position.base: must be a finite number; got inf"),
    "unknown arm": (["--arms", "alibi"], "error: arms: must be one of 'rope', 'nope'; got 'alibi'"),
    "not field=value": (["--set", "steps"], "error: steps: expected field=value"),
    "empty --arms": (["--arms="], "error: arms: must be one of 'rope', 'nope'; got ''"),
    "negative kb_seed": (["--set", "data.kb_seed=-1"], "error: data.kb_seed: must be in 0..4294967295; got -1"),
    "batch beyond any memory": (["--set", "data.batch_size=1e12"],
                                "error: data.batch_size: must be <= 22139006 at seq_len=96 (2147483647 tokens a "
                                "batch); got 1000000000000\n"),
    "batch beyond numpy's dimensions": (["--set", "data.batch_size=1e30"], "error: data.batch_size: must be <= "),
    "a field beside a kind given by name": (["--set", "model.position=nope", "model.position.base=5"],
                                            "error: model.position.base: unknown field; allowed: kind\n"),
    "train not a mapping": (["--set", "train=5"], "error: train: expected a mapping; got 5\n"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_one_line_and_exit_2(case, tmp_path, capsys):
  argv, message = BAD[case]
  code, err = run(capsys, "smoke", "--out", str(tmp_path), *argv)
  assert code == 2
  assert err.startswith(message), err
  assert err.count("\n") == 1
  assert not os.listdir(tmp_path)   # nothing was written


def test_missing_config_file(capsys):
  code, err = run(capsys, "no_such_config")
  assert code == 2 and err.startswith("error: config: no file 'no_such_config'") and "smoke" in err


def test_a_config_file_that_holds_no_experiment_is_named(tmp_path, capsys):
  (tmp_path / "list.json").write_text("[1, 2]")
  code, err = run(capsys, str(tmp_path / "list.json"))
  assert code == 2 and err == (f"error: config: {tmp_path / 'list.json'} holds no experiment (a JSON object of name, "
                               "train and arms); got [1, 2]\n"), err


def test_a_file_named_checkpoints_in_an_arm_is_refused_before_anything_is_written(tmp_path, capsys):
  arm_dir = tmp_path / "smoke" / "rope"
  arm_dir.mkdir(parents=True)
  (arm_dir / "checkpoints").write_text("x")
  code, err = run(capsys, "smoke", "--out", str(tmp_path), "--arms", "rope", "--no-progress")
  assert code == 2 and err == (f"error: --out: {arm_dir / 'checkpoints'} is a file, not a folder (move it away, or "
                               "use another --out)\n"), err
  assert sorted(os.listdir(tmp_path / "smoke")) == ["rope"] and os.listdir(arm_dir) == ["checkpoints"]


def test_a_batch_the_host_cannot_make_names_the_batch_size(monkeypatch):
  def no_memory(*args, **kwargs):
    raise MemoryError("Unable to allocate 3.5 GiB for an array")
  monkeypatch.setattr(loop.D, "train_batch", no_memory)
  with pytest.raises(C.ConfigError, match=r"^data.batch_size: must be small enough for a batch of 97 tokens a row "
                                          r"to fit in this machine's memory; got 4$"):
    loop.check_runnable(cli.load("smoke", []).resolve("rope"))


def test_run_directory_of_another_config_is_never_overwritten(tmp_path, capsys):
  exp = cli.load("smoke", [])
  arm_dir = tmp_path / "smoke" / "nope"
  loop.prepare_run_dir(str(arm_dir), C.override(exp.resolve("nope"), {"model.n_layers": 3}))
  before = open(arm_dir / "config.json").read()
  code, err = run(capsys, "smoke", "--out", str(tmp_path), "--no-progress")
  assert code == 2
  assert err.startswith(f"error: model.n_layers: run directory {arm_dir} holds a run with model.n_layers=3, not 2")
  assert open(arm_dir / "config.json").read() == before
  assert not (tmp_path / "smoke" / "rope").exists()   # every arm is checked before any trains


def test_experiment_json_keeps_the_arms_it_records_and_refuses_another_shared_config(tmp_path, capsys):
  out, exp_dir = str(tmp_path), tmp_path / "smoke"
  paired.plan(cli.load("smoke", []), out)   # rope and nope, each with its config.json
  before = (exp_dir / "experiment.json").read_text()
  code, err = run(capsys, "smoke", "--out", out, "--no-progress", "--set", "model.d_model=64",
                  'arms={"alibi": {"model.position": "alibi"}}')
  assert code == 2 and err == (f"error: model.d_model: {exp_dir / 'experiment.json'} records arms rope, nope, trained "
                               "with model.d_model=32, not 64; the arms of one experiment share its config but for "
                               "'steps' and 'eval.batch' (add arms with the same settings, or use another name or "
                               "--out)\n"), err
  code, err = run(capsys, "smoke", "--out", out, "--no-progress", "--arms", "x",
                  "--set", 'arms={"nope": {"model.position": "alibi"}, "x": {}}')
  assert code == 2 and err.startswith(f"error: arms.nope: {exp_dir / 'experiment.json'} records the trained arm "
                                      "'nope' with model.position.kind='nope', not 'alibi'"), err
  assert (exp_dir / "experiment.json").read_text() == before and sorted(os.listdir(exp_dir)) == \
         ["experiment.json", "nope", "rope"]
  # the same shared config (steps may change): the arms it records stay, the new ones follow
  paired.plan(cli.load("smoke", ["steps=8", 'arms={"alibi": {"model.position": "alibi"}}']), out)
  recorded = json.load(open(exp_dir / "experiment.json"))
  assert recorded["arms"] == {"rope": {}, "nope": {"model.position": "nope"}, "alibi": {"model.position": "alibi"}}
  assert recorded["train"]["steps"] == 8
  assert cli.load(str(exp_dir / "experiment.json"), []).resolve("rope") == \
         C.override(cli.load("smoke", []).resolve("rope"), {"steps": 8})
  for arm in ("rope", "nope", "alibi"):   # no arm trained here: another shared config replaces the record
    os.remove(exp_dir / arm / "config.json")
  paired.plan(cli.load("smoke", ["model.d_model=64", 'arms={"b": {}}']), out)
  assert list(json.load(open(exp_dir / "experiment.json"))["arms"]) == ["b"]


def test_two_commands_adding_arms_at_once_both_stay_in_experiment_json(tmp_path, monkeypatch):
  """Command A reads experiment.json, command B adds its arm before A writes: A merges again under
  the folder's lock when it writes, so B's arm stays."""
  out, exp_dir = str(tmp_path), tmp_path / "smoke"
  first, real = [], paired.recorded

  def b_runs_meanwhile(exp, out_):
    record = real(exp, out_)
    if not first:
      first.append(1)
      paired.plan(cli.load("smoke", ['arms={"b": {"model.position": "nope"}}']), out)
    return record
  monkeypatch.setattr(paired, "recorded", b_runs_meanwhile)
  paired.plan(cli.load("smoke", ['arms={"a": {}}']), out)
  assert json.load(open(exp_dir / "experiment.json"))["arms"] == {"b": {"model.position": "nope"}, "a": {}}


def test_a_serialized_folder_is_locked_for_other_processes(tmp_path):
  probe = ("import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDONLY)\n"
           "try: fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB); print('free')\n"
           "except BlockingIOError: print('held')")
  ask = lambda: subprocess.run([sys.executable, "-c", probe, str(tmp_path)], capture_output=True, text=True).stdout
  with atomic.serialized(str(tmp_path)):
    assert ask() == "held\n"
  assert ask() == "free\n" and os.listdir(tmp_path) == []


@pytest.mark.slow
def test_gpu_config_is_gpu_sized_and_runs_on_cpu_at_toy_scale(tmp_path, capsys):
  cfg = cli.load("gpu", []).resolve("rope")
  _, abstract, _ = checkpoints.abstract_model(cfg.model)
  n = sum(x.size for x in jax.tree.leaves(abstract))
  assert 10e6 <= n - cfg.model.vocab_size * cfg.model.d_model <= 50e6
  assert cfg.model.dtype == "bfloat16"
  assert all(x.dtype == "float32" for x in jax.tree.leaves(abstract))
  toy = ["steps=2", "model.d_model=32", "model.n_layers=1", "model.n_heads=2", "data.batch_size=2",
         "eval.n_per_family=1", "eval.batch=2"]
  code, err = run(capsys, "gpu", "--out", str(tmp_path), "--arms", "rope", "--no-progress", "--set", *toy)
  assert code == 0, err
  _, trained = checkpoints.load_model(str(tmp_path / "gpu_rope_vs_nope" / "rope"))
  assert trained.model.dtype == "bfloat16" and trained.data.seq_len == 1024 and trained.steps == 2


def test_module_entry_point_prints_the_resolved_config():
  proc = subprocess.run([sys.executable, "-m", "train", "smoke", "--print-config", "--set", "steps=3",
                         "train.model.position.base=500"], cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr
  data = json.loads(proc.stdout)
  position = data["train"]["model"]["position"]
  assert data["train"]["steps"] == 3 and (position["kind"], position["base"]) == ("rope", 500.0)


@pytest.mark.slow
def test_a_diverging_arm_stops_alone_saves_nothing_non_finite_and_stays_diverged(tmp_path, capsys):
  argv = ["smoke", "--out", str(tmp_path), "--no-progress", "--set", "checkpoint.keep=2",
          'arms={"hot": {"optim.lr": 1e6}, "calm": {}}']
  code, err = run(capsys, *argv)
  hot, calm = str(tmp_path / "smoke" / "hot"), str(tmp_path / "smoke" / "calm")
  assert code == cli.DIVERGED
  assert err.startswith("error: smoke/hot: diverged at step ") and err.count("\n") == 1, err
  record = checkpoints.divergence(hot)
  assert set(record) == {"step", "loss", "grad_norm", "last_good_step", "message"}
  assert record["last_good_step"] == checkpoints.available_steps(hot)[-1] < record["step"]
  assert not (np.isfinite(record["loss"]) and np.isfinite(record["grad_norm"]))
  for step in checkpoints.available_steps(hot):   # retention kept finite steps only
    model, _ = checkpoints.load_model(hot, step)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(nnx.state(model)))
  assert checkpoints.divergence(calm) is None and checkpoints.available_steps(calm) == [4, 6]   # the other arm trained
  before = sorted(os.listdir(os.path.join(hot, checkpoints.CHECKPOINTS)))
  code, again = run(capsys, *argv)   # the same command: reported at once, not retrained into the same NaN
  assert code == cli.DIVERGED and again == err
  assert sorted(os.listdir(os.path.join(hot, checkpoints.CHECKPOINTS))) == before


def test_with_jobs_the_planning_process_leaves_accelerator_memory_to_its_workers(tmp_path, monkeypatch):
  """`plan` starts jax's client: on a GPU it would preallocate most of the memory the workers share."""
  seen = []
  monkeypatch.delenv("XLA_PYTHON_CLIENT_PREALLOCATE", raising=False)
  def plan(*args):
    seen.append(os.environ.get("XLA_PYTHON_CLIENT_PREALLOCATE"))
    raise C.ConfigError("arms: stop here")
  monkeypatch.setattr(paired, "plan", plan)
  argv = ["smoke", "--out", str(tmp_path), "--no-progress"]
  assert cli.main([*argv, "--jobs", "2"]) == 2 and seen == ["false"]
  monkeypatch.delenv("XLA_PYTHON_CLIENT_PREALLOCATE")
  assert cli.main(argv) == 2 and seen == ["false", None]   # one process: jax's own default


@pytest.mark.slow
def test_jobs_train_arms_in_processes_with_the_sequential_result(tmp_path, capsys):
  """Each process trains its arm with the program a sequential run uses: on CPU bit for bit."""
  seq, par = str(tmp_path / "seq"), str(tmp_path / "par")
  assert run(capsys, "smoke", "--out", seq, "--no-progress")[0] == 0
  assert run(capsys, "smoke", "--out", par, "--no-progress", "--jobs", "2")[0] == 0
  for arm in ("rope", "nope"):
    a, b = (os.path.join(d, "smoke", arm) for d in (seq, par))
    assert checkpoints.available_steps(a) == checkpoints.available_steps(b) == [0, 1, 2, 4, 6]
    rows = lambda d, name: [{k: v for k, v in json.loads(l).items() if k != "tokens_per_s"} for l in open(os.path.join(d, name))]
    assert rows(a, "metrics.jsonl") == rows(b, "metrics.jsonl") and rows(a, "eval.jsonl") == rows(b, "eval.jsonl")
    for x, y in zip(*(jax.tree.leaves(nnx.state(checkpoints.load_model(d)[0], nnx.Param)) for d in (a, b))):
      np.testing.assert_array_equal(x, y)
  code, err = run(capsys, "smoke", "--out", str(tmp_path / "div"), "--no-progress", "--jobs", "2",
                  "--set", 'arms={"hot": {"optim.lr": 1e6}, "calm": {}}')
  assert code == cli.DIVERGED and err.startswith("error: smoke/hot: diverged at step ") and err.count("\n") == 1, err
  assert checkpoints.available_steps(str(tmp_path / "div" / "smoke" / "calm")) == [0, 1, 2, 4, 6]
  assert run(capsys, "smoke", "--out", par, "--jobs", "0")[1].startswith("error: --jobs: must be >= 1; got 0")


@pytest.mark.slow
@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGKILL])
def test_the_arms_of_jobs_stop_with_their_parent(tmp_path, how):
  """`--jobs 2` stopped (SIGTERM: one line and exit 130) or killed (SIGKILL: the children's parent-death
  signal) while both arms train: no arm process goes on, and the same command is not refused."""
  argv = [sys.executable, "-m", "train", "smoke", "--out", str(tmp_path), "--no-progress", "--jobs", "2",
          "--set", "steps=100000", "checkpoint.every=100000", "eval.every=100000"]
  with started(argv, tmp_path / "stderr") as proc:
    deadline = time.monotonic() + 120
    metrics = [tmp_path / "smoke" / arm / "metrics.jsonl" for arm in ("rope", "nope")]
    while not all(m.exists() for m in metrics) and time.monotonic() < deadline and proc.poll() is None:
      time.sleep(0.2)
    assert all(m.exists() for m in metrics), (tmp_path / "stderr").read_text()[-2000:]
    arms = children(proc.pid)
    assert len(arms) == 2
    stop(proc, how)
  left = left_running(arms)
  assert not left, (left, (tmp_path / "stderr").read_text()[-3000:])
  if how == signal.SIGTERM:
    assert (tmp_path / "stderr").read_text().splitlines()[-1] == (
        "error: interrupted; run the same command again: every arm resumes from its last checkpoint")
  for arm in ("rope", "nope"):   # their locks went with them
    with atomic.exclusive(str(tmp_path / "smoke" / arm)):
      pass


@pytest.mark.slow
def test_a_run_stopped_while_it_saves_ends_in_one_line_and_leaves_no_partial_step(tmp_path):
  """SIGTERM lands in a save (one a step): the save's threads end before Python does, so nothing of
  theirs dies in a traceback or leaves <step>.orbax-checkpoint-tmp behind."""
  argv = [sys.executable, "-m", "train", "smoke", "--out", str(tmp_path), "--no-progress", "--arms", "rope",
          "--set", "steps=100000", "checkpoint.every=1", "eval.every=100000"]
  folder = tmp_path / "smoke" / "rope" / "checkpoints"
  with started(argv, tmp_path / "stderr") as proc:
    deadline = time.monotonic() + 120
    while len(checkpoints.available_steps(str(folder.parent))) < 5 and time.monotonic() < deadline:
      time.sleep(0.2)
    stop(proc, signal.SIGTERM)
  assert (tmp_path / "stderr").read_text() == (
      "error: interrupted; run the same command again: every arm resumes from its last checkpoint\n")
  assert not list(folder.glob("*.orbax-checkpoint-tmp*"))


def test_a_shipped_config_name_reads_its_config_beside_a_folder_of_that_name(tmp_path, monkeypatch):
  """`--out .` writes the run to ./smoke: the command that wrote it must run again from there."""
  monkeypatch.chdir(tmp_path)
  (tmp_path / "smoke").mkdir()
  (tmp_path / "mine").mkdir()
  assert cli.config_path("smoke") == os.path.join(cli.CONFIGS, "smoke.json")
  with pytest.raises(C.ConfigError, match=r"^config: mine is a folder, not a JSON config file$"):
    cli.config_path("mine")
  (tmp_path / "own.json").write_text("{}")
  assert cli.config_path("own.json") == "own.json"
  os.mkfifo(tmp_path / "piped.json")   # e.g. <(jq ... config.json)
  assert cli.config_path("piped.json") == "piped.json"
