"""Experiments with more than one pair: every arm against its same-seed NoPE arm, then over seeds.

A traced run with arms such as rope_s0, nope_s0, rope_s1, nope_s1, alibi_s0, ... gets one set of
C1-C4 verdicts per (arm, reference) comparison (analysis.massive.claims.judge with that pair), and, for
every recipe (an arm's overrides without its seed) seen under two or more seeds, the per-seed
values of what each rule judges (claims.READS) with their mean and a t interval over seeds
(pooled only where every seed is at the same step). Written to <trace>/comparisons.json.

Beside it, <trace>/arms.json (`arm_table`): one row per traced arm at its last step, for sweeps over
the RoPE base, the context length or the rotary fraction: where the rot_q/rot_k mass sits against
the arm's own wavelength boundary j_ctx (the first pair whose wavelength exceeds its context).
"""
from __future__ import annotations

import dataclasses
import json

import numpy as np

from analysis.massive import claims as CL
from analysis.massive import stats as S
from analysis.massive import store as ST
from minilm import hooks
from train import checkpoints as ck

SEED_KEYS = ("seed", "train.seed")
LEVEL = 0.95


def arm_facts(run_dir: str) -> dict[str, dict]:
  """{arm: {'seed', 'position', 'recipe' (overrides without the seed, as a label), 'flat' config}}."""
  arms = ST.run_arms(run_dir)
  overrides = ST.experiment_arms(run_dir)
  out = {}
  for arm, arm_dir in arms.items():
    cfg = ck.config_dict(arm_dir)
    recipe = {k: v for k, v in overrides.get(arm, {}).items() if k not in SEED_KEYS}
    out[arm] = {"seed": cfg["seed"], "position": cfg["model"]["position"]["kind"],
                "recipe": ", ".join(f"{k}={json.dumps(v)}" for k, v in sorted(recipe.items())) or "shared config",
                "flat": {k: v for k, v in ck.flat(cfg).items() if k not in ("name", "seed")}}
  return out


def pairs(facts: dict[str, dict]) -> list[tuple[str, str | None]]:
  """(arm, reference) for every non-NoPE arm: the NoPE arm of the same seed whose config differs
  least (None when there is no NoPE arm of that seed)."""
  out = []
  for arm, f in facts.items():
    if f["position"] == "nope":
      continue
    refs = [r for r, g in facts.items() if g["position"] == "nope" and g["seed"] == f["seed"]]
    distance = lambda r: sum(facts[r]["flat"].get(k) != v for k, v in f["flat"].items())
    out.append((arm, min(refs, key=distance) if refs else None))
  return out


def seed_interval(values) -> list[float] | None:
  """Mean +- t * sd / sqrt(n) over seeds (None for fewer than two seeds)."""
  from scipy import stats
  x = np.asarray([v for v in values if v is not None], np.float64)
  if len(x) < 2:
    return None
  half = stats.t.ppf(0.5 + LEVEL / 2, len(x) - 1) * x.std(ddof=1) / np.sqrt(len(x))
  return [float(x.mean() - half), float(x.mean() + half)]


def _pool(values: list, steps: list, references: list = ()) -> dict:
  """Values over seeds with their mean and t interval. Seeds still training sit at earlier steps, and
  a difference may be taken against a NoPE arm in one seed and a null in another: a mean over such
  values would mean nothing, so then the values are listed with the reason and not pooled."""
  why = ("a seed has no value" if None in values else "steps differ" if len(set(steps)) > 1 else
         "references differ" if len(set(references)) > 1 else None)
  return {"values": values, "mean": None if why else float(np.mean(values)),
          "ci": None if why else seed_interval(values), "why": why}


def _pool_points(vs: list[dict], steps: list, references: list) -> dict | None:
  """Each point's arm value and difference, and the rotation's part, over seeds (as `_pool`)."""
  if any(x.get("points") is None for x in vs):
    return None
  out = {point: {"value": _pool([x["points"][point]["value"] for x in vs], steps),
                 "diff": _pool([x["points"][point].get("diff") for x in vs], steps, references)}
         for point in CL.POINTS}
  if all(x.get("rotation") for x in vs):
    out["rotation"] = _pool([x["rotation"]["value"] for x in vs], steps, [x["rotation"]["of"] for x in vs])
  return out


def _pool_parts(vs: list[dict], steps: list) -> dict:
  """The value of every part (share of heads, first layer, ...) over seeds, '<key>@<point>'."""
  keys = [(p["key"], p["point"]) for p in vs[0].get("parts") or []]
  values = {k: [next((p["value"] for p in x.get("parts") or [] if (p["key"], p["point"]) == k), None) for x in vs]
            for k in keys}
  return {f"{key}@{point}": _pool(v, steps) for (key, point), v in values.items()}


def compare(store: ST.Store, run_dir: str) -> dict:
  """Verdicts per comparison and per recipe over seeds; written to comparisons.json in the store."""
  facts = arm_facts(run_dir)
  traced = store.meta()["arms"]
  rows = []
  for arm, ref in pairs(facts):
    if arm not in traced or (ref is not None and ref not in traced):
      continue
    verdicts = CL.judge(store, rope_arm=arm, nope_arm=ref, find_nope=False)
    rows.append({"arm": arm, "reference": ref, "seed": facts[arm]["seed"], "recipe": facts[arm]["recipe"],
                 "position": facts[arm]["position"], "verdicts": [dataclasses.asdict(v) for v in verdicts]})
  groups = []
  for recipe in dict.fromkeys(r["recipe"] for r in rows):
    members = [r for r in rows if r["recipe"] == recipe]
    if len({r["seed"] for r in members}) < 2:
      continue
    per_claim = {}
    for i, v in enumerate(members[0]["verdicts"]):
      vs = [m["verdicts"][i] for m in members]
      steps = [x["step"] for x in vs]
      references = ["a NoPE arm" if x["reference"].startswith("arm ") else x["reference"] for x in vs]
      pooled = {"value": _pool([x["value"] for x in vs], steps),
                "diff": _pool([x["diff"] for x in vs], steps, references)}
      reads = CL.READS.get(v["claim"], "value")
      measure = reads if None not in pooled[reads]["values"] else "value"
      per_claim[v["claim"]] = {"title": v["title"], "quantity": v["quantity"], "measure": measure,
                               **pooled[measure], "seeds": [m["seed"] for m in members], "steps": steps,
                               "pooled": pooled, "verdicts": [x["verdict"] for x in vs],
                               "points": _pool_points(vs, steps, references), "parts": _pool_parts(vs, steps)}
    groups.append({"recipe": recipe, "position": members[0]["position"], "arms": [m["arm"] for m in members],
                   "claims": per_claim})
  out = {"level": LEVEL, "comparisons": rows, "seed_groups": groups}
  store.write_json("comparisons.json", out)
  store.write_json("arms.json", arm_table(store))
  return out


# ------------------------------------------------------------------------------ mechanism per arm

POINT_STATS = ("max_mean", "massive", "any_massive")
"""Concentration statistics of the arms table at the three points of analysis.massive.claims.POINTS:
'pre_<stat>' (q/k), '<stat>' (rot_q/rot_k) and 'pair_<stat>' (rotary-pair norms)."""
ARM_STATS = ("peak_pair", "peak_minus_ctx", "peak_minus_2ctx", "band_share", "lf_share", "unrot_share",
             *POINT_STATS, *(f"pair_{s}" for s in POINT_STATS))
"""Per-head statistics of the arms table, pooled over the rot_q/rot_k heads of every layer (and the
POINT_STATS again over the q/k heads, as 'pre_<stat>')."""
PAIR_STATS = ("peak_pair", "peak_minus_ctx", "peak_minus_2ctx")
"""Blank (None) for arms without RoPE: the argmax over a convention pairing means nothing."""


def arm_table(store: ST.Store, n_boot: int = CL.N_BOOT) -> dict:
  """One row per traced arm at its own last step: the arm's RoPE settings and context, its wavelength
  boundary pairs j_ctx and j_2ctx, and the rot_q/rot_k statistics of ARM_STATS (with 'pre_' ones on q/k)
  pooled over layers and heads as analysis.massive.claims pools them (point value, `LEVEL` bootstrap interval over prompts, shared by
  the arms, and heads). Fields that need RoPE pairs are None for other encodings; their shares use the
  labelled convention pairing of analysis.massive.stats, against which only the null values mean anything."""
  meta = store.meta()
  cfg = ST.stat_config(meta)
  counts = S.prompt_counts(len(store.probes()), n_boot, S.BOOT_SEED)
  rows = [_arm_row(store, arm, facts, cfg, counts) for arm, facts in meta["arms"].items() if store.steps(arm)]
  return {"level": CL.LEVEL, "n_boot": n_boot, "tensors": list(CL.QK), "lam": cfg.lam,
          "lf_quarter": cfg.lf_quarter, "band": list(cfg.band), "arms": rows}


def _arm_row(store: ST.Store, arm: str, facts: dict, cfg: S.StatConfig, counts) -> dict:
  step = store.steps(arm)[-1]
  sums = store.load_sums(arm, step)
  pairing, context = ST.pairing_of(facts), facts["context"]
  groups = [sums[hooks.name(layer, t)] for layer in range(facts["n_layers"]) for t in CL.QK]
  pooled = S.pooled(groups, ARM_STATS, pairing, context, cfg, counts, S.BOOT_SEED)
  pre = [sums[hooks.name(layer, t)] for layer in range(facts["n_layers"]) for t in ("q", "k")]
  pooled.update({f"pre_{k}": v for k, v in S.pooled(pre, POINT_STATS, pairing, context, cfg, counts,
                                                    S.BOOT_SEED).items()})
  null = S.head_stats(np.sqrt(np.asarray(groups[0], np.float64).sum(0)), pairing, context, cfg)["null"]
  rope = pairing.is_rope
  pos = facts["position_cfg"]
  partial = rope and pos["fraction"] < 1
  row = {"arm": arm, "step": step, "position": facts["position"], "pairing": pairing.label,
         "base": pos["base"] if rope else None, "fraction": pos["fraction"] if rope else None,
         "partial": pos["partial"] if partial else None, "layout": pos["layout"] if rope else None,
         "context": context, "head_dim": facts["head_dim"], "n_pairs": pairing.n_pairs if rope else None,
         "j_ctx": null["ctx_pair"] if rope else None, "j_2ctx": null["ctx2_pair"] if rope else None,
         "band_null": null["band_share"], "lf_null": null["lf_share"],
         "unrot_null": float((pairing.pair_index < 0).mean()) if partial else None}
  for stat, (value, reps) in pooled.items():
    blank = (not rope and stat in PAIR_STATS) or (stat == "unrot_share" and not partial)
    row[stat] = None if blank or not np.isfinite(value) else value
    row[stat + "_ci"] = None if row[stat] is None else list(S.interval(reps, CL.LEVEL))
  return row
