"""Hook names: the one place where the name of a capture or intervention point is built.

A block's points are named `blocks.<layer>.attn.<point>` (q, k, v, rot_q, rot_k, attn, sink) and
`blocks.<layer>.resid`. 'attn' is the attention probabilities [B, H, T, S]; 'sink' only their key-0
column [B, H, T], the share of attention each query puts on the first token, so a trace moves T, not
T x S, per head; 'resid' is the residual stream [B, T, C] after the block.
"""
from __future__ import annotations

POINTS = ("q", "k", "v", "rot_q", "rot_k", "attn", "sink", "resid")
"""Every capture point of a block, in this order."""
QKV = ("q", "k", "v", "rot_q", "rot_k")
"""The points an intervention may replace, and the ones a trace sums: [B, T, H, D] (K heads for k, v)."""


def name(layer: int, point: str) -> str:
  """'blocks.3.attn.rot_k', 'blocks.3.resid': the name of a capture or intervention point."""
  return f"blocks.{layer}.{point}" if point == "resid" else f"blocks.{layer}.attn.{point}"


def split(hook: str) -> tuple[int, str]:
  """(layer, point) of a hook name: the inverse of `name`."""
  parts = hook.split(".")
  return int(parts[1]), parts[-1]
