"""Folding rules: BatchNormalization, bias Adds and per-channel scales after a Conv,
ConvTranspose or Gemm go into its weights; per-channel scales and shifts before a Conv too.

Where each op keeps its channels is read from ``onnxcomp.ops``.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxcomp.graph import (
    NameSource,
    add_initializer,
    attr,
    const,
    dims,
    only_use,
    producer,
    rank,
    replace_uses,
    split_const,
)
from onnxcomp.ops import FOLDABLE, WEIGHTED, per_channel, weight_and_bias
from onnxcomp.optimize.rules.framework import Match, Rule


def _set_linear(node: ir.Node, w: np.ndarray | None, b: np.ndarray, names: NameSource) -> None:
    """Give ``node`` new weight and bias initializers (shared tensors are never changed in place)."""
    spec = WEIGHTED[node.op_type]
    graph = node.graph
    if w is not None:
        node.replace_input_with(
            spec.weight, add_initializer(graph, f"{node.name}_weight", w, names)
        )
    bias = add_initializer(graph, f"{node.name}_bias", b, names)
    if len(node.inputs) <= spec.bias:
        node.resize_inputs(spec.bias + 1)
    node.replace_input_with(spec.bias, bias)


class FoldBatchNormRule(Rule):
    name = "fold-batchnorm"
    description = "BatchNormalization after Conv/ConvTranspose/Gemm → folded into its weights"
    anchors = ("BatchNormalization",)

    def match(self, node):
        prev = node.inputs[0].producer() if node.inputs[0] is not None else None
        if prev is None or prev.op_type not in FOLDABLE or prev.domain not in ("", "ai.onnx"):
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
        parts = weight_and_bias(prev)
        if isinstance(parts, str):
            return parts
        if prev.op_type == "Gemm":
            if rank(node.inputs[0]) not in (2, None):
                return "Gemm output is not 2-D"
            channels = params[0].size
            bias = parts[1]
            if bias is not None and (
                bias.size not in (1, channels) or (bias.ndim == 2 and bias.shape[0] != 1)
            ):
                return f"the Gemm bias {list(bias.shape)} is not per output column"
        return Match(self.name, node, [node, prev], {"linear": prev, "params": params})

    def rewrite(self, match, names):
        node, prev = match.anchor, match.data["linear"]
        scale, bias, mean, var = (p.astype(np.float64).reshape(-1) for p in match.data["params"])
        eps = attr(node, "epsilon", 1e-5)
        w, b = weight_and_bias(prev)
        s = scale / np.sqrt(var + eps)
        channels = s.shape[0]
        if prev.op_type == "Gemm":
            alpha, beta = attr(prev, "alpha", 1.0), attr(prev, "beta", 1.0)
            w_new = WEIGHTED["Gemm"].scale_out(prev, w, s * alpha)
            c = (
                np.zeros(channels)
                if b is None
                else np.broadcast_to(b.astype(np.float64).reshape(-1) * beta, (channels,))
            )
            prev.attributes["alpha"] = ir.AttrFloat32("alpha", 1.0)
            prev.attributes["beta"] = ir.AttrFloat32("beta", 1.0)
        else:
            w_new = WEIGHTED[prev.op_type].scale_out(prev, w, s)
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
        w, b = weight_and_bias(prev)
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
        w, b = weight_and_bias(prev)
        base = np.zeros(s.shape) if b is None else b.astype(np.float64)
        _set_linear(
            prev, WEIGHTED[prev.op_type].scale_out(prev, w, s), (base * s).astype(w.dtype), names
        )
        _drop_after(match.anchor, prev)


def _match_channel_op(rule: str, node: ir.Node, prev: ir.Node, c: np.ndarray, x: ir.Value):
    if only_use(x) is not node:
        return f"{prev.op_type} {prev.name!r} output is also used elsewhere"
    if c.dtype.kind != "f":
        return f"the constant is {c.dtype}, not float"
    parts = weight_and_bias(prev)
    # Scaling needs the weight; adding to the bias needs only a constant (or absent) bias.
    if isinstance(parts, str) and (rule == "fold-scale" or "bias" in parts):
        return parts
    w_shape = dims(prev.inputs[1])
    known = w_shape is not None and None not in w_shape[:2]
    channels = WEIGHTED[prev.op_type].out_channels(prev, w_shape) if known else None
    out_rank = len(w_shape) if w_shape is not None else None
    if channels is None or out_rank is None:
        return f"the {prev.op_type} weight shape is unknown"
    per = per_channel(c, out_rank, channels)
    if isinstance(per, str):
        return per
    return Match(rule, node, [node, prev], {"linear": prev, "per_channel": per})


def _drop_after(node: ir.Node, prev: ir.Node) -> None:
    """Remove a node folded into ``prev`` and make its readers read ``prev``'s output."""
    graph = node.graph
    replace_uses(node.outputs[0], prev.outputs[0])
    graph.remove(node, safe=True)


class FoldInputScaleRule(Rule):
    name = "fold-input-scale"
    description = (
        "Mul by a per-channel constant before a Conv → scaled input channels of the weight"
    )
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
        channels = WEIGHTED["Conv"].in_channels(conv, w.shape)
        per = per_channel(s, w.ndim, channels)
        if isinstance(per, str):
            return per.replace("output", "input")
        if rank(x) not in (None, w.ndim):
            return "the Mul broadcasts its input to a higher rank"
        return Match(self.name, node, [node, conv], {"conv": conv, "x": x, "per_channel": per})

    def rewrite(self, match, names):
        conv, s = match.data["conv"], match.data["per_channel"]
        w = const(conv.inputs[1])
        new_w = WEIGHTED["Conv"].scale_in(conv, w, s)
        conv.replace_input_with(1, add_initializer(conv.graph, f"{conv.name}_weight", new_w))
        conv.replace_input_with(0, match.data["x"])
        match.anchor.graph.remove(match.anchor, safe=True)


class FoldInputShiftRule(Rule):
    name = "fold-input-shift"
    description = "Add of a per-channel constant before an unpadded Conv → the Conv bias"
    anchors = ("Add", "Sub")

    def match(self, node):
        x, c = split_const(node)
        if (
            x is None
            or x.const_value is not None
            or (node.op_type == "Sub" and node.inputs[0] is not x)
        ):
            return None
        conv = only_use(node.outputs[0])
        if conv is None or conv.op_type != "Conv" or conv.inputs[0] is not node.outputs[0]:
            return None
        shift = const(c)
        if shift.dtype.kind != "f":
            return None
        parts = weight_and_bias(conv)
        if isinstance(parts, str):
            return parts
        w, b = parts
        channels = WEIGHTED["Conv"].in_channels(conv, w.shape)
        per = per_channel(shift, w.ndim, channels)
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
        w, b = weight_and_bias(conv)
        m, cg = w.shape[:2]
        in_ch = WEIGHTED["Conv"].in_channel_of(conv, w.shape)
        # Conv(x + s) = Conv(x) + Σ_ci,k W[o, ci, k]·s[ci]: a constant per output channel.
        extra = (w.astype(np.float64).reshape(m, cg, -1).sum(-1) * shift[in_ch]).sum(1)
        base = np.zeros(m) if b is None else b.astype(np.float64)
        _set_linear(conv, None, (base + extra).astype(w.dtype), names)
        conv.replace_input_with(0, match.data["x"])
        match.anchor.graph.remove(match.anchor, safe=True)
