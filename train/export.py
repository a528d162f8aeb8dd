"""`python -m train export ARM_DIR [--step N] --format hf|transformer_lens --out DIR`: one checkpoint of
an arm in the format of a library that researchers already trust.

hf: config.json, model.safetensors, tokenizer.json (+ tokenizer_config.json) that transformers'
  AutoModelForCausalLM / AutoTokenizer load. Llama: RoPE, RMSNorm, SwiGLU, pre-norm, no biases;
  Qwen2: the same with q/k/v biases; GPT-NeoX: RoPE (partial too), LayerNorm, GELU or ReLU, biases,
  parallel or sequential blocks; GPT-2: the same with a position table (learned, sinusoidal, or
  zeros for NoPE) instead of RoPE.
transformer_lens: config.json with HookedTransformerConfig's fields and model.safetensors with
  HookedTransformer's parameter names and shapes (standard, rotary or alibi positions; NoPE and
  sinusoidal arms as a standard position table), plus tokenizer.json:
    model = HookedTransformer(HookedTransformerConfig(**json.load(open("DIR/config.json"))))
    model.load_state_dict(safetensors.torch.load_file("DIR/model.safetensors"), strict=False)

Q and K rows leave in the half-split RoPE order both libraries use, whatever the arm's layout. A
p-RoPE arm (only its highest-frequency pairs turn, at base^(-2j/head_dim)) leaves as NeoX-style
partial RoPE over those pairs' dims, moved to the front of each head, with base^(rotary_dim/head_dim):
the same angles, and q.k is unchanged when q and k dims are permuted alike.
An arm that a format cannot express exactly is refused in one line saying why and which formats can.
"""
from __future__ import annotations

import argparse
import math
import os

import numpy as np
from flax import nnx
from safetensors.numpy import save_file

from minilm import atomic
from minilm import schema as C
from minilm.cli import guarded
from minilm.config import ModelConfig
from minilm.encodings import ALiBi, Learned, RoPE, Sinusoidal
from minilm.importers import hf as H
from minilm.importers.llama import Tensor, _template, reorder_rows
from minilm.positions import rotary_pairs, sinusoidal_table
from train import checkpoints, tokenizer as lab_tokenizer

FORMATS = ("hf", "transformer_lens")
MARKER = "export.json"   # what was exported; an existing --out without it is never replaced
# minilm mlp -> activation name (HF's and TransformerLens's): the importer's table read backwards
ACT_NAMES = {mlp: name for name, mlp in reversed(H.ACTIVATIONS.items())}


class Refused(ValueError):
  """The format cannot express the arm exactly; str(err) says why."""


def need(ok: bool, why: str) -> None:
  if not ok:
    raise Refused(why)


# ------------------------------------------------------------------------------ shared pieces

def rotary(cfg: ModelConfig) -> tuple[int, float, np.ndarray]:
  """(rotary_dim, base, order_D) of cfg's RoPE as NeoX-style RoPE over the first rotary_dim dims of
  a half-layout head, whose dims are the arm's (half layout) taken in order_D."""
  pos, D = cfg.position, cfg.dim_per_head
  span, n_rot = rotary_pairs(D, pos.fraction, pos.partial)
  if pos.partial == "neox" or n_rot == D // 2:
    return span, pos.base, np.arange(D)
  front = np.concatenate([np.arange(n_rot), D // 2 + np.arange(n_rot)])
  return 2 * n_rot, pos.base ** (2 * n_rot / D), np.concatenate([front, np.setdiff1d(np.arange(D), front)])


def qk_rows(cfg: ModelConfig, path: tuple, w_Ox: np.ndarray) -> np.ndarray:
  """A q or k weight [out, in] or bias [out] with each head's rows in the exported RoPE order."""
  heads = {"q": cfg.n_heads, "k": cfg.kv_heads}
  if not (isinstance(cfg.position, RoPE) and path[-3:-2] == ("attn",) and path[-2] in heads):
    return w_Ox
  H = heads[path[-2]]
  span, _ = rotary_pairs(cfg.dim_per_head, cfg.position.fraction, cfg.position.partial)
  half = reorder_rows(w_Ox, H, cfg.position.layout, "half", span)
  order_D = rotary(cfg)[2]
  return half.reshape((H, cfg.dim_per_head) + w_Ox.shape[1:])[:, order_D].reshape(w_Ox.shape)


def parameters(model) -> dict[str, tuple[tuple, np.ndarray]]:
  """minilm path template ('blocks.{i}.attn.q.kernel') with layer -> (path, array as [out, in] or
  [out], Q/K rows in the exported order); keyed by the concrete dotted path."""
  out = {}
  for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    array = np.asarray(variable.get_value(), np.float32)
    out[".".join(map(str, path))] = path, qk_rows(model.cfg, path, array.T if path[-1] == "kernel" else array)
  return out


def position_table(model) -> np.ndarray:
  """[max_len, d_model]: what the arm adds to position t's embedding (zeros for NoPE)."""
  cfg = model.cfg
  if isinstance(cfg.position, Learned):
    return np.asarray(model.position.table[...], np.float32)[cfg.position.offset:]
  if isinstance(cfg.position, Sinusoidal):
    return sinusoidal_table(cfg.max_len, cfg.d_model)
  return np.zeros((cfg.max_len, cfg.d_model), np.float32)


def rope_kind(cfg: ModelConfig) -> str:
  pos = cfg.position
  if pos.fraction == 1.0:
    return "RoPE"
  return f"{'p-RoPE' if pos.partial == 'p-rope' else 'partial RoPE'} (fraction {pos.fraction:g})"


def position_kind(cfg: ModelConfig) -> str:
  names = {"nope": "NoPE", "alibi": "ALiBi", "sinusoidal": "sinusoidal positions", "learned": "learned positions"}
  return rope_kind(cfg) if isinstance(cfg.position, RoPE) else names[cfg.position.kind]


def architecture(cfg: ModelConfig) -> str:
  bias = "biases" if cfg.bias else "q/k/v biases" if cfg.qkv_bias else "no biases"
  return f"{'RMSNorm' if cfg.norm == 'rms' else 'LayerNorm'}, {cfg.mlp}, {cfg.block}-norm blocks, {bias}"


def rope_scaling(cfg: ModelConfig) -> dict:
  """HF's rope_scaling entry of a scaled RoPE (none for plain RoPE)."""
  pos = cfg.position
  if pos.scaling == "none":
    return {}
  scaling = {"rope_type": pos.scaling, "factor": pos.factor}
  if pos.scaling == "llama3":
    scaling.update(low_freq_factor=pos.low_freq_factor, high_freq_factor=pos.high_freq_factor,
                   original_max_position_embeddings=pos.original_max_len)
  return {"rope_scaling": scaling}


# ------------------------------------------------------------------------------------------ HF

ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "gpt_neox": "GPTNeoXForCausalLM",
                 "gpt2": "GPT2LMHeadModel"}


def hf_model_type(cfg: ModelConfig) -> str:
  """The HF family that computes exactly what cfg does; Refused(why) when none does."""
  if cfg.norm == "rms" and cfg.mlp == "swiglu":
    need(cfg.block == "pre" and not cfg.bias and not cfg.embed_dim,
         f"{architecture(cfg)}: Llama and Qwen2 have pre-norm blocks, no biases beyond q/k/v, no project in/out")
    need(isinstance(cfg.position, RoPE), f"{position_kind(cfg)}: Llama and Qwen2 (the HF families with RMSNorm "
         f"and SwiGLU) always rotate q and k")
    need(rotary(cfg)[0] == cfg.dim_per_head, f"{rope_kind(cfg)}: Llama and Qwen2 rotate every dim of a head")
    return "qwen2" if cfg.qkv_bias else "llama"
  need(cfg.norm == "layer" and cfg.mlp != "swiglu" and cfg.bias and cfg.block != "post" and not cfg.embed_dim
       and cfg.kv_heads == cfg.n_heads and cfg.dim_per_head * cfg.n_heads == cfg.d_model,
       f"{architecture(cfg)}: no HF family (Llama/Qwen2: RMSNorm and SwiGLU; GPT-2/GPT-NeoX: LayerNorm, GELU or "
       f"ReLU, biases everywhere, one KV head per head of d_model/n_heads dims)")
  if isinstance(cfg.position, RoPE):
    return "gpt_neox"
  need(not isinstance(cfg.position, ALiBi), "ALiBi: GPT-2 and GPT-NeoX (the HF families with LayerNorm and GELU) "
       "have no attention bias")
  need(cfg.block == "pre", f"{position_kind(cfg)} with parallel blocks: GPT-2 runs attention and MLP in turn")
  return "gpt2"


def rotary_pct(rotary_dim: int, head_dim: int) -> float:
  """The fraction that HF's int(head_dim * pct) turns back into rotary_dim: rotary_dim / head_dim
  itself can round below it (30 / 44 * 44 = 29.999...), so it is nudged up to the next float that
  does not."""
  pct = rotary_dim / head_dim
  while int(head_dim * pct) < rotary_dim:
    pct = math.nextafter(pct, 1.0)
  return pct


def hf_config(cfg: ModelConfig) -> dict:
  """config.json of the HF family that expresses cfg."""
  kind, tok = hf_model_type(cfg), lab_tokenizer.ByteTokenizer
  common = {"model_type": kind, "architectures": [ARCHITECTURES[kind]], "vocab_size": cfg.vocab_size,
            "tie_word_embeddings": cfg.tie_embeddings, "bos_token_id": tok.BOS, "eos_token_id": tok.EOS,
            "pad_token_id": tok.PAD, "torch_dtype": "float32"}
  if kind == "gpt2":
    return {**common, "n_embd": cfg.d_model, "n_layer": cfg.n_layers, "n_head": cfg.n_heads, "n_inner": cfg.ff_dim,
            "n_positions": cfg.max_len, "layer_norm_epsilon": cfg.norm_eps, "activation_function": ACT_NAMES[cfg.mlp]}
  rotary_dim, base, _ = rotary(cfg)
  shape = {"hidden_size": cfg.d_model, "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
           "intermediate_size": cfg.ff_dim, "max_position_embeddings": cfg.max_len, **rope_scaling(cfg)}
  if kind == "gpt_neox":
    return {**common, **shape, "hidden_act": ACT_NAMES[cfg.mlp], "layer_norm_eps": cfg.norm_eps,
            "use_parallel_residual": cfg.block == "parallel", "rotary_pct": rotary_pct(rotary_dim, cfg.dim_per_head),
            "rotary_emb_base": base, "attention_bias": True}
  return {**common, **shape, "num_key_value_heads": cfg.kv_heads, "head_dim": cfg.dim_per_head, "hidden_act": "silu",
          "rms_norm_eps": cfg.norm_eps, "rope_theta": base, "attention_bias": False, "mlp_bias": False,
          "use_sliding_window": False}


def fuse(spec: Tensor, parts: dict[int, np.ndarray], heads: int) -> np.ndarray:
  """The stored tensor of `spec` from its parts ([out, in] or [out] each): Tensor.select backwards."""
  groups = heads if spec.per_head else 1
  rows = np.stack([a.reshape((groups, -1) + a.shape[1:]) for _, a in sorted(parts.items())], axis=1)
  rows = rows.reshape((-1,) + rows.shape[3:])
  return np.ascontiguousarray(rows.T if spec.conv1d else rows)


def hf_tensors(model, config: dict) -> dict[str, np.ndarray]:
  """HF tensor name -> array, through the importer's name table of the family."""
  names, pieces = H.FAMILIES[config["model_type"]].names, {}
  for path, array in parameters(model).values():
    if path[0] == "position":   # GPT-2's table is written whole below, whatever the encoding
      continue
    template, layer = _template(path)
    spec = names[template] if isinstance(names[template], Tensor) else Tensor(names[template])
    pieces.setdefault(spec.name.format(i=layer), (spec, {}))[1][spec.part] = array
  out = {name: fuse(spec, parts, model.cfg.n_heads) for name, (spec, parts) in pieces.items()}
  if config["model_type"] == "gpt2":
    out[names["position.table"]] = position_table(model)
  return out


# ---------------------------------------------------------------------------- TransformerLens

def tl_config(cfg: ModelConfig) -> dict:
  """HookedTransformerConfig's fields (the JSON-able ones this model sets) for cfg."""
  need(cfg.block != "post", "post-norm blocks: TransformerLens normalises before each sublayer")
  need(not cfg.embed_dim, "project in/out (embed_dim): TransformerLens embeds tokens at d_model")
  need(cfg.mlp != "swiglu" or not cfg.bias, "SwiGLU with biases: TransformerLens's gated MLP has no gate bias and "
       "adds b_in after the gate's product (act(x W_gate) * (x W_in) + b_in), minilm before it")
  H = cfg.n_heads
  need(not isinstance(cfg.position, ALiBi) or H & (H - 1) == 0, f"ALiBi with n_heads={H}: TransformerLens's "
       f"slopes differ from minilm's (BLOOM's rule) unless n_heads is a power of two")
  out = {"model_name": "minilm", "original_architecture": "minilm", "n_layers": cfg.n_layers, "d_model": cfg.d_model,
         "d_head": cfg.dim_per_head, "n_heads": H, "d_mlp": cfg.ff_dim, "d_vocab": cfg.vocab_size, "n_ctx": cfg.max_len,
         "act_fn": "silu" if cfg.mlp == "swiglu" else ACT_NAMES[cfg.mlp], "gated_mlp": cfg.mlp == "swiglu",
         "normalization_type": "RMS" if cfg.norm == "rms" else "LN", "eps": cfg.norm_eps,
         "parallel_attn_mlp": cfg.block == "parallel", "n_key_value_heads": cfg.kv_heads if cfg.kv_heads != H else None,
         "tie_word_embeddings": cfg.tie_embeddings, "default_prepend_bos": False, "init_weights": False,
         "positional_embedding_type": {"rope": "rotary", "alibi": "alibi"}.get(cfg.position.kind, "standard")}
  if isinstance(cfg.position, RoPE):
    rotary_dim, base, _ = rotary(cfg)
    pos = cfg.position
    out.update(rotary_dim=rotary_dim, rotary_base=base, rotary_adjacent_pairs=False)
    if pos.scaling == "linear":
      out["rotary_scaling_factor"] = pos.factor
    elif pos.scaling == "llama3":
      out.update(use_NTK_by_parts_rope=True, NTK_by_parts_factor=pos.factor, NTK_original_ctx_len=pos.original_max_len,
                 NTK_by_parts_low_freq_factor=pos.low_freq_factor, NTK_by_parts_high_freq_factor=pos.high_freq_factor)
  return out


def tl_tensors(model, config: dict) -> dict[str, np.ndarray]:
  """HookedTransformer's state dict: W_Q [heads, d_model, d_head], W_O [heads, d_head, d_model], W_in
  [d_model, d_mlp], ...; zeros for the biases the arm has none of (TransformerLens always has them)."""
  cfg, params = model.cfg, parameters(model)
  H, K, D, d = cfg.n_heads, cfg.kv_heads, cfg.dim_per_head, cfg.d_model

  def get(name: str, shape: tuple = ()) -> np.ndarray:
    return params[name][1] if name in params else np.zeros(shape, np.float32)

  W_E = get("embed.embedding")
  out = {"embed.W_E": W_E, "unembed.W_U": (W_E if cfg.tie_embeddings else get("lm_head.kernel")).T,
         "unembed.b_U": np.zeros(cfg.vocab_size, np.float32)}
  if config["positional_embedding_type"] != "rotary":   # ALiBi models have a (zero, unused) table too
    out["pos_embed.W_pos"] = position_table(model)
  norms = {"final_norm": "ln_final", **{f"blocks.{i}.{ours}": f"blocks.{i}.{theirs}" for i in range(cfg.n_layers)
                                        for ours, theirs in (("attn_norm", "ln1"), ("mlp_norm", "ln2"))}}
  for ours, theirs in norms.items():
    out[f"{theirs}.w"] = get(f"{ours}.scale")
    if cfg.norm == "layer":
      out[f"{theirs}.b"] = get(f"{ours}.bias")
  kv = "_" if K != H else ""   # grouped K/V weights are TransformerLens's _W_K, _b_K, ...
  for i in range(cfg.n_layers):
    a, m = f"blocks.{i}.attn.", f"blocks.{i}.mlp."
    for x, heads, prefix in (("q", H, ""), ("k", K, kv), ("v", K, kv)):
      out[f"{a}{prefix}W_{x.upper()}"] = get(f"{a}{x}.kernel").reshape(heads, D, d).transpose(0, 2, 1)
      out[f"{a}{prefix}b_{x.upper()}"] = get(f"{a}{x}.bias", (heads * D,)).reshape(heads, D)
    out[f"{a}W_O"], out[f"{a}b_O"] = get(f"{a}o.kernel").T.reshape(H, D, d), get(f"{a}o.bias", (d,))
    out[f"{m}W_in"], out[f"{m}b_in"] = get(f"{m}up.kernel").T, get(f"{m}up.bias", (cfg.ff_dim,))
    out[f"{m}W_out"], out[f"{m}b_out"] = get(f"{m}down.kernel").T, get(f"{m}down.bias", (d,))
    if cfg.mlp == "swiglu":
      out[f"{m}W_gate"] = get(f"{m}gate.kernel").T
  return {name: np.ascontiguousarray(a) for name, a in out.items()}


# ------------------------------------------------------------------------------------ writing

FORMAT_FUNCTIONS = {"hf": (hf_config, hf_tensors), "transformer_lens": (tl_config, tl_tensors)}


def byte_symbols() -> list[str]:
  """GPT-2's printable stand-in for every byte, the vocabulary of ByteLevel tokenizers: printable
  Latin-1 bytes stand for themselves, the rest take chr(256), chr(257), ... in byte order."""
  keep = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)}
  extra = iter(range(256, 512))
  return [chr(b) if b in keep else chr(next(extra)) for b in range(256)]


def tokenizer_json() -> str:
  """The lab's tokenizer (train.tokenizer) for `tokenizers`: byte-level BPE without merges (one
  token per byte, ids 0..255; the form GPT-2's, Llama 3's and Qwen2's tokenizers share), then
  <pad>, <bos>, <eos> and the task symbols, each matched whole."""
  from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
  lab = lab_tokenizer.ByteTokenizer()
  vocab = {symbol: b for b, symbol in enumerate(byte_symbols())}
  vocab.update({lab.token_name(i): i for i in range(lab_tokenizer.N_BYTES, lab.vocab_size)})
  tok = Tokenizer(models.BPE(vocab, []))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
  tok.decoder = decoders.ByteLevel()
  tok.add_special_tokens([AddedToken(lab.token_name(i), special=True, normalized=False)
                          for i in lab_tokenizer.SPECIALS.values()])
  tok.add_tokens([AddedToken(lab.token_name(i), normalized=False) for i in range(lab.EOS + 1, lab.vocab_size)])
  return tok.to_str()


def tokenizer_config(cfg: ModelConfig) -> dict:
  """tokenizer_config.json: AutoTokenizer then reads tokenizer.json as it is."""
  names = {f"{k}_token": f"<{k}>" for k in lab_tokenizer.SPECIALS}
  return {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": cfg.max_len, **names}


def export_model(model, fmt: str, out: str, about: dict | None = None) -> None:
  """Write `model` in format `fmt` to the folder `out` (replaced whole, only once complete)."""
  C.check_choice("--format", fmt, FORMATS)
  make_config, make_tensors = FORMAT_FUNCTIONS[fmt]
  config = make_config(model.cfg)
  with atomic.staged_dir(out, owns=(MARKER, "config.json", "model.safetensors", "tokenizer.json",
                                    "tokenizer_config.json")) as staging:
    atomic.write_json(os.path.join(staging, "config.json"), config)
    with atomic.path(os.path.join(staging, "model.safetensors")) as tmp:
      save_file(make_tensors(model, config), tmp, metadata={"format": "pt"})
    atomic.write_text(os.path.join(staging, "tokenizer.json"), tokenizer_json())
    atomic.write_json(os.path.join(staging, "tokenizer_config.json"), tokenizer_config(model.cfg))
    atomic.write_json(os.path.join(staging, MARKER), {"format": fmt, **(about or {}),
                                                      "model": C.to_dict(model.cfg)})


# -------------------------------------------------------------------------------- command line

def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m train export",
                              description="one checkpoint of an arm as an HF transformers or TransformerLens model")
  p.add_argument("arm_dir", help="an arm's run directory (runs/<experiment>/<arm>)")
  p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
  p.add_argument("--format", default="hf", help=f"one of {', '.join(FORMATS)} (default: hf)")
  p.add_argument("--out", required=True, help="output folder; a previous export there is replaced")
  return p


def check_out(out: str, arm_dir: str) -> None:
  """--out may be new, empty or a previous export: never the arm, a folder around it, or other files."""
  atomic.check_out_dir(out)
  out_abs, arm_abs = os.path.abspath(out), os.path.abspath(arm_dir)
  C.check(os.path.commonpath([out_abs, arm_abs]) != out_abs, "--out", f"{out} holds the arm {arm_dir} itself")
  C.check(not os.path.isdir(out) or not os.listdir(out) or os.path.exists(os.path.join(out, MARKER)), "--out",
          f"{out} holds other files (no {MARKER} of an earlier export); choose a new or empty folder")


def why_not(cfg: ModelConfig, fmt: str) -> str | None:
  """Why `fmt` cannot express cfg exactly, or None when it can."""
  try:
    FORMAT_FUNCTIONS[fmt][0](cfg)
  except Refused as err:
    return str(err)
  return None


def refusal(cfg: ModelConfig, fmt: str, arm_dir: str) -> str | None:
  """The one-line refusal of an arm that `fmt` cannot express, naming the formats that can."""
  why = why_not(cfg, fmt)
  can = [f for f in FORMATS if f != fmt and why_not(cfg, f) is None]
  return why and f"{arm_dir}: {why}; formats that can: {', '.join(can) or 'none'}"


def run(args: argparse.Namespace) -> None:
  C.check_choice("--format", args.format, FORMATS)
  C.check(os.path.isdir(args.arm_dir), "arm_dir", f"{args.arm_dir} is not a folder")
  cfg = checkpoints.load_config(args.arm_dir).model
  why = refusal(cfg, args.format, args.arm_dir)
  if why:
    raise ValueError(why)
  check_out(args.out, args.arm_dir)
  model, _ = checkpoints.load_model(args.arm_dir, args.step)
  step = checkpoints.available_steps(args.arm_dir)[-1] if args.step is None else args.step
  export_model(model, args.format, args.out, {"arm_dir": os.path.abspath(args.arm_dir), "step": step})
  print(f"exported {args.arm_dir} step {step} as {args.format} to {args.out}")


def main(argv: list[str] | None = None) -> int:
  args = parser().parse_args(argv)
  return guarded(lambda: run(args))
