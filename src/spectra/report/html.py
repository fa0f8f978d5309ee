"""report.html: the report as one self-contained page (plots embedded, tables sortable, no network).

The page is rendered from the same markdown as report.md (the subset the report
writes: headings, paragraphs, bullet lists, pipe tables, images, inline code and
bold), so both always say the same. Images become ``data:image/png;base64`` URIs;
a few lines of inline JavaScript sort a table by the clicked column (numbers
numerically, "–" last). Nothing is fetched: no fonts, scripts or styles from
elsewhere.
"""

from __future__ import annotations

import base64
import html
import re
from pathlib import Path

_IMG = re.compile(r"^!\[([^\]]*)\]\(([^)\s]+)\)$")

STYLE = """
body{font:15px/1.5 system-ui,-apple-system,"Segoe UI",sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
h1{font-size:1.7em}h2{margin-top:1.8em;border-bottom:1px solid #ddd}h3{font-size:1.05em}
table{border-collapse:collapse;margin:.6em 0;font-size:.92em}
th,td{border:1px solid #ccc;padding:.25em .6em;text-align:right}th:first-child,td:first-child{text-align:left}
th{background:#f3f3f3;cursor:pointer;user-select:none}th.asc::after{content:" \\25B2"}th.desc::after{content:" \\25BC"}
tr:nth-child(even) td{background:#fafafa}code{background:#f3f3f3;padding:0 .2em}
figure{margin:1em 0}figure img{max-width:100%;height:auto;border:1px solid #eee}
"""

# Click a header: sort that column (numbers numerically, text alphabetically, "–"/empty last).
SCRIPT = """
function spectraSort(th){
  const table=th.closest('table'), body=table.tBodies[0], col=th.cellIndex;
  const asc=!th.classList.contains('asc');
  table.querySelectorAll('th').forEach(h=>h.classList.remove('asc','desc'));
  th.classList.add(asc?'asc':'desc');
  const key=td=>{const t=td.textContent.trim(), n=parseFloat(t.replace(/[,%]/g,''));
    return (t===''||t==='\\u2013')?null:(isNaN(n)||!/^[-+]?[\\d.,]/.test(t)?t:n)};
  const rows=Array.from(body.rows).sort((a,b)=>{const x=key(a.cells[col]), y=key(b.cells[col]);
    if(x===null) return y===null?0:1; if(y===null) return -1;
    const c=(typeof x===typeof y)?(x<y?-1:x>y?1:0):(typeof x==='number'?-1:1); return asc?c:-c});
  rows.forEach(r=>body.appendChild(r));
}
"""


def _inline(text: str) -> str:
    s = html.escape(text, quote=False)
    s = re.sub(r"`([^`]+)`", r"<code>\1</code>", s)
    return re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", s)


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def _table(lines: list[str]) -> str:
    head, rows = _cells(lines[0]), [_cells(x) for x in lines[2:]]
    th = "".join(f'<th onclick="spectraSort(this)">{_inline(c)}</th>' for c in head)
    body = "".join("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in r) + "</tr>\n" for r in rows)
    return f'<table class="sortable"><thead><tr>{th}</tr></thead>\n<tbody>\n{body}</tbody></table>'


def _image(alt: str, src: str, base: Path) -> str:
    p = base / src
    if not p.is_file():  # a figure that was not drawn: say so instead of a broken image
        return f"<p><em>figure {html.escape(src)} missing</em></p>"
    data = base64.b64encode(p.read_bytes()).decode("ascii")
    return f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,{data}"></figure>'


def markdown_to_html(md: str, base: Path, title: str = "Spectra report") -> str:
    """The report's markdown subset as a standalone HTML page; images under ``base`` are embedded."""
    out: list[str] = []
    lines = md.splitlines()
    i = 0
    para: list[str] = []

    def flush():
        if para:
            out.append(f"<p>{_inline(' '.join(para))}</p>")
            para.clear()

    while i < len(lines):
        line = lines[i].rstrip()
        if not line.strip():
            flush()
            i += 1
            continue
        m = re.match(r"^(#{1,6})\s+(.*)$", line)
        if m:
            flush()
            n = len(m.group(1))
            out.append(f"<h{n}>{_inline(m.group(2))}</h{n}>")
            i += 1
            continue
        if line.startswith("|") and i + 1 < len(lines) and re.match(r"^\|[-:| ]+\|?$", lines[i + 1].strip()):
            flush()
            j = i + 2
            while j < len(lines) and lines[j].startswith("|"):
                j += 1
            out.append(_table(lines[i:j]))
            i = j
            continue
        if line.startswith("- "):
            flush()
            items = []
            while i < len(lines) and lines[i].startswith("- "):
                items.append(f"<li>{_inline(lines[i][2:])}</li>")
                i += 1
            out.append("<ul>" + "".join(items) + "</ul>")
            continue
        m = _IMG.match(line.strip())
        if m:
            flush()
            out.append(_image(m.group(1), m.group(2), base))
            i += 1
            continue
        para.append(line.strip())
        i += 1
    flush()
    body = "\n".join(out)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{html.escape(title)}</title><style>{STYLE}</style><script>{SCRIPT}</script></head>\n"
            f"<body>\n{body}\n</body></html>\n")


def write_html(md: str, out: Path, title: str = "Spectra report") -> Path:
    """``out`` (report.html) from the report markdown, with the PNGs next to it embedded; atomic."""
    from spectra.fsutil import atomic_write_text

    atomic_write_text(out, markdown_to_html(md, out.parent, title))
    return out
