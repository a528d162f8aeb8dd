"""The capture driver: one jitted forward per probe batch, sums of squares on the device, into the
store (massive.store); then the tidy table and the summary from the sums on disk."""
from __future__ import annotations

import functools
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from analysis.massive import sinks as SK
from analysis.massive import stats as S
from analysis.massive.store import TOKEN_POINTS, Store, layer_tensor_keys, pairing_of, stat_config, write_rows
from minilm import atomic, capture, hooks
from minilm.schema import ConfigError, check, to_dict
from train import tensorboard

ROW_KEYS = ("arm", "step", "layer", "tensor", "head", "position", "pairing", "norm")
NULL_KEYS = ("lf_null", "band_null", "agree_chance", "ctx_pair", "ctx2_pair", "n_pairs")
N_BOOT = 1000
"""Bootstrap replicates for the summary intervals (prompts and heads resampled)."""


# ---------------------------------------------------------------------------------- device part

@functools.partial(jax.jit, static_argnames=("graphdef", "drop_first", "sinks"))
def _batch_sums(graphdef, state, tokens_BxT, mask_BxT, drop_first, sinks):
  model = nnx.merge(graphdef, state)
  _, cache = capture.run(model, tokens_BxT, points=hooks.QKV + (SK.POINTS if sinks else ()))
  per_layer = jax.vmap(lambda x: S.sum_squares(x, drop_first=drop_first, mask=mask_BxT))
  out = {t: per_layer(cache.stack(t)) for t in hooks.QKV}
  return {**out, **SK.device_stats(cache, mask_BxT)} if sinks else out


def capture_sums(model, probes_NxT, mask_NxT=None, *, drop_first: bool = False, batch_size: int = 16,
                 timing: dict | None = None, sinks: bool = False) -> dict[str, np.ndarray]:
  """Per-prompt sums of squares {hook name: [N, H, D] float32} of q, k, v, rot_q, rot_k (keys
  minilm.hooks.name(layer, tensor)); with `sinks`, also the per-prompt '<layer>.<field>' of
  analysis.massive.sinks.FIELDS from the same forward.

  One jitted forward per batch (the last batch is padded with masked rows, so nothing recompiles);
  only [L, B, H, D] per tensor leaves the device. `timing` (a dict) accumulates 'forward_s' and,
  for calls that compiled, 'compile_forward_s' (seconds, transfers of the sums included).
  """
  probes = np.asarray(probes_NxT, np.int32)
  if probes.ndim != 2:
    raise ValueError(f"probes: expected [N, T] token ids; got shape {probes.shape}")
  mask = np.ones(probes.shape, np.float32) if mask_NxT is None else np.asarray(mask_NxT, np.float32)
  if mask.shape != probes.shape:
    raise ValueError(f"mask: expected shape {probes.shape}; got {mask.shape}")
  N, B = len(probes), min(batch_size, len(probes))
  pad = -N % B
  probes = np.concatenate([probes, np.zeros((pad, probes.shape[1]), np.int32)])
  mask = np.concatenate([mask, np.zeros((pad, mask.shape[1]), np.float32)])
  graphdef, state = nnx.split(model)
  chunks = {}
  for i in range(0, len(probes), B):
    compiled, start = _batch_sums._cache_size(), time.perf_counter()
    out = _batch_sums(graphdef, state, jnp.asarray(probes[i:i + B]), jnp.asarray(mask[i:i + B]), drop_first,
                      sinks)
    for name, x in out.items():
      chunks.setdefault(name, []).append(np.asarray(x))
    if timing is not None:   # a call that grew the jit cache paid for compilation
      key = "compile_forward_s" if _batch_sums._cache_size() > compiled else "forward_s"
      timing[key] = timing.get(key, 0.0) + time.perf_counter() - start
  sums = {}
  for name, parts in chunks.items():
    stacked = np.concatenate(parts, axis=1)[:, :N]   # [L, N, ...]
    for layer, s in enumerate(stacked):   # sinks fields are statistics, not capture points
      sums[hooks.name(layer, name) if name in hooks.QKV else f"{layer}.{name}"] = s
  return sums


def token_values(model, tokens_T) -> dict[str, np.ndarray]:
  """|x| [L, T, H, D] (float16) of one prompt for TOKEN_POINTS, the 3D bar view's data, and its
  attention on the first tokens 'attn' [L, H, P, P] (analysis.massive.sinks.patterns)."""
  _, cache = capture.run(model, jnp.asarray(tokens_T, jnp.int32)[None], points=TOKEN_POINTS + ("attn",))
  return {**{t: np.abs(np.asarray(cache.stack(t))[:, 0]).astype(np.float16) for t in TOKEN_POINTS},
          "attn": SK.patterns(cache.stack("attn"))}


# ------------------------------------------------------------------------------------ host part

def arm_facts(model, context: float) -> dict:
  """What the statistics need to know about a model, JSON-ready. `context`: the tokens against which
  rotary wavelengths are compared (the context the model was trained on)."""
  cfg = model.cfg
  return {"position": cfg.position.kind, "position_cfg": to_dict(cfg)["position"],
          "n_layers": cfg.n_layers, "n_heads": cfg.n_heads, "kv_heads": cfg.kv_heads,
          "head_dim": cfg.dim_per_head, "context": float(context)}


def rows_for(sums: dict, facts: dict, cfg: S.StatConfig, arm: str, step: int) -> list[dict]:
  """The tidy rows of one (arm, step): one per layer x tensor x head."""
  pairing, context = pairing_of(facts), facts["context"]
  rows = []
  for layer, tensor in layer_tensor_keys(sums):
    M = np.sqrt(sums[hooks.name(layer, tensor)].astype(np.float64).sum(0))
    st = S.head_stats(M, pairing, context, cfg)
    null = st["null"]
    for h in range(M.shape[0]):
      row = {"arm": arm, "step": step, "layer": layer, "tensor": tensor, "head": h,
             "position": facts["position"], "pairing": pairing.label, "norm": float(np.sqrt((M[h] ** 2).sum()))}
      row.update({k: float(st[k][h]) for k in S.PER_HEAD})
      row.update({"lf_null": null["lf_share"], "band_null": null["band_share"],
                  "agree_chance": null["agreement"], "ctx_pair": null["ctx_pair"],
                  "ctx2_pair": null["ctx2_pair"], "n_pairs": null["n_pairs"]})
      rows.append(row)
  return rows


def summary_for(sums: dict, facts: dict, cfg: S.StatConfig, arm: str, step: int,
                n_boot: int = N_BOOT) -> list[dict]:
  """Per layer x tensor: {stat: [head mean, lo, hi]} (95% bootstrap over prompts and heads)."""
  pairing, context = pairing_of(facts), facts["context"]
  n_prompts = len(next(iter(sums.values())))
  counts = S.prompt_counts(n_prompts, n_boot, S.BOOT_SEED)
  groups = []
  for layer, tensor in layer_tensor_keys(sums):
    s = sums[hooks.name(layer, tensor)]
    pooled = S.pooled([s], S.PER_HEAD, pairing, context, cfg, counts, S.BOOT_SEED)
    M = np.sqrt(s.astype(np.float64).sum(0))
    E = S.pair_energy(M, pairing.pair_index)
    share = (E / np.maximum(E.sum(-1, keepdims=True), 1e-300)).mean(0)
    groups.append({"arm": arm, "step": step, "layer": layer, "tensor": tensor, "heads": int(M.shape[0]),
                   "stats": {k: [v, *S.interval(reps)] for k, (v, reps) in pooled.items()},
                   "null": S.head_stats(M, pairing, context, cfg)["null"],
                   "pair_share": share.tolist()})
  return groups


# ----------------------------------------------------------------------------- output directory


def rebuild(store: Store, n_boot: int = N_BOOT, arms=None) -> tuple[list[dict], list[dict]]:
  """table.csv and summary.json from every cached (arm, step) of every arm (or of `arms`): cheap,
  so settings of the statistics (lam, bands, ...) can change without another forward pass."""
  meta = store.meta()
  cfg = stat_config(meta)
  if arms is not None:
    meta["arms"] = {a: facts for a, facts in meta["arms"].items() if a in arms}
  rows, groups = [], []
  for arm, facts in meta["arms"].items():
    for step in store.steps(arm):
      sums = store.load_sums(arm, step)
      rows += rows_for(sums, facts, cfg, arm, step)
      groups += summary_for(sums, facts, cfg, arm, step, n_boot)
  write_table(store.path("table.csv"), rows)
  store.write_json("summary.json", {"stats": meta["stats"], "n_boot": n_boot,
                                    "arms": meta["arms"], "groups": groups})
  SK.rebuild(store, meta["arms"], cfg, n_boot)
  tensorboard.write_trace(store.path("tensorboard"), groups)
  return rows, groups


def write_table(path: str, rows: list[dict]) -> None:
  write_rows(path, rows, list(ROW_KEYS) + list(S.PER_HEAD) + list(NULL_KEYS))


# ---------------------------------------------------------------------------------- entry points

def trace_model(model, probes_NxT, *, mask_NxT=None, arm: str = "model", step: int = 0,
                context: float | None = None, stat_cfg: S.StatConfig = S.StatConfig(),
                batch_size: int = 16) -> list[dict]:
  """Table rows of any Decoder on any probe tokens (no files): one per layer x tensor x head.

  context: tokens for the wavelength boundary (default: the probe length; for trained arms,
  trace_run uses their training seq_len).
  """
  probes = np.asarray(probes_NxT)
  sums = capture_sums(model, probes, mask_NxT, drop_first=stat_cfg.drop_first, batch_size=batch_size)
  return rows_for(sums, arm_facts(model, context or probes.shape[1]), stat_cfg, arm, step)


def record_step(store: Store, model, arm: str, step: int, *, context: float, final: bool,
                batch_size: int = 16, timing: dict | None = None) -> None:
  """Capture one (arm, step) into the store (sums, sinks, arm facts, and the token view if final).

  The sums are written after the token view and the sinks, so a step whose sums are on disk is
  complete."""
  meta = store.meta()
  probes, mask = store.probes(), store.mask()
  facts = arm_facts(model, context)
  known = meta["arms"].get(arm)
  if known and {k: v for k, v in known.items() if k not in ("seed", "run_key")} != facts:   # trace_run's, from the run
    raise ConfigError(f"arm: {arm!r} in {store.root} was traced from another model ({known['position']}, "
                      f"{known['n_layers']} layers); use another --out")
  if not known:
    meta["arms"][arm] = facts
    store.write_json("meta.json", meta)
  out = capture_sums(model, probes, mask, drop_first=meta["capture"]["drop_first"], batch_size=batch_size,
                     timing=timing, sinks=True)
  sinks = {k: v for k, v in out.items() if k.split(".", 1)[1] in SK.FIELDS}
  if final:
    save_tokens(store, model, arm, step)
  atomic.save_npz(store.sinks_path(arm, step), **sinks)
  store.save_sums(arm, step, {k: v for k, v in out.items() if k not in sinks})


def save_tokens(store: Store, model, arm: str, step: int) -> None:
  """tokens/<arm>.npz: the token view of probe 0 at `step` (the 3D bar figure's data)."""
  probes = store.probes()
  atomic.save_npz(store.tokens_path(arm), step=step, tokens=probes[0], **token_values(model, probes[0]))


# ------------------------------------------------------------------------------- run directories


def attention_bytes(model_cfg, length: int, batch: int) -> int:
  """Bytes of the largest tensors of one captured forward: logits, probabilities and their
  softmax temporaries, [batch, heads, length, length] float32 each."""
  return 3 * 4 * batch * model_cfg.n_heads * length * length


def memory_bytes() -> int:
  """Physical memory of this machine."""
  return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def check_length(model_cfg, length: int, batch: int, field: str = "--length", batch_field: str = "--batch") -> None:
  """A probe length the model and this machine can take, checked before anything is allocated:
  bounded position encodings stop at max_len, and the T x T attention of one batch must fit in
  half of the memory (the other half holds weights, caches and the rest of the process)."""
  check(length >= 2, field, f"must be >= 2; got {length}")
  check(not model_cfg.position.bounded or length <= model_cfg.max_len, field,
        f"must be <= model.max_len={model_cfg.max_len} for position encoding {model_cfg.position.kind!r}; "
        f"got {length}")
  need, budget = attention_bytes(model_cfg, length, batch), memory_bytes() // 2
  fits = int(np.sqrt(budget / attention_bytes(model_cfg, 1, batch)))
  check(need <= budget, field, f"{length} tokens need about {need / 2**30:.0f} GiB for the attention of one "
        f"batch of {batch}; at most {fits} tokens fit in half of this machine's {memory_bytes() / 2**30:.0f} GiB "
        f"(or lower {batch_field})")


