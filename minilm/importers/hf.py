"""Import an HF-format directory (config.json + *.safetensors + tokenizer.json): Llama, Mistral, Qwen2.

HF stores Q and K rows in the half-split RoPE order minilm uses by default; layout='interleaved'
reorders them. Weights of any stored float dtype (bfloat16 included) become float32 parameters.
"""
from __future__ import annotations

import contextlib
import glob
import json
import os
import time

from safetensors import safe_open

from minilm.importers import llama, tokenizer as tokenizers_

MODEL_TYPES = ("llama", "mistral", "qwen2")

NAMES = {
    "embed.embedding": "model.embed_tokens.weight",
    "final_norm.scale": "model.norm.weight",
    "lm_head.kernel": "lm_head.weight",
    "blocks.{i}.attn_norm.scale": "model.layers.{i}.input_layernorm.weight",
    "blocks.{i}.attn.q.kernel": "model.layers.{i}.self_attn.q_proj.weight",
    "blocks.{i}.attn.k.kernel": "model.layers.{i}.self_attn.k_proj.weight",
    "blocks.{i}.attn.v.kernel": "model.layers.{i}.self_attn.v_proj.weight",
    "blocks.{i}.attn.o.kernel": "model.layers.{i}.self_attn.o_proj.weight",
    "blocks.{i}.attn.q.bias": "model.layers.{i}.self_attn.q_proj.bias",      # Qwen2 only
    "blocks.{i}.attn.k.bias": "model.layers.{i}.self_attn.k_proj.bias",
    "blocks.{i}.attn.v.bias": "model.layers.{i}.self_attn.v_proj.bias",
    "blocks.{i}.mlp_norm.scale": "model.layers.{i}.post_attention_layernorm.weight",
    "blocks.{i}.mlp.gate.kernel": "model.layers.{i}.mlp.gate_proj.weight",
    "blocks.{i}.mlp.up.kernel": "model.layers.{i}.mlp.up_proj.weight",
    "blocks.{i}.mlp.down.kernel": "model.layers.{i}.mlp.down_proj.weight",
}


def read_config(directory: str) -> dict:
  path = os.path.join(directory, "config.json")
  if not os.path.isfile(path):
    raise ValueError(f"source: {directory!r} has no config.json (expected an HF-format model directory)")
  with open(path) as f:
    return json.load(f)


def config(hf: dict, source: str, layout: str = "half"):
  """ModelConfig from an HF config.json dict (raises a one-line ValueError naming a bad key)."""
  kind = hf.get("model_type")
  if kind not in MODEL_TYPES:
    raise ValueError(f"{source}: model_type must be one of {', '.join(map(repr, MODEL_TYPES))}; got {kind!r}")
  scaling = hf.get("rope_scaling") or {}
  for key, ok in (("hidden_act", hf.get("hidden_act", "silu") == "silu"),
                  ("attention_bias", not hf.get("attention_bias", False)),
                  ("mlp_bias", not hf.get("mlp_bias", False)),
                  ("rope_scaling", scaling.get("rope_type", scaling.get("type", "default")) == "default"),
                  ("use_sliding_window", not hf.get("use_sliding_window", False))):
    if not ok:
      raise ValueError(f"{source}: config.json {key}={hf[key]!r} is not supported by minilm's Llama block")

  def need(key):
    if key not in hf:
      raise ValueError(f"{source}: config.json is missing {key!r}")
    return hf[key]

  n_heads, d_model = need("num_attention_heads"), need("hidden_size")
  # Mistral's sliding window only matters beyond its length; minilm attends to everything, so
  # the model is exact up to the window and max_len says so. (Qwen2 lists a window it does not use.)
  window = hf.get("sliding_window") if kind == "mistral" else None
  max_len = min(hf.get("max_position_embeddings", 2048), window or 1 << 62)
  return llama.model_config(
      vocab_size=need("vocab_size"), d_model=d_model, n_layers=need("num_hidden_layers"), n_heads=n_heads,
      n_kv_heads=hf.get("num_key_value_heads") or n_heads, head_dim=hf.get("head_dim") or d_model // n_heads,
      d_ff=need("intermediate_size"), rope_base=hf.get("rope_theta", 10000.0),
      norm_eps=hf.get("rms_norm_eps", 1e-6), max_len=max_len,
      tie_embeddings=hf.get("tie_word_embeddings", False), layout=layout, qkv_bias=kind == "qwen2")


def _first(value):
  """config.json token ids may be one id or a list of them (several EOS ids)."""
  return value[0] if isinstance(value, list) else value


def load_hf(directory: str, *, layout: str = "half"):
  """(Decoder, Tokenizer, info) from an HF-format directory."""
  start = time.perf_counter()
  hf = read_config(directory)
  cfg = config(hf, directory, layout)
  files = sorted(glob.glob(os.path.join(directory, "*.safetensors")))
  if not files:
    raise ValueError(f"{directory}: no *.safetensors files (only the safetensors format is supported)")
  with contextlib.ExitStack() as stack:
    where, shapes = {}, {}
    for path in files:
      handle = stack.enter_context(safe_open(path, framework="numpy"))
      for name in handle.keys():
        where[name], shapes[name] = handle, tuple(handle.get_slice(name).get_shape())
    model = llama.build_decoder(
        cfg, NAMES, shapes, lambda name: where[name].get_tensor(name), source=directory, native_layout="half",
        # Tied checkpoints may still carry a copy of the embedding as lm_head; old ones carry RoPE tables.
        ignore=lambda name: name.endswith("rotary_emb.inv_freq") or (cfg.tie_embeddings and name == "lm_head.weight"))
  tok = tokenizers_.from_hf(directory, _first(hf.get("bos_token_id")), _first(hf.get("eos_token_id")))
  info = {"format": "hf", "source": directory, "name": hf.get("_name_or_path") or os.path.basename(directory.rstrip("/")),
          "architecture": hf["model_type"], "layout": layout, "weight_types": [hf.get("torch_dtype") or hf.get("dtype") or "?"],
          "load_s": time.perf_counter() - start}
  return model, tok, info
