"""optimize, folding rules (optimize/rules/folding.py): BatchNorm, bias Adds and channel scales
folded into Conv/ConvTranspose/Gemm weights; both models run in onnxruntime."""

from __future__ import annotations

import numpy as np
from optimize_helpers import _optimize, _skips

from onnxcomp.optimize import op_histogram

# ---------------------------------------------------------------------------------------------
# Folding into Conv / ConvTranspose / Gemm


def _rand(shape, seed=0, positive=False):
    rng = np.random.default_rng(seed)
    a = rng.normal(0, 1, shape).astype(np.float32)
    return np.abs(a) + 0.5 if positive else a


def _graph_with(nodes, inputs, outputs, initializers, opset=17) -> str:
    """ONNX text for a graph whose initializers come from numpy arrays."""
    inits = []
    for name, array in initializers.items():
        dims = ", ".join(str(d) for d in array.shape)
        values = ", ".join(repr(float(v)) for v in array.reshape(-1))
        inits.append(f"float[{dims}] {name} = {{{values}}}")
    return (
        f'<ir_version: 8, opset_import: ["" : {opset}]>\n'
        f"g ({inputs}) => ({outputs}) <{', '.join(inits)}> {{\n{nodes}\n}}"
    )


BN = {
    "s": _rand((4,), 1, True),
    "b": _rand((4,), 2),
    "mu": _rand((4,), 3),
    "var": _rand((4,), 4, True),
}


def test_fold_batchnorm_into_conv():
    text = _graph_with(
        "c = Conv<pads = [1, 1, 1, 1]>(x, w)\n y = BatchNormalization(c, s, b, mu, var)",
        "float[1, 3, 6, 6] x",
        "float[1, 4, 6, 6] y",
        {"w": _rand((4, 3, 3, 3)), **BN},
    )
    result, report = _optimize(text)
    assert op_histogram(result) == {"Conv": 1}


def test_fold_batchnorm_into_grouped_conv_transpose():
    text = _graph_with(
        "c = ConvTranspose<group = 2, strides = [2, 2]>(x, w, cb)\n y = BatchNormalization(c, s, b, mu, var)",
        "float[1, 4, 3, 3] x",
        "float[1, 4, 6, 6] y",
        {"w": _rand((4, 2, 2, 2)), "cb": _rand((4,), 9), **BN},
    )
    result, _ = _optimize(text)
    assert op_histogram(result) == {"ConvTranspose": 1}


def test_fold_batchnorm_into_gemm():
    text = _graph_with(
        "c = Gemm<transB = 1, alpha = 0.5, beta = 2.0>(x, w, cb)\n y = BatchNormalization(c, s, b, mu, var)",
        "float[3, 5] x",
        "float[3, 4] y",
        {"w": _rand((4, 5)), "cb": _rand((4,), 9), **BN},
    )
    result, _ = _optimize(text)
    assert op_histogram(result) == {"Gemm": 1}


def test_batchnorm_after_relu_stays_with_reason():
    text = _graph_with(
        "c = Conv(x, w)\n r = Relu(c)\n y = BatchNormalization(r, s, b, mu, var)",
        "float[1, 3, 6, 6] x",
        "float[1, 4, 4, 4] y",
        {"w": _rand((4, 3, 3, 3)), **BN},
    )
    result, report = _optimize(text)
    assert "BatchNormalization" in op_histogram(result)
    assert "follows Relu, not Conv/ConvTranspose/Gemm" in _skips(report, "fold-batchnorm")


def test_fold_bias_add_and_channel_scale():
    text = _graph_with(
        "c = Conv(x, w)\n a = Add(c, cb)\n y = Mul(a, k)",
        "float[1, 3, 6, 6] x",
        "float[1, 4, 4, 4] y",
        {"w": _rand((4, 3, 3, 3)), "cb": _rand((1, 4, 1, 1), 5), "k": _rand((4, 1, 1), 6)},
    )
    result, report = _optimize(text)
    assert op_histogram(result) == {"Conv": 1}
    assert report["rules"]["fold-bias-add"]["applied"] == 1
    assert report["rules"]["fold-scale"]["applied"] == 1


def test_spatial_add_after_conv_is_not_a_bias():
    text = _graph_with(
        "c = Conv(x, w)\n y = Add(c, sp)",
        "float[1, 3, 6, 6] x",
        "float[1, 4, 4, 4] y",
        {"w": _rand((4, 3, 3, 3)), "sp": _rand((1, 1, 4, 4), 5)},
    )
    result, report = _optimize(text)
    assert op_histogram(result) == {"Conv": 1, "Add": 1}
    assert "the constant [1, 1, 4, 4] is not per output channel" in _skips(report, "fold-bias-add")


def test_fold_input_scale_into_grouped_conv():
    text = _graph_with(
        "m = Mul(x, k)\n y = Conv<group = 2, pads = [1, 1, 1, 1]>(m, w)",
        "float[1, 4, 5, 5] x",
        "float[1, 6, 5, 5] y",
        {"w": _rand((6, 2, 3, 3)), "k": _rand((4, 1, 1), 7)},
    )
    result, _ = _optimize(text)
    assert op_histogram(result) == {"Conv": 1}


def test_fold_input_shift_only_into_unpadded_conv():
    weights = {"w": _rand((6, 2, 3, 3)), "k": _rand((1, 4, 1, 1), 7)}
    unpadded = _graph_with(
        "m = Sub(x, k)\n y = Conv<group = 2>(m, w)",
        "float[1, 4, 5, 5] x",
        "float[1, 6, 3, 3] y",
        weights,
    )
    result, _ = _optimize(unpadded)
    assert op_histogram(result) == {"Conv": 1}
    padded = _graph_with(
        "m = Add(x, k)\n y = Conv<group = 2, pads = [1, 1, 1, 1]>(m, w)",
        "float[1, 4, 5, 5] x",
        "float[1, 6, 5, 5] y",
        weights,
    )
    result, report = _optimize(padded)
    assert op_histogram(result) == {"Add": 1, "Conv": 1}
    assert any("pads with zeros" in r for r in _skips(report, "fold-input-shift"))


# ---------------------------------------------------------------------------------------------
