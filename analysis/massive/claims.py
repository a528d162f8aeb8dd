"""Verdicts on the paper's claims, from a traced output directory, by rules fixed before any data.

Each verdict compares the RoPE arm with the NoPE arm at their last common step, with 95% bootstrap
intervals (prompts resampled jointly for both arms, which saw the same probes; heads resampled
within each arm). Later analyses (C5 disruption, C6 quantization) add `Verdict`s in the same
format and call `write_claims`, which merges by claim id.
"""
from __future__ import annotations

import dataclasses
import math
import os

import numpy as np

from analysis.massive import stats as S
from analysis.massive import store as ST
from minilm import atomic, hooks
from minilm.schema import ConfigError, check

VERDICTS = ("supported", "not supported", "opposite", "inconclusive")

LEVEL = 0.95
"""Two-sided level of every interval behind a verdict."""
N_BOOT = 2000
"""Bootstrap replicates behind a verdict."""
QK = ("rot_q", "rot_k")
"""The tensors the claims call Q and K: after RoPE, as the paper's code captures them (for NoPE
rot_q == q)."""
V = ("v",)
POINTS = ("pre", "post", "pair")
"""Where a concentration statistic is taken: per dim before RoPE (q, k), per dim after RoPE (rot_q,
rot_k: the paper's view, which the rotation lowers for RoPE arms only, since it moves each pair's
energy between its two dims), and per rotary pair (pair norms: unchanged by any rotation)."""
POINT_LABELS = {"pre": "pre-RoPE per dim (q/k)", "post": "post-RoPE per dim (rot_q/rot_k, the paper's view)",
                "pair": "per rotary pair (pair energy, rotation-invariant)"}
SHARE_LEVEL = 0.5
"""C1 and C4's stated level for the share of heads with at least one massive dim: a majority. The
paper says 'every head'; a majority is the weakest reading under which concentration is a property of
the heads rather than of a few of them."""
ALPHA = 0.01
"""One-sided level of the recurrence permutation test."""
N_PERM = 1000
"""Permutations of the recurrence null."""
PERM_SEED = 0
CLAIM_STATS = ("any_massive", "pair_any_massive", "max_mean", "pair_max_mean", "lf_share", "band_share")
"""The per-head statistics the rules read."""
EARLY_FRACTION = 0.25
"""C4's early layers: the first quarter of the layers (at least the first layer)."""

RULE_C1 = ("share of heads with at least one massive dim (M[h,d] > lam x mean_d M[h,d], lam from the trace "
           "settings, 5 by default), rot_q and rot_k separately (post-RoPE, the paper's view), heads of all "
           "layers, last step, 95% bootstrap over prompts and heads; recurrence, for rot_q and rot_k "
           "separately: pairs of heads of a layer that share a massive dim index, summed over the layers "
           "where at least two heads have one, against a permutation null in which every head keeps its "
           f"number of massive dims but places them at random among its dims ({N_PERM} permutations, seed "
           f"{PERM_SEED}, one-sided p). supported if the Q share and the K share both have CI lower bound >= "
           f"{SHARE_LEVEL:g} AND the recurrence p < {ALPHA:g} for Q and for K; not supported if either share "
           f"has CI upper bound < {SHARE_LEVEL:g}, or the recurrence p >= {ALPHA:g} for Q or K where it can be "
           "tested; inconclusive otherwise (including recurrence untestable: no layer with two heads holding a "
           f"massive dim, or too few such heads for any placement to reach p < {ALPHA:g}: the p of every head's "
           "massive dims at the same indices is not below it). The same shares and tests before RoPE (q/k) and "
           "per rotary pair are reported beside it")
RULE_C2 = ("supported if, in the RoPE arm, mean max/mean of rot_q/rot_k heads minus that of v heads "
           "(all layers, last step) has CI lower bound > 0; opposite if its CI upper bound < 0; "
           "inconclusive otherwise. The same gap before RoPE (q/k) and per rotary pair is reported beside it")
RULE_C3 = ("judged on the rotation-invariant statistic: RoPE minus NoPE mean max/mean of the rotary-pair norms "
           "sqrt(M[h,d1]^2 + M[h,d2]^2) of q/k heads (all layers, last step; the NoPE arm's dims paired with the "
           "RoPE arm's pair layout); supported if its CI lower bound > 0; opposite if CI upper bound < 0; "
           "inconclusive if the CI contains 0 or there is no NoPE arm. The same difference per dim before RoPE "
           "(q/k) and after RoPE (rot_q/rot_k, the paper's view) is reported beside it, with the part of the "
           "post-RoPE difference the rotation itself accounts for: (post - pre in the RoPE arm) - (post - pre "
           "in the NoPE arm)")
RULE_C3_LF = ("supported if RoPE minus reference low-frequency share (energy in the lowest-frequency "
              "quarter of rotary pairs, rot_q/rot_k, all layers, last step; rotation-invariant) has CI lower "
              "bound > 0; opposite if CI upper bound < 0; inconclusive otherwise. Reference: the NoPE arm "
              "(its dims paired with the RoPE arm's pair layout), or the null share (0.25) when there is none")
RULE_C4 = (f"for rot_q and rot_k separately: the first layer whose share of heads with at least one massive dim "
           f"(as in C1) reaches {SHARE_LEVEL:g}, with its 95% bootstrap interval over prompts and heads (a "
           "replicate in which no layer reaches it counts as past the last layer); supported if for both Q "
           "and K that interval's upper bound lies in the first quarter of the layers (at least layer 0); not "
           "supported if for Q or K the interval's lower bound lies past the first quarter while some layer "
           "reaches the level; inconclusive otherwise (including no layer reaching the level: nothing to "
           "locate). The first layers before RoPE (q/k) and per rotary pair are reported beside it")
READS = {"C1": "value", "C2": "value", "C3": "diff", "C3-lowfreq": "diff", "C4": "value"}
"""Which value of a Verdict each rule above judges: the tested arm's own ('value') or it minus the
reference ('diff'). Pooling over seeds pools that value."""


@dataclasses.dataclass
class Verdict:
  """One claim's measured quantity, the two arms, their paired difference, and the verdict."""
  claim: str                       # 'C1', 'C3-lowfreq', later 'C5', 'C6'
  title: str
  quantity: str                    # what value/reference_value/diff measure
  verdict: str                     # one of VERDICTS
  rule: str                        # the fixed rule that produced the verdict
  value: float | None = None       # in the tested arm (RoPE), the model (one arm), the disrupted or quantized one
  value_ci: list | None = None
  reference_value: float | None = None   # in the reference (the NoPE arm, a null, the compared scheme)
  reference_ci: list | None = None
  diff: float | None = None        # value - reference_value
  ci: list | None = None           # interval of the paired difference
  reference: str = ""              # what the reference is: 'arm nope', 'null 0.25', ...
  step: int | None = None
  notes: str = ""
  point: str = ""                  # the point of POINTS the rule judges ('' when not a per-point statistic)
  points: dict | None = None       # {point: {value, value_ci, reference_value, reference_ci, diff, ci}} at every point
  rotation: dict | None = None     # {value, ci, of}: post minus pre, of 'diff' (less the reference's) or 'value'
  parts: list | None = None        # the sub-tests the verdict combines, and reported extras: dicts with
  #                                  key, name, point, value, ci, verdict ('' when not judged), ...

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


def recurs(test: dict) -> str:
  """A recurrence test's verdict: supported if p < ALPHA; not supported if p >= ALPHA where the test
  could reach ALPHA (p_best < ALPHA); inconclusive where it could not, or nothing is testable."""
  if not test["testable"] or not test["p_best"] < ALPHA:
    return "inconclusive"
  return "supported" if test["p"] < ALPHA else "not supported"


def early(first: int, ci, n_layers: int) -> str:
  """C4 for one tensor: where the first layer reaching SHARE_LEVEL lies against the early layers."""
  n_early = len(_early(n_layers))
  if first >= n_layers or not np.all(np.isfinite(ci)):
    return "inconclusive"
  return "supported" if ci[1] < n_early else "not supported" if ci[0] >= n_early else "inconclusive"


def all_of(verdicts) -> str:
  """supported if every part is, not supported if any part is not, inconclusive otherwise."""
  verdicts = list(verdicts)
  if "not supported" in verdicts:
    return "not supported"
  return "supported" if verdicts and all(v == "supported" for v in verdicts) else "inconclusive"


# ------------------------------------------------------------------------------------- measuring

class _Arms:
  """The per-prompt sums of the RoPE and NoPE arms at their last common step, and a pooled-statistic
  helper with shared prompt resampling."""

  def __init__(self, store: ST.Store, rope_arm, nope_arm, n_boot: int, find_nope: bool = True):
    meta = store.meta()
    self.store, self.meta = store, meta
    self.cfg = ST.stat_config(meta)
    self.rope = _pick(meta["arms"], rope_arm, "rope")
    self.nope = _pick(meta["arms"], nope_arm, "nope", _seed_of(meta["arms"], self.rope)) if nope_arm or find_nope else None
    arms = [a for a in (self.rope, self.nope) if a]
    common = set.intersection(*(set(store.steps(a)) for a in arms)) if arms else set()
    check(bool(common) or not arms, "arms", " and ".join(f"{a!r} (traced at steps {store.steps(a) or 'none'})"
          for a in arms) + (" share no traced step" if len(arms) > 1 else " has no traced step")
          + f" in {store.root}; the claims compare one step: trace the arms at a common one")
    self.step = max(common) if common else None
    self.sums = {a: store.load_sums(a, self.step) for a in arms} if self.step is not None else {}
    n = len(store.probes())
    self.counts = S.prompt_counts(n, n_boot, S.BOOT_SEED)
    self.groups = {}

  def no_reference(self) -> str:
    """Why there is no reference arm: none traced, or none of the tested arm's seed."""
    seed = _seed_of(self.meta["arms"], self.rope)
    if seed is not None and any(f["position"] == "nope" for f in self.meta["arms"].values()):
      return f"no NoPE arm of seed {seed} traced"
    return "no NoPE arm traced"

  def n_layers(self, arm):
    return self.meta["arms"][arm]["n_layers"]

  def pairing(self, arm) -> S.Pairing:
    """An arm's pairing; a reference arm without RoPE takes the tested arm's, so that its dims are
    paired with the same layout (like for like) wherever the head sizes match."""
    facts, tested = self.meta["arms"][arm], self.meta["arms"][self.rope]
    own = ST.pairing_of(facts)
    if arm != self.rope and not own.is_rope and facts["head_dim"] == tested["head_dim"]:
      return ST.pairing_of(tested)
    return own

  def norms(self, arm, layer, tensor) -> np.ndarray:
    return np.sqrt(self.sums[arm][hooks.name(layer, tensor)].astype(np.float64).sum(0))

  def group(self, arm, layer, tensor) -> dict:
    """S.head_replicates of CLAIM_STATS for one (layer, tensor), computed once: the claims pool the
    same groups many ways (all layers, one layer, Q or K alone)."""
    key = (arm, layer, tensor)
    if key not in self.groups:
      self.groups[key] = S.head_replicates(self.sums[arm][hooks.name(layer, tensor)], CLAIM_STATS, self.pairing(arm),
                                           self.meta["arms"][arm]["context"], self.cfg, self.counts)
    return self.groups[key]

  def pooled(self, arm, tensors, stat, layers=None, seed=0):
    """(point, replicates) of a per-head statistic's mean over the heads of `tensors` x `layers`."""
    layers = range(self.n_layers(arm)) if layers is None else layers
    groups = [self.group(arm, l, t) for l in layers for t in tensors]
    return S.pool_heads(groups, [stat], len(self.counts), seed)[stat]


def check_arms(arms: dict, rope_arm=None, nope_arm=None, where: str = "the trace") -> None:
  """The arms --rope-arm and --nope-arm name, checked before any verdict is written: the rules judge
  a RoPE arm against a NoPE one ("RoPE minus NoPE") of the same seed. `arms`: {arm: facts with its
  'position' and, where known, its 'seed'}."""
  for field, name in (("--rope-arm", rope_arm), ("--nope-arm", nope_arm)):
    check(not name or name in arms, field, f"{name!r} is not an arm of {where}; arms: {', '.join(arms)}")
  for field, name, kind, label in (("--rope-arm", rope_arm, "rope", "RoPE"), ("--nope-arm", nope_arm, "nope", "NoPE")):
    of_kind = [a for a, f in arms.items() if f["position"] == kind]
    check(not name or name in of_kind, field, f"{name!r} is not a {label} arm; {label} arms: {', '.join(of_kind) or 'none'}")
  if rope_arm and nope_arm:
    seeds = arms[rope_arm].get("seed"), arms[nope_arm].get("seed")
    check(None in seeds or seeds[0] == seeds[1], "--nope-arm", f"{nope_arm!r} trained at seed {seeds[1]}, "
          f"{rope_arm!r} at seed {seeds[0]}: an arm is judged against the NoPE arm of its own seed")


def _pick(arms: dict, name, kind: str, seed=None):
  """The arm named, else the arm called `kind`, else the first of that position; of `seed` only, where
  seeds are known (a traced run keeps each arm's), so that arms of two seeds are never compared."""
  if name:
    if name not in arms:
      raise ValueError(f"{kind}_arm: {name!r} is not a traced arm; traced: {', '.join(arms)}")
    return name
  arms = {a: f for a, f in arms.items() if seed is None or f.get("seed") == seed}
  if kind in arms:
    return kind
  return next((a for a, f in arms.items() if f["position"] == kind), None)


def _seed_of(arms: dict, arm):
  """An arm's training seed where the store knows it (None: a pretrained model, or an older trace)."""
  return arms[arm].get("seed") if arm else None


def _ci(reps):
  return list(S.interval(reps, LEVEL))


def _at(point: str, tensors) -> tuple:
  """The tensors a point reads: rot_q/rot_k after RoPE, q/k before it and for pairs (the pair norms
  are the same on both); v is never rotated."""
  return tuple(tensors) if point == "post" else tuple(t.replace("rot_", "") for t in tensors)


def _measure(a: _Arms, arm, point: str, tensors, stat: str, layers=None, seed=0):
  """(value, replicates) of `stat` at `point` over the heads of `tensors` (named as after RoPE)."""
  return a.pooled(arm, _at(point, tensors), f"pair_{stat}" if point == "pair" else stat, layers, seed)


def _three(a: _Arms, measure):
  """`measure(arm, point, seed) -> (value, replicates)` at every point, in the tested arm and against
  the reference: ({point: value, value_ci, reference_value, reference_ci, diff, ci}, rotation). Each arm uses one seed
  at every point, so its pre, post and pair replicates resample the same heads and are paired."""
  points, reps = {}, {}
  for point in POINTS:
    r, r_reps = measure(a.rope, point, 1)
    out, n_reps = {"value": r, "value_ci": _ci(r_reps)}, None
    if a.nope:
      n, n_reps = measure(a.nope, point, 2)
      out.update(reference_value=n, reference_ci=_ci(n_reps), diff=r - n, ci=_ci(r_reps - n_reps))
    points[point], reps[point] = out, (r_reps, n_reps)
  return points, _rotation(points, reps)


def _rotation(points: dict, reps: dict) -> dict:
  """What the rotation itself does to a per-dim value: post minus pre in the tested arm, less the same
  in the reference (zero there for an arm without RoPE, whose rot_q is q), with a paired interval."""
  (r_post, n_post), (r_pre, n_pre) = reps["post"], reps["pre"]
  value, samples = points["post"]["value"] - points["pre"]["value"], r_post - r_pre
  if n_post is None:
    return {"value": value, "ci": _ci(samples), "of": "value"}
  value -= points["post"]["reference_value"] - points["pre"]["reference_value"]
  return {"value": value, "ci": _ci(samples - (n_post - n_pre)), "of": "diff"}


def _judged(points: dict, point: str, reference: str) -> dict:
  """The Verdict fields of the point a rule judges."""
  out = dict(points[point])
  return {**out, "reference": reference} if "reference_value" in out else out


def _early(n_layers: int) -> range:
  return range(max(1, int(round(EARLY_FRACTION * n_layers))))


def judge(store: ST.Store, rope_arm: str | None = None, nope_arm: str | None = None,
          n_boot: int = N_BOOT, *, find_nope: bool = True) -> list[Verdict]:
  """C1-C4 (with C3 split into the cause and the low-frequency location) from a traced directory.

  Without `rope_arm` the tested arm is the arm named "rope" or else the first RoPE arm; without
  `nope_arm` the reference is the arm named "nope" or else the first NoPE arm, of the tested arm's
  seed where the store knows seeds (a traced run's arms), unless `find_nope` is False: then the
  claims that need a reference read inconclusive (compare.py's comparisons name their pairs)."""
  a = _Arms(store, rope_arm, nope_arm, n_boot, find_nope)
  if a.rope is None:
    why = f"no RoPE arm among {', '.join(a.meta['arms'])}"
    return [Verdict(c, t, "-", "inconclusive", r, notes=why) for c, t, r in
            (("C1", "Concentration", RULE_C1), ("C2", "Q/K only", RULE_C2), ("C3", "RoPE causes it", RULE_C3),
             ("C3-lowfreq", "...in low-frequency pairs", RULE_C3_LF), ("C4", "Early", RULE_C4))]
  return [_c1(a), _c2(a), _c3(a), _c3_lowfreq(a), _c4(a)]


def _c1(a: _Arms) -> Verdict:
  """Massive dims in most Q heads and most K heads, at recurring dim indices."""
  lam = a.cfg.lam
  points, rotation = _three(a, lambda arm, point, seed: _measure(a, arm, point, QK, "any_massive", seed=seed))
  parts = []
  for point in POINTS:
    for name, tensor in (("Q", "rot_q"), ("K", "rot_k")):
      value, reps = _measure(a, a.rope, point, (tensor,), "any_massive", seed=3)
      ci = _ci(reps)
      test = _recurrence(a, a.rope, point, tensor)
      judged = point == "post"
      parts += [{"key": f"share_{name}", "name": f"{name} share of heads with a massive dim", "point": point,
                 "value": value, "ci": ci, "verdict": at_least(ci, SHARE_LEVEL) if judged else ""},
                {"key": f"recurrence_{name}", "name": f"{name} heads sharing massive dim indices (pairs of heads)",
                 "point": point, "value": test["observed"], "ci": None, **test,
                 "verdict": recurs(test) if judged else ""}]
  verdict = all_of(p["verdict"] for p in parts if p["verdict"])
  return Verdict("C1", "Concentration", f"share of Q/K heads with at least one massive dim (lam={lam:g}), "
                 "rot_q/rot_k", verdict, RULE_C1, **_judged(points, "post", f"arm {a.nope}"), step=a.step,
                 point="post", points=points, rotation=rotation, parts=parts,
                 notes="; ".join(f"{POINT_LABELS[pt]}: {_parts_notes(parts, pt)}" for pt in POINTS))


def _recurrence(a: _Arms, arm, point: str, tensor: str) -> dict:
  """The recurrence test of `tensor`'s massive dims (or massive pairs) at `point`, over the layers."""
  units = S.unit_index(a.pairing(arm))
  masks = []
  for layer in range(a.n_layers(arm)):
    M = a.norms(arm, layer, _at(point, (tensor,))[0])
    masks.append(S.massive_mask(S.pair_norms(M, units) if point == "pair" else M, a.cfg.lam))
  return S.recurrence(masks, N_PERM, PERM_SEED)


def _parts_notes(parts: list, point: str) -> str:
  """The judged parts in words, from their numbers."""
  out = []
  for p in parts:
    if p["point"] != point:
      continue
    if p["ci"] is not None:
      out.append(f"{p['name']} {p['value']:.3f} CI [{p['ci'][0]:.3f}, {p['ci'][1]:.3f}]")
    elif "p" in p:
      out.append(f"{p['name']} {p['value']} vs {p['null_mean']:.3g} under the null in {p['testable']} testable "
                 f"layers, p {p['p']:.3g}" + (f" (the smallest these heads can reach: {p['p_best']:.3g})"
                                             if p.get("p_best", 0) >= ALPHA else ""))
  return "; ".join(out)


def _c2(a: _Arms) -> Verdict:
  """The Q/K - V gap of max/mean, in the RoPE arm (and the same gap in NoPE for the difference)."""
  def gap(arm, point, seed):
    qk, qk_reps = _measure(a, arm, point, QK, "max_mean", seed=seed)
    v, v_reps = _measure(a, arm, point, V, "max_mean", seed=seed + 10)
    return qk - v, qk_reps - v_reps
  points, rotation = _three(a, gap)
  qk, _ = _measure(a, a.rope, "post", QK, "max_mean", seed=4)
  v, _ = _measure(a, a.rope, "post", V, "max_mean", seed=14)
  return Verdict("C2", "Q/K only", "max/mean of rot_q/rot_k minus max/mean of v (head means)",
                 direction(points["post"]["value_ci"]), RULE_C2, **_judged(points, "post", f"arm {a.nope}"),
                 step=a.step, point="post", points=points, rotation=rotation,
                 notes=f"RoPE arm: Q/K max/mean {qk:.3f}, V max/mean {v:.3f}")


def _c3(a: _Arms) -> Verdict:
  """RoPE minus NoPE concentration, judged per rotary pair; beside it, whether the RoPE arm has a
  massive pair at all (the rule compares concentration, which exists without massive values)."""
  points, rotation = _three(a, lambda arm, point, seed: _measure(a, arm, point, QK, "max_mean", seed=seed))
  share, reps = _measure(a, a.rope, "pair", QK, "any_massive", seed=3)
  ci = _ci(reps)
  massive = (f"RoPE arm: share of q/k heads with a massive pair {share:.3f} CI [{ci[0]:.3f}, {ci[1]:.3f}]"
             + (" (none: the difference is one of concentration, not of massive values)" if ci[1] == 0 else ""))
  return Verdict("C3", "RoPE causes it", "max/mean of q/k rotary-pair norms (head mean; rotation-invariant)",
                 direction(points["pair"]["ci"]) if a.nope else "inconclusive", RULE_C3,
                 **_judged(points, "pair", f"arm {a.nope}"), step=a.step, point="pair", points=points,
                 rotation=rotation, notes=massive if a.nope else f"{a.no_reference()}; {massive}")


def _c3_lowfreq(a: _Arms) -> Verdict:
  """Where the pair energy sits in frequency (rotation-invariant already: one point)."""
  r, r_reps = a.pooled(a.rope, QK, "lf_share", seed=1)
  lf = {"value": r, "value_ci": _ci(r_reps)}
  if a.nope:
    n, n_reps = a.pooled(a.nope, QK, "lf_share", seed=2)
    lf.update(reference_value=n, reference_ci=_ci(n_reps), diff=r - n, ci=_ci(r_reps - n_reps), reference=f"arm {a.nope}")
  else:
    n_pairs = a.pairing(a.rope).n_pairs
    null = S.lf_pairs(n_pairs, a.cfg.lf_quarter) / n_pairs
    lf.update(reference_value=null, diff=r - null, ci=[x - null for x in lf["value_ci"]], reference=f"null {null:g}")
  parts = _where(a)
  return Verdict("C3-lowfreq", "...in low-frequency pairs", "low-frequency share of rot_q/rot_k pair energy",
                 direction(lf["ci"]), RULE_C3_LF, **lf, step=a.step, point="pair", parts=parts,
                 notes=_where_notes(parts))


def _c4(a: _Arms) -> Verdict:
  """How early the share of heads with a massive dim reaches SHARE_LEVEL, against the depth."""
  n = a.n_layers(a.rope)
  parts = []
  for point in POINTS:
    for name, tensor in (("Q", "rot_q"), ("K", "rot_k")):
      first, reps, profile = _first_layer(a, a.rope, point, tensor)
      ci = _ci(reps)
      parts.append({"key": f"first_{name}", "name": f"first layer where the {name} share reaches {SHARE_LEVEL:g}",
                    "point": point, "value": first, "ci": ci, "depth": first / n, "profile": profile,
                    "verdict": early(first, ci, n) if point == "post" else ""})

  def both(arm, point, seed):
    """The first layer where the Q and the K share both reach the level (seed: unused, each layer
    has its own)."""
    (fq, rq, _), (fk, rk, _) = (_first_layer(a, arm, point, t) for t in QK)
    return max(fq, fk), np.maximum(rq, rk)
  points, _ = _three(a, both)
  e = _early(n)
  return Verdict("C4", "Early", f"first layer where both Q and K shares of heads with a massive dim reach "
                 f"{SHARE_LEVEL:g} (of {n}; early: layers {e.start}-{e.stop - 1}), rot_q/rot_k",
                 all_of(p["verdict"] for p in parts if p["verdict"]), RULE_C4,
                 **_judged(points, "post", f"arm {a.nope}"), step=a.step, point="post", points=points, parts=parts,
                 notes=_c4_notes(parts, n))


def _first_layer(a: _Arms, arm, point: str, tensor: str):
  """(first layer whose share of `tensor` heads with a massive dim reaches SHARE_LEVEL, its bootstrap
  replicates, the per-layer shares); n_layers where no layer reaches it."""
  n = a.n_layers(arm)
  values, reps = zip(*(_measure(a, arm, point, (tensor,), "any_massive", [l], seed=20 + l) for l in range(n)))
  reached, reached_reps = np.asarray(values) >= SHARE_LEVEL, np.stack(reps) >= SHARE_LEVEL
  first = int(np.argmax(reached)) if reached.any() else n
  first_reps = np.where(reached_reps.any(0), reached_reps.argmax(0), n).astype(np.float64)
  return first, first_reps, [float(v) for v in values]


def _c4_notes(parts: list, n_layers: int) -> str:
  """Each first layer in words (n_layers reads 'no layer'), the per-layer shares at the judged point."""
  out = []
  for p in parts:
    where = f"layer {p['value']} ({p['depth']:.0%} of the depth)" if p["value"] < n_layers else "no layer"
    profile = ("; share by layer: " + ", ".join(f"L{l} {s:.2f}" for l, s in enumerate(p["profile"]))
               if p["verdict"] else "")
    out.append(f"{POINT_LABELS[p['point']]}, {p['name']}: {where}, CI [{p['ci'][0]:g}, {p['ci'][1]:g}]{profile}")
  return "; ".join(out)


def _where(a: _Arms) -> list:
  """Where the mass sits relative to the context (docs/claims.md: always report it), as parts."""
  facts = a.meta["arms"][a.rope]
  p, context = a.pairing(a.rope), facts["context"]
  peak = np.median(np.concatenate([S.head_stats(a.norms(a.rope, l, t), p, context, a.cfg, ("peak_pair",))["peak_pair"]
                                   for l in range(facts["n_layers"]) for t in QK]))
  band, band_reps = a.pooled(a.rope, QK, "band_share", seed=5)
  _, band_null = S.band_share(np.ones(p.n_pairs), p.theta, context, a.cfg.band)
  common = {"point": "pair", "ci": None, "verdict": ""}
  return [{**common, "key": "peak_pair", "name": "median peak pair", "value": float(peak), "n_pairs": p.n_pairs},
          {**common, "key": "ctx_pair", "name": f"first pair with wavelength > context ({context:g})",
           "value": S.context_pair(p.theta, context)},
          {**common, "key": "ctx2_pair", "name": "first pair with wavelength > 2x context",
           "value": S.context_pair(p.theta, 2 * context)},
          {**common, "key": "band_share", "name": "boundary-band share", "value": band, "ci": _ci(band_reps),
           "null": band_null}]


def _where_notes(parts: list) -> str:
  by = {p["key"]: p for p in parts}
  return (f"RoPE arm: median peak pair {by['peak_pair']['value']:g} of {by['peak_pair']['n_pairs']}; "
          f"{by['ctx_pair']['name']} {by['ctx_pair']['value']}, {by['ctx2_pair']['name']} {by['ctx2_pair']['value']}; "
          f"boundary-band share {by['band_share']['value']:.3f} (null {by['band_share']['null']:.3f})")


# ---------------------------------------------------------------------------------------- files

def deciding(models: list[str], positions: dict[str, str]) -> str:
  """Of models judged one by one (C5, C6), the one whose verdict is the claim's: the first RoPE model,
  or the first model where none uses RoPE. The others' verdicts stay in the study's summary.json."""
  return next((m for m in models if positions.get(m) == "rope"), models[0])


def load_claims(out_dir: str, skip: frozenset = frozenset()) -> list[Verdict]:
  """The verdicts of out_dir/claims.json, those with a claim id in `skip` left unread."""
  path = os.path.join(out_dir, "claims.json")
  if not os.path.exists(path):
    return []
  again = "run the analysis that wrote it again"
  data = atomic.parse_json(path, lambda why: ConfigError(f"{path}: damaged, not valid JSON ({why}); {again}"))
  check(isinstance(data, dict) and isinstance(data.get("claims"), list)
        and all(isinstance(v, dict) for v in data["claims"]), path, f"damaged, holds no list of verdicts; {again}")
  rows = [v for v in data["claims"] if v.get("claim") not in skip]
  fields = {f.name for f in dataclasses.fields(Verdict)}
  for v in rows:
    unknown = sorted(set(v) - fields)
    check(not unknown, path, f"unknown verdict field {unknown[0]!r} (rope/nope are value/reference_value since "
          "they name other things in C5 and C6); run the analysis that wrote it again" if unknown else "")
  return [Verdict(**v) for v in rows]


def write_claims(verdicts: list[Verdict], out_dir: str) -> None:
  """claims.json and claims.md in out_dir; verdicts already there with other claim ids are kept
  (so C5/C6 can be added by later analyses), the same ids are replaced unread."""
  merged = {v.claim: v for v in load_claims(out_dir, frozenset(v.claim for v in verdicts))}
  merged.update({v.claim: v for v in verdicts})
  ordered = sorted(merged.values(), key=lambda v: v.claim)
  atomic.write_json(os.path.join(out_dir, "claims.json"),
                    {"level": LEVEL, "claims": [dataclasses.asdict(v) for v in ordered]},
                    default=lambda x: x.item() if isinstance(x, np.generic) else str(x))
  atomic.write_text(os.path.join(out_dir, "claims.md"), to_markdown(ordered))


def fmt(x, ci=None) -> str:
  """x (and its interval) to 3 significant digits; '-' where there is none."""
  if x is None or (isinstance(x, float) and math.isnan(x)):
    return "-"
  s = f"{x:.3g}"
  return s + (f" [{ci[0]:.3g}, {ci[1]:.3g}]" if ci else "")


def points_text(v: Verdict) -> list[str]:
  """The verdict's value at every point, and what the rotation itself accounts for, in words made
  from the numbers (empty for a verdict without points)."""
  out = []
  for point in POINTS if v.points else ():
    p = v.points[point]
    ref = (f"; {v.reference or 'reference'} {fmt(p['reference_value'], p['reference_ci'])}, "
           f"difference {fmt(p['diff'], p['ci'])}"
           if p.get("reference_value") is not None else "")
    out.append(f"{POINT_LABELS[point]}{' (judged)' if point == v.point else ''}: {fmt(p['value'], p['value_ci'])}{ref}")
  if v.rotation:
    out.append(rotation_text(v))
  return out


def rotation_text(v: Verdict) -> str:
  """How much of the post-RoPE value (or difference) the rotation itself accounts for."""
  r = v.rotation
  of = "difference" if r["of"] == "diff" else "value of the tested arm"
  post = v.points["post"][r["of"]]
  share = f", i.e. {r['value'] / post:.0%} of the post-RoPE per-dim {of} {fmt(post)}" if post else ""
  return (f"the rotation itself (per dim, post-RoPE minus pre-RoPE) changes the {of} by "
          f"{fmt(r['value'], r['ci'])}{share}")


def to_markdown(verdicts: list[Verdict]) -> str:
  lines = ["# Claims", "", f"Values with {LEVEL:.0%} bootstrap intervals (prompts and heads resampled).", "",
           "| claim | quantity | RoPE | reference | RoPE - reference | verdict | rule |",
           "|---|---|---|---|---|---|---|"]
  for v in verdicts:
    ref = f"{v.reference}: {fmt(v.reference_value, v.reference_ci)}" if v.reference else "-"
    lines.append(f"| {v.claim} {v.title} | {v.quantity} | {fmt(v.value, v.value_ci)} | {ref} | "
                 f"{fmt(v.diff, v.ci)} | **{v.verdict}** | {v.rule} |")
  lines += ["", "## Rules, points and notes", ""]
  for v in verdicts:
    step = "" if v.step is None else f" (step {v.step})"
    lines.append(f"- **{v.claim}**{step}: **{v.verdict}** by the rule: {v.rule}." + (f" Notes: {v.notes}." if v.notes else ""))
    lines += [f"  - {t}" for t in points_text(v)]
  return "\n".join(lines) + "\n"
