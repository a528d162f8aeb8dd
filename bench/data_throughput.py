"""Training-batch generation rate, per process and over worker processes, against what one
accelerator's train step consumes.

    .venv/bin/python bench/data_throughput.py [--config gpu] [--steps 40] [--workers 1,2,4] [--mfu 0.4]

Each stream (data.stream 'batch' and 'row') is timed on one process for --steps consecutive steps,
then in a pool of worker processes that each generate whole batches of other steps (batches are a
pure function of (seed, step), so any process can make any step). The step's consumption on one
accelerator is tokens/s = peak FLOP/s * MFU / (FLOPs per token), with FLOPs per token (forward +
backward) = 6 * N + 12 * L * T * d (bench/train_throughput.py; N non-embedding parameters).
"""
from __future__ import annotations

import argparse
import functools
import json
import multiprocessing
import os
import sys
import time

H100_BF16_DENSE = 989e12   # FLOP/s, H100 SXM bfloat16 dense (no sparsity), NVIDIA's datasheet


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--config", default="gpu", help="a configs/ name or a JSON file (arm: the first)")
  p.add_argument("--steps", type=int, default=40, help="steps timed per measurement")
  p.add_argument("--workers", default="1,2,4", help="worker-process counts to time")
  p.add_argument("--mfu", type=float, default=0.4, help="model FLOP utilisation assumed for the H100 step")
  args = p.parse_args()

  import dataclasses
  from train import cli, data as D
  exp = cli.load(args.config, [])
  cfg = exp.resolve(next(iter(exp.arms)))
  tokens_per_step = cfg.data.batch_size * cfg.data.seq_len
  flops = flops_per_token(cfg.model, cfg.data.seq_len)
  need = H100_BF16_DENSE * args.mfu / flops
  print(f"config {args.config}: batch {cfg.data.batch_size} x seq {cfg.data.seq_len}, mixture "
        f"{json.dumps({k: v for k, v in cfg.data.mixture.items() if v})}; cpu cores {os.cpu_count()}")
  print(f"H100 step: {flops / 1e6:.1f} MFLOP/token; {H100_BF16_DENSE / 1e12:.0f} TFLOP/s bf16 x MFU {args.mfu:.0%} "
        f"-> {need / 1e6:.2f}M tokens/s ({need / tokens_per_step:.1f} steps/s)")
  print(f"{'stream':>6} {'procs':>5} {'tokens/s':>12} {'per proc':>12} {'x H100 step':>11}")
  for stream in D.STREAMS:
    data_cfg = dataclasses.replace(cfg.data, stream=stream)
    make = functools.partial(D.train_batch, data_cfg, cfg.seed)
    make(0)   # loads the text corpus once, outside the clock
    for workers in [int(w) for w in args.workers.split(",")]:
      rate = tokens_per_step * args.steps / _time(make, args.steps, workers)
      print(f"{stream:>6} {workers:>5} {rate:12,.0f} {rate / workers:12,.0f} {rate / need:11.2f}", flush=True)


def flops_per_token(model_cfg, seq_len: int) -> float:
  """6 * N + 12 * L * T * d (bench/train_throughput.py), N: parameters less the token embedding."""
  import jax
  from flax import nnx
  from minilm.model import Decoder
  abstract = nnx.eval_shape(lambda: Decoder(model_cfg, rngs=nnx.Rngs(0)))
  n_all = sum(x.size for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
  n_nonembed = n_all - model_cfg.vocab_size * model_cfg.token_dim
  return 6 * n_nonembed + 12 * model_cfg.n_layers * seq_len * model_cfg.d_model


def _time(make, steps: int, workers: int) -> float:
  """Seconds to make `steps` batches on `workers` processes (1: this one), pool start-up excluded."""
  if workers == 1:
    start = time.perf_counter()
    for s in range(1, steps + 1):
      make(s)
    return time.perf_counter() - start
  with multiprocessing.get_context("spawn").Pool(workers) as pool:
    pool.map(make, range(steps + 1, steps + 1 + workers))   # warm: imports and the corpus in every worker
    start = time.perf_counter()
    for _ in pool.imap(make, range(1, steps + 1), chunksize=2):
      pass
    return time.perf_counter() - start


if __name__ == "__main__":
  sys.exit(main())
