"""Quantization numerics on plain arrays, checked against onnxruntime's kernels where one exists."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.parser
import onnxruntime as ort
import pytest

from onnxcomp import layerwise
from onnxcomp.errors import OnnxcompError
from onnxcomp.quantize import gptq, observers, schemes
from onnxcomp.quantize.schemes import INT8, UINT8


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )


def _qdq_model(elem: str, axis: int | None) -> onnx.ModelProto:
    attr = "" if axis is None else f"<axis = {axis}>"
    sdim = "" if axis is None else "[C]"
    return onnx.parser.parse_model(
        f"""
        <ir_version: 8, opset_import: ["" : 13]>
        qdq (float[A, B, D] x, float{sdim} s, {elem}{sdim} z)
            => ({elem}[A, B, D] q, float[A, B, D] y) {{
            q = QuantizeLinear {attr} (x, s, z)
            y = DequantizeLinear {attr} (q, s, z)
        }}
        """
    )


# --- schemes


@pytest.mark.parametrize("qtype, elem", [(UINT8, "uint8"), (INT8, "int8")])
@pytest.mark.parametrize("axis", [None, 0, 1])
def test_quantize_dequantize_match_onnxruntime_bit_exactly(qtype, elem, axis):
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((6, 5, 7)) * 3).astype(np.float32)  # x: (A, B, D)
    symmetric = qtype is INT8
    if axis is None:
        # A range narrower than the data, so saturation is exercised too.
        params = schemes.params_from_range(x.min() * 0.8, x.max() * 0.6, qtype, symmetric)
    else:
        other = tuple(i for i in range(3) if i != axis)
        params = schemes.params_from_range(
            x.min(axis=other) * 0.7, x.max(axis=other) * 0.7, qtype, symmetric, axis=axis
        )
    # Exact ties k + 0.5 steps away from zero: onnxruntime rounds half to even.
    scale0 = float(params.scale.reshape(-1)[0])
    x[0, 0, :] = (np.arange(7, dtype=np.float32) - 3.5) * np.float32(scale0)

    q_ort, y_ort = _session(_qdq_model(elem, axis)).run(
        None, {"x": x, "s": params.scale, "z": params.zero_point}
    )
    q = schemes.quantize(x, params)
    assert q.dtype == q_ort.dtype
    np.testing.assert_array_equal(q, q_ort)
    np.testing.assert_array_equal(schemes.dequantize(q, params), y_ort)
    assert q.min() == qtype.qmin or q.max() == qtype.qmax  # some values saturated


def test_params_from_range_rules():
    p = schemes.params_from_range(-2.0, 1.0, INT8, symmetric=True)
    assert p.zero_point == 0 and p.scale == np.float32(2.0 / 127)
    assert schemes.quantize(np.float32([-2.0, 2.0]), p).tolist() == [-127, 127]

    p = schemes.params_from_range(1.0, 3.0, UINT8)  # range widened to contain 0
    assert p.zero_point == 0 and p.scale == np.float32(3.0 / 255)
    p = schemes.params_from_range(-1.0, 3.0, UINT8)
    assert schemes.dequantize(schemes.quantize(np.float32(0.0), p), p) == 0.0  # 0 is exact

    p = schemes.params_from_range(0.0, 0.0, UINT8)  # zero range: finite positive scale
    assert p.scale == 1.0 and p.zero_point == 0
    # A dead channel keeps the symmetric zero point of the others.
    p = schemes.params_from_range(np.array([0.0, -1.0]), np.array([0.0, 1.0]), UINT8, True, axis=0)
    assert p.zero_point.tolist() == [128, 128] and p.scale[0] == 1.0

    p = schemes.params_from_range(
        np.array([-1.0, 0.0, -4.0]), np.array([1.0, 0.0, 2.0]), INT8, True, axis=0
    )
    np.testing.assert_allclose(p.scale, np.float32([1 / 127, 1.0, 4 / 127]))
    assert p.axis == 0 and p.zero_point.dtype == np.int8

    p = schemes.params_from_range(-1.0, 1.0, INT8, True, reduce_range=True)
    assert p.scale == np.float32(1 / 64)

    with pytest.raises(OnnxcompError, match="finite"):
        schemes.params_from_range(np.nan, 1.0)
    with pytest.raises(OnnxcompError, match="dtype"):
        schemes.quant_type("int3")


def test_weight_params_per_channel():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((8, 3, 3, 3)).astype(np.float32)  # Conv weight (M, C, kh, kw)
    p = schemes.weight_params(w, axis=0)
    assert p.axis == 0 and p.scale.shape == (8,) and p.dtype is INT8
    np.testing.assert_allclose(p.scale, np.abs(w).reshape(8, -1).max(axis=1) / 127, rtol=1e-6)
    q = schemes.quantize(w, p)
    assert np.abs(q.astype(int)).max() == 127  # [-127, 127], -128 unused
    err = np.abs(schemes.dequantize(q, p) - w)
    assert np.all(err <= p.scale.reshape(8, 1, 1, 1) / 2 * (1 + 1e-6))
    assert schemes.sqnr_db(w, schemes.dequantize(q, p)) > 35

    wt = schemes.weight_params(w.reshape(8, -1).T, axis=1, bits=4)  # MatMul [K, N], per N
    assert wt.dtype is schemes.INT4 and wt.scale.shape == (8,)
    assert schemes.weight_params(w, per_channel=False).scale.shape == ()


def _matmulnbits_model(q: schemes.BlockwiseWeight, m: int) -> onnx.ModelProto:
    zp_in = ", zp" if q.zero_points is not None else ""
    model = onnx.parser.parse_model(
        f"""
        <ir_version: 8, opset_import: ["" : 17, "com.microsoft" : 1]>
        nbits (float[{m}, {q.K}] a) => (float[{m}, {q.N}] y) {{
            y = com.microsoft.MatMulNBits
                <K = {q.K}, N = {q.N}, bits = {q.bits}, block_size = {q.block_size}>
                (a, B, scales{zp_in})
        }}
        """
    )
    tensors = {"B": q.packed, "scales": q.scales, "zp": q.zero_points}
    for name, value in tensors.items():
        if value is not None:
            model.graph.initializer.append(onnx.numpy_helper.from_array(value, name))
    return model


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits", [4, 8])
def test_blockwise_matches_matmulnbits(symmetric, bits):
    rng = np.random.default_rng(2)
    k, n, m, block = 200, 24, 5, 32  # K not a multiple of the block: padded last block
    w = rng.standard_normal((k, n)).astype(np.float32)  # MatMul weight [K, N]
    a = rng.standard_normal((m, k)).astype(np.float32)
    q = schemes.quantize_blockwise(w, block, bits, symmetric)
    n_blocks = -(-k // block)
    assert q.packed.shape == (n, n_blocks, block * bits // 8) and q.packed.dtype == np.uint8
    assert q.scales.shape == (n * n_blocks,) and q.scales.dtype == np.float32
    if symmetric:
        assert q.zero_points is None
    else:
        assert q.zero_points.shape == (n * -(-n_blocks * bits // 8),)

    w_hat = schemes.dequantize_blockwise(q)  # [K, N]
    assert w_hat.shape == w.shape
    # Round trip: each weight within half a step of its block's scale (all weights are in range).
    step = np.repeat(q.scales.reshape(n, n_blocks), block, axis=1)[:, :k].T  # [K, N]
    assert np.all(np.abs(w_hat - w) <= step / 2 * (1 + 1e-5))
    assert schemes.sqnr_db(w, w_hat) > (18 if bits == 4 else 42)

    y = _session(_matmulnbits_model(q, m)).run(None, {"a": a})[0]
    np.testing.assert_allclose(y, a @ w_hat, atol=1e-4, rtol=1e-4)


def test_pack_bits_low_nibble_first():
    packed = schemes.pack_bits(np.array([[1, 2, 3]], np.uint8), 4)
    assert packed.tolist() == [[0x21, 0x03]]
    np.testing.assert_array_equal(schemes.unpack_bits(packed, 4, 3), [[1, 2, 3]])


# --- observers


def _stream(kind: str, n_batches: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    for i in range(n_batches):
        if kind == "laplace":
            yield rng.laplace(size=(16, 64)).astype(np.float32)
        elif kind == "heavy":
            yield rng.standard_t(df=2, size=(16, 64)).astype(np.float32)
        else:  # "growing": every batch a bit wider, so the histogram range keeps growing
            yield (rng.standard_normal((16, 64)) * (1 + i / 10)).astype(np.float32)


def _quant_mse(x: np.ndarray, lo: float, hi: float, qtype=UINT8, symmetric=False) -> float:
    p = schemes.params_from_range(lo, hi, qtype, symmetric)
    return float(np.mean((schemes.dequantize(schemes.quantize(x, p), p) - x) ** 2))


@pytest.mark.parametrize(
    "method, options",
    [
        ("minmax", {}),
        ("minmax", {"averaging_constant": 0.01}),
        ("minmax", {"axis": 1}),
        ("percentile", {"percentile": 99.9}),
        ("entropy", {}),
        ("mse", {"dtype": "int8", "symmetric": True}),
    ],
)
def test_observer_memory_is_constant(method, options):
    sizes = []
    for n_batches in (100, 1000):
        obs = observers.make_observer(method, **options)
        for batch in _stream("growing", n_batches):
            obs.update(batch)
        rmin, rmax = obs.compute()
        assert np.all(np.asarray(rmin) < 0) and np.all(np.asarray(rmax) > 0)
        if isinstance(obs, observers.MinMaxObserver):
            sizes.append(obs.nbytes)
        else:
            assert obs.histogram.counts.shape == (2048,)
            assert (
                obs.histogram.total == obs.count == n_batches * 16 * 64
            )  # re-binning keeps every count
            sizes.append(obs.nbytes)
    assert sizes[0] == sizes[1] > 0


def test_histogram_growth_keeps_quantiles():
    obs = observers.PercentileObserver(percentile=99.0)
    data = list(_stream("growing", 200, seed=3))
    for batch in data:
        obs.update(batch)
    x = np.concatenate([b.ravel() for b in data])
    lo, hi = obs.compute()
    width = obs.histogram.width
    assert abs(lo - np.percentile(x, 0.5)) < 2 * width
    assert abs(hi - np.percentile(x, 99.5)) < 2 * width


def test_histogram_survives_zeros_first_and_huge_jumps():
    rng = np.random.default_rng(11)
    for method in ("percentile", "entropy", "mse"):
        obs = observers.make_observer(method)
        obs.update(np.zeros(100, np.float32))  # e.g. a ReLU output that is all zero at first
        obs.update(rng.standard_normal(1000).astype(np.float32))
        obs.update(np.float32([1e30, -1e25]))  # an absurd outlier: one coarse histogram, no hang
        assert obs.histogram.total == obs.count == 1102
        lo, hi = obs.compute()
        assert np.isfinite(lo) and np.isfinite(hi) and lo <= 0 <= hi


def test_minmax_per_channel_and_moving_average():
    rng = np.random.default_rng(4)
    batches = [rng.standard_normal((8, 3, 5)).astype(np.float32) for _ in range(5)]
    obs = observers.MinMaxObserver(axis=1)
    for b in batches:
        obs.update(b)
    lo, hi = obs.compute()
    x = np.concatenate(batches)
    np.testing.assert_allclose(lo, x.min(axis=(0, 2)))
    np.testing.assert_allclose(hi, x.max(axis=(0, 2)))

    ema = observers.MinMaxObserver(averaging_constant=0.5)
    ema.update(np.float32([-1.0, 1.0]))
    ema.update(np.float32([-3.0, 3.0]))
    assert ema.compute() == (-2.0, 2.0)
    with pytest.raises(OnnxcompError, match="channels"):
        obs.update(np.zeros((2, 4, 5), np.float32))


def test_percentile_tighter_than_minmax_on_heavy_tails():
    mm, pc = (
        observers.make_observer("minmax"),
        observers.make_observer("percentile", percentile=99.9),
    )
    for batch in _stream("heavy", 200):
        mm.update(batch)
        pc.update(batch)
    (mlo, mhi), (plo, phi) = mm.compute(), pc.compute()
    assert mlo < plo < 0 < phi < mhi
    assert phi < 0.5 * mhi


@pytest.mark.parametrize(
    "method, options, qtype, symmetric",
    [
        ("entropy", {"symmetric": True}, INT8, True),
        ("mse", {"dtype": "int8", "symmetric": True}, INT8, True),
        ("mse", {"dtype": "uint8"}, UINT8, False),
        ("percentile", {"percentile": 99.99, "symmetric": True}, INT8, True),
    ],
)
def test_clipping_observers_beat_minmax_on_laplace(method, options, qtype, symmetric):
    data = list(_stream("laplace", 300, seed=5))
    x = np.concatenate([b.ravel() for b in data])
    mm, obs = observers.make_observer("minmax"), observers.make_observer(method, **options)
    for batch in data:
        mm.update(batch)
        obs.update(batch)
    mlo, mhi = mm.compute()
    lo, hi = obs.compute()
    assert mlo < lo < 0 < hi < mhi  # the outliers are clipped
    if symmetric:
        m_abs = max(-mlo, mhi)
        assert _quant_mse(x, lo, hi, qtype, True) < _quant_mse(x, -m_abs, m_abs, qtype, True)
    else:
        assert _quant_mse(x, lo, hi, qtype) < _quant_mse(x, mlo, mhi, qtype)


def test_mse_observer_near_best_clip():
    data = list(_stream("laplace", 200, seed=6))
    x = np.concatenate([b.ravel() for b in data])
    obs = observers.MSEObserver(dtype="int4", symmetric=True)  # 4 bits: clipping matters a lot
    for batch in data:
        obs.update(batch)
    _, t = obs.compute()
    grid = np.linspace(0.5, np.abs(x).max(), 400)
    errors = [_quant_mse(x, -g, g, schemes.INT4, True) for g in grid]
    assert _quant_mse(x, -t, t, schemes.INT4, True) < 1.05 * min(errors)


def test_observers_drop_non_finite_values():
    for method in ("minmax", "percentile", "entropy", "mse"):
        obs = observers.make_observer(method)
        obs.update(np.float32([1.0, np.nan, -2.0, np.inf, -np.inf, 0.5]))
        assert obs.dropped == 3 and obs.count == 3
        lo, hi = obs.compute()
        assert np.isfinite(lo) and np.isfinite(hi)
    empty = observers.make_observer("percentile")
    empty.update(np.float32([np.nan]))
    with pytest.raises(OnnxcompError, match="no finite values"):
        empty.compute()


def test_make_observer_rejects_bad_method_and_option():
    with pytest.raises(OnnxcompError, match="'kl'"):
        observers.make_observer("kl")
    with pytest.raises(OnnxcompError, match="'num_bins'.*'entropy'"):
        observers.make_observer("entropy", num_bins=10)
    with pytest.raises(OnnxcompError, match="percentile"):
        observers.make_observer("percentile", percentile=120)


# --- GPTQ and bias correction


def _correlated_inputs(rng: np.random.Generator, samples: int, features: int) -> np.ndarray:
    mix = np.eye(features) + 0.4 * rng.standard_normal((features, features))
    # x: (samples, in), correlated, nonzero mean
    return rng.standard_normal((samples, features)) @ mix + 0.3


def test_hessian_accumulator_streams():
    rng = np.random.default_rng(7)
    x = _correlated_inputs(rng, 1000, 32)
    acc = layerwise.HessianAccumulator()
    for chunk in np.array_split(x, 13):
        acc.update(chunk)
    nbytes = acc.nbytes
    np.testing.assert_allclose(acc.H, 2 * x.T @ x / len(x), rtol=1e-10)
    np.testing.assert_allclose(acc.mean, x.mean(axis=0), rtol=1e-10)
    acc.update(x[:10].reshape(2, 5, 32))  # (batch, tokens, in) is fine
    assert acc.nbytes == nbytes and acc.n_samples == 1010


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"act_order": True},
        {"dtype": "uint4", "symmetric": False, "group_size": 32},
        {"dtype": "uint4", "symmetric": False, "group_size": 32, "act_order": True},
    ],
)
def test_gptq_beats_round_to_nearest(options):
    rng = np.random.default_rng(8)
    out_f, in_f = 48, 128
    x = _correlated_inputs(rng, 2000, in_f)  # (samples, in)
    w = rng.standard_normal((out_f, in_f)).astype(np.float32)  # (out, in)
    acc = layerwise.HessianAccumulator()
    acc.update(x)
    result = gptq.gptq_quantize(w, acc.H, block_size=64, **options)

    if "group_size" in options:  # RTN with the same grid: MatMulNBits blocks along in_features
        rtn = schemes.dequantize_blockwise(
            schemes.quantize_blockwise(w.T, 32, 4, symmetric=False)
        ).T
        scale = np.repeat(result.scale, 32, axis=1)
        zp = np.repeat(result.zero_point, 32, axis=1).astype(np.int32)
        codes = result.quantized.astype(np.int32)
        assert codes.min() >= 0 and codes.max() <= 15
    else:
        params = schemes.weight_params(w, axis=0)
        rtn = schemes.dequantize(schemes.quantize(w, params), params)
        scale, zp = result.scale[:, None], result.zero_point[:, None].astype(np.int32)
        codes = result.quantized.astype(np.int32)
    # The float weight is exactly what DequantizeLinear / MatMulNBits make of the integer codes.
    np.testing.assert_array_equal((codes - zp).astype(np.float32) * scale, result.dequantized)

    def output_error(wq: np.ndarray) -> float:
        return float(np.linalg.norm(w @ x.T - wq @ x.T))

    assert output_error(result.dequantized) < 0.85 * output_error(rtn)
    assert layerwise.reconstruction_error(w, result.dequantized, acc.H) == pytest.approx(
        output_error(result.dequantized) ** 2 / len(x), rel=1e-6
    )


def test_gptq_lazy_blocks_do_not_change_result():
    rng = np.random.default_rng(9)
    x = _correlated_inputs(rng, 500, 96)
    w = rng.standard_normal((16, 96))
    h = 2 * x.T @ x / len(x)
    a = gptq.gptq_quantize(w, h, block_size=128)
    b = gptq.gptq_quantize(w, h, block_size=17)
    np.testing.assert_array_equal(a.quantized, b.quantized)


def test_bias_correction_removes_mean_shift():
    rng = np.random.default_rng(10)
    x = _correlated_inputs(rng, 4000, 64) + 1.0  # strongly nonzero mean input
    w = rng.standard_normal((32, 64)).astype(np.float32)
    params = schemes.weight_params(w, axis=0, bits=4)
    wq = schemes.dequantize(schemes.quantize(w, params), params)
    acc = layerwise.HessianAccumulator()
    acc.update(x)
    delta = layerwise.bias_correction(w, wq, acc.mean)  # (out,)
    shift_before = (x @ w.T).mean(axis=0) - (x @ wq.T).mean(axis=0)
    shift_after = (x @ w.T).mean(axis=0) - ((x @ wq.T) + delta).mean(axis=0)
    assert np.abs(shift_before).max() > 0.1
    assert np.abs(shift_after).max() < 1e-4 * np.abs(shift_before).max() + 1e-5


@pytest.mark.parametrize(("bits", "symmetric"), [(4, True), (4, False), (8, False)])
def test_blockwise_quantization_in_column_chunks_is_the_same(monkeypatch, bits, symmetric):
    # Large weights are (de)quantized a few columns at a time; the result must not depend on it.
    rng = np.random.default_rng(bits)
    w = rng.standard_normal((200, 47)).astype(np.float32)  # K not a whole number of blocks
    whole = schemes.quantize_blockwise(w, 32, bits, symmetric)
    monkeypatch.setattr(schemes, "_CHUNK", 1000)  # 5 columns of 200 per chunk
    parts = schemes.quantize_blockwise(w, 32, bits, symmetric)
    np.testing.assert_array_equal(parts.packed, whole.packed)
    np.testing.assert_array_equal(parts.scales, whole.scales)
    if not symmetric:
        np.testing.assert_array_equal(parts.zero_points, whole.zero_points)
    deq = schemes.dequantize_blockwise(parts)
    monkeypatch.setattr(schemes, "_CHUNK", 1 << 22)
    np.testing.assert_array_equal(deq, schemes.dequantize_blockwise(whole))
    assert schemes.sqnr_db(w, deq) == pytest.approx(
        10 * np.log10(np.sum(w.astype(np.float64) ** 2) / np.sum((w - deq).astype(np.float64) ** 2))
    )
