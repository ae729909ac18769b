"""Static QDQ quantization: apply a `QuantPlan` in one sweep, then correct biases.

`InsertQdqPass` writes what the plan decided: a QuantizeLinear -> DequantizeLinear pair on each
planned activation tensor (one DequantizeLinear per integer reader, so each onnxruntime fusion sees
its own; float readers share one), and each planned weight stored as int8 (symmetric, per channel
where the plan says) behind a DequantizeLinear that feeds the op directly. Biases of Conv and
Gemm are stored int32 with scale = input scale x weight scale (zero point 0) behind their own
DequantizeLinear, as onnxruntime's quantizer does: measured on onnxruntime 1.32, a Gemm whose output
stays float becomes QGemm only with such a bias (with a float bias it stays DequantizeLinear + Gemm).

`correct_biases` (empirical bias correction, Nagel et al., "Data-Free Quantization Through Weight
Equalization and Bias Correction", ICCV 2019, section 4.2, with measured rather than analytic
means): the per-channel mean of each quantized layer's output is measured on calibration data in
the fp32 and in the quantized model, and the difference is added to the layer's bias.

`gptq_codes` (``--gptq``) picks the int8 codes of Conv, Gemm and MatMul weights by GPTQ instead of
round-to-nearest, on the same per-channel grid; a Conv is seen as a linear layer on the im2col
patches of its input (`layerwise.conv_patches`), one Hessian per group.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxcomp import capture, layerwise
from onnxcomp.data import DataSource
from onnxcomp.graph import NameSource as _Names
from onnxcomp.graph import add_initializer, home_graph
from onnxcomp.passes import Result
from onnxcomp.quantize import schemes
from onnxcomp.quantize.plan import OP_TABLE, QuantPlan

logger = logging.getLogger(__name__)


def _initializer(graph: ir.Graph, names: _Names, base: str, array: np.ndarray) -> ir.Value:
    return add_initializer(graph, base, array, names)


def _insert_after(graph: ir.Graph, value: ir.Value, new_nodes: list[ir.Node]) -> None:
    producer = value.producer()
    if producer is not None and producer.graph is graph:
        graph.insert_after(producer, new_nodes)
    else:  # a graph input, an initializer or an outer-scope value: before the first node
        first = next(iter(graph), None)
        if first is None:
            graph.extend(new_nodes)
        else:
            graph.insert_before(first, new_nodes)



class InsertQdqPass(ir.passes.InPlacePass):
    """Write a quantization plan: Q/DQ on planned activations, int8 weights + DequantizeLinear."""

    def __init__(
        self,
        plan: QuantPlan,
        activation_params: Mapping[str, schemes.QuantParams],
        weight_codes: Mapping[int, np.ndarray] | None = None,
        *,
        reduce_range: bool = True,
    ):
        """weight_codes: id(node) -> int8 codes (the weight's layout) chosen by GPTQ, used
        instead of round-to-nearest with the same per-channel scales.
        reduce_range: 7-bit weights [-64, 64], exact on every x86 int8 path (see onnxcomp.cpu)."""
        super().__init__()
        self.plan = plan
        self.params = activation_params
        self.weight_codes = dict(weight_codes or {})
        self.reduce_range = reduce_range

    def call(self, model: ir.Model) -> Result:
        names = _Names(model)
        int_nodes = {id(d.node) for d in self.plan.quantized if d.kernel != "absorbed"}
        self._absorbed = {id(d.node) for d in self.plan.quantized if d.kernel == "absorbed"}
        weights_report = self._weights(names)
        pairs = 0
        group_inits: dict[tuple[str, int], tuple[ir.Value, ir.Value]] = {}
        exact = {
            act.group for act in self.plan.activations.values() if _cast_from_bool(act.value)
        }
        # Pairs an If branch writes on an outer-scope value go first: they take the branch's
        # readers; a pair the outer graph then writes on the same (int8-written) value feeds the
        # branch's QuantizeLinear through its DequantizeLinear.
        ordered = sorted(self.plan.activations.items(), key=lambda kv: kv[1].graph is None)
        for name, act in ordered:
            params = self.params[name]
            if act.group in exact:
                # 0/1 values: scale 1 holds them exactly, whatever range calibration saw.
                params = schemes.QuantParams(1.0, 0, params.dtype)
                if isinstance(self.params, dict):
                    self.params[name] = params
            value = act.value
            # The graph the pair goes in: where the value is computed, or the If branch whose
            # integer kernels read an outer-scope value.
            graph = act.graph if act.graph is not None else home_graph(value)
            if (act.group, id(graph)) not in group_inits:
                group_inits[(act.group, id(graph))] = (
                    _initializer(graph, names, f"{act.group}_scale", params.scale),
                    _initializer(graph, names, f"{act.group}_zero_point", params.zero_point),
                )
            scale, zero_point = group_inits[(act.group, id(graph))]
            uses = list(value.uses())
            q_out = ir.Value(name=names(f"{name}_quantized"))
            cast = _cast_from_bool(value)
            if cast is not None:
                # A mask or one-hot cast from bool: cast it straight to the integer type instead of
                # writing floats and quantizing them (magika's one-hot bytes: 2048 x 257 values a run).
                q = ir.node(
                    "Cast",
                    [cast.inputs[0]],
                    attributes={"to": _onnx_type(params)},
                    outputs=[q_out],
                    name=names(f"{name}_CastQuantized"),
                )
            else:
                q = ir.node(
                    "QuantizeLinear",
                    [value, scale, zero_point],
                    outputs=[q_out],
                    name=names(f"{name}_QuantizeLinear"),
                )
            new_nodes = [q]

            def make_dq(
                suffix,
                name=name,
                value=value,
                q_out=q_out,
                scale=scale,
                zero_point=zero_point,
                new_nodes=new_nodes,
            ) -> ir.Value:
                out = ir.Value(
                    name=names(f"{name}_dequantized{suffix}"), shape=value.shape, type=value.type
                )
                new_nodes.append(
                    ir.node(
                        "DequantizeLinear",
                        [q_out, scale, zero_point],
                        outputs=[out],
                        name=names(f"{name}_DequantizeLinear{suffix}"),
                    )
                )
                return out

            shared: ir.Value | None = None
            # A tensor a float op produces keeps feeding its float readers unchanged; only a tensor
            # an integer kernel writes (int8 only, once fused) is read through a DequantizeLinear.
            producer = value.producer()
            int_written = producer is not None and (
                id(producer) in int_nodes or id(producer) in self._absorbed
            )
            for i, use in enumerate(uses):
                if use.node.graph is not graph:
                    # A reader in another graph: one of this graph's If branches (it reads the
                    # float tensor through the shared DequantizeLinear when only int8 exists),
                    # or, for an outer-scope value, a graph with its own pair or none.
                    if int_written and home_graph(value) is graph:
                        if shared is None:
                            shared = make_dq("")
                        use.node.replace_input_with(use.idx, shared)
                    continue
                if id(use.node) in int_nodes:
                    use.node.replace_input_with(use.idx, make_dq(f"_{i}"))
                elif not int_written:
                    continue
                else:
                    if shared is None:
                        shared = make_dq("")
                    use.node.replace_input_with(use.idx, shared)
            if int_written and any(out is value for out in graph.outputs):
                if shared is None:
                    shared = make_dq("")
                outputs = graph.outputs
                for i, out in enumerate(outputs):
                    if out is value:
                        original = value.name
                        value.name = names(f"{original}_float")
                        value.meta["onnxcomp.original_name"] = original
                        shared.name = original
                        outputs[i] = shared
            _insert_after(graph, value, new_nodes)
            pairs += 1
        return Result(
            model,
            modified=True,
            report={"activation_pairs": pairs, "weights": weights_report},
        )

    def _weights(self, names: _Names) -> list[dict[str, Any]]:
        done: dict[tuple[int, int | None, int], ir.Value] = {}
        report = []
        for wp in self.plan.weights:
            rule = OP_TABLE[wp.node.op_type]
            graph = wp.node.graph  # the op's own graph (the weight may live in an outer one)
            key = (id(wp.value), wp.axis, id(graph))
            if key not in done:
                w = wp.value.const_value.numpy().astype(np.float32)
                params = schemes.weight_params(
                    w,
                    axis=wp.axis,
                    per_channel=wp.axis is not None,
                    reduce_range=self.reduce_range,
                )
                q = self.weight_codes.get(id(wp.node))
                if q is None:
                    q = schemes.quantize(w, params)
                base = wp.value.name or "weight"
                q_init = _initializer(graph, names, f"{base}_quantized", q)
                s_init = _initializer(graph, names, f"{base}_scale", params.scale)
                z_init = _initializer(graph, names, f"{base}_zero_point", params.zero_point)
                out = ir.Value(
                    name=names(f"{base}_dequantized"), shape=wp.value.shape, type=wp.value.type
                )
                attrs = {"axis": wp.axis} if wp.axis is not None else {}
                dq = ir.node(
                    "DequantizeLinear",
                    [q_init, s_init, z_init],
                    attributes=attrs,
                    outputs=[out],
                    name=names(f"{base}_DequantizeLinear"),
                )
                graph.insert_before(wp.node, [dq])
                done[key] = out
                sqnr = schemes.sqnr_db(w, schemes.dequantize(q, params))
                report.append(
                    {
                        "tensor": base,
                        "node": wp.node.name,
                        "op": wp.node.op_type,
                        "axis": wp.axis,
                        "scale_min": float(np.min(params.scale)),
                        "scale_max": float(np.max(params.scale)),
                        "zero_point": int(np.max(np.abs(params.zero_point.astype(np.int32)))),
                        "sqnr_db": sqnr,
                    }
                )
            else:
                # A weight shared by two quantized ops: the DequantizeLinear already written.
                pass
            old = wp.value
            wp.node.replace_input_with(rule.weight_input, done[key])
            self._bias(graph, names, wp, rule)
            if not old.uses() and not old.is_graph_output() and not old.is_graph_input():
                if old.graph is not None:
                    old.graph.initializers.pop(old.name, None)
        return report

    def _bias(self, graph: ir.Graph, names: _Names, wp, rule) -> None:
        """Store the bias int32 (scale = s_input * s_weight) behind a DequantizeLinear."""
        node = wp.node
        if rule.bias_input is None:
            return
        input_params = self.params.get(node.inputs[0].name or "")
        if input_params is None:  # an outer-scope input: its pair is keyed by the branch
            input_params = next(
                (
                    self.params[key]
                    for key, act in self.plan.activations.items()
                    if act.value is node.inputs[0] and act.graph is node.graph
                ),
                None,
            )
        if input_params is None:
            return
        dq = done_weight_dq(node, rule)
        w_scale = dq.inputs[1].const_value.numpy().astype(np.float32)  # () or (C,)
        bias = node.inputs[rule.bias_input] if len(node.inputs) > rule.bias_input else None
        if bias is None:
            # No bias: a zero one, so a Gemm with float output still becomes QGemm.
            w_shape = wp.value.const_value.shape
            channels = (
                w_shape[wp.axis]
                if wp.axis is not None
                else (
                    w_shape[0]
                    if node.op_type == "Conv"
                    else (w_shape[0] if node.attributes.get_int("transB", 0) else w_shape[1])
                )
            )
            if node.op_type == "Gemm" and node.attributes.get_float("beta", 1.0) != 1.0:
                return
            b = np.zeros(int(channels), np.float32)
            bias = ir.Value(
                name=names(f"{node.name}_zero_bias"),
                type=ir.TensorType(ir.DataType.FLOAT),
                shape=ir.Shape([int(channels)]),
            )
            if len(node.inputs) <= rule.bias_input:
                node.resize_inputs(rule.bias_input + 1)
        elif bias.const_value is None:
            return
        else:
            b = bias.const_value.numpy().astype(np.float32)
        if b.ndim != 1 or (w_scale.ndim == 1 and w_scale.shape[0] != b.shape[0]):
            return
        scale = (np.float32(input_params.scale) * w_scale).astype(np.float32)
        q, scale = _bias_int32(b, scale)
        base = f"{node.name or bias.name}_bias"
        q_init = _initializer(graph, names, f"{base}_quantized", q)
        s_init = _initializer(graph, names, f"{base}_scale", scale)
        z_init = _initializer(graph, names, f"{base}_zero_point", np.zeros(scale.shape, np.int32))
        out = ir.Value(name=names(f"{base}_dequantized"), shape=bias.shape, type=bias.type)
        attrs = {"axis": 0} if scale.ndim == 1 else {}
        graph.insert_before(
            node,
            [
                ir.node(
                    "DequantizeLinear",
                    [q_init, s_init, z_init],
                    attributes=attrs,
                    outputs=[out],
                    name=names(f"{base}_DequantizeLinear"),
                )
            ],
        )
        node.replace_input_with(rule.bias_input, out)
        if not bias.uses() and not bias.is_graph_output() and not bias.is_graph_input():
            if bias.graph is not None:
                bias.graph.initializers.pop(bias.name, None)


def _cast_from_bool(value: ir.Value) -> ir.Node | None:
    """The Cast(bool -> float) that produces ``value``, if any: its 0/1 values are exact in int8 and uint8."""
    node = value.producer()
    if node is None or node.op_type != "Cast" or node.domain not in ("", "ai.onnx"):
        return None
    source = node.inputs[0]
    if source is None or source.dtype != ir.DataType.BOOL:
        return None
    if node.attributes.get_int("to", 0) != ir.DataType.FLOAT:
        return None
    return node


def _onnx_type(params: schemes.QuantParams) -> ir.DataType:
    return ir.DataType.from_numpy(np.dtype(params.zero_point.dtype))


def done_weight_dq(node: ir.Node, rule) -> ir.Node:
    return node.inputs[rule.weight_input].producer()


def _bias_int32(b: np.ndarray, scale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """int32 codes of a bias at ``scale``; a scale too small for int32 is widened (per channel)."""
    scale = np.broadcast_to(scale, b.shape).astype(np.float32) if scale.ndim else scale
    limit = float(np.iinfo(np.int32).max) - 1
    need = np.abs(b.astype(np.float64)) / limit
    scale = np.maximum(scale, need.astype(np.float32) if scale.ndim else np.float32(need.max()))
    scale = np.where(scale > 0, scale, np.float32(1.0)).astype(np.float32)
    q = np.clip(np.rint(b.astype(np.float64) / scale), -limit, limit).astype(np.int32)
    return q, scale


def gptq_codes(
    reference: ir.Model,
    plan: QuantPlan,
    data: DataSource,
    *,
    batch_size: int = 32,
    limit: int | None = 256,
    seed: int = 0,
    reduce_range: bool = True,
) -> tuple[dict[int, np.ndarray], list[dict[str, Any]]]:
    """int8 codes for the Conv/Gemm/MatMul weights of ``plan`` by GPTQ (Frantar et al. 2022,
    "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained Transformers", Alg. 1),
    on the same per-channel grid as round-to-nearest.

    `layerwise.reconstruct` streams the layer inputs from the fp32 ``reference`` into Hessians
    ``2 X^T X / n``: a Gemm/MatMul's rows are its input rows; a Conv's rows are the im2col patches
    of its input (at most `layerwise.MAX_ROWS_PER_BATCH` per batch, drawn with ``seed``), with one
    Hessian per group (a depthwise Conv gets one ``kH*kW`` Hessian per channel). Layers that read
    the same rows share their Hessians.

    Returns (id(node) -> codes in the weight's own layout, one report row per weight: ``node``,
    ``op``, ``groups``, ``in_features`` and the layer-wise reconstruction error per sample of
    round-to-nearest and of GPTQ, or ``skipped`` with the reason that weight keeps
    round-to-nearest).
    """
    from onnxcomp.quantize import gptq

    views: list[layerwise.LinearView] = []
    report: list[dict[str, Any]] = []
    for wp in plan.weights:
        node = wp.node
        view = layerwise.linear_view(node, wp.value.const_value.numpy().astype(np.float32))
        if isinstance(view, str):
            report.append({"node": node.name, "op": node.op_type, "skipped": view})
            logger.info("GPTQ: %s keeps round-to-nearest: %s", node.name, view)
        else:
            views.append(view)
    if not views:
        return {}, report
    axes = {id(wp.node): wp.axis for wp in plan.weights}

    def solve(w: np.ndarray, h: np.ndarray, ctx: layerwise.SolveContext) -> layerwise.Solution:
        # The grid InsertQdqPass uses, from the weight in its own layout.
        axis = axes[id(ctx.view.node)]
        params = schemes.weight_params(
            ctx.view.weight,
            axis=axis,
            per_channel=axis is not None,
            reduce_range=reduce_range,
        )
        if axis is not None:  # per output channel: W's rows are the channels, group by group
            params = schemes.QuantParams(
                params.scale[ctx.channels],
                params.zero_point[ctx.channels],
                params.dtype,
                0,
                params.levels,
            )
        result = gptq.gptq_quantize(w, h, quantizer=params)
        rtn = schemes.dequantize(schemes.quantize(w, params), params)
        return layerwise.Solution(
            result.dequantized,
            codes=result.quantized.astype(np.int8),
            info={"rtn_error": layerwise.reconstruction_error(w, rtn, h)},
        )

    done = layerwise.reconstruct(
        reference, views, data, solve, batch_size=batch_size, limit=limit, seed=seed
    )
    codes: dict[int, np.ndarray] = {}
    for layer in done.layers:
        node = layer.view.node
        if layer.skipped:
            report.append({"node": node.name, "op": node.op_type, "skipped": layer.skipped})
            logger.info("GPTQ: %s keeps round-to-nearest: %s", node.name, layer.skipped)
            continue
        codes[id(node)] = np.ascontiguousarray(layer.codes)
        report.append(
            {
                "node": node.name,
                "op": node.op_type,
                "groups": layer.view.groups,
                "in_features": int(layer.view.rows.shape[2]),
                "rtn_error": sum(s.info["rtn_error"] for s in layer.solutions),
                "gptq_error": layer.error,
            }
        )
    return codes, report


def correct_biases(
    reference: ir.Model,
    quantized: ir.Model,
    plan: QuantPlan,
    data: DataSource,
    input_names: dict[int, str],
    *,
    batch_size: int = 32,
    limit: int | None = 256,
) -> list[dict[str, Any]]:
    """Add ``(W - W_q) E[x]`` to the bias of each quantized Conv/Gemm, in place.

    E[x] is the per-channel mean of the layer's input in the fp32 model on ``data``; for a Conv
    the weight error is summed over the kernel window (zero padding at the borders is ignored).
    Only the layer's own weight error is corrected, so errors are never compensated twice down a
    chain (measuring output means of the quantized model instead does exactly that: on a
    MobileNetV3-like classifier it took cosine to fp32 from 0.993 down to 0.83).

    input_names: id(node) -> name of the node's float input before the rewrite.
    """
    targets = []
    for wp in plan.weights:
        if wp.node.op_type not in ("Conv", "Gemm") or _bias_dq(wp.node) is None:
            continue
        view = layerwise.linear_view(wp.node, wp.value.const_value.numpy().astype(np.float32))
        if not isinstance(view, str):
            targets.append(view)
    if not targets:
        return []
    stats = {}
    for view in targets:
        stats.setdefault(input_names[id(view.node)], capture.ChannelStats(view.input_channel_axis))
    capture.accumulate(reference, stats, data, batch_size=batch_size, limit=limit)
    name_gen = _Names(quantized)
    report = []
    for view in targets:
        node = view.node
        mean_x = stats[input_names[id(node)]].compute().mean  # (C_in,)
        if mean_x.shape[0] != view.input_channels:
            continue  # the input's channels do not match the weight
        w_dq_node = node.inputs[OP_TABLE[node.op_type].weight_input].producer()
        w_q = view.to_rows(_dequantized(w_dq_node))  # (groups, out/groups, in)
        mu = view.per_feature(mean_x)  # (groups, in)
        delta = np.concatenate(
            [layerwise.bias_correction(w, w_q[g], mu[g]) for g, w in enumerate(view.rows)]
        ).astype(np.float64)  # (out,)
        if node.op_type == "Gemm":
            alpha = node.attributes.get_float("alpha", 1.0)
            beta = node.attributes.get_float("beta", 1.0)
            delta = delta * alpha / beta
        bias_dq = _bias_dq(node)
        codes = bias_dq.inputs[0].const_value.numpy().astype(np.float64)
        scale = bias_dq.inputs[1].const_value.numpy().astype(np.float32)
        old = codes * scale
        graph = node.graph
        if old.shape != delta.shape:
            continue
        q, new_scale = _bias_int32((old + delta).astype(np.float32), scale)
        base = f"{node.name}_bias_corrected"
        bias_dq.replace_input_with(0, _initializer(graph, name_gen, f"{base}_quantized", q))
        bias_dq.replace_input_with(1, _initializer(graph, name_gen, f"{base}_scale", new_scale))
        report.append(
            {
                "node": node.name,
                "mean_abs_shift": float(np.mean(np.abs(delta))),
                "relative_shift": float(np.linalg.norm(delta) / (np.linalg.norm(old) + 1e-12)),
            }
        )
    ir.passes.common.RemoveUnusedNodesPass()(quantized)
    return report


def _bias_dq(node: ir.Node) -> ir.Node | None:
    """The DequantizeLinear that feeds ``node``'s int32 bias, or None."""
    if len(node.inputs) < 3 or node.inputs[2] is None:
        return None
    producer = node.inputs[2].producer()
    if producer is None or producer.op_type != "DequantizeLinear":
        return None
    if producer.inputs[0].const_value is None or producer.inputs[1].const_value is None:
        return None
    return producer


def _dequantized(dq: ir.Node) -> np.ndarray:
    """What a DequantizeLinear of constants computes."""
    q = dq.inputs[0].const_value.numpy()
    scale = dq.inputs[1].const_value.numpy()
    zp = (
        dq.inputs[2].const_value.numpy()
        if len(dq.inputs) > 2 and dq.inputs[2] is not None
        else None
    )
    axis = dq.attributes.get_int("axis", 1)
    params = schemes.QuantParams(
        scale,
        zp if zp is not None else np.zeros_like(scale, dtype=q.dtype),
        q.dtype,
        axis if np.ndim(scale) else None,
    )
    return schemes.dequantize(q, params)
