"""What ``onnxcomp inspect`` reports about a model: opsets, inputs, op histogram, parameters,
MACs per layer, largest tensors, external data.

``summarize`` never fails on an odd model (LSTM, If/Loop, dynamic shapes, string or sparse
tensors, custom domains): a field it cannot compute holds the reason instead of a number.
MACs come from onnx shape inference run on a serialized copy (the caller's model is left
unchanged); a dynamic first (batch) axis is taken as 1 and the report says so.
"""

from __future__ import annotations

import collections
import logging
import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from onnxcomp import model as model_io
from onnxcomp import ops
from onnxcomp.errors import OnnxcompError

logger = logging.getLogger(__name__)

LARGEST_TENSORS = 10

# How many multiply-accumulates an op does, from the shapes of its inputs and first output.
# Each rule gets (input shapes, output shape, attributes) and returns MACs, or raises
# _Unknown naming the shape it lacks. Adding an op is adding a row.


class _Unknown(Exception):
    """A MAC count that cannot be computed; the message says why."""


Shape = tuple  # dims: int, or str / None when not known


def _known(shape: Shape | None, what: str) -> tuple[int, ...]:
    if shape is None:
        raise _Unknown(f"{what} shape unknown")
    if not all(isinstance(d, int) and d >= 0 for d in shape):
        dims = "x".join(str(d) if d is not None and len(str(d)) <= 16 else "?" for d in shape)
        raise _Unknown(f"{what} shape [{dims}] is dynamic")
    return tuple(shape)


def _conv(w: int) -> Callable[..., int]:
    def rule(ins: Sequence[Shape | None], out: Shape | None, attrs: Mapping[str, Any]) -> int:
        # Y: (N, M, *out_spatial), W: (M, C/group, *kernel)
        weight = _known(ins[w] if len(ins) > w else None, "weight")
        return math.prod(_known(out, "output")) * math.prod(weight[1:])

    return rule


def _conv_transpose(ins, out, attrs) -> int:
    # X: (N, C, *in_spatial), W: (C, M/group, *kernel): every input pixel scatters a kernel.
    x = _known(ins[0], "input")
    weight = _known(ins[1] if len(ins) > 1 else None, "weight")
    return math.prod(x) * math.prod(weight[1:])


def _gemm(ins, out, attrs) -> int:
    a = _known(ins[0], "A")
    if len(a) != 2:
        raise _Unknown(f"A has rank {len(a)}")
    k = a[0] if attrs.get("transA", 0) else a[1]
    return math.prod(_known(out, "output")) * k


def _matmul(a_index: int) -> Callable[..., int]:
    def rule(ins, out, attrs) -> int:
        a = _known(ins[a_index], "A")
        if not a:
            raise _Unknown("A is a scalar")
        return math.prod(_known(out, "output")) * a[-1]

    return rule


def _recurrent(ins, out, attrs) -> int:
    # X: (seq, batch, in) or (batch, seq, in) with layout=1; W: (dirs, gates*hidden, in),
    # R: (dirs, gates*hidden, hidden): every step multiplies the input by W and the state by R.
    x = _known(ins[0], "input")
    weights = _known(ins[1] if len(ins) > 1 else None, "W")
    recurrence = _known(ins[2] if len(ins) > 2 else None, "R")
    return x[0] * x[1] * (math.prod(weights) + math.prod(recurrence))


# Where each weighted op keeps its data and weight comes from ops.WEIGHTED.
MAC_RULES: dict[str, Callable[..., int]] = {
    **{op: _conv(spec.weight) for op, spec in ops.WEIGHTED.items() if spec.layout == "conv"},
    **{op: _matmul(spec.data) for op, spec in ops.WEIGHTED.items() if spec.layout == "matmul"},
    "ConvTranspose": _conv_transpose,
    "Gemm": _gemm,
    "LSTM": _recurrent,
    "GRU": _recurrent,
    "RNN": _recurrent,
}

# Ops that do heavy arithmetic but have no MAC rule yet: the report names them so a total is
# never mistaken for complete.
UNCOUNTED_COMPUTE_OPS = frozenset(
    {"Attention", "MultiHeadAttention", "Einsum", "MatMulNBits", "QGemm", "DynamicQuantizeLSTM"}
)

_CONSTANT_SCALAR_BYTES = {
    "value_float": 4,
    "value_int": 8,
    "value_floats": 4,
    "value_ints": 8,
    "value_string": None,
    "value_strings": None,
}


def summarize(
    model: ir.Model | str | os.PathLike,
    *,
    shapes: Mapping[str, Sequence[int]] | None = None,
) -> dict[str, Any]:
    """Describe a model as a JSON-ready dict.

    Args:
        model: an ``ir.Model`` or a path to an ONNX file.
        shapes: fixed shapes for inputs with dynamic dims (``{"input": [1, 3, 224, 224]}``),
            used for the MAC counts only; without them a dynamic first axis counts as 1.
    """
    report: dict[str, Any] = {}
    notes: list[str] = []
    if isinstance(model, (str, os.PathLike)):
        path = Path(model)
        model, load_notes = _load_for_inspect(path)
        notes.extend(load_notes)
        report["file"] = str(path)
        report["file_bytes"] = path.stat().st_size
    _check_shapes(model, shapes or {})
    report["ir_version"] = model.ir_version
    report["producer"] = (
        " ".join(p for p in (model.producer_name, model.producer_version) if p) or None
    )
    report["opsets"] = {
        (domain or "ai.onnx"): int(v) for domain, v in sorted(model.opset_imports.items())
    }
    report["inputs"] = _guarded(
        lambda: [_describe_value(v) for v in _user_inputs(model)], notes, "inputs"
    )
    report["outputs"] = _guarded(
        lambda: [_describe_value(v) for v in model.graph.outputs], notes, "outputs"
    )
    report["operators"] = _guarded(lambda: _operators(model), notes, "operators")
    report["parameters"] = _guarded(lambda: _parameters(model), notes, "parameters")
    shapes = expand_shapes(model_io.input_specs(model), shapes or {})
    report["compute"] = _guarded(lambda: _compute(model, shapes), notes, "compute")
    report["largest_tensors"] = _guarded(lambda: _largest_tensors(model), notes, "largest tensors")
    report["external_data"] = _guarded(lambda: _external_data(model), notes, "external data")
    report["notes"] = notes
    return report


def expand_shapes(
    specs: Sequence[model_io.InputSpec], shapes: Mapping[str, Sequence[int]]
) -> dict[str, list[int]]:
    """Give inputs that share named dims with a ``--shape`` input the same sizes.

    ``input_ids=1x128`` fixes ``batch`` and ``seq``, hence ``attention_mask: [batch, seq]`` too.
    Inputs with a dim that stays unnamed or unknown are left out.
    """
    sizes: dict[str, int] = {}
    for spec in specs:
        given = shapes.get(spec.name)
        if given is None or spec.shape is None or len(given) != len(spec.shape):
            continue
        for dim, size in zip(spec.shape, given, strict=True):
            if isinstance(dim, str):
                sizes.setdefault(dim, int(size))
    expanded = {name: [int(d) for d in dims] for name, dims in shapes.items()}
    for spec in specs:
        if spec.name in expanded or spec.shape is None or not sizes:
            continue
        dims = [d if isinstance(d, int) and d > 0 else sizes.get(d) for d in spec.shape]
        if any(isinstance(d, str) for d in spec.shape) and all(d is not None for d in dims):
            expanded[spec.name] = dims
    return expanded


def _check_shapes(model: ir.Model, shapes: Mapping[str, Sequence[int]]) -> None:
    """Raise OnnxcompError for a --shape naming no input or contradicting its fixed dims."""
    specs = {spec.name: spec for spec in model_io.input_specs(model)}
    for name, dims in shapes.items():
        spec = specs.get(name)
        if spec is None:
            raise OnnxcompError(
                f"--shape: unknown input name {name!r} (inputs: {', '.join(sorted(specs))})"
            )
        if spec.shape is None:
            continue
        given = "x".join(str(d) for d in dims)
        if len(dims) != len(spec.shape):
            raise OnnxcompError(
                f"--shape {name}={given}: rank {len(dims)}, the model wants {spec.describe()}"
            )
        for have, want in zip(dims, spec.shape, strict=True):
            if isinstance(want, int) and want > 0 and have != want:
                raise OnnxcompError(f"--shape {name}={given} does not fit {spec.describe()}")


def _guarded(compute: Callable[[], Any], notes: list[str], what: str) -> Any:
    """Run one section; an odd model gets the reason in place of the section, not a crash."""
    try:
        return compute()
    except Exception as err:  # the report must survive any model onnx-ir can hold
        logger.debug("inspect: %s failed", what, exc_info=True)
        reason = (
            f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
        )
        notes.append(f"{what}: cannot compute ({reason})")
        return {"unavailable": reason}


# ---------------------------------------------------------------------------------------------
# Loading: onnx-ir cannot hold sparse tensors, so those models are densified for inspection.


# onnx-ir drops sparse initializers without a word; files up to this size are also read as
# protobuf to find them (larger ones are not read twice).
SPARSE_CHECK_BYTES = 256 * 1024 * 1024


def _load_for_inspect(path: Path) -> tuple[ir.Model, list[str]]:
    error: OnnxcompError | None = None
    try:
        model = model_io.load(path)
    except OnnxcompError as err:
        error = err
    if error is None and path.stat().st_size > SPARSE_CHECK_BYTES:
        return model, []
    try:
        proto = onnx.load(path, load_external_data=False)
    except Exception:
        if error is not None:
            raise error from None
        return model, []
    sparse = _densify_sparse(proto)
    if not sparse:
        if error is not None:
            raise error
        return model, []
    model = ir.from_proto(proto)
    ir.external_data.set_base_dir(model.graph, path.parent)
    return model, [
        f"{sparse} sparse tensor(s) shown densified (onnx-ir cannot hold sparse tensors); "
        "their bytes are the dense size"
    ]


def _densify_sparse(proto: onnx.ModelProto) -> int:
    """Replace sparse initializers and sparse Constant values with dense tensors; count them."""
    count = 0
    graphs = [proto.graph]
    while graphs:
        graph = graphs.pop()
        for sparse in list(graph.sparse_initializer):
            dense = _dense(sparse)
            graph.initializer.append(dense)
            count += 1
        del graph.sparse_initializer[:]
        for node in graph.node:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.SPARSE_TENSOR:
                    dense = _dense(attr.sparse_tensor)
                    attr.name = "value"
                    attr.type = onnx.AttributeProto.TENSOR
                    attr.t.CopyFrom(dense)
                    attr.ClearField("sparse_tensor")
                    count += 1
                if attr.type == onnx.AttributeProto.GRAPH:
                    graphs.append(attr.g)
                graphs.extend(attr.graphs)
    return count


def _dense(sparse: onnx.SparseTensorProto) -> onnx.TensorProto:
    values = onnx.numpy_helper.to_array(sparse.values)
    indices = onnx.numpy_helper.to_array(sparse.indices)
    dims = tuple(sparse.dims)
    flat = np.zeros(math.prod(dims), dtype=values.dtype)
    if indices.ndim == 2:  # (nnz, rank) coordinates
        indices = np.ravel_multi_index(tuple(indices.T), dims)
    flat[indices.reshape(-1)] = values.reshape(-1)
    return onnx.numpy_helper.from_array(flat.reshape(dims), sparse.values.name)


# ---------------------------------------------------------------------------------------------
# Sections


def _user_inputs(model: ir.Model) -> list[ir.Value]:
    return [v for v in model.graph.inputs if v.name not in model.graph.initializers]


def _dims(shape: ir.Shape | None) -> list[int | str | None] | None:
    if shape is None:
        return None
    return [d if isinstance(d, int) else d.value for d in shape]


def _dtype_name(dtype: ir.DataType | None) -> str | None:
    if dtype is None:
        return None
    if dtype == ir.DataType.STRING:
        return "string"
    try:
        return str(np.dtype(dtype.numpy()))
    except Exception:
        return dtype.name.lower()


def _describe_value(value: ir.Value) -> dict[str, Any]:
    return {"name": value.name, "dtype": _dtype_name(value.dtype), "shape": _dims(value.shape)}


def _op_key(node: ir.Node) -> str:
    return node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}::{node.op_type}"


def _operators(model: ir.Model) -> dict[str, Any]:
    histogram = collections.Counter(
        _op_key(node) for node in ir.traversal.RecursiveGraphIterator(model.graph)
    )
    subgraphs = sum(1 for _ in model.graphs()) - 1
    custom = sorted({d for d in model.opset_imports if d not in ("", "ai.onnx", "ai.onnx.ml")})
    return {
        "nodes": sum(histogram.values()),
        "main_graph_nodes": len(model.graph),
        "subgraphs": subgraphs,
        "functions": len(model.functions),
        "custom_domains": custom,
        "histogram": dict(histogram.most_common()),
    }


def _tensor_bytes(tensor: ir.TensorProtocol) -> int:
    try:
        return int(tensor.nbytes)
    except Exception:
        return 0


def _weights(model: ir.Model) -> list[dict[str, Any]]:
    """Every stored tensor: initializers and values of Constant nodes, subgraphs included."""
    tensors = []
    for _, value in model_io.iter_tensors(model):
        tensor = value.const_value
        if tensor is None:
            continue
        tensors.append(
            {
                "name": value.name,
                "source": "initializer",
                "dtype": _dtype_name(tensor.dtype),
                "shape": list(tensor.shape),
                "elements": math.prod(tensor.shape),
                "bytes": _tensor_bytes(tensor),
            }
        )
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        if node.op_type != "Constant" or node.domain not in ("", "ai.onnx"):
            continue
        name = node.outputs[0].name if node.outputs else node.name
        for key, attr in node.attributes.items():
            if key == "value" and attr.value is not None:
                tensor = attr.value
                entry = {
                    "dtype": _dtype_name(tensor.dtype),
                    "shape": list(tensor.shape),
                    "elements": math.prod(tensor.shape),
                    "bytes": _tensor_bytes(tensor),
                }
            elif key in _CONSTANT_SCALAR_BYTES:
                items = attr.value if isinstance(attr.value, (list, tuple)) else [attr.value]
                per_item = _CONSTANT_SCALAR_BYTES[key]
                size = sum(len(s) for s in items) if per_item is None else per_item * len(items)
                entry = {
                    "dtype": key.removeprefix("value_").rstrip("s"),
                    "shape": [len(items)] if isinstance(attr.value, (list, tuple)) else [],
                    "elements": len(items),
                    "bytes": size,
                }
            else:
                continue
            tensors.append({"name": name, "source": "Constant node", **entry})
    # Classical ML ops (scikit-learn exports) keep their coefficients and trees in attributes.
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        if node.domain != "ai.onnx.ml":
            continue
        elements = nbytes = 0
        for attr in node.attributes.values():
            if attr.type in (ir.AttributeType.FLOATS, ir.AttributeType.INTS):
                elements += len(attr.value)
                nbytes += len(attr.value) * (4 if attr.type == ir.AttributeType.FLOATS else 8)
            elif attr.type == ir.AttributeType.TENSOR and attr.value is not None:
                elements += math.prod(attr.value.shape)
                nbytes += _tensor_bytes(attr.value)
        if elements:
            tensors.append(
                {
                    "name": node.name or node.outputs[0].name,
                    "source": f"{node.op_type} attributes",
                    "dtype": None,
                    "shape": [elements],
                    "elements": elements,
                    "bytes": nbytes,
                }
            )
    return tensors


def _parameters(model: ir.Model) -> dict[str, Any]:
    tensors = _weights(model)
    init = [t for t in tensors if t["source"] == "initializer"]
    const = [t for t in tensors if t["source"] == "Constant node"]
    attrs = [t for t in tensors if t["source"].endswith(" attributes")]

    def totals(group: list[dict[str, Any]], count: str = "tensors") -> dict[str, int]:
        return {
            count: len(group),
            "elements": sum(t["elements"] for t in group),
            "bytes": sum(t["bytes"] for t in group),
        }

    return {
        "total": sum(t["elements"] for t in tensors),
        "bytes": sum(t["bytes"] for t in tensors),
        "initializers": totals(init),
        "constant_nodes": totals(const),
        "ml_op_attributes": totals(attrs, "nodes"),
    }


def _largest_tensors(model: ir.Model) -> list[dict[str, Any]]:
    tensors = sorted(_weights(model), key=lambda t: t["bytes"], reverse=True)
    return tensors[:LARGEST_TENSORS]


def _external_data(model: ir.Model) -> list[dict[str, Any]]:
    files = []
    for path in sorted(model_io.external_data_files(model)):
        files.append({"path": str(path), "bytes": path.stat().st_size if path.exists() else None})
    return files


# ---------------------------------------------------------------------------------------------
# MACs


def _compute(model: ir.Model, shapes: Mapping[str, Sequence[int]]) -> dict[str, Any]:
    fixed: dict[str, str] = {}
    value_shapes, failure = _inferred_shapes(model, shapes, fixed)
    layers = []
    uncounted: collections.Counter[str] = collections.Counter()
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        rule = (
            MAC_RULES.get(node.op_type) if node.domain in ("", "ai.onnx", "com.microsoft") else None
        )
        if rule is None:
            if node.op_type in UNCOUNTED_COMPUTE_OPS:
                uncounted[_op_key(node)] += 1
            continue
        ins = [value_shapes.get(v.name) if v is not None else None for v in node.inputs]
        out = value_shapes.get(node.outputs[0].name) if node.outputs else None
        attrs = {k: a.value for k, a in node.attributes.items()}
        entry: dict[str, Any] = {"node": node.name or node.outputs[0].name, "op": _op_key(node)}
        try:
            entry["macs"] = int(rule(ins, out, attrs))
        except _Unknown as why:
            entry["macs"] = None
            entry["unknown"] = str(why)
        if out is not None:
            entry["output_shape"] = list(out)
        layers.append(entry)
    counted = [layer["macs"] for layer in layers if layer["macs"] is not None]
    complete = len(counted) == len(layers)
    return {
        "total_macs": sum(counted) if complete else None,
        # False when ops without a MAC rule (LSTM, ...) do work the total leaves out
        "complete": complete and not uncounted,
        "known_macs": sum(counted),
        "layers_counted": len(counted),
        "layers_unknown": len(layers) - len(counted),
        "assumed": fixed,
        "shape_inference": failure or "ok",
        "uncounted_ops": dict(uncounted),
        "layers": layers,
    }


def _inferred_shapes(
    model: ir.Model, shapes: Mapping[str, Sequence[int]], fixed: dict[str, str]
) -> tuple[dict[str, Shape], str | None]:
    """Shapes of every value after onnx shape inference on a weight-free copy of the model.

    Inputs named in ``shapes`` get those dims; other dynamic first axes become 1 (recorded in
    ``fixed``). Returns ({name: dims}, None) or the shapes onnx-ir already knows and the reason
    inference failed.
    """
    known: dict[str, Shape] = {}
    for graph in model.graphs():
        for value in list(graph.inputs) + list(graph.initializers.values()):
            _remember(known, value)
        for node in graph:
            for value in node.outputs:
                _remember(known, value)

    user_inputs = {v.name for v in _user_inputs(model)}

    def infer(proto: onnx.ModelProto) -> onnx.ModelProto:
        for value in proto.graph.input:
            if value.name not in user_inputs or not value.type.HasField("tensor_type"):
                continue
            dims = value.type.tensor_type.shape.dim
            given = shapes.get(value.name)
            if given is not None:
                value.type.tensor_type.shape.ClearField("dim")
                for d in given:
                    value.type.tensor_type.shape.dim.add().dim_value = int(d)
                fixed[value.name] = "x".join(str(int(d)) for d in given)
                continue
            # Paddle2ONNX writes a dynamic dim as -1
            if dims and (not dims[0].HasField("dim_value") or dims[0].dim_value < 0):
                fixed[f"{value.name}[0]"] = f"{dims[0].dim_param or '?'} -> 1"
                dims[0].Clear()
                dims[0].dim_value = 1
        return onnx.shape_inference.infer_shapes(
            proto, check_type=False, strict_mode=False, data_prop=True
        )

    try:
        inferred = _infer_without_weights(infer, model)
    except Exception as err:
        logger.info("inspect: shape inference failed: %s", err)
        return known, f"failed ({type(err).__name__}); MACs use the shapes stored in the model"
    graphs = [inferred.graph]
    while graphs:
        graph = graphs.pop()
        for value in list(graph.input) + list(graph.value_info) + list(graph.output):
            shape = _proto_dims(value)
            if shape is not None:
                known[value.name] = shape
        for tensor in graph.initializer:
            known.setdefault(tensor.name, tuple(tensor.dims))
        for node in graph.node:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    graphs.append(attr.g)
                graphs.extend(attr.graphs)
    return known, None


def _infer_without_weights(infer: Callable[[onnx.ModelProto], onnx.ModelProto], model: ir.Model):
    """Shape inference needs only the weights' shapes: see ``model.without_weights``."""
    return model_io.without_weights(infer, model)


def _remember(known: dict[str, Shape], value: ir.Value) -> None:
    if value.name and value.shape is not None:
        known[value.name] = tuple(_dims(value.shape))


def _proto_dims(value: onnx.ValueInfoProto) -> Shape | None:
    if not value.type.HasField("tensor_type") or not value.type.tensor_type.HasField("shape"):
        return None
    return tuple(
        d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
        for d in value.type.tensor_type.shape.dim
    )
