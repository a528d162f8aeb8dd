"""Public pretraining trajectories: the checkpoints of one imported model family member, traced as
the steps of one arm, exactly as the lab traces its own runs (same store, statistics, emergence
plots and claims).

  python -m analysis trace pythia-70m/ --out reports/pythia-70m            # a folder of step<N> dirs
  python -m analysis trace ckpt/a ckpt/b ckpt/c --arm mine --out reports/t  # an ordered list of dirs

A trajectory is a folder whose sub-folders are named step<N> (the revisions Pythia, OLMo and
SmolLM2 publish), each a model minilm.importers.load reads (an HF directory or a .gguf), or an
ordered list of such model folders (steps from a step<N> in their names, else 0, 1, 2, ...). The
probes are held-out Shakespeare windows in the first checkpoint's tokenizer (analysis.studies.sources);
the wavelength boundary is each model's max_len. Nothing is downloaded: fetch the revisions first
(the README shows how).
"""
from __future__ import annotations

import os
import re

import numpy as np

from analysis.massive import stats as S
from analysis.massive import pipeline as PL
from analysis.massive import store as ST
from analysis.massive import trace as T
from analysis.studies import sources
from minilm import atomic, hooks
from minilm.schema import check

STEP_DIR = re.compile(r"^step(\d+)$")


def _step_dirs(path: str) -> dict[int, str]:
  """{step: folder} of the step<N> folders in `path` (files of such names are no checkpoints)."""
  return {int(m.group(1)): os.path.join(path, d) for d in os.listdir(path)
          if (m := STEP_DIR.match(d)) and os.path.isdir(os.path.join(path, d))}


def is_trajectory(path: str) -> bool:
  """Whether `path` is a folder of step<N> model folders."""
  return os.path.isdir(path) and bool(_step_dirs(path))


def checkpoints(paths: list[str]) -> dict[int, str]:
  """{step: model path} of one trajectory folder, or of an ordered list of model paths."""
  for p in paths:
    check(os.path.exists(p), "trajectory", f"{p} does not exist")
  if len(paths) == 1 and is_trajectory(paths[0]):
    return dict(sorted(_step_dirs(paths[0]).items()))
  named = [STEP_DIR.search(os.path.basename(os.path.normpath(p))) for p in paths]
  # steps from the names when every one has one, list positions when none has; a mix would number
  # the named ones by position without a word
  check(all(named) or not any(named), "trajectory", "name every model folder step<N> or none of them; "
        f"without a step: {', '.join(p for p, m in zip(paths, named) if not m)}")
  steps = [int(m.group(1)) for m in named] if all(named) else list(range(len(paths)))
  check(steps == sorted(set(steps)), "trajectory",
        f"the step<N> names must increase along the list without repeats; got {steps}")
  return dict(zip(steps, paths))


def arm_name(paths: list[str]) -> str:
  """A trajectory folder's own name, or the folder holding a list of model folders."""
  one = os.path.normpath(paths[0])
  return os.path.basename(one if len(paths) == 1 else os.path.dirname(one)) or "trajectory"


def trace_trajectory(paths: list[str], out_dir: str, *, arm: str | None = None, n_probes: int = 16,
                     length: int = 256, layout: str = "half", stat_cfg: S.StatConfig = S.StatConfig(),
                     batch_size: int = 4, steps=None, plots: bool = True, claims: bool = True,
                     log=print) -> ST.Store:
  """Trace every checkpoint of a trajectory as one arm into `out_dir` (resumable, like trace_run:
  steps whose sums read back whole are skipped)."""
  ckpts = checkpoints(paths)
  check(n_probes >= 2, "--probes", f"must be >= 2 (intervals resample prompts); got {n_probes}")
  check(batch_size >= 1, "--batch", f"must be >= 1; got {batch_size}")
  check(steps is None or len(steps) > 0, "--steps", "names no step; give at least one, or leave it out for every "
        "checkpoint")
  missing = sorted(set(steps or ()) - set(ckpts))
  check(not missing, "--steps", f"the trajectory has no step {', '.join(map(str, missing))}; "
        f"steps: {', '.join(map(str, ckpts))}")
  wanted = [s for s in ckpts if steps is None or s in steps]
  arm = arm or arm_name(paths)
  atomic.check_out_dir(out_dir)
  model, tok, _ = sources.load(ckpts[wanted[0]], layout)
  check(tok is not None, "trajectory", f"{ckpts[wanted[0]]} has no tokenizer.json, so no text probes can be made")
  PL.check_capture(model.cfg, ckpts[wanted[0]], length, min(batch_size, n_probes), stat_cfg)
  probes = sources.text_windows(tok, n_probes, length, heldout=True)
  store = ST.open_store(out_dir, probes, np.ones(probes.shape, np.float32), stat_cfg.drop_first, stat_cfg)
  keys = {hooks.name(layer, t) for layer in range(model.cfg.n_layers) for t in hooks.QKV}
  done = set(store.good_steps(arm, keys))
  loaded = {wanted[0]: model}   # the first checkpoint was loaded for its tokenizer
  for step in wanted:
    if step in done:
      continue
    model = loaded.pop(step, None) or sources.load(ckpts[step], layout)[0]
    T.record_step(store, model, arm, step, context=model.cfg.max_len, final=step == wanted[-1],
                  batch_size=batch_size)
    log(f"traced {arm} step {step}")
  if store.token_step(arm) != wanted[-1]:
    T.save_tokens(store, sources.load(ckpts[wanted[-1]], layout)[0], arm, wanted[-1])
  T.rebuild(store)
  PL.finish(store, plots=plots, claims=claims)
  return store
