"""report.html: self-contained (plots embedded, no network), tables sortable, and every plot renders
in headless Chromium (screenshot: each plot region has real pixel variance)."""

import json
import re
import shutil
import subprocess

import pytest

from spectra.report import write_report
from spectra.report.html import markdown_to_html
from test_report import _records

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--no-first-run", "--hide-scrollbars", "--force-device-scale-factor=1"]

# Test-only probe, injected into a copy of the page: where each image landed and whether it decoded,
# and the Models table's id column after clicking its "val loss" header twice (descending).
PROBE = """<script>window.addEventListener('load', () => {
  const imgs = [...document.images].map(i => { const b = i.getBoundingClientRect();
    return [b.left + scrollX, b.top + scrollY, b.width, b.height, i.naturalWidth]; });
  const t = document.querySelector('table.sortable');
  const th = [...t.tHead.rows[0].cells].find(c => c.textContent.trim() === 'val loss');
  spectraSort(th); spectraSort(th);
  const ids = [...t.tBodies[0].rows].map(r => r.cells[0].textContent);
  const out = document.createElement('pre'); out.id = 'probe';
  out.textContent = JSON.stringify({imgs, ids, height: document.documentElement.scrollHeight});
  document.body.appendChild(out);
});</script>"""


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    d = tmp_path_factory.mktemp("rep")
    md = write_report([], d, paper=True, records=_records())
    return md, d / "report.html"


def test_html_self_contained_and_same_content(report):
    md, page = report
    text = page.read_text()
    figs = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md.read_text())
    assert len(figs) >= 6
    imgs = re.findall(r'<img [^>]*src="([^"]+)"', text)
    assert len(imgs) == len(figs) and all(s.startswith("data:image/png;base64,iVBOR") for s in imgs)
    # nothing from elsewhere: no external URLs in src/href, no linked scripts or styles
    assert not re.search(r'(src|href)="(?!data:)', text) and "<link" not in text and "<script src" not in text
    n_tables = sum(1 for line in md.read_text().splitlines() if line.startswith("|---"))
    assert text.count('<table class="sortable">') == n_tables > 3
    assert "<h2>Scaling law: final validation loss L(N) = A / N^α + ε</h2>" in text


def test_markdown_subset(tmp_path):
    page = markdown_to_html("# T <x>\n\nsome `code` and **bold**\nsame para\n\n- a\n- b\n\n| a | b |\n|---|---|\n| 1 | – |\n"
                            "\n![missing](nope.png)\n", tmp_path)
    assert "<h1>T &lt;x&gt;</h1>" in page and "<p>some <code>code</code> and <strong>bold</strong> same para</p>" in page
    assert "<ul><li>a</li><li>b</li></ul>" in page and "<td>–</td>" in page
    assert "figure nope.png missing" in page


def _chromium(args, tmp_path, timeout=120):
    return subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={tmp_path / 'profile'}", *args],
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (scripts/setup.sh --test installs Debian's "
                                              "chromium as root)")
def test_plots_render_in_headless_chromium(report, tmp_path):
    from PIL import Image, ImageStat

    _, page = report
    probe = tmp_path / "probe.html"
    probe.write_text(page.read_text().replace("</body>", PROBE + "</body>"))
    r = _chromium(["--window-size=1200,900", "--virtual-time-budget=10000", "--dump-dom", probe.as_uri()], tmp_path)
    m = re.search(r'<pre id="probe">(.*?)</pre>', r.stdout, re.S)
    assert m, r.stderr[-2000:]
    info = json.loads(m.group(1).replace("&quot;", '"').replace("&amp;", "&"))
    assert len(info["imgs"]) >= 6 and all(w > 0 and nat > 0 for _, _, w, _, nat in info["imgs"])
    # sorting by val loss, descending: the ids follow the records' losses
    losses = {r.id: r.val_loss for r in _records()}
    ids = [i for i in info["ids"] if i in losses]
    assert ids == sorted(ids, key=lambda i: -losses[i]) and len(ids) == len(losses)

    shot = tmp_path / "shot.png"
    h = int(info["height"]) + 20
    r = _chromium([f"--window-size=1200,{h}", "--virtual-time-budget=10000", f"--screenshot={shot}", page.as_uri()],
                  tmp_path)
    assert shot.is_file(), r.stderr[-2000:]
    img = Image.open(shot).convert("L")
    for x, y, w, hh, _ in info["imgs"]:
        box = (int(x) + 2, int(y) + 2, int(x + w) - 2, int(y + hh) - 2)
        assert box[3] <= img.height, (box, img.size)
        region = img.crop(box)
        st = ImageStat.Stat(region)
        dark = sum(region.histogram()[:200]) / (region.width * region.height)
        assert st.stddev[0] > 15 and dark > 0.01, (box, st.stddev, dark)  # lines, text, markers: not blank
