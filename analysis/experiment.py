"""Claim C5 end to end: a task suite under every disruption mode -> JSONL, table, bar plot, verdict.

  python -m analysis disrupt --model smollm2 --out reports/c5_smollm2            # quick suite
  python -m analysis disrupt --model smollm2 --suite full --n 40 --out reports/c5_full
  python -m analysis disrupt --model runs/paired --out reports/c5_paired          # every arm
  python -m analysis disrupt --model random --n 2 --out /tmp/c5_smoke              # plumbing only
(`python -m analysis.experiment ...` takes the same arguments.)

Files in --out: results.jsonl (every example: prompt, output, verdict, dims replaced), summary.json
(accuracy with Wilson 95% intervals per model, task and mode; timings), table.md, c5.png,
verdict.json (per model), claims.json / claims.md (the C5 analysis.claims.Verdict).
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

from analysis import disrupt, tasks_llm
from analysis.disrupt import DisruptConfig
from minilm import atomic, generate
from minilm.cli import guarded
from minilm.config import check, check_choice

TABLE_MODES = ("off", "smallest", "massive", "matched", "v")
COLUMNS = {"off": "original", "smallest": "non-massive disrupted", "massive": "massive disrupted",
           "matched": "norm-matched random", "v": "V disrupted", "massive_zero": "massive -> 0",
           "top1": "top-1 -> mean", "top2": "top-2 -> mean", "top4": "top-4 -> mean"}
CHANCE = {"capitals_yesno": 0.5}  # tasks with a non-zero guessing rate


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
  """Wilson score interval for k successes out of n."""
  if n == 0:
    return 0.0, 1.0
  p, z2 = k / n, z * z
  centre = (p + z2 / (2 * n)) / (1 + z2 / n)
  half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
  return max(0.0, centre - half), min(1.0, centre + half)


# --------------------------------------------------------------------------------------- evaluation

def evaluate(model, tokenizer, items, modes, base: DisruptConfig, *, label: str = "model", batch: int = 8,
             probe=None, sink=None) -> tuple[list[dict], dict[str, float]]:
  """Run every item under every mode; equal-length prompts share a batch (padded with copies of its
  last row so each length compiles once) and one capture pass serves all modes of a batch.
  Returns (records, seconds per mode including the capture passes as 'capture')."""
  groups, index = {}, {id(item): i for i, item in enumerate(items)}
  for item in items:
    groups.setdefault((len(item.prompt), item.max_new), []).append(item)
  records, seconds = [], {m: 0.0 for m in ("capture",) + tuple(modes)}
  for (_, max_new), group in groups.items():
    for start in range(0, len(group), batch):
      chunk = group[start:start + batch]
      rows = [it.prompt for it in chunk] + [chunk[-1].prompt] * (batch - len(chunk))
      tokens = np.stack(rows)
      t0 = time.perf_counter()
      M, S = disrupt.norms_and_spread(model, tokens, base)  # one capture pass serves every mode
      M_choose = M if base.source == "prompt" else disrupt.dim_norms(model, tokens, base, probe)
      seconds["capture"] += time.perf_counter() - t0
      for mode in modes:
        cfg = dataclasses.replace(base, mode=mode)
        t0 = time.perf_counter()
        args, counts = disrupt.hook_args(M_choose, cfg, model.cfg.n_layers)  # 'off': all-False masks
        out = np.asarray(generate.greedy(model, tokens, max_new, hook=disrupt.hook, hook_args=args))
        seconds[mode] += time.perf_counter() - t0
        removed = disrupt.energy_removed(M, S, args, cfg, model.cfg.n_layers)
        for i, item in enumerate(chunk):
          v = tasks_llm.verdict(item, out[i], tokenizer)
          rec = {"model": label, "mode": mode, "task": item.task, "example": index[id(item)], "kind": item.kind,
                 "verdict": v,
                 "success": tasks_llm.success(item, v), "answer": item.answer,
                 "output": tokenizer.decode([int(t) for t in out[i]]), "prompt": item.text,
                 "prompt_tokens": len(item.prompt), "dims_replaced": {p: int(c[i]) for p, c in counts.items()},
                 "energy_removed": {p: float(e[i]) for p, e in removed.items()},
                 "disrupt": dataclasses.asdict(cfg), "meta": {k: _jsonable(x) for k, x in item.meta.items()}}
          records.append(rec)
          if sink is not None:
            sink.write(json.dumps(rec) + "\n")
      if sink is not None:
        sink.flush()
        print(f"[{label}] {chunk[0].task} len {len(chunk[0].prompt)}: {len(records)} records, "
              + ", ".join(f"{m} {s:.0f}s" for m, s in seconds.items()), file=sys.stderr, flush=True)
  return records, seconds


def _jsonable(x):
  return x.item() if isinstance(x, np.generic) else x


def summarize(records: list[dict]) -> list[dict]:
  """Accuracy (success rate) with a Wilson interval per (model, task, mode); conflict splits too."""
  cells = {}
  for r in records:
    cells.setdefault((r["model"], r["task"], r["mode"]), []).append(r)
  rows = []
  for (model, task, mode), rs in cells.items():
    k, n = sum(r["success"] for r in rs), len(rs)
    row = {"model": model, "task": task, "kind": rs[0]["kind"], "mode": mode, "n": n, "k": k,
           "acc": k / n, "ci": wilson(k, n),
           "mean_dims_replaced": {p: float(np.mean([r["dims_replaced"][p] for r in rs])) for p in rs[0]["dims_replaced"]},
           "mean_energy_removed": {p: float(np.mean([r["energy_removed"][p] for r in rs]))
                                   for p in rs[0].get("energy_removed", {})}}
    if rs[0]["kind"] == "conflict":
      row["split"] = {v: sum(r["verdict"] == v for r in rs) / n for v in ("context", "memory", "other")}
    rows.append(row)
  return rows


def table(summary: list[dict], model: str, modes=TABLE_MODES) -> str:
  """Markdown table in the paper's layout: task rows, one column per mode; accuracy % [95% CI]."""
  cell = {(r["task"], r["mode"]): r for r in summary if r["model"] == model}
  tasks = list(dict.fromkeys(r["task"] for r in summary if r["model"] == model))
  modes = [m for m in modes if any((t, m) in cell for t in tasks)]
  lines = [f"| {model}: task (n) | " + " | ".join(COLUMNS[m] for m in modes) + " |",
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
      ax.bar(np.arange(len(tasks)) + j * width, acc, width, yerr=err, capsize=2, label=COLUMNS[m])
    ax.set_xticks(np.arange(len(tasks)) + 0.4 - width / 2, tasks, fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("accuracy")
    ax.set_title(model)
    ax.legend(fontsize=7, ncol=len(used), loc="upper center", bbox_to_anchor=(0.5, -0.12))
  fig.tight_layout()
  atomic.savefig(fig, str(path), dpi=110)
  plt.close(fig)


# ------------------------------------------------------------------------------------------ verdict

# Fixed before any data was seen. Tasks count only where the undisrupted model can do them:
# contextual/conflict tasks need original accuracy >= USABLE; parametric tasks need the Wilson
# lower bound above chance. Drops are mean absolute accuracy drops over the usable tasks.
USABLE, BIG_DROP, GAP, SMALL_DROP = 0.8, 0.3, 0.2, 0.1
RULE = (f"supported: contextual drop under massive disruption >= {BIG_DROP}, exceeding the parametric drop "
        f"by >= {GAP}, while the smallest-M control drops contextual accuracy <= {SMALL_DROP}; refuted: "
        f"massive drop < {SMALL_DROP}, or the control drops within 0.05 of it, or parametric drops as much; "
        f"inconclusive otherwise or when no contextual task reaches {USABLE} undisrupted (usable parametric: "
        f"Wilson lower bound above chance)")


def c5_verdict(summary: list[dict], model: str) -> dict:
  """The C5 verdict for one model by RULE (a dict shaped like analysis.claims.Verdict)."""
  cell = {(r["task"], r["mode"]): r for r in summary if r["model"] == model}
  tasks = list(dict.fromkeys(t for t, _ in cell))

  def drop(task, mode):
    return cell[(task, "off")]["acc"] - cell[(task, mode)]["acc"] if (task, mode) in cell else None

  def usable(t):
    r = cell.get((t, "off"))
    if r is None or (t, "massive") not in cell:
      return False
    if r["kind"] == "parametric":
      return r["ci"][0] > CHANCE.get(t, 0.0)
    return r["acc"] >= USABLE

  ctx = [t for t in tasks if usable(t) and cell[(t, "off")]["kind"] == "contextual"]
  par = [t for t in tasks if usable(t) and cell[(t, "off")]["kind"] == "parametric"]
  mean = lambda xs: float(np.mean(xs)) if xs else None
  ev = {"usable_contextual": ctx, "usable_parametric": par,
        "contextual_drop_massive": mean([drop(t, "massive") for t in ctx]),
        "parametric_drop_massive": mean([drop(t, "massive") for t in par]),
        "contextual_drop_smallest": mean([drop(t, "smallest") for t in ctx if (t, "smallest") in cell]),
        "contextual_drop_matched": mean([drop(t, "matched") for t in ctx if (t, "matched") in cell]),
        "contextual_drop_v": mean([drop(t, "v") for t in ctx if (t, "v") in cell])}
  conflict = [r for r in summary if r["model"] == model and r["kind"] == "conflict"]
  ev["conflict_split"] = {r["mode"]: r["split"] for r in conflict}
  c, p, s = ev["contextual_drop_massive"], ev["parametric_drop_massive"], ev["contextual_drop_smallest"]
  f = lambda x: "-" if x is None else f"{x:.2f}"
  if c is None:
    status, why = "inconclusive", f"no contextual task reaches {USABLE} undisrupted (or none ran under 'massive')"
  elif s is None:
    status, why = "inconclusive", "the smallest-M control was not run"
  elif c < SMALL_DROP or s >= c - 0.05 or (p is not None and p >= c):
    status, why = "refuted", f"contextual drop {f(c)}, control drop {f(s)}, parametric drop {f(p)}"
  elif c >= BIG_DROP and s <= SMALL_DROP and (p is None or c - p >= GAP):
    status, why = "supported", f"contextual drop {f(c)}, parametric drop {f(p)}, control drop {f(s)}"
  else:
    status, why = "inconclusive", f"contextual drop {f(c)}, parametric drop {f(p)}, control drop {f(s)}"
  if p is None and status == "supported":
    status, why = "inconclusive", why + "; no usable parametric task to compare"
  return {"claim": "C5", "model": model, "status": status, "summary": why, "evidence": ev, "rule": RULE}


def drop_interval(records: list[dict], model: str, tasks: list[str], mode: str = "massive",
                  n_boot: int = 2000, seed: int = 0) -> tuple[float, float] | None:
  """95% paired bootstrap interval of the mean (over tasks) accuracy drop off -> mode: examples are
  resampled within each task, the same draw for both modes (each example ran under every mode)."""
  if not tasks:
    return None
  rng, reps = np.random.default_rng(seed), np.zeros(n_boot)
  for t in tasks:
    got = {(r["mode"], r["example"]): r["success"] for r in records if r["model"] == model and r["task"] == t}
    ex = sorted({e for m, e in got if m == "off"})
    diff = np.array([got[("off", e)] - got[(mode, e)] for e in ex], np.float64)
    reps += diff[rng.integers(0, len(ex), (n_boot, len(ex)))].mean(1) / len(tasks)
  return tuple(float(x) for x in np.percentile(reps, [2.5, 97.5]))


def claim(verdicts: list[dict], records: list[dict], positions: dict[str, str]):
  """One analysis.claims.Verdict for C5: the first RoPE model (or the only model) decides, a NoPE
  model (paired arm) is the reference column."""
  from analysis.claims import Verdict
  main_ = next((v for v in verdicts if positions.get(v["model"]) != "nope"), verdicts[0])
  ref = next((v for v in verdicts if positions.get(v["model"]) == "nope" and v is not main_), None)
  ci = lambda v: drop_interval(records, v["model"], v["evidence"]["usable_contextual"])
  c, r = main_["evidence"]["contextual_drop_massive"], ref and ref["evidence"]["contextual_drop_massive"]
  status = {"refuted": "not supported"}.get(main_["status"], main_["status"])
  return Verdict("C5", "Function", "contextual accuracy drop under massive Q/K disruption (mean over usable "
                 "tasks), absolute", status, RULE, rope=c, rope_ci=ci(main_) if c is not None else None,
                 nope=r, nope_ci=ci(ref) if r is not None else None,
                 diff=None if c is None or r is None else c - r, reference=f"arm {ref['model']}" if ref else "",
                 notes=f"{main_['model']}: {main_['summary']}")


# ------------------------------------------------------------------------------------------ sources

def known_capitals(model, tokenizer, bos, batch: int) -> tuple[list[tuple[str, str]], float]:
  """The capital pairs the undisrupted model completes right closed-book (memory for conflicts)."""
  pairs = tasks_llm._modal_pairs(tokenizer, tasks_llm.CAPITALS)
  items = tasks_llm.capitals(tokenizer, len(pairs), seed=0, bos=bos)
  records, _ = evaluate(model, tokenizer, items, ("off",), DisruptConfig(), batch=batch)
  by_capital = {c: k for k, c in pairs}
  known = [(by_capital[r["answer"]], r["answer"]) for r in records if r["success"]]
  return known, len(known) / len(items)


def load_sources(spec: str, suite: str, n: int, seed: int, batch: int):
  """[(label, model, tokenizer, items, probe prompts, notes)] for 'smollm2', 'random' or a run path."""
  if spec == "smollm2":
    from minilm import importers
    model, tokenizer, info = importers.load("smollm2")
    bos = None  # the importer's tokenizer adds BOS where the model's convention does (SmolLM2: never)
    known, rate = known_capitals(model, tokenizer, bos, batch)
    items = tasks_llm.suite(tokenizer, suite, n, seed, bos, known=known)
    probe = [it.prompt for it in tasks_llm.suite(tokenizer, "quick", 4, seed + 1000, bos, known=known)]
    notes = {"closed_book_capitals_known": len(known), "closed_book_capitals_rate": rate}
    return [("SmolLM2-135M-Instruct", model, tokenizer, items, probe, notes)]
  from train.tokenizer import Tokenizer
  tokenizer = Tokenizer()
  if spec == "random":  # plumbing check: a tiny untrained decoder on the byte tokenizer
    from flax import nnx
    from minilm.config import ModelConfig
    from minilm.model import Decoder
    cfg = ModelConfig(vocab_size=tokenizer.vocab_size, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_len=2048)
    model = Decoder(cfg, rngs=nnx.Rngs(seed))
    items = tasks_llm.suite(tokenizer, suite, n, seed, lengths=((400, 6),))  # bytes: ~4x longer prompts
    return [("random-tiny", model, tokenizer, items, [it.prompt for it in items[:4]], {})]
  path = Path(spec)
  check(path.exists(), "--model", f"must be 'smollm2', 'random' or a run directory; {spec!r} does not exist")
  from analysis.trace import run_arms
  from train import checkpoints, data
  arms = [Path(d) for d in run_arms(spec).values()]   # diverged arms are left out: they get no verdict
  sources = []
  for arm in arms:
    model, tcfg = checkpoints.load_model(str(arm))
    items = tasks_llm.from_examples(data.eval_examples(tcfg.data, seed, n), tokenizer)
    probe = list(data.probe_tokens(tcfg.data, seed + 1000, 16, min(tcfg.data.seq_len, 128)))
    sources.append((arm.name, model, tokenizer, items, probe, {"arm_dir": str(arm)}))
  return sources


# --------------------------------------------------------------------------------------------- main

def add_arguments(ap: argparse.ArgumentParser) -> None:
  ap.add_argument("--model", required=True, help="smollm2 | random | runs/<experiment>[/<arm>]")
  ap.add_argument("--out", required=True)
  ap.add_argument("--suite", default="quick", choices=tasks_llm.SUITES)
  ap.add_argument("--n", type=int, default=20, help="examples per task")
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--tasks", default="", help="comma list of task-name prefixes to keep (e.g. passkey,conflict)")
  ap.add_argument("--modes", default=",".join(TABLE_MODES), help=f"comma list of {', '.join(disrupt.MODES)}")
  ap.add_argument("--rope", default="post", help="post (rot_q/rot_k, the paper) | pre (q/k)")
  ap.add_argument("--criterion", default="lambda", help="lambda | topk")
  ap.add_argument("--lam", type=float, default=5.0)
  ap.add_argument("--top-k", type=int, default=1)
  ap.add_argument("--layers", default="", help="start:stop (stop exclusive); empty = every layer")
  ap.add_argument("--source", default="prompt", help="prompt | probe")


def config_from(args) -> tuple[DisruptConfig, tuple[str, ...]]:
  start, stop = 0, 0
  if args.layers:
    parts = args.layers.split(":")
    check(len(parts) == 2 and all(p.strip().isdigit() for p in parts), "--layers",
          f"must read start:stop, e.g. 0:10; got {args.layers!r}")
    start, stop = int(parts[0]), int(parts[1])
  modes = tuple(m.strip() for m in args.modes.split(",") if m.strip())
  for m in modes:
    DisruptConfig(mode=m)  # one-line error for an unknown mode
  base = DisruptConfig(mode="massive", rope=args.rope, criterion=args.criterion, lam=args.lam, top_k=args.top_k,
                       layer_start=start, layer_stop=stop, source=args.source)
  return base, modes


FAMILIES = ("passkey", "context_facts", "recall", "capitals", "capitals_yesno", "conflict", "kb_facts")
"""Task families of the built-in suites and of the lab's own examples; --tasks filters by prefix."""


def task_filter(text: str) -> tuple[str, ...]:
  """The --tasks prefixes, each checked against the known families before any model is loaded."""
  keep = tuple(t.strip() for t in text.split(",") if t.strip())
  for t in keep:
    check(any(f.startswith(t) or t.startswith(f) for f in FAMILIES), "--tasks",
          f"{t!r} names no task; tasks start with one of {', '.join(FAMILIES)}")
  return keep


def check_model(spec: str, field: str = "--model", *also: str) -> None:
  """A model spec that can be loaded: smollm2, random, an existing path (or one of `also`)."""
  check(spec in ("smollm2", "random", *also) or Path(spec).exists(), field,
        f"must be 'smollm2', 'random'{''.join(f', {a!r}' for a in also)} or an existing path; got {spec!r}")


def check_shared(args, model: bool = True) -> None:
  """Settings shared by the C5 and C6 studies, checked before any model is loaded (the model spec
  too, unless `model` is False: the lab's own arms exist only once it has trained them)."""
  if model:
    check_model(args.model)
  task_filter(args.tasks)
  check(args.n >= 2, "--n", f"must be >= 2 (balanced task sets); got {args.n}")
  check(args.batch >= 1, "--batch", f"must be >= 1; got {args.batch}")
  check_choice("--suite", args.suite, tasks_llm.SUITES)
  atomic.check_out_dir(args.out)


def prepared_sources(args) -> list[tuple]:
  """load_sources with each model's items filtered by --tasks; a filter that keeps nothing is an
  error before anything is written."""
  keep = task_filter(args.tasks)
  sources = []
  for label, model, tokenizer, items, probe, notes in load_sources(args.model, args.suite, args.n, args.seed,
                                                                   args.batch):
    items = [it for it in items if not keep or it.task.startswith(keep)]
    check(bool(items), "--tasks", f"no task of {label} starts with {args.tasks!r}")
    sources.append((label, model, tokenizer, items, probe, notes))
  return sources


def plan(args, model: bool = True) -> tuple[DisruptConfig, tuple[str, ...]]:
  """(base config, modes) of parsed arguments, every option checked without loading a model."""
  base, modes = config_from(args)
  check_shared(args, model)
  return base, modes


def run(args) -> dict:
  """Validate, load every model, then write the outputs into a staging folder that replaces --out
  only when complete: a bad option or a failure midway leaves an earlier --out as it was."""
  base, modes = plan(args)
  sources = prepared_sources(args)
  for _, model, *_ in sources:
    base.layers(model.cfg.n_layers)  # a bad layer range fails before any work
  t_all = time.perf_counter()
  all_records, report = [], {"disrupt": dataclasses.asdict(base), "modes": modes, "suite": args.suite, "n": args.n,
                             "seed": args.seed, "models": {}}
  with atomic.staged_dir(args.out) as staging:
    out = Path(staging)
    with open(out / "results.jsonl", "w") as sink:
      for label, model, tokenizer, items, probe_prompts, notes in sources:
        probe = disrupt.probe_norms(model, probe_prompts, base) if base.source == "probe" else None
        records, seconds = evaluate(model, tokenizer, items, modes, base, label=label, batch=args.batch,
                                    probe=probe, sink=sink)
        all_records += records
        report["models"][label] = {"seconds": seconds, "examples": len(items),
                                   "position": model.cfg.position.kind, **notes}
    summary = summarize(all_records)
    labels = list(report["models"])
    verdicts = [c5_verdict(summary, m) for m in labels]
    report.update(summary=summary, verdicts=verdicts, seconds_total=time.perf_counter() - t_all)
    atomic.write_json(str(out / "summary.json"), report)
    atomic.write_json(str(out / "verdict.json"), verdicts)
    from analysis import claims
    claims.write_claims([claim(verdicts, all_records, {m: report["models"][m]["position"] for m in labels})],
                        str(out))
    text = "\n\n".join(table(summary, m, TABLE_MODES + tuple(m_ for m_ in modes if m_ not in TABLE_MODES))
                       for m in labels)
    text += "\n\n" + "\n".join(f"C5 [{v['model']}]: {v['status']} ({v['summary']})" for v in verdicts) + "\n"
    atomic.write_text(str(out / "table.md"), text)
    plot(summary, out / "c5.png", TABLE_MODES + tuple(m for m in modes if m not in TABLE_MODES))
  return report


def run_and_print(args) -> None:
  report = run(args)
  print((Path(args.out) / "table.md").read_text())
  print(f"wrote {args.out}/results.jsonl, summary.json, table.md, c5.png, verdict.json, claims.json "
        f"({report['seconds_total']:.0f} s)")


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(prog="analysis.experiment", description=__doc__.split("\n")[0])
  add_arguments(ap)
  args = ap.parse_args(argv)
  return guarded(lambda: run_and_print(args))


if __name__ == "__main__":
  raise SystemExit(main())
