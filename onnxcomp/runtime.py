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
import onnx
import onnx_ir as ir
import onnxruntime as ort

from onnxcomp.data import Batch, DataSource
from onnxcomp.errors import OnnxcompError
from onnxcomp.model import EXTERNAL_DATA_THRESHOLD, has_external_data, weight_bytes

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
    """A path onnxruntime can open for any ModelLike, cleaned up afterwards; with ``outputs``
    (an ``ir.Model`` only), a graph cut down to what those outputs need (`keep_only`)."""

    def __init__(self, model: ModelLike, outputs: Sequence[str] | None = None):
        self.model = model
        self.outputs = outputs
        self.tmpdir: str | None = None

    def __enter__(self) -> str | bytes:
        model = self.model
        if isinstance(model, (str, os.PathLike)):
            return str(model)
        if isinstance(model, bytes):
            return model
        if not has_external_data(model) and weight_bytes(model) < EXTERNAL_DATA_THRESHOLD:
            try:
                proto = ir.to_proto(model)
                if self.outputs is not None:
                    keep_only(proto.graph, self.outputs)
                return proto.SerializeToString()
            except Exception as err:  # a name or attribute that protobuf cannot hold
                raise OnnxcompError(f"cannot serialize the model ({_one_line(err)})") from None
        # Big or externally stored weights: a temporary model file with its weights beside it.
        self.tmpdir = tempfile.mkdtemp(prefix="onnxcomp-session-")
        path = os.path.join(self.tmpdir, "model.onnx")
        write_for_session(model, path, self.outputs)
        _release_external(model)
        return path

    def __exit__(self, *exc) -> None:
        if self.tmpdir:
            shutil.rmtree(self.tmpdir, ignore_errors=True)


def write_for_session(
    model: ir.Model, path: str | os.PathLike, outputs: Sequence[str] | None = None
) -> None:
    """Write ``model`` where onnxruntime can open it, without copying weights it need not copy
    (with ``outputs``: only what they need, `keep_only`).

    Weights still read from an external data file stay there: the file is hard-linked into the
    new model's folder (onnxruntime only reads data files inside the model's folder) and the
    tensors keep their offsets, so nothing is copied or read. Weights in memory, and those in a
    file that cannot be linked (another filesystem), are streamed to ``<name>.data``.
    """
    folder = Path(path).parent
    linked: dict[Path, str | None] = {}
    swapped: list[tuple[ir.Value, ir.TensorProtocol]] = []
    to_write: list[ir.Value] = []
    for value in _initializers(model):
        tensor = value.const_value
        if isinstance(tensor, ir.ExternalTensor):
            source = Path(tensor.path).resolve()
            if source not in linked:
                linked[source] = _link(source, folder, f"weights{len(linked)}.data")
            local = linked[source]
            if local is not None:
                swapped.append((value, tensor))
                value.const_value = ir.ExternalTensor(
                    local, tensor.offset, tensor.length, tensor.dtype,
                    shape=tensor.shape, name=tensor.name, base_dir=folder,
                )  # fmt: skip
                continue
            to_write.append(value)
        elif tensor is not None and tensor.nbytes > _INLINE_BYTES:
            to_write.append(value)
    try:
        if to_write:
            written = ir.external_data.convert_tensors_to_external(
                [v.const_value for v in to_write], folder, Path(path).name + ".data"
            )
            for value, tensor in zip(to_write, written, strict=True):
                swapped.append((value, value.const_value))
                value.const_value = tensor
        proto = ir.to_proto(model)
        if outputs is not None:
            keep_only(proto.graph, outputs)
        with open(path, "wb") as f:
            f.write(proto.SerializeToString())
        del proto
    finally:
        for value, tensor in reversed(swapped):
            value.const_value = tensor


# Tensors up to this size are written inside the session's model file.
_INLINE_BYTES = 1024


def keep_only(graph: onnx.GraphProto, outputs: Sequence[str]) -> None:
    """Cut ``graph`` down to the nodes ``outputs`` need, with ``outputs`` as its outputs.

    onnxruntime runs every node of a graph whichever outputs a run asks for (measured on a
    layout detector: a tensor 3 convolutions in took 0.38 s per image, as long as the whole
    model), so a capture of an early layer's input would cost a whole pass. Nodes with
    subgraphs keep every outer name their subgraphs read; initializers no kept node reads are
    dropped unless they are also graph inputs; the graph inputs stay (the feeds do not change).
    Not ``onnx.utils.Extractor``: it follows node inputs only (an If branch's reads of the outer
    graph are lost), needs the cut's inputs named, and copies every kept weight into a new model.
    """
    wanted = list(dict.fromkeys(outputs))
    needed = set(wanted)
    kept = []
    for node in reversed(graph.node):
        if any(name in needed for name in node.output):
            kept.append(node)
            needed.update(name for name in node.input if name)
            needed.update(_subgraph_reads(node))
    kept.reverse()
    if len(kept) < len(graph.node):
        del graph.node[:]
        graph.node.extend(kept)
    inputs = {v.name for v in graph.input}
    for i in reversed(range(len(graph.initializer))):
        name = graph.initializer[i].name
        if name not in needed and name not in inputs:
            del graph.initializer[i]
    known = {v.name: v for v in list(graph.input) + list(graph.output)}
    new_outputs = []
    for name in wanted:
        value = onnx.ValueInfoProto(name=name)
        if name in known:
            value.CopyFrom(known[name])
        new_outputs.append(value)
    del graph.output[:]
    graph.output.extend(new_outputs)


def _subgraph_reads(node: onnx.NodeProto) -> set[str]:
    """Every name the nodes of ``node``'s subgraphs read (outer-scope values among them)."""
    names: set[str] = set()
    for attr in node.attribute:
        graphs = list(attr.graphs) + ([attr.g] if attr.HasField("g") else [])
        for sub in graphs:
            for inner in sub.node:
                names.update(name for name in inner.input if name)
                names.update(_subgraph_reads(inner))
    return names


def _link(source: Path, folder: Path, name: str) -> str | None:
    """Hard-link ``source`` into ``folder`` as ``name``; None when the filesystem refuses."""
    try:
        os.link(source, folder / name)
    except OSError:
        return None
    return name


def _initializers(model: ir.Model) -> Iterator[ir.Value]:
    for graph in model.graphs():
        yield from graph.initializers.values()


def _release_external(model: ir.Model) -> None:
    """Unmap the external weights a pass or a write has read: onnxruntime holds its own, and the
    pages read would otherwise count twice while the session lives (mapped again when read)."""
    for value in _initializers(model):
        if isinstance(value.const_value, ir.ExternalTensor):
            try:
                value.const_value.release()
            except BufferError:  # a caller still holds an array of it: leave it mapped
                pass


def create_session(
    model: ModelLike,
    *,
    threads: int = 1,
    optimization: str = "all",
    optimized_model_path: str | None = None,
    label: str = "model",
    outputs: Sequence[str] | None = None,
) -> ort.InferenceSession:
    """An onnxruntime CPU session for a model (an ``ir.Model``, a path or serialized bytes);
    with ``outputs`` (an ``ir.Model`` only) it computes those alone (`keep_only`)."""
    options = session_options(threads, optimization, optimized_model_path)
    with _ModelFile(model, outputs) as source:
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


def capture_session(
    model: ir.Model,
    names: Iterable[str],
    *,
    threads: int = 1,
    optimization: str = "disable",
) -> ort.InferenceSession:
    """A session of ``model`` whose outputs are the named tensors (intermediate or not), in order.

    Its graph holds only the nodes those tensors need (`keep_only`): onnxruntime would run every
    node for any one output, so capturing the first layers' inputs costs a fraction of a pass.
    Ask `run` / `iter_outputs` for any subset of the names. Graph optimizations are disabled by
    default so the named tensors exist as written in the model. `onnxcomp.capture` streams them
    within a memory budget.
    """
    names = list(dict.fromkeys(names))
    graph = model.graph
    present = {v.name for v in graph.outputs}
    values = {v.name: v for v in graph.inputs}
    values.update((v.name, v) for node in graph for v in node.outputs)
    added = 0
    try:
        for name in names:
            if name in present:
                continue
            if name not in values:
                raise OnnxcompError(f"capture: the model has no tensor named {name!r}")
            graph.outputs.append(values[name])
            present.add(name)
            added += 1
        # The weights are written once (or serialized in memory when small), never copied in a
        # protobuf: the model itself gets the extra outputs while the session is created (so
        # they are written with their types), and `keep_only` cuts the written graph to them.
        return create_session(
            model, threads=threads, optimization=optimization, label="capture", outputs=names
        )
    finally:
        for _ in range(added):
            graph.outputs.pop()


def profile_nodes(
    model: ModelLike,
    feeds: Mapping[str, np.ndarray],
    *,
    runs: int = 20,
    warmup: int = 3,
    threads: int = 1,
    label: str = "model",
) -> dict[str, object]:
    """Run a model under onnxruntime's profiler; the time of each node it executed.

    Returns ``{"runs": [ms of each timed run], "nodes": [{"node", "op", "ms"}]}`` where a
    node's ``ms`` is its median kernel time per timed run, in execution order. The nodes are the
    ones onnxruntime ran after its own graph optimizations (fused kernels under its names); the
    ``warmup`` first runs are left out.
    """
    import bisect
    import json

    tmpdir = tempfile.mkdtemp(prefix="onnxcomp-profile-")
    try:
        options = session_options(threads)
        options.enable_profiling = True
        options.profile_file_prefix = os.path.join(tmpdir, "profile")
        with _ModelFile(model) as source:
            try:
                with contextlib.redirect_stdout(io.StringIO()):
                    session = ort.InferenceSession(
                        source, options, providers=["CPUExecutionProvider"]
                    )
            except Exception as err:
                raise OnnxcompError(
                    f"{label}: onnxruntime cannot load it ({_one_line(err)})"
                ) from None
        for _ in range(warmup + runs):
            run(session, feeds, label=label)
        with open(session.end_profiling(), encoding="utf-8") as f:
            events = json.load(f)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    model_runs = sorted(
        (e["ts"], e["ts"] + e["dur"])
        for e in events
        if e.get("cat") == "Session" and e.get("name") == "model_run"
    )[warmup:]
    starts = [begin for begin, _ in model_runs]
    # node -> its kernel time (us) in each timed run; the median over runs, so one run slowed
    # by a neighbour on a loaded machine does not move a node's figure
    nodes: dict[str, tuple[str, np.ndarray]] = {}
    for event in events:
        name = event.get("name", "")
        index = bisect.bisect_right(starts, event.get("ts", -1)) - 1
        if event.get("cat") != "Node" or not name.endswith("_kernel_time") or index < 0:
            continue
        node = name[: -len("_kernel_time")]
        if node not in nodes:
            nodes[node] = (event.get("args", {}).get("op_name", "?"), np.zeros(len(starts)))
        nodes[node][1][index] += event["dur"]
    return {
        "runs": [(end - begin) / 1000 for begin, end in model_runs],
        "nodes": [
            {"node": node, "op": op, "ms": float(np.median(times)) / 1000}
            for node, (op, times) in nodes.items()
        ],
    }


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


def blas_threads(threads: int):
    """Limit numpy's BLAS to ``threads`` for a block (quantize's calibration products, prune's and
    GPTQ's solves, a tune worker's builds), when threadpoolctl is installed. On a busy machine
    OpenBLAS's own threads wait on each other: measured at load 10 on 2 cores, a 320 x 384 x 384
    product took 40-88 ms with 2 threads against 12 ms with 1, a 288 x 288 solve 0.13 s vs 0.008 s."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(limits=max(1, threads), user_api="blas")
