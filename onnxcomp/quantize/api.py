"""The quantize entry point: options, mode dispatch, and the static QDQ pipeline with its report.

    from onnxcomp.quantize.api import QuantizeOptions, quantize
    model, report = quantize(model, QuantizeOptions(mode="static"), data="calib.npz")

Static QDQ runs: graph clean-up (the ``optimize`` pass, when installed) -> opset 13 for per-channel
weights -> plan (`plan.build_plan`) -> streamed calibration (`calibrate`) -> one-sweep rewrite
(`static.InsertQdqPass`) -> bias correction -> self-check (both models run in onnxruntime, fused
kernels counted). ``dynamic`` and ``weight-only`` dispatch to their passes; ``auto`` measures the
candidates (`onnxcomp.quantize.auto`). Registered as the recipe step ``quantize``.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import os
import time
from typing import Any, Literal

import onnx_ir as ir

from onnxcomp import cpu, runtime, search
from onnxcomp import model as model_io
from onnxcomp.data import DataSource, open_data, open_given_pair
from onnxcomp.errors import OnnxcompError
from onnxcomp.evaluate import check_metric, load_metric
from onnxcomp.passes import Context, Result, get_pass, parse_options, register, run_pass
from onnxcomp.quantize import auto
from onnxcomp.quantize import calibrate as calib
from onnxcomp.quantize import plan as qplan
from onnxcomp.quantize.static import InsertQdqPass, correct_biases, gptq_codes
from onnxcomp.search import Built

logger = logging.getLogger(__name__)

Mode = Literal["auto", "static", "dynamic", "weight-only"]
Method = Literal["minmax", "percentile", "entropy", "mse"]


@dataclasses.dataclass
class QuantizeOptions:
    """Options of ``onnxcomp quantize`` and of the recipe step ``quantize`` (keys = flag names)."""

    mode: Mode = "auto"
    # mse: the clip range with the least expected squared error (ACIQ), minmax where nothing is
    # worth clipping. Measured against minmax on real data (AVX2): magika top-1 agreement with fp32
    # 0.992 -> 1.000 on 250 files, YOLOv8n box F1 0.78 -> 0.87 on 37 photos, digits CNN unchanged.
    calibration: Method = "mse"
    per_channel: bool = True
    bits: int | None = None  # default: 8, or 4 with --mode weight-only
    activation_type: Literal["uint8", "int8"] = "uint8"
    # The CPU the model will run on: "any" keeps int8 weights exact on every x86 path (7-bit);
    # "vnni"/"arm64" (or "auto" on such a machine) take full-range weights. See onnxcomp.cpu.
    target_cpu: str = "any"
    exclude_nodes: list[str] = dataclasses.field(default_factory=list)
    exclude_ops: list[str] = dataclasses.field(default_factory=list)
    # Dynamic and weight-only: the op types to quantize (default: MatMul, Gemm). Conv in dynamic
    # mode becomes ConvInteger: on ViT-S's patch embedding 6 versus 10 ms float, a few times
    # slower than float Conv on CNNs.
    op_types: list[str] = dataclasses.field(default_factory=list)
    max_drop: float | None = None
    # what --max-drop measures: auto, accuracy, top1, cosine, or module:function / file.py:function
    metric: str = "auto"
    data: str | None = None  # calibration .npz (or folder); recipes may give it per step instead
    eval_data: str | None = None  # where --max-drop and the self-check are measured
    optimize: bool = True
    # the clean-up's rules (default: all, kept only if fp32 does not get slower); a recipe that
    # replays auto's decision pins them, so nothing is re-timed
    optimize_rules: list[str] | None = None
    # Off by default: measured on the digits CNN it changes nothing, on a MobileNetV3-like
    # classifier it lowers cosine to fp32 (0.993 -> 0.986): the kernel-window mean ignores padding.
    bias_correction: bool | None = None  # default by mode: off for static, on for dynamic
    gptq: bool = False  # static: GPTQ rounding of Conv/Gemm/MatMul weights (same int8 grid)
    calibration_samples: int | None = None  # use at most this many calibration samples
    batch_size: int = 32
    allow_random_calibration: bool = False
    block_size: int = 32  # weight-only: MatMulNBits block size
    symmetric: bool = False  # weight-only: codes around a fixed zero point (no zero-point tensor)
    accuracy_level: int = 4  # weight-only: MatMulNBits compute precision (4 = int8 activations)
    # Dynamic and weight-only: write onnxruntime's com.microsoft kernels (DynamicQuantizeMatMul,
    # MatMulNBits, GatherBlockQuantized) instead of the standard ONNX it fuses into them.
    contrib_ops: bool = False
    check_samples: int = 1000  # samples of the self-check and of the drop
    threads: int = 1
    shapes: dict[str, list[int]] = dataclasses.field(default_factory=dict)  # for random inputs

    def check(self, where: str = "quantize") -> None:
        """Raise OnnxcompError naming the option when values do not fit together."""
        if self.bits is None:
            self.bits = 4 if self.mode == "weight-only" else 8
        cpu.resolve(self.target_cpu)
        if self.bits not in (4, 8):
            raise OnnxcompError(f"{where}: --bits {self.bits}: only 8 and 4 are supported")
        if self.bits == 4 and self.mode != "weight-only":
            raise OnnxcompError(
                f"{where}: --bits 4 works only with --mode weight-only (onnxruntime has no 4-bit "
                f"{self.mode} kernels); got --mode {self.mode}"
            )
        if self.max_drop is not None and not 0 <= self.max_drop <= 1:
            raise OnnxcompError(
                f"{where}: --max-drop {self.max_drop}: expected a fraction in [0, 1]"
            )
        if self.calibration_samples is not None and self.calibration_samples < 1:
            raise OnnxcompError(f"{where}: --calibration-samples must be at least 1")
        if self.batch_size < 1:
            raise OnnxcompError(f"{where}: --batch-size must be at least 1")
        check_metric(self.metric, f"{where}: --metric")
        if self.op_types and self.mode == "static":
            raise OnnxcompError(
                f"{where}: --op-types applies to --mode dynamic, weight-only and auto's dynamic "
                "candidate; static quantizes every op it can run as an integer kernel "
                "(use --exclude-ops to keep some float)"
            )
        bad = [op for op in [*self.exclude_ops, *self.op_types] if not op or not op[0].isupper()]
        if bad:
            raise OnnxcompError(
                f"{where}: --exclude-ops {bad[0]!r}: expected an ONNX op type such as Conv"
            )


# ---------------------------------------------------------------------------------------------


def prepare(
    model: ir.Model,
    options: QuantizeOptions,
    data: DataSource | None = None,
    timer: search.Timer | None = None,
) -> tuple[ir.Model, dict[str, Any]]:
    """Clean the graph before quantizing: lift constants, run ``optimize`` (or fold BatchNorm
    when it is not installed), and upgrade to opset 13 when per-channel weights need it.

    ``timer``: auto's timing sessions (float = the input model); the cleaned graph is timed in
    it as "optimized", so auto goes on from those rounds instead of timing it again."""
    report: dict[str, Any] = {}
    report["normalize"] = model_io.normalize(model)
    if options.optimize and options.optimize_rules is not None:
        if data is None:
            data = random_source(model, options)
        model, report["optimize"] = _optimize(model, options, data, rules=options.optimize_rules)
    elif options.optimize:
        if data is None:  # the clean-up checks itself on random inputs shaped by --shape
            data = random_source(model, options)
        before = model_io.copy_model(model)
        model, report["optimize"] = _optimize(model, options, data)
        step = report["optimize"]
        changed = step["applied"] or step["opset"]["before"] != step["opset"]["after"]
        # An unchanged graph is not timed, nor a large one: interleaved timing holds both
        # models' sessions, twice the weights in memory.
        large = model_io.weight_bytes(model) > model_io.TIMING_LIMIT_BYTES
        if changed and large:
            step.setdefault("notes", []).append(
                "fp32 latency of the clean-up not measured: weights over "
                f"{model_io.TIMING_LIMIT_BYTES / 1e9:g} GB (two sessions would not fit the memory bound)"
            )
        ratio = _slowdown(before, model, data, options, timer) if changed and not large else None
        if ratio is not None and ratio > OPTIMIZE_SLOWDOWN:
            if timer is not None:
                timer.remove("optimized")
            # The clean-up is for quantization; it must not cost fp32 time the int8 kernels
            # then have to win back. Keep the input graph, with BatchNorm folded only.
            model, folded = _optimize(before, options, data, rules=["fold-batchnorm"])
            folded["note"] = (
                f"optimize made fp32 {ratio:.2f}x slower on this machine: not used, "
                "only BatchNormalization folded"
            )
            report["optimize"] = folded
        # what a recipe pins to replay this without timing the clean-up again
        report["optimize_rules"] = (
            ["fold-batchnorm"] if "note" in report["optimize"] else _default_rules()
        )
    if options.mode == "weight-only" and not options.contrib_ops:
        from onnxcomp.quantize.weight_only import STANDARD_OPSET

        before = model_io.opset(model)
        try:
            model = model_io.ensure_opset(model, STANDARD_OPSET, "blocked DequantizeLinear")
            model_io.normalize(model)
            if before < STANDARD_OPSET:
                report["opset"] = {
                    "from": before,
                    "to": STANDARD_OPSET,
                    "reason": "standard blocked DequantizeLinear (block_size) needs opset 21",
                }
        except OnnxcompError as err:
            options.contrib_ops = True
            report["opset"] = {
                "from": before,
                "to": before,
                "reason": f"contrib MatMulNBits written instead of standard ONNX: {err}",
            }
    if options.per_channel and model_io.opset(model) < 13 and options.mode != "weight-only":
        before = model_io.opset(model)
        try:
            model = model_io.ensure_opset(
                model, 13, "per-channel DequantizeLinear (axis attribute)"
            )
            model_io.normalize(model)
            report["opset"] = {
                "from": before,
                "to": 13,
                "reason": "per-channel DequantizeLinear needs opset 13",
            }
        except OnnxcompError as err:
            options.per_channel = False
            report["opset"] = {"from": before, "to": before, "reason": f"per-tensor weights: {err}"}
    return model, report


OPTIMIZE_SLOWDOWN = 1.05
# At most this many rounds to place the clean-up against that bar: still in doubt after them, it
# is within noise of 5 % (the ViT-S focus model's clean-up sat at 1.00-1.05x for 10 rounds, 40 s);
# auto times the cleaned graph again as a candidate, its rounds pooled.
CLEANUP_TIMING_ROUNDS = 6
# The clean-up before quantizing is checked at this relative error, not optimize's own 1e-4:
# int8 then moves the outputs by 1e-3 to 1e-2, and the quantized result is judged end to end.
# On the PP-OCRv4 recogniser three rewrite instances at 1.5e-4 to 2.8e-4 (fp32 noise of its
# float32-only Convs) each set off a fault search, 13 minutes on a loaded 2-core machine.
CLEANUP_TOLERANCE = 1e-3
# ... on at most this many samples: a wrong rewrite shows on any sample, fp32 noise on all of
# them, and every candidate (the cleaned graph too) is then judged on the evaluation data. The
# check runs the input model and the cleaned one (and a float64 evaluation when the error is
# above the tolerance): on the ViT-S focus model 38 samples of each took 56 s of 400.
CLEANUP_CHECK_SAMPLES = 16


def static_opset(model: ir.Model) -> ir.Model:
    """The model at an opset where onnxruntime runs QuantizeLinear/DequantizeLinear.

    Below opset 10 (no QuantizeLinear) it is upgraded to 13 with onnx's version converter; an
    opset this onnxruntime has no QuantizeLinear kernel for is refused before any work.
    """
    current = model_io.opset(model)
    if current < 10:
        return model_io.ensure_opset(model, 13, "QuantizeLinear (opset 10 or newer)")
    problem = runtime.qdq_problem(current)
    if problem is not None:
        raise OnnxcompError(
            f"the model imports opset {current}, and onnxruntime {runtime.ort.__version__} cannot "
            "run QuantizeLinear at that opset, so a static result could not be loaded; re-export "
            "the model at an older opset (13 to 21 work everywhere) or use --mode dynamic"
        )
    return model


def _default_rules() -> list[str]:
    options = get_pass("optimize").options()
    return [rule.name for rule in options.selected_rules()]


def _optimize(
    model: ir.Model, options: QuantizeOptions, data: DataSource, rules: list[str] | None = None
) -> tuple[ir.Model, dict[str, Any]]:
    """Run the ``optimize`` clean-up (all default rules, or only ``rules``), checked on ``data``."""
    spec = get_pass("optimize")
    values: dict[str, Any] = {
        "shapes": dict(options.shapes),
        "tolerance": CLEANUP_TOLERANCE,
        "check_samples": CLEANUP_CHECK_SAMPLES,
    }
    if rules is not None:
        values["rules"] = rules
    pass_ = spec.build(
        parse_options(spec.options, values, "optimize"), Context(data=data, threads=options.threads)
    )
    model, step = run_pass(pass_, model, "optimize")
    model_io.normalize(model)  # types of the values the clean-up wrote
    return model, step.report


def _slowdown(
    before: ir.Model,
    after: ir.Model,
    data: DataSource | None,
    options,
    timer: search.Timer | None = None,
) -> float | None:
    """fp32 latency of ``after`` over ``before`` (interleaved), or None when it cannot be timed.
    With ``timer`` (whose baseline is the input model), ``after`` is timed there as "optimized",
    only until its place against the slowdown bar is settled."""
    from onnxcomp import bench

    if timer is not None:
        try:
            timings = search.time_candidates(
                before,
                {"optimized": after},
                threshold=OPTIMIZE_SLOWDOWN,
                timer=timer,
                max_rounds=CLEANUP_TIMING_ROUNDS,
            )
        except OnnxcompError as err:
            logger.info("optimize not timed: %s", err)
            return None
        return timings["optimized"].ratio

    try:
        result = bench.benchmark(
            [before, after],
            threads=options.threads,
            runs=60,
            warmup=5,
            data=data,
            shapes=options.shapes or None,
            memory=False,
            graph=False,
        )
    except OnnxcompError as err:
        logger.info("optimize not timed: %s", err)
        return None
    return result.models[1].ratio_p50


def random_source(model: ir.Model, options: QuantizeOptions | None = None) -> DataSource:
    """64 random samples shaped by the model's inputs (and ``options.shapes``)."""
    shapes = options.shapes if options is not None else None
    return open_data(None, model_io.input_specs(model), samples=64, shapes=shapes)


# ---------------------------------------------------------------------------------------------


# Activation SQNR (the report's, and the order auto puts layers back to float in) is a ratio of
# sums over every element of a tensor: 16 samples hold enough of them, and each sample costs a
# run with every quantized activation captured (0.3 s a sample on the PP-OCRv4 recogniser).
SQNR_SAMPLES = 16


@dataclasses.dataclass
class CalibrationCache:
    """Ranges and activation SQNR by tensor, kept between the builds of one fp32 graph on one
    data source (a fallback's rebuilds): a tensor's fp32 range does not depend on which layers
    are quantized, so only the tensors not seen before are calibrated."""

    calibration: calib.Calibration | None = None
    sqnr: dict[tuple[str, float, int], float] = dataclasses.field(default_factory=dict)


def quantize_static(
    model: ir.Model,
    options: QuantizeOptions,
    data: DataSource,
    *,
    check_data: DataSource | None = None,
    reference: ir.Model | None = None,
    check: bool = True,
    cache: CalibrationCache | None = None,
    defer_sqnr: bool = False,
) -> Built:
    """Plan, calibrate and rewrite a prepared model (in place); returns it with the report and
    the plan.

    ``reference`` is the prepared fp32 model (copied here when not given) for bias correction and
    the self-check. ``defer_sqnr``: the activations' SQNR (a run of ``reference`` per sample with
    every quantized activation captured) is left to ``Built.finish()``: auto needs it only for
    the candidate it keeps, or to order a fallback.
    """
    started = time.perf_counter()
    reference = reference if reference is not None else model_io.copy_model(model)
    as_gemm = qplan.matmul_bias_as_gemm(model)
    plan = qplan.build_plan(
        model,
        per_channel=options.per_channel,
        exclude_nodes=options.exclude_nodes,
        exclude_ops=options.exclude_ops,
    )
    # Names were checked against the input model; the clean-up may have fused some away.
    gone = sorted(set(options.exclude_nodes) - {n.name for g in model.graphs() for n in g})
    groups = plan.groups()
    if (
        cache is not None
        and cache.calibration
        and set(groups) <= (set(cache.calibration.ranges) | set(cache.calibration.unseen))
    ):
        calibration = cache.calibration
    else:
        calibration = calib.calibrate(
            model,
            plan,
            data,
            method=options.calibration,
            activation_type=options.activation_type,
            batch_size=options.batch_size,
            limit=options.calibration_samples,
        )
        if cache is not None:
            cache.calibration = calibration
    if set(groups) & set(calibration.unseen):  # If branches the data never took stay float
        plan = qplan.build_plan(
            model,
            per_channel=options.per_channel,
            exclude_nodes=options.exclude_nodes,
            exclude_ops=options.exclude_ops,
            skip_graphs=calib.unreached_graphs(plan, calibration),
        )
        groups = plan.groups()
    params = calib.activation_params(plan, calibration, options.activation_type)
    keys = {g: (g, float(params[g].scale), int(params[g].zero_point)) for g in groups}

    def measure_sqnr(fp32: ir.Model) -> dict[str, float]:
        if cache is not None and all(k in cache.sqnr for k in keys.values()):
            return {g: cache.sqnr[k] for g, k in keys.items()}
        sqnr = calib.activation_sqnr(
            fp32, plan, params, data, batch_size=options.batch_size, limit=SQNR_SAMPLES
        )
        if cache is not None:
            cache.sqnr.update({keys[g]: v for g, v in sqnr.items() if g in keys})
        return sqnr

    sqnr = {} if defer_sqnr else measure_sqnr(model)
    input_names = {id(wp.node): wp.node.inputs[0].name for wp in plan.weights}
    reduce_range = cpu.reduce_range(options.target_cpu)
    codes, gptq_report = {}, None
    if options.gptq:
        codes, gptq_report = gptq_codes(
            reference, plan, data, batch_size=options.batch_size, reduce_range=reduce_range
        )
    result = InsertQdqPass(plan, params, codes, reduce_range=reduce_range)(model)
    report: dict[str, Any] = {"mode": "static", "cpu": cpu.describe(options.target_cpu)}
    tensors = []
    for name, act in plan.activations.items():
        p = params[name]
        tensors.append(
            {
                "tensor": name,
                "kind": "activation",
                "type": options.activation_type,
                "scale": float(p.scale),
                "zero_point": int(p.zero_point),
                "range": list(calibration.ranges.get(act.group, (None, None))),
                "shares_scale_of": act.group if act.group != name else None,
                "sqnr_db": sqnr.get(act.group),
                "reason": act.reason,
            }
        )
    for w in result.report["weights"]:
        tensors.append(
            {
                "tensor": w["tensor"],
                "kind": "weight",
                "type": "int8",
                "axis": w["axis"],
                "scale": w["scale_min"] if w["axis"] is None else [w["scale_min"], w["scale_max"]],
                "zero_point": 0,
                "sqnr_db": w["sqnr_db"],
                "node": w["node"],
            }
        )
    report["plan"] = plan.to_json()
    if as_gemm:
        report["plan"]["matmul_bias_as_gemm"] = as_gemm
    if gone:
        report["plan"]["excluded_but_fused_away"] = gone
    report["tensors"] = tensors
    report["calibration"] = {
        "method": calibration.method,
        "samples": calibration.samples,
        "tensors": len(groups),
        "observer_bytes": calibration.observer_bytes,
        "activation_type": options.activation_type,
    }
    if gptq_report is not None:
        report["gptq"] = gptq_report
    if options.bias_correction:
        report["bias_correction"] = correct_biases(
            reference, model, plan, data, input_names, batch_size=options.batch_size
        )
    report["seconds"] = round(time.perf_counter() - started, 3)
    if check:
        report["check"] = self_check(reference, model, check_data or data, options)
    built = Built(model, report, plan)
    if defer_sqnr:

        def fill_sqnr() -> None:
            # the fp32 graph the plan's names come from (``model`` is rewritten by now)
            measured = measure_sqnr(reference)
            for row in tensors:
                if row["kind"] == "activation":
                    row["sqnr_db"] = measured.get(row["shares_scale_of"] or row["tensor"])

        built.rest = fill_sqnr
    return built


def self_check(
    reference: ir.Model, candidate: ir.Model, data: DataSource, options: QuantizeOptions
) -> dict[str, Any]:
    """Run both models on ``data`` (the verdict holds the drop against ``--max-drop``, or its
    default) and count onnxruntime's fused kernels in the candidate."""
    verdict, comparison = auto.make_judge(reference, data, options, options.max_drop)(candidate)
    out = auto.check_report(verdict, comparison)
    out["graph"] = _graph_or_reason(candidate, options)
    return out


# ---------------------------------------------------------------------------------------------
# dynamic and weight-only: their passes, with the quantize options in their names.


def _other_pass(options: QuantizeOptions, data: DataSource | None) -> ir.passes.PassBase:
    """The dynamic or weight-only pass, with the quantize options in their names."""
    if options.mode == "dynamic":
        from onnxcomp.quantize.dynamic import DynamicQuantizeOptions, DynamicQuantizePass

        defaults = DynamicQuantizeOptions()
        their = DynamicQuantizeOptions(
            op_types=[
                op for op in options.op_types or defaults.op_types if op not in options.exclude_ops
            ],
            per_channel=options.per_channel,
            target_cpu=options.target_cpu,
            keep_float=list(options.exclude_nodes),
            bias_correction=(
                defaults.bias_correction
                if options.bias_correction is None
                else options.bias_correction
            ),
            calibration_samples=options.calibration_samples or defaults.calibration_samples,
            form="contrib" if options.contrib_ops else "onnx",
        )
        return DynamicQuantizePass(their, data=data)
    from onnxcomp.quantize.weight_only import WeightOnlyOptions, WeightOnlyQuantizePass

    defaults = WeightOnlyOptions()
    their = WeightOnlyOptions(
        bits=options.bits,
        block_size=options.block_size,
        symmetric=options.symmetric,
        algorithm="gptq" if options.gptq else "rtn",
        accuracy_level=options.accuracy_level,
        op_types=[
            op for op in options.op_types or defaults.op_types if op not in options.exclude_ops
        ],
        keep_float=list(options.exclude_nodes),
        calibration_samples=options.calibration_samples or defaults.calibration_samples,
        form="contrib" if options.contrib_ops else "onnx",
    )
    their.check("quantize")
    return WeightOnlyQuantizePass(their, data=data)


def quantize_other(
    model: ir.Model,
    options: QuantizeOptions,
    data: DataSource | None,
    check_data: DataSource | None = None,
    reference: ir.Model | None = None,
    check: bool = True,
) -> Built:
    """Dynamic or weight-only quantization through their passes (in place)."""
    if check and reference is None:
        reference = model_io.copy_model(model)
    pass_ = _other_pass(options, data)
    started = time.perf_counter()
    mapped = [v.const_value for _, v in model_io.iter_tensors(model)]
    model, step = run_pass(pass_, model, f"quantize ({options.mode})")
    if reference is not None and model_io.has_external_data(reference):
        # A large model's new weights wait on disk, and the float weights the pass read are
        # unmapped: neither costs memory while the self-check's sessions run.
        model_io.spill(model)
        del pass_
        gc.collect()
        for tensor in mapped:
            model_io.release(tensor)
    del mapped
    report = {
        "mode": options.mode,
        **step.report,
        "seconds": round(time.perf_counter() - started, 3),
    }
    source = check_data or data
    if check:
        if source is None:
            source = random_source(reference, options)
        report["check"] = self_check(reference, model, source, options)
    return Built(model, report)


# ---------------------------------------------------------------------------------------------


def quantize(
    model: ir.Model,
    options: QuantizeOptions | None = None,
    data: DataSource | str | os.PathLike | None = None,
    eval_data: DataSource | str | os.PathLike | None = None,
) -> tuple[ir.Model, dict[str, Any]]:
    """Quantize ``model`` as ``options`` say; returns the new model and a JSON-able report.

    data: calibration samples (an .npz path or a DataSource); static needs it, auto uses it.
    eval_data: where ``max_drop`` and the self-check are measured (default: ``data``).
    """
    built = quantize_built(model, options, data, eval_data)
    return built.model, built.report


def quantize_built(
    model: ir.Model,
    options: QuantizeOptions | None = None,
    data: DataSource | str | os.PathLike | None = None,
    eval_data: DataSource | str | os.PathLike | None = None,
) -> Built:
    """:func:`quantize`, keeping the quantization plan (``.plan``, static only) beside the
    model and report."""
    options = dataclasses.replace(options) if options is not None else QuantizeOptions()
    options.check()
    with runtime.blas_threads(options.threads):
        return _quantize_built(model, options, data, eval_data)


def _quantize_built(model, options, data, eval_data) -> Built:
    data, eval_data = open_given_pair(model_io.input_specs(model), options, data, eval_data)
    judge = eval_data if eval_data is not None else data
    if options.metric == "accuracy" and (judge is None or not judge.has_labels):
        where = judge.name if judge is not None else "random inputs"
        raise OnnxcompError(f"--metric accuracy: {where} has no 'labels' array to score against")
    load_metric(options.metric)  # a bad module:function fails here, before any work
    if options.mode == "static" and data is None and not options.allow_random_calibration:
        raise OnnxcompError(
            "--mode static needs --data: activation ranges calibrated on random inputs are "
            "meaningless for real inputs (pass --allow-random-calibration to do it anyway)"
        )
    input_names = {n.name for g in model.graphs() for n in g}
    original_opset = model_io.opset(model)
    if options.mode == "static":
        model = static_opset(model)  # upgrade from < 10; refuse what onnxruntime cannot run
    original = model_io.copy_model(model) if options.mode == "auto" else None
    timer = None
    # one set of timing sessions for the clean-up's check and auto's candidates; not for a large
    # model, whose fp32 session would be held beside every check's (the memory bound)
    if original is not None and model_io.weight_bytes(original) <= model_io.TIMING_LIMIT_BYTES:
        try:
            timer = search.Timer(
                original,
                {},
                data=eval_data or data,
                shapes=options.shapes or None,
                threads=options.threads,
            )
        except OnnxcompError as err:
            logger.info("auto: the input model cannot be timed here: %s", err)
    model, prep = prepare(model, options, data or eval_data, timer)
    # Names may be the input's, or the cleaned graph's (a recipe replaying auto's fallback).
    unknown = sorted(
        set(options.exclude_nodes) - input_names - {n.name for g in model.graphs() for n in g}
    )
    if unknown:
        raise OnnxcompError(f"--exclude-nodes: no node named {unknown[0]!r} in the model")
    reference = model_io.copy_model(model)
    if timer is not None and timer.models.get("optimized") is model:
        timer.models["optimized"] = reference  # a copy of the graph timed: its rounds hold
    cache = CalibrationCache()

    def build_static(opts: QuantizeOptions, target: ir.Model) -> Built:
        return quantize_static(
            target, opts, calib_data, reference=reference, check=False, cache=cache,
            defer_sqnr=True,
        )  # fmt: skip

    def build_other(opts: QuantizeOptions, target: ir.Model) -> Built:
        return quantize_other(target, opts, data, reference=reference, check=False)

    builders = auto.Builders(static=build_static, other=build_other)
    calib_data = data if data is not None else random_source(model, options)
    if options.mode == "auto":
        built = auto.quantize_auto(
            model, options, data, eval_data, reference, original, builders,
            judge_data=judge if judge is not None else random_source(reference, options),
            timer=timer,
        )  # fmt: skip
    elif options.mode == "static" and options.max_drop is not None:
        judge_ = auto.make_judge(reference, eval_data or calib_data, options, options.max_drop)
        candidate = auto.static_candidate(builders, options, reference)
        built, verdict = auto.within_budget(candidate, judge_, first=None)
        built.finish()
        if not verdict.passed:
            auto.raise_budget(verdict)
        built.report["check"]["graph"] = _graph_or_reason(built.model, options)
    elif options.mode == "static":
        built = quantize_static(
            model, options, calib_data, check_data=eval_data, reference=reference, cache=cache
        )
    else:
        built = quantize_other(model, options, data, eval_data, reference)
    built.report = {
        "requested_mode": options.mode,
        **built.report,
        "prepare": prep,
        "opset_input": original_opset,
    }
    # Latencies and checks in this report were measured on this machine's integer-kernel path.
    built.report.setdefault("cpu", cpu.describe(options.target_cpu))
    return built


def _graph_or_reason(model: ir.Model, options: QuantizeOptions) -> dict[str, Any]:
    from onnxcomp import bench

    try:
        return bench.graph_report(model, threads=options.threads, label="quantized")
    except OnnxcompError as err:
        return {"unavailable": str(err)}


class QuantizePass(ir.passes.FunctionalPass):
    """The recipe step ``quantize``: `quantize` as a pass (returns a new model)."""

    def __init__(self, options: QuantizeOptions, context: Context | None = None):
        super().__init__()
        self.options = options
        self.context = context or Context()

    def call(self, model: ir.Model) -> Result:
        new, report = quantize(
            model_io.copy_model(model), self.options, data=self.options.data or self.context.data
        )
        return Result(new, modified=True, report=report)


register(
    "quantize", QuantizeOptions, help="int8 quantization: auto, static QDQ, dynamic or weight-only"
)(lambda options, context: QuantizePass(options, context))


def _register_modes() -> None:
    """The dynamic and weight-only passes as recipe steps of their own, every option of theirs
    reachable (``quantize`` maps only the options the modes share)."""
    from onnxcomp.quantize.dynamic import DynamicQuantizeOptions, DynamicQuantizePass
    from onnxcomp.quantize.weight_only import WeightOnlyOptions

    register("quantize-dynamic", DynamicQuantizeOptions, help="dynamic int8 (MatMul, Gemm)")(
        lambda options, context: DynamicQuantizePass(options, data=context.data)
    )
    register("quantize-weight-only", WeightOnlyOptions, help="int4/int8 weight-only blocks")(
        lambda options, context: _WeightOnlyStep(options, context)
    )


class _WeightOnlyStep(ir.passes.FunctionalPass):
    """The recipe step ``quantize-weight-only``: upgrades the opset first when the standard form
    needs it (blocked DequantizeLinear, opset 21), as `quantize` does, then runs the pass."""

    def __init__(self, options: Any, context: Context):
        super().__init__()
        self.options = options
        self.context = context

    def call(self, model: ir.Model) -> Result:
        from onnxcomp.quantize.weight_only import STANDARD_OPSET, WeightOnlyQuantizePass

        model = model_io.copy_model(model)
        if self.options.form == "onnx":
            model = model_io.ensure_opset(model, STANDARD_OPSET, "blocked DequantizeLinear")
        return WeightOnlyQuantizePass(self.options, data=self.context.data)(model)


_register_modes()


def parse(values: dict[str, Any], where: str = "quantize") -> QuantizeOptions:
    """QuantizeOptions from a mapping (recipe keys or CLI flags), naming any bad key."""
    return parse_options(QuantizeOptions, values, where)
