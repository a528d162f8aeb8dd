"""HF-format import (minilm.importers.hf): tiny random checkpoints written as config.json + safetensors +
tokenizer.json load through minilm.importers.load and match independent float64 numpy forward
passes. Llama and Qwen2 (helpers.write_checkpoint) against helpers.numpy_llama_forward; GPT-2, OPT
and GPT-NeoX, and Llama's rope_scaling, against references written here from the HF
architectures. The references read the tensors by their HF names in their stored layouts (Conv1D
[in, out], fused q/k/v, OPT's offset position table), so they share no code with minilm.

Tolerance: minilm runs in float32. Over two blocks of width 32 (MLP <= 128, heads <= 16 wide, ~33
tokens), helpers.forward_tolerance allows 1.4e-5 of the largest logit (5e-7 measured), while
a wrong layout, offset, activation (tanh vs erf GELU: 2e-4 here) or residual order moves the logits
by far more.
"""
from __future__ import annotations

import json
import math
import os
import re

import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import erf

from minilm.importers import load, model_config
from helpers import (CFG, GPT2_CFG, NEOX_CFG, OPT_CFG, TEXT, bpe_tokenizer, forward_tolerance, gpt2_shapes,
                     llama_reference, llama_tolerance, neox_shapes, numpy_attention, numpy_llama_forward, numpy_rope,
                     one_line_error, opt_shapes, random_tensors, save_checkpoint, write_checkpoint)

pytestmark = pytest.mark.slow   # import tests: each writes a checkpoint and imports it


# ------------------------------------------------------------------ Llama and Qwen2 (helpers' reference)

@pytest.mark.parametrize("layout", ["half", "interleaved"])
def test_hf_round_trip_matches_numpy_reference(tmp_path, layout):
  w, _ = write_checkpoint(tmp_path)
  model, tok, info = load(str(tmp_path), layout=layout)
  assert (info["format"], info["architecture"], info["layout"]) == ("hf", "llama", layout)
  ids = tok.encode(TEXT)
  assert tok.decode(ids) == TEXT and (tok.bos_id, tok.eos_id) == (0, 1)
  logits = np.asarray(model(jnp.asarray([ids]))[0])
  ref = llama_reference(w, ids)
  assert len(ids) > 20 and np.abs(logits - ref).max() < llama_tolerance(ids) * np.abs(ref).max()
  assert model_config(str(tmp_path), layout=layout) == model.cfg   # from config.json alone
  path = tmp_path / "config.json"   # kept per file version: an edited config.json is read again
  edited = {**json.loads(path.read_text()), "max_position_embeddings": model.cfg.max_len + 1}
  path.write_text(json.dumps(edited))
  os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 1))   # a new version even within a tick
  assert model_config(str(tmp_path), layout=layout).max_len == model.cfg.max_len + 1


@pytest.mark.parametrize("layout", ["half", "interleaved"])
def test_qwen2_with_qkv_biases_matches_numpy_reference(tmp_path, layout):
  cfg = {**CFG, "model_type": "qwen2", "rope_theta": 1e6, "sliding_window": 4, "use_sliding_window": False}
  w, _ = write_checkpoint(tmp_path, cfg)
  model, tok, info = load(str(tmp_path), layout=layout)
  assert info["architecture"] == "qwen2" and model.cfg.qkv_bias and model.cfg.max_len == 128
  ids = tok.encode(TEXT)
  ref = llama_reference(w, ids, cfg)
  assert np.abs(np.asarray(model(jnp.asarray([ids]))[0]) - ref).max() < llama_tolerance(ids) * np.abs(ref).max()


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
  ref = llama_reference(bf16, ids, cfg)   # bf16 weights, float32 compute: the float32 tolerance
  assert np.abs(np.asarray(model(jnp.asarray([ids]))[0]) - ref).max() < llama_tolerance(ids) * np.abs(ref).max()


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


def test_a_damaged_config_or_tokenizer_json_is_one_line_naming_it(tmp_path):
  write_checkpoint(tmp_path)
  config = (tmp_path / "config.json").read_text()
  (tmp_path / "config.json").write_text(config[:30])   # cut short, as by an interrupted download
  one_line_error(tmp_path, "^" + re.escape(f"{tmp_path / 'config.json'}: damaged, not valid JSON ("))
  (tmp_path / "config.json").write_text("[" * 100_000)   # nested deeper than Python's parser goes
  one_line_error(tmp_path, "^" + re.escape(f"{tmp_path / 'config.json'}: damaged, not valid JSON ("))
  (tmp_path / "config.json").write_text("[]")
  one_line_error(tmp_path, "^" + re.escape(f"{tmp_path / 'config.json'}: damaged, not an HF config"))
  (tmp_path / "config.json").write_text(config)
  (tmp_path / "tokenizer.json").write_text('{"version":')
  one_line_error(tmp_path, "^" + re.escape(f"{tmp_path / 'tokenizer.json'}: damaged, not a `tokenizers` JSON file ("))


TOLERANCE = forward_tolerance(n_layers=2, d_model=32, head_dim=16, ff_dim=128, T=40)   # the widest family


# ------------------------------------------------------------------ independent float64 references

def layer_norm(x, w, b, eps):
  mean = x.mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(((x - mean) ** 2).mean(-1, keepdims=True) + eps) * w + b


ACT = {"gelu_new": lambda x: 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3))),
       "gelu": lambda x: 0.5 * x * (1 + erf(x / math.sqrt(2))),
       "relu": lambda x: np.maximum(x, 0.0)}


def numpy_gpt2_forward(t, ids, cfg):
  """GPT-2: Conv1D weights [in, out] (y = x W + b), one c_attn giving q|k|v, tied head."""
  def w(name):
    return np.asarray(t[f"transformer.{name}"], np.float64)

  H, eps, T = cfg["n_head"], cfg["layer_norm_epsilon"], len(ids)
  x = w("wte.weight")[ids] + w("wpe.weight")[:T]
  for i in range(cfg["n_layer"]):
    def ln(n, x):
      return layer_norm(x, w(f"h.{i}.{n}.weight"), w(f"h.{i}.{n}.bias"), eps)

    def conv(n, x):
      return x @ w(f"h.{i}.{n}.weight") + w(f"h.{i}.{n}.bias")

    q, k, v = (a.reshape(T, H, -1) for a in np.split(conv("attn.c_attn", ln("ln_1", x)), 3, axis=-1))
    x = x + conv("attn.c_proj", numpy_attention(q, k, v))
    x = x + conv("mlp.c_proj", ACT[cfg["activation_function"]](conv("mlp.c_fc", ln("ln_2", x))))
  x = layer_norm(x, w("ln_f.weight"), w("ln_f.bias"), eps)
  return x @ w("wte.weight").T


def numpy_opt_forward(t, ids, cfg):
  """OPT: positions read rows t + 2, LayerNorm before (or after) each sublayer, ReLU, optional
  project_in/project_out around the decoder."""
  def w(name):
    return np.asarray(t[f"model.decoder.{name}"], np.float64)

  H, T, pre = cfg["num_attention_heads"], len(ids), cfg["do_layer_norm_before"]
  x = w("embed_tokens.weight")[ids]
  if "model.decoder.project_in.weight" in t:
    x = x @ w("project_in.weight").T
  x = x + w("embed_positions.weight")[np.arange(T) + 2]
  for i in range(cfg["num_hidden_layers"]):
    def lin(n, x):
      return x @ w(f"layers.{i}.{n}.weight").T + w(f"layers.{i}.{n}.bias")

    def ln(n, x):
      return layer_norm(x, w(f"layers.{i}.{n}.weight"), w(f"layers.{i}.{n}.bias"), 1e-5)

    h = ln("self_attn_layer_norm", x) if pre else x
    q, k, v = (lin(f"self_attn.{p}_proj", h).reshape(T, H, -1) for p in "qkv")
    x = x + lin("self_attn.out_proj", numpy_attention(q, k, v))
    x = x if pre else ln("self_attn_layer_norm", x)
    h = ln("final_layer_norm", x) if pre else x
    x = x + lin("fc2", ACT[cfg["activation_function"]](lin("fc1", h)))
    x = x if pre else ln("final_layer_norm", x)
  if pre:
    x = layer_norm(x, w("final_layer_norm.weight"), w("final_layer_norm.bias"), 1e-5)
  if "model.decoder.project_out.weight" in t:
    x = x @ w("project_out.weight").T
  head = t["lm_head.weight"] if not cfg["tie_word_embeddings"] else t["model.decoder.embed_tokens.weight"]
  return x @ np.asarray(head, np.float64).T


def numpy_neox_forward(t, ids, cfg):
  """GPT-NeoX: query_key_value rows per head as [q, k, v], RoPE on the first rotary_pct of each
  head (half layout), attention and MLP in parallel or in turn, untied embed_out."""
  def w(name):
    return np.asarray(t[f"gpt_neox.{name}"], np.float64)

  H, T, eps = cfg["num_attention_heads"], len(ids), cfg["layer_norm_eps"]
  D = cfg["hidden_size"] // H
  rot = int(D * cfg["rotary_pct"])
  x = w("embed_in.weight")[ids]
  for i in range(cfg["num_hidden_layers"]):
    def lin(n, x):
      return x @ w(f"layers.{i}.{n}.weight").T + w(f"layers.{i}.{n}.bias")

    def ln(n, x):
      return layer_norm(x, w(f"layers.{i}.{n}.weight"), w(f"layers.{i}.{n}.bias"), eps)

    def rope(x_TxHxD):
      return np.concatenate([numpy_rope(x_TxHxD[..., :rot], cfg["rotary_emb_base"]), x_TxHxD[..., rot:]], -1)

    def mlp(x):
      return lin("mlp.dense_4h_to_h", ACT[cfg["hidden_act"]](lin("mlp.dense_h_to_4h", x)))

    qkv = lin("attention.query_key_value", ln("input_layernorm", x)).reshape(T, H, 3 * D)
    q, k, v = qkv[..., :D], qkv[..., D:2 * D], qkv[..., 2 * D:]
    attn = lin("attention.dense", numpy_attention(rope(q), rope(k), v))
    if cfg["use_parallel_residual"]:
      x = x + attn + mlp(ln("post_attention_layernorm", x))
    else:
      x = x + attn
      x = x + mlp(ln("post_attention_layernorm", x))
  x = layer_norm(x, w("final_layer_norm.weight"), w("final_layer_norm.bias"), eps)
  return x @ np.asarray(t["embed_out.weight"], np.float64).T


SHAPES = {"gpt2": gpt2_shapes, "opt": opt_shapes, "gpt_neox": neox_shapes}
REFERENCES = {"gpt2": numpy_gpt2_forward, "opt": numpy_opt_forward, "gpt_neox": numpy_neox_forward}


def write_family(directory, cfg, *, tokenizer=True, rename=lambda name: name, extra=()):
  """A random checkpoint of cfg's family; returns its tensors by their HF names and the token ids."""
  tok = bpe_tokenizer()
  V = tok.get_vocab_size()
  tensors = random_tensors(SHAPES[cfg["model_type"]](cfg, V))
  save_checkpoint(directory, {rename(n): a for n, a in tensors.items()} | dict(extra), {**cfg, "vocab_size": V})
  if tokenizer:
    tok.save(str(directory / "tokenizer.json"))
  return tensors, tok.encode(TEXT).ids


def check_logits(directory, cfg, layout="half", **kw):
  tensors, ids = write_family(directory, cfg, **kw)
  model, tok, info = load(str(directory), layout=layout)
  assert info["architecture"] == cfg["model_type"]
  logits = np.asarray(model(jnp.asarray([ids]))[0])
  ref = REFERENCES[cfg["model_type"]](tensors, np.asarray(ids), cfg)
  assert len(ids) > 20 and np.abs(logits - ref).max() < TOLERANCE * np.abs(ref).max()
  return model, tok


# --------------------------------------------------------------------------------------- tests

@pytest.mark.parametrize("act", ["gelu_new", "gelu", "relu"])
def test_gpt2_matches_numpy_reference(tmp_path, act):
  model, tok = check_logits(tmp_path, {**GPT2_CFG, "activation_function": act})
  c = model.cfg
  assert (c.position.kind, c.norm, c.bias, c.tie_embeddings, c.max_len) == ("learned", "layer", True, True, 64)
  assert tok.decode(tok.encode(TEXT)) == TEXT


def test_gpt2_bare_model_names_and_mask_buffers(tmp_path):
  """The Hub's GPT-2 checkpoints hold the bare model ('h.0...') and causal-mask buffers."""
  mask = np.tril(np.ones((1, 1, 64, 64), np.float32))
  check_logits(tmp_path, GPT2_CFG, rename=lambda n: n.removeprefix("transformer."),
               extra={"h.0.attn.bias": mask, "h.1.attn.bias": mask})


@pytest.mark.parametrize("variant", [
    {},
    {"word_embed_proj_dim": 16},                                  # OPT-350m: narrower embeddings
    {"do_layer_norm_before": False},                              # OPT-350m: post-norm blocks
    {"tie_word_embeddings": False, "activation_function": "gelu"},
])
def test_opt_matches_numpy_reference(tmp_path, variant):
  model, _ = check_logits(tmp_path, {**OPT_CFG, **variant})
  assert model.cfg.position.offset == 2 and model.position.table.shape == (66, 32)
  assert model.cfg.block == ("pre" if variant.get("do_layer_norm_before", True) else "post")
  assert model.cfg.embed_dim == variant.get("word_embed_proj_dim", 32) % 32


@pytest.mark.parametrize("parallel", [True, False])
@pytest.mark.parametrize("layout", ["half", "interleaved"])
def test_gpt_neox_matches_numpy_reference(tmp_path, parallel, layout):
  model, _ = check_logits(tmp_path, {**NEOX_CFG, "use_parallel_residual": parallel}, layout)
  c = model.cfg
  assert (c.position.fraction, c.position.layout, c.block) == (0.25, layout, "parallel" if parallel else "pre")
  assert not c.tie_embeddings and c.mlp == "gelu_erf"


def test_gpt_neox_rope_parameters_form_and_old_buffers(tmp_path):
  """transformers 5 writes rope_parameters instead of rotary_pct/rotary_emb_base; Pythia carries
  rotary inv_freq and mask buffers."""
  cfg = {k: v for k, v in NEOX_CFG.items() if k not in ("rotary_pct", "rotary_emb_base")}
  cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": 100.0, "partial_rotary_factor": 0.5}
  tensors, ids = write_family(tmp_path, cfg, extra={"gpt_neox.layers.0.attention.rotary_emb.inv_freq": np.ones(4, np.float32),
                                                    "gpt_neox.layers.0.attention.masked_bias": np.zeros((), np.float32)})
  model, _, _ = load(str(tmp_path))
  assert (model.cfg.position.fraction, model.cfg.position.base) == (0.5, 100.0)
  ref = numpy_neox_forward(tensors, np.asarray(ids), {**cfg, "rotary_pct": 0.5, "rotary_emb_base": 100.0})
  assert np.abs(np.asarray(model(jnp.asarray([ids]))[0]) - ref).max() < TOLERANCE * np.abs(ref).max()


def test_no_tokenizer_json_loads_with_a_warning(tmp_path):
  _, ids = write_family(tmp_path, NEOX_CFG, tokenizer=False)
  with pytest.warns(UserWarning, match="no tokenizer.json"):
    model, tok, _ = load(str(tmp_path))
  assert tok is None and model(jnp.asarray([ids])).shape == (1, len(ids), model.cfg.vocab_size)


# ------------------------------------------------------------------------- Llama rope_scaling

def reference_llama3_theta(theta, factor, low_freq_factor, high_freq_factor, old_context_len):
  """Meta's apply_scaling (Llama 3.1), one frequency at a time."""
  out = []
  for f in theta:
    wavelen = 2 * math.pi / f
    if wavelen < old_context_len / high_freq_factor:
      out.append(f)
    elif wavelen > old_context_len / low_freq_factor:
      out.append(f / factor)
    else:
      smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
      out.append((1 - smooth) * f / factor + smooth * f)
  return np.asarray(out)


# head_dim 8, base 500: wavelengths 6.3, 30, 140, 665; with an original context of 64 (bands at
# 16 and 64) the four pairs fall one kept, one blended and two scaled: every branch is used.
SCALINGS = {
    "llama3": ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64},
               lambda theta: reference_llama3_theta(theta, 8.0, 1.0, 4.0, 64)),
    "linear": ({"type": "linear", "factor": 4.0}, lambda theta: theta / 4.0),
}


@pytest.mark.parametrize("key", ["rope_scaling", "rope_parameters"])
@pytest.mark.parametrize("kind", sorted(SCALINGS))
def test_llama_rope_scaling_matches_numpy_reference(tmp_path, kind, key):
  scaling, scale = SCALINGS[kind]
  cfg = {**CFG, key: {**scaling, "rope_theta": 500.0} if key == "rope_parameters" else scaling}
  w, tok = write_checkpoint(tmp_path, cfg)
  model, _, _ = load(str(tmp_path))
  D = CFG["hidden_size"] // CFG["num_attention_heads"]
  theta = scale(500.0 ** (-2.0 * np.arange(D // 2) / D))
  if kind == "llama3":
    assert len({round(a / b, 6) for a, b in zip(theta, 500.0 ** (-2.0 * np.arange(D // 2) / D))}) == 3
  np.testing.assert_allclose(model.cfg.position.frequencies(D), theta, rtol=1e-12)   # float64 both: ulps apart
  ids = tok.encode(TEXT).ids
  ref = numpy_llama_forward(w, ids, n_heads=CFG["num_attention_heads"], n_kv_heads=CFG["num_key_value_heads"],
                            base=500.0, eps=CFG["rms_norm_eps"], layout="half", theta=theta)
  assert np.abs(np.asarray(model(jnp.asarray([ids]))[0]) - ref).max() < TOLERANCE * np.abs(ref).max()


# --------------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("cfg, match", [
    ({**CFG, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}},
     r"config.json rope_scaling.rope_type must be one of 'default', 'linear', 'llama3'; got 'yarn'"),
    ({**CFG, "rope_scaling": {"rope_type": "llama3", "factor": 8.0}},
     r"config.json rope_scaling is missing 'low_freq_factor'"),
    ({**GPT2_CFG, "activation_function": "swish"},
     r"config.json activation_function must be one of 'gelu_new', .*'relu'; got 'swish'"),
    ({**GPT2_CFG, "scale_attn_by_inverse_layer_idx": True}, r"scale_attn_by_inverse_layer_idx=True is not supported"),
    ({**NEOX_CFG, "attention_bias": False}, r"attention_bias=False"),
    # values of the wrong kind name their key, not a TypeError or ZeroDivisionError from the arithmetic
    ({**CFG, "hidden_size": "64"}, r"config.json hidden_size must be a positive integer; got '64'"),
    ({**CFG, "num_attention_heads": 0}, r"config.json num_attention_heads must be a positive integer; got 0"),
    ({**CFG, "num_hidden_layers": True}, r"config.json num_hidden_layers must be a positive integer; got True"),
    ({**CFG, "rope_scaling": "linear"}, r"config.json rope_scaling must be an object; got 'linear'"),
    ({**CFG, "rope_theta": "abc"}, r"config.json rope_theta must be a number; got 'abc'"),
    ({**CFG, "rope_scaling": {"rope_type": "linear", "factor": "2"}},
     r"config.json rope_scaling.factor must be a positive number; got '2'"),
    ({**CFG, "tie_word_embeddings": "yes"}, r"config.json tie_word_embeddings must be true or false; got 'yes'"),
    ({**GPT2_CFG, "n_embd": 64.0}, r"config.json n_embd must be a positive integer; got 64.0"),
])
def test_unsupported_settings_are_one_line_errors(tmp_path, cfg, match):
  save_checkpoint(tmp_path, {}, {**cfg, "vocab_size": 300})
  one_line_error(tmp_path, match)


def test_fused_tensor_of_the_wrong_shape_is_named(tmp_path):
  write_family(tmp_path, NEOX_CFG, extra={"gpt_neox.layers.1.attention.query_key_value.weight": np.zeros((32, 32), np.float32)})
  one_line_error(tmp_path, r"tensor 'gpt_neox\.layers\.1\.attention\.query_key_value\.weight' has shape \[32, 32\]; .* "
                           r"needs \[96, 32\]")
