"""Training throughput and model FLOP utilisation (MFU) of the real train step, three model sizes.

    .venv/bin/python bench/train_throughput.py [--sizes 1m,5m,25m] [--steps 5] [--xla-flags '...']

MFU = tokens/s * FLOPs per token / peak FLOP/s: on an accelerator its datasheet peak for the compute
dtype (PEAKS, dense, no sparsity; jax runs float32 matmuls as TF32 on NVIDIA GPUs and as bfloat16
passes on TPUs, hence those float32 peaks), on CPU the float32 matmul rate measured here (2048^3).
FLOPs per token (forward + backward) = 6 * N + 12 * L * T * d, with N the non-embedding
parameters (the tied embedding/logit matmul is not counted), L layers, T sequence length, d width.
Batches are random tokens (weights 1): this measures the model step, not data generation.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

SIZES = {"1m": dict(d_model=128, n_layers=4, n_heads=4), "5m": dict(d_model=256, n_layers=6, n_heads=4),
         "25m": dict(d_model=512, n_layers=8, n_heads=8)}
TARGET = {"1m": 0.50, "5m": 0.65, "25m": 0.75}
# device_kind substring -> (bfloat16, float32) dense peak FLOP/s; the first match counts.
PEAKS = (("H100 PCIe", 756e12, 378e12), ("H100", 989e12, 495e12), ("H200", 989e12, 495e12),
         ("A100", 312e12, 156e12), ("TPU v4", 275e12, 275e12), ("TPU v5 lite", 197e12, 197e12),
         ("TPU v5", 459e12, 459e12), ("TPU v6 lite", 918e12, 918e12))


def accelerator_peak(device_kind: str, dtype: str) -> float | None:
  """Datasheet peak FLOP/s of the device for `dtype`, or None for a device not in PEAKS."""
  for kind, bf16, f32 in PEAKS:
    if kind in device_kind:
      return bf16 if dtype == "bfloat16" else f32
  return None


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--sizes", default="1m,5m,25m")
  p.add_argument("--batch", type=int, default=16)
  p.add_argument("--seq", type=int, default=256)
  p.add_argument("--steps", type=int, default=5, help="timed steps per size (after one compile step)")
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  p.add_argument("--xla-flags", default="", help="appended to XLA_FLAGS before jax starts")
  args = p.parse_args()
  if args.xla_flags:
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {args.xla_flags}".strip()

  import jax
  import jax.numpy as jnp
  import numpy as np
  from minilm.config import ModelConfig
  from train import checkpoints, loop, sharding
  from train.config import OptimConfig
  from train.step import init_opt_state, train_step

  print(f"devices: {jax.devices()}  cpu cores: {os.cpu_count()}  XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
  kind = jax.devices()[0].device_kind
  peak = accelerator_peak(kind, args.dtype) if jax.default_backend() != "cpu" else None
  if peak:
    print(f"MFU against {kind}'s {args.dtype} dense peak: {peak / 1e12:.0f} TFLOP/s")
  else:
    x = jax.random.normal(jax.random.key(0), (2048, 2048), jnp.float32)
    matmul = jax.jit(lambda a: a @ a)
    jax.block_until_ready(matmul(x))
    peak = 2 * 2048 ** 3 / min(_timed(lambda: jax.block_until_ready(matmul(x))) for _ in range(5))
    print(f"MFU against the float32 matmul 2048^3 measured here: {peak / 1e9:.1f} GFLOP/s (best of 5)")
  print(f"{'size':>5} {'params':>8} {'non-emb':>8} {'step s':>8} {'tokens/s':>10} {'GFLOP/s':>8} {'MFU':>6} {'target':>6}")
  optim, mesh = OptimConfig(), sharding.make_mesh(1)
  for name in args.sizes.split(","):
    cfg = ModelConfig(vocab_size=512, max_len=args.seq, dtype=args.dtype, **SIZES[name])
    graphdef, _, rest = checkpoints.abstract_model(cfg)
    params = loop.init_params(cfg, 0)
    n_all = sum(v.size for v in jax.tree.leaves(params))
    n_nonembed = n_all - cfg.vocab_size * cfg.d_model
    flops_per_token = 6 * n_nonembed + 12 * cfg.n_layers * args.seq * cfg.d_model
    opt = init_opt_state(params, cfg=optim, steps=1000, mesh=mesh, strategy="data")
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 512, (args.steps + 1, args.batch, args.seq + 1)).astype(np.int32)
    batches = [{"inputs": jnp.asarray(t[:, :-1]), "targets": jnp.asarray(t[:, 1:]),
                "weights": jnp.ones((args.batch, args.seq), jnp.float32)} for t in tokens]
    step = lambda p, o, b, i: train_step(p, o, rest, b, i, graphdef=graphdef, cfg=optim, steps=1000,
                                         mesh=mesh, strategy="data")
    params, opt, m = step(params, opt, batches[0], 0)   # compile
    jax.block_until_ready(m)
    start = time.perf_counter()
    for i in range(args.steps):
      params, opt, m = step(params, opt, batches[i + 1], i + 1)
    jax.block_until_ready(m)
    dt = (time.perf_counter() - start) / args.steps
    tok_s = args.batch * args.seq / dt
    mfu = tok_s * flops_per_token / peak
    print(f"{name:>5} {n_all / 1e6:7.2f}M {n_nonembed / 1e6:7.2f}M {dt:8.3f} {tok_s:10.0f} "
          f"{tok_s * flops_per_token / 1e9:8.1f} {mfu:6.1%} {TARGET[name]:6.0%}", flush=True)


def _timed(fn) -> float:
  start = time.perf_counter()
  fn()
  return time.perf_counter() - start


if __name__ == "__main__":
  sys.exit(main())
