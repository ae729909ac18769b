"""The sections of the HTML report, each drawn from the keys of a result it knows; a section
whose keys are absent returns None and is left out. This module has the sections every command
shares (summary, time, rewrites, steps) and the order of them all.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from onnxcomp.report import figures, svg
from onnxcomp.report.figures import dict_of, list_of, number
from onnxcomp.report.markup import (
    MAX_ROWS,
    esc,
    figure,
    figure_block,
    human_bytes,
    note,
    section,
    si,
    table,
)
from onnxcomp.report.prune import before_after, prune_layers
from onnxcomp.report.quantize import candidates, float_layers, quantize_layers
from onnxcomp.report.training import cuts, history, metrics, trials

MAX_OP_TYPES = 20
MAX_NEAR_MISSES = 40


def _card(title: str, main: str, sub: str = "") -> str:
    return f'<div class="card"><div class="ct">{esc(title)}</div><div class="cm">{main}</div><div class="cs">{sub}</div></div>'


def summary(result: dict[str, Any]) -> str | None:
    cards = []
    size = figures.size(result)
    if size:
        before, after = size["before"], size["after"]
        main = (
            f"{esc(human_bytes(before))} &rarr; {figure('size-after', after, human_bytes(after))}"
        )
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
            parts.append(
                f"budget {figure('max-drop', qual['max_drop'], svg.fmt(qual['max_drop']))}"
            )
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
            _card(
                "nodes kept float",
                figure("float-layers", len(floats), str(len(floats))),
                "reasons below" if floats else "",
            )
        )
    if number(result.get("val_metric")) is not None:
        sub = []
        if number(result.get("train_metric")) is not None:
            sub.append(f"train {svg.fmt(result['train_metric'], 4)}")
        if result.get("val_samples"):
            sub.append(f"{esc(result['val_samples'])} validation samples")
        name = result.get("metric") if isinstance(result.get("metric"), str) else "metric"
        cards.append(
            _card(
                f"validation {name}",
                figure("val-metric", result["val_metric"], svg.fmt(result["val_metric"], 4)),
                "; ".join(sub),
            )
        )
    if number(result.get("val_agreement")) is not None:
        cards.append(
            _card(
                "agreement with the teacher",
                figure(
                    "val-agreement", result["val_agreement"], svg.fmt(result["val_agreement"], 4)
                ),
                "top-1, validation samples",
            )
        )
    before, after = dict_of(result.get("before")), dict_of(result.get("after"))
    if number(after.get("sparsity")) is not None and after.get("sparsity"):
        cards.append(
            _card(
                "sparsity",
                figure("sparsity", after["sparsity"], f"{after['sparsity']:.1%}"),
                "of the weights are zero",
            )
        )
    if (
        number(before.get("macs"))
        and number(after.get("macs")) is not None
        and after["macs"] != before["macs"]
    ):
        cards.append(
            _card(
                "MACs",
                f"{si(before['macs'])} &rarr; {figure('macs-after', after['macs'], si(after['macs']))}",
                f"{after['macs'] / before['macs']:.0%} of the input",
            )
        )
    nodes = dict_of(result.get("nodes"))
    if number(nodes.get("before")) is not None and number(nodes.get("after")) is not None:
        cards.append(
            _card(
                "nodes",
                f"{nodes['before']} &rarr; {figure('nodes-after', nodes['after'], str(nodes['after']))}",
            )
        )
    isa = figures.cpu(result)
    if isa:
        sub = "integer-kernel path of the CPU"
        if isa.get("target_cpu"):
            sub = f"target {isa['target_cpu']}; weights {isa.get('weight_range') or '?'}"
        cards.append(_card("measured on", figure("cpu", isa["isa"], isa["isa"]), esc(sub)))
    elif lat or result.get("profile"):
        cards.append(_card("measured on", "not recorded", "the result names no CPU"))
    if not cards:
        return None
    lines = []
    auto = dict_of(result.get("auto"))
    if auto.get("why"):
        lines.append(f"<p>auto chose <b>{esc(auto.get('chosen'))}</b>: {esc(auto['why'])}</p>")
    elif isinstance(result.get("why"), str):
        lines.append(f"<p>{esc(result['why'])}</p>")
    if qual and qual.get("reason"):
        lines.append(f"<p>Verdict: {esc(qual['reason'])}.</p>")
    return section(
        "Summary", f'<div class="cards">{"".join(cards)}</div>{"".join(lines)}', "summary"
    )


def rewrites(result: dict[str, Any], title: str = "Rewrites", sid: str = "rewrites") -> str | None:
    rules = dict_of(result.get("rules"))
    if not rules:
        return None
    parts = []
    active = [
        (name, e)
        for name, e in rules.items()
        if isinstance(e, dict) and (e.get("applied") or e.get("skipped"))
    ]
    idle = [
        name
        for name, e in rules.items()
        if isinstance(e, dict) and not (e.get("applied") or e.get("skipped"))
    ]
    if active:
        parts.append(
            table(
                ["rule", "applied", "near misses", "most common reason"],
                [
                    [
                        name,
                        e.get("applied", 0),
                        e.get("skipped", 0),
                        next(iter(dict_of(e.get("reasons"))), ""),
                    ]
                    for name, e in active
                ],
            )
        )
    else:
        parts.append("<p>No rule matched.</p>")
    if idle:
        parts.append(note(f"Found nothing to rewrite: {', '.join(idle)}."))
    misses = [
        [name, s.get("node"), s.get("reason")]
        for name, e in active
        for s in list_of(dict_of(e).get("skips"))
        if isinstance(s, dict)
    ]
    if misses:
        parts.append(
            "<h3>Near misses</h3>"
            + table(
                ["rule", "node", "why it did not apply"],
                misses,
                cap=MAX_NEAR_MISSES,
                what="near misses",
            )
        )
    before, after = dict_of(result.get("ops_before")), dict_of(result.get("ops_after"))
    changed = sorted(
        (op for op in set(before) | set(after) if before.get(op, 0) != after.get(op, 0)),
        key=lambda op: -max(before.get(op, 0), after.get(op, 0)),
    )[:MAX_OP_TYPES]
    if changed:
        chart = svg.grouped_hbars(
            changed,
            [
                ("before", [before.get(op, 0) for op in changed]),
                ("after", [after.get(op, 0) for op in changed]),
            ],
            label="op counts before and after",
        )
        parts.append(figure_block(chart, "Op types whose count changed."))
    left_out = [f for f in list_of(result.get("left_out")) if isinstance(f, dict)]
    if left_out:
        parts.append(
            "<h3>Left out: rewrites that changed the outputs</h3>"
            + table(
                ["rule", "node", "max relative error", "float64 error", "fp32 noise"],
                [
                    [
                        f.get("rule"),
                        f.get("node"),
                        f.get("max_rel_error"),
                        f.get("float64_error"),
                        f.get("fp32_noise"),
                    ]
                    for f in left_out
                ],
            )
        )
    nodes, opset = dict_of(result.get("nodes")), dict_of(result.get("opset"))
    facts = []
    if nodes:
        facts.append(f"nodes {esc(nodes.get('before'))} &rarr; {esc(nodes.get('after'))}")
    if opset:
        facts.append(f"opset {esc(opset.get('before'))} &rarr; {esc(opset.get('after'))}")
    weights = dict_of(result.get("weight_bytes"))
    if weights:
        facts.append(
            f"weights {esc(human_bytes(weights.get('before')))} &rarr; {esc(human_bytes(weights.get('after')))}"
        )
    if facts:
        parts.append("<p>" + "; ".join(facts) + ".</p>")
    return section(title, "".join(parts), sid)


def prepare(result: dict[str, Any]) -> str | None:
    """The clean-up a command ran first (its optimize report under ``prepare``)."""
    optimize = dict_of(dict_of(result.get("prepare")).get("optimize"))
    if not optimize:
        return None
    return rewrites(optimize, f"Clean-up before {figures.kind(result)}", "prepare")


def timing(result: dict[str, Any]) -> str | None:
    profile = dict_of(result.get("profile"))
    if isinstance(profile.get("unavailable"), str):
        return section(
            "Where the time goes", note(f"Not profiled: {profile['unavailable']}"), "time"
        )
    models = [m for m in list_of(profile.get("models")) if isinstance(m, dict)]
    if not models:
        return None
    parts = []
    parts.append(
        table(
            ["model", "run p50 ms under the profiler", "sum of kernels ms", "nodes run"],
            [
                [m.get("name"), m.get("run_p50_ms"), m.get("nodes_ms"), m.get("nodes")]
                for m in models
            ],
        )
    )
    facts = [
        f"onnxruntime's profiler, {esc(profile.get('runs'))} runs after warm-up, {esc(profile.get('threads'))} thread(s)"
    ]
    if profile.get("inputs"):
        facts.append(f"inputs: {esc(profile['inputs'])}")
    if profile.get("cpu"):
        facts.append(f"CPU: {esc(profile['cpu'])}")
    parts.append(
        f'<p class="note">{"; ".join(facts)}. Times are medians per run; the profiler adds time to every node, so they compare nodes and op types, not end-to-end latency (see the summary); nodes are the ones onnxruntime ran after its own fusions.</p>'
    )
    totals: dict[str, float] = {}
    for m in models:
        for entry in list_of(m.get("op_types")):
            totals[entry["op"]] = max(totals.get(entry["op"], 0.0), entry.get("ms") or 0.0)
    ops = sorted(totals, key=lambda op: -totals[op])
    shown = ops[:MAX_OP_TYPES]
    series = []
    for m in models:
        by_op = {e["op"]: e.get("ms") for e in list_of(m.get("op_types"))}
        series.append((str(m.get("name")), [by_op.get(op) for op in shown]))
    more = (
        f" The {MAX_OP_TYPES} costliest of {len(ops)} op types are shown."
        if len(ops) > MAX_OP_TYPES
        else ""
    )
    parts.append("<h3>Per op type</h3>")
    parts.append(
        figure_block(
            svg.grouped_hbars(shown, series, unit=" ms", label="time per op type"),
            "Kernel time per run (ms), summed over the nodes of each op type." + more,
        )
    )
    for m in models:
        nodes = [n for n in list_of(m.get("slowest_nodes")) if isinstance(n, dict)][:MAX_ROWS]
        if not nodes:
            continue
        parts.append(f"<h3>Slowest nodes: {esc(m.get('name'))}</h3>")
        chart = svg.hbars(
            [(f"{n.get('node')} ({n.get('op')})", n.get("ms")) for n in nodes],
            unit=" ms",
            label=f"slowest nodes of {m.get('name')}",
            label_chars=44,
        )
        parts.append(
            figure_block(chart, f"The {len(nodes)} slowest of {m.get('nodes')} nodes, ms per run.")
        )
    return section("Where the time goes", "".join(parts), "time")


def notes(result: dict[str, Any]) -> str | None:
    items = [n for n in list_of(result.get("notes")) if isinstance(n, str)]
    if not items:
        return None
    return section(
        "Notes", "<ul>" + "".join(f"<li>{esc(n)}</li>" for n in items) + "</ul>", "notes"
    )


def steps(result: dict[str, Any]) -> str | None:
    """A recipe run (``onnxcomp run --json``): the steps, then each step's own sections."""
    items = [st for st in list_of(result.get("steps")) if isinstance(st, dict) and "pass" in st]
    if not items:
        return None
    parts = [
        table(
            ["step", "pass", "changed", "seconds"],
            [
                [i, st.get("pass"), st.get("modified"), st.get("seconds")]
                for i, st in enumerate(items, 1)
            ],
        )
    ]
    for i, st in enumerate(items, 1):
        report = dict_of(st.get("report"))
        inner = [part for build in STEP_SECTIONS if (part := build(report))]
        if inner:
            parts.append(
                f'<div class="step"><h3>Step {i}: {esc(st.get("pass"))}</h3>{"".join(inner)}</div>'
            )
    validation = dict_of(result.get("validation"))
    if validation.get("passed") is not None:
        saved = "saved" if result.get("saved") else "NOT saved"
        parts.append(
            f"<p>Validation {'passed' if validation['passed'] else 'failed'}: {esc(saved)} {esc(result.get('output') or '')}.</p>"
        )
    return section("Steps", "".join(parts), "steps")


SHOWN_ELSEWHERE = {
    "command",
    "input",
    "output",
    "model",
    "size_bytes",
    "latency_ms",
    "notes",
    "drop",
    "drop_metric",
    "max_drop",
    "size_bytes_before",
    "size_bytes_after",
    "val_metric",
    "val_agreement",
    "why",
}


def other(result: dict[str, Any]) -> str | None:
    """Top-level scalar figures no section shows."""
    rows = [
        (k, v)
        for k, v in result.items()
        if k not in SHOWN_ELSEWHERE and (isinstance(v, (int, float, str, bool)) or v is None)
    ]
    if not rows:
        return None
    return section("Other figures", table(["key", "value"], rows), "other")


MAX_RAW_BYTES = (
    300_000  # the full JSON result, folded, when small; a 1,000-node quantize result is 0.5 MB
)


def raw(result: dict[str, Any]) -> str:
    text = json.dumps(result, indent=1, default=str)
    if len(text) > MAX_RAW_BYTES:
        return section(
            "Full result",
            note(
                f"The JSON result ({len(text):,} bytes) is too long to include; see the file it came from."
            ),
            "raw",
        )
    return section(
        "Full result",
        f"<details><summary>JSON ({len(text):,} bytes)</summary><pre>{esc(text)}</pre></details>",
        "raw",
    )


SECTIONS: tuple[Callable[[dict[str, Any]], str | None], ...] = (
    summary,
    steps,
    candidates,
    trials,
    quantize_layers,
    float_layers,
    prune_layers,
    before_after,
    cuts,
    history,
    metrics,
    timing,
    rewrites,
    prepare,
    notes,
    other,
)
# What a recipe step's report shows (its figures are the run's summary).
STEP_SECTIONS = (
    candidates,
    quantize_layers,
    float_layers,
    prune_layers,
    before_after,
    cuts,
    history,
    metrics,
    rewrites,
    notes,
)
