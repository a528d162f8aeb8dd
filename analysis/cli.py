"""`python -m analysis <command> ...`: trace a run, redo plots or claims from a traced directory.

Each command is a (name, add_arguments, run) entry of COMMANDS; later analyses (smollm2, disrupt,
quantize) append theirs.
"""
from __future__ import annotations

import argparse
import importlib

from minilm.cli import guarded
from minilm.config import check


def _stat_args(p: argparse.ArgumentParser) -> None:
  g = p.add_argument_group("statistics")
  g.add_argument("--lam", type=float, default=5.0, help="massive: M > lam * mean_d M (default 5)")
  g.add_argument("--top-k", type=int, default=1, help="reference-code definition: top-k dims per head")
  g.add_argument("--agree-k", type=int, default=2, help="cross-head agreement over top-k dims")
  g.add_argument("--drop-first", action="store_true", help="leave token 0 (attention sink) out of M")


def _stat_cfg(args):
  from analysis.stats import StatConfig
  return StatConfig(lam=args.lam, top_k=args.top_k, agree_k=args.agree_k, drop_first=args.drop_first)


def _trace_args(p):
  p.add_argument("run_dir", nargs="+", help="runs/<experiment> (paired arms) or one arm's directory; or a public "
                 "trajectory: a folder of step<N> model folders, or several model folders in step order")
  p.add_argument("--out", default=None, help="output directory (default RUN_DIR/analysis; required for a trajectory)")
  p.add_argument("--probes", type=int, default=None, help="number of probe prompts (default 64; trajectories 16)")
  p.add_argument("--length", type=int, default=None,
                 help="probe length (default: the data seq_len; trajectories 256)")
  p.add_argument("--probe-seed", type=int, default=0)
  p.add_argument("--batch", type=int, default=None, help="probes per jitted forward (default 16; trajectories 4)")
  p.add_argument("--steps", type=int, nargs="*", default=None, help="only these checkpoint steps")
  p.add_argument("--rope-arm", default=None)
  p.add_argument("--nope-arm", default=None)
  p.add_argument("--arm", default=None, help="trajectory: the arm's name (default: its folder's name)")
  p.add_argument("--layout", default="half", help="trajectory: RoPE pair layout of the imported weights")
  p.add_argument("--no-plots", action="store_true")
  p.add_argument("--no-claims", action="store_true")
  _stat_args(p)


def _or(value, default):
  """A flag's value, or the default of the kind of trace when it was not given (0 stays 0: an error)."""
  return default if value is None else value


def _trace(args):
  from analysis import trajectory
  from analysis.trace import trace_run
  paths = args.run_dir
  if len(paths) > 1 or trajectory.is_trajectory(paths[0]):
    check(args.out is not None, "--out", "a trajectory needs an output folder")
    store = trajectory.trace_trajectory(paths, args.out, arm=args.arm, n_probes=_or(args.probes, 16),
                                        length=_or(args.length, 256), layout=args.layout, stat_cfg=_stat_cfg(args),
                                        batch_size=_or(args.batch, 4), steps=args.steps, plots=not args.no_plots,
                                        claims=not args.no_claims)
  else:
    store = trace_run(paths[0], args.out, n_probes=_or(args.probes, 64), length=args.length,
                      probe_seed=args.probe_seed, stat_cfg=_stat_cfg(args), batch_size=_or(args.batch, 16),
                      steps=args.steps, plots=not args.no_plots, claims=not args.no_claims,
                      rope_arm=args.rope_arm, nope_arm=args.nope_arm)
  print(f"wrote {store.root}")


def _out_args(p):
  p.add_argument("out", help="a traced output directory")


def _plots_args(p):
  _out_args(p)
  p.add_argument("--steps", type=int, nargs="*", default=None,
                 help="heatmap steps (default: each arm's first and last)")


def _plots(args):
  from analysis.plots import plot_all
  from analysis.trace import Store
  for path in plot_all(Store(args.out).require(), heatmap_steps=args.steps):
    print(path)


def _claims_args(p):
  _out_args(p)
  p.add_argument("--rope-arm", default=None)
  p.add_argument("--nope-arm", default=None)


def _claims(args):
  from analysis import claims
  from analysis.trace import Store
  verdicts = claims.evaluate(Store(args.out).require(), rope_arm=args.rope_arm, nope_arm=args.nope_arm)
  claims.write_claims(verdicts, args.out)
  print(claims.to_markdown(claims.load_claims(args.out)))


def _disrupt_args(p):
  from analysis.experiment import add_arguments
  add_arguments(p)


def _disrupt(args):
  from analysis.experiment import run_and_print
  run_and_print(args)


COMMANDS = [
    ("trace", "restore checkpoints, capture probes, write table/summary/plots/claims", _trace_args, _trace),
    ("plots", "redraw the figures of a traced directory", _plots_args, _plots),
    ("claims", "recompute the C1-C4 verdicts of a traced directory", _claims_args, _claims),
    ("disrupt", "C5: task suites under massive/control disruption -> JSONL, table, plot, verdict",
     _disrupt_args, _disrupt),
    ("pretrained", "massive values of an imported model (smollm2, .gguf, HF dir) as one traced step",
     lambda p: importlib.import_module("analysis.pretrained").add_arguments(p),
     lambda args: importlib.import_module("analysis.pretrained").run(args)),
]


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m analysis", description=__doc__.splitlines()[0])
  sub = parser.add_subparsers(dest="command", required=True)
  for name, help_text, add, run in COMMANDS:
    p = sub.add_parser(name, help=help_text)
    add(p)
    p.set_defaults(run=run)
  args = parser.parse_args(argv)
  from absl import logging   # orbax's read-only managers warn once per restored checkpoint
  logging.set_verbosity(logging.ERROR)
  return guarded(lambda: args.run(args))
