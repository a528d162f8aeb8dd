"""TensorBoard events stay optional: rows map to scalars in pure Python, nothing is written or
imported unless enabled, and --tensorboard without tensorboardX is a one-line error before any work."""
from __future__ import annotations

import importlib.util
import os

import pytest

from analysis.lab import run as lab
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


def test_trained_arms_hold_no_events_unless_asked(tiny_run):
  assert not (tiny_run / "rope" / "tensorboard").exists()


@pytest.mark.parametrize("main", [train_cli.main, lab.main], ids=["python -m train", "minilm-lab"])
def test_the_flag_without_tensorboardx_is_one_line_before_any_work(main, without_tensorboardx, tmp_path, capsys):
  argv = ["smoke", "--tensorboard", "--out" if main is train_cli.main else "--runs", str(tmp_path / "runs")]
  assert main(argv) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: --tensorboard: needs tensorboardX") and err.count("\n") == 1
  assert os.listdir(tmp_path) == [] and TB.ENV not in os.environ
