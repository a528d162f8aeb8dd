"""Quantization schemes on weight matrices (analysis.studies.quantize): RTN, kept columns, GPTQ against
its reference loop, AWQ, the Gram-form error and SmoothQuant."""
from __future__ import annotations

import numpy as np
import pytest

from analysis.studies import quantize as Q
from analysis.studies import quantize_model as QM
from minilm.schema import ConfigError

EPS32 = float(np.finfo(np.float32).eps)


def correlated_inputs(rng, n, d, outlier=None):
  """Rows with strongly correlated features (a low-rank mix plus noise), optionally one loud channel."""
  x = rng.normal(size=(n, d // 4)) @ rng.normal(size=(d // 4, d)) + 0.1 * rng.normal(size=(n, d))
  if outlier is not None:
    x[:, outlier] *= 30
  return x.astype(np.float32)


@pytest.mark.parametrize("bits", [8, 4, 3])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("group_size", [0, 16])
def test_rtn_error_within_half_step(bits, symmetric, group_size):
  rng = np.random.default_rng(bits)
  w = rng.standard_t(3, size=(64, 24)).astype(np.float32)  # heavy tails: a few large weights
  spec = Q.QuantSpec(bits, symmetric, group_size)
  w_hat = Q.rtn(w, spec)
  groups = w.reshape(spec.groups(64), -1, 24)
  for g, g_hat in zip(groups, w_hat.reshape(groups.shape)):
    scale, _ = Q.grid(g, spec)
    assert np.all(np.abs(g - g_hat) <= scale / 2 * (1 + 1e-5) + 1e-7)
    levels = max(len(np.unique(g_hat[:, j])) for j in range(24))
    assert levels <= 2 ** bits
  if bits == 3:  # and rounding really happened
    assert np.abs(w - w_hat).max() > 0


def test_asymmetric_grid_has_2_to_the_bits_levels_from_min_to_max():
  """QuantSpec: asymmetric = min/max (widened to hold 0) over 2^bits - 1 steps, an integer zero
  point, codes 0..2^bits-1. Hand values, float32 throughout."""
  spec = Q.QuantSpec(4)
  # a column spanning [-3, 12]: step 15/15 = 1, zero point 3, and every integer in range is a level
  w = np.arange(-3.0, 13.0, dtype=np.float32)[:, None]
  scale, zero = Q.grid(w, spec)
  assert scale.tolist() == [1.0] and zero.tolist() == [3.0]
  np.testing.assert_array_equal(Q.fake_quant(w, scale, zero, spec), w)   # both extremes included: exact
  # [-1, 1]: step 2/15 (one float32 division); -lo/step = 7.4999995 in float32, so zero point 7
  scale, zero = Q.grid(np.array([[-1.0], [1.0]], np.float32), spec)
  assert scale.tolist() == [np.float32(2) / np.float32(15)] and zero.tolist() == [7.0]
  sweep = np.linspace(-3, 3, 6001, dtype=np.float32)[:, None]            # far past both ends: every code
  levels = np.unique(Q.fake_quant(sweep, scale, zero, spec))
  np.testing.assert_array_equal(levels, np.arange(-7, 9, dtype=np.float32) * scale)   # 16 levels, k * step exactly
  # a column of positives: the range is widened to 0, so 0 stays a level (zero point 0)
  scale, zero = Q.grid(np.array([[2.0], [15.0]], np.float32), spec)
  assert scale.tolist() == [1.0] and zero.tolist() == [0.0]


def test_symmetric_grid_is_absmax_over_2_to_the_bits_minus_1_minus_1():
  """QuantSpec: symmetric = absmax / (2^(bits-1) - 1), codes -2^(bits-1) .. 2^(bits-1) - 1."""
  spec = Q.QuantSpec(4, symmetric=True)
  w = np.arange(-7, 8, dtype=np.float32)[:, None] * 0.25                 # absmax 1.75 = 7 steps of 0.25
  scale, zero = Q.grid(w, spec)
  assert scale.tolist() == [0.25] and zero.tolist() == [0.0]              # 1.75 / 7: exact in float32
  np.testing.assert_array_equal(Q.fake_quant(w, scale, zero, spec), w)   # +-absmax included: exact
  sweep = np.linspace(-4, 4, 801, dtype=np.float32)[:, None]
  levels = np.unique(Q.fake_quant(sweep, scale, zero, spec))
  np.testing.assert_array_equal(levels, np.arange(-8, 8, dtype=np.float32) * 0.25)    # -8..7: 16 codes
  assert Q.grid(np.array([[-127.0], [3.0]], np.float32), Q.QuantSpec(8, symmetric=True))[0].tolist() == [1.0]


def test_spec_rejects_bad_values():
  with pytest.raises(ConfigError, match="quant.bits"):
    Q.QuantSpec(bits=1)
  with pytest.raises(ConfigError, match="quant.group_size"):
    Q.rtn(np.zeros((10, 3)), Q.QuantSpec(4, group_size=4))
  with pytest.raises(ConfigError, match="scheme.method"):
    QM.Scheme("int4")


def test_kept_columns_come_back_exactly():
  rng = np.random.default_rng(0)
  w = rng.normal(size=(32, 16)).astype(np.float32)
  keep = np.zeros(16, bool)
  keep[[2, 9]] = True
  spec = Q.QuantSpec(3, group_size=8)
  w_hat = Q.rtn_keep(w, spec, keep)
  np.testing.assert_array_equal(w_hat[:, keep], w[:, keep])
  np.testing.assert_array_equal(w_hat[:, ~keep], Q.rtn(w, spec)[:, ~keep])


@pytest.mark.parametrize("bits,group_size", [(4, 0), (3, 0), (3, 32)])
def test_gptq_beats_rtn_on_correlated_inputs(bits, group_size):
  rng = np.random.default_rng(1)
  x = correlated_inputs(rng, 1024, 128)
  w = rng.normal(size=(128, 48)).astype(np.float32) * 0.05
  spec = Q.QuantSpec(bits, group_size=group_size)
  err_rtn = Q.output_error(x, w, Q.rtn(w, spec))
  err_gptq = Q.output_error(x, w, Q.gptq(w, x.T @ x, spec, block=32))
  assert err_gptq < 0.8 * err_rtn
  # the result is on the grid: each column still takes at most 2^bits values per group
  q = Q.gptq(w, x.T @ x, spec)
  assert max(len(np.unique(c)) for c in q.reshape(spec.groups(128), -1, 48).transpose(0, 2, 1).reshape(-1, 128 // spec.groups(128))) <= 2 ** bits


def test_gptq_zeroes_dead_inputs():
  rng = np.random.default_rng(2)
  x = correlated_inputs(rng, 256, 32)
  x[:, 5] = 0
  q = Q.gptq(rng.normal(size=(32, 8)), x.T @ x, Q.QuantSpec(4))
  assert np.all(q[5] == 0) and np.all(np.isfinite(q))


def gptq_reference(w_IxO, h_IxI, spec, damp=0.01, block=128):
  """GPTQ as a plain row loop in numpy float64 (H^-1 by a full inverse), the definition the
  library's blocked, jitted version must reproduce."""
  W, H = np.array(w_IxO, np.float64), np.array(h_IxI, np.float64)
  I, O = W.shape
  group = I // spec.groups(I)
  dead = np.diag(H) == 0
  H[dead, dead] = 1.0
  W[dead] = 0.0
  H[np.diag_indices(I)] += damp * np.mean(np.diag(H))
  U = np.linalg.cholesky(np.linalg.inv(H)).T
  scale, zero = Q.grid(W, spec)
  if group < I:
    block = max(group, block - block % group)
  out = np.zeros((I, O), np.float32)
  for b0 in range(0, I, block):
    b1 = min(b0 + block, I)
    Wb, Err = W[b0:b1].copy(), np.zeros((b1 - b0, O))
    for i in range(b1 - b0):
      row = b0 + i
      if group < I and row % group == 0:
        scale, zero = Q.grid(Wb[i:i + group], spec)
      out[row] = Q.fake_quant(Wb[i], scale, zero, spec)
      Err[i] = (Wb[i] - out[row]) / U[row, row]
      Wb[i:] -= np.outer(U[row, row:b1], Err[i])
    W[b1:] -= U[b0:b1, b1:].T @ Err
  return out


@pytest.mark.parametrize("bits,group_size,symmetric,block", [(4, 0, False, 128), (3, 16, False, 32), (8, 16, True, 40),
                                                             (4, 32, False, 8), (3, 0, True, 48)])
def test_gptq_equals_the_reference_loop(bits, group_size, symmetric, block):
  """Both run in float64 and round the same float32 values with the same grids; they differ only
  in how U is factored (one Cholesky + triangular inverse vs a full inverse + Cholesky) and in the
  summation order, ~1e-12 relative here (cond(H) * 1e-16). A float32 rounding can flip only for a
  value that close to a grid midpoint, which no element of these seeded matrices is, so the
  results are asserted equal, element for element."""
  rng = np.random.default_rng(bits + group_size)
  x = correlated_inputs(rng, 512, 96)
  x[:, 10] = 0  # a dead input
  w = rng.normal(size=(96, 40)).astype(np.float32) * 0.05
  spec = Q.QuantSpec(bits, symmetric, group_size)
  np.testing.assert_array_equal(Q.gptq(w, x.T @ x, spec, block=block), gptq_reference(w, x.T @ x, spec, block=block))


def test_gptq_on_side_by_side_linears_equals_gptq_on_each():
  rng = np.random.default_rng(7)
  x = correlated_inputs(rng, 512, 64)
  ws = [rng.normal(size=(64, o)).astype(np.float32) for o in (24, 8, 8)]
  spec = Q.QuantSpec(3, group_size=16)
  together = QM._split_columns(Q.gptq(np.concatenate(ws, axis=1), x.T @ x, spec), ws)
  for w, q in zip(ws, together):
    np.testing.assert_array_equal(q, Q.gptq(w, x.T @ x, spec))


def test_inverse_cholesky_factors_the_inverse():
  rng = np.random.default_rng(8)
  x = correlated_inputs(rng, 256, 48)
  h = Q.damped(x.T.astype(np.float64) @ x, 0.01)
  U = Q.inverse_cholesky(h)
  np.testing.assert_array_equal(U, np.triu(U))
  np.testing.assert_allclose(U, np.linalg.cholesky(np.linalg.inv(h)).T, rtol=1e-9, atol=1e-12)


def test_awq_never_worse_than_rtn_on_its_objective():
  rng = np.random.default_rng(3)
  x = correlated_inputs(rng, 512, 64, outlier=7)
  ws = [rng.normal(size=(64, 32)).astype(np.float32) for _ in range(2)]
  spec = Q.QuantSpec(3, group_size=16)
  s, alpha, errors = Q.awq_search(x, ws, spec, n_grid=10)
  rtn_err = sum(Q.output_error(x, w, Q.rtn(w, spec)) for w in ws)
  # rtn_err and chosen come from output_error's float32 X @ dW (depth 64), the grid's errors from the
  # float64 Gram form: they agree to the float32 rounding of 64-term sums, 2 * 64 * eps32 relative.
  assert errors[0] == pytest.approx(rtn_err, rel=2 * 64 * EPS32)  # alpha = 0 is plain RTN
  chosen = sum(Q.output_error(x, w, Q.awq_scaled(w, s, spec)) for w in ws)
  assert chosen == pytest.approx(errors.min(), rel=2 * 64 * EPS32) and chosen <= rtn_err * (1 + 2 * 64 * EPS32)
  assert alpha > 0  # with a loud input channel, scaling helps


@pytest.mark.parametrize("symmetric, group_size", [(False, 16), (True, 16), (False, 0)])
def test_awq_search_rounds_every_alpha_as_awq_scaled_does(symmetric, group_size):
  """The jitted rounding of all alphas at once is awq_scaled's float32 arithmetic, bit for bit
  (a division that XLA turned into a multiplication by the reciprocal would move some weights)."""
  rng = np.random.default_rng(5)
  x = correlated_inputs(rng, 256, 64, outlier=5)
  ws = [rng.normal(size=(64, o)).astype(np.float32) for o in (24, 8)]
  spec = Q.QuantSpec(4, symmetric, group_size)
  s, alpha, errors = Q.awq_search(x, ws, spec, n_grid=8)
  h = Q.gram(x)
  alphas = np.linspace(0.0, 1.0, 9)
  mean_abs = np.maximum(np.abs(x).mean(0), 1e-8)
  scales = [mean_abs ** a / np.sqrt((mean_abs ** a).max() * (mean_abs ** a).min()) for a in alphas]
  pairs = [(w, Q.awq_scaled(w, sc, spec)) for sc in scales for w in ws]
  want = Q.gram_errors(h, pairs, Q.gram_factor(h)).reshape(len(alphas), len(ws)).sum(1)
  np.testing.assert_array_equal(errors, want)
  np.testing.assert_array_equal(s, scales[int(np.argmin(want))].astype(np.float32))


def test_awq_search_splits_its_alphas_into_chunks_without_changing_them(monkeypatch):
  rng = np.random.default_rng(10)
  x = correlated_inputs(rng, 256, 64, outlier=5)
  ws = [rng.normal(size=(64, o)).astype(np.float32) for o in (24, 8)]
  spec = Q.QuantSpec(4, group_size=16)
  whole = Q.awq_search(x, ws, spec, n_grid=8)
  monkeypatch.setattr(Q, "AWQ_CHUNK_BYTES", 4 * 64 * 32 * 2)   # two alphas per call: 5 calls
  chunked = Q.awq_search(x, ws, spec, n_grid=8)
  np.testing.assert_array_equal(chunked[0], whole[0])
  assert chunked[1] == whole[1]
  # the same float32 products of depth 64; BLAS may order a panel's sums apart: 2 * 64 * eps32
  np.testing.assert_allclose(chunked[2], whole[2], rtol=2 * 64 * EPS32)


def test_gram_error_is_output_error():
  rng = np.random.default_rng(4)
  x, w = correlated_inputs(rng, 300, 40), rng.normal(size=(40, 12)).astype(np.float32)
  w_hat = Q.rtn(w, Q.QuantSpec(3))
  assert Q.gram_error(x.T.astype(np.float64) @ x, w, w_hat) == pytest.approx(Q.output_error(x, w, w_hat), rel=2 * 40 * EPS32)  # float32 sums of depth I = 40


def test_smoothing_is_exact_before_rounding_and_helps_w8a8():
  rng = np.random.default_rng(4)
  x = correlated_inputs(rng, 256, 64, outlier=3)
  w = rng.normal(size=(64, 32)).astype(np.float32)
  s = Q.smooth_scales(np.abs(x).max(0), np.abs(w).max(1), alpha=0.5)
  np.testing.assert_allclose((x / s) @ (w * s[:, None]), x @ w, rtol=1e-4, atol=1e-3)
  spec = Q.QuantSpec(8, symmetric=True)
  plain = np.sum((x @ w - Q.quant_tokens(x) @ Q.rtn(w, spec)) ** 2)
  smooth = np.sum((x @ w - Q.quant_tokens(x / s) @ Q.rtn(w * s[:, None], spec)) ** 2)
  assert smooth < plain


@pytest.mark.parametrize("symmetric", [False, True])
def test_grid_over_groups_is_each_groups_grid(symmetric):
  rng = np.random.default_rng(6)
  groups = rng.standard_t(3, size=(5, 16, 7)).astype(np.float32)
  groups[2, :, 3] = 0.0   # an all-zero column: scale 1
  spec = Q.QuantSpec(4, symmetric)
  scale, zero = Q.grid(groups, spec)
  for g in range(5):
    one_scale, one_zero = Q.grid(groups[g], spec)
    np.testing.assert_array_equal(scale[g], one_scale)
    np.testing.assert_array_equal(zero[g], one_zero)


def test_gram_is_the_float64_product():
  x = correlated_inputs(np.random.default_rng(7), 300, 40)
  h = Q.gram(x)
  np.testing.assert_array_equal(h, h.T)
  np.testing.assert_allclose(h, x.T.astype(np.float64) @ x, rtol=1e-12, atol=1e-9)


def test_gram_errors_from_the_factor_are_gram_errors():
  rng = np.random.default_rng(8)
  x = correlated_inputs(rng, 300, 40)
  h = Q.gram(x)
  pairs = [(w, Q.rtn(w, Q.QuantSpec(3))) for w in (rng.normal(size=(40, o)).astype(np.float32) for o in (12, 5, 30))]
  want = [Q.gram_error(h, w, w_hat) for w, w_hat in pairs]
  r = Q.gram_factor(h)
  np.testing.assert_allclose(r.T @ r, h, rtol=1e-12, atol=1e-9 * np.abs(h).max())
  # R D runs in float32: with R and D rounded once and dots of I terms, each entry is off by at most
  # e = (I + 3) u |R| |D| (u = EPS32 / 2; EPS32 bounds it twice over), so ||R D||^2 by 2 ||R D|| e + e^2
  for got, want_one, (w, w_hat) in zip(Q.gram_errors(h, pairs, r), want, pairs):
    e = (40 + 3) * EPS32 * np.linalg.norm(np.abs(r) @ np.abs(w.astype(np.float64) - w_hat))
    assert abs(got - want_one) <= 2 * np.sqrt(want_one) * e + e * e
  np.testing.assert_array_equal(Q.gram_errors(h, pairs), want)


def test_awq_with_an_input_that_is_always_zero():
  rng = np.random.default_rng(9)
  x = correlated_inputs(rng, 256, 32, outlier=4)
  x[:, 7] = 0.0     # H is singular: no Cholesky factor, the errors come from H D
  assert Q.gram_factor(Q.gram(x)) is None
  ws = [rng.normal(size=(32, 16)).astype(np.float32)]
  spec = Q.QuantSpec(3, group_size=16)
  s, alpha, errors = Q.awq_search(x, ws, spec, n_grid=5)
  assert np.all(np.isfinite(s)) and np.all(np.isfinite(errors)) and errors.min() == errors[int(round(alpha * 5))]
  mean_abs = np.maximum(np.abs(x).mean(0), 1e-8)   # every alpha's error is sum(D * H D) in float64
  for a, got in zip(np.linspace(0.0, 1.0, 6), errors):
    sc = mean_abs ** a / np.sqrt((mean_abs ** a).max() * (mean_abs ** a).min())
    assert got == Q.gram_error(Q.gram(x), ws[0], Q.awq_scaled(ws[0], sc, spec))


def test_awq_keeps_plain_rtn_where_rtn_is_exact():
  """alpha = 0 (s = 1) is a candidate of the search: where every column of every group already lies
  on its 4-bit grid (integers -7..8, both ends present), RTN's error is exactly 0 and any other alpha
  scales the rows off the grid, so the search must return alpha 0 and s = 1."""
  rng = np.random.default_rng(11)
  x = correlated_inputs(rng, 256, 32, outlier=3)
  w = rng.integers(-7, 9, size=(32, 12)).astype(np.float32)
  w[0::16], w[1::16] = -7.0, 8.0             # each group of 16 rows spans [-7, 8]: step 1, zero point 7
  spec = Q.QuantSpec(4, group_size=16)
  np.testing.assert_array_equal(Q.rtn(w, spec), w)
  s, alpha, errors = Q.awq_search(x, [w], spec, n_grid=4)
  assert errors[0] == 0 and np.all(errors[1:] > 0)
  assert alpha == 0 and np.all(s == 1)


def test_smooth_scales_follow_their_formula_at_any_alpha():
  """s_j = max|X_j|^alpha / max|W_j|^(1 - alpha): away from alpha = 0.5 the two exponents differ, so
  swapping them shows; alpha = 1 moves all of X's range into W, alpha = 0 none of it."""
  xm, wm = np.array([16.0, 1.0, 0.0]), np.array([1.0, 16.0, 4.0])   # 0 is floored at 1e-5
  # powers of 2 and of 1e-5 in float64, then one rounding to float32: rtol of float32's eps
  np.testing.assert_allclose(Q.smooth_scales(xm, wm, 0.75), [8.0, 0.5, 1e-5 ** 0.75 / 4 ** 0.25], rtol=EPS32)
  np.testing.assert_allclose(Q.smooth_scales(xm, wm, 1.0), [16.0, 1.0, 1e-5], rtol=EPS32)
  np.testing.assert_allclose(Q.smooth_scales(xm, wm, 0.0), [1.0, 1 / 16, 1 / 4], rtol=EPS32)


def test_token_quantization_is_per_row_symmetric_with_2_to_the_bits_minus_1_codes():
  """quant_tokens: one scale per row, absmax / (2^(bits-1) - 1), codes clipped to the signed range;
  rows never interact (a loud row leaves a quiet one alone)."""
  row = np.linspace(-1, 1, 1001, dtype=np.float32)
  x = np.stack([row, 1000 * row])
  got = Q.quant_tokens(x, bits=4)
  for r in range(2):   # 15 levels k * absmax / 7, k = -7..7 (absmax itself is a code)
    scale = np.float32(np.abs(x[r]).max()) / np.float32(7)
    np.testing.assert_array_equal(np.unique(got[r]), np.arange(-7, 8, dtype=np.float32) * scale)
    assert np.abs(got[r] - x[r]).max() <= scale / 2 * (1 + 1e-6)   # half a step, up to float32 rounding
  np.testing.assert_array_equal(Q.quant_tokens(x[:1], bits=4), got[:1])
