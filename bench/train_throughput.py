"""Training throughput of the real train step at three model sizes: MFU, and side by side with PyTorch.

    .venv/bin/python bench/train_throughput.py [--sizes 1m,5m,25m] [--steps 5] [--rounds 3]
        [--dtype float32|bfloat16] [--peer torch|torch-tuned] [--stack K] [--xla-flags '...']

--peer torch (pip install -e '.[bench]') times nanoGPT's GPT on PyTorch (bench/torch_peer.py, a
worker process; on the GPU when jax runs on one) in turn with minilm at the same architecture:
GPT_ARCH, learned positions, pre-norm LayerNorm with biases, GELU (erf) MLP of 4 x d, biases on
every linear but the tied head. Each round
times `steps` steps of minilm, then of the peer, after one compile/warm-up step each; the best round
of each side counts, so load on the machine reaches both. Without --peer the model is the lab's
default architecture (RoPE, RMSNorm, SwiGLU, no biases). --peer torch is nanoGPT's step as it ships
(eager); --peer torch-tuned adds the usual PyTorch speed-ups (torch.compile, fused AdamW, minilm's
allocator settings: torch_peer.py --tuned), whose first step compiles; not faster everywhere
(bench/README).

MFU = tokens/s * FLOPs per token / peak FLOP/s: on an accelerator its datasheet peak for the compute
dtype (PEAKS, dense, no sparsity; jax runs float32 matmuls as TF32 on NVIDIA GPUs and as bfloat16
passes on TPUs, hence those float32 peaks), on CPU the rate of a 2048^3 matmul measured here in the
compute dtype with float32 sums (bench/README's earlier bfloat16 CPU figures are against the float32
rate). FLOPs per token (forward + backward) = 6 * N + 12 * L * T * d, with N the non-embedding
parameters as in Kaplan et al. (the tied embedding/logit matmul is not counted; nanoGPT's estimate
counts it: 6.2%, 2.4% and 1.0% more at 1M, 5M and 25M), L layers, T sequence length, d width.
Batches are random tokens (weights 1): this measures the model step, not data generation.

--stack K also times K arms that differ only in seed as one vmapped step (train.step.stacked, what
`python -m train --stack-seeds on` runs) and prints their tokens/s, all arms together, and its ratio
to the single arm's.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

SIZES = {"1m": dict(d_model=128, n_layers=4, n_heads=4), "5m": dict(d_model=256, n_layers=6, n_heads=4),
         "25m": dict(d_model=512, n_layers=8, n_heads=8)}
# nanoGPT's architecture in ModelConfig fields (position: learned, set in main).
GPT_ARCH = dict(norm="layer", mlp="gelu_erf", bias=True, tie_embeddings=True, block="pre")
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


class TorchPeer:
  """bench/torch_peer.py as a worker process: `run(n)` -> seconds for n steps; `profile(n)`."""

  def __init__(self, cfg, optim, batch: int, seq: int, device: str, tuned: bool = False):
    args = dict(device=device, vocab=cfg.vocab_size, seq=seq, batch=batch, d=cfg.d_model, layers=cfg.n_layers,
                heads=cfg.n_heads, lr=optim.lr, b1=optim.b1, b2=optim.b2, weight_decay=optim.weight_decay,
                clip_norm=optim.clip_norm)
    cmd = [sys.executable, os.path.join(os.path.dirname(__file__), "torch_peer.py"), "--serve", "--dtype", cfg.dtype,
           *(f"--{k.replace('_', '-')}={v}" for k, v in args.items())]
    cmd += ["--tuned"] if tuned else []
    self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    self.version = self.proc.stdout.readline().strip()

  def run(self, n: int) -> float:
    self.proc.stdin.write(f"run {n}\n")
    self.proc.stdin.flush()
    return float(self.proc.stdout.readline())

  def profile(self, n: int) -> dict[str, list[float]]:
    """{op: [self CPU ms per step, FLOPs per step]} over n steps (torch_peer.Peer.profile)."""
    self.proc.stdin.write(f"profile {n}\n")
    self.proc.stdin.flush()
    return json.loads(self.proc.stdout.readline())

  def close(self) -> None:
    self.proc.stdin.close()
    self.proc.wait()


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--sizes", default="1m,5m,25m")
  p.add_argument("--batch", type=int, default=16)
  p.add_argument("--seq", type=int, default=256)
  p.add_argument("--steps", type=int, default=5, help="timed steps per round (after one compile step)")
  p.add_argument("--rounds", type=int, default=3, help="timed rounds per size; the best counts")
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  p.add_argument("--peer", choices=("torch", "torch-tuned"),
                 help="time nanoGPT on PyTorch in turn, at its architecture (eager as it ships, or tuned)")
  p.add_argument("--stack", type=int, default=0, metavar="K", help="also time K seeds stacked in one vmapped step")
  p.add_argument("--xla-flags", default="", help="appended to XLA_FLAGS before jax starts")
  args = p.parse_args()
  if args.xla_flags:
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {args.xla_flags}".strip()

  import jax
  from minilm.config import ModelConfig
  from minilm.encodings import Learned
  from minilm.machine import matmul_rate
  from train import loop, sharding
  from train.config import OptimConfig

  print(f"devices: {jax.devices()}  cpu cores: {os.cpu_count()}  load average: {os.getloadavg()}  "
        f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
  if args.peer and os.getloadavg()[0] > 0.5:
    print(f"note: load average {os.getloadavg()[0]:.1f} at the start: other work on the CPU slows PyTorch's "
          "OpenMP threads more than XLA's pool, so the ratios lean towards minilm (bench/README)")
  kind = jax.devices()[0].device_kind
  peak = accelerator_peak(kind, args.dtype) if jax.default_backend() != "cpu" else None
  if peak:
    print(f"MFU against {kind}'s {args.dtype} dense peak: {peak / 1e12:.0f} TFLOP/s")
  else:
    peak = matmul_rate(args.dtype)
    print(f"MFU against the {args.dtype} matmul 2048^3 measured here: {peak / 1e9:.1f} GFLOP/s (best of 5)")
  arch = dict(GPT_ARCH, position=Learned()) if args.peer else {}
  print(f"{args.dtype}, batch {args.batch} x {args.seq}, best of {args.rounds} rounds of {args.steps} steps, "
        f"architecture: {'nanoGPT (GPT_ARCH)' if args.peer else 'lab default'}")
  peer_cols = f" {'torch tok/s':>11} {'ratio':>6}" if args.peer else ""
  peer_cols += f" {f'stack {args.stack} tok/s':>15} {'ratio':>6}" if args.stack else ""
  print(f"{'size':>5} {'params':>8} {'non-emb':>8} {'step s':>8} {'tokens/s':>10} {'GFLOP/s':>8} {'MFU':>6}{peer_cols}")
  optim, mesh = OptimConfig(), sharding.make_mesh(1)
  for name in args.sizes.split(","):
    cfg = ModelConfig(vocab_size=512, max_len=args.seq, dtype=args.dtype, **SIZES[name], **arch)
    params = loop.init_params(cfg, 0)
    n_all = sum(v.size for v in jax.tree.leaves(params))
    n_nonembed = n_all - cfg.vocab_size * cfg.d_model - (cfg.max_len * cfg.d_model if args.peer else 0)
    flops_per_token = 6 * n_nonembed + 12 * cfg.n_layers * args.seq * cfg.d_model
    ours, theirs, peer, (graphdef, rest, batches) = side_by_side(name, cfg, optim, mesh, params, args, args.peer)
    dt = min(ours)
    tok_s = args.batch * args.seq / dt
    mfu = tok_s * flops_per_token / peak
    line = (f"{name:>5} {n_all / 1e6:7.2f}M {n_nonembed / 1e6:7.2f}M {dt:8.3f} {tok_s:10.0f} "
            f"{tok_s * flops_per_token / 1e9:8.1f} {mfu:6.1%}")
    if peer:
      peer_tok_s = args.batch * args.seq / min(theirs)
      line += f" {peer_tok_s:11.0f} {tok_s / peer_tok_s:5.2f}x"
    if args.stack:
      stack_s = _stacked_step_s(args, cfg, optim, mesh, graphdef, rest, batches)
      stack_tok_s = args.stack * args.batch * args.seq / stack_s
      line += f" {stack_tok_s:15.0f} {stack_tok_s / tok_s:5.2f}x"
    print(line, flush=True)
  if args.peer:
    print(f"peer: {peer.version}; load average after: {os.getloadavg()}")


def step_inputs(cfg, optim, mesh, params, batch: int, seq: int, n: int):
  """What minilm's train step takes at `cfg` from `params`, for `train_step(params, opt, rest, b, i,
  **kw)`: (opt, n batches of random tokens [batch, seq] with weights 1, rest, kw)."""
  import jax.numpy as jnp
  import numpy as np
  from train import checkpoints
  from train.step import init_opt_state
  graphdef, _, rest = checkpoints.abstract_model(cfg)
  opt = init_opt_state(params, cfg=optim, steps=1000, mesh=mesh, strategy="data")
  tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (n, batch, seq + 1)).astype(np.int32)
  batches = [{"inputs": jnp.asarray(t[:, :-1]), "targets": jnp.asarray(t[:, 1:]),
              "weights": jnp.ones((batch, seq), jnp.float32)} for t in tokens]
  return opt, batches, rest, dict(graphdef=graphdef, cfg=optim, steps=1000, mesh=mesh, strategy="data")


def side_by_side(name: str, cfg, optim, mesh, params, args, peer_kind: str | None):
  """minilm's train step from `params` at args.batch x args.seq (random tokens, weights 1), and with
  `peer_kind` ("torch" or "torch-tuned": torch_peer.py) nanoGPT's on PyTorch, in turn: args.rounds
  rounds of args.steps steps each, after one compile/warm-up step each. Returns (minilm's seconds per
  step per round, the peer's, the peer (its version; closed), (graphdef, rest, batches))."""
  import jax
  from train.step import train_step
  opt, batches, rest, kw = step_inputs(cfg, optim, mesh, params, args.batch, args.seq, args.steps + 1)
  graphdef = kw["graphdef"]
  step = lambda p, o, b, i: train_step(p, o, rest, b, i, **kw)
  start = time.perf_counter()
  params, opt, m = step(params, opt, batches[0], 0)   # compile
  jax.block_until_ready(m)
  # stderr, as it happens: where a run stopped by a time limit spent its time
  print(f"{name}: compiled and ran step 0 in {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
  device = "cuda" if jax.default_backend() == "gpu" else "cpu"
  peer = TorchPeer(cfg, optim, args.batch, args.seq, device, peer_kind == "torch-tuned") if peer_kind else None
  if peer:
    start = time.perf_counter()
    peer.run(1)   # warm-up
    print(f"{name}: {peer.version}, warm-up step in {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
  ours, theirs = [], []
  for _ in range(args.rounds):
    start = time.perf_counter()
    for i in range(args.steps):
      params, opt, m = step(params, opt, batches[i + 1], i + 1)
    jax.block_until_ready(m)
    ours.append((time.perf_counter() - start) / args.steps)
    if peer:
      theirs.append(peer.run(args.steps) / args.steps)
  if peer:
    peer.close()
  return ours, theirs, peer, (graphdef, rest, batches)


def _stacked_step_s(args, cfg, optim, mesh, graphdef, rest, batches) -> float:
  """Best seconds per step of args.stack seeds stacked (the same batch for every arm: the cost of
  the step does not depend on the tokens)."""
  import jax
  from train import loop
  from train.step import healthy, init_opt_state, stacked, train_step
  k = args.stack
  put = loop.stack_arms
  arms = [loop.init_params(cfg, seed) for seed in range(k)]
  opt = put([init_opt_state(p, cfg=optim, steps=1000, mesh=mesh, strategy="data") for p in arms])
  params, health = put(arms), put([healthy()] * k)
  step = stacked(lambda p, o, b, i, h: train_step(p, o, rest, b, i, h, graphdef=graphdef, cfg=optim, steps=1000,
                                                   mesh=mesh, strategy="data"))
  batches = [put([b] * k) for b in batches]
  start = time.perf_counter()
  params, opt, m = step(params, opt, batches[0], 0, health)   # compile
  jax.block_until_ready(m)
  print(f"stack {k}: compiled and ran step 0 in {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
  times = []
  for _ in range(args.rounds):
    start = time.perf_counter()
    for i in range(args.steps):
      params, opt, m = step(params, opt, batches[i + 1], i + 1, m["health"])
    jax.block_until_ready(m)
    times.append((time.perf_counter() - start) / args.steps)
  return min(times)


if __name__ == "__main__":
  sys.exit(main())
