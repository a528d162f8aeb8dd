"""Read what a forward pass saw: a cache keyed `blocks.<layer>.attn.<point>`, stackable over layers."""
from __future__ import annotations

import re
from typing import Iterable, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from minilm.model import Decoder


class Cache(Mapping):
  """Captured tensors by hook name, e.g. cache['blocks.0.attn.rot_q'] -> [B, T, H, D].

  `cache.stack('attn.rot_q')` -> [L, B, T, H, D], layers in order.
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
    pattern = re.compile(rf"blocks\.(\d+)\.{re.escape(point)}$")
    found = sorted((int(m.group(1)), name) for name in self._tensors if (m := pattern.match(name)))
    if not found:
      raise KeyError(f"no captured point matches 'blocks.<layer>.{point}'")
    return jnp.stack([self._tensors[name] for _, name in found])


def flatten(intermediates) -> dict[str, jax.Array]:
  """nnx.capture's State -> {'blocks.3.attn.q': array}; each point is sown once per forward."""
  flat = {}
  for path, value in nnx.to_flat_state(intermediates):
    (array,) = value.get_value() if hasattr(value, "get_value") else value
    flat[".".join(str(p) for p in path)] = array
  return flat


def run(model: Decoder, tokens_BxT, points: Iterable[str] | bool = True, **kwargs):
  """Forward with capture: returns (logits, Cache). Works inside jax.jit (pure in model state)."""
  logits, intermediates = nnx.capture(model, nnx.Intermediate)(tokens_BxT, capture=points, **kwargs)
  return logits, Cache(flatten(intermediates))
