"""Op facts, written once: weighted ops and how channels flow through every op.

``WEIGHTED`` says, for each op type with a weight, which input is the data, the weight and the
bias, which weight axes hold the output and input channels, the groups, and how to view the
weight as ``[groups, out/groups, in/groups·k]`` rows (``to_matrix``, the im2col layout GPTQ and
least squares solve in) and back (``from_matrix``). Folding scales output or input channels with
``scale_out`` / ``scale_in``.

``CHANNELS`` says, for each op type, what the node does to channel axis ``k`` of input ``i``:
where those channels appear in the outputs (same index, offset by a Concat, each channel a block
after a Flatten, a range after a Split/Slice), which other inputs must be cut with them (the
other operand of an Add, BatchNormalization's parameters, the weight's input axis), or why the
trail stops. ``channel_flow(node, i, k)`` answers it; structured pruning builds its dependency
groups from these answers.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Literal

import numpy as np
import onnx_ir as ir

from onnxcomp.graph import attr, const, dims, rank

# ---------------------------------------------------------------------------------------------
# Weighted ops

Layout = Literal["conv", "conv_transpose", "gemm", "matmul"]

# (output-channel axis, input-channel axis) of the weight by layout; Gemm's depend on transB.
_WEIGHT_AXES = {"conv": (0, 1), "conv_transpose": (1, 0), "matmul": (-1, -2)}


@dataclasses.dataclass(frozen=True)
class WeightedOp:
    """Where a weighted op keeps its operands and how its weight is laid out.

    layout: "conv" W [M, C/g, k...]; "conv_transpose" W [C, M/g, k...]; "gemm" W [K, N], or
    [N, K] with transB=1; "matmul" W [..., K, N].
    """

    op_type: str
    data: int
    weight: int
    bias: int | None
    layout: Layout

    def groups(self, node: ir.Node) -> int:
        return int(attr(node, "group", 1)) if self.layout in ("conv", "conv_transpose") else 1

    def channel_axes(self, node: ir.Node) -> tuple[int, int]:
        """(output-channel axis, input-channel axis) of the weight; MatMul's count from the end."""
        if self.layout == "gemm":
            return (0, 1) if attr(node, "transB", 0) else (1, 0)
        return _WEIGHT_AXES[self.layout]

    def out_axis(self, node: ir.Node) -> int:
        """The weight axis that holds the output channels."""
        return self.channel_axes(node)[0]

    def in_axis(self, node: ir.Node) -> int:
        """The weight axis that holds the input channels (per group for Conv/ConvTranspose)."""
        return self.channel_axes(node)[1]

    def out_channels(self, node: ir.Node, shape) -> int:
        """Output channels M for a weight of ``shape`` (ConvTranspose: groups·M/g)."""
        n = int(shape[self.out_axis(node)])
        return n * self.groups(node) if self.layout == "conv_transpose" else n

    def in_channels(self, node: ir.Node, shape) -> int:
        """Input channels C for a weight of ``shape`` (Conv: groups·C/g)."""
        n = int(shape[self.in_axis(node)])
        return n * self.groups(node) if self.layout == "conv" else n

    def out_channel_of(self, node: ir.Node, shape) -> np.ndarray:
        """The output channel of each weight element along the weight's first two axes: [a0, a1]."""
        if self.layout == "conv_transpose":  # [C, M/g, ...]: group of the input row, then column
            return self._grouped(node, shape)
        return self._index_along(self.out_axis(node), shape)

    def in_channel_of(self, node: ir.Node, shape) -> np.ndarray:
        """The input channel of each weight element along the weight's first two axes: [a0, a1]."""
        if self.layout == "conv":  # [M, C/g, ...]: group of the output row, then column
            return self._grouped(node, shape)
        return self._index_along(self.in_axis(node), shape)

    def _index_along(self, axis: int, shape) -> np.ndarray:
        """[a0, a1] holding each element's index along ``axis`` (0 or 1; negative: from the end)."""
        if self.layout in ("gemm", "matmul") and len(shape) != 2:
            raise ValueError(f"{self.op_type}: a weight of rank {len(shape)} has no [out, in] view")
        a0, a1 = int(shape[0]), int(shape[1])
        if axis % len(shape) == 0:
            return np.repeat(np.arange(a0)[:, None], a1, axis=1)
        return np.repeat(np.arange(a1)[None, :], a0, axis=0)

    def _grouped(self, node: ir.Node, shape) -> np.ndarray:
        """[a0, a1]: group of row r (a0 / groups rows each) times a1, plus the column."""
        a0, a1 = int(shape[0]), int(shape[1])
        group_of = np.arange(a0) // (a0 // self.groups(node))
        return group_of[:, None] * a1 + np.arange(a1)[None, :]

    def to_matrix(self, node: ir.Node, w: np.ndarray) -> np.ndarray:
        """The weight as rows ``[groups, out/groups, in/groups·prod(kernel)]``: row o of group g
        is what output channel g·out/groups + o computes from its im2col patch."""
        g = self.groups(node)
        if self.layout == "conv":
            return w.reshape(g, w.shape[0] // g, -1)
        if self.layout == "conv_transpose":
            c, mg = w.shape[:2]
            k = int(np.prod(w.shape[2:], dtype=np.int64))
            return w.reshape(g, c // g, mg, k).transpose(0, 2, 1, 3).reshape(g, mg, (c // g) * k)
        if w.ndim != 2:
            raise ValueError(f"{self.op_type}: a weight of rank {w.ndim} has no [out, in] view")
        if self.layout == "gemm" and attr(node, "transB", 0):
            return w[None]
        return w.T[None]

    def from_matrix(self, node: ir.Node, rows: np.ndarray, shape) -> np.ndarray:
        """The inverse of ``to_matrix``: rows back to the op's own weight layout ``shape``."""
        shape = tuple(int(d) for d in shape)
        g = self.groups(node)
        if self.layout == "conv":
            return rows.reshape(shape)
        if self.layout == "conv_transpose":
            c, mg = shape[:2]
            k = int(np.prod(shape[2:], dtype=np.int64))
            return rows.reshape(g, mg, c // g, k).transpose(0, 2, 1, 3).reshape(shape)
        if self.layout == "gemm" and attr(node, "transB", 0):
            return rows[0].reshape(shape)
        return rows[0].T.reshape(shape)

    def scale_out(self, node: ir.Node, w: np.ndarray, s: np.ndarray) -> np.ndarray:
        """Multiply output channel o of ``w`` by ``s[o]`` (float64 inside, ``w``'s dtype out)."""
        return self._scale(
            w, np.asarray(s, np.float64).reshape(-1)[self.out_channel_of(node, w.shape)]
        )

    def scale_in(self, node: ir.Node, w: np.ndarray, s: np.ndarray) -> np.ndarray:
        """Multiply input channel c of ``w`` by ``s[c]`` (float64 inside, ``w``'s dtype out)."""
        return self._scale(
            w, np.asarray(s, np.float64).reshape(-1)[self.in_channel_of(node, w.shape)]
        )

    @staticmethod
    def _scale(w: np.ndarray, factor: np.ndarray) -> np.ndarray:
        factor = factor.reshape(factor.shape + (1,) * (w.ndim - 2))
        return (w.astype(np.float64) * factor).astype(w.dtype)

    def im2col_rows(self, node: ir.Node, shape) -> int:
        """Length of one row of ``to_matrix``: input features each output channel reads."""
        if self.layout == "conv":
            return int(np.prod(shape[1:], dtype=np.int64))
        if self.layout == "conv_transpose":
            return int(shape[0]) // self.groups(node) * int(np.prod(shape[2:], dtype=np.int64))
        return int(shape[self.in_axis(node)])


def _weighted(*ops: WeightedOp) -> dict[str, WeightedOp]:
    return {op.op_type: op for op in ops}


WEIGHTED: dict[str, WeightedOp] = _weighted(
    WeightedOp("Conv", data=0, weight=1, bias=2, layout="conv"),
    WeightedOp("ConvTranspose", data=0, weight=1, bias=2, layout="conv_transpose"),
    WeightedOp("Gemm", data=0, weight=1, bias=2, layout="gemm"),
    WeightedOp("MatMul", data=0, weight=1, bias=None, layout="matmul"),
    # Integer forms (counted by summaries and benchmarks): x, w, x_zero_point, w_zero_point.
    WeightedOp("ConvInteger", data=0, weight=1, bias=None, layout="conv"),
    WeightedOp("MatMulInteger", data=0, weight=1, bias=None, layout="matmul"),
    # x, x_scale, x_zp, w, w_scale, w_zp, y_scale, y_zp, B
    WeightedOp("QLinearConv", data=0, weight=3, bias=8, layout="conv"),
    # a, a_scale, a_zp, b, b_scale, b_zp, y_scale, y_zp
    WeightedOp("QLinearMatMul", data=0, weight=3, bias=None, layout="matmul"),
)

# The float ops whose constant weights clean-up folds into and compression rewrites.
FOLDABLE = ("Conv", "ConvTranspose", "Gemm")


def weighted(node: ir.Node) -> WeightedOp | None:
    """The node's row in ``WEIGHTED``, or None (other domains included)."""
    if node.domain not in ("", "ai.onnx"):
        return None
    return WEIGHTED.get(node.op_type)


def weight_and_bias(node: ir.Node) -> tuple[np.ndarray, np.ndarray | None] | str:
    """The node's constant weight and bias arrays, or why they are not constants."""
    spec = WEIGHTED[node.op_type]
    w = const(node.inputs[spec.weight]) if len(node.inputs) > spec.weight else None
    if w is None:
        return f"the {node.op_type} weight is computed at run time"
    b_value = (
        node.inputs[spec.bias] if spec.bias is not None and len(node.inputs) > spec.bias else None
    )
    b = None
    if b_value is not None:
        b = const(b_value)
        if b is None:
            return f"the {node.op_type} bias is computed at run time"
    return w, b


def per_channel(c: np.ndarray, out_rank: int, channels: int, axis: int = 1) -> np.ndarray | str:
    """A constant that broadcasts along ``axis`` of a rank-``out_rank`` tensor only, as [channels]."""
    if c.ndim > out_rank:
        return f"the constant {list(c.shape)} has a higher rank than the output"
    shape = (1,) * (out_rank - c.ndim) + tuple(c.shape)
    if any(s != 1 for i, s in enumerate(shape) if i != axis) or shape[axis] not in (1, channels):
        return f"the constant {list(c.shape)} is not per output channel"
    return np.broadcast_to(c.reshape(-1).astype(np.float64), (channels,))


# Ops onnxruntime's CPU provider (1.32) runs in float32 but not float64 (no double kernel, or a
# float-only parameter such as Resize's scales): a float64 evaluation keeps them float32.
FLOAT32_ONLY = frozenset(
    """
    Conv ConvTranspose AveragePool GlobalAveragePool GlobalMaxPool LpPool GlobalLpPool LRN
    InstanceNormalization MeanVarianceNormalization Resize Upsample Erf Gelu HardSwish HardSigmoid
    LeakyRelu Elu Selu Celu Softplus Softsign Mish ThresholdedRelu Hardmax Tan Atan Asin Acos Sinh
    Cosh Asinh Acosh Atanh Det
    """.split()
)


# ---------------------------------------------------------------------------------------------
# Channel propagation


@dataclasses.dataclass(frozen=True)
class ChannelEdge:
    """Where the channels of one input axis appear in an output.

    kind "same": channel c is channel c of ``axis``; "offset": c is ``offset + c``; "blocks":
    c becomes ``[c·block, (c+1)·block)`` (Flatten/Reshape into a Gemm, depthwise multipliers);
    "range": only input channels ``start:stop:step`` reach this output, as 0, 1, ...
    """

    output: int
    axis: int
    kind: Literal["same", "offset", "blocks", "range"] = "same"
    offset: int = 0
    block: int = 1
    start: int = 0
    stop: int | None = None
    step: int = 1


@dataclasses.dataclass(frozen=True)
class ChannelFlow:
    """What a node does to channel axis ``axis`` of input ``input``.

    edges: where the channels continue in the outputs. tied: (input, axis) pairs of the same
    node indexed by the same channels, which must be cut together (Add's other operand, the
    BatchNormalization parameters, the weight's input axis). consumed: the channels end here,
    summed by a weight (``tied`` names the weight axis to cut). stop: why the trail cannot be
    followed (pruning must keep these channels).
    """

    node: ir.Node
    input: int
    axis: int
    edges: tuple[ChannelEdge, ...] = ()
    tied: tuple[tuple[int, int], ...] = ()
    consumed: bool = False
    stop: str | None = None


FlowRule = Callable[[ir.Node, int, int], ChannelFlow]


def _flow(node, i, axis, edges=(), tied=(), consumed=False, stop=None) -> ChannelFlow:
    return ChannelFlow(node, i, axis, tuple(edges), tuple(tied), consumed, stop)


def _stopped(why: str) -> FlowRule:
    return lambda node, i, axis: _flow(node, i, axis, stop=why)


def _follow(node: ir.Node, i: int, axis: int) -> ChannelFlow:
    """Elementwise on one tensor: channel c stays channel c; other inputs are scalars or bounds."""
    if i != 0:
        return _flow(node, i, axis, stop=f"input {i} of {node.op_type} is a parameter, not data")
    return _flow(node, i, axis, [ChannelEdge(0, axis)])


def _per_channel_params(*params: int, channel_axis: int = 1) -> FlowRule:
    """Data input 0 whose channels (axis ``channel_axis``) index 1-D parameter inputs ``params``."""

    def rule(node: ir.Node, i: int, axis: int) -> ChannelFlow:
        if i != 0:
            if axis != 0 or i not in params:
                return _flow(
                    node,
                    i,
                    axis,
                    stop=f"input {i} of {node.op_type} is not a per-channel parameter",
                )
            return _flow(
                node,
                i,
                axis,
                [ChannelEdge(0, channel_axis)],
                tied=[
                    (0, channel_axis),
                    *(
                        (p, 0)
                        for p in params
                        if p != i and p < len(node.inputs) and node.inputs[p] is not None
                    ),
                ],
            )
        if axis != channel_axis:
            return _flow(node, i, axis, [ChannelEdge(0, axis)])
        tied = [(p, 0) for p in params if p < len(node.inputs) and node.inputs[p] is not None]
        return _flow(node, i, axis, [ChannelEdge(0, axis)], tied=tied)

    return rule


def _broadcast(node: ir.Node, i: int, axis: int) -> ChannelFlow:
    """Broadcasting ops (Add, Mul, Where, ...): inputs aligned from the right share the channel
    wherever their dim there is not 1."""
    out_rank = max((rank(v) or -1) for v in node.inputs if v is not None)
    ranks = [rank(v) if v is not None else None for v in node.inputs]
    if any(r is None for r, v in zip(ranks, node.inputs) if v is not None):
        return _flow(node, i, axis, stop=f"{node.op_type}: an input rank is unknown")
    out_axis = axis + out_rank - ranks[i]
    tied = []
    sizes = []  # the other inputs' sizes along the output axis
    for j, v in enumerate(node.inputs):
        if j == i or v is None:
            continue
        k = out_axis - (out_rank - ranks[j])
        if k < 0:
            continue
        d = dims(v)[k]
        sizes.append(d)
        if d != 1:
            tied.append((j, k))
    out_dims = dims(node.outputs[0]) if node.outputs else None
    sizes.append(out_dims[out_axis] if out_dims and out_axis < len(out_dims) else None)
    if dims(node.inputs[i])[axis] == 1 and any(d not in (1, None) for d in sizes):
        # a size-1 axis stretched over the other inputs' channels holds none of them
        return _flow(node, i, axis, stop=f"input {i} of {node.op_type} broadcasts along this axis")
    return _flow(node, i, axis, [ChannelEdge(0, out_axis)], tied=tied)


def _concat(node: ir.Node, i: int, axis: int) -> ChannelFlow:
    r = rank(node.inputs[i])
    if r is None:
        return _flow(node, i, axis, stop="Concat: the input rank is unknown")
    cat = attr(node, "axis", 0) % r
    if axis != cat:
        tied = [(j, axis) for j, v in enumerate(node.inputs) if j != i and v is not None]
        return _flow(node, i, axis, [ChannelEdge(0, axis)], tied=tied)
    offset = 0
    for v in node.inputs[:i]:
        d = dims(v)
        if d is None or d[cat] is None:
            return _flow(node, i, axis, stop="Concat: the size of an earlier input is unknown")
        offset += d[cat]
    return _flow(node, i, axis, [ChannelEdge(0, axis, "offset", offset=offset)])


def _data_dims(node: ir.Node, i: int, axis: int) -> list[int | None] | ChannelFlow:
    """The dims of input 0, the data (the other inputs are sizes or indices), or a stop."""
    if i != 0:
        return _flow(node, i, axis, stop=f"{node.op_type}: input {i} is not data")
    shape = dims(node.inputs[0])
    if shape is None:
        return _flow(node, i, axis, stop=f"{node.op_type}: the input rank is unknown")
    return shape


def _split(node: ir.Node, i: int, axis: int) -> ChannelFlow:
    shape = _data_dims(node, i, axis)
    if isinstance(shape, ChannelFlow):
        return shape
    along = attr(node, "axis", 0) % len(shape)
    if axis != along:
        return _flow(node, i, axis, [ChannelEdge(o, axis) for o in range(len(node.outputs))])
    sizes = attr(node, "split")
    if sizes is None and len(node.inputs) > 1 and node.inputs[1] is not None:
        array = const(node.inputs[1])
        if array is None:
            return _flow(node, i, axis, stop="Split: the split sizes are computed at run time")
        sizes = array.reshape(-1).tolist()
    if sizes is None:
        total = shape[along]
        if total is None:
            return _flow(node, i, axis, stop="Split: the split axis size is unknown")
        n = len(node.outputs)
        part = -(-total // n)
        sizes = [min(part, total - k * part) for k in range(n)]
    edges, start = [], 0
    for o, size in enumerate(sizes):
        edges.append(ChannelEdge(o, axis, "range", start=start, stop=start + int(size)))
        start += int(size)
    return _flow(node, i, axis, edges)


def _slice(node: ir.Node, i: int, axis: int) -> ChannelFlow:
    shape = _data_dims(node, i, axis)
    if isinstance(shape, ChannelFlow):
        return shape
    r = len(shape)
    parts = [const(v) if v is not None else None for v in node.inputs[1:5]]
    parts += [None] * (4 - len(parts))
    starts, ends, axes, steps = parts
    if (
        starts is None
        or ends is None
        or (len(node.inputs) > 3 and node.inputs[3] is not None and axes is None)
        or (len(node.inputs) > 4 and node.inputs[4] is not None and steps is None)
    ):
        return _flow(node, i, axis, stop="Slice: starts/ends/axes/steps are computed at run time")
    axes_list = [
        a % r for a in (axes.reshape(-1).tolist() if axes is not None else range(len(starts)))
    ]
    if axis not in axes_list:
        return _flow(node, i, axis, [ChannelEdge(0, axis)])
    k = axes_list.index(axis)
    size = shape[axis]
    step = int(steps.reshape(-1)[k]) if steps is not None else 1
    if size is None:
        return _flow(node, i, axis, stop="Slice: the sliced axis size is unknown")
    start, stop, step = slice(int(starts.reshape(-1)[k]), int(ends.reshape(-1)[k]), step).indices(
        size
    )
    return _flow(node, i, axis, [ChannelEdge(0, axis, "range", start=start, stop=stop, step=step)])


def _transpose(node: ir.Node, i: int, axis: int) -> ChannelFlow:
    r = rank(node.inputs[0])
    perm = attr(node, "perm")
    if perm is None:
        if r is None:
            return _flow(node, i, axis, stop="Transpose: the input rank is unknown")
        perm = list(range(r))[::-1]
    return _flow(node, i, axis, [ChannelEdge(0, list(perm).index(axis))])


def _flatten(node: ir.Node, i: int, axis: int) -> ChannelFlow:
    shape = dims(node.inputs[0])
    if shape is None:
        return _flow(node, i, axis, stop="Flatten: the input rank is unknown")
    f = attr(node, "axis", 1) % (len(shape) + 1) if shape else 0
    return _merge(node, i, axis, shape, [f])


def _merge(
    node: ir.Node, i: int, axis: int, shape: list[int | None], cuts: list[int]
) -> ChannelFlow:
    """Axes of ``shape`` merged into output axes at ``cuts`` (axis j of the output covers input
    axes cuts[j-1]..cuts[j]); the channel axis must lead its group (then the rest are blocks)."""
    bounds = [0, *cuts, len(shape)]
    for out_axis in range(len(bounds) - 1):
        lo, hi = bounds[out_axis], bounds[out_axis + 1]
        if lo <= axis < hi:
            if axis != lo:
                inner = [d for d in shape[lo:axis] if d != 1]
                if inner:
                    return _flow(
                        node,
                        i,
                        axis,
                        stop=f"{node.op_type} merges the channels under a leading axis",
                    )
            trailing = shape[axis + 1 : hi]
            if any(d is None for d in trailing):
                return _flow(node, i, axis, stop=f"{node.op_type}: a merged dim is unknown")
            block = math.prod(trailing)
            kind = "same" if block == 1 else "blocks"
            return _flow(node, i, axis, [ChannelEdge(0, out_axis, kind, block=block)])
    return _flow(node, i, axis, stop=f"{node.op_type}: axis {axis} is out of range")


def _reshape(node: ir.Node, i: int, axis: int) -> ChannelFlow:
    if i != 0:
        return _flow(node, i, axis, stop="Reshape: the shape input is not data")
    src, dst = dims(node.inputs[0]), dims(node.outputs[0])
    if dst is None or (dst is not None and any(d is None for d in dst)):
        target = const(node.inputs[1]) if len(node.inputs) > 1 else None
        if target is not None and src is not None and all(d is not None for d in src):
            dst = _resolve_shape(src, target.reshape(-1).tolist(), attr(node, "allowzero", 0))
    if src is None or dst is None:
        return _flow(node, i, axis, stop="Reshape: the input or output shape is unknown")
    if src[axis] is None or any(d is None for d in src[: axis + 1]) or any(d is None for d in dst):
        return _flow(node, i, axis, stop="Reshape: the dims around the channel axis are unknown")
    before = math.prod(src[:axis])
    # The output axis where the channel axis starts: the dims before it hold the same elements.
    acc, out_axis = 1, 0
    while out_axis < len(dst) and acc < before:
        acc *= dst[out_axis]
        out_axis += 1
    while out_axis < len(dst) - 1 and dst[out_axis] == 1 and src[axis] != 1:
        out_axis += 1
    if acc != before or out_axis >= len(dst):
        return _flow(node, i, axis, stop="Reshape mixes the channel axis with the axes before it")
    size, block = dst[out_axis], 1
    if size == src[axis]:
        return _flow(node, i, axis, [ChannelEdge(0, out_axis)])
    if size % src[axis] == 0:
        block = size // src[axis]
        # The block must be made of whole trailing input axes.
        acc2, k = 1, axis + 1
        while k < len(src) and acc2 < block:
            acc2 *= src[k]
            k += 1
        if acc2 == block:
            return _flow(node, i, axis, [ChannelEdge(0, out_axis, "blocks", block=block)])
    return _flow(
        node, i, axis, stop=f"Reshape splits or regroups the channel axis ({src[axis]} -> {size})"
    )


def _resolve_shape(src: list[int], target: list[int], allowzero: int) -> list[int] | None:
    out = [
        src[k] if (t == 0 and not allowzero and k < len(src)) else int(t)
        for k, t in enumerate(target)
    ]
    if out.count(-1) > 1:
        return None
    if -1 in out:
        known = math.prod(d for d in out if d != -1)
        if known == 0:
            return None
        out[out.index(-1)] = math.prod(src) // known
    return out


def _axes(node: ir.Node, i: int, axis: int) -> tuple[int | None, list[int] | None] | ChannelFlow:
    """(input rank, ``axes`` of a Squeeze/Unsqueeze/Reduce*, None when not given), or a stop."""
    if i != 0:
        return _flow(node, i, axis, stop=f"{node.op_type}: the axes input is not data")
    axes = attr(node, "axes")
    if axes is None and len(node.inputs) > 1 and node.inputs[1] is not None:
        array = const(node.inputs[1])
        if array is None:
            return _flow(node, i, axis, stop=f"{node.op_type}: axes are computed at run time")
        axes = array.reshape(-1).tolist()
    return rank(node.inputs[0]), None if axes is None else [int(a) for a in axes]


def _squeeze_like(node: ir.Node, i: int, axis: int) -> ChannelFlow:
    found = _axes(node, i, axis)
    if isinstance(found, ChannelFlow):
        return found
    r, axes = found
    out_rank = rank(node.outputs[0])
    if r is None or (axes is None and out_rank is None):
        return _flow(node, i, axis, stop=f"{node.op_type}: the rank is unknown")
    if node.op_type == "Squeeze":
        if axes is None:
            shape = dims(node.inputs[0])
            axes = [k for k, d in enumerate(shape) if d == 1]
        removed = {a % r for a in axes}
        if axis in removed:
            return _flow(node, i, axis, stop="Squeeze removes this axis")
        return _flow(node, i, axis, [ChannelEdge(0, axis - sum(1 for a in removed if a < axis))])
    new_rank = r + len(axes)
    inserted = sorted(a % new_rank for a in axes)
    pos = axis
    for a in inserted:
        if a <= pos:
            pos += 1
    return _flow(node, i, axis, [ChannelEdge(0, pos)])


def _expand(node: ir.Node, i: int, axis: int) -> ChannelFlow:
    if i != 0:
        return _flow(node, i, axis, stop="Expand: the shape input is not data")
    r, out_rank = rank(node.inputs[0]), rank(node.outputs[0])
    if r is None or out_rank is None:
        return _flow(node, i, axis, stop="Expand: the rank is unknown")
    return _flow(node, i, axis, [ChannelEdge(0, axis + out_rank - r)])


def _pool(node: ir.Node, i: int, axis: int) -> ChannelFlow:
    """Pooling and resizing: batch and channel axes pass through; spatial axes are resampled."""
    if i != 0:
        return _flow(node, i, axis, stop=f"input {i} of {node.op_type} is a parameter, not data")
    if axis >= 2:
        return _flow(node, i, axis, stop=f"{node.op_type} resamples spatial axis {axis}")
    return _flow(node, i, axis, [ChannelEdge(0, axis)])


def _reduce(node: ir.Node, i: int, axis: int) -> ChannelFlow:
    found = _axes(node, i, axis)
    if isinstance(found, ChannelFlow):
        return found
    r, axes = found
    if r is None:
        return _flow(node, i, axis, stop=f"{node.op_type}: the rank is unknown")
    reduced = {a % r for a in axes} if axes else set(range(r))
    if not axes and attr(node, "noop_with_empty_axes", 0):
        reduced = set()
    if axis in reduced:
        return _flow(node, i, axis, stop=f"{node.op_type} reduces over the channel axis")
    if attr(node, "keepdims", 1):
        return _flow(node, i, axis, [ChannelEdge(0, axis)])
    return _flow(node, i, axis, [ChannelEdge(0, axis - sum(1 for a in reduced if a < axis))])


def _along_attr_axis(default_axis: int, why: str) -> FlowRule:
    """Ops that mix values along one axis (Softmax, LayerNormalization from ``axis`` on)."""

    def rule(node: ir.Node, i: int, axis: int) -> ChannelFlow:
        if i != 0:
            return _flow(
                node, i, axis, stop=f"input {i} of {node.op_type} is a parameter, not data"
            )
        r = rank(node.inputs[0])
        if r is None:
            return _flow(node, i, axis, stop=f"{node.op_type}: the rank is unknown")
        a = attr(node, "axis", default_axis) % r
        mixed = axis >= a if node.op_type == "LayerNormalization" else axis == a
        if mixed:
            return _flow(node, i, axis, stop=f"{node.op_type} {why}")
        return _flow(node, i, axis, [ChannelEdge(0, axis)])

    return rule


def _weighted_flow(node: ir.Node, i: int, axis: int) -> ChannelFlow:
    """Conv/ConvTranspose/Gemm/MatMul: data channels are summed by the weight's input axis (or,
    depthwise, each becomes its own block of outputs); weight output rows are output channels."""
    spec = WEIGHTED[node.op_type]
    w_value = node.inputs[spec.weight]
    w_shape = dims(w_value)
    if w_shape is None or any(d is None for d in w_shape):
        return _flow(node, i, axis, stop=f"{node.op_type}: the weight shape is unknown")
    w_rank = len(w_shape)
    out_axis_w = spec.out_axis(node) % w_rank
    in_axis_w = spec.in_axis(node) % w_rank
    data_rank = rank(node.inputs[spec.data])
    if spec.layout == "matmul":
        if w_rank != 2:
            return _flow(node, i, axis, stop=f"{node.op_type}: a batched weight of rank {w_rank}")
        channel = (data_rank - 1) if data_rank is not None else None
        out_channel = (rank(node.outputs[0]) or 0) - 1
    elif spec.layout == "gemm":
        if attr(node, "transA", 0):
            return _flow(node, i, axis, stop="Gemm with transA=1")
        channel, out_channel = 1, 1
    else:
        channel, out_channel = 1, 1
    bias = (
        spec.bias
        if spec.bias is not None
        and len(node.inputs) > spec.bias
        and node.inputs[spec.bias] is not None
        else None
    )
    g = spec.groups(node)
    if i == spec.data:
        if channel is None:
            return _flow(node, i, axis, stop=f"{node.op_type}: the input rank is unknown")
        if axis != channel:
            if spec.layout in ("conv", "conv_transpose") and axis >= 2:
                return _flow(node, i, axis, stop=f"{node.op_type} convolves spatial axis {axis}")
            if spec.layout == "conv" or spec.layout == "conv_transpose" or axis < channel:
                return _flow(node, i, axis, [ChannelEdge(0, axis)])
            return _flow(node, i, axis, stop=f"{node.op_type}: axis {axis} is not the channel axis")
        in_ch = spec.in_channels(node, w_shape)
        if g > 1 and spec.layout == "conv" and g == in_ch:  # depthwise: channel c -> outputs c·k..
            multiplier = spec.out_channels(node, w_shape) // g
            kind = "same" if multiplier == 1 else "blocks"
            tied = [(spec.weight, out_axis_w)] + ([(bias, 0)] if bias is not None else [])
            return _flow(
                node, i, axis, [ChannelEdge(0, out_channel, kind, block=multiplier)], tied=tied
            )
        if g > 1:
            return _flow(
                node,
                i,
                axis,
                stop=f"{node.op_type} with group={g}: channels are cut only by whole groups",
            )
        return _flow(node, i, axis, tied=[(spec.weight, in_axis_w)], consumed=True)
    if i == spec.weight:
        if axis == out_axis_w:
            if g > 1 and not (spec.layout == "conv" and g == spec.in_channels(node, w_shape)):
                return _flow(
                    node,
                    i,
                    axis,
                    stop=f"{node.op_type} with group={g}: output channels are cut only by whole groups",
                )
            tied = [(bias, 0)] if bias is not None else []
            return _flow(node, i, axis, [ChannelEdge(0, out_channel)], tied=tied)
        if axis == in_axis_w:
            if g > 1:
                return _flow(
                    node,
                    i,
                    axis,
                    stop=f"{node.op_type} with group={g}: input channels are cut only by whole groups",
                )
            return _flow(
                node,
                i,
                axis,
                tied=[(spec.data, channel)] if channel is not None else [],
                consumed=True,
            )
        return _flow(node, i, axis, stop=f"{node.op_type}: weight axis {axis} is a kernel axis")
    if bias is not None and i == bias and axis == 0:
        return _flow(node, i, axis, [ChannelEdge(0, out_channel)], tied=[(spec.weight, out_axis_w)])
    return _flow(node, i, axis, stop=f"input {i} of {node.op_type} carries no channels")


# Op type -> what it does to the channels of its inputs. Adding an op is adding a row.
CHANNELS: dict[str, FlowRule] = {
    **{
        op: _follow
        for op in (
            "Relu",
            "LeakyRelu",
            "Sigmoid",
            "Tanh",
            "HardSigmoid",
            "HardSwish",
            "Gelu",
            "Swish",
            "Elu",
            "Selu",
            "Celu",
            "Softplus",
            "Softsign",
            "Mish",
            "ThresholdedRelu",
            "Erf",
            "Exp",
            "Log",
            "Sqrt",
            "Abs",
            "Neg",
            "Reciprocal",
            "Floor",
            "Ceil",
            "Round",
            "Sign",
            "Sin",
            "Cos",
            "Clip",
            "Cast",
            "Identity",
            "Dropout",
            "IsNaN",
            "IsInf",
            "Not",
        )
    },
    **{
        op: _broadcast
        for op in (
            "Add",
            "Sub",
            "Mul",
            "Div",
            "Pow",
            "Max",
            "Min",
            "Sum",
            "Mean",
            "Where",
            "PRelu",
            "Equal",
            "Less",
            "Greater",
            "LessOrEqual",
            "GreaterOrEqual",
            "And",
            "Or",
            "Xor",
            "Mod",
        )
    },
    "BatchNormalization": _per_channel_params(1, 2, 3, 4),
    "InstanceNormalization": _per_channel_params(1, 2),
    "LayerNormalization": _along_attr_axis(-1, "normalizes over the channel axis"),
    "Softmax": _along_attr_axis(-1, "normalizes over the channel axis"),
    "LogSoftmax": _along_attr_axis(-1, "normalizes over the channel axis"),
    "GroupNormalization": _stopped("GroupNormalization ties channels into groups"),
    **{
        op: _pool
        for op in (
            "MaxPool",
            "AveragePool",
            "GlobalAveragePool",
            "GlobalMaxPool",
            "LpPool",
            "GlobalLpPool",
            "Resize",
            "Upsample",
        )
    },
    **{
        op: _reduce
        for op in (
            "ReduceMean",
            "ReduceSum",
            "ReduceMax",
            "ReduceMin",
            "ReduceProd",
            "ReduceL1",
            "ReduceL2",
            "ReduceLogSumExp",
            "ReduceSumSquare",
        )
    },
    "Concat": _concat,
    "Split": _split,
    "Slice": _slice,
    "Transpose": _transpose,
    "Flatten": _flatten,
    "Reshape": _reshape,
    "Squeeze": _squeeze_like,
    "Unsqueeze": _squeeze_like,
    "Expand": _expand,
    "DepthToSpace": _stopped("DepthToSpace moves channels into space"),
    "SpaceToDepth": _stopped("SpaceToDepth moves space into channels"),
    "Gather": _stopped("Gather picks channels by run-time indices"),
    "Conv": _weighted_flow,
    "ConvTranspose": _weighted_flow,
    "Gemm": _weighted_flow,
    "MatMul": _weighted_flow,
}


def channel_flow(node: ir.Node, input_index: int, axis: int) -> ChannelFlow:
    """What ``node`` does to channel axis ``axis`` of its input ``input_index`` (see ``ChannelFlow``)."""
    if node.domain not in ("", "ai.onnx"):
        return _flow(
            node, input_index, axis, stop=f"{node.domain}::{node.op_type} has no channel rule"
        )
    rule = CHANNELS.get(node.op_type)
    if rule is None:
        return _flow(node, input_index, axis, stop=f"{node.op_type} has no channel rule")
    r = rank(node.inputs[input_index]) if input_index < len(node.inputs) else None
    if axis < 0:
        if r is None:
            return _flow(node, input_index, axis, stop=f"{node.op_type}: the input rank is unknown")
        axis %= r
    return rule(node, input_index, axis)
