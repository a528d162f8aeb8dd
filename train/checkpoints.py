"""Orbax checkpoints of one arm: params, optimizer state, step and the full config, one directory per step.

Orbax writes each step into '<step>.orbax-checkpoint-tmp' and renames it when complete, so a run
killed mid-save leaves only a tmp directory, which listing and restoring ignore (and the next
writer removes).

Every step also holds 'checksums': a sha256 of each saved array's dtype, shape and bytes, computed
from the arrays in memory and saved in the same orbax save, so it is as atomic as the arrays. Every
restore re-hashes what it read: a flipped byte, a truncated file or a checkpoint of another model
is a one-line error naming the step (steps saved before checksums existed load unchecked).

An arm whose training met a non-finite loss holds `diverged.json` ({"step", "loss", "grad_norm",
"last_good_step", "message"}); `divergence(arm_dir)` reads it.
"""
from __future__ import annotations

import errno
import functools
import glob
import hashlib
import json
import logging
import os
import shutil
import threading
import time
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from minilm import atomic
from minilm import schema as C
from minilm.cli import deferred, take_unraisable, uninterrupted
from minilm.config import ModelConfig
from minilm.model import Decoder
from train import sharding
from train.config import TrainConfig

CHECKPOINTS = "checkpoints"
DAMAGED = "damaged_checkpoints"   # where damaged steps are moved, never deleted
DIVERGED = "diverged.json"
HASH = "sha256 of dtype.str, shape and C-order bytes"


class RunError(ValueError):
  """A file of a run that cannot be used as it is; str(err) is one line: '<path or step>: <what is
  wrong>; <what to do>'."""


class DamagedCheckpoint(RunError):
  """A checkpoint step whose files cannot be read or whose arrays differ from their checksums."""


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
  """ShapeDtypeStructs carrying `shardings` (a matching tree; None: all on this process's first
  device), for orbax to restore into: a step saved on another mesh (several processes or devices)
  then reads back laid out as asked."""
  if shardings is None:
    shardings = jax.tree.map(lambda _: jax.sharding.SingleDeviceSharding(jax.local_devices()[0]), abstract)
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


# ------------------------------------------------------------------------------- checksums

def _host(x) -> np.ndarray:
  """The whole array in this process: a replicated one from its own copy, a split one gathered."""
  if getattr(x, "is_fully_addressable", True):
    return np.asarray(x)
  if x.is_fully_replicated:
    return np.asarray(x.addressable_data(0))
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def checksums(tree) -> dict[str, str]:
  """{leaf path: sha256 of the array's dtype, shape and bytes} of every array of `tree`."""
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    a = np.ascontiguousarray(_host(leaf))
    digest = hashlib.sha256(f"{a.dtype.str}{a.shape}".encode())
    digest.update(a.reshape(-1).view(np.uint8))
    out[jax.tree_util.keystr(path)] = digest.hexdigest()
  return out


def _first_non_finite(tree) -> str | None:
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    a = _host(leaf)
    if np.issubdtype(a.dtype, np.floating) and not np.isfinite(a).all():
      return jax.tree_util.keystr(path)
  return None


def _mismatch(step_name: str, item: str, tree, expected: dict[str, str]) -> DamagedCheckpoint | None:
  got = checksums(tree)
  bad = [k for k in expected if got.get(k) != expected[k]]
  if bad or set(got) != set(expected):
    return DamagedCheckpoint(f"{step_name}: {item}{bad[0] if bad else ''} differs from its checksum "
                             f"({len(bad)} of {len(expected)} arrays): the files are damaged")
  return None


# ------------------------------------------------------------------------------- save / restore

def save(mngr: ocp.CheckpointManager, step: int, params, opt_state, cfg) -> None:
  """Params, optimizer state, their checksums, and as JSON the config and the data position
  (batches are f(seed, step)). Refuses non-finite arrays; a full disk is a one-line RunError."""
  where = f"{mngr.directory}/{step}"
  bad = _first_non_finite({"params": params, "opt_state": opt_state})
  if bad:
    raise RunError(f"{where}: {bad} holds non-finite values; nothing was saved")
  sums = {"algorithm": HASH, "params": checksums(params), "opt_state": checksums(opt_state)}
  thread_errors = _ThreadErrors()
  logging.getLogger().addHandler(thread_errors)
  threads_before = set(threading.enumerate())
  try:
    with deferred():   # a first Ctrl-C or SIGTERM lets the save end, then stops the run
      mngr.save(step, args=ocp.args.Composite(
          params=ocp.args.StandardSave(params),
          opt_state=ocp.args.StandardSave(opt_state),
          checksums=ocp.args.JsonSave(sums),
          config=ocp.args.JsonSave(C.to_dict(cfg)),
          progress=ocp.args.JsonSave({"step": step, "data_step": step, "seed": cfg.seed})))
      mngr.wait_until_finished()
  except KeyboardInterrupt:   # a second one cut the save: its threads end first (cut off by Python's exit,
    _quiet_abandoned_io()     # they die in tracebacks and leave <step>.orbax-checkpoint-tmp); a third
    with uninterrupted():     # signal waits for them too
      _settle(mngr, step, threads_before)
    raise
  except OSError as err:
    late = _settle(mngr, step, threads_before)
    last = mngr.latest_step()
    cause = _disk_error([err, *late, *thread_errors.errors])
    fix = "make room" if getattr(cause, "errno", None) in DISK_ERRNOS else "fix that"
    resumes = f"it resumes exactly from step {last}" if last is not None else "it starts again from step 0"
    raise RunError(f"{where}: cannot save ({cause.strerror or cause}); nothing of step {step} was kept: "
                   f"{fix} and run the same command again, {resumes}") from None
  finally:
    logging.getLogger().removeHandler(thread_errors)


def _settle(mngr: ocp.CheckpointManager, step: int, threads_before: set) -> list[Exception]:
  """The errors of a save that did not return, once its threads have ended, and then its partial step
  removed. The save's own threads may outlive the error that reached us: a thread that hit the disk
  logs its error when it ends, and one still writing into <step>.orbax-checkpoint-tmp would break the
  resumed save of the same step. They are waited for (bounded); then what the step left is removed."""
  late = []
  try:
    mngr.wait_until_finished()
  except Exception as e:  # noqa: BLE001 - orbax's errors are many; they are reported by the caller
    late.append(e)
  deadline = time.monotonic() + THREAD_WAIT_S
  for t in set(threading.enumerate()) - threads_before:
    error = _join_by(t, deadline)
    if error is not None:
      late.append(error)
  for tmp in glob.glob(os.path.join(glob.escape(str(mngr.directory)), f"{step}.orbax-checkpoint-tmp*")):
    shutil.rmtree(tmp, ignore_errors=True)
  return late


def _join_by(thread: threading.Thread, deadline: float) -> Exception | None:
  """Join `thread` until `deadline`; one that threading lists but has not started yet (joining it
  raises RuntimeError) is waited for to start first. Orbax's save threads re-raise their own error
  from join (the full disk, when the thread was still running): that error is returned."""
  while time.monotonic() < deadline:
    try:
      thread.join(max(0.0, deadline - time.monotonic()))
      return None
    except Exception as e:
      if not (isinstance(e, RuntimeError) and "before it is started" in str(e)):
        return e
      time.sleep(0.01)
  return None


DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EIO)
THREAD_WAIT_S = 30.0


class _ThreadErrors(logging.Handler):
  """The OSErrors orbax's save threads log: the thread that hit a full disk only logs its error,
  and the caller may see just a later cleanup error (e.g. 'Directory not empty')."""

  def __init__(self):
    super().__init__(logging.ERROR)
    self.errors: list[OSError] = []

  def emit(self, record):
    if record.exc_info and isinstance(record.exc_info[1], OSError):
      self.errors.append(record.exc_info[1])


def _disk_error(errors: list[OSError]) -> OSError:
  """The error that says why a save failed: a disk error among `errors` and their causes, else the
  first one."""
  seen, todo = set(), list(reversed(errors))
  while todo:
    e = todo.pop()
    if e is None or id(e) in seen:
      continue
    seen.add(id(e))
    if isinstance(e, OSError) and e.errno in DISK_ERRNOS:
      return e
    todo += [e.__cause__, e.__context__, *getattr(e, "exceptions", ())]
  return errors[0]


def _step_name(mngr: ocp.CheckpointManager, step: int) -> str:
  return f"step {step} ({mngr.directory}/{step})"


def _restore_json(mngr: ocp.CheckpointManager, step: int) -> dict:
  """The JSON items of `step`: config, progress and (when saved) checksums."""
  names = ["config", "progress"] + (["checksums"] if os.path.isdir(os.path.join(mngr.directory, str(step), "checksums"))
                                    else [])
  return _guarded(mngr, step, {name: ocp.args.JsonRestore() for name in names})


def _guarded(mngr: ocp.CheckpointManager, step: int, items: dict) -> dict:
  """The `items` of `step`, read by orbax's handlers in this process alone, with every failure of
  orbax or tensorstore (their exception types are many and undocumented, hence the broad catch)
  turned into one line naming the step.

  Not mngr.restore: that ends in a barrier (a collective) that a process whose read failed never
  reaches, so its next collective would meet its peers' barrier and abort them all. Reading is local
  to each process; restore() and its caller agree on the outcome afterwards."""
  _quiet_abandoned_io()
  handler = ocp.CompositeCheckpointHandler()
  try:
    with deferred():   # nothing is written: an interrupt waits for the read to end
      return dict(handler.restore(mngr.directory / str(step), ocp.args.Composite(**items)))
  except Exception as err:  # noqa: BLE001 - see the docstring
    detail = (str(err).strip().splitlines() or [type(err).__name__])[0].split(" See full TensorStore")[0]
    raise DamagedCheckpoint(f"{_step_name(mngr, step)}: cannot be read ({detail[:200]})") from None
  finally:
    handler.close()


# What the reads of a failed restore, or the writes of an interrupted save, say when they end after
# orbax gave up on them: tensorstore's errors, or asyncio's on the event loop orbax has closed meanwhile.
ABANDONED = ("Encountered error while reading array index", "in OCDBT database", "Event loop is closed")


@functools.cache   # once per process
def _quiet_abandoned_io() -> None:
  """When one read of a step fails, orbax's restore raises and closes its event loop while its other
  reads go on in tensorstore's threads (an interrupted save's writes likewise); their errors reach
  Python's unraisable hook and asyncio's log as tracebacks, before and after the one line that
  reports the step. Those messages are dropped; anything else is shown as before."""
  take_unraisable(lambda unraisable: any(m in str(unraisable.exc_value) for m in ABANDONED))
  logging.getLogger("asyncio").addFilter(lambda record: not any(m in record.getMessage() for m in ABANDONED))


# The settings a run takes other than its own, in its directory's config.json and in the config each
# checkpoint stores: `steps` extends a run (the cosine schedule then follows the new length);
# `eval.batch` only splits the held-out set into calls, so it is what an evaluation that ran out of
# memory needs lowered.
CHANGEABLE = ("steps", "eval.batch")


def _check_model(mngr: ocp.CheckpointManager, step: int, stored: dict, model: ModelConfig) -> None:
  diff = first_difference(flat(stored.get("model", {})), flat(C.to_dict(model)))
  if diff:
    key, old, new = diff
    raise RunError(f"{_step_name(mngr, step)}: holds a model with model.{key}={old!r}, not {new!r}: it belongs "
                   f"to another run; move it away or use the run's own config")


def run_difference(stored: dict, run: TrainConfig) -> tuple[str, Any, Any] | None:
  """(key, stored value, run's value) of the first setting but CHANGEABLE in which a stored config
  (config.json's, or a checkpoint's; nested or flat) differs from `run`, compared as JSON."""
  return first_difference(flat(stored), flat(json.loads(json.dumps(C.to_dict(run)))), CHANGEABLE)


def _check_run(mngr: ocp.CheckpointManager, step: int, meta: dict, run: TrainConfig) -> None:
  """A step that training resumes from was saved by this run: the config it stores is `run`'s but
  for CHANGEABLE, and its progress record is this step's, at this seed (the data position follows
  from the step)."""
  name = _step_name(mngr, step)
  diff = run_difference(meta["config"], run)
  if diff:
    key, old, new = diff
    raise RunError(f"{name}: saved by a run with {key}={old!r}, not {new!r}: it belongs to another run; "
                   f"move it away")
  progress = meta["progress"]
  if (progress.get("step"), progress.get("data_step"), progress.get("seed")) != (step, step, run.seed):
    raise RunError(f"{name}: its progress record says step {progress.get('step')}, data step "
                   f"{progress.get('data_step')}, seed {progress.get('seed')}; resuming it needs step {step}, "
                   f"data step {step}, seed {run.seed}: move it away")


def restore(mngr: ocp.CheckpointManager, step: int, model: ModelConfig, abstract_params, abstract_opt_state=None,
            *, run: TrainConfig | None = None):
  """(params, opt_state or None) of `step`, laid out like the abstract trees, after checking that
  the step holds `model` (with `run`, the training config it resumes: that the step was saved by
  it) and that every array matches its checksum."""
  items = {"params": ocp.args.StandardRestore(abstract_params)}
  if abstract_opt_state is not None:
    items["opt_state"] = ocp.args.StandardRestore(abstract_opt_state)
  failed = meta = other = None
  try:
    meta = _restore_json(mngr, step)
  except DamagedCheckpoint as err:
    failed = err
  if meta is not None:
    try:   # before the arrays: another model's shapes would read as damage, and be moved aside as such
      _check_model(mngr, step, meta["config"], model)
      if run is not None:
        _check_run(mngr, step, meta, run)
    except RunError as err:
      other = err
  if failed is None and other is None:
    try:
      out = _guarded(mngr, step, items)
    except DamagedCheckpoint as err:
      failed = err
  # The checksums gather arrays split across processes (a collective): all processes go on to them,
  # or none, and all hash every item before any raises, so that every process meets the same
  # collectives in the same order whatever it read. A step of another run is refused by all of them
  # (one whose JSON read failed found nothing to compare).
  if sharding.any_process(other is not None):
    raise other or RunError(f"{_step_name(mngr, step)}: another process found it belongs to another run; move it away")
  if sharding.any_process(failed is not None):
    raise failed or DamagedCheckpoint(f"{_step_name(mngr, step)}: another process read it damaged")
  if "checksums" in meta:
    name = _step_name(mngr, step)
    errors = [e for item in items if (e := _mismatch(name, item, out[item], meta["checksums"][item]))]
    if errors:
      raise errors[0]
  return out["params"], out.get("opt_state")


def set_aside(arm_dir: str, step: int) -> str:
  """Move step `step` out of the checkpoints (so no listing sees it) into `<arm_dir>/damaged_checkpoints`;
  returns where it went."""
  folder = os.path.join(arm_dir, DAMAGED)
  os.makedirs(folder, exist_ok=True)
  dest, n = os.path.join(folder, str(step)), 1
  while os.path.exists(dest):
    n += 1
    dest = os.path.join(folder, f"{step}-{n}")
  os.replace(os.path.join(arm_dir, CHECKPOINTS, str(step)), dest)
  return dest


# ------------------------------------------------------------------------------- run directory

def flat(tree, prefix: str = "") -> dict:
  """{'a.b': value} of a nested dict."""
  if isinstance(tree, dict):
    return {k: v for key, sub in tree.items() for k, v in flat(sub, f"{prefix}{key}.").items()}
  return {prefix[:-1]: tree}


def first_difference(old: dict, new: dict, ignore: tuple[str, ...] = ()) -> tuple[str, Any, Any] | None:
  """(key, old value, new value) of the first key, in `new`'s order then `old`'s, whose values differ."""
  for key in [*new, *(k for k in old if k not in new)]:
    if key not in ignore and old.get(key, "<absent>") != new.get(key, "<absent>"):
      return key, old.get(key, "<absent>"), new.get(key, "<absent>")
  return None


def read_json(path: str, hint: str) -> Any:
  """The JSON of a run file, or a one-line RunError naming the file and `hint` (what to do)."""
  return atomic.parse_json(path, lambda why: RunError(f"{path}: damaged, not valid JSON ({why}); {hint}"))


def available_steps(arm_dir: str) -> list[int]:
  """Sorted steps of the complete checkpoints under `<arm_dir>/checkpoints` (tmp/partial ones ignored)."""
  folder = os.path.join(arm_dir, CHECKPOINTS)
  return sorted(ocp.utils.checkpoint_steps(folder)) if os.path.isdir(folder) else []


def config_dict(arm_dir: str) -> dict:
  """`<arm_dir>/config.json` as a dict; a damaged one is a one-line RunError saying where a copy is."""
  steps = available_steps(arm_dir)
  copy = os.path.join(arm_dir, CHECKPOINTS, str(steps[-1]), "config", "metadata") if steps else None
  hint = f"every checkpoint holds a copy: copy {copy} over it" if copy else "delete the run directory and train again"
  path = os.path.join(arm_dir, "config.json")
  data = read_json(path, hint)
  if not (isinstance(data, dict) and isinstance(data.get("model"), dict)):   # every config.json written has one
    raise RunError(f"{path}: damaged, holds no run config (no 'model'); {hint}")
  return data


def load_config(arm_dir: str):
  """The resolved TrainConfig stored in `<arm_dir>/config.json`."""
  return C.from_dict(TrainConfig, config_dict(arm_dir))


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
  mngr = manager(arm_dir, read_only=True)
  try:
    params, _ = restore(mngr, step, cfg.model, with_shardings(abstract_params))
  except DamagedCheckpoint as err:
    raise DamagedCheckpoint(f"{err}; {_redo_hint(arm_dir, step, steps)}") from None
  finally:
    mngr.close()
  return nnx.merge(graphdef, params, rest), cfg


def _redo_hint(arm_dir: str, step: int, steps: list[int]) -> str:
  """What recreates a damaged step: training again moves the latest aside and redoes it; an earlier one
  only comes back by retraining the arm elsewhere."""
  if step != steps[-1]:
    return f"move it to {os.path.join(arm_dir, DAMAGED)} to go on without it, or retrain the arm under another --out"
  exp_dir, arm = os.path.split(os.path.abspath(arm_dir))
  command = (f"python -m train {os.path.join(exp_dir, 'experiment.json')} --out {os.path.dirname(exp_dir)} --arms {arm}"
             if os.path.exists(os.path.join(exp_dir, "experiment.json")) else "the arm's training command")
  return f"run {command} to move it aside and redo it from the previous step"


# ------------------------------------------------------------------------------- divergence

def mark_diverged(arm_dir: str, record: dict) -> None:
  """Write `<arm_dir>/diverged.json` (atomically): {"step", "loss", "grad_norm", "last_good_step", "message"}."""
  atomic.write_json(os.path.join(arm_dir, DIVERGED), record)


def divergence(arm_dir: str) -> dict | None:
  """The record of `<arm_dir>/diverged.json` ({"step", "loss", "grad_norm", "last_good_step",
  "message"}; loss and grad_norm may be NaN or inf), or None when the arm never diverged."""
  path = os.path.join(arm_dir, DIVERGED)
  if not os.path.exists(path):
    return None
  return read_json(path, "delete it if the arm did not diverge")
