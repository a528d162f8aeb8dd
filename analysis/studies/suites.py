"""Task suites in plain English for pretrained LLMs (and an adapter for the lab's own task examples).

Contextual: passkey retrieval (the paper's prompt), in-context facts, associative recall.
Parametric: closed-book capitals, and balanced yes/no capital questions (the paper's Cities style).
Knowledge conflict: a context that contradicts a capital; verdict context / memory / other.

Scoring is strict: the first words of the output (a word: a run of letters and digits; case
ignored) must equal the answer word for word; nothing later in the output is searched. An answer made
of digits only (a pass key) is compared without spaces: the digits and spaces that open the output,
spaces removed, must equal it (' 123 456.' is 123456; ' 1234567' is not). Prompts end where the
answer starts, so a model that knows the format answers at once.

Suite 'templates' (the C5 study): every family in five templates, fixed before any result was seen,
that differ in instruction wording, zero-shot vs few-shot framing and filler; template t0 is the
built-in prompt. 'capitals_padded' is 'capitals' with neutral filler in front up to the passkey
length, so contextual and parametric prompts can be compared at equal length.

Entities are drawn from the words whose token length is the commonest for the tokenizer (for
SmolLM2: single tokens), so the prompts of a task share one length and compile once.
"""
from __future__ import annotations

import collections
import dataclasses
import itertools
import json
import os
import re
from typing import Protocol, Sequence

import numpy as np

from minilm.schema import ConfigError, check, check_choice


class TextTokenizer(Protocol):
  def encode(self, text: str) -> list[int]: ...
  def decode(self, ids: Sequence[int]) -> str: ...


@dataclasses.dataclass(frozen=True)
class Item:
  task: str               # e.g. 'passkey_128x6'
  kind: str               # contextual | parametric | conflict
  prompt: np.ndarray      # int32 [P]
  text: str               # the prompt as text
  answer: str             # expected answer (for conflict: the context's answer)
  max_new: int
  meta: dict              # conflict: {'memory': ...}; ids items: {'answer_ids': [...], ...}


KINDS = ("contextual", "parametric", "conflict")

# ------------------------------------------------------------------------------------ word lists

CAPITALS = (  # (country, capital): well-known pairs a small LM may have memorised
    ("France", "Paris"), ("Germany", "Berlin"), ("Japan", "Tokyo"), ("Spain", "Madrid"),
    ("England", "London"), ("Russia", "Moscow"), ("China", "Beijing"), ("Egypt", "Cairo"),
    ("Greece", "Athens"), ("Portugal", "Lisbon"), ("Austria", "Vienna"), ("Ireland", "Dublin"),
    ("Norway", "Oslo"), ("Sweden", "Stockholm"), ("Finland", "Helsinki"), ("Denmark", "Copenhagen"),
    ("Poland", "Warsaw"), ("Hungary", "Budapest"), ("Belgium", "Brussels"), ("Netherlands", "Amsterdam"),
    ("Thailand", "Bangkok"), ("Kenya", "Nairobi"), ("Argentina", "Buenos Aires"), ("Chile", "Santiago"),
    ("Cuba", "Havana"), ("Mexico", "Mexico City"), ("India", "New Delhi"), ("Australia", "Canberra"),
    ("Turkey", "Ankara"), ("Iran", "Tehran"), ("Iraq", "Baghdad"), ("Syria", "Damascus"),
    ("Lebanon", "Beirut"), ("Israel", "Jerusalem"), ("Ukraine", "Kyiv"), ("Romania", "Bucharest"),
    ("Bulgaria", "Sofia"), ("Serbia", "Belgrade"), ("Croatia", "Zagreb"), ("Switzerland", "Bern"),
    ("Scotland", "Edinburgh"), ("Wales", "Cardiff"), ("Vietnam", "Hanoi"), ("Indonesia", "Jakarta"),
    ("Philippines", "Manila"), ("Malaysia", "Kuala Lumpur"), ("Korea", "Seoul"), ("Pakistan", "Islamabad"),
    ("Afghanistan", "Kabul"), ("Nigeria", "Abuja"), ("Ethiopia", "Addis Ababa"), ("Morocco", "Rabat"),
    ("Colombia", "Bogota"), ("Venezuela", "Caracas"), ("Iceland", "Reykjavik"), ("Nepal", "Kathmandu"),
)
FEW_SHOT = (("Italy", "Rome"), ("Canada", "Ottawa"), ("Peru", "Lima"))  # never asked about

NAMES = ("Alice", "Bob", "Carol", "David", "Emma", "Frank", "Grace", "Henry", "Jack", "Kate", "Laura",
         "Mark", "Nina", "Oscar", "Paul", "Rose", "Sam", "Tom", "Victor", "Wendy", "Anna", "Peter",
         "Maria", "John", "Lucy", "Mike", "Sarah", "James", "Emily", "Daniel")
NOUNS = ("apple", "river", "table", "horse", "window", "garden", "pencil", "cloud", "bottle", "mountain",
         "chair", "rabbit", "forest", "candle", "ocean", "button", "castle", "mirror", "tiger", "bridge",
         "lemon", "carpet", "engine", "island", "jacket", "kitten", "ladder", "needle", "orange", "pillow")

PASSKEY_INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and "
                 "memorize them. I will quiz you about the important information there.")
PASSKEY_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
PASSKEY_NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
PASSKEY_QUESTION = "What is the pass key? The pass key is"

# (context tokens, key digits): the paper's passkey settings
PASSKEY_QUICK = ((128, 6), (256, 12))
PASSKEY_FULL = PASSKEY_QUICK + ((1024, 48),)


# ------------------------------------------------------------------------------------- templates
# Fixed before any result was seen. Each family's t0 is the built-in prompt; the others change the
# instruction wording, zero-shot vs few-shot framing, and the filler. Worked examples use names and
# countries that are never asked about (FEW_SHOT, Olivia, Liam).

@dataclasses.dataclass(frozen=True)
class PasskeyTemplate:
  intro: str      # instruction and any worked example before the text ('' for none)
  filler: str     # sentences repeated around the needle
  needle: str     # holds {key}
  question: str   # ends where the key starts


PASSKEY_TEMPLATES = (
    PasskeyTemplate(PASSKEY_INTRO, PASSKEY_FILLER, PASSKEY_NEEDLE, PASSKEY_QUESTION),  # the paper's
    PasskeyTemplate("Below is a long text. Somewhere in it a pass key is given. Read carefully: at the end you "
                    "must report the pass key.",
                    "The train left the station at noon. Passengers read their newspapers. A child looked out "
                    "of the window. The fields were wide and quiet.",
                    PASSKEY_NEEDLE, "Question: What is the pass key?\nAnswer: The pass key is"),
    PasskeyTemplate("Find the pass key in the text and repeat it.\nText: The sky is blue. The pass key is 318204. "
                    "Remember it. The grass is green.\nThe pass key is 318204.\nText:",  # one worked example
                    PASSKEY_FILLER, PASSKEY_NEEDLE, "\nThe pass key is"),
    PasskeyTemplate("",  # zero-shot, no instruction, other needle wording
                    "Rain fell on the old roof. The kettle began to whistle. Someone closed a door downstairs.",
                    "Important: the secret code is {key}.", "The secret code mentioned above is"),
    PasskeyTemplate("Memorize the number that appears in the notes below. Only the number matters.",
                    "Notes from the market. Apples were cheap. The baker sold out early. It was a busy morning.",
                    "The number is {key}.", "Repeat the number from the notes. The number is"),
)


@dataclasses.dataclass(frozen=True)
class FactsTemplate:
  intro: str      # before the facts ('' for none)
  fact: str       # holds {who} and {where}
  between: str    # joins the facts: a newline, a space, or neutral filler
  question: str   # holds {who}; ends where the city starts


FACTS_TEMPLATES = (
    FactsTemplate("Read the facts and answer the question.\n", "{who} lives in {where}.", "\n",
                  "\nQuestion: Where does {who} live?\nAnswer: {who} lives in"),  # the built-in prompt
    FactsTemplate("Use the list below to answer.\n", "{who}'s home city is {where}.", "\n",
                  "\nIn which city is {who}'s home? {who}'s home city is"),
    FactsTemplate("Answer from the facts.\nFacts: Olivia lives in Lima. Liam lives in Rome.\nQuestion: Where does "
                  "Liam live?\nAnswer: Liam lives in Rome.\nFacts: ",  # one worked example
                  "{who} lives in {where}.", " ", "\nQuestion: Where does {who} live?\nAnswer: {who} lives in"),
    FactsTemplate("", "{who} lives in {where}.", " The weather was mild that week. ", " So {who} lives in"),
    FactsTemplate("Residents and their cities:\n", "{who}: {where}", "\n", "\nThe city of {who} is"),
)

CAPITAL_TEMPLATES = (  # hold {country}; end where the capital starts
    " ".join(f"The capital of {c} is {k}." for c, k in FEW_SHOT[:2]) + " The capital of {country} is",  # built-in
    "The capital of {country} is",
    "Answer the question.\nQuestion: What is the capital city of {country}?\nAnswer: The capital city of "
    "{country} is",
    "Country: Italy\nCapital: Rome\nCountry: Canada\nCapital: Ottawa\nCountry: Peru\nCapital: Lima\n"
    "Country: {country}\nCapital:",
    "A short note on geography. Many people like to travel. {country} is a country, and its capital city is",
)

CONFLICT_TEMPLATES = (  # hold {country} and {fake}; end where the capital starts
    "Read the text and answer from it.\nText: The capital of {country} is {fake}.\nQuestion: What is the capital "
    "of {country}?\nAnswer: The capital of {country} is",  # the built-in prompt
    "According to the new atlas, the capital of {country} is {fake}. According to the new atlas, the capital of "
    "{country} is",
    "Text: The capital of Italy is Lima.\nQuestion: What is the capital of Italy?\nAnswer: Lima\nText: The capital "
    "of {country} is {fake}.\nQuestion: What is the capital of {country}?\nAnswer:",  # one worked example
    "In this story the sky is green. In this story, the capital of {country} is {fake}. The sun is cold. In this "
    "story, the capital of {country} is",
    "Answer using only the passage, even if it disagrees with what you know.\nPassage: {fake} is the capital of "
    "{country}.\nQ: Which city is the capital of {country}?\nA: The capital of {country} is",
)

TEMPLATE_LENGTH, TEMPLATE_DIGITS = 128, 6
"""Passkey setting of the 'templates' suite (the paper's Table 1), and the length the padded
closed-book prompts are filled to."""


# ---------------------------------------------------------------------------------------- helpers

def _ids(tokenizer: TextTokenizer, text: str, bos: int | None) -> np.ndarray:
  ids = ([] if bos is None else [bos]) + list(tokenizer.encode(text))
  return np.asarray(ids, np.int32)


def _item(tokenizer, bos, task, kind, text, answer, **meta) -> Item:
  max_new = len(tokenizer.encode(" " + answer)) + 2  # room for the answer and a closing token
  return Item(task, kind, _ids(tokenizer, text, bos), text, answer, max_new, meta)


def _modal_pairs(tokenizer: TextTokenizer, pairs: Sequence[tuple[str, ...]], bare: bool = False):
  """The tuples whose token lengths (of ' word', and of 'word' too when `bare`: words that also start
  a line) are the commonest combination: the prompts of a task then share one length."""
  forms = ("", " ") if bare else (" ",)
  keys = [tuple(len(tokenizer.encode(f + w)) for w in p for f in forms) for p in pairs]
  mode = collections.Counter(keys).most_common(1)[0][0]
  return [p for p, k in zip(pairs, keys) if k == mode]


def _modal(tokenizer: TextTokenizer, words: Sequence[str], bare: bool = False) -> list[str]:
  return [w for (w,) in _modal_pairs(tokenizer, [(w,) for w in words], bare)]


def _words(text: str, n: int) -> str:
  """The first n words (runs of letters and digits) of text, lower case."""
  return " ".join(re.findall(r"[^\W_]+", text)[:n]).lower()


def _opens_with(text: str, answer: str) -> bool:
  """The strict rule (module docstring): the output's first words equal the answer's; an all-digit
  answer is compared with the spaces between the output's opening digits removed."""
  if answer.replace(" ", "").isdigit():
    opening = re.match(r"[^\w]*([\d ]*)", text).group(1)
    return opening.replace(" ", "") == answer.replace(" ", "")
  return _words(text, len(answer.split())) == answer.lower()


# ------------------------------------------------------------------------------------------ tasks

def _sentences(filler: str) -> list[str]:
  return [s.strip() + "." for s in filler.split(".") if s.strip()]


def _join(*parts: str) -> str:
  return " ".join(p for p in parts if p)


def passkey(tokenizer, n: int, length: int, digits: int, seed: int, bos=None,
            template: PasskeyTemplate = PASSKEY_TEMPLATES[0], task: str = "") -> list[Item]:
  """A passkey prompt (the paper's by default) at about `length` tokens (never more). The needle goes
  before one of the filler sentences, swept evenly from the first to the last (meta 'depth' =
  sentences before it / all sentences), so at least one filler sentence separates it from the question."""
  rng = np.random.default_rng([seed, length, digits])
  unit = len(tokenizer.encode(" " + template.filler))
  fixed = len(_ids(tokenizer, _join(template.intro, template.needle.format(key="0" * digits), template.question), bos))
  repeats = (length - fixed) // unit
  check(repeats >= 1, "passkey.length", f"too short for the fixed text ({fixed} tokens in this tokenizer), so the "
        f"built-in suites do not fit this model: give your own items (--prompts, C5); got {length}")
  sentences = _sentences(template.filler) * repeats
  items = []
  for i in range(n):
    key = "".join(rng.choice(list("0123456789"), digits))
    slot = round(i * (len(sentences) - 1) / (n - 1)) if n > 1 else len(sentences) // 2
    text = _join(template.intro, *sentences[:slot], template.needle.format(key=key), *sentences[slot:],
                 template.question)
    items.append(_item(tokenizer, bos, task or f"passkey_{length}x{digits}", "contextual", text, key,
                       depth=slot / len(sentences)))
  return items


def context_facts(tokenizer, n: int, seed: int, n_facts: int = 4, bos=None,
                  template: FactsTemplate = FACTS_TEMPLATES[0], task: str = "context_facts") -> list[Item]:
  """'Alice lives in Paris.' x n_facts (or the template's wording), then a question about one of them
  (asked position balanced)."""
  rng = np.random.default_rng([seed, 1])
  names, cities = _modal(tokenizer, NAMES, bare=True), _modal(tokenizer, [c for _, c in CAPITALS])
  items = []
  for i in range(n):
    who = rng.choice(names, n_facts, replace=False)
    where = rng.choice(cities, n_facts, replace=False)
    ask = i % n_facts
    facts = template.between.join(template.fact.format(who=a, where=b) for a, b in zip(who, where))
    text = template.intro + facts + template.question.format(who=who[ask])
    items.append(_item(tokenizer, bos, task, "contextual", text, str(where[ask]), asked=ask))
  return items


def recall(tokenizer, n: int, seed: int, n_pairs: int = 6, bos=None) -> list[Item]:
  """Associative recall: 'word: two-digit number' pairs, then one word again (position balanced)."""
  rng = np.random.default_rng([seed, 2])
  nouns = _modal(tokenizer, NOUNS, bare=True)
  items = []
  for i in range(n):
    words = rng.choice(nouns, n_pairs, replace=False)
    values = rng.choice(np.arange(10, 100), n_pairs, replace=False)
    ask = i % n_pairs
    pairs = "\n".join(f"{w}: {v}" for w, v in zip(words, values))
    text = f"Remember the number of each word.\n{pairs}\nWhat is the number of {words[ask]}?\n{words[ask]}:"
    items.append(_item(tokenizer, bos, "recall", "contextual", text, str(values[ask]), asked=ask))
  return items


def _padding(tokenizer, filler: str, room: int) -> str:
  """Whole filler sentences, repeated, of at most `room` tokens (neutral text in front of a prompt)."""
  out = []
  for sentence in itertools.cycle(_sentences(filler)):
    if len(tokenizer.encode(_join(*out, sentence))) > room:
      return _join(*out)
    out.append(sentence)


def capitals(tokenizer, n: int, seed: int, bos=None, template: str = CAPITAL_TEMPLATES[0], task: str = "capitals",
             pairs: Sequence[tuple[str, str]] | None = None, pad: tuple[str, int] | None = None) -> list[Item]:
  """Closed-book: 'The capital of X is' -> capital (by default two fixed few-shot examples set the
  format). `pairs` (e.g. those the model knows) replace the word list; `pad` (filler, length) puts
  neutral filler in front, up to `length` tokens (never more)."""
  rng = np.random.default_rng([seed, 3])
  pairs = list(pairs) if pairs is not None else _modal_pairs(tokenizer, CAPITALS)
  texts = [(template.format(country=pairs[j][0]), pairs[j][1]) for j in rng.permutation(len(pairs))[:n]]
  if pad is not None:
    longest = max(len(_ids(tokenizer, " " + t, bos)) for t, _ in texts)
    filler = _padding(tokenizer, pad[0], pad[1] - longest)
    check(bool(filler), "capitals.pad", f"{pad[1]} tokens leave no room for filler before a {longest}-token prompt")
    texts = [(f"{filler} {t}", a) for t, a in texts]
  return [_item(tokenizer, bos, task, "parametric", t, a) for t, a in texts]


def capitals_yesno(tokenizer, n: int, seed: int, bos=None) -> list[Item]:
  """Balanced yes/no, the paper's Cities style: 'Y is the capital of X:' with the true capital (even i)
  or another one (odd i), after four fixed balanced examples about countries never asked."""
  rng = np.random.default_rng([seed, 4])
  pairs = _modal_pairs(tokenizer, CAPITALS, bare=True)  # the capital starts a line here
  (c0, k0), (c1, k1), (c2, k2) = FEW_SHOT
  shots = (f"{k0} is the capital of {c0}: yes\n{k2} is the capital of {c1}: no\n"
           f"{k1} is the capital of {c1}: yes\n{k0} is the capital of {c2}: no\n")
  items = []
  for i in range(n):
    j, other = rng.choice(len(pairs), 2, replace=False)
    country, city, truth = pairs[j][0], pairs[j if i % 2 == 0 else other][1], "yes" if i % 2 == 0 else "no"
    items.append(_item(tokenizer, bos, "capitals_yesno", "parametric",
                       f"{shots}{city} is the capital of {country}:", truth))
  return items


def conflict(tokenizer, n: int, seed: int, bos=None, pairs: Sequence[tuple[str, str]] | None = None,
             template: str = CONFLICT_TEMPLATES[0], task: str = "conflict") -> list[Item]:
  """A context stating a false capital; the verdict says whether the output follows it or memory.
  Pass `pairs` (e.g. those the model answers right closed-book) so that a memory exists."""
  rng = np.random.default_rng([seed, 5])
  pairs = list(pairs) if pairs is not None else _modal_pairs(tokenizer, CAPITALS)
  check(len(pairs) >= 2, "conflict.pairs", f"needs at least 2 known (country, capital) pairs; got {len(pairs)}")
  items = []
  for i in range(n):
    j, other = rng.choice(len(pairs), 2, replace=False)
    (country, true), fake = pairs[j], pairs[other][1]
    items.append(_item(tokenizer, bos, task, "conflict", template.format(country=country, fake=fake), fake,
                       memory=true))
  return items


SUITES = ("quick", "full", "templates")


def suite(tokenizer, name: str = "quick", n: int = 20, seed: int = 0, bos=None,
          known: Sequence[tuple[str, str]] | None = None, lengths=None) -> list[Item]:
  """Every task, n examples each. 'quick': passkey at 128/256 tokens; 'full' adds 1024 tokens / 48 digits;
  'templates': `templated`. `lengths` ((tokens, digits), ...) overrides the passkey settings; `known`
  picks the conflict facts."""
  check_choice("suite", name, SUITES)
  check(n >= 2, "n", f"must be >= 2 (balanced sets); got {n}")
  if name == "templates":
    return templated(tokenizer, n, seed, bos, known, *(lengths or ((TEMPLATE_LENGTH, TEMPLATE_DIGITS),))[0])
  items = []
  for length, digits in lengths or (PASSKEY_FULL if name == "full" else PASSKEY_QUICK):
    items += passkey(tokenizer, n, length, digits, seed, bos)
  items += context_facts(tokenizer, n, seed, bos=bos) + recall(tokenizer, n, seed, bos=bos)
  items += capitals(tokenizer, n, seed, bos) + capitals_yesno(tokenizer, n, seed, bos)
  return items + conflict(tokenizer, n, seed, bos, pairs=known)


def templated(tokenizer, n: int, seed: int, bos=None, known: Sequence[tuple[str, str]] | None = None,
              length: int = TEMPLATE_LENGTH, digits: int = TEMPLATE_DIGITS) -> list[Item]:
  """Every family in every template, n examples each, named '<family>/t<i>': passkey and in-context
  facts (contextual), closed-book capitals short and padded with template i's passkey filler to the
  passkey length (parametric), and conflict. `known` (pairs the model answers right) serve the
  closed-book and conflict items, so that a memory exists."""
  items = []
  for i, t in enumerate(PASSKEY_TEMPLATES):
    items += passkey(tokenizer, n, length, digits, seed, bos, t, f"passkey/t{i}")
  for i, t in enumerate(FACTS_TEMPLATES):
    items += context_facts(tokenizer, n, seed, bos=bos, template=t, task=f"context_facts/t{i}")
  for i, t in enumerate(CAPITAL_TEMPLATES):
    items += capitals(tokenizer, n, seed, bos, t, f"capitals/t{i}", known)
  for i, t in enumerate(CAPITAL_TEMPLATES):
    items += capitals(tokenizer, n, seed, bos, t, f"capitals_padded/t{i}", known, (PASSKEY_TEMPLATES[i].filler, length))
  for i, t in enumerate(CONFLICT_TEMPLATES):
    items += conflict(tokenizer, n, seed, bos, known, t, f"conflict/t{i}")
  return items


def from_examples(examples: dict[str, list], tokenizer: TextTokenizer, kinds: dict[str, str] | None = None) -> list[Item]:
  """The lab's own `train.data.Example`s (token ids) as Items scored by exact id match."""
  kinds = kinds or {"passkey": "contextual", "recall": "contextual", "context_facts": "contextual",
                    "kb_facts": "parametric", "conflict": "conflict"}
  items = []
  for family, examples_ in examples.items():
    check_choice("family", family, tuple(kinds))
    for ex in examples_:
      meta = {"answer_ids": [int(t) for t in ex.answer]}
      if kinds[family] == "conflict":
        meta = {"answer_ids": [int(t) for t in ex.meta["context_answer"]],
                "memory_ids": [int(t) for t in ex.meta["memory_answer"]]}
      items.append(Item(family, kinds[family], np.asarray(ex.prompt, np.int32), ex.text,
                        tokenizer.decode(meta["answer_ids"]), len(meta["answer_ids"]), meta))
  return items


# ----------------------------------------------------------------------------------- own prompts

PROMPT_FIELDS = ("family", "kind", "prompt", "answer", "memory", "max_new_tokens")
RESERVED = ("answer_ids", "memory_ids", "line", "task", "text", "tokenizer", "bos")
"""Names a prompts line may not use for a field of its own: scoring reads answer_ids and memory_ids
(token ids that replace the text answer), `line` is the line's number, and the rest are `_item`'s."""
MAX_NEW = 512
"""The most new tokens an item may ask for."""


def _text_field(row: dict, field: str, where: str, required: bool = True) -> str | None:
  """A field holding text with a word in it (an answer needs one to be scored); integers are read as
  their digits."""
  value = row.get(field)
  if value is None:
    check(not required, f"{where}: {field}", "is missing")
    return None
  check(isinstance(value, (str, int)) and not isinstance(value, bool), f"{where}: {field}",
        f"must be a string; got {json.dumps(value)}")
  check(bool(re.search(r"[^\W_]", str(value))), f"{where}: {field}", f"holds no letter or digit; got {json.dumps(value)}")
  return str(value)


def _prompt_row(row, path: str, number: int, kinds: dict[str, str]) -> dict:
  """One checked line of a prompts file (see read_prompts)."""
  where = f"{path}:{number}"
  check(isinstance(row, dict), f"{where}: line", f"must be a JSON object with {', '.join(PROMPT_FIELDS[:4])}")
  for name in RESERVED:
    check(name not in row, f"{where}: {name}", f"is a name the study gives its own fields; rename it (other fields "
          f"than {', '.join(PROMPT_FIELDS)} are kept with the item, but for {', '.join(RESERVED)})")
  family, kind = _text_field(row, "family", where), row.get("kind")
  check(kind is not None, f"{where}: kind", "is missing")
  check_choice(f"{where}: kind", kind, KINDS)
  check(kinds.setdefault(family, kind) == kind, f"{where}: kind",
        f"family {family!r} is {kinds[family]!r} on an earlier line; one kind per family")
  check(isinstance(row.get("prompt"), str) and row["prompt"].strip() != "", f"{where}: prompt",
        f"must be a non-empty string; got {json.dumps(row.get('prompt'))}")
  max_new = row.get("max_new_tokens")
  check(max_new is None or (isinstance(max_new, int) and not isinstance(max_new, bool) and 1 <= max_new <= MAX_NEW),
        f"{where}: max_new_tokens", f"must be an integer in 1..{MAX_NEW}; got {json.dumps(max_new)}")
  return {**row, "family": family, "answer": _text_field(row, "answer", where),
          "memory": _text_field(row, "memory", where, required=False), "line": number}


def read_prompts(path: str, field: str = "--prompts") -> list[dict]:
  """The lines of a prompts file, each checked, before any model is loaded: one JSON object a line
  with family (any name: the task name in every table), kind (contextual | parametric | conflict),
  prompt, answer, optional memory (a conflict item's parametric answer) and max_new_tokens (default:
  the answer's tokens + 2). Other fields are kept with the item, but for the RESERVED names. Blank
  lines are skipped. A bad line is one error 'FILE:LINE: field: what is wrong' (a missing file names
  `field`)."""
  check(os.path.isfile(path), field, f"{path} is not a file")
  rows, kinds = [], {}
  with open(path, "rb") as f:
    data = f.read()
  try:
    text = data.decode("utf-8")
  except UnicodeDecodeError as err:
    number = data.count(b"\n", 0, err.start) + 1
    raise ConfigError(f"{path}:{number}: not UTF-8 text ({err.reason})") from None
  for number, line in enumerate(text.split("\n"), 1):
    if not line.strip():
      continue
    try:
      row = json.loads(line)
    except json.JSONDecodeError as err:
      raise ConfigError(f"{path}:{number}: json: {err.msg} at column {err.colno}") from None
    except RecursionError:
      raise ConfigError(f"{path}:{number}: json: nested deeper than the parser goes") from None
    rows.append(_prompt_row(row, path, number, kinds))
  check(bool(rows), "--prompts", f"{path} holds no prompt")
  return rows


def from_prompts(rows: list[dict], tokenizer: TextTokenizer, bos=None) -> list[Item]:
  """Items of `read_prompts` rows, scored like the built-in tasks (meta: memory, the line, other fields)."""
  items = []
  for row in rows:
    meta = {k: v for k, v in row.items() if k not in PROMPT_FIELDS[:4] + ("max_new_tokens",)}
    item = _item(tokenizer, bos, row["family"], row["kind"], row["prompt"], row["answer"], **meta)
    items.append(dataclasses.replace(item, max_new=row.get("max_new_tokens") or item.max_new))
  return items


# ---------------------------------------------------------------------------------------- scoring

def verdict(item: Item, output_ids: Sequence[int], tokenizer: TextTokenizer) -> str:
  """'correct' | 'wrong' (contextual, parametric); 'context' | 'memory' | 'other' (conflict)."""
  ids = [int(t) for t in output_ids]
  if "answer_ids" in item.meta:
    hit = lambda want: ids[:len(want)] == want
    target, memory = item.meta["answer_ids"], item.meta.get("memory_ids")
  else:
    text = tokenizer.decode(ids)
    hit = lambda want: want is not None and _opens_with(text, want)
    target, memory = item.answer, item.meta.get("memory")
  if item.kind != "conflict":
    return "correct" if hit(target) else "wrong"
  return "context" if hit(target) else "memory" if hit(memory) else "other"


def success(item: Item, v: str) -> bool:
  """The success the accuracy counts: a right answer, or following the context under conflict."""
  return v in ("correct", "context")
