"""`python -m analysis <command> ...`: trace a run, redo plots or claims of a traced directory, analyse
an imported model, run the C5 and C6 studies.

Each command is a (name, help, add_arguments, run) entry of COMMANDS; a study's run builds its typed
config from the parsed arguments (e.g. disruption.study_from_args) and calls the study's run(cfg, out).
"""
from __future__ import annotations

import argparse

from absl import logging

from analysis.massive import claims, plots
from analysis.massive import pipeline as PL
from analysis.massive import stats as S
from analysis.massive.store import PROBE_SEED, Store
from analysis.studies import disruption, onset, pretrained, quantization, trajectory
from minilm import cache
from minilm.cli import guarded
from minilm.schema import check


def stat_arguments(p: argparse.ArgumentParser) -> None:
  """The --lam/--top-k/--agree-k/--drop-first flags of StatConfig; their defaults are StatConfig's."""
  d = S.StatConfig()
  g = p.add_argument_group("statistics")
  g.add_argument("--lam", type=float, default=d.lam, help=f"massive: M > lam * mean_d M (default {d.lam:g})")
  g.add_argument("--top-k", type=int, default=d.top_k, help="reference-code definition: top-k dims per head")
  g.add_argument("--agree-k", type=int, default=d.agree_k, help="cross-head agreement over top-k dims")
  g.add_argument("--drop-first", action="store_true", help="leave token 0 (attention sink) out of M")


def stat_config(args) -> S.StatConfig:
  return S.StatConfig(lam=args.lam, top_k=args.top_k, agree_k=args.agree_k, drop_first=args.drop_first)


def _trace_args(p):
  p.add_argument("run_dir", nargs="+", help="runs/<experiment> (paired arms) or one arm's directory; or a public "
                 "trajectory: a folder of step<N> model folders, or several model folders in step order")
  p.add_argument("--out", default=None, help="output directory (default RUN_DIR/analysis; required for a trajectory)")
  p.add_argument("--probes", type=int, default=None, help="number of probe prompts (default 64; trajectories 16)")
  p.add_argument("--length", type=int, default=None,
                 help="probe length (default: the data seq_len; trajectories 256)")
  p.add_argument("--probe-seed", type=int, default=PROBE_SEED)
  p.add_argument("--batch", type=int, default=None, help="probes per jitted forward (default 16; trajectories 4)")
  p.add_argument("--steps", type=int, nargs="*", default=None, help="only these checkpoint steps")
  p.add_argument("--rope-arm", default=None)
  p.add_argument("--nope-arm", default=None)
  p.add_argument("--arm", default=None, help="trajectory: the arm's name (default: its folder's name)")
  p.add_argument("--layout", default="half", help="trajectory: RoPE pair layout of the imported weights")
  p.add_argument("--no-plots", action="store_true")
  p.add_argument("--no-claims", action="store_true")
  stat_arguments(p)


def _or(value, default):
  """A flag's value, or the default of the kind of trace when it was not given (0 stays 0: an error)."""
  return default if value is None else value


def _trace(args):
  paths = args.run_dir
  if len(paths) > 1 or trajectory.is_trajectory(paths[0]):
    check(args.out is not None, "--out", "a trajectory needs an output folder")
    store = trajectory.trace_trajectory(paths, args.out, arm=args.arm, n_probes=_or(args.probes, 16),
                                        length=_or(args.length, 256), layout=args.layout, stat_cfg=stat_config(args),
                                        batch_size=_or(args.batch, 4), steps=args.steps, plots=not args.no_plots,
                                        claims=not args.no_claims)
  else:
    store = PL.trace_run(paths[0], args.out, n_probes=_or(args.probes, 64), length=args.length,
                         probe_seed=args.probe_seed, stat_cfg=stat_config(args), batch_size=_or(args.batch, 16),
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
  store = Store(args.out).require()
  if args.steps is not None:   # a step no arm holds would draw no heatmap without a word
    traced = sorted({s for arm in store.meta().get("arms", {}) for s in store.steps(arm)})
    missing = sorted(set(args.steps) - set(traced))
    why = f"no arm holds step {', '.join(map(str, missing))}" if missing else "names no step"
    check(bool(args.steps) and not missing, "--steps", f"{why}; traced: {', '.join(map(str, traced))}")
  for path in plots.plot_all(store, heatmap_steps=args.steps):
    print(path)


def _claims_args(p):
  _out_args(p)
  p.add_argument("--rope-arm", default=None)
  p.add_argument("--nope-arm", default=None)


def _claims(args):
  store = Store(args.out).require()
  claims.check_arms(store.meta()["arms"], args.rope_arm, args.nope_arm, args.out)
  verdicts = claims.judge(store, rope_arm=args.rope_arm, nope_arm=args.nope_arm)
  claims.write_claims(verdicts, args.out)
  print(claims.to_markdown(claims.load_claims(args.out)))


def _pretrained_args(p) -> None:
  d = pretrained.PretrainedStudy
  p.add_argument("--model", default=d.model, help="smollm2 | path/to/model.gguf | HF directory | random")
  p.add_argument("--out", required=True, help="output directory")
  p.add_argument("--probes", type=int, default=d.probes, help=f"probe windows (default {d.probes})")
  p.add_argument("--length", type=int, default=d.length, help=f"tokens per probe window (default {d.length})")
  p.add_argument("--context", type=float, default=d.context, help="context for the wavelength boundary "
                 "(default 0: the model's max_len)")
  p.add_argument("--layout", default=d.layout, help="RoPE pair layout of the imported weights: half | interleaved")
  p.add_argument("--batch", type=int, default=d.batch, help="probes per jitted forward")
  p.add_argument("--no-plots", action="store_true")
  stat_arguments(p)


def pretrained_study(args) -> pretrained.PretrainedStudy:
  """The study of parsed `python -m analysis pretrained` arguments."""
  return pretrained.PretrainedStudy(model=args.model, probes=args.probes, length=args.length, context=args.context,
                                    layout=args.layout, batch=args.batch, plots=not args.no_plots,
                                    stats=stat_config(args))


def _pretrained(args) -> None:
  facts = pretrained.run(pretrained_study(args), args.out)
  print(claims.to_markdown(claims.load_claims(args.out)))
  print(f"wrote {args.out} ({facts['name']}, {facts['params']:,} parameters, "
        f"{facts['seconds']['load'] + facts['seconds']['analyze']:.0f} s)")


COMMANDS = [
    ("trace", "restore checkpoints, capture probes, write table/summary/plots/claims", _trace_args, _trace),
    ("plots", "redraw the figures of a traced directory", _plots_args, _plots),
    ("claims", "recompute the C1-C4 verdicts of a traced directory", _claims_args, _claims),
    ("pretrained", "massive values of an imported model (smollm2, .gguf, HF dir) as one traced step",
     _pretrained_args, _pretrained),
    ("disrupt", "C5: task suites under massive/control disruption -> JSONL, table, plot, verdict",
     disruption.add_arguments, disruption.run_and_print),
    ("quantize", "C6: quantization schemes x bit widths -> accuracy, perplexity, M before/after, verdict",
     quantization.add_arguments, quantization.run_and_print),
    ("onset", "onset study: concentration vs tokens and size per kind, fitted law, onset tokens, figures",
     onset.add_arguments, onset.run_and_print),
]


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m analysis", description=__doc__.splitlines()[0])
  sub = parser.add_subparsers(dest="command", required=True)
  for name, help_text, add, run in COMMANDS:
    p = sub.add_parser(name, help=help_text)
    add(p)
    p.set_defaults(run=run)
  args = parser.parse_args(argv)
  logging.set_verbosity(logging.ERROR)   # orbax's read-only managers warn once per restored checkpoint
  cache.keep_compiled()
  return guarded(lambda: args.run(args))
