"""Unstructured pruning of Conv / Gemm / MatMul weights, with optional layer-wise reconstruction.

Plan, then rewrite: `plan_weights` picks the prunable weights (and says why each other one is
left alone); `prune_weights` scores them (magnitude, threshold, random, Wanda), builds masks
(per layer, global or per output channel; unstructured or N:M) and, when data is given, solves
the kept weights layer by layer in graph order with SparseGPT so each layer reproduces its
outputs on the inputs the pruned model so far gives it.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxcomp import ops
from onnxcomp.data import DataSource
from onnxcomp.errors import OnnxcompError
from onnxcomp.prune import numerics as pn
from onnxcomp.prune.hessians import LayerRows, layer_hessians

logger = logging.getLogger(__name__)

PRUNABLE_OPS = ("Conv", "Gemm", "MatMul")

# Below this many flops per weight matrix the kept weights are solved exactly, row by row
# (`numerics.masked_lstsq`); above, SparseGPT's sequential update stands (a 384 x 1536 MatMul at
# 50 % would take ~2e11).
EXACT_SOLVE_FLOPS = 5e9


@dataclasses.dataclass
class WeightTarget:
    """One weight to prune: its node, initializer and the (groups, out/g, in) row view."""

    node: ir.Node
    value: ir.Value
    spec: ops.WeightedOp

    @property
    def name(self) -> str:
        return self.node.name or self.value.name

    def matrix(self) -> np.ndarray:
        w = self.value.const_value.numpy().astype(np.float32)
        return self.spec.to_matrix(self.node, w)  # (g, out/g, in)

    def write(self, rows: np.ndarray) -> None:
        shape = tuple(self.value.const_value.shape.numpy())
        dtype = self.value.const_value.dtype.numpy()
        array = np.ascontiguousarray(self.spec.from_matrix(self.node, rows, shape).astype(dtype))
        self.value.const_value = ir.tensor(array, name=self.value.name)


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
    for node in model.graph:
        if node.op_type not in PRUNABLE_OPS or node.domain not in ("", "ai.onnx"):
            continue
        spec = ops.weighted(node)
        label = node.name or node.op_type
        reason = None
        weight = node.inputs[spec.weight] if len(node.inputs) > spec.weight else None
        if node.name in exclude_nodes:
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
        if reason:
            skipped.append({"node": label, "op": node.op_type, "skipped": reason})
            continue
        seen[id(weight)] = label
        targets.append(WeightTarget(node, weight, spec))
    return targets, skipped


@dataclasses.dataclass
class UnstructuredConfig:
    sparsity: float = 0.5
    method: str = "magnitude"  # magnitude | threshold | random | wanda | sparsegpt
    scope: str = "layer"  # layer | global | channel
    pattern: tuple[int, int] | None = None
    threshold: float | None = None
    reconstruct: bool = False
    seed: int = 0
    damp: float = 0.01
    blocksize: int = 128
    batch_size: int = 32
    samples: int | None = 256


def _scores(method: str, rows: np.ndarray, h: list[np.ndarray] | None, seed: int) -> np.ndarray:
    """Scores of a (g, out/g, in) weight; Wanda needs the per-group Hessians."""
    if method in ("magnitude", "threshold", "sparsegpt"):
        return pn.magnitude_scores(rows)
    if method == "random":
        return pn.random_scores(rows, seed)
    if method == "wanda":
        return np.stack([pn.wanda_scores(rows[g], np.sqrt(np.diag(h[g]))) for g in range(len(rows))])
    raise OnnxcompError(f"--method {method!r}: unknown")


def _mask(cfg: UnstructuredConfig, scores: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Mask (True = kept) of a (g, out/g, in) weight by scope and pattern."""
    if cfg.method == "threshold":
        return pn.threshold_mask(rows, cfg.threshold)
    if cfg.pattern is not None:
        n, m = cfg.pattern
        flat = scores.reshape(-1, scores.shape[-1])
        return pn.n_m_mask(flat, n, m).reshape(scores.shape)
    if cfg.scope == "channel":
        return pn.row_mask(scores.reshape(-1, scores.shape[-1]), cfg.sparsity).reshape(scores.shape)
    return pn.layer_mask(scores, cfg.sparsity)


def prune_weights(
    model: ir.Model,
    targets: list[WeightTarget],
    cfg: UnstructuredConfig,
    data: DataSource | None,
) -> list[dict[str, Any]]:
    """Prune ``targets`` in place; one report row per weight."""
    if cfg.pattern is not None:
        bad = [t for t in targets if t.matrix().shape[-1] % cfg.pattern[1]]
        for t in bad:
            targets.remove(t)
    else:
        bad = []
    rows_report = [
        {"node": t.name, "op": t.node.op_type, "skipped": f"{t.matrix().shape[-1]} inputs per row "
         f"are not a multiple of {cfg.pattern[1]} ({cfg.pattern[0]}:{cfg.pattern[1]})"}
        for t in bad
    ]
    needs_data = cfg.reconstruct or cfg.method in ("wanda", "sparsegpt")
    if needs_data and data is None:
        raise OnnxcompError(f"--method {cfg.method}{' with --reconstruct' if cfg.reconstruct else ''} needs --data")

    fixed: dict[int, np.ndarray] = {}
    if cfg.scope == "global" and cfg.method != "threshold" and cfg.pattern is None:
        # One threshold over all weights, scored on the dense model.
        hs = layer_hessians(model, [LayerRows.of(t.node) for t in targets], data, cfg) if cfg.method == "wanda" else {}
        scores = {}
        for t in targets:
            scores[str(id(t.node))] = _scores(cfg.method, t.matrix(), hs.get(id(t.node)), cfg.seed)
        fixed = {int(k): v for k, v in pn.global_masks(scores, cfg.sparsity).items()}

    for index, t in enumerate(targets):
        rows = t.matrix()  # (g, out/g, in)
        hs = None
        if needs_data:
            # Inputs from the model pruned so far (targets before this one already rewritten).
            hs = layer_hessians(model, [LayerRows.of(t.node)], data, cfg, seed=index)[id(t.node)]
        if id(t.node) in fixed:
            mask = fixed[id(t.node)]
        elif cfg.method == "sparsegpt" and cfg.reconstruct:
            mask = None  # chosen by SparseGPT itself, block by block
        else:
            mask = _mask(cfg, _scores(cfg.method, rows, hs, cfg.seed + index), rows)
        new = np.empty_like(rows)
        error_before = error_after = energy = 0.0
        for g in range(rows.shape[0]):
            if cfg.reconstruct:
                if mask is None:
                    kwargs = {"pattern": cfg.pattern} if cfg.pattern else {"sparsity": cfg.sparsity}
                    if cfg.scope == "channel" and cfg.pattern is None:
                        kwargs = {"mask": pn.row_mask(_obs_saliency(rows[g], hs[g], cfg.damp), cfg.sparsity)}
                else:
                    kwargs = {"mask": mask[g]}
                new[g], keep = pn.sparsegpt(rows[g], hs[g], blocksize=cfg.blocksize, damp=cfg.damp, **kwargs)
                if pn.lstsq_cost(keep) <= EXACT_SOLVE_FLOPS:
                    # The exact optimum for the chosen mask (SparseGPT's updates approximate it).
                    new[g] = pn.masked_lstsq(rows[g], hs[g], keep, damp=cfg.damp)
            else:
                keep = mask[g]
                new[g] = np.where(keep, rows[g], 0.0)
            if hs is not None:
                error_before += pn.reconstruction_error(rows[g], np.where(keep, rows[g], 0), hs[g])
                error_after += pn.reconstruction_error(rows[g], new[g], hs[g])
                energy += pn.reconstruction_error(rows[g], np.zeros_like(rows[g]), hs[g])
        t.write(new)
        row = {
            "node": t.name,
            "op": t.node.op_type,
            "tensor": t.value.name,
            "shape": [int(d) for d in t.value.shape],
            "sparsity": round(pn.sparsity_of(new), 4),
        }
        if hs is not None:
            # E||W x - W' x||^2 per sample, of the mask alone and after reconstruction
            row["error_masked"] = error_before
            row["error"] = error_after
            row["relative_error"] = error_after / max(energy, 1e-30)
        else:
            dense = rows.astype(np.float64)
            row["relative_error"] = float(np.sum((dense - new) ** 2) / max(np.sum(dense**2), 1e-30))
        logger.info("pruned %s to %.1f %% zeros", t.name, 100 * row["sparsity"])
        rows_report.append(row)
    return rows_report


def _obs_saliency(w: np.ndarray, h: np.ndarray, damp: float) -> np.ndarray:
    """SparseGPT's ``w^2 / [H^-1]_jj^2`` over a whole (out, in) weight (for per-row masks)."""
    u = pn.inverse_hessian_upper(np.where(np.eye(len(h)) * (np.diag(h) == 0), 1.0, h), damp)
    return w.astype(np.float64) ** 2 / np.diag(u)[None, :] ** 2
