"""Report sections of prune results: sparsity and channels removed per layer, before and after."""

from __future__ import annotations

from typing import Any

from onnxcomp.report import figures, svg
from onnxcomp.report.figures import dict_of, list_of, number
from onnxcomp.report.markup import MAX_ROWS, esc, figure_block, human_bytes, num, section, table


def prune_layers(result: dict[str, Any]) -> str | None:
    """Per-layer sparsity (unstructured ``tensors`` or ``layers``) and channels removed
    (structured ``groups``), each skipped layer with its reason."""
    parts = []
    rows = [
        e
        for e in list_of(result.get("layers")) + list_of(result.get("tensors"))
        if isinstance(e, dict) and ("sparsity" in e or "channels_removed" in e or "skipped" in e)
    ]
    if figures.kind(result) != "prune":
        rows = [e for e in rows if "sparsity" in e or "channels_removed" in e]
    if rows:
        names = [str(e.get("name") or e.get("node") or e.get("tensor")) for e in rows]
        shown = list(zip(names, rows))[:MAX_ROWS]
        more = (
            f" The first {MAX_ROWS} of {len(rows)} layers are shown."
            if len(rows) > MAX_ROWS
            else ""
        )
        if any(number(e.get("sparsity")) is not None for e in rows):
            chart = svg.hbars(
                [(n, e.get("sparsity")) for n, e in shown],
                label="sparsity per layer",
                label_chars=36,
            )
            parts.append(
                figure_block(chart, "Fraction of weights zeroed per layer (n/a: skipped)." + more)
            )
        if any(number(e.get("channels_removed")) is not None for e in rows):
            chart = svg.hbars(
                [(n, e.get("channels_removed")) for n, e in shown],
                label="channels removed per layer",
                label_chars=36,
                colors=[svg.PALETTE[1]] * len(shown),
            )
            parts.append(figure_block(chart, "Output channels removed per layer." + more))
        keys = [
            k
            for k in (
                "op",
                "shape",
                "sparsity",
                "channels_removed",
                "relative_error",
                "reason",
                "skipped",
            )
            if any(k in e for e in rows)
        ]
        parts.append(
            table(
                ["layer", *[k.replace("_", " ") for k in keys]],
                [[n, *[_cell(e.get(k)) for k in keys]] for n, e in zip(names, rows)],
                what="layers",
            )
        )
    groups = [g for g in list_of(result.get("groups")) if isinstance(g, dict)]
    if groups:
        shown = groups[:MAX_ROWS]
        names = [str(g.get("group")) for g in shown]
        chart = svg.grouped_hbars(
            names,
            [
                ("channels", [g.get("channels") for g in shown]),
                ("removed", [g.get("removed") for g in shown]),
            ],
            label="channels removed per dependency group",
            label_chars=32,
        )
        parts.append("<h3>Channels removed per dependency group</h3>")
        parts.append(
            figure_block(chart, "Each group's channels and how many were removed together.")
        )
        parts.append(
            table(
                ["group", "kind", "channels", "removed", "consumers", "skipped because"],
                [
                    [
                        g.get("group"),
                        g.get("kind"),
                        g.get("channels"),
                        g.get("removed"),
                        ", ".join(map(str, list_of(g.get("consumers")))),
                        g.get("skipped") or "",
                    ]
                    for g in groups
                ],
                what="groups",
            )
        )
    consumers = [c for c in list_of(result.get("consumers")) if isinstance(c, dict)]
    if consumers and groups:
        parts.append(
            "<h3>Consumers refitted</h3>"
            + table(
                ["node", "inputs removed", "relative error"],
                [
                    [c.get("node"), c.get("inputs_removed"), c.get("relative_error")]
                    for c in consumers
                ],
                what="consumers",
            )
        )
    if not parts:
        return None
    skipped = [e for e in list_of(result.get("skipped")) if isinstance(e, dict)]
    if skipped:
        parts.append(
            "<h3>Skipped</h3>"
            + table(
                ["layer", "reason"],
                [[e.get("name") or e.get("node"), e.get("reason")] for e in skipped],
                what="layers",
            )
        )
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
    before, after = dict_of(result.get("before")), dict_of(result.get("after"))
    keys = [
        k for k in before if number(before.get(k)) is not None or number(after.get(k)) is not None
    ]
    if not keys:
        return None
    rows = []
    for key in keys:
        b, a = number(before.get(key)), number(after.get(key))
        shown_b = human_bytes(b) if key.endswith("bytes") else b
        shown_a = human_bytes(a) if key.endswith("bytes") else a
        rows.append(
            [key.replace("_", " "), shown_b, shown_a, a / b if a is not None and b else None]
        )
    return section(
        "Before and after", table(["", "before", "after", "after / before"], rows), "before-after"
    )
