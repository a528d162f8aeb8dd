"""Quantization schemes on one weight matrix (nnx kernel layout W [in, out]) and on activations.

Everything is fake-quantization: quantize then dequantize in float32, so accuracy reflects the
rounding while the matmuls stay in float. Groups run along the input dimension (the one a matmul
sums over), with one scale (and zero point) per group and output column; group_size 0 means one
group per output column ("per channel"). Because every scale belongs to one output column,
columns quantize independently, which is what lets a scheme keep chosen columns in full precision.

Numpy, float32 for the data and float64 where a factorisation needs it (GPTQ's Cholesky); GPTQ's
row loop is sequential by nature and runs jitted in JAX (float64), a step of rows per call, and
AWQ's search rounds all its alphas in one jitted call. `fake_quant` takes numpy or jax arrays, so
RTN, AWQ and GPTQ round with the same code.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg
import scipy.linalg.blas
import scipy.linalg.lapack

from minilm.schema import check

STEP = 16  # GPTQ rows rounded per jitted call (see _gptq_block)


@dataclasses.dataclass(frozen=True)
class QuantSpec:
  """Uniform round-to-nearest grid: `bits`, symmetric (absmax) or asymmetric (min/max + zero point)."""
  bits: int = 4
  symmetric: bool = False
  group_size: int = 0          # 0: per output channel (the whole input dim); else divides d_in

  def __post_init__(self):
    check(2 <= self.bits <= 8, "quant.bits", f"must be in 2..8; got {self.bits}")
    check(self.group_size >= 0, "quant.group_size", f"must be >= 0 (0 = per channel); got {self.group_size}")

  def groups(self, d_in: int) -> int:
    g = self.group_size or d_in
    check(d_in % g == 0, "quant.group_size", f"must divide the input dim {d_in}; got {g}")
    return d_in // g


def grid(w_JxO: np.ndarray, spec: QuantSpec) -> tuple[np.ndarray, np.ndarray]:
  """(scale [..., O], zero [..., O]) of the grid that covers the rows J of w (one group) for each
  column; leading axes (groups) are kept."""
  w = np.asarray(w_JxO, np.float32)
  return grid_of_range(w.min(-2), w.max(-2), spec)


def grid_of_range(lo, hi, spec: QuantSpec) -> tuple[np.ndarray, np.ndarray]:
  """`grid` from each group's min and max (numpy float32).

  Numpy only: under jit, XLA turns the division by the constant level count into a multiplication
  by its reciprocal, which moves some scales by one ulp.
  """
  lo, hi = np.asarray(lo, np.float32), np.asarray(hi, np.float32)
  if spec.symmetric:   # max |w| is max(-min, max) exactly
    scale = np.maximum(-lo, hi) / (2 ** (spec.bits - 1) - 1)
    zero = np.zeros_like(scale)
  else:
    lo, hi = np.minimum(lo, 0), np.maximum(hi, 0)
    scale = (hi - lo) / (2 ** spec.bits - 1)
    zero = np.round(-lo / np.where(scale > 0, scale, 1))
  return np.where(scale > 0, scale, 1.0).astype(np.float32), zero.astype(np.float32)


def fake_quant(w, scale, zero, spec: QuantSpec):
  """Round w (as float32) to the grid (scale, zero) broadcast against it and dequantize; numpy or
  jax arrays."""
  xp = _array_module(w)
  w = w.astype(xp.float32)
  if spec.symmetric:
    qmax = 2 ** (spec.bits - 1) - 1
    q = xp.clip(xp.round(w / scale), -qmax - 1, qmax)
  else:
    q = xp.clip(xp.round(w / scale) + zero, 0, 2 ** spec.bits - 1) - zero
  return (q * scale).astype(xp.float32)


def rtn(w_IxO: np.ndarray, spec: QuantSpec) -> np.ndarray:
  """Round-to-nearest, group-wise along the input dim; the baseline every other scheme beats or not."""
  w = np.asarray(w_IxO, np.float32)
  I, O = w.shape
  groups = w.reshape(spec.groups(I), -1, O)   # [groups, J, O]
  scale, zero = grid(groups, spec)
  return fake_quant(groups, scale[:, None], zero[:, None], spec).reshape(I, O)


def rtn_keep(w_IxO: np.ndarray, spec: QuantSpec, keep_O: np.ndarray) -> np.ndarray:
  """RTN with the output columns in `keep_O` (bool [O]) left in full precision."""
  keep_O = np.asarray(keep_O, bool)
  check(keep_O.shape == (w_IxO.shape[1],), "keep", f"must be a bool mask of shape ({w_IxO.shape[1]},); "
        f"got {keep_O.shape}")
  return np.where(keep_O[None], np.asarray(w_IxO, np.float32), rtn(w_IxO, spec))


def output_error(x_NxI, w_IxO, w_hat_IxO) -> float:
  """||X W - X W_hat||_F^2: the objective AWQ and GPTQ minimise for one layer."""
  d = np.asarray(x_NxI, np.float32) @ (np.asarray(w_IxO, np.float32) - np.asarray(w_hat_IxO, np.float32))
  return float(np.sum(d.astype(np.float64) ** 2))


def gram_error(h_IxI, w_IxO, w_hat_IxO) -> float:
  """The same objective from the Gram matrix H = X^T X: sum(D * (H D)) with D = W - W_hat, in
  float64. N x I x O becomes I x I x O, so a search over many candidates reads X once."""
  d = np.asarray(w_IxO, np.float64) - np.asarray(w_hat_IxO, np.float64)
  return float(np.sum(d * (np.asarray(h_IxI, np.float64) @ d)))


def gram(x_NxI) -> np.ndarray:
  """H = X^T X in float64 (one symmetric rank-N product: half the flops of X^T @ X)."""
  # X^T is X's memory in BLAS's column-major order: A A^T of it needs no transposed copy of X
  upper = scipy.linalg.blas.dsyrk(1.0, np.asarray(x_NxI, np.float64).T, trans=0)
  return np.triu(upper) + np.triu(upper, 1).T


def gram_factor(h_IxI) -> np.ndarray | None:
  """Upper R with H = R^T R (Cholesky, float64), or None where H is not positive definite (an
  input that is always zero)."""
  r, info = scipy.linalg.lapack.dpotrf(np.asarray(h_IxI, np.float64), lower=0, clean=1)
  return r if info == 0 else None


def gram_errors(h_IxI, pairs: list, r_IxI: np.ndarray | None = None) -> np.ndarray:
  """gram_error(H, w, w_hat) of each (w, w_hat) in `pairs` (float64 [len(pairs)]); with R =
  gram_factor(H), from `factor_errors` on the differences side by side."""
  if r_IxI is None:
    return np.array([gram_error(h_IxI, w, w_hat) for w, w_hat in pairs])
  widths = [w.shape[1] for w, _ in pairs]
  d_IxW = np.empty((r_IxI.shape[0], sum(widths)), np.float32)
  for start, (w, w_hat) in zip(np.cumsum([0] + widths), pairs):
    np.subtract(w, w_hat, out=d_IxW[:, start:start + w.shape[1]], dtype=np.float32)
  return factor_errors(r_IxI, d_IxW, widths)


def factor_errors(r_IxI: np.ndarray, d_IxW, widths: list[int]) -> np.ndarray:
  """||R D_i||_F^2 for the blocks D_i of `widths` columns of D [I, W] (float32), side by side: all
  of them in one triangular product, half the flops of H D. That product runs in float32 (D is a
  difference of float32 weights; R is rounded once) and each column's squares are summed in
  float64: on SmolLM2's layers within 2.3e-7 of the float64 value per pair, where AWQ's best two
  alphas lie 3e-5 or more apart. A writable float32 D is overwritten; any other is copied."""
  d = np.asarray(d_IxW, np.float32)
  # (R D)^T = D^T R^T, and D^T is D's memory in BLAS's column-major order: no copy of D
  rdT_WxI = scipy.linalg.blas.strmm(1.0, r_IxI.astype(np.float32), d.T, side=1, trans_a=1,
                                    overwrite_b=int(d.flags.writeable))
  per_column = np.einsum("wi,wi->w", rdT_WxI, rdT_WxI, dtype=np.float64)
  return np.add.reduceat(per_column, np.cumsum([0] + widths[:-1]))


# --- AWQ: activation-aware per-input-channel scaling -------------------------------------------

def awq_scaled(w_IxO, s_I, spec: QuantSpec) -> np.ndarray:
  """diag(1/s) Q(diag(s) W): scale salient input rows up before rounding, fold 1/s back.

  In a deployment 1/s goes into the op before the linear (a norm's scale); with fake-quant the
  product is the same matrix, so it is folded straight into the returned weights.
  """
  s = np.asarray(s_I, np.float32)[:, None]
  return rtn(np.asarray(w_IxO, np.float32) * s, spec) / s


def awq_search(x_NxI, ws_IxO: list, spec: QuantSpec, n_grid: int = 20):
  """Grid search alpha in [0, 1] for s = mean|x|^alpha over a set of weights that share input x.

  Returns (s_I, alpha, errors [n_grid+1]) minimising sum over ws of ||XW - X awq_scaled(W)||^2.
  alpha = 0 gives s = 1, plain RTN, so the chosen scales never do worse than RTN on this objective.
  s is normalised by sqrt(max * min) as in the AWQ reference code (a common factor cancels except
  through the rounding grid). Every alpha's rounding runs at once (`scaled_differences`, at most
  AWQ_CHUNK_BYTES of differences per call) and their errors come from `factor_errors`, or pair by
  pair in float64 (`gram_errors`) where H is singular.
  """
  check(n_grid >= 1, "awq.n_grid", f"must be >= 1; got {n_grid}")
  x = np.asarray(x_NxI, np.float32)
  mean_abs = np.maximum(np.abs(x).mean(0), 1e-8)
  h = gram(x)
  alphas = np.linspace(0.0, 1.0, n_grid + 1)
  scales = []
  for alpha in alphas:
    s = mean_abs ** alpha
    scales.append(s / np.sqrt(s.max() * s.min()))
  ws = [np.asarray(w, np.float32) for w in ws_IxO]
  r = gram_factor(h)
  if r is None:   # H singular: sum(D * H D) in float64, pair by pair
    errors = gram_errors(h, [(w, awq_scaled(w, s, spec)) for s in scales for w in ws])
  else:
    w_IxO, s_AxI = np.concatenate(ws, axis=1), np.stack(scales).astype(np.float32)
    step = max(1, AWQ_CHUNK_BYTES // (4 * w_IxO.size))
    widths = [w.shape[1] for w in ws]
    errors = np.concatenate([factor_errors(r, scaled_differences(w_IxO, s_AxI[a:a + step], spec),
                                           widths * len(s_AxI[a:a + step])) for a in range(0, len(alphas), step)])
  errors = errors.reshape(len(alphas), len(ws)).sum(1)
  best = int(np.argmin(errors))
  return scales[best].astype(np.float32), float(alphas[best]), errors


AWQ_CHUNK_BYTES = 1 << 28
"""Differences D [I, alphas * O] that `awq_search` rounds and scores per call (SmolLM2's largest
group, gate|up, fits all 21 alphas in 149 MB; a larger model's splits the alphas)."""


def scaled_differences(w_IxO: np.ndarray, s_AxI: np.ndarray, spec: QuantSpec) -> np.ndarray:
  """W - awq_scaled(W, s_a) for every row a of s, as D [I, A * O] (a-major columns), bit for bit
  awq_scaled's float32 arithmetic on CPU: the min and max of each group (exact under XLA) and the
  grid from them in numpy (`grid_of_range`), then the rounding jitted. W's columns side by side
  (linears that share x) quantize as one W: its columns never interact."""
  groups = spec.groups(w_IxO.shape[0])
  lo, hi = _scaled_range(w_IxO, s_AxI, groups)
  return np.array(_rounded_differences(w_IxO, s_AxI, *grid_of_range(lo, hi, spec), spec=spec))


def _scaled_groups(w_IxO, s_AxI, groups: int):
  """diag(s_a) W for every a, as [A, groups, I / groups, O]."""
  return (w_IxO[None] * s_AxI[:, :, None]).reshape(len(s_AxI), groups, -1, w_IxO.shape[1])


@functools.partial(jax.jit, static_argnames="groups")
def _scaled_range(w_IxO, s_AxI, groups: int):
  ws_AxGxJxO = _scaled_groups(w_IxO, s_AxI, groups)
  return ws_AxGxJxO.min(2), ws_AxGxJxO.max(2)


@functools.partial(jax.jit, static_argnames="spec")
def _rounded_differences(w_IxO, s_AxI, scale_AxGxO, zero_AxGxO, *, spec: QuantSpec):
  # XLA turns a division by a broadcast into a multiplication by the reciprocal, which moves some
  # weights: the divisors are materialised behind an optimization barrier.
  full = lambda x, shape: jax.lax.optimization_barrier(jnp.broadcast_to(x, shape))
  ws_AxGxJxO = _scaled_groups(w_IxO, s_AxI, scale_AxGxO.shape[1])
  (A, I), O = s_AxI.shape, w_IxO.shape[1]
  q_AxGxJxO = fake_quant(ws_AxGxJxO, full(scale_AxGxO[:, :, None], ws_AxGxJxO.shape), zero_AxGxO[:, :, None], spec)
  d_AxIxO = w_IxO[None] - q_AxGxJxO.reshape(A, I, O) / full(s_AxI[:, :, None], (A, I, O))
  return jnp.transpose(d_AxIxO, (1, 0, 2)).reshape(I, A * O)


# --- SmoothQuant: migrate activation outliers into the weights, then W8A8 ----------------------

def smooth_scales(x_absmax_I, w_absmax_I, alpha: float) -> np.ndarray:
  """s_j = max|X_j|^alpha / max|W_j|^(1 - alpha); X/s and diag(s) W give the same product."""
  check(0.0 <= alpha <= 1.0, "smoothquant.alpha", f"must be in [0, 1]; got {alpha}")
  xm = np.maximum(np.asarray(x_absmax_I, np.float64), 1e-5)
  wm = np.maximum(np.asarray(w_absmax_I, np.float64), 1e-5)
  return (xm ** alpha / wm ** (1.0 - alpha)).astype(np.float32)


def quant_tokens(x_NxI, bits: int = 8):
  """Dynamic symmetric per-token (per-row) activation fake-quant; jnp or np in, same out."""
  xp = _array_module(x_NxI)
  qmax = 2 ** (bits - 1) - 1
  scale = xp.abs(x_NxI).max(-1, keepdims=True) / qmax
  scale = xp.where(scale > 0, scale, 1.0)
  return xp.clip(xp.round(x_NxI / scale), -qmax - 1, qmax) * scale


def _array_module(x):
  return np if isinstance(x, np.ndarray) else jnp


# --- GPTQ: row-by-row rounding with Hessian error feedback --------------------------------------

def gptq(w_IxO, h_IxI, spec: QuantSpec, *, damp: float = 0.01, block: int = 128) -> np.ndarray:
  """GPTQ (Frantar et al. 2023, Algorithm 1) on W [in, out] with H = X^T X of the layer's input.

  Input rows are rounded one at a time; each row's rounding error, divided by the pivot of the
  upper Cholesky factor U of H^-1 (H^-1 = U^T U), is spread over the not-yet-rounded rows by that
  row of U, so later rows absorb it. Work proceeds in blocks of `block` rows with a lazy update of
  the rest. damp * mean(diag H) is added to H's diagonal. Group-wise grids are fitted on the
  current (already error-compensated) rows of each group when the loop reaches the group's start
  (blocks are rounded to whole groups so that those rows are up to date). Rows whose input is
  always zero (H_ii = 0) are set to zero. Output columns never interact, so linears that share an
  input (and so H) can be quantized as one W side by side, with one factorisation.

  Float64 throughout except the rounding itself (float32, as `rtn`); the rows run in jitted steps
  (`_gptq_block`), the lazy update between blocks is one BLAS product.
  """
  check(damp > 0, "gptq.damp", f"must be > 0; got {damp}")
  check(block >= 1, "gptq.block", f"must be >= 1; got {block}")
  W = np.array(w_IxO, np.float64)
  I, O = W.shape
  check(np.shape(h_IxI) == (I, I), "gptq.hessian", f"must have shape ({I}, {I}); got {np.shape(h_IxI)}")
  group = I // spec.groups(I)
  W[np.diag(h_IxI) == 0] = 0.0
  U = inverse_cholesky(damped(h_IxI, damp))
  grid_O = grid(W, spec) if group == I else None
  if group < I:  # whole groups per block, so a group's grid is fitted on its current rows
    block = max(group, block - block % group)
  Q = np.empty((I, O), np.float32)
  with jax.enable_x64(True):
    for b0 in range(0, I, block):
      b1 = min(b0 + block, I)
      Q[b0:b1], err_JxO = _gptq_block(W[b0:b1], U[b0:b1, b0:b1], spec, group, grid_O)
      W[b1:] -= U[b0:b1, b1:].T @ err_JxO
  return Q


def damped(h_IxI, damp: float) -> np.ndarray:
  """H in float64 with damp * mean(diag H) added to its diagonal; an input that is always zero
  (H_ii = 0) gets H_ii = 1 first, so H stays positive definite."""
  H = np.array(h_IxI, np.float64)
  diag = np.diag_indices(len(H))
  H[diag] += (H[diag] == 0)
  H[diag] += damp * np.mean(H[diag])
  return H


def inverse_cholesky(h_IxI: np.ndarray) -> np.ndarray:
  """Upper U with H^-1 = U^T U, from one Cholesky and one triangular inverse (no full inverse).

  With J the order-reversing permutation and J H J = L L^T, H^-1 = (J L^-1 J)^T (J L^-1 J) and
  J L^-1 J is upper triangular with a positive diagonal, so it is the unique upper factor.
  """
  L = np.linalg.cholesky(h_IxI[::-1, ::-1])
  L_inv, info = scipy.linalg.lapack.dtrtri(L, lower=1)
  assert info == 0, info   # a Cholesky factor's diagonal is positive
  return np.triu(L_inv[::-1, ::-1])


def _gptq_block(w_JxO, u_JxJ, spec: QuantSpec, group: int, grid_O) -> tuple[np.ndarray, np.ndarray]:
  """(Q [J, O] float32, error [J, O]) of one block, rows in steps of STEP rows per jitted call.
  A group's grid is fitted (in numpy, as `rtn` does) on its current rows when a step reaches its
  first row, or `grid_O` serves throughout."""
  J, O = w_JxO.shape
  step = min(J, STEP if grid_O is not None else math.gcd(group, STEP))  # a step starts every group
  carry = (jnp.asarray(w_JxO), jnp.zeros((J, O), jnp.float32), jnp.zeros((J, O), jnp.float64))
  scale_O, zero_O = grid_O if grid_O is not None else (None, None)
  for r0 in range(0, J, step):
    if grid_O is None and r0 % group == 0:
      scale_O, zero_O = grid(np.asarray(carry[0][r0:r0 + group]), spec)
    carry = _gptq_rows(carry, u_JxJ, scale_O, zero_O, r0, spec=spec, step=min(step, J - r0))
  return np.asarray(carry[1]), np.asarray(carry[2])


@functools.partial(jax.jit, static_argnames=("spec", "step"), donate_argnums=0)
def _gptq_rows(carry, u_JxJ, scale_O, zero_O, r0, *, spec: QuantSpec, step: int):
  """Rows r0 .. r0+step of a block in order: round a row, spread its error over the step's rows
  by U's row (upper triangular: rows already rounded receive exact zeros); then the rest of the
  block gets the step's errors in one product, not a rank-1 update of the whole block per row
  (which streams it through memory once per row)."""
  w_JxO, q_JxO, err_JxO = carry
  u_step_JxJ = jax.lax.dynamic_slice(u_JxJ, (r0, r0), (step, step))

  def row(i, carry):
    w_step_JxO, q_step_JxO, err_step_JxO = carry
    q_O = fake_quant(w_step_JxO[i], scale_O, zero_O, spec)
    err_O = (w_step_JxO[i] - q_O) / u_step_JxJ[i, i]
    return w_step_JxO - u_step_JxJ[i][:, None] * err_O[None], q_step_JxO.at[i].set(q_O), err_step_JxO.at[i].set(err_O)
  w_step_JxO = jax.lax.dynamic_slice_in_dim(w_JxO, r0, step)
  _, q_step_JxO, err_step_JxO = jax.lax.fori_loop(
      0, step, row, (w_step_JxO, jnp.zeros_like(w_step_JxO, jnp.float32), jnp.zeros_like(w_step_JxO)))
  # rows up to r0 + step are done: U's zeros there, or unused
  w_JxO = w_JxO - jax.lax.dynamic_slice_in_dim(u_JxJ, r0, step).T @ err_step_JxO
  return (w_JxO, jax.lax.dynamic_update_slice_in_dim(q_JxO, q_step_JxO, r0, 0),
          jax.lax.dynamic_update_slice_in_dim(err_JxO, err_step_JxO, r0, 0))
