"""``--mode auto``: quantize the ways that could pay, measure each in onnxruntime, keep the best.

Candidates are the fp32 model itself, static QDQ (when there are calibration samples), dynamic
quantization (when the model has MatMul/Gemm weights) and the cleaned-up fp32 graph (when the
clean-up rewrote ops). Each is judged on the evaluation data against fp32 (the drop: a user
metric, else accuracy drop with labels, else 1 - top-1 agreement, per position for sequence
scores, else 1 - cosine) and timed interleaved with fp32 at one thread, only as long as their
order is in doubt (`onnxcomp.search`, one set of sessions for all the timing). A static candidate
over the drop budget that is surely the fastest (its whole timing interval under the others')
gets its most sensitive layers (lowest SQNR of weight, input or output against fp32) put back to
float, the number found by bisection. The fastest candidate within budget that
is faster than fp32 wins; when the best two are within noise they are timed again, and if they
stay within noise the more accurate of the two wins; the decision records the margin. When none is faster, the model stays float and the report says why.

This module builds nothing itself: the quantize entry point (`onnxcomp.quantize.api`) hands it
the build functions (:class:`Builders`), so neither imports the other back.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Mapping
from typing import Any

import onnx_ir as ir

from onnxcomp import model as model_io
from onnxcomp import search
from onnxcomp.data import DataSource
from onnxcomp.errors import OnnxcompError
from onnxcomp.evaluate import (  # noqa: F401  (re-exported: the budgets' historical home)
    DEFAULT_COSINE_DROP,
    DEFAULT_MAX_DROP,
    Comparison,
    Verdict,
    default_budget,
)
from onnxcomp.search import Built

logger = logging.getLogger(__name__)

FASTER = 0.97  # a candidate must take at most this fraction of fp32's time to count as faster
MAX_FALLBACK_BUILDS = 12  # bisection over the sensitivity order: about 2 log2(layers) builds
# At most this many layers back to float (as the 1, 2, 4, ... 32 rounds before): past that the
# static model has given back most of what made it faster.
MAX_FALLBACK_LAYERS = 32


class BudgetError(OnnxcompError):
    """The result misses ``--max-drop``; the CLI exits 1 and saves nothing."""


def raise_budget(verdict: Verdict) -> None:
    raise BudgetError(
        f"--max-drop {verdict.budget}: the best static result loses {verdict.drop:.4f} "
        f"({verdict.metric}) even with its most sensitive layers in float; nothing saved"
    )


@dataclasses.dataclass
class Builders:
    """How to build each mode from a prepared fp32 model (consumed in place)."""

    static: Callable[[Any, ir.Model], Built]  # (options, model) -> static QDQ, plan attached
    other: Callable[[Any, ir.Model], Built]  # (options with mode dynamic/weight-only, model)


def drop_of(comparison: Comparison, metric: Any) -> tuple[float, str]:
    """(drop, metric name) of a comparison; kept for callers written before
    ``Comparison.verdict`` (prune's ``measure``)."""
    return comparison.drop(metric), comparison.drop_metric(metric)


def make_judge(reference: ir.Model, data: DataSource, options, budget: float | None):
    return search.Judge.from_options(reference, data, options, budget)


def check_report(verdict: Verdict, comparison: Comparison) -> dict[str, Any]:
    """The ``check`` section of a report: the comparison, and the verdict."""
    return {
        "data": comparison.data,
        "comparison": comparison.to_json(),
        "drop": verdict.drop,
        "drop_metric": verdict.metric,
        "verdict": verdict.to_json(),
    }


def sensitivity(built: Built) -> list[tuple[str, float]]:
    """Quantized weighted nodes, most sensitive first: (node name, lowest SQNR in dB of its weight,
    its input and its output tensors)."""
    plan, report = built.plan, built.finish().report
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


def static_candidate(builders: Builders, options, prepared: ir.Model) -> search.Candidate:
    """Static QDQ of a copy of ``prepared``, falling back by putting its most sensitive layers
    back to float."""

    def build() -> Built:
        return builders.static(options, model_io.copy_model(prepared))

    def fallback(built: Built) -> search.Fallback:
        def rebuild(names: list[str]) -> Built:
            opts = dataclasses.replace(options, exclude_nodes=[*options.exclude_nodes, *names])
            return builders.static(opts, model_io.copy_model(prepared))

        return search.Fallback(sensitivity(built), rebuild)

    return search.Candidate("static", build, fallback)


def within_budget(
    candidate: search.Candidate,
    judge: search.Judge,
    first: tuple[Built, Verdict, Comparison] | None = None,
) -> tuple[Built, Verdict]:
    """Build ``candidate`` (or take ``first``, built and judged) and, while it misses the
    judge's budget, fall back by bisection. The result's report gets ``budget`` (rounds,
    layers put back) and ``check``."""
    if first is None:
        built = candidate.build()
        verdict, comparison = judge(built.model)
    else:
        built, verdict, comparison = first
    result = search.FallbackResult(built, verdict, comparison, [], [])
    if not verdict.passed and candidate.fallback is not None:
        result = search.bisect_fallback(
            candidate.fallback(built),
            judge,
            (built, verdict, comparison),
            max_builds=MAX_FALLBACK_BUILDS,
            max_count=MAX_FALLBACK_LAYERS,
        )
    order = dict(sensitivity(built)) if built.plan is not None else {}
    report = result.built.report
    report["budget"] = {
        "max_drop": result.verdict.budget,
        "drop": result.verdict.drop,
        "drop_metric": result.verdict.metric,
        "within_budget": result.verdict.passed,
        "fallback_to_float": [
            {
                "node": name,
                "sqnr_db": order.get(name),
                "reason": "most sensitive layer (lowest SQNR), put back to float to meet the drop budget",
            }
            for name in result.left_alone
        ],
        "rounds": result.history or [{"float_layers": [], "drop": verdict.drop}],
    }
    report["check"] = check_report(result.verdict, result.comparison)
    return result.built, result.verdict


def rank_candidates(
    timings: Mapping[str, search.Timing],
    verdicts: Mapping[str, Verdict],
    threshold: float = FASTER,
) -> list[str]:
    """Candidates within their drop budget and faster than ``threshold`` (x fp32), fastest
    first, then "float". When the two fastest are within timing noise of each other (their
    intervals overlap), the more accurate one goes first: measured on the ViT-S focus model,
    static 0.80x against dynamic 0.82x in auto's timing was 0.97x against 0.80x when timed
    again, and dynamic's cosine error was 10x lower."""
    eligible = [n for n, v in verdicts.items() if v.passed and timings[n].ratio <= threshold]
    eligible.sort(key=lambda n: timings[n].ratio)
    if len(eligible) > 1:
        a, b = timings[eligible[0]], timings[eligible[1]]
        tied = a.low <= b.high and b.low <= a.high
        if tied and verdicts[eligible[1]].drop < verdicts[eligible[0]].drop:
            eligible[0], eligible[1] = eligible[1], eligible[0]
    return [*eligible, "float"]


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


def _graph_counts(
    model: ir.Model, name: str, graphs: dict[str, dict[str, Any]] | None = None
) -> dict[str, Any]:
    """Integer kernels and islands of ``model`` in onnxruntime; the whole graph report is kept
    in ``graphs`` (the chosen candidate's report shows it: one session, not two)."""
    from onnxcomp import bench

    try:
        graph = bench.graph_report(model, label=name)
    except OnnxcompError as err:
        logger.info("%s: optimized graph not inspected (%s)", name, err)
        graph = {"unavailable": str(err)}
    if graphs is not None:
        graphs[name] = graph
    return {"integer_kernels": graph.get("integer_kernels"), "islands": graph.get("islands")}


def quantize_auto(
    model: ir.Model,
    options,
    data: DataSource | None,
    eval_data: DataSource | None,
    reference: ir.Model,
    original: ir.Model,
    builders: Builders,
    judge_data: DataSource,
    timer: search.Timer | None = None,
) -> Built:
    """Try static and dynamic, measure drop and latency against fp32, keep the best (or float).

    model/reference: the prepared graph (``model`` consumed by the last build, ``reference``
    kept as the fp32 reference); original: the user's model, the baseline for latency and drop
    and what "float" returns; judge_data: where the drop is measured; timer: timing sessions
    to go on with (float = ``original``; the clean-up's check may have timed "optimized").
    """
    budget = options.max_drop
    judge = make_judge(original, judge_data, options, budget)
    # The reference runs now, so its session is closed (outputs kept) before any build, and the
    # timing sessions are closed until the timing: neither sits in memory beside a calibration.
    judge.reference.collect()
    if timer is not None:
        timer.release()
    search.trim_memory()
    timing_data = eval_data or data
    candidates: list[search.Candidate] = []
    skipped: dict[str, str] = {}
    static_opts = dataclasses.replace(options, mode="auto")
    if data is not None:
        candidates.append(static_candidate(builders, static_opts, reference))
    else:
        skipped["static"] = "no calibration data (--data): activation ranges cannot be calibrated"
    if _has_weighted_matmul(model):
        dyn_opts = dataclasses.replace(options, mode="dynamic")
        # the last build: it may consume the prepared model itself, no copy
        candidates.append(search.Candidate("dynamic", lambda: builders.other(dyn_opts, model)))
    else:
        skipped["dynamic"] = (
            "no MatMul/Gemm weights (dynamic quantization of Conv runs as slow ConvInteger)"
        )
    if options.optimize and _op_counts(original) != _op_counts(reference):
        # The cleaned-up fp32 graph (checked by optimize against the input) is a candidate too:
        # where no quantization pays, the clean-up alone may (fused hard-swish: 0.62x on layout).
        candidates.append(
            search.Candidate("optimized", lambda: Built(reference, {"mode": "optimized"}))
        )

    built: dict[str, Built] = {}
    verdicts: dict[str, Verdict] = {}
    comparisons: dict[str, Comparison] = {}
    by_name = {c.name: c for c in candidates}
    for cand in candidates:
        logger.info("auto: building the %s candidate", cand.name)
        try:
            result = cand.build()
        except OnnxcompError as err:
            skipped[cand.name] = str(err)
            continue
        verdict, comparison = judge(result.model)
        result.report["check"] = check_report(verdict, comparison)
        built[cand.name], verdicts[cand.name] = result, verdict
        comparisons[cand.name] = comparison
        logger.info("auto: %s: %s", cand.name, verdict.reason)
        search.trim_memory()
    metric = next(iter(verdicts.values())).metric if verdicts else None
    if budget is None and metric is not None:
        budget = default_budget(metric)

    timings: dict[str, search.Timing] = {}
    over = [n for n, v in verdicts.items() if not v.passed]
    # over the budget: only the static candidate can still be rescued by its fallback
    ignore = [n for n in over if n != "static"]
    if built:
        logger.info("auto: timing %s against float in onnxruntime", ", ".join(built))
        if timer is None:
            timer = search.Timer(
                original,
                {},
                data=timing_data,
                shapes=options.shapes or None,
                threads=options.threads,
            )
        for name in timer.names:
            if name != "float" and name not in built:  # timed before, but no candidate now
                timer.remove(name)
        timings = search.time_candidates(
            original,
            {n: b.model for n, b in built.items()},
            threshold=FASTER,
            ignore=ignore,
            bar_only=[n for n in over if n == "static"],
            timer=timer,
        )
    notes: dict[str, str] = {}
    float_layers: dict[str, int] = {}
    static = verdicts.get("static")
    if static is not None and not static.passed:
        fits = [timings[n].ratio for n, v in verdicts.items() if v.passed]
        target = min([FASTER, *fits])
        ratio, slowest = timings["static"].ratio, timings["static"].high
        if slowest < target:
            # All layers int8 first: putting layers back to float only makes it slower, so the
            # fallback (a build and a check per step) runs only if the all-int8 model is surely
            # faster than every candidate that fits: its whole interval below theirs.
            logger.info(
                "auto: static all-int8 at %.2fx fp32 beats %.2fx but misses the budget: "
                "putting its most sensitive layers back to float",
                ratio,
                target,
            )
            assert timer is not None
            timer.release()  # the fallback builds and judges; the timing goes on after it
            result, verdicts["static"] = within_budget(
                by_name["static"], judge, first=(built["static"], static, comparisons["static"])
            )
            built["static"] = result
            float_layers["static"] = len(result.report["budget"]["fallback_to_float"])
            if verdicts["static"].passed:  # still over budget: no use timing it again
                timings = search.time_candidates(
                    original, {"static": result.model}, threshold=FASTER, ignore=ignore, timer=timer
                )
            else:
                notes["static"] = (
                    f"still over budget with {float_layers['static']} layers in float; "
                    "its latency is the all-int8 model's"
                )
        else:
            notes["static"] = (
                f"layers not put back to float: even all-int8 it takes {ratio:.2f}x fp32 "
                f"(up to {slowest:.2f}x within timing noise), not surely under {target:.2f}x"
            )

    def rank(t: Mapping[str, search.Timing]) -> list[str]:
        return rank_candidates(t, {n: verdicts[n] for n in built})

    decision = search.Decision("float", None, None, False, False)
    if built:
        decision = search.remeasure_if_close(
            original,
            {n: b.model for n, b in built.items()},
            timings,
            rank,
            threshold=FASTER,
            timer=timer,
        )
    if timer is not None:
        timer.release()
    graphs: dict[str, dict[str, Any]] = {}
    table = [
        {
            "mode": "float",
            "latency_ms": timings["float"].latency_ms if "float" in timings else None,
            "ratio_to_float": 1.0,
            **_graph_counts(original, "float"),
            "drop": 0.0,
            "within_budget": True,
        }
    ]
    for name, result in built.items():
        row = {
            "mode": name,
            **timings[name].to_json(),
            **_graph_counts(result.model, name, graphs),
            "drop": verdicts[name].drop,
            "drop_metric": verdicts[name].metric,
            "within_budget": verdicts[name].passed,
        }
        if name in notes:
            row["note"] = notes[name]
        if name in float_layers:
            row["float_layers"] = float_layers[name]
        table.append(row)

    chosen = decision.chosen
    if chosen != "float":
        best = timings[chosen]
        v = verdicts[chosen]
        why = (
            f"{chosen}: {best.ratio:.2f}x fp32 latency, {v.metric} "
            f"{v.drop:.4f} within {budget} on {judge_data.name}"
        )
        result = built[chosen].finish()
        result.report.setdefault("check", {})["graph"] = graphs[chosen]
    else:
        reasons = []
        for name in built:
            if not verdicts[name].passed:
                reasons.append(
                    f"{name} loses {verdicts[name].drop:.4f} {verdicts[name].metric} (> {budget})"
                )
            else:
                reasons.append(f"{name} is not faster ({timings[name].ratio:.2f}x fp32)")
        reasons += [f"{mode} skipped: {why}" for mode, why in skipped.items()]
        why = "kept float (the input model, unchanged): " + "; ".join(reasons)
        result = Built(original, {"mode": "float"})
    if decision.within_noise:
        against = "the runner-up" if decision.runner_up not in (None, "float") else "the bar"
        why += f" (within timing noise of {against}: --recipe-out pins the choice)"
    result.report["auto"] = {
        "chosen": chosen,
        "why": why,
        "max_drop": budget,
        "metric": metric,
        "candidates": table,
        "skipped": skipped,
        "decision": decision.to_json(),
    }
    result.report["mode"] = chosen
    if chosen in ("float", "optimized"):
        result.plan = None
    return result
