"""Rewrite rules for graph clean-up: each is a pattern, a check and a rewrite.

A rule looks at one anchor node (``Rule.anchors``) and returns a :class:`Match` when the whole
pattern fits, a reason string when the pattern is there but a check fails (a near-miss the user
sees in the report: "Clip bounds are (0, 5), not (0, 6)"), or None when the node is simply not
the start of this pattern. Rewrites run only after all matches of a round are collected.

Op knowledge (which input is the weight, which axis is the output channel, which ops are never
folded, which opset a fused op needs) is kept in the tables at the top.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

logger = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------
# Tables


@dataclasses.dataclass(frozen=True)
class LinearOp:
    """How a linear op stores its weight: which input, which weight axis is the output channel."""

    weight: int
    bias: int
    # "conv": W is [M, C/g, k...]; "conv_transpose": W is [C, M/g, k...]; "gemm": depends on transB
    layout: str


LINEAR_OPS: dict[str, LinearOp] = {
    "Conv": LinearOp(weight=1, bias=2, layout="conv"),
    "ConvTranspose": LinearOp(weight=1, bias=2, layout="conv_transpose"),
    "Gemm": LinearOp(weight=1, bias=2, layout="gemm"),
}

# Ops whose result is never computed ahead of time: random, quantization boundaries that
# onnxruntime folds into integer kernels, and ops with side inputs from the outside world.
NEVER_FOLD = {
    "RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Multinomial",
    "Bernoulli", "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear",
    "If", "Loop", "Scan", "Constant",
}

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

# Above this many elements a constant is not read just to look at it.
_PEEK_LIMIT = 1 << 16


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


class NameSource:
    """Fresh value and node names that collide with nothing in the model."""

    def __init__(self, model: ir.Model):
        self.used: set[str] = set()
        for graph in model.graphs():
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


# ---------------------------------------------------------------------------------------------
# Small graph queries


def const(value: ir.Value | None) -> np.ndarray | None:
    """The value's constant array, or None when it is computed or may be fed at run time."""
    if value is None or value.const_value is None or value.is_graph_input():
        return None
    return value.const_value.numpy()


def _size(value: ir.Value) -> int | None:
    tensor = value.const_value
    if tensor is None:
        return None
    return int(np.prod(tensor.shape.numpy())) if tensor.shape is not None else None


def scalar(value: ir.Value | None, like: ir.Value | None = None) -> float | None:
    """The number a one-element constant holds, or None.

    With ``like``, the constant must not raise the rank of ``like`` by broadcasting.
    """
    if value is None or value.const_value is None or value.is_graph_input():
        return None
    size = _size(value)
    if size != 1:
        return None
    array = value.const_value.numpy()
    if array.dtype.kind not in "fiu":
        return None
    if like is not None and array.ndim > 1:
        rank = len(like.shape) if like.shape is not None else None
        if rank is None or array.ndim > rank:
            return None
    return float(array.reshape(-1)[0])


def close(a: float | None, b: float, rel: float = 1e-5) -> bool:
    return a is not None and math.isclose(a, b, rel_tol=rel, abs_tol=rel * 1e-3)


def producer(value: ir.Value | None, *op_types: str) -> ir.Node | None:
    """The node computing ``value`` when it is one of ``op_types`` in the default domain."""
    if value is None:
        return None
    node = value.producer()
    if node is None or node.domain not in ("", "ai.onnx") or node.op_type not in op_types:
        return None
    return node


def only_use(value: ir.Value) -> ir.Node | None:
    """The single node reading ``value`` (once or more), when it is not also a graph output."""
    if value.is_graph_output():
        return None
    users = {id(u.node): u.node for u in value.uses()}
    if len(users) != 1:
        return None
    return next(iter(users.values()))


def users(value: ir.Value) -> list[ir.Node]:
    seen: dict[int, ir.Node] = {}
    for use in value.uses():
        seen.setdefault(id(use.node), use.node)
    return list(seen.values())


def split_const(node: ir.Node) -> tuple[ir.Value | None, ir.Value | None]:
    """For a binary op with one constant input: (the other input, the constant)."""
    if len(node.inputs) != 2:
        return None, None
    a, b = node.inputs
    if b is not None and b.const_value is not None and not b.is_graph_input():
        return a, b
    if node.op_type in ("Add", "Mul") and a is not None and a.const_value is not None and not a.is_graph_input():
        return b, a
    return None, None


def other_input(node: ir.Node, value: ir.Value) -> ir.Value | None:
    """The other input of a commutative binary node that reads ``value``."""
    if len(node.inputs) != 2:
        return None
    a, b = node.inputs
    if a is value:
        return b
    if b is value:
        return a
    return None


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


def attr(node: ir.Node, name: str, default: Any = None) -> Any:
    a = node.attributes.get(name)
    return default if a is None else a.value


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


def rank(value: ir.Value) -> int | None:
    return len(value.shape) if value.shape is not None else None


def dims(value: ir.Value) -> list[int | None] | None:
    if value.shape is None:
        return None
    return [d if isinstance(d, int) else None for d in value.shape]


def fmt(v: float | None) -> str:
    return "?" if v is None else f"{v:g}"


# ---------------------------------------------------------------------------------------------
# Rewrite helpers


def new_const(graph: ir.Graph, names: NameSource, hint: str, array: np.ndarray) -> ir.Value:
    """Register a new initializer in ``graph`` holding ``array``."""
    name = names(hint)
    value = ir.Value(
        name=name,
        shape=ir.Shape(array.shape),
        type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
        const_value=ir.tensor(array, name=name),
    )
    graph.register_initializer(value)
    return value


def rewire(old: ir.Value, new: ir.Value) -> None:
    """Make every reader of ``old`` read ``new``; a graph output keeps its name."""
    was_output = old.is_graph_output()
    name = old.name
    ir.convenience.replace_all_uses_with(old, new, replace_graph_outputs=True)
    if was_output:
        old.name = f"{name}__replaced"
        new.name = name
    if new.type is None:
        new.type = old.type
    if new.shape is None:
        new.shape = old.shape


def replace_chain(match: Match, op_type: str, inputs: Sequence[ir.Value | None], out: ir.Value,
                  names: NameSource, attributes: dict[str, Any] | None = None) -> ir.Node:
    """Replace ``match.nodes`` (which compute ``out``) with one ``op_type`` node."""
    last = out.producer()
    assert last is not None
    graph = last.graph
    assert graph is not None
    node = ir.node(op_type, list(inputs), attributes=attributes or {}, name=names(f"{last.name}_{op_type}"))
    graph.insert_after(last, node)
    rewire(out, node.outputs[0])
    graph.remove(match.nodes, safe=True)
    return node


def can_replace_output(value: ir.Value, source: ir.Value) -> str | None:
    """Why ``value`` (a graph output) cannot be replaced by ``source``, or None."""
    if value.is_graph_output() and (
        source.is_graph_input() or source.is_graph_output() or source.is_initializer()
        or source.producer() is None
    ):
        return "its output is a graph output fed straight from a graph input or constant"
    return None


# ---------------------------------------------------------------------------------------------
# Rules: activations


class HardSwishRule(Rule):
    name = "hard-swish"
    description = "x·Clip(x+3, 0, 6)/6 (or x·HardSigmoid(x)) → HardSwish"
    anchors = ("Clip", "HardSigmoid")
    target_op = "HardSwish"

    def match(self, node):
        if node.op_type == "HardSigmoid":
            return self._match_hardsigmoid(node)
        head = _match_relu6_plus3(node)
        if head is None or isinstance(head, str):
            return head
        add, x = head
        clip_out = node.outputs[0]
        nxt = only_use(clip_out)
        if nxt is None:
            return None
        if nxt.op_type == "Mul" and other_input(nxt, clip_out) is x:
            tail = only_use(nxt.outputs[0])
            if tail is None or tail.op_type not in ("Div", "Mul"):
                return None
            factor = scale_by(tail, nxt.outputs[0])
            if factor is None:
                return None
            if not close(factor, 1 / 6):
                return f"x·Clip(x+3, 0, 6) is scaled by {fmt(factor)}, not 1/6"
            return Match(self.name, node, [add, node, nxt, tail], {"x": x, "out": tail.outputs[0]})
        if nxt.op_type in ("Div", "Mul"):
            factor = scale_by(nxt, clip_out)
            if factor is None or not close(factor, 1 / 6):
                return None  # not a hard-sigmoid; the hard-sigmoid rule says why
            mul = only_use(nxt.outputs[0])
            if mul is None or mul.op_type != "Mul" or other_input(mul, nxt.outputs[0]) is not x:
                return None  # a hard-sigmoid gating another tensor
            return Match(self.name, node, [add, node, nxt, mul], {"x": x, "out": mul.outputs[0]})
        return None

    def _match_hardsigmoid(self, node):
        x = node.inputs[0]
        mul = only_use(node.outputs[0])
        if mul is None or mul.op_type != "Mul" or other_input(mul, node.outputs[0]) is not x:
            return None
        alpha, beta = attr(node, "alpha", 0.2), attr(node, "beta", 0.5)
        if not (close(alpha, 1 / 6) and close(beta, 0.5)):
            return f"x·HardSigmoid(x) has alpha={fmt(alpha)}, beta={fmt(beta)}, not 1/6, 0.5"
        return Match(self.name, node, [node, mul], {"x": x, "out": mul.outputs[0]})

    def rewrite(self, match, names):
        replace_chain(match, "HardSwish", [match.data["x"]], match.data["out"], names)


def _match_relu6_plus3(clip: ir.Node) -> tuple[ir.Node, ir.Value] | str | None:
    """Clip(Add(x, 3), 0, 6): (the Add, x), a near-miss reason, or None."""
    add = producer(clip.inputs[0], "Add")
    if add is None:
        return None
    x, c = split_const(add)
    if x is None:
        return None
    shift = scalar(c, like=x)
    bounds = clip_bounds(clip)
    if shift is None:
        return None
    if bounds is None:
        return "Clip bounds are computed at run time"
    if not close(shift, 3.0):
        return None if bounds != (0.0, 6.0) else f"Clip(x + {fmt(shift)}, 0, 6): the shift is not 3"
    if bounds != (0.0, 6.0):
        return f"Clip bounds are ({fmt(bounds[0])}, {fmt(bounds[1])}), not (0, 6)"
    if only_use(add.outputs[0]) is not clip:
        return "x + 3 is also used elsewhere"
    return add, x


class HardSigmoidRule(Rule):
    name = "hard-sigmoid"
    description = "Clip(x+3, 0, 6)/6 or Clip(a·x + b, 0, 1) → HardSigmoid"
    anchors = ("Clip",)
    target_op = "HardSigmoid"

    def match(self, node):
        if clip_bounds(node) == (0.0, 1.0):
            return self._match_affine(node)
        head = _match_relu6_plus3(node)
        if head is None or isinstance(head, str):
            return head
        add, x = head
        nxt = only_use(node.outputs[0])
        if nxt is None or nxt.op_type not in ("Div", "Mul"):
            return None
        factor = scale_by(nxt, node.outputs[0])
        if factor is None:
            return None
        if not close(factor, 1 / 6):
            return f"Clip(x+3, 0, 6) is scaled by {fmt(factor)}, not 1/6"
        return Match(self.name, node, [add, node, nxt],
                     {"x": x, "out": nxt.outputs[0], "alpha": 1.0 / 6.0, "beta": 0.5})

    def _match_affine(self, clip):
        """Clip(a·x + b, 0, 1), as TensorFlow and older Paddle2ONNX write hard-sigmoid."""
        add = producer(clip.inputs[0], "Add")
        if add is None:
            return None
        ax, b = split_const(add)
        mul = producer(ax, "Mul", "Div")
        beta = scalar(b, like=ax)
        if mul is None or beta is None:
            return None
        x = mul.inputs[0] if mul.op_type == "Div" else split_const(mul)[0]
        alpha = scale_by(mul, x) if x is not None else None
        if alpha is None:
            return None
        if only_use(ax) is not add or only_use(add.outputs[0]) is not clip:
            return "a·x + b is also used elsewhere"
        return Match(self.name, clip, [mul, add, clip],
                     {"x": x, "out": clip.outputs[0], "alpha": alpha, "beta": beta})

    def rewrite(self, match, names):
        replace_chain(
            match, "HardSigmoid", [match.data["x"]], match.data["out"], names,
            {"alpha": float(match.data["alpha"]), "beta": float(match.data["beta"])},
        )


class Relu6Rule(Rule):
    """ReLU6 written with Min and Max. After a static int8 Conv, a Clip(0, 6) is absorbed by the
    output quantization range and the Conv runs as QLinearConv; Min/Max are not, and leave a
    DequantizeLinear → Max → Min float island per ReLU6 (a MobileNetV2: 0.93x vs 0.37x of fp32)."""

    name = "relu6"
    description = "Min(Max(x, 0), 6), Max(Min(x, 6), 0), Min(Relu(x), 6) → Clip(x, 0, 6)"
    anchors = ("Min", "Max")
    target_op = "Clip"

    def match(self, node):
        v, outer = _with_const(node)
        inner = producer(v, *(("Max", "Relu") if node.op_type == "Min" else ("Min",)))
        if inner is None:
            return None
        if inner.op_type == "Relu":
            x, inner_c = inner.inputs[0], None
        else:
            x, inner_c = _with_const(inner)
        if x is None or (x.const_value is not None and not x.is_graph_input()):
            return None
        lo, hi = (inner_c, outer) if node.op_type == "Min" else (outer, inner_c)
        arrays = [const(c) for c in (outer, inner_c) if c is not None]
        if any(a.dtype.kind != "f" for a in arrays):
            return None
        bounds = []
        for c in (lo, hi):
            if c is None:  # Relu
                bounds.append(0.0)
                continue
            array = const(c)
            if array.size != 1:
                return f"the bound {list(array.shape)} is per element or channel, not one number"
            value = scalar(c, like=x)
            if value is None:
                return f"the bound {list(array.shape)} may broadcast x to a higher rank"
            bounds.append(value)
        if bounds != [0.0, 6.0]:
            return f"Min/Max bounds are ({fmt(bounds[0])}, {fmt(bounds[1])}), not (0, 6)"
        if only_use(v) is not node:
            inner_text = {"Max": "Max(x, 0)", "Min": "Min(x, 6)", "Relu": "Relu(x)"}[inner.op_type]
            return f"{inner_text} is also used elsewhere"
        return Match(self.name, node, [inner, node],
                     {"x": x, "out": node.outputs[0], "bounds": (lo, hi), "dtype": arrays[0].dtype})

    def rewrite(self, match, names):
        x, out, dtype = match.data["x"], match.data["out"], match.data["dtype"]
        if self.opset < 11:  # Clip-6: bounds are attributes
            replace_chain(match, "Clip", [x], out, names, {"min": 0.0, "max": 6.0})
            return
        graph = match.anchor.graph
        inputs = [x]
        for c, number, label in zip(match.data["bounds"], (0.0, 6.0), ("min", "max")):
            # Clip's bounds must be scalars: reuse a 0-d constant, else write one.
            if c is None or c.shape is None or len(c.shape) != 0 or c.graph is not graph:
                c = new_const(graph, names, f"{match.anchor.name}_{label}", np.array(number, dtype))
            inputs.append(c)
        replace_chain(match, "Clip", inputs, out, names)


def _with_const(node: ir.Node) -> tuple[ir.Value | None, ir.Value | None]:
    """For a two-input commutative node (Min, Max) with one constant input: (the other, the constant)."""
    if len(node.inputs) != 2 or None in node.inputs:
        return None, None
    a, b = node.inputs
    if const(b) is not None and const(a) is None:
        return a, b
    if const(a) is not None and const(b) is None:
        return b, a
    return None, None


class SiluRule(Rule):
    name = "silu"
    description = "x·Sigmoid(x) → Swish (opset 24); off by default"
    anchors = ("Sigmoid",)
    target_op = "Swish"
    # onnxruntime 1.32 fuses Sigmoid·Mul itself, and its Swish kernel ran 3x slower here
    # (1x64x80x80: 62 us fused vs 186 us Swish), so this rule only runs when asked for.
    default = False

    def match(self, node):
        x = node.inputs[0]
        mul = only_use(node.outputs[0])
        if mul is None or mul.op_type != "Mul":
            return None
        if other_input(mul, node.outputs[0]) is not x:
            return None  # a sigmoid gate on another tensor
        return Match(self.name, node, [node, mul], {"x": x, "out": mul.outputs[0]})

    def rewrite(self, match, names):
        replace_chain(match, "Swish", [match.data["x"]], match.data["out"], names)


def _product_leaves(value: ir.Value, x: ir.Value, inside: list[ir.Node]) -> tuple[int, float] | None:
    """``value`` as c·x^k through Mul/Pow/Div nodes read only inside the product: (k, c)."""
    if value is x:
        return 1, 1.0
    c = scalar(value)
    if c is not None:
        return 0, c
    node = producer(value, "Mul", "Pow", "Div")
    if node is None or only_use(value) is None:
        return None
    if node.op_type == "Pow":
        e = scalar(node.inputs[1])
        if node.inputs[0] is not x or e is None or e != int(e) or e < 1:
            return None
        inside.append(node)
        return int(e), 1.0
    a = _product_leaves(node.inputs[0], x, inside)
    if a is None:
        return None
    if node.op_type == "Div":
        d = scalar(node.inputs[1])
        if not d:
            return None
        inside.append(node)
        return a[0], a[1] / d
    b = _product_leaves(node.inputs[1], x, inside)
    if b is None:
        return None
    inside.append(node)
    return a[0] + b[0], a[1] * b[1]


def _match_half_x_times(add: ir.Node, x: ir.Value) -> tuple[list[ir.Node], ir.Value] | None:
    """0.5 · x · t (t = ``add``'s output) in any order and grouping: (nodes after ``add``, result).

    Walks up the chain of Mul/Div nodes that read t, folding the other factors (x, constants,
    or small products of them) until the product is 0.5·x·t.
    """
    nodes: list[ir.Node] = []
    cur = add.outputs[0]
    power, factor = 0, 1.0
    for _ in range(4):
        u = only_use(cur)
        if u is None or u.op_type not in ("Mul", "Div"):
            return None
        if u.op_type == "Div":
            d = scalar(u.inputs[1]) if u.inputs[0] is cur else None
            if not d:
                return None
            factor /= d
        else:
            other = other_input(u, cur)
            inside: list[ir.Node] = []
            leaves = _product_leaves(other, x, inside) if other is not None else None
            if leaves is None:
                return None
            power, factor = power + leaves[0], factor * leaves[1]
            nodes += inside
        nodes.append(u)
        cur = u.outputs[0]
        if power == 1 and close(factor, 0.5):
            return nodes, cur
        if power > 1:
            return None
    return None


class GeluErfRule(Rule):
    name = "gelu-erf"
    description = "0.5·x·(1 + erf(x/√2)) → Gelu (opset 20)"
    anchors = ("Erf",)
    target_op = "Gelu"

    def match(self, node):
        div = producer(node.inputs[0], "Div", "Mul")
        if div is None:
            return None
        x = div.inputs[0] if div.op_type == "Div" else split_const(div)[0]
        if x is None:
            return None
        factor = scale_by(div, x)
        if factor is None:
            return None
        if not close(factor, 1 / math.sqrt(2), rel=1e-4):
            return f"erf input is x·{fmt(factor)}, not x/√2"
        if only_use(div.outputs[0]) is not node:
            return "x/√2 is also used elsewhere"
        add = only_use(node.outputs[0])
        if add is None or add.op_type != "Add":
            return "erf(x/√2) is not followed by + 1"
        if not close(scalar(other_input(add, node.outputs[0])), 1.0):
            return "erf(x/√2) is not followed by + 1"
        tail = _match_half_x_times(add, x)
        if tail is None:
            return "1 + erf(x/√2) is not multiplied by 0.5·x"
        nodes, out = tail
        return Match(self.name, node, [div, node, add, *nodes], {"x": x, "out": out})

    def rewrite(self, match, names):
        replace_chain(match, "Gelu", [match.data["x"]], match.data["out"], names)


class GeluTanhRule(Rule):
    name = "gelu-tanh"
    description = "0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³))) → Gelu(approximate=tanh)"
    anchors = ("Tanh",)
    target_op = "Gelu"

    def match(self, node):
        scale = producer(node.inputs[0], "Mul")
        if scale is None:
            return None
        inner, c = split_const(scale)
        inner_add = producer(inner, "Add")
        if inner_add is None or only_use(inner) is not scale:
            return None
        found = None
        for x, term in (inner_add.inputs, inner_add.inputs[::-1]):
            inside: list[ir.Node] = []
            leaves = _product_leaves(term, x, inside) if x is not None and term is not None else None
            if leaves is not None and leaves[0] == 3:
                found = x, leaves[1], inside
                break
        if found is None:
            return None
        x, k, inside = found
        if not close(k, 0.044715, rel=1e-3):
            return f"the cubic term is {fmt(k)}·x³, not 0.044715·x³"
        if not close(scalar(c), math.sqrt(2 / math.pi), rel=1e-3):
            return f"tanh input is scaled by {fmt(scalar(c))}, not √(2/π)"
        add = only_use(node.outputs[0])
        if add is None or add.op_type != "Add" or not close(scalar(other_input(add, node.outputs[0])), 1.0):
            return "tanh(...) is not followed by + 1"
        tail = _match_half_x_times(add, x)
        if tail is None:
            return "1 + tanh(...) is not multiplied by 0.5·x"
        nodes, out = tail
        return Match(self.name, node, [*inside, inner_add, scale, node, add, *nodes], {"x": x, "out": out})

    def rewrite(self, match, names):
        replace_chain(match, "Gelu", [match.data["x"]], match.data["out"], names, {"approximate": "tanh"})


# ---------------------------------------------------------------------------------------------
# Rules: LayerNormalization


# Ops that only re-shape a reduced statistic back to the input's rank (keepdims=0 exporters).
PASSTHROUGH_OPS = ("Reshape", "Expand", "Unsqueeze")


@dataclasses.dataclass
class _Mean:
    nodes: list[ir.Node]
    axes: list[int]
    keepdims: bool


def _mean_of(value: ir.Value, source: ir.Value) -> _Mean | str | None:
    """``value`` = mean of ``source`` over some axes: ReduceMean, or ReduceSum times 1/N."""
    node = value.producer()
    if node is None:
        return None
    if node.op_type == "ReduceMean" and node.inputs[0] is source:
        axes = reduce_axes(node)
        return axes if isinstance(axes, str) else _Mean([node], axes, bool(attr(node, "keepdims", 1)))
    if node.op_type in ("Mul", "Div"):
        total, c = split_const(node)
        rs = producer(total, "ReduceSum")
        if rs is None or rs.inputs[0] is not source:
            return None
        axes = reduce_axes(rs)
        if isinstance(axes, str):
            return axes
        shape = dims(source)
        count = None
        if shape is not None and all(-len(shape) <= a < len(shape) for a in axes):
            picked = [shape[a] for a in axes]
            count = int(np.prod(picked)) if all(isinstance(d, int) for d in picked) else None
        factor = scale_by(node, total)
        if count is None:
            return "ReduceSum·c: the reduced size is unknown, cannot check c = 1/N"
        if not close(factor, 1.0 / count, rel=1e-4):
            return f"ReduceSum is scaled by {fmt(factor)}, not 1/{count}"
        return _Mean([rs, node], axes, bool(attr(rs, "keepdims", 1)))
    return None


def _strip_passthrough(value: ir.Value) -> tuple[ir.Value, list[ir.Node]]:
    """Follow Reshape/Expand/Unsqueeze back to the value they re-shape."""
    nodes = []
    node = value.producer()
    while node is not None and node.op_type in PASSTHROUGH_OPS and node.domain in ("", "ai.onnx"):
        nodes.append(node)
        value = node.inputs[0]
        node = value.producer()
    return value, nodes


def _kept_shape(stat: ir.Value, x: ir.Value, axes: list[int]) -> bool:
    """Whether ``stat`` has x's shape with the reduced axes set to 1 (from shape inference)."""
    xs, ss = x.shape, stat.shape
    if xs is None or ss is None or len(xs) != len(ss):
        return False
    reduced = {a % len(xs) for a in axes}
    for i, (a, b) in enumerate(zip(xs, ss)):
        if i in reduced:
            if b != 1:
                return False
        elif isinstance(a, int) or isinstance(b, int):
            if a != b:
                return False
        elif a.value is None or a.value != b.value:
            return False
    return True


def _same_dim(a, b) -> bool:
    if isinstance(a, int) or isinstance(b, int):
        return a == b
    return a is not None and b is not None and a.value is not None and a.value == b.value


def _restores_shape(value: ir.Value, passthrough: list[ir.Node], x: ir.Value, axes: list[int]) -> bool:
    """Whether the Reshape/Expand/Unsqueeze chain ending in ``value`` gives a reduced statistic
    x's shape with the reduced axes set to 1.

    A Reshape keeps the element count, so its target may leave one kept dim unproven (a batch
    dim computed at run time): the count forces it. An Expand must not change the shape.
    """
    if x.shape is None:
        return False
    r = len(x.shape)
    reduced = {a % r for a in axes}
    for node in reversed(passthrough):  # from the statistic outwards
        out = node.outputs[0]
        if out.shape is None or len(out.shape) != r:
            return False
        if node.op_type == "Expand":
            src = node.inputs[0].shape
            if src is None or len(src) != r or not all(_same_dim(a, b) for a, b in zip(src, out.shape)):
                return False
            continue
        if node.op_type == "Unsqueeze":
            unsq = const(node.inputs[1]) if len(node.inputs) > 1 else None
            got = unsq.reshape(-1).tolist() if unsq is not None else attr(node, "axes")
            if got is None or {a % r for a in got} != reduced:
                return False
        unproven = 0
        for i, d in enumerate(out.shape):
            if i in reduced:
                if d != 1:
                    return False
            elif not _same_dim(d, x.shape[i]):
                if isinstance(d, int) and isinstance(x.shape[i], int):
                    return False
                unproven += 1
        if unproven > 1 or (unproven and node.op_type != "Reshape"):
            return False
    return True


def _statistic(value: ir.Value, source: ir.Value) -> tuple[_Mean, list[ir.Node]] | str | None:
    """A mean of ``source`` broadcast back to its rank: keepdims=1, or keepdims=0 re-shaped."""
    base, passthrough = _strip_passthrough(value)
    found = _mean_of(base, source)
    if found is None or isinstance(found, str):
        return found
    if passthrough:
        if found.keepdims and not _kept_shape(value, source, found.axes):
            return "the mean is re-shaped to something other than the input's shape"
        if not found.keepdims and not _restores_shape(value, passthrough, source, found.axes):
            return "a keepdims=0 mean is re-shaped, and shape inference cannot show it is x's shape"
    elif not found.keepdims:
        return "keepdims=0 without a reshape back"
    return found, passthrough


def _is_square_of(node: ir.Node | None, v: ir.Value) -> bool:
    if node is None:
        return False
    if node.op_type == "Mul":
        return node.inputs[0] is v and node.inputs[1] is v
    if node.op_type == "Pow":
        return node.inputs[0] is v and close(scalar(node.inputs[1]), 2.0)
    return False


def _inv_sqrt(value: ir.Value) -> tuple[ir.Value, list[ir.Node], np.ndarray | None] | None:
    """``value`` = c/√v as Reciprocal(Sqrt(v)), Div(c, Sqrt(v)) or Pow(v, −0.5): (v, nodes, c)."""
    node = producer(value, "Reciprocal", "Div", "Pow")
    if node is None:
        return None
    if node.op_type == "Pow":
        return (node.inputs[0], [node], None) if close(scalar(node.inputs[1]), -0.5) else None
    sqrt = producer(node.inputs[-1], "Sqrt")
    if sqrt is None:
        return None
    if node.op_type == "Reciprocal":
        return sqrt.inputs[0], [sqrt, node], None
    c = const(node.inputs[0])
    return (sqrt.inputs[0], [sqrt, node], c.astype(np.float64)) if c is not None else None


def _factors(value: ir.Value, x: ir.Value, nodes: list[ir.Node], depth: int = 0) -> list[ir.Value]:
    """``value`` as a product through Mul nodes (appended to ``nodes``), down to x, constants,
    means of x, 1/√(·) and anything else (left for the caller to refuse)."""
    if (
        value is x or value.const_value is not None or depth > 4 or _inv_sqrt(value) is not None
        or isinstance(_statistic(value, x), tuple)
    ):
        return [value]
    node = producer(value, "Mul")
    if node is None or len(node.inputs) != 2 or None in node.inputs:
        return [value]
    nodes.append(node)
    return [f for v in node.inputs for f in _factors(v, x, nodes, depth + 1)]


def _centered_under(var: ir.Value, x: ir.Value, mean: _Mean) -> tuple[ir.Value, list[ir.Node]] | str | None:
    """Under a mean of squares: the x − mean that is squared, with its Sub and mean nodes."""
    reduce = producer(var, "ReduceMean")
    if reduce is None:
        scaled = producer(var, "Mul", "Div")
        reduce = producer(split_const(scaled)[0], "ReduceSum") if scaled is not None else None
    if reduce is None or reduce.inputs[0] is None:
        return None
    square = reduce.inputs[0].producer()
    if square is None or square.op_type not in ("Mul", "Pow"):
        return None
    d = square.inputs[0]
    if d is None or not _is_square_of(square, d):
        return None
    sub = producer(d, "Sub")
    if sub is None or sub.inputs[0] is not x:
        return None
    got = _statistic(sub.inputs[1], x)
    if got is None or isinstance(got, str):
        return got or "the variance squares x minus something other than a mean of x"
    inner, inner_pass = got
    if sorted(inner.axes) != sorted(mean.axes):
        return f"mean over axes {mean.axes} but the variance centres x on a mean over {inner.axes}"
    return d, [sub, *inner.nodes, *inner_pass]


class LayerNormRule(Rule):
    name = "layer-norm"
    description = (
        "(x − mean)/√(var + ε)·γ + β, or x·s + (β − mean·s) with s = γ/√(var + ε) → "
        "LayerNormalization; ReduceMean or ReduceSum·1/N means, var as mean((x − mean)²) or "
        "mean(x²) − mean², Div by Sqrt, Mul by Reciprocal or Pow(·, −0.5)"
    )
    anchors = ("Sub", "Add")
    target_op = "LayerNormalization"

    def match(self, node):
        if node.op_type == "Add":
            return self._match_folded(node)
        return self._match_centered(node)

    def _match_centered(self, node):
        """(x − mean)/√(var + ε)·γ + β, anchored at the Sub."""
        x, mref = node.inputs
        if x is None or mref is None:
            return None
        got = _statistic(mref, x)
        if got is None or isinstance(got, str):
            return got
        mean, mean_pass = got
        d = node.outputs[0]
        chain: list[ir.Node] = [*mean.nodes, *mean_pass, node]
        # The normalizing use of d: Div(d, std) or Mul(d, inv) (any other reader must be the square).
        norm = next((n for n in users(d) if n.op_type in ("Div", "Mul") and not _is_square_of(n, d)), None)
        if norm is None:
            return None
        gamma = None
        if norm.op_type == "Div":
            if norm.inputs[0] is not d:
                return None
            std = producer(norm.inputs[1], "Sqrt")
        else:
            inv = other_input(norm, d)
            scaled = producer(inv, "Mul")
            if scaled is not None:  # d · (1/std · γ)
                inv, gamma = split_const(scaled)
                if gamma is None:
                    return None
                chain.append(scaled)
            recip = producer(inv, "Reciprocal")
            if recip is None:
                return None
            chain.append(recip)
            std = producer(recip.inputs[0], "Sqrt")
        if std is None:
            return "x − mean is not divided by √(var + ε)"
        var_eps = self._var_eps(std.inputs[0], x, d, mean)
        if isinstance(var_eps, str):
            return var_eps
        eps_value, var_nodes = var_eps
        chain += [std, *var_nodes, norm]
        out = norm.outputs[0]
        beta = None
        nxt = only_use(out)
        if gamma is None and nxt is not None and nxt.op_type == "Mul":
            _, g = split_const(nxt)
            if g is not None and g is other_input(nxt, out):
                gamma, out = g, nxt.outputs[0]
                chain.append(nxt)
                nxt = only_use(out)
        if nxt is not None and nxt.op_type == "Add":
            _, b = split_const(nxt)
            if b is not None and b is other_input(nxt, out):
                beta, out = b, nxt.outputs[0]
                chain.append(nxt)
        gamma_array = const(gamma) if gamma is not None else None
        beta_array = const(beta) if beta is not None else None
        return self._finish(node, x, out, mean, chain, eps_value, gamma_array, beta_array)

    def _match_folded(self, node):
        """x·s + (β − mean·s) with s = γ·1/√(var + ε), anchored at the last Add: TF's
        batch_normalization over moments, which never writes x − mean on the main path."""
        for p, q in (node.inputs, node.inputs[::-1]):
            mul, sub = producer(p, "Mul"), producer(q, "Sub")
            if mul is None or sub is None or const(sub.inputs[0]) is None:
                continue
            for x, s in (mul.inputs, mul.inputs[::-1]):
                if x is None or s is None or x.const_value is not None:
                    continue
                shift_nodes: list[ir.Node] = []
                shift = _factors(sub.inputs[1], x, shift_nodes)
                means = [f for f in shift if isinstance(_statistic(f, x), tuple)]
                if len(means) != 1:
                    continue
                return self._folded(node, x, s, mul, sub, shift, shift_nodes, means[0])
        return None

    def _folded(self, node, x, s, mul, sub, shift, shift_nodes, mref):
        mean, mean_pass = _statistic(mref, x)
        scale_nodes: list[ir.Node] = []
        scale = _factors(s, x, scale_nodes)
        sides = []
        for leaves, label in ((scale, "x·s"), ([f for f in shift if f is not mref], "mean·s")):
            roots = [(f, _inv_sqrt(f)) for f in leaves if f.const_value is None]
            roots = [(f, r) for f, r in roots if r is not None]
            others = [f for f in leaves if f.const_value is None and _inv_sqrt(f) is None]
            if len(roots) != 1:
                return None if not roots else f"{label}: more than one 1/√(...) factor"
            if others or any(const(f) is None for f in leaves if f.const_value is not None):
                return f"{label}: γ in s = γ/√(var + ε) is not a constant"
            ve, inv_nodes, factor = roots[0][1]
            gamma = factor
            for f in leaves:
                if f.const_value is not None:
                    c = const(f).astype(np.float64)
                    gamma = c if gamma is None else gamma * c
            sides.append((ve, inv_nodes, gamma))
        (ve, inv_nodes, gamma), (ve2, inv_nodes2, gamma2) = sides
        if ve is not ve2:
            a, b = producer(ve, "Add"), producer(ve2, "Add")
            pa = split_const(a) if a is not None else (None, None)
            pb = split_const(b) if b is not None else (None, None)
            if pa[0] is None or pa[0] is not pb[0] or scalar(pa[1]) != scalar(pb[1]):
                return "x and the mean are scaled by different 1/√(var + ε)"
        if (gamma is None) != (gamma2 is None) or (
            gamma is not None and not np.allclose(*np.broadcast_arrays(gamma, gamma2), rtol=1e-6, atol=0)
        ):
            return "x and the mean are scaled by different γ"
        var_eps = self._var_eps(ve, x, None, mean)
        if isinstance(var_eps, str):
            return var_eps
        eps_value, var_nodes = var_eps
        if ve2 is not ve:
            var_eps2 = self._var_eps(ve2, x, None, mean)
            if isinstance(var_eps2, str):
                return var_eps2
            var_nodes += var_eps2[1]
        seen: set[int] = set()
        chain = []
        for n in [*mean.nodes, *mean_pass, *var_nodes, *inv_nodes, *inv_nodes2, *scale_nodes,
                  *shift_nodes, mul, sub, node]:
            if id(n) not in seen:
                seen.add(id(n))
                chain.append(n)
        beta = const(sub.inputs[0]).astype(np.float64)
        return self._finish(node, x, node.outputs[0], mean, chain, eps_value, gamma, beta)

    def _var_eps(self, ve: ir.Value, x: ir.Value, d: ir.Value | None, mean: _Mean):
        """(ε, nodes) of var + ε, var the variance of x over the mean's axes; or a reason."""
        add = producer(ve, "Add")
        if add is None:
            return "√(...) does not read var + ε"
        vp, eps = split_const(add)
        eps_value = scalar(eps)
        if eps_value is None or not 0 <= eps_value < 1e-2:
            return f"variance + {fmt(eps_value)}: not a small constant ε"
        var, var_pass = _strip_passthrough(vp)
        floor = producer(var, "Max")  # max(var, 0) guards mean(x²) − mean² against rounding
        if floor is not None:
            zero_first = scalar(floor.inputs[0]) is not None
            other, zero = (floor.inputs[1], floor.inputs[0]) if zero_first else floor.inputs
            if len(floor.inputs) != 2 or scalar(zero) != 0.0:
                return "the variance is clamped by something other than max(·, 0)"
            var = other
        nodes = [add, *var_pass, *([floor] if floor is not None else [])]
        variance = self._variance(var, x, d, mean)
        if isinstance(variance, str) or variance is None:
            return variance or "no variance of x found under √(var + ε)"
        var_axes, var_nodes = variance
        if sorted(var_axes) != sorted(mean.axes):
            return f"mean over axes {mean.axes} but variance over {var_axes}"
        if var_pass and not (_kept_shape(vp, x, mean.axes) or _restores_shape(vp, var_pass, x, mean.axes)):
            return "the variance is re-shaped, and shape inference cannot show it is x's shape"
        return eps_value, [*nodes, *var_nodes]

    def _finish(self, node, x, out, mean, chain, eps_value, gamma, beta):
        """The checks both patterns share, then the Match: nothing inside the pattern is read
        from outside, γ and β are per normalized element, the normalized dims are known."""
        inside = {id(n) for n in chain}
        last = out.producer()
        for n in chain:
            if n is last:
                continue
            for o in n.outputs:
                if o.is_graph_output() or any(id(u.node) not in inside for u in o.uses()):
                    return f"{n.op_type} {n.name!r} inside the pattern is also used elsewhere"
        r = rank(x)
        if r is None:
            return "the input rank is unknown"
        axes = sorted(a % r for a in mean.axes)
        perm = [a for a in range(r) if a not in axes] + axes
        shape = dims(x)
        normalized = [shape[a] for a in axes]
        if any(n is None for n in normalized):
            return "the normalized dims are not known statically"
        params = {}
        for array, label in ((gamma, "scale"), (beta, "bias")):
            if array is None:
                continue
            if array.ndim > r:
                return f"the {label} {list(array.shape)} has a higher rank than x"
            padded = array.reshape((1,) * (r - array.ndim) + array.shape)
            if any(padded.shape[a] != 1 for a in range(r) if a not in axes) or any(
                padded.shape[a] not in (1, shape[a]) for a in axes
            ):
                return f"the {label} {list(array.shape)} is not per normalized element"
            params[label] = np.broadcast_to(padded.transpose(perm)[(0,) * (r - len(axes))], normalized)
        dtype = x.dtype
        if dtype is None or not dtype.is_floating_point():
            return "input type is unknown or not floating point"
        return Match(
            self.name, node, chain,
            {"x": x, "out": out, "eps": eps_value, "params": params, "perm": perm,
             "axis": r - len(axes), "normalized": normalized, "dtype": dtype},
        )

    @staticmethod
    def _variance(var: ir.Value, x: ir.Value, d: ir.Value | None, mean: _Mean):
        """(axes, nodes) of mean((x − mean)²) or mean(x²) − mean², a reason, or None.

        ``d`` is the x − mean the pattern already has; None: find it under the variance (and
        include its Sub, which must read x and a mean of x over the same axes).
        """
        base = var.producer()
        if base is None:
            return None
        if base.op_type == "Sub":  # mean(x²) − mean²
            ex2, sq_mean = base.inputs
            m2 = producer(sq_mean, "Mul", "Pow")
            if m2 is None or not _is_square_of(m2, mean.nodes[-1].outputs[0]):
                return "mean(x²) − m²: m² is not the square of the mean"
            for square in users(x):
                if not _is_square_of(square, x):
                    continue
                found = _mean_of(ex2, square.outputs[0])
                if isinstance(found, _Mean):
                    return found.axes, [base, m2, square, *found.nodes]
            return "mean(x²) − m²: no mean of x² found"
        extra: list[ir.Node] = []
        if d is None:
            centered = _centered_under(var, x, mean)
            if centered is None or isinstance(centered, str):
                return centered
            d, extra = centered
        for square in users(d):
            if _is_square_of(square, d):
                found = _mean_of(var, square.outputs[0])
                if isinstance(found, _Mean):
                    if not found.keepdims:
                        return "the variance has keepdims=0"
                    return found.axes, [*extra, square, *found.nodes]
                return found
        return None

    def rewrite(self, match, names):
        data = match.data
        graph = match.anchor.graph
        np_dtype = data["dtype"].numpy()
        shape, perm = data["normalized"], data["perm"]
        prefix = match.anchor.name or "ln"
        scale = data["params"].get("scale", np.ones(shape))
        bias = data["params"].get("bias", np.zeros(shape))
        inputs = [
            data["x"],
            new_const(graph, names, f"{prefix}_ln_scale", np.ascontiguousarray(scale, np_dtype)),
            new_const(graph, names, f"{prefix}_ln_bias", np.ascontiguousarray(bias, np_dtype)),
        ]
        attributes = {"axis": data["axis"], "epsilon": float(data["eps"])}
        if perm == sorted(perm):
            replace_chain(match, "LayerNormalization", inputs, data["out"], names, attributes)
            return
        # Normalized axes that are not the last ones: move them last and back.
        out = data["out"]
        last = out.producer()
        inverse = [perm.index(i) for i in range(len(perm))]
        into = ir.node("Transpose", [data["x"]], {"perm": perm}, name=names(f"{prefix}_ln_in"))
        inputs[0] = into.outputs[0]
        ln = ir.node("LayerNormalization", inputs, attributes, name=names(f"{prefix}_ln"))
        back = ir.node("Transpose", [ln.outputs[0]], {"perm": inverse}, name=names(f"{prefix}_ln_out"))
        graph.insert_after(last, [into, ln, back])
        rewire(out, back.outputs[0])
        graph.remove(match.nodes, safe=True)


# ---------------------------------------------------------------------------------------------
# Rules: folding into Conv / ConvTranspose / Gemm


def _out_channel_index(op: str, node: ir.Node, w: np.ndarray) -> tuple[int, np.ndarray]:
    """(number of output channels M, output channel of each weight element along its first two axes)."""
    if op == "Conv":
        m = w.shape[0]
        return m, np.arange(m)[:, None] * np.ones((1, w.shape[1]), np.int64)
    if op == "ConvTranspose":
        group = attr(node, "group", 1)
        c, mg = w.shape[0], w.shape[1]
        group_of = np.arange(c) // (c // group)
        return mg * group, group_of[:, None] * mg + np.arange(mg)[None, :]
    raise ValueError(op)


def _scale_weight(op: str, node: ir.Node, w: np.ndarray, s: np.ndarray) -> np.ndarray:
    """Multiply output channel o of weight ``w`` by ``s[o]`` (float64 in, weight dtype out)."""
    if op == "Gemm":
        s = s.reshape(-1)
        w64 = w.astype(np.float64)
        return (w64 * s[:, None] if attr(node, "transB", 0) else w64 * s[None, :]).astype(w.dtype)
    _, index = _out_channel_index(op, node, w)
    factor = s.reshape(-1)[index].reshape(index.shape + (1,) * (w.ndim - 2))
    return (w.astype(np.float64) * factor).astype(w.dtype)


def _channels(op: str, node: ir.Node, w: ir.Value) -> int | None:
    shape = w.shape
    if shape is None or any(not isinstance(d, int) for d in shape[:2]):
        return None
    if op == "Conv":
        return shape[0]
    if op == "ConvTranspose":
        return shape[1] * attr(node, "group", 1)
    return shape[0] if attr(node, "transB", 0) else shape[1]


def _per_channel(c: np.ndarray, out_rank: int, channels: int) -> np.ndarray | str:
    """A constant that broadcasts along axis 1 of a rank-``out_rank`` tensor only, as [M]."""
    if c.ndim > out_rank:
        return f"the constant {list(c.shape)} has a higher rank than the output"
    shape = (1,) * (out_rank - c.ndim) + tuple(c.shape)
    if any(s != 1 for i, s in enumerate(shape) if i != 1) or shape[1] not in (1, channels):
        return f"the constant {list(c.shape)} is not per output channel"
    return np.broadcast_to(c.reshape(-1).astype(np.float64), (channels,))


def _linear_parts(node: ir.Node) -> tuple[np.ndarray, np.ndarray | None] | str:
    spec = LINEAR_OPS[node.op_type]
    w = const(node.inputs[spec.weight])
    if w is None:
        return f"the {node.op_type} weight is computed at run time"
    b_value = node.inputs[spec.bias] if len(node.inputs) > spec.bias else None
    b = None
    if b_value is not None:
        b = const(b_value)
        if b is None:
            return f"the {node.op_type} bias is computed at run time"
    return w, b


def _set_linear(node: ir.Node, w: np.ndarray | None, b: np.ndarray, names: NameSource) -> None:
    """Give ``node`` new weight and bias initializers (shared tensors are never changed in place)."""
    spec = LINEAR_OPS[node.op_type]
    graph = node.graph
    if w is not None:
        node.replace_input_with(spec.weight, new_const(graph, names, f"{node.name}_weight", w))
    bias = new_const(graph, names, f"{node.name}_bias", b)
    if len(node.inputs) <= spec.bias:
        node.resize_inputs(spec.bias + 1)
    node.replace_input_with(spec.bias, bias)


class FoldBatchNormRule(Rule):
    name = "fold-batchnorm"
    description = "BatchNormalization after Conv/ConvTranspose/Gemm → folded into its weights"
    anchors = ("BatchNormalization",)

    def match(self, node):
        prev = node.inputs[0].producer() if node.inputs[0] is not None else None
        if prev is None or prev.op_type not in LINEAR_OPS or prev.domain not in ("", "ai.onnx"):
            what = prev.op_type if prev is not None else "a graph input"
            return f"follows {what}, not Conv/ConvTranspose/Gemm"
        if attr(node, "training_mode", 0):
            return "training_mode=1"
        if any(out.uses() or out.is_graph_output() for out in node.outputs[1:]):
            return "running mean/var outputs are used"
        params = [const(v) for v in node.inputs[1:5]]
        if any(p is None for p in params):
            return "scale/bias/mean/var are computed at run time"
        if only_use(prev.outputs[0]) is not node:
            return f"{prev.op_type} {prev.name!r} output is also used elsewhere"
        parts = _linear_parts(prev)
        if isinstance(parts, str):
            return parts
        if prev.op_type == "Gemm":
            if rank(node.inputs[0]) not in (2, None):
                return "Gemm output is not 2-D"
            channels = params[0].size
            bias = parts[1]
            if bias is not None and (bias.size not in (1, channels) or (bias.ndim == 2 and bias.shape[0] != 1)):
                return f"the Gemm bias {list(bias.shape)} is not per output column"
        return Match(self.name, node, [node, prev], {"linear": prev, "params": params})

    def rewrite(self, match, names):
        node, prev = match.anchor, match.data["linear"]
        scale, bias, mean, var = (p.astype(np.float64).reshape(-1) for p in match.data["params"])
        eps = attr(node, "epsilon", 1e-5)
        w, b = _linear_parts(prev)
        s = scale / np.sqrt(var + eps)
        channels = s.shape[0]
        if prev.op_type == "Gemm":
            alpha, beta = attr(prev, "alpha", 1.0), attr(prev, "beta", 1.0)
            w_new = _scale_weight("Gemm", prev, w, s * alpha)
            c = np.zeros(channels) if b is None else np.broadcast_to(b.astype(np.float64).reshape(-1) * beta, (channels,))
            prev.attributes["alpha"] = ir.AttrFloat32("alpha", 1.0)
            prev.attributes["beta"] = ir.AttrFloat32("beta", 1.0)
        else:
            w_new = _scale_weight(prev.op_type, prev, w, s)
            c = np.zeros(channels) if b is None else b.astype(np.float64)
        b_new = ((c - mean) * s + bias).astype(w.dtype)
        _set_linear(prev, w_new, b_new, names)
        _drop_after(node, prev)


class FoldBiasAddRule(Rule):
    name = "fold-bias-add"
    description = "Add of a per-channel constant after Conv/ConvTranspose → the Conv bias"
    anchors = ("Add",)

    def match(self, node):
        x, c = split_const(node)
        prev = producer(x, "Conv", "ConvTranspose")
        if prev is None:
            return None
        return _match_channel_op(self.name, node, prev, const(c), x)

    def rewrite(self, match, names):
        prev, c = match.data["linear"], match.data["per_channel"]
        w, b = _linear_parts(prev)
        base = np.zeros(c.shape) if b is None else b.astype(np.float64)
        _set_linear(prev, None, (base + c).astype(w.dtype), names)
        _drop_after(match.anchor, prev)


class FoldScaleRule(Rule):
    name = "fold-scale"
    description = "Mul/Div by a per-channel constant after Conv/ConvTranspose → scaled weights"
    anchors = ("Mul", "Div")

    def match(self, node):
        x, c = split_const(node)
        prev = producer(x, "Conv", "ConvTranspose")
        if prev is None:
            return None
        array = const(c)
        if node.op_type == "Div":
            if np.any(array == 0):
                return "divides by zero"
            array = 1.0 / array.astype(np.float64)
        return _match_channel_op(self.name, node, prev, array, x)

    def rewrite(self, match, names):
        prev, s = match.data["linear"], match.data["per_channel"]
        w, b = _linear_parts(prev)
        base = np.zeros(s.shape) if b is None else b.astype(np.float64)
        _set_linear(prev, _scale_weight(prev.op_type, prev, w, s), (base * s).astype(w.dtype), names)
        _drop_after(match.anchor, prev)


def _match_channel_op(rule: str, node: ir.Node, prev: ir.Node, c: np.ndarray, x: ir.Value):
    if only_use(x) is not node:
        return f"{prev.op_type} {prev.name!r} output is also used elsewhere"
    if c.dtype.kind != "f":
        return f"the constant is {c.dtype}, not float"
    parts = _linear_parts(prev)
    # Scaling needs the weight; adding to the bias needs only a constant (or absent) bias.
    if isinstance(parts, str) and (rule == "fold-scale" or "bias" in parts):
        return parts
    w_value = prev.inputs[1]
    channels = _channels(prev.op_type, prev, w_value)
    out_rank = len(w_value.shape) if w_value.shape is not None else None
    if channels is None or out_rank is None:
        return f"the {prev.op_type} weight shape is unknown"
    per_channel = _per_channel(c, out_rank, channels)
    if isinstance(per_channel, str):
        return per_channel
    return Match(rule, node, [node, prev], {"linear": prev, "per_channel": per_channel})


def _drop_after(node: ir.Node, prev: ir.Node) -> None:
    """Remove a node folded into ``prev`` and make its readers read ``prev``'s output."""
    graph = node.graph
    rewire(node.outputs[0], prev.outputs[0])
    graph.remove(node, safe=True)


class FoldInputScaleRule(Rule):
    name = "fold-input-scale"
    description = "Mul by a per-channel constant before a Conv → scaled input channels of the weight"
    anchors = ("Mul",)

    def match(self, node):
        x, c = split_const(node)
        if x is None or x.const_value is not None:
            return None
        conv = only_use(node.outputs[0])
        if conv is None or conv.op_type != "Conv" or conv.inputs[0] is not node.outputs[0]:
            return None
        w = const(conv.inputs[1])
        if w is None:
            return "the Conv weight is computed at run time"
        s = const(c)
        if s.dtype.kind != "f":
            return None
        channels = w.shape[1] * attr(conv, "group", 1)
        per = _per_channel(s, w.ndim, channels)
        if isinstance(per, str):
            return per.replace("output", "input")
        if rank(x) not in (None, w.ndim):
            return "the Mul broadcasts its input to a higher rank"
        return Match(self.name, node, [node, conv], {"conv": conv, "x": x, "per_channel": per})

    def rewrite(self, match, names):
        conv, s = match.data["conv"], match.data["per_channel"]
        w = const(conv.inputs[1])
        m, cg = w.shape[:2]
        group = attr(conv, "group", 1)
        in_ch = (np.arange(m) // (m // group))[:, None] * cg + np.arange(cg)[None, :]
        factor = s[in_ch].reshape(m, cg, *(1,) * (w.ndim - 2))
        new_w = (w.astype(np.float64) * factor).astype(w.dtype)
        conv.replace_input_with(1, new_const(conv.graph, names, f"{conv.name}_weight", new_w))
        conv.replace_input_with(0, match.data["x"])
        match.anchor.graph.remove(match.anchor, safe=True)


class FoldInputShiftRule(Rule):
    name = "fold-input-shift"
    description = "Add of a per-channel constant before an unpadded Conv → the Conv bias"
    anchors = ("Add", "Sub")

    def match(self, node):
        x, c = split_const(node)
        if x is None or x.const_value is not None or (node.op_type == "Sub" and node.inputs[0] is not x):
            return None
        conv = only_use(node.outputs[0])
        if conv is None or conv.op_type != "Conv" or conv.inputs[0] is not node.outputs[0]:
            return None
        shift = const(c)
        if shift.dtype.kind != "f":
            return None
        parts = _linear_parts(conv)
        if isinstance(parts, str):
            return parts
        w, b = parts
        channels = w.shape[1] * attr(conv, "group", 1)
        per = _per_channel(shift, w.ndim, channels)
        if isinstance(per, str):
            return per.replace("output", "input")
        if rank(x) not in (None, w.ndim):
            return "the Add broadcasts its input to a higher rank"
        pads = attr(conv, "pads") or ()
        if any(pads) or attr(conv, "auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
            return "the Conv pads with zeros, which the shift would not reach: folding is not exact"
        if node.op_type == "Sub":
            per = -per
        return Match(self.name, node, [node, conv], {"conv": conv, "x": x, "per_channel": per})

    def rewrite(self, match, names):
        conv, shift = match.data["conv"], match.data["per_channel"]
        w, b = _linear_parts(conv)
        m, cg = w.shape[:2]
        group = attr(conv, "group", 1)
        in_ch = (np.arange(m) // (m // group))[:, None] * cg + np.arange(cg)[None, :]
        # Conv(x + s) = Conv(x) + Σ_ci,k W[o, ci, k]·s[ci]: a constant per output channel.
        extra = (w.astype(np.float64).reshape(m, cg, -1).sum(-1) * shift[in_ch]).sum(1)
        base = np.zeros(m) if b is None else b.astype(np.float64)
        _set_linear(conv, None, (base + extra).astype(w.dtype), names)
        conv.replace_input_with(0, match.data["x"])
        match.anchor.graph.remove(match.anchor, safe=True)


# ---------------------------------------------------------------------------------------------
# Rules: removal


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
            if len(node.outputs) > 1 and (node.outputs[1].uses() or node.outputs[1].is_graph_output()):
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
        rewire(node.outputs[0], match.data["source"])
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
                if src.shape is None or p >= len(x.shape) or not -len(src.shape) <= idx < len(src.shape):
                    return f"shape piece at position {p} cannot be checked against the input's shape"
                have, want = src.shape[idx % len(src.shape)], x.shape[p]
                if isinstance(have, int) and isinstance(want, int) and have == want:
                    values.append(have)
                elif (src is x and idx % len(src.shape) == p) or _same_dim(have, want):
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
        value = new_const(node.graph, names, f"{node.name}_shape", match.data["shape"])
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


# ---------------------------------------------------------------------------------------------
# Rules: constant folding


class ConstantFoldRule(Rule):
    """Computes nodes whose inputs are all constant, with onnx's reference evaluator."""

    name = "constant-fold"
    description = "nodes whose inputs are all constant → an initializer (results bounded in size)"
    anchors = ()

    def __init__(self, limit_bytes: int = 1 << 20):
        self.limit_bytes = limit_bytes
        self.opset = 17  # the model's default-domain opset; set by the optimizer before planning

    def match(self, node):
        if node.domain not in ("", "ai.onnx") or node.op_type in NEVER_FOLD:
            return None
        inputs = [v for v in node.inputs if v is not None]
        if not inputs or any(v.const_value is None or v.is_graph_input() for v in inputs):
            return None
        if any(a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS) for a in node.attributes.values()):
            return None
        if any(out.is_graph_output() for out in node.outputs):
            return "its output is a graph output"
        in_bytes = sum(v.const_value.nbytes for v in inputs)
        limit = max(self.limit_bytes, in_bytes)
        for out in node.outputs:
            shape = dims(out)
            if out.dtype is not None and shape is not None and all(isinstance(d, int) for d in shape):
                size = int(np.prod(shape)) * out.dtype.itemsize
                if size > limit:
                    return f"the result would be {size} bytes (limit {limit})"
        results = self.evaluate(node)
        if isinstance(results, str):
            return results
        size = sum(r.nbytes for r in results)
        if size > limit:
            return f"the result is {size} bytes (limit {limit})"
        return Match(self.name, node, [node], {"results": results})

    def evaluate(self, node: ir.Node) -> list[np.ndarray] | str:
        """The node's outputs computed by onnx's reference evaluator, or why not."""
        import onnx
        from onnx.reference import ReferenceEvaluator

        names = [f"i{i}" if v is not None else "" for i, v in enumerate(node.inputs)]
        outs = [f"o{i}" for i in range(len(node.outputs))]
        proto_node = ir.serde.serialize_node(node)
        del proto_node.input[:]
        proto_node.input.extend(names)
        del proto_node.output[:]
        proto_node.output.extend(outs)
        feeds = {n: v.const_value.numpy() for n, v in zip(names, node.inputs) if v is not None}
        graph = onnx.helper.make_graph(
            [proto_node], "fold",
            [onnx.helper.make_tensor_value_info(n, onnx.helper.np_dtype_to_tensor_dtype(a.dtype), a.shape) for n, a in feeds.items()],
            [onnx.helper.make_empty_tensor_value_info(o) for o in outs],
        )
        proto = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", self.opset)])
        try:
            results = ReferenceEvaluator(proto).run(None, feeds)
        except Exception as err:  # the evaluator lacks the op, or the inputs are invalid
            return f"cannot evaluate it ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
        arrays = []
        for r in results:
            if not isinstance(r, np.ndarray) or r.dtype.kind not in "biuf":
                return "its result is not a numeric tensor (sequence, optional or string)"
            arrays.append(r)
        return arrays

    def rewrite(self, match, names):
        node = match.anchor
        results = match.data["results"]
        graph = node.graph
        for out, array in zip(node.outputs, results):
            if not out.uses():
                continue
            if out.dtype is not None:
                array = array.astype(out.dtype.numpy(), copy=False)
            value = new_const(graph, names, f"{out.name or node.name}_folded", np.ascontiguousarray(array))
            rewire(out, value)
        graph.remove(node, safe=True)


# ---------------------------------------------------------------------------------------------
# The table of rules, in the order they are tried on each node


def all_rules(fold_limit_bytes: int = 1 << 20) -> list[Rule]:
    return [
        IdentityRule(),
        ConstantFoldRule(fold_limit_bytes),
        # Activations and norms first: a fold rule must not eat the Add of an x + 3.
        Relu6Rule(),
        HardSwishRule(),
        HardSigmoidRule(),
        GeluErfRule(),
        GeluTanhRule(),
        LayerNormRule(),
        SiluRule(),
        FoldBatchNormRule(),
        FoldBiasAddRule(),
        FoldScaleRule(),
        FoldInputScaleRule(),
        FoldInputShiftRule(),
        ReshapeShapeRule(),
    ]


RULE_NAMES: list[str] = [r.name for r in all_rules()]
RuleFilter = Callable[[Rule], bool]
