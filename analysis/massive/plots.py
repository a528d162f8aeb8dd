"""Figures of a traced output directory (PNG and PDF under <out>/plots/), read from its files only.

emergence.*          per layer vs step, arms overlaid: max/mean of the most concentrated head against the
                     massive threshold lambda (how far from massive a run is, even with no massive dim),
                     head-mean max/mean per dim and per rotary pair, low-frequency share
                     (traced runs only: a single-step store has nothing to emerge over)
layer_profile.*      per layer at each arm's last step (C4): share of heads with a massive dim, max/mean
                     per dim and per rotary pair, low-frequency share
heatmap_<arm>_<step>.*   M[h, d] / mean_d M per layer and tensor, dims in rotary-frequency order
                     (at most MAX_HEATMAP_LAYERS layers, evenly spaced)
pair_energy_<arm>.*  share of pair energy vs theta_j, one curve per layer coloured by depth (colour bar),
                     context boundary marked
bars3d_<arm>.*       |rot_q| of one head over tokens x dims (the paper's 3D view), probe 0
sink_map.*           share of attention on the first token per layer x head, each arm's last step
sinks_over_steps.*   sink share per layer and its association with Q/K max/mean over steps (traced runs)
attention_<arm>.*    attention of probe 0 on its first tokens: the strongest and weakest sink heads and
                     the heads with the most concentrated rot_q and rot_k
residual.*           largest residual activation / median per layer beside the top head's Q/K
                     max/mean, at the last step and (traced runs) over steps
"""
from __future__ import annotations

import contextlib
import fnmatch
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
import numpy as np  # noqa: E402

from matplotlib.ticker import MaxNLocator  # noqa: E402

from analysis.massive import claims as CL  # noqa: E402
from analysis.massive import stats as S  # noqa: E402
from analysis.massive import store as ST  # noqa: E402
from minilm import atomic, hooks  # noqa: E402

METRICS = (("head_max", "max/mean, top head"), ("max_mean", "max/mean per dim"),
           ("pair_max_mean", "max/mean per pair"), ("lf_share", "low-freq share"))
"""Rows of the emergence figure; 'head_max' is the largest per-head max/mean (table.csv), the others
head means with intervals (summary.json)."""
PROFILE = (("any_massive", "share of heads with a massive dim"), ("max_mean", "max/mean per dim"),
           ("pair_max_mean", "max/mean per pair"), ("lf_share", "low-freq share"))
SHOWN = ("rot_q", "rot_k", "v")
STYLE = {"rot_q": "-", "rot_k": "--", "v": ":"}


# The figures' names (the docstring's list): what `remove_all` may delete from a folder the user owns.
FIGURES = ("emergence", "layer_profile", "heatmap_*_*", "pair_energy_*", "bars3d_*", "sink_map", "sinks_over_steps",
           "attention_*", "residual")


def _drawn(name: str) -> bool:
  stem, ext = os.path.splitext(name)
  return ext in (".png", ".pdf") and any(fnmatch.fnmatchcase(stem, pattern) for pattern in FIGURES)


def remove_all(store: ST.Store) -> None:
  """Delete the figures an earlier trace drew into the folder; any other file in plots/ stays."""
  folder = store.path("plots")
  if not os.path.isdir(folder):
    return
  for name in filter(_drawn, os.listdir(folder)):
    os.remove(os.path.join(folder, name))
  with contextlib.suppress(OSError):   # not empty: the user's own files
    os.rmdir(folder)


def _save(fig, store: ST.Store, name: str) -> list[str]:
  assert _drawn(f"{name}.png"), name   # a new figure is named in FIGURES, so that remove_all finds it
  paths = [store.path("plots", f"{name}.{ext}") for ext in ("png", "pdf")]
  for p in paths:
    atomic.savefig(fig, p, dpi=100)
    fig.set_layout_engine("none")   # the PDF keeps the PNG's layout: solving it again is a fifth of its save
  plt.close(fig)
  return paths


def _colors(arms) -> dict:
  cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
  return {a: cycle[i % len(cycle)] for i, a in enumerate(arms)}


def _series(groups, arm, layer, tensor, stat):
  pts = sorted((g["step"], *g["stats"][stat]) for g in groups
               if (g["arm"], g["layer"], g["tensor"]) == (arm, layer, tensor))
  return np.array(pts, np.float64).reshape(-1, 4)


def _head_max(store: ST.Store) -> dict:
  """{(arm, layer, tensor): [[step, largest per-head max/mean, same, same], ...]} from table.csv,
  shaped as `_series` returns (no interval: one head)."""
  top = {}
  for r in ST.read_table(store.path("table.csv")):
    key, step = (r["arm"], int(r["layer"]), r["tensor"]), int(r["step"])
    top.setdefault(key, {})[step] = max(top.get(key, {}).get(step, -np.inf), float(r["max_mean"]))
  return {k: np.array([[s, v, v, v] for s, v in sorted(by.items())]) for k, by in top.items()}


def step_axis(ax, steps) -> callable:
  """Log step axis: step 0 is drawn half a factor of two left of the first positive step and
  labelled '0'; ticks at the traced steps (thinned to about 7). Returns step -> x."""
  steps = sorted(set(steps))
  positive = [s for s in steps if s > 0]
  zero_at = min(positive) / 2 if positive else 1.0
  ax.set_xscale("log")
  picks = steps if len(steps) <= 7 else sorted({steps[int(round(i))] for i in np.linspace(0, len(steps) - 1, 7)})
  ax.set_xticks([s if s > 0 else zero_at for s in picks], [str(s) for s in picks], fontsize=7)
  ax.minorticks_off()
  return lambda s: np.where(np.asarray(s) > 0, s, zero_at)


def emergence(store: ST.Store) -> list[str]:
  summ = store.read_json("summary.json")
  groups, arms = summ["groups"], list(summ["arms"])
  n_layers = max(f["n_layers"] for f in summ["arms"].values())
  steps = {g["step"] for g in groups}
  colors = _colors(arms)
  head_max = _head_max(store)
  fig, axes = plt.subplots(len(METRICS), n_layers, figsize=(3.2 * n_layers + 1, 2.6 * len(METRICS)),
                           squeeze=False, sharex=True, layout="constrained")
  for r, (stat, label) in enumerate(METRICS):
    for layer in range(n_layers):
      ax = axes[r, layer]
      place = step_axis(ax, steps)
      for arm in arms:
        for tensor in SHOWN:
          s = (head_max.get((arm, layer, tensor), np.zeros((0, 4))) if stat == "head_max" else
               _series(groups, arm, layer, tensor, stat))
          if not len(s):
            continue
          x = place(s[:, 0])
          ax.plot(x, s[:, 1], STYLE[tensor], color=colors[arm], marker=".", label=f"{arm} {tensor}")
          ax.fill_between(x, s[:, 2], s[:, 3], color=colors[arm], alpha=0.12, linewidth=0)
      _reference_line(ax, stat, summ["stats"]["lam"])
      if r == 0:
        ax.set_title(f"layer {layer}", fontsize=9)
      if layer == 0:
        ax.set_ylabel(label)
      if r == len(METRICS) - 1:
        ax.set_xlabel("step (log; 0 at left)")
  axes[0, -1].legend(fontsize=6, loc="best")
  fig.suptitle(f"Emergence over training (95% CI over prompts and heads; lam={summ['stats']['lam']:g})")
  return _save(fig, store, "emergence")


def _reference_line(ax, stat: str, lam: float) -> None:
  """The null 0.25 for low-frequency shares; the massive threshold lam for the top head's max/mean;
  C1/C4's level for shares of heads."""
  if stat == "lf_share":
    ax.axhline(0.25, color="grey", lw=0.8, ls="-.")
  if stat == "head_max":
    ax.axhline(lam, color="red", lw=0.8, ls="-.", label=f"massive: lambda={lam:g}")
    ax.set_ylim(bottom=1, top=max(1.1 * lam, ax.get_ylim()[1]))
  if stat == "any_massive":
    ax.axhline(CL.SHARE_LEVEL, color="grey", lw=0.8, ls="-.")
    ax.set_ylim(-0.02, 1.02)


def layer_profile(store: ST.Store) -> list[str]:
  summ = store.read_json("summary.json")
  groups, arms = summ["groups"], list(summ["arms"])
  colors = _colors(arms)
  fig, axes = plt.subplots(1, len(PROFILE), figsize=(4.2 * len(PROFILE), 3.4), squeeze=False,
                           layout="constrained")
  for c, (stat, label) in enumerate(PROFILE):
    ax = axes[0, c]
    for arm in arms:
      last = max(g["step"] for g in groups if g["arm"] == arm)
      for tensor in SHOWN:
        pts = sorted((g["layer"], *g["stats"][stat]) for g in groups
                     if (g["arm"], g["step"], g["tensor"]) == (arm, last, tensor))
        p = np.array(pts, np.float64)
        ax.errorbar(p[:, 0], p[:, 1], yerr=[p[:, 1] - p[:, 2], p[:, 3] - p[:, 1]], fmt=STYLE[tensor] + "o",
                    color=colors[arm], ms=3, capsize=2, label=f"{arm} {tensor} (step {last})")
    _reference_line(ax, stat, summ["stats"]["lam"])
    ax.xaxis.set_major_locator(MaxNLocator(nbins=8, integer=True))   # 30 layer labels would run together
    ax.set_xlabel("layer")
    ax.set_ylabel(label)
  axes[0, 0].legend(fontsize=6)
  fig.suptitle("Layer profile at the last step")
  return _save(fig, store, "layer_profile")


MAX_HEATMAP_LAYERS = 8
"""Deeper models show this many layers, evenly spaced, first and last included: a 30-layer grid is
90 panels and a 9000-pixel-wide page, unreadable on a laptop and most of a pretrained analysis's time.
Every layer's numbers are in table.csv; `heatmap(..., layers=...)` draws any set."""


def shown_layers(n_layers: int, most: int = MAX_HEATMAP_LAYERS) -> list[int]:
  if n_layers <= most:
    return list(range(n_layers))
  return sorted({int(round(x)) for x in np.linspace(0, n_layers - 1, most)})


def heatmap(store: ST.Store, arm: str, step: int, layers=None) -> list[str]:
  meta = store.meta()
  facts, cfg = meta["arms"][arm], ST.stat_config(meta)
  pairing = ST.pairing_of(facts)
  sums = store.load_sums(arm, step)
  order = pairing.dim_order
  sorted_pairs = pairing.pair_index[order]                       # -1 (unrotated) sorts last
  n_lf = S.lf_pairs(pairing.n_pairs, cfg.lf_quarter)
  lf_edges = (int(np.argmax(sorted_pairs == pairing.n_pairs - n_lf)) - 0.5,
              int((sorted_pairs >= 0).sum()) - 0.5)
  firsts = [i for i in range(len(order)) if i == 0 or sorted_pairs[i] != sorted_pairs[i - 1]]
  ticks = firsts[::max(1, len(firsts) // 6)]
  layers = shown_layers(facts["n_layers"]) if layers is None else list(layers)
  ratios = {}
  for tensor in SHOWN:
    for layer in layers:
      M = np.sqrt(sums[hooks.name(layer, tensor)].astype(np.float64).sum(0))
      ratios[layer, tensor] = (M / M.mean(-1, keepdims=True))[:, order]
  vmax = max(cfg.lam, max(r.max() for r in ratios.values()))
  fig, axes = plt.subplots(len(SHOWN), len(layers), figsize=(3.0 * len(layers) + 1, 2.4 * len(SHOWN)), squeeze=False,
                           layout="constrained")
  for r, tensor in enumerate(SHOWN):
    for c, layer in enumerate(layers):
      ratio = ratios[layer, tensor]
      ax = axes[r, c]
      im = ax.imshow(ratio, aspect="auto", cmap="magma", interpolation="nearest", vmin=0, vmax=vmax)
      for edge in lf_edges:
        ax.axvline(edge, color="cyan", lw=1.2)
      ax.set_xticks(ticks, [str(sorted_pairs[i]) for i in ticks], fontsize=6)
      ax.set_yticks(range(ratio.shape[0]), [str(h) for h in range(ratio.shape[0])], fontsize=6)
      ax.set_title(f"L{layer} {tensor}", fontsize=8)
      if r == len(SHOWN) - 1:
        ax.set_xlabel("rotary pair j (high -> low frequency; -1 unrotated)", fontsize=7)
      if c == 0:
        ax.set_ylabel("head", fontsize=7)
  fig.colorbar(im, ax=axes, fraction=0.03, label="M / mean_d M")
  subset = "" if len(layers) == facts["n_layers"] else f"; layers {', '.join(map(str, layers))} of {facts['n_layers']}"
  fig.suptitle(f"{arm} step {step}: M / mean_d M (between cyan lines: lowest-frequency quarter of pairs; "
               f"massive > {cfg.lam:g}); pairing: {pairing.label}{subset}", fontsize=9)
  return _save(fig, store, f"heatmap_{arm}_{step}")


def pair_energy(store: ST.Store, arm: str) -> list[str]:
  summ, meta = store.read_json("summary.json"), store.meta()
  pairing, context = ST.pairing_of(meta["arms"][arm]), meta["arms"][arm]["context"]
  last = max(g["step"] for g in summ["groups"] if g["arm"] == arm)
  n_layers = meta["arms"][arm]["n_layers"]
  depth = plt.cm.ScalarMappable(plt.Normalize(0, max(n_layers - 1, 1)), "viridis")
  fig, axes = plt.subplots(1, len(SHOWN), figsize=(4.2 * len(SHOWN) + 1, 3.6), squeeze=False, sharey=True,
                           layout="constrained")
  for c, tensor in enumerate(SHOWN):
    ax = axes[0, c]
    for g in summ["groups"]:
      if (g["arm"], g["step"], g["tensor"]) == (arm, last, tensor):
        ax.plot(pairing.theta, g["pair_share"], marker=".", ms=3, lw=1, color=depth.to_rgba(g["layer"]))
    for factor, ls in ((1, "-"), (2, "--")):
      j = S.context_pair(pairing.theta, factor * context)
      if j < pairing.n_pairs:
        ax.axvline(pairing.theta[j], color="k", ls=ls, lw=0.8, label=f"first wavelength > {factor}x ctx (j={j})")
    ax.axhline(1 / pairing.n_pairs, color="grey", lw=0.8, ls="-.")
    ax.set_xscale("log")
    ax.set_xlabel("theta_j (rad/token; low frequency to the left)")
    ax.set_title(tensor, fontsize=9)
  axes[0, 0].set_ylabel("share of pair energy (head mean)")
  axes[0, -1].legend(fontsize=6)
  fig.colorbar(depth, ax=axes, fraction=0.03, label="layer")
  fig.suptitle(f"{arm} step {last}: where the mass sits in frequency\n({pairing.label}; context {context:g})",
               fontsize=9)
  return _save(fig, store, f"pair_energy_{arm}")


def bars3d(store: ST.Store, arm: str, layer: int | None = None, head: int | None = None,
           tensor: str = "rot_q", max_tokens: int = 48) -> list[str]:
  """The paper-style 3D bars of |x| over tokens x dims for one head (default: the head with the
  largest max/mean of `tensor` at the last step)."""
  z = store.load_tokens(arm)
  x, step = z[tensor].astype(np.float32), int(z["step"])
  if layer is None or head is None:
    M = np.sqrt((x.astype(np.float64) ** 2).sum(1))               # [L, H, D]
    layer, head = np.unravel_index(np.argmax(S.max_mean(M)), M.shape[:2])
  values = x[layer, :max_tokens, head]                             # [T, D]
  T_, D = values.shape
  tt, dd = np.meshgrid(np.arange(T_), np.arange(D), indexing="ij")
  fig = plt.figure(figsize=(7, 5.5), layout="constrained")
  ax = fig.add_subplot(projection="3d")
  ax.bar3d(dd.ravel(), tt.ravel(), 0, 0.8, 0.8, values.ravel(), shade=True,
           color=plt.cm.viridis(values.ravel() / max(values.max(), 1e-12)))
  ax.set_xlabel("dim")
  ax.set_ylabel("token")
  ax.set_zlabel(f"|{tensor}|")
  ax.set_title(f"{arm} step {step}: layer {layer} head {head}, probe 0", fontsize=9)
  return _save(fig, store, f"bars3d_{arm}")


def _step_layers(summ: dict, arm: str, step: int) -> list[dict]:
  return sorted((g for g in summ["layers"] if (g["arm"], g["step"]) == (arm, step)), key=lambda g: g["layer"])


def sink_map(store: ST.Store, summ: dict) -> list[str]:
  verdicts = summ["verdicts"]
  fig, axes = plt.subplots(1, len(verdicts), figsize=(max(6.5, 4.2 * len(verdicts) + 1.2), 4.0), squeeze=False,
                           layout="constrained")
  for ax, v in zip(axes[0], verdicts):
    grid = np.array([g["sink_per_head"] for g in _step_layers(summ, v["arm"], v["step"])])
    im = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0, vmax=1, interpolation="nearest", origin="lower")
    a = v["association"]
    ax.set_title(f"{v['arm']} step {v['step']}\nrho(sink, max/mean) q {a['rot_q'][0]:.2f}, k {a['rot_k'][0]:.2f}",
                 fontsize=8)
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.yaxis.set_major_locator(MaxNLocator(nbins=10, integer=True))
  fig.colorbar(im, ax=axes, fraction=0.04, label="share of attention on the first token")
  uniform = np.mean([s["uniform"] for s in summ["steps"]])
  fig.suptitle(f"Sink share per layer and head\n(queries 1..T-1; uniform attention gives {uniform:.3f}; "
               f"sink head >= {summ['level']:g})", fontsize=9)
  return _save(fig, store, "sink_map")


def sinks_over_steps(store: ST.Store, summ: dict) -> list[str]:
  arms = [v["arm"] for v in summ["verdicts"]]
  fig, axes = plt.subplots(len(arms), 2, figsize=(10, 3.0 * len(arms)), squeeze=False, layout="constrained")
  for r, arm in enumerate(arms):
    layers = [g for g in summ["layers"] if g["arm"] == arm]
    n_layers = max(g["layer"] for g in layers) + 1
    depth = plt.cm.ScalarMappable(plt.Normalize(0, max(n_layers - 1, 1)), "viridis")
    ax = axes[r, 0]
    place = step_axis(ax, [g["step"] for g in layers])
    for layer in range(n_layers):
      s = np.array(sorted((g["step"], *g["sink"]) for g in layers if g["layer"] == layer))
      ax.plot(place(s[:, 0]), s[:, 1], marker=".", color=depth.to_rgba(layer))
      ax.fill_between(place(s[:, 0]), s[:, 2], s[:, 3], color=depth.to_rgba(layer), alpha=0.12, linewidth=0)
    ax.axhline(summ["level"], color="grey", lw=0.8, ls="-.", label="sink head")
    ax.axhline(np.mean([s["uniform"] for s in summ["steps"]]), color="grey", lw=0.8, ls=":", label="uniform")
    ax.legend(fontsize=7)
    ax.set_ylabel(f"{arm}: sink share (head mean)")
    fig.colorbar(depth, ax=ax, label="layer")
    ax = axes[r, 1]
    steps = sorted((s for s in summ["steps"] if s["arm"] == arm), key=lambda s: s["step"])
    place = step_axis(ax, [s["step"] for s in steps])
    for tensor in ("rot_q", "rot_k"):
      a = np.array([[s["step"], *s["association"][tensor]] for s in steps], np.float64)
      line, = ax.plot(place(a[:, 0]), a[:, 1], STYLE[tensor], marker=".", label=tensor)
      ax.fill_between(place(a[:, 0]), a[:, 2], a[:, 3], color=line.get_color(), alpha=0.15, linewidth=0)
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_ylabel("rho(sink share, max/mean)")
    ax.legend(fontsize=7)
  for ax in axes[-1]:
    ax.set_xlabel("step (log; 0 at left)")
  fig.suptitle("Attention sinks over training (95% CI over prompts and heads)", fontsize=9)
  return _save(fig, store, "sinks_over_steps")


def attention_patterns(store: ST.Store, arm: str) -> list[str]:
  """Probe 0's attention on its first tokens for four heads of the token view's step: the strongest
  and the weakest sink head, and the heads with the largest rot_q and rot_k max/mean."""
  z = store.load_tokens(arm)
  if "attn" not in z:
    return []
  probs, step = z["attn"].astype(np.float32), int(z["step"])
  rows = [r for r in ST.read_table(store.path("sinks.csv")) if (r["arm"], int(r["step"])) == (arm, step)]
  if not rows:
    return []
  def pick(key, sign=1):
    r = max(rows, key=lambda r: sign * float(r[key]))
    return int(r["layer"]), int(r["head"]), r
  chosen = [("strongest sink", *pick("sink_share")), ("weakest sink", *pick("sink_share", -1)),
            ("top rot_q max/mean", *pick("rot_q_max_mean")), ("top rot_k max/mean", *pick("rot_k_max_mean"))]
  fig, axes = plt.subplots(1, len(chosen), figsize=(3.3 * len(chosen) + 1, 3.4), squeeze=False, layout="constrained")
  for ax, (label, layer, head, r) in zip(axes[0], chosen):
    im = ax.imshow(probs[layer, head], cmap="magma", vmin=0, vmax=1, interpolation="nearest")
    ax.set_title(f"{label}: L{layer} H{head}\nsink {float(r['sink_share']):.2f}, max/mean q "
                 f"{float(r['rot_q_max_mean']):.1f} k {float(r['rot_k_max_mean']):.1f}", fontsize=7)
    ax.set_xlabel("key position")
    ax.set_ylabel("query position")
  fig.colorbar(im, ax=axes, fraction=0.03, label="attention probability")
  fig.suptitle(f"{arm} step {step}: attention of probe 0 on its first {probs.shape[-1]} tokens", fontsize=9)
  return _save(fig, store, f"attention_{arm}")


def residual(store: ST.Store, summ: dict) -> list[str]:
  """Largest residual |x| / median per layer (Sun et al.'s ratio; points labelled with the dim of
  each layer's largest entry in most prompts) beside the top head's rot_q/rot_k max/mean."""
  arms, colors = [v["arm"] for v in summ["verdicts"]], _colors([v["arm"] for v in summ["verdicts"]])
  head_max = _head_max(store)
  over_steps = len({s["step"] for s in summ["steps"]}) > 1
  fig, axes = plt.subplots(1 + over_steps, 2, figsize=(11, 3.6 * (1 + over_steps)), squeeze=False,
                           layout="constrained")
  for v in summ["verdicts"]:
    arm, layers = v["arm"], _step_layers(summ, v["arm"], v["step"])
    ratio = np.array([[g["layer"], *g["resid"]["max_ratio"]] for g in layers])
    axes[0, 0].errorbar(ratio[:, 0], ratio[:, 1], yerr=[ratio[:, 1] - ratio[:, 2], ratio[:, 3] - ratio[:, 1]],
                        fmt="o-", ms=3, capsize=2, color=colors[arm], label=f"{arm} (step {v['step']})")
    for g, (x, y) in zip(layers, ratio[:, :2]):
      axes[0, 0].annotate(f"d{g['resid']['top_dim'][0]}", (x, y), fontsize=5, xytext=(2, 2), textcoords="offset points")
    for tensor in ("rot_q", "rot_k"):
      pts = np.array([[g["layer"], _at(head_max, (arm, g["layer"], tensor), v["step"])] for g in layers])
      axes[0, 1].plot(pts[:, 0], pts[:, 1], STYLE[tensor] + "o", ms=3, color=colors[arm], label=f"{arm} {tensor}")
  axes[0, 0].set_xlabel("layer")
  axes[0, 1].set_xlabel("layer")
  if over_steps:
    place = step_axis(axes[1, 0], [s["step"] for s in summ["steps"]])
    step_axis(axes[1, 1], [s["step"] for s in summ["steps"]])
    for arm in arms:
      steps = sorted({g["step"] for g in summ["layers"] if g["arm"] == arm})
      top = [max(g["resid"]["max_ratio"][0] for g in _step_layers(summ, arm, s)) for s in steps]
      axes[1, 0].plot(place(steps), top, "o-", ms=3, color=colors[arm], label=arm)
      for tensor in ("rot_q", "rot_k"):
        qk = [max(_at(head_max, key, s) for key in head_max if key[0] == arm and key[2] == tensor) for s in steps]
        axes[1, 1].plot(place(steps), qk, STYLE[tensor] + "o", ms=3, color=colors[arm], label=f"{arm} {tensor}")
    axes[1, 0].set_xlabel("step (log; 0 at left), largest over layers")
    axes[1, 1].set_xlabel("step (log; 0 at left), largest over layers")
  for row in axes:
    row[0].set_yscale("log")
    row[0].axhline(summ["settings"]["resid_ratio"], color="red", lw=0.8, ls="-.")
    row[0].set_ylabel("largest |x| / median |x| (block output)")
    _reference_line(row[1], "head_max", ST.stat_config(store.meta()).lam)
    row[1].set_ylabel("max/mean, top head")
    row[0].legend(fontsize=6)
    row[1].legend(fontsize=6)
  fig.suptitle(f"Residual massive activations (red: {summ['settings']['resid_ratio']:g} x median) beside Q/K "
               "concentration", fontsize=9)
  return _save(fig, store, "residual")


def _at(series: dict, key, step: int) -> float:
  """The value of a `_head_max` series at `step` (NaN if that step was not traced)."""
  rows = series.get(key, np.zeros((0, 4)))
  hit = rows[rows[:, 0] == step]
  return float(hit[0, 1]) if len(hit) else np.nan


def sink_figures(store: ST.Store) -> list[str]:
  """The attention-sink and residual figures, if the store has sinks (analysis.massive.sinks)."""
  summ = store.read_json("sinks.json", {})   # {}: traced before sinks were captured
  if not summ.get("verdicts"):
    return []
  paths = sink_map(store, summ) + residual(store, summ)
  if len({s["step"] for s in summ["steps"]}) > 1:
    paths += sinks_over_steps(store, summ)
  for v in summ["verdicts"]:
    if os.path.exists(store.tokens_path(v["arm"])):
      paths += attention_patterns(store, v["arm"])
  return paths


def plot_all(store: ST.Store, heatmap_steps=None) -> list[str]:
  """Every figure; heatmaps at `heatmap_steps` (default: each arm's first and last step). No
  emergence figure when every arm has a single step (an imported model): nothing to emerge over."""
  meta = store.meta()
  over_steps = any(len(store.steps(arm)) > 1 for arm in meta["arms"])
  paths = (emergence(store) if over_steps else []) + layer_profile(store) + sink_figures(store)
  for arm in meta["arms"]:
    steps = store.steps(arm)
    if not steps:
      continue
    for step in sorted({s for s in (heatmap_steps or (steps[0], steps[-1])) if s in steps}):
      paths += heatmap(store, arm, step)
    paths += pair_energy(store, arm)
    if os.path.exists(store.path("tokens", f"{arm}.npz")):
      paths += bars3d(store, arm)
  return paths
