"""Apply a quantization scheme to a Decoder: every linear kernel of every block, or the keys it caches.

Quantized: the seven linears of each block (attn q/k/v/o, mlp gate/up/down; gate absent for GELU).
Left in float: embeddings, the (tied or separate) LM head and the norms, as GPTQ, AWQ and
SmoothQuant do. All weights are fake-quantized (quantize-dequantize in float32).

Calibration reads the input of each linear with the Decoder's own modules, block by block: the
embedding, then each Block, jitted, with its linears wrapped in a recorder that sows their input
(every block runs one compiled program). Blocks are quantized in order and the next block's inputs
come from the already-quantized ones (sequential calibration, as GPTQ does), so no scheme
calibrates on activations it will never see.

Schemes (`Scheme.method`):
  fp           no change (the reference row of every table)
  rtn          round-to-nearest (`analysis.studies.quantize.rtn`)
  rtn_keep     RTN with the massive Q/K channels kept in float: massive (h, d) of pre-RoPE q and k
               on the calibration tokens (`analysis.massive.stats.value_norms` / `massive_mask`) map to
               output column h*head_dim + d of W_q / W_k
  rtn_keep_random  rtn_keep's control: per head as many Q/K output columns as rtn_keep keeps, drawn
               at random among the others (seeded by layer and projection), kept in float: whether
               the massive channels matter, or any channels left in float would help as much
  awq          activation-aware scaling searched per group of linears that share an input
               (q/k/v, o, gate/up, down), folded into the weights (exact for fake-quant)
  gptq         GPTQ with H = X^T X of each linear's calibration inputs
  smoothquant  smoothing s_j = max|X_j|^a / max|W_j|^(1-a) per shared-input group, 8-bit weights
               (per-channel symmetric) AND dynamic per-token 8-bit activations at every linear
  w8a8         the same W8A8 without smoothing (s = 1): what the smoothing buys
  kv           weights untouched; keys quantized per token or per channel, pre- or post-RoPE, by an
               intervention on 'blocks.<l>.attn.k' or 'rot_k' (`kv_hook`, `kv_args`)
"""
from __future__ import annotations

import dataclasses
import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import threadpoolctl
from flax import nnx

from analysis.massive import stats
from analysis.studies import quantize as Q
from minilm import capture as mcapture
from minilm.schema import check, check_choice
from minilm.model import Decoder

METHODS = ("fp", "rtn", "rtn_keep", "rtn_keep_random", "awq", "gptq", "smoothquant", "w8a8", "kv")
KEEPING = ("rtn_keep", "rtn_keep_random")   # RTN with some Q/K columns kept in float
LINEARS = ("attn.q", "attn.k", "attn.v", "attn.o", "mlp.gate", "mlp.up", "mlp.down")
# Linears that read the same tensor: one AWQ / SmoothQuant scale per group, as a deployment folds
# it into the one op that precedes them.
SHARED_INPUT = (("attn.q", "attn.k", "attn.v"), ("attn.o",), ("mlp.gate", "mlp.up"), ("mlp.down",))


@dataclasses.dataclass(frozen=True)
class Scheme:
  method: str = "rtn"
  bits: int = 4
  group_size: int = 0          # along the input dim; 0 = per output channel
  symmetric: bool = False
  lam: float = stats.LAM       # rtn_keep(_random): massive when M > lam * mean over the head's dims ...
  top_k: int = 0               # ... or, if > 0, the top_k dims per head (the reference code's rule)
  awq_grid: int = 20           # awq: alpha in linspace(0, 1, awq_grid + 1)
  alpha: float = 0.5           # smoothquant migration strength
  act_bits: int = 8            # smoothquant / w8a8 activation bits
  damp: float = 0.01           # gptq
  block: int = 128             # gptq
  kv_axis: str = "channel"     # kv: 'token' (a grid per token and head) | 'channel' (per dim, over tokens)
  kv_point: str = "pre"        # kv: 'pre' (keys before RoPE, KVQuant) | 'post' (rotated keys)

  def __post_init__(self):
    check_choice("scheme.method", self.method, METHODS)
    check_choice("scheme.kv_axis", self.kv_axis, ("token", "channel"))
    check_choice("scheme.kv_point", self.kv_point, ("pre", "post"))
    check(2 <= self.act_bits <= 8, "scheme.act_bits", f"must be in 2..8; got {self.act_bits}")
    check(0 < self.lam < math.inf, "scheme.lam", f"must be a finite number > 0; got {self.lam}")
    check(0 <= self.alpha <= 1, "scheme.alpha", f"must be in [0, 1]; got {self.alpha}")   # before any model loads
    check(self.top_k >= 0, "scheme.top_k", f"must be >= 0; got {self.top_k}")
    self.spec  # validates bits and group_size

  @property
  def spec(self) -> Q.QuantSpec:
    if self.method in ("smoothquant", "w8a8"):  # SmoothQuant's W8: per-channel symmetric
      return Q.QuantSpec(8, symmetric=True, group_size=0)
    return Q.QuantSpec(self.bits, self.symmetric, self.group_size)

  @property
  def name(self) -> str:
    if self.method == "fp":
      return "fp"
    if self.method in ("smoothquant", "w8a8"):
      return f"{self.method}-a{self.alpha:g}-w8a{self.act_bits}" if self.method == "smoothquant" \
          else f"w8a{self.act_bits}"
    if self.method == "kv":
      return f"kv-{self.kv_point}-{self.kv_axis}-{self.bits}b"
    g = f"g{self.group_size}" if self.group_size else "ch"
    return f"{self.method}-{self.bits}b-{g}{'-sym' if self.symmetric else ''}"


# --- the model's linears and their calibration inputs -------------------------------------------

def block_linears(block) -> dict[str, nnx.Linear]:
  found = {}
  for name in LINEARS:
    parent, attr = name.split(".")
    module = getattr(getattr(block, parent), attr, None)
    if module is not None:
      found[name] = module
  return found


def _set(block, name: str, module) -> None:
  parent, attr = name.split(".")
  setattr(getattr(block, parent), attr, module)


class Recorder(nnx.Module):
  """Wraps a linear and sows its input (read through nnx.capture)."""

  def __init__(self, inner):
    self.inner = inner

  def __call__(self, x):
    self.sow(nnx.Intermediate, "input", x)
    return self.inner(x)


def embed(model: Decoder, tokens_BxT):
  """The residual stream entering block 0 (Decoder.stream_in) and the positions."""
  B, T = tokens_BxT.shape
  pos_BxT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
  return model.stream_in(tokens_BxT, pos_BxT), pos_BxT


def record_inputs(model: Decoder, block, x_BxTxC, pos_BxT) -> dict[str, np.ndarray]:
  """{linear name: its input rows [B*T, d_in]} for one block called on x."""
  linears = block_linears(block)
  for name, module in linears.items():
    _set(block, name, Recorder(module))
  try:
    graphdef, state = _split(block, model.position)
  finally:
    for name, module in linears.items():
      _set(block, name, module)
  flat = mcapture.flatten(_block_inputs(graphdef, state, x_BxTxC, pos_BxT))
  return {name: np.asarray(flat[f"{name}.input"], np.float32).reshape(-1, flat[f"{name}.input"].shape[-1])
          for name in linears}


def calibrate(model: Decoder, tokens_BxT):
  """Yield (layer, block, inputs) in order; a block changed by the caller before the next step
  feeds its changed output to the next block (sequential calibration)."""
  x, pos = embed(model, jnp.asarray(tokens_BxT, jnp.int32))
  for layer, block in enumerate(model.blocks):
    yield layer, block, record_inputs(model, block, x, pos)
    x = _block_output(*_split(block, model.position), x, pos)


def _split(block, position):
  """nnx.split of (block, position) with the layer index set to 0 in the graph: the index only names
  hooks, calibration runs none, so every block of a model shares one compiled program."""
  layer = block.attn.layer
  block.attn.layer = 0
  try:
    return nnx.split((block, position))
  finally:
    block.attn.layer = layer


@functools.partial(jax.jit, static_argnames="graphdef")
def _block_inputs(graphdef, state, x_BxTxC, pos_BxT):
  block, position = nnx.merge(graphdef, state)
  return nnx.capture(block, nnx.Intermediate)(x_BxTxC, pos_BxT, position)[1]  # the output is not computed


@functools.partial(jax.jit, static_argnames="graphdef")
def _block_output(graphdef, state, x_BxTxC, pos_BxT):
  block, position = nnx.merge(graphdef, state)
  return block(x_BxTxC, pos_BxT, position)[0]


# --- the schemes ---------------------------------------------------------------------------------

def _kernel(module) -> np.ndarray:
  return np.asarray(module.kernel[...], np.float32)


def _assign(module, w_IxO: np.ndarray) -> None:
  module.kernel[...] = jnp.asarray(w_IxO, module.kernel[...].dtype)


class ActQuantLinear(nnx.Module):
  """x -> Q_a(x * inv_scale) @ W: the smoothing folded on the input side, then per-token fake-quant."""

  def __init__(self, inner, inv_scale_I, bits: int):
    self.inner = inner
    self.inv_scale = nnx.Variable(jnp.asarray(inv_scale_I, jnp.float32))
    self.bits = bits

  def __call__(self, x):
    x = (x.astype(jnp.float32) * self.inv_scale[...])
    return self.inner(Q.quant_tokens(x, self.bits).astype(x.dtype))


def calib_norms(model: Decoder, calib_BxT) -> dict[str, np.ndarray]:
  """M [L, H, D] of pre-RoPE q and k over the calibration tokens: what the keeping schemes choose from."""
  return norms(model, calib_BxT, ("q", "k"))


def massive_columns(M: dict[str, np.ndarray], scheme: Scheme) -> dict[tuple[int, str], np.ndarray]:
  """{(layer, 'attn.q' | 'attn.k'): bool [H*D]} from massive_mask on M of pre-RoPE q and k (`calib_norms`)."""
  cols = {}
  for layer in range(len(M["q"])):
    for point in ("q", "k"):
      M_HxD = M[point][layer]
      mask_HxD = stats.top_k_mask(M_HxD, scheme.top_k) if scheme.top_k else stats.massive_mask(M_HxD, scheme.lam)
      cols[(layer, f"attn.{point}")] = np.asarray(mask_HxD, bool).reshape(-1)
  return cols


def norms(model: Decoder, tokens_BxT, points: tuple[str, ...], hook=None, hook_args=None) -> dict[str, np.ndarray]:
  """{point: M [L, H, D]} of the captured points over the tokens, in one jitted pass (under an
  optional hook, an intervention `hook(hook_args, name, x)`)."""
  graphdef, state = nnx.split(model)
  M = _norms(graphdef, state, jnp.asarray(tokens_BxT, jnp.int32), points, hook, hook_args)
  return {p: np.asarray(m) for p, m in M.items()}


@functools.partial(jax.jit, static_argnames=("graphdef", "points", "hook"))
def _norms(graphdef, state, tokens_BxT, points, hook, hook_args):
  model = nnx.merge(graphdef, state)
  intervene = None if hook is None else functools.partial(hook, hook_args)
  _, cache = mcapture.run(model, tokens_BxT, points=points, intervene=intervene)  # logits unused: not computed
  return {p: jnp.stack([stats.value_norms(x) for x in cache.stack(p)]) for p in points}


def random_columns(keep: dict[tuple[int, str], np.ndarray], head_dim: int) -> dict[tuple[int, str], np.ndarray]:
  """rtn_keep_random's columns: for every head of every (layer, projection) of `keep`, as many of the
  head's columns as `keep` marks, drawn without replacement from the ones it does not mark."""
  out = {}
  for (layer, name), mask in keep.items():
    rng = np.random.default_rng(stats.name_seed(0, f"{layer}.{name}"))
    mask_HxD = mask.reshape(-1, head_dim)
    drawn_HxD = np.zeros_like(mask_HxD)
    for h, kept in enumerate(mask_HxD):
      others = np.flatnonzero(~kept)
      drawn_HxD[h, rng.choice(others, min(int(kept.sum()), len(others)), replace=False)] = True
    out[(layer, name)] = drawn_HxD.reshape(-1)
  return out


def _quantize_block(layer: int, block, inputs: dict, scheme: Scheme, keep: dict, log: dict) -> None:
  linears = block_linears(block)
  spec = scheme.spec
  for group in SHARED_INPUT:
    names = [n for n in group if n in linears]
    if not names:
      continue
    x = inputs.get(names[0])  # None for the weight-only RTN schemes
    ws = [_kernel(linears[n]) for n in names]
    if scheme.method == "awq":
      s, alpha, errors = Q.awq_search(x, ws, spec, scheme.awq_grid)
      log[f"{layer}.{'+'.join(names)}"] = {"alpha": alpha, "err_rtn": float(errors[0]),
                                           "err_awq": float(errors.min())}
      new = [Q.awq_scaled(w, s, spec) for w in ws]
    elif scheme.method in ("smoothquant", "w8a8"):
      s = np.ones(ws[0].shape[0], np.float32) if scheme.method == "w8a8" else Q.smooth_scales(
          np.abs(x).max(0), np.max([np.abs(w).max(1) for w in ws], axis=0), scheme.alpha)
      for n, w in zip(names, ws):
        _assign(linears[n], Q.rtn(w * s[:, None], spec))
        _set(block, n, ActQuantLinear(linears[n], 1.0 / s, scheme.act_bits))
      continue
    elif scheme.method == "gptq":
      # BLAS on one thread: GPTQ's many small BLAS calls alternate with jitted ones, and two pools
      # of spinning threads on the same cores slow both (bench/README, "C6 quantization speed").
      # The thread count may move a logged error in the last digit.
      with threadpoolctl.threadpool_limits(1, user_api="blas"):
        h = x.T @ x  # float32 products, summed by BLAS; GPTQ adds damping and factors in float64
        new = _split_columns(Q.gptq(np.concatenate(ws, axis=1), h, spec, damp=scheme.damp, block=scheme.block), ws)
        r = Q.gram_factor(h)
        log[f"{layer}.{'+'.join(names)}"] = {
            "err_rtn": float(Q.gram_errors(h, [(w, Q.rtn(w, spec)) for w in ws], r).sum()),
            "err_gptq": float(Q.gram_errors(h, list(zip(ws, new)), r).sum())}
    elif scheme.method in KEEPING:
      new = [Q.rtn_keep(w, spec, keep[(layer, n)]) if (layer, n) in keep else Q.rtn(w, spec)
             for n, w in zip(names, ws)]
    else:
      new = [Q.rtn(w, spec) for w in ws]
    for n, w in zip(names, new):
      _assign(linears[n], w)


def _split_columns(w_IxO: np.ndarray, ws: list) -> list[np.ndarray]:
  """The side-by-side linears of one shared-input group apart again (GPTQ rounds them as one W:
  its output columns are independent, and they share H and its factorisation)."""
  return np.split(w_IxO, np.cumsum([w.shape[1] for w in ws])[:-1], axis=1)


def check_fits(model: Decoder, scheme: Scheme, label: str = "the model", field: str = "quant.group_size") -> None:
  """Fail early (one line naming `field`) when the scheme's group size does not divide some linear's
  input dim. `model`: a Decoder or its shapes (nnx.eval_shape)."""
  g = scheme.spec.group_size if scheme.method not in ("fp", "kv") else 0
  d_ins = sorted({lin.kernel.shape[0] for lin in block_linears(model.blocks[0]).values()})
  check(not g or all(d % g == 0 for d in d_ins), field,
        f"must divide the linears' input dims {', '.join(map(str, d_ins))} of {label} (0: per output channel); got {g}")


def quantize_model(model: Decoder, scheme: Scheme, calib_BxT=None, calib_M=None) -> tuple[Decoder, dict]:
  """A quantized copy of `model` (the original is untouched) and a log of per-layer choices.

  `calib_BxT` (int tokens) is required by rtn_keep(_random), awq, gptq and smoothquant (sequentially
  calibrated: awq, gptq, smoothquant). `calib_M`: `calib_norms(model, calib_BxT)` where the caller
  keeps it, so that the keeping schemes of one model share one capture pass.
  """
  check_fits(model, scheme)
  quantized = nnx.clone(model)
  log: dict = {"scheme": scheme.name}
  if scheme.method in ("fp", "kv"):
    return quantized, log
  needs_calib = scheme.method in (*KEEPING, "awq", "gptq", "smoothquant")
  check(not needs_calib or calib_BxT is not None, "calib", f"scheme {scheme.method!r} needs calibration tokens")
  keep = {}
  if scheme.method in KEEPING:
    keep = massive_columns(calib_norms(model, calib_BxT) if calib_M is None else calib_M, scheme)
    if scheme.method == "rtn_keep_random":
      keep = random_columns(keep, model.cfg.dim_per_head)
    log["kept_columns"] = {f"{l}.{n}": int(m.sum()) for (l, n), m in keep.items()}
  if scheme.method in ("rtn", *KEEPING, "w8a8"):  # no layer inputs needed
    for layer, block in enumerate(quantized.blocks):
      _quantize_block(layer, block, {}, scheme, keep, log)
    return quantized, log
  for layer, block, inputs in calibrate(quantized, calib_BxT):
    _quantize_block(layer, block, inputs, scheme, keep, log)
  return quantized, log


# --- KV-cache key quantization as an intervention ------------------------------------------------

def quant_keys(k_BxTxKxD, bits, axis: str, valid_BxT=None):
  """Asymmetric RTN of keys: 'token' = one grid per (token, head) over head dims; 'channel' = one
  grid per (head, dim) over the tokens of the sequence (computed on the prompt itself, dynamic;
  valid_BxT: over the prompt tokens of right-padded rows only). `bits` may be traced, so one
  compiled function serves every width."""
  reduce = (-1,) if axis == "token" else (1,)
  k = k_BxTxKxD.astype(jnp.float32)
  levels = 2.0 ** jnp.asarray(bits, jnp.float32) - 1
  seen = True if valid_BxT is None or axis == "token" else valid_BxT[:, :, None, None] > 0
  lo = jnp.where(seen, k, jnp.inf).min(reduce, keepdims=True)
  hi = jnp.where(seen, k, -jnp.inf).max(reduce, keepdims=True)
  scale = (hi - lo) / levels
  scale = jnp.where(scale > 0, scale, 1.0)
  q = jnp.clip(jnp.round((k - lo) / scale), 0, levels)
  return (q * scale + lo).astype(k_BxTxKxD.dtype)


_KEY_POINT = {"pre": re.compile(r"blocks\.\d+\.attn\.k$"), "post": re.compile(r"blocks\.\d+\.attn\.rot_k$")}


def kv_args(scheme: Scheme) -> dict:
  """The traced settings of a KV scheme for `kv_hook`: which point, which axis, how many bits."""
  check(scheme.method == "kv", "scheme.method", f"kv_args needs method 'kv'; got {scheme.method!r}")
  return {"pre": jnp.asarray(scheme.kv_point == "pre"), "post": jnp.asarray(scheme.kv_point == "post"),
          "per_token": jnp.asarray(scheme.kv_axis == "token"), "bits": jnp.asarray(scheme.bits, jnp.float32)}


def kv_hook(args: dict, name: str, x):
  """A prefill hook for minilm.generate.greedy (hook(args, name, x)) with `args = kv_args(scheme)`.
  The scheme lives in traced args, not in the function, so all KV schemes share one compilation
  (one per prompt shape) instead of recompiling the hooked prefill per scheme."""
  for point, pattern in _KEY_POINT.items():
    if pattern.match(name):
      q = jnp.where(args["per_token"], quant_keys(x, args["bits"], "token"),
                    quant_keys(x, args["bits"], "channel", args.get("valid")))
      return jnp.where(args[point], q, x)
  return x
