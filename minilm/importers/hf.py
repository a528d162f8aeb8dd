"""Import an HF-format directory (config.json + *.safetensors [+ tokenizer.json]) of the Llama
(Llama, Mistral, Qwen2), GPT-2, OPT or GPT-NeoX family.

Each family is a config.json reader that states its architecture as ModelConfig settings, and a
name table from minilm parameters to tensor names. HF stores Q and K rows in the half-split RoPE
order minilm uses by default; layout='interleaved' reorders them. Weights of any stored float dtype
(bfloat16 included) become float32 parameters. Checkpoints saved from the bare model (GPT-2 on the
Hub: 'h.0...' rather than 'transformer.h.0...') load too.
"""
from __future__ import annotations

import contextlib
import dataclasses
import glob
import os
import time
import warnings
from typing import Callable, Mapping

from safetensors import SafetensorError, safe_open

from minilm import atomic
from minilm.config import ModelConfig
from minilm.encodings import Learned, RoPE
from minilm.importers import llama, tokenizer as tokenizers_
from minilm.importers.llama import Tensor

ROPE_TYPES = {"default": "none", "linear": "linear", "llama3": "llama3"}  # HF rope_type -> RoPE.scaling
# HF activation names -> ModelConfig.mlp (gelu_new, gelu_fast and gelu_pytorch_tanh are one formula)
ACTIVATIONS = {"gelu_new": "gelu", "gelu_fast": "gelu", "gelu_pytorch_tanh": "gelu", "gelu": "gelu_erf",
               "relu": "relu"}


_KIND_WORDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string", dict: "an object",
               list: "a list"}


def _same_kind(value, default) -> bool:
  """Whether a config.json value is of the default's kind (an integer counts as a number; true and
  false count as neither)."""
  if isinstance(default, bool) or isinstance(value, bool):
    return isinstance(default, bool) and isinstance(value, bool)
  if isinstance(default, float):
    return isinstance(value, (int, float))
  return isinstance(value, type(default))


class HFConfig:
  """config.json's fields, read with one-line errors that name the missing or unsupported key."""

  def __init__(self, data: dict, source: str, where: str = "config.json "):
    self.data, self.source, self.where = data, source, where

  def get(self, key: str, default=None):
    """The field, or `default` where it is absent or null; a value of another kind than the default's
    (a string for a number, a number for an object) is a one-line error naming the key."""
    value = self.data.get(key)
    if value is None:
      return default
    if default is not None and not _same_kind(value, default):
      raise ValueError(f"{self.source}: {self.where}{key} must be {_KIND_WORDS[type(default)]}; got {value!r}")
    return value

  def need(self, key: str, kind: type = int):
    """A required field: a positive integer (a size or a count), or a positive number if `kind` is float."""
    if key not in self.data:
      raise ValueError(f"{self.source}: {self.where.rstrip('. ')} is missing {key!r}")
    value = self.data[key]
    if not (_same_kind(value, kind()) and value > 0):
      raise ValueError(f"{self.source}: {self.where}{key} must be a positive {'number' if kind is float else 'integer'}; "
                       f"got {value!r}")
    return value

  def refuse(self, key: str, ok: bool, what: str = "is not supported") -> None:
    if not ok:
      raise ValueError(f"{self.source}: {self.where}{key}={self.data[key]!r} {what}")

  def choice(self, key: str, default: str, allowed: Mapping[str, str]) -> str:
    value = self.get(key, default)
    if value not in allowed:
      raise ValueError(f"{self.source}: {self.where}{key} must be one of "
                       f"{', '.join(map(repr, allowed))}; got {value!r}")
    return allowed[value]

  def rope(self, layout: str, base_key: str = "rope_theta", fraction_key: str = "partial_rotary_factor") -> RoPE:
    """RoPE from either form: rope_theta + rope_scaling (transformers 4) or rope_parameters (5);
    base_key and fraction_key: the family's own top-level names (GPT-NeoX: rotary_emb_base, rotary_pct)."""
    params = HFConfig({**self.get("rope_scaling", {}), **self.get("rope_parameters", {})}, self.source,
                      "config.json rope_scaling.")
    if "type" in params.data and "rope_type" not in params.data:
      params.data["rope_type"] = params.data["type"]
    scaling = params.choice("rope_type", "default", ROPE_TYPES)
    fraction = params.get("partial_rotary_factor", self.get(fraction_key, 1.0))
    extra = {} if scaling == "none" else {"factor": float(params.need("factor", float))}
    if scaling == "llama3":
      extra.update(low_freq_factor=float(params.need("low_freq_factor", float)),
                   high_freq_factor=float(params.need("high_freq_factor", float)),
                   original_max_len=int(params.need("original_max_position_embeddings")))
    head_dim = self.get("head_dim", 0) or self.need("hidden_size") // self.need("num_attention_heads")
    # HF rotates int(head_dim * fraction) dims; minilm wants that count as an exact fraction.
    return RoPE(base=float(params.get("rope_theta", self.get(base_key, 10000.0))),
                fraction=int(head_dim * fraction) / head_dim, layout=layout, scaling=scaling, **extra)


@dataclasses.dataclass(frozen=True)
class Family:
  config: Callable[[HFConfig, str], ModelConfig]  # (config.json, layout) -> ModelConfig
  names: Mapping[str, str | Tensor]  # minilm parameter path -> tensor name (with the prefix)
  prefix: str                        # the bare model's prefix ('model.'); the head lies outside it
  head: str = "lm_head.weight"
  buffers: tuple[str, ...] = ()      # name endings of non-parameters that old checkpoints carry


def _fused(template: str, **kw) -> dict[str, Tensor]:
  """q, k and v kernels and biases as the three parts of one fused weight and bias."""
  return {f"blocks.{{i}}.attn.{p}.{kind}": Tensor(f"{template}.{stored}", part, 3, **kw)
          for part, p in enumerate("qkv") for kind, stored in (("kernel", "weight"), ("bias", "bias"))}


def _norms(names: Mapping[str, str]) -> dict[str, str]:
  """LayerNorm scale and bias: {'final_norm': 'x.ln_f'} -> final_norm.scale/.bias entries."""
  return {f"{ours}.{p}": f"{theirs}.{hf}" for ours, theirs in names.items()
          for p, hf in (("scale", "weight"), ("bias", "bias"))}


def _linears(names: Mapping[str, str], bias: bool = True, **kw) -> dict[str, str | Tensor]:
  """Linear kernels (and biases): {'blocks.{i}.attn.o': 'x.dense'} -> .kernel/.bias entries."""
  out = {}
  for ours, theirs in names.items():
    out[f"{ours}.kernel"] = Tensor(f"{theirs}.weight", **kw) if kw else f"{theirs}.weight"
    if bias:
      out[f"{ours}.bias"] = f"{theirs}.bias"
  return out


# --------------------------------------------------------------------- Llama, Mistral, Qwen2

LLAMA_NAMES = {
    "embed.embedding": "model.embed_tokens.weight",
    "final_norm.scale": "model.norm.weight",
    "lm_head.kernel": "lm_head.weight",
    "blocks.{i}.attn_norm.scale": "model.layers.{i}.input_layernorm.weight",
    "blocks.{i}.attn.q.bias": "model.layers.{i}.self_attn.q_proj.bias",      # Qwen2 only
    "blocks.{i}.attn.k.bias": "model.layers.{i}.self_attn.k_proj.bias",
    "blocks.{i}.attn.v.bias": "model.layers.{i}.self_attn.v_proj.bias",
    "blocks.{i}.mlp_norm.scale": "model.layers.{i}.post_attention_layernorm.weight",
    **_linears({"blocks.{i}.attn.q": "model.layers.{i}.self_attn.q_proj",
                "blocks.{i}.attn.k": "model.layers.{i}.self_attn.k_proj",
                "blocks.{i}.attn.v": "model.layers.{i}.self_attn.v_proj",
                "blocks.{i}.attn.o": "model.layers.{i}.self_attn.o_proj",
                "blocks.{i}.mlp.gate": "model.layers.{i}.mlp.gate_proj",
                "blocks.{i}.mlp.up": "model.layers.{i}.mlp.up_proj",
                "blocks.{i}.mlp.down": "model.layers.{i}.mlp.down_proj"}, bias=False),
}


def llama_config(hf: HFConfig, layout: str) -> ModelConfig:
  kind = hf.get("model_type")
  hf.refuse("hidden_act", hf.get("hidden_act", "silu") == "silu")
  for key in ("attention_bias", "mlp_bias", "use_sliding_window"):
    hf.refuse(key, not hf.get(key, False))
  n_heads, d_model = hf.need("num_attention_heads"), hf.need("hidden_size")
  # Mistral's sliding window only matters beyond its length; minilm attends to everything, so
  # the model is exact up to the window and max_len says so. (Qwen2 lists a window it does not use.)
  window = hf.get("sliding_window") if kind == "mistral" else None
  return llama.model_config(
      vocab_size=hf.need("vocab_size"), d_model=d_model, n_layers=hf.need("num_hidden_layers"), n_heads=n_heads,
      n_kv_heads=hf.get("num_key_value_heads", n_heads), head_dim=hf.get("head_dim", d_model // n_heads),
      d_ff=hf.need("intermediate_size"), norm_eps=hf.get("rms_norm_eps", 1e-6),
      max_len=min(hf.get("max_position_embeddings", 2048), window or 1 << 62),
      tie_embeddings=hf.get("tie_word_embeddings", False), position=hf.rope(layout), qkv_bias=kind == "qwen2")


LLAMA = Family(llama_config, LLAMA_NAMES, "model.", buffers=("rotary_emb.inv_freq",))


# ------------------------------------------------------------------------------------- GPT-2

GPT2_NAMES = {
    "embed.embedding": "transformer.wte.weight",
    "position.table": "transformer.wpe.weight",
    "lm_head.kernel": "lm_head.weight",
    **_norms({"final_norm": "transformer.ln_f", "blocks.{i}.attn_norm": "transformer.h.{i}.ln_1",
              "blocks.{i}.mlp_norm": "transformer.h.{i}.ln_2"}),
    **_fused("transformer.h.{i}.attn.c_attn", conv1d=True),
    **_linears({"blocks.{i}.attn.o": "transformer.h.{i}.attn.c_proj", "blocks.{i}.mlp.up": "transformer.h.{i}.mlp.c_fc",
                "blocks.{i}.mlp.down": "transformer.h.{i}.mlp.c_proj"}, conv1d=True),
}


def gpt2_config(hf: HFConfig, layout: str) -> ModelConfig:
  """Learned absolute positions, LayerNorm, GELU, biases on every linear layer."""
  hf.refuse("scale_attn_weights", hf.get("scale_attn_weights", True))
  for key in ("scale_attn_by_inverse_layer_idx", "add_cross_attention"):
    hf.refuse(key, not hf.get(key, False))
  d_model = hf.need("n_embd")
  return ModelConfig(
      vocab_size=hf.need("vocab_size"), d_model=d_model, n_layers=hf.need("n_layer"), n_heads=hf.need("n_head"),
      d_ff=hf.get("n_inner", 4 * d_model), max_len=hf.get("n_positions", hf.get("n_ctx", 1024)), norm="layer",
      norm_eps=hf.get("layer_norm_epsilon", 1e-5), mlp=hf.choice("activation_function", "gelu_new", ACTIVATIONS),
      tie_embeddings=hf.get("tie_word_embeddings", True), bias=True, position=Learned())


GPT2 = Family(gpt2_config, GPT2_NAMES, "transformer.", buffers=(".attn.bias", ".attn.masked_bias"))


# --------------------------------------------------------------------------------------- OPT

OPT_NAMES = {
    "embed.embedding": "model.decoder.embed_tokens.weight",
    "position.table": "model.decoder.embed_positions.weight",
    "lm_head.kernel": "lm_head.weight",
    "project_in.kernel": "model.decoder.project_in.weight",
    "project_out.kernel": "model.decoder.project_out.weight",
    **_norms({"final_norm": "model.decoder.final_layer_norm",
              "blocks.{i}.attn_norm": "model.decoder.layers.{i}.self_attn_layer_norm",
              "blocks.{i}.mlp_norm": "model.decoder.layers.{i}.final_layer_norm"}),
    **_linears({"blocks.{i}.attn.q": "model.decoder.layers.{i}.self_attn.q_proj",
                "blocks.{i}.attn.k": "model.decoder.layers.{i}.self_attn.k_proj",
                "blocks.{i}.attn.v": "model.decoder.layers.{i}.self_attn.v_proj",
                "blocks.{i}.attn.o": "model.decoder.layers.{i}.self_attn.out_proj",
                "blocks.{i}.mlp.up": "model.decoder.layers.{i}.fc1",
                "blocks.{i}.mlp.down": "model.decoder.layers.{i}.fc2"}),
}


def opt_config(hf: HFConfig, layout: str) -> ModelConfig:
  """Learned positions 2 rows into their table, LayerNorm before (or after, OPT-350m) each
  sublayer, ReLU, biases; word_embed_proj_dim != hidden_size embeds narrower, projected in and out."""
  pre = hf.get("do_layer_norm_before", True)
  hf.refuse("layer_norm_elementwise_affine", hf.get("layer_norm_elementwise_affine", True))
  hf.refuse("_remove_final_layer_norm", not (pre and hf.get("_remove_final_layer_norm", False)),
            "(pre-norm blocks without a final norm) is not supported")
  d_model = hf.need("hidden_size")
  embed_dim = hf.get("word_embed_proj_dim", d_model)
  return ModelConfig(
      vocab_size=hf.need("vocab_size"), d_model=d_model, n_layers=hf.need("num_hidden_layers"),
      n_heads=hf.need("num_attention_heads"), d_ff=hf.need("ffn_dim"), max_len=hf.need("max_position_embeddings"),
      norm="layer", norm_eps=1e-5, mlp=hf.choice("activation_function", "relu", ACTIVATIONS),
      block="pre" if pre else "post", tie_embeddings=hf.get("tie_word_embeddings", True),
      embed_dim=0 if embed_dim == d_model else embed_dim, bias=hf.get("enable_bias", True),
      position=Learned(offset=2))


OPT = Family(opt_config, OPT_NAMES, "model.")


# ---------------------------------------------------------------------------------- GPT-NeoX

NEOX_NAMES = {
    "embed.embedding": "gpt_neox.embed_in.weight",
    "lm_head.kernel": "embed_out.weight",
    **_norms({"final_norm": "gpt_neox.final_layer_norm",
              "blocks.{i}.attn_norm": "gpt_neox.layers.{i}.input_layernorm",
              "blocks.{i}.mlp_norm": "gpt_neox.layers.{i}.post_attention_layernorm"}),
    **_fused("gpt_neox.layers.{i}.attention.query_key_value", per_head=True),
    **_linears({"blocks.{i}.attn.o": "gpt_neox.layers.{i}.attention.dense",
                "blocks.{i}.mlp.up": "gpt_neox.layers.{i}.mlp.dense_h_to_4h",
                "blocks.{i}.mlp.down": "gpt_neox.layers.{i}.mlp.dense_4h_to_h"}),
}


def neox_config(hf: HFConfig, layout: str) -> ModelConfig:
  """Partial NeoX-style RoPE, attention and MLP in parallel (or in turn), LayerNorm, GELU, biases."""
  hf.refuse("attention_bias", hf.get("attention_bias", True), "(no q/k/v/o biases but MLP biases) is not supported")
  return ModelConfig(
      vocab_size=hf.need("vocab_size"), d_model=hf.need("hidden_size"), n_layers=hf.need("num_hidden_layers"),
      n_heads=hf.need("num_attention_heads"), d_ff=hf.need("intermediate_size"),
      max_len=hf.get("max_position_embeddings", 2048), norm="layer", norm_eps=hf.get("layer_norm_eps", 1e-5),
      mlp=hf.choice("hidden_act", "gelu", ACTIVATIONS), tie_embeddings=hf.get("tie_word_embeddings", False),
      block="parallel" if hf.get("use_parallel_residual", True) else "pre", bias=True,
      position=hf.rope(layout, base_key="rotary_emb_base", fraction_key="rotary_pct"))


NEOX = Family(neox_config, NEOX_NAMES, "gpt_neox.", head="embed_out.weight",
              buffers=(".attention.bias", ".attention.masked_bias", "rotary_emb.inv_freq"))

FAMILIES = {"llama": LLAMA, "mistral": LLAMA, "qwen2": LLAMA, "gpt2": GPT2, "opt": OPT, "gpt_neox": NEOX}
MODEL_TYPES = tuple(FAMILIES)


# ------------------------------------------------------------------------------------ loading

def read_config(directory: str) -> dict:
  path = os.path.join(directory, "config.json")
  if not os.path.isfile(path):
    raise ValueError(f"source: {directory!r} has no config.json (expected an HF-format model directory)")
  hf = atomic.parse_json(path, lambda why: ValueError(f"{path}: damaged, not valid JSON ({why}); download the model again"))
  if not isinstance(hf, dict):
    raise ValueError(f"{path}: damaged, not an HF config (a mapping of settings); download the model again")
  return hf


def family(hf: dict, source: str) -> Family:
  kind = hf.get("model_type")
  if kind not in FAMILIES:
    raise ValueError(f"{source}: model_type must be one of {', '.join(map(repr, MODEL_TYPES))}; got {kind!r}")
  return FAMILIES[kind]


def config(hf: dict, source: str, layout: str = "half") -> ModelConfig:
  """ModelConfig from an HF config.json dict (raises a one-line ValueError naming a bad key)."""
  return family(hf, source).config(HFConfig(hf, source), layout)


def _first(value):
  """config.json token ids may be one id or a list of them (several EOS ids)."""
  return value[0] if isinstance(value, list) else value


def _canonical(names: list[str], fam: Family) -> dict[str, str]:
  """Stored name -> the name table's: a checkpoint of the bare model lacks the prefix."""
  if any(n.startswith(fam.prefix) for n in names):
    return {n: n for n in names}
  return {n: n if n == fam.head else fam.prefix + n for n in names}


def _tokenizer(directory: str, hf: dict):
  if not os.path.isfile(os.path.join(directory, "tokenizer.json")):
    warnings.warn(f"{directory}: no tokenizer.json; the model loads without a tokenizer (tokens in, "
                  f"logits out)", stacklevel=3)
    return None
  return tokenizers_.from_hf(directory, _first(hf.get("bos_token_id")), _first(hf.get("eos_token_id")))


def _open_safetensors(path: str):
  """safe_open, with a damaged or foreign file (empty, cut short, not safetensors) as one line."""
  try:
    return safe_open(path, framework="numpy")
  except SafetensorError as err:
    raise ValueError(f"{path}: not a readable safetensors file ({err})") from None


def load_hf(directory: str, *, layout: str = "half"):
  """(Decoder, GGUFTokenizer or None when the directory has no tokenizer.json, info)."""
  start = time.perf_counter()
  hf = read_config(directory)
  fam, cfg = family(hf, directory), config(hf, directory, layout)
  files = sorted(glob.glob(os.path.join(directory, "*.safetensors")))
  if not files:
    raise ValueError(f"{directory}: no *.safetensors files (only the safetensors format is supported)")
  with contextlib.ExitStack() as stack:
    where, shapes = {}, {}
    for path in files:
      handle = stack.enter_context(_open_safetensors(path))
      for stored, name in _canonical(list(handle.keys()), fam).items():
        where[name], shapes[name] = (handle, stored), tuple(handle.get_slice(stored).get_shape())
    model = llama.build_decoder(
        cfg, fam.names, shapes, lambda name: where[name][0].get_tensor(where[name][1]), source=directory,
        native_layout="half",
        # Tied checkpoints may still carry a copy of the embedding as the head.
        ignore=lambda name: name.endswith(fam.buffers) or (cfg.tie_embeddings and name == fam.head))
  info = {"format": "hf", "source": directory, "name": hf.get("_name_or_path") or os.path.basename(directory.rstrip("/")),
          "architecture": hf["model_type"], "layout": getattr(cfg.position, "layout", None),
          "weight_types": [hf.get("torch_dtype") or hf.get("dtype") or "?"], "load_s": time.perf_counter() - start}
  return model, _tokenizer(directory, hf), info
