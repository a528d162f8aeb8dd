"""HF-format import: a tiny random Llama checkpoint written as config.json + safetensors + tokenizer.json
round-trips through minilm.importers.load and matches an independent float64 numpy forward pass.

`numpy_llama_forward` is also the reference of test_import_smollm2.py, and the numpy pieces and the
checkpoint writer here serve test_import_families.py (they share no code with minilm).
"""
import json

import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from minilm.importers import load

EPS32 = float(np.finfo(np.float32).eps)


# ------------------------------------------------------------------ independent float64 reference

def _rms_norm(x, scale, eps):
  return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * scale


def numpy_rope(x_TxHxD, base, layout="half", theta=None):
  """Rotate pair j by t * theta_j, theta_j = base^(-2j/D) unless given; pairs are (2j, 2j+1)
  interleaved or (j, j+D/2) half."""
  T, _, D = x_TxHxD.shape
  theta = base ** (-2.0 * np.arange(D // 2) / D) if theta is None else np.asarray(theta, np.float64)
  angle = np.arange(T)[:, None, None] * theta
  cos, sin = np.cos(angle), np.sin(angle)
  if layout == "interleaved":
    a, b = x_TxHxD[..., 0::2], x_TxHxD[..., 1::2]
    out = np.empty_like(x_TxHxD)
    out[..., 0::2], out[..., 1::2] = a * cos - b * sin, b * cos + a * sin
    return out
  a, b = x_TxHxD[..., : D // 2], x_TxHxD[..., D // 2:]
  return np.concatenate([a * cos - b * sin, b * cos + a * sin], axis=-1)


def numpy_attention(q_TxHxD, k_TxHxD, v_TxHxD):
  """Causal softmax(q k^T / sqrt(D)) v, heads concatenated: [T, H*D]."""
  T, _, D = q_TxHxD.shape
  scores = np.einsum("thd,shd->hts", q_TxHxD, k_TxHxD) / np.sqrt(D)
  scores = np.where(np.tril(np.ones((T, T), bool)), scores, -np.inf)
  probs = np.exp(scores - scores.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  return np.einsum("hts,shd->thd", probs, v_TxHxD).reshape(T, -1)


def numpy_llama_forward(w, tokens, *, n_heads, n_kv_heads, base, eps, layout, theta=None):
  """Logits [T, V] in float64 of a Llama decoder. w: 'embed' [V, C], 'final_norm' [C], 'lm_head'
  [V, C] or None (tied), 'layers': dicts of [out, in] matrices q k v o gate up down and norms
  attn_norm mlp_norm, with Q/K rows in `layout` order. theta: RoPE frequencies if not base's."""
  w = {k: v if k == "layers" else (None if v is None else np.asarray(v, np.float64)) for k, v in w.items()}
  x = w["embed"][np.asarray(tokens)]
  T = x.shape[0]
  for layer in w["layers"]:
    p = {k: np.asarray(v, np.float64) for k, v in layer.items()}
    h = _rms_norm(x, p["attn_norm"], eps)
    D = p["q"].shape[0] // n_heads
    q = numpy_rope((h @ p["q"].T + p.get("q_bias", 0.0)).reshape(T, n_heads, D), base, layout, theta)
    k = numpy_rope((h @ p["k"].T + p.get("k_bias", 0.0)).reshape(T, n_kv_heads, D), base, layout, theta)
    v = (h @ p["v"].T + p.get("v_bias", 0.0)).reshape(T, n_kv_heads, D)
    group = n_heads // n_kv_heads
    x = x + numpy_attention(q, np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)) @ p["o"].T
    h = _rms_norm(x, p["mlp_norm"], eps)
    gate = h @ p["gate"].T
    x = x + (gate / (1 + np.exp(-gate)) * (h @ p["up"].T)) @ p["down"].T
  x = _rms_norm(x, w["final_norm"], eps)
  return x @ (w["embed"] if w["lm_head"] is None else w["lm_head"]).T


def forward_tolerance(n_layers, d_model, head_dim, ff_dim, T):
  """Bound on max |float32 logits - exact| / max |logit|. A logit ends a chain of sums of terms of
  random sign: per layer two norms and three projections of depth d_model, scores of depth head_dim,
  softmax and probs.v over T keys, the MLP's down projection of depth ff_dim; then the final norm and
  the head. Rounding grows like sqrt(n) * eps over the n terms; 4x that."""
  n = n_layers * (5 * d_model + head_dim + 2 * T + ff_dim) + 2 * d_model
  return 4 * np.sqrt(n) * EPS32


# ------------------------------------------------------------------------- a tiny HF checkpoint

TEXT = "The quick brown fox jumps over the lazy dog. 12 fish swim in 3 ponds; the dog sleeps."
CFG = dict(model_type="llama", hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=2, intermediate_size=64, rope_theta=500.0, rms_norm_eps=1e-6,
           max_position_embeddings=128, tie_word_embeddings=False, hidden_act="silu",
           bos_token_id=0, eos_token_id=1)


def _tokenizer():
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator([TEXT] * 4, trainer)
  return tok


def _weights(rng, vocab, cfg):
  C, H, K, F = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["intermediate_size"]
  D = C // H

  def mat(o, i):
    return (rng.standard_normal((o, i)) / np.sqrt(i)).astype(np.float32)

  def norm():
    return (1 + 0.3 * rng.standard_normal(C)).astype(np.float32)

  layers = [dict(q=mat(H * D, C), k=mat(K * D, C), v=mat(K * D, C), o=mat(C, H * D), gate=mat(F, C),
                 up=mat(F, C), down=mat(C, F), attn_norm=norm(), mlp_norm=norm())
            for _ in range(cfg["num_hidden_layers"])]
  if cfg.get("model_type") == "qwen2":
    for layer in layers:
      layer.update(q_bias=rng.standard_normal(H * D).astype(np.float32),
                   k_bias=rng.standard_normal(K * D).astype(np.float32),
                   v_bias=rng.standard_normal(K * D).astype(np.float32))
  return dict(embed=rng.standard_normal((vocab, C)).astype(np.float32), final_norm=norm(),
              lm_head=None if cfg["tie_word_embeddings"] else mat(vocab, C), layers=layers)


HF_NAMES = dict(q="self_attn.q_proj", k="self_attn.k_proj", v="self_attn.v_proj", o="self_attn.o_proj",
                gate="mlp.gate_proj", up="mlp.up_proj", down="mlp.down_proj",
                attn_norm="input_layernorm", mlp_norm="post_attention_layernorm")


def write_checkpoint(directory, cfg=CFG, seed=0, edit=lambda tensors: tensors):
  """Write a random checkpoint; return its weights (for the reference) and its tokenizer."""
  tok = _tokenizer()
  tok.save(str(directory / "tokenizer.json"))
  w = _weights(np.random.default_rng(seed), tok.get_vocab_size(), cfg)
  tensors = {"model.embed_tokens.weight": w["embed"], "model.norm.weight": w["final_norm"]}
  if w["lm_head"] is not None:
    tensors["lm_head.weight"] = w["lm_head"]
  for i, layer in enumerate(w["layers"]):
    tensors.update({f"model.layers.{i}.{HF_NAMES[k.removesuffix('_bias')]}.{'bias' if k.endswith('_bias') else 'weight'}": v
                    for k, v in layer.items()})
  save_checkpoint(directory, edit(tensors), {**cfg, "vocab_size": tok.get_vocab_size()})
  return w, tok


def save_checkpoint(directory, tensors, cfg):
  """config.json and the tensors in two safetensors shards, as large checkpoints come."""
  names = sorted(tensors)
  safetensors.numpy.save_file({n: tensors[n] for n in names[::2]}, str(directory / "model-00001-of-00002.safetensors"))
  safetensors.numpy.save_file({n: tensors[n] for n in names[1::2]}, str(directory / "model-00002-of-00002.safetensors"))
  (directory / "config.json").write_text(json.dumps(cfg))


def _tolerance(ids, cfg=CFG):
  return forward_tolerance(cfg["num_hidden_layers"], cfg["hidden_size"],
                           cfg["hidden_size"] // cfg["num_attention_heads"], cfg["intermediate_size"], len(ids))


def _reference(w, ids, cfg=CFG):
  return numpy_llama_forward(w, ids, n_heads=cfg["num_attention_heads"], n_kv_heads=cfg["num_key_value_heads"],
                             base=cfg["rope_theta"], eps=cfg["rms_norm_eps"], layout="half")


@pytest.mark.parametrize("layout", ["half", "interleaved"])
def test_hf_round_trip_matches_numpy_reference(tmp_path, layout):
  w, _ = write_checkpoint(tmp_path)
  model, tok, info = load(str(tmp_path), layout=layout)
  assert (info["format"], info["architecture"], info["layout"]) == ("hf", "llama", layout)
  ids = tok.encode(TEXT)
  assert tok.decode(ids) == TEXT and (tok.bos_id, tok.eos_id) == (0, 1)
  logits = np.asarray(model(jnp.asarray([ids]))[0])
  ref = _reference(w, ids)
  assert len(ids) > 20 and np.abs(logits - ref).max() < _tolerance(ids) * np.abs(ref).max()


@pytest.mark.parametrize("layout", ["half", "interleaved"])
def test_qwen2_with_qkv_biases_matches_numpy_reference(tmp_path, layout):
  cfg = {**CFG, "model_type": "qwen2", "rope_theta": 1e6, "sliding_window": 4, "use_sliding_window": False}
  w, _ = write_checkpoint(tmp_path, cfg)
  model, tok, info = load(str(tmp_path), layout=layout)
  assert info["architecture"] == "qwen2" and model.cfg.qkv_bias and model.cfg.max_len == 128
  ids = tok.encode(TEXT)
  ref = _reference(w, ids, cfg)
  assert np.abs(np.asarray(model(jnp.asarray([ids]))[0]) - ref).max() < _tolerance(ids) * np.abs(ref).max()


def test_hf_tied_embeddings_and_bfloat16(tmp_path):
  import ml_dtypes
  cfg = {**CFG, "tie_word_embeddings": True}
  w, _ = write_checkpoint(tmp_path, cfg, edit=lambda t: {k: v.astype(ml_dtypes.bfloat16) for k, v in t.items()})
  model, tok, _ = load(str(tmp_path))
  assert model.cfg.tie_embeddings and not hasattr(model, "lm_head")
  bf16 = {k: v if k == "layers" else (None if v is None else v.astype(ml_dtypes.bfloat16).astype(np.float32))
          for k, v in w.items()}
  bf16["layers"] = [{k: v.astype(ml_dtypes.bfloat16).astype(np.float32) for k, v in layer.items()} for layer in w["layers"]]
  ids = tok.encode(TEXT)
  ref = _reference(bf16, ids, cfg)   # bf16 weights, float32 compute: the float32 tolerance
  assert np.abs(np.asarray(model(jnp.asarray([ids]))[0]) - ref).max() < _tolerance(ids) * np.abs(ref).max()


def one_line_error(directory, match):
  with pytest.raises(ValueError, match=match) as err:
    load(str(directory))
  assert "\n" not in str(err.value)


def test_hf_missing_tensor(tmp_path):
  write_checkpoint(tmp_path, edit=lambda t: {k: v for k, v in t.items() if k != "model.layers.1.mlp.up_proj.weight"})
  one_line_error(tmp_path, r"missing tensor 'model\.layers\.1\.mlp\.up_proj\.weight'")


def test_hf_shape_mismatch(tmp_path):
  write_checkpoint(tmp_path, edit=lambda t: {**t, "model.layers.0.self_attn.k_proj.weight": np.zeros((32, 32), np.float32)})
  one_line_error(tmp_path, r"tensor 'model\.layers\.0\.self_attn\.k_proj\.weight' has shape \[32, 32\]")


def test_hf_unexpected_bias_and_model_type(tmp_path):
  write_checkpoint(tmp_path, edit=lambda t: {**t, "model.layers.0.self_attn.q_proj.bias": np.zeros(32, np.float32)})
  one_line_error(tmp_path, r"unexpected tensor 'model\.layers\.0\.self_attn\.q_proj\.bias'")
  (tmp_path / "config.json").write_text(json.dumps({**CFG, "model_type": "bloom", "vocab_size": 300}))
  one_line_error(tmp_path, r"model_type must be one of 'llama', 'mistral', 'qwen2', 'gpt2', 'opt', 'gpt_neox'; "
                            r"got 'bloom'")


def test_bad_source(tmp_path):
  one_line_error(tmp_path / "nothing-here", r"source: expected 'smollm2'")
  one_line_error(tmp_path, r"has no config.json")
