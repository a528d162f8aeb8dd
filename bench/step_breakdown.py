"""Where a CPU train step's time goes, minilm beside nanoGPT on PyTorch: attention, matmuls, the rest.

    .venv/bin/python bench/step_breakdown.py [--sizes 1m,5m,25m] [--steps 5] [--rounds 3] [--reps 10]
    taskset -c 0 .venv/bin/python bench/step_breakdown.py --profile [--sizes ...] [--steps 5] [--top 12]

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

`--profile` instead times every op inside the step, `steps` steps of each side under its profiler
(minilm: jax.profiler's per-op events mapped onto the compiled program's HLO; PyTorch: torch.profiler's
self CPU time per op), and sums them in parts: linear matmuls, attention (minilm: its matmuls and the
rest of its ops on the heads-shaped tensors of rank 4 and more; PyTorch: the fused SDPA kernel) and
the rest; with the linear matmuls' GFLOP/s and minilm's slowest ops. Run it on one core
(`taskset -c 0`): on more, ops run at once and each op's time includes waits for the other threads,
so the parts add up to more than the step.
"""
from __future__ import annotations

import argparse
import glob
import gzip
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter

sys.path.insert(0, os.path.dirname(__file__))
from train_throughput import GPT_ARCH, SIZES, side_by_side, step_inputs  # noqa: E402


def best_ms(fn, reps: int) -> float:
  from minilm.machine import best_seconds
  return 1e3 * best_seconds(fn, reps)


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


_INSTRUCTION = re.compile(r"\s*(?:ROOT )?%?([\w.\-]+) = (\S+) ")   # an HLO instruction: name, shape


def hlo_parts(hlo: str, op_us: dict[str, float], steps: int) -> tuple[dict[str, list[float]], list[tuple]]:
  """Per-op times (µs over `steps` steps, by HLO instruction name) summed into parts: {part: [ms per
  step, FLOPs per step]}, and the ops as (ms per step, name, shape, op_name) slowest first. A matmul
  is a dot or a fusion calling one; an attention op's output has rank 4 or more (a heads axis)."""
  comps, cur, inst = {}, None, {}
  for line in hlo.splitlines():
    if not line.startswith(" "):
      m = re.match(r"%?([\w.\-]+) .*->.*\{$", line.strip())
      cur = m and m.group(1)
      if cur:
        comps[cur] = []
    elif cur:
      comps[cur].append(line)
    m = _INSTRUCTION.match(line)
    if m:
      inst[m.group(1)] = (m.group(2), line)
  parts, ops, shapes = {}, [], {k: shape for k, (shape, _) in inst.items()}
  for name, us in op_us.items():
    if name not in inst:
      continue
    shape, line = inst[name]
    called = re.search(r"calls=%?([\w.\-]+)", line)
    body = comps.get(called.group(1), []) if called else [line]
    dot = next((b for b in body if re.search(r" (dot|convolution)\(", b)), None)
    rank = len(_dims(shape)) if "[" in shape else 0
    flops = _dot_flops(dot, _shapes(body) if called else {}, shapes) if dot else 0
    if dot:
      part = "attention matmuls" if rank >= 4 else "linear matmuls"
    else:
      part = "attention other" if rank >= 4 else "rest"
    ms = us / 1e3 / steps
    parts.setdefault(part, [0.0, 0.0])
    parts[part][0] += ms
    parts[part][1] += flops
    op_name = re.search(r'op_name="([^"]+)"', line)
    ops.append((ms, name, shape.split("{")[0], op_name.group(1) if op_name else ""))
  return parts, sorted(ops, reverse=True)


def _shapes(lines: list[str]) -> dict[str, str]:
  return {m.group(1): m.group(2) for m in map(_INSTRUCTION.match, lines) if m}


def _dims(shape: str) -> list[int]:
  return [int(x) for x in re.search(r"\[([\d,]*)\]", shape).group(1).split(",") if x]


def _dot_flops(line: str, *scopes: dict[str, str]) -> float:
  """2 x output elements x contracted elements of an HLO dot; its operands' shapes from the first
  of `scopes` (instruction name -> shape) that names them."""
  m = re.search(r"= (\S+) dot\(%?([\w.\-]+), %?([\w.\-]+)\)", line)
  if not m:
    return 0.0
  lhs = _dims(next(scope[m.group(2)] for scope in scopes if m.group(2) in scope))
  contracted = [int(x) for x in re.search(r"lhs_contracting_dims=\{([\d,]*)\}", line).group(1).split(",") if x]
  return 2.0 * math.prod(_dims(m.group(1))) * math.prod(lhs[i] for i in contracted)


def jax_op_profile(cfg, optim, mesh, B: int, T: int, steps: int) -> tuple[float, dict, list]:
  """minilm's train step: (ms per step unprofiled, then hlo_parts's parts and ops of `steps` steps
  under jax.profiler)."""
  import jax
  from train import loop
  from train.step import train_step
  params = loop.init_params(cfg, 0)
  opt, (batch,), rest, kw = step_inputs(cfg, optim, mesh, params, B, T, 1)
  compiled = train_step.lower(params, opt, rest, batch, 0, **kw).compile()   # the program profiled, compiled once
  step = lambda p, o, i: compiled(p, o, rest, batch, i)
  for i in range(2):   # warm up
    params, opt, m = step(params, opt, i)
  jax.block_until_ready(m)
  start = time.perf_counter()
  for i in range(steps):
    params, opt, m = step(params, opt, i)
  jax.block_until_ready(m)
  step_ms = 1e3 * (time.perf_counter() - start) / steps
  with tempfile.TemporaryDirectory() as d:
    with jax.profiler.trace(d, create_perfetto_trace=True):
      for i in range(steps):
        params, opt, m = step(params, opt, i)
      jax.block_until_ready(m)
    with gzip.open(glob.glob(os.path.join(d, "**", "*.trace.json.gz"), recursive=True)[0]) as f:
      events = json.load(f)["traceEvents"]
  op_us = Counter()
  for e in events:
    if e.get("ph") == "X" and "dur" in e:
      op_us[e["name"]] += e["dur"]
  return (step_ms, *hlo_parts(compiled.as_text(), op_us, steps))


def torch_op_parts(ops: dict[str, list[float]]) -> dict[str, list[float]]:
  """torch_peer's profile summed into parts: {part: [ms per step, FLOPs per step]}."""
  parts = {}
  for name, (ms, flops) in ops.items():
    part = ("linear matmuls" if name in ("aten::mm", "aten::addmm", "aten::bmm") else
            "attention (SDPA)" if "scaled_dot_product" in name else "rest")
    parts.setdefault(part, [0.0, 0.0])
    parts[part][0] += ms
    parts[part][1] += flops
  return parts


def profile_main(args) -> None:
  from minilm.config import ModelConfig
  from minilm.encodings import Learned
  from train import sharding
  from train.config import OptimConfig
  from train_throughput import TorchPeer
  cores = len(os.sched_getaffinity(0))
  print(f"cpu cores available: {cores}  load average: {os.getloadavg()}")
  if cores > 1:
    print(f"note: on {cores} cores ops run at once and each op's time includes waits: run under taskset -c 0")
  print(f"float32, batch {args.batch} x {args.seq}, nanoGPT architecture, {args.steps} profiled steps a side; "
        "ms per train step")
  B, T, optim, mesh = args.batch, args.seq, OptimConfig(), sharding.make_mesh(1)
  for name in args.sizes.split(","):
    cfg = ModelConfig(vocab_size=512, max_len=T, **SIZES[name], **GPT_ARCH, position=Learned())
    step_ms, mine, ops = jax_op_profile(cfg, optim, mesh, B, T, args.steps)
    peer = TorchPeer(cfg, optim, B, T, "cpu")
    peer.run(2)   # warm-up
    peer_ms = 1e3 * peer.run(args.steps) / args.steps
    theirs = torch_op_parts(peer.profile(args.steps))
    peer.close()
    print(f"{name:>5} {'part':>18} {'minilm':>9} {'torch':>9}")
    print(f"{name:>5} {'step':>18} {step_ms:9.1f} {peer_ms:9.1f}")
    print(f"{name:>5} {'ops, profiled':>18} {sum(v[0] for v in mine.values()):9.1f} "
          f"{sum(v[0] for v in theirs.values()):9.1f}")
    for part in ("linear matmuls", "attention matmuls", "attention other", "attention (SDPA)", "rest"):
      a, b = mine.get(part, [0.0, 0.0]), theirs.get(part, [0.0, 0.0])
      print(f"{name:>5} {part:>18} {a[0]:9.1f} {b[0]:9.1f}")
    a, b = mine["linear matmuls"], theirs["linear matmuls"]
    print(f"{name:>5} linear matmuls: minilm {a[1] / 1e9:.2f} GFLOP at {a[1] / a[0] / 1e6:.1f} GFLOP/s, "
          f"torch {b[1] / 1e9:.2f} GFLOP at {b[1] / b[0] / 1e6:.1f} GFLOP/s")
    print(f"{name:>5} minilm's slowest ops (ms per step, HLO name, shape, jax op):")
    for ms, op, shape, op_name in ops[:args.top]:
      print(f"{name:>5}   {ms:6.2f} {op:28s} {shape:26s} {op_name[-60:]}", flush=True)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--sizes", default="1m,5m,25m")
  p.add_argument("--batch", type=int, default=16)
  p.add_argument("--seq", type=int, default=256)
  p.add_argument("--steps", type=int, default=5)
  p.add_argument("--rounds", type=int, default=3)
  p.add_argument("--reps", type=int, default=10, help="timings per part; the best counts")
  p.add_argument("--profile", action="store_true", help="per-op profiles of both steps, in parts (run on one core)")
  p.add_argument("--top", type=int, default=12, help="with --profile: how many of minilm's slowest ops to list")
  p.add_argument("--torch-parts", nargs=6, type=int, metavar=("B", "T", "D", "L", "H", "V"),
                 help=argparse.SUPPRESS)   # the PyTorch parts, in a process of their own (as the peer's step)
  args = p.parse_args()
  if args.torch_parts:
    print(*torch_parts(*args.torch_parts, args.reps))
    return
  if args.profile:
    return profile_main(args)

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
