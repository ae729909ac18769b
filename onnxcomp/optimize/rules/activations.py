"""Activation rules: hard-swish, hard-sigmoid, ReLU6 from Min/Max, SiLU, GELU (erf and tanh)."""

from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir

from onnxcomp.graph import (
    add_initializer,
    attr,
    close,
    const,
    only_use,
    other_input,
    producer,
    scalar,
    split_const,
)
from onnxcomp.optimize.rules.framework import Match, Rule, clip_bounds, fmt, replace_chain, scale_by


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
        return Match(
            self.name,
            node,
            [add, node, nxt],
            {"x": x, "out": nxt.outputs[0], "alpha": 1.0 / 6.0, "beta": 0.5},
        )

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
        return Match(
            self.name,
            clip,
            [mul, add, clip],
            {"x": x, "out": clip.outputs[0], "alpha": alpha, "beta": beta},
        )

    def rewrite(self, match, names):
        replace_chain(
            match,
            "HardSigmoid",
            [match.data["x"]],
            match.data["out"],
            names,
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
        return Match(
            self.name,
            node,
            [inner, node],
            {"x": x, "out": node.outputs[0], "bounds": (lo, hi), "dtype": arrays[0].dtype},
        )

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
                c = add_initializer(graph, f"{match.anchor.name}_{label}", np.array(number, dtype))
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


def _product_leaves(
    value: ir.Value, x: ir.Value, inside: list[ir.Node]
) -> tuple[int, float] | None:
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
            leaves = (
                _product_leaves(term, x, inside) if x is not None and term is not None else None
            )
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
        if (
            add is None
            or add.op_type != "Add"
            or not close(scalar(other_input(add, node.outputs[0])), 1.0)
        ):
            return "tanh(...) is not followed by + 1"
        tail = _match_half_x_times(add, x)
        if tail is None:
            return "1 + tanh(...) is not multiplied by 0.5·x"
        nodes, out = tail
        return Match(
            self.name, node, [*inside, inner_add, scale, node, add, *nodes], {"x": x, "out": out}
        )

    def rewrite(self, match, names):
        replace_chain(
            match, "Gelu", [match.data["x"]], match.data["out"], names, {"approximate": "tanh"}
        )
