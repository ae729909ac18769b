"""Scale / zero-point math for integer quantization, matching onnxruntime bit for bit.

Plain numpy, no graph. `quantize` and `dequantize` reproduce ONNX QuantizeLinear / DequantizeLinear
as onnxruntime's CPU provider computes them (MLAS): ``q = saturate(rint(x / scale) + zero_point)``
with the division done in float32, round half to even, and saturation to the full range of the
integer type; ``x = float(int32(q) - zero_point) * scale``.

`quantize_blockwise` writes the weight layout of onnxruntime's ``com.microsoft.MatMulNBits`` contrib
op (onnxruntime ``docs/ContribOperators.md``, MatMulNBits): for ``Y = A @ W`` with ``W: [K, N]``

- ``B``: uint8 ``[N, n_blocks, blob_size]``, ``n_blocks = ceil(K / block_size)``, ``blob_size =
  block_size * bits / 8``; codes are unsigned, packed along K, lowest bits first (for 4 bits:
  element ``2i`` in the low nibble);
- ``scales``: float32 ``[N * n_blocks]``;
- ``zero_points``: optional uint8 ``[N * ceil(n_blocks * bits / 8)]``, packed like ``B`` with each
  row of N padded to whole bytes; when absent the op uses ``2 ** (bits - 1)``.
"""

from __future__ import annotations

import dataclasses
import logging
import math

import numpy as np

from onnxcomp.errors import OnnxcompError

logger = logging.getLogger(__name__)

# ONNX TensorProto data type codes, kept here so this module needs no onnx import.
_ONNX_UINT8, _ONNX_INT8, _ONNX_UINT4, _ONNX_INT4 = 2, 3, 21, 22


@dataclasses.dataclass(frozen=True)
class QuantType:
    """An integer quantization type: its bit width, signedness and the numpy dtype that stores it.

    4-bit values are stored one per int8 / uint8 element (unpacked); packing happens only for
    MatMulNBits.
    """

    name: str
    bits: int
    signed: bool
    onnx_type: int

    @property
    def qmin(self) -> int:
        return -(1 << (self.bits - 1)) if self.signed else 0

    @property
    def qmax(self) -> int:
        return (1 << (self.bits - 1)) - 1 if self.signed else (1 << self.bits) - 1

    @property
    def storage(self) -> np.dtype:
        return np.dtype(np.int8 if self.signed else np.uint8)

    @property
    def symmetric_zero_point(self) -> int:
        """Zero point of a symmetric range: 0 if signed, else 2**(bits-1) (128, 8)."""
        return 0 if self.signed else 1 << (self.bits - 1)

    @property
    def symmetric_half_range(self) -> int:
        """Levels on each side of the symmetric zero point: 127 for 8 bits, 7 for 4 bits."""
        return (1 << (self.bits - 1)) - 1


INT8 = QuantType("int8", 8, True, _ONNX_INT8)
UINT8 = QuantType("uint8", 8, False, _ONNX_UINT8)
INT4 = QuantType("int4", 4, True, _ONNX_INT4)
UINT4 = QuantType("uint4", 4, False, _ONNX_UINT4)
_BY_NAME = {t.name: t for t in (INT8, UINT8, INT4, UINT4)}

QuantTypeLike = QuantType | str | type | np.dtype


def quant_type(dtype: QuantTypeLike) -> QuantType:
    """Normalise ``np.int8``, ``np.uint8``, ``"int4"``, ``"uint4"`` or a `QuantType`."""
    if isinstance(dtype, QuantType):
        return dtype
    if isinstance(dtype, str):
        name = dtype.lower()
    else:
        try:
            name = np.dtype(dtype).name
        except TypeError:
            name = str(dtype)
    if name not in _BY_NAME:
        raise OnnxcompError(
            f"unsupported quantization dtype {dtype!r}: expected one of {sorted(_BY_NAME)}"
        )
    return _BY_NAME[name]


@dataclasses.dataclass
class QuantParams:
    """Scale and zero point of a per-tensor (``axis=None``) or per-axis quantization.

    scale: float32, shape () per tensor or (C,) per axis; zero_point: same shape, stored in
        ``dtype.storage``.
    levels: the code interval [lo, hi] the grid was built for, when narrower than the type's
        (7-bit weights: [-64, 64]); `quantize` and GPTQ never leave it. None: the type's full range.
    """

    scale: np.ndarray
    zero_point: np.ndarray
    dtype: QuantType
    axis: int | None = None
    levels: tuple[int, int] | None = None

    @property
    def code_range(self) -> tuple[int, int]:
        """The codes this grid may produce: ``levels``, else the type's full range."""
        return self.levels if self.levels is not None else (self.dtype.qmin, self.dtype.qmax)

    def __post_init__(self) -> None:
        self.dtype = quant_type(self.dtype)
        self.scale = np.asarray(self.scale, dtype=np.float32)
        self.zero_point = np.asarray(self.zero_point).astype(self.dtype.storage)
        if self.scale.shape != self.zero_point.shape:
            raise OnnxcompError(
                f"scale shape {self.scale.shape} and zero point shape "
                f"{self.zero_point.shape} differ"
            )
        if self.axis is None and self.scale.ndim != 0:
            if self.scale.size != 1:
                raise OnnxcompError(
                    f"per-tensor params need scalar scale, got shape {self.scale.shape}"
                )
            self.scale = self.scale.reshape(())
            self.zero_point = self.zero_point.reshape(())
        if self.axis is not None and self.scale.ndim != 1:
            raise OnnxcompError(f"per-axis params need a 1-D scale, got shape {self.scale.shape}")
        if not (np.all(np.isfinite(self.scale)) and np.all(self.scale > 0)):
            raise OnnxcompError("quantization scale must be finite and > 0")


def _levels(qt: QuantType, symmetric: bool, reduce_range: bool) -> tuple[int, int]:
    """The integer interval [lo, hi] the calibrated real range is mapped onto."""
    if symmetric:
        half = qt.symmetric_half_range
        if reduce_range:
            half = (half + 1) // 2  # 7-bit weights: [-64, 64] as onnxruntime's reduced int8 range
        zp = qt.symmetric_zero_point
        return zp - half, zp + half
    if reduce_range:
        # One bit less on the same grid (onnxruntime: uint8 -> [0, 127], int8 -> [-64, 64]).
        return (qt.qmin // 2, -(qt.qmin // 2)) if qt.signed else (0, qt.qmax // 2)
    return qt.qmin, qt.qmax


def params_from_range(
    rmin: np.ndarray | float,
    rmax: np.ndarray | float,
    dtype: QuantTypeLike = UINT8,
    symmetric: bool = False,
    *,
    axis: int | None = None,
    reduce_range: bool = False,
) -> QuantParams:
    """Scale and zero point mapping the real range [rmin, rmax] (widened to contain 0) to ``dtype``.

    Works elementwise: pass arrays of per-channel minima/maxima together with ``axis``.

    Symmetric: ``scale = max(|rmin|, |rmax|) / (2**(bits-1) - 1)`` and the zero point is 0 (signed)
        or ``2**(bits-1)`` (unsigned). For int8 that is /127, not /127.5: the real range maps onto
        [-127, 127], so the grid is exactly symmetric around 0 with zero point 0 (what onnxruntime's
        own symmetric int8 range uses, and what its per-channel QLinearConv / QGemm kernels require
        of weights) and -128 is never produced by in-range values. Note this is *not* the fix for
        the u8s8 saturation that onnxruntime's ``reduce_range`` docs describe: on AVX2 / non-VNNI
        AVX-512 the ``vpmaddubsw`` pair sum 2 * 255 * 127 still overflows int16; only 7-bit weights
        avoid it (``reduce_range=True``, [-64, 64]). VNNI (``vpdpbusd``) accumulates in int32 and
        needs neither.

    Asymmetric: ``scale = (rmax - rmin) / (qmax - qmin)``,
        ``zero_point = round(qmin - rmin / scale)`` (onnxruntime's ``compute_scale_zp``).

    A zero or subnormal range gives scale 1.0 (never 0) and zero point 0, or the symmetric zero
    point when symmetric.

    Raises:
        OnnxcompError: when a bound is NaN or infinite, or rmin > rmax.
    """
    qt = quant_type(dtype)
    scale32, zero_point = scale_zero_point(rmin, rmax, qt, symmetric, reduce_range)
    if scale32.ndim > 1 or (scale32.ndim == 1 and axis is None and scale32.size != 1):
        raise OnnxcompError(
            f"per-channel ranges of shape {scale32.shape} need a 1-D range and an axis"
        )
    levels = _levels(qt, symmetric, reduce_range) if reduce_range else None
    return QuantParams(scale32, zero_point, qt, axis if scale32.ndim else None, levels)


def scale_zero_point(
    rmin: np.ndarray | float,
    rmax: np.ndarray | float,
    qt: QuantType,
    symmetric: bool,
    reduce_range: bool,
) -> tuple[np.ndarray, np.ndarray]:
    """Elementwise float32 scale and zero point (in ``qt.storage``) for any shape of ranges."""
    rmin64 = np.asarray(rmin, dtype=np.float64)
    rmax64 = np.asarray(rmax, dtype=np.float64)
    if not (np.all(np.isfinite(rmin64)) and np.all(np.isfinite(rmax64))):
        raise OnnxcompError("quantization range must be finite (got NaN or inf in rmin/rmax)")
    if np.any(rmin64 > rmax64):
        raise OnnxcompError("quantization range has rmin > rmax")
    rmin64, rmax64 = np.broadcast_arrays(np.minimum(rmin64, 0.0), np.maximum(rmax64, 0.0))
    lo, hi = _levels(qt, symmetric, reduce_range)
    if symmetric:
        absmax = np.maximum(np.abs(rmin64), rmax64)
        scale = absmax / float(hi - qt.symmetric_zero_point)
        zero_point = np.full(scale.shape, qt.symmetric_zero_point, dtype=np.float64)
    else:
        scale = (rmax64 - rmin64) / float(hi - lo)
        with np.errstate(divide="ignore", invalid="ignore"):
            zero_point = np.clip(np.round(lo - rmin64 / scale), lo, hi)
    degenerate = scale < np.finfo(np.float32).tiny
    if np.any(degenerate):
        logger.debug(
            "%d zero-width quantization range(s): using scale 1.0",
            int(np.count_nonzero(degenerate)),
        )
    scale = np.where(degenerate, 1.0, scale)
    # Keep symmetric zero points uniform across channels (per-channel QLinearConv requires it).
    zero_point = np.where(degenerate, qt.symmetric_zero_point if symmetric else 0.0, zero_point)
    scale32 = scale.astype(np.float32)
    if not np.all(np.isfinite(scale32)):
        raise OnnxcompError("quantization range too wide: the scale overflows float32")
    return scale32, zero_point.astype(qt.storage)


def weight_params(
    w: np.ndarray,
    axis: int | None = 0,
    dtype: QuantTypeLike | None = None,
    per_channel: bool = True,
    bits: int = 8,
    *,
    symmetric: bool = True,
    reduce_range: bool = False,
) -> QuantParams:
    """Weight quantization parameters (symmetric by default), per output channel or per tensor.

    Args:
        w: the float weight, any shape: Conv (M, C/g, kh, kw) with axis 0, MatMul [K, N] with
            axis 1.
        dtype: the quantized type; by default int8 for ``bits=8`` and int4 for ``bits=4``.
    """
    if dtype is None:
        if bits not in (4, 8):
            raise OnnxcompError(f"weight bits must be 4 or 8, got {bits}")
        dtype = INT8 if bits == 8 else INT4
    qt = quant_type(dtype)
    if qt.bits != bits and bits != 8:
        raise OnnxcompError(f"bits={bits} contradicts dtype {qt.name}")
    w = np.asarray(w, dtype=np.float32)
    if not np.all(np.isfinite(w)):
        raise OnnxcompError("weight contains NaN or inf")
    if not per_channel or axis is None or w.ndim == 0:
        return params_from_range(
            w.min(initial=0.0), w.max(initial=0.0), qt, symmetric, reduce_range=reduce_range
        )
    axis = _normalise_axis(axis, w.ndim)
    other = tuple(i for i in range(w.ndim) if i != axis)
    rmin = w.min(axis=other, initial=0.0)  # (C,)
    rmax = w.max(axis=other, initial=0.0)  # (C,)
    return params_from_range(rmin, rmax, qt, symmetric, axis=axis, reduce_range=reduce_range)


def _normalise_axis(axis: int, ndim: int) -> int:
    if not -ndim <= axis < ndim:
        raise OnnxcompError(f"axis {axis} out of range for a tensor of rank {ndim}")
    return axis % ndim


def _broadcast(params: QuantParams, ndim: int) -> tuple[np.ndarray, np.ndarray]:
    """Scale and zero point reshaped to broadcast against a tensor of rank ``ndim``."""
    if params.axis is None:
        return params.scale, params.zero_point
    axis = _normalise_axis(params.axis, ndim)
    shape = [1] * ndim
    shape[axis] = params.scale.shape[0]
    return params.scale.reshape(shape), params.zero_point.reshape(shape)


def quantize(x: np.ndarray, params: QuantParams) -> np.ndarray:
    """ONNX QuantizeLinear as onnxruntime computes it: ``saturate(rint(x / scale) + zero_point)``.

    float32 division, round half to even, saturation to the full range of the type (or to the
    grid's narrower ``levels``, which only weights use: they are stored as codes). NaN maps to
    the zero point.
    """
    x = np.asarray(x, dtype=np.float32)
    scale, zp = _broadcast(params, x.ndim)
    if (
        params.axis is not None
        and x.shape[_normalise_axis(params.axis, x.ndim)] != params.scale.shape[0]
    ):
        raise OnnxcompError(
            f"tensor of shape {x.shape} does not match {params.scale.shape[0]} channels "
            f"on axis {params.axis}"
        )
    qt = params.dtype
    lo, hi = params.code_range
    with np.errstate(invalid="ignore", over="ignore"):
        r = np.rint(x / scale)  # float32, like MLAS
        # Clamp before adding the zero point, as MLAS does, so huge values cannot overflow the add.
        r = np.clip(r, np.float32(lo) - zp, np.float32(hi) - zp)
    r = np.where(np.isnan(r), 0.0, r)
    return (r.astype(np.int32) + zp.astype(np.int32)).astype(qt.storage)


def dequantize(q: np.ndarray, params: QuantParams) -> np.ndarray:
    """ONNX DequantizeLinear: ``float32(int32(q) - zero_point) * scale``."""
    q = np.asarray(q)
    scale, zp = _broadcast(params, q.ndim)
    return (q.astype(np.int32) - zp.astype(np.int32)).astype(np.float32) * scale


def sqnr_db(reference: np.ndarray, approx: np.ndarray) -> float:
    """Signal-to-quantization-noise ratio in dB: ``10 log10(sum(ref^2) / sum((ref - approx)^2))``

    Summed in float64 over chunks of the flattened arrays, so a large weight needs no float64 copy.
    """
    ref = np.ravel(np.asarray(reference))
    other = np.ravel(np.broadcast_to(np.asarray(approx), np.shape(reference)))
    signal = noise = 0.0
    for start in range(0, max(ref.size, 1), _CHUNK):
        r = ref[start : start + _CHUNK].astype(np.float64)
        err = r - other[start : start + _CHUNK].astype(np.float64)
        signal += float(np.dot(r, r))
        noise += float(np.dot(err, err))
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


def nonfinite_reason(w: np.ndarray) -> str | None:
    """Why ``w`` cannot be quantized because of NaN or inf values (no code stands for them), or
    None when every value is finite. Counted in chunks: a large weight needs no boolean copy."""
    flat = np.ravel(np.asarray(w))
    if not np.issubdtype(flat.dtype, np.floating):
        return None
    nan = inf = 0
    for start in range(0, flat.size, _CHUNK):
        part = flat[start : start + _CHUNK]
        bad = ~np.isfinite(part)
        if bad.any():
            n_nan = int(np.count_nonzero(np.isnan(part)))
            nan += n_nan
            inf += int(np.count_nonzero(bad)) - n_nan
    if not nan and not inf:
        return None
    found = " and ".join(
        f"{count} {what}" for count, what in ((inf, "inf"), (nan, "NaN")) if count
    )
    return f"holds {found} of {flat.size} values, which no integer code can stand for: kept float"


# Elements per chunk of the whole-weight numerics (sqnr_db, block-wise (de)quantization): 16 MB of
# float32, so that temporaries stay small beside a large weight.
_CHUNK = 1 << 22


# --- block-wise weight-only quantization in MatMulNBits layout
# ---------------------------------------------------


@dataclasses.dataclass
class BlockwiseWeight:
    """A [K, N] MatMul weight quantized block-wise along K, in ``com.microsoft.MatMulNBits`` layout.

    The node attributes are ``K``, ``N``, ``bits``, ``block_size``; its inputs ``B``, ``scales`` and
    (when not None) ``zero_points``.
    """

    packed: np.ndarray  # B: uint8 [N, n_blocks, blob_size]
    scales: np.ndarray  # float32 [N * n_blocks]
    zero_points: np.ndarray | None  # uint8 [N * ceil(n_blocks * bits / 8)], None means 2**(bits-1)
    K: int  # noqa: N815 (the op's attribute name)
    N: int  # noqa: N815
    bits: int
    block_size: int

    @property
    def n_blocks(self) -> int:
        return -(-self.K // self.block_size)


def _check_blockwise(block_size: int, bits: int) -> None:
    if bits not in (2, 4, 8):
        raise OnnxcompError(f"MatMulNBits bits must be 2, 4 or 8, got {bits}")
    if block_size < 16 or block_size & (block_size - 1):
        raise OnnxcompError(
            f"MatMulNBits block_size must be a power of two >= 16, got {block_size}"
        )


def pack_bits(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack unsigned codes (< 2**bits) along the last axis, lowest bits first, padding with 0."""
    per_byte = 8 // bits
    codes = np.asarray(codes, dtype=np.uint8)
    pad = (-codes.shape[-1]) % per_byte
    if pad:
        codes = np.concatenate([codes, np.zeros((*codes.shape[:-1], pad), np.uint8)], axis=-1)
    grouped = codes.reshape(*codes.shape[:-1], -1, per_byte)
    out = np.zeros(grouped.shape[:-1], dtype=np.uint8)
    for j in range(per_byte):
        out |= (grouped[..., j] << (bits * j)).astype(np.uint8)
    return out


def unpack_bits(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Inverse of `pack_bits`: the first ``count`` codes along the last axis."""
    per_byte = 8 // bits
    mask = (1 << bits) - 1
    packed = np.asarray(packed, dtype=np.uint8)
    codes = np.stack([(packed >> (bits * j)) & mask for j in range(per_byte)], axis=-1)
    return codes.reshape(*packed.shape[:-1], -1)[..., :count]


def pack_matmulnbits(
    codes: np.ndarray,
    scales: np.ndarray,
    zero_points: np.ndarray | None,
    K: int,
    bits: int,
    block_size: int,
) -> BlockwiseWeight:
    """Pack codes and per-block scales / zero points into MatMulNBits layout.

    Args:
        codes: unsigned codes, (N, n_blocks * block_size); GPTQ results go through here too.
        scales, zero_points: (N, n_blocks); zero_points None for the op's default 2**(bits-1).
    """
    _check_blockwise(block_size, bits)
    n = codes.shape[0]
    n_blocks = -(-K // block_size)
    codes = np.asarray(codes, np.uint8)  # (N, n_blocks * block_size)
    if codes.shape != (n, n_blocks * block_size):
        raise OnnxcompError(f"codes shape {codes.shape} != {(n, n_blocks * block_size)}")
    packed = pack_bits(codes.reshape(n, n_blocks, block_size), bits)  # (N, n_blocks, blob_size)
    zp = (
        None
        if zero_points is None
        else pack_bits(np.asarray(zero_points, np.uint8), bits).reshape(-1)
    )
    return BlockwiseWeight(
        packed, np.asarray(scales, np.float32).reshape(-1), zp, K, n, bits, block_size
    )


def quantize_blockwise(
    w: np.ndarray, block_size: int = 32, bits: int = 4, symmetric: bool = True
) -> BlockwiseWeight:
    """Quantize a MatMul weight ``w: [K, N]`` in blocks along K for ``com.microsoft.MatMulNBits``.

    Each (column n, block b) has its own scale. Symmetric: codes ``zp +- (2**(bits-1) - 1)`` around
    ``zp = 2**(bits-1)`` with ``scale = absmax / (2**(bits-1) - 1)``, and no zero-point tensor (the
    op's default applies). Asymmetric: ``scale = (max - min) / (2**bits - 1)`` over a range widened
    to contain 0, packed zero points. K is padded with zeros up to a whole number of blocks.
    Round-to-nearest; see `onnxcomp.quantize.gptq` for error-correcting rounding.
    """
    _check_blockwise(block_size, bits)
    w = np.asarray(w)
    if w.ndim != 2:
        raise OnnxcompError(
            f"block-wise quantization needs a 2-D [K, N] weight, got shape {w.shape}"
        )
    k, n = w.shape
    # Columns are independent: a large weight is done a few columns at a time (the results are
    # N-major, so the parts line up end to end).
    step = max(1, _CHUNK // max(k, 1))
    parts = [
        _quantize_columns(w[:, a : a + step], block_size, bits, symmetric)
        for a in range(0, n, step)
    ]
    if len(parts) == 1:
        return parts[0]
    zero_points = None if symmetric else np.concatenate([p.zero_points for p in parts])
    return BlockwiseWeight(
        np.concatenate([p.packed for p in parts]),
        np.concatenate([p.scales for p in parts]),
        zero_points,
        k,
        n,
        bits,
        block_size,
    )


def _quantize_columns(
    w: np.ndarray, block_size: int, bits: int, symmetric: bool
) -> BlockwiseWeight:
    w = np.asarray(w, dtype=np.float32)
    if not np.all(np.isfinite(w)):
        raise OnnxcompError("weight contains NaN or inf")
    k, n = w.shape
    n_blocks = -(-k // block_size)
    wt = np.zeros((n, n_blocks * block_size), dtype=np.float32)  # (N, K_padded)
    wt[:, :k] = w.T
    blocks = wt.reshape(n, n_blocks, block_size)
    qt = QuantType(f"uint{bits}", bits, False, 0)
    # (N, n_blocks)
    scale2, zp2 = scale_zero_point(blocks.min(axis=2), blocks.max(axis=2), qt, symmetric, False)
    scale = scale2[:, :, None]
    zp = zp2[:, :, None]
    r = np.clip(np.rint(blocks / scale), -zp.astype(np.float32), np.float32(qt.qmax) - zp)
    codes = (r.astype(np.int32) + zp).astype(np.uint8)  # (N, n_blocks, block_size)
    return pack_matmulnbits(
        codes.reshape(n, -1),
        scale2,
        None if symmetric else zp2,
        k,
        bits,
        block_size,
    )


def dequantize_blockwise(q: BlockwiseWeight) -> np.ndarray:
    """The float32 ``[K, N]`` weight a MatMulNBits node uses: ``(code - zero_point) * scale``."""
    n, nb, bs = q.N, q.n_blocks, q.block_size
    out = np.empty((q.K, n), dtype=np.float32)
    zp_all = None if q.zero_points is None else q.zero_points.reshape(n, -1)
    scales = q.scales.reshape(n, nb, 1)
    step = max(1, _CHUNK // max(nb * bs, 1))
    for a in range(0, n, step):
        b = min(a + step, n)
        codes = unpack_bits(q.packed[a:b], q.bits, bs).astype(np.int32)  # (n', n_blocks, block)
        if zp_all is None:
            zp = np.full((b - a, nb), 1 << (q.bits - 1), dtype=np.int32)
        else:
            zp = unpack_bits(zp_all[a:b], q.bits, nb).astype(np.int32)  # (n', n_blocks)
        wt = (codes - zp[:, :, None]).astype(np.float32) * scales[a:b]  # (n', n_blocks, block)
        out[:, a:b] = wt.reshape(b - a, -1)[:, : q.K].T
    return out
