"""Experiments with several arms: one shared config and seed, per-arm overrides, arms trained in turn.

Every arm uses the same seed, so it gets the same batches and (the Decoder builds its position
module last) the same initial value of every tensor the arms share. Layout:
  <out>/<experiment>/experiment.json
  <out>/<experiment>/<arm>/{config.json, metrics.jsonl, eval.jsonl, checkpoints/<step>/}
"""
from __future__ import annotations

import os
from typing import Iterable

from minilm import atomic
from minilm import schema as C
from train import data as D
from train.config import ExperimentConfig, TrainConfig
from train.loop import BatchFn, Diverged, check_run_dir, check_runnable, prepare_run_dir, primary, train


def experiment_dir(exp: ExperimentConfig, out: str) -> str:
  return os.path.join(out, exp.name)


def plan(exp: ExperimentConfig, out: str, arms: Iterable[str] | None = None) -> dict[str, tuple[TrainConfig, str]]:
  """{arm: (resolved config, arm directory)}, every arm and run directory checked before anything
  is written."""
  names = list(exp.arms) if arms is None else list(arms)
  for arm in names:
    C.check_choice("arms", arm, exp.arms)
  runs = {arm: (exp.resolve(arm), os.path.join(experiment_dir(exp, out), arm)) for arm in names}
  for cfg, arm_dir in runs.values():
    check_runnable(cfg)
    check_run_dir(arm_dir, cfg)
  for cfg, arm_dir in runs.values():
    prepare_run_dir(arm_dir, cfg)
  if primary():
    atomic.write_json(os.path.join(experiment_dir(exp, out), "experiment.json"), C.to_dict(exp), indent=2)
  return runs


def run_experiment(exp: ExperimentConfig, out: str = "runs", *, arms: Iterable[str] | None = None,
                   batch_fn: BatchFn = D.train_batch, progress: bool = True) -> dict[str, dict]:
  """Train (or resume) each arm one after another; returns {arm: last metrics and eval rows}."""
  return run_planned(plan(exp, out, arms), batch_fn=batch_fn, progress=progress)


def run_planned(runs: dict[str, tuple[TrainConfig, str]], *, batch_fn: BatchFn = D.train_batch,
                progress: bool = True) -> dict[str, dict]:
  """Train each arm in turn. A diverged arm does not stop the others: its entry is {'diverged': the
  one-line message} (the arm directory holds checkpoints.DIVERGED)."""
  out = {}
  for arm, (cfg, arm_dir) in runs.items():
    try:
      out[arm] = train(cfg, arm_dir, batch_fn=batch_fn, progress=progress)
    except Diverged as err:
      out[arm] = {"diverged": str(err)}
  return out
