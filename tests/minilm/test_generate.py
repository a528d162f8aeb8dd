"""Greedy decoding with the KV cache equals the argmax loop over full forwards."""
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import EPS32
from helpers import forward
from helpers import small_decoder as make
from helpers import small_tokens as tokens
from minilm import encodings, generate
from minilm.generate import greedy
from minilm.model import NEVER, init_cache

ENCODINGS = sorted(encodings.REGISTRY)


def test_greedy_matches_argmax_loop():
  model = make("alibi")
  prompt = tokens(2, 6)
  out = np.asarray(greedy(model, prompt, 4))
  seq = np.asarray(prompt)
  for _ in range(4):
    seq = np.concatenate([seq, np.asarray(forward(model, jnp.asarray(seq)))[:, -1].argmax(-1)[:, None]], 1)
  np.testing.assert_array_equal(out, seq[:, 6:])


@pytest.mark.slow   # five encodings, three compiled shapes each; the logits test below is the fast check
@pytest.mark.parametrize("position", ENCODINGS)
def test_right_padded_batches_decode_as_each_prompt_alone(position):
  """Prompts of lengths 3..11 right-padded to 16 in one batch (per-row lengths) continue exactly as
  each does alone: the padding's keys are never visible, and decoding goes on at each row's own
  position (absolute encodings included: padding repeats the last real position, never beyond)."""
  model = make(position)
  prompts = [np.asarray(tokens(1, n, seed=n))[0] for n in (3, 7, 11, 5)]
  (idx, padded, lengths, n), = generate.batches(prompts, [5] * 4, 4, bucket=16)
  assert padded.shape == (4, 16) and lengths.tolist() == [3, 7, 11, 5] and idx == [0, 1, 2, 3]
  out = np.asarray(greedy(model, padded, n, lengths=lengths))
  for row, prompt in zip(out, prompts):
    np.testing.assert_array_equal(row, np.asarray(greedy(model, prompt[None], 5))[0])


def test_right_padded_prefill_and_decode_logits_match_unpadded():
  """Below the argmax: a padded prefill and the next step's logits equal the unpadded ones within
  float32 rounding (other shapes sum in other orders; bound as in test_model's cache test)."""
  model = make("rope")
  toks = np.asarray(tokens(1, 9))
  padded = np.concatenate([toks, np.asarray(tokens(1, 7, seed=5))], 1)   # 7 tokens of padding
  plain, cache = forward(model, jnp.asarray(toks), cache=init_cache(model.cfg, 1, 10))
  pad, pcache = forward(model, jnp.asarray(padded), jnp.minimum(jnp.arange(16), 8)[None],
                        cache=init_cache(model.cfg, 1, 17), lengths_B=jnp.asarray([9]))
  step, _ = forward(model, jnp.asarray([[3]]), jnp.asarray([[9]]), cache=cache)
  pstep, _ = forward(model, jnp.asarray([[3]]), jnp.asarray([[9]]), cache=pcache)
  bound = 4 * np.sqrt(740) * EPS32 * np.abs(np.asarray(plain)).max()
  np.testing.assert_allclose(np.asarray(pad)[:, :9], plain, rtol=0, atol=bound)
  np.testing.assert_allclose(pstep, step, rtol=0, atol=bound)
  assert np.asarray(pcache["pos"])[0, 9:16].min() == NEVER   # the padding's slots stay unseen


def test_batches_split_a_group_evenly_with_fewer_filler_rows_than_batches():
  """20 prompts at batch 8: batches of 7, 7 and 6 prompts, all 7 rows (one filler row, a repeat of
  the last prompt), not 8, 8 and 4 in 24 rows; 22 at batch 8: 8, 8 and 6 (two filler rows, three
  batches); a group below `batch` is one batch of its own size; pow2 keeps full batches and fills
  the last to a power of two. Every prompt is in exactly one batch."""
  def split(n, batch, **kw):
    prompts = [[i + 1] * 3 for i in range(n)]
    out = list(generate.batches(prompts, [2] * n, batch, **kw))
    assert sorted(i for idx, *_ in out for i in idx) == list(range(n))
    for idx, tokens, lengths, _ in out:
      assert tokens[:len(idx), 0].tolist() == [i + 1 for i in idx] and (tokens[len(idx):] == tokens[len(idx) - 1]).all()
    return [(len(idx), len(tokens)) for idx, tokens, *_ in out]
  assert split(20, 8) == [(7, 7), (7, 7), (6, 7)]
  assert split(20, 32) == [(20, 20)]
  assert split(22, 8) == [(8, 8), (8, 8), (6, 8)]
  assert split(16, 8) == [(8, 8), (8, 8)]
  assert split(20, 8, pow2=True) == [(8, 8), (8, 8), (4, 4)]
  assert split(19, 8, pow2=True) == [(8, 8), (8, 8), (3, 4)]


def test_batches_group_by_padded_length_and_max_new():
  """A group is one (padded length, max_new): equal prompts with other max_new decode apart, each
  with its own; bucket rounds a length up to the next multiple (0: the length itself)."""
  out = [(idx, rows.tolist(), lengths.tolist(), n) for idx, rows, lengths, n
         in generate.batches([[1, 2, 3]] * 3, [2, 5, 2], 4)]
  assert out == [([0, 2], [[1, 2, 3]] * 2, [3, 3], 2), ([1], [[1, 2, 3]], [3], 5)]
  assert [generate.padded_length(n, 8) for n in (1, 8, 9, 16)] == [8, 8, 16, 16]
  assert [generate.padded_length(n, 0) for n in (1, 8, 9)] == [1, 8, 9]
  out = [(idx, rows.shape, lengths.tolist(), n) for idx, rows, lengths, n
         in generate.batches([[1] * 3, [1] * 9, [1] * 8, [1] * 16], [2] * 4, 4, bucket=8)]
  assert out == [([0, 2], (2, 8), [3, 8], 2), ([1, 3], (2, 16), [9, 16], 2)]


def _scale_v(scale, name, x):
  """A prefill hook: every layer's v times `scale` (at init attention adds little; x100 changes tokens)."""
  return x * scale if name.endswith(".v") else x


def test_greedy_batches_pass_the_hook_to_every_batch():
  """greedy_batches with a hook continues each prompt exactly as greedy with that hook alone (batch 1
  and the prompt's length given: the same compiled program, so the same tokens bit for bit), and the
  hook changes some output."""
  model = make("rope")
  prompts = [np.asarray(tokens(1, n, seed=n))[0] for n in (5, 7, 6)]
  max_new, hook = [4, 4, 3], dict(hook=_scale_v, hook_args=jnp.float32(100.0))
  hooked = {tuple(idx): out for idx, out in generate.greedy_batches(model, prompts, max_new, 1, **hook)}
  plain = {tuple(idx): out for idx, out in generate.greedy_batches(model, prompts, max_new, 1)}
  assert sorted(hooked) == sorted(plain) == [(0,), (1,), (2,)]
  for i, (prompt, n) in enumerate(zip(prompts, max_new)):
    lengths = np.array([len(prompt)])   # as batches gives them: the same program as greedy_batches runs
    np.testing.assert_array_equal(hooked[(i,)], np.asarray(greedy(model, prompt[None], n, lengths=lengths, **hook)))
    np.testing.assert_array_equal(plain[(i,)], np.asarray(greedy(model, prompt[None], n, lengths=lengths)))
  assert any(not np.array_equal(hooked[k], plain[k]) for k in plain)


def test_bad_lengths_are_one_line_errors():
  model = make("rope")
  with pytest.raises(ValueError, match=r"lengths: must be 2 prompt lengths in 1\.\.6"):
    greedy(model, tokens(2, 6), 3, lengths=[6, 7])
  with pytest.raises(ValueError, match="bucket: must be >= 0"):
    next(generate.batches([[1, 2]], [3], 1, bucket=-1))


def test_logits_at_one_position_per_row_are_the_full_logits_there():
  model = make("rope")
  toks = tokens(3, 8)
  at = jnp.asarray([7, 2, 5])
  full = np.asarray(model(toks))
  # the same head matmul on fewer rows: float32 rounding of a 32-term sum, 4 * sqrt(32) eps relative
  np.testing.assert_allclose(np.asarray(model(toks, logits_at_B=at))[:, 0], full[np.arange(3), at],
                             rtol=0, atol=4 * np.sqrt(32) * EPS32 * np.abs(full).max())


def _prompt_sums(cache, valid_BxT):
  """Per row, the sum over its prompt tokens of every captured tensor: a Measure's fn."""
  return {name: (x * valid_BxT[:, :, None, None]).sum(1) for name, x in cache.items()}


def test_measure_reads_the_prefill_without_changing_the_decoding():
  """greedy(measure=) returns what its fn computes from the captured prefill of right-padded rows:
  each row's sums over its own tokens equal those of a capture pass over that prompt alone (float32
  rounding: other shapes, and attention with a KV cache; bound as above); the tokens are those of
  greedy without it."""
  from minilm import capture
  model = make("rope")
  prompts = [np.asarray(tokens(1, n, seed=n))[0] for n in (5, 9)]
  (_, padded, lengths, n), = generate.batches(prompts, [4, 4], 2, bucket=16)
  measure = generate.Measure(("k", "rot_q"), _prompt_sums)
  out, sums = greedy(model, padded, n, lengths=lengths, measure=measure)
  np.testing.assert_array_equal(out, greedy(model, padded, n, lengths=lengths))
  assert sorted(sums) == [f"blocks.{l}.attn.{p}" for l in range(model.cfg.n_layers) for p in ("k", "rot_q")]
  for row, prompt in enumerate(prompts):
    _, alone = capture.run(model, jnp.asarray(prompt[None]), ("k", "rot_q"))
    for name, got in sums.items():
      want = np.asarray(alone[name]).sum(1)[0]
      bound = 4 * np.sqrt(740) * EPS32 * len(prompt) * np.abs(np.asarray(alone[name])).max()
      np.testing.assert_allclose(np.asarray(got)[row], want, rtol=0, atol=bound, err_msg=name)


@pytest.mark.parametrize("position", ["rope", "learned"])
def test_kernels_out_in_computes_the_same_logits(position):
  """Decoding's copy with [out, in] kernels: the same logits within float32 rounding (the bound of
  test_model's cache test: ~740 summed terms per logit), the original model untouched."""
  from minilm.layers import kernels_out_in
  from flax import nnx
  model = make(position)
  toks = tokens(2, 9)
  kernel_shapes = lambda m: {path: v[...].shape for path, v in nnx.to_flat_state(nnx.state(m, nnx.Param))
                             if path[-1] == "kernel"}
  kernels = kernel_shapes(model)
  plain = np.asarray(model(toks))
  with kernels_out_in(model) as decoder:
    transposed = np.asarray(decoder(toks))
    shapes = kernel_shapes(decoder)
  assert shapes == {path: shape[::-1] for path, shape in kernels.items()}
  assert kernel_shapes(model) == kernels
  np.testing.assert_allclose(transposed, plain, rtol=0, atol=4 * np.sqrt(740) * EPS32 * np.abs(plain).max())
  assert not np.array_equal(np.asarray(model(toks)), np.zeros_like(plain))


def test_decoding_reads_out_in_kernels_only_on_avx2_only_cpus(monkeypatch):
  """The layout rule, and the copy it picks: transposed kernels only where AVX2 comes without AVX-512."""
  from minilm import layers
  avx2 = frozenset({"sse4_2", "fma", "avx2"})
  assert layers.out_in_pays("cpu", avx2)
  assert not layers.out_in_pays("cpu", avx2 | {"avx512f"})
  assert not layers.out_in_pays("cpu", avx2 | {"avx512f", "amx_bf16"})
  assert not layers.out_in_pays("gpu", avx2)
  assert not layers.out_in_pays("cpu", frozenset())
  model = make("rope")
  monkeypatch.setattr(layers, "cpu_flags", lambda: avx2 | {"avx512f"})
  with layers.decoding_kernels(model) as decoder:
    assert decoder is model
  monkeypatch.setattr(layers, "cpu_flags", lambda: avx2)
  with layers.decoding_kernels(model) as decoder:
    d_in, d_out = model.blocks[0].mlp.up.kernel[...].shape
    assert d_in != d_out and decoder.blocks[0].mlp.up.kernel[...].shape == (d_out, d_in)


def test_greedy_cache_holds_each_rows_positions():
  """The returned KV cache's key positions (exact integers): row b's prompt at 0..len-1, its padding
  NEVER, the i-th decoded token's key at slot T + i with position len + i (its own row's next
  position, not T's, not one off); the last token, never fed back, needs no slot (any spare stays NEVER)."""
  model = make("rope")
  lengths = np.array([6, 3])
  _, cache = greedy(model, tokens(2, 6), 4, lengths=lengths, return_cache=True)
  pos = np.asarray(cache["pos"])
  assert pos.shape[1] >= 6 + 3 and int(cache["index"]) == 6 + 3
  want = np.full(pos.shape, NEVER)
  for b, n in enumerate(lengths):
    want[b, :n] = np.arange(n)
    want[b, 6:9] = n + np.arange(3)
  np.testing.assert_array_equal(pos, want)


def test_a_dict_hook_over_padded_rows_gets_valid():
  """Over right-padded rows a dict of hook_args carries 'valid' (valid_tokens of the lengths): a hook
  that scales v on the prompt tokens only continues each row as _scale_v does that prompt alone."""
  model = make("rope")
  prompts = [np.asarray(tokens(1, n, seed=n))[0] for n in (5, 7)]
  (_, padded, lengths, n), = generate.batches(prompts, [3, 3], 2, bucket=8)

  def scale_valid_v(args, name, x):
    np.testing.assert_equal(x.shape[:2], args["valid"].shape)
    return jnp.where(args["valid"][:, :, None, None] > 0, _scale_v(args["scale"], name, x), x)

  out = np.asarray(greedy(model, padded, n, lengths=lengths, hook=scale_valid_v,
                          hook_args={"scale": jnp.float32(100.0)}))
  for row, prompt in zip(out, prompts):
    np.testing.assert_array_equal(row, np.asarray(greedy(model, prompt[None], 3, hook=_scale_v,
                                                         hook_args=jnp.float32(100.0)))[0])


def test_the_hook_runs_at_prefill_only():
  """Decoding steps are never intervened on: a hook that scales v only in one-token calls leaves a
  6-token prompt's continuation as it is, yet changes a 1-token prompt's (whose prefill is one token)."""
  model = make("rope")
  def one_token_v(scale, name, x):
    return _scale_v(scale, name, x) if x.shape[1] == 1 else x
  hook = dict(hook=one_token_v, hook_args=jnp.float32(100.0))
  prompt = tokens(2, 6)
  np.testing.assert_array_equal(np.asarray(greedy(model, prompt, 5, **hook)), np.asarray(greedy(model, prompt, 5)))
  assert not np.array_equal(np.asarray(greedy(model, prompt[:, :1], 5, **hook)), np.asarray(greedy(model, prompt[:, :1], 5)))
