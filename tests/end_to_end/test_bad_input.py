"""Bad input, one table: each row sets up files, calls a command's main(argv) in-process, and checks
the exit code, the first words of stderr ('error: <field or path>: ...', or 'note: ...' where the
command recovers), and that no output that existed before changed.

A row names its command by a key of CLIS; add a command there to give it rows.
"""
from __future__ import annotations

import dataclasses
import errno
import fnmatch
import functools
import hashlib
import json
import os
import shutil
import subprocess
from typing import Callable

import orbax.checkpoint as ocp
import pytest

from analysis.lab import cli as analysis_cli
from analysis.lab import run as lab
from helpers import damage
from train import checkpoints, cli as train_cli, paired

CLIS: dict[str, Callable[[list[str]], int]] = {"train": train_cli.main, "lab": lab.main, "analysis": analysis_cli.main,
                                               "quant": lambda argv: analysis_cli.main(["quantize", *argv])}
SMOKE = train_cli.load("smoke", [])


@dataclasses.dataclass
class Ctx:
  """What a row's setup gets: `root` (snapshotted: nothing in it may change unless the row says so),
  `out` (a runs directory inside root), a pytest monkeypatch, and a trained smoke rope arm to copy."""
  root: str
  monkeypatch: pytest.MonkeyPatch
  trained: Callable[[], str]
  finalizers: list[Callable[[], object]] = dataclasses.field(default_factory=list)   # run when the row ends

  @property
  def out(self) -> str:
    return os.path.join(self.root, "runs")

  def arm(self, name: str = "rope") -> str:
    return os.path.join(self.out, "smoke", name)

  def trained_arm(self) -> str:
    """A copy of the trained smoke experiment (rope arm, 6 of 6 steps) under `out`; its arm directory."""
    shutil.copytree(os.path.dirname(self.trained()), os.path.join(self.out, "smoke"))
    return self.arm()

  def write(self, name: str, data: str | bytes) -> str:
    path = os.path.join(self.root, name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb" if isinstance(data, bytes) else "w") as f:
      f.write(data)
    return path


@dataclasses.dataclass
class Row:
  id: str
  cli: str                                 # a key of CLIS
  setup: Callable[[Ctx], list[str]]        # builds files under ctx.root, returns argv
  code: int                                # expected exit code
  starts: str                              # expected start of stderr
  may_change: tuple[str, ...] = ()         # fnmatch patterns (relative to root) of files allowed to change
  adds: bool = False                       # may new files appear under root
  marks: tuple = ()


def smoke(*sets: str, arms: str = "rope") -> Callable[[Ctx], list[str]]:
  """Setup for `python -m train smoke --out <out> --arms <arms> --set ...` on an empty runs directory."""
  return lambda ctx: ["smoke", "--out", ctx.out, "--arms", arms, "--no-progress", *(["--set", *sets] if sets else [])]


def on_trained(change: Callable[[Ctx, str], None], *sets: str) -> Callable[[Ctx], list[str]]:
  """Setup: a trained rope arm, changed by change(ctx, arm_dir), then the smoke command again."""
  def setup(ctx: Ctx) -> list[str]:
    change(ctx, ctx.trained_arm())
    return smoke(*sets)(ctx)
  setup.trains = True   # its row is slow (train_marks)
  return setup


def with_file(name: str, data: str | bytes, argv: Callable[[str], list[str]]) -> Callable[[Ctx], list[str]]:
  return lambda ctx: argv(ctx.write(name, data))


def text_corpus(path: str) -> list[str]:
  return ["smoke", "--no-progress", "--arms", "rope", "--set", "data.text_source=text", f'data.text_files=["{path}"]',
          'data.mixture={"text": 1}']


def other_model(ctx: Ctx, arm_dir: str) -> None:
  """Step 6 claims another model (as a step copied from another run would)."""
  path = os.path.join(arm_dir, "checkpoints", "6", "config", "metadata")
  stored = json.load(open(path))
  stored["model"]["d_model"] = 64
  json.dump(stored, open(path, "w"))


def truncate_config(ctx: Ctx, arm_dir: str) -> None:
  path = os.path.join(arm_dir, "config.json")
  os.truncate(path, os.path.getsize(path) // 2)


def append(name: str, text: str) -> Callable[[Ctx, str], None]:
  return lambda ctx, arm_dir: open(os.path.join(arm_dir, name), "a").write(text)


def diverged_before(ctx: Ctx, arm_dir: str) -> None:
  checkpoints.mark_diverged(arm_dir, {"step": 5, "loss": float("nan"), "grad_norm": float("nan"), "last_good_step": 4,
                                      "message": "smoke/rope: diverged at step 5 (loss nan, grad_norm nan); ..."})


def full_disk(ctx: Ctx) -> list[str]:
  async def no_space(self, x, directory):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(directory))
  ctx.monkeypatch.setattr(ocp.handlers.JsonCheckpointHandler, "_save_fn", no_space)
  return smoke()(ctx)


def read_only(ctx: Ctx, folder: str) -> None:
  """Make `folder` read-only, for root too: root ignores permission bits but not the immutable
  attribute (chattr +i; lifted again when the test ends so the folder can be removed)."""
  os.makedirs(folder)
  os.chmod(folder, 0o555)
  if os.geteuid() == 0:
    if subprocess.run(["chattr", "+i", folder], capture_output=True).returncode:
      pytest.skip("running as root on a filesystem without chattr +i: no way to make a folder read-only")
    ctx.finalizers.append(lambda: subprocess.run(["chattr", "-i", folder], check=True))


def read_only_out(ctx: Ctx) -> list[str]:
  read_only(ctx, ctx.out)
  return smoke()(ctx)


def distributed(**env: str) -> Callable[[Ctx], list[str]]:
  """Setup: the smoke command with --distributed under exactly `env` of jax's distributed variables."""
  def setup(ctx: Ctx) -> list[str]:
    for var in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
      ctx.monkeypatch.delenv(var, raising=False)
    for var, value in env.items():
      ctx.monkeypatch.setenv(var, value)
    return [*smoke()(ctx), "--distributed"]
  return setup


SLOW = (pytest.mark.slow,)   # trains: more than ~10 s on a 2-core machine
TRAINED = ("runs/smoke/rope/metrics.jsonl", "runs/smoke/rope/eval.jsonl", "runs/smoke/rope/checkpoints/6/*")

ROWS = [
    Row("unknown field", "train", smoke("model.d_modle=3"), 2, "error: model.d_modle: unknown field"),
    Row("lr infinite", "train", smoke("optim.lr=Infinity"), 2, "error: optim.lr: must be a finite number; got inf"),
    Row("lr NaN", "train", smoke("optim.lr=NaN"), 2, "error: optim.lr: must be a finite number; got nan"),
    Row("answer weight infinite", "train", smoke("data.answer_weight=Infinity"), 2,
        "error: data.answer_weight: must be a finite number"),
    Row("vocab below the tokenizer", "train", smoke("model.vocab_size=300"), 2,
        "error: model.vocab_size: must be >= 512, the tokenizer's ids"),
    Row("more devices than there are", "train", smoke("parallel.devices=4"), 2,
        "error: parallel.devices: asks for 4 devices; only 1 available"),
    Row("empty text file", "train", with_file("empty.txt", "", lambda p: text_corpus(p)), 2,
        "error: data.text_files: the text source holds no text"),
    Row("text shorter than a row", "train", with_file("short.txt", "tiny", lambda p: text_corpus(p)), 2,
        "error: data.text_heldout: a split of"),
    Row("--distributed without a coordinator", "train", distributed(), 2,
        "error: --distributed: "),   # jax says why: no coordinator, or a backend already started in this process
    Row("--distributed, a process count not a number", "train", distributed(JAX_NUM_PROCESSES="two"), 2,
        "error: JAX_NUM_PROCESSES: must be a non-negative integer; got 'two'"),
    Row("--out empty", "train", lambda ctx: ["smoke", "--out", ""], 2, "error: --out: names no folder"),
    Row("config nested too deep", "train", with_file("deep.json", "[" * 5000 + "]" * 5000, lambda p: [p]), 2,
        "error: config: "),
    Row("a value nested too deep", "train", smoke("steps=" + "[" * 5000 + "]" * 5000), 2,
        "error: steps: expected an integer"),
    Row("config is a folder", "train", lambda ctx: [ctx.root, "--out", ctx.out], 2, "error: config: "),
    Row("config truncated", "train", with_file("cut.json", '{"name": "x", "train": {', lambda p: [p]), 2,
        "error: config: "),
    Row("config not text", "train", with_file("bin.json", bytes(range(256)), lambda p: [p]), 2, "error: config: "),
    Row("--out is a file", "train", with_file("runs", "x", lambda p: ["smoke", "--out", p]), 2, "error: --out: "),
    Row("--out inside a file", "train", with_file("f", "x", lambda p: ["smoke", "--out", os.path.join(p, "runs")]), 2,
        "error: --out: "),
    Row("--out read-only", "train", read_only_out, 2, "error: --out: "),
    Row("arm named ..", "train", smoke('arms={"..": {}}', arms=".."), 2, "error: arms: arm names must be folder names"),
    Row("experiment named .", "train", smoke("name=."), 2, "error: name: must be a folder name"),
    Row("fewer steps than trained", "train", on_trained(lambda ctx, arm: None, "steps=3"), 2,
        "error: steps: run directory"),
    Row("another config in the run", "train", on_trained(lambda ctx, arm: None, "model.d_model=64"), 2,
        "error: model.d_model: "),   # experiment.json's record, checked before each arm's config.json
    Row("truncated config.json", "train", on_trained(truncate_config), 2, "error: "),
    Row("empty config.json", "train", on_trained(lambda ctx, arm: open(os.path.join(arm, "config.json"), "w").write("{}")),
        2, "error: "),
    Row("damaged line inside metrics.jsonl", "train", on_trained(append("metrics.jsonl", '{"step": 9, "lo\n{}\n')),
        2, "error: "),
    Row("partial last line of metrics.jsonl", "train", on_trained(append("metrics.jsonl", '{"step": 9, "lo')), 0,
        "note: ", may_change=("runs/smoke/rope/metrics.jsonl",)),
    Row("step of another model", "train", on_trained(other_model), 2, "error: step 6 ("),
    Row("arm diverged before", "train", on_trained(diverged_before), 3, "error: smoke/rope: diverged at step 5"),
    Row("flipped bytes in the latest step", "train", on_trained(lambda ctx, arm: damage(arm, 6, "flip")), 0,
        "note: step 6 (",
        may_change=TRAINED, adds=True, marks=SLOW),
    Row("truncated array file in the latest step", "train", on_trained(lambda ctx, arm: damage(arm, 6, "truncate")),
        0, "note: step 6 (",
        may_change=TRAINED, adds=True, marks=SLOW),
    Row("full disk", "train", full_disk, 2, "error: ", adds=True),
    Row("diverging arm", "train", smoke("optim.lr=1e6"), 3, "error: smoke/rope: diverged at step", adds=True,
        marks=SLOW),
]


# --------------------------------------------------------------------------------------- analysis

def lab_argv(*extra: str) -> Callable[[Ctx], list[str]]:
  """Setup for a --quick minilm-lab run under root, with an earlier report there to keep intact."""
  def setup(ctx: Ctx) -> list[str]:
    earlier_outputs(ctx, "reports/rope_vs_nope_quick")
    return ["--quick", "--runs", ctx.out, "--reports", os.path.join(ctx.root, "reports"), *extra]
  return setup


def earlier_outputs(ctx: Ctx, folder: str) -> str:
  """An earlier study's output folder: a failed or refused command must leave it as it is."""
  for name, text in (("results.jsonl", '{"task": "passkey"}\n'), ("summary.json", '{"summary": []}'),
                     ("table.md", "| earlier |"), ("index.html", "<html>earlier</html>")):
    ctx.write(os.path.join(folder, name), text)
  return os.path.join(ctx.root, folder)


def study(*argv: str) -> Callable[[Ctx], list[str]]:
  """Setup for `python -m analysis disrupt` / `python -m analysis quantize` into a folder with earlier results."""
  return lambda ctx: [*argv, "--out", earlier_outputs(ctx, "c5")]


def trace_of(damage: Callable[[Ctx, str], None] = lambda ctx, arm: None, *argv: str) -> Callable[[Ctx], list[str]]:
  """Setup: a trained smoke run (damaged by damage(ctx, arm_dir)), traced into an earlier trace folder."""
  def setup(ctx: Ctx) -> list[str]:
    arm_dir = ctx.trained_arm()
    damage(ctx, arm_dir)
    return ["trace", os.path.dirname(arm_dir), "--out", earlier_outputs(ctx, "trace"), *argv]
  return setup


def no_checkpoints(ctx: Ctx, arm_dir: str) -> None:
  shutil.rmtree(os.path.join(arm_dir, "checkpoints"))
  os.makedirs(os.path.join(arm_dir, "checkpoints"))


def hf_dir(weights: bytes) -> Callable[[Ctx], list[str]]:
  """Setup: an HF directory whose model.safetensors holds `weights`, analysed by `analysis pretrained`."""
  def setup(ctx: Ctx) -> list[str]:
    config = {"model_type": "llama", "vocab_size": 64, "hidden_size": 16, "num_hidden_layers": 1,
              "num_attention_heads": 2, "intermediate_size": 32, "max_position_embeddings": 64}
    ctx.write("hf/config.json", json.dumps(config))
    ctx.write("hf/model.safetensors", weights)
    return ["pretrained", "--model", os.path.join(ctx.root, "hf"), "--out", earlier_outputs(ctx, "pre")]
  return setup


RANDOM_BYTES = bytes((i * 7919 + 13) % 256 for i in range(4096))

ROWS += [
    Row("lab: --only and --skip name one stage", "lab", lab_argv("--only", "trace", "--skip", "trace"), 2,
        "error: --only: trace is also in --skip"),
    Row("lab: --include and --skip name one stage", "lab", lab_argv("--include", "quant", "--skip", "quant"), 2,
        "error: --include: quant is also in --skip"),
    Row("lab: --include with --only", "lab", lab_argv("--only", "train", "--include", "quant"), 2,
        "error: --include: has no effect with --only"),
    Row("lab: lambda zero", "lab", lab_argv("--lab-set", "trace.lam=0"), 2,
        "error: trace.lam: must be a finite number > 0"),
    Row("lab: lambda negative", "lab", lab_argv("--lab-set", "trace.lam=-1"), 2,
        "error: trace.lam: must be a finite number > 0"),
    Row("lab: a report named ..", "lab", lab_argv("--name", ".."), 2, "error: name: must be a folder name"),
    Row("lab: probes of one token", "lab", lab_argv("--lab-set", "trace.length=1"), 2,
        "error: trace.length: must be >= 2"),
    Row("lab: probes no memory holds", "lab", lab_argv("--lab-set", "trace.length=1000000"), 2,
        "error: trace.length: 1000000 tokens need about"),
    Row("lab: training sequences no trace memory holds", "lab", lab_argv("--set", "data.seq_len=1000000"), 2,
        "error: data.seq_len: 1000000 tokens need about"),
    Row("lab: top_k beyond the head dim", "lab", lab_argv("--lab-set", "trace.top_k=99"), 2,
        "error: trace.top_k: must be <= the head dim of arm 'rope'"),
    Row("lab: negative probe seed", "lab", lab_argv("--lab-set", "trace.probe_seed=-1"), 2,
        "error: trace.probe_seed: must be in 0..4294967295"),
    Row("lab: one probe", "lab", lab_argv("--lab-set", "trace.probes=1"), 2, "error: trace.probes: must be >= 2"),
    Row("lab: trace batch zero", "lab", lab_argv("--lab-set", "trace.batch=0"), 2, "error: trace.batch: must be >= 1"),
    Row("lab: pretrained batch zero", "lab", lab_argv("--lab-set", "pretrained.batch=0"), 2,
        "error: pretrained.batch: must be >= 1"),
    Row("lab: missing pretrained model", "lab", lab_argv("--lab-set", "pretrained.model=no/such/model"), 2,
        "error: pretrained.model: must be 'smollm2', 'random'"),
    Row("lab: missing disrupt model", "lab", lab_argv("--lab-set", "disrupt.model=no/such/run"), 2,
        "error: disrupt.model: must be 'smollm2', 'random', 'run'"),
    Row("lab: unknown disrupt mode", "lab", lab_argv("--lab-set", "disrupt.modes=off,bogus"), 2,
        "error: disrupt.modes: must be one of"),
    Row("lab: unknown disrupt argument", "lab", lab_argv("--lab-set", 'disrupt.extra=["--bogus"]'), 2,
        "error: disrupt.extra: unknown lab setting"),
    Row("lab: disrupt n one", "lab", lab_argv("--lab-set", "disrupt.n=1"), 2, "error: disrupt.n: must be >= 2"),
    Row("lab: quant bits out of range", "lab", lab_argv("--lab-set", "quant.bits=9"), 2, "error: quant.bits: must be"),
    Row("lab: unknown quant method", "lab", lab_argv("--lab-set", "quant.methods=rtn,bogus"), 2,
        "error: scheme.method: must be one of"),
    Row("lab: malformed calibration shape", "lab", lab_argv("--lab-set", "quant.calib=16x"), 2,
        "error: quant.calib: must read NxT"),
    Row("lab: negative group size", "lab", lab_argv("--lab-set", "quant.group_size=-1"), 2,
        "error: quant.group_size: must be >= 0"),
    Row("lab: --reports is a file", "lab", lambda ctx: ["--quick", "--runs", ctx.out, "--reports",
                                                         ctx.write("reports", "x")], 2, "error: --reports: "),
    Row("lab: --runs is a file", "lab", lambda ctx: ["--quick", "--runs", ctx.write("runs", "x"), "--reports",
                                                      os.path.join(ctx.root, "reports")], 2, "error: --runs: "),
    Row("lab: --reports read-only", "lab", lambda ctx: (read_only(ctx, os.path.join(ctx.root, "reports")), [
        "--quick", "--runs", ctx.out, "--reports", os.path.join(ctx.root, "reports")])[1], 2, "error: --reports: "),
    Row("disrupt: --out read-only", "analysis", lambda ctx: (read_only(ctx, os.path.join(ctx.root, "ro")), [
        "disrupt", "--model", "random", "--out", os.path.join(ctx.root, "ro", "c5")])[1], 2, "error: --out: "),
    Row("lab: config is a folder", "lab", lambda ctx: [ctx.root, "--quick"], 2, "error: config: "),
    Row("lab: arm named ..", "lab", lab_argv("--set", 'arms={"..": {}}'), 2, "error: arms: arm names must be"),
    Row("trace: a step that is not there", "analysis", trace_of(lambda ctx, arm: None, "--steps", "999"), 2,
        "error: --steps: arm 'rope' has no checkpoint 999"),
    Row("trace: an arm without checkpoints", "analysis", trace_of(no_checkpoints), 2,
        "error: run_dir: arm 'rope' has no complete checkpoint", may_change=("runs/smoke/rope/checkpoints/*",)),
    Row("trace: batch zero", "analysis", trace_of(lambda ctx, arm: None, "--batch", "0"), 2,
        "error: --batch: must be >= 1"),
    Row("trace: one probe", "analysis", trace_of(lambda ctx, arm: None, "--probes", "1"), 2,
        "error: --probes: must be >= 2"),
    Row("trace: a length no memory holds", "analysis", trace_of(lambda ctx, arm: None, "--length", "100000"), 2,
        "error: --length: 100000 tokens need about"),
    Row("trace: lambda zero", "analysis", trace_of(lambda ctx, arm: None, "--lam", "0"), 2,
        "error: lam: must be a finite number > 0"),
    Row("trace: --out is a file", "analysis",
        lambda ctx: ["trace", os.path.dirname(ctx.trained_arm()), "--out", ctx.write("out", "x")], 2, "error: --out: "),
    Row("trace: no such run", "analysis", lambda ctx: ["trace", os.path.join(ctx.root, "missing")], 2,
        "error: run_dir: "),
    Row("plots: not a traced folder", "analysis", lambda ctx: ["plots", earlier_outputs(ctx, "x")], 2,
        "error: out: "),
    Row("disrupt: no such model", "analysis", study("disrupt", "--model", "no/such/model"), 2,
        "error: --model: must be 'smollm2', 'random'"),
    Row("disrupt: unknown task", "analysis", study("disrupt", "--model", "random", "--tasks", "bogus"), 2,
        "error: --tasks: 'bogus' names no task"),
    Row("disrupt: n zero", "analysis", study("disrupt", "--model", "random", "--n", "0"), 2, "error: --n: must be >= 2"),
    Row("disrupt: batch zero", "analysis", study("disrupt", "--model", "random", "--batch", "0"), 2,
        "error: --batch: must be >= 1"),
    Row("disrupt: negative bucket", "analysis", study("disrupt", "--model", "random", "--bucket", "-1"), 2,
        "error: --bucket: must be >= 0"),
    Row("disrupt: unknown mode", "analysis", study("disrupt", "--model", "random", "--modes", "off,bogus"), 2,
        "error: --modes: must be one of"),
    Row("disrupt: layers past the model", "analysis", study("disrupt", "--model", "random", "--layers", "0:9"), 2,
        "error: --layers: must stop at most at the 2 layers of 'random-tiny'; got '0:9'"),
    Row("disrupt: --out is a file", "analysis",
        lambda ctx: ["disrupt", "--model", "random", "--out", ctx.write("c5", "x")], 2, "error: --out: "),
    Row("pretrained: one probe", "analysis", lambda ctx: ["pretrained", "--model", "random", "--probes", "1", "--out",
                                                          earlier_outputs(ctx, "pre")], 2, "error: probes: must be >= 2"),
    Row("pretrained: empty model", "analysis", lambda ctx: ["pretrained", "--model", "", "--out",
                                                           earlier_outputs(ctx, "pre")], 2,
        "error: model: must be 'smollm2', 'random' or an existing path; got ''"),
    Row("pretrained: zero-byte safetensors", "analysis", hf_dir(b""), 2, "error: "),
    Row("pretrained: random-byte safetensors", "analysis", hf_dir(RANDOM_BYTES), 2, "error: "),
    Row("quant: no such model", "quant", study("--model", "no/such/model"), 2,
        "error: --model: must be 'smollm2', 'random'"),
    Row("quant: group size that divides nothing", "quant", study("--model", "random", "--group-size", "7"), 2,
        "error: --group-size: must divide the linears' input dims"),
    Row("quant: bits out of range", "quant", study("--model", "random", "--bits", "9"), 2, "error: --bits: must be"),
    Row("quant: n zero", "quant", study("--model", "random", "--n", "0"), 2, "error: --n: must be >= 2"),
    Row("quant: negative bucket", "quant", study("--model", "random", "--bucket", "-3"), 2,
        "error: --bucket: must be >= 0"),
    Row("quant: malformed perplexity windows", "quant", study("--model", "random", "--ppl", "x16"), 2,
        "error: --ppl: must read NxT"),
    Row("quant: unknown method", "quant", study("--model", "random", "--methods", "bogus"), 2,
        "error: scheme.method: must be one of"),
]


def snapshot(root: str) -> dict[str, str]:
  out = {}
  for folder, _, files in os.walk(root):
    for name in files:
      path = os.path.join(folder, name)
      out[os.path.relpath(path, root)] = hashlib.sha256(open(path, "rb").read()).hexdigest()
  return out


@pytest.fixture(scope="module")
def trained_once(tmp_path_factory):
  """Trains the smoke rope arm at most once per module, when a row first asks for it."""
  return functools.cache(lambda: _train(str(tmp_path_factory.mktemp("trained"))))


def _train(out: str) -> str:
  paired.run_experiment(SMOKE, out, arms=["rope"], progress=False)
  return os.path.join(out, "smoke", "rope")


def train_marks(row: Row) -> tuple:
  """A row's marks, slow added where its setup trains an arm."""
  return row.marks + (SLOW if getattr(row.setup, "trains", False) and SLOW != row.marks else ())


@pytest.mark.parametrize("row", [pytest.param(r, id=r.id, marks=train_marks(r)) for r in ROWS])
def test_bad_input(row: Row, tmp_path, capsys, monkeypatch, trained_once):
  monkeypatch.setenv("MINILM_CACHE", str(tmp_path / "cache"))
  ctx = Ctx(str(tmp_path / "root"), monkeypatch, trained_once)
  os.makedirs(ctx.root)
  try:
    check_row(row, ctx, capsys)
  finally:
    for finalize in ctx.finalizers:
      finalize()


def check_row(row: Row, ctx: Ctx, capsys) -> None:
  argv = row.setup(ctx)
  before = snapshot(ctx.root)
  capsys.readouterr()
  code = CLIS[row.cli](argv)
  err = capsys.readouterr().err
  assert code == row.code, err
  assert err.startswith(row.starts), err
  assert len(err.splitlines()) == 1, err
  after = snapshot(ctx.root)
  for path, digest in before.items():
    if not any(fnmatch.fnmatch(path, pattern) for pattern in row.may_change):
      assert after.get(path) == digest, f"{path} changed"
  assert row.adds or set(after) <= set(before), sorted(set(after) - set(before))
