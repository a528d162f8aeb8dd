"""Disrupt massive Q/K values at prefill (claim C5): choose dims from their norms M, replace them.

Procedure (the paper's, with the reference code's weaknesses fixed):
1. Norms. The undisrupted model's prefill of the prompt gives M[b, h, d] = sqrt(sum_t x^2) at
   every disrupted point, per example (`source='prompt'`): read from the prefill of the undisrupted
   decoding (`measure`), or from a capture pass of its own (`norms_and_spread`); or M is fixed once
   from a probe set (`source='probe'`, M summed in quadrature over all probe tokens, the same dims
   for every prompt).
2. Dims. A boolean mask per layer, point and head (`select`): massive dims (lambda criterion, or top-k
   per head), or a control: the smallest-M dims (the massive count per head), random dims matched on
   the energy removed (below), or the same dims in V.
3. Replace. In the disrupted prefill, `hook` sets each masked dim to ITS OWN mean over the prompt
   tokens (or to zero), computed from the tensor that reaches the hook (so upstream disruption is
   included). Decoding steps are not intervened on; the KV cache holds exactly the disrupted keys.

Where: query heads at q/rot_q, KV heads at k/rot_k (GQA: masks per KV head), values at v.
`rope='post'` (default, the paper's code) chooses and replaces at rot_q/rot_k, after the rotation;
`rope='pre'` at q/k, before it (the rotation then mixes the replaced dim with its pair partner).

Random control ('random', seeded by `draw`): per head, the non-massive dims in a random order; the
control takes the first c of them, c chosen so that the energy they lose to mean replacement
(sum of S^2, S the spread to the mean) is closest to what the head's massive dims lose (ties: fewer
dims; a head without massive dims keeps all). The random dims differ per example, draw, layer and
point. Only the share of energy removed is matched, not the count; `energy_removed` reports the
match achieved, and `unmatched` the heads where no choice of non-massive dims can reach the target.
V control ('v'): per layer and KV head, the dims of V that are massive in K (the same indices);
queries and keys are left alone.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from analysis.massive import stats
from minilm import capture, generate, hooks
from minilm.schema import check, check_choice

# Order used in tables: the paper's three columns, then the extra controls.
MODES = ("off", "smallest", "massive", "random", "v", "massive_zero", "top1", "top2", "top4")
ROPE_SIDES = {"post": ("rot_q", "rot_k"), "pre": ("q", "k")}


@dataclasses.dataclass(frozen=True)
class DisruptConfig:
  mode: str = "massive"
  rope: str = "post"            # post: rot_q/rot_k (the paper) | pre: q/k
  criterion: str = "lambda"     # what 'massive' means for massive/massive_zero/smallest/random/v
  lam: float = stats.LAM        # massive: M > lam * mean_d M (criterion 'lambda')
  top_k: int = 1                # massive: the top_k largest-M dims per head (criterion 'topk')
  layer_start: int = 0          # disrupt layers [layer_start, layer_stop)
  layer_stop: int = 0           # 0: through the last layer
  source: str = "prompt"        # prompt: M from this prompt | probe: M fixed from a probe set
  draw: int = 0                 # seed of the random control

  def __post_init__(self):
    check_choice("disrupt.mode", self.mode, MODES)
    check_choice("disrupt.rope", self.rope, tuple(ROPE_SIDES))
    check_choice("disrupt.criterion", self.criterion, ("lambda", "topk"))
    check_choice("disrupt.source", self.source, ("prompt", "probe"))
    check(0 < self.lam < math.inf, "disrupt.lam", f"must be a finite number > 0; got {self.lam}")
    check(self.top_k >= 1, "disrupt.top_k", f"must be >= 1; got {self.top_k}")
    check(self.draw >= 0, "disrupt.draw", f"must be >= 0; got {self.draw}")
    check(self.layer_start >= 0, "disrupt.layer_start", f"must be >= 0; got {self.layer_start}")
    check(self.layer_stop == 0 or self.layer_stop > self.layer_start, "disrupt.layer_stop",
          f"must be 0 (last layer) or > layer_start={self.layer_start}; got {self.layer_stop}")

  def layers(self, n_layers: int) -> range:
    stop = self.layer_stop or n_layers
    check(stop <= n_layers, "disrupt.layer_stop", f"must be <= n_layers={n_layers}; got {stop}")
    return range(self.layer_start, stop)

  def points(self) -> tuple[str, str, str]:
    """(query point, key point, value point) that this config reads and may replace."""
    return (*ROPE_SIDES[self.rope], "v")


# ------------------------------------------------------------------------------------- norms M

def spread_norms(cache, valid_BxT):
  """(M, S) per example of every captured point (`norms_and_spread`), over the prompt tokens."""
  M = {name: stats.value_norms(x, mask=valid_BxT, per_prompt=True) for name, x in cache.items()}
  centred = {name: x - prompt_mean(x, valid_BxT) for name, x in cache.items()}
  return M, {name: stats.value_norms(x, mask=valid_BxT, per_prompt=True) for name, x in centred.items()}


def measure(cfg: DisruptConfig) -> generate.Measure:
  """(M, S) read from a prefill (generate.greedy's `measure`): the undisrupted decoding's prefill
  (mode 'off') gives what `norms_and_spread` gives, without a pass of its own; a disrupted one
  measures what the disruption left."""
  return generate.Measure(cfg.points(), spread_norms)


@functools.partial(jax.jit, static_argnames=("graphdef", "points"))
def _norms(graphdef, state, tokens_BxT, valid_BxT, points):
  model = nnx.merge(graphdef, state)
  # logits at one position only: the capture pass needs no head (its T x V matmul is not small)
  _, cache = capture.run(model, tokens_BxT, points, logits_at_B=jnp.zeros(tokens_BxT.shape[:1], jnp.int32))
  return spread_norms(cache, valid_BxT)


def prompt_mean(x_BxTxHxD, valid_BxT=None):
  """[B, 1, H, D] float32: the mean over the prompt tokens (valid_BxT 1; None: every token)."""
  x = x_BxTxHxD.astype(jnp.float32)
  if valid_BxT is None:
    return x.mean(axis=1, keepdims=True)
  w_BxTx1x1 = valid_BxT[:, :, None, None]
  return (x * w_BxTx1x1).sum(1, keepdims=True) / w_BxTx1x1.sum(1, keepdims=True)


def norms_and_spread(model, tokens_BxT, cfg: DisruptConfig, lengths=None):
  """Undisrupted M per example at every point `cfg` may touch ({'blocks.3.attn.rot_k': [B, H, D]}),
  and the spread S = sqrt(sum_t (x - mean_t x)^2): what replacing a dim by its mean takes away.
  lengths [B]: of right-padded prompts (sums and means over the prompt tokens only)."""
  graphdef, state = nnx.split(model)
  B, T = np.shape(tokens_BxT)
  valid = generate.valid_tokens(np.full(B, T) if lengths is None else lengths, T)
  M, S = _norms(graphdef, state, jnp.asarray(tokens_BxT, jnp.int32), jnp.asarray(valid), cfg.points())
  return {k: np.asarray(v) for k, v in M.items()}, {k: np.asarray(v) for k, v in S.items()}


def unmeasured(model_cfg, cfg: DisruptConfig, batch: int) -> dict[str, np.ndarray]:
  """Zero norms of the shapes `norms` gives: what `hook_args` needs for mode 'off', which reads no
  norm (its masks are all False), before any pass has measured them."""
  heads = {"q": model_cfg.n_heads, "rot_q": model_cfg.n_heads}
  return {hooks.name(layer, p): np.zeros((batch, heads.get(p, model_cfg.kv_heads), model_cfg.dim_per_head), np.float32)
          for layer in range(model_cfg.n_layers) for p in cfg.points()}


def norms(model, tokens_BxT, cfg: DisruptConfig) -> dict[str, np.ndarray]:
  return norms_and_spread(model, tokens_BxT, cfg)[0]


def energy_removed(M, S, args, cfg: DisruptConfig, n_layers: int) -> dict[str, np.ndarray]:
  """Per example [B] and point: the share of the point's total energy (sum of M^2 over the chosen
  layers, heads and dims) that the replacement removes, measured on undisrupted activations:
  sum of S^2 (to the mean) or M^2 (to zero) over the replaced dims. Exact for the first disrupted
  layer; later layers also see upstream changes. Explains why a mode matters: the mean of a nearly
  constant dim is nearly the dim itself."""
  out = {}
  for p in cfg.points():
    names = [hooks.name(l, p) for l in cfg.layers(n_layers)]
    total = sum((M[n].astype(np.float64) ** 2).reshape(len(M[n]), -1).sum(1) for n in names)
    fill_Bx1x1 = np.asarray(args["fill"])[:, None, None]
    lost = {n: np.where(fill_Bx1x1, S[n], M[n]).astype(np.float64) ** 2 for n in names}
    out[p] = sum((np.asarray(args["masks"][n]) * lost[n]).reshape(len(lost[n]), -1).sum(1) for n in names) / total
  return out


def unmatched(M, S, cfg: DisruptConfig, n_layers: int) -> dict[str, np.ndarray]:
  """Per example [B] and query/key point: the share of heads with massive dims (over the chosen
  layers) whose other dims together lose less energy to mean replacement (sum of S^2) than the
  massive dims. There the random control cannot match: it takes every non-massive dim, for every
  draw alike, and still removes less than the massive condition. 0 where no head has massive dims."""
  out = {}
  for p in cfg.points()[:2]:
    short = heads = 0
    for n in (hooks.name(l, p) for l in cfg.layers(n_layers)):
      lost, chosen = np.asarray(S[n], np.float64) ** 2, massive(M[n], cfg)
      target, rest = np.where(chosen, lost, 0).sum(-1), np.where(chosen, 0, lost).sum(-1)
      has = chosen.any(-1)
      short, heads = short + (has & (rest < target)).sum(-1), heads + has.sum(-1)
    out[p] = short / np.maximum(heads, 1)
  return out


def probe_norms(model, prompts: list, cfg: DisruptConfig, batch: int = 8) -> dict[str, np.ndarray]:
  """M over a whole probe set (every token of every prompt), [1, H, D] per point: the 'probe' source.
  Prompts (1-D token arrays) may differ in length; equal lengths are batched together."""
  by_length = {}
  for p in prompts:
    by_length.setdefault(len(p), []).append(np.asarray(p, np.int32))
  total = {}
  for group in by_length.values():
    for i in range(0, len(group), batch):
      for k, m in norms(model, np.stack(group[i:i + batch]), cfg).items():
        total[k] = total.get(k, 0.0) + (m.astype(np.float64) ** 2).sum(0, keepdims=True)
  return {k: np.sqrt(v).astype(np.float32) for k, v in total.items()}


# ------------------------------------------------------------------------------------ dim choice

def _smallest(M, count):
  """Per head, the count[...] smallest-M dims (ties: lower index)."""
  rank = np.argsort(np.argsort(M, axis=-1, kind="stable"), axis=-1, kind="stable")
  return rank < count[..., None]


def _random_matched(S, massive, rng):
  """Random control (module docstring): per head, random non-massive dims whose lost energy (sum of
  S^2) is closest to that of the massive dims."""
  lost = np.asarray(S, np.float64) ** 2
  target_xH = np.where(massive, lost, 0).sum(-1)
  order = np.argsort(np.where(massive, np.inf, rng.random(lost.shape)), axis=-1)  # massive dims last
  free_lost = np.take_along_axis(np.where(massive, 0, lost), order, -1)
  cum_xHxD1 = np.concatenate([np.zeros(lost.shape[:-1] + (1,)), np.cumsum(free_lost, -1)], -1)
  count_xH = np.argmin(np.abs(cum_xHxD1 - target_xH[..., None]), -1)  # first = fewest dims on ties
  rank = np.argsort(order, axis=-1)
  return rank < count_xH[..., None]


def massive(M, cfg: DisruptConfig):
  """The 'massive' dims by cfg.criterion: bool like M."""
  return stats.massive_mask(M, cfg.lam) if cfg.criterion == "lambda" else stats.top_k_mask(M, cfg.top_k)


def select(M, cfg: DisruptConfig, S=None, rngs=None):
  """Dims to replace for a query/key point with norms M [B, H, D] (mode 'v' handled in `masks`);
  'random' needs the spread S and a generator per example."""
  if cfg.mode in ("massive", "massive_zero"):
    return massive(M, cfg)
  if cfg.mode.startswith("top"):
    return stats.top_k_mask(M, int(cfg.mode[3:]))
  if cfg.mode == "smallest":
    return _smallest(M, massive(M, cfg).sum(-1))
  if cfg.mode == "random":
    check(S is not None, "disrupt.mode", "'random' matches the energy removed, so it needs the spread S")
    return np.stack([_random_matched(s, m, rng) for s, m, rng in zip(S, massive(M, cfg), rngs)])
  raise ValueError(f"disrupt.mode: select() has no rule for {cfg.mode!r}")


def masks(M: dict[str, np.ndarray], cfg: DisruptConfig, n_layers: int, S=None, examples=None) -> dict[str, np.ndarray]:
  """Boolean masks [B, H, D] for every point of every layer (all False outside the chosen layers
  and points, and everywhere for 'off'), so one compiled prefill serves every mode, the undisrupted
  one included, with the same `rope` side. S (spread, like M): for 'random', whose draw is seeded
  by (draw, layer, point, example): examples [B] (default: the row), so an example's random dims do
  not depend on which examples share its batch."""
  qp, kp, vp = cfg.points()
  chosen = set() if cfg.mode == "off" else set(cfg.layers(n_layers))
  out = {}
  for layer in range(n_layers):
    names = {p: hooks.name(layer, p) for p in (qp, kp, vp)}
    picked = {p: np.zeros(M[n].shape, bool) for p, n in names.items()}
    if layer in chosen and cfg.mode == "v":
      picked[vp] = massive(M[names[kp]], cfg)
    elif layer in chosen:
      for i, p in enumerate((qp, kp)):
        rows = range(len(M[names[p]])) if examples is None else examples
        rngs = [np.random.default_rng([cfg.draw, layer, i, int(e)]) for e in rows] if cfg.mode == "random" else None
        picked[p] = select(M[names[p]], cfg, None if S is None else S[names[p]], rngs)
    out.update({names[p]: picked[p] for p in names})
  return out


# ---------------------------------------------------------------------------------- replacement

def hook(args, name: str, x_BxTxHxD):
  """Prefill hook: masked dims -> their own mean over the prompt tokens (the row's args['fill'] 1)
  or 0 (fill 0); args['valid'] [B, T] (right-padded prompts: minilm.generate) keeps the padding
  out of the mean."""
  mask = args["masks"].get(name)
  if mask is None:
    return x_BxTxHxD
  mean_Bx1xHxD = prompt_mean(x_BxTxHxD, args.get("valid")) * args["fill"][:, None, None, None]
  return jnp.where(mask[:, None], mean_Bx1xHxD.astype(x_BxTxHxD.dtype), x_BxTxHxD)


def dim_norms(model, tokens_BxT, cfg: DisruptConfig, probe: dict[str, np.ndarray] | None = None):
  """The M that chooses the dims: this prompt's (source 'prompt') or the probe set's, per example."""
  if cfg.source == "prompt":
    return norms(model, tokens_BxT, cfg)
  check(probe is not None, "disrupt.source", "'probe' needs probe norms (probe_norms(model, probe_tokens, cfg))")
  B = np.shape(tokens_BxT)[0]
  return {k: np.broadcast_to(v, (B,) + v.shape[1:]) for k, v in probe.items()}


def hook_args(M: dict[str, np.ndarray], cfg: DisruptConfig, n_layers: int, S=None, examples=None):
  """(args for `hook`, {point: replaced dims per example [B], summed over layers and heads});
  examples: as `masks` takes them."""
  chosen = masks(M, cfg, n_layers, S, examples)
  counts = {p: sum(m.reshape(len(m), -1).sum(1) for n, m in chosen.items() if n.endswith("." + p))
            for p in cfg.points()}
  B = len(next(iter(M.values())))
  fill_B = np.full(B, 0.0 if cfg.mode == "massive_zero" else 1.0, np.float32)
  return {"masks": {k: jnp.asarray(v) for k, v in chosen.items()}, "fill": jnp.asarray(fill_B)}, counts


def disrupted_greedy(model, tokens_BxT, max_new: int, cfg: DisruptConfig, probe=None, M=None, S=None,
                     return_cache=False):
  """Greedy continuation under `cfg` -> (tokens [B, max_new] (or (tokens, cache)), counts per example).
  Pass M (from `dim_norms`) to reuse one capture pass across modes; 'random' needs S (`norms_and_spread`)."""
  args, counts = hook_args(dim_norms(model, tokens_BxT, cfg, probe) if M is None else M, cfg, model.cfg.n_layers, S)
  out = generate.greedy(model, tokens_BxT, max_new, hook=hook, hook_args=args,
                        return_cache=return_cache)
  return out, counts
