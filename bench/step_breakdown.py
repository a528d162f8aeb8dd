"""Where a CPU train step's time goes, minilm beside nanoGPT on PyTorch: attention, matmuls, the rest.

    .venv/bin/python bench/step_breakdown.py [--sizes 1m,5m,25m] [--steps 5] [--rounds 3] [--reps 10]

Needs the bench extra (pip install -e '.[bench]'). At the architecture and batch of
`bench/train_throughput.py --peer torch` (nanoGPT's GPT, float32, batch 16 x 256), each side's
step is split into parts timed on their own, at the step's shapes:

- step: the whole train step (minilm's `train_step`; PyTorch's in its worker process,
  bench/torch_peer.py), best round of `steps` steps.
- attention: fwd+bwd of causal attention over one layer's q, k, v, times the layers (minilm:
  `layers.attend` with the step's block-causal rows; PyTorch: `scaled_dot_product_attention`, its
  fused CPU kernel).
- linears fwd, linears bwd: every linear layer's and the tied head's forward product x W, and
  its backward pass (dY W^T and X^T dY), summed over the step (minilm: q, k and v as three
  linears, backward by the model's own `model.matmul` path; nanoGPT: one fused c_attn).
- rest: step - attention - linears: norms, GELU, residual adds, the embedding, the loss, the
  optimizer, copies and transposes, and whatever the parts lose or gain inside one program.

Each part is the best of `reps` timings in each of `rounds` rounds, the two sides in turn, the best
round counting; the rest is therefore an estimate: what the two frameworks spend outside their
matmul and attention kernels.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from collections import Counter

sys.path.insert(0, os.path.dirname(__file__))
from train_throughput import GPT_ARCH, SIZES, _timed, side_by_side  # noqa: E402


def best_ms(fn, reps: int) -> float:
  return 1e3 * min(_timed(fn) for _ in range(reps))


# A linear in a train step: its forward product, then its backward pass: the input gradient dY W^T
# and the weight gradient X^T dY.
PARTS = ("attention", "linears fwd", "linears bwd")


def linears(d: int, fused_qkv: bool) -> list[tuple[int, int, bool]]:
  """(in, out, transpose_x) of one layer's linears: the MLP's down projection's weight gradient does
  not transpose its input (minilm.layers.matmul)."""
  qkv = [(d, 3 * d, True)] if fused_qkv else [(d, d, True)] * 3
  return qkv + [(d, d, True), (d, 4 * d, True), (4 * d, d, False)]


def jax_parts(B: int, T: int, d: int, L: int, H: int, vocab: int, reps: int) -> list[float]:
  """ms per step for minilm at these shapes: attention, linears fwd, linears bwd."""
  import jax
  import jax.numpy as jnp
  from minilm.layers import attend, heads_major, matmul_for
  from minilm.model import attention_block
  rand = lambda i, shape: jax.random.normal(jax.random.key(i), shape)
  D, N = d // H, B * T
  q, k, v, g = (rand(i, (B, T, H, D)) for i in range(4))
  pos_BxT = jnp.broadcast_to(jnp.arange(T), (B, T))
  block = attention_block(T)

  def attn_loss(q, k, v):
    out, _ = attend(q, heads_major(k), heads_major(v), pos_BxT, pos_BxT, block=block)
    return (out * g).sum()
  attn = jax.jit(jax.grad(attn_loss, argnums=(0, 1, 2)))
  jax.block_until_ready(attn(q, k, v))
  attention = L * best_ms(lambda: jax.block_until_ready(attn(q, k, v)), reps)

  fwd, bwd = 0.0, 0.0
  for (c_in, c_out, transpose_x), count in Counter(linears(d, fused_qkv=False) * L + [(d, vocab, True)]).items():
    x, w, dy = (rand(i, s) for i, s in enumerate(((N, c_in), (c_in, c_out), (N, c_out))))
    matmul = matmul_for("auto", transpose_x)   # the step's own path: on CPU the matmul's custom VJP
    for f, part in ((jax.jit(matmul), "fwd"), (jax.jit(lambda x, w, dy: jax.vjp(matmul, x, w)[1](dy)), "bwd")):
      args = (x, w) if part == "fwd" else (x, w, dy)
      jax.block_until_ready(f(*args))
      ms = count * best_ms(lambda: jax.block_until_ready(f(*args)), reps)
      fwd, bwd = (fwd + ms, bwd) if part == "fwd" else (fwd, bwd + ms)
  return [attention, fwd, bwd]


def torch_parts(B: int, T: int, d: int, L: int, H: int, vocab: int, reps: int) -> list[float]:
  """ms per step for nanoGPT on PyTorch at these shapes: attention, linears fwd, linears bwd."""
  import torch
  import torch.nn.functional as F
  torch.set_num_threads(os.cpu_count())
  D, N = d // H, B * T
  q, k, v = (torch.randn(B, T, H, D).transpose(1, 2).requires_grad_() for _ in range(3))
  g = torch.randn(B, H, T, D)

  def attn():
    (F.scaled_dot_product_attention(q, k, v, is_causal=True) * g).sum().backward()
  attn()
  attention = L * best_ms(attn, reps)
  fwd, bwd = 0.0, 0.0
  for (c_in, c_out, _), count in Counter(linears(d, fused_qkv=True) * L + [(d, vocab, True)]).items():
    x, w, dy = torch.randn(N, c_in), torch.randn(c_in, c_out), torch.randn(N, c_out)
    fwd += count * best_ms(lambda: x @ w, reps)
    bwd += count * best_ms(lambda: (dy @ w.T, x.T @ dy), reps)   # what autograd computes for a linear
  return [attention, fwd, bwd]


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--sizes", default="1m,5m,25m")
  p.add_argument("--batch", type=int, default=16)
  p.add_argument("--seq", type=int, default=256)
  p.add_argument("--steps", type=int, default=5)
  p.add_argument("--rounds", type=int, default=3)
  p.add_argument("--reps", type=int, default=10, help="timings per part; the best counts")
  p.add_argument("--torch-parts", nargs=6, type=int, metavar=("B", "T", "D", "L", "H", "V"),
                 help=argparse.SUPPRESS)   # the PyTorch parts, in a process of their own (as the peer's step)
  args = p.parse_args()
  if args.torch_parts:
    print(*torch_parts(*args.torch_parts, args.reps))
    return

  import jax
  from minilm.config import ModelConfig
  from minilm.encodings import Learned
  from train import loop, sharding
  from train.config import OptimConfig
  print(f"devices: {jax.devices()}  cpu cores: {os.cpu_count()}  load average: {os.getloadavg()}")
  print(f"float32, batch {args.batch} x {args.seq}, nanoGPT architecture; ms per train step")
  print(f"{'size':>5} {'part':>10} {'minilm':>9} {'torch':>9} {'minilm-torch':>13}")
  B, T, optim, mesh = args.batch, args.seq, OptimConfig(), sharding.make_mesh(1)
  for name in args.sizes.split(","):
    cfg = ModelConfig(vocab_size=512, max_len=T, **SIZES[name], **GPT_ARCH, position=Learned())
    ours, theirs, _, _ = side_by_side(name, cfg, optim, mesh, loop.init_params(cfg, 0), args, peer_kind="torch")
    ours, theirs = [1e3 * s for s in ours], [1e3 * s for s in theirs]
    shape = (B, T, cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.vocab_size)
    mine, peers = [], []
    for _ in range(args.rounds):   # in turn, so that load on the machine reaches both sides
      mine.append(jax_parts(*shape, args.reps))
      peers.append([float(x) for x in subprocess.run(
          [sys.executable, __file__, "--reps", str(args.reps), "--torch-parts", *map(str, shape)],
          check=True, capture_output=True, text=True).stdout.split()])
    mine, peers = [min(t) for t in zip(*mine)], [min(t) for t in zip(*peers)]
    rows = [("step", min(ours), min(theirs)), *zip(PARTS, mine, peers),
            ("rest", min(ours) - sum(mine), min(theirs) - sum(peers))]
    for part, a, b in rows:
      print(f"{name:>5} {part:>10} {a:9.1f} {b:9.1f} {a - b:+13.1f}", flush=True)
  print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
  sys.exit(main())
