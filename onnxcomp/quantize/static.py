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
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxcomp import runtime
from onnxcomp.data import DataSource
from onnxcomp.passes import Result
from onnxcomp.quantize import schemes
from onnxcomp.quantize.plan import OP_TABLE, QuantPlan

logger = logging.getLogger(__name__)


class _Names:
    """Fresh value/node names that collide with nothing in the graph."""

    def __init__(self, graph: ir.Graph):
        self.used = {v.name for v in graph.inputs} | set(graph.initializers)
        for node in graph:
            self.used.add(node.name)
            self.used.update(v.name for v in node.outputs)

    def __call__(self, base: str) -> str:
        name, n = base, 0
        while name in self.used:
            n += 1
            name = f"{base}_{n}"
        self.used.add(name)
        return name


def _initializer(graph: ir.Graph, names: _Names, base: str, array: np.ndarray) -> ir.Value:
    name = names(base)
    value = ir.Value(name=name, const_value=ir.tensor(np.asarray(array), name=name))
    value.shape = ir.Shape(np.asarray(array).shape)
    value.dtype = value.const_value.dtype
    graph.register_initializer(value)
    return value


def _insert_after(graph: ir.Graph, value: ir.Value, new_nodes: list[ir.Node]) -> None:
    producer = value.producer()
    if producer is not None:
        graph.insert_after(producer, new_nodes)
    else:  # a graph input or an initializer: before the first node
        first = next(iter(graph))
        graph.insert_before(first, new_nodes)


class InsertQdqPass(ir.passes.InPlacePass):
    """Write a quantization plan: Q/DQ on planned activations, int8 weights + DequantizeLinear."""

    def __init__(self, plan: QuantPlan, activation_params: Mapping[str, schemes.QuantParams]):
        super().__init__()
        self.plan = plan
        self.params = activation_params

    def call(self, model: ir.Model) -> Result:
        graph = model.graph
        names = _Names(graph)
        int_nodes = {id(d.node) for d in self.plan.quantized if d.kernel != "absorbed"}
        self._absorbed = {id(d.node) for d in self.plan.quantized if d.kernel == "absorbed"}
        weights_report = self._weights(graph, names)
        pairs = 0
        group_inits: dict[str, tuple[ir.Value, ir.Value]] = {}
        for name, act in self.plan.activations.items():
            params = self.params[name]
            value = act.value
            if act.group not in group_inits:
                group_inits[act.group] = (
                    _initializer(graph, names, f"{act.group}_scale", params.scale),
                    _initializer(graph, names, f"{act.group}_zero_point", params.zero_point),
                )
            scale, zero_point = group_inits[act.group]
            uses = list(value.uses())
            q_out = ir.Value(name=names(f"{name}_quantized"))
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
                if id(use.node) in int_nodes:
                    use.node.replace_input_with(use.idx, make_dq(f"_{i}"))
                elif not int_written:
                    continue
                else:
                    if shared is None:
                        shared = make_dq("")
                    use.node.replace_input_with(use.idx, shared)
            if value.is_graph_output() and int_written:
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

    def _weights(self, graph: ir.Graph, names: _Names) -> list[dict[str, Any]]:
        done: dict[tuple[int, int | None], ir.Value] = {}
        report = []
        for wp in self.plan.weights:
            rule = OP_TABLE[wp.node.op_type]
            key = (id(wp.value), wp.axis)
            if key not in done:
                w = wp.value.const_value.numpy().astype(np.float32)
                params = schemes.weight_params(w, axis=wp.axis, per_channel=wp.axis is not None)
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
                graph.initializers.pop(old.name, None)
        return report

    def _bias(self, graph: ir.Graph, names: _Names, wp, rule) -> None:
        """Store the bias int32 (scale = s_input * s_weight) behind a DequantizeLinear."""
        node = wp.node
        if rule.bias_input is None:
            return
        input_params = self.params.get(node.inputs[0].name or "")
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
            graph.initializers.pop(bias.name, None)


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


def correct_biases(
    reference: ir.Model,
    quantized: ir.Model,
    plan: QuantPlan,
    data: DataSource,
    *,
    batch_size: int = 32,
    limit: int | None = 256,
) -> list[dict[str, Any]]:
    """Add the per-channel mean output error of each quantized Conv/Gemm to its bias, in place.

    Layers without a bias get one (Conv, Gemm); MatMul has no bias input and is left as is.
    """
    targets = []
    for wp in plan.weights:
        node = wp.node
        if node.op_type not in ("Conv", "Gemm"):
            continue
        if node.op_type == "Gemm" and (node.attributes.get_float("beta", 1.0) == 0.0):
            continue
        targets.append(node)
    if not targets:
        return []
    names = [n.outputs[0].name for n in targets]
    # A graph output an integer kernel writes was renamed `<name>_float` in the quantized model.
    ref_names = [
        n.outputs[0].meta.get("onnxcomp.original_name", n.outputs[0].name) for n in targets
    ]
    # The quantized model may have renamed a graph output (`<name>_float`): look values up by node.
    sums_ref = _channel_means(reference, ref_names, targets, data, batch_size, limit)
    sums_ref = dict(zip(names, (sums_ref[n] for n in ref_names), strict=True))
    sums_q = _channel_means(quantized, names, targets, data, batch_size, limit)
    graph = quantized.graph
    name_gen = _Names(graph)
    report = []
    for node, name in zip(targets, names):
        delta = (sums_ref[name] - sums_q[name]).astype(np.float32)  # (C,)
        bias_value = node.inputs[2] if len(node.inputs) > 2 else None
        producer = bias_value.producer() if bias_value is not None else None
        if producer is not None and producer.op_type == "DequantizeLinear":
            codes = producer.inputs[0].const_value.numpy().astype(np.float64)
            scale = producer.inputs[1].const_value.numpy().astype(np.float32)
            beta = node.attributes.get_float("beta", 1.0) if node.op_type == "Gemm" else 1.0
            new = codes * scale + delta / beta
            q, new_scale = _bias_int32(new.astype(np.float32), scale)
            producer.replace_input_with(
                0, _initializer(graph, name_gen, f"{node.name}_bias_corrected_quantized", q)
            )
            producer.replace_input_with(
                1, _initializer(graph, name_gen, f"{node.name}_bias_corrected_scale", new_scale)
            )
            report.append(
                {
                    "node": node.name,
                    "mean_abs_shift": float(np.mean(np.abs(delta))),
                    "relative_shift": float(
                        np.linalg.norm(delta) / (np.linalg.norm(codes * scale) + 1e-12)
                    ),
                }
            )
            continue
        if bias_value is None:
            bias = np.zeros_like(delta)
        else:
            bias = bias_value.const_value.numpy().astype(np.float32)
            if bias.shape != delta.shape:
                if bias.size == 1:
                    bias = np.broadcast_to(bias, delta.shape).copy()
                else:
                    continue
        if node.op_type == "Gemm":
            beta = node.attributes.get_float("beta", 1.0)
            new_bias = bias + delta / beta
        else:
            new_bias = bias + delta
        new_value = _initializer(
            graph, name_gen, f"{node.name}_bias_corrected", new_bias.astype(np.float32)
        )
        if len(node.inputs) > 2:
            old = node.inputs[2]
            node.replace_input_with(2, new_value)
            if old is not None and not old.uses() and not old.is_graph_input():
                graph.initializers.pop(old.name, None)
        else:
            node.resize_inputs(3)
            node.replace_input_with(2, new_value)
        report.append(
            {
                "node": node.name,
                "mean_abs_shift": float(np.mean(np.abs(delta))),
                "relative_shift": float(np.linalg.norm(delta) / (np.linalg.norm(bias) + 1e-12)),
            }
        )
    ir.passes.common.RemoveUnusedNodesPass()(quantized)
    return report


def _channel_means(
    model: ir.Model,
    names: list[str],
    nodes: list[ir.Node],
    data: DataSource,
    batch_size: int,
    limit: int | None,
) -> dict[str, np.ndarray]:
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = dict.fromkeys(names, 0)
    axes = {name: (1 if n.op_type == "Conv" else -1) for name, n in zip(names, nodes, strict=True)}
    for _, tensors in runtime.capture(model, names, data, batch_size=batch_size, limit=limit):
        for name, array in tensors.items():
            axis = axes[name] % array.ndim
            other = tuple(i for i in range(array.ndim) if i != axis)
            s = np.sum(array, axis=other, dtype=np.float64)
            sums[name] = sums.get(name, 0.0) + s
            counts[name] += int(math.prod(array.shape[i] for i in other))
    return {name: sums[name] / max(counts[name], 1) for name in names}
