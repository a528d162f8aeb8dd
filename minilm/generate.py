"""Greedy decoding with a KV cache: one jitted prefill (where interventions apply) and a scanned step;
prompts of mixed lengths go through it in equal-length batches (`batches`, `greedy_batches`)."""
from __future__ import annotations

import functools
from typing import Any, Callable, Iterator, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from minilm.model import Decoder, init_cache

# A prefill-only intervention: hook(args, hook_name, x) -> x. `hook` is static (compiled once per
# function); `args` is traced, so new masks or means per prompt do not recompile.
Hook = Optional[Callable[[Any, str, jax.Array], jax.Array]]


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new", "hook"))
def _greedy(graphdef, state, prompt_BxT, hook_args, *, max_new: int, hook: Hook):
  model = nnx.merge(graphdef, state)
  B, T = prompt_BxT.shape
  cache = init_cache(model.cfg, B, T + max_new)
  intervene = None if hook is None else functools.partial(hook, hook_args)
  logits, cache = model(prompt_BxT, cache=cache, intervene=intervene)
  first = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)

  def step(carry, _):
    token_B, cache = carry
    logits, cache = model(token_B[:, None], cache=cache)
    nxt = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)
    return (nxt, cache), token_B

  (last, cache), tokens = jax.lax.scan(step, (first, cache), None, length=max_new - 1)
  return jnp.concatenate([tokens.T, last[:, None]], axis=1), cache


def greedy(model: Decoder, prompt_BxT, max_new: int, *, hook: Hook = None, hook_args: Any = None,
           return_cache: bool = False):
  """Greedy continuation [B, max_new] of equal-length prompts [B, T] (group prompts by length).

  `hook` runs at prefill only, so the KV cache that decoding reads holds exactly the keys and values
  the hook produced; decoding steps themselves are never intervened on.
  """
  if max_new < 1:
    raise ValueError(f"max_new: must be >= 1; got {max_new}")
  graphdef, state = nnx.split(model)
  tokens, cache = _greedy(graphdef, state, jnp.asarray(prompt_BxT, jnp.int32), hook_args,
                          max_new=max_new, hook=hook)
  return (tokens, cache) if return_cache else tokens


def batches(prompts: Sequence, max_new: Sequence[int], batch: int, *,
            pow2: bool = False) -> Iterator[tuple[list[int], np.ndarray, int]]:
  """(indices, prompts [rows, T], max_new) per batch: `greedy` takes equal-length prompts, so prompts
  are grouped by (length, max_new[i]), groups in order of first appearance and indices in order within
  each. A batch holds at most `batch` prompts, padded by repeating its last one to `batch` rows (with
  pow2, to the next power of two) so that few shapes compile; rows past len(indices) are padding."""
  groups: dict[tuple[int, int], list[int]] = {}
  for i, (prompt, n) in enumerate(zip(prompts, max_new)):
    groups.setdefault((len(prompt), n), []).append(i)
  for (_, n), idx in groups.items():
    for start in range(0, len(idx), batch):
      chunk = idx[start:start + batch]
      rows = 1 << (len(chunk) - 1).bit_length() if pow2 else batch
      yield chunk, np.stack([np.asarray(prompts[i], np.int32) for i in chunk + [chunk[-1]] * (rows - len(chunk))]), n


def greedy_batches(model: Decoder, prompts: Sequence, max_new: Sequence[int], batch: int, *, pow2: bool = False,
                   hook: Hook = None, hook_args: Any = None) -> Iterator[tuple[list[int], np.ndarray]]:
  """`greedy` over `batches`: (indices, continuations [len(indices), max_new]) per batch."""
  for idx, prompt_BxT, n in batches(prompts, max_new, batch, pow2=pow2):
    yield idx, np.asarray(greedy(model, prompt_BxT, n, hook=hook, hook_args=hook_args))[:len(idx)]
