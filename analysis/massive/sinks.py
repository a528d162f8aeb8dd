"""Attention sinks and massive residual activations, beside the Q/K statistics of the same trace.

Device part (inside the trace's jitted forward, `device_stats`): per prompt and layer, the share of
attention every head puts on the first token (the 'sink' capture point) and the RESID_TOP largest
|x| of the block output (the 'resid' point) with their tokens and feature dims, and the median |x|.
Host part: per (arm, step) and layer, sink shares per head, residual massive activations (Sun et al.
2024, "Massive Activations in Large Language Models": |x| > resid_abs and > resid_ratio x the median
|x| of the layer's hidden states; the scale-free form drops the absolute floor), and the pre-registered
test of whether heads with massive Q/K dims are sink heads (RULE). Definitions: docs/claims.md.

Files in a trace store (analysis.massive.trace.Store):
  sinks/<arm>/<step>.npz     '<layer>.sink' [N, H]; '<layer>.resid_top', 'resid_tok', 'resid_dim' [N, K]
                             (values, token positions, feature dims of the K largest |x|);
                             '<layer>.resid_median' [N]
  sinks.csv                  one row per arm x step x layer x head: sink share, Q/K max/mean
  resid.csv                  one row per arm x step x layer: residual massive activations
  sinks.json                 the same with 95% bootstrap intervals, the association per step, verdicts
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from scipy.stats import rankdata

from analysis.massive import stats as S
from analysis.massive.store import pairing_of, write_rows
from minilm import hooks

POINTS = ("sink", "resid")
"""Capture points the device part reads."""
FIELDS = ("sink", "resid_top", "resid_tok", "resid_dim", "resid_median")
"""Per-layer keys '<layer>.<field>' of a sinks file."""
RESID_TOP = 16
"""Largest-|x| entries kept per prompt and layer: Sun et al. find a handful (< 10) per layer, so a
count that reaches RESID_TOP reads 'at least'."""
PATTERN_TOKENS = 32
"""Attention patterns of probe 0 are kept for the first this many queries and keys."""
SINK_LEVEL = 0.5
"""A sink head puts at least this share of its attention (queries 1..T-1) on the first token."""
RULE = ("Sink share of a head: its attention on the first token, averaged over the query positions "
        "1..T-1 (query 0 can attend only to itself) and over the prompts; a sink head has sink share >= "
        f"{SINK_LEVEL}. Association: Spearman rank correlation over every query head of every layer, at "
        "the arm's last step, between the sink share and the head's max/mean of M[h, d] (per dim, after "
        "RoPE: rot_q of head h, and separately rot_k of the KV head h reads), 95% bootstrap over prompts "
        "(M and sink shares from the same resampled prompts) and heads (head pairs resampled), "
        f"seed {S.BOOT_SEED}. 'massive Q/K heads are sink heads' is supported if the rho CI lower bound > 0 "
        "for rot_q and for rot_k; opposite if the rho CI upper bound < 0 for both; inconclusive otherwise "
        "(including a rho that cannot be computed: fewer than 3 heads or constant values)")


# ---------------------------------------------------------------------------------- device part

def device_stats(cache, mask_BxT) -> dict:
  """{'sink': [L, B, H], 'resid_top'/'resid_tok'/'resid_dim': [L, B, K], 'resid_median': [L, B]} from
  a capture of POINTS; mask_BxT is 1 on the tokens counted (queries for the sink share; tokens of the
  residual statistics)."""
  mask = jnp.asarray(mask_BxT, jnp.float32)
  queries_BxT = mask.at[:, 0].set(0.0)   # query 0 sees only itself: share 1 whatever the head does
  sink_LxBxHxT = cache.stack("sink").astype(jnp.float32)
  sink_LxBxH = jnp.einsum("lbht,bt->lbh", sink_LxBxHxT, queries_BxT) / jnp.maximum(
      queries_BxT.sum(-1), 1.0)[None, :, None]
  resid = jax.vmap(lambda r: resid_top(r, mask))(cache.stack("resid"))
  return {"sink": sink_LxBxH, **resid}


def resid_top(resid_BxTxC, mask_BxT, k: int = RESID_TOP) -> dict:
  """The k largest |x| of each prompt's block output (signed values, token positions, feature dims)
  and the median |x| over its counted tokens and every dim."""
  B, T, C = resid_BxTxC.shape
  x_BxTC = resid_BxTxC.astype(jnp.float32).reshape(B, T * C)
  counted_BxTC = jnp.repeat(mask_BxT > 0, C, axis=1)
  mag_BxTC = jnp.abs(x_BxTC)
  _, idx_Bxk = jax.lax.top_k(jnp.where(counted_BxTC, mag_BxTC, -1.0), k)
  return {"resid_top": jnp.take_along_axis(x_BxTC, idx_Bxk, axis=1),
          "resid_tok": (idx_Bxk // C).astype(jnp.int32), "resid_dim": (idx_Bxk % C).astype(jnp.int32),
          "resid_median": median_nonneg(jnp.where(counted_BxTC, mag_BxTC, jnp.inf))}


def median_nonneg(x_BxN):
  """Median of each row of non-negative float32 values, +inf marking entries left out (NaN for a
  row with none): the two middle order statistics found exactly by bisection on the float bits
  (which order non-negative floats as integers), 31 counting passes instead of XLA:CPU's sort,
  which made the median most of the trace's capture time."""
  n_B = jnp.isfinite(x_BxN).sum(-1)
  bits_BxN = jax.lax.bitcast_convert_type(x_BxN, jnp.int32)

  def kth(k_B):   # the smallest v with count(x <= v) > k: the k-th smallest value (0-based)
    def halve(_, bounds):
      lo, hi = bounds
      mid = lo + (hi - lo) // 2
      enough = (bits_BxN <= mid[:, None]).sum(-1) > k_B
      return jnp.where(enough, lo, mid + 1), jnp.where(enough, mid, hi)
    lo = jnp.zeros_like(k_B)
    lo, _ = jax.lax.fori_loop(0, 31, halve, (lo, jnp.full_like(k_B, 0x7F800000)))
    return jax.lax.bitcast_convert_type(lo, jnp.float32)

  low, high = kth(jnp.maximum(n_B - 1, 0) // 2), kth(n_B // 2)
  return jnp.where(n_B > 0, low + (high - low) * 0.5, jnp.nan)


def patterns(probs_LxBxHxTxS) -> np.ndarray:
  """Attention of prompt 0 on its first PATTERN_TOKENS queries and keys: [L, H, P, P] float16."""
  P = PATTERN_TOKENS
  return np.asarray(probs_LxBxHxTxS[:, 0, :, :P, :P]).astype(np.float16)


# ------------------------------------------------------------------------------ host statistics

def uniform_share(mask_NxT) -> float:
  """The sink share of a head attending uniformly to the visible keys: query t puts 1/(t+1) on the
  first token; averaged as the sink share is (queries 1..T-1 counted, then prompts)."""
  mask = np.asarray(mask_NxT, np.float64).copy()
  mask[:, 0] = 0
  per_query = 1.0 / (np.arange(mask.shape[1]) + 1.0)
  return float(((mask * per_query).sum(1) / np.maximum(mask.sum(1), 1)).mean())


def spearman(x_RxU, y_RxU) -> np.ndarray:
  """Spearman rank correlation along the last axis (ties take average ranks); NaN when either side
  is constant or has fewer than 3 units."""
  x, y = np.atleast_2d(x_RxU), np.atleast_2d(y_RxU)
  if x.shape[-1] < 3:
    return np.full(x.shape[:-1], np.nan)
  rx, ry = rankdata(x, axis=-1), rankdata(y, axis=-1)
  rx, ry = rx - rx.mean(-1, keepdims=True), ry - ry.mean(-1, keepdims=True)
  denom = np.sqrt((rx * rx).sum(-1) * (ry * ry).sum(-1))
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(denom > 0, (rx * ry).sum(-1) / np.where(denom > 0, denom, 1), np.nan)


def prompt_mean(values_NxU, counts_RxN) -> tuple[np.ndarray, np.ndarray]:
  """(mean over prompts [U], the same for every resampled prompt set [n_boot, U])."""
  v = np.asarray(values_NxU, np.float64)
  return v.mean(0), counts_RxN @ v.reshape(len(v), -1) / len(v)


# what the association reads: per-dim max/mean after RoPE (the rule's), and per rotary pair (the same
# heads rotation-invariant, reported beside it: RoPE lowers per-dim values more in fast pairs)
ASSOCIATED = {"rot_q": ("rot_q", "max_mean"), "rot_k": ("rot_k", "max_mean"),
              "pair_q": ("q", "pair_max_mean"), "pair_k": ("k", "pair_max_mean")}


def head_groups(sums: dict, sinks: dict, pairing, context: float, cfg: S.StatConfig, counts) -> list[dict]:
  """Per layer: {'sink', 'sink_head', and each of ASSOCIATED: (per query head [H], replicates [n_boot,
  H])}; a key's value is that of the KV head each query head reads."""
  layers = sorted(int(k.split(".")[0]) for k in sinks if k.endswith(".sink"))
  groups = []
  for layer in layers:
    sink, sink_reps = prompt_mean(sinks[f"{layer}.sink"], counts)
    g = {"sink": (sink, sink_reps),
         "sink_head": ((sink >= SINK_LEVEL).astype(np.float64), (sink_reps >= SINK_LEVEL).astype(np.float64))}
    for key, (tensor, stat) in ASSOCIATED.items():
      point, reps = S.head_replicates(sums[hooks.name(layer, tensor)], (stat,), pairing, context, cfg, counts)[stat]
      group = len(sink) // len(point)          # query heads per KV head (1 for q)
      g[key] = (np.repeat(point, group), np.repeat(reps, group, axis=-1))
    groups.append(g)
  return groups


def association(groups: list[dict], n_boot: int, seed: int = S.BOOT_SEED) -> dict:
  """{key of ASSOCIATED: [rho, lo, hi]}: Spearman over every head of `groups` between sink share and
  max/mean, with heads resampled (as pairs) on top of the prompt resampling of the replicates. RULE
  judges rot_q and rot_k; pair_q and pair_k are reported beside them."""
  sink, sink_reps = (np.concatenate([g["sink"][i] for g in groups], axis=-1) for i in (0, 1))
  draws = S.unit_draws(n_boot, sink.shape[-1], seed)
  out = {}
  for tensor in ASSOCIATED:
    x, x_reps = (np.concatenate([g[tensor][i] for g in groups], axis=-1) for i in (0, 1))
    reps = spearman(np.take_along_axis(x_reps, draws, 1), np.take_along_axis(sink_reps, draws, 1))
    out[tensor] = [float(spearman(x, sink)[0]), *S.interval(reps)]
  return out


def verdict(assoc: dict) -> str:
  """RULE applied to `association`'s intervals."""
  lows, highs = [assoc[t][1] for t in ("rot_q", "rot_k")], [assoc[t][2] for t in ("rot_q", "rot_k")]
  if all(math.isfinite(v) and v > 0 for v in lows):
    return "supported"
  if all(math.isfinite(v) and v < 0 for v in highs):
    return "opposite"
  return "inconclusive"


def resid_layer(sinks: dict, layer: int, probes_NxT, cfg: S.StatConfig, counts) -> dict:
  """Residual massive activations of one layer: per-prompt counts and sizes (means over prompts with
  95% bootstrap intervals) and where the largest |x| of each prompt sits (position, token id, dim)."""
  top = np.abs(sinks[f"{layer}.resid_top"].astype(np.float64))           # [N, K], largest first
  median = sinks[f"{layer}.resid_median"].astype(np.float64)[:, None]
  ratio = top / np.maximum(median, np.finfo(np.float32).tiny)
  free = ratio > cfg.resid_ratio
  per_prompt = {"max_abs": top[:, 0], "max_ratio": ratio[:, 0], "median": median[:, 0],
                "n_sun": (free & (top > cfg.resid_abs)).sum(1), "n_ratio": free.sum(1)}
  out = {}
  for name, v in per_prompt.items():
    point, reps = prompt_mean(v[:, None], counts)
    out[name] = [float(point[0]), *S.interval(reps[:, 0])]
  tok, dim = sinks[f"{layer}.resid_tok"][:, 0], sinks[f"{layer}.resid_dim"][:, 0]
  ids = np.asarray(probes_NxT)[np.arange(len(tok)), tok]
  out.update({"top_k": int(top.shape[1]), "first_token_share": float((tok == 0).mean()),
              "top_dim": _mode(dim), "top_token_id": _mode(ids), "top_position": _mode(tok)})
  return out


def _mode(values) -> list:
  """[most common value, share of prompts holding it]."""
  v, c = np.unique(np.asarray(values), return_counts=True)
  return [int(v[c.argmax()]), float(c.max() / c.sum())]


# ---------------------------------------------------------------------------------- the store

def step_summary(store, arm: str, step: int, facts: dict, cfg: S.StatConfig, n_boot: int):
  """(per-layer summaries, per-head rows, per-layer residual rows, the step's association) of one
  (arm, step) whose sinks file exists."""
  sums, sinks = store.load_sums(arm, step), store.load_sinks(arm, step)
  probes, mask = store.probes(), store.mask()
  counts = S.prompt_counts(len(probes), n_boot, S.BOOT_SEED)
  groups = head_groups(sums, sinks, pairing_of(facts), facts["context"], cfg, counts)
  layers, heads, resid = [], [], []
  for layer, g in enumerate(groups):
    pooled = S.pool_heads([g], ("sink", "sink_head"), n_boot, S.BOOT_SEED)
    res = resid_layer(sinks, layer, probes, cfg, counts)
    layers.append({"arm": arm, "step": step, "layer": layer, "sink_per_head": g["sink"][0].tolist(),
                   **{k: [v, *S.interval(r)] for k, (v, r) in pooled.items()}, "resid": res})
    heads += [{"arm": arm, "step": step, "layer": layer, "head": h, "sink_share": float(g["sink"][0][h]),
               "rot_q_max_mean": float(g["rot_q"][0][h]), "rot_k_max_mean": float(g["rot_k"][0][h])}
              for h in range(len(g["sink"][0]))]
    resid.append({"arm": arm, "step": step, "layer": layer,
                  **{k: res[k][0] for k in ("max_abs", "max_ratio", "median", "n_sun", "n_ratio")},
                  "first_token_share": res["first_token_share"], "top_dim": res["top_dim"][0],
                  "top_dim_share": res["top_dim"][1], "top_token_id": res["top_token_id"][0]})
  pooled = S.pool_heads(groups, ("sink", "sink_head"), n_boot, S.BOOT_SEED)
  summary = {"arm": arm, "step": step, "uniform": uniform_share(mask), "association": association(groups, n_boot),
             **{k: [v, *S.interval(r)] for k, (v, r) in pooled.items()}}
  return layers, heads, resid, summary


def rebuild(store, arms: dict, cfg: S.StatConfig, n_boot: int) -> dict:
  """sinks.json, sinks.csv and resid.csv from every (arm, step) of `arms` ({arm: facts}) that has a
  sinks file (a store traced before sinks has none: nothing is written for it)."""
  out = {"rule": RULE, "level": SINK_LEVEL, "n_boot": n_boot, "seed": S.BOOT_SEED,
         "settings": {"resid_abs": cfg.resid_abs, "resid_ratio": cfg.resid_ratio},
         "layers": [], "steps": [], "verdicts": []}
  heads, resid = [], []
  for arm, facts in arms.items():
    steps = [s for s in store.steps(arm) if store.has_sinks(arm, s)]
    for step in steps:
      layers, h, r, summary = step_summary(store, arm, step, facts, cfg, n_boot)
      out["layers"] += layers
      out["steps"].append(summary)
      heads, resid = heads + h, resid + r
    if steps:
      last = out["steps"][-1]
      out["verdicts"].append({"arm": arm, "step": last["step"], "verdict": verdict(last["association"]),
                              "association": last["association"], "rule": RULE})
  if out["steps"]:
    write_rows(store.path("sinks.csv"), heads)
    write_rows(store.path("resid.csv"), resid)
    store.write_json("sinks.json", out)
  return out
