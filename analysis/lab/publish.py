"""Publish a lab report into results/<name>/, small enough to commit to git.

  python -m analysis.lab.publish reports/rope_vs_nope                 # -> results/rope_vs_nope/
  python -m analysis.lab.publish reports/rope_vs_nope --out results --name rope_vs_nope_cpu

Keeps index.html, summary.txt, every .png/.svg and .json/.csv/.txt/.md, and .jsonl files, all at
their relative paths (so the page shows every figure it showed before). Leaves out arrays (.npy,
.npz), checkpoints, every other kind of file (the PDF twins of the figures, logs) and anything over
2 MB, printing one line per file with its size. Writes PROVENANCE.md: the configs, git commit,
machine, wall time per stage and in total, and the date, all read from the report's own records
(lab.json, stages/<stage>.json, summary.txt), "unknown" where the report has none. Then regenerates
results/README.md, one row per results/*/PROVENANCE.md, so publishing again changes nothing.

No machine path is published: in every kept text file an absolute path under the repository root
(the working directory, or the root the report's lab.json records) becomes repository-relative, a
path inside a Python environment's site-packages becomes `<site-packages>/<rest>`, and any other
absolute path stops the publish with one line naming the file and the path.

  python -m analysis.lab.publish --rewrite-paths results/*            # the same rewrite, in place
"""
from __future__ import annotations

import argparse
import html
import json
import os
import re
import shutil
import urllib.parse

from minilm import atomic
from minilm.cli import guarded

MAX_BYTES = 2_000_000
KEEP = (".png", ".svg", ".json", ".csv", ".txt", ".md", ".jsonl")
TEXT = (".svg", ".json", ".csv", ".txt", ".md", ".jsonl", ".html")
"""Kept files whose machine paths are rewritten (the others, figures, are binary)."""
ARRAYS = (".npy", ".npz")
UNKNOWN = "unknown"
FIELDS = ("summary", "command", "date", "commit", "machine", "total wall time")
"""The rows of PROVENANCE.md's first table, in order; results/README.md is read back from them."""


class PublishError(ValueError):
  """A one-line reason the report cannot be published."""


def size_text(n: int) -> str:
  return f"{n / 1e6:.1f} MB" if n >= 1e6 else f"{n / 1e3:.1f} kB" if n >= 1e3 else f"{n} B"


def _read_json(path: str) -> dict:
  data = atomic.read_json(path, {})
  return data if isinstance(data, dict) else {}


def _cell(x) -> str:
  """A markdown table cell: one line, pipes escaped."""
  return " ".join(str(x).split()).replace("|", "\\|")


# ---------------------------------------------------------------------------------------- files

def choose(report_dir: str) -> tuple[list[str], list[tuple[str, int, str]]]:
  """(relative paths to copy, [(relative path, bytes, why)] left out), both sorted."""
  keep, left = [], []
  for root, dirs, files in os.walk(report_dir):
    dirs.sort()
    for f in sorted(set(files) - {atomic.LOCK, atomic.MARK}):   # who was writing: not part of the report
      path = os.path.join(root, f)
      rel = os.path.relpath(path, report_dir).replace(os.sep, "/")
      size = os.path.getsize(path)
      ext = os.path.splitext(f)[1].lower()
      if "checkpoints" in rel.split("/")[:-1]:
        why = "checkpoint"
      elif ext in ARRAYS:
        why = "array"
      elif size > MAX_BYTES:
        why = f"over {size_text(MAX_BYTES)}"
      elif rel == "index.html" or ext in KEEP:
        keep.append(rel)
        continue
      else:
        why = f"not a kept kind ({ext or 'no extension'})"
      left.append((rel, size, why))
  return keep, left


def page_links(index_html: str) -> set[str]:
  """Relative files that index.html refers to (src= and href=), normalized."""
  with open(index_html) as f:
    page = f.read()
  out = set()
  for ref in re.findall(r'(?:src|href)="([^"]*)"', page):
    ref = html.unescape(ref).split("#")[0]
    if ref and not re.match(r"^[a-z][a-z0-9+.-]*:|^/", ref, re.I):
      out.add(os.path.normpath(urllib.parse.unquote(ref)).replace(os.sep, "/"))
  return out


# ------------------------------------------------------------------------------------ paths

PATH = re.compile(r"(?<![\w.:/~\\<)\]}*-])(?<!<site-packages>)(?<!&lt;site-packages&gt;)(?:/[\w.+@~-]+){2,}")
"""An absolute path of two or more parts, not inside a URL, a relative path, a word ('tokens/s'), a
closing HTML tag or a path already rewritten to <site-packages>/..."""
SITE = re.compile(r"/(?:site|dist)-packages/")


def recorded_root(folder: str) -> str | None:
  """The repository root a report (or a published folder) was made in, from its lab.json: `root`
  when recorded, else the folder above `reports/` of an absolute `report_dir` (older reports)."""
  lab = _read_json(os.path.join(folder, "lab.json"))
  if isinstance(lab.get("root"), str) and os.path.isabs(lab["root"]):
    return os.path.normpath(lab["root"])
  report = lab.get("report_dir")
  if isinstance(report, str) and os.path.isabs(report) and os.path.basename(os.path.dirname(report)) == "reports":
    return os.path.dirname(os.path.dirname(os.path.normpath(report)))
  return None


def roots_of(folder: str, extra=()) -> list[str]:
  """The repository roots whose paths become relative: the working directory, the one the report
  records, any given; longest first, so a nested root wins."""
  roots = {os.path.normpath(os.path.abspath(r)) for r in (os.getcwd(), recorded_root(folder), *extra) if r}
  roots |= {os.path.realpath(r) for r in roots}
  return sorted(roots - {"/"}, key=len, reverse=True)


def rewrite_paths(text: str, roots, html_text: bool = False) -> tuple[str, list[str]]:
  """(text with machine paths made portable, the absolute paths it still holds). A path under a root
  becomes relative to it ('.' for the root itself), one inside site-packages (or dist-packages)
  `<site-packages>/<rest>` (escaped in HTML)."""
  unknown = []

  def portable(m):
    path = m.group(0)
    site = SITE.search(path)
    if site:
      return ("&lt;site-packages&gt;" if html_text else "<site-packages>") + path[site.end() - 1:]
    for root in roots:
      if path == root or path.startswith(root + "/"):
        return path[len(root) + 1:] or "."
      if path.rstrip(".") == root:                 # the root at the end of a sentence
        return "." + path[len(root):]
    unknown.append(path.rstrip("."))
    return path

  return PATH.sub(portable, text), unknown


def rewrite_files(folder: str, rels, roots) -> dict[str, str]:
  """{relative path: rewritten text} of the text files among `rels` whose text changes; a
  PublishError naming the first file and path that lies outside every root."""
  out = {}
  for rel in rels:
    if os.path.splitext(rel)[1].lower() not in TEXT:
      continue
    with open(os.path.join(folder, rel), encoding="utf-8", errors="surrogateescape") as f:
      text = f.read()
    new, unknown = rewrite_paths(text, roots, html_text=rel.endswith((".html", ".svg")))
    if unknown:
      raise PublishError(f"{os.path.join(folder, rel)}: holds the absolute path {unknown[0]}, outside the repository "
                         f"({', '.join(roots)}); a published result must not name it")
    if new != text:
      out[rel] = new
  return out


def _write(folder: str, texts: dict[str, str]) -> None:
  for rel, text in texts.items():
    with atomic.path(os.path.join(folder, rel)) as tmp, open(tmp, "w", encoding="utf-8",
                                                             errors="surrogateescape") as f:
      f.write(text)


def rewrite_published(folder: str, roots=(), log=print) -> int:
  """Rewrite the machine paths of an already published folder in place (all files or none); returns
  how many files changed."""
  if not os.path.isfile(os.path.join(folder, "PROVENANCE.md")):
    raise PublishError(f"{folder}: not a published result (no PROVENANCE.md)")
  rels = sorted(os.path.relpath(os.path.join(r, f), folder) for r, _, fs in os.walk(folder) for f in fs)
  texts = rewrite_files(folder, rels, roots_of(folder, roots))
  _write(folder, texts)
  log(f"{folder}: rewrote the paths of {len(texts)} files" + (f" ({', '.join(sorted(texts))})" if texts else ""))
  return len(texts)


# ----------------------------------------------------------------------------------- provenance

def stage_times(report_dir: str, lab: dict) -> list[dict]:
  """[{stage, status, seconds, finished}] in the lab's order. Seconds and finished come from
  stages/<stage>.json when its hash is the one lab.json records (the report stage's time is only
  there), else from lab.json; None where neither has one."""
  stages = lab.get("stages") or {}
  rows = []
  for name, s in stages.items():
    marker = _read_json(os.path.join(report_dir, "stages", f"{name}.json"))
    src = marker if marker and marker.get("hash") == s.get("hash") else s
    rows.append({"stage": name, "status": s.get("status") or UNKNOWN, "seconds": src.get("seconds"),
                 "finished": src.get("finished")})
  return rows


def total_text(rows: list[dict]) -> str:
  """Sum of the stage times of this run's stages (as the report's own sum: skipped ones excluded)."""
  counted = [r for r in rows if r["status"] != "skipped"]
  known = [r["seconds"] for r in counted if isinstance(r["seconds"], (int, float))]
  if not known:
    return UNKNOWN
  total = sum(known)
  text = f"{total:.2f} s ({total / 60:.1f} min)"
  missing = [r["stage"] for r in counted if not isinstance(r["seconds"], (int, float))]
  return text + (f"; without {', '.join(missing)}, whose time is unknown" if missing else "")


def provenance(report_dir: str, name: str) -> str:
  """PROVENANCE.md of a report: only what its lab.json, stages/ and summary.txt record."""
  lab = _read_json(os.path.join(report_dir, "lab.json"))
  versions = lab.get("versions") or {}
  try:
    with open(os.path.join(report_dir, "summary.txt")) as f:
      summary = [line.rstrip("\n") for line in f]
  except OSError:
    summary = []
  rows = stage_times(report_dir, lab)
  finished = sorted(r["finished"] for r in rows if r["finished"] and r["status"] != "skipped")
  date = (f"started {lab['started']}" if lab.get("started") else f"started {UNKNOWN}") + (
      f", last stage finished {finished[-1]}" if finished else "")
  fields = {"summary": summary[0] if summary and summary[0].strip() else UNKNOWN,
            "command": lab.get("command") or UNKNOWN,
            "date": date if lab.get("started") or finished else UNKNOWN,
            "commit": versions.get("git_commit") or UNKNOWN,
            "machine": versions.get("machine") or UNKNOWN,
            "total wall time": total_text(rows)}
  out = [f"# {name}: provenance", "",
         "Published by `python -m analysis.lab.publish` from the lab report "
         f"`{lab.get('report_dir') or UNKNOWN}`. Every value is read from the report's own records "
         '(`lab.json`, `stages/<stage>.json`, `summary.txt`); "unknown" marks one it does not record.', "",
         "| field | value |", "|---|---|"]
  out += [f"| {k} | {_cell(fields[k])} |" for k in FIELDS]
  out += ["", "## Wall time per stage", "",
          'Seconds of the run that produced each stage: a "reused" stage was done by an earlier run with the '
          "same inputs, a skipped one does not count. The machine may have been shared.", ""]
  if rows:
    out += ["| stage | status | seconds | finished |", "|---|---|---|---|"]
    for r in rows:
      sec = (f"{r['seconds']:.2f}" if isinstance(r["seconds"], (int, float))
             else "-" if r["status"] == "skipped" else UNKNOWN)
      out.append(f"| {_cell(r['stage'])} | {_cell(r['status'])} | {sec} | {_cell(r['finished'] or '-')} |")
    out.append(f"| **total** | | {_cell(fields['total wall time'])} | |")
  else:
    out.append(UNKNOWN)
  out += ["", "## Five-line summary", "", "```", *(summary or [UNKNOWN]), "```", "",
          "## Versions", ""]
  if versions:
    out += ["| | |", "|---|---|"] + [f"| {_cell(k)} | {_cell(v)} |" for k, v in versions.items()]
  else:
    out.append(UNKNOWN)
  for key, title in (("lab", "Lab settings (lab.json `lab`)"),
                     ("experiment", "Experiment (lab.json `experiment`): the resolved config every arm started "
                                    "from, and the arms' overrides")):
    out += ["", f"## {title}", ""]
    out += ["```json", json.dumps(lab[key], indent=1), "```"] if lab.get(key) else [UNKNOWN]
  return "\n".join(out) + "\n"


def read_fields(path: str) -> dict[str, str]:
  """The first table of a PROVENANCE.md, {field: value}."""
  fields = {}
  with open(path) as f:
    for line in f:
      m = re.match(r"^\| ([a-z ]+) \| (.*) \|$", line.rstrip("\n"))
      if m and m.group(1) in FIELDS and m.group(1) not in fields:
        fields[m.group(1)] = m.group(2).replace("\\|", "|")
  return fields


def write_index(out: str) -> str:
  """results/README.md from results/*/PROVENANCE.md, one row per published result, sorted by name."""
  rows = []
  for name in sorted(os.listdir(out)):
    prov = os.path.join(out, name, "PROVENANCE.md")
    if os.path.isfile(prov):
      f = read_fields(prov)
      commit = f.get("commit", UNKNOWN)
      commit = re.sub(r"^([0-9a-f]{12})[0-9a-f]{28}", r"\1", commit)
      link = urllib.parse.quote(name)
      # Outputs of the disruption / quantization CLIs have no page; their table stands in for it.
      page = "index.html" if os.path.isfile(os.path.join(out, name, "index.html")) else "table.md"
      rows.append(f"| [{_cell(name)}]({link}/PROVENANCE.md) | [{page}]({link}/{page}) | "
                  f"{_cell(f.get('summary', UNKNOWN))} | {_cell(commit)} | {_cell(f.get('total wall time', UNKNOWN))} |")
  text = "\n".join([
      "# Published results", "",
      "Lab reports copied by `python -m analysis.lab.publish reports/<name>`: the page, its figures and the small "
      "tables, without arrays or checkpoints. Each folder's PROVENANCE.md gives the configs, commit, machine and "
      "stage times. Folders without a page (outputs of `python -m analysis disrupt` or `analysis quantize`, "
      "copied by hand) link their table.md and give the same fields in their own PROVENANCE.md. "
      "This file is regenerated from those on every publish; edits here are lost.", "",
      "| name | report | summary (first line) | commit | total wall time |", "|---|---|---|---|---|", *rows]) + "\n"
  path = os.path.join(out, "README.md")
  atomic.write_text(path, text)
  return path


# ---------------------------------------------------------------------------------------- entry

def publish(report_dir: str, out: str = "results", name: str | None = None, log=print) -> str:
  """Copy report_dir into out/<name>/ with PROVENANCE.md and refresh out/README.md; returns the folder."""
  if not os.path.isdir(report_dir):
    raise PublishError(f"{report_dir}: no such directory")
  if not os.path.isfile(os.path.join(report_dir, "index.html")):
    raise PublishError(f"{report_dir} is not a lab report (no index.html); run minilm-lab first")
  name = name or os.path.basename(os.path.normpath(os.path.abspath(report_dir)))
  if not name or "/" in name or name.startswith("."):
    raise PublishError(f"--name: must be a plain folder name; got {name!r}")
  dest = os.path.join(out, name)
  src_abs, dest_abs = os.path.realpath(report_dir), os.path.realpath(dest)
  if os.path.commonpath([src_abs, dest_abs]) in (src_abs, dest_abs):
    raise PublishError(f"{dest} and {report_dir} overlap; publish into another --out")
  if os.path.exists(dest) and not (os.path.isfile(os.path.join(dest, "PROVENANCE.md")) or
                                   (os.path.isdir(dest) and not os.listdir(dest))):
    raise PublishError(f"{dest} exists and is not a published result (no PROVENANCE.md); choose another --name")

  keep, left = choose(report_dir)
  linked = page_links(os.path.join(report_dir, "index.html"))
  for rel, size, why in left:
    log(f"left out {rel} ({size_text(size)}, {why}" + ("; index.html links to it" if rel in linked else "") + ")")
  roots = roots_of(report_dir)
  texts = rewrite_files(report_dir, keep, roots)    # before anything is written: an unknown path stops here
  with atomic.staged_dir(dest, owns=("PROVENANCE.md", "*")) as tmp:   # a published result is replaced whole
    for rel in keep:
      os.makedirs(os.path.dirname(os.path.join(tmp, rel)), exist_ok=True)
      shutil.copyfile(os.path.join(report_dir, rel), os.path.join(tmp, rel))
    _write(tmp, texts)
    atomic.write_text(os.path.join(tmp, "PROVENANCE.md"), provenance(report_dir, name))
    _write(tmp, rewrite_files(tmp, ["PROVENANCE.md"], roots))
  readme = write_index(out)
  kept = sum(os.path.getsize(os.path.join(report_dir, r)) for r in keep)
  log(f"published {report_dir} -> {dest}: {len(keep)} files ({size_text(kept)}) + PROVENANCE.md; "
      f"left out {len(left)} ({size_text(sum(s for _, s, _ in left))}); index: {readme}")
  return dest


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(prog="python -m analysis.lab.publish", description=__doc__.split("\n")[0],
                              epilog="\n".join(__doc__.split("\n")[2:]),
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("report_dir", metavar="REPORT_DIR", nargs="?", help="a lab report, e.g. reports/rope_vs_nope")
  p.add_argument("--out", default="results", help="results directory (default: results)")
  p.add_argument("--name", default=None, help="folder name under --out (default: the report folder's name)")
  p.add_argument("--rewrite-paths", nargs="+", default=[], metavar="FOLDER",
                 help="instead: rewrite the machine paths of published folders (results/X) in place")
  p.add_argument("--root", action="append", default=[], metavar="DIR",
                 help="a further repository root whose paths become relative (with --rewrite-paths)")
  args = p.parse_args(argv)
  if args.rewrite_paths:
    if args.report_dir:
      p.error("give either REPORT_DIR or --rewrite-paths")
    return guarded(lambda: [rewrite_published(f, args.root) for f in args.rewrite_paths])
  if not args.report_dir:
    p.error("REPORT_DIR is required (or --rewrite-paths FOLDER ...)")
  return guarded(lambda: publish(args.report_dir, args.out, args.name))


if __name__ == "__main__":
  raise SystemExit(main())
