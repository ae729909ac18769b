"""Attention-head groups of transformer encoders: match, score, cut, reconstruct.

A BERT-style export computes self-attention as

    x -> MatMul(Wq) -> Add(bq) -> Reshape [B, S, H, D] -> Transpose -> MatMul(q, k) -> (Div/Mul, Add mask)
      -> Softmax -> MatMul(p, v) -> Transpose -> Reshape [B, S, H*D] -> MatMul(Wo) (out-projection)

(and the same for K and V). Head h owns columns ``h*D .. h*D+D-1`` of Wq, Wk, Wv and their biases,
and rows ``h*D ..`` of Wo. Removing a head removes those columns and rows and lowers H in the
Reshape shape constants (``[0, 0, H, D]`` initializers, or the constant parts of a
``Concat(Shape..., [H], [D])`` shape); heads are independent, so the kept heads compute exactly
what they did, and Wo's kept rows are solved by least squares on calibration inputs to stand in
for the heads removed. `match_attention` is the pattern and the checks (a near miss returns the
reason); `HeadGroup` is the plan; `cut_heads` the rewrite. FFN hidden units (MatMul -> GELU ->
MatMul) are ordinary channel groups of `structured.py`.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxcomp import graph as g
from onnxcomp import layerwise

logger = logging.getLogger(__name__)

# Why head groups stay whole under --sparsity-of macs (MACs are counted for channel groups only).
NOT_BY_MACS = "--sparsity-of macs: heads are cut by --sparsity-of channels only"

# Ops that pass a [B, H, ...] attention tensor through with a scalar constant (the 1/sqrt(D) scale).
_SCALE_OPS = ("Mul", "Div")


@dataclasses.dataclass
class ShapeEntry:
    """One number of a Reshape target to rewrite: ``value`` (a constant), position ``index``,
    holding ``per_head`` times the head count (1 for H itself, D for a merged H*D)."""

    node: ir.Node  # the node reading ``value`` (a Reshape or a Concat)
    value: ir.Value
    index: int
    per_head: int


@dataclasses.dataclass
class HeadGroup:
    """The heads of one attention block, and every place that holds them."""

    name: str
    heads: int
    head_dim: int
    projections: list[tuple[ir.Node, ir.Value | None]] = dataclasses.field(default_factory=list)  # Q, K, V
    out_proj: ir.Node | None = None
    shapes: list[ShapeEntry] = dataclasses.field(default_factory=list)
    declined: str | None = None
    removed: np.ndarray | None = None  # heads to cut

    @property
    def consumers(self) -> list[ir.Node]:
        """The node that reads the heads (the out-projection), as a channel group's consumers."""
        return [self.out_proj] if self.out_proj is not None else []

    def columns(self, heads: np.ndarray) -> np.ndarray:
        """Positions on the H*D axis of ``heads``."""
        heads = np.asarray(heads, np.int64).reshape(-1)
        return (heads[:, None] * self.head_dim + np.arange(self.head_dim)).reshape(-1)

    def to_json(self) -> dict[str, Any]:
        row: dict[str, Any] = {
            "group": self.name,
            "kind": "attention-heads",
            "channels": self.heads,
            "head_dim": self.head_dim,
            "producers": [g.label(n) for n, _ in self.projections],
            "consumers": [g.label(self.out_proj)] if self.out_proj is not None else [],
        }
        return outcome(row, self.declined, self.removed)


def outcome(row: dict[str, Any], declined: str | None, removed: np.ndarray | None) -> dict[str, Any]:
    """A group's report row completed with what became of it: skipped with its reason, or the
    number of heads or channels removed (channel groups share it)."""
    if declined:
        row["skipped"] = declined
        row["removed"] = 0
    else:
        row["removed"] = int(len(removed)) if removed is not None else 0
    return row


class _Miss(Exception):
    pass


class _NotAttention(_Miss):
    """A Softmax that is no attention (a classifier's head): not a head group at all."""


def _one_user(value: ir.Value, what: str) -> ir.Node:
    """The one node that computes with ``value`` (Shape nodes reading only its batch and sequence
    dims are allowed beside it: exporters build the Reshape targets that way)."""
    if value.is_graph_output():
        raise _Miss(f"{what} {value.name!r} is a graph output")
    found = [n for n in g.users(value) if not _reads_leading_dims(n)]
    if len(found) != 1:
        raise _Miss(f"{what} {value.name!r} has {len(found)} readers")
    return found[0]


def _reads_leading_dims(node: ir.Node) -> bool:
    """A Shape node whose result is only indexed at 0 or 1 (batch, sequence)."""
    if node.op_type != "Shape":
        return False
    start, end = g.attr(node, "start", 0), g.attr(node, "end", None)
    if end is not None and 0 <= start and end <= 2:
        return True
    for user in g.users(node.outputs[0]):
        index = g.const(user.inputs[1]) if user.op_type == "Gather" and len(user.inputs) > 1 else None
        if index is None or g.attr(user, "axis", 0) != 0 or not np.all(np.isin(index, (0, 1))):
            return False
    return True


def _perm(node: ir.Node, rank: int) -> list[int]:
    perm = g.attr(node, "perm", None)
    return list(perm) if perm is not None else list(range(rank))[::-1]


def _split_shape(reshape: ir.Node, heads: int | None, head_dim: int | None) -> tuple[int, int, list[ShapeEntry]]:
    """(H, D, entries to rewrite) of a Reshape [B, S, H*D] -> [B, S, H, D]."""
    target = reshape.inputs[1]
    array = g.const(target)
    if array is not None:
        if array.shape != (4,):
            raise _Miss(f"{g.label(reshape)}: its shape {array.tolist()} is not [B, S, H, D]")
        h, d = int(array[2]), int(array[3])
        entries = [ShapeEntry(reshape, target, 2, 1)] if h != -1 else []
    else:
        concat = g.producer(target, "Concat")
        if concat is None or len(concat.inputs) != 4 or g.attr(concat, "axis", 0) != 0:
            raise _Miss(f"{g.label(reshape)}: its shape is computed, not [B, S, H, D] with constant H, D")
        parts = [g.const(v) for v in concat.inputs[2:]]
        if any(p is None or p.size != 1 for p in parts):
            raise _Miss(f"{g.label(reshape)}: the head count or size in its shape is computed at run time")
        h, d = int(parts[0].reshape(-1)[0]), int(parts[1].reshape(-1)[0])
        entries = [ShapeEntry(concat, concat.inputs[2], 0, 1)] if h != -1 else []
    if d <= 0 or (h > 0 and heads is not None and h != heads) or (head_dim is not None and d != head_dim):
        raise _Miss(f"{g.label(reshape)}: heads {h} x {d} do not match the other projections")
    return h, d, entries


def _merge_shape(reshape: ir.Node, hidden: int) -> list[ShapeEntry]:
    """Entries to rewrite of the Reshape [B, S, H, D] -> [B, S, H*D]."""
    target = reshape.inputs[1]
    array = g.const(target)
    if array is not None:
        if array.shape != (3,) or int(array[2]) not in (-1, hidden):
            raise _Miss(f"{g.label(reshape)}: its shape {array.tolist()} does not merge the heads into {hidden}")
        return [ShapeEntry(reshape, target, 2, -1)] if int(array[2]) == hidden else []
    concat = g.producer(target, "Concat")
    last = g.const(concat.inputs[-1]) if concat is not None and len(concat.inputs) == 3 else None
    if last is None or last.size != 1 or int(last.reshape(-1)[0]) not in (-1, hidden):
        raise _Miss(f"{g.label(reshape)}: its shape is computed, not [B, S, H*D] with a constant H*D")
    return [ShapeEntry(concat, concat.inputs[-1], 0, -1)] if int(last.reshape(-1)[0]) == hidden else []


def _projection(value: ir.Value, side: str) -> tuple[ir.Node, ir.Value | None, ir.Node, list[int]]:
    """Walk back from a [B, H, ...] attention operand to its projection: (MatMul, bias, Reshape,
    axis order after the Reshape: the positions of [B, S, H, D] in ``value``)."""
    perms = []
    node = value.producer()
    while node is not None and (node.op_type == "Transpose" or node.op_type in _SCALE_OPS):
        if node.op_type == "Transpose":
            perms.append(_perm(node, 4))
        elif g.scalar(node.inputs[1]) is None:
            raise _Miss(f"{side}: {g.label(node)} scales by a tensor, not a constant")
        value = node.inputs[0]
        node = value.producer()
    if node is None or node.op_type != "Reshape":
        raise _Miss(f"{side}: no Reshape into heads before the attention (found {node.op_type if node else 'an input'})")
    reshape = node
    add = g.producer(reshape.inputs[0], "Add")
    bias = None
    if add is not None:
        x, bias = g.split_const(add)
        if bias is None:
            raise _Miss(f"{side}: {g.label(add)} adds a tensor computed at run time")
        matmul = g.producer(x, "MatMul")
    else:
        matmul = g.producer(reshape.inputs[0], "MatMul")
    if matmul is None or g.const(matmul.inputs[1]) is None or g.rank(matmul.inputs[1]) != 2:
        raise _Miss(f"{side}: the heads do not come from a MatMul with a constant 2-D weight")
    order = [0, 1, 2, 3]  # axis i of the operand holds Reshape axis order[i]
    for perm in reversed(perms):
        order = _compose(order, perm)
    return matmul, bias, reshape, order


def _compose(order: list[int], perm: list[int]) -> list[int]:
    """Axis labels after a Transpose: output axis i is input axis perm[i]."""
    return [order[p] for p in perm]


def _before_mask(value: ir.Value) -> ir.Value:
    """The scores an additive mask is added to (``value`` itself when there is no such Add)."""
    node = value.producer()
    if node is not None and node.op_type == "Add" and len(node.inputs) == 2:
        return next((v for v in node.inputs if _scores_path(v)), value)
    return value


def _scores_path(value: ir.Value) -> bool:
    """``value`` is (a scaled) MatMul of two computed tensors: the attention scores."""
    node = value.producer()
    while node is not None and node.op_type in _SCALE_OPS and g.scalar(node.inputs[1]) is not None:
        node = node.inputs[0].producer()
    return node is not None and node.op_type == "MatMul" and all(g.const(v) is None for v in node.inputs)


def match_attention(softmax: ir.Node) -> HeadGroup | None:
    """The head group around one Softmax (declined with the reason when the pattern misses), or
    None when the Softmax does not normalise a product of two computed tensors (no attention)."""
    name = g.label(softmax)
    group = HeadGroup(name, 0, 0)
    try:
        _match(softmax, group)
    except _NotAttention:
        return None
    except _Miss as why:
        group.declined = str(why)
    return group


def _match(softmax: ir.Node, group: HeadGroup) -> None:
    if not _scores_path(_before_mask(softmax.inputs[0])):
        raise _NotAttention()
    if g.attr(softmax, "axis", -1) not in (-1, 3):
        raise _Miss("the Softmax is not over the last axis")
    # back: Softmax <- (Add mask) <- (Div/Mul scale) <- MatMul(q, k)
    value = softmax.inputs[0]
    node = value.producer()
    while node is not None and node.op_type in ("Add", *_SCALE_OPS):
        if node.op_type == "Add":
            main, other = node.inputs
            if not _scores_path(main):
                main, other = other, main
            dims = g.dims(other)
            if dims is None:
                raise _Miss(f"{g.label(node)}: the mask's shape is unknown")
            if len(dims) >= 3 and dims[len(dims) - 3] != 1:
                raise _Miss(f"{g.label(node)}: the added mask differs between heads")
            value = main
        else:
            if g.scalar(node.inputs[1]) is None:
                raise _Miss(f"{g.label(node)}: scores scaled by a tensor")
            value = node.inputs[0]
        node = value.producer()
    if node is None or node.op_type != "MatMul":
        raise _Miss("no MatMul of queries and keys before the Softmax")
    qk = node
    q_mm, q_bias, q_reshape, q_order = _projection(qk.inputs[0], "query")
    k_mm, k_bias, k_reshape, k_order = _projection(qk.inputs[1], "key")
    # q must be [B, H, S, D] and k [B, H, D, S] in Reshape axes (0 B, 1 S, 2 H, 3 D)
    if q_order != [0, 2, 1, 3] or k_order != [0, 2, 3, 1]:
        raise _Miss(f"queries/keys are laid out {q_order}/{k_order}, not [B, H, S, D] / [B, H, D, S]")
    probs = softmax.outputs[0]
    pv = _one_user(probs, "the attention probabilities")
    if pv.op_type != "MatMul" or pv.inputs[0] is not probs:
        raise _Miss(f"the attention probabilities feed {pv.op_type}, not MatMul(probs, values)")
    v_mm, v_bias, v_reshape, v_order = _projection(pv.inputs[1], "value")
    if v_order != [0, 2, 1, 3]:
        raise _Miss(f"values are laid out {v_order}, not [B, H, S, D]")
    # forward: context [B, H, S, D] -> Transpose -> Reshape [B, S, H*D] -> MatMul(Wo)
    value, order = pv.outputs[0], [0, 2, 1, 3]
    node = _one_user(value, "the attention context")
    while node.op_type == "Transpose":
        order = _compose(order, _perm(node, 4))
        value = node.outputs[0]
        node = _one_user(value, "the attention context")
    if node.op_type != "Reshape" or order != [0, 1, 2, 3]:
        raise _Miss(f"the context goes to {node.op_type} in layout {order}, not a Reshape of [B, S, H, D]")
    merge = node
    out = _one_user(merge.outputs[0], "the merged heads")
    wo = g.const(out.inputs[1]) if out.op_type == "MatMul" else None
    if wo is None or wo.ndim != 2 or out.inputs[0] is not merge.outputs[0]:
        raise _Miss(f"the merged heads feed {g.label(out)}, not a MatMul with a constant weight")

    heads, head_dim, entries = None, None, []
    for reshape in (q_reshape, k_reshape, v_reshape):
        h, d, e = _split_shape(reshape, heads, head_dim)
        heads = h if h > 0 else heads
        head_dim = d
        entries += e
    hidden = wo.shape[0]
    heads = heads or hidden // head_dim
    if heads * head_dim != hidden:
        raise _Miss(f"{heads} heads x {head_dim} do not make the out-projection's {hidden} inputs")
    entries += _merge_shape(merge, hidden)
    for matmul, bias in ((q_mm, q_bias), (k_mm, k_bias), (v_mm, v_bias)):
        w = matmul.inputs[1]
        if w.const_value.shape[1] != hidden:
            raise _Miss(f"{g.label(matmul)}: {w.const_value.shape[1]} outputs, not {hidden}")
        if len(g.users(w)) != 1 or (bias is not None and len(g.users(bias)) != 1):
            raise _Miss(f"{g.label(matmul)}: its weight or bias is shared with another node")
        if bias is not None and int(np.prod(bias.const_value.shape.numpy())) != hidden:
            raise _Miss(f"{g.label(matmul)}: its bias is not one number per output")
        group.projections.append((matmul, bias))
    if len(g.users(out.inputs[1])) != 1:
        raise _Miss(f"{g.label(out)}: its weight is shared with another node")
    if heads < 2:
        raise _Miss("a single head: nothing to choose from")
    group.heads, group.head_dim, group.out_proj, group.shapes = heads, head_dim, out, entries
    group.name = g.label(q_mm).rsplit("/", 2)[0] if "/" in g.label(q_mm) else g.label(qk)


def build_head_groups(model: ir.Model, exclude_nodes: list[str] = ()) -> list[HeadGroup]:
    """One group per Softmax of the model (declined ones with their reason)."""
    groups = []
    for node in model.graph:
        if node.op_type != "Softmax":
            continue
        group = match_attention(node)
        if group is None:
            continue
        if not group.declined:
            excluded = [g.label(n) for n, _ in group.projections if n.name in exclude_nodes]
            if group.out_proj is not None and group.out_proj.name in exclude_nodes:
                excluded.append(g.label(group.out_proj))
            if excluded:
                group.declined = f"excluded by --exclude-nodes ({excluded[0]})"
        groups.append(group)
    return groups


def covered_nodes(groups: list[HeadGroup]) -> set[int]:
    """ids of the projection MatMuls of live head groups (the channel groups leave them alone)."""
    return {id(n) for grp in groups if not grp.declined for n, _ in grp.projections}


# ---------------------------------------------------------------------------------------------
# Score, choose, cut


def head_scores(group: HeadGroup, h: np.ndarray | None, damp: float = 0.01) -> np.ndarray:
    """How much output the out-projection loses without each head, after the best least-squares
    compensation by the others (block OBS, Hassibi & Stork 1993; Kwon et al. 2022 for heads):
    ``tr(W_h^T [(H^-1)_hh]^-1 W_h)`` with W_h the head's D rows of Wo. Without data: ||W_h||^2."""
    wo = group.out_proj.inputs[1].const_value.numpy().astype(np.float64)  # (H*D, out)
    scores = np.zeros(group.heads)
    if h is None:
        for k in range(group.heads):
            rows = group.columns([k])
            scores[k] = float(np.sum(wo[rows] ** 2))
        return scores
    h = np.array(h, np.float64)
    h[np.diag_indices_from(h)] += damp * float(np.mean(np.diag(h))) + 1e-12
    h_inv = np.linalg.inv(h)
    for k in range(group.heads):
        rows = group.columns([k])
        block = np.linalg.inv(h_inv[np.ix_(rows, rows)])  # (D, D)
        scores[k] = float(np.sum((block @ wo[rows]) * wo[rows]))
    return scores


def choose_heads(
    groups: list[HeadGroup], scores: dict[int, np.ndarray], ratio: float, group_ratios: dict[str, float] | None = None
) -> None:
    """Remove the lowest-scored ``ratio`` (or ``group_ratios[name]``) of each live group's heads
    (at least one head stays)."""
    for grp in groups:
        if grp.declined:
            continue
        n = min(grp.heads - 1, int(np.floor(grp.heads * (group_ratios or {}).get(grp.name, ratio))))
        grp.removed = np.sort(np.argsort(scores[id(grp)], kind="stable")[:n])


def cut_heads(
    model: ir.Model, groups: list[HeadGroup], hessians: dict[int, np.ndarray] | None, damp: float
) -> list[dict[str, Any]]:
    """Slice Q/K/V columns and biases, Wo rows (solved by least squares on ``hessians[id(Wo
    node)]`` when given), and rewrite the head counts; one report row per out-projection."""
    report = []
    for grp in groups:
        if grp.declined or grp.removed is None or not len(grp.removed):
            continue
        cols = grp.columns(grp.removed)
        for matmul, bias in grp.projections:
            w = matmul.inputs[1]
            _set(w, np.delete(w.const_value.numpy(), cols, axis=1))
            if bias is not None:
                b = bias.const_value.numpy()
                _set(bias, np.delete(b.reshape(-1), cols).reshape(*b.shape[:-1], -1))
        wo_value = grp.out_proj.inputs[1]
        wo = wo_value.const_value.numpy()
        h = hessians.get(id(grp.out_proj)) if hessians else None
        error = None
        if h is not None:
            rows = wo.T.astype(np.float64)  # (out, in)
            mask = np.ones(rows.shape, dtype=bool)
            mask[:, cols] = False
            full = layerwise.masked_least_squares(rows, h, mask, damp=damp)
            error = layerwise.reconstruction_error(rows, full, h) / max(
                layerwise.reconstruction_error(rows, np.zeros_like(rows), h), 1e-30
            )
            new = np.delete(full.T, cols, axis=0)
        else:
            new = np.delete(wo, cols, axis=0)
        _set(wo_value, new.astype(wo.dtype))
        kept = grp.heads - len(grp.removed)
        for entry in grp.shapes:
            array = entry.value.const_value.numpy().copy()
            flat = array.reshape(-1)
            flat[entry.index] = kept * (1 if entry.per_head == 1 else grp.head_dim)
            _replace_input(model, entry.node, entry.value, array)
        report.append({
            "node": g.label(grp.out_proj),
            "inputs_removed": int(len(cols)),
            "heads_removed": int(len(grp.removed)),
            "relative_error": error,
        })  # fmt: skip
    return report


def _set(value: ir.Value, array: np.ndarray) -> None:
    array = np.ascontiguousarray(array)
    value.const_value = ir.tensor(array, name=value.name)
    value.shape = ir.Shape(array.shape)


def _replace_input(model: ir.Model, node: ir.Node, old: ir.Value, array: np.ndarray) -> None:
    """Give ``node`` its own new constant instead of ``old`` (which other nodes may share)."""
    new = g.add_initializer(model.graph, f"{old.name}_heads", array.astype(old.const_value.dtype.numpy()))
    for i, v in enumerate(node.inputs):
        if v is old:
            node.replace_input_with(i, new)


# ---------------------------------------------------------------------------------------------
# The step `structured.prune_structured` calls


def claim_projections(channel_groups: list, groups: list[HeadGroup]) -> None:
    """Channel groups rooted at a live head group's Q/K/V projection are cut by whole heads
    instead: say so in their reason."""
    covered = {id(n): grp for grp in groups if not grp.declined for n, _ in grp.projections}
    for cg in channel_groups:
        owner = next((covered[id(p)] for p in cg.producers if id(p) in covered), None)
        if owner is not None:
            cg.declined = f"an attention projection: cut by whole heads (group {owner.name})"


def out_proj_hessians(model: ir.Model, groups: list[HeadGroup], data, options) -> dict[int, np.ndarray]:
    """``{id(out-projection node): H}`` of the live groups' out-projection inputs, real tokens only."""
    from onnxcomp import capture

    inputs: dict[int, layerwise.HessianAccumulator] = {}
    by_name: dict[str, list] = {}
    for grp in groups:
        if grp.declined:
            continue
        acc = layerwise.HessianAccumulator()
        inputs[id(grp.out_proj)] = acc
        by_name.setdefault(grp.out_proj.inputs[0].name, []).append(acc)
    if not by_name:
        return {}
    capture.accumulate(
        model, by_name, data, batch_size=options.batch_size, limit=options.samples, positions=capture.token_positions
    )
    return {key: acc.H for key, acc in inputs.items() if acc.n_samples}


def prune_heads(model: ir.Model, groups: list[HeadGroup], data, options, reconstruct: bool) -> list[dict[str, Any]]:
    """Score (block OBS on calibration inputs, or weight norms without data), choose
    ``options.sparsity`` of each block's heads, cut them and solve the out-projections."""
    live = [grp for grp in groups if not grp.declined]
    if not live or (options.sparsity <= 0 and not getattr(options, "group_ratios", None)):
        return []
    hessians = out_proj_hessians(model, live, data, options) if data is not None else {}
    scores = {id(grp): head_scores(grp, hessians.get(id(grp.out_proj)), options.damp) for grp in live}
    choose_heads(live, scores, options.sparsity, getattr(options, "group_ratios", None))
    report = cut_heads(model, live, hessians if reconstruct else None, options.damp)
    for grp in live:
        logger.info("%s: %d of %d heads removed", grp.name, len(grp.removed), grp.heads)
    return report


def cut_sparing(
    model: ir.Model, channel_groups: list, spared: list[str], data, options, reconstruct: bool
) -> tuple[list[HeadGroup], list[dict[str, Any]]]:
    """Match ``model``'s head groups, claim their projections from ``channel_groups``, and cut all
    but the ``spared`` ones (the --max-drop search's build step); returns the groups and the
    out-projections' report rows."""
    groups = build_head_groups(model, options.exclude_nodes)
    claim_projections(channel_groups, groups)  # a spared block's Q/K/V stay whole, not cut by channels
    for grp in groups:
        if grp.name in spared and not grp.declined:
            grp.declined = f"spared to keep the drop within --max-drop {options.max_drop}"
        elif options.sparsity_of == "macs":
            grp.declined = grp.declined or NOT_BY_MACS
    return groups, prune_heads(model, groups, data, options, reconstruct)
