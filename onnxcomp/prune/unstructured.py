"""Unstructured pruning of Conv / Gemm / MatMul weights, with optional layer-wise reconstruction.

Plan, then rewrite: `plan_weights` picks the prunable weights (and says why each other one is
left alone); `prune_weights` scores them (magnitude, threshold, random, Wanda), builds masks
(per layer, global or per output channel; unstructured or N:M) and, when data is given, solves
the kept weights layer by layer in graph order so each layer reproduces its outputs on the inputs
the pruned model so far gives it: the mask searched by ADMM (or SparseGPT's OBS saliency), the
kept weights by exact least squares where affordable, else SparseGPT's update.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxcomp import capture, layerwise, ops
from onnxcomp import model as model_io
from onnxcomp.data import DataSource
from onnxcomp.errors import OnnxcompError
from onnxcomp.prune import numerics as pn

logger = logging.getLogger(__name__)

PRUNABLE_OPS = ("Conv", "Gemm", "MatMul")

# Methods whose mask is searched on the layer's Hessian while reconstructing (not scored first):
# sparsegpt (OBS saliency, block by block), admm (`numerics.admm_mask`).
SEARCHED_MASKS = ("sparsegpt", "admm")

# Below this many flops per weight matrix the kept weights are solved exactly, row by row
# (`layerwise.masked_least_squares`); above, SparseGPT's sequential update on the mask stands. A 384 x 1536
# MatMul at 50 % costs ~6e10 (6 s on one core), at 35 % 1.3e11; a 768 x 3072 one at 50 % ~9e11 (76 s).
EXACT_SOLVE_FLOPS = 2e11

# Above this many flops per weight group (`numerics.admm_cost`) --method admm takes SparseGPT's mask
# instead: a 384 x 1536 MatMul costs 2.5e11 (~10 s on one core), a 768 x 3072 one 1.8e12.
ADMM_FLOPS = 3e11

# --allocate error: the sparsities around --sparsity each weight's layer-wise error is measured at.
# On paraphrase-MiniLM-L3 at 50 % (held-out cosine, uniform 0.975): 40-60 % 0.978, 35-65 % 0.978, 30-70 %
# 0.977, 20-80 % 0.974: the error of one layer alone does not weigh what it costs the model's output.
ALLOCATE_SPREAD = (-0.1, -0.05, 0.0, 0.05, 0.1)


@dataclasses.dataclass
class WeightTarget:
    """One weight to prune: its node, initializer and its layer-wise view (groups, out/g, in)."""

    node: ir.Node
    value: ir.Value
    view: layerwise.LinearView
    sparsity: float | None = None  # of the written weight

    @property
    def name(self) -> str:
        return self.node.name or self.value.name

    def matrix(self) -> np.ndarray:
        return self.view.rows  # (g, out/g, in)

    def write(self, rows: np.ndarray) -> None:
        dtype = self.value.const_value.dtype.numpy()
        array = np.ascontiguousarray(self.view.back(rows).astype(dtype))
        self.sparsity = pn.sparsity_of(array)
        # A weight read from external data goes back to disk and its old mapping is released,
        # so a large model is pruned with one tensor in memory at a time.
        self.view.weight = None  # spent: plan again to read the new weight
        model_io.set_weight(self.value, array)


def plan_weights(
    model: ir.Model,
    *,
    exclude_nodes: list[str] = (),
    min_size: int = 512,
) -> tuple[list[WeightTarget], list[dict[str, Any]]]:
    """The prunable weights in graph order, and one row per weighted op left alone with why."""
    targets: list[WeightTarget] = []
    skipped: list[dict[str, Any]] = []
    seen: dict[int, str] = {}
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        if node.op_type not in PRUNABLE_OPS or node.domain not in ("", "ai.onnx"):
            continue
        spec = ops.weighted(node)
        label = node.name or node.op_type
        reason = None
        weight = node.inputs[spec.weight] if len(node.inputs) > spec.weight else None
        if node.graph is not model.graph:
            reason = "inside a subgraph (an If, Loop or Scan body): not pruned yet"
        elif node.name in exclude_nodes:
            reason = "excluded by --exclude-nodes"
        elif weight is None or weight.const_value is None or weight.is_graph_input():
            reason = "its weight is computed at run time"
        elif weight.const_value.dtype not in (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.DOUBLE):
            reason = f"its weight is {weight.const_value.dtype.name}, not float"
        elif node.op_type == "MatMul" and len(weight.shape) != 2:
            reason = f"a batched MatMul weight of rank {len(weight.shape)}"
        elif node.op_type == "Gemm" and node.attributes.get_int("transA", 0):
            reason = "Gemm with transA=1"
        elif int(np.prod(weight.shape.numpy())) < min_size:
            reason = f"tiny tensor ({int(np.prod(weight.shape.numpy()))} < {min_size} weights)"
        elif id(weight) in seen:
            reason = f"its weight is shared with {seen[id(weight)]} (pruned there)"
        view = layerwise.linear_view(node) if reason is None else None
        if isinstance(view, str):
            reason = view
        if reason:
            skipped.append({"node": label, "op": node.op_type, "skipped": reason})
            continue
        seen[id(weight)] = label
        targets.append(WeightTarget(node, weight, view))
    return targets, skipped


@dataclasses.dataclass
class UnstructuredConfig:
    sparsity: float = 0.5
    method: str = "magnitude"  # magnitude | threshold | random | wanda | sparsegpt | admm
    scope: str = "layer"  # layer | global | channel
    pattern: tuple[int, int] | None = None
    threshold: float | None = None
    reconstruct: bool = False
    seed: int = 0
    damp: float = 0.01
    blocksize: int = 128
    batch_size: int = 32
    samples: int | None = 256
    # Solve each layer against the dense model's outputs (`layerwise.corrected_target`), not its own.
    dense_targets: bool = True
    # Share the zeros out by each weight's layer-wise error curve (`_allocate`), not equally.
    allocate: bool = False


def prune_weights(
    model: ir.Model,
    targets: list[WeightTarget],
    cfg: UnstructuredConfig,
    data: DataSource | None,
) -> list[dict[str, Any]]:
    """Prune ``targets`` in place; one report row per weight (and per one left alone)."""
    report: list[dict[str, Any]] = []
    if cfg.pattern is not None:
        m = cfg.pattern[1]
        for t in [t for t in targets if t.matrix().shape[-1] % m]:
            targets.remove(t)
            report.append({"node": t.name, "op": t.node.op_type, "skipped": f"{t.matrix().shape[-1]} "
                           f"inputs per row are not a multiple of {m} ({cfg.pattern[0]}:{m})"})
    needs_data = cfg.reconstruct or cfg.method in ("wanda", *SEARCHED_MASKS)
    if needs_data and data is None:
        raise OnnxcompError(f"--method {cfg.method}{' with --reconstruct' if cfg.reconstruct else ''} needs --data")

    if cfg.allocate and data is None:
        raise OnnxcompError("--allocate error measures each layer's error on --data: give --data")
    sparsities = _allocate(model, targets, cfg, data) if cfg.allocate else {}

    fixed: dict[int, np.ndarray] = {}  # id(node) -> (g, out/g, in) mask
    if cfg.scope == "global" and cfg.method != "threshold" and cfg.pattern is None:
        fixed = _global_masks(model, targets, cfg, data)

    rows_by_node: dict[int, dict[str, Any]] = {}
    by_view = {id(t.view): t for t in targets}

    def solve(W: np.ndarray, H: np.ndarray, ctx: layerwise.SolveContext) -> layerwise.Solution:  # noqa: N803
        mask = fixed.get(id(ctx.view.node))
        mask = mask[ctx.group] if mask is not None else None
        own = dataclasses.replace(cfg, sparsity=sparsities[id(ctx.view.node)]) if sparsities else cfg
        return _solve_group(W, H, mask, own, seed=cfg.seed + len(rows_by_node))

    def write(result: layerwise.LayerResult) -> None:
        t = by_view[id(result.view)]
        t.write(np.stack([s.weight for s in result.solutions]))
        rows_by_node[id(t.node)] = _row(t, [s.info for s in result.solutions])

    if needs_data:
        # Layer by layer in graph order, each on its inputs in the model pruned so far, aiming at
        # the dense model's outputs when reconstructing.
        dense = model_io.copy_model(model) if cfg.reconstruct and cfg.dense_targets else None
        done = layerwise.reconstruct(
            model, [t.view for t in targets], data, solve, write=write, sequential=True,
            batch_size=cfg.batch_size, limit=cfg.samples, seed=cfg.seed, positions=capture.token_positions,
            reference=dense, target_damp=cfg.damp,
        )  # fmt: skip
        for result in done.layers:
            if result.skipped:
                t = by_view[id(result.view)]
                rows_by_node[id(t.node)] = {"node": t.name, "op": t.node.op_type, "skipped": result.skipped}
    else:
        for t in targets:
            rows = t.matrix()
            infos, new = [], []
            for g in range(rows.shape[0]):
                mask = fixed[id(t.node)][g] if id(t.node) in fixed else None
                solution = _solve_group(rows[g], None, mask, cfg, seed=cfg.seed + len(rows_by_node))
                new.append(solution.weight)
                infos.append(solution.info)
            del rows  # the old weight's last array: write() releases its mapping
            t.write(np.stack(new))
            del new
            rows_by_node[id(t.node)] = _row(t, infos)
    return [rows_by_node[id(t.node)] for t in targets if id(t.node) in rows_by_node] + report


def _row(t: WeightTarget, infos: list[dict[str, float]]) -> dict[str, Any]:
    row: dict[str, Any] = {
        "node": t.name,
        "op": t.node.op_type,
        "tensor": t.value.name,
        "shape": [int(d) for d in t.value.const_value.shape],
        "sparsity": round(t.sparsity, 4),
    }
    fallback = next((i["mask"] for i in infos if "mask" in i), None)
    if fallback:
        row["mask"] = fallback
    total = {k: sum(i.get(k, 0.0) for i in infos) for k in ("error_masked", "error", "energy")}
    if total["energy"] > 0:
        # E||W x - W' x||^2 per sample, of the mask alone and after reconstruction
        row["error_masked"] = total["error_masked"]
        row["error"] = total["error"]
        row["relative_error"] = total["error"] / total["energy"]
    else:
        row["relative_error"] = sum(i.get("weight_loss", 0.0) for i in infos) / max(
            1e-30, sum(i.get("weight_norm", 0.0) for i in infos)
        )
    logger.info("pruned %s to %.1f %% zeros", t.name, 100 * row["sparsity"])
    return row


def _solve_group(W, H, mask, cfg: UnstructuredConfig, seed: int) -> layerwise.Solution:  # noqa: N803
    """Mask (by method and scope, unless fixed) and, with ``cfg.reconstruct``, solve the kept
    weights of one (out, in) group on its Hessian ``H`` (None: no data)."""
    w = np.asarray(W, np.float32)
    if mask is None and not (cfg.method in SEARCHED_MASKS and cfg.reconstruct):
        mask = _mask(cfg, _scores(cfg.method, w, H, seed), w)
    info: dict[str, Any] = {}
    if cfg.reconstruct:
        if mask is None and cfg.method == "admm":
            if pn.admm_cost(w.shape) <= ADMM_FLOPS:
                mask = pn.admm_mask(
                    w, H, sparsity=None if cfg.pattern else cfg.sparsity, pattern=cfg.pattern,
                    per_row=cfg.scope == "channel", damp=cfg.damp,
                )  # fmt: skip
            else:
                info["mask"] = f"sparsegpt: ADMM on {w.shape[0]}x{w.shape[1]} is over its cost limit"
        if mask is None and cfg.scope == "channel" and cfg.pattern is None:
            mask = pn.row_mask(_obs_saliency(w, H, cfg.damp), cfg.sparsity)
        if mask is not None:
            keep = np.asarray(mask, bool)
            new = _solve_kept(w, H, keep, cfg)
        else:  # SparseGPT chooses the mask while it updates the weights
            if cfg.pattern is not None:
                new, keep = pn.sparsegpt(w, H, pattern=cfg.pattern, blocksize=cfg.blocksize, damp=cfg.damp)
            else:
                new, keep = pn.sparsegpt(w, H, sparsity=cfg.sparsity, blocksize=cfg.blocksize, damp=cfg.damp)
            if pn.lstsq_cost(keep) <= EXACT_SOLVE_FLOPS:
                new = layerwise.masked_least_squares(w, H, keep, damp=cfg.damp)
    else:
        keep = mask
        new = np.where(keep, w, 0.0).astype(np.float32)
    if H is not None:
        info["error_masked"] = layerwise.reconstruction_error(w, np.where(keep, w, 0.0), H)
        info["error"] = layerwise.reconstruction_error(w, new, H)
        info["energy"] = layerwise.reconstruction_error(w, np.zeros_like(w), H)
    else:
        info["weight_loss"] = float(np.sum((w.astype(np.float64) - new) ** 2))
        info["weight_norm"] = float(np.sum(w.astype(np.float64) ** 2))
    return layerwise.Solution(weight=new.astype(np.float32), mask=keep, info=info)


def _solve_kept(w: np.ndarray, H: np.ndarray, keep: np.ndarray, cfg: UnstructuredConfig) -> np.ndarray:  # noqa: N803
    """The kept weights for a mask already chosen: the exact optimum where affordable, else
    SparseGPT's column-by-column approximation of it."""
    if pn.lstsq_cost(keep) <= EXACT_SOLVE_FLOPS:
        return layerwise.masked_least_squares(w, H, keep, damp=cfg.damp)
    return pn.sparsegpt(w, H, mask=keep, blocksize=cfg.blocksize, damp=cfg.damp)[0]


def _allocate(model, targets, cfg, data) -> dict[int, float]:
    """Per-weight sparsities (id(node) -> fraction), ``cfg.sparsity`` of all their weights overall:
    each weight pruned alone by SparseGPT at a few sparsities around it, on the dense model's
    Hessians, then the zeros placed where the relative output error grows least
    (`numerics.allocate_by_error`)."""
    levels = np.unique(np.clip(cfg.sparsity + np.array(ALLOCATE_SPREAD), 0.0, 0.99))
    sums: dict[str, list] = {}  # node -> [weights, errors at each level, output energy]

    def record(W, H, ctx):  # noqa: N803
        w = np.asarray(W, np.float32)
        errors = [
            layerwise.reconstruction_error(w, pn.sparsegpt(w, H, sparsity=s, blocksize=cfg.blocksize, damp=cfg.damp)[0], H)
            for s in levels
        ]  # fmt: skip
        total = sums.setdefault(str(id(ctx.view.node)), [0, np.zeros(len(levels)), 0.0])
        total[0] += w.size
        total[1] += errors
        total[2] += layerwise.reconstruction_error(w, np.zeros_like(w), H)
        return layerwise.Solution(weight=w)

    layerwise.reconstruct(
        model, [t.view for t in targets], data, record, batch_size=cfg.batch_size, limit=cfg.samples,
        seed=cfg.seed, positions=capture.token_positions,
    )  # fmt: skip
    curves = {k: (size, errors / max(energy, 1e-30)) for k, (size, errors, energy) in sums.items()}
    chosen = pn.allocate_by_error(curves, levels, cfg.sparsity)
    for t in targets:
        logger.info("%s: %.1f %% zeros allotted", t.name, 100 * chosen.get(str(id(t.node)), cfg.sparsity))
    return {int(k): v for k, v in chosen.items()}


def _global_masks(model, targets, cfg, data) -> dict[int, np.ndarray]:
    """One threshold over all weights, scored on the dense model (Wanda: its input norms)."""
    hessians: dict[int, list[np.ndarray]] = {}
    if cfg.method == "wanda":

        def record(W, H, ctx):  # noqa: N803
            hessians.setdefault(id(ctx.view.node), []).append(H)
            return layerwise.Solution(weight=np.asarray(W, np.float32))

        layerwise.reconstruct(
            model, [t.view for t in targets], data, record, batch_size=cfg.batch_size, limit=cfg.samples,
            seed=cfg.seed, positions=capture.token_positions,
        )  # fmt: skip
    scores = {}
    for t in targets:
        rows = t.matrix()
        h = hessians.get(id(t.node))
        scores[str(id(t.node))] = np.stack(
            [_scores(cfg.method, rows[g], h[g] if h else None, cfg.seed) for g in range(len(rows))]
        )
    return {int(k): v for k, v in pn.global_masks(scores, cfg.sparsity).items()}


def _scores(method: str, w: np.ndarray, h: np.ndarray | None, seed: int) -> np.ndarray:
    """Scores of one (out, in) weight group; Wanda needs its Hessian."""
    if method in ("magnitude", "threshold", *SEARCHED_MASKS):
        return pn.magnitude_scores(w)
    if method == "random":
        return pn.random_scores(w, seed)
    if method == "wanda":
        return pn.wanda_scores(w, np.sqrt(np.maximum(np.diag(h), 0.0)))
    raise OnnxcompError(f"--method {method!r}: unknown")


def _mask(cfg: UnstructuredConfig, scores: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Mask (True = kept) of one (out, in) weight group by scope and pattern."""
    if cfg.method == "threshold":
        return pn.threshold_mask(w, cfg.threshold)
    if cfg.pattern is not None:
        return pn.n_m_mask(scores, *cfg.pattern)
    if cfg.scope == "channel":
        return pn.row_mask(scores, cfg.sparsity)
    return pn.layer_mask(scores, cfg.sparsity)


def _obs_saliency(w: np.ndarray, h: np.ndarray, damp: float) -> np.ndarray:
    """SparseGPT's ``w^2 / [H^-1]_jj^2`` over a whole (out, in) weight (for per-row masks)."""
    h = np.array(h, np.float64)
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    u = layerwise.inverse_cholesky_upper(h, damp)
    return w.astype(np.float64) ** 2 / np.diag(u)[None, :] ** 2
