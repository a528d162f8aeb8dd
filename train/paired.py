"""Experiments with several arms: one shared config and seed, per-arm overrides, arms trained in turn
(arms that differ only in seed can train as one stacked program: run_planned).

Every arm uses the same seed, so it gets the same batches and (the Decoder builds its position
module last) the same initial value of every tensor the arms share. Layout:
  <out>/<experiment>/experiment.json
  <out>/<experiment>/<arm>/{config.json, metrics.jsonl, eval.jsonl, checkpoints/<step>/}
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import subprocess
import sys
import tempfile
import time
from typing import Iterable

import jax

from minilm import atomic
from minilm import schema as C
from minilm.cli import child_env, last_error, stop
from train import checkpoints
from train import data as D
from train.config import ExperimentConfig, TrainConfig, load_experiment
from train.loop import (BatchFn, Diverged, check_run_dir, check_runnable, note, prepare_run_dir, primary, seedless,
                        stackable, train, train_stacked, writing)

STACK = ("auto", "on", "off")
DIVERGED_EXIT = 3   # `python -m train`'s exit code when an arm diverged


def experiment_dir(exp: ExperimentConfig, out: str) -> str:
  return os.path.join(out, exp.name)


def plan(exp: ExperimentConfig, out: str, arms: Iterable[str] | None = None) -> dict[str, tuple[TrainConfig, str]]:
  """{arm: (resolved config, arm directory)}, every arm and run directory checked before anything
  is written."""
  names = list(exp.arms) if arms is None else list(arms)
  for arm in names:
    C.check_choice("arms", arm, exp.arms)
  recorded(exp, out)   # refused before anything is written
  folder = experiment_dir(exp, out)
  runs = {arm: (exp.resolve(arm), os.path.join(folder, arm)) for arm in names}
  for cfg, arm_dir in runs.values():
    check_runnable(cfg)
    check_run_dir(arm_dir, cfg)
  os.makedirs(folder, exist_ok=True)
  # Two commands adding arms at once keep both: each reads the record again under the folder's lock,
  # before its own arms are prepared (so they do not count as trained), and writes it under the same.
  with atomic.serialized(folder) if primary() else contextlib.nullcontext():
    record = recorded(exp, out)
    with writing([arm_dir for _, arm_dir in runs.values()]):   # refused while another process trains an arm
      for cfg, arm_dir in runs.values():
        prepare_run_dir(arm_dir, cfg)
    if primary():
      atomic.write_json(os.path.join(folder, "experiment.json"), C.to_dict(record), indent=2)
  return runs


def recorded(exp: ExperimentConfig, out: str) -> ExperimentConfig:
  """What experiment.json is to record: `exp`, after the arms the file already lists when it records
  the same shared config but for checkpoints.CHANGEABLE (an arm in both takes `exp`'s overrides; the
  shared settings are `exp`'s). Refused where that would lose what the file says about an arm trained
  in the folder: another shared config, or other overrides for it; a shared config with no trained
  arm recorded is replaced."""
  path = os.path.join(experiment_dir(exp, out), "experiment.json")
  if not os.path.exists(path):
    return exp
  hint = "delete it (each arm's config.json keeps its own config) or use another --out"
  try:
    old = load_experiment(checkpoints.read_json(path, hint))
  except C.ConfigError as err:
    raise checkpoints.RunError(f"{path}: damaged, not an experiment ({err}); {hint}") from None
  trained = [a for a in old.arms if os.path.exists(os.path.join(experiment_dir(exp, out), a, "config.json"))]
  diff = checkpoints.first_difference(checkpoints.flat(C.to_dict(old.train)), checkpoints.flat(C.to_dict(exp.train)),
                                      (*checkpoints.CHANGEABLE, "name"))
  if diff and trained:
    key, was, now = diff
    raise C.ConfigError(f"{key}: {path} records arms {', '.join(trained)}, trained with {key}={was!r}, not {now!r}; "
                        f"the arms of one experiment share its config but for "
                        f"{' and '.join(map(repr, checkpoints.CHANGEABLE))} (add arms with the same settings, or use "
                        f"another name or --out)")
  if diff:
    return exp
  for arm in (a for a in trained if a in exp.arms):
    diff = checkpoints.run_difference(C.to_dict(old.resolve(arm)), exp.resolve(arm))
    if diff:
      key, was, now = diff
      raise C.ConfigError(f"arms.{arm}: {path} records the trained arm {arm!r} with {key}={was!r}, not {now!r} "
                          f"(give the arm another name, or use another --out)")
  return dataclasses.replace(exp, arms={**old.arms, **exp.arms})


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
  out = {}
  for group in units(runs, stack):
    cfgs, dirs = [runs[a][0] for a in group], [runs[a][1] for a in group]
    if len(group) > 1:
      why = stackable(cfgs)
      if why is None:
        out |= dict(zip(group, train_stacked(cfgs, dirs, batch_fn=batch_fn, progress=progress)))
        continue
      note(f"arms {', '.join(group)} train one after another, not stacked: {why}")
    for arm, cfg, arm_dir in zip(group, cfgs, dirs):
      try:
        out[arm] = train(cfg, arm_dir, batch_fn=batch_fn, progress=progress)
      except Diverged as err:
        out[arm] = {"diverged": str(err)}
  return {arm: out[arm] for arm in runs}


def units(runs: dict[str, tuple[TrainConfig, str]], stack: str) -> list[list[str]]:
  """What trains as one program: seed groups when stacking is on (`stack` 'auto' resolved for the
  default device), else one arm each."""
  C.check_choice("--stack-seeds", stack, STACK)
  if stack == "auto":
    stack = "off" if jax.default_backend() == "cpu" else "on"
  return seed_groups(runs) if stack == "on" else [[arm] for arm in runs]


def run_concurrently(exp: ExperimentConfig, out: str, runs: dict[str, tuple[TrainConfig, str]], *, jobs: int,
                     stack: str = "auto", tensorboard: bool = False, data_workers: int = 0) -> dict[str, dict]:
  """Train the planned arms in `jobs` processes at a time, one unit (`units`) each: arms that cannot
  share one program (other position encodings) still fill an accelerator together. Each process is
  `python -m train` on the experiment.json that `plan` wrote, with a 0.9/jobs share of accelerator
  memory, so every arm is the program a sequential run trains (on CPU bit for bit the same result).
  {arm: last rows, or {'diverged': message}}; a process that fails otherwise is a one-line RunError
  naming its arms and its last error line, raised after the others have finished."""
  check_jobs(jobs)
  config = os.path.join(experiment_dir(exp, out), "experiment.json")
  env = {**os.environ, "XLA_PYTHON_CLIENT_MEM_FRACTION": os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION",
                                                                          f"{0.9 / jobs:.3f}")}
  queue, running, failed = list(units(runs, stack)), [], []
  with tempfile.TemporaryDirectory() as logs:
    try:
      while queue or running:
        while queue and len(running) < jobs:
          unit = queue.pop(0)
          err = open(os.path.join(logs, f"{len(queue)}.err"), "w+")
          cmd = [sys.executable, "-m", "train", config, "--out", out, "--arms", ",".join(unit), "--no-progress",
                 "--stack-seeds", stack, "--data-workers", str(data_workers),
                 *(["--tensorboard"] if tensorboard else [])]
          running.append((unit, subprocess.Popen(cmd, env=child_env(env), stdout=subprocess.DEVNULL, stderr=err), err))
        time.sleep(0.2)
        for item in [r for r in running if r[1].poll() is not None]:
          running.remove(item)
          unit, proc, err = item
          err.seek(0)
          error = last_error(err)
          err.close()
          if proc.returncode not in (0, DIVERGED_EXIT):
            failed.append(f"arms {', '.join(unit)}: {error or f'exit {proc.returncode}'}")
    finally:   # interrupted (Ctrl-C, SIGTERM) or failed here: the arms' processes stop with this one
      stop([proc for _, proc, _ in running])
  if failed:
    raise checkpoints.RunError(failed[0])
  return {arm: _last_rows(arm_dir) for arm, (_, arm_dir) in runs.items()}


def check_jobs(jobs: int, distributed: bool = False) -> None:
  C.check(jobs >= 1, "--jobs", f"must be >= 1; got {jobs}")
  C.check(jobs == 1 or not distributed, "--jobs", "trains in processes of one host; not with --distributed")


def _last_rows(arm_dir: str) -> dict:
  """What `train` returns for an arm that a process trained: its last metrics and eval rows, or
  {'diverged': message}."""
  record = checkpoints.divergence(arm_dir)
  if record:
    return {"diverged": record["message"]}
  last = lambda name: ([r for _, r in atomic.read_jsonl(os.path.join(arm_dir, name))[0]] or [None])[-1]
  return {"metrics": last("metrics.jsonl"), "eval": last("eval.jsonl")}


def seed_groups(runs: dict[str, tuple[TrainConfig, str]]) -> list[list[str]]:
  """The arms grouped by their config without seed and name, groups in order of their first arm."""
  groups: dict[str, list[str]] = {}
  for arm, (cfg, _) in runs.items():
    groups.setdefault(seedless(cfg), []).append(arm)
  return list(groups.values())
