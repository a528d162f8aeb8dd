"""The tokenizer of an imported model, built with the `tokenizers` package from GGUF metadata or
an HF tokenizer.json, behind one small interface: encode, decode, bos_id, eos_id, vocab_size."""
from __future__ import annotations

import os

import tokenizers
from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors

# llama.cpp pre-tokenizer names (tokenizer.ggml.pre) -> the `tokenizers` pipeline that splits the
# same way. The smollm family isolates every digit, then applies the GPT-2 regex (llama-vocab.cpp).
_BYTE_LEVEL = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
_DIGITS_THEN_GPT2 = ("smollm", "starcoder", "refact", "codeshell")
PRE_TOKENIZERS = ("default", "gpt2") + _DIGITS_THEN_GPT2

# GGUF token types (gguf.TokenType): CONTROL and USER_DEFINED tokens are matched whole, never split.
_CONTROL, _USER_DEFINED = 3, 4


class GGUFTokenizer:
  """encode(text) -> ids (with BOS when the model's convention adds it), decode(ids) -> text."""

  def __init__(self, tok: tokenizers.Tokenizer, bos_id: int | None, eos_id: int | None):
    self.tok, self.bos_id, self.eos_id = tok, bos_id, eos_id

  @property
  def vocab_size(self) -> int:
    return self.tok.get_vocab_size(with_added_tokens=True)

  def encode(self, text: str) -> list[int]:
    return self.tok.encode(text).ids

  def decode(self, ids, skip_special: bool = False) -> str:
    return self.tok.decode([int(i) for i in ids], skip_special_tokens=skip_special)


def _field(fields: dict, key: str, default=...):
  if key in fields:
    return fields[key]
  if default is ...:
    raise ValueError(f"gguf metadata: missing key {key!r} (needed for the tokenizer)")
  return default


def from_gguf(fields: dict) -> GGUFTokenizer:
  """Byte-level BPE from `tokenizer.ggml.*` metadata (fields: key -> decoded value)."""
  kind = _field(fields, "tokenizer.ggml.model")
  if kind != "gpt2":
    raise ValueError(f"tokenizer.ggml.model: only 'gpt2' (byte-level BPE) is supported; got {kind!r}")
  pre = _field(fields, "tokenizer.ggml.pre", "default")
  if pre not in PRE_TOKENIZERS:
    raise ValueError(f"tokenizer.ggml.pre: must be one of {', '.join(map(repr, PRE_TOKENIZERS))}; got {pre!r}")
  tokens = list(_field(fields, "tokenizer.ggml.tokens"))
  types = list(_field(fields, "tokenizer.ggml.token_type", [1] * len(tokens)))
  merges = [tuple(m.split(" ", 1)) for m in _field(fields, "tokenizer.ggml.merges")]
  tok = tokenizers.Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges))
  tok.pre_tokenizer = (pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), _BYTE_LEVEL])
                       if pre in _DIGITS_THEN_GPT2 else _BYTE_LEVEL)
  tok.decoder = decoders.ByteLevel()
  tok.add_special_tokens([AddedToken(t, special=ty == _CONTROL, normalized=False)
                          for t, ty in zip(tokens, types) if ty in (_CONTROL, _USER_DEFINED)])
  bos, eos = fields.get("tokenizer.ggml.bos_token_id"), fields.get("tokenizer.ggml.eos_token_id")
  if fields.get("tokenizer.ggml.add_bos_token", False) and bos is not None:
    tok.post_processor = processors.TemplateProcessing(single=f"{tokens[bos]} $A",
                                                       special_tokens=[(tokens[bos], bos)])
  return GGUFTokenizer(tok, bos, eos)


def from_hf(directory: str, bos_id: int | None, eos_id: int | None) -> GGUFTokenizer:
  """The directory's tokenizer.json, as is (its post-processor decides whether BOS is added)."""
  path = os.path.join(directory, "tokenizer.json")
  if not os.path.isfile(path):
    raise ValueError(f"{directory}: no tokenizer.json (only the `tokenizers` JSON format is supported)")
  try:
    tok = tokenizers.Tokenizer.from_file(path)
  except Exception as err:   # the tokenizers library raises a bare Exception for a file it cannot parse
    raise ValueError(f"{path}: damaged, not a `tokenizers` JSON file ({err}); download the model again") from None
  return GGUFTokenizer(tok, bos_id, eos_id)
