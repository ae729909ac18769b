"""Cut points: which tensors of a model make good features, and cutting the backbone out.

A cut is a tensor plus the pooling that turns it into one feature vector per sample:

- ``none``: already ``[N, D]`` (a Flatten output, the input of the last Gemm, a sentence embedding);
- ``flatten``: ``[N, C, 1, 1]`` or any small tensor, flattened to ``[N, C·…]``;
- ``avgpool``: a ``[N, C, H, W]`` feature map averaged over space (GlobalAveragePool);
- ``mean_tokens`` / ``first_token``: a ``[N, T, D]`` transformer state, averaged over tokens or its
  first (CLS) token.

The same pooling is written as ONNX nodes when a head is spliced on (see ``splice.py``) and run in
numpy on captured activations (:func:`pool`), so features and the deployed model agree.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Literal

import numpy as np
import onnx_ir as ir

from onnxcomp import model as model_io
from onnxcomp.errors import OnnxcompError
from onnxcomp.graph import drop_unused

logger = logging.getLogger(__name__)

Pooling = Literal["none", "flatten", "avgpool", "mean_tokens", "first_token"]

# Feature maps up to this many values are flattened (position matters on small inputs such as
# 8x8 digits: flattening the [64, 4, 4] map of the digits CNN beats averaging it, 0.95 vs 0.91);
# larger ones are averaged over space as ImageNet-style heads do.
SMALL_MAP = 1024
# Feature vectors longer than this make heads that are mostly noise on a few hundred samples.
MAX_FEATURES = 8192
# Ops that start a decoder or a detection neck: the tensor before the first of them is the
# encoder's output.
UPSAMPLING_OPS = {"Resize", "Upsample", "ConvTranspose", "DepthToSpace"}
WEIGHTED_OPS = {"Gemm", "MatMul", "Conv"}


@dataclasses.dataclass
class Cut:
    """A candidate feature tensor."""

    tensor: str
    kind: str  # why it is a candidate, in the user's words
    shape: list[int | str | None] | None
    pooling: Pooling
    features: int | None  # length of the pooled feature vector, when known
    position: int  # index of its producer in topological order (deeper = larger)
    op: str | None = None
    rank: int = 0  # 0 = best

    def to_json(self) -> dict[str, object]:
        return {
            "rank": self.rank,
            "tensor": self.tensor,
            "kind": self.kind,
            "op": self.op,
            "shape": self.shape,
            "pooling": self.pooling,
            "features": self.features,
        }


def _dims(value: ir.Value) -> list[int | str | None] | None:
    if value.shape is None:
        return None
    return [d if isinstance(d, int) else (d.value or None) for d in value.shape]


def _known(dims) -> bool:
    return all(isinstance(d, int) and d > 0 for d in dims)


def pooling_for(value: ir.Value) -> tuple[Pooling, int | None]:
    """How to turn ``value`` into ``[N, D]``, and D when the shape says it.

    Raises OnnxcompError when the rank is unknown (a channel axis is never guessed).
    """
    dims = _dims(value)
    name = value.name
    if dims is None:
        raise OnnxcompError(
            f"tensor {name!r} has unknown rank (shape inference could not follow it); "
            "choose another cut (`onnxcomp transfer cuts MODEL` lists them)"
        )
    rank = len(dims)
    if rank < 2:
        raise OnnxcompError(f"tensor {name!r} has rank {rank}; a cut needs [batch, features, ...]")
    rest = dims[1:]
    if rank == 2:
        return "none", rest[0] if _known(rest) else None
    if rank == 3:
        return "mean_tokens", rest[1] if _known(rest[1:]) else None
    if rank == 4:
        spatial = dims[2:]
        if _known(spatial) and int(np.prod(spatial)) == 1:
            return "flatten", rest[0] if _known(rest[:1]) else None
        if _known(rest) and int(np.prod(rest)) <= SMALL_MAP:
            return "flatten", int(np.prod(rest))
        return "avgpool", rest[0] if _known(rest[:1]) else None
    if _known(rest) and int(np.prod(rest)) <= MAX_FEATURES:
        return "flatten", int(np.prod(rest))
    raise OnnxcompError(f"tensor {name!r} has rank {rank}; cuts of rank > 4 are not supported")


def pool(array: np.ndarray, pooling: Pooling) -> np.ndarray:
    """Numpy twin of the pooling nodes ``splice.pooling_nodes`` writes. Returns float32 [N, D]."""
    if pooling == "none":
        out = array
    elif pooling == "flatten":
        out = array.reshape(len(array), -1)
    elif pooling == "avgpool":
        out = array.reshape(*array.shape[:2], -1).mean(axis=2)
    elif pooling == "mean_tokens":
        out = array.mean(axis=1)
    elif pooling == "first_token":
        out = array[:, 0, :]
    else:  # pragma: no cover - Literal guards it
        raise ValueError(pooling)
    return np.asarray(out, dtype=np.float32)


def _is_float(value: ir.Value) -> bool:
    return value.dtype in (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.DOUBLE)


def _is_layer_norm(node: ir.Node) -> bool:
    """A LayerNormalization op, or the tail (x - mean) / std * gamma + beta of a decomposed one."""
    if node.op_type == "LayerNormalization":
        return True
    if node.op_type != "Add":
        return False
    mul = node.inputs[0].producer() if node.inputs[0] is not None else None
    if mul is None or mul.op_type != "Mul":
        return False
    div = next(
        (v.producer() for v in mul.inputs if v is not None and v.producer() is not None), None
    )
    if div is None or div.op_type != "Div":
        return False
    denom = div.inputs[1].producer() if div.inputs[1] is not None else None
    return denom is not None and denom.op_type == "Sqrt"


def _squeeze_excite(node: ir.Node) -> bool:
    """A global pool whose result scales its own input a few ops later (squeeze-and-excite)."""
    source = node.inputs[0]
    frontier, seen = [node.outputs[0]], set()
    for _ in range(12):  # Paddle exports spell bias adds and Identity ops out
        nxt = []
        for value in frontier:
            for use in value.uses():
                user = use.node
                if id(user) in seen:
                    continue
                seen.add(id(user))
                if user.op_type == "Mul" and any(v is source for v in user.inputs):
                    return True
                nxt.extend(user.outputs)
        frontier = nxt
    return False


def fix_input_shapes(
    model: ir.Model, shapes: dict[str, tuple[int, ...]]
) -> list[tuple[ir.Value, object]]:
    """Give dynamic input dims (except the batch axis) the sizes of the data, so that shape
    inference can size the feature maps. Returns what to put back with ``restore_input_shapes``."""
    saved = []
    for value in model.graph.inputs:
        shape = shapes.get(value.name or "")
        if shape is None or value.shape is None or len(value.shape) != len(shape):
            continue
        dims = list(value.shape)
        fixed = [dims[0]] + [
            d if isinstance(d, int) and d > 0 else int(s) for d, s in zip(dims[1:], shape[1:])
        ]
        if fixed != dims:
            saved.append((value, value.shape))
            value.shape = ir.Shape(fixed)
    return saved


def restore_input_shapes(saved: list[tuple[ir.Value, object]]) -> None:
    for value, shape in saved:
        value.shape = shape


def find_cuts(model: ir.Model, *, limit: int | None = None) -> list[Cut]:
    """Candidate feature tensors of ``model``, best first.

    Candidates: global pooling outputs, Flatten outputs, the input of each final Gemm/MatMul
    (the penultimate layer), [N, D] model outputs, the last layer-norm outputs of a transformer
    (pooled over tokens), and for encoders feeding a decoder or a detection neck the feature map
    just before the first upsampling op, plus the last map of each deeper stage. Ranked deepest
    first within the preferred kinds (pooled and penultimate tensors before raw feature maps).
    """
    model_io.normalize(model)
    nodes = list(model.graph)  # topological order as stored
    order = {id(n): i for i, n in enumerate(nodes)}
    first_upsample = next(
        (i for i, n in enumerate(nodes) if n.op_type in UPSAMPLING_OPS), len(nodes)
    )
    outputs = {id(v) for v in model.graph.outputs}
    found: dict[int, tuple[ir.Value, str, int]] = {}  # id(value) -> (value, kind, preference)

    def add(value: ir.Value | None, kind: str, preference: int) -> None:
        if value is None or not _is_float(value) or value.producer() is None:
            return
        if value.const_value is not None or id(value) in found:
            return
        found[id(value)] = (value, kind, preference)

    # Weighted ops whose output no other weighted op reads: the model's last layers.
    def feeds_weighted(value: ir.Value, seen: set[int]) -> bool:
        for use in value.uses():
            node = use.node
            if id(node) in seen:
                continue
            seen.add(id(node))
            if node.op_type in WEIGHTED_OPS:
                return True
            if any(feeds_weighted(out, seen) for out in node.outputs):
                return True
        return False

    for node in nodes:
        out = node.outputs[0] if node.outputs else None
        if node.op_type in ("GlobalAveragePool", "GlobalMaxPool"):
            if not _squeeze_excite(node):
                add(out, "global pooling output", 0)
        elif node.op_type == "Flatten":
            add(out, "Flatten output", 1)
        elif node.op_type in ("Gemm", "MatMul") and len(node.inputs) > 1:
            weight = node.inputs[1]
            # A classifier's last layer: [N, D] in; a transformer's last MatMul works per token.
            per_sample = _dims(node.inputs[0]) is not None and len(_dims(node.inputs[0])) == 2
            if (
                weight is not None
                and weight.const_value is not None
                and out is not None
                and per_sample
            ):
                if not feeds_weighted(out, set()):
                    add(node.inputs[0], f"input of the last {node.op_type} (penultimate layer)", 0)
        elif _is_layer_norm(node) and out is not None:
            dims = _dims(out)
            if dims is not None and len(dims) == 3:
                add(out, "layer-norm output (transformer state)", 2)
    for value in model.graph.outputs:
        dims = _dims(value)
        if dims is not None and len(dims) == 2:
            if _computed_by_a_layer(value):
                add(value, "model output", 5)
            else:  # pooled by the model itself: a sentence embedding, say
                add(value, "model output (embedding)", 0)
    # Encoders: the last 4-D map of each spatial size before any upsampling op.
    last_by_size: dict[tuple, ir.Value] = {}
    convolutional = any(n.op_type == "Conv" for n in nodes)
    for node in nodes[:first_upsample] if convolutional else ():
        if node.op_type in RESHAPING_OPS or node.op_type == "Transpose":
            continue  # attention heads and layout changes are not feature maps
        for out in node.outputs:
            dims = _dims(out)
            if dims is None or len(dims) != 4 or not _known(dims[1:]) or not _is_float(out):
                continue
            last_by_size[tuple(dims[2:])] = out
    maps = sorted(last_by_size.values(), key=lambda v: order[id(v.producer())], reverse=True)
    for value in maps[:3]:
        label = (
            "encoder output (before upsampling)" if first_upsample < len(nodes) else "stage output"
        )
        add(value, label if value is maps[0] else "stage output", 4 if value is not maps[0] else 2)

    cuts = []
    for value, kind, preference in found.values():
        try:
            pooling, features = pooling_for(value)
        except OnnxcompError as err:
            logger.info("not a cut: %s", err)
            continue
        if features is not None and features > MAX_FEATURES:
            logger.info("not a cut: %s has %d features (> %d)", value.name, features, MAX_FEATURES)
            continue
        if id(value) in outputs and "model output" not in kind:
            kind = f"{kind}, model output"
        producer = value.producer()
        cuts.append(
            Cut(
                tensor=value.name or "",
                kind=kind,
                shape=_dims(value),
                pooling=pooling,
                features=features,
                position=order.get(id(producer), -1),
                op=producer.op_type if producer is not None else None,
            )
        )
        cuts[-1]._preference = preference  # type: ignore[attr-defined]
    # Transformer states: the mean over tokens first, the CLS token as a second reading.
    for cut in [c for c in cuts if c.pooling == "mean_tokens"]:
        twin = dataclasses.replace(cut, pooling="first_token", kind=cut.kind + ", first token")
        twin._preference = cut._preference + 1  # type: ignore[attr-defined]
        cuts.append(twin)
    cuts.sort(key=lambda c: (c._preference, -c.position))  # type: ignore[attr-defined]
    # A Flatten or Reshape of a [N, C, 1, 1] candidate gives the same features: keep one.
    values = {v.name: v for n in nodes for v in n.outputs}
    kept, origins = [], set()
    for cut in cuts:
        flat = "flat" if cut.pooling in ("none", "flatten") else cut.pooling
        origin = (_origin(values[cut.tensor]), cut.features, flat)
        if origin in origins:
            continue
        origins.add(origin)
        kept.append(cut)
    cuts = kept
    for rank, cut in enumerate(cuts):
        cut.rank = rank
        del cut._preference  # type: ignore[attr-defined]
    return cuts[:limit] if limit else cuts


def _computed_by_a_layer(value: ir.Value) -> bool:
    """Whether an output comes from a Gemm/MatMul (logits, probabilities), not from pooling."""
    node = value.producer()
    while node is not None and node.op_type in (
        "Softmax",
        "Sigmoid",
        "Identity",
        "Add",
        "LogSoftmax",
    ):
        node = node.inputs[0].producer() if node.inputs[0] is not None else None
    return node is not None and node.op_type in ("Gemm", "MatMul")


RESHAPING_OPS = {"Reshape", "Flatten", "Identity", "Squeeze", "Unsqueeze", "Dropout"}


def _origin(value: ir.Value) -> int:
    """The value ``value`` is a reshaped view of (itself when none)."""
    while value.producer() is not None and value.producer().op_type in RESHAPING_OPS:
        value = value.producer().inputs[0]
    return id(value)


def resolve_cut(model: ir.Model, at: str, pooling: Pooling | None = None) -> Cut:
    """The cut at tensor ``at`` (a name the user gave), checked."""
    model_io.normalize(model)
    value = find_value(model, at)
    if not _is_float(value):
        raise OnnxcompError(f"tensor {at!r} is {value.dtype}, a cut needs a float tensor")
    default, features = pooling_for(value)
    pooling = pooling or default
    nodes = list(model.graph)
    producer = value.producer()
    return Cut(
        tensor=at,
        kind="chosen",
        shape=_dims(value),
        pooling=pooling,
        features=features,
        position=nodes.index(producer) if producer is not None else -1,
        op=producer.op_type if producer is not None else None,
    )


def find_value(model: ir.Model, name: str) -> ir.Value:
    """The main-graph value called ``name``; OnnxcompError with close names when absent."""
    for node in model.graph:
        for value in node.outputs:
            if value.name == name:
                return value
    for value in model.graph.inputs:
        if value.name == name:
            raise OnnxcompError(f"tensor {name!r} is a model input; a cut must be computed")
    import difflib

    names = [v.name for n in model.graph for v in n.outputs if v.name]
    close = difflib.get_close_matches(name, names, n=3)
    hint = f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""
    raise OnnxcompError(
        f"the model has no tensor named {name!r}{hint}; `onnxcomp transfer cuts MODEL` lists candidates"
    )


def extract(model: ir.Model, at: str) -> ir.Model:
    """The backbone: ``model`` with ``at`` as its only output and everything after it removed.

    Inputs stay as they are (unused ones too, so the caller feeds the same data). In place.
    """
    value = find_value(model, at)
    if value.shape is None:
        raise OnnxcompError(f"tensor {at!r} has unknown rank; cannot make it a model output")
    model.graph.outputs.clear()
    model.graph.outputs.append(value)
    drop_unused(model)
    return model
