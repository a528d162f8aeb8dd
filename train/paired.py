"""Experiments with several arms: one shared config and seed, per-arm overrides, arms trained in turn
(arms that differ only in seed can train as one stacked program: run_planned).

Every arm uses the same seed, so it gets the same batches and (the Decoder builds its position
module last) the same initial value of every tensor the arms share. Layout:
  <out>/<experiment>/experiment.json
  <out>/<experiment>/<arm>/{config.json, metrics.jsonl, eval.jsonl, checkpoints/<step>/}
"""
from __future__ import annotations

import os
from typing import Iterable

import jax

from minilm import atomic
from minilm import schema as C
from train import data as D
from train.config import ExperimentConfig, TrainConfig
from train.loop import (BatchFn, Diverged, check_run_dir, check_runnable, prepare_run_dir, primary, seedless, stackable,
                        train, train_stacked)

STACK = ("auto", "on", "off")


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
                   batch_fn: BatchFn = D.train_batch, progress: bool = True, stack: str = "auto") -> dict[str, dict]:
  """Train (or resume) the arms (run_planned); returns {arm: last metrics and eval rows}."""
  return run_planned(plan(exp, out, arms), batch_fn=batch_fn, progress=progress, stack=stack)


def run_planned(runs: dict[str, tuple[TrainConfig, str]], *, batch_fn: BatchFn = D.train_batch,
                progress: bool = True, stack: str = "auto") -> dict[str, dict]:
  """Train each arm in turn, or, with stacking, each group of arms that differ only in seed as one
  stacked program (train.loop.train_stacked). stack: 'on', 'off', or 'auto' (on where the default
  device is an accelerator, which one small arm leaves idle; off on CPU, where training one arm at a
  time keeps every arm bit-identical to a single run of it). A diverged arm does not stop the others: its entry is
  {'diverged': the one-line message} (the arm directory holds checkpoints.DIVERGED)."""
  C.check_choice("--stack-seeds", stack, STACK)
  if stack == "auto":
    stack = "off" if jax.default_backend() == "cpu" else "on"
  out = {}
  for group in seed_groups(runs) if stack == "on" else [[arm] for arm in runs]:
    cfgs, dirs = [runs[a][0] for a in group], [runs[a][1] for a in group]
    if len(group) > 1 and stackable(cfgs) is None:
      out |= dict(zip(group, train_stacked(cfgs, dirs, batch_fn=batch_fn, progress=progress)))
      continue
    for arm, cfg, arm_dir in zip(group, cfgs, dirs):
      try:
        out[arm] = train(cfg, arm_dir, batch_fn=batch_fn, progress=progress)
      except Diverged as err:
        out[arm] = {"diverged": str(err)}
  return {arm: out[arm] for arm in runs}


def seed_groups(runs: dict[str, tuple[TrainConfig, str]]) -> list[list[str]]:
  """The arms grouped by their config without seed and name, groups in order of their first arm."""
  groups: dict[str, list[str]] = {}
  for arm, (cfg, _) in runs.items():
    groups.setdefault(seedless(cfg), []).append(arm)
  return list(groups.values())
