"""The key figures of a result, read from the keys a command's ``--json`` holds: sizes, latency
and its ratio, metric and drop, nodes kept float with their reasons. Nothing is measured here;
a figure the result does not hold is None.
"""

from __future__ import annotations

from typing import Any

QUANTIZE_MODES = {"auto", "static", "dynamic", "weight-only", "float", "optimized"}


def kind(result: dict[str, Any]) -> str:
    """Which command made the result: its ``command`` key, else guessed from its keys."""
    if isinstance(result.get("command"), str):
        return result["command"]
    if result.get("kind") in ("structured", "unstructured") or "requested_sparsity" in result:
        return "prune"
    if any(isinstance(step, dict) and "pass" in step for step in list_of(result.get("steps"))):
        return "run"
    if "requested_mode" in result or (
        "mode" in result and ("plan" in result or "tensors" in result)
    ):
        return "quantize"
    if "rules" in result and "ops_before" in result:
        return "optimize"
    if "trials" in result:
        return "tune"
    if "teacher_output" in result or "teacher" in result:
        return "distill"
    if "cuts" in result or "tried" in result or "history" in result:
        return "transfer"
    if any(
        isinstance(layer, dict) and "sparsity" in layer for layer in list_of(result.get("layers"))
    ):
        return "prune"
    return "result"


def list_of(value: Any) -> list[Any]:
    """The value when it is a list, else [] (results are read, never trusted)."""
    return value if isinstance(value, list) else []


def dict_of(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def number(value: Any) -> float | None:
    """The value when it is a number (not a bool), else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return value


def _first(d: dict[str, Any], keys: tuple[str, ...]) -> tuple[str | None, float | None]:
    for key in keys:
        if number(d.get(key)) is not None:
            return key, d[key]
    return None, None


BEFORE_KEYS = ("before", "input", "input_p50", "before_p50", "reference", "teacher")
AFTER_KEYS = (
    "after",
    "output",
    "optimized_p50",
    "output_p50",
    "after_p50",
    "quantized_p50",
    "pruned_p50",
    "candidate",
    "student",
)


def size(result: dict[str, Any]) -> dict[str, Any] | None:
    """``{"before", "after", "source"}`` in bytes from ``size_bytes``."""
    sizes = dict_of(result.get("size_bytes")) or {
        "before": result.get("size_bytes_before"),
        "after": result.get("size_bytes_after"),
    }
    _, before = _first(sizes, BEFORE_KEYS)
    _, after = _first(sizes, AFTER_KEYS)
    if before is None and after is None:
        return None
    return {"before": before, "after": after, "source": "size_bytes"}


def latency(result: dict[str, Any]) -> dict[str, Any] | None:
    """``{"before", "after", "ratio", "source"}`` in ms: ``latency_ms``, else the chosen candidate
    of quantize auto against the float input."""
    lat = dict_of(result.get("latency_ms"))
    if lat:
        _, before = _first(lat, BEFORE_KEYS)
        _, after = _first(lat, AFTER_KEYS)
        ratio = number(lat.get("ratio"))
        if before is not None or ratio is not None:
            return {
                "before": before,
                "after": after,
                "ratio": ratio,
                "source": "latency_ms",
                "threads": lat.get("threads"),
            }
    auto = dict_of(result.get("auto"))
    candidates = [c for c in list_of(auto.get("candidates")) if isinstance(c, dict)]
    chosen = next((c for c in candidates if c.get("mode") == auto.get("chosen")), None)
    base = next((c for c in candidates if c.get("mode") == "float"), None)
    if chosen is not None:
        return {
            "before": number((base or {}).get("latency_ms")),
            "after": number(chosen.get("latency_ms")),
            "ratio": number(chosen.get("ratio_to_float")),
            "source": f"auto.candidates[{auto.get('chosen')}]",
            "threads": None,
        }
    return None


def quality(result: dict[str, Any]) -> dict[str, Any] | None:
    """The metric before and after and the drop: ``{"metric", "before", "after", "drop",
    "max_drop", "within", "source"}``; for optimize the self-check's max relative error."""
    check = dict_of(result.get("check"))
    budget = dict_of(result.get("budget"))
    comparison = dict_of(check.get("comparison"))
    for holder, source in (
        (check, "check"),
        (budget, "budget"),
        (dict_of(result.get("validation")), "validation"),
        (result, "result"),
    ):
        drop = number(holder.get("drop"))
        if drop is None:
            continue
        verdict = dict_of(holder.get("verdict"))
        before = number(verdict.get("reference_value"))
        after = number(verdict.get("value"))
        for scores in (comparison, holder):
            if before is None:
                before = number(scores.get("accuracy_reference"))
                after = number(scores.get("accuracy_candidate"))
        metric_name = holder.get("drop_metric") or verdict.get("metric") or "drop"
        if before is None:
            metrics = dict_of(result.get("metrics"))
            _, before = _first(metrics, BEFORE_KEYS)
            _, after = _first(metrics, AFTER_KEYS)
        max_drop = number(holder.get("max_drop"))
        if max_drop is None:
            max_drop = number(verdict.get("max_drop"))
        if max_drop is None:
            max_drop = number(budget.get("max_drop")) or number(
                dict_of(result.get("auto")).get("max_drop")
            )
        return {
            "metric": metric_name,
            "before": before,
            "after": after,
            "drop": drop,
            "max_drop": max_drop,
            "reason": verdict.get("reason"),
            "source": f"{source}.drop" if source != "result" else "drop",
        }
    if number(check.get("max_rel_error")) is not None:
        return {
            "metric": "max relative error",
            "error": check["max_rel_error"],
            "tolerance": number(check.get("tolerance")),
            "samples": check.get("samples"),
            "data": check.get("data"),
            "source": "check.max_rel_error",
        }
    return None


def float_nodes(result: dict[str, Any]) -> list[dict[str, Any]] | None:
    """The nodes a quantize result kept float, each with its reason (None for other results):
    the static plan's float nodes, the layers put back to float for the drop budget, and the
    dynamic / weight-only skips and float-status layers."""
    result = quantize_report(result)
    if result is None:
        return None
    rows: dict[str, dict[str, Any]] = {}

    def add(entry: dict[str, Any], reason: Any, sqnr: Any = None) -> None:
        name = str(entry.get("node") or entry.get("name") or entry.get("op") or "?")
        row = rows.setdefault(
            name, {"node": name, "op": entry.get("op"), "reason": None, "sqnr_db": None}
        )
        if reason:
            row["reason"] = reason if row["reason"] is None else f"{row['reason']}; {reason}"
        if number(sqnr) is not None:
            row["sqnr_db"] = sqnr

    for entry in list_of(dict_of(result.get("plan")).get("float_nodes")):
        if isinstance(entry, dict):
            add(entry, entry.get("reason"))
    for entry in list_of(dict_of(result.get("budget")).get("fallback_to_float")):
        if isinstance(entry, dict):
            add(entry, entry.get("reason"), entry.get("sqnr_db"))
    for entry in list_of(result.get("skipped")):
        if isinstance(entry, dict):
            add(entry, entry.get("reason"))
    for entry in list_of(result.get("layers")):
        if isinstance(entry, dict) and "float" in str(entry.get("status", "")):
            add(
                entry,
                entry.get("reason") or f"status {entry['status']}",
                entry.get("output_sqnr_db"),
            )
    return list(rows.values())


def quantize_report(result: dict[str, Any]) -> dict[str, Any] | None:
    """The quantize report in a result: the result itself, or a recipe run's last quantize step."""
    if kind(result) == "quantize":
        return result
    if kind(result) == "run":
        for step in reversed(list_of(result.get("steps"))):
            if isinstance(step, dict) and step.get("pass") == "quantize":
                return dict_of(step.get("report"))
    return None


def cpu(result: dict[str, Any]) -> dict[str, Any] | None:
    """``{"isa", "target_cpu", "weight_range"}``: the integer-kernel path the figures were
    measured on (quantize's ``cpu.isa_measured``, else a profile's or latency's ``cpu``), where
    the result says."""
    holders = [result, dict_of(result.get("latency_ms")), dict_of(result.get("profile"))]
    holders += [dict_of(dict_of(step).get("report")) for step in list_of(result.get("steps"))]
    for holder in holders:
        for key in ("cpu", "isa"):
            value = holder.get(key)
            if isinstance(value, str) and value:
                return {"isa": value, "source": key}
            if isinstance(value, dict):
                isa = value.get("isa_measured") or value.get("isa")
                if isinstance(isa, str):
                    return {
                        "isa": isa,
                        "target_cpu": value.get("target_cpu"),
                        "weight_range": value.get("weight_range"),
                        "source": f"{key}.isa_measured",
                    }
    return None
