"""The HTML kit of selfsup's pages (``report.html``, ``compare.html``): escaping, number formats, tables,
sections and figures embedded as base64 PNG data URIs, one inline stylesheet; no script, no external request.

Pages use it as ``from selfsup.report import html as h`` (``h.table(...)``, ``h.pct(...)``).
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from collections.abc import Sequence
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from selfsup.runtime import atomic_write_bytes

DASH = "&mdash;"

CSS = """
body{font:15px/1.5 -apple-system,BlinkMacSystemFont,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;color:#1f2328;
  background:#fff;margin:0;padding:24px 32px 48px;max-width:1180px}
h1{font-size:26px;margin:0 0 4px}h2{font-size:20px;margin:36px 0 8px;padding-top:8px;border-top:1px solid #d8dee4}
h3{font-size:16px;margin:20px 0 6px}
.meta{color:#57606a;font-size:13.5px;margin:2px 0}.muted{color:#6e7781;font-size:12.5px}
.note{color:#57606a;font-size:13.5px;max-width:900px}.warn{color:#9a3412;font-size:13.5px}
nav{font-size:13.5px;margin:12px 0 0;color:#57606a}nav a{color:#0969da;text-decoration:none;margin-right:14px}
table{border-collapse:collapse;margin:8px 0 4px;font-size:14px}
th,td{padding:5px 12px;border-bottom:1px solid #e5e7eb;text-align:left;vertical-align:top}
th{background:#f6f8fa;font-weight:600;border-bottom:2px solid #d0d7de}
td.num,th.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
tr:nth-child(even) td{background:#fbfcfd}
td.best{background:#dafbe1 !important;font-weight:700}td.worst{background:#ffebe9 !important;font-weight:700}
.alert{color:#82071e;background:#ffebe9;border:1px solid #ffcecb;border-radius:6px;padding:8px 12px;font-size:14.5px;
  max-width:900px}.reading{color:#57606a;font-size:12.5px}td.chosen{outline:2px solid #1a7f37;outline-offset:-2px}
.headline td.value{font-size:17px;font-weight:600;white-space:nowrap;text-align:right}
.headline td.protocol{color:#6e7781;font-size:12.5px;max-width:640px}
figure{margin:10px 0 18px}figcaption{color:#57606a;font-size:13px;max-width:900px;margin-top:4px}
img{max-width:100%;height:auto;border:1px solid #eaeef2}
.grid2{display:grid;grid-template-columns:repeat(auto-fit,minmax(420px,1fr));gap:8px 20px}
.side{display:flex;flex-wrap:wrap;gap:12px 36px;align-items:flex-start}
details{margin-top:8px}summary{cursor:pointer;color:#0969da}
pre{background:#f6f8fa;padding:12px;overflow:auto;font-size:12px;max-height:600px;border-radius:6px}
footer{margin-top:40px;color:#8c959f;font-size:12px}
"""


def esc(value) -> str:
    """HTML-escaped text of any value (every string from data goes through here)."""
    return html.escape(str(value), quote=True)


def is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def pct(value) -> str:
    """Accuracy in percent with 2 decimals ("87.44%"), or a dash when absent."""
    return f"{value:.2f}%" if is_number(value) else DASH


def num(value, digits: int = 2) -> str:
    return f"{value:.{digits}f}" if is_number(value) else DASH


def short(value) -> str:
    """Compact text of a protocol value: 3 significant digits for floats, lists joined by commas."""
    if isinstance(value, float):
        return f"{value:.3g}"
    if isinstance(value, list | tuple):
        return ", ".join(short(v) for v in value) if len(value) <= 8 else f"{len(value)} values"
    return str(value)


def png_bytes(path: Path) -> bytes:
    """The image at ``path`` as PNG bytes (other formats are re-encoded with Pillow)."""
    data = path.read_bytes()
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return data
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        buf = io.BytesIO()
        im.save(buf, format="PNG")
    return buf.getvalue()


def img(path: Path, alt: str, width: int | None = None) -> str:
    """An <img> whose src is a base64 PNG data URI (no file reference survives in the HTML)."""
    b64 = base64.b64encode(png_bytes(Path(path))).decode("ascii")
    style = f' style="width:{width}px"' if width else ""
    return f'<img src="data:image/png;base64,{b64}" alt="{esc(alt)}"{style}>'


def figure(path: Path, alt: str, caption: str = "", width: int | None = None) -> str:
    """A <figure>; ``caption`` is already-escaped HTML."""
    cap = f"<figcaption>{caption}</figcaption>" if caption else ""
    return f"<figure>{img(path, alt, width)}{cap}</figure>"


def table(headers: Sequence[tuple[str, str]], rows: Sequence[Sequence[tuple[str, str]]], cls: str = "") -> str:
    """``headers``: (escaped text, css class); ``rows``: cells as (escaped HTML, css class)."""
    head = "".join(f'<th class="{c}">{h}</th>' for h, c in headers)
    body = "".join("<tr>" + "".join(f'<td class="{c}">{v}</td>' for v, c in row) + "</tr>" for row in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def section(anchor: str, title: str, body: str) -> tuple[str, str, str]:
    return anchor, title, f'<section id="{anchor}"><h2>{esc(title)}</h2>{body}</section>'


def save_png(fig: Figure, path: Path) -> Path:
    FigureCanvasAgg(fig).print_png(str(path))
    return path


def page(title: str, header: str, sections: list[tuple[str, str, str]], footer: str) -> str:
    nav = "".join(f'<a href="#{a}">{esc(t)}</a>' for a, t, _ in sections)
    body = "".join(s for _, _, s in sections)
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width,initial-scale=1">'
        f"<title>{esc(title)}</title><style>{CSS}</style></head><body>"
        f"<header><h1>{esc(title)}</h1>{header}<nav>{nav}</nav></header>{body}"
        f"<footer>{footer}</footer></body></html>\n"
    )


def write_html(path: Path, text: str) -> Path:
    atomic_write_bytes(path, lambda f: f.write(text.encode("utf-8")))
    return path


def json_section(result: dict, name: str = "eval.json"):
    text = json.dumps(result, indent=2, default=str)
    return section("raw", "Raw results", f"<details><summary>{esc(name)} ({len(text) // 1024 + 1} KiB)</summary>"
                                          f"<pre>{esc(text)}</pre></details>")
