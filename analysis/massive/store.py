"""The traced directory: its layout, reading and writing it, the runs and arms it is traced from.

Layout (everything plots and claims need, so they never touch a model):
  probes.npy, mask.npy       the probe tokens [N, T] and the tokens counted (1) or padding (0)
  meta.json                  capture settings, statistic settings, per-arm model facts and pairing
  sums/<arm>/<step>.npz      per-prompt sums of squares, hook name (minilm.hooks.name, e.g.
                             'blocks.3.attn.rot_q') -> [N, H, D]
  sinks/<arm>/<step>.npz     per-prompt sink shares and largest residual activations (massive.sinks)
  tokens/<arm>.npz           |x| of probe 0 for TOKEN_POINTS: [L, T, H, D] float16, and its
                             attention 'attn' on the first tokens [L, H, P, P], final step
  table.csv                  one row per arm x step x layer x tensor x head (massive.trace.write_table)
  summary.json               per arm x step x layer x tensor: each statistic's head mean and
                             bootstrap interval over prompts and heads; the pair-energy profile
  sinks.json, sinks.csv, resid.csv   attention sinks and residual massive activations (massive.sinks)
  claims.json, claims.md     the verdicts (massive.claims); plots/ the figures (massive.plots)
  timing.jsonl               per invocation: seconds restoring, in the forward pass (compiling
                             calls apart), in statistics, in plots and claims
"""
from __future__ import annotations

import csv
import dataclasses
import io
import os
import zipfile

import numpy as np

from analysis.massive import stats as S
from minilm import atomic, hooks
from minilm.encodings import Pairing, PositionConfig
from minilm.schema import ConfigError, check, from_dict, to_dict
from train import checkpoints as ck

NAMES = ("probes.npy", "mask.npy", "meta.json", "sums", "sinks", "tokens", "table.csv", "summary.json", "sinks.json",
         "sinks.csv", "resid.csv", "claims.json", "claims.md", "plots", "timing.jsonl", "tensorboard",
         "comparisons.json", "arms.json")
"""Every name a traced directory holds at its top (the layout above; comparisons and arms.json:
massive.compare; tensorboard/: --tensorboard)."""

TOKEN_POINTS = ("q", "rot_q", "rot_k", "v")
"""The points of the token view (tokens/<arm>.npz)."""


def pairing_of(facts: dict) -> Pairing:
  """The rotary pairing of an arm, from its facts in meta.json."""
  return from_dict(PositionConfig, facts["position_cfg"]).pairing(facts["head_dim"])


def layer_tensor_keys(sums: dict):
  """[(layer, tensor)] in layer, then minilm.hooks.QKV order."""
  return sorted(map(hooks.split, sums), key=lambda lt: (lt[0], hooks.QKV.index(lt[1])))


DAMAGED = (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError)
"""What reading a damaged .npz or .npy file raises (cut short, edited by hand, not numpy's format)."""


REDO = "trace again into this folder (damaged steps are redone) or into a new one"


def load_arrays(path: str, advice: str = REDO):
  """Every array of a .npz file of the store (an .npy file: its array); a damaged file is a one-line
  error naming it, with `advice`."""
  try:
    if path.endswith(".npy"):
      return np.load(path)
    with np.load(path) as z:
      return {k: z[k] for k in z.files}
  except FileNotFoundError:
    raise
  except DAMAGED as err:
    raise ConfigError(f"{path}: cannot be read ({type(err).__name__}: {err}); {advice}") from None


def _hook_name(key: str) -> str:
  """A sums key as a hook name: stores traced before the keys were hook names hold '<layer>.<tensor>'."""
  layer, _, point = key.partition(".")
  return hooks.name(int(layer), point) if layer.isdigit() else key


REQUIRED = object()
"""Store.read_json's default: the file must exist."""


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
    """The step's sums by hook name; values that are not finite (which trace redoes, as `good_steps`)
    are a one-line error: every statistic and verdict drawn from them would be NaN."""
    path = self.sums_path(arm, step)
    sums = {_hook_name(k): v for k, v in load_arrays(path).items()}
    check(all(np.isfinite(v).all() for v in sums.values()), path, f"holds values that are not finite; {REDO}")
    return sums

  def save_sums(self, arm: str, step: int, sums: dict) -> None:
    atomic.save_npz(self.sums_path(arm, step), **sums)

  def sinks_path(self, arm: str, step: int) -> str:
    return self.path("sinks", arm, f"{step:08d}.npz")

  def has_sinks(self, arm: str, step: int) -> bool:
    return _readable(self.sinks_path(arm, step), set())

  def load_sinks(self, arm: str, step: int) -> dict:
    return load_arrays(self.sinks_path(arm, step))

  def load_tokens(self, arm: str) -> dict:
    return load_arrays(self.tokens_path(arm))

  def probes(self) -> np.ndarray:
    """The probe tokens [N, T]; every table of the trace is of these, so a damaged file is not redone."""
    return load_arrays(self.path("probes.npy"), "the trace's probes are lost: trace into a new folder")

  def mask(self) -> np.ndarray:
    return load_arrays(self.path("mask.npy"), "the trace's probes are lost: trace into a new folder")

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
        return int(z["step"]) if set(TOKEN_POINTS) <= set(z.files) else None
    except DAMAGED:
      return None

  def meta(self) -> dict:
    return self.read_json("meta.json", {})

  def read_json(self, name: str, default=REQUIRED):
    """A JSON file of the store, or `default` where it does not exist (without one, FileNotFoundError);
    a damaged file is an error either way."""
    if default is not REQUIRED and not os.path.exists(self.path(name)):
      return default
    return ck.read_json(self.path(name), "trace again into this folder (finished steps are reused) or into a new one")

  def require(self) -> "Store":
    """self, or a one-line error if this is not a traced directory."""
    try:
      meta = self.meta()
      traced = isinstance(meta, dict) and bool(meta.get("arms")) and os.path.exists(self.path("summary.json"))
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
      names = {_hook_name(k): k for k in z.files}
      return keys <= set(names) and all(np.isfinite(z[names[k]]).all() for k in keys)
  except DAMAGED:
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


def _holds_probes(store: Store, probes, mask) -> bool:
  """Whether the store's probes.npy and mask.npy are these, element for element (the checksum in
  meta.json is a sum: probes in another order share it)."""
  try:
    held = np.load(store.path("probes.npy")), np.load(store.path("mask.npy"))
  except DAMAGED:
    return False
  return all(np.array_equal(h, np.asarray(x, h.dtype)) for h, x in zip(held, (probes, mask)))


def open_store(out_dir: str, probes, mask, drop_first: bool, stat_cfg: S.StatConfig,
               extra: dict | None = None) -> Store:
  """Create or reopen an output directory; refuse to mix captures made with other probes/settings."""
  store = Store(out_dir)
  capture_cfg = _capture_settings(probes, mask, drop_first)
  meta = store.meta()
  if meta and (meta.get("capture") != capture_cfg or not _holds_probes(store, probes, mask)):
    raise ConfigError(f"out: {out_dir} holds a trace with other probes or capture settings "
                      f"({meta.get('capture')}); use another --out or delete it")
  atomic.save_npy(store.path("probes.npy"), np.asarray(probes, np.int32))
  atomic.save_npy(store.path("mask.npy"), np.asarray(mask, np.float32))
  meta.update({"capture": capture_cfg, "stats": to_dict(stat_cfg),
               "arms": meta.get("arms", {}), **(extra or {})})
  store.write_json("meta.json", meta)
  return store


def stat_config(meta: dict) -> S.StatConfig:
  return from_dict(S.StatConfig, meta["stats"])


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


def all_arms(run_dir: str, field: str = "run_dir") -> dict[str, str]:
  """{arm name: arm dir} of a paired run (experiment.json + arm dirs) or of a single arm dir, in the
  experiment's order, diverged arms included; `field` names the run in an error."""
  run_dir = os.path.normpath(run_dir)
  if os.path.exists(os.path.join(run_dir, "config.json")) and os.path.isdir(os.path.join(run_dir, "checkpoints")):
    return {os.path.basename(run_dir): run_dir}
  if not os.path.isdir(run_dir):
    raise ConfigError(f"{field}: {run_dir} is not a directory")
  order = list(experiment_arms(run_dir))
  found = sorted(d for d in os.listdir(run_dir) if os.path.exists(os.path.join(run_dir, d, "config.json")))
  arms = [a for a in order if a in found] + [a for a in found if a not in order]
  if not arms:
    raise ConfigError(f"{field}: {run_dir} has no arm (a folder with config.json and checkpoints/)")
  return {a: os.path.join(run_dir, a) for a in arms}


def experiment_arms(run_dir: str) -> dict[str, dict]:
  """{arm: its overrides} from a paired run's experiment.json, in its order ({} without one)."""
  path = os.path.join(run_dir, "experiment.json")
  if not os.path.exists(path):
    return {}
  hint = "delete it (the arms are then read in folder order) or write it again from the experiment's config"
  data = ck.read_json(path, hint)
  arms = data.get("arms", {}) if isinstance(data, dict) else None
  check(isinstance(arms, dict) and all(isinstance(o, dict) for o in arms.values()), path,
        f"damaged, not an experiment (a mapping whose 'arms' maps each arm to its overrides); {hint}")
  return arms


def diverged_arms(run_dir: str) -> dict[str, dict]:
  """{arm: its divergence record (train.checkpoints.divergence)} of the arms whose training diverged."""
  records = {arm: ck.divergence(arm_dir) for arm, arm_dir in all_arms(run_dir).items()}
  return {arm: r for arm, r in records.items() if r}


def run_arms(run_dir: str, field: str = "run_dir") -> dict[str, str]:
  """all_arms without the diverged ones: what every analysis reads (a diverged arm's checkpoints
  are finite, but it stopped early and gets no verdict); `field` names the run in an error."""
  arms = all_arms(run_dir, field)
  diverged = diverged_arms(run_dir)
  arms = {a: d for a, d in arms.items() if a not in diverged}
  check(bool(arms), field, f"every arm of {run_dir} diverged, so there is nothing to analyse: " +
        "; ".join(r.get("message", f"{a} diverged") for a, r in diverged.items()))
  return arms


PROBE_SEED = 0
"""Default seed of train.data.probe_tokens for the probe set."""
