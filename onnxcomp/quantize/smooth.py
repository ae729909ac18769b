"""SmoothQuant: move activation outliers into the weights before dynamic int8 quantization.

For ``Y = X W`` with ``X: (tokens, K)`` and ``W: [K, N]``, a per-input-channel factor ``s: (K,)`` gives the same
product ``Y = (X / s) (s W)``; choosing ``s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)`` flattens the few activation
channels with outliers (which set the per-tensor activation scale) at the cost of a wider weight range, which
per-channel weight scales absorb (Xiao et al., "SmoothQuant: Accurate and Efficient Post-Training Quantization for
Large Language Models", 2022, Sec. 4).

Plain numpy, no graph: the pass in `onnxcomp.quantize.dynamic` measures the candidates on calibration activations
and writes the chosen ``1 / s`` as a Mul before the quantized MatMuls.
"""

from __future__ import annotations

import numpy as np

from onnxcomp.quantize.schemes import dequantize, quantize, weight_params


def smooth_scales(
    act_absmax: np.ndarray, weight_absmax: np.ndarray, alpha: float, eps: float = 1e-5
) -> np.ndarray:
    """SmoothQuant's per-input-channel factors ``s: (K,)`` (Xiao et al. 2022, Eq. 4).

    Args:
        act_absmax: (K,) max |x_j| over the calibration tokens.
        weight_absmax: (K,) max |W_jn| over the output columns of every weight that reads x.
        alpha: migration strength, 0 (no smoothing: s = 1) to 1 (all of the range moved into the weights).
    """
    a = np.maximum(np.asarray(act_absmax, np.float64), eps)
    w = np.maximum(np.asarray(weight_absmax, np.float64), eps)
    s = a**alpha / w ** (1.0 - alpha)
    # Channels that never fire carry no information on the right scale: leave them alone.
    s = np.where(np.asarray(act_absmax) > eps, s, 1.0)
    s = np.clip(s, 1e-4, 1e4)
    return s.astype(np.float32)


def dynamic_quantize_activation(x: np.ndarray) -> np.ndarray:
    """What onnxruntime's DynamicQuantizeLinear makes of ``x`` (uint8, asymmetric, per tensor), dequantized.

    ``x: (samples, ...)`` of rank 3 or more: each sample gets its own range, as it would when run one at a time;
    a matrix is one tensor. Scale and zero point as `schemes.params_from_range` (onnxruntime's compute_scale_zp).
    """
    x = np.asarray(x, np.float32)
    flat = x.reshape(1, -1) if x.ndim < 3 else x.reshape(x.shape[0], -1)  # (samples, elements)
    return dequantize_in_range(flat, flat.min(axis=1), flat.max(axis=1)).reshape(x.shape)


def dequantize_in_range(rows: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """``rows: (n, ...)`` through uint8 DynamicQuantizeLinear whose range is ``lo[i], hi[i]`` for
    row i (the range of the whole tensor it came from), dequantized."""
    rows = np.asarray(rows, np.float32)
    flat = rows.reshape(rows.shape[0], -1)
    rmin = np.minimum(np.asarray(lo), 0.0).astype(np.float64)
    rmax = np.maximum(np.asarray(hi), 0.0).astype(np.float64)
    scale = (rmax - rmin) / 255.0
    scale = np.where(scale < np.finfo(np.float32).tiny, 1.0, scale)
    zp = np.clip(np.round(-rmin / scale), 0, 255)
    scale32 = scale.astype(np.float32)[:, None]
    zp32 = zp.astype(np.float32)[:, None]
    q = np.clip(np.rint(flat / scale32) + zp32, 0, 255)
    return ((q - zp32) * scale32).reshape(rows.shape)


def blockwise_quantize_activation(x: np.ndarray, block_size: int) -> np.ndarray:
    """What MatMulNBits with ``accuracy_level=4`` makes of its input, dequantized: symmetric int8 with one scale
    (absmax / 127) per row and block of ``block_size`` along the last axis (onnxruntime MLAS, CompInt8)."""
    x = np.asarray(x, np.float32)
    k = x.shape[-1]
    n_blocks = -(-k // block_size)
    rows = x.reshape(-1, k)
    if n_blocks * block_size != k:
        rows = np.concatenate(
            [rows, np.zeros((rows.shape[0], n_blocks * block_size - k), np.float32)], axis=1
        )
    blocks = rows.reshape(rows.shape[0], n_blocks, block_size)
    scale = np.abs(blocks).max(axis=2, keepdims=True) / np.float32(127.0)
    scale = np.where(scale == 0, np.float32(1.0), scale)
    q = np.clip(np.rint(blocks / scale), -127, 127) * scale
    return q.reshape(rows.shape[0], -1)[:, :k].reshape(x.shape)


def quantized_matmul(
    x: np.ndarray, w: np.ndarray, *, per_channel: bool = True, reduce_range: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Simulate a dynamic int8 MatMul: returns ``(float output, quantized output)`` for ``x: (..., K)``, ``w: [K, N]``."""
    params = weight_params(w, axis=1, per_channel=per_channel, reduce_range=reduce_range)
    wq = dequantize(quantize(w, params), params)
    xq = dynamic_quantize_activation(x)
    return x @ w, xq @ wq
