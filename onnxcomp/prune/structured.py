"""Structured pruning: remove whole channels through dependency groups, so tensors really shrink.

A dependency group (as in Torch-Pruning's DepGraph, Fang et al. 2023) is every tensor axis whose
positions must be cut together when one output channel of a Conv/Gemm/MatMul goes: the
producers' weight rows and biases, what the channels flow through (activations, pooling, the
residual Add and the other branch feeding it, Concat at an offset, depthwise Conv, Flatten into a
Gemm as blocks of columns) and the consumers' weight columns. Groups are built as data first,
from the channel-propagation table in ``ops.py``, before anything is cut; a group that cannot be
cut safely (its channels reach a graph output, a Reshape to a fixed size, a shared initializer,
...) is declined with the reason. A Split on the channel axis (YOLOv8's C2f halves) makes one
group per part: the parts are cut independently and the Split sizes follow; a Slice on the
channel axis keeps the group when its channels fall wholly inside or outside the slice, and its
starts/ends follow. Then channels are ranked (L1/L2 of the weights, a
BatchNorm scale, or their activation-weighted contribution to the consumers), the lowest ones
cut in one sweep, and each consumer's remaining columns solved by least squares so it still
computes what it did on the calibration data.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxcomp import capture, layerwise, ops
from onnxcomp import graph as g
from onnxcomp import model as model_io
from onnxcomp.data import DataSource
from onnxcomp.errors import OnnxcompError
from onnxcomp.prune import heads
from onnxcomp.prune.budget import fall_back, make_judge

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class Slot:
    """A tensor axis whose positions follow the group's channels: ``index[c]`` are the positions
    of group channel c on that axis (more than one after a Flatten: a block)."""

    value: ir.Value
    axis: int
    index: np.ndarray  # (channels, block) int64


@dataclasses.dataclass
class DependencyGroup:
    """Channels that are cut together, and where they live."""

    name: str
    channels: int
    slots: dict[tuple[int, int], Slot] = dataclasses.field(default_factory=dict)
    producers: list[ir.Node] = dataclasses.field(default_factory=list)
    consumers: list[ir.Node] = dataclasses.field(default_factory=list)
    depthwise: list[ir.Node] = dataclasses.field(default_factory=list)
    nodes: dict[int, ir.Node] = dataclasses.field(default_factory=dict)
    kinds: set[str] = dataclasses.field(default_factory=set)
    declined: str | None = None
    removed: np.ndarray | None = None  # group channels to cut
    parts: list[np.ndarray] | None = None  # root channels per Split output (then built apart)
    # Split/Slice nodes along the channel axis: (node, key of the slot on their data input)
    resized: list[tuple[ir.Node, tuple[int, int]]] = dataclasses.field(default_factory=list)
    sensitivity: list[tuple[int, float]] | None = None  # --allocate sensitivity: (cut, output loss)

    def params(self) -> list[Slot]:
        """Slots on initializers (the arrays to slice)."""
        return [s for s in self.slots.values() if s.value.is_initializer()]

    def to_json(self) -> dict[str, Any]:
        row: dict[str, Any] = {
            "group": self.name,
            "kind": "+".join(sorted(self.kinds)) or "chain",
            "channels": self.channels,
            "producers": [g.label(n) for n in self.producers],
            "consumers": [g.label(n) for n in self.consumers],
        }
        if self.sensitivity is not None:
            row["sensitivity"] = [[n, round(loss, 6)] for n, loss in self.sensitivity]
        return heads.outcome(row, self.declined, self.removed)


class _Decline(Exception):
    pass


class _Span(Exception):
    """The group's channels go to several outputs of a Split: ``parts`` (group channels per
    output) become groups of their own."""

    def __init__(self, parts: list[np.ndarray]):
        super().__init__("split")
        self.parts = parts


def _map_edge(index: np.ndarray, edge: ops.ChannelEdge, where: str) -> np.ndarray | None:
    """Positions ``index`` (channels, block) on the edge's input -> on its output; None when a
    "range" edge (Split/Slice) takes none of them."""
    if edge.kind == "same":
        return index
    if edge.kind == "offset":
        return index + edge.offset
    if edge.kind == "blocks":
        return (index[:, :, None] * edge.block + np.arange(edge.block)).reshape(len(index), -1)
    inside = _in_range(index, edge)
    if not inside.any():
        return None
    if not inside.all():
        raise _Decline(f"{where} takes only some of these channels")
    return (index - edge.start) // edge.step


def _in_range(index: np.ndarray, edge: ops.ChannelEdge) -> np.ndarray:
    """Per position: does the "range" edge (start:stop:step) take it."""
    stop = edge.stop if edge.stop is not None else np.iinfo(np.int64).max
    return (index >= edge.start) & (index < stop) & ((index - edge.start) % edge.step == 0)


def _rank(value: ir.Value) -> int | None:
    return g.rank(value)


def build_group(root: ir.Node, positions: np.ndarray | None = None) -> DependencyGroup:
    """The dependency group of ``root``'s output channels (all, or those at ``positions``),
    declined with a reason when needed. When the channels part at a Split, ``group.parts`` says
    how (`build_groups` then builds one group per part)."""
    spec = ops.weighted(root)
    w = root.inputs[spec.weight]
    if positions is None:
        positions = np.arange(spec.out_channels(root, w.shape), dtype=np.int64)
    name = root.name or f"{root.op_type}->{root.outputs[0].name}"
    if len(positions) != spec.out_channels(root, w.shape):
        name += _range_label(positions)
    group = DependencyGroup(name, len(positions), producers=[root])
    start = np.asarray(positions, dtype=np.int64)[:, None]
    out = root.outputs[0]
    out_rank = _rank(out)
    if out_rank is None:
        group.declined = f"{g.label(root)}: the output rank is unknown"
        return group
    out_axis = 1 if spec.layout in ("conv", "conv_transpose") or spec.layout == "gemm" else out_rank - 1
    queue: list[tuple[ir.Value, int, np.ndarray]] = [(out, out_axis, start)]
    try:
        while queue:
            value, axis, index = queue.pop()
            key = (id(value), axis)
            if key in group.slots:
                index = _merge(group.slots[key], index)
                if index is None:
                    continue
            else:
                group.slots[key] = Slot(value, axis, index)
            if value.is_graph_output():
                raise _Decline(f"its channels reach the graph output {value.name!r}")
            if value.is_graph_input():
                raise _Decline(f"its channels come from the graph input {value.name!r}")
            if value.is_initializer() or value.const_value is not None:
                continue
            _backward(group, value, axis, index, queue)
            _forward(group, value, axis, index, queue)
        _check_params(group)
        if not group.consumers:
            raise _Decline("no layer consumes its channels")
    except _Decline as why:
        group.declined = str(why)
    except _Span as span:
        group.parts = [start[part, 0] for part in span.parts]
        group.declined = "its channels part at a Split"
    return group


def _merge(slot: Slot, index: np.ndarray) -> np.ndarray | None:
    """A slot reached again: nothing new (None), or more positions of the same channels (the
    residual stream of a C2f block sits at several offsets of its Concat, SPPF concatenates
    x with its poolings), which join the slot's block axis and are followed from here."""
    old = slot.index
    if old.shape == index.shape and np.array_equal(old, index):
        return None
    taken = set(old.reshape(-1).tolist())
    fresh = [[p for p in row.tolist() if p not in set(mine.tolist())] for row, mine in zip(index, old)]
    flat = [p for row in fresh for p in row]
    if len({len(row) for row in fresh}) != 1 or taken.intersection(flat) or len(set(flat)) != len(flat):
        raise _Decline(f"{slot.value.name} is reached twice at overlapping channel positions")
    if not flat:
        return None
    more = np.array(fresh, dtype=np.int64)
    slot.index = np.concatenate([old, more], axis=1)
    return more


def _range_label(positions: np.ndarray) -> str:
    lo, hi = int(positions[0]), int(positions[-1]) + 1
    if hi - lo == len(positions) and np.all(np.diff(positions) == 1):
        return f"[{lo}:{hi}]"
    return f"[{len(positions)} channels]"


def _backward(group: DependencyGroup, value: ir.Value, axis: int, index: np.ndarray, queue) -> None:
    """Find which input axes of ``value``'s producer carry these channels."""
    node = value.producer()
    if node is None:
        raise _Decline(f"{value.name} has no producer")
    group.nodes[id(node)] = node
    o = list(node.outputs).index(value)
    found = False
    for i, inp in enumerate(node.inputs):
        if inp is None:
            continue
        r = _rank(inp)
        if r is None:
            raise _Decline(f"{g.label(node)}: the rank of input {inp.name!r} is unknown")
        for b in range(r):
            flow = ops.channel_flow(node, i, b)
            if flow.stop:
                continue
            for edge in flow.edges:
                if edge.output != o or edge.axis != axis:
                    continue
                if edge.kind == "range":  # a Split/Slice output: the positions it took
                    found = True
                    queue.append((inp, b, edge.start + index * edge.step))
                    group.resized.append((node, (id(inp), b)))
                    group.kinds.add(node.op_type.lower())
                    continue
                if edge.kind != "same":
                    if _came_from(group, inp, b, edge, index, node):
                        found = True
                    continue
                found = True
                queue.append((inp, b, index))
                _tie(group, node, flow, index, queue)
                spec = ops.weighted(node)
                if spec is not None and i == spec.weight:
                    if node not in group.producers:
                        group.producers.append(node)
                if spec is not None and i == spec.data and spec.groups(node) > 1:
                    if node not in group.depthwise:
                        group.depthwise.append(node)
                        group.kinds.add("depthwise")
    if not found:
        raise _Decline(f"{g.label(node)} ({node.op_type}) makes these channels; it cannot be cut there")


def _came_from(group, inp, b, edge, index, node) -> bool:
    """A non-identity edge seen from its output side: True when it is the path the channels came
    in by (the input slot maps onto ``index``), False when that input holds none of them;
    declines when it would hold some (cutting them would need the mapping inverted)."""
    slot = group.slots.get((id(inp), b))
    if slot is not None:
        try:
            if np.array_equal(_map_edge(slot.index, edge, g.label(node)), index):
                return True
        except _Decline:
            pass
    if edge.kind == "offset":
        size = (g.dims(inp) or [None] * (b + 1))[b]
        if size is not None and not np.any((index >= edge.offset) & (index < edge.offset + size)):
            return False
    kind = "Concat" if edge.kind == "offset" else node.op_type
    raise _Decline(f"{g.label(node)}: channels reach a {kind} from its output side")


def _forward(group: DependencyGroup, value: ir.Value, axis: int, index: np.ndarray, queue) -> None:
    for use in list(value.uses()):
        node, i = use.node, use.idx
        group.nodes[id(node)] = node
        flow = ops.channel_flow(node, i, axis)
        if flow.stop:
            raise _Decline(f"{g.label(node)}: {flow.stop}")
        _tie(group, node, flow, index, queue)
        spec = ops.weighted(node)
        if flow.consumed:
            if node not in group.consumers:
                group.consumers.append(node)
            continue
        if spec is not None and i == spec.data and spec.groups(node) > 1 and node not in group.depthwise:
            group.depthwise.append(node)
            group.kinds.add("depthwise")
        ranges = [edge for edge in flow.edges if edge.kind == "range"]
        if ranges:
            _check_span(node, ranges, index)
            group.resized.append((node, (id(value), axis)))
            group.kinds.add(node.op_type.lower())
        for edge in flow.edges:
            target = node.outputs[edge.output]
            if node.op_type == "Concat":
                group.kinds.add("concat")
            if edge.kind == "blocks":
                group.kinds.add(f"{node.op_type.lower()} into {_reader(target)}")
            if node.op_type == "Reshape":
                _check_reshape(node, target, edge)
            mapped = _map_edge(index, edge, g.label(node))
            if mapped is not None:
                queue.append((target, edge.axis, mapped))


def _check_span(node: ir.Node, ranges: list[ops.ChannelEdge], index: np.ndarray) -> None:
    """Channels entering a Split/Slice must each go wholly to one output; when they go to
    several outputs of a Split, the group parts there (`_Span`)."""
    if any(edge.step != 1 for edge in ranges):
        raise _Decline(f"{g.label(node)}: {node.op_type} with a step along the channel axis")
    if index.shape[1] != 1:
        raise _Decline(f"{g.label(node)}: {node.op_type} of channel blocks")
    taken = [_in_range(index[:, 0], edge) for edge in ranges]
    if node.op_type == "Slice":
        if taken[0].any() and not taken[0].all():
            raise _Decline(f"{g.label(node)}: the Slice takes only some of these channels")
        return
    if sum(t.any() for t in taken) > 1:
        if not np.all(np.sum(taken, axis=0) == 1):
            raise _Decline(f"{g.label(node)}: the Split sizes do not cover these channels")
        raise _Span([np.flatnonzero(t) for t in taken if t.any()])


def _reader(value: ir.Value) -> str:
    users = g.users(value)
    return users[0].op_type if len(users) == 1 else "several"


def _check_reshape(node: ir.Node, target: ir.Value, edge: ops.ChannelEdge) -> None:
    shape = g.const(node.inputs[1]) if len(node.inputs) > 1 else None
    if shape is None:
        raise _Decline(f"{g.label(node)}: the Reshape target is computed at run time")
    shape = shape.reshape(-1)
    if edge.axis >= len(shape) or int(shape[edge.axis]) != -1:
        raise _Decline(f"{g.label(node)}: the Reshape target fixes the channel count")


def _tie(group: DependencyGroup, node: ir.Node, flow: ops.ChannelFlow, index: np.ndarray, queue) -> None:
    for j, k in flow.tied:
        other = node.inputs[j]
        if other is None:
            continue
        if node.op_type in ("Add", "Sub") and other.const_value is None:
            group.kinds.add("residual")
        queue.append((other, k, index))


def _check_params(group: DependencyGroup) -> None:
    for slot in group.params():
        for use in slot.value.uses():
            if id(use.node) not in group.nodes:
                raise _Decline(
                    f"initializer {slot.value.name!r} is also read by {g.label(use.node)}, outside the group"
                )
    for node in group.depthwise:
        spec = ops.weighted(node)
        w = node.inputs[spec.weight]
        if spec.out_channels(node, w.shape) != spec.groups(node):
            raise _Decline(f"{g.label(node)}: depthwise Conv with a channel multiplier")


def build_groups(model: ir.Model, exclude_nodes: list[str] = ()) -> list[DependencyGroup]:
    """Every dependency group of the model, declined ones included (plan, before any cut)."""
    groups: list[DependencyGroup] = []
    taken: set[int] = set()
    for node in model.graph:
        spec = ops.weighted(node)
        if spec is None or node.op_type not in ("Conv", "Gemm", "MatMul") or id(node) in taken:
            continue
        w = node.inputs[spec.weight]
        if w is None or g.const(w) is None:
            continue
        if spec.groups(node) > 1:
            continue  # depthwise: follows its input's group; grouped: cut only by whole groups
        if node.op_type == "Gemm" and g.attr(node, "transA", 0):
            continue
        if node.op_type == "MatMul" and len(w.shape) != 2:
            continue
        todo = [None]  # root positions to build a group for (None: all)
        while todo:
            group = build_group(node, todo.pop(0))
            if group.parts is not None:
                todo += group.parts  # a Split: one group per part, cut independently
                continue
            for producer in group.producers:
                taken.add(id(producer))
            if not group.declined:
                excluded = [g.label(n) for n in group.producers if n.name in exclude_nodes]
                if excluded:
                    group.declined = f"excluded by --exclude-nodes ({excluded[0]})"
            groups.append(group)
    _check_overlaps(groups)
    return groups


def _check_overlaps(groups: list[DependencyGroup]) -> None:
    """Two groups may share consumers (a Concat) but never a slot at the same position."""
    seen: dict[tuple[int, int], set[int]] = {}
    for group in groups:
        if group.declined:
            continue
        for key, slot in group.slots.items():
            positions = set(slot.index.reshape(-1).tolist())
            if key in seen and seen[key] & positions:
                group.declined = f"{slot.value.name} is shared with another group"
                break
            seen.setdefault(key, set()).update(positions)


# ---------------------------------------------------------------------------------------------
# Importance


def _axis_energy(array: np.ndarray, axis: int, index: np.ndarray, p: int) -> np.ndarray:
    """Per group channel: the L1 or squared L2 of the slices at ``index`` along ``axis``."""
    moved = np.moveaxis(np.asarray(array, np.float64), axis, 0).reshape(array.shape[axis], -1)
    per_pos = np.abs(moved).sum(axis=1) if p == 1 else (moved**2).sum(axis=1)
    return per_pos[index].sum(axis=1)


def importance(group: DependencyGroup, how: str, hessians: dict[int, list[np.ndarray]] | None) -> np.ndarray:
    """Scores of the group's channels (higher = kept), each weight normalised by its mean."""
    total = np.zeros(group.channels)
    weights = set()
    for node in group.producers + group.consumers + group.depthwise:
        spec = ops.weighted(node)
        weights.add(id(node.inputs[spec.weight]))
    if how == "activation" and hessians:
        for node in group.consumers:
            total += _activation_score(group, node, hessians.get(id(node)))
        return total
    for slot in group.params():
        if id(slot.value) not in weights:
            continue
        e = _axis_energy(slot.value.const_value.numpy(), slot.axis, slot.index, 1 if how == "l1" else 2)
        total += _normalised(e)
    return total


def _normalised(e: np.ndarray) -> np.ndarray:
    mean = float(np.mean(e))
    return e / mean if mean > 0 else e


def _activation_score(group, node, h, damp: float = 0.01) -> np.ndarray:
    """What the consumer loses per channel, relative to its output: the error left when that
    channel alone goes and the other inputs compensate by least squares, ``w_P (H^-1_PP)^-1
    w_P^T`` over its columns P (the structured OBS loss: Hassibi & Stork 1993; Kurtic et al.,
    ZipLM, 2023, Sec. 3), divided by its output energy ``tr(W H W^T)``. Without a Hessian:
    Wanda's ``||W[:, col]||^2`` summed over the channel."""
    spec = ops.weighted(node)
    w = node.inputs[spec.weight]
    rows = spec.to_matrix(node, w.const_value.numpy())[0].astype(np.float64)  # (out, in)
    slot = group.slots[(id(w), spec.in_axis(node) % len(w.shape))]
    cols = _columns(node, slot.index)  # (channels, columns per channel)
    if not h:
        return (rows**2).sum(axis=0)[cols].sum(axis=1)
    hd = np.array(h[0], dtype=np.float64)
    hd[np.diag_indices_from(hd)] += damp * max(float(np.mean(np.diag(hd))), 1e-12)
    hinv = np.linalg.inv(hd)
    blocks = hinv[cols[:, :, None], cols[:, None, :]]  # (channels, b, b)
    wc = np.moveaxis(rows[:, cols], 0, 1)  # (channels, out, b)
    loss = np.einsum("cob,cbd,cod->c", wc, np.linalg.inv(blocks), wc)
    return loss / max(float(np.sum((rows @ h[0]) * rows)), 1e-30)


def _columns(node: ir.Node, index: np.ndarray) -> np.ndarray:
    """Matrix columns (of ``to_matrix``) of in-axis positions ``index`` (c, block)."""
    spec = ops.weighted(node)
    if spec.layout == "conv":
        w = node.inputs[spec.weight]
        k = int(np.prod([int(d) for d in w.shape[2:]]))
        return (index[:, :, None] * k + np.arange(k)).reshape(len(index), -1)
    return index


# ---------------------------------------------------------------------------------------------
# Choose, reconstruct, cut


# Kept channel counts are rounded to a multiple of this (when the group had one): onnxruntime's
# CPU convolutions use blocked NCHWc kernels only when channels are a multiple of 8 (16 with
# AVX-512); measured on the MobileNetV2-style graph, 40 % cut to odd counts (57, 153, ...) ran
# 4.2x *slower* than the dense model, rounded to multiples of 8 it runs faster.
ROUND_TO = 8


def _n_removed(channels: int, wanted: int) -> int:
    keep = max(1, channels - wanted)
    if channels % ROUND_TO == 0:
        keep = max(ROUND_TO, int(round(keep / ROUND_TO)) * ROUND_TO)
    return max(0, channels - keep)


def choose(
    groups: list[DependencyGroup], scores: dict[int, np.ndarray], ratio: float, scope: str,
    group_ratios: dict[str, float] | None = None,
) -> None:
    """Set ``removed`` of each live group: the lowest-scored ``ratio`` of its channels (layer; a
    group named in ``group_ratios`` takes its own ratio), or the lowest overall after normalising
    each group's scores by its mean (global); kept counts rounded to a multiple of ``ROUND_TO``."""
    live = [grp for grp in groups if not grp.declined]
    unknown = sorted(set(group_ratios or {}) - {grp.name for grp in live})
    if unknown:
        raise OnnxcompError(f"group_ratios: {unknown[0]!r} is not a prunable group (see the report's groups)")
    if scope == "global" and group_ratios:
        raise OnnxcompError("group_ratios: a ratio per group needs scope layer")
    if scope == "global" and live:
        flat = np.concatenate([_normalised(scores[id(grp)]) for grp in live])
        k = int(np.floor(len(flat) * ratio))
        cut = np.sort(flat)[k - 1] if k else -np.inf
        for grp in live:
            s = _normalised(scores[id(grp)])
            order = np.argsort(s, kind="stable")
            n = _n_removed(grp.channels, int(np.count_nonzero(s <= cut)))
            grp.removed = np.sort(order[:n])
        return
    for grp in live:
        r = (group_ratios or {}).get(grp.name, ratio)
        n = _n_removed(grp.channels, int(np.floor(grp.channels * r)))
        grp.removed = np.sort(np.argsort(scores[id(grp)], kind="stable")[:n])


class MacCount:
    """MACs of the weighted ops as a function of how many channels each group loses: a weight
    of shape ``s`` applied at ``P`` output positions costs ``prod(s) * P`` (Conv: the output
    pixels; Gemm/MatMul: the rows), and cutting a group shortens the weight axes it holds."""

    def __init__(self, model: ir.Model, groups: list[DependencyGroup], shapes: dict[str, list[int]]):
        from onnxcomp.summary import summarize

        layers = (summarize(model, shapes=shapes).get("compute") or {}).get("layers") or []
        counted = {layer["node"]: layer["macs"] for layer in layers if layer.get("macs")}
        self.weights: dict[int, tuple[tuple[int, ...], float]] = {}
        for node in model.graph:
            spec = ops.weighted(node)
            w = node.inputs[spec.weight] if spec is not None and len(node.inputs) > spec.weight else None
            if w is None or w.shape is None or not all(isinstance(d, int) for d in w.shape):
                continue
            # how many times the weight is applied (Conv: output pixels; Gemm/MatMul: rows);
            # unknown shapes: MACs fall back to parameters
            positions = counted.get(node.name or node.outputs[0].name, 0) / max(1, int(np.prod(w.shape))) or 1.0
            shape, before = self.weights.get(id(w), (tuple(w.shape), 0.0))
            self.weights[id(w)] = (shape, before + positions)
        self.total = self.macs({})
        self.slots = {  # group -> [(weight id, axis, positions per channel)]
            id(grp): [(id(s.value), s.axis, s.index.shape[1]) for s in grp.params() if id(s.value) in self.weights]
            for grp in groups
            if not grp.declined
        }

    def macs(self, removed: dict[int, int]) -> float:
        """MACs after ``removed[id(group)]`` channels of each group are cut."""
        cut: dict[tuple[int, int], int] = {}
        for key, n in removed.items():
            for wid, axis, block in self.slots[key]:
                cut[(wid, axis)] = cut.get((wid, axis), 0) + n * block
        total = 0.0
        for wid, (shape, positions) in self.weights.items():
            kept = [d - cut.get((wid, a), 0) for a, d in enumerate(shape)]
            total += float(np.prod(kept)) * positions
        return total

    def per_channel(self, group: DependencyGroup) -> float:
        """MACs one channel of ``group`` costs (first order: alone, the other groups whole)."""
        return max(self.total - self.macs({id(group): 1}), 1.0)


# --sparsity-of macs: no group loses more than this fraction of its channels. Ranking by score
# per MAC alone piles the cuts onto a few groups (measured on YOLOv8n at 25 % fewer MACs: 216 of
# 256 channels from one group, mean box IoU to the dense model 0.36; capped at 0.2: 0.54).
MAX_GROUP_CUT = 0.2


def choose_by_macs(
    groups: list[DependencyGroup],
    scores: dict[int, np.ndarray],
    fraction: float,
    count: MacCount,
    cap: float = MAX_GROUP_CUT,
) -> float:
    """Set ``removed`` so the MACs drop by ``fraction``, taking the channels with the lowest
    score per MAC saved first across all groups, at most ``cap`` of each group (kept counts
    rounded as in `choose`). Returns the fraction of the MACs removed (less than asked when
    the cap and the rounding leave too little to cut)."""
    live = [grp for grp in groups if not grp.declined]
    target = count.total * (1.0 - fraction)
    cost = {id(grp): count.per_channel(grp) for grp in live}
    orders = {id(grp): np.argsort(scores[id(grp)], kind="stable") for grp in live}
    ratios = {id(grp): np.sort(scores[id(grp)]) / cost[id(grp)] for grp in live}
    flat = np.sort(np.concatenate(list(ratios.values())))

    def plan(k: int) -> dict[int, int]:
        t = flat[k - 1] if k else -np.inf
        return {
            key: _n_removed(len(r), min(int(np.count_nonzero(r <= t)), int(cap * len(r))))
            for key, r in ratios.items()
        }

    lo, hi = 0, len(flat)  # the fewest channels (by score per MAC) that reach the target
    while lo < hi:
        mid = (lo + hi) // 2
        if count.macs(plan(mid)) <= target:
            hi = mid
        else:
            lo = mid + 1
    chosen = plan(lo)
    for grp in live:
        grp.removed = np.sort(orders[id(grp)][: chosen[id(grp)]])
    return 1.0 - count.macs(chosen) / count.total


# ---------------------------------------------------------------------------------------------
# --allocate sensitivity: how much of the output each group costs, and the MACs spent where it
# costs least

# Each group is cut alone at these fractions of its channels (its consumers solved by least
# squares) and the model's outputs compared with the dense ones; between them the loss is
# interpolated linearly (0 at no cut), and no group loses more than the last one.
SENSITIVITY_RATIOS = (0.25, 0.5)
SENSITIVITY_SAMPLES = 16  # calibration samples the outputs are compared on (at most --samples)


def output_distortion(want: dict[str, np.ndarray], got: dict[str, np.ndarray]) -> float:
    """Mean over the float outputs and their channels (axis 1; a vector: its features) of the
    squared error relative to the reference's variance of that channel: every channel weighs
    the same, whatever its scale (YOLOv8's 4 box coordinates in pixels beside 80 class
    probabilities; logits beside a pooled embedding)."""
    losses = []
    for name, ref in want.items():
        ref = np.asarray(ref)
        if ref.dtype.kind != "f" or ref.size == 0:
            continue
        out = np.asarray(got[name], np.float64)
        ref = ref.astype(np.float64)
        if ref.ndim >= 2:
            ref, out = np.moveaxis(ref, 1, 0), np.moveaxis(out, 1, 0)
            ref, out = ref.reshape(len(ref), -1), out.reshape(len(out), -1)
        else:
            ref, out = ref.reshape(1, -1), out.reshape(1, -1)
        err = np.mean((out - ref) ** 2, axis=1)
        var = np.var(ref, axis=1)
        scale = np.where(var > 0, var, np.maximum(np.mean(ref**2, axis=1), 1e-12))
        losses.append(float(np.mean(err / scale)))
    return float(np.mean(losses)) if losses else 0.0


def _translate(group: DependencyGroup, values: dict[str, ir.Value]) -> DependencyGroup:
    """``group`` on a copy of its model (values and nodes found by name)."""

    def node_of(node: ir.Node) -> ir.Node:
        return values[node.outputs[0].name].producer()

    slots = {}
    for (_, axis), slot in group.slots.items():
        value = values[slot.value.name]
        slots[(id(value), axis)] = Slot(value, axis, slot.index)
    old_keys = {key: (group.slots[key].value.name, key[1]) for key in group.slots}
    return dataclasses.replace(
        group,
        slots=slots,
        producers=[node_of(n) for n in group.producers],
        consumers=[node_of(n) for n in group.consumers],
        depthwise=[node_of(n) for n in group.depthwise],
        nodes={},
        resized=[(node_of(n), (id(values[old_keys[key][0]]), key[1])) for n, key in group.resized],
    )


def _values_by_name(model: ir.Model) -> dict[str, ir.Value]:
    found = {v.name: v for v in model.graph.initializers.values()}
    for node in model.graph:
        found.update((v.name, v) for v in node.outputs)
    return found


def group_sensitivity(
    model: ir.Model,
    groups: list[DependencyGroup],
    scores: dict[int, np.ndarray],
    hessians: dict[int, list[np.ndarray]] | None,
    data: DataSource,
    options,
) -> dict[int, list[tuple[int, float]]]:
    """``{id(group): [(channels cut, output distortion), ...]}``, starting at (0, 0): each live
    group cut alone (its lowest-scored channels, consumers solved on ``hessians``), the model run
    on ``data`` and compared with ``model`` by `output_distortion`."""
    from onnxcomp import runtime
    from onnxcomp.evaluate import ReferenceOutputs, is_user_metric, load_metric

    loss_of = output_distortion
    if is_user_metric(options.metric):  # a metric may bring its own smooth loss (evaluate.yolo_boxes)
        loss_of = getattr(load_metric(options.metric).function, "distortion", output_distortion)
    limit = min(options.samples, SENSITIVITY_SAMPLES)
    reference = ReferenceOutputs(model, data, batch_size=options.batch_size, limit=limit, threads=options.threads)
    reference.collect()
    want = list(reference)
    curves: dict[int, list[tuple[int, float]]] = {}
    for grp in groups:
        if grp.declined:
            continue
        curve = [(0, 0.0)]
        order = np.argsort(scores[id(grp)], kind="stable")
        for ratio in SENSITIVITY_RATIOS:
            n = _n_removed(grp.channels, int(np.floor(grp.channels * ratio)))
            if n <= curve[-1][0]:
                continue
            candidate = model_io.copy_model(model)
            values = _values_by_name(candidate)
            one = _translate(grp, values)
            one.removed = np.sort(order[:n])
            h = None
            if hessians:
                h = {id(values[c.outputs[0].name].producer()): hessians[id(c)] for c in grp.consumers
                     if id(c) in hessians}  # fmt: skip
            apply_cuts(candidate, [one], h, options.damp)
            _forget_shapes(candidate)
            session = runtime.create_session(candidate, threads=options.threads, label="sensitivity")
            loss = [loss_of(outs, runtime.run(session, batch.inputs, list(outs), "sensitivity"))
                    for batch, outs in want]  # fmt: skip
            curve.append((n, float(np.mean(loss))))
            logger.info("sensitivity: %s cut by %d of %d: %.4g", grp.name, n, grp.channels, curve[-1][1])
        curves[id(grp)] = curve
    return curves


def choose_by_sensitivity(
    groups: list[DependencyGroup],
    scores: dict[int, np.ndarray],
    curves: dict[int, list[tuple[int, float]]],
    fraction: float,
    count: MacCount,
) -> float:
    """Set ``removed`` so the MACs drop by ``fraction`` at the least summed loss: repeatedly the
    group and cut (from its current one to any larger allowed count up to its last measured
    point) with the least added loss per MAC saved (the loss of a cut between measured points
    interpolated); once one step can reach the budget, the step reaching it with the least added
    loss. Within a group the lowest-scored channels go. Returns the fraction removed."""
    live = [grp for grp in groups if not grp.declined and len(curves.get(id(grp), [])) > 1]
    target = count.total * (1.0 - fraction)
    options: dict[int, list[tuple[int, float, float]]] = {}  # group -> [(cut, loss, MACs saved alone)]
    for grp in live:
        xs, ys = zip(*curves[id(grp)])
        steps = sorted({_n_removed(grp.channels, k) for k in range(1, xs[-1] + 1)} - {0})
        steps = [k for k in steps if k <= xs[-1]]
        options[id(grp)] = [(k, float(np.interp(k, xs, ys)), count.total - count.macs({id(grp): k})) for k in steps]
    chosen = {id(grp): 0 for grp in live}
    at = {id(grp): (0.0, 0.0) for grp in live}  # (loss, saved) at the current cut
    while count.macs(chosen) > target:
        best = finish = None
        for key, steps in options.items():
            loss0, saved0 = at[key]
            for k, loss, saved in steps:
                if k <= chosen[key] or saved <= saved0:
                    continue
                added = max(loss - loss0, 0.0)
                rate = added / (saved - saved0)
                if best is None or rate < best[0]:
                    best = (rate, key, k, loss, saved)
                if (finish is None or added < finish[0]) and count.macs({**chosen, key: k}) <= target:
                    finish = (added, key, k, loss, saved)
        if best is None:
            break
        # the last step: the cheapest one that reaches the budget, not the best rate overshooting it
        _, key, k, loss, saved = finish if finish is not None else best
        chosen[key] = k
        at[key] = (loss, saved)
    for grp in live:
        order = np.argsort(scores[id(grp)], kind="stable")
        grp.removed = np.sort(order[: chosen[id(grp)]])
    return 1.0 - count.macs(chosen) / count.total


def apply_cuts(
    model: ir.Model, groups: list[DependencyGroup], hessians: dict[int, list[np.ndarray]] | None, damp: float
) -> list[dict[str, Any]]:
    """Slice every initializer of the chosen groups in one sweep; consumers' kept columns are
    solved by least squares on ``hessians`` (reference inputs) when given."""
    cuts: dict[tuple[int, int], tuple[ir.Value, int, set[int]]] = {}
    for grp in groups:
        if grp.declined or grp.removed is None or not len(grp.removed):
            continue
        for slot in grp.params():
            key = (id(slot.value), slot.axis)
            entry = cuts.setdefault(key, (slot.value, slot.axis, set()))
            entry[2].update(slot.index[grp.removed].reshape(-1).tolist())
    # Consumers first (they need the uncut weight and the full Hessian), then plain slicing.
    solved: set[int] = set()
    report = []
    consumers = {id(n): n for grp in groups if not grp.declined for n in grp.consumers}
    for node in consumers.values():
        spec = ops.weighted(node)
        w_value = node.inputs[spec.weight]
        w = w_value.const_value.numpy()
        in_axis = spec.in_axis(node) % w.ndim
        out_axis = spec.out_axis(node) % w.ndim
        in_cut = sorted(cuts.get((id(w_value), in_axis), (None, None, set()))[2])
        if not in_cut:
            continue
        out_cut = sorted(cuts.get((id(w_value), out_axis), (None, None, set()))[2])
        w_rows = np.delete(w, out_cut, axis=out_axis)
        h = hessians.get(id(node)) if hessians else None
        if h is None:
            new = np.delete(w_rows, in_cut, axis=in_axis)
            error = None
        else:
            rows = spec.to_matrix(node, w_rows)[0]  # (out', in)
            drop = _columns(node, np.asarray(in_cut)[:, None]).reshape(-1)
            keep = np.setdiff1d(np.arange(rows.shape[1]), drop)
            mask = np.zeros(rows.shape, dtype=bool)
            mask[:, keep] = True  # every row keeps the same columns: one solve
            full = layerwise.masked_least_squares(rows, h[0], mask, damp=damp)
            shape = list(w_rows.shape)
            shape[in_axis] -= len(in_cut)
            new = spec.from_matrix(node, full[:, keep][None], shape)
            error = layerwise.reconstruction_error(rows, full, h[0]) / max(
                layerwise.reconstruction_error(rows, np.zeros_like(rows), h[0]), 1e-30
            )
        _set(w_value, new.astype(w.dtype))
        solved.add(id(w_value))
        report.append({"node": g.label(node), "inputs_removed": len(in_cut), "relative_error": error})
    for value, axis, positions in cuts.values():
        if id(value) in solved:  # a consumer: its rows were cut together with its columns
            continue
        _set(value, np.delete(value.const_value.numpy(), sorted(positions), axis=axis))
    for grp in groups:
        if grp.declined or grp.removed is None:
            continue
        for node in grp.depthwise:
            spec = ops.weighted(node)
            new_groups = int(node.inputs[spec.weight].const_value.shape[0])
            node.attributes["group"] = ir.AttrInt64("group", new_groups)
    _resize_splits(model, groups)
    return report


def _resize_splits(model: ir.Model, groups: list[DependencyGroup]) -> None:
    """Split sizes and Slice starts/ends after their input lost channels (computed from the
    sizes before the cut, for every group cutting through the node at once)."""
    removed: dict[int, tuple[ir.Node, int, set[int]]] = {}
    for grp in groups:
        if grp.declined or grp.removed is None or not len(grp.removed):
            continue
        for node, key in grp.resized:
            slot = grp.slots[key]
            entry = removed.setdefault(id(node), (node, slot.axis, set()))
            entry[2].update(slot.index[grp.removed].reshape(-1).tolist())
    names = g.NameSource(model)
    for node, axis, positions in removed.values():
        cut = np.array(sorted(positions), dtype=np.int64)
        flow = ops.channel_flow(node, 0, axis)  # the sizes as they were
        if node.op_type == "Split":
            sizes = [e.stop - e.start - int(np.count_nonzero(_in_range(cut, e))) for e in flow.edges]
            _set_split_sizes(model, node, sizes, names)
        else:
            edge = flow.edges[0]
            start = edge.start - int(np.count_nonzero(cut < edge.start))
            stop = edge.stop - int(np.count_nonzero(cut < edge.stop))
            _set_slice_bounds(model, node, axis, start, stop, names)


def _set_split_sizes(model: ir.Model, node: ir.Node, sizes: list[int], names: g.NameSource) -> None:
    opset = model.opset_imports.get("", 13)
    if opset < 13:
        node.attributes["split"] = ir.AttrInt64s("split", sizes)
        return
    value = g.add_initializer(model.graph, f"{node.name or 'split'}_sizes", np.array(sizes, np.int64), names)
    if len(node.inputs) > 1:
        node.replace_input_with(1, value)  # the old sizes may be shared with other Splits
    else:
        node.resize_inputs(2)
        node.replace_input_with(1, value)
    node.attributes.pop("num_outputs", None)


def _set_slice_bounds(
    model: ir.Model, node: ir.Node, axis: int, start: int, stop: int, names: g.NameSource
) -> None:
    r = g.rank(node.inputs[0])
    axes_value = node.inputs[3] if len(node.inputs) > 3 else None
    starts = g.const(node.inputs[1]).reshape(-1).copy()
    ends = g.const(node.inputs[2]).reshape(-1).copy()
    axes = g.const(axes_value).reshape(-1) % r if axes_value is not None else np.arange(len(starts))
    k = int(np.flatnonzero(axes == axis)[0])
    starts[k], ends[k] = start, stop
    for i, array in ((1, starts), (2, ends)):
        value = g.add_initializer(model.graph, f"{node.name or 'slice'}_{'starts' if i == 1 else 'ends'}",
                                  array.astype(np.int64), names)  # fmt: skip
        node.replace_input_with(i, value)


def _set(value: ir.Value, array: np.ndarray) -> None:
    array = np.ascontiguousarray(array)
    value.const_value = ir.tensor(array, name=value.name)
    value.shape = ir.Shape(array.shape)


def _forget_shapes(model: ir.Model) -> None:
    """Intermediate shapes are stale once channels are cut; infer them again."""
    g.strip_inferred_shapes(model)
    model_io.normalize(model)


# ---------------------------------------------------------------------------------------------


# Samples per capture batch for the consumers' Hessians: each batch adds at most
# layerwise.MAX_ROWS_PER_BATCH (4096) sampled positions per Conv, so small batches use more of the
# positions (YOLOv8n, 38 photos at 320x320: a 40x40 map has 60 800 positions, 4096 of them used at
# batch 32, 38 000 at batch 4).
HESSIAN_BATCH = 4


def consumer_hessians(
    model: ir.Model, groups: list[DependencyGroup], data: DataSource, options
) -> dict[int, list[np.ndarray]]:
    """``{id(node): [H per group]}`` of every live group's consumers, on ``model``'s inputs."""
    consumers = {id(n): n for grp in groups if not grp.declined for n in grp.consumers}
    inputs: dict[int, layerwise.LayerInputs] = {}
    by_name: dict[str, list[layerwise.LayerInputs]] = {}
    for i, node in enumerate(consumers.values()):
        view = layerwise.linear_view(node)
        if isinstance(view, str):
            continue
        inputs[id(node)] = layerwise.LayerInputs(view, np.random.default_rng([options.seed, i]))
        by_name.setdefault(view.input.name, []).append(inputs[id(node)])
    if not by_name:
        return {}
    capture.accumulate(
        model, by_name, data, batch_size=min(options.batch_size, HESSIAN_BATCH), limit=options.samples,
        positions=capture.token_positions,
    )
    return {key: [acc.H for acc in acc_in.hessians] for key, acc_in in inputs.items()}


def prune_structured(
    model: ir.Model, reference: ir.Model, options, data: DataSource | None, judge: DataSource | None
) -> tuple[ir.Model, dict[str, Any]]:
    """Build the groups, rank channels, cut, reconstruct; returns the model and the report."""
    if options.importance == "activation" and data is None:
        raise OnnxcompError("--importance activation needs --data")
    if options.allocate == "sensitivity" and data is None:
        raise OnnxcompError("--allocate sensitivity cuts each group and compares the outputs: it needs --data")
    reconstruct = options.reconstruct if options.reconstruct is not None else data is not None
    if reconstruct and data is None:
        raise OnnxcompError("--reconstruct needs --data")
    groups = build_groups(model, options.exclude_nodes)
    attention = heads.build_head_groups(model, options.exclude_nodes)
    not_yet = heads.NOT_BY_MACS if options.sparsity_of == "macs" else None
    for grp in attention if not_yet else []:
        grp.declined = grp.declined or not_yet
    heads.claim_projections(groups, attention)
    if not any(not grp.declined for grp in groups + attention):
        reasons = "; ".join(f"{grp.name}: {grp.declined}" for grp in groups[:3])
        raise OnnxcompError(f"no channel group can be pruned ({reasons or 'no Conv/Gemm/MatMul with constant weights'})")
    hessians = (
        consumer_hessians(model, groups, data, options)
        if data is not None and (reconstruct or options.importance == "activation")
        else None
    )
    notes = []
    how = options.importance
    if how == "bn":
        notes.append("--importance bn: BatchNormalization is folded into the convolutions by the clean-up; "
                     "its scale is in the weights, ranked by L2")
        how = "l2"
    scores = {id(grp): importance(grp, how, hessians) for grp in groups if not grp.declined}
    # with --max-drop, every candidate of the search cuts its own heads (`_within_budget`)
    head_cuts = heads.prune_heads(model, attention, data, options, reconstruct) if options.max_drop is None else []
    # group_ratios may name head groups too (prune_heads took theirs); the rest are channel groups
    head_options = options
    options = dataclasses.replace(
        options, group_ratios={k: v for k, v in options.group_ratios.items() if k not in {a.name for a in attention}}
    )
    spared: list[str] = []
    check = None
    if options.max_drop is not None:
        model, cut_report, spared, check = _within_budget(
            model, reference, (groups, attention), data, reconstruct, (options, head_options), judge
        )
    else:
        notes += _choose(model, groups, scores, options, data, hessians if reconstruct else None)
        cut_report = apply_cuts(model, groups, hessians if reconstruct else None, options.damp)
        _forget_shapes(model)
    report: dict[str, Any] = {
        "kind": "structured",
        "importance": options.importance,
        "scope": "global" if options.sparsity_of == "macs" else options.scope,
        "sparsity_of": options.sparsity_of,
        "reconstruct": reconstruct,
        "requested_ratio": options.sparsity,
        "groups": [grp.to_json() for grp in attention + groups],
        "consumers": head_cuts + cut_report,
    }
    if spared:
        report["spared"] = spared
    if notes:
        report["notes"] = notes
    if check is not None:
        report["check"] = check
    return model, report


def _choose(
    model: ir.Model, groups: list[DependencyGroup], scores, options, data: DataSource | None, hessians=None
) -> list[str]:
    """`choose` by channels, or `choose_by_macs` (`choose_by_sensitivity` with ``--allocate
    sensitivity``) with ``--sparsity-of macs``; returns notes."""
    if options.sparsity_of != "macs":
        choose(groups, scores, options.sparsity, options.scope, options.group_ratios)
        return []
    if options.group_ratios:
        raise OnnxcompError("group_ratios: a ratio per group needs --sparsity-of channels")
    count = MacCount(model, groups, _shapes(model, options, data))
    if options.allocate == "sensitivity":
        curves = group_sensitivity(model, groups, scores, hessians, data, options)
        for grp in groups:
            if id(grp) in curves:
                grp.sensitivity = curves[id(grp)]
        done = choose_by_sensitivity(groups, scores, curves, options.sparsity, count)
        if done < options.sparsity - 0.005:
            return [f"--allocate sensitivity: {done:.1%} of the MACs removed, not {options.sparsity:.0%}: no group "
                    f"loses more than {SENSITIVITY_RATIOS[-1]:.0%} of its channels"]
        return []
    done = choose_by_macs(groups, scores, options.sparsity, count)
    if done < options.sparsity - 0.005:
        return [f"--sparsity-of macs: {done:.1%} of the MACs removed, not {options.sparsity:.0%}: no group loses "
                f"more than {MAX_GROUP_CUT:.0%} of its channels, kept counts stay multiples of {ROUND_TO}"]
    return []


def _shapes(model: ir.Model, options, data: DataSource | None) -> dict[str, list[int]]:
    """Input shapes to count MACs at: ``--shape``, else one sample of the data."""
    if options.shapes or data is None:
        return dict(options.shapes)
    return {name: [1, *shape[1:]] for name, (_, shape) in data.sample_signature().items()}


def _within_budget(model, reference, groups, data, reconstruct, options, judge_data):
    """Cut all groups (``groups``: the channel and the attention-head groups); when the drop
    exceeds ``max_drop``, spare the groups whose consumers lose most (relative least-squares
    error), heads and channels in one order, as few as bisection finds."""
    from onnxcomp import search

    options, head_options = options  # the heads' options keep their group_ratios
    how = options.importance if options.importance != "bn" else "l2"
    solve_data = data if reconstruct else None

    def build(spared: list[str]) -> search.Built:
        candidate = model_io.copy_model(model)
        cand_groups = build_groups(candidate, options.exclude_nodes)
        cand_heads, head_cuts = heads.cut_sparing(candidate, cand_groups, spared, data, head_options, reconstruct)
        by_name = {grp.name: grp for grp in cand_groups}
        for name in set(spared) & set(by_name):
            by_name[name].declined = f"spared to keep the drop within --max-drop {options.max_drop}"
        live = [grp for grp in cand_groups if not grp.declined]
        cand_h = consumer_hessians(candidate, cand_groups, solve_data, options) if solve_data is not None else None
        cand_scores = {id(grp): importance(grp, how, cand_h) for grp in live}
        _choose(candidate, cand_groups, cand_scores, options, solve_data, cand_h)
        cut_report = head_cuts + apply_cuts(candidate, cand_groups, cand_h, options.damp)
        _forget_shapes(candidate)
        live += [grp for grp in cand_heads if not grp.declined]
        return search.Built(candidate, {"consumers": cut_report}, (cand_groups, live, cand_heads))

    first = build([])
    order = _sensitivity_order(first.plan[1], first.report["consumers"])
    result, check = fall_back(first, order, build, make_judge(reference, judge_data, options), options, "groups")
    groups[0][:], groups[1][:] = result.built.plan[0], result.built.plan[2]
    return result.built.model, result.built.report["consumers"], list(result.left_alone), check


def _sensitivity_order(live: list[DependencyGroup], cut_report: list[dict[str, Any]]) -> list[tuple[str, float]]:
    """The live groups, most sensitive first: the largest relative error among their consumers."""
    err = {r["node"]: r.get("relative_error") or 0.0 for r in cut_report}
    scores = [(grp.name, max((err.get(g.label(n), 0.0) for n in grp.consumers), default=0.0)) for grp in live]
    return sorted(scores, key=lambda item: item[1], reverse=True)


