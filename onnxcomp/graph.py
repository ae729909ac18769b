"""Graph queries and the one graph editor every capability uses.

Queries follow ``ir.Value`` edges: the node computing a value (``producer``), the single node
reading it (``only_use``), a value's constant array or scalar (``const``, ``scalar``), its rank
and dims. The editor side makes fresh names (``NameSource``), registers initializers
(``add_initializer``), moves the readers of one value onto another (``replace_uses``), removes
what nothing reads (``drop_unused``) and forgets shapes our own inference added
(``strip_inferred_shapes``). Nothing here knows what an op means: that lives in ``ops.py``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from typing import Any

import numpy as np
import onnx_ir as ir

logger = logging.getLogger(__name__)

DEFAULT_DOMAINS = ("", "ai.onnx")

# ---------------------------------------------------------------------------------------------
# Queries


def const(value: ir.Value | None) -> np.ndarray | None:
    """The value's constant array, or None when it is computed or may be fed at run time.

    An initializer that is also a graph input is not a constant: the caller may override it.
    Constant nodes count once ``model.normalize`` has lifted them; before that, see ``const_node``.
    """
    if value is None or value.const_value is None or value.is_graph_input():
        return None
    return value.const_value.numpy()


def const_or_node(value: ir.Value | None) -> np.ndarray | None:
    """Like ``const``, and also the array of a ``Constant`` node's output (not yet lifted)."""
    array = const(value)
    if array is not None or value is None:
        return array
    node = value.producer()
    if node is None or node.op_type != "Constant" or node.domain not in DEFAULT_DOMAINS:
        return None
    if len(node.attributes) != 1:
        return None
    attribute = next(iter(node.attributes.values()))
    if attribute.name == "value":
        return attribute.value.numpy()
    if attribute.name in ("value_float", "value_floats"):
        return np.asarray(attribute.value, np.float32)
    if attribute.name in ("value_int", "value_ints"):
        return np.asarray(attribute.value, np.int64)
    return None


def const_size(value: ir.Value) -> int | None:
    """Element count of the value's constant, read from its shape (the data is not loaded)."""
    tensor = value.const_value
    if tensor is None or tensor.shape is None:
        return None
    return int(np.prod(tensor.shape.numpy()))


def scalar(value: ir.Value | None, like: ir.Value | None = None) -> float | None:
    """The number a one-element numeric constant holds, or None.

    With ``like``, the constant must not raise the rank of ``like`` by broadcasting.
    """
    if value is None or value.const_value is None or value.is_graph_input():
        return None
    if const_size(value) != 1:
        return None
    array = value.const_value.numpy()
    if array.dtype.kind not in "fiu":
        return None
    if like is not None and array.ndim > 1:
        r = rank(like)
        if r is None or array.ndim > r:
            return None
    return float(array.reshape(-1)[0])


def close(a: float | None, b: float, rel: float = 1e-5) -> bool:
    """``a`` is known and equal to ``b`` within ``rel``."""
    return a is not None and math.isclose(a, b, rel_tol=rel, abs_tol=rel * 1e-3)


def producer(value: ir.Value | None, *op_types: str) -> ir.Node | None:
    """The node computing ``value`` when it is one of ``op_types`` in the default domain."""
    if value is None:
        return None
    node = value.producer()
    if node is None or node.domain not in DEFAULT_DOMAINS or node.op_type not in op_types:
        return None
    return node


def home_graph(value: ir.Value) -> ir.Graph | None:
    """The graph computing ``value`` (or holding it as an input or initializer); an If branch
    reading it from an outer scope is not its home."""
    node = value.producer()
    return node.graph if node is not None else value.graph


def users(value: ir.Value) -> list[ir.Node]:
    """The distinct nodes reading ``value``, in use order."""
    seen: dict[int, ir.Node] = {}
    for use in value.uses():
        seen.setdefault(id(use.node), use.node)
    return list(seen.values())


def only_use(value: ir.Value) -> ir.Node | None:
    """The single node reading ``value`` (once or more), when it is not also a graph output."""
    if value.is_graph_output():
        return None
    found = users(value)
    return found[0] if len(found) == 1 else None


def split_const(node: ir.Node) -> tuple[ir.Value | None, ir.Value | None]:
    """For a binary op with one constant input: (the other input, the constant).

    The constant may come first only for the commutative Add and Mul.
    """
    if len(node.inputs) != 2:
        return None, None
    a, b = node.inputs
    if b is not None and b.const_value is not None and not b.is_graph_input():
        return a, b
    if (
        node.op_type in ("Add", "Mul")
        and a is not None
        and a.const_value is not None
        and not a.is_graph_input()
    ):
        return b, a
    return None, None


def other_input(node: ir.Node, value: ir.Value) -> ir.Value | None:
    """The other input of a binary node that reads ``value``."""
    if len(node.inputs) != 2:
        return None
    a, b = node.inputs
    if a is value:
        return b
    if b is value:
        return a
    return None


def attr(node: ir.Node, name: str, default: Any = None) -> Any:
    """The attribute's value, or ``default`` when the node does not set it."""
    a = node.attributes.get(name)
    return default if a is None else a.value


def rank(value: ir.Value | None) -> int | None:
    return len(value.shape) if value is not None and value.shape is not None else None


def dims(value: ir.Value | None) -> list[int | None] | None:
    """The value's dims, None for each symbolic one; None when the rank is unknown."""
    if value is None or value.shape is None:
        return None
    return [d if isinstance(d, int) else None for d in value.shape]


def same_dim(a: int | ir.SymbolicDim | None, b: int | ir.SymbolicDim | None) -> bool:
    """Two dims known to be equal: the same number, or the same named symbolic dim."""
    if isinstance(a, int) or isinstance(b, int):
        return a == b
    return a is not None and b is not None and a.value is not None and a.value == b.value


def label(node: ir.Node) -> str:
    """How reports name a node."""
    return node.name or f"<{node.op_type}>"


# ---------------------------------------------------------------------------------------------
# The editor


class NameSource:
    """Fresh value and node names that collide with nothing in the model (or one graph)."""

    def __init__(self, where: ir.Model | ir.Graph):
        self.used: set[str] = set()
        graphs = where.graphs() if isinstance(where, ir.Model) else [where]
        for graph in graphs:
            self.used.update(graph.initializers)
            for value in graph.inputs:
                self.used.add(value.name or "")
            for node in graph:
                self.used.add(node.name or "")
                for value in node.outputs:
                    self.used.add(value.name or "")

    def __call__(self, hint: str) -> str:
        base = hint or "onnxcomp"
        name, i = base, 1
        while name in self.used:
            name = f"{base}_{i}"
            i += 1
        self.used.add(name)
        return name


def unique_names(model: ir.Model) -> int:
    """Rename the node outputs whose name another value of the model already has (the main
    graph's names win, then outer graphs'); returns how many were renamed.

    onnx-ir names the values new nodes write per graph (``val_0``, ...); onnxruntime wants one
    name per value across a model and its If/Loop branches."""
    seen: set[str] = set()
    renamed = 0
    names = NameSource(model)
    for graph in model.graphs():
        for value in [*graph.inputs, *graph.initializers.values()]:
            seen.add(value.name or "")
        for node in graph:
            for value in node.outputs:
                if value.name and value.name in seen:
                    value.name = names(value.name)
                    renamed += 1
                seen.add(value.name or "")
    return renamed


def add_initializer(
    graph: ir.Graph,
    hint: str,
    array: np.ndarray,
    names: NameSource | None = None,
    dtype: ir.DataType | None = None,
) -> ir.Value:
    """Register ``array`` in ``graph`` as a new initializer named after ``hint``.

    Without ``names`` the name is made unique among the graph's initializers only. ``dtype``
    for the types numpy lacks (4-bit: ``array`` holds one code per byte).
    """
    array = np.asarray(array)
    if names is not None:
        name = names(hint)
    else:
        name, i = hint, 1
        while name in graph.initializers:
            name = f"{hint}_{i}"
            i += 1
    tensor = ir.Tensor(array, dtype=dtype, name=name) if dtype else ir.tensor(array, name=name)
    value = ir.Value(
        name=name, shape=ir.Shape(tensor.shape), type=ir.TensorType(tensor.dtype), const_value=tensor
    )
    graph.register_initializer(value)
    return value


def replace_uses(
    old: ir.Value, new: ir.Value, *, old_suffix: str = "__replaced", take_name: bool = False
) -> None:
    """Make every reader of ``old`` read ``new``; a graph output keeps its name.

    When ``old`` is a graph output (or always, with ``take_name``), ``new`` takes over its name
    and ``old`` is renamed with ``old_suffix``. ``new`` inherits ``old``'s type and shape where
    it has none (with ``take_name``: always, as the value it stands for).
    """
    renamed = take_name or old.is_graph_output()
    name = old.name
    if take_name:
        new.shape, new.type = old.shape, old.type
    ir.convenience.replace_all_uses_with(old, new, replace_graph_outputs=True)
    if renamed:
        old.name = f"{name}{old_suffix}"
        new.name = name
    if new.type is None:
        new.type = old.type
    if new.shape is None:
        new.shape = old.shape


def can_replace_output(value: ir.Value, source: ir.Value) -> str | None:
    """Why ``value`` (a graph output) cannot be replaced by ``source``, or None."""
    if value.is_graph_output() and (
        source.is_graph_input()
        or source.is_graph_output()
        or source.is_initializer()
        or source.producer() is None
    ):
        return "its output is a graph output fed straight from a graph input or constant"
    return None


def drop_unused_initializers(graph: ir.Graph, candidates: Iterable[ir.Value | None]) -> int:
    """Unregister the ``candidates`` that are initializers nothing reads any more."""
    dropped = 0
    for value in candidates:
        if (
            value is not None
            and value.is_initializer()
            and not value.uses()
            and not value.is_graph_output()
            and not value.is_graph_input()
            and value.name in graph.initializers
            and graph.initializers[value.name] is value
        ):
            graph.initializers.pop(value.name)
            dropped += 1
    return dropped


def drop_unused(model: ir.Model) -> None:
    """Remove nodes and initializers whose results nothing reads (subgraphs included)."""
    from onnx_ir.passes.common import RemoveUnusedNodesPass

    RemoveUnusedNodesPass()(model)
    # onnx-ir's pass drops unused initializers of the main graph only; those of If/Loop branches
    # (a folded LSTM weight's original, say) would otherwise be saved, unread.
    for graph in model.graphs():
        if graph is not model.graph:
            drop_unused_initializers(graph, list(graph.initializers.values()))


def annotated_values(model: ir.Model) -> set[str]:
    """Names of the intermediate values the model gives a type or shape for (value_info)."""
    names = set()
    for graph in model.graphs():
        for node in graph:
            for value in node.outputs:
                if value.name and (value.type is not None or value.shape is not None):
                    names.add(value.name)
    return names


def strip_inferred_shapes(
    graphs: ir.Model | ir.Graph, keep: set[str] | None = None, *, types: bool = True
) -> int:
    """Forget the shapes (and, with ``types``, the types) of intermediate values.

    Graph outputs and values named in ``keep`` (what the input model annotated, see
    ``annotated_values``) are left alone. Returns the number of values changed. Why: inferred
    shapes are written out as value_info, and onnxruntime runs a model carrying them slower
    (all-MiniLM-L6-v2 at 1 thread: 1.13-1.15x), or fuses residual Add + LayerNormalization into
    its slower SkipLayerNormalization.
    """
    keep = keep or set()
    changed = 0
    for graph in graphs.graphs() if isinstance(graphs, ir.Model) else [graphs]:
        outputs = {id(v) for v in graph.outputs}
        for node in graph:
            for value in node.outputs:
                if id(value) in outputs or value.name in keep:
                    continue
                if value.shape is not None or (types and value.type is not None):
                    changed += 1
                value.shape = None
                if types:
                    value.type = None
    return changed


def _residual_layernorms(graph: ir.Graph) -> list[ir.Node]:
    """LayerNormalizations fed by an Add of two run-time tensors: what onnxruntime fuses into
    SkipLayerNormalization when the shapes prove both Add inputs alike."""
    found = []
    for node in graph:
        if node.op_type != "LayerNormalization" or node.domain not in ("", "ai.onnx"):
            continue
        add = node.inputs[0].producer() if node.inputs and node.inputs[0] is not None else None
        if add is None or add.op_type != "Add" or add.domain not in ("", "ai.onnx"):
            continue
        if all(v is not None and v.const_value is None for v in add.inputs):
            found.append(node)
    return found


def drop_shapes_before_skip_layernorm(graph: ir.Graph) -> int:
    """Forget the inferred shapes of the intermediate values when the graph has a residual Add + LayerNormalization.

    onnxruntime (1.32) fuses the pair into SkipLayerNormalization only when the shapes of both Add inputs are known
    and equal; its CPU kernel is 3-5x slower than Add + LayerNormalization. Without stored shapes onnxruntime infers
    its own, loses the sequence dimension at the attention Reshapes and keeps the faster pair, as it does for the
    exported model. Graph inputs and outputs keep their shapes; types are kept. Returns the number of values changed.
    """
    if not _residual_layernorms(graph):
        return 0
    dropped = strip_inferred_shapes(graph, types=False)
    if dropped:
        logger.info(
            "dropped the inferred shapes of %d values: with them onnxruntime fuses residual Add + "
            "LayerNormalization into its slower SkipLayerNormalization",
            dropped,
        )
    return dropped
