"""`python -m train CONFIG [--set field=value ...]`: train every arm of an experiment config.

CONFIG is a JSON file, or the name of one in configs/ ('default' = configs/default.json). Fields
are dotted paths into the ExperimentConfig ('name', 'arms', 'train.model.d_model'); a path that
does not start with 'name', 'train' or 'arms' is read inside 'train' ('steps=200' is
'train.steps=200'). Values parse as JSON when they can ('1e5', 'true', '{"a": 1}'), else as strings.
Bad input (a bad setting, an unusable --out, a damaged checkpoint or log, a full disk) ends with one
line 'error: <field or path>: <what is wrong>' and exit code 2, before anything is written where it
can be known in advance. An arm that diverges (non-finite loss) does not stop the other arms; the
command then ends with one 'error: ...' line per diverged arm and exit code 3.

`--jobs N` trains N arms at once, each in its own `python -m train` process (arms that cannot share
one program, such as other position encodings, fill an accelerator together; on CPU each arm is
bit-identical to its sequential run). `--data-workers N` makes the batches ahead of the step in N
worker processes (train.prefetch), the same batches. `--score-checkpoints` trains nothing: it
scores the held-out tasks at every saved checkpoint of the chosen arms that eval.jsonl has no row
for (a run trained with sparse evaluation gets a score beside each checkpoint that a trace reads).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

from absl import logging

from minilm import atomic, cache
from minilm import schema as C
from minilm.cli import INTERRUPTED, end_with_parent, guarded, sigterm_as_interrupt
from train import paired, prefetch, tensorboard
from train.config import ExperimentConfig, load_experiment
from train.loop import check_run_dir, score_checkpoints

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
TOP_FIELDS = {f.name for f in dataclasses.fields(ExperimentConfig)}
DIVERGED = paired.DIVERGED_EXIT   # exit code when an arm diverged (bad input is minilm.cli.BAD_INPUT = 2)


def config_path(name: str) -> str:
  """A config file: `name` itself, or configs/<name>.json, also where a folder `name` (such as the
  run a command wrote into `--out .`) sits in the current folder."""
  if os.path.exists(name) and not os.path.isdir(name):   # a file, or a pipe such as /dev/stdin
    return name
  candidate = os.path.join(CONFIGS, name if name.endswith(".json") else f"{name}.json")
  if os.path.exists(candidate):
    return candidate
  C.check(not os.path.isdir(name), "config", f"{name} is a folder, not a JSON config file")
  raise C.ConfigError(f"config: no file {name!r} and no configs/{os.path.basename(candidate)}; "
                      f"available: {', '.join(shipped_configs())}")


def shipped_configs() -> list[str]:
  """The names of the JSON configs in configs/."""
  return sorted(f[:-5] for f in os.listdir(CONFIGS) if f.endswith(".json")) if os.path.isdir(CONFIGS) else []


def parse_assignments(items: list[str]) -> dict[str, object]:
  out = {}
  for item in items:
    field, sep, value = item.partition("=")
    C.check(bool(sep) and bool(field), item or "--set", "expected field=value")
    if field.split(".")[0] not in TOP_FIELDS:
      field = f"train.{field}"
    out[field] = C.parse_value(value)
  return out


def read_json(path: str) -> dict:
  """A config file's JSON, or a one-line ConfigError naming the file."""
  return atomic.parse_json(path, lambda why: C.ConfigError(f"config: {path} is not valid JSON ({why})"))


def load(config: str, assignments: list[str]) -> ExperimentConfig:
  """The experiment of a config file with command-line overrides, every arm validated."""
  path = config_path(config)
  data = read_json(path)
  C.check(isinstance(data, dict), "config", f"{path} holds no experiment (a JSON object of name, train and arms); "
          f"got {data!r:.40}")
  exp = load_experiment(data)
  overrides = parse_assignments(assignments)
  return load_experiment(C.to_dict(C.override(exp, overrides))) if overrides else exp


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m train", description=__doc__.split("\n")[0])
  p.add_argument("config", help="a JSON config file, or the name of one in configs/")
  p.add_argument("--set", dest="assignments", nargs="+", action="extend", default=[], metavar="FIELD=VALUE",
                 help="override a config field, e.g. --set steps=200 model.d_model=64 'arms={\"nope\": {}}'")
  p.add_argument("--out", default="runs", help="runs directory (default: runs)")
  p.add_argument("--arms", default=None, help="comma-separated arms to run (default: all, in order)")
  p.add_argument("--no-progress", action="store_true", help="no progress bar")
  p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
  p.add_argument("--stack-seeds", choices=paired.STACK, default="auto",
                 help="train arms that differ only in seed as one stacked, vmapped program (auto: on accelerators)")
  p.add_argument("--jobs", type=int, default=1,
                 help="train this many arms (or stacked seed groups) at once, each in its own process (default 1)")
  p.add_argument("--data-workers", type=int, default=0,
                 help="make training batches ahead of the step in this many worker processes (default 0: in the "
                      "training process, while the device runs the step before); the same batches either way")
  p.add_argument("--score-checkpoints", action="store_true",
                 help="train nothing: score the held-out tasks at every saved checkpoint of the chosen arms that "
                      "eval.jsonl has no row for (rows merged into eval.jsonl)")
  p.add_argument("--tensorboard", action="store_true",
                 help="also write TensorBoard events of the logged rows (needs tensorboardX: pip install 'minilm[tb]')")
  p.add_argument("--distributed", action="store_true",
                 help="multi-host: call jax.distributed.initialize() first, with JAX_COORDINATOR_ADDRESS, "
                      "JAX_NUM_PROCESSES and JAX_PROCESS_ID from the environment (or a cluster jax detects)")
  return p


def chosen_arms(arms: str | None) -> list[str] | None:
  """The arms of --arms (None: all); an empty one is refused as an unknown arm, never read as all."""
  return None if arms is None else arms.split(",")


def run(args: argparse.Namespace) -> dict[str, dict]:
  """Check everything, then train the chosen arms; {arm: last rows, or {'diverged': message}}."""
  if args.tensorboard:
    tensorboard.enable()
  exp = load(args.config, args.assignments)
  if args.print_config:
    print(json.dumps(C.to_dict(exp), indent=2))
    return {}
  if args.score_checkpoints:
    return score(exp, args.out, chosen_arms(args.arms))
  atomic.check_out_dir(args.out)
  paired.check_jobs(args.jobs, args.distributed)
  prefetch.check_workers(args.data_workers)
  if args.jobs > 1:   # this process plans (which starts jax's client) and waits; the accelerator's memory is
    os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"   # its workers', each capped at its share
  runs = paired.plan(exp, args.out, chosen_arms(args.arms))
  if args.jobs > 1:
    return paired.run_concurrently(exp, args.out, runs, jobs=args.jobs, stack=args.stack_seeds,
                                   tensorboard=args.tensorboard, data_workers=args.data_workers)
  if not args.data_workers:
    return paired.run_planned(runs, progress=not args.no_progress, stack=args.stack_seeds)
  with prefetch.WorkerBatches(args.data_workers) as batch_fn:
    return paired.run_planned(runs, batch_fn=batch_fn, progress=not args.no_progress, stack=args.stack_seeds)


def score(exp: ExperimentConfig, out: str, arms: list[str] | None) -> dict[str, dict]:
  """score_checkpoints for each chosen arm (each must exist and hold this config); {arm: {'scored': steps}}."""
  dirs = {}
  for arm in arms or list(exp.arms):
    C.check_choice("arms", arm, exp.arms)
    dirs[arm] = os.path.join(paired.experiment_dir(exp, out), arm)
    C.check(check_run_dir(dirs[arm], exp.resolve(arm)) is not None, "--out", f"{dirs[arm]} holds no run of arm "
            f"{arm!r}; train it first (or give the --out it was trained under)")
  logging.set_verbosity(logging.ERROR)   # orbax's read-only managers warn once per restored checkpoint
  results = {}
  for arm, arm_dir in dirs.items():
    rows = score_checkpoints(arm_dir, exp.resolve(arm).eval.batch)
    print(f"[{arm}] scored {len(rows)} checkpoint(s)" + (f": steps {', '.join(str(r['step']) for r in rows)}" if rows else ""))
    results[arm] = {"scored": [r["step"] for r in rows]}
  return results


DISTRIBUTED_ENV = (("JAX_NUM_PROCESSES", "num_processes"), ("JAX_PROCESS_ID", "process_id"))


def init_distributed() -> None:
  """jax.distributed.initialize() for --distributed: the coordinator from JAX_COORDINATOR_ADDRESS, and the
  process count and index from JAX_NUM_PROCESSES and JAX_PROCESS_ID where set (jax itself reads only the
  first; without them it detects its cluster: SLURM, Open MPI, Kubernetes, Cloud TPU)."""
  import jax
  given = {}
  for var, arg in DISTRIBUTED_ENV:
    value = os.environ.get(var)
    if value is not None:
      C.check(value.isdigit(), var, f"must be a non-negative integer; got {value!r}")
      given[arg] = int(value)
  jax.config.update("jax_cpu_collectives_implementation", "gloo")   # CPU processes all-reduce over gloo
  try:
    jax.distributed.initialize(**given)
  except (ValueError, TypeError, RuntimeError) as err:   # jax's own checks and the coordinator's failures
    detail = (str(err).strip().splitlines() or [type(err).__name__])[0].rstrip(".")
    raise C.ConfigError(f"--distributed: {detail} (set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and "
                        f"JAX_PROCESS_ID, or run under a cluster jax detects)") from None


def main(argv: list[str] | None = None) -> int:
  args = parser().parse_args(argv)
  results = {}
  code = guarded(init_distributed) if args.distributed else 0
  if code:
    return code
  cache.keep_compiled()
  try:
    with sigterm_as_interrupt():   # cleanup runs: --jobs stops its arms' processes
      end_with_parent()
      code = guarded(lambda: results.update(run(args)))
  except KeyboardInterrupt:
    print("error: interrupted; run the same command again: every arm resumes from its last checkpoint",
          file=sys.stderr)
    return INTERRUPTED
  diverged = [r["diverged"] for r in results.values() if "diverged" in r]
  for message in diverged:
    print(f"error: {message}", file=sys.stderr)
  return code or (DIVERGED if diverged else 0)
