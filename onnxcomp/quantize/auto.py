"""``--mode auto``: quantize the ways that could pay, measure each in onnxruntime, keep the best.

Candidates are the fp32 model itself, static QDQ (when there are calibration samples) and dynamic
quantization (when the model has MatMul/Gemm weights and the dynamic pass is installed). Each is
run on the evaluation data against fp32 (the drop: accuracy drop with labels, else 1 - top-1
agreement, else 1 - cosine) and timed interleaved with fp32 at one thread. A candidate over the
drop budget first gets its most sensitive layers (lowest SQNR of weight, input or output against
fp32) put back to float, a few more each round, until it fits. The fastest candidate within budget
that is faster than fp32 wins; when none is, the model stays float and the report says why.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any

import onnx_ir as ir

from onnxcomp import model as model_io
from onnxcomp.data import DataSource
from onnxcomp.errors import OnnxcompError

logger = logging.getLogger(__name__)

DEFAULT_MAX_DROP = 0.01  # without --max-drop: 1 point of accuracy or of top-1 agreement
DEFAULT_COSINE_DROP = 0.005  # ... or a mean cosine of 0.995 to fp32 (embeddings, features)
FASTER = 0.97  # a candidate must take at most this fraction of fp32's time to count as faster
MAX_FALLBACK_ROUNDS = 6


def _api():
    from onnxcomp.quantize import api

    return api


def measure(
    reference: ir.Model, candidates: dict[str, ir.Model], data: DataSource | None, options
) -> dict[str, dict[str, Any]]:
    """Latency (p50 at ``options.threads``, interleaved with fp32) and kernel counts of each."""
    from onnxcomp import bench

    names = ["float", *candidates]
    models = [reference, *candidates.values()]
    result = bench.benchmark(
        models,
        threads=options.threads,
        runs=100,
        warmup=10,
        data=data,
        shapes=options.shapes or None,
        memory=False,
        graph=True,
        names=names,
    )
    out = {}
    for r in result.models:
        graph = r.graph or {}
        out[r.name] = {
            "latency_ms": r.p50_ms,
            "ratio_to_float": r.ratio_p50,
            "integer_kernels": graph.get("integer_kernels"),
            "islands": graph.get("islands"),
        }
    return out


def resolve_metric(comparison, metric: str) -> str:
    """The drop metric ``auto`` stands for on this data (see ``Comparison.metric``)."""
    return comparison.metric(metric)


def drop_of(comparison, metric: str) -> tuple[float, str]:
    """(drop, metric name) of a Comparison: accuracy drop, 1 - top-1 agreement, or 1 - the
    lowest mean cosine over the outputs."""
    return comparison.drop(metric), comparison.drop_metric(metric)


def default_budget(metric_name: str) -> float:
    """The drop accepted without --max-drop: 0.01 of accuracy or top-1, 0.005 of cosine."""
    return DEFAULT_COSINE_DROP if metric_name == "1 - cosine" else DEFAULT_MAX_DROP


def measure_drop(
    reference: ir.Model, candidate: ir.Model, data: DataSource, options
) -> tuple[float, str, dict]:
    """Run both models on ``data``: (drop, metric name, the comparison as JSON)."""
    from onnxcomp.validate import compare

    comparison = compare(
        reference,
        candidate,
        data,
        batch_size=options.batch_size,
        limit=options.check_samples,
        threads=options.threads,
    )
    drop, metric = drop_of(comparison, options.metric)
    payload = comparison.to_json()
    payload["drop"], payload["drop_metric"] = drop, metric
    return drop, metric, payload


def sensitivity(report: dict[str, Any]) -> list[tuple[str, float]]:
    """Quantized weighted nodes, most sensitive first: (node name, lowest SQNR in dB of its weight,
    its input and its output tensors)."""
    plan = report["_plan"]
    by_tensor = {t["tensor"]: t.get("sqnr_db") for t in report["tensors"]}
    scores = []
    for wp in plan.weights:
        node = wp.node
        values = [wp.value.name, node.inputs[0].name]
        point = node.outputs[0]
        uses = list(point.uses())
        if len(uses) == 1 and uses[0].node.op_type in ("Relu", "Clip"):
            point = uses[0].node.outputs[0]
        values.append(point.name)
        found = [by_tensor[v] for v in values if v in by_tensor and by_tensor[v] is not None]
        if not found:
            # weights are listed by their initializer's name before the rewrite
            found = [t["sqnr_db"] for t in report["tensors"] if t.get("node") == node.name]
        scores.append((node.name, min(found) if found else math.inf))
    scores.sort(key=lambda item: item[1])
    return scores


def static_within_budget(
    model: ir.Model,
    options,
    calib_data: DataSource,
    eval_data: DataSource,
    reference: ir.Model,
    budget: float | None = None,
    max_rounds: int = MAX_FALLBACK_ROUNDS,
) -> tuple[ir.Model, dict[str, Any]]:
    """Static QDQ; while the drop on ``eval_data`` exceeds the budget, put the most sensitive
    layers back to float (1, 2, 4, ... of them, at most ``max_rounds`` times) and quantize again."""
    api = _api()
    budget = options.max_drop if budget is None else budget
    base = model_io.copy_model(model)
    candidate, report = api.quantize_static(
        model, options, calib_data, reference=reference, check=False
    )
    drop, metric, comparison = measure_drop(reference, candidate, eval_data, options)
    if budget is None:
        budget = default_budget(metric)
    history = [{"float_layers": [], "drop": drop}]
    ranking = sensitivity(report)
    count = 1
    fallback: list[str] = []
    rounds = 0
    while budget is not None and drop > budget and rounds < max_rounds and count <= len(ranking):
        rounds += 1
        fallback = [name for name, _ in ranking[:count]]
        opts = dataclasses.replace(options, exclude_nodes=[*options.exclude_nodes, *fallback])
        candidate, report = api.quantize_static(
            model_io.copy_model(base), opts, calib_data, reference=reference, check=False
        )
        drop, metric, comparison = measure_drop(reference, candidate, eval_data, options)
        history.append({"float_layers": fallback, "drop": drop})
        count *= 2
    report["budget"] = {
        "max_drop": budget,
        "drop": drop,
        "drop_metric": metric,
        "within_budget": budget is None or drop <= budget,
        "fallback_to_float": [
            {
                "node": name,
                "sqnr_db": s,
                "reason": "most sensitive layer (lowest SQNR), put back to float to meet the drop budget",
            }
            for name, s in ranking
            if name in fallback
        ],
        "rounds": history,
    }
    report["check"] = {
        "data": eval_data.name,
        "comparison": comparison,
        "drop": drop,
        "drop_metric": metric,
    }
    if budget is not None and drop > budget and options.mode == "static":
        raise_budget(drop, budget, metric)
    return candidate, report


def raise_budget(drop: float, budget: float, metric: str) -> None:
    raise BudgetError(
        f"--max-drop {budget}: the best static result loses {drop:.4f} ({metric}) even with its most "
        "sensitive layers in float; nothing saved"
    )


class BudgetError(OnnxcompError):
    """The result misses ``--max-drop``; the CLI exits 1 and saves nothing."""


def _has_weighted_matmul(model: ir.Model) -> bool:
    for node in model.graph:
        if node.op_type in ("MatMul", "Gemm") and len(node.inputs) > 1:
            w = node.inputs[1]
            if w is not None and w.const_value is not None:
                return True
    return False


def _op_counts(model: ir.Model) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        if node.op_type != "Constant":  # lifted into initializers by the clean-up: no rewrite
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def quantize_auto(
    model: ir.Model,
    options,
    data: DataSource | None,
    eval_data: DataSource | None,
    reference: ir.Model,
    original: ir.Model | None = None,
) -> tuple[ir.Model, dict[str, Any]]:
    """Try static and dynamic, measure drop and latency against fp32, keep the best (or float).

    model/reference: the prepared graph (quantized in place / kept as fp32 reference);
    original: the user's model, the baseline for latency and drop and what "float" returns.
    """
    api = _api()
    original = original if original is not None else reference
    budget = options.max_drop  # None: the default for the metric, once the metric is known
    judge = eval_data or data
    if judge is None:
        judge = api._random_source(reference, options)
    candidates: dict[str, ir.Model] = {}
    reports: dict[str, dict[str, Any]] = {}
    skipped: dict[str, str] = {}
    static_opts = dataclasses.replace(options, mode="auto")
    if data is not None:
        logger.info("auto: building the static candidate")
        try:
            # All layers int8 first: putting layers back to float only makes it slower, so that
            # search runs only if the all-int8 model is faster than every candidate that fits.
            candidates["static"], reports["static"] = static_within_budget(
                model_io.copy_model(model), static_opts, data, judge, original, budget, max_rounds=0
            )
        except OnnxcompError as err:
            skipped["static"] = str(err)
    else:
        skipped["static"] = "no calibration data (--data): activation ranges cannot be calibrated"
    if _has_weighted_matmul(model):
        logger.info("auto: building the dynamic candidate")
        try:
            dyn_opts = dataclasses.replace(options, mode="dynamic")
            candidates["dynamic"], reports["dynamic"] = api.quantize_other(
                model_io.copy_model(model), dyn_opts, data, judge, reference, check=False
            )
        except OnnxcompError as err:
            skipped["dynamic"] = str(err)
    else:
        skipped["dynamic"] = (
            "no MatMul/Gemm weights (dynamic quantization of Conv runs as slow ConvInteger)"
        )

    if (
        options.optimize
        and original is not reference
        and _op_counts(original) != _op_counts(reference)
    ):
        # The cleaned-up fp32 graph (checked by optimize against the input) is a candidate too:
        # where no quantization pays, the clean-up alone may (fused hard-swish: 0.62x on layout).
        candidates["optimized"], reports["optimized"] = reference, {"mode": "optimized"}
    if candidates:
        logger.info("auto: timing %s against float in onnxruntime", ", ".join(candidates))
        timing = measure(original, candidates, eval_data or data, options)
    else:
        timing = {"float": {"latency_ms": None, "ratio_to_float": 1.0}}
    table = [{"mode": "float", **timing["float"], "drop": 0.0, "within_budget": True}]
    metric = None
    for mode, cand in candidates.items():
        rep = reports[mode]
        if "budget" in rep:
            drop = rep["budget"]["drop"]
            metric = rep["budget"]["drop_metric"]
        else:
            drop, metric, comparison = measure_drop(original, cand, judge, options)
            rep["check"] = {
                "data": judge.name,
                "comparison": comparison,
                "drop": drop,
                "drop_metric": metric,
            }
        if budget is None:
            budget = default_budget(metric)
        table.append({"mode": mode, **timing[mode], "drop": drop, "drop_metric": metric})
    for row in table[1:]:
        row["within_budget"] = row["drop"] <= budget
    static_row = next((row for row in table if row["mode"] == "static"), None)
    if static_row is not None and not static_row["within_budget"]:
        fits = [r["ratio_to_float"] for r in table[1:] if r["within_budget"]]
        target = min([FASTER, *fits])
        if static_row["ratio_to_float"] < target:
            cand, rep = static_within_budget(
                model_io.copy_model(model), static_opts, data, judge, original, budget
            )
            candidates["static"], reports["static"] = cand, rep
            static_row.update(
                measure(original, {"static": cand}, eval_data or data, options)["static"]
            )
            static_row["drop"] = rep["budget"]["drop"]
            static_row["within_budget"] = static_row["drop"] <= budget
            static_row["float_layers"] = len(rep["budget"]["fallback_to_float"])
        else:
            static_row["note"] = (
                f"layers not put back to float: even all-int8 it takes "
                f"{static_row['ratio_to_float']:.2f}x fp32, not under {target:.2f}x"
            )
    eligible = [
        row for row in table[1:] if row["within_budget"] and row["ratio_to_float"] <= FASTER
    ]
    if eligible:
        best = min(eligible, key=lambda row: row["ratio_to_float"])
        chosen = best["mode"]
        why = (
            f"{chosen}: {best['ratio_to_float']:.2f}x fp32 latency, {best['drop_metric']} "
            f"{best['drop']:.4f} within {budget} on {judge.name}"
        )
        result_model, report = candidates[chosen], reports[chosen]
        try:
            from onnxcomp import bench

            report.setdefault("check", {})["graph"] = bench.graph_report(result_model, label=chosen)
        except OnnxcompError as err:
            report.setdefault("check", {})["graph"] = {"unavailable": str(err)}
    else:
        chosen = "float"
        reasons = []
        for row in table[1:]:
            if not row["within_budget"]:
                reasons.append(
                    f"{row['mode']} loses {row['drop']:.4f} {row['drop_metric']} (> {budget})"
                )
            else:
                reasons.append(f"{row['mode']} is not faster ({row['ratio_to_float']:.2f}x fp32)")
        reasons += [f"{mode} skipped: {why}" for mode, why in skipped.items()]
        why = "kept float (the input model, unchanged): " + "; ".join(reasons)
        result_model = original
        report = {"mode": "float"}
    report["auto"] = {
        "chosen": chosen,
        "why": why,
        "max_drop": budget,
        "metric": metric,
        "candidates": table,
        "skipped": skipped,
    }
    report["mode"] = chosen
    if chosen in ("float", "optimized"):
        report.pop("_plan", None)
    return result_model, report
