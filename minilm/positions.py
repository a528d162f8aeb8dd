"""Position-encoding math: RoPE, ALiBi, sinusoidal tables.

Pure functions with no parameters; `minilm.encodings` wraps them as modules. RoPE angles and their
sin/cos are always computed in float32 (never in the input's dtype): at position 8191 a bfloat16
angle would be off by whole radians.
"""
from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

LAYOUTS = ("half", "interleaved")
PARTIAL_STYLES = ("neox", "p-rope")
ROPE_SCALINGS = ("none", "linear", "llama3")


def _check(name: str, value, allowed) -> None:
  if value not in allowed:
    raise ValueError(f"{name}: must be one of {', '.join(map(repr, allowed))}; got {value!r}")


def rotary_pairs(head_dim: int, fraction: float = 1.0, partial: str = "neox") -> tuple[int, int]:
  """(span, n_rotated): the rotary pairs live in dims [0, span); the first n_rotated turn.

  neox squeezes the full spectrum onto span = fraction * head_dim dims; p-rope keeps the full head
  as span and leaves the lowest-frequency pairs (j >= n_rotated) unrotated.
  """
  _check("partial", partial, PARTIAL_STYLES)
  if head_dim % 2:
    raise ValueError(f"head_dim: RoPE needs an even head_dim; got {head_dim}")
  if not 0.0 < fraction <= 1.0:
    raise ValueError(f"fraction: must be in (0, 1]; got {fraction}")
  if partial == "neox":
    span = fraction * head_dim
    if abs(span - round(span)) > 1e-9 or round(span) % 2:
      raise ValueError(f"fraction: fraction*head_dim must be an even integer; got {fraction}*{head_dim}")
    return int(round(span)), int(round(span)) // 2
  n_rot = fraction * head_dim / 2
  if abs(n_rot - round(n_rot)) > 1e-9:
    raise ValueError(f"fraction: p-rope needs fraction*head_dim/2 to be a whole number of pairs; "
                     f"got {fraction}*{head_dim}/2")
  n_rot = int(round(n_rot))
  return head_dim, n_rot


def rope_frequencies(head_dim: int, base: float = 10000.0, fraction: float = 1.0,
                     partial: str = "neox") -> np.ndarray:
  """theta_j = base^(-2j/rotary_dim) for every rotated pair j, in float64 (cast to float32 by users).

  neox: rotary_dim = fraction * head_dim, j < rotary_dim / 2.
  p-rope: rotary_dim = head_dim, only the fraction of highest frequencies (smallest j) is kept.
  """
  if base <= 1.0:
    raise ValueError(f"base: must be > 1; got {base}")
  span, n_rot = rotary_pairs(head_dim, fraction, partial)
  j = np.arange(n_rot, dtype=np.float64)
  return base ** (-2.0 * j / span)


def scale_frequencies(theta: np.ndarray, scaling: str = "none", factor: float = 1.0,
                      low_freq_factor: float = 1.0, high_freq_factor: float = 4.0,
                      original_max_len: int = 8192) -> np.ndarray:
  """RoPE frequencies stretched for contexts longer than the model was trained on (HF rope_scaling).

  linear: every theta / factor (position interpolation). llama3: pairs whose wavelength exceeds
  original_max_len / low_freq_factor turn `factor` times slower, those shorter than
  original_max_len / high_freq_factor keep their speed, and the band between blends the two.
  """
  _check("scaling", scaling, ROPE_SCALINGS)
  theta = np.asarray(theta, np.float64)
  if scaling == "none":
    return theta
  if scaling == "linear":
    return theta / factor
  wavelen = 2 * math.pi / theta
  smooth = (original_max_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
  blended = (1 - smooth) * theta / factor + smooth * theta
  return np.where(wavelen > original_max_len / low_freq_factor, theta / factor,
                  np.where(wavelen < original_max_len / high_freq_factor, theta, blended))


def rope_pair_index(head_dim: int, layout: str = "half", fraction: float = 1.0,
                    partial: str = "neox") -> np.ndarray:
  """For every dim d of a head, the index j of its rotary pair (theta_j), or -1 if unrotated.

  half: pair j is dims (j, j + span/2); interleaved: pair j is dims (2j, 2j + 1).
  """
  _check("layout", layout, LAYOUTS)
  span, n_rot = rotary_pairs(head_dim, fraction, partial)
  index = -np.ones(head_dim, dtype=np.int32)
  j = np.arange(span // 2)
  if layout == "half":
    index[j], index[j + span // 2] = j, j
  else:
    index[2 * j], index[2 * j + 1] = j, j
  index[index >= n_rot] = -1
  return index


def _rotate(x: jnp.ndarray, angle: jnp.ndarray, layout: str) -> jnp.ndarray:
  """Rotate every pair of x (float32, last dim 2P) by angle [..., P] (float32)."""
  cos, sin = jnp.cos(angle), jnp.sin(angle)
  if layout == "half":
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  xe, xo = x[..., 0::2], x[..., 1::2]
  return jnp.stack([xe * cos - xo * sin, xo * cos + xe * sin], axis=-1).reshape(x.shape)


def apply_rope(x_BxTxHxD: jnp.ndarray, positions: jnp.ndarray, *, base: float = 10000.0,
               fraction: float = 1.0, partial: str = "neox", layout: str = "half",
               theta: np.ndarray | None = None) -> jnp.ndarray:
  """Rotate q or k by their positions ([T] or [B, T]). Math in float32; output in x's dtype.

  theta: the rotated pairs' frequencies, when not rope_frequencies(head_dim, base, fraction,
  partial) (scaled RoPE).
  """
  _check("layout", layout, LAYOUTS)
  head_dim = x_BxTxHxD.shape[-1]
  span, n_rot = rotary_pairs(head_dim, fraction, partial)
  theta_P = np.zeros(span // 2, np.float32)  # unrotated p-rope pairs: angle 0, an exact identity
  theta_P[:n_rot] = rope_frequencies(head_dim, base, fraction, partial) if theta is None else theta
  pos = jnp.asarray(positions, jnp.float32)
  pos_BxT = pos[None] if pos.ndim == 1 else pos
  angle_BxTx1xP = (pos_BxT[..., None] * jnp.asarray(theta_P))[:, :, None, :]
  x = x_BxTxHxD.astype(jnp.float32)
  rotated = _rotate(x[..., :span], angle_BxTx1xP, layout)
  out = jnp.concatenate([rotated, x[..., span:]], axis=-1) if span < head_dim else rotated
  return out.astype(x_BxTxHxD.dtype)


def alibi_slopes(n_heads: int) -> np.ndarray:
  """Per-head ALiBi slopes (Press et al. 2022; HF BLOOM's rule for non-powers of two)."""
  if n_heads < 1:
    raise ValueError(f"n_heads: must be >= 1; got {n_heads}")

  def geometric(n: int) -> list[float]:
    start = 2.0 ** (-8.0 / n)
    return [start ** (i + 1) for i in range(n)]

  closest = 2 ** int(math.floor(math.log2(n_heads)))
  slopes = geometric(closest)
  if closest < n_heads:
    slopes += geometric(2 * closest)[0::2][: n_heads - closest]
  return np.asarray(slopes, np.float64)


def alibi_bias(slopes_H: jnp.ndarray, q_pos: jnp.ndarray, k_pos: jnp.ndarray) -> jnp.ndarray:
  """Additive attention bias [..., H, T, S] = -slope_h * (q_pos - k_pos), in float32.

  Zero on the diagonal and linear in distance; future keys are left to the causal mask.
  """
  q = jnp.asarray(q_pos, jnp.float32)
  k = jnp.asarray(k_pos, jnp.float32)
  distance = q[..., :, None] - k[..., None, :]
  slopes = jnp.asarray(slopes_H, jnp.float32)
  return -slopes[:, None, None] * distance[..., None, :, :]


def sinusoidal_table(max_len: int, d_model: int, base: float = 10000.0) -> np.ndarray:
  """Vaswani et al. table [max_len, d_model]: PE[t, 2i] = sin(t w_i), PE[t, 2i+1] = cos(t w_i)."""
  if d_model % 2:
    raise ValueError(f"d_model: sinusoidal positions need an even d_model; got {d_model}")
  t = np.arange(max_len, dtype=np.float64)[:, None]
  w = base ** (-np.arange(0, d_model, 2, dtype=np.float64) / d_model)
  table = np.zeros((max_len, d_model), np.float64)
  table[:, 0::2], table[:, 1::2] = np.sin(t * w), np.cos(t * w)
  return table.astype(np.float32)
