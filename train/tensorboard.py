"""Optional TensorBoard event files, a live view of the rows the lab logs anyway.

Off unless enabled (`python -m train CONFIG --tensorboard`, `minilm-lab --tensorboard`, or
`enable()`; the switch is the environment variable MINILM_TENSORBOARD=1, so stages run in child
processes follow it) and tensorboardX is installed (`pip install 'minilm[tb]'`, no TensorFlow).
metrics.jsonl, eval.jsonl and the trace's summary.json stay the source of truth; the events repeat
their numbers:
  <arm_dir>/tensorboard/          train/<key> of every metrics row, eval/<key> of every eval row
  <trace out>/tensorboard/<arm>/  <stat>/<tensor>/layer<L>: the head means of the massive count,
                                  max/mean and LF share of every traced step (rewritten whole
                                  with summary.json)
Watch with `tensorboard --logdir runs/<experiment>`.
"""
from __future__ import annotations

import importlib.util
import os
from typing import Iterable

from minilm import atomic
from minilm.schema import check

ENV = "MINILM_TENSORBOARD"
TRACE_STATS = ("massive", "max_mean", "lf_share")


def enabled() -> bool:
  return os.environ.get(ENV) == "1"


def enable(flag: str = "--tensorboard") -> None:
  """Turn event files on for this process and its children; a one-line error without tensorboardX."""
  check(importlib.util.find_spec("tensorboardX") is not None, flag,
        "needs tensorboardX, which is not installed (pip install 'minilm[tb]')")
  os.environ[ENV] = "1"


def scalars(row: dict, prefix: str) -> dict[str, float]:
  """{'<prefix>/<key>': number} of a JSONL row (nested mappings as '<prefix>/<key>/<sub>'); its
  step, strings and flags are not scalars."""
  out = {}
  for key, value in row.items():
    if isinstance(value, dict):
      out.update(scalars(value, f"{prefix}/{key}"))
    elif isinstance(value, (int, float)) and not isinstance(value, bool) and key != "step":
      out[f"{prefix}/{key}"] = float(value)
  return out


def trace_scalars(group: dict) -> dict[str, float]:
  """The scalars of one summary.json group (arm, step, layer, tensor): each TRACE_STATS head mean."""
  return {f"{stat}/{group['tensor']}/layer{group['layer']}": float(group["stats"][stat][0]) for stat in TRACE_STATS}


class Writer:
  """add(scalars, step) into an event file in `logdir`; does nothing when logdir is None."""

  def __init__(self, logdir: str | None, purge_step: int | None = None):
    self.events = None
    if logdir is not None:
      from tensorboardX import SummaryWriter
      self.events = SummaryWriter(logdir, purge_step=purge_step, flush_secs=10)

  def add(self, values: dict[str, float], step: int) -> None:
    if self.events is not None:
      for tag, value in values.items():
        self.events.add_scalar(tag, value, step)

  def __enter__(self) -> "Writer":
    return self

  def __exit__(self, *exc) -> None:
    if self.events is not None:
      self.events.close()


def writer(logdir: str | None, purge_step: int | None = None) -> Writer:
  """A Writer into logdir when enabled, else one that does nothing. purge_step: a resumed run
  redoes the steps from here; TensorBoard hides their earlier events."""
  return Writer(logdir if enabled() else None, purge_step)


def write_trace(folder: str, groups: Iterable[dict]) -> None:
  """Replace `folder` with one event file per arm of the summary groups (when enabled)."""
  if not enabled():
    return
  by_arm: dict[str, list[dict]] = {}
  for group in groups:
    by_arm.setdefault(group["arm"], []).append(group)
  with atomic.staged_dir(folder) as staging:
    for arm, rows in by_arm.items():
      with Writer(os.path.join(staging, arm)) as events:
        for group in rows:
          events.add(trace_scalars(group), group["step"])
