"""Export: HF directories read back by minilm's own importer give the same logits; TransformerLens
state dicts give them under an independent numpy forward of HookedTransformer's semantics; the
command refuses what a format cannot express in one line and never replaces what it should not."""
from __future__ import annotations

import json
import os
import runpy
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file
from scipy.special import erf

from minilm import importers
from minilm.config import ModelConfig
from minilm.encodings import ALiBi, Learned, NoPE, RoPE, Sinusoidal
from minilm.importers.llama import reorder_rows
from minilm.model import Decoder
from train import checkpoints, export as E
from train.tokenizer import ByteTokenizer

pytestmark = pytest.mark.slow   # trains and exports tiny arms in every format (minutes on 2 cores)

SHAPE = dict(vocab_size=512, d_model=32, n_layers=2, n_heads=4, max_len=24)
LAYER = dict(norm="layer", bias=True, tie_embeddings=False)
TOKENS = np.random.default_rng(0).integers(0, 512, (2, 24)).astype(np.int32)


def random_model(cfg: ModelConfig, seed: int = 0) -> Decoder:
  """Every parameter moved by N(0, 0.3): norms off 1, biases off 0, no logit negligible."""
  model = Decoder(cfg, rngs=nnx.Rngs(seed))
  leaves, tree = jax.tree.flatten(nnx.state(model, nnx.Param))
  keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
  nnx.update(model, jax.tree.unflatten(tree, [x + 0.3 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]))
  return model


def logits(model) -> np.ndarray:
  return np.asarray(model(jnp.asarray(TOKENS)))


def rel(a, b) -> float:
  return float(np.abs(a - b).max() / np.abs(b).max())


HF_CASES = {
    "llama, interleaved pairs, grouped KV": (ModelConfig(**SHAPE, n_kv_heads=2, position=RoPE(layout="interleaved")),
                                             "llama"),
    "llama, untied, llama3 scaling": (ModelConfig(**SHAPE, tie_embeddings=False, position=RoPE(
        base=100.0, scaling="llama3", factor=4.0, original_max_len=8)), "llama"),
    "qwen2 (q/k/v biases)": (ModelConfig(**SHAPE, qkv_bias=True, position=RoPE(base=100.0)), "qwen2"),
    "gpt_neox, parallel, p-RoPE interleaved": (ModelConfig(**SHAPE, **LAYER, mlp="gelu_erf", block="parallel", position=RoPE(
        base=100.0, fraction=0.5, partial="p-rope", layout="interleaved")), "gpt_neox"),
    "gpt_neox, sequential, partial RoPE": (ModelConfig(**SHAPE, **LAYER, mlp="gelu", position=RoPE(fraction=0.5)),
                                           "gpt_neox"),
    # 30 of 44 dims: HF's int(44 * 30 / 44) is 29, so the exported rotary_pct must sit a float above 30 / 44
    "gpt_neox, 30 of 44 rotary dims": (ModelConfig(**{**SHAPE, "d_model": 88, "n_heads": 2}, **LAYER, mlp="gelu",
                                                   position=RoPE(base=100.0, fraction=30 / 44)), "gpt_neox"),
    "gpt2, learned": (ModelConfig(**SHAPE, **LAYER, mlp="gelu", position=Learned()), "gpt2"),
    "gpt2, sinusoidal, tied": (ModelConfig(**{**SHAPE, **LAYER, "tie_embeddings": True}, mlp="gelu",
                                           position=Sinusoidal()), "gpt2"),
    "gpt2, NoPE, relu": (ModelConfig(**SHAPE, **LAYER, mlp="relu", position=NoPE()), "gpt2"),
}


@pytest.mark.parametrize("name", HF_CASES)
def test_hf_export_reads_back_through_the_importer_with_the_same_logits(name, tmp_path):
  cfg, family = HF_CASES[name]
  model = random_model(cfg)
  E.export_model(model, "hf", str(tmp_path))
  assert sorted(os.listdir(tmp_path)) == ["config.json", "export.json", "model.safetensors", "tokenizer.json",
                                          "tokenizer_config.json"]
  back, tok, info = importers.load(str(tmp_path))
  assert info["architecture"] == family
  assert rel(logits(back), logits(model)) < 1e-5
  assert tok.encode("<E17> lives in <A4>. Grüße") == ByteTokenizer().encode("<E17> lives in <A4>. Grüße")
  # the special ids: config.json's and tokenizer_config.json's names (through tokenizer.json) are the lab's
  from tokenizers import Tokenizer
  config = json.loads((tmp_path / "config.json").read_text())
  ids = {"bos": ByteTokenizer.BOS, "eos": ByteTokenizer.EOS, "pad": ByteTokenizer.PAD}
  assert {k: config[f"{k}_token_id"] for k in ids} == ids
  names = json.loads((tmp_path / "tokenizer_config.json").read_text())
  fast = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
  assert {k: fast.token_to_id(names[f"{k}_token"]) for k in ids} == ids


def test_the_tokenizer_is_the_lab_byte_tokenizer_over_gpt2_byte_symbols():
  """tokenizer.json spells each byte with GPT-2's ByteLevel symbol (all 256, none dropped or doubled)
  and encodes and decodes every byte (1..255, as UTF-8) to the ids of the lab's tokenizer."""
  from tokenizers import Tokenizer, pre_tokenizers
  symbols = E.byte_symbols()
  assert len(symbols) == 256 and set(symbols) == set(pre_tokenizers.ByteLevel.alphabet())
  fast, text = Tokenizer.from_str(E.tokenizer_json()), "".join(map(chr, range(1, 256)))
  ids = fast.encode(text).ids
  assert ids == ByteTokenizer().encode(text) and fast.decode(ids) == text
  assert fast.encode("<bos><E17> <eos>").ids == ByteTokenizer().encode("<bos><E17> <eos>")


def test_interleaved_pairs_leave_in_the_half_layout():
  """The classic bug: interleaved Q/K rows written as they are. An interleaved arm and the same arm
  with its rows moved to the half layout compute the same logits and must export the same tensors."""
  inter = random_model(ModelConfig(**SHAPE, n_kv_heads=2, position=RoPE(layout="interleaved", fraction=0.5)))
  half = random_model(ModelConfig(**SHAPE, n_kv_heads=2, position=RoPE(fraction=0.5)))
  state = nnx.state(inter, nnx.Param)
  for i, block in enumerate(half.blocks):
    for name, heads in (("q", 4), ("k", 2)):
      w_Oxd = np.asarray(state["blocks"][i]["attn"][name]["kernel"][...]).T
      getattr(block.attn, name).kernel[...] = jnp.asarray(reorder_rows(w_Oxd, heads, "interleaved", "half", 4).T)
  others = {k: v for k, v in nnx.to_flat_state(state) if k[-2] not in ("q", "k")}
  nnx.update(half, nnx.from_flat_state(others))
  assert rel(logits(half), logits(inter)) < 1e-5
  a = E.tl_tensors(inter, E.tl_config(inter.cfg))
  b = E.tl_tensors(half, E.tl_config(half.cfg))
  assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
  as_stored_HxdxD = np.asarray(state["blocks"][0]["attn"]["q"]["kernel"][...]).reshape(32, 4, 8).transpose(1, 0, 2)
  assert not np.array_equal(a["blocks.0.attn.W_Q"], as_stored_HxdxD)


# ---------------------------------------------------------------------------- TransformerLens

ACTS = {"silu": lambda h: h / (1 + np.exp(-h)), "relu": lambda h: np.maximum(h, 0),
        "gelu": lambda h: 0.5 * h * (1 + erf(h / np.sqrt(2))),
        "gelu_new": lambda h: 0.5 * h * (1 + np.tanh(np.sqrt(2 / np.pi) * (h + 0.044715 * h ** 3)))}


def tl_forward(c: dict, sd: dict, tokens_BxT) -> np.ndarray:
  """HookedTransformer's forward pass (transformer_lens/HookedTransformer.py, components/) in numpy."""
  T, H, D = tokens_BxT.shape[1], c["n_heads"], c["d_head"]
  x = sd["embed.W_E"][tokens_BxT].astype(np.float64)
  if c["positional_embedding_type"] == "standard":
    x = x + sd["pos_embed.W_pos"][:T]

  def norm(h, name):
    if c["normalization_type"] == "LN":
      h = h - h.mean(-1, keepdims=True)
    h = h / np.sqrt((h * h).mean(-1, keepdims=True) + c["eps"]) * sd[f"{name}.w"]
    return h + sd[f"{name}.b"] if c["normalization_type"] == "LN" else h

  def rotate(q_BxTxHxD):   # rotary_adjacent_pairs=False: dims j and j + r/2 of the first r turn together
    r = c["rotary_dim"]
    inv_freq = c["rotary_base"] ** -(np.arange(r // 2) / (r / 2)) / c.get("rotary_scaling_factor", 1.0)
    if c.get("use_NTK_by_parts_rope"):   # components/abstract_attention.py, calculate_sin_cos_rotary
      factor, ctx = c["NTK_by_parts_factor"], c["NTK_original_ctx_len"]
      low, high = c["NTK_by_parts_low_freq_factor"], c["NTK_by_parts_high_freq_factor"]
      wavelen = 2 * np.pi / inv_freq
      scaled = np.where(wavelen > ctx / low, inv_freq / factor, inv_freq)
      smooth = (ctx / wavelen - low) / (high - low)
      medium = ~(wavelen < ctx / high) & ~(wavelen > ctx / low)
      inv_freq = np.where(medium, (1 - smooth) * scaled / factor + smooth * scaled, scaled)
    angle_TxR = np.arange(T)[:, None] * np.tile(inv_freq, 2)
    x1, x2 = q_BxTxHxD[..., :r // 2], q_BxTxHxD[..., r // 2:r]
    turned = np.concatenate([-x2, x1], -1)
    rot = q_BxTxHxD[..., :r] * np.cos(angle_TxR)[:, None] + turned * np.sin(angle_TxR)[:, None]
    return np.concatenate([rot, q_BxTxHxD[..., r:]], -1)

  def mlp(h, m):   # GatedMLP adds b_in after the gate's product: act(h W_gate) * (h W_in) + b_in
    act = ACTS[c["act_fn"]]
    if c["gated_mlp"]:
      mid = act(h @ sd[f"{m}W_gate"]) * (h @ sd[f"{m}W_in"]) + sd[f"{m}b_in"]
    else:
      mid = act(h @ sd[f"{m}W_in"] + sd[f"{m}b_in"])
    return mid @ sd[f"{m}W_out"] + sd[f"{m}b_out"]

  kv = "_" if c["n_key_value_heads"] else ""
  for layer in range(c["n_layers"]):
    a, m = f"blocks.{layer}.attn.", f"blocks.{layer}.mlp."
    h = norm(x, f"blocks.{layer}.ln1")
    q = np.einsum("btm,nmh->btnh", h, sd[f"{a}W_Q"]) + sd[f"{a}b_Q"]
    k, v = (np.repeat(np.einsum("btm,nmh->btnh", h, sd[f"{a}{kv}W_{n}"]) + sd[f"{a}{kv}b_{n}"],
                      H // sd[f"{a}{kv}W_{n}"].shape[0], axis=2) for n in "KV")
    if c["positional_embedding_type"] == "rotary":
      q, k = rotate(q), rotate(k)
    scores = np.einsum("bqnh,bknh->bnqk", q, k) / np.sqrt(D)
    if c["positional_embedding_type"] == "alibi":
      start = 2 ** (-8 / H)
      scores = scores + (start ** (np.arange(H) + 1))[:, None, None] * np.minimum(np.arange(T)[None] - np.arange(T)[:, None], 0)
    scores = np.where(np.tril(np.ones((T, T), bool)), scores, -np.inf)
    p = np.exp(scores - scores.max(-1, keepdims=True))
    z = np.einsum("bnqk,bknh->bqnh", p / p.sum(-1, keepdims=True), v)
    out = np.einsum("bqnh,nhm->bqm", z, sd[f"{a}W_O"]) + sd[f"{a}b_O"]
    resid = x if c["parallel_attn_mlp"] else x + out
    x = x + out + mlp(norm(resid, f"blocks.{layer}.ln2"), m)
  return norm(x, "ln_final") @ sd["unembed.W_U"] + sd["unembed.b_U"]


TL_CASES = {
    "rope, interleaved, grouped KV": ModelConfig(**SHAPE, n_kv_heads=2, position=RoPE(layout="interleaved")),
    "p-RoPE, linear scaling": ModelConfig(**SHAPE, position=RoPE(base=100.0, fraction=0.5, partial="p-rope",
                                                                  scaling="linear", factor=2.0)),
    "NoPE": ModelConfig(**SHAPE, position=NoPE()),
    "ALiBi, q/k/v biases": ModelConfig(**SHAPE, qkv_bias=True, position=ALiBi()),
    "sinusoidal": ModelConfig(**SHAPE, position=Sinusoidal()),
    "learned, LayerNorm, parallel, gelu_erf": ModelConfig(**SHAPE, **LAYER, block="parallel", mlp="gelu_erf",
                                                          position=Learned(offset=2)),
    "neox partial RoPE, gelu": ModelConfig(**SHAPE, **LAYER, mlp="gelu", position=RoPE(fraction=0.25)),
    # wavelengths 6.3 (between 32/8 and 32/2: blended), 20, 63 and 199 (scaled)
    "llama3 scaling": ModelConfig(**SHAPE, position=RoPE(base=100.0, scaling="llama3", factor=4.0, low_freq_factor=2.0,
                                                         high_freq_factor=8.0, original_max_len=32)),
}


@pytest.mark.parametrize("name", TL_CASES)
def test_transformer_lens_export_computes_the_same_logits(name, tmp_path):
  model = random_model(TL_CASES[name])
  E.export_model(model, "transformer_lens", str(tmp_path))
  config = json.loads((tmp_path / "config.json").read_text())
  state = load_file(str(tmp_path / "model.safetensors"))
  cfg = model.cfg
  assert state["blocks.0.attn.W_Q"].shape == (cfg.n_heads, cfg.d_model, cfg.dim_per_head)
  assert state["blocks.1.attn.W_O"].shape == (cfg.n_heads, cfg.dim_per_head, cfg.d_model)
  assert state["blocks.0.mlp.W_in"].shape == (cfg.d_model, cfg.ff_dim)
  assert ("blocks.0.attn._W_K" in state) == (cfg.kv_heads != cfg.n_heads)
  assert (config["n_ctx"], config["d_vocab"], config["d_mlp"], config["d_head"], config["d_model"]) == (
      cfg.max_len, cfg.vocab_size, cfg.ff_dim, cfg.dim_per_head, cfg.d_model)
  assert state["embed.W_E"].shape == (cfg.vocab_size, cfg.d_model)
  assert ("pos_embed.W_pos" in state) == (config["positional_embedding_type"] != "rotary")
  if "pos_embed.W_pos" in state:
    assert state["pos_embed.W_pos"].shape == (config["n_ctx"], cfg.d_model)
  pos = cfg.position
  if isinstance(pos, RoPE):   # Q/K rows leave in the half layout, whatever the arm's
    assert config["rotary_adjacent_pairs"] is False
  if isinstance(pos, RoPE) and pos.scaling == "llama3":
    assert config["use_NTK_by_parts_rope"] is True
    assert [config[k] for k in ("NTK_by_parts_factor", "NTK_by_parts_low_freq_factor", "NTK_by_parts_high_freq_factor",
                                "NTK_original_ctx_len")] == [pos.factor, pos.low_freq_factor, pos.high_freq_factor,
                                                             pos.original_max_len]
  assert rel(tl_forward(config, state, TOKENS), logits(model)) < 1e-5


# ----------------------------------------------------------------------------------- refusals

REFUSED = {
    "NoPE, RMSNorm": (ModelConfig(**SHAPE, position=NoPE()), "hf", "NoPE: Llama and Qwen2", "transformer_lens"),
    "p-RoPE, RMSNorm": (ModelConfig(**SHAPE, position=RoPE(fraction=0.5, partial="p-rope")), "hf",
                        "p-RoPE (fraction 0.5): Llama and Qwen2 rotate every dim", "transformer_lens"),
    "learned, SwiGLU": (ModelConfig(**SHAPE, position=Learned()), "hf", "learned positions: Llama", "transformer_lens"),
    "ALiBi, LayerNorm": (ModelConfig(**SHAPE, **LAYER, mlp="gelu", position=ALiBi()), "hf", "ALiBi: GPT-2 and GPT-NeoX",
                         "transformer_lens"),
    "post-norm": (ModelConfig(**SHAPE, **LAYER, mlp="relu", block="post", position=Learned()), "transformer_lens",
                  "post-norm blocks", "none"),
    "ALiBi, 6 heads": (ModelConfig(**{**SHAPE, "n_heads": 6, "d_model": 48}, position=ALiBi()), "transformer_lens",
                       "ALiBi with n_heads=6", "none"),
    "SwiGLU with every bias": (ModelConfig(**SHAPE, bias=True), "hf", "RMSNorm, swiglu, pre-norm blocks, biases",
                               "none"),
    "SwiGLU with every bias, TransformerLens": (ModelConfig(**SHAPE, bias=True), "transformer_lens",
                                                "SwiGLU with biases: TransformerLens's gated MLP", "none"),
    "learned, parallel, LayerNorm": (ModelConfig(**SHAPE, **LAYER, mlp="gelu", block="parallel", position=Learned()),
                                     "hf", "learned positions with parallel blocks: GPT-2 runs attention and MLP",
                                     "transformer_lens"),
    "RoPE, LayerNorm, grouped KV": (ModelConfig(**SHAPE, **LAYER, mlp="gelu", n_kv_heads=2, position=RoPE()), "hf",
                                    "LayerNorm, gelu, pre-norm blocks, biases: no HF family", "transformer_lens"),
}


@pytest.mark.parametrize("name", REFUSED)
def test_a_format_that_cannot_express_an_arm_says_why_and_which_can(name):
  cfg, fmt, why, can = REFUSED[name]
  line = E.refusal(cfg, fmt, "runs/x/arm")
  assert line.startswith(f"runs/x/arm: {why}") and line.endswith(f"; formats that can: {can}") and "\n" not in line


# ------------------------------------------------------------------------------- command line

def test_cli_exports_a_trained_arm_and_refuses_without_touching_anything(tiny_run, tmp_path, capsys):
  rope, nope = str(tiny_run / "rope"), str(tiny_run / "nope")
  out = tmp_path / "hf"
  assert E.main([rope, "--step", "0", "--out", str(out)]) == 0
  assert json.loads((out / "export.json").read_text())["step"] == 0
  assert E.main([rope, "--out", str(out)]) == 0   # a previous export is replaced
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    back, _, _ = importers.load(str(out))
  assert rel(logits(back), logits(checkpoints.load_model(rope)[0])) < 1e-5
  capsys.readouterr()

  other = tmp_path / "other"
  other.mkdir()
  (other / "notes.txt").write_text("keep")
  for argv, first in (([nope, "--out", str(tmp_path / "n")], f"error: {nope}: NoPE: "),
                      ([rope, "--out", str(other)], "error: --out: "),
                      ([rope, "--out", str(tiny_run)], "error: --out: "),
                      ([rope, "--format", "onnx", "--out", str(tmp_path / "n")], "error: --format: "),
                      ([rope, "--step", "7", "--out", str(tmp_path / "n")], "error: step: ")):
    assert E.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(first) and err.count("\n") == 1, err
  assert not (tmp_path / "n").exists() and os.listdir(other) == ["notes.txt"]
  assert E.main([nope, "--format", "transformer_lens", "--out", str(tmp_path / "tl")]) == 0
  assert json.loads((tmp_path / "tl" / "config.json").read_text())["positional_embedding_type"] == "standard"


def test_python_m_train_dispatches_export(tiny_run, tmp_path, monkeypatch, capsys):
  monkeypatch.setattr(sys, "argv", ["train", "export", str(tiny_run / "nope"), "--out", str(tmp_path / "x")])
  with pytest.raises(SystemExit) as stop:
    runpy.run_module("train", run_name="__main__")
  assert stop.value.code == 2 and "formats that can: transformer_lens" in capsys.readouterr().err
