"""Clean-up rules: Identity and inference-mode Dropout removal, Reshape targets computed from
run-time shapes written as constants."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxcomp.graph import (
    add_initializer,
    attr,
    can_replace_output,
    const,
    producer,
    replace_uses,
    same_dim,
)
from onnxcomp.optimize.rules.framework import Match, Rule


class IdentityRule(Rule):
    name = "identity"
    description = "Identity and inference-mode Dropout removed"
    anchors = ("Identity", "Dropout")

    def match(self, node):
        if node.domain not in ("", "ai.onnx"):
            return None
        source, out = node.inputs[0], node.outputs[0]
        if source is None:
            return None
        if node.op_type == "Dropout":
            if len(node.outputs) > 1 and (
                node.outputs[1].uses() or node.outputs[1].is_graph_output()
            ):
                return "its mask output is used"
            mode = node.inputs[2] if len(node.inputs) > 2 else None
            if mode is not None and (const(mode) is None or bool(const(mode).reshape(-1)[0])):
                return "training_mode is not a constant false"
            if attr(node, "is_test", 1) == 0 and "is_test" in node.attributes:
                return "is_test=0"
        reason = can_replace_output(out, source)
        if reason:
            return reason
        owner = source.producer().graph if source.producer() is not None else source.graph
        if out.is_graph_output() and owner is not node.graph:
            return "its output is a subgraph output fed from the outer scope"
        if out.is_graph_output() and source.is_graph_output():
            return "both its input and output are graph outputs"
        return Match(self.name, node, [node], {"source": source})

    def rewrite(self, match, names):
        node = match.anchor
        graph = node.graph
        replace_uses(node.outputs[0], match.data["source"])
        graph.remove(node, safe=True)


class ReshapeShapeRule(Rule):
    """A Reshape whose target shape is computed from run-time shapes, where each computed piece
    is a dim the Reshape would keep anyway: written as a constant with 0 ("copy this dim")."""

    name = "reshape-shape"
    description = "Reshape(x, Concat(Shape(x)[i], ..., consts)) → Reshape(x, [0, ..., consts])"
    anchors = ("Reshape",)

    def match(self, node):
        if attr(node, "allowzero", 0):
            return None
        x, target = node.inputs
        concat = producer(target, "Concat")
        if x is None or concat is None or attr(concat, "axis", 0) not in (0, -1) or x.shape is None:
            return None
        values: list[int] = []
        computed = False
        for piece in concat.inputs:
            array = const(piece)
            if array is not None:
                if array.ndim != 1 or array.dtype.kind not in "iu":
                    return None
                values += [int(v) for v in array]
                continue
            dims_of = _shape_dims(piece)
            if dims_of is None:
                return None
            src, indices = dims_of
            for idx in indices:
                p = len(values)
                if (
                    src.shape is None
                    or p >= len(x.shape)
                    or not -len(src.shape) <= idx < len(src.shape)
                ):
                    return (
                        f"shape piece at position {p} cannot be checked against the input's shape"
                    )
                have, want = src.shape[idx % len(src.shape)], x.shape[p]
                if isinstance(have, int) and isinstance(want, int) and have == want:
                    values.append(have)
                elif (src is x and idx % len(src.shape) == p) or same_dim(have, want):
                    values.append(0)
                else:
                    return f"dim {p} of the target comes from a dim not shown equal to the input's"
                computed = True
        if not computed:
            return None
        if values.count(-1) > 1:
            return "more than one -1 in the target shape"
        return Match(self.name, node, [node], {"shape": np.array(values, np.int64)})

    def rewrite(self, match, names):
        node = match.anchor
        value = add_initializer(node.graph, f"{node.name}_shape", match.data["shape"])
        node.replace_input_with(1, value)


def _shape_dims(value: ir.Value) -> tuple[ir.Value, list[int]] | None:
    """``value`` as dims of a tensor's run-time shape: (tensor, dim indices), or None.

    Recognizes Shape(t), Shape(t)[a:b] (Slice or Shape's start/end) and Gather(Shape(t), i),
    optionally wrapped in Unsqueeze.
    """
    node = value.producer()
    if node is not None and node.op_type == "Unsqueeze":
        node = node.inputs[0].producer() if node.inputs[0] is not None else None
        if node is None or node.op_type != "Gather":
            return None
    if node is None or node.domain not in ("", "ai.onnx"):
        return None
    if node.op_type == "Shape":
        t = node.inputs[0]
        if t is None or t.shape is None:
            return None
        r = len(t.shape)
        start, end = attr(node, "start", 0), attr(node, "end", r)
        return t, list(range(r))[start:end]
    if node.op_type in ("Gather", "Slice"):
        shape_node = producer(node.inputs[0], "Shape")
        if shape_node is None or shape_node.attributes:
            return None
        t = shape_node.inputs[0]
        if t is None or t.shape is None:
            return None
        r = len(t.shape)
        if node.op_type == "Gather":
            idx = const(node.inputs[1])
            if idx is None or idx.size != 1:
                return None
            return t, [int(idx.reshape(-1)[0]) % r]
        parts = [const(v) if v is not None else None for v in node.inputs[1:]]
        if len(parts) < 2 or parts[0] is None or parts[1] is None:
            return None
        if len(parts) > 3 and parts[3] is not None and int(parts[3].reshape(-1)[0]) != 1:
            return None
        start, end = int(parts[0].reshape(-1)[0]), int(parts[1].reshape(-1)[0])
        return t, list(range(r))[start:end]
    return None
