"""The default lab run's arithmetic floor: the FLOPs of its two largest stages, and the fewest seconds
they can take at a CPU's float32 matmul rate, beside the stage times a lab run recorded.

    .venv/bin/python bench/lab_floor.py [--config default] [--rate GFLOP/s ...] [--report DIR]

- train: every arm's train step at the experiment's batch x seq_len, times its steps.
- disrupt (C5): SmolLM2's greedy program (prefill, then decoding) at every batch shape the lab's C5
  study makes (its suite, batch and bucket: `generate.batches`), times the batches of that shape and
  the study's conditions.
FLOPs are XLA's cost analysis of the compiled programs on this machine (dots and elementwise ops;
a decoding loop's body counts once, not once per step). The other stages (trace, pretrained, C6,
the evaluations during training), compiling and figures are not counted, so the floor is a lower
bound: the work above run at the 2048^3 float32 matmul rate (measured here, or each --rate), on
every core for the whole run. The lab's two lanes share the cores, so the wall time cannot go below
the sum of the stages' floors.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter


def program_flops(fn, *args, **static) -> float:
  """XLA's FLOP count of jit(fn)(*args) as compiled here (static: fn's static keyword arguments)."""
  import jax
  compiled = (fn if hasattr(fn, "lower") else jax.jit(fn)).lower(*args, **static).compile()
  return float(compiled.cost_analysis()["flops"])


def train_flops(exp) -> dict[str, float]:
  """{arm: FLOPs of its whole training}: one train step's count times the arm's steps."""
  import jax.numpy as jnp
  from train import checkpoints, loop, sharding
  from train.step import init_opt_state, train_step
  out = {}
  for arm in exp.arms:
    cfg = exp.resolve(arm)
    B, T, mesh = cfg.data.batch_size, cfg.data.seq_len, sharding.make_mesh(1)
    params = loop.init_params(cfg.model, cfg.seed)
    graphdef, _, rest = checkpoints.abstract_model(cfg.model)
    opt = init_opt_state(params, cfg=cfg.optim, steps=cfg.steps, mesh=mesh, strategy="data")
    batch = {"inputs": jnp.zeros((B, T), jnp.int32), "targets": jnp.zeros((B, T), jnp.int32),
             "weights": jnp.ones((B, T), jnp.float32)}
    step = lambda p, o, b, i: train_step(p, o, rest, b, i, graphdef=graphdef, cfg=cfg.optim, steps=cfg.steps,
                                         mesh=mesh, strategy="data")
    out[arm] = program_flops(step, params, opt, batch, 0) * cfg.steps
  return out


def c5_shapes(prompts, max_new, batch: int, bucket: int) -> Counter:
  """{(rows, padded length, max_new): batches} of the C5 study's batching (filler rows included)."""
  from minilm import generate
  return Counter((tokens.shape[0], tokens.shape[1], n)
                 for _, tokens, _, n in generate.batches(prompts, max_new, batch, bucket=bucket))


def c5_flops(study) -> tuple[float, int, Counter]:
  """(FLOPs, conditions, shapes) of a C5 study on SmolLM2: each shape's greedy program, counted
  once, times its batches and the conditions (every condition runs the same program)."""
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx
  from analysis.studies import disrupt, disruption
  from minilm import generate
  [(_, model, _, items, _, _)] = disruption.load_sources(study.model, study.suite, study.n, study.seed,
                                                          study.batch, bucket=study.bucket)
  base, conds = disruption.config_from(study)
  shapes = c5_shapes([it.prompt for it in items], [it.max_new for it in items], study.batch, study.bucket)
  graphdef, state = nnx.split(model)
  total = 0.0
  for (B, T, max_new), count in shapes.items():
    lengths = np.full(B, T, np.int32)
    args, _ = disrupt.hook_args(disrupt.unmeasured(model.cfg, base, B), base, model.cfg.n_layers, None, list(range(B)))
    args = {**args, "valid": generate.valid_tokens(lengths, T)}
    total += count * len(conds) * program_flops(
        generate._greedy, graphdef, state, jnp.zeros((B, T), jnp.int32), jnp.asarray(lengths), args,
        max_new=max_new, hook=disrupt.hook, measure=disrupt.measure(base))
  return total, len(conds), shapes


def recorded_seconds(report: str) -> dict[str, float]:
  """{stage: seconds} from a lab report's stage markers (stages/<stage>.json)."""
  out = {}
  for stage in ("train", "disrupt"):
    path = os.path.join(report, "stages", f"{stage}.json")
    if os.path.exists(path):
      with open(path) as f:
        out[stage] = float(json.load(f)["seconds"])
  return out


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--config", default="default", help="a lab or experiment config: a configs/ name or a path")
  p.add_argument("--rate", type=float, action="append", default=[],
                 help="a float32 matmul rate in GFLOP/s to state the floor at too (another machine's)")
  p.add_argument("--report", help="a lab report folder (reports/<name>) whose recorded stage times to show")
  args = p.parse_args()
  if args.report and not os.path.isdir(os.path.join(args.report, "stages")):
    sys.exit(f"error: --report: {args.report!r} holds no stages/ folder (a lab report folder, reports/<name>)")
  from analysis.lab import run as lab_run
  from minilm.machine import matmul_rate
  lab, path = lab_run.read_config(args.config)
  if lab.disrupt.model == lab_run.RUN:
    sys.exit(f"error: disrupt.model: this floor counts C5 on an imported model (smollm2, a .gguf or an HF "
             f"folder); {path} runs it on the lab's own arms")
  exp = lab_run.experiment_of(lab, quick=False)

  train = train_flops(exp)
  c5, n_conds, shapes = c5_flops(lab.disrupt)
  rate = matmul_rate("float32")
  print(f"{os.path.relpath(path)}: {len(exp.arms)} arms ({', '.join(exp.arms)}); C5 on {lab.disrupt.model}, n {lab.disrupt.n}, "
        f"{n_conds} conditions, batch {lab.disrupt.batch}, bucket {lab.disrupt.bucket}")
  print("C5 batches (rows x length, max_new: batches per condition): "
        + ", ".join(f"{B}x{T}, {n}: {c}" for (B, T, n), c in sorted(shapes.items())))
  rates = [("here", rate)] + [(f"{r:g} GFLOP/s", r * 1e9) for r in args.rate]
  recorded = recorded_seconds(args.report) if args.report else {}
  print(f"float32 2048^3 matmul here: {rate / 1e9:.1f} GFLOP/s")
  head = "".join(f" {'floor s, ' + name:>22}" for name, _ in rates)
  print(f"{'stage':>8} {'TFLOP':>8}{head}{' recorded s':>12}")
  rows = [("train", sum(train.values())), ("disrupt", c5)]
  for stage, flops in rows + [("both", sum(f for _, f in rows))]:
    floors = "".join(f" {flops / r:22.0f}" for _, r in rates)
    seen = sum(recorded.values()) if stage == "both" and len(recorded) == 2 else recorded.get(stage)
    print(f"{stage:>8} {flops / 1e12:8.2f}{floors}{'' if seen is None else f'{seen:12.0f}'}")
  if recorded:
    print("(recorded: the stage markers' seconds; beside training the two stages overlap in time)")


if __name__ == "__main__":
  main()
