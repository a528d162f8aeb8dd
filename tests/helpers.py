"""Plain helpers shared by test modules (test modules never import each other):

- `damage`: corrupt one checkpoint step on disk (test_checkpoints, test_bad_input);
- independent float64 numpy references of a Llama decoder, with their float32 tolerance, and tiny
  random HF checkpoints (Llama/Qwen2 here; GPT-2, OPT and GPT-NeoX tensor shapes) with a BPE
  tokenizer (test_import_hf, test_import_families, test_import_smollm2, test_trace). They share no
  code with minilm.
"""
import json
import os

import numpy as np
import pytest
import safetensors.numpy
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from minilm.importers import load
from train import checkpoints


# ------------------------------------------------------------------------- checkpoints

def damage(arm_dir, step, how):
  """Flip six bytes in (or cut in half) the largest array file of `step`'s params."""
  root = os.path.join(arm_dir, checkpoints.CHECKPOINTS, str(step), "params")
  files = [os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs if os.sep + "d" + os.sep in os.path.join(d, f)]
  path = max(files, key=os.path.getsize)
  if how == "truncate":
    os.truncate(path, os.path.getsize(path) // 2)
    return
  data = bytearray(open(path, "rb").read())
  for i in range(6):
    data[len(data) // 2 + 97 * i] ^= 0xFF
  open(path, "wb").write(bytes(data))


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


def bpe_tokenizer():
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator([TEXT] * 4, trainer)
  return tok


def llama_weights(rng, vocab, cfg):
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
  tok = bpe_tokenizer()
  tok.save(str(directory / "tokenizer.json"))
  w = llama_weights(np.random.default_rng(seed), tok.get_vocab_size(), cfg)
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


def llama_tolerance(ids, cfg=CFG):
  return forward_tolerance(cfg["num_hidden_layers"], cfg["hidden_size"],
                           cfg["hidden_size"] // cfg["num_attention_heads"], cfg["intermediate_size"], len(ids))


def llama_reference(w, ids, cfg=CFG):
  return numpy_llama_forward(w, ids, n_heads=cfg["num_attention_heads"], n_kv_heads=cfg["num_key_value_heads"],
                             base=cfg["rope_theta"], eps=cfg["rms_norm_eps"], layout="half")


def one_line_error(directory, match):
  with pytest.raises(ValueError, match=match) as err:
    load(str(directory))
  assert "\n" not in str(err.value)


# ---------------------------------------------------------------------- tiny random checkpoints

def random_tensors(shapes, seed=0):
  """Norm scales near 1, biases and matrices of unit-scale outputs, so every tensor matters."""
  rng = np.random.default_rng(seed)

  def one(name, shape):
    if len(shape) == 2:
      return rng.standard_normal(shape) / np.sqrt(min(shape))
    if name.endswith("weight"):
      return 1 + 0.3 * rng.standard_normal(shape)
    return 0.3 * rng.standard_normal(shape)

  return {name: one(name, shape).astype(np.float32) for name, shape in shapes.items()}


def _layer_norms(prefix, C):
  return {f"{prefix}.{p}": (C,) for p in ("weight", "bias")}


def _linear(prefix, n_out, n_in):
  return {f"{prefix}.weight": (n_out, n_in), f"{prefix}.bias": (n_out,)}


def gpt2_shapes(cfg, V):
  C, F = cfg["n_embd"], cfg.get("n_inner") or 4 * cfg["n_embd"]
  shapes = {"transformer.wte.weight": (V, C), "transformer.wpe.weight": (cfg["n_positions"], C),
            **_layer_norms("transformer.ln_f", C)}
  for i in range(cfg["n_layer"]):
    h = f"transformer.h.{i}"
    shapes.update({**_layer_norms(f"{h}.ln_1", C), **_layer_norms(f"{h}.ln_2", C),
                   f"{h}.attn.c_attn.weight": (C, 3 * C), f"{h}.attn.c_attn.bias": (3 * C,),  # Conv1D: [in, out]
                   f"{h}.attn.c_proj.weight": (C, C), f"{h}.attn.c_proj.bias": (C,),
                   f"{h}.mlp.c_fc.weight": (C, F), f"{h}.mlp.c_fc.bias": (F,),
                   f"{h}.mlp.c_proj.weight": (F, C), f"{h}.mlp.c_proj.bias": (C,)})
  return shapes


def opt_shapes(cfg, V):
  C, F, E = cfg["hidden_size"], cfg["ffn_dim"], cfg.get("word_embed_proj_dim") or cfg["hidden_size"]
  d = "model.decoder"
  shapes = {f"{d}.embed_tokens.weight": (V, E), f"{d}.embed_positions.weight": (cfg["max_position_embeddings"] + 2, C)}
  if cfg["do_layer_norm_before"]:
    shapes.update(_layer_norms(f"{d}.final_layer_norm", C))
  if E != C:
    shapes.update({f"{d}.project_in.weight": (C, E), f"{d}.project_out.weight": (E, C)})
  if not cfg["tie_word_embeddings"]:
    shapes["lm_head.weight"] = (V, E)
  for i in range(cfg["num_hidden_layers"]):
    layer = f"{d}.layers.{i}"
    shapes.update({**_layer_norms(f"{layer}.self_attn_layer_norm", C), **_layer_norms(f"{layer}.final_layer_norm", C),
                   **_linear(f"{layer}.fc1", F, C), **_linear(f"{layer}.fc2", C, F)})
    for p in ("q_proj", "k_proj", "v_proj", "out_proj"):
      shapes.update(_linear(f"{layer}.self_attn.{p}", C, C))
  return shapes


def neox_shapes(cfg, V):
  C, F = cfg["hidden_size"], cfg["intermediate_size"]
  shapes = {"gpt_neox.embed_in.weight": (V, C), "embed_out.weight": (V, C),
            **_layer_norms("gpt_neox.final_layer_norm", C)}
  for i in range(cfg["num_hidden_layers"]):
    layer = f"gpt_neox.layers.{i}"
    shapes.update({**_layer_norms(f"{layer}.input_layernorm", C), **_layer_norms(f"{layer}.post_attention_layernorm", C),
                   **_linear(f"{layer}.attention.query_key_value", 3 * C, C), **_linear(f"{layer}.attention.dense", C, C),
                   **_linear(f"{layer}.mlp.dense_h_to_4h", F, C), **_linear(f"{layer}.mlp.dense_4h_to_h", C, F)})
  return shapes


GPT2_CFG = dict(model_type="gpt2", n_embd=32, n_layer=2, n_head=4, n_positions=64, layer_norm_epsilon=1e-5,
                activation_function="gelu_new", bos_token_id=0, eos_token_id=1)
OPT_CFG = dict(model_type="opt", hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=64,
               max_position_embeddings=64, do_layer_norm_before=True, word_embed_proj_dim=32,
               activation_function="relu", enable_bias=True, tie_word_embeddings=True, bos_token_id=0, eos_token_id=1)
# head_dim 16 and rotary_pct 0.25: RoPE turns 4 dims (2 pairs) of each head and leaves 12.
NEOX_CFG = dict(model_type="gpt_neox", hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                intermediate_size=64, rotary_pct=0.25, rotary_emb_base=100, max_position_embeddings=64,
                layer_norm_eps=1e-5, use_parallel_residual=True, hidden_act="gelu", tie_word_embeddings=False,
                bos_token_id=0, eos_token_id=1)
