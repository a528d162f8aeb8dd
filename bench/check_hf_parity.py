"""minilm's HF importer against HF transformers itself: tiny random models of every imported family.

    python3 -m venv /some/env && /some/env/bin/pip install -e '.[hfcheck]' \
        --extra-index-url https://download.pytorch.org/whl/cpu     # CPU torch; not the CUDA build
    /some/env/bin/python bench/check_hf_parity.py [--seq 48] [--batch 2]

Each family is built with transformers (random weights at unit scale, so that no logit is
negligible), saved with save_pretrained as safetensors, loaded with minilm.importers.load, and run
on the same random tokens. Printed per family: the max |logits difference| over max |HF logits|,
against transformers in float32 and in float64. Nothing is downloaded.
"""
from __future__ import annotations

import argparse
import inspect
import math
import sys
import tempfile
import warnings

LLAMA = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=128, max_position_embeddings=128, rope_theta=500.0, tie_word_embeddings=False)
LLAMA3 = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
              original_max_position_embeddings=64)
OPT = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, ffn_dim=128, max_position_embeddings=128,
           word_embed_proj_dim=64)
NEOX = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
            max_position_embeddings=128, rotary_pct=0.25, rotary_emb_base=100)

# name -> (transformers config class, model class, config fields)
FAMILIES = {
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(n_embd=64, n_layer=2, n_head=4, n_positions=128,
                                                   bos_token_id=0, eos_token_id=0)),
    "opt": ("OPTConfig", "OPTForCausalLM", OPT),
    "opt project_in/out": ("OPTConfig", "OPTForCausalLM", {**OPT, "word_embed_proj_dim": 32}),
    "opt post-norm project_in/out (350m)": ("OPTConfig", "OPTForCausalLM",
                                            {**OPT, "word_embed_proj_dim": 32, "do_layer_norm_before": False}),
    "gpt_neox parallel rotary_pct=0.25": ("GPTNeoXConfig", "GPTNeoXForCausalLM", NEOX),
    "gpt_neox sequential rotary_pct=0.25": ("GPTNeoXConfig", "GPTNeoXForCausalLM",
                                            {**NEOX, "use_parallel_residual": False}),
    "llama rope_scaling llama3": ("LlamaConfig", "LlamaForCausalLM", {**LLAMA, "rope_scaling": LLAMA3}),
    "llama rope_scaling linear": ("LlamaConfig", "LlamaForCausalLM",
                                  {**LLAMA, "rope_scaling": dict(rope_type="linear", factor=4.0)}),
}


def unit_scale(model, seed: int) -> None:
  """Replace the tiny initializer_range weights: matrices N(0, 1/fan_in), norms near 1, biases 0.3."""
  import torch
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=gen)
      if p.ndim == 2:
        p.copy_(noise / math.sqrt(min(p.shape)))
      elif name.endswith("weight"):
        p.copy_(1 + 0.3 * noise)
      else:
        p.copy_(0.3 * noise)


def save(model, directory: str) -> None:
  # transformers 5 always writes safetensors and has no safe_serialization argument
  takes = "safe_serialization" in inspect.signature(model.save_pretrained).parameters
  model.save_pretrained(directory, **({"safe_serialization": True} if takes else {}))


def check(name: str, vocab: int, tokens_BxT, seed: int) -> tuple[float, float]:
  """(rel err vs transformers float32, rel err vs transformers float64) of one family."""
  import jax.numpy as jnp
  import numpy as np
  import torch
  import transformers

  from minilm.importers import load
  config_cls, model_cls, fields = FAMILIES[name]
  config = getattr(transformers, config_cls)(vocab_size=vocab, **fields)
  torch.manual_seed(seed)
  hf = getattr(transformers, model_cls)(config).eval()
  unit_scale(hf, seed)
  with tempfile.TemporaryDirectory() as directory:
    save(hf, directory)
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")  # no tokenizer.json: tokens in, logits out
      model, _, _ = load(directory)
  ours = np.asarray(model(jnp.asarray(tokens_BxT)), np.float64)
  errors = []
  for dtype in (torch.float32, torch.float64):
    with torch.no_grad():
      ref = hf.to(dtype)(torch.as_tensor(tokens_BxT)).logits.double().numpy()
    errors.append(float(np.abs(ours - ref).max() / np.abs(ref).max()))
  return errors[0], errors[1]


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--seq", type=int, default=48)
  p.add_argument("--batch", type=int, default=2)
  p.add_argument("--vocab", type=int, default=300)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--limit", type=float, default=1e-4, help="max relative error that passes")
  args = p.parse_args()
  import numpy as np
  import transformers
  transformers.logging.set_verbosity_error()
  transformers.logging.disable_progress_bar()
  tokens_BxT = np.random.default_rng(args.seed).integers(0, args.vocab, (args.batch, args.seq))
  print(f"transformers {transformers.__version__}; logits [{args.batch}, {args.seq}, {args.vocab}]")
  print(f"{'family':40s} {'rel err vs f32':>15s} {'vs f64':>10s}")
  worst = 0.0
  for name in FAMILIES:
    f32, f64 = check(name, args.vocab, tokens_BxT, args.seed)
    worst = max(worst, f32)
    print(f"{name:40s} {f32:15.2e} {f64:10.2e}")
  print(f"worst {worst:.2e}: {'PASS' if worst <= args.limit else 'FAIL'} (limit {args.limit:g})")
  sys.exit(0 if worst <= args.limit else 1)


if __name__ == "__main__":
  main()
