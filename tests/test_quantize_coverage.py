"""Quantization coverage on the graphs exporters write: a shape computation folded ahead of time keeps
its ranks (the ViT-S focus model's class-token Concat, which made every quantized ViT-S fail to load
in onnxruntime), and a detection head's Split with one output near a model output is planned."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from onnxcomp import runtime
from onnxcomp.optimize import OptimizeOptions, optimize

# A ViT embedding computes the position-table shape from scalars: Pow(2, 2) -> Cast -> Unsqueeze ->
# Concat with rank-1 pieces -> Reshape. Folding the scalar Cast must keep it a scalar.
SCALAR_SHAPE_CHAIN = """
<ir_version: 8, opset_import: ["" : 14]>
g (float[1, 4, 3] x) => (float[1, 3, 2, 2] y) <int64 two = {2}, int64[1] axes = {0},
                                                 int64[1] one = {1}, int64[1] three = {3}> {
    p = Pow(two, two)
    f = Cast<to = 1>(p)
    two_f = Constant<value = float {2.0}>()
    half = Div(f, two_f)
    side = Cast<to = 7>(half)
    u1 = Unsqueeze(side, axes)
    u2 = Unsqueeze(side, axes)
    shape = Concat<axis = 0>(one, three, u1, u2)
    t = Transpose<perm = [0, 2, 1]>(x)
    y = Reshape(t, shape)
}
"""


def _text_model(text: str) -> ir.Model:
    proto = onnx.parser.parse_model(text)
    return ir.from_proto(proto)


def test_folded_scalars_keep_rank_zero():
    model = _text_model(SCALAR_SHAPE_CHAIN)
    x = np.arange(12, dtype=np.float32).reshape(1, 4, 3)
    expected = runtime.run(runtime.create_session(model), {"x": x})
    result, report = optimize(model, OptimizeOptions(rules=["constant-fold"]))
    assert report["rules"]["constant-fold"]["applied"] >= 2
    got = runtime.run(runtime.create_session(result), {"x": x})  # loaded: ranks agree
    np.testing.assert_array_equal(got["y"], expected["y"])


@pytest.mark.thirdparty
def test_vit_focus_constant_folding_keeps_the_class_token_concat_loadable():
    """Folding the ViT-S embedding's shape arithmetic used to write a rank-1 scalar, and
    onnxruntime refused the model at /backbone/embeddings/Concat_2 (quantize failed in every mode)."""
    from models import realdata, thirdparty

    model = ir.load(thirdparty.fetch("vit_focus"))
    _, evals = realdata.build("vit_focus")
    x = np.load(evals)["input_image"][:1]
    expected = runtime.run(runtime.create_session(model), {"input_image": x})
    result, _ = optimize(model, OptimizeOptions(rules=["constant-fold"]))
    got = runtime.run(runtime.create_session(result), {"input_image": x})
    for name, array in expected.items():
        np.testing.assert_allclose(got[name], array, rtol=1e-4, atol=1e-5)


# A detection head's split: one part goes on to arithmetic, the other straight to an output
# through Sigmoid. The plan used to look up the Split's first output only (KeyError).
SPLIT_HEAD = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[1, 3, 8, 8] x) => (float[1, 2, 8, 8] scores, float[1, 2, 8, 8] boxes) <float[4, 3, 1, 1] w,
                                                                              float k = {2.0}> {
    c = Conv(x, w)
    a, b = Split<axis = 1, num_outputs = 2>(c)
    scores = Sigmoid(b)
    boxes = Mul(a, k)
}
"""


def test_split_with_one_output_near_a_model_output_is_planned():
    from onnxcomp.quantize.plan import build_plan

    text = SPLIT_HEAD.replace(
        "float[4, 3, 1, 1] w,",
        "float[4, 3, 1, 1] w = {" + ", ".join(str(v / 10) for v in range(12)) + "},",
    )
    model = _text_model(text)
    plan = build_plan(model)
    split = next(d for d in plan.floats if d.node.op_type == "Split")
    assert "model output 'scores'" in split.reason
