"""Synthetic task families: each builder draws one example as token and flag lists.

An example is `[BOS] ... [EOS]`; flag 1 marks answer tokens (the loss weights them with
`answer_weight`), flag 0 everything else. Builders take a token budget and return None when even
their shortest form does not fit, so a packer can fill a row with whole examples. Every random
choice comes from the numpy Generator passed in, so an example is a pure function of that stream.

Families (text formats; symbols are single tokens, see train.tokenizer):
- passkey: filler "The grass is green. The sky is blue. ..." repeated, the needle "The pass key is
  KEY. Remember it. KEY is the pass key." at a uniform depth (whole sentences), then "What is the
  pass key? The pass key is " and the KEY digits (byte tokens) as the answer. Held-out keys (about
  1 in 10, by a fixed hash) never occur in training.
- recall: "Remember: <K3><V17> <K9><V2>. " + filler gap + "Recall: <K9><V2> <K3><V17>." with fresh
  random pairs per example; the queried values are the answers.
- context_facts: "Facts: <E90> lives in <A4>. The home of <E77> is <A9>. " + filler gap + "Where does
  <E77> live? <E77> lives in <A9>. "; entities come from the non-KB pool, attributes are random.
- kb_facts: facts of the fixed knowledge base (entity i < kb_entities -> its attribute) in the
  statement templates or the question template, every attribute an answer; asked closed-book.
- conflict: a context_facts example whose last question is about a KB entity that the context gives
  a different attribute; the answer follows the context, meta keeps the memorised one.
"""
from __future__ import annotations

import dataclasses
import functools

import numpy as np

from train.tokenizer import BOS, EOS, ByteTokenizer

TOK = ByteTokenizer()
TASK_FAMILIES = ("passkey", "recall", "context_facts", "kb_facts", "conflict")

FILLER = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.",
          "There and back again.")
STATEMENTS = ("{e} lives in {a}. ", "The home of {e} is {a}. ", "{e} has made a home in {a}. ")
QUESTION = "Where does {e} live? {e} lives in {a}. "


def _b(text: str) -> list[int]:
  return list(text.encode("utf-8"))


_FILLER_IDS = [_b(s + " ") for s in FILLER]
_FILLER_CYCLE = [t for s in _FILLER_IDS for t in s]
_FILLER_PREFIX = np.cumsum([0] + [len(s) for s in _FILLER_IDS])  # tokens in the first r sentences


def filler_fit(budget: int) -> int:
  """Most filler sentences that fit in `budget` tokens."""
  q, rest = divmod(max(budget, 0), len(_FILLER_CYCLE))
  return q * len(FILLER) + int(np.searchsorted(_FILLER_PREFIX, rest, side="right")) - 1


def filler(start: int, n: int) -> list[int]:
  """n filler sentences, starting at sentence index `start` of the cycle."""
  out = []
  for i in range(start, start + n):
    out += _FILLER_IDS[i % len(FILLER)]
  return out


class _Template:
  """A fact template as token ids with the entity and attribute slots left to fill."""

  def __init__(self, template: str):
    self.toks, self.e_pos = [], []
    for i, chunk in enumerate(template.replace("{e}", "\0e\0").replace("{a}", "\0a\0").split("\0")):
      if i % 2:
        if chunk == "e":
          self.e_pos.append(len(self.toks))
        else:
          self.a_pos = len(self.toks)
        self.toks.append(0)
      else:
        self.toks += _b(chunk)
    self.flags = ([0] * len(self.toks), [int(j == self.a_pos) for j in range(len(self.toks))])

  def __len__(self):
    return len(self.toks)

  def render(self, e: int, a: int, answer: int, toks: list, flags: list) -> None:
    """Append the filled template to toks and its flags (1 on the attribute when `answer`)."""
    filled = self.toks.copy()
    for j in self.e_pos:
      filled[j] = e
    filled[self.a_pos] = a
    toks += filled
    flags += self.flags[answer]


_STATEMENTS = [_Template(t) for t in STATEMENTS]
_QUESTION = _Template(QUESTION)
_ALL_FACT_TEMPLATES = _STATEMENTS + [_QUESTION]


# Generator.random is several times cheaper per call than Generator.integers/permutation/choice,
# and train_batch draws thousands of small numbers per step on a 2-core CPU.
def _below(rng: np.random.Generator, high, size=None):
  """Uniform integers in [0, high): an int, or an int64 array of `size`."""
  if size is None:
    return int(rng.random() * high)
  return (rng.random(size) * high).astype(np.int64)


def _distinct(rng: np.random.Generator, n: int, k: int) -> np.ndarray:
  """k distinct uniform integers from range(n), in random order."""
  return np.argsort(rng.random(n))[:k]


_E0, _A0 = TOK.symbol("E", 0), TOK.symbol("A", 0)


def entity(i: int) -> int:
  return _E0 + i


def attribute(i: int) -> int:
  return _A0 + i


@dataclasses.dataclass
class Drawn:
  """One example: toks/flags lists ([BOS] ... [EOS]) and meta for the evaluation Example."""
  toks: list
  flags: list
  meta: dict


@functools.lru_cache(maxsize=8)
def knowledge_base(kb_seed: int, kb_entities: int, n_attributes: int) -> np.ndarray:
  """attribute index of KB entity i (entities 0..kb_entities-1); fixed by the data seed alone."""
  return np.random.default_rng([kb_seed, 0x6B62]).integers(n_attributes, size=kb_entities)


def _kb(cfg) -> np.ndarray:
  return knowledge_base(cfg.kb_seed, cfg.kb_entities, cfg.n_attributes)


# ------------------------------------------------------------------------------------ passkey

_QUESTION_PK = _b("What is the pass key? The pass key is ")


def _needle(key: str) -> list[int]:
  return _b(f"The pass key is {key}. Remember it. {key} is the pass key. ")


def passkey_is_heldout(key: int) -> bool:
  """Fixed hash split of the key space: about 1 key in 10 is reserved for evaluation."""
  return (((key * 2654435761) & 0xFFFFFFFF) >> 16) % 10 == 0


def _passkey_overhead(digits: int) -> int:
  return 2 + len(_needle("0" * digits)) + len(_QUESTION_PK) + digits


def passkey(rng: np.random.Generator, cfg, budget: int, heldout: bool) -> Drawn | None:
  """Needle at a uniform sentence depth; held-out examples use the full budget of filler."""
  n_max = filler_fit(budget - _passkey_overhead(cfg.passkey_digits))
  if n_max < 1:
    return None
  lo = 10 ** (cfg.passkey_digits - 1)
  while True:
    key = lo + _below(rng, 9 * lo)
    if passkey_is_heldout(key) == heldout:
      break
  n = n_max if heldout else (n_max + 1) // 2 + _below(rng, n_max + 1 - (n_max + 1) // 2)
  depth = _below(rng, n + 1)
  key_ids = _b(str(key))
  body = filler(0, depth) + _needle(str(key)) + filler(depth, n - depth) + _QUESTION_PK
  toks = [BOS] + body + key_ids + [EOS]
  flags = [0] * (1 + len(body)) + [1] * len(key_ids) + [0]
  return Drawn(toks, flags, {"key": str(key), "depth": depth / n, "filler_sentences": n})


# ------------------------------------------------------------------------------------- recall

_REMEMBER, _RECALL, _SEP, _END_PAIRS, _END = _b("Remember: "), _b("Recall: "), _b(" "), _b(". "), _b(".")


def _recall_fixed(cfg) -> int:
  return (2 + len(_REMEMBER) + 3 * cfg.recall_pairs - 1 + len(_END_PAIRS) + len(_RECALL)
          + 3 * cfg.recall_queries - 1 + len(_END))


def _gap(rng: np.random.Generator, cfg, room: int) -> list[int]:
  """Filler between statements and questions: uniform in 0..gap_fraction*seq_len tokens (whole
  sentences, capped by the room left)."""
  n = _below(rng, filler_fit(min(room, int(cfg.gap_fraction * cfg.seq_len))) + 1)
  return filler(0, n)


def recall(rng: np.random.Generator, cfg, budget: int, heldout: bool) -> Drawn | None:
  """Multi-query associative recall over fresh random key -> value pairs."""
  fixed = _recall_fixed(cfg)
  if fixed > budget:
    return None
  keys = (_distinct(rng, TOK.n_keys, cfg.recall_pairs) + TOK.symbol("K", 0)).tolist()
  values = (_below(rng, TOK.n_values, cfg.recall_pairs) + TOK.symbol("V", 0)).tolist()
  asked = _distinct(rng, cfg.recall_pairs, cfg.recall_queries).tolist()
  gap = _gap(rng, cfg, budget - fixed)
  toks, flags = [BOS] + _REMEMBER, [0] * (1 + len(_REMEMBER))
  for i in range(cfg.recall_pairs):
    toks += [keys[i], values[i]] + (_SEP if i + 1 < cfg.recall_pairs else _END_PAIRS)
  toks += gap + _RECALL
  flags += [0] * (len(toks) - len(flags))
  for j, i in enumerate(asked):
    toks += [keys[i], values[i]] + (_SEP if j + 1 < len(asked) else _END)
    flags += [0, 1] + [0] * len(_SEP if j + 1 < len(asked) else _END)
  toks.append(EOS)
  flags.append(0)
  return Drawn(toks, flags, {"gap": len(gap)})


# ------------------------------------------------------------------ context facts and conflict

_FACTS = _b("Facts: ")
_LONGEST_STATEMENT = max(map(len, _STATEMENTS))


def _context_fixed(cfg) -> int:
  return 2 + len(_FACTS) + cfg.facts_per_context * _LONGEST_STATEMENT + cfg.questions_per_context * len(_QUESTION)


def _context(rng: np.random.Generator, cfg, budget: int, conflict: bool) -> Drawn | None:
  if _context_fixed(cfg) > budget:
    return None
  n, q = cfg.facts_per_context, cfg.questions_per_context
  ents = _distinct(rng, TOK.n_entities - cfg.kb_entities, n) + cfg.kb_entities
  attrs = _below(rng, cfg.n_attributes, n)
  templates = _below(rng, len(_STATEMENTS), n).tolist()
  asked = _distinct(rng, n, q).tolist()
  meta = {}
  if conflict:  # the last question is about a KB entity whose context attribute contradicts the KB
    kb = _kb(cfg)
    e = _below(rng, cfg.kb_entities)
    ents[asked[-1]] = e
    attrs[asked[-1]] = (kb[e] + 1 + _below(rng, cfg.n_attributes - 1)) % cfg.n_attributes
    meta = {"entity": e, "context_answer": np.array([attribute(int(attrs[asked[-1]]))], np.int32),
            "memory_answer": np.array([attribute(int(kb[e]))], np.int32)}
  toks, flags = [BOS] + _FACTS, [0] * (1 + len(_FACTS))
  for i in range(n):
    _STATEMENTS[templates[i]].render(entity(int(ents[i])), attribute(int(attrs[i])), 0, toks, flags)
  questions, qflags = [], []
  for i in asked:
    _QUESTION.render(entity(int(ents[i])), attribute(int(attrs[i])), 1, questions, qflags)
  gap = _gap(rng, cfg, budget - len(toks) - len(questions) - 1)
  toks += gap + questions + [EOS]
  flags += [0] * len(gap) + qflags + [0]
  return Drawn(toks, flags, {"gap": len(gap), **meta})


def context_facts(rng, cfg, budget, heldout):
  """Facts about fresh non-KB entities stated in context, some asked after a filler gap."""
  return _context(rng, cfg, budget, conflict=False)


def conflict(rng, cfg, budget, heldout):
  """context_facts whose last question is a KB entity with a contradicting context attribute."""
  return _context(rng, cfg, budget, conflict=True)


# ----------------------------------------------------------------------------------- kb facts

def kb_facts(rng: np.random.Generator, cfg, budget: int, heldout: bool) -> Drawn | None:
  """Up to kb_facts_per_example random KB facts, each in a random template (statements or QA)."""
  kb = _kb(cfg)
  highs = np.array([[cfg.kb_entities], [len(_ALL_FACT_TEMPLATES)]])
  ents, templates = _below(rng, highs, (2, cfg.kb_facts_per_example)).tolist()
  toks, flags = [BOS], [0]
  for e, t in zip(ents, templates):
    if len(toks) + len(_ALL_FACT_TEMPLATES[t]) + 1 > budget:
      break
    _ALL_FACT_TEMPLATES[t].render(entity(e), attribute(int(kb[e])), 1, toks, flags)
  if len(toks) == 1:
    return None
  return Drawn(toks + [EOS], flags + [0], {})


def kb_question(cfg, e: int) -> Drawn:
  """The closed-book question about KB entity e."""
  toks, flags = [BOS], [0]
  _QUESTION.render(entity(e), attribute(int(_kb(cfg)[e])), 1, toks, flags)
  return Drawn(toks + [EOS], flags + [0], {"entity": e})


BUILDERS = {"passkey": passkey, "recall": recall, "context_facts": context_facts,
            "kb_facts": kb_facts, "conflict": conflict}


def min_length(family: str, cfg) -> int:
  """Tokens (BOS..EOS) of the family's shortest example; passkey keeps one filler sentence."""
  if family == "passkey":
    return _passkey_overhead(cfg.passkey_digits) + len(_FILLER_IDS[0])
  if family == "recall":
    return _recall_fixed(cfg)
  if family in ("context_facts", "conflict"):
    return _context_fixed(cfg)
  return 2 + max(map(len, _ALL_FACT_TEMPLATES))
