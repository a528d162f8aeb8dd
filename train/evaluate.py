"""Held-out accuracy: greedy decoding, strict exact match of every answer token, per task family.

Conflict examples (meta 'context_answer' / 'memory_answer') also report which answer the model
gave: 'conflict.follows_context', 'conflict.follows_memory', 'conflict.other' (fractions summing to 1).

Two ways to score, equal in exact arithmetic:
  'greedy': minilm.generate.greedy, one compiled program per (prompt length, answer length), the
    only choice with a prefill hook (interventions apply to the prompt only);
  'forced': one forward pass over prompt + answer[:-1] (right-padded, one shape for the whole set);
    greedy reproduces answer a exactly iff argmax at every answer position, given the gold prefix,
    is the gold token. Prompts vary in length, so this is what periodic evaluation uses on CPU.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Iterable, Mapping

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from minilm.generate import greedy_batches


def _flatten(examples) -> list:
  if isinstance(examples, Mapping):
    return [ex for family in examples.values() for ex in family]
  return list(examples)


def _answers_named(ex) -> list[np.ndarray]:
  """The answer, then the conflict alternatives (context_answer, memory_answer) when present."""
  if "context_answer" in ex.meta and "memory_answer" in ex.meta:
    return [np.asarray(ex.answer), np.asarray(ex.meta["context_answer"]), np.asarray(ex.meta["memory_answer"])]
  return [np.asarray(ex.answer)]


def generate_all(model, examples: list, batch: int = 64, **greedy_kwargs) -> list[np.ndarray]:
  """Greedy continuations, one per example, long enough for its longest possible answer (batches
  padded to a power of two: few shapes compile)."""
  out: list[np.ndarray] = [None] * len(examples)
  max_new = [max(len(a) for a in _answers_named(ex)) for ex in examples]
  for idx, tokens in greedy_batches(model, [ex.prompt for ex in examples], max_new, batch, pow2=True, **greedy_kwargs):
    for i, row in zip(idx, tokens):
      out[i] = row
  return out


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _argmax(graphdef, state, tokens_BxT):
  return jnp.argmax(nnx.merge(graphdef, state)(tokens_BxT), axis=-1).astype(jnp.int32)


def forced_matches(model, prompts: list[np.ndarray], answers: list[np.ndarray], batch: int = 64) -> list[bool]:
  """For each (prompt, answer): would greedy decoding from prompt produce exactly answer?"""
  rows = [np.concatenate([np.asarray(p), np.asarray(a)[:-1]]).astype(np.int32) for p, a in zip(prompts, answers)]
  width = max(len(r) for r in rows)
  graphdef, state = nnx.split(model)
  out = []
  for start in range(0, len(rows), batch):
    chunk = list(zip(rows[start:start + batch], prompts[start:start + batch], answers[start:start + batch]))
    tokens = np.zeros((batch, width), np.int32)  # right padding never affects earlier positions
    for i, (row, _, _) in enumerate(chunk):
      tokens[i, :len(row)] = row
    pred_BxT = np.asarray(_argmax(graphdef, state, tokens))
    for i, (_, p, a) in enumerate(chunk):
      out.append(bool(np.array_equal(pred_BxT[i, len(p) - 1:len(p) - 1 + len(a)], a)))
  return out


def _matches(generated: np.ndarray, answer: np.ndarray) -> bool:
  return len(answer) <= len(generated) and bool(np.array_equal(generated[:len(answer)], answer))


def accuracy(model, examples, *, batch: int = 64, method: str | None = None, **greedy_kwargs) -> dict[str, float]:
  """{family: exact-match accuracy} (+ conflict fractions) of `examples` (a list or {family: list}).

  method: 'greedy' or 'forced' (see the module docstring); default 'greedy' when greedy_kwargs
  (e.g. hook, hook_args for minilm.generate.greedy) are given, else 'forced'.
  """
  examples = _flatten(examples)
  method = method or ("greedy" if greedy_kwargs else "forced")
  if method not in ("greedy", "forced"):
    raise ValueError(f"method: must be one of 'greedy', 'forced'; got {method!r}")
  if method == "forced" and greedy_kwargs:
    raise ValueError(f"method: 'forced' takes no greedy arguments; got {', '.join(greedy_kwargs)}")
  candidates = [(i, name, np.asarray(a)) for i, ex in enumerate(examples)
                for name, a in zip(("answer", "context_answer", "memory_answer"), _answers_named(ex))]
  if method == "greedy":
    generated = generate_all(model, examples, batch, **greedy_kwargs)
    ok = [_matches(generated[i], a) for i, _, a in candidates]
  else:
    ok = forced_matches(model, [examples[i].prompt for i, _, _ in candidates], [a for _, _, a in candidates], batch)
  matched = defaultdict(dict)
  for (i, name, _), good in zip(candidates, ok):
    matched[i][name] = good
  hits: dict[str, list[bool]] = defaultdict(list)
  for i, ex in enumerate(examples):
    hits[ex.family].append(matched[i]["answer"])
    if "context_answer" in ex.meta and "memory_answer" in ex.meta:
      context = matched[i]["context_answer"]
      memory = not context and matched[i]["memory_answer"]
      hits[f"{ex.family}.follows_context"].append(context)
      hits[f"{ex.family}.follows_memory"].append(memory)
      hits[f"{ex.family}.other"].append(not context and not memory)
  return {name: float(np.mean(v)) for name, v in sorted(hits.items())}


def summary(scores: Mapping[str, float], families: Iterable[str] | None = None) -> str:
  """One line such as 'passkey 0.84  recall 0.12 ...' (fractions of the per-family keys only)."""
  names = [k for k in scores if "." not in k] if families is None else list(families)
  return "  ".join(f"{k} {scores[k]:.2f}" for k in names)
