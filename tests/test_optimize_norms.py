"""optimize, norm rules (optimize/rules/norms.py): decomposed LayerNormalization in its exporter
forms, with near-misses; both models run in onnxruntime."""

from __future__ import annotations

import numpy as np
import pytest
from optimize_helpers import _optimize, _skips

from onnxcomp.optimize import op_histogram

# ---------------------------------------------------------------------------------------------
# LayerNormalization

LAYER_NORM = """
<ir_version: 8, opset_import: ["" : 13]>
g (float[2, 5, 16] x) => (float[2, 5, 16] y) {
    two = Constant<value = float {2.0}>()
    eps = Constant<value = float {1e-5}>()
    gamma = Constant<value = float[16] {1,2,3,4,5,6,7,8,1,2,3,4,5,6,7,8}>()
    beta = Constant<value = float[16] {0,1,0,1,0,1,0,1,0,1,0,1,0,1,0,1}>()
    mean = ReduceMean<axes = [%s]>(x)
    d = Sub(x, mean)
    sq = Pow(d, two)
    var = ReduceMean<axes = [%s]>(sq)
    ve = Add(var, eps)
    std = Sqrt(ve)
    n = Div(d, std)
    s = Mul(n, gamma)
    y = Add(s, beta)
}
"""


def test_layer_norm_reduce_mean_form():
    result, report = _optimize(LAYER_NORM % ("-1", "-1"))
    assert op_histogram(result) == {"LayerNormalization": 1}
    assert report["opset"] == {"before": 13, "after": 17}


def _per_channel_params(text: str) -> str:
    return (
        text.replace("float[16]", "float[1, 5, 1]")
        .replace("{1,2,3,4,5,6,7,8,1,2,3,4,5,6,7,8}", "{1,2,3,4,5}")
        .replace("{0,1,0,1,0,1,0,1,0,1,0,1,0,1,0,1}", "{0,1,0,1,0}")
    )


def test_layer_norm_over_a_middle_axis_is_transposed():
    result, _ = _optimize(_per_channel_params(LAYER_NORM) % ("1", "1"))
    assert op_histogram(result) == {"Transpose": 2, "LayerNormalization": 1}


def test_layer_norm_near_miss_scale_on_wrong_axis():
    result, report = _optimize(_per_channel_params(LAYER_NORM) % ("-1", "-1"))
    assert "LayerNormalization" not in op_histogram(result)
    assert "the scale [1, 5, 1] is not per normalized element" in _skips(report, "layer-norm")


def test_layer_norm_near_miss_axes_differ():
    result, report = _optimize(LAYER_NORM % ("-1", "-2"))
    assert "LayerNormalization" not in op_histogram(result)
    assert "mean over axes [-1] but variance over [-2]" in _skips(report, "layer-norm")


def test_layer_norm_moments_form_with_keepdims_0():
    # jax2tf writes var = max(mean(x²) − mean², 0) with keepdims=0 sums re-shaped back.
    text = """
    <ir_version: 8, opset_import: ["" : 13]>
    g (float[2, 5, 16] x) => (float[2, 5, 16] y) {
        axes = Constant<value = int64[1] {-1}>()
        inv_n = Constant<value = float {0.0625}>()
        zero = Constant<value = float {0.0}>()
        eps = Constant<value = float {1e-6}>()
        back = Constant<value = int64[3] {2, 5, 1}>()
        gamma = Constant<value = float[16] {1,2,3,4,5,6,7,8,1,2,3,4,5,6,7,8}>()
        beta = Constant<value = float[1, 1, 16] {0,1,0,1,0,1,0,1,0,1,0,1,0,1,0,1}>()
        s1 = ReduceSum<keepdims = 0>(x, axes)
        xx = Mul(x, x)
        s2 = ReduceSum<keepdims = 0>(xx, axes)
        ex2 = Mul(s2, inv_n)
        ex = Mul(s1, inv_n)
        ex_sq = Mul(ex, ex)
        v = Sub(ex2, ex_sq)
        vm = Max(zero, v)
        vr = Reshape(vm, back)
        ve = Add(vr, eps)
        std = Sqrt(ve)
        r = Reciprocal(std)
        rg = Mul(r, gamma)
        mr = Reshape(ex, back)
        d = Sub(x, mr)
        n = Mul(d, rg)
        y = Add(n, beta)
    }
    """
    result, _ = _optimize(text)
    assert op_histogram(result) == {"LayerNormalization": 1}


def test_layer_norm_reduce_sum_reciprocal_form():
    text = """
    <ir_version: 8, opset_import: ["" : 13]>
    g (float[2, 5, 16] x) => (float[2, 5, 16] y) {
        axes = Constant<value = int64[1] {-1}>()
        inv_n = Constant<value = float {0.0625}>()
        eps = Constant<value = float {1e-3}>()
        gamma = Constant<value = float[16] {1,2,3,4,5,6,7,8,1,2,3,4,5,6,7,8}>()
        total = ReduceSum(x, axes)
        mean = Mul(total, inv_n)
        d = Sub(x, mean)
        sq = Mul(d, d)
        sq_total = ReduceSum(sq, axes)
        var = Mul(sq_total, inv_n)
        ve = Add(var, eps)
        std = Sqrt(ve)
        r = Reciprocal(std)
        n = Mul(d, r)
        y = Mul(n, gamma)
    }
    """
    result, _ = _optimize(text)
    assert op_histogram(result) == {"LayerNormalization": 1}


# TF's batch_normalization over moments: x·s + (β − mean·s), s = γ·rsqrt(var + ε), no x − mean
# on the main path (tf2onnx writes Rsqrt as Reciprocal(Sqrt)).
LAYER_NORM_TF = """
<ir_version: 8, opset_import: ["" : 13]>
g (float[2, 5, 16] x%s) => (float[2, 5, 16] y) {
    eps = Constant<value = float {1e-3}>()
    %s
    beta = Constant<value = float[16] {0,1,0,1,0,1,0,1,0,1,0,1,0,1,0,1}>()
    mean = ReduceMean<axes = [%s]>(x)
    d = Sub(x, mean)
    sq = Mul(d, d)
    var = ReduceMean<axes = [%s]>(sq)
    ve = Add(var, eps)
    std = Sqrt(ve)
    r = Reciprocal(std)
    inv = Mul(r, gamma)
    xs = Mul(x, inv)
    ms = Mul(mean, inv)
    shift = Sub(beta, ms)
    y = Add(xs, shift)
}
"""
GAMMA = "gamma = Constant<value = float[16] {1,2,3,4,5,6,7,8,1,2,3,4,5,6,7,8}>()"


def test_layer_norm_tf_form_without_x_minus_mean():
    result, report = _optimize(LAYER_NORM_TF % ("", GAMMA, "-1", "-1"))
    assert op_histogram(result) == {"LayerNormalization": 1}
    assert report["opset"] == {"before": 13, "after": 17}


def test_layer_norm_tf_form_moments_pow_and_scales_written_twice():
    # var = mean(x²) − mean², rsqrt as Pow(·, −0.5), and γ·rsqrt computed once per side
    # (β − (mean·γ)·rsqrt, as the formula reads left to right).
    text = """
    <ir_version: 8, opset_import: ["" : 13]>
    g (float[2, 5, 16] x) => (float[2, 5, 16] y) {
        eps = Constant<value = float {1e-5}>()
        mhalf = Constant<value = float {-0.5}>()
        gamma = Constant<value = float[16] {1,2,3,4,5,6,7,8,1,2,3,4,5,6,7,8}>()
        beta = Constant<value = float[16] {0,1,0,1,0,1,0,1,0,1,0,1,0,1,0,1}>()
        mean = ReduceMean<axes = [-1]>(x)
        xx = Mul(x, x)
        ex2 = ReduceMean<axes = [-1]>(xx)
        m2 = Mul(mean, mean)
        var = Sub(ex2, m2)
        ve = Add(var, eps)
        rs = Pow(ve, mhalf)
        g1 = Mul(gamma, rs)
        xs = Mul(x, g1)
        ve2 = Add(var, eps)
        rs2 = Pow(ve2, mhalf)
        mg = Mul(mean, gamma)
        ms = Mul(mg, rs2)
        shift = Sub(beta, ms)
        y = Add(shift, xs)
    }
    """
    result, _ = _optimize(text)
    assert op_histogram(result) == {"LayerNormalization": 1}


@pytest.mark.parametrize(
    "inputs, gamma, mean_axes, var_axes, reason",
    [
        ("", GAMMA, "-1", "-2", "mean over axes [-1] but variance over [-2]"),
        ("", GAMMA, "1", "1", "the scale [16] is not per normalized element"),
        (", float[16] gamma", "", "-1", "-1", "x·s: γ in s = γ/√(var + ε) is not a constant"),
    ],
    ids=["variance-axis", "normalized-axis", "gamma-input"],
)
def test_layer_norm_tf_form_near_misses(inputs, gamma, mean_axes, var_axes, reason):
    rng = np.random.default_rng(0)
    feeds = {"x": rng.normal(0, 3, (2, 5, 16)).astype(np.float32)}
    if inputs:
        feeds["gamma"] = rng.normal(1, 0.1, 16).astype(np.float32)
    result, report = _optimize(LAYER_NORM_TF % (inputs, gamma, mean_axes, var_axes), feeds)
    assert "LayerNormalization" not in op_histogram(result)
    assert _skips(report, "layer-norm") == [reason]
