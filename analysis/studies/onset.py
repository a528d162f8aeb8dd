"""The onset study: when concentrated Q/K values appear, against tokens seen and model size, per
position encoding, from a traced directory (analysis.massive.store) and the run it was traced from.

  python -m analysis onset TRACE_DIR --out DIR [--run-dir RUN] [--params N ...] [--n-boot 2000]

onset_table.csv: one row per arm x traced checkpoint. An arm's facts come from its recorded
TrainConfig (<run>/<arm>/config.json), never from its name: kind (position encoding), params (every
parameter of its ModelConfig, embeddings included), context (data.seq_len), seed, step, tokens
(step x batch_size x seq_len). Statistics are means over the Q and K heads of every layer, as the
claims pool them, from analysis.massive.stats.head_stats at the three points of
analysis.massive.claims.POINTS: pre (q/k per dim), post (rot_q/rot_k per dim, the paper's view) and
pair (rotary-pair norms, rotation-invariant): max/mean, massive dims per head, and the share of
heads with a dim above lambda for lambda in LAMS; then the low-frequency and boundary-band shares,
the peak pair against j_ctx (RoPE only: blank otherwise) and the held-out scores of eval.jsonl
at the steps the run evaluated (`python -m train CONFIG --score-checkpoints` scores every checkpoint). Arms without RoPE are paired by the store's labelled convention.

fit.json: per kind, the law y = a + b log2(tokens) + c log2(params), ordinary least squares over
the kind's checkpoints with tokens > 0, for each statistic of FITTED. Intervals: 95% percentile
bootstrap (N_BOOT replicates, seed BOOT_SEED) that resamples the kind's ARMS with replacement, an
arm bringing all its checkpoints (seeds, sizes and contexts are all arms alike), and refits;
replicates whose arms span one model size while the fit has two or more are dropped and counted.
With one model size in the kind c is not identified and fixed at 0 (said in the fit's note).

Onset rule (written down before any onset data was seen; RULE below):
- pair_max_mean reaches LAMBDA. A head whose max/mean over rotary-pair norms exceeds lambda has a
  massive pair; its per-dim max/mean is never below its per-pair one (max_d M >= max_j N / sqrt 2
  and sum_j N >= sum_d M / sqrt 2), so it then has a lambda=5 dim before and after RoPE whatever
  the rotation. The head MEAN reaching lambda is where the average head has one (not the median:
  "most heads" is the second level).
- share5_post reaches claims.SHARE_LEVEL (0.5, C1's level: most heads have a lambda=5 dim after
  RoPE).
- For RoPE and NoPE separately, at each model size: the tokens where the fitted law first reaches
  the level; None when the slope b <= 0 (the law does not rise with tokens: reported as such) or
  beyond HORIZON tokens. Its interval: percentiles of the bootstrap replicates' onsets, a replicate
  that never reaches counting as beyond every finite value (an upper bound of None: not reached).

Testing a fit on another run (--predict FIT; PREDICTION_RULE, written down before any tested run was
trained): a new arm is one more draw of an arm, so its value at (params, tokens) is predicted inside
the law's bootstrap band widened by Z_PRED times resid_sd, the standard deviation over the fitted
arms of their residual at their last checkpoint (the arm-to-arm spread that the band of the mean
leaves out). Every traced checkpoint of the new run is compared; the verdict reads each arm's last
checkpoint: the law holds for a kind and statistic when every such arm is inside, and fails otherwise
(an arm above says concentration grows faster than the law; below, slower).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os

import jax
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
import numpy as np  # noqa: E402

from analysis.massive import claims as CL  # noqa: E402
from analysis.massive import pipeline as PL  # noqa: E402
from analysis.massive import stats as S  # noqa: E402
from analysis.massive import store as ST  # noqa: E402
from minilm import atomic, encodings, hooks  # noqa: E402
from minilm.paths import portable_tree  # noqa: E402
from minilm.schema import ConfigError, check, to_dict  # noqa: E402
from train import checkpoints as ck  # noqa: E402

LAMS = (3.0, 4.0, 5.0)
LAMBDA = 5.0
FITTED = {"pair_max_mean": LAMBDA, "share5_post": CL.SHARE_LEVEL}
"""Fitted statistic -> the level its onset is read at (RULE)."""
KINDS = ("rope", "nope")
HORIZON = 1e12
"""Tokens beyond which an onset is reported as not reached: past any run this lab can make."""
N_BOOT = 2000
BOOT_SEED = 0
LAW = "y = a + b * log2(tokens) + c * log2(params)"
RESAMPLED = ("arms of the kind, with replacement (each arm: one run = one seed x size x context, all its "
             "checkpoints with tokens > 0); replicates spanning one model size when the fit has several are dropped")
RULE = (f"onset at model size N: the tokens where the fitted law first reaches its level: pair_max_mean "
        f"(head-mean Q/K max/mean per rotary pair) reaches lambda={LAMBDA:g} (a head above it has a lambda dim "
        f"at every point, since per-dim max/mean >= per-pair max/mean); share5_post (share of Q/K heads with a "
        f"lambda=5 dim after RoPE) reaches {CL.SHARE_LEVEL:g} (C1's level); None if the slope b <= 0 or beyond "
        f"{HORIZON:.0e} tokens; RoPE and NoPE separately")
Z_PRED = 1.96
PREDICTION_RULE = (f"a new arm's last checkpoint is predicted inside the fitted law's 95% bootstrap band widened by "
                   f"{Z_PRED} x resid_sd (SD over the fitted arms of their last-checkpoint residual); the law holds "
                   f"for a kind and statistic when every new arm is inside, fails when one is outside, and is "
                   f"inconclusive when an arm cannot be placed (a non-finite value or interval, e.g. a law fitted "
                   f"on one arm); arms of a kind without a law are listed as untested")
TENSORS = {"pre": ("q", "k"), "post": CL.QK, "pair": ("q", "k")}
"""Pair norms are the same on q and rot_q, so the pair point reads the unrotated tensors."""


def _heads(sums, facts, tensors, cfg, only) -> dict:
  """{stat: values [heads of every layer of `tensors`]} of S.head_stats."""
  pairing = ST.pairing_of(facts)
  per = [S.head_stats(np.sqrt(sums[hooks.name(l, t)].astype(np.float64).sum(0)), pairing, facts["context"], cfg, only)
         for l in range(facts["n_layers"]) for t in tensors]
  return {k: np.concatenate([p[k] for p in per]) for k in only}


def step_stats(sums: dict, facts: dict, cfg: S.StatConfig) -> dict:
  """The table's statistics of one (arm, step), plus '_profile': the head-mean share of pair energy
  per pair j of rot_q/rot_k [P]."""
  row = {}
  for point in CL.POINTS:
    pre = "pair_" if point == "pair" else ""
    h = _heads(sums, facts, TENSORS[point], cfg, (f"{pre}max_mean", f"{pre}massive"))
    row.update({f"{point}_max_mean": h[f"{pre}max_mean"].mean(), f"{point}_massive": h[f"{pre}massive"].mean()})
    for lam in LAMS:
      share = _heads(sums, facts, TENSORS[point], dataclasses.replace(cfg, lam=lam), (f"{pre}any_massive",))
      row[f"share{lam:g}_{point}"] = share[f"{pre}any_massive"].mean()
  h = _heads(sums, facts, CL.QK, cfg, ("lf_share", "band_share", "peak_pair", "peak_minus_ctx"))
  pairing = ST.pairing_of(facts)
  rope = pairing.is_rope
  E_HxP = np.concatenate([S.pair_energy(np.sqrt(sums[hooks.name(l, t)].astype(np.float64).sum(0)), pairing.pair_index)
                          for l in range(facts["n_layers"]) for t in CL.QK])
  return {**row, "lf_share": h["lf_share"].mean(), "band_share": h["band_share"].mean(),
          "peak_pair": h["peak_pair"].mean() if rope else None,
          "j_ctx": S.context_pair(pairing.theta, facts["context"]) if rope else None,
          "peak_minus_ctx": h["peak_minus_ctx"].mean() if rope else None,
          "_profile": (E_HxP / np.maximum(E_HxP.sum(-1, keepdims=True), 1e-300)).mean(0)}


def table(trace_dir: str, run_dir: str | None = None) -> list[dict]:
  """One row per traced arm x step (see the module docstring)."""
  store = ST.Store(trace_dir)
  try:
    meta = store.meta()
  except ValueError:   # a meta.json that is not JSON
    meta = {}
  check("arms" in meta and os.path.exists(store.path("summary.json")), "trace_dir",
        f"{trace_dir} is not a traced directory (no meta.json with arms and summary.json); run `python -m analysis "
        "trace` first")
  kinds = sorted({f["position"] for f in meta["arms"].values()})
  check(bool(set(KINDS) & set(kinds)), "trace_dir", f"{trace_dir} holds arms of kind {', '.join(kinds)}; the onset "
        f"fit needs arms of kind {' or '.join(map(repr, KINDS))}")
  run_dir = run_dir or meta.get("run_dir", "")
  configs = {}
  for arm, facts in meta["arms"].items():   # every input checked before any statistic is computed
    check(os.path.exists(os.path.join(run_dir, arm, "config.json")), "--run-dir", f"{run_dir or '(none recorded)'} "
          f"has no {arm}/config.json; pass the run the trace was made from (each arm's TrainConfig is read there)")
    configs[arm] = ck.load_config(os.path.join(run_dir, arm))
    # its token counts and scores would be another training's
    check(PL.same_training(facts, configs[arm]), "--run-dir",
          f"{run_dir}/{arm} is not the training the trace was made from (its seed or settings differ from those "
          "meta.json records); pass the run the trace was made from")
  cfg, rows, params = ST.stat_config(meta), [], {}
  for arm, facts in meta["arms"].items():
    arm_dir, tc = os.path.join(run_dir, arm), configs[arm]
    key = json.dumps(to_dict(tc.model), sort_keys=True)
    if key not in params:   # eval_shape only: no weights are allocated
      params[key] = sum(x.size for x in jax.tree.leaves(ck.abstract_model(tc.model)[1]))
    evals = {r["step"]: r for _, r in atomic.read_jsonl(os.path.join(arm_dir, "eval.jsonl"))[0]}
    for step in store.steps(arm):
      scores = {f"eval_{k}": v for k, v in evals.get(step, {}).items()
                if k != "step" and "." not in k and isinstance(v, (int, float))}
      rows.append({"arm": arm, "kind": facts["position"], "params": params[key], "d_model": tc.model.d_model,
                   "n_layers": tc.model.n_layers, "context": tc.data.seq_len, "seed": tc.seed, "step": step,
                   "tokens": step * tc.data.batch_size * tc.data.seq_len,
                   **step_stats(store.load_sums(arm, step), facts, cfg), **scores})
  return rows


# ------------------------------------------------------------------------------------------ the law

@dataclasses.dataclass
class Fit:
  """The law of one statistic in one kind: coef (a, b, c), their intervals, the bootstrap coefs."""
  kind: str
  stat: str
  coef: np.ndarray           # [3] a, b, c
  boot: np.ndarray           # [n_kept, 3]
  n_arms: int
  n_points: int
  n_sizes: int
  dropped: int = 0
  note: str = ""
  resid_sd: float = math.nan  # SD over arms of the residual at each arm's last checkpoint (PREDICTION_RULE)
  excluded: int = 0           # checkpoints of the kind left out for a missing or non-finite value

  def ci(self) -> np.ndarray:
    """[3, 2] 95% percentile intervals of a, b, c."""
    return np.quantile(self.boot, [0.025, 0.975], axis=0).T if len(self.boot) else np.full((3, 2), np.nan)


def _solve(rows: list[dict], stat: str, with_c: bool) -> np.ndarray:
  """Least-squares (a, b, c) of `stat` on log2 tokens and log2 params (c = 0 when not with_c)."""
  X = np.stack([np.ones(len(rows)), np.log2([r["tokens"] for r in rows]),
                *([np.log2([r["params"] for r in rows])] if with_c else [])], 1)
  coef = np.linalg.lstsq(X, np.array([r[stat] for r in rows], np.float64), rcond=None)[0]
  return coef if with_c else np.append(coef, 0.0)


def fit_law(rows: list[dict], kind: str, stat: str, n_boot: int = N_BOOT, seed: int = BOOT_SEED) -> Fit | None:
  """The law of `stat` over the checkpoints of `kind` with tokens > 0, arms resampled (RESAMPLED);
  None with fewer than two token counts."""
  mine = [r for r in rows if r["kind"] == kind and r["tokens"] > 0]
  rows = [r for r in mine if r[stat] is not None and np.isfinite(r[stat])]
  arms = sorted({r["arm"] for r in rows})
  if len({r["tokens"] for r in rows}) < 2:
    return None
  by_arm = {a: [r for r in rows if r["arm"] == a] for a in arms}
  n_sizes = len({r["params"] for r in rows})
  boot, rng = [], np.random.default_rng(seed)
  for _ in range(n_boot):
    pick = [r for i in rng.integers(0, len(arms), len(arms)) for r in by_arm[arms[i]]]
    if n_sizes == 1 or len({r["params"] for r in pick}) > 1:
      boot.append(_solve(pick, stat, n_sizes > 1))
  coef = _solve(rows, stat, n_sizes > 1)
  last = [max(by_arm[a], key=lambda r: r["tokens"]) for a in arms]
  resid = [r[stat] - (coef[0] + coef[1] * math.log2(r["tokens"]) + coef[2] * math.log2(r["params"])) for r in last]
  notes = ([] if n_sizes > 1 else ["one model size: c not identified, fixed at 0"]) + (
      [f"no variation: every value is {rows[0][stat]:g}, so the law is that constant"]
      if len({r[stat] for r in rows}) == 1 else [])
  return Fit(kind, stat, coef, np.array(boot).reshape(-1, 3), len(arms), len(rows), n_sizes, n_boot - len(boot),
             "; ".join(notes), float(np.std(resid, ddof=1)) if len(resid) > 1 else math.nan, len(mine) - len(rows))


def predict(fit: Fit, params, tokens, coef=None):
  """The law at (params, tokens) (arrays broadcast); `coef` [..., 3] replaces fit.coef (replicates)."""
  a, b, c = np.moveaxis(np.asarray(fit.coef if coef is None else coef, np.float64), -1, 0)
  return a + b * np.log2(tokens) + c * np.log2(params)


def band(fit: Fit, params, tokens) -> tuple[np.ndarray, np.ndarray]:
  """95% percentile band of the law at (params, tokens [T]) over the bootstrap replicates."""
  reps = predict(fit, params, np.asarray(tokens, np.float64)[None], fit.boot[:, None, :])
  return tuple(np.quantile(reps, [0.025, 0.975], axis=0))


def interval(fit: Fit, params, tokens) -> tuple[np.ndarray, np.ndarray]:
  """PREDICTION_RULE's interval for one new arm at (params, tokens [T]): band() widened by Z_PRED x resid_sd."""
  lo, hi = band(fit, params, tokens)
  return lo - Z_PRED * fit.resid_sd, hi + Z_PRED * fit.resid_sd


def check_prediction(rows: list[dict], fits: list[Fit]) -> dict:
  """Every checkpoint (tokens > 0) of `rows` (another run's table) against the law of its kind and
  statistic in `fits`, and the verdict per kind and statistic (PREDICTION_RULE)."""
  points, verdicts = [], []
  for fit in fits:
    mine = [r for r in rows if r["kind"] == fit.kind and r["tokens"] > 0 and r.get(fit.stat) is not None]
    last = {a: max(r["tokens"] for r in mine if r["arm"] == a) for a in {r["arm"] for r in mine}}
    for r in mine:
      lo, hi = interval(fit, r["params"], [r["tokens"]])
      if not np.isfinite([lo[0], hi[0], r[fit.stat]]).all():   # e.g. a law fitted on one arm: no resid_sd
        side = "untestable"
      else:
        side = "inside" if lo[0] <= r[fit.stat] <= hi[0] else "above" if r[fit.stat] > hi[0] else "below"
      points.append({"arm": r["arm"], "kind": fit.kind, "stat": fit.stat, "params": r["params"], "tokens": r["tokens"],
                     "last": r["tokens"] == last[r["arm"]], "measured": r[fit.stat],
                     "predicted": float(predict(fit, r["params"], r["tokens"])),
                     "interval": [float(lo[0]), float(hi[0])], "side": side, "inside": side == "inside"})
    ends = [p for p in points if p["last"] and (p["kind"], p["stat"]) == (fit.kind, fit.stat)]
    if ends:
      sides = {p["arm"]: p["side"] for p in ends}
      verdicts.append({"kind": fit.kind, "stat": fit.stat, "arms": len(ends), "sides": sides,
                       "verdict": "fails" if {"above", "below"} & set(sides.values()) else
                                  "inconclusive" if "untestable" in sides.values() else "holds"})
  unfitted = sorted({r["kind"] for r in rows} - {f.kind for f in fits})
  return {"rule": PREDICTION_RULE, "verdicts": verdicts, "points": points,
          "untested": {k: sorted({r["arm"] for r in rows if r["kind"] == k}) for k in unfitted}}


def _onset(coef, params: float, level: float, horizon: float) -> float:
  """Tokens where the law `coef` reaches `level` (inf: never within the horizon, or slope <= 0)."""
  a, b, c = coef
  if not b > 0:
    return math.inf
  with np.errstate(over="ignore"):
    tokens = float(np.exp2((level - a - c * math.log2(params)) / b))
  return tokens if tokens <= horizon else math.inf


def reach(fit: Fit, params: float, level: float, horizon: float = HORIZON) -> tuple[float | None, str]:
  """(tokens at which the fit reaches `level` at `params`, or None; why None)."""
  b = float(fit.coef[1])
  if not b > 0:
    return None, f"slope b = {b:.3g} <= 0: the fitted {fit.stat} does not rise with tokens"
  tokens = _onset(fit.coef, params, level, horizon)
  return (None, f"not within the horizon of {horizon:.0e} tokens") if math.isinf(tokens) else (tokens, "")


def onset(fit: Fit, params: float, level: float, horizon: float = HORIZON) -> dict:
  """reach() with its bootstrap interval (None for a bound beyond the horizon)."""
  tokens, why = reach(fit, params, level, horizon)
  reps = np.array([_onset(c, params, level, horizon) for c in fit.boot])
  ci = np.quantile(reps, [0.025, 0.975], method="inverted_cdf") if len(reps) else [math.inf] * 2
  return {"params": int(params), "level": level, "tokens": tokens, "why": why,
          "ci": [None if math.isinf(x) else float(x) for x in ci],
          "replicates_reaching": float(np.isfinite(reps).mean()) if len(reps) else None}


def fit_dict(fit: Fit, sizes, horizon: float = HORIZON) -> dict:
  return {"kind": fit.kind, "stat": fit.stat, "level": FITTED[fit.stat], "law": LAW,
          "coef": dict(zip("abc", map(float, fit.coef))), "ci": dict(zip("abc", fit.ci().tolist())),
          "n_arms": fit.n_arms, "n_points": fit.n_points, "n_sizes": fit.n_sizes, "n_boot_kept": len(fit.boot),
          "n_boot_dropped": fit.dropped, "note": fit.note, "resid_sd": None if math.isnan(fit.resid_sd) else fit.resid_sd,
          "n_excluded": fit.excluded, "boot": np.round(fit.boot, 6).tolist(),
          "onset": [onset(fit, n, FITTED[fit.stat], horizon) for n in sizes]}


def load_fits(path: str) -> list[Fit]:
  """The fits of a fit.json (to predict another run from them); any other file is a one-line
  ConfigError naming --predict."""
  given = f"{path} is not a fit.json of `python -m analysis onset`"
  data = atomic.parse_json(path, lambda why: ConfigError(f"--predict: {given} (not valid JSON: {why})"))
  check(isinstance(data, dict) and "fits" in data, "--predict", f"{given} (no 'fits')")
  try:
    fits = [Fit(d["kind"], d["stat"], np.array([d["coef"][k] for k in "abc"], np.float64),
                np.array(d["boot"], np.float64).reshape(-1, 3), d["n_arms"], d["n_points"], d["n_sizes"],
                d["n_boot_dropped"], d["note"], math.nan if d.get("resid_sd") is None else d["resid_sd"],
                d.get("n_excluded", 0))
            for d in data["fits"]]
  except (KeyError, TypeError, ValueError) as err:   # a fit without a field, or not of numbers
    raise ConfigError(f"--predict: {given} (a fit is missing a field or holds a wrong value: {err})") from None
  check(bool(fits), "--predict", f"{path} holds no fit (see its not_fitted), so there is no law to test")
  return fits


# ---------------------------------------------------------------------------------------- outputs

def _size_label(params: int) -> str:
  return f"{params / 1e6:.2f}M"


def concentration_figure(rows: list[dict], fits: list[Fit], path: str) -> None:
  """FITTED statistics against tokens, one panel per statistic x kind: each arm's checkpoints (colour:
  size, marker: context), the law at each model size with its bootstrap band, and the onset level."""
  kinds = sorted({f.kind for f in fits})
  sizes = sorted({r["params"] for r in rows})
  colors = dict(zip(sizes, plt.cm.viridis(np.linspace(0, 0.9, len(sizes)))))
  markers = dict(zip(sorted({r["context"] for r in rows}), "os^vD<>"))
  fig, axes = plt.subplots(len(FITTED), max(len(kinds), 1), figsize=(4.4 * max(len(kinds), 1), 3.4 * len(FITTED)),
                           squeeze=False, layout="constrained")
  for r, (stat, level) in enumerate(FITTED.items()):
    for c, kind in enumerate(kinds):
      ax, fit = axes[r, c], next((f for f in fits if (f.kind, f.stat) == (kind, stat)), None)
      pts = [x for x in rows if x["kind"] == kind and x["tokens"] > 0]
      for arm in sorted({x["arm"] for x in pts}):
        mine = [x for x in pts if x["arm"] == arm]
        ax.plot([x["tokens"] for x in mine], [x[stat] for x in mine], markers.get(mine[0]["context"], "o"), ms=3,
                alpha=0.7, color=colors[mine[0]["params"]])
      grid = np.geomspace(min(x["tokens"] for x in pts), max(x["tokens"] for x in pts), 50) if pts else []
      for n in sorted({x["params"] for x in pts}) if fit else ():
        ax.plot(grid, predict(fit, n, grid), color=colors[n], label=f"N={_size_label(n)}")
        if len(fit.boot):
          ax.fill_between(grid, *band(fit, n, grid), color=colors[n], alpha=0.15, linewidth=0)
      ax.axhline(level, color="red", lw=0.8, ls="-.", label=f"onset level {level:g}")
      ax.set_xscale("log")
      ax.set_title(f"{kind}: {stat}" + (f" (b={fit.coef[1]:.3g}, c={fit.coef[2]:.3g})" if fit else " (no fit)"),
                   fontsize=9)
      ax.set_xlabel("tokens seen (log)")
      ax.legend(fontsize=6)
  contexts = ", ".join(f"{m} context {c}" for c, m in markers.items())
  fig.suptitle(f"Concentration against tokens per kind and size (colour: params; {contexts})\nlaw {LAW}; "
               "95% band: arms resampled", fontsize=9)
  atomic.savefig(fig, path, dpi=100)
  plt.close(fig)


def profile_figure(rows: list[dict], path: str) -> bool:
  """Head-mean share of rot_q/rot_k pair energy against j - j_ctx, one curve per checkpoint coloured
  by step, one panel per RoPE arm; False when there is no RoPE arm."""
  arms = sorted({r["arm"] for r in rows if r["j_ctx"] is not None})
  if not arms:
    return False
  cols = min(len(arms), 4)
  fig, axes = plt.subplots(-(-len(arms) // cols), cols, figsize=(3.6 * cols + 1, 2.8 * -(-len(arms) // cols)),
                           squeeze=False, sharey=True, layout="constrained")
  steps = plt.cm.ScalarMappable(matplotlib.colors.LogNorm(1, max(max(r["step"] for r in rows), 2)), "viridis")
  for ax, arm in zip(axes.flat, arms):
    for r in (r for r in rows if r["arm"] == arm):
      ax.plot(np.arange(len(r["_profile"])) - r["j_ctx"], r["_profile"], lw=1, color=steps.to_rgba(max(r["step"], 1)))
    ax.axvline(0, color="k", lw=0.8, label="j_ctx: first wavelength > context")
    ax.set_title(arm, fontsize=8)
    ax.set_xlabel("pair j - j_ctx (low frequency to the right)", fontsize=7)
  for ax in axes.flat[len(arms):]:
    ax.axis("off")
  axes[0, 0].set_ylabel("share of pair energy (head mean)")
  axes[0, 0].legend(fontsize=6)
  fig.colorbar(steps, ax=axes, fraction=0.03, label="step (log; 0 drawn as 1)")
  fig.suptitle("rot_q/rot_k pair energy against the context-boundary pair over training", fontsize=9)
  atomic.savefig(fig, path, dpi=100)
  plt.close(fig)
  return True


def scores_figure(rows: list[dict], path: str) -> bool:
  """Held-out task scores against tokens, one panel per task family, one line per arm (colour: kind,
  width: size); False when no checkpoint has a score."""
  families = sorted({k[len("eval_"):] for r in rows for k in r if k.startswith("eval_")})
  if not families:
    return False
  kinds = sorted({r["kind"] for r in rows})
  known = list(encodings.REGISTRY)   # one colour per encoding, the same in every run's figure
  colors = {k: plt.cm.tab10(known.index(k) % 10 if k in known else 9) for k in kinds}
  sizes = sorted({r["params"] for r in rows})
  fig, axes = plt.subplots(1, len(families), figsize=(3.4 * len(families), 3), squeeze=False, sharey=True,
                           layout="constrained")
  for ax, family in zip(axes[0], families):
    for arm in sorted({r["arm"] for r in rows}):
      mine = [r for r in rows if r["arm"] == arm and r["tokens"] > 0 and f"eval_{family}" in r]
      if mine:
        ax.plot([r["tokens"] for r in mine], [r[f"eval_{family}"] for r in mine], "-o", ms=2, alpha=0.7,
                lw=0.6 + 1.2 * sizes.index(mine[0]["params"]) / max(len(sizes) - 1, 1), color=colors[mine[0]["kind"]])
    ax.set_xscale("log")
    ax.set_title(family, fontsize=9)
    ax.set_xlabel("tokens seen (log)", fontsize=8)
  axes[0, 0].set_ylabel("held-out exact match")
  axes[0, 0].legend(handles=[matplotlib.lines.Line2D([], [], color=colors[k], label=k) for k in kinds], fontsize=7)
  fig.suptitle("Held-out task scores at each scored checkpoint (line width: model size)", fontsize=9)
  atomic.savefig(fig, path, dpi=100)
  plt.close(fig)
  return True


OUTPUTS = ("fit.json", "onset_table.csv", "concentration.png", "pair_profile.png", "scores.png", "prediction.json")
"""What an onset output folder holds, its own mark first (`write`, and prediction.json with --predict)."""


def write(rows: list[dict], out: str, *, sizes=(), n_boot: int = N_BOOT, horizon: float = HORIZON,
          source: dict | None = None) -> dict:
  """onset_table.csv, fit.json, concentration.png, pair_profile.png and scores.png (when checkpoints have
  held-out scores) into `out` (an existing folder)."""
  columns = list(dict.fromkeys(k for r in rows for k in r if not k.startswith("_")))
  ST.write_rows(os.path.join(out, "onset_table.csv"), [{k: r.get(k) for k in columns} for r in rows], columns)
  fits = [f for kind in sorted({r["kind"] for r in rows}) for stat in FITTED
          if (f := fit_law(rows, kind, stat, n_boot)) is not None]
  wanted = sorted({r["params"] for r in rows} | {int(n) for n in sizes})
  data = {"law": LAW, "rule": RULE, "resampled": RESAMPLED, "level": 0.95, "n_boot": n_boot, "seed": BOOT_SEED,
          "horizon": horizon, "levels": FITTED, "source": source or {},
          "not_fitted": [f"{kind}/{stat}: fewer than two token counts" for kind in sorted({r["kind"] for r in rows})
                         for stat in FITTED if not any((f.kind, f.stat) == (kind, stat) for f in fits)],
          "fits": [fit_dict(f, wanted, horizon) for f in fits], "observed": observed(rows)}
  atomic.write_json(os.path.join(out, "fit.json"), data)
  concentration_figure(rows, fits, os.path.join(out, "concentration.png"))
  profile_figure(rows, os.path.join(out, "pair_profile.png"))
  scores_figure(rows, os.path.join(out, "scores.png"))
  return data


def observed(rows: list[dict]) -> list[dict]:
  """Per kind and fitted statistic, the onset in the data itself: each arm's first checkpoint at or
  above the level (None: not in its checkpoints), beside the law's, which extrapolates."""
  out = []
  for kind in sorted({r["kind"] for r in rows}):
    for stat, level in FITTED.items():
      arms = sorted({r["arm"] for r in rows if r["kind"] == kind})
      first = {a: min((r["tokens"] for r in rows if r["arm"] == a and r.get(stat) is not None and r[stat] >= level),
                      default=None) for a in arms}
      out.append({"kind": kind, "stat": stat, "level": level, "first_tokens": first})
  return out


def summary_lines(data: dict) -> list[str]:
  """The onsets in words, RoPE and NoPE (every fitted kind), and what the checkpoints themselves show."""
  out = []
  for o in data.get("observed", []):
    reached = {a: t for a, t in o["first_tokens"].items() if t is not None}
    out.append(f"{o['kind']}: {o['stat']} at or above {o['level']:g} in the checkpoints of {len(reached)} of "
               f"{len(o['first_tokens'])} arms" + (f" (first at {min(reached.values()):.3g} tokens)" if reached else ""))
  for f in data["fits"]:
    for o in f["onset"]:
      ci = ", ".join("beyond horizon" if x is None else f"{x:.3g}" for x in o["ci"])
      when = (f"reaches {o['level']:g} at {o['tokens']:.3g} tokens [{ci}]" if o["tokens"] is not None else
              f"does not reach {o['level']:g}: {o['why']}")
      out.append(f"{f['kind']} N={_size_label(o['params'])}: {f['stat']} {when}; b={f['coef']['b']:.3g} "
                 f"[{f['ci']['b'][0]:.3g}, {f['ci']['b'][1]:.3g}], {f['n_arms']} arms")
  return out


def prediction_lines(tested: dict) -> list[str]:
  """check_prediction's verdicts and each arm's last checkpoint in words."""
  out = []
  for v in tested["verdicts"]:
    out.append(f"prediction {v['kind']} {v['stat']}: the law {v['verdict']} ({v['arms']} arms)")
    for p in (p for p in tested["points"] if p["last"] and (p["kind"], p["stat"]) == (v["kind"], v["stat"])):
      out.append(f"  {p['arm']} at {p['tokens']:.3g} tokens: measured {p['measured']:.3g}, predicted "
                 f"{p['predicted']:.3g} [{p['interval'][0]:.3g}, {p['interval'][1]:.3g}]: {p['side']}")
  for kind, arms in tested.get("untested", {}).items():
    out.append(f"prediction {kind}: untested, no law of this kind in the fit ({', '.join(arms)})")
  return out


@dataclasses.dataclass(frozen=True)
class OnsetStudy:
  """An onset study: every option of `python -m analysis onset` but --out (the flag of a field is its
  name: n_boot is --n-boot). `check` validates it without reading the store."""
  trace_dir: str                             # a traced directory (python -m analysis trace / minilm-lab)
  run_dir: str | None = None                 # the run it was traced from (None: recorded in meta.json)
  params: tuple[float, ...] = ()             # extra model sizes to give onsets for
  n_boot: int = N_BOOT                       # bootstrap replicates of each fit
  predict: str | None = None                 # a fit.json of another run: test its law on this one
  horizon: float = HORIZON                   # tokens beyond which an onset is None

  def check(self) -> None:
    check(os.path.isdir(self.trace_dir), "trace_dir", f"{self.trace_dir} is not a directory; give a folder written "
          "by `python -m analysis trace`")
    check(self.n_boot >= 1, "--n-boot", f"must be >= 1; got {self.n_boot}")
    check(self.horizon > 0 and all(n > 0 for n in self.params), "--horizon/--params", "must be > 0")
    check(self.predict is None or os.path.isfile(self.predict), "--predict", f"{self.predict} is not a file; give "
          "the fit.json of an earlier `python -m analysis onset`")


def add_arguments(p) -> None:
  d = OnsetStudy("")
  p.add_argument("trace_dir", help="a traced directory (python -m analysis trace / minilm-lab)")
  p.add_argument("--out", required=True, help="output folder (written whole, replacing an earlier one)")
  p.add_argument("--run-dir", default=d.run_dir, help="the run it was traced from (default: recorded in meta.json)")
  p.add_argument("--params", type=float, nargs="*", default=d.params, help="extra model sizes to give onsets for")
  p.add_argument("--n-boot", type=int, default=d.n_boot, help=f"bootstrap replicates (default {d.n_boot})")
  p.add_argument("--predict", default=d.predict, metavar="FIT", help="a fit.json of another run: test its law on "
                 "this one (PREDICTION_RULE) into prediction.json")
  p.add_argument("--horizon", type=float, default=d.horizon, help=f"tokens beyond which an onset is None "
                 f"(default {d.horizon:.0e})")


def study_from_args(args) -> OnsetStudy:
  return OnsetStudy(args.trace_dir, args.run_dir, tuple(args.params), args.n_boot, args.predict, args.horizon)


def run(cfg: OnsetStudy, out: str) -> tuple[dict, dict | None]:
  """The study into `out` (staged: a failure leaves an earlier `out` as it was); (fit.json's data,
  prediction.json's data or None)."""
  cfg.check()
  atomic.check_out_dir(out)
  fits = load_fits(cfg.predict) if cfg.predict else []
  rows = table(cfg.trace_dir, cfg.run_dir)
  with atomic.staged_dir(out, owns=OUTPUTS) as staging:
    data = write(rows, staging, sizes=cfg.params, n_boot=cfg.n_boot, horizon=cfg.horizon,
                 source=portable_tree({"trace_dir": cfg.trace_dir, "run_dir": cfg.run_dir, "predict": cfg.predict}))
    tested = check_prediction(rows, fits) if fits else None
    if tested:
      atomic.write_json(os.path.join(staging, "prediction.json"), tested)
  return data, tested


def run_and_print(args) -> None:
  """`python -m analysis onset`: the study of the parsed arguments, run into --out."""
  data, tested = run(study_from_args(args), args.out)
  print("\n".join(summary_lines(data) + (prediction_lines(tested) if tested else []) + [f"wrote {args.out}"]))
