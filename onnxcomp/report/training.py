"""Report sections of transfer, distill and tune results: cut-point candidates, training
curves, validation metrics, and the trials with their Pareto front."""

from __future__ import annotations

import math
from typing import Any

from onnxcomp.report import svg
from onnxcomp.report.figures import dict_of, list_of, number
from onnxcomp.report.markup import MAX_ROWS, esc, figure, figure_block, note, section, table


def _scalar_keys(rows: list[dict[str, Any]]) -> list[str]:
    keys: list[str] = []
    for row in rows:
        for k, v in row.items():
            if k not in keys and (isinstance(v, (int, float, str, bool)) or v is None):
                keys.append(k)
    return keys


def cuts(result: dict[str, Any]) -> str | None:
    # transfer fit lists the cuts it tried ("tried") and the one kept ("cut")
    rows = [
        c
        for c in list_of(result.get("cuts")) or list_of(result.get("tried"))
        if isinstance(c, dict)
    ]
    if not rows:
        return None
    kept = dict_of(result.get("cut")).get("tensor")
    rows = [
        {**c, "chosen": True} if kept is not None and c.get("tensor") == kept else c for c in rows
    ]
    keys = _scalar_keys(rows)
    name_key = next(
        (k for k in ("name", "cut", "tensor", "node") if k in keys), keys[0] if keys else "cut"
    )
    parts = []
    score = next(
        (k for k in ("score", "val_metric", "metric", "accuracy", "probe_accuracy") if k in keys),
        None,
    )
    if score:
        shown = rows[:MAX_ROWS]
        colors = [svg.MARK if c.get("chosen") else svg.PALETTE[0] for c in shown]
        chart = svg.hbars(
            [(str(c.get(name_key)), c.get(score)) for c in shown],
            colors=colors,
            label="cut-point candidates",
            label_chars=36,
        )
        parts.append(
            figure_block(
                chart, f"{score.replace('_', ' ')} per cut-point candidate; the chosen one in red."
            )
        )
    parts.append(
        table(
            [k.replace("_", " ") for k in keys],
            [[c.get(k) for k in keys] for c in rows],
            what="cuts",
        )
    )
    return section("Cut-point candidates", "".join(parts), "cuts")


def history(result: dict[str, Any]) -> str | None:
    rows = [h for h in list_of(result.get("history")) if isinstance(h, dict)]
    if not rows:
        return None
    xkey = "epoch" if any("epoch" in h for h in rows) else "step"
    numeric = [
        k
        for k in _scalar_keys(rows)
        if k != xkey and any(number(h.get(k)) is not None for h in rows)
    ]
    losses = [k for k in numeric if "loss" in k]
    metrics = [k for k in numeric if k not in losses]
    best = number(result.get("best_epoch"))
    charts = []
    for keys, ylabel in ((losses, "loss"), (metrics, "metric")):
        if not keys:
            continue
        series = [
            (
                k.replace("_", " "),
                [
                    (h.get(xkey, i), h.get(k))
                    for i, h in enumerate(rows)
                    if number(h.get(k)) is not None
                ],
            )
            for k in keys
        ]
        charts.append(
            svg.lines(series, xlabel=xkey, ylabel=ylabel, marker_x=best, label=f"training {ylabel}")
        )
    body = '<div class="row">' + "".join(figure_block(c) for c in charts) + "</div>"
    if best is not None:
        body += note(f"Dashed line: the epoch kept ({svg.fmt(best)}).")
    return section("Training", body, "history")


def metrics(result: dict[str, Any]) -> str | None:
    holder = dict_of(result.get("metrics")) or dict_of(result.get("validation"))
    scalars = [
        (k, v) for k, v in holder.items() if isinstance(v, (int, float, str, bool)) or v is None
    ]
    nested = [(k, v) for k, v in holder.items() if isinstance(v, dict)]
    if not scalars and not nested:
        return None
    parts = []
    if scalars:
        parts.append(table(["metric", "value"], scalars))
    for name, value in nested:
        inner = [(k, v) for k, v in value.items() if not isinstance(v, (dict, list))]
        if inner:
            parts.append(f"<h3>{esc(name)}</h3>" + table(["metric", "value"], inner))
    return section("Validation", "".join(parts), "validation")


def _pareto(points: list[dict[str, Any]], higher_better: bool) -> list[tuple[float, float]]:
    """The trials no other trial beats on both axes (lower x, better y), by increasing x."""
    front: list[tuple[float, float]] = []
    best = -math.inf
    for p in sorted(points, key=lambda p: (p["x"], -p["y"] if higher_better else p["y"])):
        y = p["y"] if higher_better else -p["y"]
        if y > best:
            front.append((p["x"], p["y"]))
            best = y
    return front


def trials(result: dict[str, Any]) -> str | None:
    rows = [t for t in list_of(result.get("trials")) if isinstance(t, dict)]
    if not rows:
        return None
    xkey = next(
        (
            k
            for k in ("latency_ms", "ratio", "latency_ratio", "size_bytes")
            if any(number(t.get(k)) is not None for t in rows)
        ),
        None,
    )
    ykey = next(
        (
            k
            for k in ("metric", "accuracy", "drop", "val_metric")
            if any(number(t.get(k)) is not None for t in rows)
        ),
        None,
    )
    parts = []
    if xkey and ykey:
        points = [
            {
                "x": t[xkey],
                "y": t[ykey],
                "label": t.get("name") or t.get("trial") or f"trial {i}",
                "marked": bool(t.get("chosen")),
            }
            for i, t in enumerate(rows)
            if number(t.get(xkey)) is not None and number(t.get(ykey)) is not None
        ]
        higher_better = ykey not in ("drop",)
        front = _pareto(points, higher_better)
        chart = svg.scatter(
            points,
            xlabel=xkey.replace("_", " "),
            ylabel=ykey.replace("_", " "),
            front=front,
            label="trials",
        )
        chosen = [t for t in rows if t.get("chosen")]
        parts.append(
            figure_block(
                chart, f"{len(points)} trials; green: the Pareto front; red: the chosen trial."
            )
        )
        if chosen:
            c = chosen[0]
            parts.append(
                f"<p>Chosen: {xkey.replace('_', ' ')} {figure('chosen-x', c.get(xkey), svg.fmt(c.get(xkey)))}, "
                f"{ykey.replace('_', ' ')} {figure('chosen-y', c.get(ykey), svg.fmt(c.get(ykey)))}.</p>"
            )
    keys = _scalar_keys(rows)
    ordered = sorted(
        rows,
        key=lambda t: (
            not t.get("chosen"),
            number(t.get(xkey)) if xkey and number(t.get(xkey)) is not None else math.inf,
        ),
    )
    parts.append(
        table(
            [k.replace("_", " ") for k in keys],
            [[t.get(k) for k in keys] for t in ordered],
            what="trials",
        )
    )
    return section("Trials", "".join(parts), "trials")
