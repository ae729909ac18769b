"""Load and save models (external data, atomic writes) and normalise them for the passes.

Models are held as onnx-ir ``ir.Model``: weights stored as external data stay memory-mapped
until a pass asks for one, so a model over 2 GB is never read into memory twice.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import mmap
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TypeVar

import numpy as np
import onnx
import onnx_ir as ir
from onnx_ir.passes.common import LiftConstantsToInitializersPass, ShapeInferencePass, _c_api_utils

from onnxcomp.errors import OnnxcompError
from onnxcomp.inputs import check_output, os_error
from onnxcomp.inputs import external_data_files as external_data_files  # re-exported

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Above this many bytes of weights a model is saved with its weights in a ".data" file beside
# it: protobuf cannot serialise a message over 2 GB.
EXTERNAL_DATA_THRESHOLD = 1_500_000_000

# Above this many bytes of weights, work that needs two models' onnxruntime sessions alive at
# once (interleaved latency timing) is left out, so a command peaks near one copy of the weights.
TIMING_LIMIT_BYTES = 1_000_000_000


def load(path: str | os.PathLike) -> ir.Model:
    """Read an ONNX file (weights in external data stay on disk until used).

    Raises OnnxcompError naming the file for anything that is not a readable ONNX model.
    """
    path = Path(path)
    if not path.exists():
        raise OnnxcompError(f"{path}: no such file")
    if path.is_dir():
        raise OnnxcompError(f"{path}: is a directory, not an ONNX file")
    if path.stat().st_size == 0:
        raise OnnxcompError(f"{path}: empty file, not an ONNX model")
    try:
        model = ir.load(path)
    except Exception as err:  # protobuf DecodeError, UnicodeDecodeError, ValueError, ...
        raise OnnxcompError(f"{path}: not a readable ONNX model ({_one_line(err)})") from None
    if len(model.graph) == 0 and not model.graph.outputs:
        raise OnnxcompError(f"{path}: not an ONNX model (no graph in the file)")
    if not model.graph.outputs:
        raise OnnxcompError(f"{path}: the graph has no outputs")
    _check_external_data(model, path)
    _check_tensor_sizes(model, path)
    _check_references(model, path)
    _check_acyclic(model, path)
    _check_arity(model, path)
    _check_weights(model, path)
    return model


def _check_acyclic(model: ir.Model, path: Path) -> None:
    """The nodes of each graph must have an order (a cycle makes every pass loop or fail)."""
    for graph in model.graphs():
        nodes = list(graph)
        index = {id(node): i for i, node in enumerate(nodes)}
        waiting = [0] * len(nodes)
        users: list[list[int]] = [[] for _ in nodes]
        for i, node in enumerate(nodes):
            for value in node.inputs:
                producer = value.producer() if value is not None else None
                if producer is not None and id(producer) in index:
                    waiting[i] += 1
                    users[index[id(producer)]].append(i)
        ready = [i for i, n in enumerate(waiting) if n == 0]
        done = 0
        while ready:
            i = ready.pop()
            done += 1
            for j in users[i]:
                waiting[j] -= 1
                if waiting[j] == 0:
                    ready.append(j)
        if done < len(nodes):
            stuck = next(nodes[i] for i, n in enumerate(waiting) if n > 0)
            raise OnnxcompError(
                f"{path}: the graph has a cycle through node {_node_name(stuck)} "
                "(an output feeds back into its own inputs); the model is corrupt"
            )


def _node_name(node: ir.Node) -> str:
    """``'conv1' (Conv)``, or ``(unnamed Conv)``."""
    return f"{node.name!r} ({node.op_type})" if node.name else f"(unnamed {node.op_type})"


def _check_arity(model: ir.Model, path: Path) -> None:
    """Standard ops must have the inputs and outputs their ONNX schema requires."""
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        domain = node.domain or ""
        if domain not in ("", "ai.onnx", "ai.onnx.ml"):
            continue
        version = model.opset_imports.get(
            domain, model.opset_imports.get("ai.onnx" if domain == "" else domain)
        )
        try:
            schema = onnx.defs.get_schema(
                node.op_type, int(version or 1), "" if domain == "ai.onnx" else domain
            )
        except Exception:  # unknown op or opset: onnxruntime judges it later
            continue
        given = len(node.inputs)
        missing = given < schema.min_input or any(
            i < given and node.inputs[i] is None and formal.option == _SINGLE
            for i, formal in enumerate(schema.inputs)
        )
        if missing:
            raise OnnxcompError(
                f"{path}: node {_node_name(node)} has {given} input(s); "
                f"{node.op_type} needs at least {schema.min_input}"
                + (
                    f" ({', '.join(f.name for f in schema.inputs[: schema.min_input])})"
                    if schema.inputs
                    else ""
                )
            )
        if len(node.outputs) < schema.min_output:
            raise OnnxcompError(
                f"{path}: node {_node_name(node)} has {len(node.outputs)} "
                f"output(s); {node.op_type} needs at least {schema.min_output}"
            )


_SINGLE = onnx.defs.OpSchema.FormalParameterOption.Single

# Ops whose second input is a weight; a weight without elements computes nothing.
_WEIGHTED = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def _check_weights(model: ir.Model, path: Path) -> None:
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        if (
            node.op_type not in _WEIGHTED
            or node.domain not in ("", "ai.onnx")
            or len(node.inputs) < 2
        ):
            continue
        weight = node.inputs[1]
        tensor = weight.const_value if weight is not None else None
        if tensor is not None and math.prod(tensor.shape.numpy()) == 0:
            raise OnnxcompError(
                f"{path}: node {_node_name(node)} has the empty weight "
                f"{weight.name!r} of shape {list(tensor.shape.numpy())}; the layer computes "
                "nothing (a broken export)"
            )


def _check_references(model: ir.Model, path: Path) -> None:
    """Every node input must come from a node, a graph input or an initializer.

    A corrupted name in a file leaves a dangling reference that onnx-ir reads happily; passes
    would then fail deep inside, so it is named here.
    """
    for graph in model.graphs():
        for value in graph.outputs:
            if value.producer() is None and not (value.is_graph_input() or value.is_initializer()):
                raise OnnxcompError(
                    f"{path}: graph output {value.name!r} is produced by no node "
                    "(a corrupt or incomplete model)"
                )
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        for text in (node.name, node.op_type, node.domain, *(v.name for v in node.outputs)):
            if isinstance(text, bytes):  # onnx-ir keeps names that are not UTF-8 as bytes
                raise OnnxcompError(
                    f"{path}: node {node.op_type!r} has a name that is not valid UTF-8 "
                    f"({text!r}); the file is corrupt"
                )
        for value in node.inputs:
            if value is None or value.producer() is not None:
                continue
            if value.is_graph_input() or value.is_initializer():
                continue
            raise OnnxcompError(
                f"{path}: node {node.name or node.op_type!r} reads {value.name!r}, which no node, "
                "input or initializer defines (a corrupt or incomplete model)"
            )


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    message = text[0] if text else ""
    return f"{type(err).__name__}: {message}" if message else type(err).__name__


def iter_tensors(model: ir.Model) -> Iterator[tuple[ir.Graph, ir.Value]]:
    """Every initializer of the model, subgraphs included, with the graph that holds it."""
    for graph in model.graphs():
        for value in graph.initializers.values():
            yield graph, value


def _check_external_data(model: ir.Model, path: Path) -> None:
    for _, value in iter_tensors(model):
        tensor = value.const_value
        if not isinstance(tensor, ir.ExternalTensor):
            continue
        data_path = Path(tensor.path)
        folder = path.resolve().parent
        if Path(tensor.location).is_absolute() or folder not in data_path.resolve().parents:
            raise OnnxcompError(
                f"{path}: external data file {tensor.location!r} of tensor {value.name!r} lies "
                "outside the model's folder, which onnxruntime refuses; move it beside the model"
            )
        if not data_path.exists():
            raise OnnxcompError(
                f"{path}: external data file {tensor.location!r} of tensor {value.name!r} "
                f"is missing (looked for {data_path})"
            )
        end = (tensor.offset or 0) + (tensor.length or 0)
        if end > data_path.stat().st_size:
            raise OnnxcompError(
                f"{path}: external data file {tensor.location!r} is truncated "
                f"(tensor {value.name!r} needs bytes up to {end}, file has "
                f"{data_path.stat().st_size})"
            )


# Repeated fields of TensorProto that hold one element per value (complex types hold two).
_TYPED_FIELDS = ("float_data", "int32_data", "int64_data", "double_data", "uint64_data")


def _check_tensor_sizes(model: ir.Model, path: Path) -> None:
    """Each initializer's data must hold as many elements as its dims say (cheap: no decoding)."""
    for _, value in iter_tensors(model):
        tensor = value.const_value
        if tensor is None:
            continue
        if tensor.dtype == ir.DataType.UNDEFINED:
            raise OnnxcompError(
                f"{path}: tensor {value.name!r} has data type UNDEFINED (a corrupt file)"
            )
        try:
            itemsize = tensor.dtype.itemsize
        except TypeError:  # strings: no fixed size
            continue
        count = math.prod(tensor.shape.numpy())
        if isinstance(tensor, ir.ExternalTensor):
            have = tensor.length
        elif isinstance(tensor, ir.TensorProtoTensor):
            proto = tensor.raw
            if proto.HasField("raw_data"):
                have = len(proto.raw_data)
            else:
                values = max(len(getattr(proto, field)) for field in _TYPED_FIELDS)
                if tensor.dtype in (ir.DataType.COMPLEX64, ir.DataType.COMPLEX128):
                    values //= 2
                if values == count or (values == 0 and count == 0):
                    continue
                raise OnnxcompError(
                    f"{path}: tensor {value.name!r} holds {values} values, its shape "
                    f"{list(tensor.shape.numpy())} needs {count}"
                )
        else:
            continue
        if have is not None and have != math.ceil(count * itemsize):
            raise OnnxcompError(
                f"{path}: tensor {value.name!r} holds {have} bytes, its shape "
                f"{list(tensor.shape.numpy())} of {tensor.dtype.name} needs {math.ceil(count * itemsize)}"
            )


def weight_bytes(model: ir.Model) -> int:
    """Bytes held by initializers (after constants are lifted, all weights)."""
    total = 0
    for _, value in iter_tensors(model):
        tensor = value.const_value
        if tensor is not None:
            total += tensor.nbytes
    return total


def has_external_data(model: ir.Model) -> bool:
    """True when any initializer is read from an external data file."""
    return any(isinstance(v.const_value, ir.ExternalTensor) for _, v in iter_tensors(model))


def save(
    model: ir.Model,
    path: str | os.PathLike,
    *,
    inputs: Iterable[str | os.PathLike | None] = (),
    external_data: bool | None = None,
) -> Path:
    """Write ``model`` to ``path`` atomically; never overwrite one of ``inputs``.

    Everything is written to a temporary folder beside ``path`` and then renamed into place,
    so a failure (or a signal: the CLI turns SIGTERM into an exception) leaves no half-written
    file and no temporary folder. With ``external_data`` the weights go to ``<name>.data``
    beside the model; by default that happens when the model's weights were read from external
    data (so the result never points at the input's data file, which may be elsewhere) or
    exceed 1.5 GB. Shapes that ``normalize`` inferred are left out of the file (see
    INFERRED_SHAPE).
    """
    path = Path(path)
    check_output(path, reads=inputs, model=model, option="output")
    target = path.resolve()
    if external_data is None:
        external_data = has_external_data(model) or weight_bytes(model) > EXTERNAL_DATA_THRESHOLD
    data_name = path.name + ".data"
    data_target = target.with_name(data_name)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmpdir = Path(tempfile.mkdtemp(prefix=".onnxcomp-", dir=target.parent))
    except OSError as err:
        raise os_error(path, err) from None
    inlined: list[tuple[ir.Value, object]] = []
    try:
        tmp_model = tmpdir / path.name
        cleared = _strip_inferred_shapes(model)
        try:
            if not external_data:
                inlined = _inline_external(model)
            if external_data:
                ir.save(model, tmp_model, external_data=data_name)
            else:
                ir.save(model, tmp_model)
        except OSError as err:
            raise os_error(path, err) from None
        except Exception as err:  # protobuf cannot hold a name, attribute or size
            raise OnnxcompError(f"{path}: cannot serialize the model ({_one_line(err)})") from None
        finally:
            for value, shape, type_ in cleared:
                value.type = type_
                value.shape = shape
            for value, tensor in inlined:
                value.const_value = tensor
        try:
            if external_data and (tmpdir / data_name).exists():
                os.replace(tmpdir / data_name, data_target)
            os.replace(tmp_model, target)
        except OSError as err:
            raise os_error(path, err) from None
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    logger.info("saved %s", target)
    return target


def _inline_external(model: ir.Model) -> list[tuple[ir.Value, object]]:
    """Read external tensors into memory (for a single-file save); returns what to put back."""
    replaced = []
    for _, value in iter_tensors(model):
        tensor = value.const_value
        if isinstance(tensor, ir.ExternalTensor):
            replaced.append((value, tensor))
            value.const_value = ir.Tensor(tensor.numpy(), name=tensor.name)
    return replaced


# ---------------------------------------------------------------------------------------------
# Rewritten weights of models read from external data


def set_weight(value: ir.Value, array: np.ndarray) -> None:
    """Give the initializer ``value`` the new data ``array``.

    When its old tensor was read from external data, the new one is written to a scratch file
    and kept lazy as well, and the old mapping is released: a pass that rewrites a large model
    tensor by tensor then holds one tensor in memory, never all of them. Callers drop their own
    arrays of the old tensor first, or it stays mapped.
    """
    old = value.const_value
    tensor = ir.tensor(array, name=value.name)
    if isinstance(old, ir.ExternalTensor) and tensor.dtype.bitwidth >= 8:
        [tensor] = ir.external_data.convert_tensors_to_external(
            [tensor], _scratch_dir(), _scratch_name()
        )
    value.const_value = tensor
    release(old)


def spill(model: ir.Model, min_bytes: int = 1 << 20) -> int:
    """Move the in-memory initializers of at least ``min_bytes`` to scratch files, lazy from then
    on (a pass's output of a model read from external data: its new weights then cost no memory
    while the self-check's sessions run, and ``save`` streams them). Returns the bytes moved."""
    moved = 0
    for _, value in iter_tensors(model):
        tensor = value.const_value
        if tensor is None or isinstance(tensor, ir.ExternalTensor) or tensor.nbytes < min_bytes:
            continue
        if tensor.dtype.is_string():
            continue
        [value.const_value] = ir.external_data.convert_tensors_to_external(
            [tensor], _scratch_dir(), _scratch_name()
        )
        moved += tensor.nbytes
    return moved


def release(tensor: object) -> None:
    """Unmap an external tensor's data (read again from disk when next used); while a caller
    still holds an array of it, drop its resident pages instead (the kernel reads them again
    if the array is used). No-op for tensors in memory."""
    if not isinstance(tensor, ir.ExternalTensor):
        return
    try:
        tensor.release()
    except BufferError:
        raw = getattr(tensor, "raw", None)
        if raw is not None and hasattr(raw, "madvise"):
            raw.madvise(mmap.MADV_DONTNEED)


_SCRATCH: list[Path] = []


def _scratch_dir() -> Path:
    """A folder for rewritten weights, removed when the process exits."""
    if not _SCRATCH:
        import atexit

        folder = Path(tempfile.mkdtemp(prefix="onnxcomp-weights-"))
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
        _SCRATCH.append(folder)
    return _SCRATCH[0]


def _scratch_name() -> str:
    return f"w{next(_SCRATCH_COUNTER)}.data"


_SCRATCH_COUNTER = itertools.count()


def serialized_bytes(model: ir.Model) -> int:
    """Bytes of the model as ``save`` writes it (graph plus weights, wherever they go), without
    serializing the weights: a model over 2 GB cannot be one protobuf message."""
    values = [v for _, v in iter_tensors(model) if v.const_value is not None]
    kept = [(v, v.const_value) for v in values if v.const_value.nbytes > _SMALL_TENSOR_BYTES]
    total = 0
    try:
        for value, tensor in kept:
            total += tensor.nbytes
            # a reference in its place: the proto keeps the name, type and dims, not the data
            value.const_value = ir.ExternalTensor(
                "", 0, tensor.nbytes, tensor.dtype, shape=tensor.shape, name=tensor.name or ""
            )
        total += ir.to_proto(model).ByteSize()
    finally:
        for value, tensor in kept:
            value.const_value = tensor
    return total


_SMALL_TENSOR_BYTES = 1 << 16


def without_weights(function: Callable[[onnx.ModelProto], T], model: ir.Model) -> T:
    """``function(proto)`` on a protobuf of ``model`` whose large weights are graph inputs of
    their type and shape (onnx's checker and shape inference need no weight data, and a model
    over 2 GB cannot be one message). The model is left as it was (initializer order, shapes)."""
    order = list(model.graph.initializers.values())
    shapes = {value: (value.shape, value.dtype) for value in order}
    try:
        return _c_api_utils.call_onnx_api(function, model)
    finally:
        model.graph.initializers.clear()
        for value in order:
            value.shape, value.dtype = shapes[value]
            model.graph.initializers.add(value)


def opset(model: ir.Model) -> int:
    """The default-domain opset the model imports."""
    return int(model.opset_imports.get("", model.opset_imports.get("ai.onnx", 1)))


def normalize(model: ir.Model, *, infer_shapes: bool = True) -> dict[str, object]:
    """Lift weights stored in Constant nodes into initializers and infer shapes, in place.

    Exporters such as Paddle2ONNX store every weight as a Constant node; passes recognise weights
    as initializers, so they are lifted first. Returns a small report.
    """
    constants_before = sum(
        1 for node in ir.traversal.RecursiveGraphIterator(model.graph) if node.op_type == "Constant"
    )
    LiftConstantsToInitializersPass(lift_all_constants=False, size_limit=0)(model)
    constants_after = sum(
        1 for node in ir.traversal.RecursiveGraphIterator(model.graph) if node.op_type == "Constant"
    )
    report: dict[str, object] = {"constants_lifted": constants_before - constants_after}
    if infer_shapes:
        known = {id(v) for v in _intermediate_values(model) if v.shape is not None}
        result = ShapeInferencePass(strict_mode=False)(model)
        report["shapes_inferred"] = bool(result.modified)
        for value in _intermediate_values(model):
            if id(value) not in known and value.shape is not None:
                value.meta[INFERRED_SHAPE] = True
    return report


# Shapes that normalize() inferred are for the passes, not for the saved file: onnxruntime
# fuses more when value_info proves shapes equal, and some of those fusions are slower on CPU
# (SkipLayerNormalization: MiniLM fp32 1.04x, int8 1.3x slower with the inferred shapes saved).
INFERRED_SHAPE = "onnxcomp.inferred_shape"


def _intermediate_values(model: ir.Model) -> Iterator[ir.Value]:
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        for value in node.outputs:
            if not value.is_graph_output():
                yield value


def _strip_inferred_shapes(model: ir.Model) -> list[tuple[ir.Value, object, object]]:
    """Clear the shapes normalize() inferred; returns what to put back."""
    cleared = []
    for value in _intermediate_values(model):
        if value.meta.get(INFERRED_SHAPE):
            cleared.append((value, value.shape, value.type))
            value.shape = None
            value.type = None
    return cleared


def ensure_opset(model: ir.Model, version: int, why: str) -> ir.Model:
    """Return ``model`` at default-domain opset ``version`` or newer, upgrading with onnx's
    version converter when needed. ``why`` names the need in the log and in errors."""
    current = opset(model)
    if current >= version:
        return model
    logger.info("upgrading opset %d -> %d (%s)", current, version, why)
    base_dir = _external_base_dir(model)
    proto = ir.to_proto(model)
    try:
        converted = onnx.version_converter.convert_version(proto, version)
    except Exception as err:
        raise OnnxcompError(
            f"{why} needs opset {version}, and onnx cannot convert this model from opset "
            f"{current} ({_one_line(err)})"
        ) from None
    return _from_proto(converted, base_dir)


def copy_model(model: ir.Model) -> ir.Model:
    """A separate copy; weights in external data stay lazy (both read the same file)."""
    try:
        proto = ir.to_proto(model)
    except Exception as err:  # e.g. a name that is not UTF-8 (a damaged file)
        while err.__cause__ is not None:
            err = err.__cause__
        raise OnnxcompError(f"cannot copy the model: protobuf cannot write it ({_one_line(err)})") from None
    return _from_proto(proto, _external_base_dir(model))


def _from_proto(proto: onnx.ModelProto, base_dir: str | None) -> ir.Model:
    model = ir.from_proto(proto)
    if base_dir is not None:
        ir.external_data.set_base_dir(model.graph, base_dir)
    return model


def _external_base_dir(model: ir.Model) -> str | None:
    for _, value in iter_tensors(model):
        tensor = value.const_value
        if isinstance(tensor, ir.ExternalTensor):
            return str(tensor.base_dir)
    return None


@dataclasses.dataclass(frozen=True)
class InputSpec:
    """A graph input as a user feeds it: name, numpy dtype, shape (None or a name for a
    dynamic dim)."""

    name: str
    dtype: np.dtype
    shape: tuple[int | str | None, ...] | None

    def describe(self) -> str:
        if self.shape is None:
            dims = "?"
        else:
            dims = "x".join(str(d) if d is not None else "?" for d in self.shape)
        return f"{self.name}: {self.dtype} [{dims}]"


def input_specs(model: ir.Model) -> list[InputSpec]:
    """The graph inputs a user must feed (initializers listed as inputs are left out)."""
    specs = []
    for value in model.graph.inputs:
        if value.name in model.graph.initializers:
            continue
        specs.append(value_spec(value))
    return specs


def output_specs(model: ir.Model) -> list[InputSpec]:
    return [value_spec(value) for value in model.graph.outputs]


def value_spec(value: ir.Value) -> InputSpec:
    dtype = np.dtype(np.float32)
    if value.dtype is not None:
        try:
            dtype = np.dtype(value.dtype.numpy())
        except Exception:
            dtype = np.dtype(object)
    shape = None
    if value.shape is not None:
        # Exporters write unknown dims as names, as -1 or as 0; all mean "dynamic".
        shape = tuple(
            (d if d > 0 else None) if isinstance(d, int) else (d.value or None) for d in value.shape
        )
    return InputSpec(value.name or "", dtype, shape)
