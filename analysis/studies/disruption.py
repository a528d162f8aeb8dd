"""Claim C5 end to end: task templates under every disruption condition -> JSONL, tables, plot, verdict.

  python -m analysis disrupt --model smollm2 --out reports/c5_smollm2            # every family x 5 templates
  python -m analysis disrupt --model smollm2 --n 10 --dose --out reports/c5_dose  # + lambda 3-6, top-1/2/4
  python -m analysis disrupt --model smollm2 --prompts mine.jsonl --out reports/c5_mine   # your prompts
  python -m analysis disrupt --model runs/paired --out reports/c5_paired          # every arm
  python -m analysis disrupt --model random --n 2 --out reports/c5_smoke              # plumbing only

Conditions: off (undisrupted), massive (Q/K massive dims -> their mean over the prompt, prefill only),
and the controls smallest (the same count of the smallest dims), random (random non-massive dims
matched per head on the energy removed; --draws seeded draws) and v (the same dims in V); --dose adds
the massive dims at lambda 3, 4, 5, 6 and the top-1/2/4 dims per head.

--prompts FILE.jsonl replaces the built-in suite (--suite, --n): one JSON object a line with family
(the task name in every table), kind (contextual | parametric | conflict), prompt, answer, optional
memory (a conflict item's parametric answer) and max_new_tokens; scored by the strict rule of
analysis.studies.suites. Every line is checked before any model is loaded.

Files in --out: results.jsonl (every example: prompt, output, verdict, dims replaced, energy
removed), summary.json ('summary': accuracy with Wilson 95% intervals per model, task and condition;
'pooled': per family and kind over templates and items; verdicts; timings), table.md (per template,
pooled, dose-response, verdict and rule), c5.png, verdict.json (per model), claims.json / claims.md
(the C5 analysis.massive.claims.Verdict).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

from analysis.massive import stats as S
from analysis.massive.claims import Verdict, deciding, write_claims
from analysis.massive.store import run_arms
from analysis.studies import disrupt, sources, suites
from analysis.studies.disrupt import DisruptConfig
from minilm import atomic, generate
from minilm.schema import check, check_choice
from train import checkpoints, data
from train.data import check_seed
from train.tokenizer import ByteTokenizer

TABLE_MODES = ("off", "smallest", "massive", "random", "v")
COLUMNS = {"off": "original", "smallest": "smallest dims", "massive": "massive disrupted",
           "random": "random dims, energy-matched", "v": "same dims in V", "massive_zero": "massive -> 0",
           "top1": "top-1 -> mean", "top2": "top-2 -> mean", "top4": "top-4 -> mean"}
DRAWS = 5
"""Seeded draws of the random control."""
DOSE_LAMS, DOSE_TOPK = (3.0, 4.0, 5.0, 6.0), (1, 2, 4)
"""--dose: the massive dims at each lambda, and the top-k dims per head."""
COLUMNS.update({f"lam{x:g}": f"massive, lambda {x:g}" for x in DOSE_LAMS})

# Fixed before any data was seen (with the templates). Templates count only where the undisrupted
# model can do them; drops are absolute accuracy drops.
USABLE, SMALL_DROP = 0.8, 0.1
LEVEL, N_BOOT, SEED = 0.95, 2000, 0


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
  """Wilson score interval for k successes out of n."""
  if n == 0:
    return 0.0, 1.0
  p, z2 = k / n, z * z
  centre = (p + z2 / (2 * n)) / (1 + z2 / n)
  half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
  return max(0.0, centre - half), min(1.0, centre + half)


# --------------------------------------------------------------------------------------- conditions

def conditions(base: DisruptConfig, modes, draws: int = DRAWS, dose: bool = False) -> dict[str, DisruptConfig]:
  """{label: config} of every condition run: each mode, 'random' as `draws` seeded draws ('random.0',
  ...), and with `dose` the massive dims at every lambda of DOSE_LAMS and the top-k of DOSE_TOPK (a
  dose equal to a condition already run is not run twice)."""
  out = {}
  for m in modes:
    if m == "random":
      out.update({f"random.{i}": dataclasses.replace(base, mode=m, draw=i) for i in range(draws)})
    else:
      out[m] = dataclasses.replace(base, mode=m)
  for label, cfg in (dose_conditions(base).items() if dose else ()):
    if cfg not in out.values():
      out[label] = cfg
  return out


def dose_conditions(base: DisruptConfig) -> dict[str, DisruptConfig]:
  lams = {f"lam{x:g}": dataclasses.replace(base, mode="massive", criterion="lambda", lam=x) for x in DOSE_LAMS}
  return {**lams, **{f"top{k}": dataclasses.replace(base, mode=f"top{k}") for k in DOSE_TOPK}}


def dose_labels(conds: dict[str, DisruptConfig]) -> dict[str, str]:
  """{dose label: the condition label that ran it} for the doses among `conds`."""
  base = next(iter(conds.values()))
  return {d: next(l for l, c in conds.items() if c == cfg) for d, cfg in dose_conditions(base).items()
          if cfg in conds.values()}


def pooled_label(label: str) -> str:
  """The random draws ('random.3') pool into 'random'; other labels are their own."""
  return "random" if label.startswith("random.") else label


# --------------------------------------------------------------------------------------- evaluation

def score_conditions(model, tokenizer, items, conds: dict[str, DisruptConfig], *, label: str = "model", batch: int = 8,
                     bucket: int = 0, probe=None, sink=None) -> tuple[list[dict], dict[str, float]]:
  """Run every item under every condition. Prompts share a batch by length (bucket 0), or right-padded
  to the next multiple of `bucket` tokens (few lengths compile; sums and means over the prompt
  tokens only); a batch is filled with copies of its last row, so each batch shape compiles once.
  Every condition's prefill measures M and S (one compiled program for all): those of the undisrupted
  decoding ('off', run first) choose the other conditions' dims; without 'off' among the conditions
  a capture pass measures them. Returns (records, seconds per condition; 'capture': capture passes)."""
  base = next(iter(conds.values()))  # every condition reads the same points (one rope side, one source)
  records, seconds = [], {m: 0.0 for m in ("capture", *conds)}
  n_layers, measure = model.cfg.n_layers, disrupt.measure(base)
  for idx, tokens, lengths, max_new in generate.batches([it.prompt for it in items], [it.max_new for it in items],
                                                        batch, bucket=bucket):
    chunk, (B, T) = [items[i] for i in idx], tokens.shape
    examples = idx + [idx[-1]] * (B - len(idx))
    M = S = None
    if "off" not in conds:
      t0 = time.perf_counter()
      M, S = disrupt.norms_and_spread(model, tokens, base, lengths)
      seconds["capture"] += time.perf_counter() - t0
    runs = {}
    for mode in sorted(conds, key=lambda m: m != "off"):   # 'off' first: its prefill measures M and S
      t0 = time.perf_counter()
      undisrupted = mode == "off"
      if undisrupted:
        norms = disrupt.unmeasured(model.cfg, base, B)
      else:   # the M that chooses the dims: this prompt's, or the probe set's (a broadcast)
        norms = M if base.source == "prompt" else disrupt.dim_norms(model, tokens, base, probe)
      args, counts = disrupt.hook_args(norms, conds[mode], n_layers, None if undisrupted else S, examples)
      out, measured = generate.greedy(model, tokens, max_new, lengths=lengths, hook=disrupt.hook, hook_args=args,
                                      measure=measure)
      if undisrupted:
        M, S = ({k: np.asarray(v) for k, v in d.items()} for d in measured)
      runs[mode] = (np.asarray(out), args, counts, norms)
      seconds[mode] += time.perf_counter() - t0
    for mode, cfg in conds.items():
      out, args, counts, norms = runs[mode]
      removed = disrupt.energy_removed(M, S, args, cfg, n_layers)
      short = disrupt.unmatched(norms, S, cfg, n_layers) if cfg.mode == "random" else None
      for i, item in enumerate(chunk):
        records.append(_record(item, out[i], tokenizer, label=label, mode=mode, cfg=cfg, example=idx[i],
                               dims={p: int(c[i]) for p, c in counts.items()},
                               energy={p: float(e[i]) for p, e in removed.items()},
                               unmatched=short and {p: float(u[i]) for p, u in short.items()}))
        if sink is not None:
          sink.write(json.dumps(records[-1]) + "\n")
    if sink is not None:
      sink.flush()
      print(f"[{label}] {chunk[0].task} len {T}: {len(records)} records, "
            + ", ".join(f"{m} {s:.0f}s" for m, s in seconds.items()), file=sys.stderr, flush=True)
  return records, seconds


def _record(item, out_ids, tokenizer, *, label, mode, cfg, example, dims, energy, unmatched=None) -> dict:
  """One example under one condition; the random control's records also hold `unmatched`
  (disrupt.unmatched: the share of heads whose energy target no choice of dims reaches)."""
  v = suites.verdict(item, out_ids, tokenizer)
  return {"model": label, "mode": mode, "task": item.task, "family": family_of(item.task), "example": example,
          "kind": item.kind, "verdict": v, "success": suites.success(item, v), "answer": item.answer,
          "output": tokenizer.decode([int(t) for t in out_ids]), "prompt": item.text,
          "prompt_tokens": len(item.prompt), "dims_replaced": dims, "energy_removed": energy,
          **({"unmatched": unmatched} if unmatched is not None else {}),
          "disrupt": dataclasses.asdict(cfg), "meta": {k: _jsonable(x) for k, x in item.meta.items()}}


def family_of(task: str) -> str:
  """'passkey/t3' -> 'passkey': a template's family (a task without templates is its own family)."""
  return task.split("/")[0]


def in_item_order(records: list[dict]) -> list[dict]:
  """Records by model, then item (score_conditions batches prompts by length, across tasks)."""
  models = list(dict.fromkeys(r["model"] for r in records))
  return sorted(records, key=lambda r: (models.index(r["model"]), r["example"]))


def _jsonable(x):
  return x.item() if isinstance(x, np.generic) else x


def summarize(records: list[dict]) -> list[dict]:
  """Accuracy (success rate) with a Wilson interval per (model, task, mode); conflict splits too. The
  random draws get a row each and a 'random' row of their mean count k (Wilson interval at it)."""
  cells = {}
  for r in in_item_order(records):
    cells.setdefault((r["model"], r["task"], r["mode"]), []).append(r)
    if pooled_label(r["mode"]) != r["mode"]:
      cells.setdefault((r["model"], r["task"], pooled_label(r["mode"])), []).append(r)
  rows = []
  for (model, task, mode), rs in cells.items():
    draws = len({r["mode"] for r in rs})
    k, n = sum(r["success"] for r in rs) / draws, len(rs) // draws
    row = {"model": model, "task": task, "kind": rs[0]["kind"], "mode": mode, "n": n, "k": k,
           "acc": k / n, "ci": wilson(k, n),
           "mean_dims_replaced": {p: float(np.mean([r["dims_replaced"][p] for r in rs])) for p in rs[0]["dims_replaced"]},
           "mean_energy_removed": {p: float(np.mean([r["energy_removed"][p] for r in rs]))
                                   for p in rs[0].get("energy_removed", {})}}
    if draws > 1:
      row["draws"] = draws
    if rs[0]["kind"] == "conflict":
      row["split"] = {v: sum(r["verdict"] == v for r in rs) / len(rs) for v in ("context", "memory", "other")}
    rows.append(row)
  return rows


def table(summary: list[dict], model: str, modes=TABLE_MODES) -> str:
  """Markdown table in the paper's layout: task rows, one column per mode; accuracy % [95% CI]."""
  cell = {(r["task"], r["mode"]): r for r in summary if r["model"] == model}
  tasks = list(dict.fromkeys(r["task"] for r in summary if r["model"] == model))
  modes = [m for m in modes if any((t, m) in cell for t in tasks)]
  lines = [f"| {model}: task (n) | " + " | ".join(COLUMNS.get(m, m) for m in modes) + " |",
           "|---|" + "---|" * len(modes)]
  for t in tasks:
    n = next(cell[(t, m)]["n"] for m in modes if (t, m) in cell)
    vals = []
    for m in modes:
      r = cell.get((t, m))
      vals.append("-" if r is None else f"{100 * r['acc']:.0f} [{100 * r['ci'][0]:.0f}, {100 * r['ci'][1]:.0f}]"
                  + (f" (mem {100 * r['split']['memory']:.0f})" if "split" in r else ""))
    lines.append(f"| {t} ({n}) | " + " | ".join(vals) + " |")
  energy = []
  for m in modes:
    rs = [cell[(t, m)]["mean_energy_removed"] for t in tasks if (t, m) in cell]
    energy.append(" ".join(f"{p.replace('rot_', '')} {100 * np.mean([r[p] for r in rs]):.2g}%"
                           for p in rs[0] if any(r[p] for r in rs)) or "0")
  lines.append("| energy removed (share of Q/K/V energy, undisrupted) | " + " | ".join(energy) + " |")
  return "\n".join(lines)


def plot(summary: list[dict], path: Path, modes=TABLE_MODES) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  models = list(dict.fromkeys(r["model"] for r in summary))
  fig, axes = plt.subplots(len(models), 1, figsize=(11, 3.8 * len(models)), squeeze=False)
  for ax, model in zip(axes[:, 0], models):
    cell = {(r["task"], r["mode"]): r for r in summary if r["model"] == model}
    tasks = list(dict.fromkeys(r["task"] for r in summary if r["model"] == model))
    used = [m for m in modes if any((t, m) in cell for t in tasks)]
    width = 0.8 / max(len(used), 1)
    for j, m in enumerate(used):
      rs = [cell.get((t, m)) for t in tasks]
      acc = np.array([r["acc"] if r else np.nan for r in rs])
      err = np.array([[r["acc"] - r["ci"][0], r["ci"][1] - r["acc"]] if r else [0, 0] for r in rs]).T
      ax.bar(np.arange(len(tasks)) + j * width, acc, width, yerr=err, capsize=2, label=COLUMNS.get(m, m))
    ax.set_xticks(np.arange(len(tasks)) + 0.4 - width / 2, tasks, fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("accuracy")
    ax.set_title(model)
    ax.legend(fontsize=7, ncol=len(used), loc="upper center", bbox_to_anchor=(0.5, -0.12))
  fig.tight_layout()
  atomic.savefig(fig, str(path), dpi=110)
  plt.close(fig)


# --------------------------------------------------------------------------------- pooled estimates

def _item_values(records: list[dict], model: str, value) -> dict[str, dict[str, np.ndarray]]:
  """{task: {condition: per-example values [n]}}, the random draws averaged into 'random', examples
  in one order for every condition."""
  got = {}
  for r in records:
    if r["model"] == model:
      by_example = got.setdefault(r["task"], {}).setdefault(pooled_label(r["mode"]), {})
      by_example.setdefault(r["example"], []).append(value(r))
  return {t: {m: np.array([np.mean(v[e]) for e in sorted(v)]) for m, v in by_mode.items()}
          for t, by_mode in got.items()}


def family_estimate(per_template: list[dict[str, np.ndarray]], n_boot: int, seed: int) -> dict[str, tuple]:
  """{condition: (mean over templates of the item mean, replicates [n_boot])}: items resampled within
  each template with the same draw for every condition (paired), then the templates resampled."""
  labels, reps = list(per_template[0]), {}
  for t, values in enumerate(per_template):
    n = len(values["off"])
    counts_RxN = S.prompt_counts(n, n_boot, seed + 1 + t)
    for m in labels:
      reps.setdefault(m, []).append(counts_RxN @ values[m] / n)
  return {m: (float(np.mean([v[m].mean() for v in per_template])), S.resample_units(np.stack(reps[m], 1), seed))
          for m in labels}


def _mean_estimate(estimates: list[dict]) -> dict[str, tuple]:
  """Mean over families of their estimates (point and replicates), per condition they all share."""
  shared = set.intersection(*(set(e) for e in estimates))
  return {m: (float(np.mean([e[m][0] for e in estimates])), np.mean([e[m][1] for e in estimates], 0))
          for m in estimates[0] if m in shared}


def _energy(records: list[dict]) -> dict[str, dict[str, float]]:
  """{condition: {point: mean share of energy removed}}, the random draws pooled."""
  out = {}
  for r in records:
    for p, e in r["energy_removed"].items():
      out.setdefault(pooled_label(r["mode"]), {}).setdefault(p, []).append(e)
  return {m: {p: float(np.mean(v)) for p, v in by_point.items()} for m, by_point in out.items()}


def _unmatched(records: list[dict]) -> dict[str, float]:
  """{point: mean share of heads whose energy target the random control cannot reach}, over the
  random draws' records ({} without them)."""
  out = {}
  for r in records:
    for p, u in r.get("unmatched", {}).items():
      out.setdefault(p, []).append(u)
  return {p: float(np.mean(v)) for p, v in out.items()}


def pool(records: list[dict], model: str, n_boot: int = N_BOOT) -> dict:
  """The pooled estimates RULE judges. families: {family: kind, templates, usable (templates whose
  undisrupted accuracy is >= USABLE), acc {condition: (point, replicates)} over the usable templates
  (conflict: also memory, the share answering from memory), energy and unmatched (`_unmatched`), both
  over every item}; kinds: {kind: acc, memory, energy, unmatched: means over its families with a
  usable template}."""
  mine = in_item_order([r for r in records if r["model"] == model])
  success = _item_values(mine, model, lambda r: float(r["success"]))
  memory = _item_values(mine, model, lambda r: float(r["verdict"] == "memory"))
  tasks = {}
  for r in mine:
    tasks.setdefault(r["family"], {}).setdefault(r["task"], r["kind"])
  families = {}
  for family, kinds in tasks.items():
    usable = [t for t in kinds if success[t]["off"].mean() >= USABLE]
    rs = [r for r in mine if r["family"] == family]
    e = families[family] = {"kind": next(iter(kinds.values())), "templates": list(kinds), "usable": usable,
                            "energy": _energy(rs), "unmatched": _unmatched(rs)}
    if usable:
      e["acc"] = family_estimate([success[t] for t in usable], n_boot, S.name_seed(SEED, family))
      if e["kind"] == "conflict":
        e["memory"] = family_estimate([memory[t] for t in usable], n_boot, S.name_seed(SEED, family))
  kinds = {}
  for kind in suites.KINDS:
    fams = [e for e in families.values() if e["kind"] == kind and e["usable"]]
    if fams:
      energy, short = [e["energy"] for e in fams], [e["unmatched"] for e in fams]
      kinds[kind] = {"families": [f for f, e in families.items() if e in fams], "acc": _mean_estimate([e["acc"] for e in fams]),
                     "energy": {m: {p: float(np.mean([x[m][p] for x in energy])) for p in energy[0][m]} for m in energy[0]},
                     "unmatched": {p: float(np.mean([x[p] for x in short])) for p in short[0]}}
      if kind == "conflict":
        kinds[kind]["memory"] = _mean_estimate([e["memory"] for e in fams])
  return {"families": families, "kinds": kinds}


def _drop(entry: dict, mode: str) -> tuple | None:
  """(point, replicates) of undisrupted minus `mode` accuracy, or None where `mode` did not run."""
  acc = entry["acc"]
  return _minus(acc["off"], acc[mode]) if mode in acc else None


def _minus(a: tuple, b: tuple) -> tuple:
  return a[0] - b[0], a[1] - b[1]


def _ci(estimate: tuple) -> list[float]:
  return list(S.interval(estimate[1], LEVEL))


def _json(estimate: tuple | None) -> dict | None:
  return None if estimate is None else {"value": estimate[0], "ci": _ci(estimate)}


def pooled_json(pooled: dict) -> dict:
  """`pool` without the replicates: value and interval of every accuracy, drop and memory share."""
  def entry(e):
    out = {k: v for k, v in e.items() if k not in ("acc", "memory")}
    for key in ("acc", "memory"):
      if key in e:
        out[key] = {m: _json(x) for m, x in e[key].items()}
    if "acc" in e:
      out["drop"] = {m: _json(_drop(e, m)) for m in e["acc"] if m != "off"}
    return out
  return {group: {name: entry(e) for name, e in pooled[group].items()} for group in ("families", "kinds")}


# ------------------------------------------------------------------------------------------ verdict

RULE = (f"drop = undisrupted minus disrupted accuracy (greedy decoding, strict scoring), pooled: mean over a "
        f"family's templates whose undisrupted accuracy is >= {USABLE} (usable), then over the families of a kind "
        f"(contextual, parametric); {LEVEL:.0%} intervals from {N_BOOT} bootstrap replicates that resample each "
        "family's usable templates and the items within each template, the same items for every condition. "
        "supported if the contextual drop under massive disruption exceeds (CI lower bound of the difference > 0) "
        "both the massive drop of every parametric family (closed-book prompts as they are and padded to the "
        "passkey length are separate families) and the contextual drop under the energy-matched random control "
        "(mean over its draws); not supported if the contextual massive drop has CI upper bound < "
        f"{SMALL_DROP}, or the contextual massive drop minus the random-control drop has CI upper bound < {SMALL_DROP} "
        "(the massive dims are not clearly more harmful than random ones); "
        "opposite if a parametric family drops more than the contextual tasks (CI upper bound of the difference "
        "< 0); inconclusive otherwise, or without a usable contextual and a usable parametric family, or without "
        "the random control. Where more than one holds, the first of not supported, opposite, supported counts. "
        "The smallest-dims and V controls, the conflict split and the dose-response are reported beside it")


def c5_verdict(pooled: dict, model: str) -> dict:
  """The C5 verdict for one model by RULE (a dict shaped like analysis.massive.claims.Verdict's fields)."""
  ctx = pooled["kinds"].get("contextual")
  par = {f: e for f, e in pooled["families"].items() if e["kind"] == "parametric" and e["usable"]}
  massive = ctx and _drop(ctx, "massive")
  tests = {}
  if massive is not None and par and "random" in ctx["acc"]:
    tests = {"random": _minus(massive, _drop(ctx, "random")),
             **{f: _minus(massive, _drop(e, "massive")) for f, e in par.items() if "massive" in e["acc"]}}
  f = lambda x: f"{x[0]:.2f} [{_ci(x)[0]:.2f}, {_ci(x)[1]:.2f}]"
  why = ("contextual massive drop " + f(massive) + "; minus " + "; minus ".join(
      f"{'random-control drop' if k == 'random' else k + ' drop'} {f(d)}" for k, d in tests.items())) if tests else ""
  upper, lower = {k: _ci(d)[1] for k, d in tests.items()}, {k: _ci(d)[0] for k, d in tests.items()}
  if not tests:
    status, why = "inconclusive", ("no usable contextual or parametric family, or no massive/random condition "
                                   f"(usable: undisrupted accuracy >= {USABLE})")
  elif _ci(massive)[1] < SMALL_DROP or upper["random"] < SMALL_DROP:
    status = "not supported"
  elif any(upper[k] < 0 for k in par if k in upper):
    status = "opposite"
  elif all(v > 0 for v in lower.values()):
    status = "supported"
  else:
    status = "inconclusive"
  if ctx:   # how much the contextual pool rests on (SCIENCE.md: one template per family is an anecdote)
    usable = {f: len(pooled["families"][f]["usable"]) for f in ctx["families"]}
    single = [f for f, n in usable.items() if n == 1]
    n, k = sum(usable.values()), len(usable)
    why += (f"; contextual pool: {n} usable template{'s' * (n != 1)} in {k} {'family' if k == 1 else 'families'}"
            + (f" ({', '.join(single)}: one template, an anecdote)" if single else ""))
    short = {p: x for p, x in ctx.get("unmatched", {}).items() if x}
    if short:   # the control then removes less energy than the massive dims (disrupt.unmatched)
      why += (f"; the random control cannot reach the massive dims' energy in {_shares(short)} of the contextual "
              "heads with massive dims (there it replaces every other dim and removes less)")
  evidence = {"contextual_drop_massive": _json(massive), "differences": {k: _json(d) for k, d in tests.items()},
              "usable": {f: e["usable"] for f, e in pooled["families"].items()},
              "random_unmatched": ctx.get("unmatched", {}) if ctx else {}}
  return {"claim": "C5", "model": model, "status": status, "summary": why, "evidence": evidence, "rule": RULE}


def claim(verdicts: list[dict], pools: dict[str, dict], positions: dict[str, str]):
  """One analysis.massive.claims.Verdict for C5: the first RoPE model decides (claims.deciding), a NoPE
  model (paired arm) is the reference column; parts: the differences the rule judges."""
  decides = deciding([v["model"] for v in verdicts], positions)
  main_ = next(v for v in verdicts if v["model"] == decides)
  ref = next((v for v in verdicts if positions.get(v["model"]) == "nope" and v is not main_), None)
  drop = lambda v: (lambda k: k and _drop(k, "massive"))(pools[v["model"]]["kinds"].get("contextual"))
  c, r = drop(main_), ref and drop(ref)
  diff = _minus(c, r) if c is not None and r is not None else None   # the same items and seeds: paired
  parts = [{"key": k, "name": f"contextual massive drop minus {k} drop", "point": "", **d, "verdict": ""}
           for k, d in main_["evidence"]["differences"].items()]
  return Verdict("C5", "Function", "contextual accuracy drop under massive Q/K disruption (pooled over "
                 "templates and families), absolute", main_["status"], RULE, value=c and c[0], value_ci=c and _ci(c),
                 reference_value=r and r[0], reference_ci=r and _ci(r), diff=diff and diff[0], ci=diff and _ci(diff),
                 reference=f"arm {ref['model']}" if ref else "", notes=f"{main_['model']}: {main_['summary']}",
                 parts=parts)


# ------------------------------------------------------------------------------------------- tables

def _cell(estimate: tuple | None) -> str:
  return "-" if estimate is None else f"{100 * estimate[0]:.0f} [{100 * _ci(estimate)[0]:.0f}, {100 * _ci(estimate)[1]:.0f}]"


def _strength(energy: dict, mode: str) -> str:
  """Share of Q/K/V energy a condition removes, e.g. 'q 1.2% k 0.8%' (points it leaves alone omitted)."""
  return _shares({p: e for p, e in energy.get(mode, {}).items() if e}) or "0"


def _pooled_rows(pooled: dict):
  """(row name, entry) of every family, then every kind ('all contextual', ...)."""
  return [(f, e) for f, e in pooled["families"].items()] + [(f"all {k}", e) for k, e in pooled["kinds"].items()]


def pooled_table(pooled: dict, model: str, modes) -> str:
  """Per family and kind: accuracy % [95% bootstrap CI over templates and items] per condition, the
  massive drop, and the disruption strength (energy removed) of the massive dims and of the random
  control, whose match is their ratio, and the share of heads (with massive dims) where the random
  control cannot reach the massive dims' energy (`disrupt.unmatched`)."""
  lines = [f"Pooled over the usable templates (undisrupted accuracy >= {USABLE}): accuracy % "
           f"[{LEVEL:.0%} bootstrap over templates and items]; conflict: follows the context (mem: answers from memory).",
           f"| {model}: family (usable templates) | " + " | ".join(COLUMNS.get(m, m) for m in modes)
           + " | massive drop | energy removed by massive | random / massive energy | heads random cannot match |",
           "|---|" + "---|" * (len(modes) + 4)]
  for name, e in _pooled_rows(pooled):
    used = f"{len(e['usable'])}/{len(e['templates'])}" if "usable" in e else f"families: {len(e['families'])}"
    cells = [(_cell(e["acc"].get(m)) if "acc" in e else "-")
             + (f" (mem {100 * e['memory'][m][0]:.0f})" if m in e.get("memory", {}) else "") for m in modes]
    ratio = {p: e["energy"].get("random", {}).get(p, 0) / x for p, x in e["energy"].get("massive", {}).items() if x}
    lines.append(f"| {name} ({used}) | " + " | ".join(cells) + f" | {_cell(_drop(e, 'massive')) if 'acc' in e else '-'} | "
                 f"{_strength(e['energy'], 'massive')} | "
                 + (" ".join(f"{p.replace('rot_', '')} {x:.2f}" for p, x in ratio.items()) or "-") + " | "
                 + (_shares(e.get("unmatched", {})) or "-") + " |")
  return "\n".join(lines)


def _shares(by_point: dict[str, float]) -> str:
  """{'rot_q': 0.012, 'rot_k': 0} -> 'q 1.2% k 0%'."""
  return " ".join(f"{p.replace('rot_', '')} {100 * x:.2g}%" for p, x in by_point.items())


def dose_table(pooled: dict, model: str, doses: dict[str, str]) -> str:
  """Dose-response: per family and kind, accuracy % [95% CI] and the Q/K energy removed at every
  lambda of DOSE_LAMS and top-k of DOSE_TOPK."""
  lines = ["Dose-response: massive dims by lambda (M > lambda x head mean) and the top-k dims per head; "
           "accuracy % [95% CI] (energy removed).",
           f"| {model}: family | " + " | ".join(COLUMNS[d] for d in doses) + " |", "|---|" + "---|" * len(doses)]
  for name, e in _pooled_rows(pooled):
    lines.append(f"| {name} | " + " | ".join(
        f"{_cell(e['acc'].get(m)) if 'acc' in e else '-'} ({_strength(e['energy'], m)})" for m in doses.values()) + " |")
  return "\n".join(lines)


# ------------------------------------------------------------------------------------------ sources

def known_capitals(model, tokenizer, bos, batch: int, bucket: int = 0) -> tuple[list[tuple[str, str]], float]:
  """The capital pairs the undisrupted model completes right closed-book (memory for conflicts)."""
  pairs = suites._modal_pairs(tokenizer, suites.CAPITALS)
  items = suites.capitals(tokenizer, len(pairs), seed=0, bos=bos)
  records, _ = score_conditions(model, tokenizer, items, {"off": DisruptConfig(mode="off")}, batch=batch, bucket=bucket)
  by_capital = {c: k for k, c in pairs}
  known = [(by_capital[r["answer"]], r["answer"]) for r in records if r["success"]]
  return known, len(known) / len(items)


def load_sources(spec: str, suite: str, n: int, seed: int, batch: int, prompts: list[dict] | None = None,
                 bucket: int = 0):
  """[(label, model, tokenizer, items, probe prompts, notes)] for 'smollm2', 'random', a model to
  import (`imported`) or a run path; the items of `prompts` (suites.read_prompts rows) in place of the
  built-in ones when given."""
  own = lambda tokenizer, bos=None: suites.from_prompts(prompts, tokenizer, bos)
  if spec == "smollm2" or imported(spec):
    model, tokenizer, info = sources.load(spec)
    label = "SmolLM2-135M-Instruct" if spec == "smollm2" else info["name"]
    bos = None  # the importer's tokenizer adds BOS where the model's convention does (SmolLM2: never)
    if prompts:
      items = own(tokenizer, bos)
      return [(label, model, tokenizer, items, [it.prompt for it in items[:4]], {})]
    known, rate = known_capitals(model, tokenizer, bos, batch, bucket)
    items = suites.suite(tokenizer, suite, n, seed, bos, known=known)
    probe = [it.prompt for it in suites.suite(tokenizer, "quick", 4, seed + 1000, bos, known=known)]
    notes = {"closed_book_capitals_known": len(known), "closed_book_capitals_rate": rate}
    return [(label, model, tokenizer, items, probe, notes)]
  tokenizer = ByteTokenizer()
  if spec == "random":
    model, tokenizer = sources.tiny_random(seed)
    items = own(tokenizer) if prompts else suites.suite(tokenizer, suite, n, seed, lengths=((400, 6),))  # bytes
    return [("random-tiny", model, tokenizer, items, [it.prompt for it in items[:4]], {})]
  path = Path(spec)
  check(path.exists(), "--model", f"must be {MODELS}; {spec!r} does not exist")
  arms = [Path(d) for d in run_arms(spec, "--model").values()]   # diverged arms are left out: they get no verdict
  models = []
  for arm in arms:
    model, tcfg = checkpoints.load_model(str(arm))
    items = own(tokenizer) if prompts else suites.from_examples(data.eval_examples(tcfg.data, seed, n), tokenizer)
    probe = list(data.probe_tokens(tcfg.data, seed + 1000, 16, min(tcfg.data.seq_len, 128)))
    models.append((arm.name, model, tokenizer, items, probe, {"arm_dir": str(arm)}))
  return models


def check_fits(items, max_len: int, label: str, prompts_path: str) -> None:
  """Every prompt of a prompts file, with its new tokens, within a model's context of max_len tokens."""
  for it in items:
    check(len(it.prompt) + it.max_new <= max_len, f"{prompts_path}:{it.meta['line']}: prompt",
          f"{len(it.prompt)} tokens + {it.max_new} new exceed the context of {label} ({max_len} tokens)")


# --------------------------------------------------------------------------------------------- main

def flag(field: str) -> str:
  """How the command line names a study field in an error: top_k -> --top-k (the lab: disrupt.top_k)."""
  return "--" + field.replace("_", "-")


@dataclasses.dataclass(frozen=True)
class DisruptStudy:
  """A C5 study: every option of `python -m analysis disrupt` but --out, with its defaults (the flag
  of a field is its name: top_k is --top-k). `plan` checks it without loading a model."""
  model: str                                 # smollm2 | random | runs/<experiment>[/<arm>]
  prompts: str = ""                          # FILE.jsonl: your own items in place of the built-in suite
  suite: str = "templates"                   # one of suites.SUITES (--prompts replaces it)
  n: int = 20                                # examples per task (per template)
  seed: int = 0
  batch: int = 8
  bucket: int = 32                           # a batch's prompts right-padded to a multiple of this (0: equal lengths)
  tasks: str = ""                            # comma list of task-name prefixes to keep (e.g. passkey,conflict)
  modes: str = ",".join(TABLE_MODES)         # comma list of disrupt.MODES; must include off
  draws: int = DRAWS                         # seeded draws of the random control
  dose: bool = False                         # also the massive dims at DOSE_LAMS and the top-k of DOSE_TOPK
  rope: str = DisruptConfig.rope             # post (rot_q/rot_k, the paper) | pre (q/k)
  criterion: str = DisruptConfig.criterion   # lambda | topk
  lam: float = DisruptConfig.lam
  top_k: int = DisruptConfig.top_k
  layers: str = ""                           # start:stop (stop exclusive); empty = every layer
  source: str = DisruptConfig.source         # prompt | probe


def add_arguments(ap: argparse.ArgumentParser) -> None:
  d = DisruptStudy
  ap.add_argument("--model", required=True, help="smollm2 | random | runs/<experiment>[/<arm>]")
  ap.add_argument("--out", required=True)
  ap.add_argument("--prompts", default=d.prompts, help="FILE.jsonl: your own items in place of the built-in suite")
  ap.add_argument("--suite", default=d.suite, choices=suites.SUITES)
  ap.add_argument("--n", type=int, default=d.n, help="examples per task (per template)")
  ap.add_argument("--seed", type=int, default=d.seed)
  ap.add_argument("--batch", type=int, default=d.batch)
  ap.add_argument("--bucket", type=int, default=d.bucket, help="right-pad a batch's prompts to a multiple of this "
                  "many tokens, so few prompt lengths compile (0: batches of equal lengths only)")
  ap.add_argument("--tasks", default=d.tasks, help="comma list of task-name prefixes to keep (e.g. passkey,conflict)")
  ap.add_argument("--modes", default=d.modes, help=f"comma list of {', '.join(disrupt.MODES)}; must include off")
  ap.add_argument("--draws", type=int, default=d.draws, help="seeded draws of the random control")
  ap.add_argument("--dose", action="store_true", help="also the massive dims at lambda 3, 4, 5, 6 and the "
                  "top-1/2/4 dims per head")
  ap.add_argument("--rope", default=d.rope, help="post (rot_q/rot_k, the paper) | pre (q/k)")
  ap.add_argument("--criterion", default=d.criterion, help="lambda | topk")
  ap.add_argument("--lam", type=float, default=d.lam)
  ap.add_argument("--top-k", type=int, default=d.top_k)
  ap.add_argument("--layers", default=d.layers, help="start:stop (stop exclusive); empty = every layer")
  ap.add_argument("--source", default=d.source, help="prompt | probe")


def fields_from_args(cls, args: argparse.Namespace):
  """The study `cls` of parsed arguments: each field from the flag of its name (--out is not one)."""
  return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})


def study_from_args(args: argparse.Namespace) -> DisruptStudy:
  return fields_from_args(DisruptStudy, args)


def config_from(cfg: DisruptStudy, name=flag) -> tuple[DisruptConfig, dict[str, DisruptConfig]]:
  """(base config, {label: config} of every condition); `name` spells a field in an error."""
  start, stop = 0, 0
  if cfg.layers:
    parts = cfg.layers.split(":")
    check(len(parts) == 2 and all(p.strip().isdigit() for p in parts), name("layers"),
          f"must read start:stop, e.g. 0:10; got {cfg.layers!r}")
    start, stop = int(parts[0]), int(parts[1])
  modes = parse_modes(cfg.modes)
  for m in modes:
    check_choice(name("modes"), m, disrupt.MODES)
  check("off" in modes, name("modes"), f"must include 'off' (every drop is measured from it); got {cfg.modes!r}")
  check(cfg.draws >= 1, name("draws"), f"must be >= 1; got {cfg.draws}")
  base = DisruptConfig(mode="massive", rope=cfg.rope, criterion=cfg.criterion, lam=cfg.lam, top_k=cfg.top_k,
                       layer_start=start, layer_stop=stop, source=cfg.source)
  return base, conditions(base, modes, cfg.draws, cfg.dose)


def parse_modes(text: str) -> tuple[str, ...]:
  return tuple(dict.fromkeys(m.strip() for m in text.split(",") if m.strip()))


FAMILIES = ("passkey", "context_facts", "recall", "capitals", "capitals_yesno", "conflict", "kb_facts")
"""Task families of the built-in suites and of the lab's own examples; --tasks filters by prefix."""


def task_filter(text: str, families=FAMILIES, field: str = "--tasks") -> tuple[str, ...]:
  """The --tasks prefixes, each checked against the families before any model is loaded."""
  keep = tuple(t.strip() for t in text.split(",") if t.strip())
  for t in keep:
    check(any(f.startswith(t) or t.startswith(f) for f in families), field,
          f"{t!r} names no task; tasks start with one of {', '.join(families)}")
  return keep


FILES = "a run directory, a .gguf file or an HF model directory"
MODELS = f"'smollm2', 'random', {FILES}"
"""What the C5 and C6 studies load, in words."""


def imported(spec: str) -> bool:
  """Whether a model spec names weights to import: a .gguf file, or an HF model directory (config.json
  beside *.safetensors; a run's arm holds config.json beside checkpoints/)."""
  path = Path(spec)
  if spec.endswith(".gguf"):
    return path.is_file()
  return path.is_dir() and (path / "config.json").is_file() and any(path.glob("*.safetensors"))


def check_model(spec: str, field: str = "--model", *also: str, run: bool = False) -> None:
  """A model spec that can be loaded: smollm2, random, an existing path (or one of `also`); with
  `run`, a path is a run directory or a model to import (the C5 and C6 studies). An empty spec is no
  path: Path('') is the working directory."""
  path = Path(spec) if spec else None
  found = path is not None and (path.is_dir() or imported(spec) if run else path.exists())
  names = ", ".join(map(repr, ("smollm2", "random", *also)))
  allowed = f"{names}, {FILES}" if run else f"{names} or an existing path"
  check(spec in ("smollm2", "random", *also) or found, field, f"must be {allowed}; got {spec!r}")


def check_shared(cfg, model: bool = True, families=FAMILIES, name=flag) -> None:
  """Settings shared by the C5 and C6 studies (a DisruptStudy or a QuantStudy), checked before any
  model is loaded (the model spec too, unless `model` is False: the lab's own arms exist only once it
  has trained them)."""
  if model:
    check_model(cfg.model, name("model"), run=True)
  task_filter(cfg.tasks, families, name("tasks"))
  check(cfg.n >= 2, name("n"), f"must be >= 2 (balanced task sets); got {cfg.n}")
  check_seed(cfg.seed, name("seed"))
  check(cfg.batch >= 1, name("batch"), f"must be >= 1; got {cfg.batch}")
  check(cfg.bucket >= 0, name("bucket"), f"must be >= 0 (0: equal lengths only); got {cfg.bucket}")
  check_choice(name("suite"), cfg.suite, suites.SUITES)


def prepared_sources(cfg, prompts: list[dict] | None = None) -> list[tuple]:
  """load_sources with each model's items filtered by the study's tasks; a filter that keeps
  nothing, or a prompt longer than a model's context, is an error before anything is written."""
  keep = task_filter(cfg.tasks, _families(prompts))
  models = []
  for label, model, tokenizer, items, probe, notes in load_sources(cfg.model, cfg.suite, cfg.n, cfg.seed,
                                                                   cfg.batch, prompts, cfg.bucket):
    items = [it for it in items if not keep or it.task.startswith(keep)]
    check(bool(items), "--tasks", f"no task of {label} starts with {cfg.tasks!r}")
    if prompts:
      check_fits(items, model.cfg.max_len, label, cfg.prompts)
    models.append((label, model, tokenizer, items, probe, notes))
  return models


def _families(prompts: list[dict] | None) -> tuple[str, ...]:
  return tuple(dict.fromkeys(r["family"] for r in prompts)) if prompts else FAMILIES


def plan(cfg: DisruptStudy, model: bool = True, name=flag) -> tuple[DisruptConfig, dict[str, DisruptConfig],
                                                                    list[dict] | None]:
  """(base config, conditions, rows of the prompts file or None) of a study, every setting and every
  line of its prompts file checked without loading a model; `name` spells a field in an error
  (flag: --n; the lab: disrupt.n)."""
  base, conds = config_from(cfg, name)
  prompts = suites.read_prompts(cfg.prompts, name("prompts")) if cfg.prompts else None
  check_shared(cfg, model, _families(prompts), name)
  return base, conds, prompts


def check_dims(cfg: DisruptStudy, base: DisruptConfig, model_cfg, label: str, name=flag) -> None:
  """The settings a model's config bounds, before any work (the lab: before it trains its arms): the
  layer range within its layers, the top-k dims of criterion topk within its heads."""
  n_layers, head_dim = model_cfg.n_layers, model_cfg.dim_per_head
  check((base.layer_stop or n_layers) <= n_layers, name("layers"),
        f"must stop at most at the {n_layers} layers of {label}; got {cfg.layers!r}")
  check(base.criterion != "topk" or base.top_k <= head_dim, name("top_k"),
        f"must be at most the head_dim {head_dim} of {label} (criterion topk); got {base.top_k}")


OUTPUTS = ("verdict.json", "results.jsonl", "summary.json", "table.md", "c5.png", "claims.json", "claims.md")
"""What a C5 output folder holds, its own mark first: an --out holding anything else is refused
(minilm.atomic.staged_dir), a C6 output included."""


def run(cfg: DisruptStudy, out: str) -> dict:
  """Validate, load every model, then write the outputs into a staging folder that replaces `out`
  only when complete: a bad setting or a failure midway leaves an earlier `out` as it was."""
  base, conds, prompts = plan(cfg)
  atomic.check_out_dir(out)
  models = prepared_sources(cfg, prompts)
  for label, model, *_ in models:
    check_dims(cfg, base, model.cfg, repr(label))
  t_all = time.perf_counter()
  modes = parse_modes(cfg.modes)   # the columns (the random draws pooled); the doses have their own table
  report = {"disrupt": dataclasses.asdict(base), "modes": modes, "conditions": {l: dataclasses.asdict(c) for l, c in conds.items()},
            "draws": cfg.draws, "dose": dose_labels(conds) if cfg.dose else {},
            "suite": "prompts" if prompts else cfg.suite, "prompts": cfg.prompts, "n": cfg.n, "seed": cfg.seed,
            "rule": RULE, "models": {}}
  all_records, pools = [], {}
  with atomic.staged_dir(out, owns=OUTPUTS) as staging:
    folder = Path(staging)
    with open(folder / "results.jsonl", "w") as sink:
      for label, model, tokenizer, items, probe_prompts, notes in models:
        probe = disrupt.probe_norms(model, probe_prompts, base) if base.source == "probe" else None
        records, seconds = score_conditions(model, tokenizer, items, conds, label=label, batch=cfg.batch,
                                            bucket=cfg.bucket, probe=probe, sink=sink)
        all_records += records
        pools[label] = pool(records, label)
        report["models"][label] = {"seconds": seconds, "examples": len(items),
                                   "position": model.cfg.position.kind, **notes}
    report["seconds_total"] = time.perf_counter() - t_all
    write_outputs(folder, report, all_records, pools)
  return report


def write_outputs(out: Path, report: dict, records: list[dict], pools: dict[str, dict]) -> None:
  """summary.json, verdict.json, claims, table.md and c5.png of a finished run."""
  summary, labels, modes = summarize(records), list(report["models"]), report["modes"]
  verdicts = [c5_verdict(pools[m], m) for m in labels]
  report.update(summary=summary, pooled={m: pooled_json(p) for m, p in pools.items()}, verdicts=verdicts)
  atomic.write_json(str(out / "summary.json"), report)
  atomic.write_json(str(out / "verdict.json"), verdicts)
  write_claims([claim(verdicts, pools, {m: report["models"][m]["position"] for m in labels})], str(out))
  columns = [m for m in dict.fromkeys(TABLE_MODES + tuple(modes)) if m in modes]
  text = []
  for m in labels:
    text += ["Per template: accuracy % [Wilson 95%]; random: the mean over its draws.", table(summary, m, columns),
             pooled_table(pools[m], m, columns)]
    text += [dose_table(pools[m], m, report["dose"])] if report["dose"] else []
  text += [f"C5 [{v['model']}]: {v['status']} ({v['summary']})" for v in verdicts] + [f"Rule: {RULE}"]
  atomic.write_text(str(out / "table.md"), "\n\n".join(text) + "\n")
  plot(summary, out / "c5.png", columns)


def print_report(report: dict, out: str) -> None:
  """The tables of a finished study (its table.md) and the files it wrote."""
  print((Path(out) / "table.md").read_text())
  print(f"wrote {out}/results.jsonl, summary.json, table.md, c5.png, verdict.json, claims.json "
        f"({report['seconds_total']:.0f} s)")


def run_and_print(args: argparse.Namespace) -> None:
  """`python -m analysis disrupt`: the study of the parsed arguments, run into --out."""
  print_report(run(study_from_args(args), args.out), args.out)
