"""Norm rules: decomposed LayerNormalization in its exporter forms (ReduceMean or ReduceSum·1/N
means, var as mean((x − mean)²) or mean(x²) − mean², TF's x·s + (β − mean·s))."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from onnxcomp.graph import (
    add_initializer,
    attr,
    close,
    const,
    dims,
    only_use,
    other_input,
    producer,
    rank,
    replace_uses,
    same_dim,
    scalar,
    split_const,
    users,
)
from onnxcomp.optimize.rules.framework import Match, Rule, fmt, reduce_axes, replace_chain, scale_by

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
        return (
            axes if isinstance(axes, str) else _Mean([node], axes, bool(attr(node, "keepdims", 1)))
        )
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


def _restores_shape(
    value: ir.Value, passthrough: list[ir.Node], x: ir.Value, axes: list[int]
) -> bool:
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
            if (
                src is None
                or len(src) != r
                or not all(same_dim(a, b) for a, b in zip(src, out.shape))
            ):
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
            elif not same_dim(d, x.shape[i]):
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
        value is x
        or value.const_value is not None
        or depth > 4
        or _inv_sqrt(value) is not None
        or isinstance(_statistic(value, x), tuple)
    ):
        return [value]
    node = producer(value, "Mul")
    if node is None or len(node.inputs) != 2 or None in node.inputs:
        return [value]
    nodes.append(node)
    return [f for v in node.inputs for f in _factors(v, x, nodes, depth + 1)]


def _centered_under(
    var: ir.Value, x: ir.Value, mean: _Mean
) -> tuple[ir.Value, list[ir.Node]] | str | None:
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
        norm = next(
            (n for n in users(d) if n.op_type in ("Div", "Mul") and not _is_square_of(n, d)), None
        )
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
            gamma is not None
            and not np.allclose(*np.broadcast_arrays(gamma, gamma2), rtol=1e-6, atol=0)
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
        for n in [
            *mean.nodes,
            *mean_pass,
            *var_nodes,
            *inv_nodes,
            *inv_nodes2,
            *scale_nodes,
            *shift_nodes,
            mul,
            sub,
            node,
        ]:
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
        if var_pass and not (
            _kept_shape(vp, x, mean.axes) or _restores_shape(vp, var_pass, x, mean.axes)
        ):
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
            params[label] = np.broadcast_to(
                padded.transpose(perm)[(0,) * (r - len(axes))], normalized
            )
        dtype = x.dtype
        if dtype is None or not dtype.is_floating_point():
            return "input type is unknown or not floating point"
        return Match(
            self.name,
            node,
            chain,
            {
                "x": x,
                "out": out,
                "eps": eps_value,
                "params": params,
                "perm": perm,
                "axis": r - len(axes),
                "normalized": normalized,
                "dtype": dtype,
            },
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
            add_initializer(graph, f"{prefix}_ln_scale", np.ascontiguousarray(scale, np_dtype)),
            add_initializer(graph, f"{prefix}_ln_bias", np.ascontiguousarray(bias, np_dtype)),
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
        back = ir.node(
            "Transpose", [ln.outputs[0]], {"perm": inverse}, name=names(f"{prefix}_ln_out")
        )
        graph.insert_after(last, [into, ln, back])
        replace_uses(out, back.outputs[0])
        graph.remove(match.nodes, safe=True)
