"""Train one arm: resume from its latest checkpoint, step, log, evaluate and save on schedule.

Batches are a pure function of (seed, step) and the step is deterministic, so an interrupted run
restarted with the same command reproduces the uninterrupted one bit for bit (rows of metrics.jsonl
and eval.jsonl written after the last checkpoint are dropped on resume and written again). A latest
checkpoint that reads back damaged is moved aside and training resumes from the one before it, which
gives the same result.

The first non-finite step ends the arm: nothing after the last good checkpoint is saved, the arm is
marked diverged (checkpoints.divergence) and `train` raises Diverged, also when run again.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import shutil
import sys
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from minilm import atomic
from minilm import schema as C
from minilm.cli import out_of_memory
from minilm.config import ModelConfig
from minilm.model import Decoder
from train import checkpoints, evaluate, schedule, sharding, tensorboard
from train import data as D
from train import text
from train.config import TrainConfig
from train.step import healthy, init_opt_state, optimizer, stacked, train_step

BatchFn = Callable[..., dict]


class Diverged(RuntimeError):
  """Training met a non-finite loss, gradient norm or update; str(err) is one line."""


def note(message: str) -> None:
  """'note: message' on stderr, from the first process only."""
  if primary():
    print(f"note: {message}", file=sys.stderr)


def check_run_dir(arm_dir: str, cfg: TrainConfig) -> dict | None:
  """Refuse a directory whose config.json holds another config; only checkpoints.CHANGEABLE may
  differ, and `steps` never below the trained steps. Returns the config on disk, flat
  ({'eval.batch': 64, ...}; None for a new directory)."""
  folder = os.path.join(arm_dir, checkpoints.CHECKPOINTS)
  C.check(not os.path.exists(folder) or os.path.isdir(folder), "--out",
          f"{folder} is a file, not a folder (move it away, or use another --out)")
  path = os.path.join(arm_dir, "config.json")
  if not os.path.exists(path):
    return None
  old = checkpoints.flat(checkpoints.config_dict(arm_dir))
  diff = checkpoints.run_difference(old, cfg)
  if diff:
    key, was, now = diff
    raise C.ConfigError(f"{key}: run directory {arm_dir} holds a run with {key}={was!r}, not {now!r}; "
                        f"only {' and '.join(map(repr, checkpoints.CHANGEABLE))} may change (use another name or --out)")
  trained = checkpoints.available_steps(arm_dir)
  C.check(not trained or cfg.steps >= trained[-1], "steps",
          f"run directory {arm_dir} holds {trained[-1] if trained else 0} trained steps; steps={cfg.steps} would end "
          f"before them (give steps >= {trained[-1] if trained else 0}, or use another name or --out)")
  for log in ("metrics.jsonl", "eval.jsonl"):   # a damaged row would stop the resume after config.json was rewritten
    _rows(os.path.join(arm_dir, log), say_cut=False)
  return old


def check_runnable(cfg: TrainConfig):
  """What the config alone cannot tell (the devices, the text corpus, held-out examples), checked
  before anything is written; returns the device mesh."""
  mesh = sharding.make_mesh(cfg.parallel.devices)
  sharding.check_batch(cfg.data.batch_size, mesh)
  try:
    D.train_batch(cfg.data, cfg.seed, 0)   # loads the corpus: an empty or too short text fails here
  except MemoryError:   # numpy's, for a batch below the config's bound that the host still cannot hold
    raise C.ConfigError(f"data.batch_size: must be small enough for a batch of {cfg.data.seq_len + 1} tokens a row to "
                        f"fit in this machine's memory; got {cfg.data.batch_size}") from None
  if cfg.eval.n_per_family:
    D.eval_examples(cfg.data, cfg.eval.seed, 1)
  return mesh


def primary() -> bool:
  """Only process 0 writes configs and logs (multi-host); orbax coordinates checkpoints itself."""
  return jax.process_index() == 0


def prepare_run_dir(arm_dir: str, cfg: TrainConfig) -> None:
  """check_run_dir, then create `arm_dir` and write config.json (saying so when a setting changes)."""
  old = check_run_dir(arm_dir, cfg)
  if not primary():
    return
  if old is not None and old["steps"] != cfg.steps:
    trained = checkpoints.available_steps(arm_dir)
    note(f"{arm_dir}: steps {old['steps']} -> {cfg.steps} in config.json; training goes on from step "
         f"{trained[-1] if trained else 0} and the learning-rate schedule follows the new length")
  if old is not None and old.get("eval.batch", cfg.eval.batch) != cfg.eval.batch:
    note(f"{arm_dir}: eval.batch {old['eval.batch']} -> {cfg.eval.batch} in config.json; the held-out examples "
         "and their scores stay the same (float rounding of another batch shape aside)")
  atomic.write_json(os.path.join(arm_dir, "config.json"), C.to_dict(cfg), indent=2)


def init_params(cfg: ModelConfig, seed: int):
  """The initial parameters of Decoder(cfg, rngs=nnx.Rngs(seed)), built eagerly: exactly the
  tensors anyone gets from that constructor (a jitted init may differ in the last bit)."""
  return nnx.state(Decoder(cfg, rngs=nnx.Rngs(seed)), nnx.Param)


def _rows(path: str, say_cut: bool = True) -> list[tuple[str, dict]]:
  """(line, row) of a JSON-lines log (atomic.read_jsonl); a partial last line is dropped, with a note
  if `say_cut`."""
  rows, cut = atomic.read_jsonl(path)
  for i, (_, row) in enumerate(rows):
    if not isinstance(row, dict) or not isinstance(row.get("step"), int):
      raise checkpoints.RunError(f"{path}: row {i + 1} has no integer 'step'; delete that line and run again")
  if cut and say_cut:
    note(f"{path}: dropped its partial last line (the run stopped while writing it)")
  return rows


def _truncate(path: str, last_step: int) -> None:
  """Keep the JSON-lines rows of steps <= last_step (rows after the restored checkpoint are redone)."""
  if not primary() or not os.path.exists(path):
    return
  atomic.write_text(path, "".join(line + "\n" for line, row in _rows(path) if row["step"] <= last_step))


def _text_tokens_before(metrics_path: str, cfg: TrainConfig, start: int) -> int:
  """Text tokens the batches of steps 0..start-1 drew: from the metrics row of step `start` (a
  checkpoint step is always logged), else counted again from the family draws."""
  if start and primary() and os.path.exists(metrics_path):
    for _, row in _rows(metrics_path):
      if row.get("step") == start and isinstance(row.get("text_tokens"), int):
        return row["text_tokens"]
  return cfg.data.seq_len * sum(D.text_rows(cfg.data, cfg.seed, s) for s in range(start))


def _append(path: str, row: dict) -> None:
  if not primary():
    return
  with open(path, "a") as f:
    f.write(json.dumps(row) + "\n")


def score_checkpoints(arm_dir: str, batch: int | None = None) -> list[dict]:
  """Score the held-out tasks (the examples periodic evaluation uses) at every saved checkpoint that
  eval.jsonl has no row for, and merge the rows into eval.jsonl in step order (rows already there are
  kept as they are: the same weights and examples give the same scores). Returns the new rows.

  Periodic evaluation follows eval.every; this puts a score beside every traced checkpoint of a run
  trained with sparse evaluation, without training again. Refused while the arm trains (eval.jsonl is
  rewritten whole, so rows the loop appends meanwhile would be lost). batch: prompts per call
  (default: the run's eval.batch)."""
  with writing([arm_dir]):   # one writer of eval.jsonl: a training run would lose rows
    cfg = checkpoints.load_config(arm_dir)
    C.check(cfg.eval.n_per_family > 0, "eval.n_per_family", f"{arm_dir} was trained with eval.n_per_family=0; "
            "there are no held-out examples to score")
    path = os.path.join(arm_dir, "eval.jsonl")
    rows = {row["step"]: line for line, row in _rows(path)}
    examples = D.eval_examples(cfg.data, cfg.eval.seed, cfg.eval.n_per_family)
    new = []
    for step in checkpoints.available_steps(arm_dir):
      if step in rows:
        continue
      model, _ = checkpoints.load_model(arm_dir, step)
      new.append({"step": step, **evaluate.accuracy(model, examples, batch=batch or cfg.eval.batch)})
      rows[step] = json.dumps(new[-1])
      if primary():   # written after every step: an interrupted backfill keeps what it scored
        atomic.write_text(path, "".join(rows[s] + "\n" for s in sorted(rows)))
    return new


def _restore_latest(mngr, arm_dir: str, cfg: TrainConfig, abstract_params, abstract_opt):
  """(step, params, opt_state) of the latest checkpoint that reads back intact, or None. A damaged
  step is moved aside, saying so, and the one before it tried: the steps after it are redone exactly."""
  for step in sorted(mngr.all_steps(), reverse=True):
    error = None
    try:
      params, opt_state = checkpoints.restore(mngr, step, cfg.model, abstract_params, abstract_opt, run=cfg)
    except checkpoints.DamagedCheckpoint as err:
      error = err
    # every process resumes from the same step: a step damaged as one of them read it is damaged for all
    if not sharding.any_process(error is not None):
      return step, params, opt_state
    if primary():
      where = checkpoints.set_aside(arm_dir, step)
      note(f"{error or f'step {step} ({mngr.directory}/{step}): another process read it damaged'}; moved to {where}; "
           f"training resumes from the step before")
    elif error is not None:   # what this process found, which process 0's note cannot say
      print(f"note: {error} (process {jax.process_index()}); process 0 moves the step aside", file=sys.stderr)
    sharding.barrier(f"set_aside_{step}")   # the others list the steps again only once it has moved
    mngr.reload()
  return None


def _diverged(arm_dir: str, cfg: TrainConfig, mngr, health: dict) -> Diverged:
  """Mark the arm diverged on disk; the Diverged error to raise."""
  step, last = int(health["bad_step"]) + 1, mngr.latest_step()
  loss, grad_norm = float(health["loss"]), float(health["grad_norm"])
  message = (f"{cfg.name}: diverged at step {step} (loss {loss}, grad_norm {grad_norm}); nothing after the last good "
             f"checkpoint, step {last} in {mngr.directory}, was saved; change the config (e.g. a lower optim.lr) and "
             f"train under another name or --out, or delete {arm_dir} first")
  if primary():
    checkpoints.mark_diverged(arm_dir, {"step": step, "loss": loss, "grad_norm": grad_norm, "last_good_step": last,
                                        "message": message})
  return Diverged(message)


def train(cfg: TrainConfig, arm_dir: str, *, batch_fn: BatchFn = D.train_batch, progress: bool = True,
          stop_at: int | None = None) -> dict:
  """Train (or resume) the arm in `arm_dir` up to cfg.steps; returns the last metrics and eval rows.

  Raises Diverged at the first non-finite step, or at once for an arm that diverged before.
  stop_at: leave the loop after this step as if killed there (for resume tests).
  """
  with writing([arm_dir]), _out_of_memory([arm_dir]):
    (result,) = _train([cfg], [arm_dir], batch_fn=batch_fn, progress=progress, stop_at=stop_at)
  if isinstance(result, Diverged):
    raise result
  return result


@contextlib.contextmanager
def writing(arm_dirs: list[str]):
  """One process at a time trains (or scores) an arm: a second command on the same arm is refused in
  one line instead of interleaving its logs and checkpoints with the first's. Multi-host: process 0
  holds the locks for all (the others write through orbax, which coordinates them)."""
  with contextlib.ExitStack() as held:
    for arm_dir in arm_dirs if primary() else []:
      held.enter_context(atomic.exclusive(arm_dir))
    yield


# What training writes into an arm directory; an arm that ran out of memory before training any
# step loses them (its config.json, of the settings that did not fit, would refuse smaller ones).
WRITTEN = ("config.json", checkpoints.CHECKPOINTS, "metrics.jsonl", "eval.jsonl", "tensorboard")


@contextlib.contextmanager
def _out_of_memory(arm_dirs: list[str]):
  """The device's out-of-memory error in the block leaves no arm directory that the same command with
  smaller settings would refuse: an arm that never trained a step is emptied again (it held only its
  initial step, a function of its seed; its config.json may be older than the block, written when the
  experiment was planned), so the error's advice works as given; an arm with trained steps (or
  damaged ones set aside, or a divergence record) keeps them, and the error (a one-line RunError) says
  how to go on."""
  try:
    yield
  except RuntimeError as err:
    first = out_of_memory(err)
    if first is None:
      raise
    kept = [d for d in arm_dirs if checkpoints.available_steps(d) not in ([], [0])
            or any(os.path.exists(os.path.join(d, name)) for name in (checkpoints.DAMAGED, checkpoints.DIVERGED))
            or atomic.read_jsonl(os.path.join(d, "metrics.jsonl"))[0]]
    if primary():
      for arm_dir in set(arm_dirs) - set(kept):
        for path in (os.path.join(arm_dir, name) for name in WRITTEN):
          if os.path.isdir(path):
            shutil.rmtree(path)
          elif os.path.exists(path):
            os.remove(path)
    if not kept:
      raise
    raise checkpoints.RunError(
        f"{kept[0]}: out of memory ({first}); its trained steps are kept, and a run directory takes no settings "
        f"of its own but {' and '.join(map(repr, checkpoints.CHANGEABLE))}: lower eval.batch if it ran out while evaluating, "
        f"or train smaller ones (batch size, sequence length, model size) under another name or --out") from None


def seedless(cfg: TrainConfig) -> str:
  """The config without its seed and name, as a key: arms with equal keys can be stacked."""
  return json.dumps({k: v for k, v in C.to_dict(cfg).items() if k not in ("seed", "name")}, sort_keys=True)


def stackable(cfgs: list[TrainConfig]) -> str | None:
  """Why these arms cannot train as one stacked program (None: they can): they must differ in `seed`
  (and `name`) alone and run on one device."""
  if len({seedless(c) for c in cfgs}) > 1:
    return "their configs differ in more than the seed"
  if sharding.make_mesh(cfgs[0].parallel.devices).devices.size != 1:
    return "stacking runs on one device (parallel.devices=1)"
  return None


def train_stacked(cfgs: list[TrainConfig], arm_dirs: list[str], *, batch_fn: BatchFn = D.train_batch,
                  progress: bool = True, stop_at: int | None = None) -> list[dict]:
  """Train arms that differ only in seed as one program: their params and optimizer states stacked
  on a leading arm axis and stepped by one jitted, vmapped train step (one compilation, one dispatch
  per step for all of them, which fills an accelerator that one small arm leaves idle). Each arm
  gets its own batches (from its seed), checkpoints, logs and evaluations, laid out exactly as
  `train` lays them out; its numbers equal `train`'s to float32 tolerance (the vmapped matmuls may
  sum in another order), not bit for bit. Arms that resume from different steps (a crash between
  their saves): those behind catch up alone to the leader's checkpoint, then all go on stacked.
  Returns one entry per arm: its last rows, or {'diverged': message} (the others go on)."""
  why = stackable(cfgs)
  C.check(why is None, "arms", f"cannot stack {', '.join(c.name for c in cfgs)}: {why}")
  with writing(arm_dirs), _out_of_memory(arm_dirs):
    results = _train(cfgs, arm_dirs, batch_fn=batch_fn, progress=progress, stop_at=stop_at)
  return [{"diverged": str(r)} if isinstance(r, Diverged) else r for r in results]


@dataclasses.dataclass
class _Arm:
  """One arm's files and running counters in the loop."""
  cfg: TrainConfig
  arm_dir: str
  mngr: object
  diverged: Diverged | None = None
  last: dict = dataclasses.field(default_factory=lambda: {"metrics": None, "eval": None})

  def path(self, name: str) -> str:
    return os.path.join(self.arm_dir, name)


def stack_arms(trees: list):
  """Trees of several arms as one, stacked on a leading arm axis (train.step.stacked's layout)."""
  return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def _unstack(tree, k: int):
  return jax.tree.map(lambda x: x[k], tree)


def _train(cfgs: list[TrainConfig], arm_dirs: list[str], *, batch_fn: BatchFn, progress: bool,
           stop_at: int | None, catch_up: bool = True) -> list:
  """`train` of one arm, or of several stacked (train_stacked); an entry per arm: its last rows or
  its Diverged error. Stacked arms that resume from different steps: with `catch_up` those behind
  first train alone to the leader's checkpoint (the same save schedule has one there), else, or where
  that leaves them apart, they train one after another."""
  out = [None] * len(cfgs)
  live = []
  for k, (cfg, arm_dir) in enumerate(zip(cfgs, arm_dirs)):
    record = checkpoints.divergence(arm_dir)
    if record:
      out[k] = Diverged(record["message"])
    else:
      live.append(k)
  if not live:
    return out
  cfgs, arm_dirs = [cfgs[k] for k in live], [arm_dirs[k] for k in live]
  cfg = cfgs[0]
  mesh = check_runnable(cfg)
  for c, arm_dir in zip(cfgs, arm_dirs):
    prepare_run_dir(arm_dir, c)
  graphdef, abstract_params, rest = checkpoints.abstract_model(cfg.model)
  abstract_opt = jax.eval_shape(optimizer(cfg.optim, cfg.steps).init, abstract_params)
  param_sh = sharding.tree_shardings(abstract_params, mesh, cfg.parallel.strategy)
  opt_sh = sharding.tree_shardings(abstract_opt, mesh, cfg.parallel.strategy)
  arms = [_Arm(c, arm_dir, checkpoints.manager(arm_dir, c.checkpoint.keep)) for c, arm_dir in zip(cfgs, arm_dirs)]
  try:
    states = []
    for arm in arms:
      resumed = _restore_latest(arm.mngr, arm.arm_dir, arm.cfg, checkpoints.with_shardings(abstract_params, param_sh),
                                checkpoints.with_shardings(abstract_opt, opt_sh))
      if resumed is None:
        params = init_params(arm.cfg.model, arm.cfg.seed)   # in this process, then laid out on the mesh
        opt_state = sharding.put_global(init_opt_state(params, cfg=arm.cfg.optim, steps=arm.cfg.steps), opt_sh)
        params = sharding.put_global(params, param_sh)
        checkpoints.save(arm.mngr, 0, params, opt_state, arm.cfg)
        resumed = 0, params, opt_state
      states.append(resumed)
    if len({s[0] for s in states}) > 1:   # resumed at different steps (a crash between the arms' saves)
      for arm in arms:
        arm.mngr.close()
      starts = [s[0] for s in states]
      lead = max(starts)
      arms = states = resumed = []
      if catch_up and stop_at is None:   # those behind train alone to the leader's checkpoint, then all stacked
        for c, arm_dir, start in zip(cfgs, arm_dirs, starts):
          if start < lead:
            _train([c], [arm_dir], batch_fn=batch_fn, progress=progress, stop_at=lead)
        for k, r in zip(live, _train(cfgs, arm_dirs, batch_fn=batch_fn, progress=progress, stop_at=None,
                                     catch_up=False)):
          out[k] = r
        return out
      for k, c, arm_dir in zip(live, cfgs, arm_dirs):   # no common step to stack from: one after another
        (out[k],) = _train([c], [arm_dir], batch_fn=batch_fn, progress=progress, stop_at=stop_at)
      return out
    step_fn = functools.partial(train_step, graphdef=graphdef, cfg=cfg.optim, steps=cfg.steps, mesh=mesh,
                                strategy=cfg.parallel.strategy)
    if len(arms) == 1:
      start, params, opt_state = states[0]
      step = lambda p, o, batch, s, h: step_fn(p, o, rest, batch, s, h)
    else:
      start, params, opt_state = states[0][0], stack_arms([s[1] for s in states]), stack_arms([s[2] for s in states])
      step = stacked(lambda p, o, batch, s, h: step_fn(p, o, rest, batch, s, h))
    states = resumed = None   # the stacked copies are donated to the first step; the arms' own buffers go now
    results = _loop(arms, start, params, opt_state, step=step, model=lambda p: nnx.merge(graphdef, p, rest),
                    batch_fn=batch_fn, batch_sh=sharding.batch_sharding(mesh), progress=progress, stop_at=stop_at)
    for k, r in zip(live, results):
      out[k] = r
    return out
  finally:
    for arm in arms:
      arm.mngr.close()


def _loop(arms: list[_Arm], start: int, params, opt_state, *, step, model, batch_fn, batch_sh, progress: bool,
          stop_at: int | None) -> list:
  """Steps start..steps: step(params, opt_state, batch, index, health), log, evaluate model(params),
  save, for each arm (params and opt_state stacked on a leading arm axis when there are several)."""
  cfg, stacked = arms[0].cfg, len(arms) > 1
  of = (lambda tree, k: _unstack(tree, k)) if stacked else (lambda tree, k: tree)
  tokens_per_step = cfg.data.batch_size * cfg.data.seq_len
  examples = D.eval_examples(cfg.data, cfg.eval.seed, cfg.eval.n_per_family) if cfg.eval.n_per_family else {}
  # epochs over the text corpus: text tokens drawn / tokens of its training split
  corpus_tokens = len(text.split(cfg.data, heldout=False)) if cfg.data.mixture["text"] > 0 else 0
  text_tokens = []
  for arm in arms:
    _truncate(arm.path("metrics.jsonl"), start)
    _truncate(arm.path("eval.jsonl"), start)
    text_tokens.append(_text_tokens_before(arm.path("metrics.jsonl"), arm.cfg, start) if corpus_tokens else 0)
  rows = sharding.host_rows(batch_sh, cfg.data.batch_size)   # this process generates only its own rows
  # placed as the step's outputs are, so that step 1 runs the program step 0 compiled (not a second one)
  health = stack_arms([healthy()] * len(arms)) if stacked else healthy()
  health = sharding.put_global(health, jax.tree.map(lambda _: sharding.replicated(batch_sh.mesh), health))
  clock, clock_step = time.perf_counter(), start
  name = cfg.name if not stacked else f"{cfg.name} (+{len(arms) - 1} seeds)"
  with contextlib.ExitStack() as stack:
    events = [stack.enter_context(tensorboard.writer(arm.path("tensorboard") if primary() else None,
                                                     purge_step=start + 1)) for arm in arms]
    bar = stack.enter_context(tqdm(total=cfg.steps, initial=start, disable=not (progress and primary()), desc=name,
                                   dynamic_ncols=True))
    for s in range(start, cfg.steps):
      if stacked:
        drawn = [batch_fn(arm.cfg.data, arm.cfg.seed, s, rows) for arm in arms]
        batch = jax.device_put({key: np.stack([b[key] for b in drawn]) for key in drawn[0]})
      else:
        batch = sharding.put_rows(batch_fn(cfg.data, cfg.seed, s, rows), batch_sh, cfg.data.batch_size)
      params, opt_state, metrics = step(params, opt_state, batch, s, health)
      health = metrics["health"]
      if corpus_tokens:
        for k, arm in enumerate(arms):
          text_tokens[k] += cfg.data.seq_len * D.text_rows(arm.cfg.data, arm.cfg.seed, s)
      done = s + 1
      bar.update(1)
      saving = schedule.is_save_step(done, cfg.steps, cfg.checkpoint.every, cfg.checkpoint.log_spaced)
      evaluating = bool(examples) and schedule.is_eval_step(done, cfg.steps, cfg.eval.every)
      logging = done % cfg.log_every == 0 or done == cfg.steps or saving or evaluating
      if logging:   # the one host sync: it also reads the health record, before any eval or save
        metrics = jax.device_get(metrics)
        now = time.perf_counter()
      for k, arm in enumerate(arms):
        if arm.diverged:
          continue
        if logging:
          m = of(metrics, k)
          if m["health"]["bad_step"] >= 0:
            arm.diverged = _diverged(arm.arm_dir, arm.cfg, arm.mngr, m["health"])
            continue
          row = {"step": done, **{key: float(m[key]) for key in ("loss", "grad_norm", "lr", "weight")},
                 "tokens": done * tokens_per_step,
                 "tokens_per_s": (done - clock_step) * tokens_per_step / max(now - clock, 1e-9)}
          if corpus_tokens:
            row |= {"text_tokens": text_tokens[k], "text_epochs": text_tokens[k] / corpus_tokens}
          _append(arm.path("metrics.jsonl"), row)
          events[k].add(tensorboard.scalars(row, "train"), done)
          if arm is next(a for a in arms if not a.diverged):
            bar.set_postfix(loss=f"{row['loss']:.3f}", lr=f"{row['lr']:.1e}", tok_s=f"{row['tokens_per_s']:.0f}")
          arm.last["metrics"] = row
        if evaluating:
          scores = evaluate.accuracy(model(of(params, k)), examples, batch=cfg.eval.batch)
          _append(arm.path("eval.jsonl"), {"step": done, **scores})
          events[k].add(tensorboard.scalars(scores, "eval"), done)
          if primary():   # once, not per process
            bar.write(f"[{arm.cfg.name}] step {done}: {evaluate.summary(scores)}")
          arm.last["eval"] = {"step": done, **scores}
        if saving:
          checkpoints.save(arm.mngr, done, of(params, k), of(opt_state, k), arm.cfg)
      if logging:
        clock, clock_step = time.perf_counter(), done  # eval and save time do not count as training time
      if all(arm.diverged for arm in arms) or (stop_at is not None and done >= stop_at):
        break
  return [arm.diverged or arm.last for arm in arms]
