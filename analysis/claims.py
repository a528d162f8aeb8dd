"""Verdicts on the paper's claims, from a traced output directory, by rules fixed before any data.

Each verdict compares the RoPE arm with the NoPE arm at their last common step, with 95% bootstrap
intervals (prompts resampled jointly for both arms, which saw the same probes; heads resampled
within each arm). Later analyses (C5 disruption, C6 quantization) add `Verdict`s in the same
format and call `write_claims`, which merges by claim id.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os

import numpy as np

from analysis import stats as S
from analysis import trace as T

VERDICTS = ("supported", "not supported", "opposite", "inconclusive")

LEVEL = 0.95
"""Two-sided level of every interval behind a verdict."""
N_BOOT = 2000
"""Bootstrap replicates behind a verdict."""
QK = ("rot_q", "rot_k")
"""The tensors the claims call Q and K: after RoPE, as the paper's code captures them (for NoPE
rot_q == q)."""
V = ("v",)
MIN_MASSIVE = 1.0
"""A set of heads is 'concentrated' when its mean massive count per head (lam from the trace's
settings, 5 by default) is at least one."""
EARLY_FRACTION = 0.25
"""C4's early layers: the first quarter of the layers (at least the first layer)."""

RULE_C1 = ("supported if the RoPE arm's mean massive count per head of rot_q/rot_k (all layers, last "
           "step) has CI lower bound >= 1 AND its cross-head agreement (top-k overlap) has CI lower "
           "bound > chance k/D; not supported if the count's CI upper bound < 1 or the agreement's CI "
           "upper bound <= chance; inconclusive otherwise")
RULE_C2 = ("supported if, in the RoPE arm, mean max/mean of rot_q/rot_k heads minus that of v heads "
           "(all layers, last step) has CI lower bound > 0; opposite if its CI upper bound < 0; "
           "inconclusive otherwise")
RULE_C3 = ("supported if RoPE minus NoPE mean max/mean of rot_q/rot_k heads (all layers, last step) "
           "has CI lower bound > 0; opposite if CI upper bound < 0; inconclusive if the CI contains 0 "
           "or there is no NoPE arm")
RULE_C3_LF = ("supported if RoPE minus reference low-frequency share (energy in the lowest-frequency "
              "quarter of rotary pairs, rot_q/rot_k, all layers, last step) has CI lower bound > 0; "
              "opposite if CI upper bound < 0; inconclusive otherwise. Reference: the NoPE arm, or "
              "the null share (0.25) when there is none")
RULE_C4 = ("supported if the RoPE arm's mean massive count per head of rot_q/rot_k in the first "
           "quarter of layers (at least layer 0, last step) has CI lower bound >= 1; not supported if "
           "its CI upper bound < 1 while some later layer has CI lower bound >= 1 (it appears later); "
           "inconclusive otherwise (including no concentrated layer at all: nothing to locate)")
READS = {"C1": "rope", "C2": "rope", "C3": "diff", "C3-lowfreq": "diff", "C4": "rope"}
"""Which value of a Verdict each rule above judges: the RoPE arm's own ('rope') or RoPE minus the
reference ('diff'). Pooling over seeds pools that value."""


@dataclasses.dataclass
class Verdict:
  """One claim's measured quantity, the two arms, their paired difference, and the verdict."""
  claim: str                       # 'C1', 'C3-lowfreq', later 'C5', 'C6'
  title: str
  quantity: str                    # what rope/nope/diff measure
  verdict: str                     # one of VERDICTS
  rule: str                        # the fixed rule that produced the verdict
  rope: float | None = None        # value in the RoPE arm (or the model, for a single arm)
  rope_ci: list | None = None
  nope: float | None = None        # value in the reference arm (NoPE) or null
  nope_ci: list | None = None
  diff: float | None = None        # rope - nope
  ci: list | None = None           # interval of the paired difference
  reference: str = ""              # what 'nope' is: 'arm nope', 'null 0.25', ...
  step: int | None = None
  notes: str = ""

  def __post_init__(self):
    if self.verdict not in VERDICTS:
      raise ValueError(f"verdict: must be one of {', '.join(map(repr, VERDICTS))}; got {self.verdict!r}")


# ---------------------------------------------------------------------------------------- rules

def direction(ci, predicted: int = +1) -> str:
  """supported / opposite / inconclusive from the interval of a difference predicted to have the
  sign of `predicted`: supported if the interval excludes 0 on that side, opposite on the other."""
  lo, hi = sorted(predicted * np.asarray(ci, np.float64))
  if not (np.isfinite(lo) and np.isfinite(hi)):
    return "inconclusive"
  return "supported" if lo > 0 else "opposite" if hi < 0 else "inconclusive"


def at_least(ci, threshold: float) -> str:
  """supported if lo >= threshold, not supported if hi < threshold, else inconclusive."""
  lo, hi = ci
  if not (np.isfinite(lo) and np.isfinite(hi)):
    return "inconclusive"
  return "supported" if lo >= threshold else "not supported" if hi < threshold else "inconclusive"


# ------------------------------------------------------------------------------------- measuring

class _Arms:
  """The per-prompt sums of the RoPE and NoPE arms at their last common step, and a pooled-statistic
  helper with shared prompt resampling."""

  def __init__(self, store: T.Store, rope_arm, nope_arm, n_boot: int, find_nope: bool = True):
    meta = store.meta()
    self.store, self.meta = store, meta
    self.cfg = T.stat_config(meta)
    self.rope = _pick(meta["arms"], rope_arm, "rope")
    self.nope = _pick(meta["arms"], nope_arm, "nope") if nope_arm or find_nope else None
    arms = [a for a in (self.rope, self.nope) if a]
    common = set.intersection(*(set(store.steps(a)) for a in arms)) if arms else set()
    self.step = max(common) if common else None
    self.sums = {a: store.load_sums(a, self.step) for a in arms} if self.step is not None else {}
    n = len(np.load(store.path("probes.npy")))
    self.counts = S.prompt_counts(n, n_boot, T.BOOT_SEED)

  def n_layers(self, arm):
    return self.meta["arms"][arm]["n_layers"]

  def pooled(self, arm, tensors, stat, layers=None, seed=0):
    """(point, replicates) of a per-head statistic's mean over the heads of `tensors` x `layers`."""
    layers = range(self.n_layers(arm)) if layers is None else layers
    groups = [self.sums[arm][f"{l}.{t}"] for l in layers for t in tensors]
    facts = self.meta["arms"][arm]
    return S.pooled(groups, [stat], T.pairing_of(facts), facts["context"], self.cfg, self.counts, seed)[stat]


def _pick(arms: dict, name, kind: str):
  if name:
    if name not in arms:
      raise ValueError(f"{kind}_arm: {name!r} is not a traced arm; traced: {', '.join(arms)}")
    return name
  if kind in arms:
    return kind
  return next((a for a, f in arms.items() if f["position"] == kind), None)


def _ci(reps):
  return list(S.interval(reps, LEVEL))


def _compare(a: _Arms, tensors, stat, layers_of=None):
  """rope, nope (or None) and their paired difference: dict of values and intervals."""
  layers = layers_of(a.rope) if layers_of else None
  r, r_reps = a.pooled(a.rope, tensors, stat, layers, seed=1)
  out = {"rope": r, "rope_ci": _ci(r_reps)}
  if a.nope:
    layers = layers_of(a.nope) if layers_of else None
    n, n_reps = a.pooled(a.nope, tensors, stat, layers, seed=2)
    out.update(nope=n, nope_ci=_ci(n_reps), diff=r - n, ci=_ci(r_reps - n_reps), reference=f"arm {a.nope}")
  return out, r_reps


def _early(n_layers: int) -> range:
  return range(max(1, int(round(EARLY_FRACTION * n_layers))))


def evaluate(store: T.Store, rope_arm: str | None = None, nope_arm: str | None = None,
             n_boot: int = N_BOOT, *, find_nope: bool = True) -> list[Verdict]:
  """C1-C4 (with C3 split into the cause and the low-frequency location) from a traced directory.

  Without `nope_arm` the reference is the arm named "nope" or else the first NoPE arm, unless
  `find_nope` is False: then the claims that need a reference read inconclusive. Experiments with
  seeds pass False, so that an arm is never compared with the NoPE arm of another seed."""
  a = _Arms(store, rope_arm, nope_arm, n_boot, find_nope)
  lam = a.cfg.lam
  if a.rope is None:
    why = f"no RoPE arm among {', '.join(a.meta['arms'])}"
    return [Verdict(c, t, "-", "inconclusive", r, notes=why) for c, t, r in
            (("C1", "Concentration", RULE_C1), ("C2", "Q/K only", RULE_C2), ("C3", "RoPE causes it", RULE_C3),
             ("C3-lowfreq", "...in low-frequency pairs", RULE_C3_LF), ("C4", "Early", RULE_C4))]
  step = a.step
  base = {"step": step}

  # C1: massive dims in Q/K heads, shared across heads of a layer.
  c1, c1_reps = _compare(a, QK, "massive")
  agree, agree_reps = a.pooled(a.rope, QK, "agreement", seed=3)
  head_dim = a.meta["arms"][a.rope]["head_dim"]
  chance = min(a.cfg.agree_k, head_dim) / head_dim
  agree_ci = _ci(agree_reps)
  count_v = at_least(c1["rope_ci"], MIN_MASSIVE)
  agree_v = ("supported" if agree_ci[0] > chance else "not supported" if agree_ci[1] <= chance else "inconclusive")
  v1 = ("not supported" if "not supported" in (count_v, agree_v) else
        "supported" if count_v == agree_v == "supported" else "inconclusive")
  v_c1 = Verdict("C1", "Concentration", f"mean massive dims per head (lam={lam:g}), rot_q/rot_k", v1, RULE_C1,
                 **c1, **base, notes=f"cross-head agreement {agree:.3f} CI [{agree_ci[0]:.3f}, {agree_ci[1]:.3f}] "
                 f"vs chance {chance:.3f}")

  # C2: the Q/K - V gap of max/mean, in the RoPE arm (and the same gap in NoPE for the difference).
  def gap(arm, seed):
    qk, qk_reps = a.pooled(arm, QK, "max_mean", seed=seed)
    v, v_reps = a.pooled(arm, V, "max_mean", seed=seed + 10)
    return qk - v, qk_reps - v_reps, qk, v
  g_r, g_r_reps, qk_r, v_r = gap(a.rope, 4)
  c2 = {"rope": g_r, "rope_ci": _ci(g_r_reps)}
  if a.nope:
    g_n, g_n_reps, _, _ = gap(a.nope, 5)
    c2.update(nope=g_n, nope_ci=_ci(g_n_reps), diff=g_r - g_n, ci=_ci(g_r_reps - g_n_reps), reference=f"arm {a.nope}")
  v_c2 = Verdict("C2", "Q/K only", "max/mean of rot_q/rot_k minus max/mean of v (head means)",
                 direction(c2["rope_ci"]), RULE_C2, **c2, **base,
                 notes=f"RoPE arm: Q/K max/mean {qk_r:.3f}, V max/mean {v_r:.3f}")

  # C3: RoPE minus NoPE concentration, and where it sits in frequency.
  c3, _ = _compare(a, QK, "max_mean")
  v_c3 = Verdict("C3", "RoPE causes it", "max/mean of rot_q/rot_k (head mean)",
                 direction(c3["ci"]) if a.nope else "inconclusive", RULE_C3, **c3, **base,
                 notes="" if a.nope else "no NoPE arm traced")
  lf, lf_reps = _compare(a, QK, "lf_share")
  n_pairs = T.pairing_of(a.meta["arms"][a.rope]).n_pairs
  null = S.lf_pairs(n_pairs, a.cfg.lf_quarter) / n_pairs
  if not a.nope:
    lf.update(nope=null, diff=lf["rope"] - null, ci=[x - null for x in lf["rope_ci"]], reference=f"null {null:g}")
  v_c3lf = Verdict("C3-lowfreq", "...in low-frequency pairs", "low-frequency share of rot_q/rot_k pair energy",
                   direction(lf["ci"]), RULE_C3_LF, **lf, **base, notes=_where_notes(a))

  # C4: concentration in the first layers.
  c4, _ = _compare(a, QK, "massive", layers_of=lambda arm: _early(a.n_layers(arm)))
  early = _early(a.n_layers(a.rope))
  later = [l for l in range(a.n_layers(a.rope)) if l not in early]
  v4 = at_least(c4["rope_ci"], MIN_MASSIVE)
  later_ok = [l for l in later if at_least(_ci(a.pooled(a.rope, QK, "massive", [l], seed=6)[1]), MIN_MASSIVE)
              == "supported"]
  if v4 == "not supported" and not later_ok:
    v4 = "inconclusive"
  profile = ", ".join(f"L{l} {a.pooled(a.rope, QK, 'max_mean', [l])[0]:.2f}" for l in range(a.n_layers(a.rope)))
  v_c4 = Verdict("C4", "Early", f"mean massive dims per head (lam={lam:g}), rot_q/rot_k, layers "
                 f"{early.start}-{early.stop - 1}", v4, RULE_C4, **c4, **base,
                 notes=f"concentrated later layers: {later_ok or 'none'}; RoPE Q/K max/mean by layer: {profile}")
  return [v_c1, v_c2, v_c3, v_c3lf, v_c4]


def _where_notes(a: _Arms) -> str:
  """Where the mass sits relative to the context (SCIENCE.md: always report it)."""
  facts = a.meta["arms"][a.rope]
  p, context = T.pairing_of(facts), facts["context"]
  peak = np.median(np.concatenate([S.head_stats(np.sqrt(a.sums[a.rope][f"{l}.{t}"].sum(0)), p, context,
                                                a.cfg)["peak_pair"] for l in range(facts["n_layers"]) for t in QK]))
  band, _ = a.pooled(a.rope, QK, "band_share")
  _, band_null = S.band_share(np.ones(p.n_pairs), p.theta, context, a.cfg.band)
  return (f"RoPE arm: median peak pair {peak:g} of {p.n_pairs}; first pair with wavelength > context "
          f"({context:g}) {S.context_pair(p.theta, context)}, > 2x context {S.context_pair(p.theta, 2 * context)}; "
          f"boundary-band share {band:.3f} (null {band_null:.3f})")


# ---------------------------------------------------------------------------------------- files

def load_claims(out_dir: str) -> list[Verdict]:
  path = os.path.join(out_dir, "claims.json")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [Verdict(**v) for v in json.load(f)["claims"]]


def write_claims(verdicts: list[Verdict], out_dir: str) -> None:
  """claims.json and claims.md in out_dir; verdicts already there with other claim ids are kept
  (so C5/C6 can be added by later analyses), the same ids are replaced."""
  merged = {v.claim: v for v in load_claims(out_dir)}
  merged.update({v.claim: v for v in verdicts})
  ordered = sorted(merged.values(), key=lambda v: v.claim)
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, "claims.json"), "w") as f:
    json.dump({"level": LEVEL, "claims": [dataclasses.asdict(v) for v in ordered]}, f, indent=1,
              default=lambda x: x.item() if isinstance(x, np.generic) else str(x))
  with open(os.path.join(out_dir, "claims.md"), "w") as f:
    f.write(to_markdown(ordered))


def _fmt(x, ci=None) -> str:
  if x is None or (isinstance(x, float) and math.isnan(x)):
    return "-"
  s = f"{x:.3g}"
  return s + (f" [{ci[0]:.3g}, {ci[1]:.3g}]" if ci else "")


def to_markdown(verdicts: list[Verdict]) -> str:
  lines = ["# Claims", "", f"Values with {LEVEL:.0%} bootstrap intervals (prompts and heads resampled).", "",
           "| claim | quantity | RoPE | reference | RoPE - reference | verdict |", "|---|---|---|---|---|---|"]
  for v in verdicts:
    ref = f"{v.reference}: {_fmt(v.nope, v.nope_ci)}" if v.reference else "-"
    lines.append(f"| {v.claim} {v.title} | {v.quantity} | {_fmt(v.rope, v.rope_ci)} | {ref} | "
                 f"{_fmt(v.diff, v.ci)} | **{v.verdict}** |")
  lines += ["", "## Rules and notes", ""]
  for v in verdicts:
    lines.append(f"- **{v.claim}** (step {v.step}): {v.rule}." + (f" Notes: {v.notes}." if v.notes else ""))
  return "\n".join(lines) + "\n"
