"""HF-format import: a tiny random Llama checkpoint written as config.json + safetensors + tokenizer.json
(helpers.write_checkpoint) round-trips through minilm.importers.load and matches an independent
float64 numpy forward pass (helpers.numpy_llama_forward)."""
import json

import jax.numpy as jnp
import numpy as np
import pytest

from helpers import CFG, TEXT, llama_reference, llama_tolerance, one_line_error, write_checkpoint
from minilm.importers import load


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
