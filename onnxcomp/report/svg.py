"""Small inline-SVG charts for the HTML report: horizontal bars, grouped bars, a scatter plot with
marked points and an optional front, line curves. Plain strings, no JavaScript, no network.

Every chart is an ``<svg>`` element sized by its ``viewBox`` (it scales with the page) with a
``<title>`` on each mark, so a reader hovering a bar sees its exact value.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from html import escape

FONT = 12
ROW = 18  # height of one bar row
PALETTE = ("#2b6cb0", "#dd6b20", "#38a169", "#805ad5", "#d53f8c", "#718096")
MUTED = "#a0aec0"
MARK = "#e53e3e"


def fmt(value: float | None, digits: int = 3) -> str:
    """A short number: 3 significant digits, no exponent for ordinary magnitudes."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if value == 0:
        return "0"
    magnitude = abs(value)
    if magnitude >= 1e5 or magnitude < 1e-3:
        return f"{value:.{digits - 1}e}"
    if float(value).is_integer() and magnitude >= 1:
        return f"{int(value)}"
    return f"{value:.{digits}g}" if magnitude < 10**digits else f"{value:.0f}"


def _clip(text: str, chars: int) -> str:
    """Long node names keep their end (the distinctive part): '.../features.3/Conv'."""
    return text if len(text) <= chars else "\u2026" + text[-(chars - 1) :]


def nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """Round tick values covering [low, high]."""
    if not (math.isfinite(low) and math.isfinite(high)):
        return [0.0]
    if high <= low:
        high = low + (abs(low) or 1.0)
    raw = (high - low) / max(count, 1)
    step = 10 ** math.floor(math.log10(raw))
    for mult in (1, 2, 2.5, 5, 10):
        if raw <= mult * step:
            step *= mult
            break
    start = math.floor(low / step) * step
    ticks = []
    value = start
    while value <= high + step * 1e-9:
        ticks.append(round(value, 12))
        value += step
    if ticks[-1] < high:
        ticks.append(round(value, 12))
    return ticks


def _svg(width: float, height: float, body: list[str], label: str) -> str:
    return (
        f'<svg class="chart" viewBox="0 0 {width:.0f} {height:.0f}" width="{width:.0f}" '
        f'role="img" aria-label="{escape(label)}" xmlns="http://www.w3.org/2000/svg" '
        f'font-family="sans-serif" font-size="{FONT}">' + "".join(body) + "</svg>"
    )


def _legend(names: Sequence[str], colors: Sequence[str], x: float, y: float) -> list[str]:
    out = []
    for name, color in zip(names, colors):
        out.append(f'<rect x="{x:.1f}" y="{y - 9:.1f}" width="10" height="10" fill="{color}"/>')
        out.append(f'<text x="{x + 14:.1f}" y="{y:.1f}">{escape(name)}</text>')
        x += 22 + 7 * len(name)
    return out


def hbars(
    rows: Sequence[tuple[str, float | None]],
    *,
    unit: str = "",
    colors: Sequence[str] | None = None,
    legend: Sequence[tuple[str, str]] = (),
    width: int = 760,
    label_chars: int = 34,
    label: str = "bar chart",
    reference: float | None = None,
) -> str:
    """One horizontal bar per row: (label, value). ``colors`` gives each row its own colour;
    ``reference`` draws a dashed vertical line at that value (a threshold)."""
    values = [v for _, v in rows if v is not None and math.isfinite(v)]
    low = min(0.0, *values) if values else 0.0
    high = max(0.0, *values, *([reference] if reference is not None else [])) if values else 1.0
    ticks = nice_ticks(low, high)
    low, high = ticks[0], ticks[-1]
    left, right = 8 + 6.6 * label_chars, 60
    top = 24 if legend else 6
    plot = width - left - right
    height = top + ROW * len(rows) + 24

    def x(v: float) -> float:
        return left + (v - low) / (high - low) * plot

    body = []
    if legend:
        body += _legend([n for n, _ in legend], [c for _, c in legend], left, 14)
    for tick in ticks:
        body.append(
            f'<line x1="{x(tick):.1f}" x2="{x(tick):.1f}" y1="{top}" y2="{top + ROW * len(rows)}" stroke="#e2e8f0"/>'
            f'<text x="{x(tick):.1f}" y="{height - 8}" text-anchor="middle" fill="#4a5568">{fmt(tick)}</text>'
        )
    for i, (name, value) in enumerate(rows):
        y = top + i * ROW
        color = colors[i] if colors else PALETTE[0]
        body.append(
            f'<text x="{left - 6:.1f}" y="{y + 13}" text-anchor="end">{escape(_clip(name, label_chars))}'
            f"<title>{escape(name)}</title></text>"
        )
        if value is None or not math.isfinite(value):
            body.append(f'<text x="{x(0) + 4:.1f}" y="{y + 13}" fill="#718096">n/a</text>')
            continue
        x0, x1 = sorted((x(0), x(value)))
        body.append(
            f'<rect x="{x0:.1f}" y="{y + 3}" width="{max(x1 - x0, 0.5):.1f}" height="{ROW - 6}" fill="{color}">'
            f"<title>{escape(name)}: {fmt(value, 4)}{escape(unit)}</title></rect>"
            f'<text x="{x1 + 4:.1f}" y="{y + 13}" fill="#2d3748">{fmt(value)}{escape(unit)}</text>'
        )
    if reference is not None:
        body.append(
            f'<line x1="{x(reference):.1f}" x2="{x(reference):.1f}" y1="{top - 4}" y2="{top + ROW * len(rows)}" '
            f'stroke="{MARK}" stroke-dasharray="4 3"/>'
        )
    return _svg(width, height, body, label)


def grouped_hbars(
    categories: Sequence[str],
    series: Sequence[tuple[str, Sequence[float | None]]],
    *,
    unit: str = "",
    width: int = 760,
    label_chars: int = 28,
    label: str = "grouped bar chart",
) -> str:
    """For each category one bar per series (e.g. before and after), with a legend."""
    colors = [MUTED, PALETTE[0], *PALETTE[1:]] if len(series) == 2 else list(PALETTE)
    values = [v for _, vals in series for v in vals if v is not None and math.isfinite(v)]
    ticks = nice_ticks(min(0.0, *values) if values else 0.0, max(0.0, *values) if values else 1.0)
    low, high = ticks[0], ticks[-1]
    left, right, top = 8 + 6.6 * label_chars, 60, 24
    bar = 12
    group = bar * len(series) + 8
    plot = width - left - right
    height = top + group * len(categories) + 24

    def x(v: float) -> float:
        return left + (v - low) / (high - low) * plot

    body = _legend([n for n, _ in series], colors, left, 14)
    for tick in ticks:
        body.append(
            f'<line x1="{x(tick):.1f}" x2="{x(tick):.1f}" y1="{top}" y2="{height - 24}" stroke="#e2e8f0"/>'
            f'<text x="{x(tick):.1f}" y="{height - 8}" text-anchor="middle" fill="#4a5568">{fmt(tick)}</text>'
        )
    for i, name in enumerate(categories):
        y = top + i * group
        body.append(
            f'<text x="{left - 6:.1f}" y="{y + group / 2 + 1:.1f}" text-anchor="end">'
            f"{escape(_clip(name, label_chars))}<title>{escape(name)}</title></text>"
        )
        for j, (sname, vals) in enumerate(series):
            value = vals[i]
            yy = y + j * bar + 2
            if value is None or not math.isfinite(value):
                continue
            x0, x1 = sorted((x(0), x(value)))
            body.append(
                f'<rect x="{x0:.1f}" y="{yy}" width="{max(x1 - x0, 0.5):.1f}" height="{bar - 2}" fill="{colors[j]}">'
                f"<title>{escape(name)}, {escape(sname)}: {fmt(value, 4)}{escape(unit)}</title></rect>"
                f'<text x="{x1 + 4:.1f}" y="{yy + 9}" font-size="10" fill="#4a5568">{fmt(value)}</text>'
            )
    return _svg(width, height, body, label)


def _axes(
    xticks: list[float],
    yticks: list[float],
    sx,
    sy,
    box: tuple[float, float, float, float],
    xlabel: str,
    ylabel: str,
) -> list[str]:
    left, top, right, bottom = box
    body = [
        f'<rect x="{left}" y="{top}" width="{right - left}" height="{bottom - top}" fill="none" stroke="#cbd5e0"/>'
    ]
    for t in xticks:
        body.append(
            f'<line x1="{sx(t):.1f}" x2="{sx(t):.1f}" y1="{top}" y2="{bottom}" stroke="#edf2f7"/>'
            f'<text x="{sx(t):.1f}" y="{bottom + 16}" text-anchor="middle" fill="#4a5568">{fmt(t)}</text>'
        )
    for t in yticks:
        body.append(
            f'<line x1="{left}" x2="{right}" y1="{sy(t):.1f}" y2="{sy(t):.1f}" stroke="#edf2f7"/>'
            f'<text x="{left - 6}" y="{sy(t) + 4:.1f}" text-anchor="end" fill="#4a5568">{fmt(t)}</text>'
        )
    body.append(
        f'<text x="{(left + right) / 2:.1f}" y="{bottom + 34}" text-anchor="middle">{escape(xlabel)}</text>'
        f'<text transform="translate(14 {(top + bottom) / 2:.1f}) rotate(-90)" text-anchor="middle">{escape(ylabel)}</text>'
    )
    return body


def _plane(
    xs: Sequence[float],
    ys: Sequence[float],
    box: tuple[float, float, float, float],
    xlabel: str,
    ylabel: str,
) -> tuple[Callable[[float], float], Callable[[float], float], list[str]]:
    """Scales from data to the ``box`` (left, top, right, bottom) and its drawn axes."""
    xticks, yticks = _range(xs), _range(ys)
    left, top, right, bottom = box

    def sx(v: float) -> float:
        return left + (v - xticks[0]) / (xticks[-1] - xticks[0]) * (right - left)

    def sy(v: float) -> float:
        return bottom - (v - yticks[0]) / (yticks[-1] - yticks[0]) * (bottom - top)

    return sx, sy, _axes(xticks, yticks, sx, sy, box, xlabel, ylabel)


def _range(values: Sequence[float]) -> list[float]:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return [0.0, 1.0]
    low, high = min(finite), max(finite)
    pad = (high - low) * 0.04 or abs(high) * 0.1 or 0.1
    # data that starts at or above 0 (epochs, latencies, counts) keeps an axis from 0 up
    return nice_ticks(max(low - pad, 0.0) if low >= 0 else low - pad, high + pad)


def _pair(value) -> list[float]:
    """A [low, high] interval of finite numbers, else []."""
    if isinstance(value, (list, tuple)) and len(value) == 2:
        if all(isinstance(v, (int, float)) and math.isfinite(v) for v in value):
            return [float(value[0]), float(value[1])]
    return []


def scatter(
    points: Sequence[dict],
    *,
    xlabel: str,
    ylabel: str,
    front: Sequence[tuple[float, float]] = (),
    hline: tuple[float, str] | None = None,
    width: int = 640,
    height: int = 360,
    label: str = "scatter plot",
) -> str:
    """Points ``{"x", "y", "label", "marked", "xrange"}``: marked points large, red and
    labelled, an ``xrange`` [low, high] as a whisker; ``front`` as a line (a Pareto front);
    ``hline`` (y, text) as a dashed threshold."""
    ys = [p["y"] for p in points] + ([hline[0]] if hline else [])
    xs = [p["x"] for p in points] + [v for p in points for v in _pair(p.get("xrange"))]
    box = (64.0, 14.0, width - 16.0, height - 46.0)
    left, top, right, bottom = box
    sx, sy, body = _plane(xs, ys, box, xlabel, ylabel)
    if hline is not None:
        body.append(
            f'<line x1="{left}" x2="{right}" y1="{sy(hline[0]):.1f}" y2="{sy(hline[0]):.1f}" stroke="{MARK}" '
            f'stroke-dasharray="5 4"/><text x="{right - 4}" y="{sy(hline[0]) - 4:.1f}" text-anchor="end" '
            f'fill="{MARK}">{escape(hline[1])}</text>'
        )
    if len(front) > 1:
        path = " ".join(f"{sx(fx):.1f},{sy(fy):.1f}" for fx, fy in front)
        body.append(
            f'<polyline points="{path}" fill="none" stroke="{PALETTE[2]}" stroke-width="1.5"/>'
        )
    labels: list[tuple[float, float, str, bool]] = []
    for p in sorted(points, key=lambda p: bool(p.get("marked"))):
        if p["x"] is None or p["y"] is None:
            continue
        cx, cy = sx(p["x"]), sy(p["y"])
        tip = f"{p.get('label', '')}: {fmt(p['x'], 4)}, {fmt(p['y'], 4)}"
        span = _pair(p.get("xrange"))
        if span:
            color = MARK if p.get("marked") else PALETTE[0]
            x0, x1 = sx(span[0]), sx(span[1])
            body.append(
                f'<path d="M{x0:.1f} {cy:.1f}H{x1:.1f}M{x0:.1f} {cy - 4:.1f}v8M{x1:.1f} {cy - 4:.1f}v8" '
                f'stroke="{color}" stroke-opacity="0.6" fill="none"/>'
            )
            tip += f" (interval {fmt(span[0])}..{fmt(span[1])})"
        if p.get("marked"):
            body.append(
                f'<circle cx="{cx:.1f}" cy="{cy:.1f}" r="7" fill="{MARK}" stroke="#fff" stroke-width="1.5">'
                f"<title>{escape(tip)}</title></circle>"
            )
        else:
            body.append(
                f'<circle cx="{cx:.1f}" cy="{cy:.1f}" r="4.5" fill="{PALETTE[0]}" fill-opacity="0.75">'
                f"<title>{escape(tip)}</title></circle>"
            )
        if p.get("marked") or p.get("labelled"):
            labels.append((cx, cy, str(p.get("label", "")), bool(p.get("marked"))))
    body += _place_labels(labels, (left, top, right, bottom))
    return _svg(width, height, body, label)


def _place_labels(
    labels: list[tuple[float, float, str, bool]], box: tuple[float, float, float, float]
) -> list[str]:
    """Point labels that do not overlap: each tries spots above and below its point, further
    out each time, and takes the first clear of the labels already placed."""
    left, top, right, bottom = box
    taken: list[tuple[float, float, float, float]] = []
    out = []
    for cx, cy, text, marked in sorted(labels, key=lambda item: (not item[3], item[0])):
        width = 7.0 * len(text) + 4
        x0 = min(max(cx - width / 2, left + 2), right - width - 2)
        for dy in (-10, 20, -24, 34, -38, 48, -52, 62):
            y = cy + dy
            spot = (x0, y - 11, x0 + width, y + 2)
            inside = top + 12 <= y <= bottom - 2
            clear = all(
                spot[2] < t[0] or spot[0] > t[2] or spot[3] < t[1] or spot[1] > t[3] for t in taken
            )
            if inside and clear:
                break
        taken.append(spot)
        if abs(dy) > 10:
            out.append(
                f'<line x1="{cx:.1f}" y1="{cy:.1f}" x2="{x0 + width / 2:.1f}" y2="{y - 4 if dy > 0 else y:.1f}" '
                f'stroke="#a0aec0" stroke-width="0.8"/>'
            )
        weight = ' font-weight="bold"' if marked else ""
        out.append(f'<text x="{x0 + 2:.1f}" y="{y:.1f}"{weight}>{escape(text)}</text>')
    return out


def lines(
    series: Sequence[tuple[str, Sequence[tuple[float, float]]]],
    *,
    xlabel: str,
    ylabel: str,
    marker_x: float | None = None,
    width: int = 520,
    height: int = 300,
    label: str = "line chart",
) -> str:
    """One curve per series of (x, y) points, with a legend; ``marker_x`` draws a dashed
    vertical line (e.g. the epoch kept)."""
    xs = [x for _, pts in series for x, _ in pts]
    ys = [y for _, pts in series for _, y in pts]
    box = (64.0, 28.0, width - 16.0, height - 46.0)
    left, top, right, bottom = box
    sx, sy, body = _plane(xs, ys, box, xlabel, ylabel)
    colors = list(PALETTE)
    body += _legend([n for n, _ in series], colors, left + 4, 18)
    if marker_x is not None:
        body.append(
            f'<line x1="{sx(marker_x):.1f}" x2="{sx(marker_x):.1f}" y1="{top}" y2="{bottom}" stroke="{MARK}" stroke-dasharray="5 4"/>'
        )
    for (name, pts), color in zip(series, colors):
        pts = [(x, y) for x, y in pts if x is not None and y is not None and math.isfinite(y)]
        if not pts:
            continue
        path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in pts)
        body.append(f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="2"/>')
        if len(pts) <= 60:
            for x, y in pts:
                body.append(
                    f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="2.5" fill="{color}">'
                    f"<title>{escape(name)} at {fmt(x)}: {fmt(y, 4)}</title></circle>"
                )
    return _svg(width, height, body, label)
