"""Report sections of quantize results: auto's candidates, per-layer SQNR, nodes kept float."""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any

from onnxcomp.report import figures, svg
from onnxcomp.report.figures import dict_of, list_of, number
from onnxcomp.report.markup import MAX_ROWS, Markup, esc, figure, figure_block, note, section, table


def candidates(result: dict[str, Any]) -> str | None:
    auto = dict_of(result.get("auto"))
    rows = [c for c in list_of(auto.get("candidates")) if isinstance(c, dict)]
    if not rows:
        return None
    chosen = auto.get("chosen")
    points = [
        {
            "x": c.get("ratio_to_float"),
            "y": c.get("drop"),
            "label": c.get("mode"),
            "marked": c.get("mode") == chosen,
            "labelled": True,
            "xrange": c.get("ratio_interval"),
        }
        for c in rows
        if number(c.get("ratio_to_float")) is not None and number(c.get("drop")) is not None
    ]
    body = ""
    if points:
        budget = number(auto.get("max_drop"))
        chart = svg.scatter(
            points,
            xlabel="latency, x fp32 input (lower is faster)",
            ylabel=str(auto.get("metric") or "drop"),
            hline=(budget, f"budget {svg.fmt(budget)}") if budget is not None else None,
            label="candidates: latency ratio against drop",
        )
        intervals = (
            " Whiskers: the interval of the latency ratio."
            if any(p["xrange"] for p in points)
            else ""
        )
        body += figure_block(
            chart, f"Each candidate auto measured; the one kept ({chosen}) in red.{intervals}"
        )
    body += table(
        [
            "candidate",
            "p50 ms",
            "x fp32",
            "interval",
            "drop",
            "integer kernels",
            "DQ islands",
            "within budget",
            "note",
        ],
        [
            [
                Markup(f"<b>{esc(c.get('mode'))}</b>")
                if c.get("mode") == chosen
                else c.get("mode"),
                c.get("latency_ms"),
                c.get("ratio_to_float"),
                _interval(c.get("ratio_interval")),
                c.get("drop"),
                c.get("integer_kernels"),
                c.get("islands"),
                c.get("within_budget"),
                c.get("note") or "",
            ]
            for c in rows
        ],
    )
    decision = dict_of(auto.get("decision"))
    if decision.get("runner_up"):
        text = f"Chosen over {decision['runner_up']}"
        if number(decision.get("margin")) is not None:
            text += f" by a margin of {svg.fmt(decision['margin'])}"
        if decision.get("within_noise"):
            text += "; within timing noise"
        if decision.get("remeasured"):
            text += "; re-measured"
        body += note(text + ".")
    for mode, why in dict_of(auto.get("skipped")).items():
        body += note(f"{mode} not tried: {why}")
    return section("Candidates (quantize auto)", body, "candidates")


def _interval(value: Any) -> str:
    if isinstance(value, list) and len(value) == 2 and all(number(v) is not None for v in value):
        return f"{svg.fmt(value[0])}..{svg.fmt(value[1])}"
    return ""


def _lowest(rows: list[Any], key: Callable[[Any], float], cap: int) -> tuple[list[Any], str]:
    """Rows in their order, or the ``cap`` lowest by ``key`` (still in order) when there are more."""
    if len(rows) <= cap:
        return rows, ""
    keep = set(sorted(range(len(rows)), key=lambda i: key(rows[i]))[:cap])
    return [
        r for i, r in enumerate(rows) if i in keep
    ], f" The {cap} lowest of {len(rows)} are shown."


def _sqnr(value: Any) -> float:
    return value if number(value) is not None else math.inf


def quantize_layers(result: dict[str, Any]) -> str | None:
    parts = []
    tensors = [
        t
        for t in list_of(result.get("tensors"))
        if isinstance(t, dict) and number(t.get("sqnr_db")) is not None
    ]
    if tensors:
        shown, more = _lowest(tensors, lambda t: _sqnr(t["sqnr_db"]), MAX_ROWS)
        colors = {"activation": svg.PALETTE[0], "weight": svg.PALETTE[1]}
        chart = svg.hbars(
            [
                (
                    f"{t['tensor']}"
                    if t.get("kind") != "weight"
                    else f"{t.get('node') or t['tensor']} (weight)",
                    t["sqnr_db"],
                )
                for t in shown
            ],
            unit=" dB",
            colors=[colors.get(t.get("kind"), svg.PALETTE[3]) for t in shown],
            legend=[("activation", colors["activation"]), ("weight", colors["weight"])],
            label="SQNR per quantized tensor",
            label_chars=40,
        )
        parts.append(
            figure_block(
                chart,
                "Signal-to-quantization-noise ratio of each quantized tensor (higher is better), in graph order."
                + more,
            )
        )
    layers = [
        entry
        for entry in list_of(result.get("layers"))
        if isinstance(entry, dict)
        and any(k.endswith("sqnr_db") or k == "sensitivity" for k in entry)
    ]
    if layers and figures.kind(result) == "quantize":
        keys = [
            k
            for k in ("weight_sqnr_db", "output_sqnr_db", "sqnr_db", "sensitivity")
            if any(k in e for e in layers)
        ]
        shown, more = _lowest(layers, lambda e: _sqnr(e.get(keys[0])), MAX_ROWS)
        names = [str(e.get("node") or e.get("name")) for e in shown]
        chart = (
            svg.grouped_hbars(
                names,
                [
                    (k.replace("_db", " (dB)").replace("_", " "), [e.get(k) for e in shown])
                    for k in keys
                ],
                label="per-layer SQNR",
                label_chars=36,
            )
            if len(keys) > 1
            else svg.hbars(
                list(zip(names, [e.get(keys[0]) for e in shown])),
                unit=" dB" if keys[0].endswith("db") else "",
                label="per-layer SQNR",
                label_chars=36,
            )
        )
        parts.append(
            figure_block(
                chart, "Per layer: " + ", ".join(k.replace("_", " ") for k in keys) + "." + more
            )
        )
        extra = [
            k
            for k in ("status", "to", "smooth_alpha", "bias_corrected", "groups")
            if any(k in e for e in layers)
        ]
        parts.append(
            table(
                [
                    "layer",
                    "op",
                    *[k.replace("_", " ") for k in keys],
                    *[k.replace("_", " ") for k in extra],
                ],
                [
                    [
                        e.get("node") or e.get("name"),
                        e.get("op"),
                        *[e.get(k) for k in keys],
                        *[e.get(k) for k in extra],
                    ]
                    for e in layers
                ],
                what="layers",
            )
        )
    gptq = dict_of(result.get("gptq"))
    gptq_layers = [e for e in list_of(gptq.get("layers")) if isinstance(e, dict)]
    if gptq_layers:
        keys = [
            k
            for k in gptq_layers[0]
            if k not in ("node", "name") and isinstance(gptq_layers[0][k], (int, float, str))
        ]
        parts.append("<h3>GPTQ rounding</h3>")
        parts.append(
            table(
                ["layer", *[k.replace("_", " ") for k in keys]],
                [[e.get("node") or e.get("name"), *[e.get(k) for k in keys]] for e in gptq_layers],
                what="layers",
            )
        )
    if not parts:
        return None
    return section("Per-layer accuracy", "".join(parts), "layers")


def float_layers(result: dict[str, Any]) -> str | None:
    rows = figures.float_nodes(result)
    if rows is None:
        return None
    parts = []
    if not rows:
        parts.append("<p>Every node the plan considered is quantized.</p>")
    else:
        reasons: dict[str, int] = {}
        for row in rows:
            # "input 'b3_out' is computed by ..." and "input 'b4_out' ..." are one reason
            reason = re.sub(r"'[^']*'", "'\u2026'", str(row["reason"]))
            reasons[reason] = reasons.get(reason, 0) + 1
        parts.append(
            table(
                ["node", "op", "reason", "SQNR dB"],
                [[r["node"], r["op"], r["reason"], r["sqnr_db"]] for r in rows],
                what="nodes",
            )
        )
        if len(reasons) > 1:
            parts.append(
                "<h3>By reason</h3>"
                + table(["reason", "nodes"], sorted(reasons.items(), key=lambda kv: -kv[1]))
            )
    plan = dict_of(result.get("plan"))
    kernels: dict[str, int] = {}
    for entry in list_of(plan.get("quantized_nodes")):
        if isinstance(entry, dict):
            kernels[str(entry.get("kernel"))] = kernels.get(str(entry.get("kernel")), 0) + 1
    if kernels:
        parts.append(
            "<p>Quantized: " + esc(", ".join(f"{k} x{v}" for k, v in kernels.items())) + ".</p>"
        )
    graph = dict_of(dict_of(result.get("check")).get("graph"))
    if number(graph.get("integer_kernels")) is not None:
        ops = ", ".join(f"{k} x{v}" for k, v in dict_of(graph.get("integer_kernel_ops")).items())
        parts.append(
            f"<p>onnxruntime runs {figure('integer-kernels', graph['integer_kernels'], str(graph['integer_kernels']))} "
            f"integer kernels ({esc(ops)}); {esc(graph.get('islands', 0))} DequantizeLinear node(s) feed float ops.</p>"
        )
    rounds = [
        r for r in list_of(dict_of(result.get("budget")).get("rounds")) if isinstance(r, dict)
    ]
    if len(rounds) > 1:
        parts.append(
            "<h3>Drop budget rounds</h3>"
            + table(
                ["round", "layers put back to float", "drop"],
                [
                    [i, ", ".join(map(str, r.get("float_layers") or [])) or "none", r.get("drop")]
                    for i, r in enumerate(rounds)
                ],
            )
        )
    return section("Nodes kept float, and why", "".join(parts), "float")
