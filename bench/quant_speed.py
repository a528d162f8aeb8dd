"""Time of the C6 quantization schemes: GPTQ per linear at SmolLM2's shapes, then every scheme on SmolLM2.

    .venv/bin/python bench/quant_speed.py [--layers-only] [--bits 4] [--repeats 3]

Per linear: GPTQ (group size 64, 4 bits) on random weights with H = X^T X of correlated inputs,
X [4096, d_in] as the study's 16 x 256 calibration tokens give; best of --repeats after one warm-up
call (the jitted row loop compiles once per shape). The shapes are SmolLM2-135M's linears, alone
and side by side as a shared-input group runs them (q|k|v: 576 x 960, gate|up: 576 x 3072).
Per scheme: analysis.studies.quantize_model.quantize_model on SmolLM2 with the study's calibration
windows (one run each: calibration, search and rounding of all 30 blocks).
"""
from __future__ import annotations

import argparse

import numpy as np

from minilm.machine import best_seconds

SHAPES = {"attn.q / attn.o": (576, 576), "mlp.gate / mlp.up": (576, 1536), "mlp.down": (1536, 576),
          "attn.q|k|v": (576, 960), "mlp.gate|up": (576, 3072)}
METHODS = ("rtn", "rtn_keep", "awq", "gptq", "smoothquant", "w8a8")


def layer_times(repeats: int) -> None:
  from analysis.studies import quantize as Q
  rng = np.random.default_rng(0)
  spec = Q.QuantSpec(4, group_size=64)
  print(f"{'linear':>18} {'shape':>11} {'gptq s':>8}")
  for name, (I, O) in SHAPES.items():
    x_NxI = (rng.normal(size=(4096, I // 4)) @ rng.normal(size=(I // 4, I)) + 0.1 * rng.normal(size=(4096, I))).astype(np.float32)
    w_IxO = (0.05 * rng.normal(size=(I, O))).astype(np.float32)
    h_IxI = x_NxI.T @ x_NxI
    Q.gptq(w_IxO, h_IxI, spec)
    best = best_seconds(lambda: Q.gptq(w_IxO, h_IxI, spec), repeats)
    print(f"{name:>18} {f'{I}x{O}':>11} {best:8.3f}", flush=True)


def scheme_times(methods: list[str], bits: list[int]) -> None:
  from analysis.studies import quantization as QS
  from analysis.studies import sources
  from analysis.studies import quantize_model as QM
  from minilm import importers
  model, tokenizer, _ = importers.load("smollm2")
  calib_BxT = sources.text_windows(tokenizer, 16, 256, heldout=False)
  print(f"{'scheme':>24} {'quantize s':>10}")
  for scheme in QS.schemes(methods, bits)[1:]:
    seconds = best_seconds(lambda: QM.quantize_model(model, scheme, calib_BxT))
    print(f"{scheme.name:>24} {seconds:10.1f}", flush=True)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--layers-only", action="store_true", help="GPTQ per linear only (no model load)")
  p.add_argument("--methods", default=",".join(METHODS), help="schemes of the per-scheme part")
  p.add_argument("--bits", default="4", help="weight bit widths of the per-scheme part, e.g. 8,4,3")
  p.add_argument("--repeats", type=int, default=3, help="timed GPTQ calls per shape (best is printed)")
  args = p.parse_args()
  layer_times(args.repeats)
  if not args.layers_only:
    scheme_times(args.methods.split(","), [int(b) for b in args.bits.split(",")])


if __name__ == "__main__":
  main()
