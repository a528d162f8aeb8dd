"""Trace checkpoints: one jitted forward per probe batch, norms on device, a tidy table on the host.

Output directory (everything plots and claims need, so they never touch a model):
  probes.npy, mask.npy       the probe tokens [N, T] and the tokens counted (1) or padding (0)
  meta.json                  capture settings, statistic settings, per-arm model facts and pairing
  sums/<arm>/<step>.npz      per-prompt sums of squares '<layer>.<tensor>' -> [N, H, D] (the cache)
  sinks/<arm>/<step>.npz     per-prompt sink shares and largest residual activations (analysis.sinks)
  tokens/<arm>.npz           |x| of probe 0 for q, rot_q, rot_k, v: [L, T, H, D] float16, and its
                             attention 'attn' on the first tokens [L, H, P, P], final step
  table.csv                  one row per arm x step x layer x tensor x head (columns: ROW_KEYS,
                             stats.PER_HEAD, NULL_KEYS)
  summary.json               per arm x step x layer x tensor: each statistic's head mean and
                             bootstrap interval over prompts and heads; the pair-energy profile
  sinks.json, sinks.csv, resid.csv   attention sinks and residual massive activations (analysis.sinks)
  timing.jsonl               per invocation: seconds restoring, in the forward pass (compiling
                             calls apart), in statistics, in plots and claims
"""
from __future__ import annotations

import csv
import dataclasses
import functools
import io
import json
import os
import sys
import time
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from analysis import sinks as SK
from analysis import stats as S
from minilm import atomic, capture
from minilm.config import ConfigError, check, to_dict
from train import tensorboard

TENSORS = ("q", "k", "v", "rot_q", "rot_k")
TOKEN_TENSORS = ("q", "rot_q", "rot_k", "v")
ROW_KEYS = ("arm", "step", "layer", "tensor", "head", "position", "pairing", "norm")
NULL_KEYS = ("lf_null", "band_null", "agree_chance", "ctx_pair", "ctx2_pair", "n_pairs")
N_BOOT = 1000
"""Bootstrap replicates for the summary intervals (prompts and heads resampled)."""
BOOT_SEED = 0


# ---------------------------------------------------------------------------------- device part

@functools.partial(jax.jit, static_argnames=("graphdef", "drop_first", "sinks"))
def _batch_sums(graphdef, state, tokens_BxT, mask_BxT, drop_first, sinks):
  model = nnx.merge(graphdef, state)
  _, cache = capture.run(model, tokens_BxT, points=TENSORS + (SK.POINTS if sinks else ()))
  per_layer = jax.vmap(lambda x: S.sum_squares(x, drop_first=drop_first, mask=mask_BxT))
  out = {t: per_layer(cache.stack(f"attn.{t}")) for t in TENSORS}
  return {**out, **SK.device_stats(cache, mask_BxT)} if sinks else out


def capture_sums(model, probes_NxT, mask_NxT=None, *, drop_first: bool = False, batch_size: int = 16,
                 timing: dict | None = None, sinks: bool = False) -> dict[str, np.ndarray]:
  """Per-prompt sums of squares {'<layer>.<tensor>': [N, H, D] float32} of q, k, v, rot_q, rot_k;
  with `sinks`, also the per-prompt '<layer>.<field>' of analysis.sinks.FIELDS from the same forward.

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
    for layer, s in enumerate(stacked):
      sums[f"{layer}.{name}"] = s
  return sums


def token_values(model, tokens_T) -> dict[str, np.ndarray]:
  """|x| [L, T, H, D] (float16) of one prompt for TOKEN_TENSORS, the 3D bar view's data, and its
  attention on the first tokens 'attn' [L, H, P, P] (analysis.sinks.patterns)."""
  _, cache = capture.run(model, jnp.asarray(tokens_T, jnp.int32)[None], points=TOKEN_TENSORS + ("attn",))
  return {**{t: np.abs(np.asarray(cache.stack(f"attn.{t}"))[:, 0]).astype(np.float16) for t in TOKEN_TENSORS},
          "attn": SK.patterns(cache.stack("attn.attn"))}


# ------------------------------------------------------------------------------------ host part

def arm_facts(model, context: float) -> dict:
  """What the statistics need to know about a model, JSON-ready. `context`: the tokens against which
  rotary wavelengths are compared (the context the model was trained on)."""
  cfg = model.cfg
  return {"position": cfg.position.kind, "position_cfg": to_dict(cfg)["position"],
          "n_layers": cfg.n_layers, "n_heads": cfg.n_heads, "kv_heads": cfg.kv_heads,
          "head_dim": cfg.dim_per_head, "context": float(context)}


def pairing_of(facts: dict) -> S.Pairing:
  from minilm.config import from_dict
  from minilm.encodings import PositionConfig
  return S.pairing_for(from_dict(PositionConfig, facts["position_cfg"]), facts["head_dim"])


def layer_tensor_keys(sums: dict):
  """[(layer, tensor)] in layer, then TENSORS order."""
  keys = [(int(k.split(".")[0]), k.split(".", 1)[1]) for k in sums]
  return sorted(keys, key=lambda lt: (lt[0], TENSORS.index(lt[1])))


def rows_for(sums: dict, facts: dict, cfg: S.StatConfig, arm: str, step: int) -> list[dict]:
  """The tidy rows of one (arm, step): one per layer x tensor x head."""
  pairing, context = pairing_of(facts), facts["context"]
  rows = []
  for layer, tensor in layer_tensor_keys(sums):
    M = np.sqrt(sums[f"{layer}.{tensor}"].astype(np.float64).sum(0))
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
  counts = S.prompt_counts(n_prompts, n_boot, BOOT_SEED)
  groups = []
  for layer, tensor in layer_tensor_keys(sums):
    s = sums[f"{layer}.{tensor}"]
    pooled = S.pooled([s], S.PER_HEAD, pairing, context, cfg, counts, BOOT_SEED)
    M = np.sqrt(s.astype(np.float64).sum(0))
    E = S.pair_energy(M, pairing.pair_index)
    share = (E / np.maximum(E.sum(-1, keepdims=True), 1e-300)).mean(0)
    groups.append({"arm": arm, "step": step, "layer": layer, "tensor": tensor, "heads": int(M.shape[0]),
                   "stats": {k: [v, *S.interval(reps)] for k, (v, reps) in pooled.items()},
                   "null": S.head_stats(M, pairing, context, cfg)["null"],
                   "pair_share": share.tolist()})
  return groups


# ----------------------------------------------------------------------------- output directory

@dataclasses.dataclass(frozen=True)
class Store:
  """Paths of one analysis output directory."""
  root: str

  def path(self, *parts) -> str:
    return os.path.join(self.root, *parts)

  def sums_path(self, arm: str, step: int) -> str:
    return self.path("sums", arm, f"{step:08d}.npz")

  def steps(self, arm: str) -> list[int]:
    folder = self.path("sums", arm)
    if not os.path.isdir(folder):
      return []
    return sorted(int(f[:-4]) for f in os.listdir(folder) if f.endswith(".npz") and f[:-4].isdigit())

  def tokens_path(self, arm: str) -> str:
    return self.path("tokens", f"{arm}.npz")

  def load_sums(self, arm: str, step: int) -> dict:
    with np.load(self.sums_path(arm, step)) as z:
      return {k: z[k] for k in z.files}

  def save_sums(self, arm: str, step: int, sums: dict) -> None:
    atomic.save_npz(self.sums_path(arm, step), **sums)

  def sinks_path(self, arm: str, step: int) -> str:
    return self.path("sinks", arm, f"{step:08d}.npz")

  def has_sinks(self, arm: str, step: int) -> bool:
    return _readable(self.sinks_path(arm, step), set())

  def load_sinks(self, arm: str, step: int) -> dict:
    with np.load(self.sinks_path(arm, step)) as z:
      return {k: z[k] for k in z.files}

  def good_steps(self, arm: str, keys: set[str]) -> list[int]:
    """The steps of `arm` whose sums file reads back whole with every key in `keys` and whose sinks
    file reads back; a damaged sums file (cut short by a full disk, or edited by hand) is moved aside
    as '<step>.npz.damaged' and redone, a step traced before sinks were captured is redone."""
    good = []
    for step in self.steps(arm):
      if not _readable(self.sums_path(arm, step), keys):
        os.replace(self.sums_path(arm, step), self.sums_path(arm, step) + ".damaged")
      elif self.has_sinks(arm, step):
        good.append(step)
    return good

  def token_step(self, arm: str) -> int | None:
    """The step of the token view of `arm` on disk, or None if it is missing or damaged."""
    try:
      with np.load(self.tokens_path(arm)) as z:
        return int(z["step"]) if set(TOKEN_TENSORS) <= set(z.files) else None
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError):
      return None

  def meta(self) -> dict:
    if not os.path.exists(self.path("meta.json")):
      return {}
    with open(self.path("meta.json")) as f:
      return json.load(f)

  def require(self) -> "Store":
    """self, or a one-line error if this is not a traced directory."""
    try:
      traced = "arms" in self.meta() and os.path.exists(self.path("summary.json"))
    except (OSError, ValueError):   # a meta.json that is not JSON
      traced = False
    if not traced:
      raise FileNotFoundError(f"out: {self.root} is not a traced directory (no meta.json with arms and "
                              "summary.json); run `python -m analysis trace` first")
    return self

  def write_json(self, name: str, data) -> None:
    atomic.write_json(self.path(name), data, default=_json_default)


def _readable(path: str, keys: set[str]) -> bool:
  try:
    with np.load(path) as z:
      return keys <= set(z.files) and all(np.isfinite(z[k]).all() for k in keys)
  except (OSError, ValueError, zipfile.BadZipFile, EOFError):
    return False


def _json_default(x):
  if isinstance(x, np.generic):
    return x.item()
  if isinstance(x, np.ndarray):
    return x.tolist()
  raise TypeError(f"not JSON serialisable: {type(x)}")


def _capture_settings(probes, mask, drop_first) -> dict:
  return {"n_probes": int(probes.shape[0]), "length": int(probes.shape[1]), "drop_first": bool(drop_first),
          "probe_checksum": int(np.asarray(probes, np.int64).sum() * 31 + np.asarray(mask).sum())}


def open_store(out_dir: str, probes, mask, drop_first: bool, stat_cfg: S.StatConfig,
               extra: dict | None = None) -> Store:
  """Create or reopen an output directory; refuse to mix captures made with other probes/settings."""
  store = Store(out_dir)
  capture_cfg = _capture_settings(probes, mask, drop_first)
  meta = store.meta()
  if meta and meta.get("capture") != capture_cfg:
    raise ConfigError(f"out: {out_dir} holds a trace with other probes or capture settings "
                      f"({meta.get('capture')}); use another --out or delete it")
  atomic.save_npy(store.path("probes.npy"), np.asarray(probes, np.int32))
  atomic.save_npy(store.path("mask.npy"), np.asarray(mask, np.float32))
  meta.update({"capture": capture_cfg, "stats": to_dict(stat_cfg),
               "arms": meta.get("arms", {}), **(extra or {})})
  store.write_json("meta.json", meta)
  return store


def stat_config(meta: dict) -> S.StatConfig:
  from minilm.config import from_dict
  return from_dict(S.StatConfig, meta["stats"])


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


def write_rows(path: str, rows: list[dict], columns: list[str] | None = None) -> None:
  """A CSV file of `rows` (columns: `columns`, default the first row's keys), written atomically."""
  columns = columns or list(rows[0])
  text = io.StringIO(newline="")
  writer = csv.DictWriter(text, fieldnames=columns)
  writer.writeheader()
  writer.writerows(rows)
  atomic.write_text(path, text.getvalue())


def read_table(path: str) -> list[dict]:
  with open(path, newline="") as f:
    return list(csv.DictReader(f))


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
  probes, mask = np.load(store.path("probes.npy")), np.load(store.path("mask.npy"))
  facts = arm_facts(model, context)
  known = meta["arms"].get(arm)
  if known and known != facts:
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
  probes = np.load(store.path("probes.npy"))
  atomic.save_npz(store.tokens_path(arm), step=step, tokens=probes[0], **token_values(model, probes[0]))


def analyze_model(model, probes_NxT, out_dir: str, *, mask_NxT=None, arm: str = "model", step: int = 0,
                  context: float | None = None, stat_cfg: S.StatConfig = S.StatConfig(),
                  batch_size: int = 16, plots: bool = True, claims: bool = True) -> Store:
  """A single model as one arm and one step: the same files a traced run gets (table, summary,
  plots, claims). For pretrained imports such as SmolLM2."""
  probes = np.asarray(probes_NxT, np.int32)
  mask = np.ones(probes.shape, np.float32) if mask_NxT is None else np.asarray(mask_NxT, np.float32)
  store = open_store(out_dir, probes, mask, stat_cfg.drop_first, stat_cfg)
  record_step(store, model, arm, step, context=context or probes.shape[1], final=True, batch_size=batch_size)
  rebuild(store)
  finish(store, plots=plots, claims=claims)
  return store


def finish(store: Store, *, plots: bool = True, claims: bool = True, rope_arm=None, nope_arm=None) -> None:
  if plots:
    from analysis import plots as P
    P.plot_all(store)
  if claims:
    from analysis import claims as CL
    CL.write_claims(CL.evaluate(store, rope_arm=rope_arm, nope_arm=nope_arm), store.root)


# ------------------------------------------------------------------------------- run directories

def all_arms(run_dir: str) -> dict[str, str]:
  """{arm name: arm dir} of a paired run (experiment.json + arm dirs) or of a single arm dir, in the
  experiment's order, diverged arms included."""
  run_dir = os.path.normpath(run_dir)
  if os.path.exists(os.path.join(run_dir, "config.json")) and os.path.isdir(os.path.join(run_dir, "checkpoints")):
    return {os.path.basename(run_dir): run_dir}
  if not os.path.isdir(run_dir):
    raise ConfigError(f"run_dir: {run_dir} is not a directory")
  order = []
  if os.path.exists(os.path.join(run_dir, "experiment.json")):
    with open(os.path.join(run_dir, "experiment.json")) as f:
      order = list(json.load(f).get("arms", {}))
  found = sorted(d for d in os.listdir(run_dir) if os.path.exists(os.path.join(run_dir, d, "config.json")))
  arms = [a for a in order if a in found] + [a for a in found if a not in order]
  if not arms:
    raise ConfigError(f"run_dir: {run_dir} has no arm (a folder with config.json and checkpoints/)")
  return {a: os.path.join(run_dir, a) for a in arms}


def diverged_arms(run_dir: str) -> dict[str, dict]:
  """{arm: its divergence record (train.checkpoints.divergence)} of the arms whose training diverged."""
  from train import checkpoints as ck
  records = {arm: ck.divergence(arm_dir) for arm, arm_dir in all_arms(run_dir).items()}
  return {arm: r for arm, r in records.items() if r}


def run_arms(run_dir: str) -> dict[str, str]:
  """all_arms without the diverged ones: what every analysis reads (a diverged arm's checkpoints
  are finite, but it stopped early and gets no verdict)."""
  diverged = diverged_arms(run_dir)
  arms = {a: d for a, d in all_arms(run_dir).items() if a not in diverged}
  check(bool(arms), "run_dir", f"every arm of {run_dir} diverged, so there is nothing to analyse: " +
        "; ".join(r.get("message", f"{a} diverged") for a, r in diverged.items()))
  return arms


PROBE_SEED = 0
"""Default seed of train.data.probe_tokens for the probe set."""


def attention_bytes(model_cfg, length: int, batch: int) -> int:
  """Bytes of the largest tensors of one captured forward: logits, probabilities and their
  softmax temporaries, [batch, heads, length, length] float32 each."""
  return 3 * 4 * batch * model_cfg.n_heads * length * length


def memory_bytes() -> int:
  """Physical memory of this machine."""
  return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def check_length(model_cfg, length: int, batch: int, field: str = "--length") -> None:
  """A probe length the model and this machine can take, checked before anything is allocated:
  bounded position encodings stop at max_len, and the T x T attention of one batch must fit in
  half of the memory (the other half holds weights, caches and the rest of the process)."""
  from flax import nnx
  check(length >= 2, field, f"must be >= 2; got {length}")
  bounded = nnx.eval_shape(lambda: model_cfg.position.build(model_cfg, nnx.Rngs(0))).bounded
  check(not bounded or length <= model_cfg.max_len, field,
        f"must be <= model.max_len={model_cfg.max_len} for position encoding {model_cfg.position.kind!r}; "
        f"got {length}")
  need, budget = attention_bytes(model_cfg, length, batch), memory_bytes() // 2
  fits = int(np.sqrt(budget / attention_bytes(model_cfg, 1, batch)))
  check(need <= budget, field, f"{length} tokens need about {need / 2**30:.0f} GiB for the attention of one "
        f"batch of {batch}; at most {fits} tokens fit in half of this machine's {memory_bytes() / 2**30:.0f} GiB "
        "(or lower --batch)")


@dataclasses.dataclass(frozen=True)
class RunPlan:
  """What trace_run will capture, every input checked before anything is written."""
  arms: dict[str, str]             # arm name -> arm dir
  configs: dict                    # arm name -> TrainConfig
  wanted: dict[str, list[int]]     # arm name -> checkpoint steps to capture
  length: int


def plan_run(run_dir: str, *, n_probes: int, length: int | None, batch_size: int, steps=None) -> RunPlan:
  """Check a trace request against the run on disk (one line per problem) without writing."""
  from train import checkpoints as ck
  check(n_probes >= 2, "--probes", f"must be >= 2 (intervals resample prompts); got {n_probes}")
  check(batch_size >= 1, "--batch", f"must be >= 1; got {batch_size}")
  chosen = run_arms(run_dir)
  configs = {arm: ck.load_config(arm_dir) for arm, arm_dir in chosen.items()}
  available = {arm: ck.available_steps(arm_dir) for arm, arm_dir in chosen.items()}
  empty = [arm for arm, steps_ in available.items() if not steps_]
  check(len(empty) < len(chosen), "run_dir", f"arm {empty[0]!r} has no complete checkpoint in "
        f"{chosen[empty[0]]}/checkpoints" if len(empty) == 1 else f"no arm of {run_dir} has a complete checkpoint")
  for arm in empty:   # e.g. traced while training goes on: the arms not started yet come later
    print(f"note: arm {arm!r} has no checkpoint yet; it is not traced", file=sys.stderr)
    del chosen[arm], configs[arm]
  wanted = {}
  for arm, arm_dir in chosen.items():
    missing = sorted(set(steps or ()) - set(available[arm]))
    check(not missing, "--steps", f"arm {arm!r} has no checkpoint {', '.join(map(str, missing))}; "
          f"available: {', '.join(map(str, available[arm]))}")
    wanted[arm] = [s for s in available[arm] if steps is None or s in steps]
  length = length or min(cfg.data.seq_len for cfg in configs.values())
  for cfg in configs.values():
    check_length(cfg.model, length, min(batch_size, n_probes))
  return RunPlan(chosen, configs, wanted, length)


def trace_run(run_dir: str, out_dir: str | None = None, *, n_probes: int = 64, length: int | None = None,
              probe_seed: int = PROBE_SEED, stat_cfg: S.StatConfig = S.StatConfig(), batch_size: int = 16,
              steps=None, plots: bool = True, claims: bool = True, rope_arm=None, nope_arm=None,
              log=print) -> Store:
  """Restore every checkpoint of every arm that did not diverge, capture the probes, write
  table/summary/plots/claims.

  Resumable, deciding from what is on disk: (arm, step) whose sums read back whole are skipped, a
  damaged sums file is redone, and each arm's token view is redone unless it holds its last step.
  The probe set comes from the first arm's data config (train.data.probe_tokens), length defaulting
  to the shortest seq_len of the arms; it is saved as probes.npy and reused on later runs. Each arm's
  wavelength boundary is its own training seq_len (a context sweep moves it).
  """
  from train import checkpoints as ck
  from train.data import probe_tokens
  from train.tokenizer import Tokenizer
  t0 = time.perf_counter()
  plan = plan_run(run_dir, n_probes=n_probes, length=length, batch_size=batch_size, steps=steps)
  out_dir = out_dir or os.path.join(run_dir, "analysis")
  atomic.check_out_dir(out_dir)
  if os.path.exists(os.path.join(out_dir, "probes.npy")):
    probes = np.load(os.path.join(out_dir, "probes.npy"))
  else:
    first = next(iter(plan.configs.values()))
    probes = np.asarray(probe_tokens(first.data, probe_seed, n_probes, plan.length), np.int32)
  mask = (probes != Tokenizer().PAD).astype(np.float32)
  store = open_store(out_dir, probes, mask, stat_cfg.drop_first, stat_cfg,
                     {"run_dir": os.path.abspath(run_dir), "probe_seed": probe_seed})
  timing = {"restore_s": 0.0, "forward_s": 0.0, "compile_forward_s": 0.0, "traced": 0, "skipped": 0}
  for arm, arm_dir in plan.arms.items():
    context, wanted = plan.configs[arm].data.seq_len, plan.wanted[arm]
    keys = {f"{layer}.{t}" for layer in range(plan.configs[arm].model.n_layers) for t in TENSORS}
    done = set(store.good_steps(arm, keys))
    for step in wanted:
      if step in done:
        timing["skipped"] += 1
        continue
      t = time.perf_counter()
      model, _ = ck.load_model(arm_dir, step)
      timing["restore_s"] += time.perf_counter() - t
      record_step(store, model, arm, step, context=context, final=step == wanted[-1], batch_size=batch_size,
                  timing=timing)
      timing["traced"] += 1
      log(f"traced {arm} step {step}")
    if store.token_step(arm) != wanted[-1]:   # e.g. killed between the last step's sums and its view
      save_tokens(store, ck.load_model(arm_dir, wanted[-1])[0], arm, wanted[-1])
  t = time.perf_counter()
  rebuild(store, arms=list(plan.arms))
  timing["stats_s"] = time.perf_counter() - t
  t = time.perf_counter()
  finish(store, plots=plots, claims=claims, rope_arm=rope_arm, nope_arm=nope_arm)
  timing["plots_claims_s"] = time.perf_counter() - t
  timing["total_s"] = time.perf_counter() - t0
  timing["forward_fraction"] = (timing["forward_s"] + timing["compile_forward_s"]) / timing["total_s"]
  with open(store.path("timing.jsonl"), "a") as f:   # a log, one line per invocation: appending is its update
    f.write(json.dumps(timing) + "\n")
  return store
