"""Greedy decoding with a KV cache: one jitted prefill (where interventions apply) and a scanned step."""
from __future__ import annotations

import functools
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
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
