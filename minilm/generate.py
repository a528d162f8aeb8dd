"""Greedy decoding with a KV cache: one jitted prefill (where interventions apply) and a scanned step;
prompts of mixed lengths go through it in batches (`batches`, `greedy_batches`) of equal length, or,
with `bucket`, right-padded to a few lengths (per-row prompt lengths; the padding's keys stay
invisible), so that a suite of many prompt lengths compiles a few programs instead of one per length."""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Iterator, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from minilm import capture
from minilm.layers import decoding_kernels
from minilm.model import Decoder, init_cache

# A prefill-only intervention: hook(args, hook_name, x) -> x. `hook` is static (compiled once per
# function); `args` is traced, so new masks or means per prompt do not recompile. Over right-padded
# prompts the hook sees x at every position: a dict of args then carries 'valid' [B, T] (1 on the
# prompt tokens, `valid_tokens`), which a hook that reduces over tokens must use.
Hook = Optional[Callable[[Any, str, jax.Array], jax.Array]]


@dataclasses.dataclass(frozen=True)
class Measure:
  """What to read from the prefill: `points` (hook points, e.g. ('rot_q', 'rot_k')) are captured at
  every layer after the hook, and fn(cache, valid_BxT) -> pytree reduces them inside the compiled
  prefill (valid_BxT: 1 on prompt tokens, float32). A prefill without a hook, or with one that
  changes nothing, then measures the model itself, and no separate capture pass is needed."""
  points: tuple[str, ...]
  fn: Callable[[capture.Cache, jax.Array], Any]


def valid_tokens(lengths, T: int) -> jax.Array:
  """[B, T] float32: 1 on the prompt tokens of right-padded rows of `lengths`, 0 on the padding
  (lengths: a list, numpy or jax array; traced inside jit too)."""
  return (jnp.arange(T)[None] < jnp.asarray(lengths)[:, None]).astype(jnp.float32)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new", "hook", "measure"))
def _greedy(graphdef, state, prompt_BxT, lengths_B, hook_args, *, max_new: int, hook: Hook, measure: Measure | None):
  model = nnx.merge(graphdef, state)
  B, T = prompt_BxT.shape
  cache = init_cache(model.cfg, B, T + max_new)
  intervene = None if hook is None else functools.partial(hook, hook_args)
  # Padding repeats the last real position: in range for bounded encodings; its keys are never seen.
  positions_BxT = jnp.minimum(jnp.arange(T, dtype=jnp.int32)[None], lengths_B[:, None] - 1)
  prefill = functools.partial(model, prompt_BxT, positions_BxT, cache=cache, lengths_B=lengths_B,
                              logits_at_B=lengths_B - 1, intervene=intervene)
  measured = None
  if measure is None:
    logits, cache = prefill()
  else:
    (logits, cache), captured = capture.run_fn(model, prefill, measure.points)
    measured = measure.fn(captured, valid_tokens(lengths_B, T))
  first = jnp.argmax(logits[:, 0], axis=-1).astype(jnp.int32)

  def step(carry, i):
    token_B, cache = carry
    logits, cache = decoder(token_B[:, None], (lengths_B + i)[:, None], cache=cache)
    nxt = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)
    return (nxt, cache), token_B

  with decoding_kernels(model) as decoder:
    (last, cache), tokens = jax.lax.scan(step, (first, cache), jnp.arange(max_new - 1, dtype=jnp.int32))
  return jnp.concatenate([tokens.T, last[:, None]], axis=1), cache, measured


def greedy(model: Decoder, prompt_BxT, max_new: int, *, lengths=None, hook: Hook = None, hook_args: Any = None,
           return_cache: bool = False, measure: Measure | None = None):
  """Greedy continuation [B, max_new] of prompts [B, T]: equal-length, or right-padded with their
  lengths [B] given (`batches` makes both kinds of batch; a dict of hook_args then gets 'valid').

  `hook` runs at prefill only, so the KV cache that decoding reads holds exactly the keys and values
  the hook produced; decoding steps themselves are never intervened on. `measure` (a Measure): also
  returns what it computes from the prefill, as tokens, [cache,] measured.
  """
  if max_new < 1:
    raise ValueError(f"max_new: must be >= 1; got {max_new}")
  prompt_BxT = jnp.asarray(prompt_BxT, jnp.int32)
  B, T = prompt_BxT.shape
  padded, lengths = lengths is not None, np.full(B, T) if lengths is None else np.asarray(lengths)
  if lengths.shape != (B,) or lengths.min() < 1 or lengths.max() > T:
    raise ValueError(f"lengths: must be {B} prompt lengths in 1..{T}; got {lengths.tolist()}")
  if hook is not None and isinstance(hook_args, dict) and padded:
    hook_args = {**hook_args, "valid": valid_tokens(lengths, T)}
  graphdef, state = nnx.split(model)
  tokens, cache, measured = _greedy(graphdef, state, prompt_BxT, jnp.asarray(lengths, jnp.int32), hook_args,
                                    max_new=max_new, hook=hook, measure=measure)
  out = (tokens, cache) if return_cache else (tokens,)
  out += (measured,) if measure is not None else ()
  return out if len(out) > 1 else tokens


def padded_length(length: int, bucket: int) -> int:
  """The batch length of a prompt: its own (bucket 0), or the next multiple of `bucket`."""
  return length if bucket == 0 else -(-length // bucket) * bucket


def batches(prompts: Sequence, max_new: Sequence[int], batch: int, *, pow2: bool = False,
            bucket: int = 0) -> Iterator[tuple[list[int], np.ndarray, np.ndarray, int]]:
  """(indices, prompts [rows, T], lengths [rows], max_new) per batch, for `greedy`. Prompts are grouped
  by (padded_length(len, bucket), max_new[i]), groups in order of first appearance and indices in
  order within each, and right-padded (token 0) to the group's length. A group is cut into the
  fewest batches of at most `batch` prompts, all of one size (20 prompts at batch 8: 7, 7 and 6,
  not 8, 8 and 4), and the last is filled by repeating its last prompt to that size, so a group
  compiles one shape and computes fewer filler rows than it has batches. With pow2, batches hold `batch`
  prompts and the last is filled to the next power of two instead (few shapes across groups of
  many sizes). Rows past len(indices) are filler."""
  if bucket < 0:
    raise ValueError(f"bucket: must be >= 0 (0: no padding); got {bucket}")
  groups: dict[tuple[int, int], list[int]] = {}
  for i, (prompt, n) in enumerate(zip(prompts, max_new)):
    groups.setdefault((padded_length(len(prompt), bucket), n), []).append(i)
  for (T, n), idx in groups.items():
    size = batch if pow2 else -(-len(idx) // -(-len(idx) // batch))
    for start in range(0, len(idx), size):
      chunk = idx[start:start + size]
      rows = chunk + [chunk[-1]] * ((1 << (len(chunk) - 1).bit_length() if pow2 else size) - len(chunk))
      tokens = np.zeros((len(rows), T), np.int32)
      for r, i in enumerate(rows):
        tokens[r, :len(prompts[i])] = prompts[i]
      yield chunk, tokens, np.array([len(prompts[i]) for i in rows]), n


def greedy_batches(model: Decoder, prompts: Sequence, max_new: Sequence[int], batch: int, *, pow2: bool = False,
                   bucket: int = 0, hook: Hook = None, hook_args: Any = None) -> Iterator[tuple[list[int], np.ndarray]]:
  """`greedy` over `batches`: (indices, continuations [len(indices), max_new]) per batch."""
  for idx, prompt_BxT, lengths, n in batches(prompts, max_new, batch, pow2=pow2, bucket=bucket):
    yield idx, np.asarray(greedy(model, prompt_BxT, n, lengths=lengths, hook=hook, hook_args=hook_args))[:len(idx)]
