"""The report page: one self-contained HTML file (inline CSS, PNGs as base64 data URIs), so it
can be mailed, attached to an issue or opened from a copied folder. Every text that comes from a
run (prompts, answers, paths, the config) is escaped."""

from __future__ import annotations

import base64
import html
import time
from typing import Iterable

CSS = """
body { font-family: -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif;
       margin: 24px auto; max-width: 1360px; padding: 0 16px; color: #1d1d1f; background: #fff; }
h1 { font-size: 1.6em; margin-bottom: 4px; }
h2 { font-size: 1.2em; margin-top: 28px; border-bottom: 1px solid #ddd; padding-bottom: 4px; }
.meta { color: #555; margin-top: 0; }
.status-running { color: #b35c00; font-weight: bold; }
.status-completed { color: #1a7f37; font-weight: bold; }
.status-other { color: #c62828; font-weight: bold; }
table { border-collapse: collapse; margin: 8px 0; font-size: 0.92em; }
th, td { border: 1px solid #d0d7de; padding: 4px 8px; text-align: left; vertical-align: top; }
th { background: #f3f5f7; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
td.text { white-space: pre-wrap; max-width: 420px; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(560px, 1fr)); gap: 12px; }
figure { margin: 0; border: 1px solid #e1e4e8; border-radius: 6px; padding: 6px; }
figure img { width: 100%; height: auto; display: block; }
figcaption { font-size: 0.85em; color: #555; }
pre { background: #f6f8fa; padding: 10px; overflow-x: auto; font-size: 0.85em; }
details summary { cursor: pointer; }
"""


def esc(text) -> str:
    return html.escape(str(text), quote=True)


def fmt(v) -> str:
    """A figure as the report prints it (tests format expected values with this too)."""
    if v is None:
        return "-"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if v != v or v in (float("inf"), float("-inf")):
            return str(v)
        a = abs(v)
        return f"{v:.4g}" if a and (a >= 1e5 or a < 1e-3) else f"{v:.4f}"
    return str(v)


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def page(title: str, body: Iterable[str]) -> str:
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
            f"<meta name=\"generator\" content=\"dschat report\">\n<title>{esc(title)}</title>\n"
            f"<style>{CSS}</style>\n</head>\n<body>\n" + "\n".join(body) + "\n</body>\n</html>\n")


def generated_at() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S %Z")


def status_class(status: str) -> str:
    if status.startswith("running"):
        return "status-running"
    return "status-completed" if status in ("completed", "ran", "done earlier") \
        else "status-other"


def table(header: list[str], rows: list[list], numeric: set[int] | None = None,
          text: set[int] | None = None) -> str:
    """An HTML table; cells are escaped; column indexes in `numeric` are right-aligned figures
    (formatted with fmt), in `text` long model text (wrapped, newlines kept). A cell given as
    ("html", markup) is inserted as it is (links the report itself builds)."""
    numeric, text = numeric or set(), text or set()
    out = ["<table>", "<tr>" + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr>"]
    for row in rows:
        cells = []
        for i, v in enumerate(row):
            if isinstance(v, tuple) and len(v) == 2 and v[0] == "html":
                cells.append(f"<td>{v[1]}</td>")
            elif i in numeric:
                cells.append(f"<td class=\"num\">{esc(fmt(v))}</td>")
            elif i in text:
                cells.append(f"<td class=\"text\">{esc(v)}</td>")
            else:
                cells.append(f"<td>{esc(v)}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</table>")
    return "\n".join(out)


def figure(png: bytes, title: str, caption: str = "") -> str:
    cap = f"<figcaption>{esc(caption)}</figcaption>" if caption else ""
    return (f"<figure><img src=\"{data_uri(png)}\" alt=\"{esc(title)}\" "
            f"title=\"{esc(title)}\">{cap}</figure>")
