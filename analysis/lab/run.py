"""minilm-lab: the whole lab in one command: paired training, every analysis, and an HTML report.

  minilm-lab                                   # configs/lab.json: the default RoPE/NoPE pair + SmolLM2
  minilm-lab configs/all_encodings_3seeds.json # any experiment config in configs/ (GPU-sized ones too)
  minilm-lab rope_base_sweep --skip pretrained,disrupt
  minilm-lab --lab-set quant.model=smollm2     # C6 on SmolLM2 instead of the trained arms (slow)
  minilm-lab --quick                           # a tiny smoke version of the same pipeline

Stages, in order: train (paired arms with checkpoints, train.paired), trace (massive values over
layers and steps, analysis.massive.trace; comparisons over seeds, analysis.massive.compare), pretrained (the same
analysis of SmolLM2-135M, analysis.studies.pretrained), disrupt (C5 on the task suite, analysis.studies.disruption),
quant (C6 on the trained arms, analysis.studies.quantization), report (reports/<name>/index.html).

CONFIG is a lab config ({"experiment": ..., "skip": [...], "trace": {...}, ...}, see LabConfig) or
an experiment config ({"name", "train", "arms"}, as `python -m train` takes), by path or by name in
configs/. Every stage leaves reports/<name>/stages/<stage>.json with a hash of its inputs: a second
run reuses what is done, a changed setting reruns the stages it affects. An interrupted run resumes
(training from its checkpoints, tracing from the (arm, step) pairs already captured).
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from importlib import metadata
from typing import Callable

import jax
from absl import logging
from tqdm.auto import tqdm

from analysis.lab import report
from analysis.massive import compare
from analysis.massive import pipeline as PL
from analysis.massive import store as ST
from analysis.massive.stats import LAM, StatConfig
from analysis.studies import disruption, pretrained, quantization
from minilm import atomic
from minilm import paths
from minilm import schema as C
from minilm.cli import guarded
from minilm.schema import check, check_choice
from train import checkpoints as ck
from train import cli as train_cli
from train import paired, tensorboard
from train.checkpoints import DIVERGED
from train.cli import config_path, parse_assignments, read_json, shipped_configs
from train.config import load_experiment

STAGES = ("train", "trace", "pretrained", "disrupt", "quant", "report")
RUN = "run"
"""As the model of disrupt or quant: the lab's own trained arms instead of an imported model."""


# ------------------------------------------------------------------------------------------ config

@dataclasses.dataclass(frozen=True)
class TraceSettings:
  section = "trace"
  probes: int = 64          # probe prompts (held-out task prompts and text, train.data.probe_tokens)
  length: int = 0           # probe length; 0 = the shortest training seq_len of the arms
  probe_seed: int = 0
  batch: int = 16           # probes per jitted forward
  lam: float = LAM          # massive: M > lam * mean_d M
  top_k: int = 1
  agree_k: int = 2
  drop_first: bool = False  # leave token 0 (attention sink) out of M

  def __post_init__(self):
    check(self.probes >= 2, "trace.probes", f"must be >= 2 (intervals resample prompts); got {self.probes}")
    check(self.length >= 0, "trace.length", f"must be >= 0 (0 = the training seq_len); got {self.length}")
    check(self.batch >= 1, "trace.batch", f"must be >= 1; got {self.batch}")
    try:
      self.stat_config()
    except C.ConfigError as err:
      raise C.ConfigError(f"trace.{err}") from None

  def stat_config(self):
    """The statistics settings every stage shares (trace, pretrained)."""
    return StatConfig(lam=self.lam, top_k=self.top_k, agree_k=self.agree_k, drop_first=self.drop_first)


@dataclasses.dataclass(frozen=True)
class PretrainedSettings:
  section = "pretrained"
  model: str = "smollm2"    # smollm2 | a .gguf file | an HF directory | random (plumbing only)
  probes: int = 16
  length: int = 256
  context: float = 0.0      # 0 = the model's max_len
  layout: str = "half"
  batch: int = 4

  def __post_init__(self):
    check_choice("pretrained.layout", self.layout, ("half", "interleaved"))
    check(self.probes >= 2, "pretrained.probes", f"must be >= 2; got {self.probes}")
    check(self.length >= 2, "pretrained.length", f"must be >= 2; got {self.length}")
    check(self.context >= 0, "pretrained.context", f"must be >= 0 (0 = the model's max_len); got {self.context}")
    check(self.batch >= 1, "pretrained.batch", f"must be >= 1; got {self.batch}")


@dataclasses.dataclass(frozen=True)
class DisruptSettings:
  section = "disrupt"
  model: str = "smollm2"    # smollm2 | 'run' (the lab's trained arms) | random | a run directory
  suite: str = "templates"  # every family in five templates
  n: int = 10               # examples per task (per template)
  modes: str = "off,smallest,massive,random,v"
  batch: int = 8
  seed: int = 0
  extra: tuple[str, ...] = ()  # further `python -m analysis disrupt` arguments, e.g. ["--rope", "pre"]

  def __post_init__(self):
    check(self.n >= 2, "disrupt.n", f"must be >= 2; got {self.n}")


@dataclasses.dataclass(frozen=True)
class QuantSettings:
  section = "quant"
  model: str = "run"        # 'run' (the lab's trained arms) | smollm2 | random | a run directory
  methods: str = "rtn,rtn_keep,awq,gptq"
  bits: str = "4,3"
  group_size: int = 32      # along the input dim; 0 = per output channel
  top_k: int = 2            # rtn_keep: keep the top-k Q/K dims per head (0: the lam=5 massive ones)
  n: int = 32
  calib: str = "16x128"     # calibration windows NxT (T at most the models' context)
  ppl: str = "16x128"       # held-out perplexity windows NxT
  batch: int = 8
  seed: int = 0
  extra: tuple[str, ...] = ()  # further `python -m analysis quantize` arguments

  def __post_init__(self):
    check(self.n >= 2, "quant.n", f"must be >= 2; got {self.n}")


@dataclasses.dataclass(frozen=True)
class LabConfig:
  name: str = ""                         # report name; "" = the experiment's name
  experiment: str = "default"            # an experiment config: a path or a name in configs/
  set: tuple[str, ...] = ()              # overrides of the experiment, as `python -m train --set`
  skip: tuple[str, ...] = ()             # stages left out unless --include names them
  trace: TraceSettings = dataclasses.field(default_factory=TraceSettings)
  pretrained: PretrainedSettings = dataclasses.field(default_factory=PretrainedSettings)
  disrupt: DisruptSettings = dataclasses.field(default_factory=DisruptSettings)
  quant: QuantSettings = dataclasses.field(default_factory=QuantSettings)

  def __post_init__(self):
    for s in self.skip:
      check_choice("skip", s, STAGES)
    check("/" not in self.name, "name", f"must not contain '/'; got {self.name!r}")


QUICK = {"trace.probes": 8, "trace.batch": 8, "pretrained.probes": 4, "pretrained.length": 64,
         "disrupt.n": 2, "disrupt.modes": "off,smallest,massive", "quant.methods": "rtn,rtn_keep", "quant.n": 2,
         "quant.calib": "4x64", "quant.ppl": "2x64"}
"""--quick: small analyses, and the experiment shrunk by QUICK_TRAIN (same arms, a tiny model)."""
QUICK_TRAIN = {"steps": 6, "log_every": 2, "model.d_model": 32, "model.n_layers": 2, "model.n_heads": 2,
               "model.n_kv_heads": 0, "model.head_dim": 0, "model.d_ff": 0, "model.dtype": "float32",
               "data.batch_size": 4, "optim.warmup_steps": 2, "optim.accumulate": 1, "checkpoint.every": 4,
               "eval.every": 0, "eval.n_per_family": 4, "eval.batch": 8, "parallel.devices": 0}
QUICK_SEQ = 128


def read_config(path_or_name: str) -> tuple[LabConfig, str]:
  """(LabConfig, the file it came from). An experiment config becomes LabConfig(experiment=path)."""
  path = config_path(path_or_name)
  data = read_json(path)
  check(isinstance(data, dict), "config", f"{path} must hold a JSON object")
  if "train" in data or "arms" in data:
    return LabConfig(experiment=path), path
  lab = C.from_dict(LabConfig, data)
  if lab.experiment and not os.path.isabs(lab.experiment) and not os.path.exists(lab.experiment):
    beside = os.path.join(os.path.dirname(path), lab.experiment)   # names resolve next to the lab config
    if os.path.exists(beside) or os.path.exists(beside + ".json"):
      lab = dataclasses.replace(lab, experiment=beside if os.path.exists(beside) else beside + ".json")
  return lab, path


def experiment_of(lab: LabConfig, quick: bool):
  """The validated ExperimentConfig the lab trains. --quick shrinks it and renames it '<name>_quick';
  the lab's `set` overrides come last, so they win over the shrinking."""
  if not quick:
    return train_cli.load(lab.experiment, list(lab.set))
  exp = train_cli.load(lab.experiment, [])
  small = {f"train.{k}": v for k, v in QUICK_TRAIN.items()} | {"name": f"{exp.name}_quick"}
  user = train_cli.parse_assignments(list(lab.set))
  seq = min(exp.train.data.seq_len, QUICK_SEQ)
  try:
    return load_experiment(C.to_dict(C.override(exp, small | {"train.data.seq_len": seq,
                                                              "train.model.max_len": seq} | user)))
  except C.ConfigError:   # task sizes that need the config's own context: keep it
    return load_experiment(C.to_dict(C.override(exp, small | user)))


# ------------------------------------------------------------------------------------------ stages

@dataclasses.dataclass
class Stage:
  name: str
  params: dict                  # everything the stage's result depends on besides its deps
  deps: tuple[str, ...]
  outputs: list                 # files that must exist for a done-marker to count (a tuple: any one of them)
  run: Callable[[], None]
  what: str = ""


def _hash(obj) -> str:
  return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


class Lab:
  """The stages of one lab run, their hashes and done-markers."""

  def __init__(self, cfg: LabConfig, exp, *, runs: str, reports: str, quick: bool = False):
    self.cfg, self.exp, self.quick = cfg, exp, quick
    self.name = cfg.name or exp.name
    self.report_dir = os.path.join(reports, self.name)
    self.run_dir = os.path.join(runs, exp.name)
    self.runs = runs
    self.current = "setup"
    self.stages = {s.name: s for s in self._stages()}
    self.hashes: dict[str, str] = {}
    for s in self.stages.values():
      self.hashes[s.name] = _hash({"stage": s.name, "params": s.params,
                                   "deps": {d: self.hashes[d] for d in s.deps}})

  def path(self, *parts) -> str:
    return os.path.join(self.report_dir, *parts)

  def validate(self, enabled: list[str]) -> None:
    """Every setting of every enabled stage checked (one line each) before anything runs or is
    written, so a typo in the quant settings does not wait for the end of training."""
    atomic.check_out_dir(self.report_dir, "--reports")
    atomic.check_out_dir(self.run_dir, "--runs")
    if "pretrained" in enabled:
      disruption.check_model(self.cfg.pretrained.model, "pretrained.model")
    if "disrupt" in enabled:
      disruption.check_model(self.cfg.disrupt.model, "disrupt.model", RUN)
      disruption.plan(self.disrupt_args(self._model_dep(self.cfg.disrupt.model)[1]), model=False)
    if "quant" in enabled:
      disruption.check_model(self.cfg.quant.model, "quant.model", RUN)
      quantization.plan(self.quant_args(self._model_dep(self.cfg.quant.model)[1]), model=False)

  def diverged(self) -> dict[str, dict]:
    """{arm: its divergence record} of the arms whose training diverged (they get no verdict)."""
    return ST.diverged_arms(self.run_dir) if os.path.isdir(self.run_dir) else {}

  def _model_dep(self, model: str) -> tuple[tuple[str, ...], str]:
    return (("train",), self.run_dir) if model == RUN else ((), model)

  def _stages(self) -> list[Stage]:
    cfg, exp = self.cfg, self.exp
    last = exp.train.steps
    # an arm is finished when it reached its last step or diverged (then it is reported, not analysed)
    train_out = [(os.path.join(self.run_dir, arm, "checkpoints", str(last)), os.path.join(self.run_dir, arm, DIVERGED))
                 for arm in exp.arms]
    d_deps, d_model = self._model_dep(cfg.disrupt.model)
    q_deps, q_model = self._model_dep(cfg.quant.model)
    return [
        Stage("train", {"experiment": C.to_dict(exp), "runs": os.path.abspath(self.runs)}, (), train_out,
              self._train, f"{len(exp.arms)} arms x {last} steps: {', '.join(exp.arms)}"),
        Stage("trace", {"trace": C.to_dict(cfg.trace)}, ("train",),
              [self.path("trace", "summary.json"), self.path("trace", "claims.json")], self._trace,
              "massive values of every checkpoint of every arm"),
        Stage("pretrained", {"pretrained": C.to_dict(cfg.pretrained)}, (),
              [self.path("pretrained", "pretrained.json")], self._pretrained,
              f"massive values of {cfg.pretrained.model}"),
        Stage("disrupt", {"disrupt": C.to_dict(cfg.disrupt), "model": d_model}, d_deps,
              [self.path("disrupt", "summary.json")], lambda: self._disrupt(d_model),
              f"C5: {cfg.disrupt.suite} task suite on {d_model} under {cfg.disrupt.modes}"),
        Stage("quant", {"quant": C.to_dict(cfg.quant), "model": q_model}, q_deps,
              [self.path("quant", "summary.json")], lambda: self._quant(q_model),
              f"C6: {cfg.quant.methods} at {cfg.quant.bits} bits on {q_model}"),
        Stage("report", {}, ("train", "trace", "pretrained", "disrupt", "quant"), [self.path("index.html")],
              self._report, f"{self.path('index.html')}"),
    ]

  # ------------------------------------------------------------------------------------ markers

  def marker_path(self, stage: str) -> str:
    return self.path("stages", f"{stage}.json")

  def marker(self, stage: str) -> dict | None:
    return atomic.read_json(self.marker_path(stage))

  def is_done(self, stage: str) -> bool:
    m = self.marker(stage)
    return bool(m) and m.get("hash") == self.hashes[stage] and all(map(_exists, self.stages[stage].outputs))

  def write_marker(self, stage: str, seconds: float) -> None:
    s = self.stages[stage]
    atomic.write_json(self.marker_path(stage), {
        # params as the report shows them (paths relative to the working directory); the hash keeps
        # the absolute runs path it always had, so existing markers still match
        "stage": stage, "hash": self.hashes[stage], "params": paths.portable_tree(s.params), "deps": list(s.deps),
        "seconds": seconds,
        "finished": time.strftime("%Y-%m-%d %H:%M:%S"), "what": s.what}, default=str)

  # ------------------------------------------------------------------------------------- stages

  def _train(self) -> None:
    for arm, last in paired.run_planned(paired.plan(self.exp, self.runs), progress=True).items():
      if "diverged" in last:
        print(f"   {last['diverged']}; the lab analyses the other arms and gives no verdict for {arm}", flush=True)

  def _trace(self) -> None:
    """Trace into trace/ when it holds a capture with these settings (resuming it); otherwise into
    a staging folder that replaces trace/ only when complete, so the old trace (and the report that
    links to it) stays intact until the new one is whole."""
    t = self.cfg.trace
    capture = {"probes": t.probes, "length": t.length, "probe_seed": t.probe_seed, "drop_first": t.drop_first,
               "run_dir": paths.portable(self.run_dir),
               "experiment": _hash({"train": C.to_dict(self.exp.train) | {"steps": 0}, "arms": self.exp.arms})}
    out = self.path("trace")
    atomic.recover_dir(out, keep_partial=True)
    if _holds(out, capture):
      self._trace_into(out)
      return
    with atomic.staged_dir(out, keep_partial=True) as staging:
      if not _holds(staging, capture):
        shutil.rmtree(staging)
        os.makedirs(staging)
        atomic.write_json(os.path.join(staging, CAPTURE), capture)
      self._trace_into(staging)

  def _trace_into(self, out: str) -> None:
    t = self.cfg.trace
    store = ST.Store(out)
    todo = sum(len(set(ck.available_steps(d)) - set(store.steps(a))) for a, d in ST.run_arms(self.run_dir).items())
    with tqdm(total=todo, desc="trace (arm, step)", dynamic_ncols=True) as bar:
      store = PL.trace_run(self.run_dir, out, n_probes=t.probes, length=t.length or None, probe_seed=t.probe_seed,
                          stat_cfg=t.stat_config(), batch_size=t.batch,
                          log=lambda msg: (bar.set_postfix_str(msg), bar.update(1)))
    compare.compare(store, self.run_dir)

  def _pretrained(self) -> None:
    p = self.cfg.pretrained
    with atomic.staged_dir(self.path("pretrained")) as staging:
      pretrained.analyze(p.model, staging, n_probes=p.probes, length=p.length, context=p.context or None,
                         layout=p.layout, batch_size=p.batch, stat_cfg=self.cfg.trace.stat_config())

  def _disrupt(self, model: str) -> None:
    disruption.run_and_print(self.disrupt_args(model))

  def _quant(self, model: str) -> None:
    quantization.run(self.quant_args(model))

  def disrupt_args(self, model: str) -> argparse.Namespace:
    """The disrupt stage's settings as `python -m analysis disrupt` arguments (parsed, unchecked)."""
    d = self.cfg.disrupt
    ap = _Parser(prog="disrupt.extra")
    disruption.add_arguments(ap)
    return ap.parse_args(["--model", model, "--out", self.path("disrupt"), "--suite", d.suite, "--n", str(d.n),
                          "--modes", d.modes, "--batch", str(d.batch), "--seed", str(d.seed), *d.extra])

  def quant_args(self, model: str) -> argparse.Namespace:
    """The quant stage's settings as `python -m analysis quantize` arguments (parsed, unchecked)."""
    q = self.cfg.quant
    ap = _Parser(prog="quant.extra")
    quantization.add_arguments(ap)
    return ap.parse_args(["--model", model, "--out", self.path("quant"), "--methods", q.methods, "--bits", q.bits,
                          "--group-size", str(q.group_size), "--top-k", str(q.top_k), "--n", str(q.n),
                          "--calib", q.calib, "--ppl", q.ppl, "--batch", str(q.batch), "--seed", str(q.seed),
                          *q.extra])

  def _report(self) -> None:
    report.build(self.report_dir)

  # ---------------------------------------------------------------------------------------- run

  def record(self, status: dict[str, str], started: float, argv: list[str]) -> None:
    """lab.json: what the report shows about this run (configs, versions, stage times)."""
    stages = {}
    for name in STAGES:
      m = self.marker(name) or {}
      stages[name] = {"status": status.get(name, "-"), "seconds": m.get("seconds"), "finished": m.get("finished"),
                      "hash": self.hashes[name], "what": self.stages[name].what}
    data = {"name": self.name, "command": " ".join(["minilm-lab", *argv]), "quick": self.quick,
            "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)),
            "lab": paths.portable_tree(C.to_dict(self.cfg)), "experiment": paths.portable_tree(C.to_dict(self.exp)),
            "run_dir": paths.portable(self.run_dir), "report_dir": paths.portable(self.report_dir),
            "stages": stages, "diverged": self.diverged(), "versions": versions()}
    atomic.write_json(self.path("lab.json"), data, default=str)

  def execute(self, enabled: list[str], force: set[str], argv: list[str], log=print) -> dict[str, str]:
    """Run the enabled stages in order, reusing those whose marker matches (the report is always
    redrawn: it is cheap and shows this run's statuses); returns {stage: ran|reused|skipped}."""
    started = time.time()
    status = {name: "skipped" for name in STAGES if name not in enabled}
    order = [s for s in STAGES if s in enabled]
    for i, name in enumerate(order, 1):
      self.current, stage = name, self.stages[name]
      if name != "report" and name not in force and self.is_done(name):
        m = self.marker(name)
        status[name] = "reused"
        log(f"== [{i}/{len(order)}] {name}: reused (done {m['finished']} in {m['seconds']:.0f} s; inputs unchanged)",
            flush=True)
        continue
      if name == "report":
        self.record(status | {"report": "ran"}, started, argv)
      log(f"== [{i}/{len(order)}] {name}: {stage.what}", flush=True)
      if os.path.exists(self.marker_path(name)):
        os.remove(self.marker_path(name))   # a forced redo that fails or stops must not look done
      t0 = time.perf_counter()
      stage.run()
      seconds = time.perf_counter() - t0
      status[name] = "ran"
      missing = [p if isinstance(p, str) else p[0] for d in stage.deps for p in self.stages[d].outputs
                 if not _exists(p)]
      if missing and name != "report":
        # e.g. `--only trace` while training goes on: the results are real but partial, so the next
        # run must redo (extend) the stage rather than reuse it.
        log(f"   {name} ran in {seconds:.0f} s on incomplete inputs ({missing[0]} is missing): "
            "not marked done, so the next run redoes it", flush=True)
        continue
      self.write_marker(name, seconds)
      log(f"   {name} done in {seconds:.0f} s", flush=True)
    return status


def _exists(output) -> bool:
  return any(os.path.exists(p) for p in (output if isinstance(output, tuple) else (output,)))


CAPTURE = "lab_capture.json"
"""In trace/: the capture settings (probes, run) its cached sums were made with."""


def _holds(folder: str, capture: dict) -> bool:
  """Whether `folder` holds a trace captured with `capture` (then it can be resumed)."""
  try:
    with open(os.path.join(folder, CAPTURE)) as f:
      held = json.load(f)
  except (OSError, json.JSONDecodeError):
    return False
  # run_dir is recorded relative to the working directory (absolute before): compare where it points
  where = lambda c: c | {"run_dir": os.path.abspath(c["run_dir"])} if isinstance(c.get("run_dir"), str) else c
  return isinstance(held, dict) and where(held) == where(capture)


class _Parser(argparse.ArgumentParser):
  """The parser of a stage's `extra` arguments: a bad one is a one-line ConfigError, at start-up."""

  def error(self, message):
    raise C.ConfigError(f"{self.prog}: {message}")


def versions() -> dict:
  """Library versions, Python, git commit and the machine, for the report."""
  out = {}
  for dist in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy", "matplotlib", "datasets"):
    try:
      out[dist] = metadata.version(dist)
    except metadata.PackageNotFoundError:
      out[dist] = "not installed"
  out["python"] = platform.python_version()
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  try:
    commit = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
    dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True, timeout=10)
    out["git_commit"] = (commit.stdout.strip() or "unknown") + (" (uncommitted changes)" if dirty.stdout.strip() else "")
  except (OSError, subprocess.SubprocessError):
    out["git_commit"] = "unknown (no git)"
  out["machine"] = (f"{platform.node()}: {platform.machine()}, {os.cpu_count()} CPU cores, "
                    f"{platform.platform()}; jax devices: {', '.join(str(d) for d in jax.devices())}")
  return out


# ----------------------------------------------------------------------------------------- command

def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="minilm-lab", description=__doc__.split("\n")[0],
                              epilog="\n".join(__doc__.split("\n")[2:]),
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  shipped = shipped_configs()
  p.add_argument("config", nargs="?", default="lab",
                 help="lab config or experiment config: a JSON path or a name in configs/ (default: lab); "
                      f"configs/ holds: {', '.join(shipped)}")
  p.add_argument("--set", dest="assignments", nargs="+", action="extend", default=[], metavar="FIELD=VALUE",
                 help="override an experiment field as `python -m train --set` does, e.g. --set steps=200")
  p.add_argument("--lab-set", dest="lab_assignments", nargs="+", action="extend", default=[], metavar="FIELD=VALUE",
                 help="override a lab setting, e.g. --lab-set disrupt.n=40 trace.lam=3 pretrained.model=my.gguf")
  p.add_argument("--skip", default="", help=f"comma list of stages to leave out ({', '.join(STAGES)})")
  p.add_argument("--include", default="", help="comma list of stages the config skips to run anyway (e.g. quant)")
  p.add_argument("--only", default="", help="comma list: run only these stages (done ones are still reused)")
  p.add_argument("--force", default="", help="comma list of stages to redo even if their marker matches")
  p.add_argument("--quick", action="store_true", help="tiny smoke version: 6 training steps of a tiny model, "
                 "small analyses (what the tests run)")
  p.add_argument("--runs", default="runs", help="runs directory (default: runs)")
  p.add_argument("--reports", default="reports", help="reports directory (default: reports)")
  p.add_argument("--name", default=None, help="report name (default: the experiment's name)")
  p.add_argument("--dry-run", action="store_true", help="print the stages and whether each is done, then exit")
  p.add_argument("--tensorboard", action="store_true", help="also write TensorBoard events of training and trace "
                 "statistics (needs tensorboardX: pip install 'minilm[tb]')")
  return p


def _stage_list(text: str, field: str) -> list[str]:
  names = [s.strip() for s in text.split(",") if s.strip()]
  for s in names:
    check_choice(field, s, STAGES)
  return names


def build(args) -> tuple[Lab, list[str], set[str]]:
  """(the Lab, the enabled stages, the forced ones) of parsed command-line arguments."""
  cfg, _ = read_config(args.config)
  overrides = {}
  if args.quick:
    overrides.update(QUICK)
  for item in args.lab_assignments:
    field, sep, value = item.partition("=")
    check(bool(sep) and bool(field), item, "expected field=value")
    overrides[field] = _Raw(value)
  if args.assignments:
    overrides["set"] = list(cfg.set) + list(args.assignments)
    parse_assignments(args.assignments)   # one-line error for a malformed one, before anything runs
  if args.name:
    overrides["name"] = args.name
  if overrides:
    cfg = C.override(cfg, overrides, unknown="unknown lab setting", parse=_typed)
  exp = experiment_of(cfg, args.quick)
  lab = Lab(cfg, exp, runs=args.runs, reports=args.reports, quick=args.quick)
  enabled = enabled_stages(cfg.skip, args)
  lab.validate(enabled)
  return lab, enabled, set(_stage_list(args.force, "--force"))


def enabled_stages(config_skip, args) -> list[str]:
  """The stages to run: all but the skipped ones (the config's, less --include, plus --skip), or
  just --only. A stage named by two flags that disagree is an error, not a silent choice."""
  only, skip, include = (_stage_list(getattr(args, f), f"--{f}") for f in ("only", "skip", "include"))
  for a, b, names in (("--only", "--skip", set(only) & set(skip)), ("--include", "--skip", set(include) & set(skip))):
    check(not names, a, f"{', '.join(sorted(names))} is also in {b}; name each stage in one of them")
  check(not (only and include), "--include", "has no effect with --only (which runs exactly the stages it names)")
  skipped = set(config_skip) - set(include) | set(skip)
  return [s for s in STAGES if (s in only if only else s not in skipped)]


class _Raw(str):
  """A lab setting as typed on the command line, parsed once its field's type is known."""


def _typed(current, value):
  """Command-line text (_Raw) is JSON, except where the setting is a string ('8' bits)."""
  if isinstance(value, _Raw):
    return str(value) if isinstance(current, str) else C.parse_value(value)
  return value


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else list(argv)
  args = parser().parse_args(argv)
  logging.set_verbosity(logging.ERROR)
  labs = []

  def run() -> None:
    if args.tensorboard:
      tensorboard.enable()
    lab, enabled, force = build(args)
    labs.append(lab)
    if args.dry_run:
      for s in STAGES:
        state = "skipped" if s not in enabled else "done" if lab.is_done(s) else "to-run"
        print(f"{s:11s} {state:8s} {lab.hashes[s]}  {lab.stages[s].what}")
      return
    print(f"minilm-lab: {lab.name}: stages {', '.join(enabled)}; report in {lab.report_dir}", flush=True)
    t0 = time.perf_counter()
    lab.execute(enabled, force, argv)
    if "report" in enabled:
      print(f"\nreport: {os.path.abspath(lab.path('index.html'))}")
      print("\n".join(report.summary_lines(lab.report_dir)))
    print(f"total {time.perf_counter() - t0:.0f} s")

  try:
    return guarded(run)
  except KeyboardInterrupt:
    stage = labs[0].current if labs else "setup"
    print(f"\ninterrupted during stage {stage!r}; run the same command again to resume "
          "(finished stages are reused, training and tracing continue where they stopped)", file=sys.stderr)
    return 130


if __name__ == "__main__":
  raise SystemExit(main())
