"""Training-batch generation rate, per process and over worker processes, against what one
accelerator's train step consumes.

    .venv/bin/python bench/data_throughput.py [--config gpu] [--steps 40] [--workers 0,1,2,4] [--mfu 0.4]
        [--step-tokens-per-s R]

Each stream (data.stream 'batch' and 'row') is timed for --steps consecutive steps as the training
loop draws them: in the training process (0 workers), then through N worker processes
(train.prefetch.WorkerBatches, what `python -m train --data-workers N` runs; batches are a pure
function of (seed, step), so any process can make any step). The step's consumption on one
accelerator is tokens/s = peak FLOP/s * MFU / (FLOPs per token), with FLOPs per token (forward +
backward) = 6 * N + 12 * L * T * d (bench/train_throughput.py; N non-embedding parameters), unless
--step-tokens-per-s gives a rate measured on a device (bench/train_throughput.py at the config's shape).
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time

H100_BF16_DENSE = 989e12   # FLOP/s, H100 SXM bfloat16 dense (no sparsity), NVIDIA's datasheet


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--config", default="gpu", help="a configs/ name or a JSON file (arm: the first)")
  p.add_argument("--steps", type=int, default=40, help="steps timed per measurement")
  p.add_argument("--workers", default="0,1,2,4",
                 help="worker-process counts to time (0: in this process, as python -m train without --data-workers)")
  p.add_argument("--mfu", type=float, default=0.4, help="model FLOP utilisation assumed for the H100 step")
  p.add_argument("--step-tokens-per-s", type=float,
                 help="the step's rate measured on a device, instead of the estimate")
  args = p.parse_args()

  import dataclasses
  from train import cli, data as D
  exp = cli.load(args.config, [])
  cfg = exp.resolve(next(iter(exp.arms)))
  tokens_per_step = cfg.data.batch_size * cfg.data.seq_len
  print(f"config {args.config}: batch {cfg.data.batch_size} x seq {cfg.data.seq_len}, mixture "
        f"{json.dumps({k: v for k, v in cfg.data.mixture.items() if v})}; cpu cores {os.cpu_count()}")
  if args.step_tokens_per_s:
    need = args.step_tokens_per_s
    print(f"step: {need / 1e6:.2f}M tokens/s as measured ({need / tokens_per_step:.1f} steps/s)")
  else:
    flops = flops_per_token(cfg.model, cfg.data.seq_len)
    need = H100_BF16_DENSE * args.mfu / flops
    print(f"H100 step: {flops / 1e6:.1f} MFLOP/token; {H100_BF16_DENSE / 1e12:.0f} TFLOP/s bf16 x MFU {args.mfu:.0%} "
          f"-> {need / 1e6:.2f}M tokens/s ({need / tokens_per_step:.1f} steps/s)")
  print(f"{'stream':>6} {'workers':>7} {'tokens/s':>12} {'per proc':>12} {'x step':>8}")
  for stream in D.STREAMS:
    data_cfg = dataclasses.replace(cfg.data, stream=stream)
    make = functools.partial(D.train_batch, data_cfg, cfg.seed)
    make(0)   # loads the text corpus once, outside the clock
    for workers in [int(w) for w in args.workers.split(",")]:
      rate = tokens_per_step * args.steps / _time(make, args.steps, workers)
      print(f"{stream:>6} {workers:>7} {rate:12,.0f} {rate / max(workers, 1):12,.0f} {rate / need:8.2f}", flush=True)


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
  """Seconds to draw `steps` consecutive batches as the training loop does: in this process
  (workers 0), or through train.prefetch.WorkerBatches (steady state: pool start-up, corpus loading
  and the first steps in flight are not timed)."""
  if workers == 0:
    start = time.perf_counter()
    for s in range(1, steps + 1):
      make(s)
    return time.perf_counter() - start
  from train.prefetch import WorkerBatches
  with WorkerBatches(workers) as batch_fn:
    warm = 4 * workers
    for s in range(warm):
      batch_fn(*make.args, s)
    start = time.perf_counter()
    for s in range(warm, warm + steps):
      batch_fn(*make.args, s)
    return time.perf_counter() - start


if __name__ == "__main__":
  sys.exit(main())
