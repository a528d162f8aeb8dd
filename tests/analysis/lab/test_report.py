"""The lab's HTML report (analysis.lab.report), rendered in headless Chromium: every image loads, the
claims table is there; its sections on the arms of a sweep, on seeds and on attention sinks.

Chromium (Debian package `chromium`) is installed by this test when missing, if we are root and apt
is available; otherwise the browser tests are skipped with a message saying why.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess

import pytest

from analysis.lab import report as R
from analysis.massive import claims as CL
from analysis.massive import pipeline as PL
from analysis.massive import plots as P
from helpers import SWEEP
from helpers import plant_sink as _plant_sink
from helpers import sink_decoder as _decoder
from helpers import sink_probes as _probes
from minilm import encodings

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
  assert "no Q or K head has a massive dim at any point" in page                    # from C1's numbers
  assert "Not run (stage" in page
  assert 'id="arms"' not in page                                     # one arm: no table across arms
  lines = R.summary_lines(str(report_dir))
  assert len(lines) == 5 and lines[4].startswith("C6 quantization: not run")


def test_numbers_never_print_in_exponent_notation_where_they_count_things():
  assert R.fmt(1300) == "1300" and R.fmt(1300.0) == "1300" and R.fmt(0.12345) == "0.123"
  assert R.fmt(2.5, [1.25, 2500.0]) == "2.5 [1.25, 2500]" and R.fmt(None) == "-" and R.num(1.3e3 / 1e3, 2) == "1.3"


def test_c6_lines_say_no_power_at_the_ceiling_and_give_perplexity_against_fp():
  quantity = "contextual success, awq-4b (value) vs gptq-4b (reference); usable tasks: passkey"
  c6 = {"models": {"m": {"ppl": {"fp": {"ppl": 50.0}, "awq-4b": {"ppl": 52.5}, "gptq-4b": {"ppl": 51.0},
                                 "awq-3b": {"ppl": 90.0}}}}}
  ceiling = CL.Verdict("C6", "AWQ beats GPTQ (m)", quantity, "inconclusive", "r", value=1.0, reference_value=1.0, diff=0.0,
                       ci=[0.0, 0.0], reference="gptq-4b")
  text = R.c6_text(ceiling, c6)
  assert "no power: both schemes at 100%" in text and "[0, 0]" not in text
  assert text.endswith("held-out perplexity fp 50.00, awq-4b 52.50 (+2.50), gptq-4b 51.00 (+1.00)")
  moved = CL.Verdict("C6", "AWQ beats GPTQ (m)", quantity, "supported", "r", value=0.9, reference_value=0.6, diff=0.3,
                     ci=[0.1, 0.5], reference="gptq-4b")
  assert "difference 0.3 [0.1, 0.5]" in R.c6_text(moved, c6)
  not_run = CL.Verdict("C6-keep", "keeping helps (m)", "contextual success, None (value) vs None (reference)",
                       "inconclusive", "r", notes="rtn_keep was not run")
  assert R.c6_text(not_run, c6) == "keeping helps (m): inconclusive; rtn_keep was not run"


def test_markdown_tables_become_html_tables_and_text_is_escaped():
  out = R.markdown_tables("| a | <b> |\n|---|---|\n| 1 | **2** |\nnote <x>")
  assert out.count("<table>") == 1 and "<th>&lt;b&gt;</th>" in out and "<td>2</td>" in out
  assert "<p>note &lt;x&gt;</p>" in out


def test_report_shows_the_arms_table_after_the_frequency_section(sweep_dir):
  page = (sweep_dir / "index.html").read_text()
  assert page.index('<h2 id="frequency">') < page.index('<h2 id="arms">Where the mass sits, arm by arm</h2>')
  section = page[page.index('<h2 id="arms">'):]
  section = section[:section.index("</table>")]
  assert "j_ctx is the first rotary pair" in section and "docs/claims.md" in section
  assert section.count("<tr>") == 1 + len(SWEEP)
  for arm in SWEEP:
    assert f"<td>{arm}</td>" in section
  nope_row = section[section.index("<td>nope</td>"):].split("</tr>")[0]
  assert "<td></td><td></td><td></td><td></td>" in nope_row                 # base, fraction ... left blank
  assert "4 = P (none)" in section


def test_the_report_shows_the_pooled_table(seeded):
  root, _, _ = seeded
  page = (root / "index.html").read_text()
  section = page[page.index('<h2 id="comparisons">'):]
  assert "<h3>Over seeds</h3>" in section
  pooled = section[section.index("<h3>Over seeds</h3>"):]
  pooled = pooled[:pooled.index("</table>")]
  assert "(seed 0, step 0)" in pooled and "(seed 1, step 0)" in pooled and "(seed 2, step 0)" in pooled
  assert "shared config" in pooled and "(seed 2, step 3)" in pooled and "not pooled: steps differ" in pooled


def test_report_section_reads_the_store(tmp_path):
  model = _decoder(encodings.NoPE(), qkv_bias=True)
  _plant_sink(model, layer=0, head=1)
  probes = _probes(6, 24)
  trace_dir = tmp_path / "trace"
  store = PL.analyze_model(model, probes, str(trace_dir), arm="planted", plots=False, claims=False, batch_size=6)
  P.sink_figures(store)                                   # the figures the section shows, and no others
  html = R.sinks_section(str(tmp_path), "trace", "sinks")
  assert html.count("<tr>") == 2 and "trace/plots/sink_map.png" in html and "attention_planted" in html
  assert "no layer holds an activation above 1000 x the median" in html
  assert R.sinks_section(str(tmp_path), "missing", "sinks") == ""
