"""Read what a forward pass saw: a cache keyed by hook name (minilm.hooks), stackable over layers."""
from __future__ import annotations

import functools
from typing import Iterable, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from minilm import hooks
from minilm.model import Decoder


class Cache(Mapping):
  """Captured tensors by hook name, e.g. cache['blocks.0.attn.rot_q'] -> [B, T, H, D].

  `cache.stack('rot_q')` -> [L, B, T, H, D], layers in order (names: minilm.hooks).
  """

  def __init__(self, tensors: Mapping[str, jax.Array]):
    self._tensors = dict(tensors)

  def __getitem__(self, name):
    if name not in self._tensors:
      raise KeyError(f"{name!r} was not captured; captured: {', '.join(sorted(self._tensors))}")
    return self._tensors[name]

  def __iter__(self):
    return iter(self._tensors)

  def __len__(self):
    return len(self._tensors)

  def stack(self, point: str) -> jax.Array:
    found = sorted(layer for layer, p in map(hooks.split, self._tensors) if p == point)
    if not found:
      raise KeyError(f"no captured point {point!r}; captured: {', '.join(sorted(self._tensors))}")
    return jnp.stack([self._tensors[hooks.name(layer, point)] for layer in found])


def flatten(intermediates) -> dict[str, jax.Array]:
  """nnx.capture's State -> {'blocks.3.attn.q': array}; each point is sown once per forward."""
  flat = {}
  for path, value in nnx.to_flat_state(intermediates):
    (array,) = value.get_value() if hasattr(value, "get_value") else value
    flat[".".join(str(p) for p in path)] = array
  return flat


def run(model: Decoder, tokens_BxT, points: Iterable[str] | bool = True, **kwargs):
  """Forward with capture: returns (logits, Cache). Works inside jax.jit (pure in model state)."""
  return run_fn(model, functools.partial(model, tokens_BxT, **kwargs), points)


def run_fn(model: Decoder, call, points: Iterable[str] | bool = True):
  """call(capture=points) (a call of `model`, e.g. a prefill with a KV cache) with capture: returns
  (its output, Cache)."""
  out, intermediates = nnx.capture(lambda m: call(capture=points), nnx.Intermediate)(model)
  return out, Cache(flatten(intermediates))
