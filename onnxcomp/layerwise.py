"""Layer-wise reconstruction: Hessians of layer inputs, damped inverses, and one driver.

A weighted op is seen as ``groups`` linear layers ``y = W x`` with ``W: (out, in)`` (`LinearView`:
a Gemm/MatMul's rows are its input rows, a Conv's rows are the im2col patches of its input, one
layer per group). The layer-wise objective ``||W X - W' X||^2`` has the Hessian ``H = 2 X^T X / n``
(Frantar et al., "GPTQ", 2022, Sec. 3; Frantar & Alistarh, "SparseGPT", 2023, Sec. 3), which
`HessianAccumulator` builds from streamed inputs in O(in^2) memory.

`reconstruct` is the one layer-by-layer driver: it streams each layer's inputs (from a reference
model, or from the model being compressed so far), accumulates the Hessians, and hands each
``(W, H)`` to a solver (GPTQ rounding, SparseGPT/OBS mask and update, least squares):

    def solve(W, H, ctx) -> Solution           # W: (out, in) float64, H: (in, in) float64
        ...
        return Solution(weight=W_new, mask=keep)   # W_new: (out, in) float32

Plain numpy; float64 for Hessians and solves, float32 for the weights that come back.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, Protocol

import numpy as np
import onnx_ir as ir

from onnxcomp import capture, ops
from onnxcomp.data import DataSource
from onnxcomp.errors import OnnxcompError

logger = logging.getLogger(__name__)

# Hessians held at once; more layers than this take more runs over the data.
HESSIAN_BUDGET_BYTES = 2 << 30
# `corrected_target` regresses the reference's outputs on the compressed model's inputs: with
# fewer input rows than this many times the layer's inputs it overfits the calibration data
# (paraphrase-MiniLM-L3 at 50 %: 48 sentences, cosine 0.936 -> 0.924 with it; 679 sentences, 0.945 ->
# 0.958), so such layers are solved on their own outputs.
TARGET_MIN_ROWS_PER_INPUT = 2


# ---------------------------------------------------------------------------------------------
# Numerics


class HessianAccumulator:
    """Running ``H = 2 X^T X / n`` of a layer's inputs (and their mean), memory O(in_features^2).

    The Hessian of the layer-wise objective ``||W X - W_q X||^2`` (Frantar et al., GPTQ, 2022, Sec.
    3). Rows with NaN or inf are dropped and counted in ``dropped_rows``.
    """

    def __init__(self, in_features: int | None = None):
        self.in_features = in_features
        self.n_samples = 0
        self.dropped_rows = 0
        self._h: np.ndarray | None = None  # (in, in) float64
        self._sum: np.ndarray | None = None  # (in,) float64
        self._cross: np.ndarray | None = None  # (in, in) float64: 2 X^T X_ref / n

    def update(self, x: np.ndarray, x_ref: np.ndarray | None = None) -> None:
        """Add inputs ``x: (..., in_features)``; leading axes are samples (batch, tokens, ...).

        ``x_ref``: the same rows as the uncompressed model computes them; then ``cross`` is kept
        too (`corrected_target`).
        """
        x = np.asarray(x, dtype=np.float64)
        if x.ndim == 0:
            raise OnnxcompError(
                "HessianAccumulator.update needs inputs of shape (samples, in_features)"
            )
        if self.in_features is None:
            self.in_features = int(x.shape[-1])
        if x.shape[-1] != self.in_features:
            raise OnnxcompError(f"inputs have {x.shape[-1]} features, expected {self.in_features}")
        x = x.reshape(-1, self.in_features)  # (samples, in)
        ref = None if x_ref is None else np.asarray(x_ref, dtype=np.float64).reshape(x.shape)
        ok = np.all(np.isfinite(x), axis=1)
        if ref is not None:
            ok &= np.all(np.isfinite(ref), axis=1)
        if not np.all(ok):
            self.dropped_rows += int(np.count_nonzero(~ok))
            x = x[ok]
            ref = None if ref is None else ref[ok]
        m = x.shape[0]
        if m == 0:
            return
        if self._h is None:
            self._h = np.zeros((self.in_features, self.in_features), dtype=np.float64)
            self._sum = np.zeros(self.in_features, dtype=np.float64)
            if ref is not None:
                self._cross = np.zeros_like(self._h)
        total = self.n_samples + m
        # Running average keeps H at the scale of one sample whatever the count.
        self._h *= self.n_samples / total
        self._h += (2.0 / total) * (x.T @ x)
        if self._cross is not None and ref is not None:
            self._cross *= self.n_samples / total
            self._cross += (2.0 / total) * (x.T @ ref)
        self._sum += x.sum(axis=0)
        self.n_samples = total

    def compute(self) -> np.ndarray:
        """``2 X^T X / n`` (the accumulator protocol of `onnxcomp.capture`)."""
        return self.H

    @property
    def H(self) -> np.ndarray:  # noqa: N802 (the usual name)
        """``2 X^T X / n``, (in_features, in_features) float64."""
        if self._h is None:
            raise OnnxcompError("HessianAccumulator: no inputs seen")
        return self._h

    @property
    def cross(self) -> np.ndarray | None:
        """``2 X^T X_ref / n`` (in, in) when reference rows were given, else None."""
        return self._cross

    @property
    def mean(self) -> np.ndarray:
        """Mean input ``E[x]``, (in_features,) float64: what `bias_correction` needs."""
        if self._sum is None:
            raise OnnxcompError("HessianAccumulator: no inputs seen")
        return self._sum / self.n_samples

    @property
    def nbytes(self) -> int:
        if self._h is None or self._sum is None:
            return 0
        return self._h.nbytes + self._sum.nbytes


def inverse_cholesky_upper(h: np.ndarray, damp: float) -> np.ndarray:
    """Upper Cholesky factor U of ``(H + damp * mean(diag H) I)^-1 = U^T U``.

    GPTQ (Frantar et al. 2022, Sec. 4 "Cholesky reformulation") and SparseGPT (Frantar & Alistarh
    2023, Alg. 1) read the rows of U. The damping grows tenfold (up to 5 times) while H is not
    positive definite.
    """
    n = h.shape[0]
    mean_diag = float(np.mean(np.diag(h)))
    for attempt in range(6):
        d = damp * (10.0**attempt) * mean_diag
        try:
            low = np.linalg.cholesky(h + d * np.eye(n))  # H = L L^T
            low_inv = np.linalg.inv(low)
            h_inv = low_inv.T @ low_inv
            return np.linalg.cholesky(h_inv).T  # upper: H^-1 = U^T U
        except np.linalg.LinAlgError:
            logger.warning("Hessian not positive definite with damp=%g; increasing damping", d)
    raise OnnxcompError(
        "layer-wise solve: Hessian is not positive definite even with strong damping (check inputs)"
    )


def masked_least_squares(
    W: np.ndarray,  # noqa: N803
    H: np.ndarray,  # noqa: N803
    mask: np.ndarray,
    damp: float = 0.01,
) -> np.ndarray:
    """The weights that keep ``mask`` (True = kept) and best reproduce ``W x`` on the inputs of H.

    For each row ``w``, with P the removed and K the kept inputs, minimising
    ``(w' - w) H (w' - w)^T`` with ``w'_P = 0`` gives ``w'_K = w_K + H_KK^-1 H_KP w_P`` (the exact
    reconstruction SparseGPT approximates column by column, Frantar & Alistarh 2023, Sec. 3.1;
    the OBS update of Hassibi & Stork 1993 for one weight). Rows with the same mask share one
    factorisation, so structured masks (whole input channels) cost one solve.

    Args:
        W: (out, in); H: (in, in), ``2 X^T X / n``; mask: (out, in) bool.
        damp: fraction of H's mean diagonal added to it, as in GPTQ.
    Returns (out, in) float32 with zeros where ``mask`` is False.
    """
    w = np.asarray(W, dtype=np.float64)
    h = np.array(H, dtype=np.float64)
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != w.shape or h.shape != (w.shape[1], w.shape[1]):
        raise OnnxcompError(
            f"masked_least_squares needs W, mask (out, in) and H (in, in); got {w.shape}, "
            f"{mask.shape}, {h.shape}"
        )
    h[np.diag_indices_from(h)] += damp * float(np.mean(np.diag(h)))
    out = np.where(mask, w, 0.0)
    patterns, which = np.unique(mask, axis=0, return_inverse=True)
    for p, keep in enumerate(patterns):
        rows = np.flatnonzero(which.reshape(-1) == p)
        drop = ~keep
        if not drop.any() or not keep.any():
            continue
        # (kept, kept) x (kept, rows): one solve for every row with this mask
        rhs = h[np.ix_(keep, drop)] @ w[np.ix_(rows, drop)].T
        out[np.ix_(rows, keep)] += np.linalg.solve(h[np.ix_(keep, keep)], rhs).T
    return out.astype(np.float32)


def corrected_target(
    W: np.ndarray,  # noqa: N803
    H: np.ndarray,  # noqa: N803
    cross: np.ndarray,
    damp: float = 0.01,
) -> np.ndarray:
    """The weights that best map the compressed model's inputs to the reference's outputs.

    Layer by layer, a compressed model's inputs ``X`` drift from the reference's ``X_ref``. Solving
    ``min ||X_ref W^T - X W'^T||^2 + lam ||W' - W||^2`` instead of ``||X W^T - X W'^T||^2`` lets
    each layer undo the error of the layers before it (asymmetric calibration, as in GPTAQ, Li et
    al. 2025): ``W' = W (C^T + lam I) (H + lam I)^-1`` with ``H = 2 X^T X / n``, ``C = 2 X^T X_ref
    / n`` and ``lam = damp * mean(diag H)``. Pruning or rounding ``W'`` on ``H`` then minimises the
    error to the reference's outputs (the cross term is constant in W').

    Args: W: (out, in); H, cross: (in, in). Returns (out, in) float64.
    """
    h = np.asarray(H, np.float64)
    lam = damp * float(np.mean(np.diag(h))) or 1e-12
    eye = np.eye(h.shape[0])
    rhs = np.asarray(W, np.float64) @ (np.asarray(cross, np.float64).T + lam * eye)  # (out, in)
    return np.linalg.solve(h + lam * eye, rhs.T).T


def bias_correction(
    W_fp: np.ndarray,  # noqa: N803
    W_q: np.ndarray,  # noqa: N803
    mean_input: np.ndarray,
) -> np.ndarray:
    """Bias delta ``(W_fp - W_q) E[x]``, (out,), that restores the mean output of a quantized layer.

    Added to the layer's bias it makes ``E[W_q x + b]`` equal ``E[W_fp x + b]`` (empirical bias
    correction, Nagel et al., "Data-Free Quantization Through Weight Equalization and Bias
    Correction", ICCV 2019, Sec. 4.2).

    Args:
        W_fp, W_q: (out_features, in_features) float and dequantized weights.
        mean_input: (in_features,) mean of the layer's inputs (`HessianAccumulator.mean`).
    """
    w_fp = np.asarray(W_fp, dtype=np.float64)
    w_q = np.asarray(W_q, dtype=np.float64)
    mu = np.asarray(mean_input, dtype=np.float64).reshape(-1)
    if w_fp.shape != w_q.shape or w_fp.ndim != 2 or mu.shape != (w_fp.shape[1],):
        raise OnnxcompError(
            f"bias_correction needs W_fp, W_q (out, in) and mean_input (in,); "
            f"got {w_fp.shape}, {w_q.shape}, "
            f"{mu.shape}"
        )
    return ((w_fp - w_q) @ mu).astype(np.float32)  # (out,)


def reconstruction_error(W: np.ndarray, W_q: np.ndarray, H: np.ndarray) -> float:  # noqa: N803
    """Mean output error per sample ``E||(W - W_q) x||^2 = tr(dW H dW^T) / 2``, H = 2 X^T X / n."""
    dw = np.asarray(W, dtype=np.float64) - np.asarray(W_q, dtype=np.float64)  # (out, in)
    return float(np.sum((dw @ np.asarray(H, dtype=np.float64)) * dw) / 2.0)


# ---------------------------------------------------------------------------------------------
# im2col

# Patch rows one batch may add to a Conv's Hessian; more are sub-sampled (seeded). A batch of 32
# ResNet stage-1 inputs has 32 x 32 x 32 = 32768 positions; 4096 of them already outnumber the
# 288 = 32 x 3 x 3 features many times over, and the float64 patches stay under 40 MB.
MAX_ROWS_PER_BATCH = 4096


class ConvGeometry(NamedTuple):
    """Where a Conv's kernel reads: ``pads`` in ONNX order, all the begins then all the ends
    (``auto_pad`` already resolved)."""

    kernel: tuple[int, ...]
    strides: tuple[int, ...]
    pads: tuple[int, ...]
    dilations: tuple[int, ...]


def conv_patches(
    x: np.ndarray,
    geometry: ConvGeometry,
    *,
    groups: int = 1,
    max_rows: int | None = None,
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """im2col: the receptive field of each output position of a Conv, one row per position.

    Args:
        x: the Conv's input, (N, C, *spatial).
        geometry: from `conv_geometry`.
        max_rows: keep at most this many rows, drawn without replacement by ``rng`` (only those
            rows are gathered, so memory follows ``max_rows``, not the output size).

    Returns (rows, groups, C/groups * prod(kernel)): rows ordered (n, *out) and features ordered
    (channel, *kernel) within a group, so that ``weight.reshape(M, -1) @ row`` is the output of
    the weight's (M, C/g, *kernel) layout.
    """
    x = np.asarray(x)
    kernel, strides, pads, dilations = geometry
    dims = len(kernel)
    n, c = x.shape[:2]
    half = len(pads) // 2
    xp = np.pad(x, [(0, 0), (0, 0)] + [(pads[i], pads[i + half]) for i in range(dims)])
    reach = tuple(d * (k - 1) + 1 for k, d in zip(kernel, dilations))
    spatial = tuple(range(2, 2 + dims))
    # A view: (N, C, *positions, *reach), strided down to (N, C, *out, *kernel); nothing copied.
    windows = np.lib.stride_tricks.sliding_window_view(xp, reach, axis=spatial)
    windows = windows[
        (slice(None), slice(None))
        + tuple(slice(None, None, s) for s in strides)
        + tuple(slice(None, None, d) for d in dilations)
    ]
    out = windows.shape[2 : 2 + dims]
    total = n * math.prod(out)
    if max_rows is not None and total > max_rows:
        rng = rng if rng is not None else np.random.default_rng(0)
        flat = np.sort(rng.choice(total, size=max_rows, replace=False))
    else:
        flat = np.arange(total)
    idx = np.unravel_index(flat, (n, *out))
    # Advanced indices around a slice: the indexed axis goes first -> (rows, C, *kernel).
    patches = windows[(idx[0], slice(None), *idx[1:])]
    return patches.reshape(len(flat), groups, (c // groups) * math.prod(kernel))


def conv_geometry(
    node: ir.Node, weight_shape: tuple[int, ...], spatial: tuple[int, ...]
) -> ConvGeometry:
    """(kernel, strides, pads, dilations) of a Conv on an input of ``spatial`` size, with
    ``auto_pad`` turned into explicit pads as onnxruntime computes them."""
    attrs = node.attributes
    kernel = tuple(int(k) for k in weight_shape[2:])
    dims = len(kernel)
    strides = tuple(attrs.get_ints("strides", [1] * dims))
    dilations = tuple(attrs.get_ints("dilations", [1] * dims))
    pads = tuple(attrs.get_ints("pads", [0] * (2 * dims)))
    auto_pad = attrs.get_string("auto_pad", "NOTSET")
    if auto_pad == "VALID":
        pads = (0,) * (2 * dims)
    elif auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        begins, ends = [], []
        for size, k, s, d in zip(spatial, kernel, strides, dilations):
            total = max(0, (-(-size // s) - 1) * s + d * (k - 1) + 1 - size)
            small, large = total // 2, total - total // 2
            begins.append(small if auto_pad == "SAME_UPPER" else large)
            ends.append(large if auto_pad == "SAME_UPPER" else small)
        pads = tuple(begins + ends)
    return ConvGeometry(kernel, strides, pads, dilations)


# ---------------------------------------------------------------------------------------------
# Weighted ops as linear layers


@dataclasses.dataclass
class LinearView:
    """A weighted op as ``groups`` linear layers ``y = W x``, each with its own Hessian.

    ``key`` says which views read the same rows (and so share their Hessians).
    """

    node: ir.Node
    weight: np.ndarray  # float32, the op's own layout
    groups: int
    key: tuple
    rows_of: Callable[[np.ndarray, np.random.Generator], np.ndarray]  # input -> (rows, groups, in)
    to_rows: Callable[[np.ndarray], np.ndarray]  # op layout -> (groups, out/groups, in)
    back: Callable[[np.ndarray], np.ndarray]  # (groups, out/groups, in) -> op layout
    input_index: int = 0

    @property
    def input(self) -> ir.Value:
        """The activation the op reads, as the graph holds it now."""
        return self.node.inputs[self.input_index]

    input_channel_axis: int = -1  # the axis of the input that holds its channels
    kernel_size: int = 1  # features per input channel (a Conv's kernel window)

    @property
    def rows(self) -> np.ndarray:
        """The weight as the solver sees it, (groups, out/groups, in)."""
        return self.to_rows(self.weight)

    @property
    def input_channels(self) -> int:
        return self.groups * self.rows.shape[2] // self.kernel_size

    def per_feature(self, per_channel: np.ndarray) -> np.ndarray:
        """A statistic of the input channels ``(C,)`` (a mean, an L2 norm) spread over the solver's
        features: ``(groups, in)``, each channel repeated over its kernel window (im2col order)."""
        by_group = np.asarray(per_channel).reshape(self.groups, -1)  # (groups, C/groups)
        return np.repeat(by_group, self.kernel_size, axis=1)


def matmul_view(node: ir.Node, weight: np.ndarray, *, trans_a: bool = False) -> LinearView:
    """``y = x @ w`` with ``w: [K, N]`` (a MatMul, or a Gemm whose transB/alpha are applied)."""
    input_name = node.inputs[0].name

    def rows_of(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        x = x.T if trans_a else x
        return x.reshape(-1, 1, x.shape[-1])  # (samples, 1, in)

    return LinearView(
        node,
        weight,
        1,
        (input_name, bool(trans_a)),
        rows_of,
        to_rows=lambda w: w.T[None],
        back=lambda q: q[0].T,
        input_channel_axis=0 if trans_a else -1,
    )


def _gemm_view(node: ir.Node, weight: np.ndarray) -> LinearView | str:
    if weight.ndim != 2:
        return f"weight has rank {weight.ndim}, a layer-wise solve needs a matrix"
    spec = ops.WEIGHTED[node.op_type]
    trans_a = node.op_type == "Gemm" and bool(node.attributes.get_int("transA", 0))
    view = matmul_view(node, weight, trans_a=trans_a)
    shape = weight.shape  # not the array: a mapped weight is released once rewritten
    view.to_rows = lambda w: spec.to_matrix(node, w)
    view.back = lambda q: spec.from_matrix(node, q, shape)
    return view


def _conv_view(node: ir.Node, weight: np.ndarray) -> LinearView | str:
    spec = ops.WEIGHTED[node.op_type]
    groups = spec.groups(node)
    if weight.ndim < 3 or weight.shape[0] % groups:
        return f"weight of shape {list(weight.shape)} does not fit group={groups}"
    attrs = node.attributes
    key = (
        node.inputs[spec.data].name,
        groups,
        tuple(weight.shape[1:]),
        tuple(attrs.get_ints("strides", [])),
        tuple(attrs.get_ints("pads", [])),
        tuple(attrs.get_ints("dilations", [])),
        attrs.get_string("auto_pad", "NOTSET"),
    )

    shape = weight.shape  # not the array: a mapped weight is released once rewritten

    def rows_of(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        geometry = conv_geometry(node, shape, x.shape[2:])
        return conv_patches(x, geometry, groups=groups, max_rows=MAX_ROWS_PER_BATCH, rng=rng)

    # (M, C/g, *kernel) -> (g, M/g, C/g * prod(kernel)): output channels of group i come i-th.
    return LinearView(
        node,
        weight,
        groups,
        key,
        rows_of,
        to_rows=lambda w: spec.to_matrix(node, w),
        back=lambda q: spec.from_matrix(node, q, shape),
        input_index=spec.data,
        input_channel_axis=1,
        kernel_size=math.prod(weight.shape[2:]),
    )


# How each weighted op becomes linear layers (the weight layouts are `ops.WEIGHTED`'s); a string
# is why it cannot. ConvTranspose has no im2col rows here yet.
VIEWS: dict[str, Callable[[ir.Node, np.ndarray], LinearView | str]] = {
    "Gemm": _gemm_view,
    "MatMul": _gemm_view,
    "Conv": _conv_view,
}


def linear_view(node: ir.Node, weight: np.ndarray | None = None) -> LinearView | str:
    """The op as linear layers (weight from its constant input 1 unless given), or why not."""
    make = VIEWS.get(node.op_type)
    if make is None:
        return f"no layer-wise view of {node.op_type}"
    if weight is None:
        spec = ops.WEIGHTED[node.op_type]
        value = node.inputs[spec.weight] if len(node.inputs) > spec.weight else None
        if value is None or value.const_value is None:
            return "weight is computed at run time (not a constant)"
        # no copy of a float32 weight: an external one stays memory-mapped until it is read
        weight = np.asarray(value.const_value.numpy(), dtype=np.float32)
    return make(node, weight)


# ---------------------------------------------------------------------------------------------
# The driver


class LayerInputs:
    """Accumulator: the rows a view multiplies its weight with, one Hessian per group (and, given
    the reference's rows, their cross term)."""

    def __init__(self, view: LinearView, rng: np.random.Generator):
        self.view = view
        self.rng = rng
        self.hessians = [HessianAccumulator() for _ in range(view.groups)]

    def update(self, batch: np.ndarray, reference: np.ndarray | None = None) -> None:
        state = self.rng.bit_generator.state
        rows = self.view.rows_of(batch, self.rng)  # (rows, groups, in)
        ref_rows = None
        if reference is not None:
            self.rng.bit_generator.state = state  # the same sub-sampled rows of both
            ref_rows = self.view.rows_of(reference, self.rng)
        for g, acc in enumerate(self.hessians):
            acc.update(rows[:, g, :], None if ref_rows is None else ref_rows[:, g, :])

    def compute(self) -> list[HessianAccumulator]:
        return self.hessians


@dataclasses.dataclass
class SolveContext:
    """Where a solve happens: the view, the group, the op's output channels of that group."""

    view: LinearView
    group: int
    channels: slice
    hessian: HessianAccumulator


@dataclasses.dataclass
class Solution:
    """What a solver returns for one group: the new ``weight`` (out, in) float32, and optionally
    integer ``codes`` (quantizers), the ``mask`` of kept weights (pruners), and figures."""

    weight: np.ndarray
    codes: np.ndarray | None = None
    mask: np.ndarray | None = None
    info: dict[str, Any] = dataclasses.field(default_factory=dict)


class Solver(Protocol):
    def __call__(self, W: np.ndarray, H: np.ndarray, ctx: SolveContext) -> Solution: ...  # noqa: N803


@dataclasses.dataclass
class LayerResult:
    """One view after its solve: the new weight and codes in the op's own layout."""

    view: LinearView
    solutions: list[Solution] = dataclasses.field(default_factory=list)
    hessians: list[HessianAccumulator] = dataclasses.field(default_factory=list)
    error: float = 0.0  # sum over groups of the reconstruction error per sample
    rows: int = 0  # input rows behind the Hessians (the fewest over the groups)
    skipped: str | None = None

    @property
    def weight(self) -> np.ndarray:
        return self.view.back(np.stack([s.weight for s in self.solutions]))

    @property
    def codes(self) -> np.ndarray | None:
        if any(s.codes is None for s in self.solutions):
            return None
        return self.view.back(np.stack([s.codes for s in self.solutions]))

    @property
    def mask(self) -> np.ndarray | None:
        if any(s.mask is None for s in self.solutions):
            return None
        return self.view.back(np.stack([s.mask for s in self.solutions]))


@dataclasses.dataclass
class Reconstruction:
    layers: list[LayerResult]
    runs: int  # passes over the data


def reconstruct(
    source: ir.Model,
    views: Sequence[LinearView],
    data: DataSource,
    solve: Solver,
    *,
    write: Callable[[LayerResult], None] | None = None,
    sequential: bool = False,
    batch_size: int = 32,
    limit: int | None = None,
    seed: int = 0,
    hessian_budget_bytes: int = HESSIAN_BUDGET_BYTES,
    positions: Callable[[Any], np.ndarray | None] | None = None,
    reference: ir.Model | None = None,
    target_damp: float = 0.01,
) -> Reconstruction:
    """Solve each view layer by layer on Hessians of its inputs streamed from ``source``.

    Views that read the same rows (same ``key``) share their Hessians. The views are taken in the
    order given (graph order), as many at a time as their Hessians fit ``hessian_budget_bytes``
    (one run over the data each), or one input at a time with ``sequential``. After each such
    set, ``write`` (if given) puts the new weights into the model; when ``source`` is that same
    model, the next set's inputs come from the model compressed so far (GPTQ's and SparseGPT's
    sequential mode), else from the reference. Conv rows are sub-sampled with ``seed``.
    ``positions`` (`capture.token_positions`) keeps padded tokens out of the Hessians. With
    ``reference`` (the uncompressed model, same tensor names) each solve gets `corrected_target`'s
    weights instead of the layer's own: the layer then reproduces the reference's outputs from
    the inputs the compressed model gives it (``target_damp`` regularises that solve).

    Returns every view's `LayerResult` (after ``write``, its solutions and Hessians are dropped).
    """
    keys = list(dict.fromkeys(view.key for view in views))
    first = {key: next(v for v in views if v.key == key) for key in keys}
    rngs = {key: np.random.default_rng([seed, i]) for i, key in enumerate(keys)}

    def cost(key) -> int:
        view = first[key]
        in_features = view.rows.shape[2]
        return view.groups * 8 * (in_features * in_features + in_features)

    chunks = capture.split_by_budget(keys, cost, 0 if sequential else hessian_budget_bytes)
    results: list[LayerResult] = []
    for chunk in chunks:
        inputs = {key: LayerInputs(first[key], rngs[key]) for key in chunk}
        by_name: dict[str, list[LayerInputs]] = {}
        for key in chunk:
            by_name.setdefault(first[key].input.name, []).append(inputs[key])
        capture.accumulate(
            source, by_name, data, batch_size=batch_size, limit=limit, positions=positions, reference=reference
        )
        for view in [v for v in views if v.key in inputs]:
            result = _solve_view(view, inputs[view.key].hessians, solve, target_damp)
            results.append(result)
            if write is not None and result.skipped is None:
                write(result)
                result.solutions, result.hessians = [], []
        del inputs, by_name
    order = {id(v): i for i, v in enumerate(views)}
    results.sort(key=lambda r: order[id(r.view)])
    return Reconstruction(results, len(chunks))


def _solve_view(
    view: LinearView, hessians: list[HessianAccumulator], solve: Solver, target_damp: float = 0.01
) -> LayerResult:
    if any(acc.n_samples == 0 for acc in hessians):
        return LayerResult(view, skipped="no finite calibration inputs reached it")
    rows = view.rows  # (groups, out/groups, in)
    per_group = rows.shape[1]
    result = LayerResult(view, hessians=hessians, rows=min(acc.n_samples for acc in hessians))
    for g, acc in enumerate(hessians):
        w = rows[g]
        if acc.cross is not None and acc.n_samples >= TARGET_MIN_ROWS_PER_INPUT * w.shape[1]:
            w = corrected_target(w, acc.H, acc.cross, target_damp).astype(np.float32)
        channels = slice(g * per_group, (g + 1) * per_group)
        solution = solve(w, acc.H, SolveContext(view, g, channels, acc))
        result.error += reconstruction_error(w, solution.weight, acc.H)
        result.solutions.append(solution)
    return result
