"""Splicing: write a trained head onto a model at a cut, as standard ONNX nodes.

The result is one deployable file: the backbone up to the cut, the cut's pooling
(GlobalAveragePool / Flatten / ReduceMean / Gather), the head's Gemm (+ Relu) layers, and
``probabilities`` (Softmax) plus ``label`` (ArgMax, int64) outputs for classification, or
``prediction`` for regression. Everything after the cut is removed; inputs are unchanged.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir

from onnxcomp import model as model_io
from onnxcomp.graph import NameSource, add_initializer, drop_unused
from onnxcomp.transfer.cuts import Cut, find_value
from onnxcomp.transfer.heads import Head

logger = logging.getLogger(__name__)

PREFIX = "head"  # node and weight names of the spliced head start with it


def _node(
    graph: ir.Graph, names: NameSource, op: str, inputs, attributes=None, stem=None
) -> ir.Value:
    stem = f"{PREFIX}/{stem or op.lower()}"
    node = ir.node(op, inputs, attributes=attributes or {}, name=names(stem), num_outputs=1)
    node.outputs[0].name = names(stem + "_out")
    graph.append(node)
    return node.outputs[0]


def pooling_nodes(model: ir.Model, value: ir.Value, pooling: str, names: NameSource) -> ir.Value:
    """Append the nodes of ``pooling`` after ``value``; returns the [N, D] value."""
    graph = model.graph
    opset = model_io.opset(model)
    if pooling == "none":
        return value
    if pooling == "flatten":
        return _node(graph, names, "Flatten", [value], {"axis": 1})
    if pooling == "avgpool":
        pooled = _node(graph, names, "GlobalAveragePool", [value], stem="pool")
        return _node(graph, names, "Flatten", [pooled], {"axis": 1})
    if pooling == "mean_tokens":
        if opset >= 18:
            axes = add_initializer(graph, f"{PREFIX}/pool_axes", np.array([1], np.int64), names)
            return _node(graph, names, "ReduceMean", [value, axes], {"keepdims": 0}, stem="pool")
        return _node(graph, names, "ReduceMean", [value], {"axes": [1], "keepdims": 0}, stem="pool")
    if pooling == "first_token":
        index = add_initializer(graph, f"{PREFIX}/first_token", np.array(0, np.int64), names)
        return _node(graph, names, "Gather", [value, index], {"axis": 1}, stem="pool")
    raise ValueError(pooling)


def splice(model: ir.Model, cut: Cut, head: Head) -> ir.Model:
    """Replace everything after ``cut`` with ``head``; in place, returns the model.

    Outputs: ``probabilities`` float32 [N, K] and ``label`` int64 [N] (classify), or
    ``prediction`` float32 [N, outputs] (regress).
    """
    graph = model.graph
    value = find_value(model, cut.tensor)
    names = NameSource(model)
    h = pooling_nodes(model, value, cut.pooling, names)
    if value.dtype != ir.DataType.FLOAT:
        h = _node(graph, names, "Cast", [h], {"to": ir.DataType.FLOAT}, stem="cast")
    for i, (w, b) in enumerate(zip(head.weights, head.biases)):
        wv = add_initializer(graph, f"{PREFIX}/fc{i}.weight", np.asarray(w, np.float32), names)
        bv = add_initializer(graph, f"{PREFIX}/fc{i}.bias", np.asarray(b, np.float32), names)
        h = _node(graph, names, "Gemm", [h, wv, bv], stem=f"fc{i}")
        if i < len(head.weights) - 1:
            h = _node(graph, names, "Relu", [h], stem=f"relu{i}")
    batch = _batch_dim(model)
    graph.outputs.clear()
    if head.task == "classify":
        probabilities = _node(graph, names, "Softmax", [h], {"axis": 1}, stem="softmax")
        label = _node(graph, names, "ArgMax", [h], {"axis": 1, "keepdims": 0}, stem="argmax")
        _output(probabilities, "probabilities", ir.DataType.FLOAT, [batch, head.outputs], names)
        _output(label, "label", ir.DataType.INT64, [batch], names)
        graph.outputs.extend([probabilities, label])
    else:
        _output(h, "prediction", ir.DataType.FLOAT, [batch, head.outputs], names)
        graph.outputs.append(h)
    drop_unused(model)
    return model


def _batch_dim(model: ir.Model):
    for value in model.graph.inputs:
        if value.shape is not None and len(value.shape) > 0:
            dim = value.shape[0]
            return dim if isinstance(dim, int) else (dim.value or "batch")
    return "batch"


def _output(value: ir.Value, name: str, dtype: ir.DataType, dims, names: NameSource) -> None:
    value.name = names(name)
    value.dtype = dtype
    value.shape = ir.Shape(dims)
