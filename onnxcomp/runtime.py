"""onnxruntime sessions: create them quietly, run them, and stream intermediate activations.

This is the only module that talks to onnxruntime. Session creation failures become
OnnxcompError (one line); onnxruntime's Python wrapper prints an "EP Error ... Falling back"
banner to stdout before raising, which would corrupt ``--json`` output, so stdout is redirected
while a session is created.
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from onnxcomp.data import Batch, DataSource
from onnxcomp.errors import OnnxcompError
from onnxcomp.model import EXTERNAL_DATA_THRESHOLD, weight_bytes

logger = logging.getLogger(__name__)

# onnxruntime logs run-time errors to stderr itself before raising; the OnnxcompError we raise
# carries the same message, so its own log would only break the one-line error.
ort.set_default_logger_severity(4)

OPT_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}

ModelLike = ir.Model | str | os.PathLike | bytes


def session_options(
    threads: int = 1, optimization: str = "all", optimized_model_path: str | None = None
) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = OPT_LEVELS[optimization]
    options.log_severity_level = 4
    if optimized_model_path:
        options.optimized_model_filepath = str(optimized_model_path)
    return options


def _one_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


class _ModelFile:
    """A path onnxruntime can open for any ModelLike, cleaned up afterwards."""

    def __init__(self, model: ModelLike):
        self.model = model
        self.tmpdir: str | None = None

    def __enter__(self) -> str | bytes:
        model = self.model
        if isinstance(model, (str, os.PathLike)):
            return str(model)
        if isinstance(model, bytes):
            return model
        if not _has_external(model) and weight_bytes(model) < EXTERNAL_DATA_THRESHOLD:
            try:
                return ir.to_proto(model).SerializeToString()
            except Exception as err:  # a name or attribute that protobuf cannot hold
                raise OnnxcompError(f"cannot serialize the model ({_one_line(err)})") from None
        # Big or externally stored weights: write a temporary copy with its weights beside it.
        self.tmpdir = tempfile.mkdtemp(prefix="onnxcomp-session-")
        path = os.path.join(self.tmpdir, "model.onnx")
        ir.save(model, path, external_data="model.onnx.data")
        return path

    def __exit__(self, *exc) -> None:
        if self.tmpdir:
            shutil.rmtree(self.tmpdir, ignore_errors=True)


def create_session(
    model: ModelLike,
    *,
    threads: int = 1,
    optimization: str = "all",
    optimized_model_path: str | None = None,
    label: str = "model",
) -> ort.InferenceSession:
    """An onnxruntime CPU session for a model (an ``ir.Model``, a path or serialized bytes)."""
    options = session_options(threads, optimization, optimized_model_path)
    with _ModelFile(model) as source:
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
        except Exception as err:  # onnxruntime's Fail / InvalidArgument / NotImplemented, ...
            raise OnnxcompError(f"{label}: onnxruntime cannot load it ({_one_line(err)})") from None


_ORT_TYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(int16)": np.int16,
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
    "tensor(uint16)": np.uint16,
    "tensor(uint32)": np.uint32,
    "tensor(uint64)": np.uint64,
    "tensor(bool)": np.bool_,
    "tensor(string)": np.object_,
}


def check_feeds(session: ort.InferenceSession, feeds: Mapping[str, np.ndarray], label: str) -> None:
    """Raise OnnxcompError naming the input when a feed does not fit the session."""
    inputs = {i.name: i for i in session.get_inputs()}
    for name in feeds:
        if name not in inputs:
            raise OnnxcompError(
                f"{label}: unknown input name {name!r} (inputs: {', '.join(inputs)})"
            )
    for name, meta in inputs.items():
        if name not in feeds:
            raise OnnxcompError(f"{label}: no data for input {name!r}")
        array = feeds[name]
        want = _ORT_TYPES.get(meta.type)
        if want is not None and array.dtype != np.dtype(want):
            raise OnnxcompError(
                f"{label}: input {name!r} is {array.dtype}, the model wants {np.dtype(want)}"
            )
        if len(meta.shape) != array.ndim:
            raise OnnxcompError(
                f"{label}: input {name!r} has rank {array.ndim}, the model wants {meta.shape}"
            )
        for axis, (have, dim) in enumerate(zip(array.shape, meta.shape)):
            if isinstance(dim, int) and dim > 0 and dim != have:
                raise OnnxcompError(
                    f"{label}: input {name!r} has shape {list(array.shape)}, the model wants "
                    f"{meta.shape} (axis {axis} differs)"
                )


def run(
    session: ort.InferenceSession,
    feeds: Mapping[str, np.ndarray],
    output_names: Sequence[str] | None = None,
    label: str = "model",
) -> dict[str, np.ndarray]:
    """Run once; returns outputs by name. Errors become OnnxcompError."""
    check_feeds(session, feeds, label)
    names = list(output_names) if output_names else [o.name for o in session.get_outputs()]
    try:
        values = session.run(names, dict(feeds))
    except Exception as err:
        raise OnnxcompError(f"{label}: onnxruntime failed to run it ({_one_line(err)})") from None
    return dict(zip(names, values))


def fixed_batch(session: ort.InferenceSession) -> int | None:
    """The batch size a model fixes on its first axis (same on all inputs), or None."""
    sizes = set()
    for meta in session.get_inputs():
        dim = meta.shape[0] if meta.shape else None
        sizes.add(dim if isinstance(dim, int) and dim > 0 else None)
    if len(sizes) == 1:
        return sizes.pop()
    return None


def iter_outputs(
    session: ort.InferenceSession,
    data: DataSource,
    *,
    batch_size: int = 32,
    limit: int | None = None,
    output_names: Sequence[str] | None = None,
    label: str = "model",
) -> Iterator[tuple[Batch, dict[str, np.ndarray]]]:
    """Run the model over a data source batch by batch, yielding (batch, outputs).

    Models with a fixed batch size are fed in chunks of that size (a batch of 1 sample at a
    time for ``[1, 3, 224, 224]`` inputs).
    """
    fixed = fixed_batch(session)
    if fixed is not None:
        batch_size = fixed
    for batch in data.batches(batch_size, limit=limit):
        if fixed is not None and len(batch) != fixed:
            logger.info(
                "%s: dropping a last batch of %d (model fixes %d)", label, len(batch), fixed
            )
            continue
        yield batch, run(session, batch.inputs, output_names, label)


def capture(
    model: ir.Model,
    names: Iterable[str],
    data: DataSource,
    *,
    batch_size: int = 32,
    limit: int | None = None,
    threads: int = 1,
    optimization: str = "disable",
) -> Iterator[tuple[Batch, dict[str, np.ndarray]]]:
    """Stream intermediate tensors: yield ``(batch, {name: array})`` one batch at a time.

    The caller folds each batch into running statistics and drops it, so memory is one batch
    of the wanted tensors whatever the number of samples. Graph optimizations are disabled by
    default so the named tensors exist as written in the model.
    """
    names = list(dict.fromkeys(names))
    proto = ir.to_proto(model)
    present = {o.name for o in proto.graph.output}
    known = _value_types(model)
    for name in names:
        if name in present:
            continue
        if name not in known:
            raise OnnxcompError(f"capture: the model has no tensor named {name!r}")
        output = proto.graph.output.add()
        output.name = name
        if known[name] is not None:
            output.type.CopyFrom(known[name])
    if _has_external(model):
        # As bytes, external data would be looked for relative to the working folder: read it in.
        import onnx

        base_dir = next(
            str(v.const_value.base_dir)
            for g in model.graphs()
            for v in g.initializers.values()
            if isinstance(v.const_value, ir.ExternalTensor)
        )
        onnx.external_data_helper.load_external_data_for_model(proto, base_dir)
    tmpdir = None
    if proto.ByteSize() < EXTERNAL_DATA_THRESHOLD:
        source: ModelLike = proto.SerializeToString()
    else:
        tmpdir, source = _save_tmp(proto)
    try:
        session = create_session(source, threads=threads, optimization=optimization, label="capture")
    finally:
        if tmpdir is not None:
            shutil.rmtree(tmpdir, ignore_errors=True)
    yield from iter_outputs(
        session, data, batch_size=batch_size, limit=limit, output_names=names, label="capture"
    )


def _value_types(model: ir.Model):
    """name -> TypeProto (or None when unknown) for every value of the main graph."""
    import onnx

    types = {}
    for value in model.graph.inputs:
        types[value.name] = None
    for node in model.graph:
        for value in node.outputs:
            type_proto = None
            if value.dtype is not None:
                type_proto = onnx.helper.make_tensor_type_proto(value.dtype.value, None)
            types[value.name] = type_proto
    return types


def _save_tmp(proto) -> tuple[str, str]:
    """Write a big proto with its weights beside it: (temporary folder, model path)."""
    import onnx

    tmpdir = tempfile.mkdtemp(prefix="onnxcomp-capture-")
    path = Path(tmpdir) / "model.onnx"
    onnx.save_model(proto, path, save_as_external_data=True, location="model.onnx.data")
    return tmpdir, str(path)


def _has_external(model: ir.Model) -> bool:
    return any(
        isinstance(v.const_value, ir.ExternalTensor)
        for g in model.graphs()
        for v in g.initializers.values()
    )


@functools.cache
def qdq_problem(opset: int) -> str | None:
    """Why this onnxruntime cannot run QuantizeLinear/DequantizeLinear at ``opset`` (None: it can).

    Probed with a two-node model, once per opset, so static quantization can refuse up front
    instead of writing a model onnxruntime rejects at the end.
    """
    import onnx

    helper = onnx.helper
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
        helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "qdq",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])],
        [
            helper.make_tensor("s", onnx.TensorProto.FLOAT, [], [0.1]),
            helper.make_tensor("z", onnx.TensorProto.UINT8, [], [128]),
        ],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    proto.ir_version = 8
    try:
        create_session(proto.SerializeToString(), label="QuantizeLinear probe")
    except OnnxcompError as err:
        return str(err)
    return None
