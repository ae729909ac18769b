"""GPTQ rounding on plain arrays: the layer-wise quantization solver.

Hessians, the damped inverse and the layer-by-layer driver are in `onnxcomp.layerwise`.

Layout: a linear layer is ``y = W x`` with ``W: (out_features, in_features)`` and inputs
``x: (samples, in_features)`` (the PyTorch / Gemm(transB=1) convention). For an ONNX MatMul weight
``B: [K, N]`` pass ``W = B.T`` and transpose the result back. Everything here is float64; weights
come back as float32.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable

import numpy as np

from onnxcomp.errors import OnnxcompError
from onnxcomp.layerwise import inverse_cholesky_upper
from onnxcomp.quantize.schemes import (
    INT8,
    QuantParams,
    QuantTypeLike,
    quant_type,
    scale_zero_point,
)

logger = logging.getLogger(__name__)

# (w_col: (out,), column index in W) -> (integer codes (out,), dequantized values (out,))
ColumnQuantizer = Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]]


@dataclasses.dataclass
class GptqResult:
    """What `gptq_quantize` returns. Shapes use W's layout (out_features, in_features)."""

    dequantized: np.ndarray  # (out, in) float32: what the runtime computes with
    quantized: np.ndarray  # (out, in) integer codes in dtype.storage
    # (out,) per channel, (out, n_groups) with group_size, () per tensor; None if callable
    scale: np.ndarray | None
    zero_point: np.ndarray | None  # same shape as scale
    loss: float  # GPTQ's objective estimate: sum over columns of (w - q)^2 / (2 [H^-1]_jj)


def gptq_quantize(
    W: np.ndarray,  # noqa: N803
    H: np.ndarray,  # noqa: N803
    quantizer: QuantParams | ColumnQuantizer | None = None,
    *,
    dtype: QuantTypeLike = INT8,
    symmetric: bool = True,
    group_size: int | None = None,
    block_size: int = 128,
    damp: float = 0.01,
    act_order: bool = False,
) -> GptqResult:
    """Quantize ``W: (out, in)`` with GPTQ (Frantar et al. 2022, "GPTQ: Accurate Post-Training
    Quantization for Generative Pre-trained Transformers", Alg. 1).

    Columns are quantized one at a time; each column's rounding error is spread over the columns
    not yet quantized so that ``||W X - W_q X||^2`` stays small. Lazy block updates and the
    Cholesky form of the inverse Hessian as in the paper.

    Args:
        W: float weight, (out_features, in_features).
        H: ``2 X^T X / n``, (in_features, in_features), from `layerwise.HessianAccumulator`.
        quantizer: the grid. None: per output channel (``dtype``, ``symmetric``) computed from W, or
            per group of ``group_size`` input columns (MatMulNBits blocks after transposing). A
            `QuantParams`: per tensor, or per channel with ``axis=0`` and ``out`` scales. A callable
            ``(w_col, j) -> (codes, dequantized)``.
        group_size: with ``quantizer=None``, one scale per (row, group of input columns). Groups are
            computed from the partly updated weights when reached (as GPTQ does), or from the
            original W up front with ``act_order`` ("static groups") so that the groups stay
            contiguous in the original column order.
        block_size: columns per lazy batch update (speed only; the result is the same).
        damp: relative dampening added to H's diagonal (fraction of its mean).
        act_order: quantize columns in order of decreasing ``H_jj`` (GPTQ's "act-order" heuristic).
    """
    w = np.array(W, dtype=np.float64)  # (out, in), a working copy that gets updated
    h = np.array(H, dtype=np.float64)  # (in, in)
    if w.ndim != 2 or h.shape != (w.shape[1], w.shape[1]):
        raise OnnxcompError(f"GPTQ needs W (out, in) and H (in, in); got {w.shape} and {h.shape}")
    if not (np.all(np.isfinite(w)) and np.all(np.isfinite(h))):
        raise OnnxcompError("GPTQ: W or H contains NaN or inf")
    if block_size < 1 or damp < 0:
        raise OnnxcompError(
            f"GPTQ: block_size must be >= 1 and damp >= 0 (got {block_size}, {damp})"
        )
    out_f, in_f = w.shape
    qt = quant_type(dtype)
    code_range = (qt.qmin, qt.qmax)

    dead = np.diag(h) == 0  # inputs that are always 0: any value works, use 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0

    perm = np.argsort(-np.diag(h), kind="stable") if act_order else np.arange(in_f)
    inv_perm = np.argsort(perm)

    scale: np.ndarray | None = None
    zero: np.ndarray | None = None
    group_params: Callable[[int, np.ndarray], tuple[np.ndarray, np.ndarray]] | None = None
    if callable(quantizer) and not isinstance(quantizer, QuantParams):
        column_fn: ColumnQuantizer | None = quantizer
    else:
        column_fn = None
        if isinstance(quantizer, QuantParams):
            qt = quantizer.dtype
            code_range = quantizer.code_range
            if quantizer.axis not in (None, 0) or (
                quantizer.axis == 0 and quantizer.scale.shape != (out_f,)
            ):
                raise OnnxcompError(
                    "GPTQ: QuantParams must be per tensor or per output channel "
                    "(axis=0, one scale per row of W)"
                )
            scale = np.broadcast_to(quantizer.scale, (out_f,)).astype(np.float32)
            zero = np.broadcast_to(quantizer.zero_point, (out_f,)).astype(qt.storage)
            result_scale, result_zero = quantizer.scale, quantizer.zero_point
        elif group_size is None:
            # (out,)
            scale, zero = scale_zero_point(w.min(axis=1), w.max(axis=1), qt, symmetric, False)
            result_scale, result_zero = scale, zero
        else:
            if group_size < 1:
                raise OnnxcompError(f"GPTQ: group_size must be >= 1, got {group_size}")
            n_groups = -(-in_f // group_size)
            result_scale = np.zeros((out_f, n_groups), np.float32)
            result_zero = np.zeros((out_f, n_groups), qt.storage)

            def group_params(g: int, cols: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
                # cols: (out, <= group_size), the group's columns
                s, z = scale_zero_point(cols.min(axis=1), cols.max(axis=1), qt, symmetric, False)
                result_scale[:, g], result_zero[:, g] = s, z
                return s, z

            if act_order:  # static groups, from the original weights
                for g in range(n_groups):
                    group_params(g, w[:, g * group_size : (g + 1) * group_size])

    w = w[:, perm]
    h = h[np.ix_(perm, perm)]
    u = inverse_cholesky_upper(h, damp)  # (in, in) upper, in permuted order

    codes = np.zeros((out_f, in_f), dtype=np.int64)  # permuted order
    deq = np.zeros((out_f, in_f), dtype=np.float64)
    loss = 0.0
    for i1 in range(0, in_f, block_size):
        i2 = min(i1 + block_size, in_f)
        w1 = w[:, i1:i2].copy()  # (out, b)
        err1 = np.zeros_like(w1)  # (out, b)
        u1 = u[i1:i2, i1:i2]  # (b, b)
        for i in range(i2 - i1):
            j = int(perm[i1 + i])  # original column index
            col = w1[:, i]  # (out,)
            if column_fn is not None:
                q, wq = column_fn(col.copy(), j)
                q = np.asarray(q)
                wq = np.asarray(wq, dtype=np.float64)
            else:
                if group_params is not None:
                    g = j // group_size  # type: ignore[operator]
                    if act_order:
                        s, z = result_scale[:, g], result_zero[:, g]
                    elif j % group_size == 0:
                        # Columns j.. of the group, already updated by the error of earlier columns.
                        s, z = group_params(
                            g, np.concatenate([w1[:, i:], w[:, i2:]], axis=1)[:, :group_size]
                        )
                    else:
                        s, z = result_scale[:, g], result_zero[:, g]
                else:
                    s, z = scale, zero
                q, wq = _round_column(col, s, z, *code_range)
            codes[:, i1 + i] = q
            deq[:, i1 + i] = wq
            d = u1[i, i]
            e = (col - wq) / d  # (out,)
            loss += float(np.sum(e * e)) / 2.0
            w1[:, i:] -= np.outer(e, u1[i, i:])
            err1[:, i] = e
        w[:, i2:] -= err1 @ u[i1:i2, i2:]

    codes = codes[:, inv_perm]
    deq = deq[:, inv_perm]
    if column_fn is not None:
        return GptqResult(deq.astype(np.float32), codes, None, None, loss)
    return GptqResult(
        deq.astype(np.float32),
        codes.astype(qt.storage),
        np.asarray(result_scale),
        np.asarray(result_zero),
        loss,
    )


def _round_column(
    col: np.ndarray, scale: np.ndarray, zero: np.ndarray, qmin: int, qmax: int
) -> tuple[np.ndarray, np.ndarray]:
    """Round one column to its (per-row) grid: codes and their float32 dequantized values."""
    s = np.asarray(scale, dtype=np.float32)
    z = np.asarray(zero).astype(np.int64)
    q = np.clip(np.rint(col.astype(np.float32) / s).astype(np.int64) + z, qmin, qmax)  # (out,)
    # exactly DequantizeLinear's float32 result
    wq = ((q - z).astype(np.float32) * s).astype(np.float64)
    return q, wq
