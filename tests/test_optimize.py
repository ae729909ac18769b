"""optimize: each rule on a small ONNX-text graph (with near-misses that must not fire), the
self-check naming a broken rule, and real models. Every test runs both models in onnxruntime."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from onnxcomp import runtime
from onnxcomp.errors import OnnxcompError
from onnxcomp.optimize import OptimizeOptions, op_histogram, optimize
from onnxcomp.optimize import rules as rules_mod
from onnxcomp.passes import get_pass, run_pipeline


def _model(text: str) -> ir.Model:
    proto = onnx.parser.parse_model(text)
    onnx.checker.check_model(proto, full_check=True)
    return ir.from_proto(proto)


def _run(model: ir.Model, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    session = runtime.create_session(model)
    return list(runtime.run(session, feeds).values())


def _optimize(text: str, feeds: dict[str, np.ndarray] | None = None, **options):
    """Optimize a text model; assert the outputs match on ``feeds`` (default: random x)."""
    model = _model(text)
    if feeds is None:
        spec = model.graph.inputs[0]
        shape = [d if isinstance(d, int) else 2 for d in spec.shape]
        feeds = {spec.name: np.random.default_rng(0).normal(0, 3, shape).astype(np.float32)}
    result, report = optimize(model, OptimizeOptions(**options))
    for before, after in zip(_run(model, feeds), _run(result, feeds)):
        np.testing.assert_allclose(after, before, rtol=1e-5, atol=1e-5)
    return result, report


def _skips(report, rule: str) -> list[str]:
    return [s["reason"] for s in report["rules"][rule]["skips"]]


# ---------------------------------------------------------------------------------------------
# Activations

HARD_SWISH = """
<ir_version: 8, opset_import: ["" : 13]>
g (float[1, 8, 4, 4] x) => (float[1, 8, 4, 4] y) {
    three = Constant<value = float[1] {3.0}>()
    zero = Constant<value = float {0.0}>()
    six = Constant<value = float {%s}>()
    six2 = Constant<value = float[1] {6.0}>()
    a = Add(x, three)
    c = Clip(a, zero, six)
    m = Mul(x, c)
    y = Div(m, six2)
}
"""


def test_hard_swish_paddle_form_fuses_and_upgrades_opset():
    result, report = _optimize(HARD_SWISH % "6.0")
    assert op_histogram(result) == {"HardSwish": 1}
    assert report["opset"] == {"before": 13, "after": 14}
    assert report["rules"]["hard-swish"]["applied"] == 1


def test_hard_swish_near_miss_clip_bounds():
    result, report = _optimize(HARD_SWISH % "5.0")
    assert "HardSwish" not in op_histogram(result)
    assert "Clip bounds are (0, 5), not (0, 6)" in _skips(report, "hard-swish")
    assert report["opset"]["after"] == 13  # nothing to upgrade for


def test_hard_swish_gate_form_and_hard_sigmoid():
    text = """
    <ir_version: 8, opset_import: ["" : 14]>
    g (float[1, 8, 4, 4] x, float[1, 8, 4, 4] z) => (float[1, 8, 4, 4] y, float[1, 8, 4, 4] w) {
        three = Constant<value = float {3.0}>()
        zero = Constant<value = float {0.0}>()
        six = Constant<value = float {6.0}>()
        sixth = Constant<value = float {0.16666667}>()
        a = Add(three, x)
        c = Clip(a, zero, six)
        h = Mul(c, sixth)
        y = Mul(h, x)
        a2 = Add(z, three)
        c2 = Clip(a2, zero, six)
        g2 = Div(c2, six)
        w = Mul(x, g2)
    }
    """
    rng = np.random.default_rng(0)
    feeds = {n: rng.normal(0, 3, (1, 8, 4, 4)).astype(np.float32) for n in ("x", "z")}
    result, report = _optimize(text, feeds)
    # x·hsig(x) is hard-swish; x·hsig(z) gates another tensor: a hard-sigmoid and a Mul.
    assert op_histogram(result) == {"Mul": 1, "HardSwish": 1, "HardSigmoid": 1}


def test_hard_sigmoid_near_miss_scale():
    text = """
    <ir_version: 8, opset_import: ["" : 13]>
    g (float[1, 8] x) => (float[1, 8] y) {
        three = Constant<value = float {3.0}>()
        zero = Constant<value = float {0.0}>()
        six = Constant<value = float {6.0}>()
        five = Constant<value = float {5.0}>()
        a = Add(x, three)
        c = Clip(a, zero, six)
        y = Div(c, five)
    }
    """
    result, report = _optimize(text)
    assert "HardSigmoid" not in op_histogram(result)
    assert "Clip(x+3, 0, 6) is scaled by 0.2, not 1/6" in _skips(report, "hard-sigmoid")


def test_hard_sigmoid_affine_form_and_hard_swish_on_top():
    text = """
    <ir_version: 8, opset_import: ["" : 14]>
    g (float[1, 8] x) => (float[1, 8] y, float[1, 8] z) {
        a = Constant<value = float {0.2}>()
        b = Constant<value = float {0.5}>()
        sixth = Constant<value = float {0.16666667}>()
        zero = Constant<value = float {0.0}>()
        one = Constant<value = float {1.0}>()
        ax = Mul(x, a)
        t = Add(ax, b)
        y = Clip(t, zero, one)
        sx = Mul(sixth, x)
        u = Add(b, sx)
        h = Clip(u, zero, one)
        z = Mul(x, h)
    }
    """
    result, _ = _optimize(text)
    # Clip(x/6 + 0.5, 0, 1) is the hard-sigmoid of hard-swish: x·it becomes HardSwish next round.
    assert op_histogram(result) == {"HardSigmoid": 1, "HardSwish": 1}


RELU6 = """
<ir_version: 8, opset_import: ["" : %s]>
g (float[1, 8, 4, 4] x) => (float[1, 8, 4, 4] y) <float zero = {0.0}, float[1] six = {%s}> {
    %s
}
"""
RELU6_FORMS = {
    "min-max": "m = Max(x, zero)\n y = Min(six, m)",
    "max-min": "m = Min(x, six)\n y = Max(zero, m)",
    "relu-min": "m = Relu(x)\n y = Min(m, six)",
}


@pytest.mark.parametrize("form", sorted(RELU6_FORMS))
def test_relu6_from_min_max_becomes_clip(form):
    result, report = _optimize(RELU6 % ("13", "6.0", RELU6_FORMS[form]))
    assert op_histogram(result) == {"Clip": 1}
    clip = next(iter(result.graph))
    assert [rules_mod.scalar(v) for v in clip.inputs[1:]] == [0.0, 6.0]
    assert all(v.shape == ir.Shape([]) for v in clip.inputs[1:])  # Clip's bounds are scalars
    assert report["rules"]["relu6"]["applied"] == 1 and report["opset"]["after"] == 13


def test_relu6_before_opset_11_writes_clip_attributes():
    result, _ = _optimize(RELU6 % ("9", "6.0", RELU6_FORMS["min-max"]))
    clip = next(iter(result.graph))
    assert clip.op_type == "Clip" and len(clip.inputs) == 1
    assert (rules_mod.attr(clip, "min"), rules_mod.attr(clip, "max")) == (0.0, 6.0)


@pytest.mark.parametrize(
    "six, nodes, reason",
    [
        ("5.0", RELU6_FORMS["min-max"], "Min/Max bounds are (0, 5), not (0, 6)"),
        ("6.0", RELU6_FORMS["relu-min"].replace("six", "sixes"),
         "the bound [1, 8, 1, 1] is per element or channel, not one number"),
        ("6.0", "m = Max(x, zero)\n y = Min(m, six)\n z = Neg(m)", "Max(x, 0) is also used elsewhere"),
    ],
    ids=["bound-5", "per-channel", "max-used-elsewhere"],
)
def test_relu6_near_misses_stay(six, nodes, reason):
    text = RELU6 % ("13", six, nodes)
    text = text.replace("float[1] six", "float[1, 8, 1, 1] sixes = {6, 6, 6, 6, 6, 6, 6, 6}, float[1] six")
    if "z = Neg" in text:
        text = text.replace("(float[1, 8, 4, 4] y)", "(float[1, 8, 4, 4] y, float[1, 8, 4, 4] z)")
    result, report = _optimize(text)
    assert "Clip" not in op_histogram(result)
    assert _skips(report, "relu6") == [reason]


def test_hard_swish_over_a_min_max_relu6():
    text = """
    <ir_version: 8, opset_import: ["" : 13]>
    g (float[1, 8, 4, 4] x) => (float[1, 8, 4, 4] y) <float three = {3.0}, float zero = {0.0}, float six = {6.0}> {
        a = Add(x, three)
        lo = Max(a, zero)
        c = Min(lo, six)
        m = Mul(x, c)
        y = Div(m, six)
    }
    """
    result, report = _optimize(text)
    # Round 1 writes the Clip, round 2 sees Paddle's hard-swish.
    assert op_histogram(result) == {"HardSwish": 1}
    assert report["rules"]["relu6"]["applied"] == 1 and report["rules"]["hard-swish"]["applied"] == 1


SILU = """
<ir_version: 10, opset_import: ["" : 17]>
g (float[1, 8, 4, 4] x) => (float[1, 8, 4, 4] y) {
    s = Sigmoid(x)
    y = Mul(s, x)
}
"""


def test_silu_is_left_to_onnxruntime_by_default():
    result, report = _optimize(SILU)
    assert op_histogram(result) == {"Sigmoid": 1, "Mul": 1}
    assert "silu" not in report["rules"]


def test_silu_to_swish_when_asked():
    result, report = _optimize(SILU, rules=["silu"])
    assert op_histogram(result) == {"Swish": 1}
    assert report["opset"]["after"] == 24


GELU_ERF = """
<ir_version: 8, opset_import: ["" : %s]>
g (float[2, 16] x) => (float[2, 16] y) {
    r2 = Constant<value = float {%s}>()
    one = Constant<value = float {1.0}>()
    half = Constant<value = float {0.5}>()
    d = Div(x, r2)
    e = Erf(d)
    a = Add(e, one)
    m = Mul(x, a)
    y = Mul(m, half)
}
"""


def test_gelu_erf_pytorch_form():
    result, report = _optimize(GELU_ERF % ("20", "1.4142135"))
    assert op_histogram(result) == {"Gelu": 1}


def test_gelu_is_not_worth_an_opset_upgrade():
    result, report = _optimize(GELU_ERF % ("17", "1.4142135"))
    assert "Gelu" not in op_histogram(result) and report["opset"]["after"] == 17
    assert any("needs opset 20" in r for r in _skips(report, "gelu-erf"))


def test_gelu_erf_near_miss_divisor():
    result, report = _optimize(GELU_ERF % ("20", "2.0"))
    assert "Gelu" not in op_histogram(result)
    assert "erf input is x·0.5, not x/√2" in _skips(report, "gelu-erf")


GELU_TANH = """
<ir_version: 8, opset_import: ["" : 20]>
g (float[2, 16] x) => (float[2, 16] y) {
    k = Constant<value = float {%s}>()
    c = Constant<value = float {0.7978846}>()
    one = Constant<value = float {1.0}>()
    half = Constant<value = float {0.5}>()
    kx = Mul(k, x)
    kx2 = Mul(x, kx)
    kx3 = Mul(x, kx2)
    inner = Add(x, kx3)
    s = Mul(c, inner)
    t = Tanh(s)
    a = Add(one, t)
    h = Mul(half, a)
    y = Mul(x, h)
}
"""


def test_gelu_tanh_jax_form():
    result, _ = _optimize(GELU_TANH % "0.044715")
    assert op_histogram(result) == {"Gelu": 1}
    node = next(iter(result.graph))
    assert node.attributes["approximate"].value == "tanh"


def test_gelu_tanh_near_miss_coefficient():
    result, report = _optimize(GELU_TANH % "0.05")
    assert "Gelu" not in op_histogram(result)
    assert "the cubic term is 0.05·x³, not 0.044715·x³" in _skips(report, "gelu-tanh")


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
    return text.replace("float[16]", "float[1, 5, 1]").replace(
        "{1,2,3,4,5,6,7,8,1,2,3,4,5,6,7,8}", "{1,2,3,4,5}").replace(
        "{0,1,0,1,0,1,0,1,0,1,0,1,0,1,0,1}", "{0,1,0,1,0}")


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


BN = {"s": _rand((4,), 1, True), "b": _rand((4,), 2), "mu": _rand((4,), 3), "var": _rand((4,), 4, True)}


def test_fold_batchnorm_into_conv():
    text = _graph_with(
        "c = Conv<pads = [1, 1, 1, 1]>(x, w)\n y = BatchNormalization(c, s, b, mu, var)",
        "float[1, 3, 6, 6] x", "float[1, 4, 6, 6] y", {"w": _rand((4, 3, 3, 3)), **BN},
    )
    result, report = _optimize(text)
    assert op_histogram(result) == {"Conv": 1}


def test_fold_batchnorm_into_grouped_conv_transpose():
    text = _graph_with(
        "c = ConvTranspose<group = 2, strides = [2, 2]>(x, w, cb)\n y = BatchNormalization(c, s, b, mu, var)",
        "float[1, 4, 3, 3] x", "float[1, 4, 6, 6] y",
        {"w": _rand((4, 2, 2, 2)), "cb": _rand((4,), 9), **BN},
    )
    result, _ = _optimize(text)
    assert op_histogram(result) == {"ConvTranspose": 1}


def test_fold_batchnorm_into_gemm():
    text = _graph_with(
        "c = Gemm<transB = 1, alpha = 0.5, beta = 2.0>(x, w, cb)\n y = BatchNormalization(c, s, b, mu, var)",
        "float[3, 5] x", "float[3, 4] y", {"w": _rand((4, 5)), "cb": _rand((4,), 9), **BN},
    )
    result, _ = _optimize(text)
    assert op_histogram(result) == {"Gemm": 1}


def test_batchnorm_after_relu_stays_with_reason():
    text = _graph_with(
        "c = Conv(x, w)\n r = Relu(c)\n y = BatchNormalization(r, s, b, mu, var)",
        "float[1, 3, 6, 6] x", "float[1, 4, 4, 4] y", {"w": _rand((4, 3, 3, 3)), **BN},
    )
    result, report = _optimize(text)
    assert "BatchNormalization" in op_histogram(result)
    assert "follows Relu, not Conv/ConvTranspose/Gemm" in _skips(report, "fold-batchnorm")


def test_fold_bias_add_and_channel_scale():
    text = _graph_with(
        "c = Conv(x, w)\n a = Add(c, cb)\n y = Mul(a, k)",
        "float[1, 3, 6, 6] x", "float[1, 4, 4, 4] y",
        {"w": _rand((4, 3, 3, 3)), "cb": _rand((1, 4, 1, 1), 5), "k": _rand((4, 1, 1), 6)},
    )
    result, report = _optimize(text)
    assert op_histogram(result) == {"Conv": 1}
    assert report["rules"]["fold-bias-add"]["applied"] == 1
    assert report["rules"]["fold-scale"]["applied"] == 1


def test_spatial_add_after_conv_is_not_a_bias():
    text = _graph_with(
        "c = Conv(x, w)\n y = Add(c, sp)",
        "float[1, 3, 6, 6] x", "float[1, 4, 4, 4] y",
        {"w": _rand((4, 3, 3, 3)), "sp": _rand((1, 1, 4, 4), 5)},
    )
    result, report = _optimize(text)
    assert op_histogram(result) == {"Conv": 1, "Add": 1}
    assert "the constant [1, 1, 4, 4] is not per output channel" in _skips(report, "fold-bias-add")


def test_fold_input_scale_into_grouped_conv():
    text = _graph_with(
        "m = Mul(x, k)\n y = Conv<group = 2, pads = [1, 1, 1, 1]>(m, w)",
        "float[1, 4, 5, 5] x", "float[1, 6, 5, 5] y",
        {"w": _rand((6, 2, 3, 3)), "k": _rand((4, 1, 1), 7)},
    )
    result, _ = _optimize(text)
    assert op_histogram(result) == {"Conv": 1}


def test_fold_input_shift_only_into_unpadded_conv():
    weights = {"w": _rand((6, 2, 3, 3)), "k": _rand((1, 4, 1, 1), 7)}
    unpadded = _graph_with(
        "m = Sub(x, k)\n y = Conv<group = 2>(m, w)", "float[1, 4, 5, 5] x", "float[1, 6, 3, 3] y", weights
    )
    result, _ = _optimize(unpadded)
    assert op_histogram(result) == {"Conv": 1}
    padded = _graph_with(
        "m = Add(x, k)\n y = Conv<group = 2, pads = [1, 1, 1, 1]>(m, w)",
        "float[1, 4, 5, 5] x", "float[1, 6, 5, 5] y", weights,
    )
    result, report = _optimize(padded)
    assert op_histogram(result) == {"Add": 1, "Conv": 1}
    assert any("pads with zeros" in r for r in _skips(report, "fold-input-shift"))


# ---------------------------------------------------------------------------------------------
# Removal and constant folding


def test_identity_and_dropout_removed_output_name_kept():
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[2, 3] x) => (float[2, 3] y) {
        r = Relu(x)
        i = Identity(r)
        d = Dropout(i)
        y = Identity(d)
    }
    """
    result, _ = _optimize(text)
    assert op_histogram(result) == {"Relu": 1}
    assert [o.name for o in result.graph.outputs] == ["y"]


def test_identity_from_input_to_output_is_kept_with_reason():
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[2, 3] x) => (float[2, 3] y) {
        y = Identity(x)
    }
    """
    result, report = _optimize(text)
    assert op_histogram(result) == {"Identity": 1}
    assert _skips(report, "identity")


def test_constant_folding_and_its_size_limit():
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[2, 3] x) => (float[2, 4] y, float[2, 3] z) {
        w = Constant<value = float[4, 3] {1,2,3,4,5,6,7,8,9,10,11,12}>()
        wt = Transpose(w)
        y = MatMul(x, wt)
        shape = Constant<value = int64[2] {4096, 1024}>()
        big = ConstantOfShape<value = float[1] {1.0}>(shape)
        s = ReduceSum<keepdims = 0>(big)
        z = Add(x, s)
    }
    """
    result, report = _optimize(text)
    hist = op_histogram(result)
    assert "Transpose" not in hist and hist["ConstantOfShape"] == 1
    assert any("limit" in r for r in _skips(report, "constant-fold"))


def test_rules_run_inside_if_branches():
    text = """
    <ir_version: 8, opset_import: ["" : 20]>
    g (bool[1] c, float[2, 16] x) => (float[2, 16] y) {
        y = If(c) <
            then_branch = t () => (float[2, 16] a) {
                r2 = Constant<value = float {1.4142135}>()
                one = Constant<value = float {1.0}>()
                half = Constant<value = float {0.5}>()
                d = Div(x, r2)
                e = Erf(d)
                p = Add(e, one)
                m = Mul(x, p)
                a = Mul(m, half)
            },
            else_branch = e () => (float[2, 16] b) {
                b = Identity(x)
            }
        >
    }
    """
    x = np.random.default_rng(0).normal(0, 2, (2, 16)).astype(np.float32)
    for flag in (True, False):
        result, report = _optimize(text, {"c": np.array([flag]), "x": x})
    assert report["rules"]["gelu-erf"]["applied"] == 1
    assert op_histogram(result)["Gelu"] == 1


def test_reshape_target_from_own_shape_becomes_constant():
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N, 4, 6] x, float[M, 4, 6] z) => (float[N, 24] y, float[M, 24] w) {
        s = Shape(x)
        zero = Constant<value = int64[1] {0}>()
        one = Constant<value = int64[1] {1}>()
        minus = Constant<value = int64[1] {-1}>()
        b = Slice(s, zero, one)
        t = Concat<axis = 0>(b, minus)
        y = Reshape(x, t)
        w = Reshape(z, t)
    }
    """
    rng = np.random.default_rng(0)
    feeds = {"x": rng.normal(size=(3, 4, 6)).astype(np.float32), "z": rng.normal(size=(3, 4, 6)).astype(np.float32)}
    result, report = _optimize(text, feeds, shapes={"x": [3, 4, 6], "z": [3, 4, 6]})
    # y = Reshape(x, [0, -1]); z's batch dim M is not shown equal to x's N: kept computed.
    assert report["rules"]["reshape-shape"]["applied"] == 1
    assert "dim 0 of the target comes from a dim not shown equal to the input's" in _skips(report, "reshape-shape")
    assert op_histogram(result)["Shape"] == 1


# ---------------------------------------------------------------------------------------------
# Self-check, options, pass registry


def test_broken_rule_is_named_with_its_node(monkeypatch):
    def wrong(self, match, names):
        rules_mod.replace_chain(
            match, "HardSigmoid", [match.data["x"]], match.data["out"], names, {"alpha": 0.2, "beta": 0.5}
        )

    monkeypatch.setattr(rules_mod.HardSigmoidRule, "rewrite", wrong)
    text = """
    <ir_version: 8, opset_import: ["" : 13]>
    g (float[1, 8] x) => (float[1, 8] y) {
        three = Constant<value = float {3.0}>()
        zero = Constant<value = float {0.0}>()
        six = Constant<value = float {6.0}>()
        r = Relu(x)
        a = Add(r, three)
        c = Clip(a, zero, six)
        y = Div(c, six)
    }
    """
    with pytest.raises(OnnxcompError, match=r"rule 'hard-sigmoid' at node '.*Clip.*' changes the outputs"):
        optimize(_model(text))


def test_no_opset_upgrade_skips_with_reason():
    result, report = _optimize(HARD_SWISH % "6.0", upgrade_opset=False)
    assert "HardSwish" not in op_histogram(result)
    assert any("opset" in r for r in _skips(report, "hard-swish"))


def test_unknown_rule_is_named():
    from onnxcomp.passes import parse_options

    with pytest.raises(OnnxcompError, match="unknown rule 'hardswish'"):
        parse_options(OptimizeOptions, {"skip": ["hardswish"]}, "optimize")


def test_registered_pass_in_a_pipeline(models_dir):
    assert get_pass("optimize").options is OptimizeOptions
    model = ir.load(models_dir / "digits_cnn.onnx")
    result, reports = run_pipeline(model, [("optimize", {"skip": ["identity"]})])
    assert reports[0].report["rules"]["fold-batchnorm"]["applied"] >= 1
    assert "BatchNormalization" not in op_histogram(result)


# ---------------------------------------------------------------------------------------------
# Real models


def test_digits_cnn_on_test_data(models_dir, tmp_path, cli):
    out = tmp_path / "digits_opt.onnx"
    res = cli("optimize", models_dir / "digits_cnn.onnx", "-o", out, "--data", models_dir / "digits_test.npz",
              "--runs", "5", "--json")
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert report["check"]["max_rel_error"] < 1e-5
    assert report["latency_ms"]["ratio"] > 0
    data = np.load(models_dir / "digits_test.npz")
    feeds = {"input": data["input"][:64]}
    before = _run(ir.load(models_dir / "digits_cnn.onnx"), feeds)[0]
    after = _run(ir.load(out), feeds)[0]
    np.testing.assert_allclose(after, before, rtol=1e-4, atol=1e-4)
    assert (after.argmax(1) == before.argmax(1)).all()


def test_cli_refuses_to_overwrite_input_and_names_bad_rule(models_dir, cli):
    res = cli("optimize", models_dir / "digits_cnn.onnx", "-o", models_dir / "digits_cnn.onnx", "--no-bench")
    assert res.exit_code == 2 and "refusing to overwrite" in res.stderr
    res = cli("optimize", models_dir / "digits_cnn.onnx", "-o", "/tmp/x.onnx", "--skip", "nope")
    assert res.exit_code == 2 and "unknown rule 'nope'" in res.stderr


def _thirdparty(name: str):
    thirdparty = pytest.importorskip("models.thirdparty")
    try:
        return thirdparty.fetch(name)
    except Exception as err:  # no network / no pip
        pytest.skip(f"cannot fetch {name}: {err}")


@pytest.mark.thirdparty
def test_layout_model_hard_swish_fused(tmp_path):
    model = ir.load(_thirdparty("layout"))
    result, report = optimize(model)
    hist = op_histogram(result)
    assert hist["HardSwish"] == 94 and "Clip" not in hist and "BatchNormalization" not in hist
    assert report["check"]["max_rel_error"] < 1e-4
    feeds = {"image": np.random.default_rng(1).random((1, 3, 800, 608), np.float32)}
    for a, b in zip(_run(model, feeds), _run(result, feeds)):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4 * np.abs(a).max())


@pytest.mark.thirdparty
def test_orientation_model_batchnorm_folded():
    model = ir.load(_thirdparty("orientation"))
    result, report = optimize(model)
    assert "BatchNormalization" not in op_histogram(result)
    assert report["rules"]["fold-batchnorm"]["applied"] == 27
    feeds = {"x": np.random.default_rng(1).random((2, 3, 224, 224), np.float32)}
    for a, b in zip(_run(model, feeds), _run(result, feeds)):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5)


@pytest.mark.thirdparty
def test_magika_layer_norms_fused_gelu_left_at_its_opset():
    # jax2tf: LayerNorm as max(mean(x²) − mean², 0) with keepdims=0 sums, one over a middle axis.
    model = ir.load(_thirdparty("magika"))
    result, report = optimize(model)
    hist = op_histogram(result)
    assert hist["LayerNormalization"] == 2 and "Reciprocal" not in hist
    assert report["opset"]["after"] == 17 and "Gelu" not in hist
    assert any("needs opset 20" in r for r in _skips(report, "gelu-tanh"))
    feeds = {"bytes": np.random.default_rng(1).integers(0, 256, (3, 2048)).astype(np.int32)}
    for a, b in zip(_run(model, feeds), _run(result, feeds)):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5)


@pytest.mark.thirdparty
def test_yolov8n_dynamic_shapes_silu_left_to_onnxruntime():
    model = ir.load(_thirdparty("yolov8n"))
    result, report = optimize(model, OptimizeOptions(shapes={"images": [1, 3, 320, 320]}))
    assert op_histogram(result)["Sigmoid"] == op_histogram(model)["Sigmoid"]
    assert report["rules"]["reshape-shape"]["applied"] >= 1
    # Another input size than the self-check used: the model stays dynamic.
    feeds = {"images": np.random.default_rng(1).random((1, 3, 256, 320), np.float32)}
    for a, b in zip(_run(model, feeds), _run(result, feeds)):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4 * np.abs(a).max())
