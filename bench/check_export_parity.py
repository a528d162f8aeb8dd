"""`python -m train export` against the libraries it writes for: HF transformers and TransformerLens.

    python3 -m venv /some/env && /some/env/bin/pip install -e '.[hfcheck]' \
        --extra-index-url https://download.pytorch.org/whl/cpu
    /some/env/bin/pip install transformer_lens            # optional: the transformer_lens checks
    /some/env/bin/python bench/check_export_parity.py [--steps 40]

A fresh tiny experiment (RoPE in both pair layouts, NoPE, ALiBi, p-RoPE) is trained through train's
API, each arm exported with `python -m train export`, loaded with AutoModelForCausalLM (and
HookedTransformer), and run on the same tokens as minilm. Random-weight models (at unit scale, so no
logit is negligible) of the other exported families follow. Printed per case: the max |logits
difference| over max |reference logits|, and whether AutoTokenizer encodes as the lab's tokenizer.
Nothing is downloaded.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

TINY = {"seed": 0, "log_every": 10, "data": {"seq_len": 64, "batch_size": 8, "mixture": {"kb_facts": 1.0}, "facts_per_context": 2, "questions_per_context": 1}, "eval": {"n_per_family": 0},
        "model": {"d_model": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "max_len": 64}}
ARMS = {"rope": {}, "rope_interleaved": {"model.position": {"kind": "rope", "layout": "interleaved"}},
        "nope": {"model.position": "nope"}, "alibi": {"model.position": "alibi"},
        "p_rope": {"model.position": {"kind": "rope", "partial": "p-rope", "fraction": 0.5}}}
SAMPLE = "<bos><E17> lives in <A4>. Grüße, <K3>=<V9><eos>"


def random_models():
  """name -> a Decoder with unit-scale random weights, one per exported family and layout."""
  import jax
  from flax import nnx

  from minilm.config import ModelConfig
  from minilm.encodings import Learned, NoPE, RoPE, Sinusoidal
  from minilm.model import Decoder
  shape = dict(vocab_size=512, d_model=64, n_layers=2, n_heads=4, max_len=64)
  layer = dict(norm="layer", bias=True, tie_embeddings=False)
  configs = {
      "qwen2 (q/k/v biases), interleaved": ModelConfig(**shape, qkv_bias=True, position=RoPE(layout="interleaved")),
      "llama rope_scaling llama3": ModelConfig(**shape, position=RoPE(base=500.0, scaling="llama3", factor=8.0,
                                                                     original_max_len=32)),
      "gpt_neox parallel, p-RoPE 0.5 interleaved": ModelConfig(**shape, **layer, mlp="gelu_erf", block="parallel",
                                                               position=RoPE(fraction=0.5, partial="p-rope",
                                                                             layout="interleaved")),
      "gpt_neox sequential, partial 0.25": ModelConfig(**shape, **layer, mlp="gelu", position=RoPE(fraction=0.25)),
      "gpt2 learned": ModelConfig(**shape, **layer, mlp="gelu", position=Learned()),
      "gpt2 sinusoidal": ModelConfig(**shape, **layer, mlp="gelu", position=Sinusoidal()),
      "gpt2 NoPE, relu": ModelConfig(**shape, **layer, mlp="relu", position=NoPE()),
  }
  out = {}
  for i, (name, cfg) in enumerate(configs.items()):
    model = Decoder(cfg, rngs=nnx.Rngs(i))
    leaves, tree = jax.tree.flatten(nnx.state(model, nnx.Param))
    keys = jax.random.split(jax.random.PRNGKey(i), len(leaves))
    nnx.update(model, jax.tree.unflatten(tree, [x + 0.3 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]))
    out[name] = model
  return out


def train_arms(root: str, steps: int) -> dict[str, str]:
  from train.config import load_experiment
  from train.paired import run_experiment
  exp = load_experiment({"name": "export", "train": {**TINY, "steps": steps, "checkpoint": {"every": steps}},
                         "arms": ARMS})
  run_experiment(exp, root, progress=False)
  return {arm: os.path.join(root, "export", arm) for arm in ARMS}


def rel(ours, ref) -> float:
  return float(np.abs(ours - ref).max() / np.abs(ref).max())


def hf_logits(directory: str, tokens_BxT, float64: bool = False):
  import torch
  import transformers
  model = transformers.AutoModelForCausalLM.from_pretrained(directory).eval()
  model = model.double() if float64 else model
  with torch.no_grad():
    return model(torch.as_tensor(np.asarray(tokens_BxT), dtype=torch.long)).logits.numpy()


def tl_logits(directory: str, tokens_BxT):
  import torch
  from safetensors.torch import load_file
  from transformer_lens import HookedTransformer, HookedTransformerConfig
  with open(os.path.join(directory, "config.json")) as f:
    model = HookedTransformer(HookedTransformerConfig(**json.load(f), device="cpu")).eval()
  state = load_file(os.path.join(directory, "model.safetensors"))
  missing, unexpected = model.load_state_dict(state, strict=False)
  assert not unexpected and all(".IGNORE" in k or k.endswith(("mask", "rotary_sin", "rotary_cos")) for k in missing), \
      (unexpected, missing)
  with torch.no_grad():
    return model(torch.as_tensor(np.asarray(tokens_BxT), dtype=torch.long)).numpy()


def check_tokenizer(directory: str) -> bool:
  import transformers

  from train.tokenizer import ByteTokenizer
  tok = transformers.AutoTokenizer.from_pretrained(directory)
  ids = tok(SAMPLE, add_special_tokens=False)["input_ids"]
  return ids == ByteTokenizer().encode(SAMPLE) and tok.decode(ids) == SAMPLE


def export(source, fmt: str, out: str) -> str | None:
  """Export an arm directory (through the command line) or a model; the one-line refusal, or None."""
  from train import checkpoints, export as E
  if isinstance(source, str):
    why = E.refusal(checkpoints.load_config(source).model, fmt, source)
    if why is None:
      assert E.main([source, "--format", fmt, "--out", out]) == 0
    return why
  why = E.refusal(source.cfg, fmt, "model")
  if why is None:
    E.export_model(source, fmt, out)
  return why


def main() -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--steps", type=int, default=40, help="training steps of the fresh arms (default 40)")
  args = ap.parse_args()
  import jax.numpy as jnp

  from train import checkpoints
  try:
    import transformer_lens  # noqa: F401
    formats = ("hf", "transformer_lens")
  except ImportError:
    formats = ("hf",)
    print("transformer_lens not installed: hf checks only")
  tokens_BxT = np.random.default_rng(0).integers(0, 512, (2, 64)).astype(np.int32)
  worst = 0.0
  with tempfile.TemporaryDirectory() as root:
    cases = {f"trained {arm} ({args.steps} steps)": arm_dir for arm, arm_dir in train_arms(root, args.steps).items()}
    cases.update(random_models())
    for name, source in cases.items():
      model = checkpoints.load_model(source)[0] if isinstance(source, str) else source
      ours = np.asarray(model(jnp.asarray(tokens_BxT)))
      for fmt in formats:
        out = os.path.join(root, "out", fmt, name.replace(" ", "_").replace("/", "-"))
        why = export(source, fmt, out)
        if why:
          print(f"{fmt:16s} {name:45s} refused: {why.split(': ', 1)[1]}")
          continue
        if fmt == "hf":
          errors = rel(ours, hf_logits(out, tokens_BxT)), rel(ours, hf_logits(out, tokens_BxT, float64=True))
          note = f"float32 {errors[0]:.2e}  float64 {errors[1]:.2e}  tokenizer {'ok' if check_tokenizer(out) else 'DIFFERS'}"
        else:
          errors = (rel(ours, tl_logits(out, tokens_BxT)),)
          note = f"float32 {errors[0]:.2e}"
        worst = max(worst, *errors)
        print(f"{fmt:16s} {name:45s} {json.load(open(os.path.join(out, 'config.json'))).get('model_type', ''):9s} {note}")
  print(f"max relative error {worst:.2e} ({'ok' if worst < 1e-4 else 'ABOVE 1e-4'})")
  return 0 if worst < 1e-4 else 1


if __name__ == "__main__":
  raise SystemExit(main())
