"""Building blocks of the decoder: norms, MLPs, grouped-query attention with capture and hooks."""
from __future__ import annotations

import contextlib
import contextvars
import functools
import math
from typing import Callable, Optional

import jax
import jax.extend
import jax.numpy as jnp
from flax import nnx

from minilm import hooks
from minilm.config import MATMULS, ModelConfig
from minilm.machine import cpu_flags

# An intervention: (hook name like 'blocks.3.attn.rot_k', tensor [B, T, H, D]) -> replacement.
Intervene = Optional[Callable[[str, jax.Array], jax.Array]]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def matmul(x_NxC, w_CxF, transpose_x: bool = True):
  """x @ w in the forms XLA:CPU runs fastest: the same math as jnp.matmul, equal up to float rounding.

  XLA:CPU's fast matmul (its YNNPACK fusion) takes only row-major operands, and a dot with a bfloat16
  input in another form is first converted to float32. So every product here (the forward one, and
  both of the backward pass) has row-major operands and sums in float32 before the cast to the
  compute dtype. A transposed operand is copied first, as `_transposed` does; 4096 x 512 x 2048 in
  bfloat16 on an AMX Xeon: weight gradient 839 against 218 GFLOP/s, input gradient 1,332 against
  210. At float32 only the weight gradient's x is copied (XLA:CPU's float32 dot reads a transposed
  w itself): the copy makes the 1M-parameter train step about 15% faster than autodiff's dot over
  the rows of x.

  The copy is cheap only where x is a stored tensor: XLA fuses an elementwise producer of x into it
  and then evaluates that producer in strided (transposed) order. Linears whose input is such a
  producer's output (the MLP's down projection) pass transpose_x=False: at float32 they keep
  autodiff's products; at 16 bits the weight gradient is (dy^T x)^T, which transposes the stored dy
  and the small product instead of x.
  """
  return _dot(x_NxC, w_CxF)


def _dot(a, b):
  return jnp.matmul(a, b, preferred_element_type=jnp.float32).astype(a.dtype)


def _transposed(a_NxM):
  """a.T as a row-major copy. XLA folds a plain transpose into the dot that reads it (a non-row-
  major operand, see `matmul`), and sees through an optimization barrier around it; a transpose of
  a split of the rows is copied."""
  n, m = a_NxM.shape
  k = next(k for k in range(2, n + 1) if n % k == 0) if n > 1 else 1
  return a_NxM.reshape(n // k, k, m).transpose(2, 0, 1).reshape(m, n)


def _matmul_fwd(x, w, transpose_x):
  return _dot(x, w), (x, w)


def _matmul_bwd(transpose_x, res, dy):
  x, w = res
  x_NxC, dy_NxF = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])
  if transpose_x:
    dw_CxF = jnp.matmul(_transposed(x_NxC), dy_NxF, preferred_element_type=jnp.float32)
  elif x.dtype == jnp.float32:   # autodiff's own products, as jnp.matmul's VJP writes them
    return jax.vjp(jnp.matmul, x, w)[1](dy)
  else:
    dw_CxF = _transposed(jnp.matmul(_transposed(dy_NxF), x_NxC, preferred_element_type=jnp.float32))
  # XLA:CPU's float32 dot reads a transposed w itself; at 16 bits w needs a row-major copy
  w_FxC = w.T if w.dtype == jnp.float32 else _transposed(w)
  return _dot(dy, w_FxC), dw_CxF.astype(w.dtype)


matmul.defvjp(_matmul_fwd, _matmul_bwd)


# What 'auto' picks per backend (jax.default_backend() while tracing): XLA:CPU gains from the
# hand-shaped paths below; accelerators take the plain ones (dot_product: cuDNN flash on GPU).
AUTO = {"cpu": {"attention": "blocked", "matmul": "barrier"}}
PLAIN = {"attention": "dot_product", "matmul": "plain"}


def resolve(name: str, value: str) -> str:
  """The implementation setting `name` (model.attention, model.matmul) with 'auto' resolved."""
  return AUTO.get(jax.default_backend(), PLAIN)[name] if value == "auto" else value


def matmul_for(setting: str, transpose_x: bool = True) -> Callable:
  """x @ w by the model.matmul setting: `matmul` (barrier) or jnp.matmul (plain)."""
  if resolve("matmul", setting) == "barrier":
    return lambda x, w: matmul(x, w, transpose_x)
  return jnp.matmul


def _linear_dot(x, w, dimension_numbers, precision=None, preferred_element_type=None, out_sharding=None, *,
                setting: str, transpose_x: bool):
  """nnx.Linear's dot_general, always a matmul over x's last axis, by the model.matmul setting.

  Our layers set no out_sharding; shardings follow the inputs (train.sharding).
  """
  assert out_sharding is None and dimension_numbers == (((x.ndim - 1,), (0,)), ((), ())), dimension_numbers
  del precision, preferred_element_type
  if _KERNELS_OUT_IN.get():
    return jnp.einsum("...i,oi->...o", x, w)
  return matmul_for(setting, transpose_x)(x, w)


# Decoding reads every kernel once per token through a few rows (the batch). On an AVX2-only CPU
# XLA:CPU's matmul streams a kernel stored [out, in] about twice as fast there as one stored [in, out]
# (8 rows through a 576 x 49152 kernel: 5.5 against 2.7 GB/s); on an AVX-512 (AMX) Xeon the copy
# makes SmolLM2's steps slower (bench/README). `kernels_out_in` transposes the linear kernels (a copy,
# once per decoding) and makes linears read them so while the context is active; `decoding_kernels`
# takes it where it pays.
_KERNELS_OUT_IN = contextvars.ContextVar("kernels_out_in", default=False)


@contextlib.contextmanager
def kernels_out_in(model: nnx.Module):
  """A copy of `model` whose linear kernels are stored [out, in], to call within the context (under
  jit: the transposes run once, outside a decoding loop traced inside). The same products as
  `model`'s, summed in another order; `model` itself is unchanged."""
  linears = {path for path, module in nnx.iter_modules(model) if isinstance(module, nnx.Linear)}
  graphdef, state = nnx.split(model)
  flat = [(path, v.replace(v[...].T) if path[-1] == "kernel" and path[:-1] in linears else v)
          for path, v in nnx.to_flat_state(state)]
  copy = nnx.merge(graphdef, nnx.from_flat_state(flat))
  token = _KERNELS_OUT_IN.set(True)
  try:
    yield copy
  finally:
    _KERNELS_OUT_IN.reset(token)


@contextlib.contextmanager
def decoding_kernels(model: nnx.Module):
  """`kernels_out_in(model)` where `out_in_pays` on this machine, else `model` itself."""
  if out_in_pays(jax.default_backend(), cpu_flags()):
    with kernels_out_in(model) as copy:
      yield copy
  else:
    yield model


def out_in_pays(backend: str, flags: frozenset[str]) -> bool:
  """Whether decoding reads [out, in] kernel copies: on XLA:CPU with AVX2 and without AVX-512, the
  CPUs where it was measured faster. AVX-512 CPUs read the kernels as stored."""
  return backend == "cpu" and "avx2" in flags and "avx512f" not in flags


# One function per setting, made once: nnx keeps dot_general in the graphdef, which must compare
# equal across models of one config (the train step is compiled per graphdef).
_LINEAR_DOTS = {(s, t): functools.partial(_linear_dot, setting=s, transpose_x=t) for s in MATMULS for t in (True, False)}


@jax.custom_vjp
def add_bias(y_NxF, b_F):
  """y + b, whose bias gradient sums dy's rows in float32. Autodiff's sum of a bfloat16 dy goes to
  XLA:CPU's windowed reduction: 60 ms for 4096 x 2048 in the 25M train step, 0.8 ms this way."""
  return y_NxF + b_F


def _add_bias_bwd(_, dy):
  return dy, jnp.sum(dy.reshape(-1, dy.shape[-1]), axis=0, dtype=jnp.float32).astype(dy.dtype)


add_bias.defvjp(lambda y, b: (y + b, None), _add_bias_bwd)


class Linear(nnx.Linear):
  """nnx.Linear (the same parameters) that adds its bias by `add_bias` on the CPU matmul path."""

  def __call__(self, x):
    if self.bias is None or resolve("matmul", self.dot_general.keywords["setting"]) != "barrier":
      return super().__call__(x)
    x, kernel, bias = self.promote_dtype((x, self.kernel[...], self.bias[...]), dtype=self.dtype)
    return add_bias(self.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ()))), bias)


def linear(d_in: int, d_out: int, cfg: ModelConfig, rngs: nnx.Rngs, std: float, bias: bool = False,
           transpose_x: bool = True) -> nnx.Linear:
  """A linear layer; transpose_x=False where its input is an elementwise fusion's output (`matmul`)."""
  return Linear(d_in, d_out, use_bias=bias, dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.float32,
                kernel_init=jax.nn.initializers.normal(std), rngs=rngs,
                dot_general=_LINEAR_DOTS[cfg.matmul, transpose_x])


class Norm(nnx.Module):
  """RMSNorm or LayerNorm, computed in float32 whatever the compute dtype."""

  def __init__(self, cfg: ModelConfig):
    self.kind, self.eps, self.dtype = cfg.norm, cfg.norm_eps, jnp.dtype(cfg.dtype)
    self.scale = nnx.Param(jnp.ones((cfg.d_model,), jnp.float32))
    if cfg.norm == "layer":
      self.bias = nnx.Param(jnp.zeros((cfg.d_model,), jnp.float32))

  def __call__(self, x_BxTxC):
    x = x_BxTxC.astype(jnp.float32)
    if self.kind == "layer":
      x = x - x.mean(-1, keepdims=True)
    x = x * jax.lax.rsqrt((x * x).mean(-1, keepdims=True) + self.eps) * self.scale[...]
    if self.kind == "layer":
      x = x + self.bias[...]
    return x.astype(self.dtype)


ACTIVATIONS = {"gelu": jax.nn.gelu,  # tanh approximation
               "gelu_erf": lambda h: jax.nn.gelu(h, approximate=False), "relu": jax.nn.relu}


class MLP(nnx.Module):
  """SwiGLU (gate, up, down) or an activation between up and down (GELU, ReLU)."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    d, f, std = cfg.d_model, cfg.ff_dim, cfg.init_std
    self.kind = cfg.mlp
    if cfg.mlp == "swiglu":
      self.gate = linear(d, f, cfg, rngs, std)
    self.up = linear(d, f, cfg, rngs, std, cfg.bias)
    # its input is the activation's output, an elementwise fusion: see `matmul`
    self.down = linear(f, d, cfg, rngs, std / math.sqrt(2 * cfg.n_layers), cfg.bias, transpose_x=False)

  def __call__(self, x_BxTxC):
    # the activation in float32, rounded once to the compute dtype: in bfloat16 XLA:CPU rounds after
    # every op of GELU's erf and its backward pass (8 ms for [16, 256, 1024] on one core)
    h = self.up(x_BxTxC)
    h32 = h.astype(jnp.float32)
    if self.kind == "swiglu":
      h32 = jax.nn.silu(self.gate(x_BxTxC).astype(jnp.float32)) * h32
    else:
      h32 = ACTIVATIONS[self.kind](h32)
    return self.down(h32.astype(h.dtype))


def attend(q_BxTxHxD, k_BxKxSxD, v_BxKxSxD, q_pos_BxT, k_pos_BxS, bias_BxHxTxS=None, *,
           block: int = 0, with_probs: bool = False):
  """Causal grouped-query attention; query head h reads KV head h // (H/K). Softmax in float32.
  Keys and values come heads-major (`heads_major`), as the KV cache holds them.

  A key is visible to a query when k_pos <= q_pos, so unwritten KV-cache slots (k_pos beyond the
  current position) are masked without a separate length.
  block > 0 (self-attention over increasing positions only, S == T; Decoder passes it only without
  a KV cache and with default positions): `block_causal`. Returns (out, probs or None).
  """
  B, T, H, D = q_BxTxHxD.shape
  K, S = k_BxKxSxD.shape[1], k_BxKxSxD.shape[2]
  G = H // K
  # Heads-major layout: the batched matmuls then need no transposes of the T x S tensors.
  q_BxKxGxTxD = q_BxTxHxD.reshape(B, T, K, G, D).transpose(0, 2, 3, 1, 4)
  bias_BxKxGxTxS = None if bias_BxHxTxS is None else jnp.broadcast_to(
      bias_BxHxTxS, (B, H, T, S)).reshape(B, K, G, T, S)

  def rows(t0, t1, s1):
    logits = jnp.einsum("bkgtd,bksd->bkgts", q_BxKxGxTxD[:, :, :, t0:t1], k_BxKxSxD[:, :, :s1],
                        preferred_element_type=jnp.float32) / math.sqrt(D)
    if bias_BxKxGxTxS is not None:
      logits = logits + bias_BxKxGxTxS[:, :, :, t0:t1, :s1]
    visible_BxTxS = k_pos_BxS[:, None, :s1] <= q_pos_BxT[:, t0:t1, None]
    probs = jax.nn.softmax(jnp.where(visible_BxTxS[:, None, None], logits, -1e30), axis=-1)
    return jnp.einsum("bkgts,bksd->bkgtd", probs.astype(v_BxKxSxD.dtype), v_BxKxSxD[:, :, :s1]), probs

  if block and block < T and not with_probs:
    assert S == T, "block-causal attention needs keys at the query positions"
    out_BxKxGxTxD, probs_BxKxGxTxS = block_causal(q_BxKxGxTxD, k_BxKxSxD, v_BxKxSxD, bias_BxKxGxTxS, block), None
  else:
    out_BxKxGxTxD, probs_BxKxGxTxS = rows(0, T, S)
  out_BxTxHxD = out_BxKxGxTxD.transpose(0, 3, 1, 2, 4).reshape(B, T, H, D)
  return out_BxTxHxD, None if not with_probs else probs_BxKxGxTxS.reshape(B, H, T, S)


def heads_major(x_BxTxKxD):
  """[B, T, K, D] -> [B, K, T, D]: the layout of attention's batched matmuls and of the KV cache."""
  return x_BxTxKxD.transpose(0, 2, 1, 3)


def _causal_rows(T: int, block: int) -> list[tuple[int, int]]:
  edges = list(range(0, T, block)) + [T]
  return list(zip(edges[:-1], edges[1:]))


def _block_exp(q_BxKxGxtxD, k_BxKxsxD, bias_BxKxGxtxs, t0: int):
  """exp(logits - row max) of query rows [t0, t0+t) over keys [0, s), key j visible to row i when
  j <= i; and the row sums. Float32 whatever the compute dtype."""
  t, s, D = q_BxKxGxtxD.shape[3], k_BxKxsxD.shape[2], q_BxKxGxtxD.shape[4]
  logits = jnp.einsum("bkgtd,bksd->bkgts", q_BxKxGxtxD, k_BxKxsxD, preferred_element_type=jnp.float32) / math.sqrt(D)
  if bias_BxKxGxtxs is not None:
    logits = logits + bias_BxKxGxtxs
  visible_txs = jnp.arange(s)[None, :] <= t0 + jnp.arange(t)[:, None]
  logits = jnp.where(visible_txs, logits, -jnp.inf)
  e = jnp.exp(logits - logits.max(-1, keepdims=True))
  return e, e.sum(-1, keepdims=True)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def block_causal(q_BxKxGxTxD, k_BxKxSxD, v_BxKxSxD, bias_BxKxGxTxS, block: int):
  """Causal attention over keys at the query positions (S == T), heads-major, in blocks of `block`
  query rows: block i reads keys [0, (i+1)*block) only, so the masked upper triangle is never
  computed. On a 2-core CPU attention is bound by the passes over the T x S tensors, not by FLOPs;
  hence also the hand-written backward pass (FlashAttention's algebra): it keeps the unnormalised
  exp(logits) E and the row sums l of the forward pass, scales the T x D tensors by 1/l instead of
  the T x S ones, and takes the softmax Jacobian's row term from rowsum(dO * O) (T x D) instead of
  rowsum(P * dP) (T x S). Same math as the masked softmax, up to float rounding.
  """
  return _block_causal_fwd(q_BxKxGxTxD, k_BxKxSxD, v_BxKxSxD, bias_BxKxGxTxS, block)[0]


def _block_causal_fwd(q, k, v, bias, block):
  outs, saved = [], []
  for t0, t1 in _causal_rows(q.shape[3], block):
    e, l = _block_exp(q[:, :, :, t0:t1], k[:, :, :t1], None if bias is None else bias[:, :, :, t0:t1, :t1], t0)
    outs.append(jnp.einsum("bkgts,bksd->bkgtd", e.astype(v.dtype), v[:, :, :t1],
                           preferred_element_type=jnp.float32) / l)
    saved.append((e, l))
  out = jnp.concatenate(outs, axis=3).astype(q.dtype)
  return out, (q, k, v, bias, out, saved)


def _block_causal_bwd(block, res, d_out):
  q, k, v, bias, out, saved = res
  T, D = q.shape[3], q.shape[4]
  # rowsum over a 4-D view: XLA:CPU fuses the 5-D form ([B, K, 1, T, D] without grouped heads) into a
  # reduction 8x slower (3.4 against 0.4 ms a layer of the 1M train step on one core)
  B, K, G = q.shape[:3]
  rowsum_BxKxGxTx1 = (d_out.astype(jnp.float32) * out.astype(jnp.float32)).reshape(B, K, G * T, D).sum(
      -1, keepdims=True).reshape(B, K, G, T, 1)
  dq, dk, dv, dbias = [], jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32), []
  for (t0, t1), (e, l) in zip(_causal_rows(T, block), saved):
    d_out_l = d_out[:, :, :, t0:t1].astype(jnp.float32) / l        # dO / l: P = E / l folded into T x D
    pad = ((0, 0), (0, 0), (0, T - t1), (0, 0))
    dv = dv + jnp.pad(jnp.einsum("bkgts,bkgtd->bksd", e.astype(v.dtype), d_out_l.astype(v.dtype),
                                 preferred_element_type=jnp.float32), pad)
    dp = jnp.einsum("bkgtd,bksd->bkgts", d_out_l.astype(v.dtype), v[:, :, :t1], preferred_element_type=jnp.float32)
    d_logits = e * (dp - rowsum_BxKxGxTx1[:, :, :, t0:t1] / l)   # P * (dP - rowsum(dO * O))
    dbias.append(jnp.pad(d_logits, ((0, 0),) * 4 + ((0, T - t1),)))
    d_scaled = (d_logits / math.sqrt(D)).astype(q.dtype)
    dq.append(jnp.einsum("bkgts,bksd->bkgtd", d_scaled, k[:, :, :t1], preferred_element_type=jnp.float32))
    dk = dk + jnp.pad(jnp.einsum("bkgts,bkgtd->bksd", d_scaled, q[:, :, :, t0:t1],
                                 preferred_element_type=jnp.float32), pad)
  d_bias = None
  if bias is not None:   # summed over the axes the bias was broadcast along
    full = jnp.concatenate(dbias, axis=3)
    d_bias = full.sum([i for i in range(5) if bias.shape[i] == 1 and full.shape[i] > 1], keepdims=True).astype(bias.dtype)
  return (jnp.concatenate(dq, axis=3).astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), d_bias)


block_causal.defvjp(_block_causal_fwd, _block_causal_bwd)


def on_cuda() -> bool:
  """Whether jax runs on NVIDIA's GPUs (cuDNN); ROCm's are backend 'gpu' too, told apart as jax tells them."""
  return jax.default_backend() == "gpu" and "cuda" in jax.extend.backend.get_backend().platform_version.lower()


def fused_attend(q_BxTxHxD, k_BxSxKxD, v_BxSxKxD, q_pos_BxT, k_pos_BxS, bias_BxHxTxS=None, *, causal: bool):
  """`attend`'s output by jax.nn.dot_product_attention: cuDNN flash attention on GPU where it applies
  (bfloat16/float16, self-attention over increasing positions, no bias, head_dim a multiple of 8 up to
  128), which never materialises the T x S probabilities; jax's XLA form elsewhere.

  causal: keys are the queries' own positions, increasing (the mask is then the lower triangle).
  """
  D = q_BxTxHxD.shape[-1]
  cudnn = (on_cuda() and causal and bias_BxHxTxS is None and D % 8 == 0 and D <= 128
           and q_BxTxHxD.dtype in (jnp.bfloat16, jnp.float16))
  mask_Bx1xTxS = None if causal else (k_pos_BxS[:, None, None, :] <= q_pos_BxT[:, None, :, None])
  bias = None if bias_BxHxTxS is None else bias_BxHxTxS.astype(jnp.float32)
  return jax.nn.dot_product_attention(q_BxTxHxD, k_BxSxKxD, v_BxSxKxD, bias, mask_Bx1xTxS, is_causal=causal,
                                      implementation="cudnn" if cudnn else None)


class Attention(nnx.Module):
  def __init__(self, cfg: ModelConfig, layer: int, rngs: nnx.Rngs):
    d, H, K, D, std = cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.dim_per_head, cfg.init_std
    self.layer, self.n_heads, self.n_kv_heads, self.head_dim = layer, H, K, D
    self.attention = cfg.attention
    qkv_bias = cfg.qkv_bias or cfg.bias
    self.q = linear(d, H * D, cfg, rngs, std, qkv_bias)
    self.k = linear(d, K * D, cfg, rngs, std, qkv_bias)
    self.v = linear(d, K * D, cfg, rngs, std, qkv_bias)
    self.o = linear(H * D, d, cfg, rngs, std / math.sqrt(2 * cfg.n_layers), cfg.bias)

  def _point(self, name: str, x, capture: frozenset, intervene: Intervene):
    if intervene is not None:
      x = intervene(hooks.name(self.layer, name), x)
    if name in capture:
      self.sow(nnx.Intermediate, name, x)
    return x

  def __call__(self, x_BxTxC, pos_BxT, position, *, cache=None, index=None, key_pos_BxS=None, block: int = 0,
               capture: frozenset = frozenset(), intervene: Intervene = None):
    B, T, _ = x_BxTxC.shape
    H, K, D = self.n_heads, self.n_kv_heads, self.head_dim
    q = self._point("q", self.q(x_BxTxC).reshape(B, T, H, D), capture, intervene)
    k = self._point("k", self.k(x_BxTxC).reshape(B, T, K, D), capture, intervene)
    v = self._point("v", self.v(x_BxTxC).reshape(B, T, K, D), capture, intervene)
    rot_q = self._point("rot_q", position.rotate(q, pos_BxT), capture, intervene)
    rot_k = self._point("rot_k", position.rotate(k, pos_BxT), capture, intervene)
    if cache is None:
      keys, values, k_pos_BxS = heads_major(rot_k), heads_major(v), pos_BxT
    else:  # the cache holds post-RoPE keys exactly as attention used them (interventions included),
      # heads-major: a decoding step reads it without first copying it into attention's layout
      keys = jax.lax.dynamic_update_slice(cache["k"], heads_major(rot_k).astype(cache["k"].dtype), (0, 0, index, 0))
      values = jax.lax.dynamic_update_slice(cache["v"], heads_major(v).astype(cache["v"].dtype), (0, 0, index, 0))
      cache = {"k": keys, "v": values}
      k_pos_BxS = key_pos_BxS   # every slot's key position, this call's included (Decoder)
    with_probs = bool({"attn", "sink"} & capture)   # captured probabilities need the einsum path
    path = "einsum" if with_probs else resolve("attention", self.attention)
    keys, values, bias = keys.astype(rot_q.dtype), values.astype(rot_q.dtype), position.bias(pos_BxT, k_pos_BxS)
    if path == "dot_product":   # jax.nn.dot_product_attention's layout is [B, S, K, D]
      out, probs = fused_attend(rot_q, heads_major(keys), heads_major(values), pos_BxT, k_pos_BxS, bias,
                                causal=block > 0), None
    else:
      out, probs = attend(rot_q, keys, values, pos_BxT, k_pos_BxS, bias, block=block if path == "blocked" else 0,
                          with_probs=with_probs)
    if "attn" in capture:
      self.sow(nnx.Intermediate, "attn", probs)
    if "sink" in capture:   # key slot 0 holds the first token, with or without a KV cache
      self.sow(nnx.Intermediate, "sink", probs[..., 0])
    return self.o(out.reshape(B, T, H * D)), cache


class Block(nnx.Module):
  """pre: x + attn(norm(x)), then x + mlp(norm(x)); parallel: x + attn(norm(x)) + mlp(norm'(x));
  post: norm(x + attn(x)), then norm(x + mlp(x))."""

  def __init__(self, cfg: ModelConfig, layer: int, rngs: nnx.Rngs):
    self.kind = cfg.block
    self.attn_norm = Norm(cfg)
    self.attn = Attention(cfg, layer, rngs)
    self.mlp_norm = Norm(cfg)
    self.mlp = MLP(cfg, rngs)

  def __call__(self, x_BxTxC, pos_BxT, position, *, cache=None, index=None, key_pos_BxS=None, block: int = 0,
               capture: frozenset = frozenset(), intervene: Intervene = None):
    def attn(h_BxTxC):
      return self.attn(h_BxTxC, pos_BxT, position, cache=cache, index=index, key_pos_BxS=key_pos_BxS,
                       block=block, capture=capture, intervene=intervene)

    if self.kind == "post":
      h, cache = attn(x_BxTxC)
      x = self.attn_norm(x_BxTxC + h)
      x = self.mlp_norm(x + self.mlp(x))
    elif self.kind == "parallel":
      h, cache = attn(self.attn_norm(x_BxTxC))
      x = x_BxTxC + h + self.mlp(self.mlp_norm(x_BxTxC))
    else:
      h, cache = attn(self.attn_norm(x_BxTxC))
      x = x_BxTxC + h
      x = x + self.mlp(self.mlp_norm(x))
    if "resid" in capture:
      self.sow(nnx.Intermediate, "resid", x)
    return x, cache
