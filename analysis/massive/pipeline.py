"""Trace a run end to end: every checkpoint of every arm into the store, then its tables, plots and claims.

  trace_run      a paired run (or one arm) of `python -m train`, resumable
  analyze_model  any Decoder as one arm at one step (a pretrained import)
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import time

import numpy as np

from analysis.massive import claims as CL
from analysis.massive import plots as P
from analysis.massive import stats as S
from analysis.massive import trace as T
from analysis.massive.store import PROBE_SEED, Store, open_store, run_arms
from minilm import atomic, cache, hooks, paths
from minilm import schema as C
from minilm.schema import check
from train import checkpoints as ck
from train.data import check_seed
from train.data import probe_tokens
from train.tokenizer import ByteTokenizer


def analyze_model(model, probes_NxT, out_dir: str, *, mask_NxT=None, arm: str = "model", step: int = 0,
                  context: float | None = None, stat_cfg: S.StatConfig = S.StatConfig(),
                  batch_size: int = 16, plots: bool = True, claims: bool = True) -> Store:
  """A single model as one arm and one step: the same files a traced run gets (table, summary,
  plots, claims). For pretrained imports such as SmolLM2."""
  probes = np.asarray(probes_NxT, np.int32)
  mask = np.ones(probes.shape, np.float32) if mask_NxT is None else np.asarray(mask_NxT, np.float32)
  store = open_store(out_dir, probes, mask, stat_cfg.drop_first, stat_cfg)
  T.record_step(store, model, arm, step, context=context or probes.shape[1], final=True, batch_size=batch_size)
  T.rebuild(store)
  finish(store, plots=plots, claims=claims)
  return store


def finish(store: Store, *, plots: bool = True, claims: bool = True, rope_arm=None, nope_arm=None) -> None:
  """Figures and verdicts from the rebuilt tables. Without plots (claims), the figures (verdicts) of
  an earlier trace in the folder are removed: they were drawn from other tables."""
  if plots:
    P.plot_all(store)
  else:
    P.remove_all(store)
  if claims:
    CL.write_claims(CL.judge(store, rope_arm=rope_arm, nope_arm=nope_arm), store.root)
  else:
    for name in ("claims.json", "claims.md"):
      if os.path.exists(store.path(name)):
        os.remove(store.path(name))


def check_capture(model_cfg, model: str, length: int, batch: int, stat_cfg: S.StatConfig, *,
                  fields: tuple[str, str, str] = ("--length", "--batch", "")) -> None:
  """Probes of `length` tokens, `batch` at a time, through `model_cfg` (it takes them, memory holds
  them), and top_k/agree_k within its heads: one line each, before anything is written. `fields`: the
  length's and batch's names and the statistics' prefix, as the caller spells them."""
  length_field, batch_field, stats_prefix = fields
  T.check_length(model_cfg, length, batch, length_field, batch_field)
  S.check_head_dim(stat_cfg, model_cfg.dim_per_head, model, stats_prefix)


@dataclasses.dataclass(frozen=True)
class RunPlan:
  """What trace_run will capture, every input checked before anything is written."""
  arms: dict[str, str]             # arm name -> arm dir
  configs: dict                    # arm name -> TrainConfig
  wanted: dict[str, list[int]]     # arm name -> checkpoint steps to capture
  length: int


def plan_run(run_dir: str, *, n_probes: int, length: int | None, batch_size: int, steps=None,
             probe_seed: int = PROBE_SEED, stat_cfg: S.StatConfig = S.StatConfig()) -> RunPlan:
  """Check a trace request against the run on disk (one line per problem) without writing."""
  check(n_probes >= 2, "--probes", f"must be >= 2 (intervals resample prompts); got {n_probes}")
  check_seed(probe_seed, "--probe-seed")
  check(batch_size >= 1, "--batch", f"must be >= 1; got {batch_size}")
  check(steps is None or len(steps) > 0, "--steps", "names no step; give at least one, or leave it out for every "
        "checkpoint")
  chosen = run_arms(run_dir)
  configs = {arm: ck.load_config(arm_dir) for arm, arm_dir in chosen.items()}
  available = {arm: ck.available_steps(arm_dir) for arm, arm_dir in chosen.items()}
  empty = [arm for arm, steps_ in available.items() if not steps_]
  check(len(empty) < len(chosen), "run_dir", f"arm {empty[0]!r} has no complete checkpoint in "
        f"{chosen[empty[0]]}/checkpoints" if len(empty) == 1 else f"no arm of {run_dir} has a complete checkpoint")
  for arm in empty:   # e.g. traced while training goes on: the arms not started yet come later
    print(f"note: arm {arm!r} has no checkpoint yet; it is not traced", file=sys.stderr)
    del chosen[arm], configs[arm]
  wanted = {}
  for arm, arm_dir in chosen.items():
    missing = sorted(set(steps or ()) - set(available[arm]))
    check(not missing, "--steps", f"arm {arm!r} has no checkpoint {', '.join(map(str, missing))}; "
          f"available: {', '.join(map(str, available[arm]))}")
    wanted[arm] = [s for s in available[arm] if steps is None or s in steps]
  length = min(cfg.data.seq_len for cfg in configs.values()) if length is None else length
  for arm, cfg in configs.items():
    check_capture(cfg.model, f"arm {arm!r}", length, min(batch_size, n_probes), stat_cfg)
  return RunPlan(chosen, configs, wanted, length)


def run_key(cfg) -> str:
  """What identifies an arm's training, the settings that extend a run (checkpoints.CHANGEABLE) aside."""
  return cache.key(sorted((k, v) for k, v in ck.flat(C.to_dict(cfg)).items() if k not in ck.CHANGEABLE))


def same_training(facts: dict, cfg) -> bool:
  """Whether an arm's facts in meta.json are of this training (a trace older than the seed or key it
  records: as far as it tells)."""
  return facts.get("seed", cfg.seed) == cfg.seed and facts.get("run_key", run_key(cfg)) == run_key(cfg)


def check_source(out_dir: str, run_dir: str, plan: RunPlan) -> None:
  """A trace in `out_dir` resumes only the run it was traced from: the same folder (where the one it
  records still exists; a run moved elsewhere is known by its arms) and, for each arm both hold, the
  same seed and config. Sums of two runs would otherwise sit side by side as one."""
  meta = Store(out_dir).meta()
  held = meta.get("run_dir")
  if not held:
    return
  if os.path.exists(held) and not os.path.samefile(held, run_dir):
    why = f"a trace of {held}"
  else:
    other = [arm for arm, facts in meta.get("arms", {}).items() if arm in plan.configs and
             not same_training(facts, plan.configs[arm])]
    why = f"a trace of another run of {held} (arm {other[0]!r}: another seed or config)" if other else ""
  check(not why, "--out", f"{out_dir} holds {why}; give another --out or remove it")


def trace_run(run_dir: str, out_dir: str | None = None, *, n_probes: int = 64, length: int | None = None,
              probe_seed: int = PROBE_SEED, stat_cfg: S.StatConfig = S.StatConfig(), batch_size: int = 16,
              steps=None, plots: bool = True, claims: bool = True, rope_arm=None, nope_arm=None,
              log=print) -> Store:
  """Restore every checkpoint of every arm that did not diverge, capture the probes, write
  table/summary/plots/claims.

  Resumable, deciding from what is on disk: (arm, step) whose sums read back whole are skipped, a
  damaged sums file is redone, and each arm's token view is redone unless it holds its last step.
  The probe set comes from the first arm's data config (train.data.probe_tokens), length defaulting
  to the shortest seq_len of the arms; it is saved as probes.npy and reused on later runs. Each arm's
  wavelength boundary is its own training seq_len (a context sweep moves it).
  """
  t0 = time.perf_counter()
  plan = plan_run(run_dir, n_probes=n_probes, length=length, batch_size=batch_size, steps=steps,
                  probe_seed=probe_seed, stat_cfg=stat_cfg)
  CL.check_arms({arm: {"position": cfg.model.position.kind, "seed": cfg.seed} for arm, cfg in plan.configs.items()},
                rope_arm, nope_arm, run_dir)
  out_dir = out_dir or os.path.join(run_dir, "analysis")
  atomic.check_out_dir(out_dir)
  with atomic.exclusive(out_dir):   # a second trace into the same folder meanwhile is refused in one line
    check_source(out_dir, run_dir, plan)
    if os.path.exists(os.path.join(out_dir, "probes.npy")):   # resuming: the probes must be those asked for
      held = Store(out_dir)
      probes, stored_seed = held.probes(), held.meta().get("probe_seed", probe_seed)
      check(probes.shape == (n_probes, plan.length) and stored_seed == probe_seed, "--out",
            f"{out_dir} holds a trace of {probes.shape[0]} probes of {probes.shape[1]} tokens (probe seed "
            f"{stored_seed}), not {n_probes} of {plan.length} (seed {probe_seed}): give its settings to resume it, "
            f"or another --out")
    else:
      first = next(iter(plan.configs.values()))
      probes = np.asarray(probe_tokens(first.data, probe_seed, n_probes, plan.length), np.int32)
    mask = (probes != ByteTokenizer().PAD).astype(np.float32)
    store = open_store(out_dir, probes, mask, stat_cfg.drop_first, stat_cfg,
                       {"run_dir": paths.portable(run_dir), "probe_seed": probe_seed})
    timing = {"restore_s": 0.0, "forward_s": 0.0, "compile_forward_s": 0.0, "traced": 0, "skipped": 0}
    for arm, arm_dir in plan.arms.items():
      context, wanted = plan.configs[arm].data.seq_len, plan.wanted[arm]
      keys = {hooks.name(layer, t) for layer in range(plan.configs[arm].model.n_layers) for t in hooks.QKV}
      done = set(store.good_steps(arm, keys))
      last = max([*wanted, *done])   # the token view shows the latest step the trace holds, not this run's last
      for step in wanted:
        if step in done:
          timing["skipped"] += 1
          continue
        t = time.perf_counter()
        model, _ = ck.load_model(arm_dir, step)
        timing["restore_s"] += time.perf_counter() - t
        T.record_step(store, model, arm, step, context=context, final=step == last, batch_size=batch_size,
                      timing=timing)
        timing["traced"] += 1
        log(f"traced {arm} step {step}")
      if store.token_step(arm) != last:   # e.g. killed between the last step's sums and its view
        T.save_tokens(store, ck.load_model(arm_dir, last)[0], arm, last)
    meta = store.meta()   # each arm's seed: the claims judge an arm against the NoPE arm of its own seed
    for arm in plan.arms:
      if arm in meta["arms"]:
        meta["arms"][arm].update(seed=plan.configs[arm].seed, run_key=run_key(plan.configs[arm]))
    store.write_json("meta.json", meta)
    t = time.perf_counter()
    T.rebuild(store, arms=list(plan.arms))
    timing["stats_s"] = time.perf_counter() - t
    t = time.perf_counter()
    finish(store, plots=plots, claims=claims, rope_arm=rope_arm, nope_arm=nope_arm)
    timing["plots_claims_s"] = time.perf_counter() - t
    timing["total_s"] = time.perf_counter() - t0
    timing["forward_fraction"] = (timing["forward_s"] + timing["compile_forward_s"]) / timing["total_s"]
    with open(store.path("timing.jsonl"), "a") as f:   # a log, one line per invocation: appending is its update
      f.write(json.dumps(timing) + "\n")
    return store
