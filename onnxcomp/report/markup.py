"""HTML pieces of the report: escaped text, numbers, tables, key figures, sections.

A key figure carries an ``id`` and the exact JSON value in ``data-value`` so a reader (or a
test) can check the page against the result it came from.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from html import escape
from typing import Any

from onnxcomp.report import svg

MAX_ROWS = 60  # rows of a long table or bar chart before the rest is summarised in a line


def esc(value: Any) -> str:
    return escape(str(value))


def num(value: Any, digits: int = 4) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int) or (
        isinstance(value, float) and value.is_integer() and abs(value) < 1e15
    ):
        return f"{int(value):,}"
    if isinstance(value, (int, float)):
        return svg.fmt(value, digits)
    return "-" if value is None else esc(value)


def human_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def si(value: float) -> str:
    """1813440 -> '1.81M'."""
    for div, unit in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= div:
            return f"{value / div:.3g}{unit}"
    return svg.fmt(value)


def figure(fig_id: str, value: Any, text: str) -> str:
    """A key figure: shown as ``text``, its JSON value in ``data-value``."""
    return f'<span class="fig" id="{esc(fig_id)}" data-value="{esc(json.dumps(value))}">{esc(text)}</span>'


def section(title: str, body: str, sid: str) -> str:
    return f'<section id="{esc(sid)}"><h2>{esc(title)}</h2>{body}</section>'


def table(
    header: Sequence[str], rows: Sequence[Sequence[Any]], *, cap: int = MAX_ROWS, what: str = "rows"
) -> str:
    """An HTML table; numbers right-aligned; past ``cap`` rows one line says how many are left out."""
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = []
    for row in rows[:cap]:
        cells = []
        for cell in row:
            if isinstance(cell, (int, float)) and not isinstance(cell, bool):
                cells.append(f'<td class="n">{num(cell)}</td>')
            elif isinstance(cell, Markup):
                cells.append(f"<td>{cell}</td>")
            else:
                cells.append(f"<td>{num(cell)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    more = ""
    if len(rows) > cap:
        more = f'<p class="more">{len(rows) - cap} more {esc(what)} not shown (all are in the JSON result).</p>'
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>{more}"


class Markup(str):
    """HTML that a table cell shows as is."""


def note(text: str) -> str:
    return f'<p class="note">{esc(text)}</p>'


def figure_block(svg_text: str, caption: str = "") -> str:
    cap = f"<figcaption>{esc(caption)}</figcaption>" if caption else ""
    return f"<figure>{svg_text}{cap}</figure>"
