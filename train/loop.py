"""Train one arm: resume from its latest checkpoint, step, log, evaluate and save on schedule.

Batches are a pure function of (seed, step) and the step is deterministic, so an interrupted run
restarted with the same command reproduces the uninterrupted one bit for bit (rows of metrics.jsonl
and eval.jsonl written after the last checkpoint are dropped on resume and written again).
"""
from __future__ import annotations

import functools
import json
import os
import time
from typing import Callable

import jax
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from minilm import config as C
from minilm.config import ModelConfig
from minilm.model import Decoder
from train import checkpoints, evaluate, schedule, sharding
from train import data as D
from train.config import TrainConfig
from train.step import init_opt_state, optimizer, train_step

BatchFn = Callable[..., dict]


def _flat(tree, prefix=""):
  if isinstance(tree, dict):
    return {k: v for key, sub in tree.items() for k, v in _flat(sub, f"{prefix}{key}.").items()}
  return {prefix[:-1]: tree}


def check_run_dir(arm_dir: str, cfg: TrainConfig) -> None:
  """Refuse a directory whose config.json holds another config; only `steps` may differ (extending
  a run; the cosine schedule then follows the new length)."""
  path = os.path.join(arm_dir, "config.json")
  if not os.path.exists(path):
    return
  with open(path) as f:
    old_flat = _flat(json.load(f))
  new_flat = _flat(json.loads(json.dumps(C.to_dict(cfg))))
  for key in [*new_flat, *(k for k in old_flat if k not in new_flat)]:  # config order: 'kind' first
    if key != "steps" and old_flat.get(key, "<absent>") != new_flat.get(key, "<absent>"):
      raise C.ConfigError(
          f"{key}: run directory {arm_dir} holds a run with {key}={old_flat.get(key, '<absent>')!r}, "
          f"not {new_flat.get(key, '<absent>')!r}; only 'steps' may change (use another name or --out)")


def primary() -> bool:
  """Only process 0 writes configs and logs (multi-host); orbax coordinates checkpoints itself."""
  return jax.process_index() == 0


def prepare_run_dir(arm_dir: str, cfg: TrainConfig) -> None:
  """check_run_dir, then create `arm_dir` and write config.json."""
  check_run_dir(arm_dir, cfg)
  if not primary():
    return
  os.makedirs(arm_dir, exist_ok=True)
  with open(os.path.join(arm_dir, "config.json"), "w") as f:
    json.dump(C.to_dict(cfg), f, indent=2)


def init_params(cfg: ModelConfig, seed: int):
  """The initial parameters of Decoder(cfg, rngs=nnx.Rngs(seed)), built eagerly: exactly the
  tensors anyone gets from that constructor (a jitted init may differ in the last bit)."""
  return nnx.state(Decoder(cfg, rngs=nnx.Rngs(seed)), nnx.Param)


def _truncate(path: str, last_step: int) -> None:
  """Keep the JSON-lines rows of steps <= last_step (rows after the restored checkpoint are redone)."""
  if not primary() or not os.path.exists(path):
    return
  with open(path) as f:
    rows = [line for line in f if line.strip() and json.loads(line)["step"] <= last_step]
  with open(path, "w") as f:
    f.writelines(rows)


def _append(path: str, row: dict) -> None:
  if not primary():
    return
  with open(path, "a") as f:
    f.write(json.dumps(row) + "\n")


def train(cfg: TrainConfig, arm_dir: str, *, batch_fn: BatchFn = D.train_batch, progress: bool = True,
          stop_at: int | None = None) -> dict:
  """Train (or resume) the arm in `arm_dir` up to cfg.steps; returns the last metrics and eval rows.

  stop_at: leave the loop after this step as if killed there (for resume tests).
  """
  prepare_run_dir(arm_dir, cfg)
  mesh = sharding.make_mesh(cfg.parallel.devices)
  sharding.check_batch(cfg.data.batch_size, mesh)
  graphdef, abstract_params, rest = checkpoints.abstract_model(cfg.model)
  abstract_opt = jax.eval_shape(optimizer(cfg.optim, cfg.steps).init, abstract_params)
  param_sh = sharding.tree_shardings(abstract_params, mesh, cfg.parallel.strategy)
  opt_sh = sharding.tree_shardings(abstract_opt, mesh, cfg.parallel.strategy)
  batch_sh = sharding.batch_sharding(mesh)

  mngr = checkpoints.manager(arm_dir, cfg.checkpoint.keep)
  start = mngr.latest_step()
  if start is None:
    start = 0
    params = jax.device_put(init_params(cfg.model, cfg.seed), param_sh)
    opt_state = init_opt_state(params, cfg=cfg.optim, steps=cfg.steps, mesh=mesh, strategy=cfg.parallel.strategy)
    checkpoints.save(mngr, 0, params, opt_state, cfg)
  else:
    params, opt_state, _ = checkpoints.restore(
        mngr, start, checkpoints.with_shardings(abstract_params, param_sh),
        checkpoints.with_shardings(abstract_opt, opt_sh))
  metrics_path, eval_path = os.path.join(arm_dir, "metrics.jsonl"), os.path.join(arm_dir, "eval.jsonl")
  _truncate(metrics_path, start)
  _truncate(eval_path, start)

  step_fn = functools.partial(train_step, graphdef=graphdef, cfg=cfg.optim, steps=cfg.steps, mesh=mesh,
                              strategy=cfg.parallel.strategy)
  examples = D.eval_examples(cfg.data, cfg.eval.seed, cfg.eval.n_per_family) if cfg.eval.n_per_family else {}
  tokens_per_step = cfg.data.batch_size * cfg.data.seq_len
  last = {"metrics": None, "eval": None}
  bar = tqdm(total=cfg.steps, initial=start, disable=not (progress and primary()), desc=cfg.name, dynamic_ncols=True)
  clock, clock_step = time.perf_counter(), start
  for s in range(start, cfg.steps):
    batch = sharding.put_batch(batch_fn(cfg.data, cfg.seed, s), batch_sh)
    params, opt_state, metrics = step_fn(params, opt_state, rest, batch, s)
    done = s + 1
    bar.update(1)
    saving = schedule.is_save_step(done, cfg.steps, cfg.checkpoint.every, cfg.checkpoint.log_spaced)
    evaluating = bool(examples) and schedule.is_eval_step(done, cfg.steps, cfg.eval.every)
    logging = done % cfg.log_every == 0 or done == cfg.steps or saving or evaluating
    if logging:
      metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
      now = time.perf_counter()
      row = {"step": done, "loss": metrics["loss"], "grad_norm": metrics["grad_norm"], "lr": metrics["lr"],
             "weight": metrics["weight"],
             "tokens": done * tokens_per_step,
             "tokens_per_s": (done - clock_step) * tokens_per_step / max(now - clock, 1e-9)}
      _append(metrics_path, row)
      bar.set_postfix(loss=f"{row['loss']:.3f}", lr=f"{row['lr']:.1e}", tok_s=f"{row['tokens_per_s']:.0f}")
      last["metrics"] = row
    if evaluating:
      scores = evaluate.accuracy(nnx.merge(graphdef, params, rest), examples, batch=cfg.eval.batch)
      _append(eval_path, {"step": done, **scores})
      bar.write(f"[{cfg.name}] step {done}: {evaluate.summary(scores)}")
      last["eval"] = {"step": done, **scores}
    if saving:
      checkpoints.save(mngr, done, params, opt_state, cfg)
    if logging:
      clock, clock_step = time.perf_counter(), done  # eval and save time do not count as training time
    if stop_at is not None and done >= stop_at:
      break
  bar.close()
  mngr.close()
  return last

