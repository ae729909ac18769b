"""A self-contained HTML page of a command's result: what compression did, layer by layer.

``render(result)`` turns the dict a command prints with ``--json`` into one HTML page (inline
SVG charts, no script, no network); ``write_report(result, path)`` writes it atomically. The
page shows the result's own numbers; nothing is measured or recomputed here.

    from onnxcomp.report import write_report
    write_report(report, "report.html")
"""

from __future__ import annotations

import datetime
import json
import os
import tempfile
from html import escape
from pathlib import Path
from typing import Any

from onnxcomp.errors import OnnxcompError
from onnxcomp.report import figures, sections

__all__ = ["render", "write_report", "read_result"]

STYLE = """
body{font:14px/1.45 -apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;color:#1a202c;margin:0;background:#f7fafc}
main{max-width:1080px;margin:0 auto;padding:20px 28px 40px;background:#fff}
h1{font-size:22px;margin:4px 0 2px}h2{font-size:17px;margin:28px 0 8px;padding-bottom:4px;border-bottom:1px solid #e2e8f0}
h3{font-size:14px;margin:16px 0 6px;color:#2d3748}
.paths{color:#4a5568;font-size:13px;margin:0 0 6px;word-break:break-all}
.cards{display:flex;flex-wrap:wrap;gap:10px}
.card{flex:1 1 170px;border:1px solid #e2e8f0;border-radius:6px;padding:8px 12px;background:#fbfdff}
.ct{font-size:12px;color:#4a5568;text-transform:uppercase;letter-spacing:.03em}
.cm{font-size:21px;font-weight:600;margin:2px 0}.cs{font-size:12px;color:#4a5568}
table{border-collapse:collapse;margin:6px 0;font-size:13px}
th,td{border-bottom:1px solid #edf2f7;padding:3px 10px 3px 0;text-align:left;vertical-align:top}
th{color:#4a5568;font-weight:600}td.n{text-align:right;font-variant-numeric:tabular-nums}
td{max-width:520px;word-break:break-word}
figure{margin:8px 0}figcaption{font-size:12px;color:#4a5568}
svg.chart{max-width:100%;height:auto;display:block}
.row{display:flex;flex-wrap:wrap;gap:12px}.row figure{flex:1 1 420px}
.note,.more{font-size:12px;color:#4a5568}
pre{font-size:11px;max-height:480px;overflow:auto;background:#f7fafc;padding:8px}
footer{margin-top:30px;font-size:12px;color:#718096}
.step{margin:14px 0 0 0;padding-left:12px;border-left:3px solid #e2e8f0}.step h2{font-size:15px;border:none}
"""


def render(result: dict[str, Any], title: str | None = None) -> str:
    """The HTML page of a result dict (a command's ``--json`` output)."""
    if not isinstance(result, dict):
        raise OnnxcompError(
            f"report: expected a JSON object (a command's --json result), got {type(result).__name__}"
        )
    command = figures.kind(result)
    heading = title or (f"onnxcomp {command} report" if command != "result" else "onnxcomp report")
    paths = []
    for key in ("input", "model", "output"):
        if isinstance(result.get(key), str):
            paths.append(f"{key}: {escape(result[key])}")
    if isinstance(result.get("mode"), str) and command == "quantize":
        paths.append(f"mode: {escape(result['mode'])}")
    body = [part for build in sections.SECTIONS if (part := build(result))]
    body.append(sections.raw(result))
    made = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{escape(heading)}</title><style>{STYLE}</style></head>"
        f'<body><main data-command="{escape(command)}"><h1>{escape(heading)}</h1>'
        f'<p class="paths">{" &middot; ".join(paths)}</p>'
        + "".join(body)
        + f"<footer>Rendered {made} by onnxcomp from the command's JSON result; every figure is "
        "the result's own.</footer></main></body></html>\n"
    )


def write_report(result: dict[str, Any], path: str | os.PathLike, title: str | None = None) -> Path:
    """Render ``result`` and write it to ``path`` atomically (a reader never sees half a page)."""
    target = Path(path)
    page = render(result, title)
    if target.is_dir():
        raise OnnxcompError(f"{target}: is a directory, not an HTML file name")
    if not target.parent.exists():
        raise OnnxcompError(f"{target}: folder {target.parent} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(page)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it private; a report is an ordinary file
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def read_result(path: str | os.PathLike) -> dict[str, Any]:
    """A saved ``--json`` result."""
    try:
        with open(path, encoding="utf-8") as f:
            result = json.load(f)
    except FileNotFoundError:
        raise OnnxcompError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as err:
        raise OnnxcompError(f"{path}: cannot read it ({err})") from None
    except json.JSONDecodeError as err:
        raise OnnxcompError(f"{path}: not JSON ({err.msg} at line {err.lineno})") from None
    if not isinstance(result, dict):
        raise OnnxcompError(f"{path}: expected a JSON object (a command's --json result)")
    return result
