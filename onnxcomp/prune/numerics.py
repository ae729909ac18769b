"""Pruning numerics on plain arrays: importance scores, masks, N:M patterns, the SparseGPT solver.

The damped inverse Hessian, exact masked least squares and the reconstruction error are the
shared ones in ``onnxcomp.layerwise``.

Layout: a linear layer is ``y = W x`` with ``W: (out_features, in_features)`` and inputs
``x: (samples, in_features)``; ``H = 2 X^T X / n`` is its Hessian (``in x in``). A mask is a bool
array of W's shape, True where the weight is *kept*. No graph in sight: the passes in this folder
turn ONNX weights into these views and back.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Literal

import numpy as np

from onnxcomp.errors import OnnxcompError
from onnxcomp.layerwise import inverse_cholesky_upper

logger = logging.getLogger(__name__)

Method = Literal["magnitude", "threshold", "random", "wanda"]
Scope = Literal["layer", "global", "channel"]

# ---------------------------------------------------------------------------------------------
# Scores: larger means more important (kept first).


def magnitude_scores(w: np.ndarray) -> np.ndarray:
    """``|w|`` (any shape)."""
    return np.abs(np.asarray(w, dtype=np.float64))


def random_scores(w: np.ndarray, seed: int = 0) -> np.ndarray:
    """Uniform random scores of ``w``'s shape (a baseline), seeded."""
    return np.random.default_rng(seed).random(np.shape(w))


def wanda_scores(w: np.ndarray, input_norm: np.ndarray) -> np.ndarray:
    """``|W_ij| * ||X_j||_2`` (Sun et al. 2023, "A Simple and Effective Pruning Approach for Large
    Language Models", Eq. 1).

    Args:
        w: (out, in).
        input_norm: (in,) the L2 norm of each input feature over the calibration samples (any
            common scale: ``sqrt(diag(H))`` works as well).
    """
    w = np.asarray(w, dtype=np.float64)
    norm = np.asarray(input_norm, dtype=np.float64).reshape(-1)
    if w.ndim != 2 or norm.shape != (w.shape[1],):
        raise OnnxcompError(f"Wanda needs W (out, in) and norms (in,); got {w.shape}, {norm.shape}")
    return np.abs(w) * norm[None, :]


# ---------------------------------------------------------------------------------------------
# Masks (True = kept)


def _n_pruned(size: int, sparsity: float) -> int:
    return int(np.floor(size * sparsity + 1e-9))


def _lowest(flat: np.ndarray, k: int) -> np.ndarray:
    """Flat indices of the ``k`` lowest scores, ties taken lowest index first: the same choice as
    a stable argsort, in linear time (a partition finds the k-th value)."""
    kth = np.partition(flat, k - 1)[k - 1]
    below = np.flatnonzero(flat < kth)
    ties = np.flatnonzero(flat == kth)[: k - below.size]
    return np.concatenate([below, ties])


def layer_mask(scores: np.ndarray, sparsity: float) -> np.ndarray:
    """Keep all but the ``sparsity`` fraction of lowest scores of one tensor (ties: lowest index
    pruned first)."""
    _check_sparsity(sparsity)
    flat = np.asarray(scores).reshape(-1)
    k = _n_pruned(flat.size, sparsity)
    mask = np.ones(flat.size, dtype=bool)
    if k:
        mask[_lowest(flat, k)] = False
    return mask.reshape(np.shape(scores))


def row_mask(scores: np.ndarray, sparsity: float) -> np.ndarray:
    """The same fraction pruned in every row (output channel) of a (out, in) score matrix."""
    _check_sparsity(sparsity)
    s = np.asarray(scores)
    s2 = s.reshape(s.shape[0], -1)
    k = _n_pruned(s2.shape[1], sparsity)
    mask = np.ones(s2.shape, dtype=bool)
    if k:
        order = np.argsort(s2, axis=1, kind="stable")[:, :k]
        np.put_along_axis(mask, order, False, axis=1)
    return mask.reshape(s.shape)


def global_masks(scores: Mapping[str, np.ndarray], sparsity: float) -> dict[str, np.ndarray]:
    """One threshold over all tensors: the ``sparsity`` fraction of lowest scores overall.

    Scores are compared as given; pass scores on a common scale (|w| is, within one model).
    """
    _check_sparsity(sparsity)
    if not scores:
        return {}
    flat = np.concatenate([np.asarray(s, dtype=np.float64).reshape(-1) for s in scores.values()])
    k = _n_pruned(flat.size, sparsity)
    keep = np.ones(flat.size, dtype=bool)
    if k:
        keep[_lowest(flat, k)] = False
    out, start = {}, 0
    for name, s in scores.items():
        size = int(np.size(s))
        out[name] = keep[start : start + size].reshape(np.shape(s))
        start += size
    return out


def threshold_mask(w: np.ndarray, threshold: float) -> np.ndarray:
    """Keep the weights with ``|w| > threshold``."""
    if threshold < 0:
        raise OnnxcompError(f"--threshold must be >= 0, got {threshold}")
    return np.abs(np.asarray(w)) > threshold


def n_m_mask(scores: np.ndarray, n: int = 2, m: int = 4) -> np.ndarray:
    """N:M pattern on a (out, in) score matrix: in each run of ``m`` consecutive inputs of a row,
    ``m - n`` are pruned and ``n`` kept (2:4: NVIDIA's sparse tensor cores; Mishra et al. 2021).

    ``in`` must be a multiple of ``m``.
    """
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 2 or s.shape[1] % m or not 0 < n < m:
        raise OnnxcompError(
            f"{n}:{m} pattern needs (out, in) with in a multiple of {m}; got {list(s.shape)}"
        )
    runs = s.reshape(s.shape[0], -1, m)  # (out, in/m, m)
    order = np.argsort(runs, axis=2, kind="stable")[..., : m - n]
    mask = np.ones(runs.shape, dtype=bool)
    np.put_along_axis(mask, order, False, axis=2)
    return mask.reshape(s.shape)


def parse_pattern(pattern: str) -> tuple[int, int] | None:
    """"unstructured" -> None; "2:4" -> (2, 4)."""
    if pattern == "unstructured":
        return None
    try:
        n, m = (int(p) for p in pattern.split(":"))
    except ValueError:
        raise OnnxcompError(
            f"--pattern {pattern!r}: expected 'unstructured' or N:M such as 2:4"
        ) from None
    if not 0 < n < m:
        raise OnnxcompError(f"--pattern {pattern!r}: need 0 < N < M")
    return n, m


def _check_sparsity(sparsity: float) -> None:
    if not 0 <= sparsity < 1:
        raise OnnxcompError(f"--sparsity {sparsity}: expected a fraction in [0, 1)")


def sparsity_of(w: np.ndarray) -> float:
    """The fraction of exact zeros."""
    w = np.asarray(w)
    return float(np.count_nonzero(w == 0)) / max(1, w.size)


# ---------------------------------------------------------------------------------------------
# Solvers


def sparsegpt(
    W: np.ndarray,  # noqa: N803
    H: np.ndarray,  # noqa: N803
    *,
    mask: np.ndarray | None = None,
    sparsity: float | None = None,
    pattern: tuple[int, int] | None = None,
    blocksize: int = 128,
    damp: float = 0.01,
) -> tuple[np.ndarray, np.ndarray]:
    """Prune ``W: (out, in)`` and update the kept weights so ``W X`` changes least (SparseGPT,
    Frantar & Alistarh 2023, "SparseGPT: Massive Language Models Can Be Accurately Pruned in
    One-Shot", Alg. 1: OBS updates column by column with the Cholesky form of ``H^-1``).

    Give either a fixed ``mask`` (True = kept; e.g. from magnitude or Wanda scores), or a
    ``sparsity`` (the mask is chosen adaptively per block of ``blocksize`` columns by the OBS
    saliency ``w^2 / [H^-1]_jj^2``), or an N:M ``pattern``.

    Returns (new W float32, mask bool), both (out, in).
    """
    w = np.array(W, dtype=np.float64)
    h = np.array(H, dtype=np.float64)
    if w.ndim != 2 or h.shape != (w.shape[1], w.shape[1]):
        raise OnnxcompError(f"SparseGPT needs W (out, in), H (in, in); got {w.shape}, {h.shape}")
    if (mask is None) == (sparsity is None and pattern is None):
        raise OnnxcompError("SparseGPT needs exactly one of a mask, a sparsity or a pattern")
    if sparsity is not None:
        _check_sparsity(sparsity)
    out_f, in_f = w.shape
    dead = np.diag(h) == 0  # inputs that are always 0: prune them freely
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    u = inverse_cholesky_upper(h, damp)  # (in, in)
    keep = np.ones((out_f, in_f), dtype=bool) if mask is None else np.asarray(mask, bool).copy()
    for i1 in range(0, in_f, blocksize):
        i2 = min(i1 + blocksize, in_f)
        w1 = w[:, i1:i2].copy()  # (out, b)
        err1 = np.zeros_like(w1)
        u1 = u[i1:i2, i1:i2]
        diag = np.diag(u1)
        if mask is None and pattern is None:
            saliency = w1**2 / diag[None, :] ** 2
            keep[:, i1:i2] = layer_mask(saliency, sparsity)
        for i in range(i2 - i1):
            if pattern is not None and i % pattern[1] == 0:
                n, m = pattern
                cols = slice(i, i + m)
                saliency = w1[:, cols] ** 2 / diag[None, cols] ** 2
                if saliency.shape[1] == m:
                    keep[:, i1 + i : i1 + i + m] = n_m_mask(saliency, n, m)
            col = w1[:, i]
            q = np.where(keep[:, i1 + i], col, 0.0)
            e = (col - q) / u1[i, i]
            w1[:, i:] -= np.outer(e, u1[i, i:])
            w1[:, i] = q
            err1[:, i] = e
        w[:, i1:i2] = w1
        w[:, i2:] -= err1 @ u[i1:i2, i2:]
    w[~keep] = 0.0
    return w.astype(np.float32), keep


def admm_mask(
    W: np.ndarray,  # noqa: N803
    H: np.ndarray,  # noqa: N803
    *,
    sparsity: float | None = None,
    pattern: tuple[int, int] | None = None,
    per_row: bool = False,
    iters: int = 60,
    rho: float = 0.003,
    grow: float = 1.15,
    damp: float = 0.01,
) -> np.ndarray:
    """The mask (True = kept) of ``W: (out, in)`` found by ADMM on the layer's output error
    (gradual magnitude pruning inside ADMM: Boža 2024, "Fast and Effective Weight Update for Pruned
    Large Language Models").

    Minimises ``(W' - W) H (W' - W)^T`` over sparse ``W'`` by splitting ``W' = Z``: a closed-form
    ridge step on ``W'`` (H's eigenvectors, computed once), ``Z`` the sparse projection of
    ``W' + U`` (its largest entries; N:M per run of ``pattern``; ``per_row``: the same count in
    every row) and the dual ``U``. A sparsity rises over the first 60 % of the steps (cubic,
    as in gradual pruning) while ``rho`` grows by ``grow`` each step, so the mask settles as
    the weights adapt to it. Inputs are scaled to unit variance first, so the projection ranks
    weights by ``|w| * ||x||`` as Wanda does, and ``rho`` is relative to a unit diagonal.

    On paraphrase-MiniLM-L3's MatMuls at 50 % (1,500 sentences), the exact least-squares solve on
    this mask leaves 20-35 % less output error than on SparseGPT's.
    """
    if (sparsity is None) == (pattern is None):
        raise OnnxcompError("the ADMM mask needs exactly one of a sparsity or a pattern")
    w = np.asarray(W, dtype=np.float64)
    h = np.array(H, dtype=np.float64)
    dead = np.diag(h) <= 0  # inputs that are always 0: their weights go first
    scale = np.sqrt(np.where(dead, 1.0, np.diag(h)))
    h = h / scale[:, None] / scale[None, :]
    h[np.diag_indices_from(h)] += damp
    eig, vec = np.linalg.eigh(h)
    w0 = w * scale
    w0[:, dead] = 0.0
    # The steps run in float32 (twice as fast; the mask is all that is kept).
    target = (w0 @ h).astype(np.float32)
    eig, vec, vec_t = eig.astype(np.float32), vec.astype(np.float32), np.ascontiguousarray(vec.T, np.float32)
    z, u = w0.astype(np.float32), np.zeros(w0.shape, np.float32)
    ramp = max(1, int(0.6 * iters))
    for step in range(iters):
        # (W' - W0) H + rho (W' - Z + U) = 0, with H = V diag(eig) V^T
        x = ((target + np.float32(rho) * (z - u)) @ vec / (eig + np.float32(rho))) @ vec_t
        v = x + u
        score = np.abs(v)
        if pattern is not None:
            keep = n_m_mask(score, *pattern)
        else:
            s = sparsity * (1.0 - (1.0 - min(1.0, (step + 1) / ramp)) ** 3)
            keep = row_mask(score, s) if per_row else layer_mask(score, s)
        z = np.where(keep, v, 0.0)
        u += x - z
        rho *= grow
    return keep


def admm_cost(shape: tuple[int, int], iters: int = 60) -> float:
    """About the flops of `admm_mask` on an (out, in) weight: H's eigenvectors, then two
    (out, in) x (in, in) products per step."""
    out_f, in_f = shape
    return float(10 * in_f**3 + iters * 4 * out_f * in_f**2)


def lstsq_cost(mask: np.ndarray) -> float:
    """About the flops of `layerwise.masked_least_squares` for ``mask``: k^3 / 3 per distinct
    row pattern (k kept inputs)."""
    patterns = np.unique(np.asarray(mask, bool), axis=0)
    k = np.count_nonzero(patterns, axis=1).astype(np.float64)
    return float(np.sum(k**3) / 3)


def allocate_by_error(
    curves: Mapping[str, tuple[int, np.ndarray]], levels: np.ndarray, sparsity: float
) -> dict[str, float]:
    """Per-tensor sparsities with ``sparsity`` of all weights zeroed overall, where the layer-wise
    error grows least (outlier- and sensitivity-aware layer-wise sparsity in the spirit of OWL, Yin
    et al. 2024, measured instead of scored).

    ``curves``: name -> (weights in the tensor, its relative output error at each of ``levels``,
    an increasing grid around ``sparsity``). Greedy on the error added per weight zeroed: every
    tensor starts at the lowest level and the cheapest step is taken until the budget is met; the
    last step taken is cut back so the total is exact.
    """
    levels = np.asarray(levels, dtype=np.float64)
    if not curves:
        return {}
    if not levels[0] <= sparsity <= levels[-1]:
        raise OnnxcompError(f"sparsity {sparsity} outside the levels {levels[0]}-{levels[-1]}")
    at = dict.fromkeys(curves, 0)
    total = sum(size for size, _ in curves.values())
    zeros = sum(size * levels[0] for size, _ in curves.values())
    last = next(iter(curves))
    while zeros < sparsity * total - 1e-9:
        step = {}
        for name, i in at.items():
            if i + 1 < len(levels):
                size, err = curves[name]
                step[name] = (err[i + 1] - err[i]) / (size * (levels[i + 1] - levels[i]))
        last = min(step, key=step.get)
        zeros += curves[last][0] * (levels[at[last] + 1] - levels[at[last]])
        at[last] += 1
    out = {name: float(levels[i]) for name, i in at.items()}
    out[last] = float(out[last] - (zeros - sparsity * total) / curves[last][0])
    return out
