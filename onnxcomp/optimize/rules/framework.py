"""The rule framework: a rule is a pattern, a check and a rewrite.

A rule looks at one anchor node (``Rule.anchors``) and returns a :class:`Match` when the whole
pattern fits, a reason string when the pattern is there but a check fails (a near-miss the user
sees in the report: "Clip bounds are (0, 5), not (0, 6)"), or None when the node is simply not
the start of this pattern. Rewrites run only after all matches of a round are collected.

Graph queries and edits come from ``onnxcomp.graph``, op facts from ``onnxcomp.ops``; this module
holds what rules share beyond them: which opset a fused op needs, and small pattern helpers.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import onnx_ir as ir

from onnxcomp.graph import NameSource, attr, const, other_input, replace_uses, scalar

# The opset a fused op needs (first version of the op in the default domain).
TARGET_OPSET = {
    "Clip": 6,
    "HardSigmoid": 6,
    "HardSwish": 14,
    "LayerNormalization": 17,
    "Gelu": 20,
    "Swish": 24,
}

# Why the model is not upgraded for a fused op. onnxruntime's own fusions match op versions, so
# an upgrade can cost more than the fusion gains: measured on a BERT graph at 1 thread, opset
# 17 -> 20 alone made it 1.27x slower, and onnxruntime already fuses the erf-GELU chain itself.
NO_UPGRADE = {
    "Gelu": "onnxruntime fuses this chain itself, and upgrading to opset 20 slowed a BERT 1.27x",
}


# ---------------------------------------------------------------------------------------------
# Matches and rules


@dataclasses.dataclass
class Match:
    """A place where a rule applies: the nodes it replaces and what the rewrite needs."""

    rule: str
    anchor: ir.Node
    nodes: list[ir.Node]  # nodes the rewrite removes or changes (claimed for this round)
    data: dict[str, Any] = dataclasses.field(default_factory=dict)


class Rule:
    """A pattern / check / rewrite rule (see the module docstring)."""

    name: str = ""
    description: str = ""
    anchors: tuple[str, ...] = ()  # empty: every node is an anchor
    target_op: str | None = None  # the op the rewrite writes, when it needs an opset
    default: bool = True
    opset: int = 0  # the model's default-domain opset, set by the optimizer before each round

    @property
    def target_opset(self) -> int:
        return TARGET_OPSET.get(self.target_op or "", 0)

    def match(self, node: ir.Node) -> Match | str | None:
        raise NotImplementedError

    def rewrite(self, match: Match, names: NameSource) -> None:
        raise NotImplementedError


def scale_by(node: ir.Node, x: ir.Value) -> float | None:
    """The factor ``node`` multiplies ``x`` by: Mul(x, c) gives c, Div(x, c) gives 1/c."""
    if node.op_type == "Mul":
        c = other_input(node, x)
        v = scalar(c, like=x)
        return v
    if node.op_type == "Div" and node.inputs[0] is x:
        v = scalar(node.inputs[1], like=x)
        return None if not v else 1.0 / v
    return None


def clip_bounds(node: ir.Node) -> tuple[float | None, float | None] | None:
    """(min, max) of a Clip; None when a bound is computed at run time."""
    if "min" in node.attributes or "max" in node.attributes:  # opset < 11
        return attr(node, "min", -math.inf), attr(node, "max", math.inf)
    lo = node.inputs[1] if len(node.inputs) > 1 else None
    hi = node.inputs[2] if len(node.inputs) > 2 else None
    lo_v = -math.inf if lo is None else scalar(lo)
    hi_v = math.inf if hi is None else scalar(hi)
    if lo_v is None or hi_v is None:
        return None
    return lo_v, hi_v


def reduce_axes(node: ir.Node) -> list[int] | None | str:
    """The axes a Reduce* node reduces (attribute or input); a reason string when unknown."""
    axes = attr(node, "axes")
    if axes is None and len(node.inputs) > 1 and node.inputs[1] is not None:
        array = const(node.inputs[1])
        if array is None:
            return "axes are computed at run time"
        axes = array.reshape(-1).tolist()
    if axes is None or len(axes) == 0:
        return "reduces over all axes"
    return [int(a) for a in axes]


def fmt(v: float | None) -> str:
    return "?" if v is None else f"{v:g}"


def replace_chain(
    match: Match,
    op_type: str,
    inputs: Sequence[ir.Value | None],
    out: ir.Value,
    names: NameSource,
    attributes: dict[str, Any] | None = None,
) -> ir.Node:
    """Replace ``match.nodes`` (which compute ``out``) with one ``op_type`` node."""
    last = out.producer()
    assert last is not None
    graph = last.graph
    assert graph is not None
    node = ir.node(
        op_type, list(inputs), attributes=attributes or {}, name=names(f"{last.name}_{op_type}")
    )
    graph.insert_after(last, node)
    replace_uses(out, node.outputs[0])
    graph.remove(match.nodes, safe=True)
    return node
