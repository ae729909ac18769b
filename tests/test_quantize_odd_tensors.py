"""One odd tensor does not disable a mode: a -inf attention-bias table stays float, the rest is
quantized, and a weight read by two MatMuls is quantized once."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.parser
import onnx_ir as ir
import pytest

from onnxcomp import runtime
from onnxcomp.data import NpzData
from onnxcomp.quantize.dynamic import DynamicQuantizeOptions, DynamicQuantizePass
from onnxcomp.quantize.weight_only import WeightOnlyOptions, WeightOnlyQuantizePass

H, V, S = 64, 50, 32

# A one-layer attention block: token embeddings, a padding bias looked up per sample (its second
# row is -inf over the last 5 positions), wq read twice (the query and a second projection).
ATTENTION = f"""
<ir_version: 8, opset_import: ["" : 21]>
attention (int64[batch, {S}] ids, int64[batch] kind) => (float[batch, 10] logits) {{
    x = Gather(emb, ids)
    q = MatMul(x, wq)
    k = MatMul(x, wk)
    v = MatMul(x, wv)
    kt = Transpose <perm = [0, 2, 1]> (k)
    s0 = MatMul(q, kt)
    s1 = Mul(s0, scale)
    b0 = Gather(bias_table, kind)
    b1 = Unsqueeze(b0, one)
    s2 = Add(s1, b1)
    p = Softmax <axis = -1> (s2)
    a = MatMul(p, v)
    h = MatMul(a, wo)
    r = Add(h, x)
    g = MatMul(r, wq)
    pooled = ReduceMean <keepdims = 0> (g, one)
    logits = MatMul(pooled, wc)
}}
"""


def attention_model() -> ir.Model:
    rng = np.random.default_rng(0)
    proto = onnx.parser.parse_model(ATTENTION)

    def w(*shape):
        return (rng.standard_normal(shape) / np.sqrt(shape[0])).astype(np.float32)

    bias = np.zeros((2, S), np.float32)
    bias[1, -5:] = -np.inf
    arrays = {
        "emb": rng.standard_normal((V, H)).astype(np.float32),
        "wq": w(H, H),
        "wk": w(H, H),
        "wv": w(H, H),
        "wo": w(H, H),
        "wc": w(H, 10),
        "scale": np.array(1 / np.sqrt(H), np.float32),
        "bias_table": bias,
        "one": np.array([1], np.int64),
    }
    for name, array in arrays.items():
        proto.graph.initializer.append(onnx.numpy_helper.from_array(array, name))
    return ir.from_proto(proto)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    rng = np.random.default_rng(1)
    path = tmp_path_factory.mktemp("odd") / "attention.npz"
    np.savez(
        path,
        ids=rng.integers(0, V, (64, S)).astype(np.int64),
        kind=(rng.random(64) < 0.5).astype(np.int64),  # half the samples are padded
    )
    return path


def run(model: ir.Model, data_path) -> np.ndarray:
    feeds = dict(np.load(data_path))
    return runtime.run(runtime.create_session(model), feeds)["logits"]


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.sum(a * b) / (np.linalg.norm(a) * np.linalg.norm(b)))


def bias_table_skipped(report) -> str:
    (entry,) = [s for s in report["skipped"] if s["node"] == "b0"]
    return entry["reason"]


@pytest.mark.parametrize("form", ["onnx", "contrib"])
def test_dynamic_keeps_the_inf_table_float_and_shares_wq(data, form):
    ref = run(attention_model(), data)
    options = DynamicQuantizeOptions(form=form, smooth=False)
    result = DynamicQuantizePass(options, NpzData(data))(attention_model())

    assert "5 inf of 64 values" in bias_table_skipped(result.report)
    layers = {layer["node"]: layer for layer in result.report["layers"]}
    assert {name for name, layer in layers.items() if layer["status"] == "int8"} == {
        "q", "k", "v", "h", "g", "logits",
    }  # fmt: skip
    assert layers["g"]["shares_weight_with"] == "q"
    int8_weights = [v for v in result.model.graph.initializers.values() if "W_int8" in v.name]
    assert len(int8_weights) == 5  # six quantized MatMuls, five distinct weights
    assert result.report["embeddings"][0]["node"] == "x"  # the token table is quantized

    out = run(result.model, data)
    assert np.all(np.isfinite(out))
    assert cosine(out, ref) > 0.999
    assert np.mean(np.argmax(out, 1) == np.argmax(ref, 1)) > 0.95


@pytest.mark.parametrize("form", ["onnx", "contrib"])
def test_weight_only_keeps_the_inf_table_float_and_shares_wq(data, form):
    ref = run(attention_model(), data)
    options = WeightOnlyOptions(bits=8, block_size=32, form=form)
    result = WeightOnlyQuantizePass(options, NpzData(data))(attention_model())

    assert "5 inf of 64 values" in bias_table_skipped(result.report)
    layers = {layer["node"]: layer for layer in result.report["layers"]}
    assert set(layers) == {"x", "q", "k", "v", "h", "g", "logits"}
    assert layers["g"]["shares_weight_with"] == "q"
    graph = result.model.graph
    readers = [n for n in graph if n.op_type in ("MatMulNBits", "DequantizeLinear")]
    by_name = {n.name: n for n in readers}
    weight_input = 1 if form == "contrib" else 0
    assert (
        by_name["q" if form == "contrib" else "q_dequantize"].inputs[weight_input]
        is (by_name["g" if form == "contrib" else "g_dequantize"].inputs[weight_input])
    )

    out = run(result.model, data)
    assert np.all(np.isfinite(out))
    assert cosine(out, ref) > 0.999


def test_static_plan_keeps_a_nonfinite_weight_float_and_plans_the_rest():
    from onnxcomp import model as model_io
    from onnxcomp.quantize.plan import build_plan

    model = attention_model()
    model_io.normalize(model)
    wk = model.graph.initializers["wk"]
    broken = wk.const_value.numpy().copy()
    broken[0, 0] = np.nan
    wk.const_value = ir.tensor(broken, name="wk")

    plan = build_plan(model)
    reasons = [d["reason"] for d in plan.to_json()["float_nodes"]]
    assert (
        reasons.count(
            "weight holds 1 NaN of 4096 values, which no integer code can stand for: kept float"
        )
        == 1
    )
    assert {w.value.name for w in plan.weights} == {"wq", "wv", "wo", "wc"}
