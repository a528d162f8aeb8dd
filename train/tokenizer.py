"""Byte-level tokenizer with one-token task symbols.

Ids 0..255 are raw UTF-8 bytes, 256 `<pad>`, 257 `<bos>`, 258 `<eos>`, then the task symbols, each
ONE token (a 0.85M-parameter model only learned recall and facts once every key, value, entity and
attribute was a single token): entities `<E0>`..`<E127>`, attributes `<A0>`..`<A24>`, keys
`<K0>`..`<K49>`, values `<V0>`..`<V49>`. vocab_size = 512, the ModelConfig default.

In text, a symbol is written exactly as above (`"<E17> lives in <A4>."`); everything else is bytes,
so a literal string such as "<E17>" cannot be spelled as bytes (and `<E999>` is an error).
"""
from __future__ import annotations

import re
from typing import Iterable

import numpy as np

N_BYTES = 256
PAD, BOS, EOS = 256, 257, 258
SPECIALS = {"pad": PAD, "bos": BOS, "eos": EOS}
# (letter, count) in id order after the specials.
SYMBOLS = (("E", 128), ("A", 25), ("K", 50), ("V", 50))

_BASE = {}
_next = EOS + 1
for _letter, _count in SYMBOLS:
  _BASE[_letter] = _next
  _next += _count
VOCAB_SIZE = _next
_COUNT = dict(SYMBOLS)
_TOKEN_RE = re.compile(r"<(?:(pad|bos|eos)|([EAKV])(\d+))>")


class ByteTokenizer:
  """Bytes + specials + task symbols; see the module docstring for the id layout."""
  PAD, BOS, EOS = PAD, BOS, EOS
  vocab_size = VOCAB_SIZE
  n_entities, n_attributes, n_keys, n_values = (_COUNT[c] for c in "EAKV")

  @staticmethod
  def symbol(letter: str, index: int) -> int:
    """Id of `<{letter}{index}>`, e.g. symbol('E', 17)."""
    if letter not in _BASE or not 0 <= index < _COUNT[letter]:
      raise ValueError(f"symbol: <{letter}{index}> is not in the vocabulary; allowed "
                       + ", ".join(f"<{c}0>..<{c}{n - 1}>" for c, n in SYMBOLS))
    return _BASE[letter] + index

  def encode(self, text: str) -> list[int]:
    ids, pos = [], 0
    for m in _TOKEN_RE.finditer(text):
      ids.extend(text[pos:m.start()].encode("utf-8"))
      special, letter, index = m.groups()
      ids.append(SPECIALS[special] if special else self.symbol(letter, int(index)))
      pos = m.end()
    ids.extend(text[pos:].encode("utf-8"))
    return ids

  def decode(self, ids: Iterable[int]) -> str:
    out, run = [], bytearray()
    for i in np.asarray(ids, dtype=np.int64).reshape(-1).tolist():
      if 0 <= i < N_BYTES:
        run.append(i)
        continue
      out.append(run.decode("utf-8", errors="replace"))
      run = bytearray()
      out.append(self.token_name(i))
    out.append(run.decode("utf-8", errors="replace"))
    return "".join(out)

  @staticmethod
  def token_name(i: int) -> str:
    """Readable name of a non-byte id: '<pad>', '<E17>', ..."""
    for name, value in SPECIALS.items():
      if i == value:
        return f"<{name}>"
    for letter, count in SYMBOLS:
      if 0 <= i - _BASE[letter] < count:
        return f"<{letter}{i - _BASE[letter]}>"
    raise ValueError(f"token id: must be in 0..{VOCAB_SIZE - 1}; got {i}")
