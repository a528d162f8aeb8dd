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
import contextlib
import dataclasses
import hashlib
import json
import os
import platform
import subprocess
import sys
import time
from importlib import metadata
from typing import Callable

import jax
from absl import logging
from flax import nnx
from tqdm.auto import tqdm

from analysis.lab import report
from analysis.massive import compare
from analysis.massive import pipeline as PL
from analysis.massive import store as ST
from analysis.massive.stats import LAM, StatConfig
from analysis.studies import disruption, pretrained, quantization, suites
from analysis.studies.disruption import DisruptStudy
from analysis.studies.pretrained import PretrainedStudy
from analysis.studies.quantization import QuantStudy
from minilm import atomic, cache, machine
from minilm import paths
from minilm import schema as C
from minilm.cli import INTERRUPTED, child_env, end_with_parent, guarded, last_error, sigterm_as_interrupt, stop
from minilm.model import Decoder
from minilm.schema import OPTIONAL, check, check_choice
from train import checkpoints as ck
from train import cli as train_cli
from train import paired, tensorboard
from train.checkpoints import DIVERGED
from train.cli import config_path, parse_assignments, read_json, shipped_configs
from train.config import FOLDER_RULE, is_folder_name, load_experiment
from train.data import check_seed
from train.tokenizer import ByteTokenizer

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
  # draw the figures (PNG and PDF); false: tables and claims only, earlier figures removed. OPTIONAL:
  # hashed only where it is off, so markers written before the setting existed still match
  plots: bool = dataclasses.field(default=True, metadata=OPTIONAL)

  def __post_init__(self):
    check(self.probes >= 2, "trace.probes", f"must be >= 2 (intervals resample prompts); got {self.probes}")
    check(self.length >= 0, "trace.length", f"must be >= 0 (0 = the training seq_len); got {self.length}")
    check(self.batch >= 1, "trace.batch", f"must be >= 1; got {self.batch}")
    check_seed(self.probe_seed, "trace.probe_seed")
    try:
      self.stat_config()
    except C.ConfigError as err:
      raise C.ConfigError(f"trace.{err}") from None

  def stat_config(self):
    """The statistics settings every stage shares (trace, pretrained)."""
    return StatConfig(lam=self.lam, top_k=self.top_k, agree_k=self.agree_k, drop_first=self.drop_first)


@dataclasses.dataclass(frozen=True)
class LabConfig:
  name: str = ""                         # report name; "" = the experiment's name
  experiment: str = "default"            # an experiment config: a path or a name in configs/
  set: tuple[str, ...] = ()              # overrides of the experiment, as `python -m train --set`
  skip: tuple[str, ...] = ()             # stages left out unless --include names them
  # on | off | auto (on where jax's default backend is the CPU): the stages that need no trained arm
  # (pretrained; disrupt and quant on an imported model) run in a second process while training runs
  beside_train: str = "auto"
  trace: TraceSettings = dataclasses.field(default_factory=TraceSettings)
  # the studies of the pretrained, disrupt and quant stages; model 'run' is the lab's own trained arms
  pretrained: PretrainedStudy = dataclasses.field(default_factory=PretrainedStudy)   # its statistics are trace's
  disrupt: DisruptStudy = dataclasses.field(default_factory=lambda: DisruptStudy(model="smollm2", n=10))
  quant: QuantStudy = dataclasses.field(default_factory=lambda: QuantStudy(
      model=RUN, methods="rtn,rtn_keep,rtn_keep_random,awq,gptq", bits="4,3", n=32,
      group_size=32,      # along the input dim; 0 = per output channel
      top_k=2,            # rtn_keep(_random): the top-k Q/K dims per head (0: the lam=5 massive ones)
      calib="16x128",     # calibration windows NxT (T at most the models' context)
      ppl="16x128"))      # held-out perplexity windows NxT

  def __post_init__(self):
    for s in self.skip:
      check_choice("skip", s, STAGES)
    check_choice("beside_train", self.beside_train, ("auto", "on", "off"))
    check(not self.name or is_folder_name(self.name), "name",   # the report folder, inside --reports
          f"must be a folder name {FOLDER_RULE} or empty (the experiment's name); got {self.name!r}")
    check(C.to_dict(self.pretrained.stats) == C.to_dict(StatConfig()), "pretrained.stats",
          "the lab analyses the pretrained model with the trace statistics; set trace.lam, trace.top_k, "
          "trace.agree_k or trace.drop_first instead")


QUICK = {"trace.probes": 8, "trace.batch": 8, "pretrained.probes": 4, "pretrained.length": 64,
         "disrupt.n": 2, "disrupt.modes": "off,smallest,massive", "quant.methods": "rtn,rtn_keep,rtn_keep_random", "quant.n": 2,
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
  lab = C.from_dict(LabConfig, _over_lab_defaults(data))
  if lab.experiment and not os.path.isabs(lab.experiment) and not os.path.exists(lab.experiment):
    beside = os.path.join(os.path.dirname(path), lab.experiment)   # names resolve next to the lab config
    if os.path.exists(beside) or os.path.exists(beside + ".json"):
      lab = dataclasses.replace(lab, experiment=beside if os.path.exists(beside) else beside + ".json")
  return lab, path


def _over_lab_defaults(data: dict) -> dict:
  """A lab config's sections over the lab's defaults: a partial "disrupt" keeps the lab's other
  disrupt settings (n 10, ...), not the study's command-line defaults."""
  defaults = C.to_dict(LabConfig(), every=True)
  return {k: {**defaults[k], **v} if isinstance(v, dict) and isinstance(defaults.get(k), dict) else v
          for k, v in data.items()}


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
    if "trace" in enabled:   # the trace command's own check (analysis.massive.pipeline.plan_run), before training
      arms = [self.exp.resolve(arm) for arm in self.exp.arms]
      length = self.cfg.trace.length or min(train.data.seq_len for train in arms)
      field = "trace.length" if self.cfg.trace.length else "data.seq_len"   # 0: the probes are seq_len long
      for arm, train in zip(self.exp.arms, arms):
        PL.check_capture(train.model, f"arm {arm!r}", length, min(self.cfg.trace.batch, self.cfg.trace.probes),
                         self.cfg.trace.stat_config(), fields=(field, "trace.batch", "trace."))
    if "pretrained" in enabled:
      self.cfg.pretrained.check(_named("pretrained"))
      self.study("pretrained").check_model(_named("pretrained"), "trace.")   # its statistics are trace's
    if "disrupt" in enabled:
      disruption.check_model(self.cfg.disrupt.model, "disrupt.model", RUN, run=True)
      base, _, prompts = disruption.plan(self.study("disrupt"), model=False, name=_named("disrupt"))
      arms = self._own_arms(self.cfg.disrupt.model)
      items = suites.from_prompts(prompts, ByteTokenizer()) if prompts and arms else []   # the arms' tokenizer
      for arm, train in arms:
        disruption.check_dims(self.cfg.disrupt, base, train.model, f"arm {arm!r}", _named("disrupt"))
        disruption.check_fits(items, train.model.max_len, f"arm {arm!r}", self.cfg.disrupt.prompts)
    if "quant" in enabled:
      disruption.check_model(self.cfg.quant.model, "quant.model", RUN, run=True)
      scheme_list, calib, ppl = quantization.plan(self.study("quant"), model=False, name=_named("quant"))
      for arm, train in self._own_arms(self.cfg.quant.model):
        shapes = nnx.eval_shape(lambda: Decoder(train.model, rngs=nnx.Rngs(0)))   # the dims, no weights
        quantization.check_model(shapes, scheme_list, f"arm {arm!r}", _named("quant"))
      if self.cfg.quant.model == RUN:
        quantization.check_text(ByteTokenizer(), calib, ppl, _named("quant"))

  def _own_arms(self, model: str) -> list:
    """[(arm, its TrainConfig)] where a study runs on the lab's own arms (model 'run'), else []."""
    return [(arm, self.exp.resolve(arm)) for arm in self.exp.arms] if model == RUN else []

  def diverged(self) -> dict[str, dict]:
    """{arm: its divergence record} of the arms whose training diverged (they get no verdict)."""
    return ST.diverged_arms(self.run_dir) if os.path.isdir(self.run_dir) else {}

  def _model_dep(self, model: str) -> tuple[tuple[str, ...], str]:
    return (("train",), self.run_dir) if model == RUN else ((), model)

  def study(self, stage: str):
    """The study a stage runs: its settings, with 'run' as the model resolved to the lab's run
    directory, and the pretrained model analysed with the trace statistics."""
    cfg = getattr(self.cfg, stage)
    if stage == "pretrained":
      return dataclasses.replace(cfg, stats=self.cfg.trace.stat_config())
    return dataclasses.replace(cfg, model=self._model_dep(cfg.model)[1])

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
        # with the trace statistics it runs with: another trace.lam redoes it (default ones hash as before)
        Stage("pretrained", {"pretrained": _hashed("pretrained", self.study("pretrained"))}, (),
              [self.path("pretrained", "pretrained.json")], self._pretrained,
              f"massive values of {cfg.pretrained.model}"),
        Stage("disrupt", {"disrupt": _hashed("disrupt", cfg.disrupt), "model": d_model}, d_deps,
              [self.path("disrupt", "summary.json")], self._disrupt,
              f"C5: {cfg.disrupt.suite} task suite on {d_model} under {cfg.disrupt.modes}"),
        Stage("quant", {"quant": _hashed("quant", cfg.quant), "model": q_model}, q_deps,
              [self.path("quant", "summary.json")], self._quant,
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

  def drop_marker(self, stage: str) -> None:
    """A stage about to run loses its marker: a redo that fails or stops must not look done."""
    if os.path.exists(self.marker_path(stage)):
      os.remove(self.marker_path(stage))

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
        atomic.clear_staging(staging)
        atomic.write_json(os.path.join(staging, CAPTURE), capture)
      self._trace_into(staging)

  def _trace_into(self, out: str) -> None:
    t = self.cfg.trace
    store = ST.Store(out)
    todo = sum(len(set(ck.available_steps(d)) - set(store.steps(a))) for a, d in ST.run_arms(self.run_dir).items())
    with tqdm(total=todo, desc="trace (arm, step)", dynamic_ncols=True) as bar:
      store = PL.trace_run(self.run_dir, out, n_probes=t.probes, length=t.length or None, probe_seed=t.probe_seed,
                          stat_cfg=t.stat_config(), batch_size=t.batch, plots=t.plots,
                          log=lambda msg: (bar.set_postfix_str(msg), bar.update(1)))
    compare.compare(store, self.run_dir)

  def _pretrained(self) -> None:
    pretrained.run(self.study("pretrained"), self.path("pretrained"))   # it stages its own output

  def _disrupt(self) -> None:
    out = self.path("disrupt")
    disruption.print_report(disruption.run(self.study("disrupt"), out), out)

  def _quant(self) -> None:
    quantization.run(self.study("quant"), self.path("quant"))

  def _report(self) -> None:
    report.build(self.report_dir)

  # ---------------------------------------------------------------------------------------- run

  def record(self, status: dict[str, str], started: float, argv: list[str], beside=()) -> None:
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
            "stages": stages, "beside_train": list(beside), "wall_seconds": time.time() - started,
            "diverged": self.diverged(), "versions": versions()}
    atomic.write_json(self.path("lab.json"), data, default=str)

  def beside_train(self, todo: list[str]) -> list[str]:
    """The stages of `todo` that run in a second process while training runs (LabConfig.beside_train):
    those that need no trained arm, when training is among `todo`. On a CPU, one training process
    leaves cores idle between its small ops; the SmolLM2 stages fill them."""
    setting = self.cfg.beside_train
    if setting == "off" or (setting == "auto" and jax.default_backend() != "cpu") or "train" not in todo:
      return []
    needs_train = lambda name: name == "train" or any(needs_train(d) for d in self.stages[name].deps)
    return [s for s in todo if s != "report" and not needs_train(s)]

  def execute(self, enabled: list[str], force: set[str], argv: list[str], log=print,
              spawn: Callable[[list[str]], subprocess.Popen] | None = None) -> dict[str, str]:
    """Run the enabled stages in order, reusing those whose marker matches (the report is always
    redrawn: it is cheap and shows this run's statuses); returns {stage: ran|reused|skipped}.
    spawn(stages) starts a second `minilm-lab` process that runs just those stages: with it, the
    stages of `beside_train` run there during training (its output in stages/beside_train.log)."""
    started = time.time()
    status = {name: "skipped" for name in STAGES if name not in enabled}
    order = [s for s in STAGES if s in enabled]
    todo = [s for s in order if s != "report" and (s in force or not self.is_done(s))]
    beside = self.beside_train(todo) if spawn is not None else []
    lane = _Lane(self, beside, spawn, log) if beside else None
    try:
      for i, name in enumerate(order, 1):
        self.current, stage = name, self.stages[name]
        if lane and set(stage.deps) & set(lane.stages):
          lane.wait()
        if name in beside:
          status[name] = "ran"   # in the second process; its failure raises in lane.wait
          continue
        if name not in todo and name != "report":
          m = self.marker(name)
          status[name] = "reused"
          log(f"== [{i}/{len(order)}] {name}: reused (done {m['finished']} in {m['seconds']:.0f} s; inputs unchanged)",
              flush=True)
          continue
        if name == "report":
          self.record(status | {"report": "ran"}, started, argv, beside)
        log(f"== [{i}/{len(order)}] {name}: {stage.what}", flush=True)
        if name == "train" and lane:
          lane.start()
        self.drop_marker(name)
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
      if lane:
        lane.wait()
    finally:
      if lane:
        lane.stop()
    return status


class _Lane:
  """The second process of `Lab.execute`: started with training, waited for before the first stage
  that needs one of its stages (or at the end), stopped if the main process fails first."""

  def __init__(self, lab: Lab, stages: list[str], spawn, log):
    self.lab, self.stages, self.spawn, self.log = lab, stages, spawn, log
    self.path = lab.path("stages", "beside_train.log")
    self.proc = None

  def start(self) -> None:
    os.makedirs(os.path.dirname(self.path), exist_ok=True)
    for name in self.stages:
      self.lab.drop_marker(name)
    self.log(f"   beside training, in a second process: {', '.join(self.stages)} (its output: "
             f"{paths.portable(self.path)})", flush=True)
    with open(self.path, "w") as out:
      self.proc = self.spawn(self.stages, out)

  def wait(self) -> None:
    if self.proc is None or self.proc.returncode is not None:
      return
    code = self.proc.wait()
    for name in self.stages:
      m = self.lab.marker(name)
      if code == 0 and m:
        self.log(f"   {name} done in {m['seconds']:.0f} s (beside training)", flush=True)
    if code != 0:
      with open(self.path, errors="replace") as f:
        error = last_error(f)
      raise ck.RunError(f"{', '.join(self.stages)} (beside training): {error or f'exit code {code}'} "
                        f"(log: {paths.portable(self.path)}); run the same command again to resume")

  def stop(self) -> None:
    if self.proc is not None:
      stop([self.proc])


LANE_OF = "MINILM_LAB_LANE_OF"
"""Set in the second lane's environment to the pid of the lab that started it."""


def lane_command(args: argparse.Namespace, stages: list[str], force: set[str]) -> list[str]:
  """The `minilm-lab` command line that runs `stages` of the lab that `args` describe."""
  cmd = [sys.executable, "-m", "analysis.lab.run", args.config, "--runs", args.runs, "--reports", args.reports,
         "--only", ",".join(stages)]
  cmd += ["--set", *args.assignments] if args.assignments else []
  cmd += ["--lab-set", *args.lab_assignments] if args.lab_assignments else []
  cmd += ["--name", args.name] if args.name else []
  cmd += ["--quick"] if args.quick else []
  forced = [s for s in stages if s in force]
  return cmd + (["--force", ",".join(forced)] if forced else [])


def _named(section: str):
  """How the lab names a study field in an error: disrupt.n, as --lab-set takes it."""
  return lambda field: f"{section}.{field}"


HASHED = {"pretrained": ("model", "probes", "length", "context", "layout", "batch"),
          "disrupt": ("model", "suite", "n", "modes", "batch", "seed"),
          "quant": ("model", "methods", "bits", "group_size", "top_k", "n", "calib", "ppl", "batch", "seed")}
"""The settings each study stage hashed before the lab held the studies' own configs."""


def _hashed(stage: str, study) -> dict:
  """A study's settings as its stage hashes them: the fields of HASHED, every other field only where
  it differs from the study's default, and disrupt's and quant's former `extra` (argv) list, empty:
  markers written before still match, and any other change reruns the stage."""
  default = C.to_dict(type(study)(model=study.model))
  out = {k: v for k, v in C.to_dict(study).items() if k in HASHED[stage] or v != default[k]}
  return out if stage == "pretrained" else out | {"extra": []}


def _exists(output) -> bool:
  return any(os.path.exists(p) for p in (output if isinstance(output, tuple) else (output,)))


CAPTURE = "lab_capture.json"
"""In trace/: the capture settings (probes, run) its cached sums were made with."""


def _holds(folder: str, capture: dict) -> bool:
  """Whether `folder` holds a trace captured with `capture` (then it can be resumed)."""
  held = atomic.read_json(os.path.join(folder, CAPTURE))
  # run_dir is recorded relative to the working directory (absolute before): compare where it points
  where = lambda c: c | {"run_dir": os.path.abspath(c["run_dir"])} if isinstance(c.get("run_dir"), str) else c
  return isinstance(held, dict) and where(held) == where(capture)


def versions() -> dict:
  """Library versions, Python, git commit and the machine (its CPU, and its float32 matmul rate measured
  as the report is written: the same lab takes another wall time, and may sum in another order, on
  another CPU), for the report."""
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
  out["machine"] = (f"{platform.node()}: {platform.machine()}, {os.cpu_count()} CPU cores "
                    f"({machine.describe_cpu()}), {platform.platform()}; "
                    f"jax devices: {', '.join(str(d) for d in jax.devices())}")
  out["float32 matmul"] = (f"{machine.matmul_rate(reps=3) / 1e9:.0f} GFLOP/s (2048^3 on {jax.devices()[0]}, best of 3, "
                           "as the report was written)")
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
  """Command-line text (_Raw) is JSON, except where the setting is a string ('8' bits). A section
  given whole ('disrupt={"n": 3}') goes over its current settings, as a section of a lab config file
  goes over the lab's defaults."""
  if isinstance(value, _Raw):
    value = str(value) if isinstance(current, str) else C.parse_value(value)
  return {**current, **value} if isinstance(current, dict) and isinstance(value, dict) else value


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else list(argv)
  args = parser().parse_args(argv)
  logging.set_verbosity(logging.ERROR)
  cache.keep_compiled()
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
    # One lab at a time writes a report folder; its own second lane (LANE_OF: this pid) writes beside it.
    lane = os.environ.get(LANE_OF) == str(os.getppid())
    with contextlib.nullcontext() if lane else atomic.exclusive(lab.report_dir):
      print(f"minilm-lab: {lab.name}: stages {', '.join(enabled)}; report in {lab.report_dir}", flush=True)
      t0 = time.perf_counter()
      spawn = lambda stages, out: subprocess.Popen(lane_command(args, stages, force), stdout=out,
                                                   stderr=subprocess.STDOUT,
                                                   env=child_env({**os.environ, LANE_OF: str(os.getpid())}))
      lab.execute(enabled, force, argv, spawn=spawn)
    if "report" in enabled:
      print(f"\nreport: {os.path.abspath(lab.path('index.html'))}")
      print("\n".join(report.summary_lines(lab.report_dir)))
    print(f"total {time.perf_counter() - t0:.0f} s")

  try:
    with sigterm_as_interrupt():   # the second lane stops with this process
      end_with_parent()
      return guarded(run)
  except KeyboardInterrupt:
    stage = labs[0].current if labs else "setup"
    print(f"\ninterrupted during stage {stage!r}; run the same command again to resume "
          "(finished stages are reused, training and tracing continue where they stopped)", file=sys.stderr)
    return INTERRUPTED


if __name__ == "__main__":
  raise SystemExit(main())
