"""Dynamic int8 quantization: quantized models run in onnxruntime, stay close to float, and use the integer kernels."""

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
from onnxcomp.quantize.dynamic import DynamicQuantizeOptions, DynamicQuantizePass


def from_text(text: str, **weights: np.ndarray) -> ir.Model:
    """A model from ONNX text, with its float32 weights given as arrays."""
    proto = onnx.parser.parse_model(text)
    for name, array in weights.items():
        proto.graph.initializer.append(
            onnx.numpy_helper.from_array(np.asarray(array, np.float32), name)
        )
    return ir.from_proto(proto)


def mlp(rng: np.random.Generator, k: int = 64, hidden: int = 128, n: int = 32) -> ir.Model:
    """x -> MatMul + bias Add -> Relu -> MatMul: the shape of a transformer feed-forward block."""
    text = f"""
        <ir_version: 8, opset_import: ["" : 17]>
        mlp (float[batch, seq, {k}] x) => (float[batch, seq, {n}] y) {{
            h = MatMul(x, w1)
            hb = Add(h, b1)
            r = Relu(hb)
            y = MatMul(r, w2)
        }}
    """
    return from_text(
        text,
        w1=rng.standard_normal((k, hidden)) / np.sqrt(k),
        b1=rng.standard_normal(hidden) * 0.1,
        w2=rng.standard_normal((hidden, n)) / np.sqrt(hidden),
    )


def attention_projections(rng: np.random.Generator, k: int = 64) -> ir.Model:
    """Three MatMuls reading one input, as the query/key/value projections do."""
    text = f"""
        <ir_version: 8, opset_import: ["" : 17]>
        qkv (float[batch, seq, {k}] x) => (float[batch, seq, {k}] q, float[batch, seq, {k}] kk, float[batch, seq, {k}] v) {{
            q = MatMul(x, wq)
            kk = MatMul(x, wk)
            v = MatMul(x, wv)
        }}
    """
    return from_text(
        text, **{n: rng.standard_normal((k, k)) / np.sqrt(k) for n in ("wq", "wk", "wv")}
    )


def copy_of(model: ir.Model) -> ir.Model:
    return ir.from_proto(ir.to_proto(model))


def run(model: ir.Model, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    session = runtime.create_session(model)
    return list(runtime.run(session, feeds).values())


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.reshape(-1).astype(np.float64), b.reshape(-1).astype(np.float64)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def sqnr_db(ref: np.ndarray, approx: np.ndarray) -> float:
    return float(10 * np.log10(np.sum(ref.astype(np.float64) ** 2) / np.sum((ref - approx) ** 2.0)))


def optimized_ops(model: ir.Model, tmp_path) -> collections.Counter:
    """Op types of the graph onnxruntime actually runs (after its own fusions)."""
    path = tmp_path / "optimized.onnx"
    runtime.create_session(model, optimized_model_path=str(path))
    return collections.Counter(node.op_type for node in onnx.load(path).graph.node)


def npz(tmp_path, name: str = "calib.npz", **arrays: np.ndarray) -> NpzData:
    path = tmp_path / name
    np.savez(path, **arrays)
    return NpzData(path)


def test_mlp_runs_as_integer_kernels_and_stays_close(tmp_path):
    rng = np.random.default_rng(0)
    model = mlp(rng)
    x = rng.standard_normal((2, 8, 64)).astype(np.float32)
    (ref,) = run(model, {"x": x})

    result = DynamicQuantizePass(DynamicQuantizeOptions(smooth=False, bias_correction=False))(model)

    (out,) = run(result.model, {"x": x})
    assert cosine(ref, out) > 0.999
    ops = optimized_ops(result.model, tmp_path)
    assert ops["DynamicQuantizeMatMul"] == 2
    assert ops["MatMul"] == 0 and ops["Add"] == 0  # the bias Add went into the kernel
    report = result.report
    assert report["quantized"] == 2 and report["kept_float"] == 0
    assert [layer["status"] for layer in report["layers"]] == ["int8", "int8"]
    assert all(layer["weight_sqnr_db"] > 35 for layer in report["layers"])
    # The float weights are gone: int8 weights are a quarter of the size.
    assert "w1" not in result.model.graph.initializers


def test_without_data_only_per_channel_int8():
    rng = np.random.default_rng(8)
    model = attention_projections(rng)

    result = DynamicQuantizePass(DynamicQuantizeOptions(form="contrib"))(model)

    assert result.report["calibration"].startswith("none")
    ops = collections.Counter(node.op_type for node in result.model.graph)
    assert ops == {"DynamicQuantizeLinear": 1, "MatMulIntegerToFloat": 3}
    assert all("output_sqnr_db" not in layer for layer in result.report["layers"])


def test_shared_input_is_quantized_once(tmp_path):
    rng = np.random.default_rng(1)
    model = attention_projections(rng)
    x = rng.standard_normal((1, 11, 64)).astype(np.float32)
    refs = run(model, {"x": x})

    result = DynamicQuantizePass(
        DynamicQuantizeOptions(form="contrib", smooth=False, bias_correction=False)
    )(model)

    ops = collections.Counter(node.op_type for node in result.model.graph)
    assert ops["DynamicQuantizeLinear"] == 1 and ops["MatMulIntegerToFloat"] == 3
    for ref, out in zip(refs, run(result.model, {"x": x})):
        assert cosine(ref, out) > 0.999


def test_gemm_with_trans_b_alpha_beta():
    rng = np.random.default_rng(2)
    text = """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[batch, 48] x) => (float[batch, 16] y) {
            y = Gemm <transB: int = 1, alpha: float = 0.5, beta: float = 2.0> (x, w, c)
        }
    """
    model = from_text(text, w=rng.standard_normal((16, 48)), c=rng.standard_normal(16))
    x = rng.standard_normal((4, 48)).astype(np.float32)
    (ref,) = run(model, {"x": x})

    result = DynamicQuantizePass(
        DynamicQuantizeOptions(form="contrib", smooth=False, bias_correction=False)
    )(model)

    assert [n.op_type for n in result.model.graph] == ["DynamicQuantizeMatMul"]
    (out,) = run(result.model, {"x": x})
    assert cosine(ref, out) > 0.999


def test_standard_onnx_form_is_fused_by_onnxruntime(tmp_path):
    rng = np.random.default_rng(3)
    model = mlp(rng)
    x = rng.standard_normal((1, 8, 64)).astype(np.float32)
    (ref,) = run(model, {"x": x})

    result = DynamicQuantizePass(
        DynamicQuantizeOptions(form="onnx", smooth=False, bias_correction=False)
    )(model)

    written = collections.Counter(node.op_type for node in result.model.graph)
    assert written["MatMulInteger"] == 2 and not any(n.domain for n in result.model.graph)
    fused = optimized_ops(result.model, tmp_path)
    assert fused["MatMulInteger"] == 0
    assert fused["DynamicQuantizeMatMul"] + fused["MatMulIntegerToFloat"] == 2
    (out,) = run(result.model, {"x": x})
    assert cosine(ref, out) > 0.999


def test_default_is_standard_onnx_that_passes_the_full_checker(tmp_path):
    from models.build_graphs import bert

    model = ir.from_proto(bert(vocab_size=500, hidden=64, layers=1, heads=4, intermediate=256))
    rng = np.random.default_rng(11)
    calib = npz(tmp_path, input_ids=rng.integers(0, 500, (8, 12)).astype(np.int64))
    ids = rng.integers(0, 500, (2, 12)).astype(np.int64)
    (ref,) = run(copy_of(model), {"input_ids": ids})

    result = DynamicQuantizePass(DynamicQuantizeOptions(), calib)(model)

    assert {n.domain for n in result.model.graph} <= {"", "ai.onnx"}
    assert "com.microsoft" not in result.model.opset_imports
    onnx.checker.check_model(ir.to_proto(result.model), full_check=True)
    # Embedding tables are int8 with one scale per row (Gather -> Cast -> Mul), not GatherBlockQuantized.
    assert [e["to"] for e in result.report["embeddings"]] == ["Gather int8 (per-row scale)"] * 2
    assert result.report["blockwise_layers"] == 0
    fused = optimized_ops(result.model, tmp_path)
    assert fused["MatMulInteger"] == 0
    assert fused["DynamicQuantizeMatMul"] + fused["MatMulIntegerToFloat"] == 6
    (out,) = run(result.model, {"input_ids": ids})
    assert cosine(ref, out) > 0.99


def test_contrib_ops_give_the_contrib_form(tmp_path):
    from models.build_graphs import bert

    model = ir.from_proto(bert(vocab_size=500, hidden=64, layers=1, heads=4, intermediate=256))
    rng = np.random.default_rng(11)
    calib = npz(tmp_path, input_ids=rng.integers(0, 500, (8, 12)).astype(np.int64))

    result = DynamicQuantizePass(DynamicQuantizeOptions(form="contrib"), calib)(model)

    ops = collections.Counter(n.op_type for n in result.model.graph if n.domain == "com.microsoft")
    assert ops["GatherBlockQuantized"] == 2
    assert ops["DynamicQuantizeMatMul"] + ops["MatMulIntegerToFloat"] + ops["MatMulNBits"] == 6
    assert not any(n.op_type == "MatMulInteger" for n in result.model.graph)


def test_conv_never_becomes_conv_integer_by_default(models_dir):
    model = ir.load(models_dir / "digits_cnn.onnx")
    convs = sum(node.op_type == "Conv" for node in model.graph)
    assert convs > 0

    result = DynamicQuantizePass(DynamicQuantizeOptions())(model)

    ops = collections.Counter(node.op_type for node in result.model.graph)
    assert ops["ConvInteger"] == 0 and ops["Conv"] == convs
    reasons = [s["reason"] for s in result.report["skipped"] if s["op"] == "Conv"]
    assert len(reasons) == convs and "ConvInteger" in reasons[0]


def test_conv_integer_when_asked(models_dir):
    model = ir.load(models_dir / "digits_cnn.onnx")
    data = NpzData(models_dir / "digits_test.npz")
    batch = next(data.batches(16))
    (ref, *_) = run(model, batch.inputs)

    options = parse_options(DynamicQuantizeOptions, {"op_types": "Conv,MatMul,Gemm"}, "test")
    result = DynamicQuantizePass(options, data)(model)

    ops = collections.Counter(node.op_type for node in result.model.graph)
    assert ops["ConvInteger"] > 0
    (out, *_) = run(result.model, batch.inputs)
    assert np.mean(ref.argmax(-1) == out.argmax(-1)) >= 0.9


def test_smoothing_moves_activation_outliers_into_weights(tmp_path):
    # Inputs with a few outlier channels (as LayerNorm outputs of transformers have): per-tensor activation scales
    # waste their levels on the outliers; SmoothQuant divides them out and gives the output error back.
    rng = np.random.default_rng(4)
    model = attention_projections(rng)
    channel_scale = np.ones(64, np.float32)
    channel_scale[[3, 17, 40]] = 60.0
    calib = (rng.standard_normal((16, 11, 64)) * channel_scale).astype(np.float32)
    test = (rng.standard_normal((4, 11, 64)) * channel_scale).astype(np.float32)
    refs = run(model, {"x": test})
    plain_options = DynamicQuantizeOptions(
        form="contrib", smooth=False, bias_correction=False, blockwise=False
    )
    smooth_options = DynamicQuantizeOptions(
        form="contrib", smooth=True, bias_correction=False, blockwise=False
    )

    plain = DynamicQuantizePass(plain_options, npz(tmp_path, x=calib))(copy_of(model))
    smoothed = DynamicQuantizePass(smooth_options, npz(tmp_path, x=calib))(copy_of(model))

    assert smoothed.report["smoothed_groups"] == 1
    assert smoothed.report["layers"][0]["smooth_alpha"] > 0
    assert sum(n.op_type == "Mul" for n in smoothed.model.graph) == 1  # x / s, shared by the three
    plain_out = run(plain.model, {"x": test})
    smooth_out = run(smoothed.model, {"x": test})
    for ref, a, b in zip(refs, plain_out, smooth_out):
        assert sqnr_db(ref, b) > sqnr_db(ref, a) + 6


def test_smoothing_after_a_layer_norm_is_folded_into_its_scale_and_bias(tmp_path):
    # Pre-norm transformer blocks: the query/key/value projections read a LayerNormalization whose
    # scale has a few huge channels. x / s goes into the norm's scale and bias: no Mul at run time.
    rng = np.random.default_rng(5)
    k = 64
    gamma = np.ones(k, np.float32)
    gamma[[3, 17, 40]] = 60.0
    text = f"""
        <ir_version: 8, opset_import: ["" : 17]>
        block (float[batch, seq, {k}] x)
            => (float[batch, seq, {k}] q, float[batch, seq, {k}] kk, float[batch, seq, {k}] v) {{
            n = LayerNormalization <axis = -1> (x, gamma, beta)
            q = MatMul(n, wq)
            kk = MatMul(n, wk)
            v = MatMul(n, wv)
        }}
    """
    weights = {name: rng.standard_normal((k, k)) / np.sqrt(k) for name in ("wq", "wk", "wv")}
    model = from_text(text, gamma=gamma, beta=rng.standard_normal(k) * 0.1, **weights)
    calib = rng.standard_normal((16, 11, k)).astype(np.float32)
    test = rng.standard_normal((4, 11, k)).astype(np.float32)
    refs = run(model, {"x": test})
    options = dict(bias_correction=False, blockwise=False)

    plain_options = DynamicQuantizeOptions(smooth=False, **options)
    plain = DynamicQuantizePass(plain_options, npz(tmp_path, x=calib))(copy_of(model))
    smoothed = DynamicQuantizePass(DynamicQuantizeOptions(**options), npz(tmp_path, x=calib))(
        copy_of(model)
    )

    layer = smoothed.report["layers"][0]
    assert layer["smooth_alpha"] > 0 and layer["smooth"] == "folded into the producer"
    ops = collections.Counter(n.op_type for n in smoothed.model.graph)
    # each MatMulInteger's two scale Muls, and no x / s
    assert ops["MatMulInteger"] == 3 and ops["Mul"] == 6
    assert ops["DynamicQuantizeLinear"] == 1
    smooth_out = run(smoothed.model, {"x": test})
    for ref, a, b in zip(refs, run(plain.model, {"x": test}), smooth_out):
        assert sqnr_db(ref, b) > sqnr_db(ref, a) + 6


def test_small_smoothing_gain_is_not_worth_a_mul(tmp_path):
    # Inputs without outlier channels and no layer norm to fold into: smoothing would gain little,
    # and its Mul over the whole activation would cost more than it saves.
    rng = np.random.default_rng(6)
    model = attention_projections(rng)
    calib = rng.standard_normal((16, 11, 64)).astype(np.float32)

    result = DynamicQuantizePass(DynamicQuantizeOptions(), npz(tmp_path, x=calib))(model)

    assert result.report["smoothed_groups"] == 0
    assert all("smooth_alpha" not in layer for layer in result.report["layers"])
    assert not any(n.name.endswith("_smooth") for n in result.model.graph)


def test_outlier_tokens_get_blockwise_kernel(tmp_path):
    # Inputs whose first token is huge (as the first token of transformer layers often is): one per-tensor scale
    # loses all the other tokens and no per-channel smoothing can help, so the layers run as MatMulNBits with
    # per-token, per-block activation scales.
    rng = np.random.default_rng(5)
    model = mlp(rng, k=128, hidden=256, n=64)
    calib = rng.standard_normal((16, 11, 128)).astype(np.float32)
    test = rng.standard_normal((4, 11, 128)).astype(np.float32)
    calib[:, 0] *= 50.0
    test[:, 0] *= 50.0
    refs = run(model, {"x": test})
    original = copy_of(model)

    standard = DynamicQuantizePass(DynamicQuantizeOptions(), npz(tmp_path, x=calib))(copy_of(model))
    result = DynamicQuantizePass(DynamicQuantizeOptions(form="contrib"), npz(tmp_path, x=calib))(model)

    # Standard ONNX below opset 21 cannot scale activations per block: those layers stay float, saying why.
    kept = [layer for layer in standard.report["layers"] if layer["status"] == "float"]
    assert kept and all("--contrib-ops" in layer["reason"] for layer in kept)
    assert not any(n.op_type == "MatMulNBits" for n in standard.model.graph)
    blockwise = [layer for layer in result.report["layers"] if layer["status"] == "int8-blockwise"]
    assert blockwise and result.report["blockwise_layers"] == len(blockwise)
    assert all(layer["blockwise_sqnr_db"] >= layer["output_sqnr_db"] + 3 for layer in blockwise)
    assert "gain" in blockwise[0]["reason"]
    assert all(layer["output_sqnr_db"] < 20.0 for layer in blockwise)  # blockwise_max_sqnr_db
    assert sum(n.op_type == "MatMulNBits" for n in result.model.graph) == len(blockwise)
    (out,) = run(result.model, {"x": test})
    plain = DynamicQuantizePass(DynamicQuantizeOptions(blockwise=False), npz(tmp_path, x=calib))(
        original
    )
    (plain_out,) = run(plain.model, {"x": test})
    # Judged on the ordinary tokens, which per-tensor scales sacrifice.
    assert sqnr_db(refs[0][:, 1:], out[:, 1:]) > sqnr_db(refs[0][:, 1:], plain_out[:, 1:]) + 6


def test_bert_graph_close_to_float(tmp_path):
    from models.build_graphs import bert

    model = ir.from_proto(bert(vocab_size=500, hidden=64, layers=2, heads=4, intermediate=256))
    rng = np.random.default_rng(6)
    calib = npz(tmp_path, input_ids=rng.integers(0, 500, (16, 12)).astype(np.int64))
    ids = rng.integers(0, 500, (4, 12)).astype(np.int64)
    (ref,) = run(model, {"input_ids": ids})

    result = DynamicQuantizePass(DynamicQuantizeOptions(), calib)(model)

    (out,) = run(result.model, {"input_ids": ids})
    assert cosine(ref, out) > 0.995
    assert result.report["quantized"] == 12
    # The attention products (both inputs computed at run time) stay float, and say why.
    reasons = {s["reason"] for s in result.report["skipped"]}
    assert reasons == {"weight is computed at run time (not a constant)"}


def test_calibration_in_chunks_gives_the_same_model(tmp_path, monkeypatch):
    # Models whose candidate weights do not fit the calibration memory budget are calibrated a few groups at a
    # time, with more runs over the data and the same result.
    from onnxcomp.quantize import dynamic

    rng = np.random.default_rng(10)
    calib = npz(tmp_path, x=rng.standard_normal((8, 11, 64)).astype(np.float32))
    one = DynamicQuantizePass(DynamicQuantizeOptions(), calib)(mlp(np.random.default_rng(0)))
    monkeypatch.setattr(dynamic, "CALIBRATION_MEMORY_BYTES", 1)
    chunked = DynamicQuantizePass(DynamicQuantizeOptions(), calib)(mlp(np.random.default_rng(0)))

    assert one.report["calibration_runs"] == 2 and chunked.report["calibration_runs"] == 4
    assert one.report["layers"] == chunked.report["layers"]
    assert (
        ir.to_proto(one.model).SerializeToString() == ir.to_proto(chunked.model).SerializeToString()
    )


def test_keep_float_by_name():
    rng = np.random.default_rng(7)
    model = mlp(rng)
    first = "h"  # nodes without a name are known by their first output's name

    result = DynamicQuantizePass(
        DynamicQuantizeOptions(keep_float=[first], smooth=False, bias_correction=False)
    )(model)

    layers = {layer["node"]: layer for layer in result.report["layers"]}
    assert layers[first]["status"] == "float" and layers[first]["reason"] == "listed in keep_float"
    assert sum(n.op_type == "MatMul" for n in result.model.graph) == 1


def test_opset_below_11_is_refused_with_the_reason():
    text = """
        <ir_version: 7, opset_import: ["" : 10]>
        g (float[2, 4] x) => (float[2, 3] y) {
            y = MatMul(x, w)
        }
    """
    model = from_text(text, w=np.ones((4, 3)))
    with pytest.raises(OnnxcompError, match="opset 10"):
        DynamicQuantizePass(DynamicQuantizeOptions())(model)


def test_least_accurate_layers_kept_float_on_request(tmp_path):
    rng = np.random.default_rng(9)
    model = mlp(rng)
    calib = npz(tmp_path, x=rng.standard_normal((8, 11, 64)).astype(np.float32))
    options = DynamicQuantizeOptions(min_sqnr_db=100.0, max_float_layers=1, blockwise=False)

    result = DynamicQuantizePass(options, calib)(model)

    layers = result.report["layers"]
    floats = [layer for layer in layers if layer["status"] == "float"]
    assert len(floats) == 1 and "below min_sqnr_db=100" in floats[0]["reason"]
    assert floats[0]["output_sqnr_db"] == min(layer["output_sqnr_db"] for layer in layers)
    assert sum(n.op_type == "MatMul" for n in result.model.graph) == 1


@pytest.mark.parametrize(
    ("values", "key"),
    [
        ({"op_types": "MatMul,Softmax"}, "op_types"),
        ({"form": "qdq"}, "form"),
        ({"smooth_alphas": [0.5, 1.5]}, "smooth_alphas"),
        ({"blockwise_block_size": 48}, "blockwise_block_size"),
        ({"per_chanel": True}, "per_chanel"),
    ],
)
def test_bad_options_name_the_key(values, key):
    with pytest.raises(OnnxcompError, match=key):
        parse_options(DynamicQuantizeOptions, values, "quantize")


def residual_block(rng: np.random.Generator, k: int = 64) -> ir.Model:
    """Reshape -> MatMul + bias -> residual Add -> LayerNormalization, as attention blocks end."""
    text = f"""
        <ir_version: 8, opset_import: ["" : 17]>
        block (float[batch, seq, {k}] x) => (float[batch, seq, {k}] y) {{
            s = Shape(x)
            xr = Reshape(x, s)
            h = MatMul(xr, w)
            hb = Add(h, b)
            r = Add(hb, x)
            y = LayerNormalization<axis = -1>(r, gamma, beta)
        }}
    """
    return from_text(
        text,
        w=rng.standard_normal((k, k)) / np.sqrt(k),
        b=rng.standard_normal(k) * 0.1,
        gamma=np.ones(k),
        beta=np.zeros(k),
    )


def test_inferred_shapes_are_dropped_so_onnxruntime_keeps_add_and_layernorm(tmp_path):
    # With the shapes inferred (as `onnxcomp.model.normalize` does), onnxruntime fuses the residual Add and the
    # LayerNormalization into SkipLayerNormalization, 3-5x slower on CPU than the pair. Without them its own
    # inference loses the sequence dimension at the Reshape (a computed shape) and keeps the pair.
    from onnxcomp import model as model_io

    rng = np.random.default_rng(12)
    model = residual_block(rng)
    model_io.normalize(model)
    kept = copy_of(model)
    x = rng.standard_normal((1, 11, 64)).astype(np.float32)
    (ref,) = run(model, {"x": x})

    result = DynamicQuantizePass(DynamicQuantizeOptions())(model)
    keep = DynamicQuantizePass(DynamicQuantizeOptions(keep_shapes=True))(kept)

    assert result.report["shapes_dropped"] > 0 and keep.report["shapes_dropped"] == 0
    ops = optimized_ops(result.model, tmp_path)
    assert ops["SkipLayerNormalization"] == 0 and ops["LayerNormalization"] == 1
    assert optimized_ops(keep.model, tmp_path)["SkipLayerNormalization"] == 1
    assert [v.shape for v in result.model.graph.outputs] == [v.shape for v in kept.graph.outputs]
    (out,) = run(result.model, {"x": x})
    assert cosine(ref, out) > 0.999


@pytest.mark.parametrize("form", ["contrib", "onnx"])
def test_chain_of_plain_matmuls(form):
    # MatMul -> MatMul with nothing between: rewriting one layer renames the tensor the next reads.
    rng = np.random.default_rng(8)
    w0, w1, w2 = (rng.standard_normal((64, 64)).astype(np.float32) / 8 for _ in range(3))
    model = from_text(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        chain (float[batch, 64] x) => (float[batch, 64] y) {
            h0 = MatMul(x, w0)
            h1 = MatMul(h0, w1)
            y = MatMul(h1, w2)
        }
        """,
        w0=w0,
        w1=w1,
        w2=w2,
    )
    x = rng.standard_normal((8, 64)).astype(np.float32)
    ref = run(copy_of(model), {"x": x})[0]
    result = DynamicQuantizePass(DynamicQuantizeOptions(form=form))(model)
    assert result.report["quantized"] == 3
    assert cosine(run(result.model, {"x": x})[0], ref) > 0.99
