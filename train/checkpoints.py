"""Orbax checkpoints of one arm: params, optimizer state, step and the full config, one directory per step.

Orbax writes each step into '<step>.orbax-checkpoint-tmp' and renames it when complete, so a run
killed mid-save leaves only a tmp directory, which listing and restoring ignore (and the next
writer removes).
"""
from __future__ import annotations

import json
import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import nnx

from minilm import config as C
from minilm.config import ModelConfig
from minilm.model import Decoder

CHECKPOINTS = "checkpoints"


def manager(arm_dir: str, keep: int = 0, read_only: bool = False) -> ocp.CheckpointManager:
  """The CheckpointManager of `<arm_dir>/checkpoints`; keep=0 keeps every step."""
  options = ocp.CheckpointManagerOptions(
      max_to_keep=keep or None, read_only=read_only, create=not read_only,
      cleanup_tmp_directories=not read_only,
      # Synchronous: the train step donates its buffers, so a background save could read freed memory.
      enable_async_checkpointing=False)
  return ocp.CheckpointManager(os.path.abspath(os.path.join(arm_dir, CHECKPOINTS)), options=options)


def abstract_model(cfg: ModelConfig):
  """(graphdef, abstract params, other state) of a Decoder, without allocating any weights."""
  return nnx.split(nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0))), nnx.Param, ...)


def with_shardings(abstract, shardings=None):
  """ShapeDtypeStructs carrying `shardings` (a matching tree), for orbax to restore into."""
  if shardings is None:
    return abstract
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def save(mngr: ocp.CheckpointManager, step: int, params, opt_state, cfg) -> None:
  """Params, optimizer state, and as JSON the config and the data position (batches are f(seed, step))."""
  mngr.save(step, args=ocp.args.Composite(
      params=ocp.args.StandardSave(params),
      opt_state=ocp.args.StandardSave(opt_state),
      config=ocp.args.JsonSave(C.to_dict(cfg)),
      progress=ocp.args.JsonSave({"step": step, "data_step": step, "seed": cfg.seed})))
  mngr.wait_until_finished()


def restore(mngr: ocp.CheckpointManager, step: int, abstract_params, abstract_opt_state=None):
  """(params, opt_state or None, progress dict) of `step`, laid out like the abstract trees."""
  items = {"params": ocp.args.StandardRestore(abstract_params), "progress": ocp.args.JsonRestore()}
  if abstract_opt_state is not None:
    items["opt_state"] = ocp.args.StandardRestore(abstract_opt_state)
  out = mngr.restore(step, args=ocp.args.Composite(**items))
  return out["params"], out.get("opt_state") if abstract_opt_state is not None else None, out["progress"]


def available_steps(arm_dir: str) -> list[int]:
  """Sorted steps of the complete checkpoints under `<arm_dir>/checkpoints` (tmp/partial ones ignored)."""
  if not os.path.isdir(os.path.join(arm_dir, CHECKPOINTS)):
    return []
  return sorted(manager(arm_dir, read_only=True).all_steps())


def load_config(arm_dir: str):
  """The resolved TrainConfig stored in `<arm_dir>/config.json`."""
  from train.config import TrainConfig
  with open(os.path.join(arm_dir, "config.json")) as f:
    return C.from_dict(TrainConfig, json.load(f))


def load_model(arm_dir: str, step: int | None = None) -> tuple[Decoder, Any]:
  """(Decoder with the weights of `step` (latest if None), its TrainConfig)."""
  steps = available_steps(arm_dir)
  if not steps:
    raise FileNotFoundError(f"arm_dir: no complete checkpoint under {os.path.join(arm_dir, CHECKPOINTS)}")
  if step is None:
    step = steps[-1]
  if step not in steps:
    raise ValueError(f"step: no checkpoint {step} in {arm_dir}; available: {steps}")
  cfg = load_config(arm_dir)
  graphdef, abstract_params, rest = abstract_model(cfg.model)
  params, _, _ = restore(manager(arm_dir, read_only=True), step, abstract_params)
  return nnx.merge(graphdef, params, rest), cfg
