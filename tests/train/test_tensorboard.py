"""TensorBoard events stay optional: rows map to scalars in pure Python, nothing is written or
imported unless enabled, and --tensorboard without tensorboardX is a one-line error before any work."""
from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys
import types

import pytest

from analysis.lab import run as lab
from minilm import atomic
from train import cli as train_cli, tensorboard as TB


@pytest.fixture
def without_tensorboardx(monkeypatch):
  real = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboardX" else real(name, *a))
  monkeypatch.delenv(TB.ENV, raising=False)


def test_a_metrics_row_becomes_one_scalar_per_number():
  row = {"step": 40, "loss": 2.5, "grad_norm": float("nan"), "lr": 1e-3, "tokens": 5120, "note": "x", "ok": True}
  assert TB.scalars(row, "train") == {"train/loss": 2.5, "train/lr": 1e-3, "train/tokens": 5120.0,
                                      "train/grad_norm": pytest.approx(float("nan"), nan_ok=True)}
  scores = {"passkey": {"accuracy": 0.5, "n": 64}, "mean": 0.25}
  assert TB.scalars(scores, "eval") == {"eval/passkey/accuracy": 0.5, "eval/passkey/n": 64.0, "eval/mean": 0.25}


def test_a_summary_group_becomes_its_layer_scalars():
  group = {"arm": "rope", "step": 200, "layer": 3, "tensor": "rot_k", "heads": 4,
           "stats": {"massive": [1.5, 1.0, 2.0], "max_mean": [7.0, 6.0, 8.0], "lf_share": [0.6, 0.5, 0.7],
                     "kurtosis": [3.0, 2.0, 4.0]}}
  assert TB.trace_scalars(group) == {"massive/rot_k/layer3": 1.5, "max_mean/rot_k/layer3": 7.0,
                                     "lf_share/rot_k/layer3": 0.6}


def test_off_by_default_nothing_is_written(tmp_path, monkeypatch):
  monkeypatch.delenv(TB.ENV, raising=False)
  with TB.writer(str(tmp_path / "events"), purge_step=3) as events:
    events.add({"train/loss": 1.0}, 1)
  TB.write_trace(str(tmp_path / "trace"), [{"arm": "rope", "step": 0, "layer": 0, "tensor": "q", "stats": {}}])
  assert os.listdir(tmp_path) == []


@pytest.fixture
def fake_tensorboardx(monkeypatch):
  """tensorboardX (not a test dependency) as a module whose SummaryWriter records its calls; enabled
  through enable(), the environment variable restored afterwards. Yields the list of writers made."""
  made = []

  class SummaryWriter:
    def __init__(self, logdir, purge_step=None, flush_secs=120):
      self.logdir, self.purge_step, self.scalars, self.closed = logdir, purge_step, [], False
      made.append(self)

    def add_scalar(self, tag, value, step):
      self.scalars.append((tag, value, step))

    def close(self):
      self.closed = True

  module = types.ModuleType("tensorboardX")
  module.SummaryWriter = SummaryWriter
  module.__spec__ = importlib.machinery.ModuleSpec("tensorboardX", None)
  monkeypatch.setitem(sys.modules, "tensorboardX", module)
  monkeypatch.setenv(TB.ENV, "0")   # restored (removed) after the test, whatever enable() sets
  TB.enable()
  assert TB.enabled()
  yield made


def test_enabled_the_writer_adds_each_scalar_at_its_step_and_closes(fake_tensorboardx, tmp_path):
  """writer() makes one SummaryWriter in logdir with the resumed run's purge_step; add() passes each
  (tag, value, step) as given; leaving the block closes it."""
  logdir = str(tmp_path / "events")
  with TB.writer(logdir, purge_step=30) as events:
    events.add({"train/loss": 2.5}, 40)
    events.add(TB.scalars({"step": 50, "loss": 2.0, "lr": 1e-3}, "train"), 50)
    assert [(w.logdir, w.purge_step, w.closed) for w in fake_tensorboardx] == [(logdir, 30, False)]
  events, = fake_tensorboardx
  assert events.scalars == [("train/loss", 2.5, 40), ("train/loss", 2.0, 50), ("train/lr", 1e-3, 50)]
  assert events.closed
  with TB.writer(logdir) as again:
    again.add({}, 0)
  assert [(w.logdir, w.purge_step, w.scalars) for w in fake_tensorboardx[1:]] == [(logdir, None, [])]


def test_enabled_write_trace_writes_each_arm_at_its_training_steps(fake_tensorboardx, tmp_path):
  """write_trace: one closed writer per arm, in <folder>/<arm> once staged, each group's head-mean
  scalars at the group's training step (never its layer)."""
  def group(arm, step, layer, massive):
    return {"arm": arm, "step": step, "layer": layer, "tensor": "rot_k", "heads": 4,
            "stats": {"massive": [massive, 0.0], "max_mean": [7.0, 6.0], "lf_share": [0.5, 0.25]}}
  folder = tmp_path / "trace"
  TB.write_trace(str(folder), [group("rope", 200, 3, 1.5), group("nope", 200, 1, 2.0), group("rope", 400, 1, 3.0)])
  assert [(os.path.basename(w.logdir), w.closed) for w in fake_tensorboardx] == [("rope", True), ("nope", True)]
  # written in the staging folder, which then becomes `folder`
  assert {os.path.dirname(w.logdir) for w in fake_tensorboardx} == {str(folder) + atomic.PARTIAL}
  assert folder.is_dir()
  rope, nope = fake_tensorboardx
  assert rope.scalars == [("massive/rot_k/layer3", 1.5, 200), ("max_mean/rot_k/layer3", 7.0, 200),
                          ("lf_share/rot_k/layer3", 0.5, 200), ("massive/rot_k/layer1", 3.0, 400),
                          ("max_mean/rot_k/layer1", 7.0, 400), ("lf_share/rot_k/layer1", 0.5, 400)]
  assert nope.scalars == [("massive/rot_k/layer1", 2.0, 200), ("max_mean/rot_k/layer1", 7.0, 200),
                          ("lf_share/rot_k/layer1", 0.5, 200)]


def test_trained_arms_hold_no_events_unless_asked(tiny_run):
  assert not (tiny_run / "rope" / "tensorboard").exists()


@pytest.mark.parametrize("main", [train_cli.main, lab.main], ids=["python -m train", "minilm-lab"])
def test_the_flag_without_tensorboardx_is_one_line_before_any_work(main, without_tensorboardx, tmp_path, capsys):
  argv = ["smoke", "--tensorboard", "--out" if main is train_cli.main else "--runs", str(tmp_path / "runs")]
  assert main(argv) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: --tensorboard: needs tensorboardX") and err.count("\n") == 1
  assert os.listdir(tmp_path) == [] and TB.ENV not in os.environ
