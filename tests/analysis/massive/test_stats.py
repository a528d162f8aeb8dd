"""Statistics on synthetic tensors with known answers: planted massive dims, isotropic nulls, RoPE invariance."""
import re

import numpy as np
import pytest

from analysis.massive import stats as S
from minilm import encodings, positions

EPS32 = float(np.finfo(np.float32).eps)


def _pair_dims(j: int, head_dim: int, layout: str) -> tuple[int, int]:
  return (j, j + head_dim // 2) if layout == "half" else (2 * j, 2 * j + 1)


def _planted(rng, T, H, D, plants, layout, magnitude=30.0):
  """Gaussian noise [T, H, D] with both dims of pair j of head h set to +-magnitude (random signs per
  token and dim, so a rotation keeps each dim's share of the pair near one half)."""
  x = rng.standard_normal((T, H, D)).astype(np.float32)
  expected = np.zeros((H, D), bool)
  for h, j in plants:
    for d in _pair_dims(j, D, layout):
      x[:, h, d] = magnitude * rng.choice([-1.0, 1.0], T)
      expected[h, d] = True
  return x, expected


@pytest.mark.parametrize("layout", ["half", "interleaved"])
def test_planted_massive_dims_are_found_exactly_before_and_after_rope_with_gqa(layout):
  rng = np.random.default_rng(0)
  T, H, K, D = 256, 8, 2, 32
  q, q_expected = _planted(rng, T, H, D, [(1, 12), (5, 12), (3, 2), (6, 15)], layout)
  k, k_expected = _planted(rng, T, K, D, [(0, 14)], layout)
  pos = np.arange(T)
  for x, expected in ((q, q_expected), (k, k_expected)):
    rotated = np.asarray(positions.apply_rope(x[None], pos, layout=layout))[0]
    for tensor in (x, rotated):
      M = np.asarray(S.value_norms(tensor))
      np.testing.assert_array_equal(S.massive_mask(M, 5.0), expected)
      planted = expected.any(-1)
      np.testing.assert_array_equal(S.top_k_mask(M, 2)[planted], expected[planted])
      pairing = encodings.RoPE(layout=layout).pairing(D)
      st = S.head_stats(M, pairing, T)
      np.testing.assert_array_equal(st["massive"], expected.sum(-1))
      peaks = {h: int(st["peak_pair"][h]) for h in np.nonzero(planted)[0]}
      want = {h: [j for d, j in enumerate(pairing.pair_index) if expected[h, d]][0] for h in peaks}
      assert peaks == want


def test_massive_is_strictly_above_five_times_the_mean_by_default():
  """The paper's Definition: M[d] > lambda * mean_d M with lambda = 5. A dim exactly at 5x its head's mean
  is not massive; one at 4.7x is massive only where a lower lambda is asked for."""
  assert S.LAM == 5.0 and S.StatConfig().lam == 5.0
  at = np.array([[5.0, 1, 1, 1, 0, 0, 0, 0]])          # mean 1 exactly: 5 == 5 * mean, no rounding
  assert not S.massive_mask(at).any() and S.massive_mask(at, 4.9)[0, 0]
  below = np.array([[10.0] + [1.0] * 7])                # 10 / (17 / 8) = 4.7
  assert not S.massive_mask(below).any() and S.massive_mask(below, 4.0).sum() == 1
  st = S.head_stats(below, encodings.RoPE().pairing(8), 8.0, only=("any_massive",))
  assert st["any_massive"][0] == 0                     # StatConfig's default lambda


def test_noise_has_no_massive_dims_and_low_max_mean():
  x = np.random.default_rng(1).standard_normal((4, 128, 8, 64)).astype(np.float32)
  M = np.asarray(S.value_norms(x))
  assert S.massive_mask(M, 5.0).sum() == 0
  assert S.max_mean(M).max() < 1.5


@pytest.mark.parametrize("layout", ["half", "interleaved"])
def test_low_frequency_share_of_an_isotropic_tensor_is_a_quarter(layout):
  x = np.random.default_rng(2).standard_normal((512, 8, 64)).astype(np.float32)
  pairing = encodings.RoPE(layout=layout).pairing(64)
  lf, null = S.lf_share(S.pair_energy(np.asarray(S.value_norms(x)), pairing.pair_index))
  assert null == 0.25   # exact: 16 of 64 dims
  # Sampling, not rounding: a head's share over 512 tokens has sd ~0.0035; 0.03 is ~9 sd, 0.01 ~8 sd of the mean of 8
  assert abs(lf.mean() - 0.25) < 0.01 and np.all(np.abs(lf - 0.25) < 0.03)


@pytest.mark.parametrize("rope", [encodings.RoPE(layout="half"), encodings.RoPE(layout="interleaved", base=1e5),
                                  encodings.RoPE(fraction=0.5), encodings.RoPE(fraction=0.5, partial="p-rope")])
def test_pair_energy_is_unchanged_by_rope(rope):
  x = np.random.default_rng(3).standard_normal((2, 64, 4, 32)).astype(np.float32) * np.linspace(0.1, 3, 32, dtype=np.float32)
  pairing = rope.pairing(32)
  rotated = positions.apply_rope(x, np.arange(64), base=rope.base, fraction=rope.fraction,
                                 partial=rope.partial, layout=rope.layout)
  before = S.pair_energy(np.asarray(S.value_norms(x)), pairing.pair_index)
  after = S.pair_energy(np.asarray(S.value_norms(rotated)), pairing.pair_index)
  # Each pair's energy is a float32 sum of n = 2 * 64 squares of one sign (n*eps/2) before and after
  # (n*eps between them); the rotation itself keeps each pair's norm within a few eps.
  n = 2 * 64
  np.testing.assert_allclose(after, before, rtol=(n + 16) * EPS32)
  assert not np.allclose(np.asarray(rotated), x)   # the rotation did something


def test_the_low_frequency_band_is_the_nearest_whole_quarter_and_never_empty():
  """lf_quarter of the pairs, rounded to the nearest count (6 pairs: 2, not 1), and at least one pair."""
  assert [S.lf_pairs(P) for P in (1, 2, 4, 6, 16, 32)] == [1, 1, 1, 2, 4, 8]
  E = np.zeros((1, 6))
  E[0, 4] = 1.0                                          # the second-lowest frequency of 6 pairs
  share, null = S.lf_share(E)
  assert share[0] == 1.0 and null == 2 / 6               # exact: one nonzero term


@pytest.mark.parametrize("rope", [encodings.RoPE(fraction=0.5), encodings.RoPE(fraction=0.5, partial="p-rope"),
                                  encodings.RoPE(fraction=0.25, layout="interleaved")])
def test_unrotated_dims_pair_the_kth_with_the_k_plus_half_th(rope):
  """docs/claims.md: the U dims RoPE leaves unrotated form units P, P+1, ... of the k-th with the
  (k + U/2)-th of them, in order; rotated dims keep their rotary pair."""
  pairing = rope.pairing(16)
  units = S.unit_index(pairing)
  unrotated = np.nonzero(pairing.pair_index < 0)[0]
  half = len(unrotated) // 2
  np.testing.assert_array_equal(units[unrotated[:half]], pairing.n_pairs + np.arange(half))
  np.testing.assert_array_equal(units[unrotated[half:]], pairing.n_pairs + np.arange(half))
  rotated = pairing.pair_index >= 0
  np.testing.assert_array_equal(units[rotated], pairing.pair_index[rotated])


def test_partial_rope_unrotated_dims_are_their_own_band():
  pairing = encodings.RoPE(fraction=0.5, partial="p-rope").pairing(32)   # pairs 8..15 unrotated
  assert pairing.n_pairs == 8 and (pairing.pair_index < 0).sum() == 16
  M = np.ones((2, 32))
  M[0, pairing.pair_index < 0] = 3.0                                            # 9x the energy there
  share = S.unrotated_share(M, pairing.pair_index)
  np.testing.assert_allclose(share, [16 * 9 / (16 * 9 + 16), 0.5])             # sums of integers: one rounded quotient
  lf, null = S.lf_share(S.pair_energy(M, pairing.pair_index))
  np.testing.assert_array_equal(lf, [0.25, 0.25])                               # rotated pairs only; 4 of 16: exact
  assert list(pairing.dim_order[-16:]) == list(np.nonzero(pairing.pair_index < 0)[0])


def test_context_boundary_pairs_match_the_science_notes():
  theta = positions.rope_frequencies(64, 10000.0)
  assert S.context_pair(theta, 256) == 13    # wavelength 265 > 256; pair 12 has 199
  assert S.context_pair(theta, 512) == 16    # 628 > 512; pair 15 has 471
  assert S.context_pair(theta, 1e9) == 32    # none: one past the last pair
  E = np.zeros((1, 32))
  E[0, 15] = 1.0
  share, null = S.band_share(E, theta, 256)
  assert share[0] == 1.0 and 0 < null < 1


def test_wavelength_boundaries_exclude_the_lower_edge_and_include_the_upper():
  """j_ctx is the first pair whose wavelength exceeds the context (equal is not beyond it); the boundary
  band is (0.5, 4] x context. Contexts are set so that an edge equals a wavelength exactly (scaling by
  a power of two is exact in floating point)."""
  theta = positions.rope_frequencies(64, 10000.0)
  wl = 2 * np.pi / np.asarray(theta)                     # as stats computes it
  j = 13
  assert S.context_pair(theta, wl[j]) == j + 1
  E = np.eye(32)[j][None]
  assert S.band_share(E, theta, 2 * wl[j])[0][0] == 0.0   # wavelength = 0.5 x context: outside
  assert S.band_share(E, theta, wl[j] / 4)[0][0] == 1.0   # wavelength = 4 x context: inside


def test_value_norms_masks_padding_and_the_first_token_in_float32():
  rng = np.random.default_rng(4)
  x = rng.standard_normal((3, 10, 2, 8)).astype(np.float32)
  mask = np.ones((3, 10))
  mask[1, 7:] = 0
  want = np.sqrt(np.einsum("bthd,bt->hd", x.astype(np.float64) ** 2, mask * (np.arange(10) > 0)))
  got = S.value_norms(x, mask=mask, drop_first=True)
  assert got.dtype == np.float32
  n = int((mask * (np.arange(10) > 0)).sum())   # float32 sums of n squares of one sign: n*eps/2, sqrt halves it
  np.testing.assert_allclose(np.asarray(got), want, rtol=n * EPS32)
  per = np.asarray(S.value_norms(x, per_prompt=True))
  assert per.shape == (3, 2, 8)
  # 30 squares of one sign summed in float32 in two groupings (15 eps each), plus the squares of the roots
  np.testing.assert_allclose((per ** 2).sum(0), np.asarray(S.value_norms(x)) ** 2, rtol=(30 + 8) * EPS32)
  import jax.numpy as jnp
  big = jnp.full((4096, 1, 2), 4.0, jnp.bfloat16)   # a bfloat16 sum would stall at 256 * 16
  # exact in float32: every partial sum of 16s is an integer below 2^24, and sqrt(65536) = 256
  np.testing.assert_array_equal(np.asarray(S.value_norms(big)), 4.0 * 64)
  with pytest.raises(ValueError, match="mask"):
    S.value_norms(x, mask=np.ones((3, 9)))


def test_agreement_and_kurtosis_against_known_profiles():
  M = np.ones((4, 16))
  M[:, 5] = 20.0
  M[:, 9] = 10.0
  agree, chance = S.agreement(M, 2)
  np.testing.assert_array_equal(agree, 1.0)        # exact: whole overlaps
  assert chance == 2 / 16
  M2 = M.copy()
  M2[2, 5], M2[2, 11] = 1.0, 20.0                  # head 2 shares only dim 9 with the others
  agree2, _ = S.agreement(M2, 2)
  np.testing.assert_allclose(agree2, [2 / 3 + 1 / 6, 2 / 3 + 1 / 6, 0.5, 2 / 3 + 1 / 6], rtol=EPS32)   # float32 mean: one rounding
  assert np.isnan(S.agreement(M[:1], 2)[0]).all()   # one head: nothing to agree with
  assert S.kurtosis(M).min() > 5 > abs(S.kurtosis(np.random.default_rng(5).standard_normal((2, 4096)))).max()


def test_kurtosis_is_excess_kurtosis_of_known_profiles():
  # Evenly spaced values (discrete uniform on n points): excess kurtosis -6(n^2+1) / (5(n^2-1)),
  # -1.2 in the limit; float64 means of n = 1000 terms: n * eps64 ~ 2e-13 relative, 1e-12 is ample.
  n = 1000
  np.testing.assert_allclose(S.kurtosis(np.linspace(0.0, 1.0, n)[None]), -6 * (n * n + 1) / (5 * (n * n - 1)), rtol=1e-12)
  # One dim set among D (Bernoulli, p = 1/D): kurtosis 1/(pq) - 3, so excess D^2/(D-1) - 6 ("about D").
  D = 64
  np.testing.assert_allclose(S.kurtosis(np.eye(1, D)), D * D / (D - 1) - 6, rtol=1e-12)
  # A Gaussian sample: 0, with sample sd sqrt(24/n) (0.022 at n = 50000); 5 sd per row
  g = np.random.default_rng(12).standard_normal((8, 50000))
  assert np.all(np.abs(S.kurtosis(g)) < 5 * np.sqrt(24 / g.shape[1]))


def test_interval_is_the_linear_percentile_interval():
  """interval = numpy's default ('linear', Hyndman-Fan type 7) quantiles at (1-level)/2 and
  (1+level)/2 of the finite samples: position q * (n - 1) among the sorted values, interpolated."""
  rng = np.random.default_rng(13)
  # 1001 values 0..1000: positions 25 and 975 are order statistics, the values themselves. (1-0.95)/2
  # is 0.025 to a few float64 ulps, so the positions (and values) to ~1e-14 of 1000: rtol 1e-12.
  s = rng.permutation(1001).astype(float)
  np.testing.assert_allclose(S.interval(s, 0.95), (25.0, 975.0), rtol=1e-12)
  np.testing.assert_allclose(S.interval(s, 0.5), (250.0, 750.0), rtol=1e-12)
  # squares 0..100^2: positions 2.5 and 97.5 fall between order statistics, halfway by linear interpolation
  sq = rng.permutation(np.arange(101.0) ** 2)
  np.testing.assert_allclose(S.interval(sq), ((2 ** 2 + 3 ** 2) / 2, (97 ** 2 + 98 ** 2) / 2), rtol=1e-12)
  # non-finite replicates are left out, not counted as extremes
  np.testing.assert_allclose(S.interval(np.concatenate([sq, [np.nan, np.inf, -np.inf]])), S.interval(sq), rtol=0)
  assert all(np.isnan(S.interval([np.nan, np.inf])))


def test_bootstrap_is_paired_and_covers_the_point():
  rng = np.random.default_rng(6)
  sums = rng.chisquare(4, (20, 4, 16))
  sums[:, :, 3] *= 200
  pairing = encodings.RoPE().pairing(16)
  counts = S.prompt_counts(20, 300, 0)
  assert counts.shape == (300, 20) and np.all(counts.sum(1) == 20)
  cfg = S.StatConfig()
  a = S.pooled([sums], ["max_mean", "massive"], pairing, 16, cfg, counts, seed=1)
  b = S.pooled([sums], ["max_mean"], pairing, 16, cfg, counts, seed=1)
  lo, hi = S.interval(a["max_mean"][1])
  assert lo <= a["max_mean"][0] <= hi and hi > lo
  np.testing.assert_array_equal(a["max_mean"][1] - b["max_mean"][1], 0)   # same arm, same resamples
  assert a["massive"][0] == 1.0


def test_bad_arguments_fail_with_one_line_messages():
  with pytest.raises(ValueError, match="k: must be in 1..16"):
    S.top_k_mask(np.ones((2, 16)), 0)
  with pytest.raises(ValueError, match="lam"):
    S.StatConfig(lam=0)
  with pytest.raises(ValueError, match="x: expected"):
    S.value_norms(np.ones((4, 4)))


@pytest.mark.parametrize("kw, first", [
    ({"lam": float("inf")}, "lam: must be a finite number > 0; got inf"),   # nothing would ever be massive
    ({"lam": float("nan")}, "lam: must be a finite number > 0; got nan"),
    ({"band": (0.5, float("inf"))}, "band: must be two increasing finite positive multiples"),
    ({"resid_abs": float("inf")}, "resid_abs: must be a finite number >= 0; got inf"),
    ({"resid_ratio": float("inf")}, "resid_ratio: must be a finite number > 1")])
def test_non_finite_settings_are_refused_in_one_line(kw, first):
  with pytest.raises(ValueError, match="^" + re.escape(first)):
    S.StatConfig(**kw)


@pytest.mark.parametrize("k", [1, 2, 4, 5, 16])
def test_top_k_mask_is_the_stable_sort_with_ties(k):
  M = np.random.default_rng(k).integers(0, 4, size=(50, 3, 16)).astype(float)   # many ties
  reference = np.zeros(M.shape, bool)
  np.put_along_axis(reference, np.argsort(-M, axis=-1, kind="stable")[..., :k], True, axis=-1)
  np.testing.assert_array_equal(S.top_k_mask(M, k), reference)


@pytest.mark.parametrize("top_k, want", [(1, [1, 1, 0]), (2, [1, 2, 0])])
def test_topk_massive_counts_the_top_dims_that_also_pass_lambda(top_k, want):
  """Head 0: one dim at 40 (massive), head 1: two (both massive), head 2: flat (none): of each head's
  top_k dims, those above 5x the mean."""
  M = np.ones((3, 16))
  M[0, 2] = 40.0                                         # 40 > 5 * 55 / 16
  M[1, [2, 7]] = 40.0                                    # 40 > 5 * 94 / 16
  st = S.head_stats(M, encodings.RoPE().pairing(16), 16.0, S.StatConfig(top_k=top_k), only=("topk_massive",))
  np.testing.assert_array_equal(st["topk_massive"], want)


def test_head_stats_only_computes_what_is_asked_and_agrees():
  from minilm.encodings import RoPE
  M = np.abs(np.random.default_rng(9).normal(size=(20, 4, 32)))
  pairing = RoPE().pairing(32)
  full = S.head_stats(M, pairing, 128.0)
  some = S.head_stats(M, pairing, 128.0, only=("kurtosis", "agreement"))
  assert set(some) == {"kurtosis", "agreement", "null"} and some["null"] == full["null"]
  for name in ("kurtosis", "agreement"):
    np.testing.assert_array_equal(some[name], full[name])   # exact: the same code on the same input


def _rotate_pairs(x_TxHxD, units, rng):
  """Rotate every two-dim unit of every token and head by its own random angle."""
  y = x_TxHxD.copy()
  for j in range(units.max() + 1):
    d1, d2 = np.nonzero(units == j)[0]
    a = rng.uniform(0, 2 * np.pi, x_TxHxD.shape[:2])
    y[..., d1] = np.cos(a) * x_TxHxD[..., d1] - np.sin(a) * x_TxHxD[..., d2]
    y[..., d2] = np.sin(a) * x_TxHxD[..., d1] + np.cos(a) * x_TxHxD[..., d2]
  return y


@pytest.mark.parametrize("position", [encodings.RoPE(), encodings.RoPE(layout="interleaved"),
                                      encodings.RoPE(fraction=0.5), encodings.RoPE(fraction=0.5, partial="p-rope"),
                                      encodings.NoPE()])
def test_pair_statistics_are_invariant_under_any_rotation_of_the_pairs(position):
  rng = np.random.default_rng(10)
  D = 32
  pairing = position.pairing(D)
  units = S.unit_index(pairing)
  assert sorted(np.bincount(units)) == [2] * (D // 2)                  # every dim in exactly one unit of two
  x = rng.standard_normal((128, 4, D)) * np.linspace(0.2, 3, D)
  x[:, 1, 5] *= 60                                                      # one massive dim in head 1
  y = _rotate_pairs(x, units, rng)
  before = S.head_stats(np.asarray(S.value_norms(x)), pairing, 128.0)
  after = S.head_stats(np.asarray(S.value_norms(y)), pairing, 128.0)
  # A dim's norm is a float32 sum of T = 128 squares of one sign (T*eps/2) on each side; the pair
  # statistics combine a few such sums (means, ratios): 2*T*eps.
  for name in S.PAIR:
    np.testing.assert_allclose(after[name], before[name], rtol=2 * 128 * EPS32, err_msg=name)
  assert after["max_mean"][1] < 0.8 * before["max_mean"][1]            # per dim, the rotation lowers it
  assert before["pair_any_massive"][1] == 1 and before["pair_massive"][1] == 1


def test_pair_norms_are_the_norms_of_each_pairs_sub_vector():
  pairing = encodings.RoPE().pairing(8)
  M = np.arange(1.0, 9.0)[None]
  np.testing.assert_allclose(S.pair_norms(M, S.unit_index(pairing))[0],   # float64, the same formula
                             np.sqrt(M[0, :4] ** 2 + M[0, 4:] ** 2))    # half layout: (j, j + 4)
  st = S.head_stats(np.array([[1.0] * 7 + [30.0]]), pairing, 8.0)
  assert st["any_massive"][0] == 1 and st["pair_max_mean"][0] == pytest.approx(   # a few roundings: 8 eps
      np.sqrt(901) / ((3 * np.sqrt(2) + np.sqrt(901)) / 4), rel=8 * EPS32)


def test_recurrence_null_has_its_size_without_recurrence_and_detects_planted_recurrence():
  rng = np.random.default_rng(11)
  p_values = []
  for _ in range(300):   # each head marks 1-3 dims at random: no recurrence beyond chance
    masks = []
    for _ in range(4):
      m = np.zeros((6, 32), bool)
      for h in range(6):
        m[h, rng.choice(32, rng.integers(1, 4), replace=False)] = True
      masks.append(m)
    p_values.append(S.recurrence(masks, 199, int(rng.integers(1 << 30)))["p"])
  p_values = np.asarray(p_values)
  for alpha in (0.05, 0.2, 0.5):    # size: P(p <= alpha) <= alpha within 3 binomial sd
    assert (p_values <= alpha).mean() <= alpha + 3 * np.sqrt(alpha * (1 - alpha) / 300)
  assert (p_values <= 0.5).mean() >= 0.5 - 3 * np.sqrt(0.25 / 300)      # and not conservative to uselessness
  planted = [m.copy() for m in masks]
  for m in planted:
    m[:4, 7] = True                                                     # dim 7 massive in 4 of 6 heads
  test = S.recurrence(planted, 999, 0)
  assert test["p"] == 1 / 1000 and test["observed"] >= 4 * 6 > test["null_mean"]   # 6 planted pairs a layer
  assert S.recurrence([np.eye(4, 8, dtype=bool)], 99, 0)["observed"] == 0
  assert S.recurrence([np.zeros((4, 8), bool)], 99, 0)["testable"] == 0


def test_a_layer_with_one_marked_head_is_not_testable():
  """Recurrence needs two heads with a marked dim in a layer; a layer with one is left out of the count."""
  one = np.zeros((4, 8), bool)
  one[2, 3] = True
  test = S.recurrence([one, one], 99, 0)
  assert test["testable"] == 0 and test["observed"] == 0 and np.isnan(test["p"])
  two = one.copy()
  two[0, 3] = True
  test = S.recurrence([one, two], 99, 0)
  assert test["testable"] == 1 and test["observed"] == 1


def test_a_test_that_cannot_reach_the_level_says_so():
  """Two of three heads massive in one of 64 dims: even at the same dim that is p ~ 1/64 under the
  null, so p_best (the most recurrent placement's p) stays above 0.01; sixteen heads can go below."""
  two = np.zeros((3, 64), bool)
  two[:2, 5] = True                                  # the most recurrent placement already
  test = S.recurrence([two], 999, 0)
  assert test["observed"] == S.nested_pairs(two) == 1 and test["p"] == test["p_best"]
  assert 0.01 < test["p_best"] < 0.05                # 1/64 = 0.016 and its permutation estimate
  many = np.zeros((16, 64), bool)
  many[np.arange(16), np.arange(16) * 4] = True      # sixteen heads, sixteen different dims
  test = S.recurrence([many], 999, 0)
  assert test["observed"] == 0 and test["p"] > 0.5 and test["p_best"] == 1 / 1000
  assert S.nested_pairs(many) == 16 * 15 // 2


def test_nested_pairs_places_every_head_s_marks_at_the_same_dims():
  m = np.zeros((3, 6), bool)
  m[0, [0, 2, 4]] = m[1, [1, 3]] = m[2, 5] = True    # counts 3, 2, 1 -> dims shared by 3, 2 and 1 heads
  assert S.nested_pairs(m) == 3 + 1


def test_shared_pairs_counts_pairs_of_heads_per_dim():
  m = np.zeros((4, 5), bool)
  m[:3, 0] = True      # 3 heads: 3 pairs
  m[[0, 3], 2] = True  # 1 pair
  assert S.shared_pairs(m) == 4
