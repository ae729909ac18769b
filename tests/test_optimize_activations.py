"""optimize, activation rules (optimize/rules/activations.py): each form on a small ONNX-text
graph, with near-misses that must not fire; both models run in onnxruntime."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from optimize_helpers import _optimize, _skips

from onnxcomp import graph
from onnxcomp.optimize import op_histogram

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
    assert [graph.scalar(v) for v in clip.inputs[1:]] == [0.0, 6.0]
    assert all(v.shape == ir.Shape([]) for v in clip.inputs[1:])  # Clip's bounds are scalars
    assert report["rules"]["relu6"]["applied"] == 1 and report["opset"]["after"] == 13


def test_relu6_before_opset_11_writes_clip_attributes():
    result, _ = _optimize(RELU6 % ("9", "6.0", RELU6_FORMS["min-max"]))
    clip = next(iter(result.graph))
    assert clip.op_type == "Clip" and len(clip.inputs) == 1
    assert (graph.attr(clip, "min"), graph.attr(clip, "max")) == (0.0, 6.0)


@pytest.mark.parametrize(
    "six, nodes, reason",
    [
        ("5.0", RELU6_FORMS["min-max"], "Min/Max bounds are (0, 5), not (0, 6)"),
        (
            "6.0",
            RELU6_FORMS["relu-min"].replace("six", "sixes"),
            "the bound [1, 8, 1, 1] is per element or channel, not one number",
        ),
        (
            "6.0",
            "m = Max(x, zero)\n y = Min(m, six)\n z = Neg(m)",
            "Max(x, 0) is also used elsewhere",
        ),
    ],
    ids=["bound-5", "per-channel", "max-used-elsewhere"],
)
def test_relu6_near_misses_stay(six, nodes, reason):
    text = RELU6 % ("13", six, nodes)
    text = text.replace(
        "float[1] six", "float[1, 8, 1, 1] sixes = {6, 6, 6, 6, 6, 6, 6, 6}, float[1] six"
    )
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
    assert (
        report["rules"]["relu6"]["applied"] == 1 and report["rules"]["hard-swish"]["applied"] == 1
    )


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


def test_no_opset_upgrade_skips_with_reason():
    result, report = _optimize(HARD_SWISH % "6.0", upgrade_opset=False)
    assert "HardSwish" not in op_histogram(result)
    assert any("opset" in r for r in _skips(report, "hard-swish"))
