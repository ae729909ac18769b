"""Structure transfer: the same architecture with fresh weights and a last layer of K outputs.

``reinit="all"``: every weight drawn afresh (He normal for Conv and for Gemm/MatMul layers,
Glorot normal for the last layer; biases zero; BatchNormalization and LayerNormalization reset
to the identity: scale 1, bias 0, mean 0, variance 1). ``reinit="head"``: only the last layer is
fresh, the rest keeps its trained weights (``transfer fit`` then trains that head on data).
"""

from __future__ import annotations

import logging
from typing import Any, Literal

import numpy as np
import onnx_ir as ir

from onnxcomp import model as model_io
from onnxcomp.errors import OnnxcompError
from onnxcomp.ops import WEIGHTED

logger = logging.getLogger(__name__)

Reinit = Literal["head", "all"]
LAYERS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def _const(node: ir.Node, index: int) -> ir.Value | None:
    if index >= len(node.inputs):
        return None
    value = node.inputs[index]
    return value if value is not None and value.const_value is not None else None


def _layers(model: ir.Model) -> list[ir.Node]:
    return [n for n in model.graph if n.op_type in LAYERS and _const(n, 1) is not None]


def last_layer(model: ir.Model) -> ir.Node:
    layers = _layers(model)
    if not layers:
        raise OnnxcompError("the model has no Conv, Gemm or MatMul with a constant weight")
    return layers[-1]


def _set(value: ir.Value, array: np.ndarray) -> None:
    value.const_value = ir.tensor(array.astype(value.const_value.dtype.numpy()), name=value.name)
    value.shape = ir.Shape(array.shape)


def fresh_structure(
    model: ir.Model, classes: int | None = None, reinit: Reinit = "all", seed: int = 0
) -> tuple[ir.Model, dict[str, Any]]:
    """Re-initialise ``model`` in place and resize its last layer to ``classes`` outputs."""
    model_io.normalize(model, infer_shapes=False)
    rng = np.random.default_rng(seed)
    last = last_layer(model)
    report: dict[str, Any] = {"reinit": reinit, "last_layer": last.name, "reset": []}
    axis = WEIGHTED[last.op_type].out_axis(last) % len(_const(last, 1).const_value.shape)
    weight = _const(last, 1)
    old = int(weight.const_value.shape[axis])
    if classes is not None and classes < 1:
        raise OnnxcompError("--classes must be at least 1")
    k = classes or old
    report["outputs_before"], report["outputs_after"] = old, k
    targets = _layers(model) if reinit == "all" else [last]
    for node in targets:
        w = _const(node, 1)
        shape = list(w.const_value.shape)
        if node is last:
            shape[axis] = k
        spec = WEIGHTED[node.op_type]
        fan_in = spec.im2col_rows(node, tuple(shape))
        fan_out = shape[spec.out_axis(node)]
        std = np.sqrt(2.0 / (fan_in + fan_out)) if node is last else np.sqrt(2.0 / fan_in)
        _set(w, rng.standard_normal(shape) * std)
        bias = _const(node, 2)
        if node.op_type == "MatMul":
            bias = _matmul_bias(node)
        if bias is not None:
            bshape = list(bias.const_value.shape)
            if node is last and bshape and bshape[-1] == old:
                bshape[-1] = k
            _set(bias, np.zeros(bshape))
        report["reset"].append(node.name)
    if reinit == "all":
        for node in model.graph:
            if node.op_type == "BatchNormalization":
                for index, fill in ((1, 1.0), (2, 0.0), (3, 0.0), (4, 1.0)):
                    value = _const(node, index)
                    if value is not None:
                        _set(value, np.full(value.const_value.shape, fill))
                report["reset"].append(node.name)
            elif node.op_type == "LayerNormalization":
                for index, fill in ((1, 1.0), (2, 0.0)):
                    value = _const(node, index)
                    if value is not None:
                        _set(value, np.full(value.const_value.shape, fill))
                report["reset"].append(node.name)
    if k != old:
        _forget_shapes_after(model, last, k)
    report["reset_layers"] = len(report["reset"])
    return model, report


def _matmul_bias(node: ir.Node) -> ir.Value | None:
    """The constant of an Add right after a MatMul (the exporters' bias)."""
    uses = list(node.outputs[0].uses())
    if len(uses) == 1 and uses[0].node.op_type == "Add":
        add = uses[0].node
        for value in add.inputs:
            if value is not None and value.const_value is not None:
                return value
    return None


def _forget_shapes_after(model: ir.Model, last: ir.Node, k: int) -> None:
    """Clear shapes downstream of the resized layer, then infer them again."""
    from onnx_ir.passes.common import ShapeInferencePass

    stack, seen = [last], set()
    while stack:
        node = stack.pop()
        for value in node.outputs:
            if value.is_graph_output():
                if value.shape is not None and len(value.shape) >= 1:
                    dims = list(value.shape)
                    dims[1 if last.op_type in ("Conv", "ConvTranspose") else -1] = k
                    value.shape = ir.Shape(dims)
            else:
                value.shape = None
            for use in value.uses():
                if id(use.node) not in seen:
                    seen.add(id(use.node))
                    stack.append(use.node)
    ShapeInferencePass(strict_mode=False)(model)
