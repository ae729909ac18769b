"""The prune entry point: options, graph clean-up, unstructured or structured pruning, the report.

    from onnxcomp.prune.api import PruneOptions, prune
    model, report = prune(model, PruneOptions(sparsity=0.5), data="calib.npz")

Runs: lift constants -> graph clean-up (the ``optimize`` pass: BatchNorm and bias folding) ->
unstructured (`unstructured.prune_weights`) or structured (`structured.prune_channels`) pruning ->
self-check (both models in onnxruntime, the full onnx checker) -> sizes, zip sizes, MACs and
parameters before and after. Registered as the recipe step ``prune``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
import zlib
from typing import Any, Literal

import numpy as np
import onnx
import onnx_ir as ir

from onnxcomp import model as model_io
from onnxcomp import runtime
from onnxcomp.data import DataSource, open_data, open_given_pair
from onnxcomp.errors import OnnxcompError
from onnxcomp.passes import Context, Result, get_pass, parse_options, register, run_pass
from onnxcomp.prune import numerics as pn
from onnxcomp.prune.budget import fall_back, make_judge

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class PruneOptions:
    """Options of ``onnxcomp prune`` and of the recipe step ``prune`` (keys = flag names)."""

    sparsity: float = 0.5  # unstructured: fraction of zeros; structured: fraction of channels cut
    method: Literal["auto", "magnitude", "threshold", "random", "wanda", "sparsegpt", "admm"] = "auto"
    scope: Literal["layer", "global", "channel"] = "layer"
    pattern: str = "unstructured"  # or N:M such as 2:4
    threshold: float | None = None  # --method threshold: prune |w| <= this
    structured: bool = False
    importance: Literal["l1", "l2", "bn", "activation"] = "l2"  # structured: channel scores
    sparsity_of: Literal["channels", "macs"] = "channels"  # structured: what --sparsity counts
    # structured --sparsity-of macs: how the cut is shared by groups (scores|sensitivity); unstructured:
    # "error" shares the zeros by each weight's measured layer-wise error curve
    allocate: Literal["scores", "sensitivity", "error"] = "scores"
    reconstruct: bool | None = None  # default: on when data is given
    data: str | None = None
    exclude_nodes: list[str] = dataclasses.field(default_factory=list)
    group_ratios: dict[str, float] = dataclasses.field(default_factory=dict)  # structured: group -> its own ratio
    min_size: int = 512  # weights with fewer elements are left alone
    max_drop: float | None = None
    eval_data: str | None = None
    metric: str = "auto"  # auto|accuracy|top1|cosine or module:function (e.g. onnxcomp.evaluate:yolo_boxes)
    optimize: bool = True
    samples: int = 256  # calibration samples for Hessians and activation scores
    batch_size: int = 32
    check_samples: int = 1000
    damp: float = 0.01
    seed: int = 0
    threads: int = 1
    shapes: dict[str, list[int]] = dataclasses.field(default_factory=dict)

    def check(self, where: str = "prune") -> None:
        if not 0 <= self.sparsity < 1:
            raise OnnxcompError(f"{where}: --sparsity {self.sparsity}: expected a fraction in [0, 1)")
        pn.parse_pattern(self.pattern)
        if self.method == "threshold" and self.threshold is None:
            raise OnnxcompError(f"{where}: --method threshold needs --threshold T")
        if self.sparsity_of == "macs" and not self.structured:
            raise OnnxcompError(f"{where}: --sparsity-of macs counts the MACs removed with --structured")
        if self.allocate == "sensitivity" and self.sparsity_of != "macs":
            raise OnnxcompError(f"{where}: --allocate sensitivity shares a MAC budget: add --sparsity-of macs")
        if self.allocate == "error" and (self.structured or self.pattern != "unstructured" or self.scope != "layer"):
            raise OnnxcompError(
                f"{where}: --allocate error shares unstructured zeros per layer: drop --structured, --pattern, --scope"
            )
        if self.structured and self.pattern != "unstructured":
            raise OnnxcompError(f"{where}: --structured removes whole channels; drop --pattern {self.pattern}")
        if self.max_drop is not None and not 0 <= self.max_drop <= 1:
            raise OnnxcompError(f"{where}: --max-drop {self.max_drop}: expected a fraction in [0, 1]")
        from onnxcomp.evaluate import check_metric

        check_metric(self.metric, f"{where}: --metric")
        if self.samples < 1 or self.batch_size < 1:
            raise OnnxcompError(f"{where}: --samples and --batch-size must be at least 1")


# ---------------------------------------------------------------------------------------------


def clean_up(model: ir.Model, options: PruneOptions, data: DataSource | None) -> tuple[ir.Model, dict[str, Any]]:
    """Lift Constant weights and run the graph clean-up (BatchNorm and bias folding, ...)."""
    report: dict[str, Any] = {"normalize": model_io.normalize(model)}
    if options.optimize:
        if data is None:
            data = open_data(None, model_io.input_specs(model), samples=16, shapes=options.shapes)
        spec = get_pass("optimize")
        pass_ = spec.build(
            parse_options(spec.options, {"shapes": dict(options.shapes)}, "optimize"),
            Context(data=data, threads=options.threads),
        )
        model, step = run_pass(pass_, model, "optimize")
        model_io.normalize(model)
        report["optimize"] = {k: step.report.get(k) for k in ("rules", "applied", "skipped") if k in step.report} or {
            "modified": step.modified
        }
    return model, report


def weight_stats(model: ir.Model) -> dict[str, Any]:
    """Parameters, zeros, raw and zlib-compressed weight bytes (what a zipped file would take).

    One tensor in memory at a time (external ones are unmapped after reading); above
    ZIP_MEASURE_BYTES of weights the compressed size is not measured (``None``): zlib runs at
    tens of MB/s, minutes on a model over 2 GB.
    """
    params = zeros = raw = 0
    tensors = []
    for _, value in model_io.iter_tensors(model):
        tensor = value.const_value
        if tensor is None or tensor.dtype.is_string() or tensor.dtype == ir.DataType.INT64:
            continue  # int64: shapes and indices, not weights
        tensors.append(tensor)
        raw += tensor.nbytes
    compressor = zlib.compressobj(6) if raw <= ZIP_MEASURE_BYTES else None
    zipped = 0
    for tensor in tensors:
        array = tensor.numpy()
        params += array.size
        zeros += int(np.count_nonzero(array == 0))
        if compressor is not None:
            zipped += len(compressor.compress(np.ascontiguousarray(array).tobytes()))
        del array
        model_io.release(tensor)
    return {
        "parameters": params,
        "zeros": zeros,
        "sparsity": round(zeros / max(1, params), 4),
        "weight_bytes": raw,
        "zip_bytes": zipped + len(compressor.flush()) if compressor is not None else None,
    }


ZIP_MEASURE_BYTES = 256 << 20


def model_stats(model: ir.Model, shapes: dict[str, list[int]] | None = None) -> dict[str, Any]:
    """MACs, weight statistics and the serialized size of ``model``."""
    from onnxcomp.summary import summarize

    stats = weight_stats(model)
    summary = summarize(model, shapes=shapes or {})
    compute = summary.get("compute") or {}
    stats["macs"] = compute.get("total_macs") if compute.get("total_macs") is not None else compute.get("known_macs")
    stats["file_bytes"] = model_io.serialized_bytes(model)
    return stats


def check_model(model: ir.Model) -> None:
    """The full onnx checker (with shape inference); an internal error if it fails."""
    model_io.without_weights(lambda proto: onnx.checker.check_model(proto, full_check=True), model)


def measure(reference: ir.Model, candidate: ir.Model, data: DataSource, options: PruneOptions) -> dict[str, Any]:
    """Run both models on ``data``: the drop by ``options.metric`` and the comparison."""
    from onnxcomp.evaluate import compare

    comparison = compare(
        reference, candidate, data, batch_size=options.batch_size, limit=options.check_samples,
        threads=options.threads, metric=options.metric,
    )  # fmt: skip
    drop, metric = comparison.drop(options.metric), comparison.drop_metric(options.metric)
    payload = comparison.to_json()
    payload["drop"], payload["drop_metric"] = drop, metric
    return payload


# ---------------------------------------------------------------------------------------------


def resolve_method(options: PruneOptions, has_data: bool) -> tuple[str, bool]:
    """(method, reconstruct) after defaults: with data, ADMM masks and exact reconstruction; else magnitude."""
    reconstruct = options.reconstruct if options.reconstruct is not None else has_data
    method = options.method
    if method == "auto":
        method = "admm" if reconstruct else "magnitude"
    if method in ("sparsegpt", "admm") and not reconstruct:
        raise OnnxcompError(f"--method {method} solves the kept weights: it needs --data and --reconstruct")
    if reconstruct and not has_data:
        raise OnnxcompError("--reconstruct needs --data (samples the layers are solved on)")
    if method == "wanda" and not has_data:
        raise OnnxcompError("--method wanda scores weights by input activations: it needs --data")
    return method, reconstruct


def prune(
    model: ir.Model,
    options: PruneOptions | None = None,
    data: DataSource | str | os.PathLike | None = None,
    eval_data: DataSource | str | os.PathLike | None = None,
) -> tuple[ir.Model, dict[str, Any]]:
    """Prune ``model`` as ``options`` say; returns the new model and a JSON-able report.

    data: calibration samples for Wanda, reconstruction and activation importance.
    eval_data: where ``max_drop`` and the self-check are measured (default: ``data``).
    """
    options = dataclasses.replace(options) if options is not None else PruneOptions()
    options.check()
    data, eval_data = open_given_pair(model_io.input_specs(model), options, data, eval_data)
    unknown = sorted(set(options.exclude_nodes) - {n.name for n in model.graph})
    if unknown:
        raise OnnxcompError(f"--exclude-nodes: no node named {unknown[0]!r} in the model")
    method, reconstruct = resolve_method(options, data is not None)
    with runtime.blas_threads(options.threads):
        return _prune(model, options, method, reconstruct, data, eval_data)


def _prune(model, options, method, reconstruct, data, eval_data):
    started = time.perf_counter()
    model, prep = clean_up(model, options, data or eval_data)
    reference = model_io.copy_model(model)
    before = model_stats(reference, options.shapes)
    judge = eval_data or data
    if options.structured:
        from onnxcomp.prune import structured

        model, report = structured.prune_structured(model, reference, options, data, judge)
    else:
        model, report = _unstructured(model, reference, options, method, reconstruct, data, judge)
    after = model_stats(model, options.shapes)
    check_model(model)
    if judge is None:
        judge = open_data(None, model_io.input_specs(reference), samples=16, shapes=options.shapes)
    if "check" not in report:
        report["check"] = measure(reference, model, judge, options)
        report["check"]["data"] = judge.name
    report = {
        **report,
        "before": before,
        "after": after,
        "prepare": prep,
        "seconds": round(time.perf_counter() - started, 3),
    }
    return model, report


def _unstructured(model, reference, options, method, reconstruct, data, judge):
    from onnxcomp.prune import unstructured as un

    cfg = un.UnstructuredConfig(
        sparsity=options.sparsity,
        method=method,
        scope=options.scope,
        pattern=pn.parse_pattern(options.pattern),
        threshold=options.threshold,
        reconstruct=reconstruct,
        seed=options.seed,
        damp=options.damp,
        batch_size=options.batch_size,
        samples=options.samples,
        allocate=options.allocate == "error",
    )
    targets, skipped = un.plan_weights(model, exclude_nodes=options.exclude_nodes, min_size=options.min_size)
    if not targets:
        raise OnnxcompError("nothing to prune: " + "; ".join(f"{s['node']}: {s['skipped']}" for s in skipped[:3]))
    spared: list[dict[str, Any]] = []
    if options.max_drop is not None:
        model, rows, spared, check = _within_budget(model, reference, targets, cfg, data, judge, options)
    else:
        rows = un.prune_weights(model, targets, cfg, data)
        check = None
    report: dict[str, Any] = {
        "kind": "unstructured",
        "method": method,
        "scope": options.scope,
        "pattern": options.pattern,
        "reconstruct": reconstruct,
        "requested_sparsity": options.sparsity,
        "tensors": rows + skipped + spared,
    }
    if check is not None:
        report["check"] = check
    return model, report


def _within_budget(model, reference, targets, cfg, data, judge_data, options):
    """Prune all targets; when the drop exceeds ``max_drop``, spare the layers that lose most of
    their output (relative error on the calibration data), as few as bisection finds."""
    from onnxcomp import search
    from onnxcomp.prune import unstructured as un

    def build(spared_names: list[str]) -> search.Built:
        candidate = model_io.copy_model(model)
        chosen, _ = un.plan_weights(
            candidate, exclude_nodes=list(options.exclude_nodes) + spared_names, min_size=options.min_size
        )
        rows = un.prune_weights(candidate, chosen, cfg, data)
        return search.Built(candidate, {"tensors": rows}, spared_names)

    first = build([])
    pruned = [r for r in first.report["tensors"] if "skipped" not in r]
    order = sorted(((r["node"], _sensitivity(r)) for r in pruned), key=lambda item: item[1], reverse=True)
    result, check = fall_back(first, order, build, make_judge(reference, judge_data, options), options, "layers")
    spared = [{"node": n, "skipped": f"spared to keep the drop within --max-drop {options.max_drop}"}
              for n in result.left_alone]
    return result.built.model, result.built.report["tensors"], spared, check


def _sensitivity(row: dict[str, Any]) -> float:
    return float(row.get("relative_error", 0.0))


class PrunePass(ir.passes.FunctionalPass):
    """The recipe step ``prune``: `prune` as a pass (returns a new model)."""

    def __init__(self, options: PruneOptions, context: Context | None = None):
        super().__init__()
        self.options = options
        self.context = context or Context()

    def call(self, model: ir.Model) -> Result:
        new, report = prune(model_io.copy_model(model), self.options, data=self.options.data or self.context.data)
        return Result(new, modified=True, report=report)


register("prune", PruneOptions, help="pruning: unstructured with reconstruction, or structured channels")(
    lambda options, context: PrunePass(options, context)
)
