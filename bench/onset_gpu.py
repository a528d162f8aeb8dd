"""One-shot accelerator run of the onset study: the paired RoPE/NoPE arms of configs/onset_gpu.json,
trained to a wall-clock deadline, traced, judged (C1-C4) and put through analysis.studies.onset.

    python bench/onset_gpu.py --out OUT [--budget-s 480] [--fit reports/onset_map/onset/fit.json]
    python bench/onset_gpu.py --estimate          # the arithmetic below, then exit
    python bench/onset_gpu.py --tiny --out OUT    # the same end to end on CPU in seconds

Training is train.loop.train, arm after arm, with checkpoints log-spaced (checkpoint.every). Each arm
gets an equal share of what is left of the budget after RESERVE_S (trace, claims, figures); at its
deadline the batch function stops the loop and the arm keeps the checkpoints it saved, so a slow
machine gives a shorter but complete result. OUT receives at most 8 files: run.json (estimate,
steps reached, measured rates, the prediction of --fit against the measured values), claims.json,
trace_summary.json, emergence.png, and the onset outputs (onset_table.csv, fit.json,
concentration.png, pair_profile.png).

Estimate: FLOPs per step = (6 N + 12 L T d) B T (N non-embedding parameters; the attention term
counts full T x T scores, as bench/train_throughput.py does), at MFU of the peak (H100/H200 bfloat16
dense); the host makes batches while the device steps (async dispatch), so a step takes the longer
of that and the batch time measured here.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time

import jax
from absl import logging

from analysis.massive import pipeline as PL
from analysis.massive import plots as P
from analysis.studies import onset
from minilm import atomic
from minilm.schema import override, to_dict
from train import checkpoints as ck
from train import data as D
from train import loop, paired
from train.config import load_experiment
from train_throughput import accelerator_peak

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PEAK, MFU = 989e12, 0.30
"""Assumed for the estimate: 30% of an H100/H200's bfloat16 dense peak, 989 TFLOP/s."""
RESERVE_S, COMPILE_S = 180.0, 30.0
"""Seconds kept for trace + claims + figures (the trace's summary bootstraps about 1200 layer x tensor
groups, 0.05-0.1 s each on one CPU core), and allowed per arm for compiling its step."""
TINY = {"model.d_model": 32, "model.n_layers": 2, "model.n_heads": 2, "model.max_len": 64, "model.dtype": "float32",
        "data.seq_len": 64, "data.batch_size": 4, "data.mixture": {"kb_facts": 1.0, "text": 1.0},
        "data.text_source": "shakespeare", "steps": 4,
        "log_every": 4, "checkpoint.every": 2, "eval.n_per_family": 0}


class Deadline(Exception):
  """The arm's wall-clock share is spent; raised by the batch function, ending train.loop."""


def estimate(exp, budget_s: float) -> dict:
  """FLOPs per step, the assumed rate, the measured batch time and the steps reachable per arm."""
  cfg = exp.resolve(next(iter(exp.arms)))
  n = sum(x.size for x in jax.tree.leaves(ck.abstract_model(cfg.model)[1]))
  m, B, T = cfg.model, cfg.data.batch_size, cfg.data.seq_len
  n_nonemb = n - m.vocab_size * m.token_dim
  flops = (6 * n_nonemb + 12 * m.n_layers * T * m.d_model) * B * T
  D.train_batch(cfg.data, cfg.seed, 0)   # loads the corpus once
  t = time.perf_counter()
  for s in (1, 2):
    D.train_batch(cfg.data, cfg.seed, s)
  batch_s = (time.perf_counter() - t) / 2
  step_s = max(flops / (MFU * PEAK), batch_s)
  train_s = max(budget_s - RESERVE_S - COMPILE_S * len(exp.arms), 0) / len(exp.arms)
  return {"params": n, "non_embedding": n_nonemb, "tokens_per_step": B * T, "flops_per_step": flops,
          "assumed": f"MFU {MFU:.0%} of {PEAK / 1e12:.0f} TFLOP/s (H100/H200 bfloat16 dense)",
          "compute_step_s": flops / (MFU * PEAK), "batch_s_measured": batch_s, "step_s": step_s,
          "train_s_per_arm": train_s, "steps_reachable": int(train_s / step_s), "steps_config": cfg.steps,
          "wall_s": len(exp.arms) * (COMPILE_S + min(cfg.steps, train_s / step_s) * step_s) + RESERVE_S}


def train_arms(runs: dict, end: float) -> dict:
  """train.loop.train of each arm until its share of the time left before `end`."""
  out = {}
  for i, (arm, (cfg, arm_dir)) in enumerate(runs.items()):
    deadline = time.monotonic() + (end - time.monotonic()) / (len(runs) - i)
    reached = {"step": ck.available_steps(arm_dir)[-1] if ck.available_steps(arm_dir) else 0}

    def batch_fn(data_cfg, seed, step, rows=None, deadline=deadline, reached=reached):
      if time.monotonic() > deadline:
        raise Deadline()
      reached["step"] = step + 1
      return D.train_batch(data_cfg, seed, step, rows)
    start = time.monotonic()
    try:
      loop.train(cfg, arm_dir, batch_fn=batch_fn, progress=False)
      stopped = False
    except Deadline:
      stopped = True
    rates = [r["tokens_per_s"] for _, r in atomic.read_jsonl(os.path.join(arm_dir, "metrics.jsonl"))[0][1:]]
    out[arm] = {"stopped_by_deadline": stopped, "steps_trained": reached["step"],
                "last_checkpoint": ck.available_steps(arm_dir)[-1], "train_s": time.monotonic() - start,
                "tokens_per_s_median": statistics.median(rates) if rates else None}
  return out


def prediction(rows: list[dict], fit_path: str | None) -> dict | None:
  """This run's checkpoints against the laws in `fit_path` (another run's fit; onset.PREDICTION_RULE)."""
  return onset.check_prediction(rows, onset.load_fits(fit_path)) if fit_path else None


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--config", default=os.path.join(ROOT, "configs", "onset_gpu.json"))
  p.add_argument("--out", help="folder for the (at most 8) result files")
  p.add_argument("--work", default=os.path.join(ROOT, "runs"), help="where the runs and the trace go")
  p.add_argument("--budget-s", type=float, default=480.0, help="wall-clock seconds for everything")
  p.add_argument("--fit", default=None, help="a fit.json of python -m analysis onset to test against")
  p.add_argument("--probes", type=int, default=32)
  p.add_argument("--estimate", action="store_true", help="print the estimate and exit")
  p.add_argument("--tiny", action="store_true", help="a tiny model on CPU, end to end")
  args = p.parse_args(argv)
  t0 = time.monotonic()
  logging.set_verbosity(logging.ERROR)   # orbax's read-only managers warn once per restored checkpoint
  with open(args.config) as f:
    exp = load_experiment(json.load(f))
  if args.tiny:
    exp = override(exp, {"name": exp.name + "_tiny", "train": to_dict(override(exp.train, TINY))})
  est = estimate(exp, args.budget_s)
  print(json.dumps(est, indent=1), flush=True)
  if args.estimate:
    return
  if not args.out:
    sys.exit("error: --out: required unless --estimate")
  atomic.check_out_dir(args.out)
  runs = paired.plan(exp, args.work)
  arms = train_arms(runs, t0 + args.budget_s - RESERVE_S)
  on_cpu = jax.default_backend() == "cpu"
  peak = None if on_cpu else accelerator_peak(jax.devices()[0].device_kind, exp.train.model.dtype)
  for a in arms.values():   # the measured counterpart of the estimate's assumed MFU
    a["mfu"] = (a["tokens_per_s_median"] * est["flops_per_step"] / est["tokens_per_step"] / peak
                if peak and a["tokens_per_s_median"] else None)
  exp_dir = paired.experiment_dir(exp, args.work)
  trace_dir = os.path.join(args.work, exp.name + "_trace")
  print(f"trained in {time.monotonic() - t0:.0f} s: {json.dumps(arms)}", flush=True)
  store = PL.trace_run(exp_dir, trace_dir, n_probes=args.probes, batch_size=min(16, args.probes), plots=False,
                       log=lambda _: None)
  P.emergence(store)
  print(f"traced in {time.monotonic() - t0:.0f} s", flush=True)
  rows = onset.table(trace_dir, exp_dir)
  with atomic.staged_dir(args.out, owns=("run.json",)) as out:
    data = onset.write(rows, out, n_boot=200, source={"run_dir": exp_dir, "trace_dir": trace_dir})
    for src, name in (("claims.json", "claims.json"), ("summary.json", "trace_summary.json"),
                      (os.path.join("plots", "emergence.png"), "emergence.png")):
      if os.path.getsize(store.path(src)) < 16 * 2**20:
        shutil.copy(store.path(src), os.path.join(out, name))
    atomic.write_json(os.path.join(out, "run.json"), {
        "config": to_dict(exp), "tiny": args.tiny, "device": str(jax.devices()[0]), "estimate": est, "arms": arms,
        "prediction": prediction(rows, args.fit), "onset": onset.summary_lines(data),
        "wall_s": time.monotonic() - t0, "budget_s": args.budget_s})
  print("\n".join(onset.summary_lines(data) + [f"wrote {args.out} in {time.monotonic() - t0:.0f} s"]))


if __name__ == "__main__":
  main()
