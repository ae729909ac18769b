"""Static quantization inside If branches: planned per branch, calibrated through the branch
values onnxruntime cannot output directly, written in the branch graphs; Loop bodies and
branches the data never takes stay float, with the reason in the report."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

from onnxcomp import bench, capture
from onnxcomp import model as model_io
from onnxcomp.data import NpzData
from onnxcomp.quantize.api import QuantizeOptions, quantize

RNG = np.random.default_rng(0)


def _conv_head(prefix: str, weight: str, stride: int) -> list[onnx.NodeProto]:
    """Conv (reading the outer-scope input x) -> Relu -> GlobalAveragePool -> Flatten -> Gemm."""
    n = h.make_node
    return [
        n("Conv", ["x", weight, f"{prefix}_b"], [f"{prefix}_c"], pads=[1, 1, 1, 1],
          strides=[stride, stride], name=f"{prefix}_conv"),
        n("Relu", [f"{prefix}_c"], [f"{prefix}_r"], name=f"{prefix}_relu"),
        n("GlobalAveragePool", [f"{prefix}_r"], [f"{prefix}_p"], name=f"{prefix}_pool"),
        n("Flatten", [f"{prefix}_p"], [f"{prefix}_f"], name=f"{prefix}_flatten"),
        n("Gemm", [f"{prefix}_f", f"{prefix}_fc", f"{prefix}_fb"], [f"{prefix}_y"], transB=1,
          name=f"{prefix}_fc"),
    ]  # fmt: skip


def _weights(prefix: str, conv: bool = True) -> list[onnx.TensorProto]:
    out = [
        nh.from_array(np.full(16, 0.1, np.float32), f"{prefix}_b"),
        nh.from_array((RNG.standard_normal((10, 16)) * 0.3).astype(np.float32), f"{prefix}_fc"),
        nh.from_array((RNG.standard_normal(10) * 0.1).astype(np.float32), f"{prefix}_fb"),
    ]
    if conv:
        out.append(nh.from_array(
            (RNG.standard_normal((16, 3, 3, 3)) * 0.3).astype(np.float32), f"{prefix}_w"
        ))  # fmt: skip
    return out


def if_model(path) -> None:
    """A classifier whose two heads sit in the branches of an If on the sign of the batch's
    mean: both Convs read the main graph's input x; the then-branch Conv's weight is an
    initializer of the main graph, the else-branch's its own."""
    then_g = h.make_graph(
        _conv_head("then", "then_w", 1), "then", [],
        [h.make_tensor_value_info("then_y", T.FLOAT, None)], _weights("then", conv=False),
    )  # fmt: skip
    else_g = h.make_graph(
        _conv_head("else", "else_w", 2), "else", [],
        [h.make_tensor_value_info("else_y", T.FLOAT, None)], _weights("else"),
    )  # fmt: skip
    nodes = [
        h.make_node("ReduceMean", ["x"], ["m"], keepdims=0, name="mean"),
        h.make_node("Greater", ["m", "zero"], ["cond"], name="positive"),
        h.make_node("If", ["cond"], ["y"], then_branch=then_g, else_branch=else_g, name="heads"),
    ]
    inits = [
        nh.from_array(np.array(0, np.float32), "zero"),
        nh.from_array((RNG.standard_normal((16, 3, 3, 3)) * 0.3).astype(np.float32), "then_w"),
    ]
    graph = h.make_graph(
        nodes, "g", [h.make_tensor_value_info("x", T.FLOAT, ["N", 3, 16, 16])],
        [h.make_tensor_value_info("y", T.FLOAT, ["N", 10])], inits,
    )  # fmt: skip
    proto = h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])
    proto.ir_version = 8
    onnx.checker.check_model(proto, full_check=True)
    onnx.save(proto, path)


def save(graph: onnx.GraphProto, path) -> None:
    proto = h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])
    proto.ir_version = 8
    onnx.save(proto, path)


def full_check(model, path) -> None:
    """Save ``model`` and pass it through onnx's full checker."""
    model_io.save(model, path)
    onnx.checker.check_model(onnx.load(path), full_check=True)


def halves(path, shape) -> None:
    """Samples whose first half sits around +1, the second around -1 (one If branch each)."""
    x = RNG.standard_normal(shape).astype(np.float32) * 0.5
    x[: shape[0] // 2] += 1
    x[shape[0] // 2 :] -= 1
    np.savez(path, x=x)


def samples(path, signs) -> None:
    """Batches of 8 images around +1 or -1: each batch takes one branch."""
    x = RNG.standard_normal((8 * len(signs), 3, 16, 16)).astype(np.float32) * 0.5
    x += np.repeat(np.asarray(signs, np.float32), 8)[:, None, None, None]
    np.savez(path, x=x)


def static(tmp_path, signs, **kw):
    if_model(tmp_path / "if.onnx")
    samples(tmp_path / "calib.npz", signs)
    samples(tmp_path / "eval.npz", [1, -1, 1, -1])
    options = QuantizeOptions(mode="static", batch_size=8, **kw)
    return quantize(
        model_io.load(tmp_path / "if.onnx"), options,
        data=tmp_path / "calib.npz", eval_data=tmp_path / "eval.npz",
    )  # fmt: skip


def test_convs_inside_if_branches_run_as_integer_kernels(tmp_path):
    model, report = static(tmp_path, [1, -1, 1, -1, -1, 1])
    kernels = {d["node"]: d["kernel"] for d in report["plan"]["quantized_nodes"]}
    assert kernels["then_conv"] == kernels["else_conv"] == "QLinearConv"
    assert kernels["then_fc"] == kernels["else_fc"] == "QGemm"
    floats = {d["node"]: d["reason"] for d in report["plan"]["float_nodes"]}
    assert "If branches are planned on their own" in floats["heads"]
    # onnxruntime fuses the pairs written inside each branch
    assert bench.graph_report(model)["integer_kernel_ops"] == {
        "QLinearConv": 2, "QLinearGlobalAveragePool": 2, "QGemm": 2,
    }  # fmt: skip
    # the outer-scope input x gets its own pair in each branch, calibrated once
    pairs = [
        t for t in report["tensors"] if t["kind"] == "activation" and t["tensor"].startswith("x@")
    ]
    assert len(pairs) == 2 and len({(t["scale"], t["zero_point"]) for t in pairs}) == 1
    full_check(model, tmp_path / "q.onnx")
    outputs = report["check"]["comparison"]["outputs"]
    assert outputs[0]["cosine_mean"] > 0.999


def test_a_branch_no_sample_takes_stays_float_with_the_reason(tmp_path):
    model, report = static(tmp_path, [1, 1, 1])
    kernels = {d["node"] for d in report["plan"]["quantized_nodes"]}
    assert {"then_conv", "then_fc"} <= kernels
    floats = {d["node"]: d["reason"] for d in report["plan"]["float_nodes"]}
    assert "no calibration sample took" in floats["else_conv"]
    assert "no calibration sample took" in floats["else_fc"]
    assert bench.graph_report(model)["integer_kernel_ops"] == {
        "QLinearConv": 1, "QLinearGlobalAveragePool": 1, "QGemm": 1,
    }  # fmt: skip


def test_capture_streams_values_inside_if_branches(tmp_path):
    if_model(tmp_path / "if.onnx")
    samples(tmp_path / "x.npz", [1, -1])
    model = model_io.load(tmp_path / "if.onnx")
    seen = {"then_r": [], "else_r": []}
    for _batch, arrays in capture.stream(
        model, list(seen), NpzData(tmp_path / "x.npz"), batch_size=8
    ):
        for name, array in arrays.items():
            seen[name].append(array.shape)
    # each batch reaches one branch; the other gives an empty array
    assert seen["then_r"] == [(8, 16, 16, 16), (0,)]
    assert seen["else_r"] == [(0,), (8, 16, 8, 8)]
    assert len(model.graph.outputs) == 1  # the model itself is left as it was


def test_conv_in_a_loop_body_runs_as_an_integer_kernel(tmp_path):
    # Two residual-free refinement steps unrolled by Loop: the body's values are captured as one
    # more scan output (stacked over the iterations) and its first Conv fuses inside the body.
    body = h.make_graph(
        [
            h.make_node("Conv", ["v", "w"], ["c"], pads=[1, 1, 1, 1], name="loop_conv"),
            h.make_node("Relu", ["c"], ["r"], name="loop_relu"),
            h.make_node("Conv", ["r", "w"], ["v_next"], pads=[1, 1, 1, 1], name="loop_conv_out"),
            h.make_node("Identity", ["cond_in"], ["cond_out"]),
        ],
        "body",
        [
            h.make_tensor_value_info("i", T.INT64, []),
            h.make_tensor_value_info("cond_in", T.BOOL, []),
            h.make_tensor_value_info("v", T.FLOAT, ["N", 4, 8, 8]),
        ],
        [
            h.make_tensor_value_info("cond_out", T.BOOL, []),
            h.make_tensor_value_info("v_next", T.FLOAT, ["N", 4, 8, 8]),
        ],
    )
    graph = h.make_graph(
        [
            h.make_node("Conv", ["x", "w"], ["c0"], pads=[1, 1, 1, 1], name="outer_conv"),
            h.make_node("Relu", ["c0"], ["r0"], name="relu"),
            h.make_node("Loop", ["trips", "yes", "r0"], ["y"], body=body, name="loop"),
        ],
        "g",
        [h.make_tensor_value_info("x", T.FLOAT, ["N", 4, 8, 8])],
        [h.make_tensor_value_info("y", T.FLOAT, ["N", 4, 8, 8])],
        [
            nh.from_array((RNG.standard_normal((4, 4, 3, 3)) * 0.2).astype(np.float32), "w"),
            nh.from_array(np.array(2, np.int64), "trips"),
            nh.from_array(np.array(True), "yes"),
        ],
    )
    save(graph, tmp_path / "loop.onnx")
    halves(tmp_path / "x.npz", (16, 4, 8, 8))
    model, report = quantize(
        model_io.load(tmp_path / "loop.onnx"),
        QuantizeOptions(mode="static"),
        data=tmp_path / "x.npz",
    )
    kernels = {d["node"]: d["kernel"] for d in report["plan"]["quantized_nodes"]}
    assert kernels["outer_conv"] == kernels["loop_conv"] == "QLinearConv"
    floats = {d["node"]: d["reason"] for d in report["plan"]["float_nodes"]}
    assert "subgraph output 'v_next'" in floats["loop_conv_out"]
    assert bench.graph_report(model)["integer_kernel_ops"] == {"QLinearConv": 2}
    full_check(model, tmp_path / "q.onnx")
    assert report["check"]["comparison"]["outputs"][0]["cosine_mean"] > 0.999


def silero():
    """Silero VAD 5 and its real speech frames (calibration, evaluation), or a skip offline."""
    thirdparty = pytest.importorskip("models.thirdparty")
    realdata = pytest.importorskip("models.realdata")
    try:
        return thirdparty.fetch("silero_vad"), *realdata.build("silero_vad")
    except Exception as err:  # no registry access: skip, do not fail
        pytest.skip(f"cannot fetch silero_vad: {err}")


@pytest.mark.thirdparty
def test_silero_vad_convs_inside_its_if_branches_run_int8(tmp_path):
    # Silero VAD 5: every Conv and the LSTM sit in the branches of an If on the sample rate;
    # real speech, one feed per frame with the state fp32 reached.
    path, calib, evals = silero()
    small = tmp_path / "eval.npz"
    np.savez(small, **{k: v[::4] if v.ndim else v for k, v in np.load(evals).items()})
    model, report = quantize(
        model_io.load(path), QuantizeOptions(mode="static"), data=calib, eval_data=small
    )
    quantized = {d["node"]: d["kernel"] for d in report["plan"]["quantized_nodes"]}
    convs = [n for n, k in quantized.items() if k == "QLinearConv"]
    # the 16 kHz branch: the STFT Conv, 4 encoder Convs and the decoder Conv
    assert len(convs) == 6 and all(n.startswith("If_0_then_branch") for n in convs)
    floats = {d["node"]: d["reason"] for d in report["plan"]["float_nodes"]}
    # the 8 kHz branch: no sample at 8 kHz, no range to quantize with
    assert (
        "no calibration sample took"
        in floats["If_0_else_branch__Inline_0__/encoder/0/reparam_conv/Conv"]
    )
    assert (
        floats["If_0_then_branch__Inline_0__/decoder/rnn/LSTM"]
        == "no integer kernel in onnxruntime's CPU provider"
    )
    assert bench.graph_report(model)["integer_kernel_ops"].get("QLinearConv") == 6
    full_check(model, tmp_path / "vad.int8.onnx")
    speech = next(o for o in report["check"]["comparison"]["outputs"] if o["output"] == "output")
    assert speech["top1_agreement"] >= 0.98, json.dumps(speech)


def test_dynamic_quantizes_matmuls_inside_if_branches(tmp_path):
    # A decoder-style If: the branches project the outer-scope hidden state with their own
    # MatMul + bias; dynamic int8 rewrites each in its branch (no calibration needed).
    def branch(prefix: str) -> onnx.GraphProto:
        return h.make_graph(
            [
                h.make_node("MatMul", ["hidden", f"{prefix}_w"], [f"{prefix}_m"], name=f"{prefix}_matmul"),
                h.make_node("Add", [f"{prefix}_m", f"{prefix}_b"], [f"{prefix}_y"], name=f"{prefix}_bias"),
            ],
            prefix, [], [h.make_tensor_value_info(f"{prefix}_y", T.FLOAT, None)],
            [
                nh.from_array((RNG.standard_normal((64, 32)) * 0.2).astype(np.float32), f"{prefix}_w"),
                nh.from_array((RNG.standard_normal(32) * 0.1).astype(np.float32), f"{prefix}_b"),
            ],
        )  # fmt: skip

    graph = h.make_graph(
        [
            h.make_node("MatMul", ["x", "w0"], ["hidden"], name="encoder"),
            h.make_node("ReduceMean", ["x"], ["m"], keepdims=0, name="mean"),
            h.make_node("Greater", ["m", "zero"], ["cond"], name="positive"),
            h.make_node("If", ["cond"], ["y"], then_branch=branch("then"), else_branch=branch("else"), name="heads"),
        ],
        "g", [h.make_tensor_value_info("x", T.FLOAT, ["N", 64])],
        [h.make_tensor_value_info("y", T.FLOAT, ["N", 32])],
        [
            nh.from_array((RNG.standard_normal((64, 64)) * 0.2).astype(np.float32), "w0"),
            nh.from_array(np.array(0, np.float32), "zero"),
        ],
    )  # fmt: skip
    save(graph, tmp_path / "if_mlp.onnx")
    halves(tmp_path / "x.npz", (32, 64))
    model, report = quantize(
        model_io.load(tmp_path / "if_mlp.onnx"), QuantizeOptions(mode="dynamic", batch_size=16),
        data=tmp_path / "x.npz",
    )  # fmt: skip
    layers = {lay["node"] for lay in report["layers"] if lay["status"] == "int8"}
    assert {"encoder", "then_matmul", "else_matmul"} <= layers
    assert report["skipped"] == []
    ops = bench.graph_report(model)["integer_kernel_ops"]
    assert ops.get("MatMulIntegerToFloat", 0) + ops.get("DynamicQuantizeMatMul", 0) == 3
    full_check(model, tmp_path / "q.onnx")
    assert report["check"]["comparison"]["outputs"][0]["cosine_mean"] > 0.999


def test_branches_read_an_int8_tensor_of_the_main_graph(tmp_path):
    # A Conv in the main graph, then a Conv in each If branch reading its (int8-written) output
    # from the outer scope: each branch quantizes it again in the branch, so all three fuse.
    def branch(prefix: str) -> onnx.GraphProto:
        return h.make_graph(
            [h.make_node("Conv", ["r", f"{prefix}_w"], [f"{prefix}_c"], pads=[1, 1, 1, 1], name=f"{prefix}_conv"),
             h.make_node("Relu", [f"{prefix}_c"], [f"{prefix}_r"], name=f"{prefix}_relu"),
             h.make_node("GlobalAveragePool", [f"{prefix}_r"], [f"{prefix}_p"], name=f"{prefix}_pool"),
             h.make_node("Flatten", [f"{prefix}_p"], [f"{prefix}_f"], name=f"{prefix}_flatten"),
             h.make_node("Gemm", [f"{prefix}_f", f"{prefix}_fc"], [f"{prefix}_y"], name=f"{prefix}_fc")],
            prefix, [], [h.make_tensor_value_info(f"{prefix}_y", T.FLOAT, None)],
            [nh.from_array((RNG.standard_normal((8, 8, 3, 3)) * 0.2).astype(np.float32), f"{prefix}_w"),
             nh.from_array((RNG.standard_normal((8, 4)) * 0.3).astype(np.float32), f"{prefix}_fc")],
        )  # fmt: skip

    graph = h.make_graph(
        [
            h.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1], name="stem"),
            h.make_node("Relu", ["c"], ["r"], name="stem_relu"),
            h.make_node("ReduceMean", ["x"], ["m"], keepdims=0, name="mean"),
            h.make_node("Greater", ["m", "zero"], ["cond"], name="positive"),
            h.make_node("If", ["cond"], ["y"], then_branch=branch("then"), else_branch=branch("else"), name="heads"),
        ],
        "g", [h.make_tensor_value_info("x", T.FLOAT, ["N", 3, 8, 8])],
        [h.make_tensor_value_info("y", T.FLOAT, None)],
        [
            nh.from_array((RNG.standard_normal((8, 3, 3, 3)) * 0.3).astype(np.float32), "w"),
            nh.from_array(np.array(0, np.float32), "zero"),
        ],
    )  # fmt: skip
    save(graph, tmp_path / "stem_if.onnx")
    halves(tmp_path / "x.npz", (32, 3, 8, 8))
    model, report = quantize(
        model_io.load(tmp_path / "stem_if.onnx"), QuantizeOptions(mode="static", batch_size=8),
        data=tmp_path / "x.npz",
    )  # fmt: skip
    assert bench.graph_report(model)["integer_kernel_ops"]["QLinearConv"] == 3
    full_check(model, tmp_path / "q.onnx")
    assert report["check"]["comparison"]["outputs"][0]["cosine_mean"] > 0.999


@pytest.mark.thirdparty
def test_capture_reaches_the_lstm_state_two_ifs_deep_in_silero_vad():
    # The LSTM sits in a branch of an If inside the 16 kHz branch; which of its two copies runs
    # depends on the state's shape. Captured, its last hidden state is the model's stateN[0].
    path, _, evals = silero()
    from onnxcomp import runtime
    from onnxcomp.data import open_data

    model = model_io.load(path)
    data = open_data(evals, model_io.input_specs(model))
    names = [
        "If_0_then_branch__Inline_0__/decoder/rnn/LSTM_output_1",
        "If_0_then_branch__Inline_0__/decoder/rnn_1/LSTM_output_1",
    ]
    session = runtime.create_session(path, threads=1)
    for batch, arrays in capture.stream(model, names, data, limit=4):
        taken = [a for a in arrays.values() if a.size]
        assert len(taken) == 1  # one copy ran, the other gave an empty array
        state = runtime.run(session, batch.inputs)["stateN"]
        np.testing.assert_allclose(taken[0][0], state[0], atol=1e-6)


def test_capture_of_a_branch_output_reads_the_if_output(tmp_path):
    if_model(tmp_path / "if.onnx")
    samples(tmp_path / "x.npz", [1, -1])
    model = model_io.load(tmp_path / "if.onnx")
    arrays = [
        a for _, a in capture.stream(model, ["then_y"], NpzData(tmp_path / "x.npz"), batch_size=8)
    ]
    # the then branch's own value, not the If's output (which the else branch writes too)
    assert [a["then_y"].shape for a in arrays] == [(8, 10), (0,)]


def test_dynamic_quantizes_a_matmul_inside_a_loop_body(tmp_path):
    # A recurrent cell unrolled by Loop: h <- tanh(h W); the MatMul's input (the carried state,
    # a body input) is captured over every iteration, and the MatMul rewritten inside the body.
    body = h.make_graph(
        [
            h.make_node("MatMul", ["h", "w"], ["hw"], name="cell"),
            h.make_node("Tanh", ["hw"], ["h_next"], name="tanh"),
            h.make_node("Identity", ["cond_in"], ["cond_out"]),
        ],
        "body",
        [
            h.make_tensor_value_info("i", T.INT64, []),
            h.make_tensor_value_info("cond_in", T.BOOL, []),
            h.make_tensor_value_info("h", T.FLOAT, ["N", 64]),
        ],
        [
            h.make_tensor_value_info("cond_out", T.BOOL, []),
            h.make_tensor_value_info("h_next", T.FLOAT, ["N", 64]),
        ],
    )
    graph = h.make_graph(
        [h.make_node("Loop", ["trips", "yes", "x"], ["y"], body=body, name="loop")],
        "g",
        [h.make_tensor_value_info("x", T.FLOAT, ["N", 64])],
        [h.make_tensor_value_info("y", T.FLOAT, ["N", 64])],
        [
            nh.from_array((RNG.standard_normal((64, 64)) * 0.15).astype(np.float32), "w"),
            nh.from_array(np.array(3, np.int64), "trips"),
            nh.from_array(np.array(True), "yes"),
        ],
    )
    save(graph, tmp_path / "loop.onnx")
    halves(tmp_path / "x.npz", (32, 64))
    model, report = quantize(
        model_io.load(tmp_path / "loop.onnx"),
        QuantizeOptions(mode="dynamic"),
        data=tmp_path / "x.npz",
    )
    (layer,) = report["layers"]
    assert layer["status"] == "int8" and "note" not in layer  # measured on the data
    ops = bench.graph_report(model)["integer_kernel_ops"]
    assert ops.get("MatMulIntegerToFloat", 0) + ops.get("DynamicQuantizeMatMul", 0) == 1
    full_check(model, tmp_path / "q.onnx")
    assert report["check"]["comparison"]["outputs"][0]["cosine_mean"] > 0.999


def test_a_matmul_in_a_scan_body_static_float_dynamic_plain_int8(tmp_path):
    # Scan hands its body one slice per step: the body's values cannot be captured. Static
    # keeps the MatMul float and says why; dynamic needs no ranges and quantizes it anyway.
    body = h.make_graph(
        [
            h.make_node("MatMul", ["x_t", "w"], ["m"], name="step"),
            h.make_node("Add", ["s", "m"], ["s_next"], name="accumulate"),
            h.make_node("Relu", ["m"], ["y_t"], name="relu"),
        ],
        "body",
        [
            h.make_tensor_value_info("s", T.FLOAT, ["N", 32]),
            h.make_tensor_value_info("x_t", T.FLOAT, ["N", 64]),
        ],
        [
            h.make_tensor_value_info("s_next", T.FLOAT, ["N", 32]),
            h.make_tensor_value_info("y_t", T.FLOAT, ["N", 32]),
        ],
    )
    graph = h.make_graph(
        [
            h.make_node("MatMul", ["x0", "w0"], ["s0"], name="init"),
            h.make_node(
                "Scan",
                ["s0", "x"],
                ["s_end", "ys"],
                body=body,
                num_scan_inputs=1,
                scan_input_axes=[1],
                scan_output_axes=[1],
                name="scan",
            ),
        ],
        "g",
        [
            h.make_tensor_value_info("x0", T.FLOAT, ["N", 64]),
            h.make_tensor_value_info("x", T.FLOAT, ["N", 4, 64]),
        ],
        [
            h.make_tensor_value_info("s_end", T.FLOAT, ["N", 32]),
            h.make_tensor_value_info("ys", T.FLOAT, ["N", 4, 32]),
        ],
        [
            nh.from_array((RNG.standard_normal((64, 32)) * 0.2).astype(np.float32), "w"),
            nh.from_array((RNG.standard_normal((64, 32)) * 0.2).astype(np.float32), "w0"),
        ],
    )
    save(graph, tmp_path / "scan.onnx")
    onnx.checker.check_model(onnx.load(tmp_path / "scan.onnx"), full_check=True)
    np.savez(
        tmp_path / "x.npz",
        x0=RNG.standard_normal((16, 64)).astype(np.float32),
        x=RNG.standard_normal((16, 4, 64)).astype(np.float32),
    )
    _, report = quantize(
        model_io.load(tmp_path / "scan.onnx"),
        QuantizeOptions(mode="static"),
        data=tmp_path / "x.npz",
    )
    floats = {d["node"]: d["reason"] for d in report["plan"]["float_nodes"]}
    assert floats["step"].startswith(
        "inside the body of Scan 'scan': its values cannot be captured"
    )
    model, report = quantize(
        model_io.load(tmp_path / "scan.onnx"),
        QuantizeOptions(mode="dynamic"),
        data=tmp_path / "x.npz",
    )
    layers = {lay["node"]: lay for lay in report["layers"]}
    assert layers["step"]["status"] == "int8"
    assert "inside the body of Scan 'scan'" in layers["step"]["note"]
    full_check(model, tmp_path / "q.onnx")
