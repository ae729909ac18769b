"""optimize, clean-up and constant rules (optimize/rules/cleanup.py, constants.py): Identity and
Dropout removal, Reshape targets, constant folding, rules inside If branches."""

from __future__ import annotations

import numpy as np
from optimize_helpers import _optimize, _skips

from onnxcomp.optimize import op_histogram

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
    feeds = {
        "x": rng.normal(size=(3, 4, 6)).astype(np.float32),
        "z": rng.normal(size=(3, 4, 6)).astype(np.float32),
    }
    result, report = _optimize(text, feeds, shapes={"x": [3, 4, 6], "z": [3, 4, 6]})
    # y = Reshape(x, [0, -1]); z's batch dim M is not shown equal to x's N: kept computed.
    assert report["rules"]["reshape-shape"]["applied"] == 1
    assert "dim 0 of the target comes from a dim not shown equal to the input's" in _skips(
        report, "reshape-shape"
    )
    assert op_histogram(result)["Shape"] == 1
