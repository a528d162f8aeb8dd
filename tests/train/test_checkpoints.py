"""Checkpoints: the save schedule on disk, load_model, atomic saves (a killed save restores nothing wrong)."""
import errno
import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap
import types

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from helpers import ROOT, asking, damage
from minilm import schema as C
from minilm.cli import guarded as cli_guarded
from train import checkpoints, cli, loop, paired, schedule
from train import data as D

SMOKE = cli.load("smoke", []).resolve("rope")
pytestmark = pytest.mark.slow   # every test trains the smoke arm (the module's `trained` run) or resumes it


def params_of(model):
  return [np.asarray(x) for x in jax.tree.leaves(nnx.state(model, nnx.Param))]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  arm_dir = str(tmp_path_factory.mktemp("ckpt") / "rope")
  loop.train(SMOKE, arm_dir, progress=False)
  return arm_dir


def test_every_scheduled_step_is_saved_and_loads(trained):
  steps = checkpoints.available_steps(trained)
  assert steps == schedule.save_steps(SMOKE.steps, SMOKE.checkpoint.every) == [0, 1, 2, 4, 6]
  model0, cfg = checkpoints.load_model(trained, 0)
  assert cfg == SMOKE
  initial = [np.asarray(x) for x in jax.tree.leaves(loop.init_params(SMOKE.model, SMOKE.seed))]
  for a, b in zip(params_of(model0), initial):
    np.testing.assert_array_equal(a, b)
  latest, _ = checkpoints.load_model(trained)
  last, _ = checkpoints.load_model(trained, 6)
  for a, b in zip(params_of(latest), params_of(last)):
    np.testing.assert_array_equal(a, b)
  assert not all(np.array_equal(a, b) for a, b in zip(params_of(last), initial))
  with pytest.raises(ValueError, match=r"^step: no checkpoint 3 in .*available: \[0, 1, 2, 4, 6\]"):
    checkpoints.load_model(trained, 3)
  assert checkpoints.available_steps(os.path.join(trained, "nothing-here")) == []


def test_leftover_tmp_directory_is_ignored(trained, tmp_path):
  arm_dir = str(tmp_path / "rope")
  shutil.copytree(trained, arm_dir)
  ckpt = os.path.join(arm_dir, checkpoints.CHECKPOINTS)
  # what a save killed before its final rename leaves: a partial directory under the tmp name
  partial = os.path.join(ckpt, "8.orbax-checkpoint-tmp")
  shutil.copytree(os.path.join(ckpt, "6"), partial)
  shutil.rmtree(os.path.join(partial, "params"))
  assert checkpoints.available_steps(arm_dir) == [0, 1, 2, 4, 6]
  model, _ = checkpoints.load_model(arm_dir)
  reference, _ = checkpoints.load_model(trained, 6)
  for a, b in zip(params_of(model), params_of(reference)):
    np.testing.assert_array_equal(a, b)


KILL_DURING_SAVE = textwrap.dedent("""
  import os, sys
  from orbax.checkpoint._src.path import atomicity
  from train import cli, loop
  original = atomicity.AtomicRenameTemporaryPath.finalize
  async def finalize(self, *args, **kwargs):
    if os.path.basename(str(self.get_final())) == "4":   # everything written, not yet renamed
      os._exit(17)
    return await original(self, *args, **kwargs)
  atomicity.AtomicRenameTemporaryPath.finalize = finalize
  loop.train(cli.load("smoke", []).resolve("rope"), sys.argv[1], progress=False)
""")


@pytest.mark.slow
def test_run_killed_during_a_save_resumes_exactly(trained, tmp_path):
  arm_dir = str(tmp_path / "rope")
  proc = subprocess.run([sys.executable, "-c", KILL_DURING_SAVE, arm_dir], cwd=ROOT, capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 17, proc.stderr[-2000:]
  ckpt = os.listdir(os.path.join(arm_dir, checkpoints.CHECKPOINTS))
  assert "4" not in ckpt and any(name.startswith("4.orbax-checkpoint-tmp") for name in ckpt), ckpt
  assert checkpoints.available_steps(arm_dir) == [0, 1, 2]
  asked = []
  loop.train(SMOKE, arm_dir, progress=False, batch_fn=asking(asked))   # the same command again
  assert asked == [2, 3, 4, 5]   # resumed from step 2, the last complete save, not retrained from 0
  assert not any("tmp" in name for name in os.listdir(os.path.join(arm_dir, checkpoints.CHECKPOINTS)))
  assert checkpoints.available_steps(arm_dir) == [0, 1, 2, 4, 6]
  for step in (4, 6):
    assert_same_params(arm_dir, trained, step)


def test_run_directory_of_another_config_is_refused(trained, tmp_path):
  arm_dir = str(tmp_path / "rope")
  shutil.copytree(trained, arm_dir)
  with pytest.raises(C.ConfigError, match=r"^model.d_model: run directory .* holds a run with model.d_model=32, not 64"):
    loop.prepare_run_dir(arm_dir, C.override(SMOKE, {"model.d_model": 64}))
  with pytest.raises(C.ConfigError, match=r"^model.position.kind: "):
    loop.prepare_run_dir(arm_dir, C.override(SMOKE, {"model.position": "nope"}))
  loop.prepare_run_dir(arm_dir, C.override(SMOKE, {"steps": 12}))   # extending a run is allowed
  assert checkpoints.load_config(arm_dir).steps == 12


def test_a_run_directory_takes_another_eval_batch_and_says_so(trained, tmp_path, capsys, monkeypatch):
  """eval.batch only splits the held-out set into calls (what an evaluation out of memory needs
  lowered): a run goes on under another one, says so, and trains exactly as under its own."""
  arm_dir, reference = str(tmp_path / "rope"), str(tmp_path / "reference")
  shutil.copytree(trained, arm_dir)
  shutil.copytree(trained, reference)
  before = open(os.path.join(arm_dir, "eval.jsonl")).read()
  smaller = C.override(SMOKE, {"eval.batch": 1, "steps": 8})
  loop.train(smaller, arm_dir, progress=False)
  assert f"note: {arm_dir}: eval.batch {SMOKE.eval.batch} -> 1 in config.json" in capsys.readouterr().err
  assert checkpoints.load_config(arm_dir) == smaller
  loop.train(C.override(SMOKE, {"steps": 8}), reference, progress=False)
  assert_same_params(arm_dir, reference, 8)
  rows = open(os.path.join(arm_dir, "eval.jsonl")).read()
  assert rows.startswith(before) and [json.loads(l)["step"] for l in rows.splitlines()] == [4, 6, 8]
  # scoring checkpoints takes a batch of its own too (the default: the run's)
  asked = []
  monkeypatch.setattr(loop.evaluate, "accuracy", lambda model, examples, batch: asked.append(batch) or {"x": 1.0})
  os.remove(os.path.join(arm_dir, "eval.jsonl"))
  loop.score_checkpoints(arm_dir, batch=3)
  loop.score_checkpoints(reference)
  assert asked == [3] * 6 + [SMOKE.eval.batch] * 3   # every step of arm_dir; the reference's 0, 1 and 2


@pytest.mark.parametrize("how, says", [("flip", "differs from its checksum"), ("truncate", "cannot be read")])
def test_a_damaged_step_is_one_line_naming_it(trained, tmp_path, how, says):
  arm_dir = str(tmp_path / "rope")
  shutil.copytree(trained, arm_dir)
  damage(arm_dir, 6, how)
  with pytest.raises(checkpoints.DamagedCheckpoint) as err:
    checkpoints.load_model(arm_dir, 6)
  message = str(err.value)
  assert message.startswith("step 6 (") and says in message and "\n" not in message, message
  assert "redo it from the previous step" in message   # the latest step: training redoes it
  with pytest.raises(checkpoints.DamagedCheckpoint, match="go on without it"):
    damage(arm_dir, 2, how)
    checkpoints.load_model(arm_dir, 2)   # an earlier step cannot be redone in place
  checkpoints.load_model(arm_dir, 4)   # the others still load


def assert_same_params(arm_dir, reference_dir, step):
  """The params of `step` in two arm dirs are bit-identical (same program, same inputs)."""
  got, _ = checkpoints.load_model(arm_dir, step)
  want, _ = checkpoints.load_model(reference_dir, step)
  for a, b in zip(params_of(got), params_of(want)):
    np.testing.assert_array_equal(a, b)


def test_checksums_are_saved_with_every_step_and_old_steps_still_load(trained, tmp_path):
  for step in checkpoints.available_steps(trained):
    assert os.path.isdir(os.path.join(trained, checkpoints.CHECKPOINTS, str(step), "checksums"))
  arm_dir = str(tmp_path / "rope")
  shutil.copytree(trained, arm_dir)
  shutil.rmtree(os.path.join(arm_dir, checkpoints.CHECKPOINTS, "6", "checksums"))   # as saved before checksums
  assert_same_params(arm_dir, trained, 6)


def test_training_moves_a_damaged_latest_step_aside_and_redoes_it_exactly(trained, tmp_path, capsys):
  arm_dir = str(tmp_path / "rope")
  shutil.copytree(trained, arm_dir)
  damage(arm_dir, 6, "flip")
  loop.train(SMOKE, arm_dir, progress=False)
  err = capsys.readouterr().err
  assert err.startswith("note: step 6 (") and "moved to" in err and "resumes from the step before" in err, err
  assert os.listdir(os.path.join(arm_dir, checkpoints.DAMAGED)) == ["6"]   # kept, not deleted
  assert checkpoints.available_steps(arm_dir) == [0, 1, 2, 4, 6]
  assert_same_params(arm_dir, trained, 6)


def test_a_full_disk_during_a_save_is_one_line_and_resume_stays_exact(trained, tmp_path, monkeypatch):
  arm_dir = str(tmp_path / "rope")
  original = ocp.handlers.JsonCheckpointHandler._save_fn

  async def no_space_at_step_4(self, x, directory):
    if os.path.basename(os.path.dirname(str(directory))).startswith("4."):   # <arm>/checkpoints/4.<tmp>/<item>
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(directory))
    return await original(self, x, directory)

  monkeypatch.setattr(ocp.handlers.JsonCheckpointHandler, "_save_fn", no_space_at_step_4)
  with pytest.raises(checkpoints.RunError) as err:
    loop.train(SMOKE, arm_dir, progress=False)
  assert str(err.value).endswith("cannot save (No space left on device); nothing of step 4 was kept: make room and "
                                 "run the same command again, it resumes exactly from step 2"), str(err.value)
  assert checkpoints.available_steps(arm_dir) == [0, 1, 2]
  monkeypatch.setattr(ocp.handlers.JsonCheckpointHandler, "_save_fn", original)
  asked = []
  loop.train(SMOKE, arm_dir, progress=False, batch_fn=asking(asked))
  assert asked == [2, 3, 4, 5]   # resumed from step 2, as the message says, not retrained from 0
  assert checkpoints.available_steps(arm_dir) == [0, 1, 2, 4, 6]
  for step in (4, 6):
    assert_same_params(arm_dir, trained, step)


def test_a_first_save_that_fails_says_the_run_starts_again_from_step_0(tmp_path, monkeypatch):
  async def not_a_folder(self, x, directory):
    raise OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(directory))

  monkeypatch.setattr(ocp.handlers.JsonCheckpointHandler, "_save_fn", not_a_folder)
  with pytest.raises(checkpoints.RunError) as err:
    loop.train(SMOKE, str(tmp_path / "rope"), progress=False)
  assert str(err.value).endswith("cannot save (Not a directory); nothing of step 0 was kept: fix that and run the "
                                 "same command again, it starts again from step 0"), str(err.value)


def out_of_memory_at(step: int):
  """A batch function that fails at `step` as jax does when the device cannot allocate."""
  def batches(cfg, seed, s, rows=None):
    if s == step:
      raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 68719476736 bytes.\nat ...")
    return D.train_batch(cfg, seed, s, rows)
  return batches


def test_out_of_memory_before_any_step_leaves_nothing_that_refuses_smaller_settings(tmp_path, capsys):
  """The error says to lower the batch size; the same command with a lower one then trains in that
  directory (a config.json of the settings that did not fit would refuse it)."""
  arm_dir = str(tmp_path / "rope")
  assert cli_guarded(lambda: loop.train(SMOKE, arm_dir, progress=False, batch_fn=out_of_memory_at(0))) == 2
  assert capsys.readouterr().err.startswith("error: out of memory (RESOURCE_EXHAUSTED: Out of memory while trying "
                                            "to allocate 68719476736 bytes.); lower the batch size")
  assert sorted(os.listdir(arm_dir)) == [".lock"]
  smaller = C.override(SMOKE, {"data.batch_size": SMOKE.data.batch_size // 2})
  loop.train(smaller, arm_dir, progress=False)
  assert checkpoints.load_config(arm_dir) == smaller and checkpoints.available_steps(arm_dir) == [0, 1, 2, 4, 6]


def test_out_of_memory_of_a_planned_arm_leaves_nothing_that_refuses_smaller_settings(tmp_path, capsys):
  """Planning writes the arm's config.json before training starts; an arm that trained no step still
  loses it, and the experiment.json of the settings that did not fit gives way too."""
  out, arm_dir = str(tmp_path), tmp_path / "smoke" / "rope"
  larger = cli.load("smoke", ["model.d_model=64"])
  assert cli_guarded(lambda: paired.run_experiment(larger, out, arms=["rope"], batch_fn=out_of_memory_at(0),
                                                   progress=False)) == 2
  assert capsys.readouterr().err.startswith("error: out of memory (")
  assert sorted(os.listdir(arm_dir)) == [".lock"]
  smaller = cli.load("smoke", [])
  assert paired.plan(smaller, out, ["rope"])["rope"][0] == smaller.resolve("rope")
  assert json.load(open(tmp_path / "smoke" / "experiment.json"))["train"]["model"]["d_model"] == 32


def test_out_of_memory_after_trained_steps_keeps_them_and_says_how_to_go_on(trained, tmp_path):
  arm_dir = str(tmp_path / "rope")
  shutil.copytree(trained, arm_dir)
  longer = C.override(SMOKE, {"steps": 8})
  with pytest.raises(checkpoints.RunError) as err:
    loop.train(longer, arm_dir, progress=False, batch_fn=out_of_memory_at(7))
  assert str(err.value) == (
      f"{arm_dir}: out of memory (RESOURCE_EXHAUSTED: Out of memory while trying to allocate 68719476736 bytes.); "
      "its trained steps are kept, and a run directory takes no settings of its own but 'steps' and 'eval.batch': "
      "lower eval.batch if it ran out while evaluating, or train smaller ones (batch size, sequence length, model "
      "size) under another name or --out")
  assert checkpoints.available_steps(arm_dir) == [0, 1, 2, 4, 6]
  assert checkpoints.load_config(arm_dir) == longer
  new_dir = str(tmp_path / "new")   # and an arm new to the call that trained steps before it failed keeps them
  with pytest.raises(checkpoints.RunError, match="its trained steps are kept"):
    loop.train(SMOKE, new_dir, progress=False, batch_fn=out_of_memory_at(3))
  assert checkpoints.available_steps(new_dir) == [0, 1, 2]
  assert_same_params(new_dir, trained, 2)


def test_a_save_thread_not_yet_started_is_waited_for_not_an_error():
  """threading lists a thread before it starts, and joining it then raises RuntimeError: the
  failed-save cleanup waits for it to start and joins it instead."""
  import threading
  import time
  from train.checkpoints import _join_by
  done = []
  t = threading.Thread(target=lambda: done.append(1))
  starter = threading.Timer(0.1, t.start)
  starter.start()
  _join_by(t, time.monotonic() + 5.0)
  assert done == [1]
  starter.join()


def test_the_reads_a_failed_restore_abandoned_end_without_tracebacks(caplog, monkeypatch):
  """They end in tensorstore's threads after orbax's restore raised (the one line of a damaged step)."""
  shown = []
  monkeypatch.setattr(sys, "unraisablehook", shown.append)   # what Python would print; pytest's back after
  checkpoints._quiet_abandoned_io.cache_clear()
  checkpoints._quiet_abandoned_io()
  for text in ("Event loop is closed", "a failure of another kind"):
    sys.unraisablehook(types.SimpleNamespace(exc_value=RuntimeError(text)))
  assert [str(u.exc_value) for u in shown] == ["a failure of another kind"]
  log = logging.getLogger("asyncio")
  log.error("Future exception was never retrieved\nfuture: <Future finished exception=ValueError('OUT_OF_RANGE: "
            "Error reading \"blocks.0.attn.k.kernel.value/0.0\" in OCDBT database at local file ...')>")
  log.error("Task was destroyed but it is pending!")
  assert [r.getMessage() for r in caplog.records] == ["Task was destroyed but it is pending!"]
