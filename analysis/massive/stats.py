"""Statistics of massive values: norms M[h, d], massive dims, rotary-pair energy, bootstrap intervals.

Everything follows docs/claims.md. The only thing computed from full activations is
`sum_squares` (jax, runs on device inside the traced forward); every other function takes norms
M [..., H, D] (any leading batch dims, e.g. bootstrap replicates) and is plain numpy.
"""
from __future__ import annotations

import dataclasses
import math
import zlib

import jax.numpy as jnp
import numpy as np

from minilm.encodings import Pairing
from minilm.schema import check


LAM = 5.0
"""The paper's massive-value threshold: dim d of a head is massive when M[d] > LAM * mean_d M."""
BOOT_SEED = 0
"""The seed of every bootstrap of the massive-value pipeline (traces, claims, comparisons, sinks)."""


# ------------------------------------------------------------------------------ norms (device side)

def sum_squares(x, *, drop_first: bool = False, mask=None):
  """Per-prompt sum over tokens of x^2: [B, T, H, D] -> [B, H, D] ([T, H, D] -> [H, D]).

  Accumulated in float32 (or x's dtype if wider). drop_first leaves out token 0 (the attention-sink
  position); mask [B, T] (or [T]) is 1/True on tokens to count, 0 on padding.
  """
  x = jnp.asarray(x)
  if x.ndim not in (3, 4):
    raise ValueError(f"x: expected [T, H, D] or [B, T, H, D]; got shape {x.shape}")
  x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  weight = jnp.ones(x.shape[:-2], x.dtype) if mask is None else jnp.asarray(mask, x.dtype)
  if weight.shape != x.shape[:-2]:
    raise ValueError(f"mask: expected shape {x.shape[:-2]} (prompts, tokens); got {weight.shape}")
  if drop_first:
    weight = weight.at[..., 0].set(0)
  return jnp.einsum("...thd,...t->...hd", x * x, weight)


def value_norms(x, *, drop_first: bool = False, mask=None, per_prompt: bool = False):
  """M[h, d] = sqrt(sum over tokens (and prompts) of x[t, h, d]^2), docs/claims.md's definition.

  x: [T, H, D] or [B, T, H, D]; per_prompt=True keeps the prompt axis ([B, H, D]).
  """
  s = sum_squares(x, drop_first=drop_first, mask=mask)
  if s.ndim == 3 and not per_prompt:
    s = s.sum(0)
  return jnp.sqrt(s)


# ----------------------------------------------------------------------------- massive dimensions

def massive_mask(M, lam: float = LAM) -> np.ndarray:
  """The paper's Definition: M[h, d] > lam * mean over d of M[h, :]."""
  M = np.asarray(M)
  return M > lam * M.mean(-1, keepdims=True)


def top_k_mask(M, k: int) -> np.ndarray:
  """The reference code's definition: the k largest dims of every head."""
  M = np.asarray(M)
  if not 1 <= k <= M.shape[-1]:
    raise ValueError(f"k: must be in 1..{M.shape[-1]} (head_dim); got {k}")
  mask = np.zeros(M.shape, bool)
  if k <= 4:  # repeated argmax: the same first-index tie-break as a stable sort, without sorting
    rest = np.array(M, np.float64)
    for _ in range(k):
      top = rest.argmax(-1)[..., None]
      np.put_along_axis(mask, top, True, axis=-1)
      np.put_along_axis(rest, top, -np.inf, axis=-1)
    return mask
  np.put_along_axis(mask, np.argsort(-M, axis=-1, kind="stable")[..., :k], True, axis=-1)
  return mask


def max_mean(M) -> np.ndarray:
  M = np.asarray(M)
  return M.max(-1) / np.maximum(M.mean(-1), np.finfo(np.float32).tiny)


def kurtosis(M) -> np.ndarray:
  """Excess kurtosis of each head's profile M[h, :] over dims (0 for a Gaussian-like profile;
  about D for a single dominant dim): how few dims hold the norm."""
  M = np.asarray(M, np.float64)
  c = M - M.mean(-1, keepdims=True)
  c2 = c * c
  var = c2.mean(-1)
  return (c2 * c2).mean(-1) / np.maximum(var ** 2, 1e-300) - 3.0


def agreement(M, k: int = 2) -> tuple[np.ndarray, float]:
  """Cross-head agreement of a layer: for each head, the mean over the other heads of
  |top_k(h) & top_k(h')| / k. Chance (uniformly random top-k sets) is k / D. NaN with one head."""
  M = np.asarray(M)
  H, D = M.shape[-2:]
  top = top_k_mask(M, k).astype(np.float32)
  overlap = np.einsum("...hd,...gd->...hg", top, top) / k
  if H < 2:
    return np.full(M.shape[:-1], np.nan), k / D
  per_head = (overlap.sum(-1) - np.diagonal(overlap, axis1=-2, axis2=-1)) / (H - 1)
  return per_head, k / D


# --------------------------------------------------------------------------------- rotary pairs

def pair_energy(M, pair_index) -> np.ndarray:
  """E[..., h, j] = sum of M[..., h, d]^2 over the dims d of pair j (unrotated dims left out)."""
  M2 = np.asarray(M, np.float64) ** 2
  pair_index = np.asarray(pair_index)
  P = int(pair_index.max()) + 1
  onehot = (pair_index[:, None] == np.arange(P)[None, :]).astype(np.float64)
  return M2 @ onehot


def unit_index(pairing: Pairing) -> np.ndarray:
  """[D] the rotation-invariant unit of every dim: its rotary pair j, and for dims RoPE leaves
  unrotated (partial RoPE) pairs P, P+1, ... formed among themselves in order (the k-th unrotated dim
  with the (k + U/2)-th). Every dim belongs to a unit of two, so per-unit statistics of a RoPE arm
  and of a NoPE arm paired the same way compare like for like."""
  index = np.array(pairing.pair_index)
  unrotated = np.nonzero(index < 0)[0]
  half = len(unrotated) // 2
  index[unrotated] = pairing.n_pairs + np.arange(len(unrotated)) % max(half, 1)
  return index


def pair_norms(M, units) -> np.ndarray:
  """N[..., h, j] = sqrt(E[..., h, j]) over the units of `unit_index`: the norm over tokens of a
  pair's two-dim sub-vector, which a rotation of the pair leaves unchanged."""
  return np.sqrt(pair_energy(M, units))


def unrotated_share(M, pair_index) -> np.ndarray:
  """Share of sum_d M^2 in dims that RoPE leaves unrotated (0 without partial RoPE)."""
  M2 = np.asarray(M, np.float64) ** 2
  return M2[..., np.asarray(pair_index) < 0].sum(-1) / np.maximum(M2.sum(-1), 1e-300)


def lf_pairs(n_pairs: int, quarter: float = 0.25) -> int:
  """How many of the lowest-frequency pairs form the low-frequency band (at least one)."""
  return max(1, int(round(quarter * n_pairs)))


def lf_share(E, quarter: float = 0.25) -> tuple[np.ndarray, float]:
  """(share of rotary-pair energy in the lowest-frequency `quarter` of pairs, its null n_lf/P)."""
  E = np.asarray(E)
  P = E.shape[-1]
  n = lf_pairs(P, quarter)
  return E[..., P - n:].sum(-1) / np.maximum(E.sum(-1), 1e-300), n / P


def context_pair(theta, context: float) -> int:
  """First pair j whose wavelength 2*pi/theta_j exceeds `context` tokens (P if none does)."""
  beyond = np.nonzero(2 * np.pi / np.asarray(theta) > context)[0]
  return int(beyond[0]) if len(beyond) else len(theta)


BAND = (0.5, 4.0)
"""The boundary band: pairs whose wavelength lies in (0.5 * context, 4 * context], one octave
either side of the [context, 2 * context] stretch where the small-scale runs put the mass."""


def band_share(E, theta, context: float, band=BAND) -> tuple[np.ndarray, float]:
  """(share of rotary-pair energy in the boundary band, its null = band pairs / P)."""
  wl = 2 * np.pi / np.asarray(theta)
  inside = (wl > band[0] * context) & (wl <= band[1] * context)
  E = np.asarray(E)
  return E[..., inside].sum(-1) / np.maximum(E.sum(-1), 1e-300), float(inside.mean())


# ---------------------------------------------------------------------------- per-head summaries

CONCENTRATION = ("massive", "any_massive", "topk_massive", "max_mean", "kurtosis", "agreement")
"""Statistics of how few coordinates hold a head's norm. Each is computed per dim of M (on q/k: before
RoPE; on rot_q/rot_k: after RoPE, the paper's view) and, prefixed 'pair_', per rotation-invariant unit
(`unit_index`, norms `pair_norms`): the same definition with pair norms in place of dim norms."""
PAIR = tuple(f"pair_{s}" for s in CONCENTRATION)
PER_HEAD = ("massive", "topk_massive", "max_mean", "kurtosis", "agreement", "lf_share", "band_share",
            "unrot_share", "peak_pair", "peak_wl_ctx", "peak_minus_ctx", "peak_minus_2ctx", "any_massive") + PAIR
"""The per-head statistics `head_stats` returns, in table-column order."""


@dataclasses.dataclass(frozen=True)
class StatConfig:
  """Every choice behind the statistics (docs/claims.md: expose each as a parameter)."""
  lam: float = LAM          # massive: M > lam * mean_d M
  top_k: int = 1            # reference-code definition: the top_k dims of every head
  agree_k: int = 2          # cross-head agreement over each head's top agree_k dims
  lf_quarter: float = 0.25  # low-frequency band: this fraction of the pairs with lowest frequency
  band: tuple = BAND        # boundary band in multiples of the context length
  drop_first: bool = False  # leave token 0 (attention-sink position) out of M
  resid_abs: float = 100.0     # massive residual activation (Sun et al. 2024): |x| > resid_abs ...
  resid_ratio: float = 1000.0  # ... and |x| > resid_ratio * median |x| of the layer (alone: scale-free form)

  def __post_init__(self):
    check(0 < self.lam < math.inf, "lam", f"must be a finite number > 0; got {self.lam}")   # inf: nothing is massive
    check(self.top_k >= 1, "top_k", f"must be >= 1; got {self.top_k}")
    check(self.agree_k >= 1, "agree_k", f"must be >= 1; got {self.agree_k}")
    check(0 < self.lf_quarter < 1, "lf_quarter", f"must be in (0, 1); got {self.lf_quarter}")
    check(len(self.band) == 2 and 0 < self.band[0] < self.band[1] < math.inf, "band",
          f"must be two increasing finite positive multiples of the context; got {self.band}")
    check(0 <= self.resid_abs < math.inf, "resid_abs", f"must be a finite number >= 0; got {self.resid_abs}")
    check(1 < self.resid_ratio < math.inf, "resid_ratio",
          f"must be a finite number > 1 (a multiple of the median); got {self.resid_ratio}")


def check_head_dim(cfg: StatConfig, head_dim: int, model: str, prefix: str = "") -> None:
  """top_k and agree_k count dims of a head: more than the head has would silently mean all of them.
  Errors name the fields `prefix` + top_k (the lab's trace.top_k)."""
  for field, k in (("top_k", cfg.top_k), ("agree_k", cfg.agree_k)):
    check(k <= head_dim, prefix + field, f"must be <= the head dim of {model} ({head_dim}); got {k}")


def head_stats(M, pairing: Pairing, context: float, cfg: StatConfig = StatConfig(), only=None,
               units=None) -> dict:
  """Per-head statistics of norms M [..., H, D] -> {name: [..., H]} (see PER_HEAD, or just the names
  in `only`: bootstrap replicates of one statistic need not pay for the others), plus the per-group
  constants under 'null': chance levels and boundary pairs. `units` ([D], default
  unit_index(pairing)) groups the dims for the 'pair_' statistics; a NoPE arm compared with a RoPE arm
  takes the RoPE arm's units."""
  M = np.asarray(M, np.float64)
  units = unit_index(pairing) if units is None else np.asarray(units)
  N = pair_norms(M, units)
  E = pair_energy(M, pairing.pair_index)
  lf, lf_null = lf_share(E, cfg.lf_quarter)
  band, band_null = band_share(E, pairing.theta, context, cfg.band)
  peak = E.argmax(-1)
  j_ctx, j_2ctx = context_pair(pairing.theta, context), context_pair(pairing.theta, 2 * context)
  compute = {
      **_concentration(M, cfg),
      **{f"pair_{name}": f for name, f in _concentration(N, cfg).items()},
      "lf_share": lambda: lf,
      "band_share": lambda: band,
      "unrot_share": lambda: unrotated_share(M, pairing.pair_index),
      "peak_pair": lambda: peak.astype(np.float64),
      "peak_wl_ctx": lambda: pairing.wavelength[peak] / context,
      "peak_minus_ctx": lambda: (peak - j_ctx).astype(np.float64),
      "peak_minus_2ctx": lambda: (peak - j_2ctx).astype(np.float64),
  }
  out = {name: f() for name, f in compute.items() if only is None or name in only}
  out["null"] = {"lf_share": lf_null, "band_share": band_null, "agreement": min(cfg.agree_k, M.shape[-1]) / M.shape[-1],
                 "pair_agreement": min(cfg.agree_k, N.shape[-1]) / N.shape[-1],
                 "ctx_pair": j_ctx, "ctx2_pair": j_2ctx, "n_pairs": pairing.n_pairs}
  return out


def _concentration(M, cfg: StatConfig) -> dict:
  """{name: thunk} of the CONCENTRATION statistics of norms M [..., H, units] (dims or pairs)."""
  agree_k = min(cfg.agree_k, M.shape[-1])
  return {
      "massive": lambda: massive_mask(M, cfg.lam).sum(-1).astype(np.float64),
      "any_massive": lambda: massive_mask(M, cfg.lam).any(-1).astype(np.float64),
      "topk_massive": lambda: _topk_massive(M, cfg),
      "max_mean": lambda: max_mean(M),
      "kurtosis": lambda: kurtosis(M),
      "agreement": lambda: agreement(M, agree_k)[0],
  }


def _topk_massive(M, cfg: StatConfig) -> np.ndarray:
  """How many of a head's top_k dims also pass the lam test (the two definitions agree when = k)."""
  k = min(cfg.top_k, M.shape[-1])
  return (top_k_mask(M, k) & massive_mask(M, cfg.lam)).sum(-1).astype(np.float64)


# ------------------------------------------------------------------------- recurrence across heads

def shared_pairs(mask_xHxD) -> np.ndarray:
  """How many pairs of heads share a marked dim, summed over dims: sum_d C(c_d, 2) with c_d the heads
  marking dim d. mask [..., H, D] -> [...]."""
  c = np.asarray(mask_xHxD).sum(-2).astype(np.int64)
  return (c * (c - 1) // 2).sum(-1)


def recurrence(masks, n_perm: int, seed: int) -> dict:
  """Do the same dim indices recur across the heads of a layer? `masks`: one boolean [H, D] per
  layer (e.g. massive dims). Statistic: shared_pairs summed over layers. Null: every head keeps its
  number of marked dims but places them uniformly at random among its D dims (each head's row
  permuted independently, `n_perm` times, seeded). One-sided p = (1 + #null >= observed) / (1 +
  n_perm). Layers with fewer than two marked heads cannot share and are left out ('testable' counts
  the others); with none testable p is NaN. p_best is the p of the most recurrent placement (every
  head's marked dims at the same indices, `nested_pairs`): the smallest p these counts can reach
  (with few marked heads and many dims it stays above any usual level)."""
  testable = [np.asarray(m, bool) for m in masks if np.asarray(m).any(-1).sum() >= 2]
  observed = int(sum(shared_pairs(m) for m in testable))
  if not testable:
    return {"observed": 0, "null_mean": math.nan, "p": math.nan, "p_best": math.nan, "testable": 0,
            "n_perm": n_perm, "seed": seed}
  rng = np.random.default_rng(seed)
  null = np.zeros(n_perm, np.int64)
  for m in testable:
    null += shared_pairs(rng.permuted(np.broadcast_to(m, (n_perm, *m.shape)), axis=-1))
  p = lambda statistic: float((1 + (null >= statistic).sum()) / (1 + n_perm))
  return {"observed": observed, "null_mean": float(null.mean()), "p": p(observed),
          "p_best": p(sum(nested_pairs(m) for m in testable)), "testable": len(testable), "n_perm": n_perm, "seed": seed}


def nested_pairs(mask_HxD) -> int:
  """shared_pairs of the most recurrent placement of a layer's marks: each head keeps its count, all
  at the same dims (the head with most marks holds every other head's)."""
  counts = np.asarray(mask_HxD).sum(-1)
  c = (counts[:, None] > np.arange(np.asarray(mask_HxD).shape[-1])[None]).sum(0).astype(np.int64)
  return int((c * (c - 1) // 2).sum())


# ------------------------------------------------------------------------------------- bootstrap

def name_seed(seed: int, name: str) -> int:
  """A bootstrap seed for the estimate of `name` (a task family, a claim): the same for that name
  whatever else a study ran or in which order. Multiples of 1000, so that seed + k for k < 1000
  stay the name's own."""
  return seed + 1000 * (zlib.crc32(name.encode()) & 0xFFFFFF)


def prompt_counts(n_prompts: int, n_boot: int, seed: int = 0) -> np.ndarray:
  """[n_boot, n_prompts] multinomial counts: each row resamples the prompts with replacement."""
  rng = np.random.default_rng(seed)
  return rng.multinomial(n_prompts, np.full(n_prompts, 1.0 / n_prompts), size=n_boot).astype(np.float64)


def boot_norms(S_NxHxD, counts_RxN) -> np.ndarray:
  """Norms M [R, H, D] of each resampled prompt set from per-prompt sums of squares."""
  S = np.asarray(S_NxHxD, np.float64)
  N, H, D = S.shape
  return np.sqrt(np.maximum(counts_RxN @ S.reshape(N, H * D), 0.0)).reshape(-1, H, D)


def unit_draws(n_boot: int, n_units: int, seed: int | np.random.Generator = 0) -> np.ndarray:
  """[n_boot, n_units] indices: each row resamples the units (heads, items) with replacement. A
  Generator as `seed` is drawn from as it stands (consecutive draws of one stream)."""
  return np.random.default_rng(seed).integers(0, n_units, size=(n_boot, n_units))


def resample_means(*values_U, n_boot: int, seed: int | np.random.Generator = 0) -> list[np.ndarray]:
  """The paired bootstrap of means over units: [n_boot] replicate means of each of `values_U` (aligned
  on the same units, e.g. two schemes' success on the same items), all resampled by one draw."""
  idx = unit_draws(n_boot, len(values_U[0]), seed)
  return [np.asarray(v)[idx].mean(1) for v in values_U]


def resample_units(values_RxU, seed: int = 0) -> np.ndarray:
  """Mean over units (heads), resampled with replacement independently in each replicate [R]."""
  values = np.asarray(values_RxU, np.float64)
  idx = unit_draws(*values.shape, seed)
  return np.nanmean(np.take_along_axis(values, idx, axis=1), axis=1)


def interval(samples, level: float = 0.95) -> tuple[float, float]:
  a = (1 - level) / 2
  s = np.asarray(samples, np.float64)
  s = s[np.isfinite(s)]
  if not len(s):
    return math.nan, math.nan
  return float(np.quantile(s, a)), float(np.quantile(s, 1 - a))


def head_replicates(S_NxHxD, stats, pairing: Pairing, context: float, cfg: StatConfig, counts,
                    units=None) -> dict:
  """{stat: (per-head values [H], per-head bootstrap replicates [n_boot, H])} of one group of
  per-prompt sums of squares [N, H, D], prompts resampled by `counts`."""
  point = head_stats(np.sqrt(np.asarray(S_NxHxD, np.float64).sum(0)), pairing, context, cfg, stats, units)
  reps = head_stats(boot_norms(S_NxHxD, counts), pairing, context, cfg, stats, units)
  return {stat: (point[stat], reps[stat]) for stat in stats}


def pool_heads(per_group: list, stats, n_boot: int, seed: int = 0) -> dict:
  """{stat: (mean over every head of the groups, replicates [n_boot] with the heads resampled)} from
  `head_replicates` of each group."""
  out = {}
  for stat in stats:
    point = np.concatenate([g[stat][0] for g in per_group])
    finite = np.isfinite(point)
    value = float(point[finite].mean()) if finite.any() else math.nan
    out[stat] = (value, resample_units(np.concatenate([g[stat][1] for g in per_group], axis=1), seed)
                 if finite.any() else np.full(n_boot, math.nan))
  return out


def pooled(groups, stats, pairing: Pairing, context: float, cfg: StatConfig, counts,
           seed: int = 0, units=None) -> dict:
  """Means of per-head statistics over every head of `groups` (a list of per-prompt sums of squares
  [N, H, D], e.g. rot_q and rot_k of all layers) with bootstrap replicates:
  {stat: (point, replicates [n_boot])}. Prompts are resampled by `counts` (share them between arms
  to pair the arms), heads are resampled within each replicate (the same heads for the same seed and
  head count, so q/k and rot_q/rot_k replicates are paired)."""
  per_group = [head_replicates(S, stats, pairing, context, cfg, counts, units) for S in groups]
  return pool_heads(per_group, stats, len(counts), seed)
