"""The PyTorch peer of bench/train_throughput.py: nanoGPT's GPT and train step, timed on request.

The model follows nanoGPT's model.py (Karpathy, github.com/karpathy/nanoGPT): token and learned
position embeddings, pre-norm blocks of LayerNorm (with bias), causal self-attention through
F.scaled_dot_product_attention (q, k and v from one fused linear), LayerNorm, a GELU (erf) MLP of
4 x d, a final LayerNorm and a head tied to the token embedding; linears carry biases, the head
does not. Init: normal(0.02), residual projections 0.02 / sqrt(2 L). The step is nanoGPT's train.py:
cross-entropy, backward, clip_grad_norm_(1.0), AdamW (decay on matrices only; fused on CUDA, torch's
default on CPU, as nanoGPT asks) and zero_grad(set_to_none=True). bfloat16 is nanoGPT's mixed
precision: float32 parameters under torch.autocast(bfloat16). On CUDA (--device cuda) float32
matmuls run as TF32, as nanoGPT sets them and as jax runs them by default on NVIDIA GPUs, and each
timing ends with a synchronize.

`--tuned` adds the speed-ups a PyTorch user would reach for, beyond what nanoGPT ships: the model
compiled by torch.compile (Inductor), AdamW's fused kernel on the CPU too, and glibc's allocator set
as minilm sets it for itself (`import minilm`: minilm.malloc). Measured faster than eager in
float32 and not in bfloat16 at 1M (bench/README). Without it the step is nanoGPT's, in eager mode.

Run by train_throughput.py as a worker process (`--serve`): it builds the model from its arguments,
then answers each stdin line `run N` with the seconds N steps took, so the two frameworks are timed
in turn without sharing a process or thread pool, and `profile N` with a JSON line of each op's
self CPU time and FLOPs per step over N steps (bench/step_breakdown.py --profile).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


class SelfAttention(nn.Module):
  def __init__(self, d: int, heads: int):
    super().__init__()
    self.heads = heads
    self.c_attn = nn.Linear(d, 3 * d)
    self.c_proj = nn.Linear(d, d)

  def forward(self, x):
    B, T, C = x.shape
    q, k, v = (t.view(B, T, self.heads, C // self.heads).transpose(1, 2) for t in self.c_attn(x).split(C, dim=2))
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


class Block(nn.Module):
  def __init__(self, d: int, heads: int):
    super().__init__()
    self.ln_1, self.attn, self.ln_2 = nn.LayerNorm(d), SelfAttention(d, heads), nn.LayerNorm(d)
    self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
    self.mlp[2].is_residual_proj = self.attn.c_proj.is_residual_proj = True

  def forward(self, x):
    x = x + self.attn(self.ln_1(x))
    return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
  def __init__(self, vocab: int, seq: int, d: int, layers: int, heads: int):
    super().__init__()
    self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(seq, d)
    self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
    self.ln_f = nn.LayerNorm(d)
    self.lm_head = nn.Linear(d, vocab, bias=False)
    self.lm_head.weight = self.wte.weight
    for m in self.modules():
      if isinstance(m, (nn.Linear, nn.Embedding)):
        std = 0.02 / math.sqrt(2 * layers) if getattr(m, "is_residual_proj", False) else 0.02
        nn.init.normal_(m.weight, 0.0, std)
      if isinstance(m, nn.Linear) and m.bias is not None:
        nn.init.zeros_(m.bias)

  def forward(self, tokens_BxT):
    x = self.wte(tokens_BxT) + self.wpe(torch.arange(tokens_BxT.shape[1], device=tokens_BxT.device))
    for block in self.blocks:
      x = block(x)
    return self.lm_head(self.ln_f(x))


class Peer:
  """One GPT, its AdamW and a fixed random batch; `run(n)` times n train steps."""

  def __init__(self, *, vocab: int, seq: int, batch: int, d: int, layers: int, heads: int, dtype: str,
               lr: float, b1: float, b2: float, weight_decay: float, clip_norm: float, device: str = "cpu",
               seed: int = 0, tuned: bool = False):
    torch.manual_seed(seed)
    self.cuda = device == "cuda"
    if self.cuda:
      torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    self.model = GPT(vocab, seq, d, layers, heads).to(device)
    params = [p for p in self.model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    self.opt = torch.optim.AdamW(groups, lr=lr, betas=(b1, b2), fused=self.cuda or tuned or None)
    if tuned:
      self.model = torch.compile(self.model)
    self.clip_norm, self.vocab = clip_norm, vocab
    tokens = torch.randint(0, vocab, (batch, seq + 1)).to(device)
    self.inputs, self.targets = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
    bf16 = dtype == "bfloat16"
    self.autocast = (lambda: torch.autocast(device, dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext

  def step(self) -> None:
    with self.autocast():
      logits = self.model(self.inputs)
      loss = F.cross_entropy(logits.view(-1, self.vocab), self.targets.view(-1))
    loss.backward()
    torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_norm)
    self.opt.step()
    self.opt.zero_grad(set_to_none=True)

  def run(self, n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
      self.step()
    if self.cuda:
      torch.cuda.synchronize()
    return time.perf_counter() - start

  def profile(self, n: int) -> dict[str, list[float]]:
    """n steps under torch.profiler: {op: [self CPU ms per step, FLOPs per step]} (FLOPs where the
    profiler counts them: the matmuls)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], with_flops=True) as prof:
      self.run(n)
    return {e.key: [e.self_cpu_time_total / 1e3 / n, e.flops / n] for e in prof.key_averages()}


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  for name in ("vocab", "seq", "batch", "d", "layers", "heads"):
    p.add_argument(f"--{name}", type=int, required=True)
  for name in ("lr", "b1", "b2", "weight_decay", "clip_norm"):
    p.add_argument(f"--{name.replace('_', '-')}", type=float, required=True)
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
  p.add_argument("--tuned", action="store_true", help="torch.compile, fused AdamW and minilm's allocator settings")
  p.add_argument("--serve", action="store_true", help="answer stdin lines 'run N' (seconds taken) and 'profile N' (JSON)")
  args = vars(p.parse_args())
  serve = args.pop("serve")
  if args["tuned"]:
    import minilm   # noqa: F401 - sets glibc's allocator before the step's threads start (minilm.malloc)
  peer = Peer(**args)
  if not serve:
    peer.run(2)
    dt = peer.run(5) / 5
    print(f"torch {torch.__version__} threads {torch.get_num_threads()}: {dt:.3f} s/step, "
          f"{args['batch'] * args['seq'] / dt:.0f} tokens/s")
    return
  mode = "tuned (compiled, fused AdamW, minilm's allocator)" if args["tuned"] else "eager, as nanoGPT ships"
  print(f"ready torch {torch.__version__} threads {torch.get_num_threads()}, {mode}", flush=True)
  for line in sys.stdin:
    cmd, n = line.split()
    assert cmd in ("run", "profile"), line
    print(peer.run(int(n)) if cmd == "run" else json.dumps(peer.profile(int(n))), flush=True)


if __name__ == "__main__":
  main()
