"""The lab's HTML report, rendered in headless Chromium: every image loads, the claims table is there.

Chromium (Debian package `chromium`) is installed by this test when missing, if we are root and apt
is available; otherwise the browser tests are skipped with a message saying why.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess

import numpy as np
import pytest
from flax import nnx

from analysis import claims as CL
from analysis import report as R
from analysis import trace as T
from minilm.config import ModelConfig
from minilm.model import Decoder

CHECK = """<script>
window.addEventListener('load', () => {
  const imgs = [...document.images];
  const bad = imgs.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.getAttribute('src'));
  const out = document.createElement('pre');
  out.id = 'img-check';
  out.textContent = JSON.stringify({total: imgs.length, broken: bad});
  document.body.appendChild(out);
});
</script>"""


def chromium() -> str:
  """Path of a chromium binary, installing the Debian package when missing and possible."""
  found = shutil.which("chromium") or shutil.which("chromium-browser")
  if found:
    return found
  why = "chromium is not installed"
  if os.geteuid() == 0 and shutil.which("apt-get"):
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    got = subprocess.run(["apt-get", "install", "-y", "-q", "chromium"], capture_output=True, text=True, env=env,
                         timeout=900)
    if got.returncode != 0:  # the package lists may be missing on a fresh machine
      subprocess.run(["apt-get", "update", "-q"], capture_output=True, env=env, timeout=600)
      got = subprocess.run(["apt-get", "install", "-y", "-q", "chromium"], capture_output=True, text=True,
                           env=env, timeout=900)
    found = shutil.which("chromium")
    if found:
      return found
    why += f" and `apt-get install -y chromium` failed: {got.stderr.strip().splitlines()[-1:] or got.returncode}"
  else:
    why += " and cannot be installed here (needs root and apt-get)"
  pytest.skip(f"{why}; install the Debian packages chromium and chromium-driver to run the report test")


def browser_check(html_path: str) -> dict:
  """Load a copy of the page with CHECK appended in headless Chromium; {'total', 'broken'} images."""
  probe = os.path.join(os.path.dirname(html_path), "_browser_check.html")   # beside it: same relative links
  with open(html_path) as f:
    page = f.read()
  with open(probe, "w") as f:
    f.write(page.replace("</body>", CHECK + "</body>"))
  try:
    dom = subprocess.run([chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=10000",
                          "--dump-dom", "file://" + os.path.abspath(probe)],
                         capture_output=True, text=True, timeout=120).stdout
  finally:
    os.remove(probe)
  found = re.search(r'<pre id="img-check">(.*?)</pre>', dom)
  assert found, f"the check script did not run; DOM starts {dom[:300]!r}"
  return {"dom": dom, **json.loads(found.group(1).replace("&quot;", '"'))}


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory):
  """A small report from synthetic inputs: a traced tiny model (real table, plots, claims) as the
  run and as the pretrained model, a C5 table/plot/verdict, no quantization (not run)."""
  root = tmp_path_factory.mktemp("report")
  model = Decoder(ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, max_len=32), rngs=nnx.Rngs(0))
  probes = np.random.default_rng(0).integers(0, 64, (4, 32))
  T.analyze_model(model, probes, str(root / "trace"), arm="rope", step=0)
  shutil.copytree(root / "trace", root / "pretrained")
  (root / "pretrained" / "pretrained.json").write_text(json.dumps(
      {"name": "tiny-pretrained", "params": 12345, "source": "synthetic", "format": "none", "layout": "half",
       "probes": {"n": 4, "length": 32, "text": "random tokens"}, "context": 32}))
  disrupt = root / "disrupt"
  disrupt.mkdir()
  (disrupt / "table.md").write_text("| tiny: task (n) | original | massive disrupted |\n|---|---|---|\n"
                                    "| passkey (4) | 100 [51, 100] | 25 [5, 70] |\n\nC5 [tiny]: inconclusive (synthetic)\n")
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(3, 2))
  ax.bar([0, 1], [1.0, 0.25])
  fig.savefig(disrupt / "c5.png")
  plt.close(fig)
  (disrupt / "summary.json").write_text(json.dumps({"suite": "quick", "n": 4, "disrupt": {"rope": "post"}}))
  CL.write_claims([CL.Verdict("C5", "Function", "contextual drop", "inconclusive", "synthetic rule", rope=0.75,
                              rope_ci=[0.3, 1.0], notes="tiny: synthetic")], str(disrupt))
  (root / "lab.json").write_text(json.dumps({
      "name": "synthetic", "command": "minilm-lab --synthetic", "experiment": {"name": "synthetic", "arms": {"rope": {}}},
      "stages": {"train": {"status": "ran", "seconds": 1.5, "what": "x"}, "quant": {"status": "skipped"}},
      "versions": {"jax": "0", "python": "3"}}))
  R.build(str(root))
  return root


def test_report_renders_every_image_and_the_claims_table_in_chromium(report_dir):
  got = browser_check(str(report_dir / "index.html"))
  assert got["broken"] == [], f"images that did not load: {got['broken']}"
  page = (report_dir / "index.html").read_text()
  assert got["total"] == page.count("<img ")
  shown = set(re.findall(r'<img src="([^"]+)"', page))
  for png in (report_dir / "trace" / "plots").glob("*.png"):      # every figure of the run is shown
    assert f"trace/plots/{png.name}" in shown
  assert "disrupt/c5.png" in shown and any(s.startswith("pretrained/plots/heatmap_") for s in shown)
  dom = got["dom"]
  assert '<h2 id="claims">' in dom
  claims_table = dom[dom.index('<h2 id="claims">'):dom.index('<h2 id="training">') if '<h2 id="training">' in dom
                     else dom.index('<h2 id="emergence">')]
  for claim in ("C1", "C2", "C3", "C3-lowfreq", "C4", "C5", "C6"):
    assert f"<b>{claim}</b>" in claims_table, claim
  assert "not run" in claims_table                 # C6: the quantization stage did not run, and it says so


def test_the_browser_check_catches_a_missing_image(report_dir, tmp_path):
  page = tmp_path / "index.html"
  page.write_text((report_dir / "index.html").read_text().replace("</body>", '<img src="nowhere.png"></body>'))
  assert browser_check(str(page))["broken"][-1] == "nowhere.png"


def test_report_is_self_contained_and_says_plainly_when_nothing_is_massive(report_dir):
  page = (report_dir / "index.html").read_text()
  assert not re.search(r"""(src|href)=["']?(https?:)?//""", page)            # no network resources
  assert "<script" not in page and "<link" not in page
  for src in re.findall(r'<img src="([^"]+)"', page):
    assert not os.path.isabs(src) and (report_dir / src).exists(), src
  assert "no massive values at this scale" in page
  assert "Not run" in page and "--include quant" in page
  lines = R.summary_lines(str(report_dir))
  assert len(lines) == 5 and lines[4].startswith("C6 quantization: not run")


def test_markdown_tables_become_html_tables_and_text_is_escaped():
  out = R.markdown_tables("| a | <b> |\n|---|---|\n| 1 | **2** |\nnote <x>")
  assert out.count("<table>") == 1 and "<th>&lt;b&gt;</th>" in out and "<td>2</td>" in out
  assert "<p>note &lt;x&gt;</p>" in out
