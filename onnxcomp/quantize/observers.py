"""Streaming calibration observers: fold batches into running statistics, then pick a clip range.

Every observer has ``update(batch)`` and ``compute() -> (rmin, rmax)``; its memory is fixed at
construction (a min and a max, or a histogram of ``bins`` float64 counts) and does not grow with the
number of batches. NaN and inf values are dropped and counted in ``dropped``.

Histograms keep a fixed bin count. When a batch falls outside the current range the range grows by
an integer factor of the bin width, aligned on the old bin edges, so old counts move whole into new
bins with no interpolation error (the same idea as PyTorch's ``HistogramObserver``, which re-bins on
growth rather than adding bins as onnxruntime's ``HistogramCollector`` does).
"""

from __future__ import annotations

import inspect
import logging
import math
from typing import Any

import numpy as np

from onnxcomp.errors import OnnxcompError
from onnxcomp.quantize.schemes import QuantTypeLike, quant_type

logger = logging.getLogger(__name__)

Range = tuple[Any, Any]  # (rmin, rmax): floats per tensor, (C,) float64 arrays per channel


class Histogram:
    """Fixed-size histogram over a range that contains 0 and grows by aligned re-binning."""

    def __init__(self, bins: int = 2048):
        if bins < 8:
            raise OnnxcompError(f"histogram bins must be >= 8, got {bins}")
        self.bins = int(bins)
        self.counts = np.zeros(self.bins, dtype=np.float64)  # (bins,)
        self.lo = 0.0
        self.hi = 0.0
        self._zeros = 0.0  # zeros seen before the range had any width

    @property
    def width(self) -> float:
        return (self.hi - self.lo) / self.bins

    @property
    def edges(self) -> np.ndarray:
        return self.lo + self.width * np.arange(self.bins + 1, dtype=np.float64)  # (bins + 1,)

    @property
    def centers(self) -> np.ndarray:
        return self.lo + self.width * (np.arange(self.bins, dtype=np.float64) + 0.5)  # (bins,)

    @property
    def total(self) -> float:
        return float(self.counts.sum()) + self._zeros

    def update(self, values: np.ndarray) -> None:
        """Add finite values (any shape)."""
        values = np.ravel(values)
        if values.size == 0:
            return
        vmin = min(float(values.min()), 0.0)
        vmax = max(float(values.max()), 0.0)
        if self.hi == self.lo:  # no range yet: [min(x, 0), max(x, 0)] of the first nonzero data
            if vmin == vmax:  # only zeros: count them in a zero-width histogram for now
                self._zeros += float(values.size)
                return
            self.lo, self.hi = vmin, vmax
            self.counts[min(int(-self.lo / self.width), self.bins - 1)] += self._zeros
            self._zeros = 0.0
        elif vmin < self.lo or vmax > self.hi:
            self._grow(vmin, vmax)
        clipped = np.clip(values, self.lo, self.hi)  # guards against rounding at the grown edges
        self.counts += np.histogram(clipped, bins=self.bins, range=(self.lo, self.hi))[0]

    def _grow(self, vmin: float, vmax: float) -> None:
        w = self.width
        need_lo, need_hi = min(vmin, self.lo), max(vmax, self.hi)
        # New width = factor * w and new_lo = lo - shift * w (integers), so old edges stay edges.
        # Pick the smallest factor that fits and center the slack, so that growth on one side does
        # not waste the bins on the other.
        factor = max(1, math.ceil((need_hi - need_lo) / (self.bins * w)))
        aligned = False
        if factor <= self.bins:  # beyond, the whole old range falls in one new bin anyway
            for _ in range(4):
                shift_min = math.ceil((self.lo - need_lo) / w)
                shift_max = math.floor((self.lo + self.bins * factor * w - need_hi) / w)
                if shift_min <= shift_max:
                    aligned = True
                    break
                factor += 1
        if aligned:
            if need_lo >= 0.0:  # no negative data: keep lo at 0 (|x| histograms, post-ReLU)
                shift = shift_min
            elif need_hi <= 0.0:
                shift = shift_max
            else:
                shift = (shift_min + shift_max) // 2
            new_lo = self.lo - shift * w
            new_w = factor * w
        else:  # a huge jump: cover [need_lo, need_hi] with a little slack, no alignment
            span = (need_hi - need_lo) * (1.0 + 1e-6)
            new_w = span / self.bins
            slack = span - (need_hi - need_lo)
            if need_lo >= 0.0:
                new_lo = need_lo
            elif need_hi <= 0.0:
                new_lo = need_lo - slack
            else:
                new_lo = need_lo - slack / 2
        # Old bins lie whole inside new ones (edges aligned), so place each by its center.
        idx = np.floor((self.centers - new_lo) / new_w).astype(np.int64)
        self.counts = np.bincount(
            np.clip(idx, 0, self.bins - 1), weights=self.counts, minlength=self.bins
        )
        self.lo, self.hi = new_lo, new_lo + self.bins * new_w

    def quantile(self, q: float) -> float:
        """Value below which a fraction ``q`` of the counts lies (linear inside a bin)."""
        cdf = np.cumsum(self.counts)
        target = q * cdf[-1]
        i = int(np.searchsorted(cdf, target, side="left"))
        i = min(i, self.bins - 1)
        below = cdf[i - 1] if i > 0 else 0.0
        frac = (target - below) / self.counts[i] if self.counts[i] > 0 else 0.0
        return self.lo + self.width * (i + float(np.clip(frac, 0.0, 1.0)))


class Observer:
    """Base class: drops non-finite values, tracks exact min / max and counts."""

    def __init__(self) -> None:
        self.count = 0  # finite values seen
        self.dropped = 0  # NaN / inf values ignored
        self.min = math.inf
        self.max = -math.inf

    def update(self, batch: np.ndarray) -> None:
        """Fold one batch (any shape) into the statistics."""
        x = np.asarray(batch)
        if not np.issubdtype(x.dtype, np.floating):
            x = x.astype(np.float64)
        x = x.ravel()
        finite = np.isfinite(x)
        n_bad = int(x.size - np.count_nonzero(finite))
        if n_bad:
            self.dropped += n_bad
            logger.debug("%s: dropped %d non-finite values", type(self).__name__, n_bad)
            x = x[finite]
        if x.size == 0:
            return
        self.count += int(x.size)
        self.min = min(self.min, float(x.min()))
        self.max = max(self.max, float(x.max()))
        self._update(x)

    def _update(self, x: np.ndarray) -> None:
        pass

    def _check_seen(self) -> None:
        if self.count == 0:
            raise OnnxcompError(
                f"{type(self).__name__}: no finite values observed ({self.dropped} NaN/inf dropped)"
            )

    def compute(self) -> Range:
        """The calibrated range (rmin, rmax)."""
        raise NotImplementedError

    @property
    def nbytes(self) -> int:
        """Bytes held by the observer's arrays (constant after the first batch)."""
        return 0


class MinMaxObserver(Observer):
    """Running min / max, per tensor or per channel along ``axis``, optionally a moving average.

    Args:
        axis: channel axis of the batches for per-channel ranges; None for per tensor.
        averaging_constant: c in ``m <- m + c (batch_m - m)`` (PyTorch's
            ``MovingAverageMinMaxObserver``); None keeps the global min / max.
    """

    def __init__(self, axis: int | None = None, averaging_constant: float | None = None):
        super().__init__()
        if averaging_constant is not None and not 0.0 < averaging_constant <= 1.0:
            raise OnnxcompError(f"averaging_constant must be in (0, 1], got {averaging_constant}")
        self.axis = axis
        self.averaging_constant = averaging_constant
        self._lo: np.ndarray | None = None  # () or (C,), float64
        self._hi: np.ndarray | None = None

    def update(self, batch: np.ndarray) -> None:
        if self.axis is None:
            super().update(batch)
            return
        x = np.asarray(batch, dtype=np.float64)
        if not -x.ndim <= self.axis < x.ndim:
            raise OnnxcompError(
                f"MinMaxObserver: axis {self.axis} out of range for a batch of shape {x.shape}"
            )
        x = np.moveaxis(x, self.axis, 0).reshape(x.shape[self.axis], -1)  # (C, rest)
        finite = np.isfinite(x)
        n_bad = int(x.size - np.count_nonzero(finite))
        self.dropped += n_bad
        self.count += int(x.size) - n_bad
        bmin = np.where(finite, x, np.inf).min(axis=1)  # (C,)
        bmax = np.where(finite, x, -np.inf).max(axis=1)
        if self._lo is not None and self._lo.shape != bmin.shape:
            raise OnnxcompError(
                f"MinMaxObserver: batch has {bmin.shape[0]} channels on axis {self.axis}, "
                f"earlier batches had {self._lo.shape[0]}"
            )
        self._fold(bmin, bmax)

    def _update(self, x: np.ndarray) -> None:
        self._fold(np.float64(x.min()), np.float64(x.max()))

    def _fold(self, bmin: np.ndarray, bmax: np.ndarray) -> None:
        seen = np.isfinite(bmin)  # channels with finite data in this batch
        if self._lo is None:
            self._lo, self._hi = np.array(bmin, np.float64), np.array(bmax, np.float64)
            return
        fresh = ~np.isfinite(self._lo)  # channels that had no finite data before
        if self.averaging_constant is None:
            new_lo, new_hi = np.minimum(self._lo, bmin), np.maximum(self._hi, bmax)
        else:
            c = self.averaging_constant
            new_lo = np.where(fresh, bmin, self._lo + c * (bmin - self._lo))
            new_hi = np.where(fresh, bmax, self._hi + c * (bmax - self._hi))
        self._lo = np.where(seen, new_lo, self._lo)
        self._hi = np.where(seen, new_hi, self._hi)

    def compute(self) -> Range:
        self._check_seen()
        assert self._lo is not None and self._hi is not None
        empty = ~np.isfinite(self._lo)
        if np.any(empty):
            logger.warning(
                "MinMaxObserver: %d channel(s) had no finite values; range [0, 0]", int(empty.sum())
            )
        lo = np.where(empty, 0.0, self._lo)
        hi = np.where(empty, 0.0, self._hi)
        if self.axis is None:
            return float(lo), float(hi)
        return lo, hi

    @property
    def nbytes(self) -> int:
        if self._lo is None or self._hi is None:
            return 0
        return self._lo.nbytes + self._hi.nbytes


class _HistogramObserver(Observer):
    """Observer over a histogram of x (signed) or of |x| (``symmetric``)."""

    def __init__(self, bins: int = 2048, symmetric: bool = False):
        super().__init__()
        self.symmetric = bool(symmetric)
        self.histogram = Histogram(bins)

    def _update(self, x: np.ndarray) -> None:
        self.histogram.update(np.abs(x) if self.symmetric else x)

    @property
    def nbytes(self) -> int:
        return self.histogram.counts.nbytes

    def _finish(self, threshold: float) -> Range:
        """(rmin, rmax) from a threshold t: (-t, t), or clipped to the observed min / max."""
        if self.symmetric:
            return -threshold, threshold
        return max(-threshold, self.min), min(threshold, self.max)


class PercentileObserver(_HistogramObserver):
    """Clip range at a percentile of the observed values, from a histogram.

    symmetric: threshold t = the percentile of |x|, range (-t, t). Otherwise (100 - percentile) / 2
        percent is cut from each tail of x (onnxruntime's ``HistogramCalibrater`` percentile mode).
    """

    def __init__(self, percentile: float = 99.99, symmetric: bool = False, bins: int = 2048):
        super().__init__(bins, symmetric)
        if not 0.0 < percentile <= 100.0:
            raise OnnxcompError(f"percentile must be in (0, 100], got {percentile}")
        self.percentile = float(percentile)

    def compute(self) -> Range:
        self._check_seen()
        p = self.percentile / 100.0
        if self.symmetric:
            return self._finish(self.histogram.quantile(p))
        cut = (1.0 - p) / 2.0
        lo = max(self.histogram.quantile(cut), self.min)
        hi = min(self.histogram.quantile(1.0 - cut), self.max)
        return lo, hi


class EntropyObserver(_HistogramObserver):
    """Threshold minimising the KL divergence between the clipped and the quantized distribution.

    TensorRT's entropy calibration (Migacz, "8-bit Inference with TensorRT", GTC 2017), which
    onnxruntime's ``EntropyCalibrater`` also follows: on the histogram of |x|, for each candidate
    threshold bin i >= q (q = ``num_quantized_bins``), the reference P is bins [0, i) with the
    outliers beyond i added to the last bin; the candidate Q merges bins [0, i) into q levels and
    spreads each level evenly over its non-empty bins; the threshold with the smallest KL(P || Q)
    wins. Range (-t, t) when ``symmetric``, else clipped to the observed min / max.
    """

    def __init__(self, bins: int = 2048, num_quantized_bins: int = 128, symmetric: bool = False):
        super().__init__(bins, symmetric=True)
        if not 2 <= num_quantized_bins <= bins:
            raise OnnxcompError(
                f"num_quantized_bins must be in [2, bins={bins}], got {num_quantized_bins}"
            )
        self.num_quantized_bins = int(num_quantized_bins)
        self._symmetric_output = bool(symmetric)

    def compute(self) -> Range:
        self._check_seen()
        h = self.histogram.counts  # (bins,) counts of |x|
        nq = self.num_quantized_bins
        tail = np.concatenate([np.cumsum(h[::-1])[::-1], [0.0]])  # tail[i] = sum(h[i:])
        best_i, best_kl = self.histogram.bins, math.inf
        for i in range(nq, self.histogram.bins + 1):
            sliced = h[:i]
            p = sliced.copy()
            p[-1] += tail[i]
            level = (np.arange(i) * nq) // i  # (i,) quantized level of each bin
            level_sum = np.bincount(level, weights=sliced, minlength=nq)
            nonzero = sliced > 0
            level_nonzero = np.bincount(level, weights=nonzero, minlength=nq)
            q = np.where(nonzero, level_sum[level] / np.maximum(level_nonzero[level], 1.0), 0.0)
            kl = _kl_divergence(p, q)
            if kl < best_kl:
                best_i, best_kl = i, kl
        threshold = float(self.histogram.edges[best_i])
        if self._symmetric_output:
            return -threshold, threshold
        return max(-threshold, self.min), min(threshold, self.max)


def _kl_divergence(p: np.ndarray, q: np.ndarray) -> float:
    """KL(P || Q) of two unnormalised histograms.

    Empty Q bins under non-empty P bins get a tiny mass, which acts as a large penalty.
    """
    p_sum, q_sum = p.sum(), q.sum()
    if p_sum <= 0 or q_sum <= 0:
        return math.inf
    pn = p / p_sum
    qn = np.maximum(q / q_sum, 1e-12)
    mask = pn > 0
    return float(np.sum(pn[mask] * np.log(pn[mask] / qn[mask])))


class MSEObserver(_HistogramObserver):
    """Clip range minimising the expected squared quantization error for ``dtype`` (histogram).

    Error model (Banner et al., "Post-training 4-bit quantization of convolution networks for rapid
    deployment", NeurIPS 2019, ACIQ): for a range [lo, hi] with step ``s = (hi - lo) / levels``,
    values inside add ``s^2 / 12`` rounding noise and values outside add their squared distance to
    the nearest bound. The histogram counts are taken as uniform inside each bin. Candidate bounds
    are the histogram edges (symmetric: thresholds on |x|; asymmetric: a grid of at most
    ``num_candidates`` lower and upper bounds around 0).
    """

    def __init__(
        self,
        dtype: QuantTypeLike = "uint8",
        symmetric: bool = False,
        bins: int = 2048,
        num_candidates: int = 512,
    ):
        super().__init__(bins, symmetric)
        self.dtype = quant_type(dtype)
        if num_candidates < 2:
            raise OnnxcompError(f"num_candidates must be >= 2, got {num_candidates}")
        self.num_candidates = int(num_candidates)

    def compute(self) -> Range:
        self._check_seen()
        hist = self.histogram
        c = hist.centers  # (bins,)
        n = hist.counts
        within = hist.width**2 / 12.0  # variance of a uniform bin around its center
        # Prefix sums (bins + 1,) of n, n c, n (c^2 + w^2/12): the error of any tail in O(1).
        s0 = np.concatenate([[0.0], np.cumsum(n)])
        s1 = np.concatenate([[0.0], np.cumsum(n * c)])
        s2 = np.concatenate([[0.0], np.cumsum(n * (c * c + within))])
        total = s0[-1]
        if self.symmetric:
            levels = float(self.dtype.symmetric_half_range)
            idx = np.arange(1, hist.bins + 1)  # threshold t = edges[idx], bins >= idx are clipped
            t = hist.edges[idx]
            clip = (s2[-1] - s2[idx]) - 2 * t * (s1[-1] - s1[idx]) + t * t * (s0[-1] - s0[idx])
            inside = s0[idx]
            err = clip + inside * (t / levels) ** 2 / 12.0
            threshold = float(t[int(np.argmin(err))])
            return -threshold, threshold
        levels = float(self.dtype.qmax - self.dtype.qmin)
        edges = hist.edges
        zero = int(np.clip(np.searchsorted(edges, 0.0), 0, hist.bins))
        # (L,) lower bound = edges[lo_idx]
        lo_idx = _subsample(np.arange(0, zero + 1), self.num_candidates)
        hi_idx = _subsample(np.arange(zero, hist.bins + 1), self.num_candidates)  # (H,)
        lo = np.minimum(edges[lo_idx], 0.0)[:, None]  # (L, 1)
        hi = np.maximum(edges[hi_idx], 0.0)[None, :]  # (1, H)
        li = lo_idx[:, None]
        hj = hi_idx[None, :]
        left = s2[li] - 2 * lo * s1[li] + lo * lo * s0[li]  # bins below lo_idx, clipped to lo
        right = (s2[-1] - s2[hj]) - 2 * hi * (s1[-1] - s1[hj]) + hi * hi * (total - s0[hj])
        inside = s0[hj] - s0[li]
        err = left + right + inside * ((hi - lo) / levels) ** 2 / 12.0  # (L, H)
        i, j = np.unravel_index(int(np.argmin(err)), err.shape)
        return max(float(lo[i, 0]), min(self.min, 0.0)), min(float(hi[0, j]), max(self.max, 0.0))


def _subsample(idx: np.ndarray, k: int) -> np.ndarray:
    """At most k evenly spaced entries of idx, always keeping both ends."""
    if idx.size <= k:
        return idx
    return idx[np.unique(np.linspace(0, idx.size - 1, k).round().astype(np.int64))]


_METHODS: dict[str, type[Observer]] = {
    "minmax": MinMaxObserver,
    "percentile": PercentileObserver,
    "entropy": EntropyObserver,
    "mse": MSEObserver,
}


def make_observer(method: str, **options: Any) -> Observer:
    """Build the observer of a calibration ``method``: minmax | percentile | entropy | mse.

    Raises:
        OnnxcompError: naming the unknown method or option.
    """
    cls = _METHODS.get(str(method).lower())
    if cls is None:
        raise OnnxcompError(
            f"unknown calibration method {method!r}: expected one of {sorted(_METHODS)}"
        )
    allowed = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    for key in options:
        if key not in allowed:
            raise OnnxcompError(
                f"unknown option {key!r} for calibration method {method!r}: "
                f"expected one of {allowed}"
            )
    return cls(**options)
