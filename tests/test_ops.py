"""ops: the weighted-op views checked against onnxruntime, and channel propagation on small
ONNX-text graphs (the answers structured pruning builds its dependency groups from)."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from onnxcomp import model as model_io
from onnxcomp import ops, runtime


def _model(text: str) -> ir.Model:
    proto = onnx.parser.parse_model(text)
    onnx.checker.check_model(proto, full_check=True)
    model = ir.from_proto(proto)
    model_io.normalize(model)  # lift Constant nodes, infer shapes
    return model


def _node(model: ir.Model, name: str) -> ir.Node:
    return next(n for n in model.graph if n.outputs[0].name == name)


def _run(model: ir.Model, feeds: dict[str, np.ndarray]) -> np.ndarray:
    return next(iter(runtime.run(runtime.create_session(model), feeds).values()))


# One weighted node per case: (ONNX text, input shape, output channels, input channels).
LAYERS = {
    "conv": (
        """<ir_version: 8, opset_import: ["" : 17]>
g (float[2, 4, 5, 5] x, float[6, 4, 3, 3] w, float[6] b) => (float[2, 6, 3, 3] y) {
    y = Conv(x, w, b)
}""",
        (2, 4, 5, 5),
        6,
        4,
    ),
    "conv-grouped": (
        """<ir_version: 8, opset_import: ["" : 17]>
g (float[2, 4, 5, 5] x, float[6, 2, 3, 3] w, float[6] b) => (float[2, 6, 3, 3] y) {
    y = Conv<group = 2>(x, w, b)
}""",
        (2, 4, 5, 5),
        6,
        4,
    ),
    "conv-transpose-grouped": (
        """<ir_version: 8, opset_import: ["" : 17]>
g (float[2, 4, 5, 5] x, float[4, 3, 3, 3] w, float[6] b) => (float[2, 6, 7, 7] y) {
    y = ConvTranspose<group = 2>(x, w, b)
}""",
        (2, 4, 5, 5),
        6,
        4,
    ),
    "gemm": (
        """<ir_version: 8, opset_import: ["" : 17]>
g (float[3, 4] x, float[4, 6] w, float[6] b) => (float[3, 6] y) {
    y = Gemm(x, w, b)
}""",
        (3, 4),
        6,
        4,
    ),
    "gemm-transB": (
        """<ir_version: 8, opset_import: ["" : 17]>
g (float[3, 4] x, float[6, 4] w, float[6] b) => (float[3, 6] y) {
    y = Gemm<transB = 1>(x, w, b)
}""",
        (3, 4),
        6,
        4,
    ),
    "matmul": (
        """<ir_version: 8, opset_import: ["" : 17]>
g (float[2, 3, 4] x, float[4, 6] w) => (float[2, 3, 6] y) {
    y = MatMul(x, w)
}""",
        (2, 3, 4),
        6,
        4,
    ),
}


@pytest.mark.parametrize("case", list(LAYERS))
def test_weight_views_match_onnxruntime(case):
    """scale_out scales output channel o, scale_in input channel c, as onnxruntime computes them;
    to_matrix/from_matrix round-trip and put output channel o in row o."""
    text, x_shape, out_ch, in_ch = LAYERS[case]
    model = _model(text)
    node = next(iter(model.graph))
    spec = ops.weighted(node)
    rng = np.random.default_rng(0)
    w_shape = [int(d) for d in node.inputs[1].shape]
    w = rng.normal(size=w_shape).astype(np.float32)
    x = rng.normal(size=x_shape).astype(np.float32)
    feeds = {"x": x, "w": w}
    if "b" in [v.name for v in model.graph.inputs]:
        feeds["b"] = np.zeros(out_ch, np.float32)
    assert spec.out_channels(node, w.shape) == out_ch
    assert spec.in_channels(node, w.shape) == in_ch
    y = _run(model, feeds)

    s = rng.uniform(0.5, 2.0, out_ch)
    scaled = _run(model, {**feeds, "w": spec.scale_out(node, w, s)})
    channel_axis = y.ndim - 1 if spec.layout in ("gemm", "matmul") else 1
    shape = [1] * y.ndim
    shape[channel_axis] = out_ch
    np.testing.assert_allclose(scaled, y * s.reshape(shape), rtol=1e-4, atol=1e-4)

    t = rng.uniform(0.5, 2.0, in_ch)
    x_axis = x.ndim - 1 if spec.layout in ("gemm", "matmul") else 1
    shape = [1] * x.ndim
    shape[x_axis] = in_ch
    via_weight = _run(model, {**feeds, "w": spec.scale_in(node, w, t)})
    via_input = _run(model, {**feeds, "x": (x * t.reshape(shape)).astype(np.float32)})
    np.testing.assert_allclose(via_weight, via_input, rtol=1e-4, atol=1e-4)

    rows = spec.to_matrix(node, w)
    g = spec.groups(node)
    assert rows.shape == (g, out_ch // g, spec.im2col_rows(node, w.shape))
    np.testing.assert_array_equal(spec.from_matrix(node, rows, w.shape), w)
    for o in (0, out_ch - 1):
        one = spec.to_matrix(node, spec.scale_out(node, w, np.eye(out_ch)[o]))
        nonzero = np.argwhere(np.any(one != 0, axis=2))
        assert nonzero.tolist() == [[o // (out_ch // g), o % (out_ch // g)]]


def test_weight_and_bias_reasons():
    model = _model("""<ir_version: 8, opset_import: ["" : 17]>
g (float[1, 2, 4, 4] x, float[3, 2, 1, 1] w) => (float[1, 3, 4, 4] y) {
    y = Conv(x, w)
}""")
    assert ops.weight_and_bias(next(iter(model.graph))) == "the Conv weight is computed at run time"


CNN = """<ir_version: 8, opset_import: ["" : 17]>
g (float[1, 3, 8, 8] x) => (float[1, 10] y, float[1, 4, 8, 8] s1, float[1, 4, 4, 4] d) {
    w1 = Constant<value = float[4, 3, 3, 3] {0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 1.2, 1.3, 1.4, 1.5, 1.6, 1.7, 1.8, 1.9, 2.0, 2.1, 2.2, 2.3, 2.4, 2.5, 2.6, 2.7, 2.8, 2.9, 3.0, 3.1, 3.2, 3.3, 3.4, 3.5, 3.6, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 1.2, 1.3, 1.4, 1.5, 1.6, 1.7, 1.8, 1.9, 2.0, 2.1, 2.2, 2.3, 2.4, 2.5, 2.6, 2.7, 2.8, 2.9, 3.0, 3.1, 3.2, 3.3, 3.4, 3.5, 3.6, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 1.2, 1.3, 1.4, 1.5, 1.6, 1.7, 1.8, 1.9, 2.0, 2.1, 2.2, 2.3, 2.4, 2.5, 2.6, 2.7, 2.8, 2.9, 3.0, 3.1, 3.2, 3.3, 3.4, 3.5, 3.6}>()
    b1 = Constant<value = float[4] {0.0, 0.1, 0.2, 0.3}>()
    c1 = Conv<pads = [1, 1, 1, 1]>(x, w1, b1)
    sc = Constant<value = float[4] {1.0, 1.0, 1.0, 1.0}>()
    bb = Constant<value = float[4] {0.0, 0.0, 0.0, 0.0}>()
    mm = Constant<value = float[4] {0.0, 0.0, 0.0, 0.0}>()
    vv = Constant<value = float[4] {1.0, 1.0, 1.0, 1.0}>()
    n1 = BatchNormalization(c1, sc, bb, mm, vv)
    r1 = Relu(n1)
    bias = Constant<value = float[4, 1, 1] {1.0, 2.0, 3.0, 4.0}>()
    s1 = Add(r1, bias)
    two = Constant<value = float {2.0}>()
    r2 = Mul(r1, two)
    t = Add(s1, r2)
    cat = Concat<axis = 1>(r1, t)
    dw_w = Constant<value = float[8, 1, 1, 1] {1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0}>()
    dw = Conv<group = 8>(cat, dw_w)
    p = MaxPool<kernel_shape = [2, 2], strides = [2, 2]>(dw)
    sizes = Constant<value = int64[2] {4, 4}>()
    pa, pb = Split<axis = 1>(p, sizes)
    d = Identity(pa)
    f = Flatten(p)
    fw = Constant<value = float[128, 10] {%s}>()
    y = Gemm(f, fw)
}"""


@pytest.fixture(scope="module")
def cnn() -> ir.Model:
    return _model(CNN % ", ".join(["0.01"] * 1280))


def test_channels_follow_norms_and_activations(cnn):
    conv = _node(cnn, "c1")
    flow = ops.channel_flow(conv, 1, 0)  # weight rows: the output channels
    assert flow.edges == (ops.ChannelEdge(0, 1),) and flow.tied == ((2, 0),)
    bn = ops.channel_flow(_node(cnn, "n1"), 0, 1)
    assert bn.edges == (ops.ChannelEdge(0, 1),) and bn.tied == ((1, 0), (2, 0), (3, 0), (4, 0))
    assert ops.channel_flow(_node(cnn, "r1"), 0, 1).edges == (ops.ChannelEdge(0, 1),)


def test_channels_tie_broadcast_operands(cnn):
    add = ops.channel_flow(_node(cnn, "s1"), 0, 1)  # the [4, 1, 1] constant is per channel
    assert add.edges == (ops.ChannelEdge(0, 1),) and add.tied == ((1, 0),)
    mul = ops.channel_flow(_node(cnn, "r2"), 0, 1)  # a scalar is not
    assert mul.tied == ()
    both = ops.channel_flow(_node(cnn, "t"), 1, 1)
    assert both.tied == ((0, 1),)


def test_channels_concat_offsets_and_depthwise_conv(cnn):
    cat = _node(cnn, "cat")
    assert ops.channel_flow(cat, 0, 1).edges == (ops.ChannelEdge(0, 1, "offset", offset=0),)
    assert ops.channel_flow(cat, 1, 1).edges == (ops.ChannelEdge(0, 1, "offset", offset=4),)
    assert ops.channel_flow(cat, 1, 0).tied == ((0, 0),)  # other axes are shared by all inputs
    dw = ops.channel_flow(_node(cnn, "dw"), 0, 1)
    assert dw.edges == (ops.ChannelEdge(0, 1),) and dw.tied == ((1, 0),) and not dw.consumed


def test_channels_through_pool_split_flatten_into_gemm(cnn):
    assert ops.channel_flow(_node(cnn, "p"), 0, 1).edges == (ops.ChannelEdge(0, 1),)
    assert ops.channel_flow(_node(cnn, "p"), 0, 2).stop == "MaxPool resamples spatial axis 2"
    split = ops.channel_flow(_node(cnn, "pa"), 0, 1)
    assert [(e.output, e.start, e.stop) for e in split.edges] == [(0, 0, 4), (1, 4, 8)]
    flat = ops.channel_flow(_node(cnn, "f"), 0, 1)
    assert flat.edges == (ops.ChannelEdge(0, 1, "blocks", block=16),)
    gemm = ops.channel_flow(_node(cnn, "y"), 0, 1)
    assert gemm.consumed and gemm.tied == ((1, 0),)  # Gemm W [K, N]: K is the input axis


def test_channels_consumed_by_conv_and_stopped_elsewhere(cnn):
    conv = ops.channel_flow(_node(cnn, "c1"), 0, 1)
    assert conv.consumed and conv.tied == ((1, 1),) and conv.edges == ()
    grouped = _model("""<ir_version: 8, opset_import: ["" : 17]>
g (float[1, 4, 4, 4] x, float[6, 2, 1, 1] w) => (float[1, 6, 4, 4] y, float[1, 4, 4, 4] z) {
    y = Conv<group = 2>(x, w)
    z = Softmax<axis = 1>(x)
}""")
    assert "group=2" in ops.channel_flow(_node(grouped, "y"), 0, 1).stop
    assert (
        ops.channel_flow(_node(grouped, "z"), 0, 1).stop
        == "Softmax normalizes over the channel axis"
    )
    assert ops.channel_flow(_node(grouped, "z"), 0, 2).edges == (ops.ChannelEdge(0, 2),)


def test_channels_transpose_reshape_slice():
    model = _model("""<ir_version: 8, opset_import: ["" : 17]>
g (float[2, 8, 3, 3] x) => (float[2, 3, 3, 8] t, float[2, 72] r, float[2, 2, 4, 9] s, float[2, 3, 3, 3] c) {
    t = Transpose<perm = [0, 2, 3, 1]>(x)
    shape = Constant<value = int64[2] {2, -1}>()
    r = Reshape(x, shape)
    shape2 = Constant<value = int64[4] {2, 2, 4, 9}>()
    s = Reshape(x, shape2)
    starts = Constant<value = int64[1] {1}>()
    ends = Constant<value = int64[1] {7}>()
    axes = Constant<value = int64[1] {1}>()
    steps = Constant<value = int64[1] {2}>()
    c = Slice(x, starts, ends, axes, steps)
}""")
    assert ops.channel_flow(_node(model, "t"), 0, 1).edges == (ops.ChannelEdge(0, 3),)
    assert ops.channel_flow(_node(model, "r"), 0, 1).edges == (
        ops.ChannelEdge(0, 1, "blocks", block=9),
    )
    assert "splits or regroups" in ops.channel_flow(_node(model, "s"), 0, 1).stop
    assert ops.channel_flow(_node(model, "c"), 0, 1).edges == (
        ops.ChannelEdge(0, 1, "range", start=1, stop=7, step=2),
    )
    assert ops.channel_flow(_node(model, "c"), 0, 2).edges == (ops.ChannelEdge(0, 2),)


def test_unknown_op_stops_with_a_reason():
    model = _model("""<ir_version: 8, opset_import: ["" : 17]>
g (float[1, 4, 4, 4] x) => (float[1, 1, 8, 8] y) {
    y = DepthToSpace<blocksize = 2>(x)
}""")
    assert (
        ops.channel_flow(_node(model, "y"), 0, 1).stop == "DepthToSpace moves channels into space"
    )
    node = ir.node("TopK", [model.graph.inputs[0]])
    assert ops.channel_flow(node, 0, 1).stop == "TopK has no channel rule"
