"""The sections of the HTML report, each drawn from the keys of a result it knows; a section
whose keys are absent returns None and is left out.

Key figures carry an ``id`` and the exact JSON value in ``data-value`` so a reader (or a test)
can check the page against the result it came from.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Sequence
from html import escape
from typing import Any

from onnxcomp.report import figures, svg
from onnxcomp.report.figures import _dict, _list, _num

MAX_ROWS = 60  # rows of a long table or bar chart before the rest is summarised in a line
MAX_OP_TYPES = 20
MAX_NEAR_MISSES = 40


def esc(value: Any) -> str:
    return escape(str(value))


def num(value: Any, digits: int = 4) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int) or (isinstance(value, float) and value.is_integer() and abs(value) < 1e15):
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
    return (
        f'<span class="fig" id="{esc(fig_id)}" data-value="{esc(json.dumps(value))}">{esc(text)}</span>'
    )


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


# ---------------------------------------------------------------------------------------------
# summary


def _card(title: str, main: str, sub: str = "") -> str:
    return f'<div class="card"><div class="ct">{esc(title)}</div><div class="cm">{main}</div><div class="cs">{sub}</div></div>'


def summary(result: dict[str, Any]) -> str | None:
    cards = []
    size = figures.size(result)
    if size:
        before, after = size["before"], size["after"]
        main = f"{esc(human_bytes(before))} &rarr; {figure('size-after', after, human_bytes(after))}"
        sub = ""
        if before and after is not None:
            sub = f"{after / before:.0%} of the input"
        cards.append(_card("model size", main, sub))
    lat = figures.latency(result)
    if lat:
        ratio = lat["ratio"]
        main = figure("ratio", ratio, f"{svg.fmt(ratio)}x") if ratio is not None else "-"
        threads = f", {lat['threads']} thread(s)" if lat.get("threads") else ""
        sub = (
            f"p50 {figure('latency-before', lat['before'], svg.fmt(lat['before']) + ' ms')} &rarr; "
            f"{figure('latency-after', lat['after'], svg.fmt(lat['after']) + ' ms')}{esc(threads)}"
        )
        cards.append(_card("latency (p50) ratio", main, sub))
    qual = figures.quality(result)
    if qual and "drop" in qual:
        main = figure("drop", qual["drop"], f"{qual['drop']:+.4f}")
        parts = []
        if qual["before"] is not None:
            parts.append(f"{svg.fmt(qual['before'], 4)} &rarr; {svg.fmt(qual['after'], 4)}")
        if qual["max_drop"] is not None:
            parts.append(f"budget {figure('max-drop', qual['max_drop'], svg.fmt(qual['max_drop']))}")
        cards.append(_card(str(qual["metric"]), main, "; ".join(parts)))
    elif qual:
        main = figure("max-rel-error", qual["error"], f"{qual['error']:.3g}")
        sub = f"tolerance {svg.fmt(qual['tolerance'])}" if qual.get("tolerance") is not None else ""
        if qual.get("samples"):
            sub += f", {esc(qual['samples'])} samples of {esc(qual.get('data'))}"
        cards.append(_card("self-check: max relative error", main, sub))
    floats = figures.float_nodes(result)
    if floats is not None:
        cards.append(
            _card("nodes kept float", figure("float-layers", len(floats), str(len(floats))), "reasons below" if floats else "")
        )
    before, after = _dict(result.get("before")), _dict(result.get("after"))
    if _num(after.get("sparsity")) is not None and after.get("sparsity"):
        cards.append(_card("sparsity", figure("sparsity", after["sparsity"], f"{after['sparsity']:.1%}"), "of the weights are zero"))
    if _num(before.get("macs")) and _num(after.get("macs")) is not None and after["macs"] != before["macs"]:
        cards.append(_card(
            "MACs", f"{si(before['macs'])} &rarr; {figure('macs-after', after['macs'], si(after['macs']))}",
            f"{after['macs'] / before['macs']:.0%} of the input",
        ))
    nodes = _dict(result.get("nodes"))
    if _num(nodes.get("before")) is not None and _num(nodes.get("after")) is not None:
        cards.append(_card("nodes", f"{nodes['before']} &rarr; {figure('nodes-after', nodes['after'], str(nodes['after']))}"))
    isa = figures.cpu(result)
    if isa:
        sub = "integer-kernel path of the CPU"
        if isa.get("target_cpu"):
            sub = f"target {isa['target_cpu']}; weights {isa.get('weight_range') or '?'}"
        cards.append(_card("measured on", figure("cpu", isa["isa"], isa["isa"]), esc(sub)))
    else:
        cards.append(_card("measured on", "not recorded", "the result names no CPU"))
    if not cards:
        return None
    lines = []
    auto = _dict(result.get("auto"))
    if auto.get("why"):
        lines.append(f"<p>auto chose <b>{esc(auto.get('chosen'))}</b>: {esc(auto['why'])}</p>")
    if qual and qual.get("reason"):
        lines.append(f"<p>Verdict: {esc(qual['reason'])}.</p>")
    return section("Summary", f'<div class="cards">{"".join(cards)}</div>{"".join(lines)}', "summary")


# ---------------------------------------------------------------------------------------------
# quantize


def candidates(result: dict[str, Any]) -> str | None:
    auto = _dict(result.get("auto"))
    rows = [c for c in _list(auto.get("candidates")) if isinstance(c, dict)]
    if not rows:
        return None
    chosen = auto.get("chosen")
    points = [
        {
            "x": c.get("ratio_to_float"), "y": c.get("drop"), "label": c.get("mode"),
            "marked": c.get("mode") == chosen, "labelled": True, "xrange": c.get("ratio_interval"),
        }
        for c in rows
        if _num(c.get("ratio_to_float")) is not None and _num(c.get("drop")) is not None
    ]
    body = ""
    if points:
        budget = _num(auto.get("max_drop"))
        chart = svg.scatter(
            points,
            xlabel="latency, x fp32 input (lower is faster)",
            ylabel=str(auto.get("metric") or "drop"),
            hline=(budget, f"budget {svg.fmt(budget)}") if budget is not None else None,
            label="candidates: latency ratio against drop",
        )
        intervals = " Whiskers: the interval of the latency ratio." if any(p["xrange"] for p in points) else ""
        body += figure_block(chart, f"Each candidate auto measured; the one kept ({chosen}) in red.{intervals}")
    body += table(
        ["candidate", "p50 ms", "x fp32", "interval", "drop", "integer kernels", "DQ islands", "within budget", "note"],
        [
            [
                Markup(f"<b>{esc(c.get('mode'))}</b>") if c.get("mode") == chosen else c.get("mode"),
                c.get("latency_ms"), c.get("ratio_to_float"), _interval(c.get("ratio_interval")), c.get("drop"),
                c.get("integer_kernels"), c.get("islands"), c.get("within_budget"), c.get("note") or "",
            ]
            for c in rows
        ],
    )
    decision = _dict(auto.get("decision"))
    if decision.get("runner_up"):
        text = f"Chosen over {decision['runner_up']}"
        if _num(decision.get("margin")) is not None:
            text += f" by a margin of {svg.fmt(decision['margin'])}"
        if decision.get("within_noise"):
            text += "; within timing noise"
        if decision.get("remeasured"):
            text += "; re-measured"
        body += note(text + ".")
    for mode, why in _dict(auto.get("skipped")).items():
        body += note(f"{mode} not tried: {why}")
    return section("Candidates (quantize auto)", body, "candidates")


def _interval(value: Any) -> str:
    if isinstance(value, list) and len(value) == 2 and all(_num(v) is not None for v in value):
        return f"{svg.fmt(value[0])}..{svg.fmt(value[1])}"
    return ""


def _lowest(rows: list[Any], key: Callable[[Any], float], cap: int) -> tuple[list[Any], str]:
    """Rows in their order, or the ``cap`` lowest by ``key`` (still in order) when there are more."""
    if len(rows) <= cap:
        return rows, ""
    keep = set(sorted(range(len(rows)), key=lambda i: key(rows[i]))[:cap])
    return [r for i, r in enumerate(rows) if i in keep], f" The {cap} lowest of {len(rows)} are shown."


def _sqnr(value: Any) -> float:
    return value if _num(value) is not None else math.inf


def quantize_layers(result: dict[str, Any]) -> str | None:
    parts = []
    tensors = [t for t in _list(result.get("tensors")) if isinstance(t, dict) and _num(t.get("sqnr_db")) is not None]
    if tensors:
        shown, more = _lowest(tensors, lambda t: _sqnr(t["sqnr_db"]), MAX_ROWS)
        colors = {"activation": svg.PALETTE[0], "weight": svg.PALETTE[1]}
        chart = svg.hbars(
            [
                (f"{t['tensor']}" if t.get("kind") != "weight" else f"{t.get('node') or t['tensor']} (weight)", t["sqnr_db"])
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
        entry for entry in _list(result.get("layers"))
        if isinstance(entry, dict) and any(k.endswith("sqnr_db") or k == "sensitivity" for k in entry)
    ]
    if layers and figures.kind(result) == "quantize":
        keys = [k for k in ("weight_sqnr_db", "output_sqnr_db", "sqnr_db", "sensitivity") if any(k in e for e in layers)]
        shown, more = _lowest(layers, lambda e: _sqnr(e.get(keys[0])), MAX_ROWS)
        names = [str(e.get("node") or e.get("name")) for e in shown]
        chart = svg.grouped_hbars(
            names,
            [(k.replace("_db", " (dB)").replace("_", " "), [e.get(k) for e in shown]) for k in keys],
            label="per-layer SQNR",
            label_chars=36,
        ) if len(keys) > 1 else svg.hbars(
            list(zip(names, [e.get(keys[0]) for e in shown])), unit=" dB" if keys[0].endswith("db") else "",
            label="per-layer SQNR", label_chars=36,
        )
        parts.append(figure_block(chart, "Per layer: " + ", ".join(k.replace("_", " ") for k in keys) + "." + more))
        extra = [k for k in ("status", "to", "smooth_alpha", "bias_corrected", "groups") if any(k in e for e in layers)]
        parts.append(
            table(
                ["layer", "op", *[k.replace("_", " ") for k in keys], *[k.replace("_", " ") for k in extra]],
                [[e.get("node") or e.get("name"), e.get("op"), *[e.get(k) for k in keys], *[e.get(k) for k in extra]] for e in layers],
                what="layers",
            )
        )
    gptq = _dict(result.get("gptq"))
    gptq_layers = [e for e in _list(gptq.get("layers")) if isinstance(e, dict)]
    if gptq_layers:
        keys = [k for k in gptq_layers[0] if k not in ("node", "name") and isinstance(gptq_layers[0][k], (int, float, str))]
        parts.append("<h3>GPTQ rounding</h3>")
        parts.append(table(["layer", *[k.replace("_", " ") for k in keys]], [[e.get("node") or e.get("name"), *[e.get(k) for k in keys]] for e in gptq_layers], what="layers"))
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
        parts.append(table(["node", "op", "reason", "SQNR dB"], [[r["node"], r["op"], r["reason"], r["sqnr_db"]] for r in rows], what="nodes"))
        if len(reasons) > 1:
            parts.append("<h3>By reason</h3>" + table(["reason", "nodes"], sorted(reasons.items(), key=lambda kv: -kv[1])))
    plan = _dict(result.get("plan"))
    kernels: dict[str, int] = {}
    for entry in _list(plan.get("quantized_nodes")):
        if isinstance(entry, dict):
            kernels[str(entry.get("kernel"))] = kernels.get(str(entry.get("kernel")), 0) + 1
    if kernels:
        parts.append("<p>Quantized: " + esc(", ".join(f"{k} x{v}" for k, v in kernels.items())) + ".</p>")
    graph = _dict(_dict(result.get("check")).get("graph"))
    if _num(graph.get("integer_kernels")) is not None:
        ops = ", ".join(f"{k} x{v}" for k, v in _dict(graph.get("integer_kernel_ops")).items())
        parts.append(
            f"<p>onnxruntime runs {figure('integer-kernels', graph['integer_kernels'], str(graph['integer_kernels']))} "
            f"integer kernels ({esc(ops)}); {esc(graph.get('islands', 0))} DequantizeLinear node(s) feed float ops.</p>"
        )
    rounds = [r for r in _list(_dict(result.get("budget")).get("rounds")) if isinstance(r, dict)]
    if len(rounds) > 1:
        parts.append("<h3>Drop budget rounds</h3>" + table(
            ["round", "layers put back to float", "drop"],
            [[i, ", ".join(map(str, r.get("float_layers") or [])) or "none", r.get("drop")] for i, r in enumerate(rounds)],
        ))
    return section("Nodes kept float, and why", "".join(parts), "float")


# ---------------------------------------------------------------------------------------------
# optimize


def rewrites(result: dict[str, Any], title: str = "Rewrites", sid: str = "rewrites") -> str | None:
    rules = _dict(result.get("rules"))
    if not rules:
        return None
    parts = []
    active = [(name, e) for name, e in rules.items() if isinstance(e, dict) and (e.get("applied") or e.get("skipped"))]
    idle = [name for name, e in rules.items() if isinstance(e, dict) and not (e.get("applied") or e.get("skipped"))]
    if active:
        parts.append(table(
            ["rule", "applied", "near misses", "most common reason"],
            [[name, e.get("applied", 0), e.get("skipped", 0), next(iter(_dict(e.get("reasons"))), "")] for name, e in active],
        ))
    else:
        parts.append("<p>No rule matched.</p>")
    if idle:
        parts.append(note(f"Found nothing to rewrite: {', '.join(idle)}."))
    misses = [
        [name, s.get("node"), s.get("reason")]
        for name, e in active
        for s in _list(_dict(e).get("skips"))
        if isinstance(s, dict)
    ]
    if misses:
        parts.append("<h3>Near misses</h3>" + table(["rule", "node", "why it did not apply"], misses, cap=MAX_NEAR_MISSES, what="near misses"))
    before, after = _dict(result.get("ops_before")), _dict(result.get("ops_after"))
    changed = sorted(
        (op for op in set(before) | set(after) if before.get(op, 0) != after.get(op, 0)),
        key=lambda op: -max(before.get(op, 0), after.get(op, 0)),
    )[:MAX_OP_TYPES]
    if changed:
        chart = svg.grouped_hbars(
            changed,
            [("before", [before.get(op, 0) for op in changed]), ("after", [after.get(op, 0) for op in changed])],
            label="op counts before and after",
        )
        parts.append(figure_block(chart, "Op types whose count changed."))
    left_out = [f for f in _list(result.get("left_out")) if isinstance(f, dict)]
    if left_out:
        parts.append("<h3>Left out: rewrites that changed the outputs</h3>" + table(
            ["rule", "node", "max relative error", "float64 error", "fp32 noise"],
            [[f.get("rule"), f.get("node"), f.get("max_rel_error"), f.get("float64_error"), f.get("fp32_noise")] for f in left_out],
        ))
    nodes, opset = _dict(result.get("nodes")), _dict(result.get("opset"))
    facts = []
    if nodes:
        facts.append(f"nodes {esc(nodes.get('before'))} &rarr; {esc(nodes.get('after'))}")
    if opset:
        facts.append(f"opset {esc(opset.get('before'))} &rarr; {esc(opset.get('after'))}")
    weights = _dict(result.get("weight_bytes"))
    if weights:
        facts.append(f"weights {esc(human_bytes(weights.get('before')))} &rarr; {esc(human_bytes(weights.get('after')))}")
    if facts:
        parts.append("<p>" + "; ".join(facts) + ".</p>")
    return section(title, "".join(parts), sid)


def prepare(result: dict[str, Any]) -> str | None:
    """The clean-up a command ran first (its optimize report under ``prepare``)."""
    optimize = _dict(_dict(result.get("prepare")).get("optimize"))
    if not optimize:
        return None
    return rewrites(optimize, f"Clean-up before {figures.kind(result)}", "prepare")


# ---------------------------------------------------------------------------------------------
# time: onnxruntime's profiler


def timing(result: dict[str, Any]) -> str | None:
    profile = _dict(result.get("profile"))
    if isinstance(profile.get("unavailable"), str):
        return section("Where the time goes", note(f"Not profiled: {profile['unavailable']}"), "time")
    models = [m for m in _list(profile.get("models")) if isinstance(m, dict)]
    if not models:
        return None
    parts = []
    parts.append(table(
        ["model", "run p50 ms under the profiler", "sum of kernels ms", "nodes run"],
        [[m.get("name"), m.get("run_p50_ms"), m.get("nodes_ms"), m.get("nodes")] for m in models],
    ))
    facts = [f"onnxruntime's profiler, {esc(profile.get('runs'))} runs after warm-up, {esc(profile.get('threads'))} thread(s)"]
    if profile.get("inputs"):
        facts.append(f"inputs: {esc(profile['inputs'])}")
    if profile.get("cpu"):
        facts.append(f"CPU: {esc(profile['cpu'])}")
    parts.append(f'<p class="note">{"; ".join(facts)}. Times are medians per run; the profiler adds time to every node, so the latency ratio is the one in the summary; nodes are the ones onnxruntime ran after its own fusions.</p>')
    totals: dict[str, float] = {}
    for m in models:
        for entry in _list(m.get("op_types")):
            totals[entry["op"]] = max(totals.get(entry["op"], 0.0), entry.get("ms") or 0.0)
    ops = sorted(totals, key=lambda op: -totals[op])
    shown = ops[:MAX_OP_TYPES]
    series = []
    for m in models:
        by_op = {e["op"]: e.get("ms") for e in _list(m.get("op_types"))}
        series.append((str(m.get("name")), [by_op.get(op) for op in shown]))
    more = f" The {MAX_OP_TYPES} costliest of {len(ops)} op types are shown." if len(ops) > MAX_OP_TYPES else ""
    parts.append("<h3>Per op type</h3>")
    parts.append(figure_block(svg.grouped_hbars(shown, series, unit=" ms", label="time per op type"), "Kernel time per run (ms), summed over the nodes of each op type." + more))
    for m in models:
        nodes = [n for n in _list(m.get("slowest_nodes")) if isinstance(n, dict)][:MAX_ROWS]
        if not nodes:
            continue
        parts.append(f"<h3>Slowest nodes: {esc(m.get('name'))}</h3>")
        chart = svg.hbars(
            [(f"{n.get('node')} ({n.get('op')})", n.get("ms")) for n in nodes], unit=" ms",
            label=f"slowest nodes of {m.get('name')}", label_chars=44,
        )
        parts.append(figure_block(chart, f"The {len(nodes)} slowest of {m.get('nodes')} nodes, ms per run."))
    return section("Where the time goes", "".join(parts), "time")


# ---------------------------------------------------------------------------------------------
# prune


def prune_layers(result: dict[str, Any]) -> str | None:
    """Per-layer sparsity (unstructured ``tensors`` or ``layers``) and channels removed
    (structured ``groups``), each skipped layer with its reason."""
    parts = []
    rows = [
        e for e in _list(result.get("layers")) + _list(result.get("tensors"))
        if isinstance(e, dict) and ("sparsity" in e or "channels_removed" in e or "skipped" in e)
    ]
    if figures.kind(result) != "prune":
        rows = [e for e in rows if "sparsity" in e or "channels_removed" in e]
    if rows:
        names = [str(e.get("name") or e.get("node") or e.get("tensor")) for e in rows]
        shown = list(zip(names, rows))[:MAX_ROWS]
        more = f" The first {MAX_ROWS} of {len(rows)} layers are shown." if len(rows) > MAX_ROWS else ""
        if any(_num(e.get("sparsity")) is not None for e in rows):
            chart = svg.hbars([(n, e.get("sparsity")) for n, e in shown], label="sparsity per layer", label_chars=36)
            parts.append(figure_block(chart, "Fraction of weights zeroed per layer (n/a: skipped)." + more))
        if any(_num(e.get("channels_removed")) is not None for e in rows):
            chart = svg.hbars(
                [(n, e.get("channels_removed")) for n, e in shown], label="channels removed per layer",
                label_chars=36, colors=[svg.PALETTE[1]] * len(shown),
            )
            parts.append(figure_block(chart, "Output channels removed per layer." + more))
        keys = [
            k for k in ("op", "shape", "sparsity", "channels_removed", "relative_error", "reason", "skipped")
            if any(k in e for e in rows)
        ]
        parts.append(table(
            ["layer", *[k.replace("_", " ") for k in keys]],
            [[n, *[_cell(e.get(k)) for k in keys]] for n, e in zip(names, rows)],
            what="layers",
        ))
    groups = [g for g in _list(result.get("groups")) if isinstance(g, dict)]
    if groups:
        shown = groups[:MAX_ROWS]
        names = [str(g.get("group")) for g in shown]
        chart = svg.grouped_hbars(
            names,
            [("channels", [g.get("channels") for g in shown]), ("removed", [g.get("removed") for g in shown])],
            label="channels removed per dependency group", label_chars=32,
        )
        parts.append("<h3>Channels removed per dependency group</h3>")
        parts.append(figure_block(chart, "Each group's channels and how many were removed together."))
        parts.append(table(
            ["group", "kind", "channels", "removed", "consumers", "skipped because"],
            [
                [g.get("group"), g.get("kind"), g.get("channels"), g.get("removed"),
                 ", ".join(map(str, _list(g.get("consumers")))), g.get("skipped") or ""]
                for g in groups
            ],
            what="groups",
        ))
    consumers = [c for c in _list(result.get("consumers")) if isinstance(c, dict)]
    if consumers and groups:
        parts.append("<h3>Consumers refitted</h3>" + table(
            ["node", "inputs removed", "relative error"],
            [[c.get("node"), c.get("inputs_removed"), c.get("relative_error")] for c in consumers],
            what="consumers",
        ))
    if not parts:
        return None
    skipped = [e for e in _list(result.get("skipped")) if isinstance(e, dict)]
    if skipped:
        parts.append("<h3>Skipped</h3>" + table(["layer", "reason"], [[e.get("name") or e.get("node"), e.get("reason")] for e in skipped], what="layers"))
    facts = [
        f"{k.replace('_', ' ')} {num(v)}"
        for k in ("kind", "method", "importance", "scope", "pattern", "reconstruct")
        if isinstance((v := result.get(k)), (str, bool))
    ]
    if facts:
        parts.insert(0, f"<p>{esc('; '.join(facts))}.</p>")
    return section("Per-layer pruning", "".join(parts), "prune")


def _cell(value: Any) -> Any:
    if isinstance(value, list):
        return "x".join(map(str, value))
    return value


def before_after(result: dict[str, Any]) -> str | None:
    """``before`` and ``after`` dicts of figures (parameters, MACs, sparsity, sizes) side by side."""
    before, after = _dict(result.get("before")), _dict(result.get("after"))
    keys = [k for k in before if _num(before.get(k)) is not None or _num(after.get(k)) is not None]
    if not keys:
        return None
    rows = []
    for key in keys:
        b, a = _num(before.get(key)), _num(after.get(key))
        shown_b = human_bytes(b) if key.endswith("bytes") else b
        shown_a = human_bytes(a) if key.endswith("bytes") else a
        rows.append([key.replace("_", " "), shown_b, shown_a, a / b if a is not None and b else None])
    return section("Before and after", table(["", "before", "after", "after / before"], rows), "before-after")


# ---------------------------------------------------------------------------------------------
# transfer / distill


def _scalar_keys(rows: list[dict[str, Any]]) -> list[str]:
    keys: list[str] = []
    for row in rows:
        for k, v in row.items():
            if k not in keys and (isinstance(v, (int, float, str, bool)) or v is None):
                keys.append(k)
    return keys


def cuts(result: dict[str, Any]) -> str | None:
    rows = [c for c in _list(result.get("cuts")) if isinstance(c, dict)]
    if not rows:
        return None
    keys = _scalar_keys(rows)
    name_key = next((k for k in ("name", "cut", "tensor", "node") if k in keys), keys[0] if keys else "cut")
    parts = []
    score = next((k for k in ("score", "val_metric", "metric", "accuracy", "probe_accuracy") if k in keys), None)
    if score:
        shown = rows[:MAX_ROWS]
        colors = [svg.MARK if c.get("chosen") else svg.PALETTE[0] for c in shown]
        chart = svg.hbars([(str(c.get(name_key)), c.get(score)) for c in shown], colors=colors, label="cut-point candidates", label_chars=36)
        parts.append(figure_block(chart, f"{score.replace('_', ' ')} per cut-point candidate; the chosen one in red."))
    parts.append(table([k.replace("_", " ") for k in keys], [[c.get(k) for k in keys] for c in rows], what="cuts"))
    return section("Cut-point candidates", "".join(parts), "cuts")


def history(result: dict[str, Any]) -> str | None:
    rows = [h for h in _list(result.get("history")) if isinstance(h, dict)]
    if not rows:
        return None
    xkey = "epoch" if any("epoch" in h for h in rows) else "step"
    numeric = [k for k in _scalar_keys(rows) if k != xkey and any(_num(h.get(k)) is not None for h in rows)]
    losses = [k for k in numeric if "loss" in k]
    metrics = [k for k in numeric if k not in losses]
    best = _num(result.get("best_epoch"))
    charts = []
    for keys, ylabel in ((losses, "loss"), (metrics, "metric")):
        if not keys:
            continue
        series = [
            (k.replace("_", " "), [(h.get(xkey, i), h.get(k)) for i, h in enumerate(rows) if _num(h.get(k)) is not None])
            for k in keys
        ]
        charts.append(svg.lines(series, xlabel=xkey, ylabel=ylabel, marker_x=best, label=f"training {ylabel}"))
    body = '<div class="row">' + "".join(figure_block(c) for c in charts) + "</div>"
    if best is not None:
        body += note(f"Dashed line: the epoch kept ({svg.fmt(best)}).")
    return section("Training", body, "history")


def metrics(result: dict[str, Any]) -> str | None:
    holder = _dict(result.get("metrics")) or _dict(result.get("validation"))
    scalars = [(k, v) for k, v in holder.items() if isinstance(v, (int, float, str, bool)) or v is None]
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


# ---------------------------------------------------------------------------------------------
# tune


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
    rows = [t for t in _list(result.get("trials")) if isinstance(t, dict)]
    if not rows:
        return None
    xkey = next((k for k in ("latency_ms", "ratio", "latency_ratio", "size_bytes") if any(_num(t.get(k)) is not None for t in rows)), None)
    ykey = next((k for k in ("metric", "accuracy", "drop", "val_metric") if any(_num(t.get(k)) is not None for t in rows)), None)
    parts = []
    if xkey and ykey:
        points = [
            {"x": t[xkey], "y": t[ykey], "label": t.get("name") or t.get("trial") or f"trial {i}", "marked": bool(t.get("chosen"))}
            for i, t in enumerate(rows)
            if _num(t.get(xkey)) is not None and _num(t.get(ykey)) is not None
        ]
        higher_better = ykey not in ("drop",)
        front = _pareto(points, higher_better)
        chart = svg.scatter(points, xlabel=xkey.replace("_", " "), ylabel=ykey.replace("_", " "), front=front, label="trials")
        chosen = [t for t in rows if t.get("chosen")]
        parts.append(figure_block(chart, f"{len(points)} trials; green: the Pareto front; red: the chosen trial."))
        if chosen:
            c = chosen[0]
            parts.append(
                f"<p>Chosen: {xkey.replace('_', ' ')} {figure('chosen-x', c.get(xkey), svg.fmt(c.get(xkey)))}, "
                f"{ykey.replace('_', ' ')} {figure('chosen-y', c.get(ykey), svg.fmt(c.get(ykey)))}.</p>"
            )
    keys = _scalar_keys(rows)
    ordered = sorted(rows, key=lambda t: (not t.get("chosen"), _num(t.get(xkey)) if xkey and _num(t.get(xkey)) is not None else math.inf))
    parts.append(table([k.replace("_", " ") for k in keys], [[t.get(k) for k in keys] for t in ordered], what="trials"))
    return section("Trials", "".join(parts), "trials")


# ---------------------------------------------------------------------------------------------
# the rest


def notes(result: dict[str, Any]) -> str | None:
    items = [n for n in _list(result.get("notes")) if isinstance(n, str)]
    if not items:
        return None
    return section("Notes", "<ul>" + "".join(f"<li>{esc(n)}</li>" for n in items) + "</ul>", "notes")


def steps(result: dict[str, Any]) -> str | None:
    """A recipe run (``onnxcomp run --json``): the steps, then each step's own sections."""
    items = [st for st in _list(result.get("steps")) if isinstance(st, dict) and "pass" in st]
    if not items:
        return None
    parts = [table(
        ["step", "pass", "changed", "seconds"],
        [[i, st.get("pass"), st.get("modified"), st.get("seconds")] for i, st in enumerate(items, 1)],
    )]
    for i, st in enumerate(items, 1):
        report = _dict(st.get("report"))
        inner = [part for build in STEP_SECTIONS if (part := build(report))]
        if inner:
            parts.append(f'<div class="step"><h3>Step {i}: {esc(st.get("pass"))}</h3>{"".join(inner)}</div>')
    validation = _dict(result.get("validation"))
    if validation.get("passed") is not None:
        saved = "saved" if result.get("saved") else "NOT saved"
        parts.append(f"<p>Validation {'passed' if validation['passed'] else 'failed'}: {esc(saved)} {esc(result.get('output') or '')}.</p>")
    return section("Steps", "".join(parts), "steps")


SHOWN_ELSEWHERE = {
    "command", "input", "output", "model", "size_bytes", "latency_ms", "notes", "drop", "drop_metric", "max_drop",
    "size_bytes_before", "size_bytes_after",
}


def other(result: dict[str, Any]) -> str | None:
    """Top-level scalar figures no section shows."""
    rows = [
        (k, v) for k, v in result.items()
        if k not in SHOWN_ELSEWHERE and (isinstance(v, (int, float, str, bool)) or v is None)
    ]
    if not rows:
        return None
    return section("Other figures", table(["key", "value"], rows), "other")


MAX_RAW_BYTES = 300_000  # the full JSON result, folded, when small; a 1,000-node quantize result is 0.5 MB


def raw(result: dict[str, Any]) -> str:
    text = json.dumps(result, indent=1, default=str)
    if len(text) > MAX_RAW_BYTES:
        return section("Full result", note(f"The JSON result ({len(text):,} bytes) is too long to include; see the file it came from."), "raw")
    return section("Full result", f"<details><summary>JSON ({len(text):,} bytes)</summary><pre>{esc(text)}</pre></details>", "raw")


SECTIONS: tuple[Callable[[dict[str, Any]], str | None], ...] = (
    summary, steps, candidates, trials, quantize_layers, float_layers, prune_layers, before_after, cuts,
    history, metrics, timing, rewrites, prepare, notes, other,
)
# What a recipe step's report shows (its figures are the run's summary).
STEP_SECTIONS = (
    candidates, quantize_layers, float_layers, prune_layers, before_after, cuts, history, metrics,
    rewrites, notes,
)
