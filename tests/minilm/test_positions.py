"""RoPE, ALiBi and sinusoidal math against first principles and independent references."""
import math

import jax.numpy as jnp
import numpy as np
import pytest

from minilm import positions as P

RNG = np.random.default_rng(0)
EPS32 = float(np.finfo(np.float32).eps)


def rope(x, pos, **kw):
  return np.asarray(P.apply_rope(jnp.asarray(x), jnp.asarray(pos), **kw), np.float64)


def pairs(head_dim, layout, **kw):
  """[(d1, d2)] dims of every rotated pair, from rope_pair_index."""
  index = P.rope_pair_index(head_dim, layout, **kw)
  return [tuple(np.flatnonzero(index == j)) for j in range(index.max() + 1)]


# ------------------------------------------------------------------------------------ frequencies

# Frequencies and slopes are float64 on both sides: pow's rounded exponent moves them by about
# ln(base) * 2e-16 < 1e-14, so rtol=1e-12 is safe and far below float32's 1e-7.
def test_theta_hand_computed():
  np.testing.assert_allclose(P.rope_frequencies(8, 10000.0), [1.0, 0.1, 0.01, 0.001], rtol=1e-12)
  np.testing.assert_allclose(P.rope_frequencies(4, 100.0), [1.0, 0.1], rtol=1e-12)
  np.testing.assert_allclose(P.rope_frequencies(6, 1e6), [1.0, 1e-2, 1e-4], rtol=1e-12)


@pytest.mark.parametrize("head_dim", [8, 32, 64, 128])
@pytest.mark.parametrize("base", [100.0, 1e4, 5e5])
def test_theta_formula(head_dim, base):
  expected = [math.pow(base, -2.0 * j / head_dim) for j in range(head_dim // 2)]
  np.testing.assert_allclose(P.rope_frequencies(head_dim, base), expected, rtol=1e-12)


def test_partial_frequencies():
  # neox squeezes the whole spectrum onto fraction*head_dim dims
  np.testing.assert_allclose(P.rope_frequencies(16, 1e4, 0.5, "neox"),
                             [1e4 ** (-2 * j / 8) for j in range(4)], rtol=1e-12)
  # p-rope keeps the head's own spectrum and drops its lowest frequencies
  np.testing.assert_allclose(P.rope_frequencies(16, 1e4, 0.5, "p-rope"),
                             [1e4 ** (-2 * j / 16) for j in range(4)], rtol=1e-12)


def test_linear_scaling_is_position_interpolation():
  """theta / factor at position t rotates exactly as theta at position t / factor."""
  x = RNG.normal(size=(1, 3, 2, 16))
  theta = P.scale_frequencies(P.rope_frequencies(16, 1e4), "linear", 4.0)
  # exact: dividing by 4 and multiplying by 8 = 4 * 2 are exact, so both angles are the same floats
  np.testing.assert_array_equal(rope(x, np.asarray([0, 8, 20]), theta=theta),
                                rope(x, np.asarray([0.0, 2.0, 5.0]), base=1e4))


def test_llama3_scaling_keeps_fast_pairs_and_slows_slow_ones():
  theta = P.rope_frequencies(64, 5e5)
  scaled = P.scale_frequencies(theta, "llama3", 8.0, 1.0, 4.0, 8192)
  wavelen = 2 * np.pi / theta
  np.testing.assert_array_equal(scaled[wavelen < 2048], theta[wavelen < 2048])   # exact: kept as they are
  np.testing.assert_allclose(scaled[wavelen > 8192], theta[wavelen > 8192] / 8.0, rtol=1e-12)
  band = (wavelen >= 2048) & (wavelen <= 8192)
  assert band.any() and np.all((scaled[band] <= theta[band]) & (scaled[band] >= theta[band] / 8.0))
  # in the band, Llama 3's blend: smooth = (8192 / wavelength - 1) / (4 - 1) of theta, the rest theta / 8;
  # by hand at the wavelengths 2048 (smooth 1), 4096 (1/3: 5/12 of theta) and 8192 (0)
  edges = 2 * np.pi / np.array([2048.0, 4096.0, 8192.0])
  np.testing.assert_allclose(P.scale_frequencies(edges, "llama3", 8.0, 1.0, 4.0, 8192),
                             edges * [1.0, 5 / 12, 1 / 8], rtol=1e-12)


def test_partial_rope_without_theta_rotates_by_its_own_frequencies():
  """apply_rope's default theta is rope_frequencies of the same fraction and style (p-rope keeps the
  head's fastest pairs, neox spreads its spectrum over the rotated dims)."""
  x = RNG.normal(size=(1, 3, 2, 16))
  for partial in ("p-rope", "neox"):
    theta = P.rope_frequencies(16, 1e4, 0.5, partial)
    np.testing.assert_array_equal(rope(x, np.arange(3), base=1e4, fraction=0.5, partial=partial),
                                  rope(x, np.arange(3), base=1e4, fraction=0.5, partial=partial, theta=theta))


def test_pair_index_layouts():
  np.testing.assert_array_equal(P.rope_pair_index(8, "half"), [0, 1, 2, 3, 0, 1, 2, 3])
  np.testing.assert_array_equal(P.rope_pair_index(8, "interleaved"), [0, 0, 1, 1, 2, 2, 3, 3])
  np.testing.assert_array_equal(P.rope_pair_index(8, "half", 0.5, "neox"), [0, 1, 0, 1, -1, -1, -1, -1])
  np.testing.assert_array_equal(P.rope_pair_index(8, "half", 0.5, "p-rope"), [0, 1, -1, -1, 0, 1, -1, -1])
  np.testing.assert_array_equal(P.rope_pair_index(8, "interleaved", 0.5, "p-rope"), [0, 0, 1, 1, -1, -1, -1, -1])


# ---------------------------------------------------------------------------------------- rotation

LAYOUTS = ["half", "interleaved"]
PARTIALS = [dict(), dict(fraction=0.5, partial="neox"), dict(fraction=0.5, partial="p-rope"),
            dict(fraction=0.25, partial="neox"), dict(fraction=0.75, partial="p-rope")]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("partial", PARTIALS)
def test_rotation_keeps_pair_norms(layout, partial):
  x = RNG.normal(size=(2, 50, 3, 16)).astype(np.float32)
  y = rope(x, np.arange(50) * 37, layout=layout, **partial)
  for d1, d2 in pairs(16, layout, **partial):
    # float32 cos and sin (a few ulps: cos^2 + sin^2 = 1 within ~4 eps), two products and a sum each
    # rounded: the pair's norm moves by a few eps; 16 eps.
    np.testing.assert_allclose(np.hypot(y[..., d1], y[..., d2]), np.hypot(x[..., d1], x[..., d2]), rtol=16 * EPS32)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("partial", PARTIALS)
def test_unrotated_dims_untouched(layout, partial):
  x = RNG.normal(size=(1, 20, 2, 16)).astype(np.float32)
  y = rope(x, np.arange(20) * 101, layout=layout, **partial)
  fixed = P.rope_pair_index(16, layout, **partial) < 0
  if partial:
    assert fixed.any()
  np.testing.assert_array_equal(y[..., fixed], x[..., fixed])   # exact: passed through untouched
  assert not np.allclose(y[..., ~fixed], x[..., ~fixed])


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("partial", PARTIALS)
def test_relative_position_property(layout, partial):
  """<R_m q, R_n k> depends only on m - n, up to float32 angles: each angle m*theta is rounded
  to 2^-24 relative, so the dot product may move by about 2 * m_max * 2^-24 * |q||k|; the rotation's
  own rounding (a few eps of each pair, as above) adds 16 eps * |q||k|."""
  q = RNG.normal(size=(1, 1, 1, 32)).astype(np.float32)
  k = RNG.normal(size=(1, 1, 1, 32)).astype(np.float32)
  for delta in [0, 1, 7, 100]:
    dots = []
    for n in [0, 3, 50, 900, 4000]:
      rq = rope(q, [n + delta], layout=layout, **partial)
      rk = rope(k, [n], layout=layout, **partial)
      dots.append(float((rq * rk).sum()))
    bound = (2 * 4100 * 2.0 ** -24 + 16 * EPS32) * np.linalg.norm(q) * np.linalg.norm(k)
    np.testing.assert_allclose(dots, dots[0], atol=bound)


def test_per_row_positions_turn_each_row_by_its_own():
  """Positions [B, T] (right-padded prompts decode at their own positions): row b rotates exactly as
  it would alone with positions[b]. The same elementwise float32 ops; only vectorisation of cos/sin
  may differ (a few ulps): 4 eps of the largest input."""
  x = RNG.normal(size=(3, 5, 2, 16)).astype(np.float32)
  pos = np.arange(15).reshape(3, 5) * 7
  whole = rope(x, pos)
  for b in range(3):
    np.testing.assert_allclose(whole[b], rope(x[b:b + 1], pos[b])[0], rtol=0, atol=4 * EPS32 * np.abs(x).max())


@pytest.mark.parametrize("layout", LAYOUTS)
def test_position_zero_is_identity(layout):
  x = RNG.normal(size=(2, 1, 4, 16)).astype(np.float32)
  np.testing.assert_array_equal(rope(x, [0], layout=layout), x)   # exact: cos 0 = 1, sin 0 = 0


def test_half_and_interleaved_agree_after_permutation():
  D = 16
  perm = np.empty(D, int)  # interleaved dim 2j <- half dim j, 2j+1 <- j + D/2
  perm[0::2], perm[1::2] = np.arange(D // 2), np.arange(D // 2) + D // 2
  x_half = RNG.normal(size=(2, 30, 3, D)).astype(np.float32)
  pos = np.arange(30) * 13
  # The same two products and difference per element; only their fusing (FMA or not) may differ:
  # within 2 eps of the largest input.
  np.testing.assert_allclose(rope(x_half, pos, layout="half")[..., perm],
                             rope(x_half[..., perm], pos, layout="interleaved"), rtol=0, atol=2 * EPS32 * np.abs(x_half).max())


@pytest.mark.parametrize("base", [100.0, 1e4, 1e6])
def test_complex_number_reference(base):
  """Interleaved RoPE is multiplication of z_j = x_2j + i x_2j+1 by exp(i m theta_j)."""
  D, T = 32, 40
  x = RNG.normal(size=(1, T, 2, D)).astype(np.float32)
  pos = np.arange(T) * 29
  z = x[..., 0::2].astype(np.float64) + 1j * x[..., 1::2].astype(np.float64)
  theta = base ** (-np.arange(D // 2) * 2.0 / D)
  z = z * np.exp(1j * pos[None, :, None, None] * theta)
  expected = np.stack([z.real, z.imag], axis=-1).reshape(x.shape)
  # float32 angles m*theta (theta and the product rounded: |m*theta| * eps rad, theta <= 1) turn each
  # pair (norm <= sqrt(2) max|x|) by that much; the rotation's own rounding adds a few eps.
  atol = (pos.max() + 4) * EPS32 * np.sqrt(2) * np.abs(x).max()
  np.testing.assert_allclose(rope(x, pos, base=base, layout="interleaved"), expected, atol=atol)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_period_of_each_pair(layout):
  """Rotating by one wavelength 2*pi/theta_j returns pair j to where it started."""
  D = 16
  theta = P.rope_frequencies(D, 1e4)
  x = RNG.normal(size=(1, 1, 1, D)).astype(np.float32)
  for j, (d1, d2) in enumerate(pairs(D, layout)):
    period = 2 * np.pi / theta[j]
    # The angle (2 pi or pi) is rounded three times (position, theta, product): <= 2 pi * 1.5 eps rad;
    # with cos, sin and the rotation's rounding, within 16 eps of the pair's norm.
    atol = 16 * EPS32 * np.hypot(x[..., d1], x[..., d2]).max()
    y = rope(x, np.array([period], np.float64), layout=layout)
    np.testing.assert_allclose(y[..., [d1, d2]], x[..., [d1, d2]], atol=atol)
    half = rope(x, np.array([period / 2], np.float64), layout=layout)  # half a turn flips the pair
    np.testing.assert_allclose(half[..., [d1, d2]], -x[..., [d1, d2]], atol=atol)


def _reference_f64(x, pos, base, D):
  theta = base ** (-np.arange(D // 2) * 2.0 / D)
  ang = pos * theta
  x = x.astype(np.float64)
  x1, x2 = x[..., : D // 2], x[..., D // 2:]
  return np.concatenate([x1 * np.cos(ang) - x2 * np.sin(ang), x2 * np.cos(ang) + x1 * np.sin(ang)], -1)


def _pair_norm(x, D):
  """The largest norm of a (j, j + D/2) pair."""
  x = np.asarray(x, np.float64)
  return np.hypot(x[..., : D // 2], x[..., D // 2:]).max()


def test_float32_angle_precision_at_8191():
  """Angles in float32 at position 8191 lose at most 8191 * 2^-23 rad (theta and the product rounded),
  which turns a pair by that much of its norm; the rotation's own rounding adds a few eps."""
  D = 64
  x = RNG.normal(size=(1, 1, 4, D)).astype(np.float32)
  got = rope(x, [8191], base=1e4)
  ref = _reference_f64(x, 8191.0, 1e4, D)
  assert np.abs(got - ref).max() <= (8191 + 4) * EPS32 * _pair_norm(x, D)


def test_bfloat16_input_rotates_in_float32():
  """bf16 in, bf16 out; the output cast loses 2^-8 relative, the float32 angle 8191 eps (as above)."""
  D = 64
  x = jnp.asarray(RNG.normal(size=(1, 1, 4, D)), jnp.bfloat16)
  got = P.apply_rope(x, jnp.asarray([8191]), base=1e4)
  assert got.dtype == jnp.bfloat16
  ref = _reference_f64(np.asarray(x, np.float64), 8191.0, 1e4, D)
  assert np.abs(np.asarray(got, np.float64) - ref).max() <= (2.0 ** -8 + (8191 + 4) * EPS32) * _pair_norm(x, D)


@pytest.mark.parametrize("bad", [dict(fraction=0.0), dict(fraction=1.5), dict(partial="gptj"), dict(layout="zigzag")])
def test_bad_rope_arguments_are_one_line_errors(bad):
  with pytest.raises(ValueError) as err:
    P.apply_rope(jnp.ones((1, 2, 1, 8)), jnp.arange(2), **bad)
  assert "\n" not in str(err.value) and str(err.value).split(":")[0] in bad


# ------------------------------------------------------------------------------------------- ALiBi

def paper_slopes(n):
  """Press et al.: geometric from 2^(-8/n) for powers of two; else the nearest lower power of two,
  then every other slope of the next power of two."""
  if n & (n - 1) == 0:
    return [2 ** (-8 * (i + 1) / n) for i in range(n)]
  low = 2 ** int(math.log2(n))
  return paper_slopes(low) + paper_slopes(2 * low)[0::2][: n - low]


@pytest.mark.parametrize("n", [1, 2, 4, 6, 8, 12, 16, 20])
def test_alibi_slopes(n):
  np.testing.assert_allclose(P.alibi_slopes(n), paper_slopes(n), rtol=1e-12)


def test_alibi_slopes_hand_values():   # exact: 2^(-8/n) is a power of two for n = 4, 8, and so are its powers
  np.testing.assert_array_equal(P.alibi_slopes(8), [1 / 2 ** i for i in range(1, 9)])
  np.testing.assert_array_equal(P.alibi_slopes(6), [2 ** -2, 2 ** -4, 2 ** -6, 2 ** -8, 2 ** -1, 2 ** -3])


def test_alibi_bias_zero_diagonal_linear_in_distance():
  slopes = P.alibi_slopes(6)
  pos = np.arange(10)
  bias = np.asarray(P.alibi_bias(slopes, pos, pos))  # [H, T, S]
  assert bias.shape == (6, 10, 10)
  np.testing.assert_array_equal(np.diagonal(bias, axis1=1, axis2=2), 0.0)   # exact: slope * 0
  dist = pos[:, None] - pos[None, :]
  np.testing.assert_allclose(bias, -slopes[:, None, None] * dist, rtol=2 * EPS32)   # slope and product rounded: <= eps


# -------------------------------------------------------------------------------------- sinusoidal

def test_sinusoidal_shift_is_a_fixed_linear_map():
  """PE(t+k) = PE(t) M_k for every t, with M_k the block rotation by k*w_i on each (sin, cos) pair."""
  d = 32
  table = P.sinusoidal_table(300, d).astype(np.float64)
  w = 1e4 ** (-np.arange(0, d, 2) / d)
  for k in [1, 5, 40]:
    M = np.zeros((d, d))
    c, s = np.cos(k * w), np.sin(k * w)
    i = np.arange(d // 2)
    # sin(a+b) = sin a cos b + cos a sin b ; cos(a+b) = cos a cos b - sin a sin b
    M[2 * i, 2 * i], M[2 * i + 1, 2 * i] = c, s
    M[2 * i, 2 * i + 1], M[2 * i + 1, 2 * i + 1] = -s, c
    # Each float64 entry is rounded once to float32 (<= eps/2, |entry| <= 1); a shifted one mixes two
    # with weights |c| + |s| <= sqrt(2): within (sqrt(2) + 1)/2 eps; 2 eps.
    np.testing.assert_allclose(table[: 300 - k] @ M, table[k:], atol=2 * EPS32)


def test_sinusoidal_dot_products_depend_only_on_distance():
  table = P.sinusoidal_table(512, 64).astype(np.float64)
  for k in [0, 1, 9, 100]:
    dots = [table[t] @ table[t + k] for t in [0, 17, 200, 350]]
    back = [table[t + k] @ table[t] for t in [0, 17, 200, 350]]
    # Entries rounded once to float32 (eps/2): a dot of rows of norm sqrt(32) moves <= 32 eps, two 64 eps.
    np.testing.assert_allclose(dots, dots[0], atol=64 * EPS32)
    np.testing.assert_array_equal(back, dots)   # exact: the same products summed in the same order


def test_sinusoidal_hand_values():
  table = P.sinusoidal_table(3, 4)
  # float64 sin and cos rounded once to float32: eps/2, plus float64 ulps
  np.testing.assert_allclose(table[1], [math.sin(1), math.cos(1), math.sin(1e-2), math.cos(1e-2)], rtol=EPS32)
  np.testing.assert_array_equal(table[0], [0, 1, 0, 1])   # exact: sin 0 = 0, cos 0 = 1
