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
import importlib
import logging
import os
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx_ir as ir

from onnxcomp import model as model_io
from onnxcomp.data import DataSource, open_data
from onnxcomp.errors import OnnxcompError
from onnxcomp.passes import Context, Result, get_pass, parse_options, register, run_pass
from onnxcomp.quantize import calibrate as calib
from onnxcomp.quantize import plan as qplan
from onnxcomp.quantize.static import InsertQdqPass, correct_biases, gptq_codes

logger = logging.getLogger(__name__)

Mode = Literal["auto", "static", "dynamic", "weight-only"]
Method = Literal["minmax", "percentile", "entropy", "mse"]


@dataclasses.dataclass
class QuantizeOptions:
    """Options of ``onnxcomp quantize`` and of the recipe step ``quantize`` (keys = flag names)."""

    mode: Mode = "auto"
    calibration: Method = "minmax"
    per_channel: bool = True
    bits: int = 8
    activation_type: Literal["uint8", "int8"] = "uint8"
    exclude_nodes: list[str] = dataclasses.field(default_factory=list)
    exclude_ops: list[str] = dataclasses.field(default_factory=list)
    max_drop: float | None = None
    metric: Literal["auto", "accuracy", "top1", "cosine"] = "auto"  # what --max-drop measures
    data: str | None = None  # calibration .npz (or folder); recipes may give it per step instead
    eval_data: str | None = None  # where --max-drop and the self-check are measured
    optimize: bool = True
    # Off by default: measured on the digits CNN it changes nothing, on a MobileNetV3-like
    # classifier it lowers cosine to fp32 (0.993 -> 0.986): the kernel-window mean ignores padding.
    bias_correction: bool = False
    gptq: bool = False  # static: GPTQ rounding for Gemm/MatMul weights (same int8 grid)
    calibration_samples: int | None = None  # use at most this many calibration samples
    batch_size: int = 32
    allow_random_calibration: bool = False
    block_size: int = 32  # weight-only: MatMulNBits block size
    check_samples: int = 1000  # samples of the self-check and of the drop
    threads: int = 1
    shapes: dict[str, list[int]] = dataclasses.field(default_factory=dict)  # for random inputs

    def check(self, where: str = "quantize") -> None:
        """Raise OnnxcompError naming the option when values do not fit together."""
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
        bad = [op for op in self.exclude_ops if not op or not op[0].isupper()]
        if bad:
            raise OnnxcompError(
                f"{where}: --exclude-ops {bad[0]!r}: expected an ONNX op type such as Conv"
            )


# ---------------------------------------------------------------------------------------------


def _open(
    source: DataSource | str | os.PathLike | None, model: ir.Model, what: str
) -> DataSource | None:
    if source is None or isinstance(source, DataSource):
        if isinstance(source, DataSource):
            source.check(model_io.input_specs(model))
        return source
    try:
        return open_data(Path(source), model_io.input_specs(model))
    except OnnxcompError as err:
        raise OnnxcompError(f"{what}: {err}") from None


def prepare(
    model: ir.Model, options: QuantizeOptions, data: DataSource | None = None
) -> tuple[ir.Model, dict[str, Any]]:
    """Clean the graph before quantizing: lift constants, run ``optimize`` (or fold BatchNorm
    when it is not installed), and upgrade to opset 13 when per-channel weights need it."""
    report: dict[str, Any] = {}
    report["normalize"] = model_io.normalize(model)
    if options.optimize:
        try:
            spec = get_pass("optimize")
        except OnnxcompError:
            spec = None
        if spec is not None:
            if data is None:  # the clean-up checks itself on random inputs shaped by --shape
                data = _random_source(model, options)
            before = model_io.copy_model(model)
            pass_ = spec.build(
                parse_options(spec.options, {}, "optimize"),
                Context(data=data, threads=options.threads),
            )
            model, step = run_pass(pass_, model, "optimize")
            report["optimize"] = step.report
            model_io.normalize(model)  # types of the values the clean-up wrote
            ratio = _slowdown(before, model, data, options)
            if ratio is not None and ratio > OPTIMIZE_SLOWDOWN:
                # The clean-up is for quantization; it must not cost fp32 time the int8 kernels
                # then have to win back. Keep the input graph, with BatchNorm folded only.
                model = before
                report["optimize"] = {
                    "batchnorm_folded": fold_batchnorm(model),
                    "note": f"optimize made fp32 {ratio:.2f}x slower on this machine: not used, "
                    "only BatchNormalization folded",
                }
        else:
            report["optimize"] = {
                "batchnorm_folded": fold_batchnorm(model),
                "note": "optimize pass not installed: only BatchNormalization folded",
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


def _slowdown(before: ir.Model, after: ir.Model, data: DataSource | None, options) -> float | None:
    """fp32 latency of ``after`` over ``before`` (interleaved), or None when it cannot be timed."""
    from onnxcomp import bench

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


def fold_batchnorm(model: ir.Model) -> int:
    """Fold BatchNormalization into the Conv before it (weights and bias initializers), in place."""
    graph = model.graph
    folded = 0
    for bn in list(graph):
        if bn.op_type != "BatchNormalization" or any(o.uses() for o in bn.outputs[1:]):
            continue  # training-mode outputs (running mean/var) in use
        conv = bn.inputs[0].producer() if bn.inputs[0] is not None else None
        if conv is None or conv.op_type != "Conv" or len(bn.inputs[0].uses()) != 1:
            continue
        if bn.inputs[0].is_graph_output():
            continue
        consts = [qplan._const(v) for v in bn.inputs[1:5]]
        w = qplan._const(conv.inputs[1])
        b = (
            qplan._const(conv.inputs[2])
            if len(conv.inputs) > 2 and conv.inputs[2] is not None
            else None
        )
        if (
            w is None
            or any(c is None for c in consts)
            or (len(conv.inputs) > 2 and conv.inputs[2] is not None and b is None)
        ):
            continue
        gamma, beta, mean, var = (c.astype(np.float64) for c in consts)
        eps = bn.attributes.get_float("epsilon", 1e-5)
        k = gamma / np.sqrt(var + eps)  # (M,)
        w_new = (w.astype(np.float64) * k.reshape(-1, *([1] * (w.ndim - 1)))).astype(np.float32)
        b0 = b.astype(np.float64) if b is not None else np.zeros_like(mean)
        b_new = ((b0 - mean) * k + beta).astype(np.float32)
        w_value = ir.Value(
            name=f"{conv.inputs[1].name}_bn",
            const_value=ir.tensor(w_new, name=f"{conv.inputs[1].name}_bn"),
        )
        b_value = ir.Value(
            name=f"{conv.name}_bias_bn", const_value=ir.tensor(b_new, name=f"{conv.name}_bias_bn")
        )
        for v in (w_value, b_value):
            v.dtype = ir.DataType.FLOAT
            v.shape = ir.Shape(v.const_value.shape)
            graph.register_initializer(v)
        conv.replace_input_with(1, w_value)
        if len(conv.inputs) < 3:
            conv.resize_inputs(3)
        conv.replace_input_with(2, b_value)
        out = bn.outputs[0]
        conv_out = conv.outputs[0]
        out.replace_all_uses_with(conv_out, replace_graph_outputs=True)
        name = out.name
        graph.remove(bn, safe=True)
        conv_out.name = name
        folded += 1
    ir.passes.common.RemoveUnusedNodesPass()(model)
    return folded


def _random_source(model: ir.Model, options: QuantizeOptions | None = None) -> DataSource:
    shapes = options.shapes if options is not None else None
    return open_data(None, model_io.input_specs(model), samples=64, shapes=shapes)


# ---------------------------------------------------------------------------------------------


def quantize_static(
    model: ir.Model,
    options: QuantizeOptions,
    data: DataSource,
    *,
    check_data: DataSource | None = None,
    reference: ir.Model | None = None,
    check: bool = True,
) -> tuple[ir.Model, dict[str, Any]]:
    """Plan, calibrate and rewrite a prepared model (in place); returns it with the report.

    ``reference`` is the prepared fp32 model (copied here when not given) for bias correction and
    the self-check.
    """
    started = time.perf_counter()
    reference = reference if reference is not None else model_io.copy_model(model)
    plan = qplan.build_plan(
        model,
        per_channel=options.per_channel,
        exclude_nodes=options.exclude_nodes,
        exclude_ops=options.exclude_ops,
    )
    # Names were checked against the input model; the clean-up may have fused some away.
    gone = sorted(set(options.exclude_nodes) - {n.name for n in model.graph})
    calibration = calib.calibrate(
        model,
        plan,
        data,
        method=options.calibration,
        activation_type=options.activation_type,
        batch_size=options.batch_size,
        limit=options.calibration_samples,
    )
    params = calib.activation_params(plan, calibration, options.activation_type)
    sqnr = calib.activation_sqnr(
        model, plan, params, data, batch_size=options.batch_size, limit=128
    )
    input_names = {id(wp.node): wp.node.inputs[0].name for wp in plan.weights}
    codes, gptq_report = {}, None
    if options.gptq:
        codes, gptq_report = gptq_codes(
            reference, plan, data, input_names, batch_size=options.batch_size
        )
    result = InsertQdqPass(plan, params, codes)(model)
    report: dict[str, Any] = {"mode": "static"}
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
    if gone:
        report["plan"]["excluded_but_fused_away"] = gone
    report["tensors"] = tensors
    report["calibration"] = {
        "method": calibration.method,
        "samples": calibration.samples,
        "tensors": len(calibration.ranges),
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
    report["_plan"] = plan
    if check:
        report["check"] = self_check(reference, model, check_data or data, options)
    return model, report


def self_check(
    reference: ir.Model, candidate: ir.Model, data: DataSource, options: QuantizeOptions
) -> dict[str, Any]:
    """Run both models on ``data`` and count onnxruntime's fused kernels in the candidate."""
    from onnxcomp import bench
    from onnxcomp.validate import compare

    comparison = compare(
        reference,
        candidate,
        data,
        batch_size=options.batch_size,
        limit=options.check_samples,
        threads=options.threads,
    )
    from onnxcomp.quantize.auto import drop_of

    drop, metric = drop_of(comparison, options.metric)
    out: dict[str, Any] = {
        "data": data.name,
        "comparison": comparison.to_json(),
        "drop": drop,
        "drop_metric": metric,
    }
    try:
        out["graph"] = bench.graph_report(candidate, threads=options.threads, label="quantized")
    except OnnxcompError as err:
        out["graph"] = {"unavailable": str(err)}
    return out


# ---------------------------------------------------------------------------------------------
# dynamic and weight-only live in their own modules (another capability); dispatch by name.


def _other_pass(module: str, cls_name: str, options: QuantizeOptions, data: DataSource | None):
    try:
        mod = importlib.import_module(f"onnxcomp.quantize.{module}")
    except ModuleNotFoundError as err:
        if err.name == f"onnxcomp.quantize.{module}":
            raise OnnxcompError(
                f"--mode {options.mode}: not available in this build (no {module} module)"
            ) from None
        raise
    cls = getattr(mod, cls_name)
    opts_cls = _options_class(mod, cls)
    if opts_cls is None or opts_cls is QuantizeOptions:
        their = options
    else:
        fields = {f.name for f in dataclasses.fields(opts_cls)}
        mine = dataclasses.asdict(options)
        values = {k: v for k, v in mine.items() if k in fields and v is not None}
        # Same meaning, the other module's names.
        if "keep_float" in fields and options.exclude_nodes:
            values["keep_float"] = list(options.exclude_nodes)
        if "op_types" in fields and options.exclude_ops:
            default = next(f for f in dataclasses.fields(opts_cls) if f.name == "op_types")
            ops = (
                default.default_factory() if callable(default.default_factory) else default.default
            )
            values["op_types"] = [op for op in ops if op not in options.exclude_ops]
        if "algorithm" in fields and options.gptq:
            values["algorithm"] = "gptq"
        their = opts_cls(**values)
    import inspect

    params = inspect.signature(cls.__init__).parameters
    kwargs = {}
    if "data" in params and data is not None:
        kwargs["data"] = data
    return cls(their, **kwargs)


def _options_class(mod, cls) -> type | None:
    import inspect
    import typing

    try:
        hints = typing.get_type_hints(cls.__init__, vars(mod))
    except Exception:
        hints = {}
    hint = hints.get("options")
    for arg in typing.get_args(hint) or (hint,):
        if isinstance(arg, type) and dataclasses.is_dataclass(arg):
            return arg
    for name, obj in vars(mod).items():
        if name.endswith("Options") and inspect.isclass(obj) and dataclasses.is_dataclass(obj):
            return obj
    return None


def quantize_other(
    model: ir.Model,
    options: QuantizeOptions,
    data: DataSource | None,
    check_data: DataSource | None = None,
    reference: ir.Model | None = None,
    check: bool = True,
) -> tuple[ir.Model, dict[str, Any]]:
    """Dynamic or weight-only quantization through the other developer's passes."""
    module, cls_name = {
        "dynamic": ("dynamic", "DynamicQuantizePass"),
        "weight-only": ("weight_only", "WeightOnlyQuantizePass"),
    }[options.mode]
    reference = reference if reference is not None else model_io.copy_model(model)
    pass_ = _other_pass(module, cls_name, options, data)
    started = time.perf_counter()
    model, step = run_pass(pass_, model, f"quantize ({options.mode})")
    report = {
        "mode": options.mode,
        **step.report,
        "seconds": round(time.perf_counter() - started, 3),
    }
    source = check_data or data
    if check:
        if source is None:
            source = _random_source(reference, options)
        report["check"] = self_check(reference, model, source, options)
    return model, report


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
    options = dataclasses.replace(options) if options is not None else QuantizeOptions()
    options.check()
    data = _open(data if data is not None else options.data, model, "--data")
    eval_data = _open(
        eval_data if eval_data is not None else options.eval_data, model, "--eval-data"
    )
    if options.max_drop is not None and eval_data is None and data is None:
        raise OnnxcompError("--max-drop needs --eval-data (or --data) to measure the drop on")
    judge = eval_data if eval_data is not None else data
    if options.metric == "accuracy" and (judge is None or not judge.has_labels):
        where = judge.name if judge is not None else "random inputs"
        raise OnnxcompError(f"--metric accuracy: {where} has no 'labels' array to score against")
    if options.mode == "static" and data is None and not options.allow_random_calibration:
        raise OnnxcompError(
            "--mode static needs --data: activation ranges calibrated on random inputs are "
            "meaningless for real inputs (pass --allow-random-calibration to do it anyway)"
        )
    unknown = sorted(set(options.exclude_nodes) - {n.name for n in model.graph})
    if unknown:
        raise OnnxcompError(f"--exclude-nodes: no node named {unknown[0]!r} in the model")
    original_opset = model_io.opset(model)
    original = model_io.copy_model(model) if options.mode == "auto" else None
    model, prep = prepare(model, options, data or eval_data)
    reference = model_io.copy_model(model)
    if options.mode == "auto":
        from onnxcomp.quantize import auto

        model, report = auto.quantize_auto(model, options, data, eval_data, reference, original)
    elif options.mode == "static":
        calib_data = data if data is not None else _random_source(model, options)
        if options.max_drop is not None:
            from onnxcomp.quantize import auto

            model, report = auto.static_within_budget(
                model, options, calib_data, eval_data or calib_data, reference
            )
        else:
            model, report = quantize_static(
                model, options, calib_data, check_data=eval_data, reference=reference
            )
    else:
        model, report = quantize_other(model, options, data, eval_data, reference)
    report.pop("_plan", None)
    report = {
        "requested_mode": options.mode,
        **report,
        "prepare": prep,
        "opset_input": original_opset,
    }
    return model, report


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


def parse(values: dict[str, Any], where: str = "quantize") -> QuantizeOptions:
    """QuantizeOptions from a mapping (recipe keys or CLI flags), naming any bad key."""
    return parse_options(QuantizeOptions, values, where)
