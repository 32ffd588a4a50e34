"""The report's blocks (headings, paragraphs, lists, tables, images), rendered once to Markdown and once to
one self-contained HTML page; the number formats of the report's tables."""

from __future__ import annotations

import dataclasses
import html
import math
import pathlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from lstm_lab.sweep import space

__all__ = ["Heading", "Paragraph", "Link", "BulletList", "Table", "Image", "Block", "to_markdown", "to_html", "fmt",
           "fmt_p", "fmt_param", "display_name", "is_finite", "DASH"]

DASH = "–"


@dataclasses.dataclass
class Heading:
    text: str
    level: int = 2


@dataclasses.dataclass
class Paragraph:
    text: str


@dataclasses.dataclass
class Link:
    """A link to a file next to the report (a bullet list item)."""
    href: str
    text: str = ""


@dataclasses.dataclass
class BulletList:
    items: list  # str or Link + description: (Link, str)


@dataclasses.dataclass
class Table:
    columns: list[str]
    rows: list[list[str]]
    #: Per column: "left" or "right" (numbers).  Defaults to the first column left, the rest right.
    align: list[str] | None = None

    def alignment(self) -> list[str]:
        return self.align or ["left"] + ["right"] * (len(self.columns) - 1)


@dataclasses.dataclass
class Image:
    path: str  # relative to the report
    alt: str
    caption: str = ""


Block = Heading | Paragraph | BulletList | Table | Image


def _md_cell(text: str) -> str:
    return str(text).replace("\n", " ").replace("|", "\\|")


def _md_item(item) -> str:
    if isinstance(item, tuple):
        return "".join(_md_item(x) for x in item)
    if isinstance(item, Link):
        return f"[{item.text or item.href}]({item.href})"
    return str(item)


def _html_item(item) -> str:
    if isinstance(item, tuple):
        return "".join(_html_item(x) for x in item)
    if isinstance(item, Link):
        return f'<a href="{html.escape(item.href)}">{html.escape(item.text or item.href)}</a>'
    return html.escape(str(item))


def _data_uri(path: pathlib.Path) -> str | None:
    import base64

    try:
        data = path.read_bytes()
    except OSError:
        return None
    kind = {".png": "image/png", ".svg": "image/svg+xml", ".jpg": "image/jpeg"}.get(path.suffix.lower(),
                                                                                   "application/octet-stream")
    return f"data:{kind};base64,{base64.b64encode(data).decode('ascii')}"


def to_markdown(blocks: Sequence[Block]) -> str:
    """Render blocks as GitHub-flavoured Markdown."""
    out: list[str] = []
    for b in blocks:
        if isinstance(b, Heading):
            out.append(f"{'#' * b.level} {b.text}")
        elif isinstance(b, Paragraph):
            out.append(b.text)
        elif isinstance(b, BulletList):
            out.append("\n".join(f"- {_md_item(item)}" for item in b.items))
        elif isinstance(b, Table):
            rule = ["---:" if a == "right" else ":---" for a in b.alignment()]
            lines = ["| " + " | ".join(_md_cell(c) for c in b.columns) + " |", "| " + " | ".join(rule) + " |"]
            lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in b.rows]
            out.append("\n".join(lines))
        elif isinstance(b, Image):
            out.append(f"![{b.alt}]({b.path})" + (f"\n\n{b.caption}" if b.caption else ""))
        else:  # pragma: no cover - programming error
            raise TypeError(f"unknown block {b!r}")
    return "\n\n".join(out) + "\n"


_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; max-width: 1150px;
       margin: 2em auto; padding: 0 1em; color: #222; line-height: 1.45; }
h1 { border-bottom: 2px solid #ddd; padding-bottom: .2em; }
h2 { border-bottom: 1px solid #eee; padding-bottom: .15em; margin-top: 1.8em; }
table { border-collapse: collapse; margin: .8em 0; font-size: .92em; }
th, td { border: 1px solid #ccc; padding: .25em .6em; }
th { background: #f2f2f2; }
td.right, th.right { text-align: right; font-variant-numeric: tabular-nums; }
tr:nth-child(even) td { background: #fafafa; }
figure { margin: 1em 0; }
figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { color: #555; font-size: .92em; }
"""


def to_html(blocks: Sequence[Block], title: str, base_dir: str | pathlib.Path | None = None) -> str:
    """Render blocks as one self-contained HTML page: inline CSS, and each image embedded as a base64 data URI
    (read from ``base_dir``; an image not found there stays a relative link)."""
    esc = html.escape
    body: list[str] = []
    for b in blocks:
        if isinstance(b, Heading):
            body.append(f"<h{b.level}>{esc(b.text)}</h{b.level}>")
        elif isinstance(b, Paragraph):
            body.append(f"<p>{esc(b.text)}</p>")
        elif isinstance(b, BulletList):
            body.append("<ul>\n" + "\n".join(f"<li>{_html_item(i)}</li>" for i in b.items) + "\n</ul>")
        elif isinstance(b, Table):
            al = b.alignment()
            head = "".join(f'<th class="{a}">{esc(str(c))}</th>' for c, a in zip(b.columns, al))
            rows = "\n".join("<tr>" + "".join(f'<td class="{a}">{esc(str(c))}</td>' for c, a in zip(row, al))
                             + "</tr>" for row in b.rows)
            body.append(f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n{rows}\n</tbody>\n</table>")
        elif isinstance(b, Image):
            cap = f"\n<figcaption>{esc(b.caption)}</figcaption>" if b.caption else ""
            src = _data_uri(pathlib.Path(base_dir) / b.path) if base_dir is not None else None
            body.append(f'<figure><img src="{esc(src or b.path)}" alt="{esc(b.alt)}">{cap}</figure>')
        else:  # pragma: no cover - programming error
            raise TypeError(f"unknown block {b!r}")
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>{esc(title)}</title>\n'
            f"<style>{_CSS}</style>\n</head>\n<body>\n" + "\n".join(body) + "\n</body>\n</html>\n")


def fmt(x: Any) -> str:
    """A number with 4 significant digits; integers as integers; missing as a dash."""
    if x is None:
        return DASH
    if isinstance(x, (bool, np.bool_)):
        return str(bool(x))
    if isinstance(x, (int, np.integer)):
        return str(int(x))
    if isinstance(x, (float, np.floating)):
        if not math.isfinite(x):
            return DASH if math.isnan(x) else str(float(x))
        return f"{float(x):.4g}"
    return str(x)


def fmt_p(p: float) -> str:
    """A p-value: ``0.0123`` down to 1e-3, then ``3.2e-05``."""
    if p is None or not math.isfinite(p):
        return DASH
    if p == 0.0:
        return "<1e-300"
    return f"{p:.3g}" if p >= 1e-3 else f"{p:.1e}"


def fmt_param(value: Any, kind: str) -> str:
    """A hyperparameter's value (integers of an integer distribution as integers)."""
    if space.is_int(kind) and is_finite(value):
        return str(round(float(value)))
    return fmt(value) if isinstance(value, (float, np.floating, int, np.integer)) or value is None else str(value)


def is_finite(x: Any) -> bool:
    """Whether ``x`` is a finite number (False for anything that is not a number)."""
    try:
        return math.isfinite(float(x))
    except (TypeError, ValueError):
        return False


def display_name(name: str) -> str:
    """A config key's or Optuna parameter's short name: ``"optim.learning_rate"`` -> ``"learning_rate"``;
    ``"1-optim.momentum"`` -> ``"1 - momentum"``."""
    key, kind = space.parse_optuna_name(name)
    return space.search_label(kind, key.rsplit(".", 1)[-1])
