"""Weight-only int4/int8 quantization: MatMulNBits and GatherBlockQuantized run in onnxruntime as written."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from onnxcomp import runtime
from onnxcomp.data import NpzData
from onnxcomp.errors import OnnxcompError
from onnxcomp.passes import parse_options
from onnxcomp.quantize import schemes
from onnxcomp.quantize.weight_only import WeightOnlyOptions, WeightOnlyQuantizePass


def from_text(text: str, **weights: np.ndarray) -> ir.Model:
    proto = onnx.parser.parse_model(text)
    for name, array in weights.items():
        proto.graph.initializer.append(onnx.numpy_helper.from_array(np.asarray(array), name))
    return ir.from_proto(proto)


def linear(w: np.ndarray, b: np.ndarray | None = None) -> ir.Model:
    k, n = w.shape
    body = "y = MatMul(x, w)" if b is None else "h = MatMul(x, w)\n y = Add(h, b)"
    text = f"""
        <ir_version: 8, opset_import: ["" : 17]>
        linear (float[batch, seq, {k}] x) => (float[batch, seq, {n}] y) {{
            {body}
        }}
    """
    weights = {"w": w.astype(np.float32)}
    if b is not None:
        weights["b"] = b.astype(np.float32)
    return from_text(text, **weights)


def run(model: ir.Model, feeds: dict[str, np.ndarray]) -> np.ndarray:
    session = runtime.create_session(model)
    return next(iter(runtime.run(session, feeds).values()))


def blockwise_weight(model: ir.Model) -> tuple[ir.Node, np.ndarray]:
    """The MatMulNBits node and the float weight it computes with, read back from its initializers."""
    node = next(n for n in model.graph if n.op_type == "MatMulNBits")
    attrs = {k: v.value for k, v in node.attributes.items()}
    zero_points = node.inputs[3] if len(node.inputs) > 3 else None
    q = schemes.BlockwiseWeight(
        packed=node.inputs[1].const_value.numpy(),
        scales=node.inputs[2].const_value.numpy(),
        zero_points=None if zero_points is None else zero_points.const_value.numpy(),
        K=attrs["K"],
        N=attrs["N"],
        bits=attrs["bits"],
        block_size=attrs["block_size"],
    )
    return node, schemes.dequantize_blockwise(q)


@pytest.mark.parametrize(
    ("bits", "block_size", "symmetric"),
    [(4, 32, True), (4, 64, False), (4, 128, True), (8, 32, False), (8, 128, True)],
)
def test_matmulnbits_matches_float_matmul_with_dequantized_weights(bits, block_size, symmetric):
    rng = np.random.default_rng(bits * 1000 + block_size)
    w = rng.standard_normal((200, 48)).astype(np.float32)  # K = 200: not a whole number of blocks
    model = linear(w)
    x = rng.standard_normal((2, 5, 200)).astype(np.float32)
    options = WeightOnlyOptions(form="contrib", 
        bits=bits, block_size=block_size, symmetric=symmetric, accuracy_level=1
    )

    result = WeightOnlyQuantizePass(options)(model)

    node, deq = blockwise_weight(result.model)
    assert [n.op_type for n in result.model.graph] == ["MatMulNBits"]
    assert (len(node.inputs) > 3) == (not symmetric)  # zero points only when asymmetric
    out = run(result.model, {"x": x})
    np.testing.assert_allclose(out, x @ deq, rtol=1e-4, atol=1e-4)
    layer = result.report["layers"][0]
    assert layer["to"] == "MatMulNBits" and layer["weight_sqnr_db"] > (30 if bits == 8 else 10)
    assert result.report["weight_bytes_after"] < result.report["weight_bytes_before"] * (
        bits / 32 + 0.15
    )


def test_bias_add_is_folded_and_int8_activations_stay_close():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((128, 64)).astype(np.float32)
    b = rng.standard_normal(64).astype(np.float32)
    x = rng.standard_normal((1, 9, 128)).astype(np.float32)
    model = linear(w, b)
    ref = run(model, {"x": x})

    result = WeightOnlyQuantizePass(WeightOnlyOptions(form="contrib", bits=8, accuracy_level=4))(model)

    assert [n.op_type for n in result.model.graph] == ["MatMulNBits"]
    assert "w" not in result.model.graph.initializers  # the float weight is gone
    out = run(result.model, {"x": x})
    cos = float(np.sum(ref * out) / np.linalg.norm(ref) / np.linalg.norm(out))
    assert cos > 0.999


def test_gemm_becomes_matmulnbits_with_bias():
    rng = np.random.default_rng(6)
    text = """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[batch, 64] x) => (float[batch, 16] y) {
            y = Gemm <transB: int = 1, alpha: float = 0.5, beta: float = 2.0> (x, w, c)
        }
    """
    model = from_text(
        text,
        w=rng.standard_normal((16, 64)).astype(np.float32),
        c=rng.standard_normal(16).astype(np.float32),
    )
    x = rng.standard_normal((3, 64)).astype(np.float32)
    ref = run(model, {"x": x})

    result = WeightOnlyQuantizePass(WeightOnlyOptions(form="contrib", bits=8, accuracy_level=1))(model)

    assert [n.op_type for n in result.model.graph] == ["MatMulNBits"]
    assert result.report["layers"][0]["op"] == "Gemm"
    out = run(result.model, {"x": x})
    np.testing.assert_allclose(out, ref, rtol=0.02, atol=0.02)


def test_gptq_beats_round_to_nearest_on_correlated_inputs(tmp_path):
    # Correlated inputs (a low-rank mix plus noise) make some weight directions matter far more than others:
    # GPTQ spreads each column's rounding error where the inputs do not look.
    rng = np.random.default_rng(2)
    k, n = 128, 64
    mix = rng.standard_normal((16, k)).astype(np.float32)

    def inputs(samples: int) -> np.ndarray:
        z = rng.standard_normal((samples, 8, 16)).astype(np.float32)
        return (z @ mix + 0.05 * rng.standard_normal((samples, 8, k))).astype(np.float32)

    calib_path = tmp_path / "calib.npz"
    np.savez(calib_path, x=inputs(64))
    test = inputs(16)
    w = rng.standard_normal((k, n)).astype(np.float32)
    ref = run(linear(w), {"x": test})
    errors = {}
    reports = {}
    for algorithm in ("rtn", "gptq"):
        options = WeightOnlyOptions(form="contrib", bits=4, block_size=32, algorithm=algorithm, accuracy_level=1)
        result = WeightOnlyQuantizePass(options, NpzData(calib_path))(linear(w))
        errors[algorithm] = float(np.mean((run(result.model, {"x": test}) - ref) ** 2))
        reports[algorithm] = result.report

    assert errors["gptq"] < 0.7 * errors["rtn"]
    layer = reports["gptq"]["layers"][0]
    assert layer["output_error"] < layer["output_error_rtn"]
    assert reports["gptq"]["calibration_rows"] == 64 * 8


def test_gptq_in_chunks_when_hessians_exceed_the_budget(tmp_path, monkeypatch):
    # One Hessian per run over the data; the second layer is calibrated on the first one's quantized output.
    from onnxcomp.quantize import weight_only

    rng = np.random.default_rng(7)
    text = """
        <ir_version: 8, opset_import: ["" : 17]>
        two (float[batch, 64] x) => (float[batch, 32] y) {
            h = MatMul(x, w1)
            r = Relu(h)
            y = MatMul(r, w2)
        }
    """
    weights = {"w1": rng.standard_normal((64, 64)), "w2": rng.standard_normal((64, 32))}
    weights = {k: v.astype(np.float32) for k, v in weights.items()}
    calib_path = tmp_path / "calib.npz"
    np.savez(calib_path, x=rng.standard_normal((32, 64)).astype(np.float32))
    x = rng.standard_normal((8, 64)).astype(np.float32)
    ref = run(from_text(text, **weights), {"x": x})
    monkeypatch.setattr(weight_only, "HESSIAN_MEMORY_BYTES", 1)
    options = WeightOnlyOptions(form="contrib", bits=8, algorithm="gptq", accuracy_level=1)

    result = WeightOnlyQuantizePass(options, NpzData(calib_path))(from_text(text, **weights))

    assert result.report["calibration_runs"] == 2
    assert [n.op_type for n in result.model.graph] == ["MatMulNBits", "Relu", "MatMulNBits"]
    out = run(result.model, {"x": x})
    assert float(np.sum((out - ref) ** 2) / np.sum(ref**2)) < 1e-3


@pytest.mark.parametrize(("bits", "symmetric"), [(4, True), (4, False), (8, True)])
def test_embedding_gather_becomes_gather_block_quantized(bits, symmetric):
    rng = np.random.default_rng(3)
    table = rng.standard_normal((100, 64)).astype(np.float32)
    text = """
        <ir_version: 8, opset_import: ["" : 17]>
        embed (int64[batch, seq] ids) => (float[batch, seq, 64] y) {
            y = Gather(table, ids)
        }
    """
    model = from_text(text, table=table)
    ids = rng.integers(0, 100, (2, 7)).astype(np.int64)

    result = WeightOnlyQuantizePass(
        WeightOnlyOptions(form="contrib", bits=bits, block_size=32, symmetric=symmetric)
    )(model)

    assert [n.op_type for n in result.model.graph] == ["GatherBlockQuantized"]
    out = run(result.model, {"ids": ids})
    q = schemes.quantize_blockwise(table.T, 32, bits, symmetric)
    expected = schemes.dequantize_blockwise(q).T[ids]
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
    assert result.report["layers"][0]["to"] == "GatherBlockQuantized"


def test_bert_graph_int4_and_reasons(tmp_path):
    from models.build_graphs import bert

    model = ir.from_proto(bert(vocab_size=500, hidden=64, layers=2, heads=4, intermediate=256))
    rng = np.random.default_rng(4)
    ids = rng.integers(0, 500, (2, 12)).astype(np.int64)
    ref = run(model, {"input_ids": ids})

    result = WeightOnlyQuantizePass(WeightOnlyOptions(form="contrib", bits=4, block_size=32))(model)

    ops = collections.Counter(n.op_type for n in result.model.graph)
    assert ops["MatMulNBits"] == 12 and ops["GatherBlockQuantized"] == 2
    out = run(result.model, {"input_ids": ids})
    cos = float(np.sum(ref * out) / np.linalg.norm(ref) / np.linalg.norm(out))
    assert cos > 0.95
    reasons = {s["reason"] for s in result.report["skipped"]}
    assert reasons == {"weight is computed at run time (not a constant)"}


def test_gather_with_odd_hidden_size_stays_float_with_reason():
    table = np.zeros((10, 40), np.float32)
    text = """
        <ir_version: 8, opset_import: ["" : 17]>
        embed (int64[n] ids) => (float[n, 40] y) {
            y = Gather(table, ids)
        }
    """
    result = WeightOnlyQuantizePass(WeightOnlyOptions(form="contrib", block_size=32))(from_text(text, table=table))

    assert not result.modified
    assert "not a multiple of block_size 32" in result.report["skipped"][0]["reason"]


@pytest.mark.parametrize(
    ("values", "key"),
    [
        ({"bits": 3}, "bits"),
        ({"block_size": 48}, "block_size"),
        ({"algorithm": "awq"}, "algorithm"),
        ({"accuracy_level": 7}, "accuracy_level"),
        ({"op_types": "MatMul,Conv"}, "op_types"),
        ({"bitz": 4}, "bitz"),
    ],
)
def test_bad_options_name_the_key(values, key):
    with pytest.raises(OnnxcompError, match=key):
        parse_options(WeightOnlyOptions, values, "quantize")


def test_bad_options_in_the_constructor_too():
    with pytest.raises(OnnxcompError, match="bits"):
        WeightOnlyQuantizePass(WeightOnlyOptions(bits=3))


def matmul_chain(path, n: int = 256, layers: int = 5, seed: int = 0) -> None:
    """Five chained MatMuls with [n, n] initializers, no bias, opset 17: the plainest LLM-style stack."""
    from onnx import TensorProto
    from onnx import helper as h

    rng = np.random.default_rng(seed)
    nodes, weights, prev = [], [], "x"
    for i in range(layers):
        w = (rng.standard_normal((n, n)) / np.sqrt(n)).astype(np.float32)
        weights.append(onnx.numpy_helper.from_array(w, f"w{i}"))
        out = "y" if i == layers - 1 else f"h{i}"
        nodes.append(h.make_node("MatMul", [prev, f"w{i}"], [out], name=f"mm{i}"))
        prev = out
    graph = h.make_graph(
        nodes,
        "chain",
        [h.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", n])],
        [h.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", n])],
        weights,
    )
    onnx.save(h.make_model(graph, opset_imports=[h.make_opsetid("", 17)]), path)


@pytest.mark.parametrize("extra", [[], ["--gptq"]])
def test_chain_of_plain_matmuls_int4(cli, tmp_path, extra):
    # Each rewrite renames the float output it replaces; the next layer must read the new one.
    matmul_chain(tmp_path / "mlp.onnx")
    result = cli(
        "quantize", tmp_path / "mlp.onnx", "-o", tmp_path / "q.onnx",
        "--mode", "weight-only", "--bits", "4", *extra,
    )  # fmt: skip
    assert result.exit_code == 0, result.output + (result.stderr or "")
    model = ir.load(tmp_path / "q.onnx")
    # Standard ONNX by default: blocked DequantizeLinear + MatMul, one pair per layer.
    assert [n.op_type for n in model.graph] == ["DequantizeLinear", "MatMul"] * 5
    x = np.random.default_rng(1).standard_normal((4, 256)).astype(np.float32)
    ref = run(ir.load(tmp_path / "mlp.onnx"), {"x": x})
    out = run(model, {"x": x})
    cos = float(np.sum(ref * out) / (np.linalg.norm(ref) * np.linalg.norm(out)))
    assert cos > 0.95


# ---------------------------------------------------------------------------------------------
# The default form: standard ONNX at opset 21 (blocked DequantizeLinear + MatMul), fused by onnxruntime.


def optimized_ops(model: ir.Model, tmp_path) -> collections.Counter:
    """Op types of the graph onnxruntime actually runs (after its own fusions)."""
    path = tmp_path / "optimized.onnx"
    runtime.create_session(model, optimized_model_path=str(path))
    return collections.Counter(node.op_type for node in onnx.load(path).graph.node)


@pytest.mark.parametrize(("bits", "symmetric"), [(4, False), (4, True), (8, False)])
def test_default_is_blocked_dequantize_linear_fused_into_matmulnbits(tmp_path, bits, symmetric):
    rng = np.random.default_rng(7)
    w = rng.standard_normal((128, 48)).astype(np.float32)
    b = rng.standard_normal(48).astype(np.float32)
    x = rng.standard_normal((2, 5, 128)).astype(np.float32)
    model = ir.from_proto(onnx.version_converter.convert_version(ir.to_proto(linear(w, b)), 21))
    contrib = ir.from_proto(ir.to_proto(model))

    result = WeightOnlyQuantizePass(WeightOnlyOptions(bits=bits, symmetric=symmetric))(model)
    reference = WeightOnlyQuantizePass(
        WeightOnlyOptions(form="contrib", bits=bits, symmetric=symmetric)
    )(contrib)

    ops = [n.op_type for n in result.model.graph]
    assert ops == ["DequantizeLinear", "MatMul", "Add"]
    assert {n.domain for n in result.model.graph} == {""}
    onnx.checker.check_model(ir.to_proto(result.model), full_check=True)
    fused = optimized_ops(result.model, tmp_path)
    assert fused["MatMulNBits"] == 1 and fused["DequantizeLinear"] == 0
    # The same codes as the contrib form: the two run the same kernel on the same weights.
    np.testing.assert_allclose(
        run(result.model, {"x": x}), run(reference.model, {"x": x}), rtol=1e-4, atol=1e-4
    )
    assert result.report["layers"][0]["to"] == "DequantizeLinear+MatMul"


def test_default_needs_opset_21_and_says_so():
    model = linear(np.ones((64, 16), np.float32))

    with pytest.raises(OnnxcompError, match="opset 21"):
        WeightOnlyQuantizePass(WeightOnlyOptions())(model)


def test_quantize_weight_only_writes_standard_onnx_and_contrib_on_request(tmp_path):
    from models.build_graphs import bert
    from onnxcomp.quantize.api import QuantizeOptions, quantize

    model = ir.from_proto(bert(vocab_size=500, hidden=64, layers=1, heads=4, intermediate=256))
    rng = np.random.default_rng(4)
    ids = rng.integers(0, 500, (2, 12)).astype(np.int64)
    ref = run(ir.from_proto(ir.to_proto(model)), {"input_ids": ids})
    options = QuantizeOptions(
        mode="weight-only", optimize=False, check_samples=4, shapes={"input_ids": [2, 12]}
    )

    standard, report = quantize(ir.from_proto(ir.to_proto(model)), options)
    contrib, _ = quantize(model, QuantizeOptions(**{**vars(options), "contrib_ops": True}))

    assert report["prepare"]["opset"]["to"] == 21
    assert {n.domain for n in standard.graph} <= {"", "ai.onnx"}
    onnx.checker.check_model(ir.to_proto(standard), full_check=True)
    ops = collections.Counter(n.op_type for n in standard.graph)
    assert ops["DequantizeLinear"] == 6 and ops["MatMulNBits"] == 0
    assert optimized_ops(standard, tmp_path)["MatMulNBits"] == 6
    contrib_ops = collections.Counter(n.op_type for n in contrib.graph if n.domain == "com.microsoft")
    assert contrib_ops["MatMulNBits"] == 6 and contrib_ops["GatherBlockQuantized"] == 2
    out = run(standard, {"input_ids": ids})
    assert float(np.sum(ref * out) / np.linalg.norm(ref) / np.linalg.norm(out)) > 0.95
