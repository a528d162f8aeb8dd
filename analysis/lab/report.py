"""The lab's report: one static, self-contained HTML page (figures as PNG files beside it).

`build(report_dir)` reads what the stages left in reports/<name>/ (lab.json; trace/, pretrained/,
disrupt/, quant/ as far as they exist; the arms' metrics through lab.json's run_dir) and writes
index.html, figures/training.png and summary.txt. No server, no network, no external CSS or JS:
images are referenced by relative paths, so the folder can be copied or zipped as it is.
"""
from __future__ import annotations

import html
import json
import math
import os

from analysis.massive import claims as CL
from analysis.massive import stats as S
from analysis.studies import disruption as EXP
from minilm import atomic

VERDICT_CLASS = {"supported": "ok", "not supported": "no", "opposite": "no", "inconclusive": "maybe",
                 "not run": "off"}
CSS = """
body{font:15px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1180px;margin:0 auto;
padding:0 18px 60px;color:#1d1d1f}
h1{font-size:1.6em;margin:.8em 0 .2em}h2{margin-top:1.8em;border-bottom:1px solid #ddd;padding-bottom:.2em}
table{border-collapse:collapse;margin:.6em 0;font-size:.88em}td,th{border:1px solid #ddd;padding:3px 7px;
vertical-align:top;text-align:left}th{background:#f4f4f6}td.num{text-align:right;white-space:nowrap}
.ok{background:#dff3e3}.no{background:#f9dedc}.maybe{background:#fff4d6}.off{background:#eee;color:#666}
img{max-width:100%;height:auto;border:1px solid #eee;margin:.4em 0}figure{margin:.8em 0}
figcaption{font-size:.85em;color:#555}.lead{background:#f6f8fa;border-left:4px solid #888;padding:.6em 1em}
pre{background:#f6f8fa;padding:.6em;overflow-x:auto;font-size:.8em}nav a{margin-right:1em}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(440px,1fr));gap:6px}
.scroll{overflow-x:auto}.scroll img{max-width:none;height:440px;width:auto}
details{margin:.2em 0}summary{cursor:pointer;color:#444}.small{font-size:.85em;color:#555}
"""


def esc(x) -> str:
  return html.escape(str(x))


MEASURES = {"value": "arm value", "diff": "arm - reference"}


def fmt(x, ci=None, digits: int = 3) -> str:
  if x is None or (isinstance(x, float) and not math.isfinite(x)):
    return "-"
  s = num(x, digits)
  if ci and all(c is not None for c in ci):
    s += f" [{num(ci[0], digits)}, {num(ci[1], digits)}]"
  return s


def num(x, digits: int = 3) -> str:
  """`digits` significant digits, but counts such as steps in full: an int, or a number of at least
  10^digits, is written as a whole number (1300, not 1.3e+03)."""
  if isinstance(x, int) or abs(x) >= 10 ** digits:
    return f"{round(x)}"
  return f"{x:.{digits}g}"


# ----------------------------------------------------------------------------------------- pieces

def table_html(header: list[str], rows: list[list[str]], classes: list[list[str]] | None = None) -> str:
  """An HTML table from already-escaped cells."""
  out = ["<table><tr>" + "".join(f"<th>{h}</th>" for h in header) + "</tr>"]
  for i, row in enumerate(rows):
    cls = classes[i] if classes else [""] * len(row)
    out.append("<tr>" + "".join(f'<td class="{c}">{v}</td>' if c else f"<td>{v}</td>" for v, c in zip(row, cls))
               + "</tr>")
  return "\n".join(out) + "</table>"


def markdown_tables(text: str, paragraphs: bool = True) -> str:
  """Pipe tables of a markdown file as HTML tables; other lines as paragraphs (escaped), or left out."""
  out, rows = [], []

  def flush():
    if rows:
      out.append(table_html([esc(c) for c in rows[0]], [[esc(c).replace("**", "") for c in r] for r in rows[1:]]))
      rows.clear()
  for line in text.splitlines():
    line = line.strip()
    if line.startswith("|"):
      cells = [c.strip() for c in line.strip("|").split("|")]
      if not all(set(c) <= set("-: ") for c in cells):
        rows.append(cells)
      continue
    flush()
    if line and paragraphs:
      out.append(f"<p>{esc(line)}</p>")
  flush()
  return "\n".join(out)


def figure(report_dir: str, rel: str, caption: str) -> str:
  """<figure> of a PNG under report_dir (relative link), or a plain note when it is missing; nothing
  when its whole folder is (figures turned off: `not_drawn` says so once)."""
  if not os.path.isdir(os.path.dirname(os.path.join(report_dir, rel))):
    return ""
  if not os.path.exists(os.path.join(report_dir, rel)):
    return f'<p class="small">(figure {esc(rel)} was not produced)</p>'
  img = f'<img src="{esc(rel)}" alt="{esc(caption)}">'
  w, h = png_size(os.path.join(report_dir, rel))
  if w > 1600 and w > 3 * h:   # e.g. heatmaps of a 30-layer model: scroll instead of shrinking to nothing
    img = f'<div class="scroll">{img}</div>'
    caption += " (wide figure: scroll sideways)"
  return f"<figure>{img}<figcaption>{esc(caption)}</figcaption></figure>"


def png_size(path: str) -> tuple[int, int]:
  """(width, height) from a PNG's header; (0, 0) if it is not a PNG."""
  with open(path, "rb") as f:
    head = f.read(24)
  if head[:8] != b"\x89PNG\r\n\x1a\n":
    return 0, 0
  return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")


def not_drawn(report_dir: str, folder: str) -> str:
  """One note where a traced folder holds no plots/ (traced with plots off), else ""."""
  if os.path.isdir(os.path.join(report_dir, folder, "plots")):
    return ""
  return (f'<p class="small">Figures of {esc(folder)}/ were not drawn (plots off); <code>python -m analysis plots '
          f'{esc(folder)}</code>, run in this report\'s folder, draws them from the traced files.</p>')


def figures(report_dir: str, folder: str, prefix: str, caption, grid: bool = False) -> str:
  """Every <folder>/<prefix>*.png, sorted, each with caption(name); side by side if `grid`."""
  full = os.path.join(report_dir, folder)
  names = sorted(f for f in os.listdir(full) if f.startswith(prefix) and f.endswith(".png")) if os.path.isdir(full) else []
  out = "\n".join(figure(report_dir, f"{folder}/{n}", caption(n[:-4])) for n in names)
  return f'<div class="grid">{out}</div>' if grid and len(names) > 1 else out


def claim_rows(verdicts: list[CL.Verdict], source: str) -> tuple[list[list[str]], list[list[str]]]:
  """One row per verdict: the judged values, the verdict, the rule beside it, and the values at every
  point with what the rotation accounts for (analysis.massive.claims.points_text)."""
  rows, classes = [], []
  for v in verdicts:
    ref = f"{esc(v.reference)}: {fmt(v.reference_value, v.reference_ci)}" if v.reference else "-"
    points = "<br>".join(esc(t) for t in CL.points_text(v))
    rows.append([esc(source), f"<b>{esc(v.claim)}</b> {esc(v.title)}", esc(v.quantity), fmt(v.value, v.value_ci), ref,
                 fmt(v.diff, v.ci), f"<b>{esc(v.verdict)}</b>", f'<span class="small">{esc(v.rule)}</span>',
                 f'<span class="small">{points}</span>'
                 + (f"<details><summary>notes</summary>{esc(v.notes)}</details>" if v.notes else "")])
    classes.append([""] * 6 + [VERDICT_CLASS.get(v.verdict, ""), "", ""])
  return rows, classes


CLAIM_HEADER = ["source", "claim", "measured quantity", "RoPE (tested)", "reference (NoPE arm or null)",
                "difference [95% CI]", "verdict", "rule (fixed before the data)", "at each point; notes"]


def shares_text(c1: CL.Verdict) -> str:
  """C1's shares of Q and K heads with a massive dim at every point, from its parts; 'no Q or K head'
  when every one of them is zero."""
  shares = [p for p in c1.parts or [] if p["key"] in ("share_Q", "share_K")]
  if shares and all(p["value"] == 0 for p in shares):
    return "no Q or K head has a massive dim at any point"
  by_point = {}
  for p in shares:
    by_point.setdefault(p["point"], []).append(f"{p['key'][-1]} {fmt(p['value'], p['ci'])}")
  return "; ".join(f"{CL.POINT_LABELS[pt]}: {', '.join(v)}" for pt, v in by_point.items())


def reference(v: CL.Verdict) -> str:
  """The reference and its value ('null 0.25' already holds its value)."""
  return v.reference if v.reference.startswith("null") else f"{v.reference or 'no reference'} {fmt(v.reference_value)}"


def where_text(lf: CL.Verdict) -> str:
  """Where the pair energy sits against the context boundary, from C3-lowfreq's parts."""
  by = {p["key"]: p for p in lf.parts or []}
  if not {"peak_pair", "ctx_pair", "band_share"} <= set(by):
    return ""
  peak, ctx, band = by["peak_pair"], by["ctx_pair"], by["band_share"]
  return (f"low-frequency share {fmt(lf.value, lf.value_ci)} vs {reference(lf)} ({lf.verdict}); "
          f"median peak pair {fmt(peak['value'])} of {peak['n_pairs']}; first pair whose wavelength exceeds the "
          f"context {ctx['value']} (peak minus it: {peak['value'] - ctx['value']:+g}); boundary-band share "
          f"{fmt(band['value'], band['ci'])} vs null {fmt(band['null'])}")


def pooled_points_text(c: dict) -> list[str]:
  """A seed group's claim at every point: the pooled difference where every seed has one, else the
  pooled arm value; and the rotation's part."""
  out = []
  for point in CL.POINTS if c.get("points") else ():
    key = "diff" if c["points"][point]["diff"]["why"] is None else "value"
    out.append(f"{CL.POINT_LABELS[point]}, {MEASURES[key]}: {_pooled(c['points'][point][key])}")
  if c.get("points") and "rotation" in c["points"]:
    out.append(f"rotation itself (post minus pre): {_pooled(c['points']['rotation'])}")
  return out


def _pooled(p: dict) -> str:
  return fmt(p["mean"], p["ci"]) if p["mean"] is not None else f"not pooled: {p['why']}"


def c6_text(v: CL.Verdict, c6: dict) -> str:
  """A C6 verdict in words from its numbers: the difference, or 'no power' when both compared schemes
  score 100% (the difference is then 0 whatever the schemes do), and the held-out perplexity of the
  compared schemes against the float model where the quantization summary has it."""
  model = next((m for m in c6.get("models", {}) if v.title.endswith(f"({m})")), None)
  ppl = c6.get("models", {}).get(model, {}).get("ppl", {})
  compared = sorted((s for s in ppl if s != "fp" and f"{s} (" in v.quantity), key=v.quantity.index)
  text = f"{v.title}: {v.verdict}"
  if v.value is not None and v.value == v.reference_value == 1:
    text += " (no power: both schemes at 100%, the ceiling)"
  elif v.diff is not None:
    text += f" (difference {fmt(v.diff, v.ci)})"
  if v.notes:
    text += f"; {v.notes}"
  if "fp" in ppl and compared:
    fp = ppl["fp"]["ppl"]
    text += f"; held-out perplexity fp {fp:.2f}, " + ", ".join(
        f"{s} {ppl[s]['ppl']:.2f} ({ppl[s]['ppl'] - fp:+.2f})" for s in compared)
  return text


SINK_HEADER = ["arm", "step", "verdict", "rho(sink, rot_q max/mean)", "rho(sink, rot_k max/mean)",
               "sink share (head mean)", "share of sink heads", "uniform attention", "layers with Sun massive "
               "activations", "layers with |x| > ratio x median", "largest |x| / median (layer)", "largest |x| (layer)"]


def beside_text(lab: dict) -> str:
  """What ran beside training, and the run's wall time until its report, for the provenance line."""
  beside, wall = lab.get("beside_train") or [], lab.get("wall_seconds")
  if not beside:
    return ""
  text = f" {', '.join(beside)} ran beside training, in a second process"
  return text + (f"; the run took {wall:.0f} s ({wall / 60:.1f} min) until its report." if wall else ".")


def sink_rows(summ: dict) -> tuple[list[list[str]], list[list[str]]]:
  """One row per arm at its last step: the association verdict beside the residual statistics."""
  rows, classes = [], []
  for v in summ.get("verdicts", []):
    step = next(s for s in summ["steps"] if (s["arm"], s["step"]) == (v["arm"], v["step"]))
    layers = [g for g in summ["layers"] if (g["arm"], g["step"]) == (v["arm"], v["step"])]
    top = max(layers, key=lambda g: g["resid"]["max_ratio"][0])
    big = max(layers, key=lambda g: g["resid"]["max_abs"][0])
    a = v["association"]
    rows.append([esc(v["arm"]), num(v["step"]), esc(v["verdict"]), fmt(a["rot_q"][0], a["rot_q"][1:]),
                 fmt(a["rot_k"][0], a["rot_k"][1:]), fmt(step["sink"][0], step["sink"][1:]),
                 fmt(step["sink_head"][0], step["sink_head"][1:]), fmt(step["uniform"]),
                 f"{sum(g['resid']['n_sun'][0] > 0 for g in layers)} of {len(layers)}",
                 f"{sum(g['resid']['n_ratio'][0] > 0 for g in layers)} of {len(layers)}",
                 f"{fmt(top['resid']['max_ratio'][0])} (L{top['layer']})",
                 f"{fmt(big['resid']['max_abs'][0])} (L{big['layer']})"])
    classes.append(["", "", VERDICT_CLASS.get(v["verdict"], ""), "", "", "", "", "", "", "", "", ""])
  return rows, classes


def resid_text(summ: dict) -> list[str]:
  """Where each arm's largest residual activations sit at its last step, from the numbers."""
  out = []
  for v in summ.get("verdicts", []):
    layers = [g for g in summ["layers"] if (g["arm"], g["step"]) == (v["arm"], v["step"])]
    massive = [g for g in layers if g["resid"]["n_ratio"][0] > 0]
    shown = massive or [max(layers, key=lambda g: g["resid"]["max_ratio"][0])]
    where = "; ".join(f"L{g['layer']}: dim {g['resid']['top_dim'][0]} in {g['resid']['top_dim'][1]:.0%} of prompts, "
                      f"on the first token in {g['resid']['first_token_share']:.0%}" for g in shown[:6])
    lead = (f"{len(massive)} of {len(layers)} layers hold activations above "
            f"{summ['settings']['resid_ratio']:g} x the median" if massive else
            f"no layer holds an activation above {summ['settings']['resid_ratio']:g} x the median; the largest")
    out.append(f"{v['arm']} (step {v['step']}): {lead} ({where}{'; ...' if len(shown) > 6 else ''}).")
  return out


def sinks_section(report_dir: str, folder: str, anchor: str) -> str:
  """Attention sinks and residual massive activations of a traced folder (analysis.massive.sinks), if any."""
  summ = atomic.read_json(os.path.join(report_dir, folder, "sinks.json"), {})
  if not summ.get("verdicts"):
    return ""
  rows, classes = sink_rows(summ)
  plots = f"{folder}/plots"
  return "\n".join([
      f'<h2 id="{anchor}">Attention sinks and the residual stream</h2>',
      f'<p class="small">Rule (fixed before the data): {esc(summ["rule"])}. Residual massive activations '
      f"(Sun et al. 2024): |x| of a block output &gt; {summ['settings']['resid_abs']:g} and &gt; "
      f"{summ['settings']['resid_ratio']:g} x the median |x| of that layer's hidden states (per prompt); the "
      "scale-free form drops the absolute floor. Intervals: 95% bootstrap over prompts (and heads).</p>",
      table_html(SINK_HEADER, rows, classes),
      "".join(f"<p>{esc(line)}</p>" for line in resid_text(summ)),
      figure(report_dir, f"{plots}/sink_map.png", "share of attention on the first token per layer x head"),
      figure(report_dir, f"{plots}/sinks_over_steps.png", "sink share per layer over steps and its rank "
             "correlation with rot_q/rot_k max/mean"),
      figures(report_dir, plots, "attention_", lambda n: f"attention patterns of probe 0: {n[10:]}"),
      figure(report_dir, f"{plots}/residual.png", "largest residual |x| / median per layer (labels: its dim) "
             "beside the top head's rot_q/rot_k max/mean")])


# ----------------------------------------------------------------------------------------- content

class Report:
  """Everything the page shows, read once from the report directory."""

  def __init__(self, report_dir: str):
    self.dir = report_dir
    self.lab = atomic.read_json(os.path.join(report_dir, "lab.json"), {})
    self.trace_claims = CL.load_claims(os.path.join(report_dir, "trace"))
    self.pre_claims = CL.load_claims(os.path.join(report_dir, "pretrained"))
    self.c5_claims = CL.load_claims(os.path.join(report_dir, "disrupt"))
    self.c6_claims = CL.load_claims(os.path.join(report_dir, "quant"))
    self.pre_facts = atomic.read_json(os.path.join(report_dir, "pretrained", "pretrained.json"), {})
    self.trace_meta = atomic.read_json(os.path.join(report_dir, "trace", "meta.json"), {})
    self.comparisons = atomic.read_json(os.path.join(report_dir, "trace", "comparisons.json"), {})
    self.arms = atomic.read_json(os.path.join(report_dir, "trace", "arms.json"), {})
    self.c5 = atomic.read_json(os.path.join(report_dir, "disrupt", "summary.json"), {})
    self.c6 = atomic.read_json(os.path.join(report_dir, "quant", "summary.json"), {})

  def stage(self, name: str) -> str:
    return self.lab.get("stages", {}).get(name, {}).get("status", "-")

  def exp_name(self) -> str:
    return self.lab.get("experiment", {}).get("name", self.lab.get("name", "run"))

  def scale(self) -> str:
    t = self.lab.get("experiment", {}).get("train", {})
    if not t:
      return "unknown size"
    m, d = t.get("model", {}), t.get("data", {})
    tokens = t.get("steps", 0) * d.get("batch_size", 0) * d.get("seq_len", 0)
    return (f"d_model {m.get('d_model')}, {m.get('n_layers')} layers, {m.get('n_heads')} heads, "
            f"{t.get('steps')} steps x {d.get('batch_size')} x {d.get('seq_len')} tokens = {num(tokens / 1e6, 2)}M tokens per arm")

  def _claim(self, verdicts, cid):
    return next((v for v in verdicts if v.claim == cid), None)

  # ------------------------------------------------------------------------------------ summary

  def summary_lines(self) -> list[str]:
    """Five lines: the paired run's verdicts, its numbers, SmolLM2, C5, C6."""
    tc = {v.claim: v for v in self.trace_claims}
    diverged = self.lab.get("diverged", {})
    arms = ", ".join(a + (" (diverged)" if a in diverged else "") for a in self.lab.get("experiment", {}).get("arms", {}))
    arms = arms or "-"
    if tc:
      line1 = (f"{self.exp_name()} ({arms}; {self.scale()}): "
               + ", ".join(f"{c} {v.verdict}" for c, v in tc.items()))
      more = len(self.comparisons.get("comparisons", [])) - 1
      if more > 0:
        line1 += (f" (first pair; {more} more comparisons and {len(self.comparisons.get('seed_groups', []))} "
                  "seed groups in the report)")
      c1, c3, lf = tc.get("C1"), tc.get("C3"), tc.get("C3-lowfreq")
      line2 = (f"  step {c1.step}: share of Q/K heads with a massive dim RoPE {fmt(c1.value, c1.value_ci)} vs "
               f"{c1.reference or 'no reference'} {fmt(c1.reference_value)}; "
               f"{c3.quantity} RoPE {fmt(c3.value)} vs {fmt(c3.reference_value)}; "
               f"low-freq share RoPE {fmt(lf.value)} vs {reference(lf)}")
    else:
      line1 = f"{self.exp_name()}: no traced claims (train/trace {self.stage('train')}/{self.stage('trace')})"
      line2 = "  -"
    pc = {v.claim: v for v in self.pre_claims}
    if pc:
      name = self.pre_facts.get("name", "pretrained model")
      c1 = pc.get("C1")
      line3 = (f"{name}: share of Q/K heads with a massive dim {fmt(c1.value, c1.value_ci)}; "
               + ", ".join(f"{c} {v.verdict}" for c, v in pc.items() if c != "C3"))
    else:
      line3 = f"pretrained model: not analysed (stage {self.stage('pretrained')})"
    c5 = self._claim(self.c5_claims, "C5")
    line4 = (f"C5 disruption ({c5.notes.split(':')[0]}): {c5.verdict}; contextual drop under massive disruption "
             f"{fmt(c5.value, c5.value_ci)}" if c5 else f"C5 disruption: not run (stage {self.stage('disrupt')})")
    if self.c6_claims:
      line5 = "C6 quantization: " + "; ".join(c6_text(v, self.c6) for v in self.c6_claims)
    else:
      line5 = f"C6 quantization: not run (stage {self.stage('quant')})"
    return [line1, line2, line3, line4, line5]

  def bottom_line(self) -> str:
    """The verdicts and the numbers behind them, in sentences made from those numbers only."""
    parts = []
    tc = {v.claim: v for v in self.trace_claims}
    if tc:
      parts.append(f"Paired run ({esc(self.scale())}): " + esc(", ".join(f"{c} {v.verdict}" for c, v in tc.items())) + ".")
      parts += self.claim_sentences(tc)
    pc = {v.claim: v for v in self.pre_claims}
    if pc:
      parts.append(f"In {esc(self.pre_facts.get('name', 'the pretrained model'))}: "
                   + esc(", ".join(f"{c} {v.verdict}" for c, v in pc.items())) + ".")
      parts += self.claim_sentences(pc)
    c5 = self._claim(self.c5_claims, "C5")
    if c5:
      parts.append(f"C5 (disruption): <b>{esc(c5.verdict)}</b> ({esc(c5.notes)}).")
    for v in self.c6_claims:
      parts.append(f"{esc(v.claim)}: {esc(c6_text(v, self.c6))}.")
    if not parts:
      parts.append("No stage produced results yet.")
    return " ".join(parts)

  @staticmethod
  def claim_sentences(tc: dict) -> list[str]:
    """C1's shares, C3's rotation part and where the energy sits, each from its verdict's numbers."""
    out = []
    if tc.get("C1") and tc["C1"].parts:
      out.append(f"C1: share of heads with a massive dim: {esc(shares_text(tc['C1']))}.")
    if tc.get("C3") and tc["C3"].rotation:
      out.append(f"C3: {esc(CL.rotation_text(tc['C3']))}.")
    if tc.get("C3-lowfreq") and where_text(tc["C3-lowfreq"]):
      out.append(f"C3-lowfreq: {esc(where_text(tc['C3-lowfreq']))}.")
    return out

  # ------------------------------------------------------------------------------------ sections

  def claims_section(self) -> str:
    rows, classes = [], []
    exp = f"paired run {self.exp_name()}"
    for verdicts, source in ((self.trace_claims, exp), (self.pre_claims, self.pre_facts.get("name", "pretrained")),
                             (self.c5_claims, "disruption (C5)"), (self.c6_claims, "quantization (C6)")):
      r, c = claim_rows(verdicts, source)
      rows += r
      classes += c
    for stage, cid, title in (("disrupt", "C5", "Function"), ("quant", "C6", "Quantization")):
      if not (self.c5_claims if stage == "disrupt" else self.c6_claims):
        rows.append(["-", f"<b>{cid}</b> {title}", "-", "-", "-", "-", "<b>not run</b>", "",
                     esc(f"stage {stage}: {self.stage(stage)}")])
        classes.append([""] * 6 + ["off", "", ""])
    points = "; ".join(f"{p}: {CL.POINT_LABELS[p]}" for p in CL.POINTS)
    return (f'<h2 id="claims">Claims C1-C6</h2><p class="small">Each verdict follows the rule printed beside it, '
            f"fixed before the data (definitions: docs/claims.md). Intervals: {CL.LEVEL:.0%} bootstrap over "
            "prompts and heads (C1-C4), over examples (C5, C6). 'RoPE (tested)' is the arm or model under test; "
            "the reference is the paired NoPE arm, or the null value where there is none. Concentration is "
            f"measured at three points ({esc(points)}); the last column gives every point and marks the one "
            "the rule judges.</p>" + table_html(CLAIM_HEADER, rows, classes))

  def training_section(self) -> str:
    run_dir = self.lab.get("run_dir")
    if not run_dir or not os.path.isdir(run_dir):
      return ""
    arms = list(self.lab.get("experiment", {}).get("arms", {}))
    metrics = {a: [r for _, r in atomic.read_jsonl(os.path.join(run_dir, a, "metrics.jsonl"))[0]] for a in arms}
    evals = {a: [r for _, r in atomic.read_jsonl(os.path.join(run_dir, a, "eval.jsonl"))[0]] for a in arms}
    fig = training_figure(metrics, evals, os.path.join(self.dir, "figures", "training.png"))
    rows = []
    families = _families(evals)
    for a in arms:
      last_m = metrics[a][-1] if metrics[a] else {}
      last_e = evals[a][-1] if evals[a] else {}
      rows.append([esc(a), fmt(last_m.get("step")), fmt(last_m.get("loss"))]
                  + [fmt(_acc(last_e.get(f))) for f in families])
    out = [f'<h2 id="training">Training: {esc(self.exp_name())}</h2><p>{esc(self.scale())}. {esc(self.overrides_text())}</p>',
           table_html(["arm", "last step", "loss"] + [f"{esc(f)} (held-out exact match)" for f in families], rows)]
    out += [f'<p class="diverged"><b>{esc(a)} diverged</b>: {esc(r.get("message", ""))}. No verdict or '
            'analysis uses this arm.</p>' for a, r in self.lab.get("diverged", {}).items()]
    if fig:
      out.append(figure(self.dir, "figures/training.png", "training loss and held-out accuracy per family over steps"))
    return "\n".join(out)

  def overrides_text(self) -> str:
    """What the arms differ by, from the experiment's overrides."""
    overrides = self.lab.get("experiment", {}).get("arms", {})
    seeds = {a: o[k] for a, o in overrides.items() for k in ("seed", "train.seed") if k in o}
    keys = sorted({k for o in overrides.values() for k in o if k not in ("seed", "train.seed")})
    differ = f"Arms differ by their overrides of {', '.join(keys)}" if keys else "Arms have no overrides but the seed"
    if not seeds:
      return f"{differ}; they share the seed, hence the initial weights and the batches."
    return (f"{differ}; seeds set per arm: {', '.join(f'{a} {s}' for a, s in seeds.items())} (any other arm: "
            "the shared config's seed).")

  def trace_section(self) -> str:
    if not os.path.isdir(os.path.join(self.dir, "trace")):
      return ""
    stats = self.trace_meta.get("stats", {})
    cap = self.trace_meta.get("capture", {})
    out = ['<h2 id="emergence">Emergence over training steps</h2>',
           f'<p class="small">{esc(cap.get("n_probes"))} probe prompts of {esc(cap.get("length"))} tokens; '
           f"massive: M[h,d] &gt; {esc(stats.get('lam'))} x mean_d M[h,d]; M over prompt tokens "
           f"(drop_first={esc(stats.get('drop_first'))}). Shaded bands: 95% bootstrap intervals.</p>",
           not_drawn(self.dir, "trace"),
           figure(self.dir, "trace/plots/emergence.png", "per layer over steps, arms overlaid: max/mean of the most "
                  "concentrated head against the massive threshold lambda, head-mean max/mean per dim and per "
                  "rotary pair, and the low-frequency share, of rot_q, rot_k, v"),
           figure(self.dir, "trace/plots/layer_profile.png", "per layer at the last step (C4): share of heads with "
                  "a massive dim, max/mean per dim and per rotary pair, low-frequency share"),
           '<h2 id="heatmaps">Heatmaps</h2>',
           figures(self.dir, "trace/plots", "heatmap_", lambda n: f"M[h,d] / mean_d M per layer and tensor: {n[8:]}"),
           '<h2 id="frequency">Frequency: where the mass sits</h2>',
           figures(self.dir, "trace/plots", "pair_energy_", lambda n: f"share of pair energy vs rotary frequency, "
                   f"context boundary marked: {n[12:]}", grid=True),
           figures(self.dir, "trace/plots", "bars3d_", lambda n: f"|rot_q| over tokens x dims, probe 0: {n[7:]}", grid=True),
           self.arms_section(), self.comparison_section(), sinks_section(self.dir, "trace", "sinks")]
    return "\n".join(out)

  def arms_section(self) -> str:
    """The mechanism across the arms of a sweep (trace/arms.json), for two or more arms."""
    arms = self.arms.get("arms", [])
    if len(arms) < 2:
      return ""

    def cell(r, stat, null=None):
      if r.get(stat) is None:
        return ""
      return fmt(r[stat], r.get(stat + "_ci")) + (f" (null {fmt(r[null])})" if null and r.get(null) is not None else "")

    def boundary(r, key):
      if r.get(key) is None:
        return ""
      return f"{r[key]} = P (none)" if r[key] >= r["n_pairs"] else esc(r[key])
    rows = []
    for r in arms:
      rotary = "" if r.get("fraction") is None else fmt(r["fraction"]) + (f" {esc(r['partial'])}" if r.get("partial") else "")
      unrot = cell(r, "unrot_share")
      if unrot and r.get("unrot_null") is not None:
        unrot += f" (dims {fmt(r['unrot_null'])})"
      rows.append([esc(r["arm"]), esc(r["step"]), esc(r["position"]) + ("" if r.get("n_pairs") is not None else
                                                                         " <span class=\"small\">(convention pairing)</span>"),
                   "" if r.get("base") is None else f"{r['base']:g}", rotary, fmt(r["context"], digits=6),
                   boundary(r, "j_ctx"), boundary(r, "j_2ctx"), "" if r.get("n_pairs") is None else esc(r["n_pairs"]),
                   cell(r, "peak_pair"), cell(r, "peak_minus_ctx"), cell(r, "band_share", "band_null"),
                   cell(r, "lf_share", "lf_null"), unrot]
                  + [cell(r, f"{pre}{stat}") for stat in ("max_mean", "any_massive") for pre in ("pre_", "", "pair_")])
    level = self.arms.get("level", CL.LEVEL)
    return "\n".join([
        '<h2 id="arms">Where the mass sits, arm by arm</h2>',
        '<p class="small">j_ctx is the first rotary pair whose wavelength 2&pi; base<sup>2j/d<sub>rot</sub></sup> '
        "exceeds the arm's training context (j_2ctx: twice the context; P, the number of rotated pairs, when none "
        "does). The prediction (docs/claims.md) is that the peak pair follows j_ctx as the base and the context change, "
        "and that partial RoPE moves mass to the unrotated dims. rot_q/rot_k heads of all layers at each arm's last "
        f"step, {level:.0%} bootstrap intervals over prompts and heads; blank: no rotary pairs (arms without "
        "RoPE, whose shares use a convention pairing and mean something only against their null) or no "
        "unrotated dims.</p>",
        table_html(["arm", "step", "position", "RoPE base", "rotary fraction", "context", "j_ctx", "j_2ctx", "P",
                    "peak pair", "peak - j_ctx", "boundary-band share", "low-freq share", "unrotated share",
                    "max/mean pre-RoPE", "max/mean post-RoPE", "max/mean per pair"]
                   + [f"share of heads with a massive {unit} (lambda={self.arms.get('lam', S.LAM):g}) {point}"
                      for unit, point in (("dim", "pre-RoPE"), ("dim", "post-RoPE"), ("pair", "per pair"))], rows)])

  def comparison_section(self) -> str:
    rows_in = self.comparisons.get("comparisons", [])
    if len(rows_in) < 2:
      return ""
    rows, classes = [], []
    for comp in rows_in:
      for v in comp["verdicts"]:
        rows.append([esc(comp["arm"]), esc(comp["reference"] or "-"), esc(comp["seed"]), esc(v["claim"]),
                     fmt(v["value"], v["value_ci"]), fmt(v["reference_value"], v["reference_ci"]), fmt(v["diff"], v["ci"]),
                     f"<b>{esc(v['verdict'])}</b>",
                     '<span class="small">' + "<br>".join(esc(t) for t in CL.points_text(CL.Verdict(**v))) + "</span>"])
        classes.append([""] * 7 + [VERDICT_CLASS.get(v["verdict"], ""), ""])
    out = ['<h2 id="comparisons">Every arm against its same-seed NoPE arm</h2>',
           table_html(["arm", "reference", "seed", "claim", "arm value", "reference value", "difference [95% CI]",
                       "verdict", "at each point"], rows, classes)]
    groups = self.comparisons.get("seed_groups", [])
    if groups:
      g_rows = []
      for g in groups:
        for cid, c in g["claims"].items():
          counts = {v: c["verdicts"].count(v) for v in dict.fromkeys(c["verdicts"])}
          pooled = esc(_pooled(c))
          per_seed = ", ".join(f"{fmt(x)} (seed {s}, step {t})" for x, s, t in zip(c["values"], c["seeds"], c["steps"]))
          g_rows.append([esc(g["recipe"]), esc(cid), MEASURES[c["measure"]], esc(per_seed),
                         pooled, esc(", ".join(f"{n}/{len(c['verdicts'])} {v}" for v, n in counts.items())),
                         '<span class="small">' + "<br>".join(esc(t) for t in pooled_points_text(c)) + "</span>"])
      out += ['<h3>Over seeds</h3><p class="small">Per recipe (the arm\'s overrides without its seed): the '
              "value each claim's rule judges, per seed, and their mean with a "
              f"{self.comparisons.get('level', 0.95):.0%} t interval over seeds (only when every seed is at the "
              "same step: a seed still training is listed, not pooled), "
              "and how many seeds reach each verdict.</p>",
              table_html(["recipe", "claim", "value", "per seed", "mean [t interval over seeds]", "verdicts",
                          "at each point, mean over seeds"], g_rows)]
    return "\n".join(out)

  def disrupt_section(self) -> str:
    d = os.path.join(self.dir, "disrupt")
    if not os.path.exists(os.path.join(d, "table.md")):
      return f'<h2 id="disruption">Disruption (C5)</h2><p>Not run (stage {esc(self.stage("disrupt"))}).</p>'
    with open(os.path.join(d, "table.md")) as f:
      tbl = markdown_tables(f.read())
    cfg = self.c5.get("disrupt", {})
    return (f'<h2 id="disruption">Disruption (C5)</h2><p class="small">Suite {esc(self.c5.get("suite"))}, '
            f"{esc(self.c5.get('n'))} examples per task, greedy decoding, strict answer parsing. Each massive "
            f"dimension of Q and K ({esc(cfg.get('rope', ''))}-RoPE, criterion {esc(cfg.get('criterion', ''))}) is "
            "replaced by its own mean over the prompt, during prefill only. Conditions run: "
            f"{esc(', '.join(EXP.COLUMNS.get(m, m) for m in self.c5.get('modes', [])) or 'not recorded')}. "
            "Per-template cells: accuracy % [Wilson 95%]; pooled cells: bootstrap over templates and items.</p>"
            + tbl + figure(self.dir, "disrupt/c5.png", "accuracy per task under each disruption (Wilson 95% bars)"))

  def quant_section(self) -> str:
    d = os.path.join(self.dir, "quant")
    if not os.path.exists(os.path.join(d, "table.md")):
      return f'<h2 id="quantization">Quantization (C6)</h2><p>Not run (stage {esc(self.stage("quant"))}).</p>'
    with open(os.path.join(d, "table.md")) as f:
      tbl = markdown_tables(f.read(), paragraphs=False)    # the verdicts are written below from their numbers
    tbl += "".join(f"<p>{esc(c6_text(v, self.c6))}</p>" for v in self.c6_claims)
    pngs = figures(self.dir, "quant", "c6", lambda n: "accuracy relative to the unquantized model per task")
    return (f'<h2 id="quantization">Quantization (C6)</h2><p class="small">Schemes '
            f"{esc(', '.join(s.get('name', '') for s in self.c6.get('schemes', [])))}; calibration "
            f"{esc(self.c6.get('calib'))} Shakespeare windows; perplexity on held-out windows "
            f"{esc(self.c6.get('ppl_windows'))}.</p>" + tbl + pngs)

  def pretrained_section(self) -> str:
    if not self.pre_facts:
      return f'<h2 id="pretrained">Pretrained model</h2><p>Not analysed (stage {esc(self.stage("pretrained"))}).</p>'
    f = self.pre_facts
    rows, classes = claim_rows(self.pre_claims, f.get("name", ""))
    return "\n".join([
        f'<h2 id="pretrained">{esc(f.get("name"))} (pretrained, {f.get("params", 0):,} parameters)</h2>',
        f'<p class="small">Source {esc(f.get("source"))} ({esc(f.get("format"))}, RoPE layout {esc(f.get("layout"))}); '
        f"{esc(f.get('probes', {}).get('n'))} probe windows of {esc(f.get('probes', {}).get('length'))} tokens "
        f"({esc(f.get('probes', {}).get('text'))}); wavelength boundary at context {esc(f.get('context'))}. "
        "The same analysis as a traced run, with the model as one arm at step 0 and no NoPE twin: references "
        f"{esc(', '.join(sorted({v.reference for v in self.pre_claims if v.reference})) or 'none')}.</p>",
        table_html(CLAIM_HEADER, rows, classes), not_drawn(self.dir, "pretrained"),
        figures(self.dir, "pretrained/plots", "layer_profile", lambda n: "statistics per layer"),
        figures(self.dir, "pretrained/plots", "heatmap_", lambda n: "M[h,d] / mean_d M per layer and tensor"),
        figures(self.dir, "pretrained/plots", "pair_energy_", lambda n: "share of pair energy vs rotary frequency"),
        figures(self.dir, "pretrained/plots", "bars3d_", lambda n: "|rot_q| over tokens x dims, probe 0"),
        sinks_section(self.dir, "pretrained", "sinks-pretrained")])

  def provenance_section(self) -> str:
    lab = self.lab
    st_rows = []
    for name, s in lab.get("stages", {}).items():
      st_rows.append([esc(name), esc(s.get("status")), fmt(s.get("seconds"), digits=4) if s.get("seconds") else "-",
                      esc(s.get("finished") or "-"), esc(s.get("what"))])
    total = sum(s.get("seconds") or 0 for s in lab.get("stages", {}).values() if s.get("status") != "skipped")
    versions = lab.get("versions", {})
    return "\n".join([
        '<h2 id="provenance">How this report was made</h2>',
        f"<p>Command: <code>{esc(lab.get('command', '-'))}</code>, started {esc(lab.get('started', '-'))}.</p>",
        '<h3>Stages</h3><p class="small">seconds: wall time of the run that produced each stage ("reused" '
        "stages were done by an earlier run with the same inputs). The machine may have been shared.</p>",
        table_html(["stage", "status", "seconds", "finished", "what"], st_rows),
        f"<p>Sum of stage times: {total:.0f} s ({total / 60:.1f} min).{beside_text(lab)}</p>",
        "<h3>Versions and machine</h3>",
        table_html(["", ""], [[esc(k), esc(v)] for k, v in versions.items()]),
        "<h3>Configs</h3><details><summary>lab settings</summary><pre>"
        + esc(json.dumps(lab.get("lab", {}), indent=1)) + "</pre></details>"
        "<details><summary>experiment (the resolved config every arm started from, and the arms' overrides)</summary>"
        "<pre>" + esc(json.dumps(lab.get("experiment", {}), indent=1)) + "</pre></details>"])

  def page(self) -> str:
    title = f"minilm lab report: {self.lab.get('name', os.path.basename(os.path.abspath(self.dir)))}"
    nav = " ".join(f'<a href="#{a}">{t}</a>' for a, t in (
        ("claims", "claims"), ("training", "training"), ("emergence", "emergence"), ("heatmaps", "heatmaps"),
        ("frequency", "frequency"), ("sinks", "sinks"), ("disruption", "disruption"), ("quantization", "quantization"),
        ("pretrained", "pretrained model"), ("provenance", "configs, versions, times")))
    body = [f"<h1>{esc(title)}</h1><nav>{nav}</nav>",
            f'<p class="lead">{self.bottom_line()}</p>',
            self.claims_section(), self.training_section(), self.trace_section(), self.disrupt_section(),
            self.quant_section(), self.pretrained_section(), self.provenance_section()]
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>'
            f'<meta name="viewport" content="width=device-width, initial-scale=1"><style>{CSS}</style></head>'
            f"<body>{''.join(body)}</body></html>\n")


def _families(evals: dict[str, list]) -> list[str]:
  """Per-family accuracy keys of eval.jsonl rows (dotted keys such as 'conflict.context' are splits)."""
  return sorted({k for rs in evals.values() for r in rs for k in r if k != "step" and "." not in k
                 and _acc(r[k]) is not None})


def _acc(x):
  """An eval.jsonl cell's accuracy, or None where it holds none."""
  return x if isinstance(x, (int, float)) else None


def training_figure(metrics: dict[str, list], evals: dict[str, list], path: str) -> bool:
  """Loss and held-out accuracy per family over steps, arms overlaid; False if there is nothing."""
  if not any(metrics.values()):
    return False
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  families = _families(evals)
  fig, axes = plt.subplots(1, 2 if families else 1, figsize=(12 if families else 6, 3.6), squeeze=False)
  for arm, rows in metrics.items():
    axes[0, 0].plot([r["step"] for r in rows], [r["loss"] for r in rows], label=arm)
  axes[0, 0].set(xlabel="step", ylabel="training loss (weighted)", title="loss")
  axes[0, 0].legend(fontsize=8)
  if families:
    styles = ["-", "--", ":", "-."]
    for i, (arm, rows) in enumerate(evals.items()):
      for j, fam in enumerate(families):
        pts = [(r["step"], _acc(r.get(fam))) for r in rows if _acc(r.get(fam)) is not None]
        if pts:
          axes[0, 1].plot(*zip(*pts), styles[i % len(styles)], color=f"C{j}", label=f"{arm} {fam}")
    axes[0, 1].set(xlabel="step", ylabel="exact match", title="held-out accuracy", ylim=(-0.02, 1.02))
    axes[0, 1].legend(fontsize=7, ncol=2)
  fig.tight_layout()
  atomic.savefig(fig, path, dpi=100)
  plt.close(fig)
  return True


# ------------------------------------------------------------------------------------------ entry

def build(report_dir: str) -> str:
  """Write index.html (and figures/training.png, summary.txt) into report_dir; returns its path."""
  report = Report(report_dir)
  path = os.path.join(report_dir, "index.html")
  atomic.write_text(path, report.page())
  atomic.write_text(os.path.join(report_dir, "summary.txt"), "\n".join(report.summary_lines()) + "\n")
  return path


def summary_lines(report_dir: str) -> list[str]:
  return Report(report_dir).summary_lines()
