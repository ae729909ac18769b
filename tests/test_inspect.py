"""inspect: opsets, op histogram with subgraphs, parameters in initializers and Constant nodes,
MACs where shapes are known, and a report (never a crash) for odd models."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnx.helper as oh
import onnx_ir as ir
import pytest
from onnx import TensorProto

from onnxcomp import model as model_io
from onnxcomp.summary import summarize

IF_LOOP = """
<ir_version: 8, opset_import: ["" : 17]>
branchy (float[N, 4] x, bool cond, int64 trips) => (float[N, 4] y, float[N, 4] z) <float[4, 4] w>
{
    y = If (cond) <
        then_branch = then_g () => (float[N, 4] t) { t = MatMul (x, w) },
        else_branch = else_g () => (float[N, 4] e) { e = Relu (x) }
    >
    z = Loop (trips, cond, x) <
        body = body_g (int64 i, bool c_in, float[N, 4] acc) => (bool c_out, float[N, 4] acc_out) {
            c_out = Identity (c_in)
            acc_out = MatMul (acc, w)
        }
    >
}
"""


def _if_loop_model(path):
    proto = onnx.parser.parse_model(IF_LOOP)
    proto.graph.initializer.append(onnx.numpy_helper.from_array(np.eye(4, dtype=np.float32), "w"))
    onnx.checker.check_model(proto)
    onnx.save(proto, path)
    return path


def _lstm_model(path, hidden=8, features=5):
    rng = np.random.default_rng(0)
    w = onnx.numpy_helper.from_array(
        rng.standard_normal((1, 4 * hidden, features)).astype(np.float32), "W"
    )
    r = onnx.numpy_helper.from_array(
        rng.standard_normal((1, 4 * hidden, hidden)).astype(np.float32), "R"
    )
    graph = oh.make_graph(
        [oh.make_node("LSTM", ["X", "W", "R"], ["Y", "Y_h"], hidden_size=hidden)],
        "lstm",
        [oh.make_tensor_value_info("X", TensorProto.FLOAT, ["seq", "batch", features])],
        [oh.make_tensor_value_info("Y_h", TensorProto.FLOAT, [1, "batch", hidden])],
        initializer=[w, r],
    )
    onnx.save(oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)]), path)
    return path


def _constant_weights_model(path):
    """A Gemm whose weight is a Constant node (as Paddle2ONNX writes them) plus a custom op."""
    weight = onnx.numpy_helper.from_array(np.ones((16, 10), np.float32), "w")
    graph = oh.make_graph(
        [
            oh.make_node("Constant", [], ["w"], value=weight),
            oh.make_node("Gemm", ["x", "w"], ["h"]),
            oh.make_node("Scale", ["h"], ["y"], domain="my.ops"),
        ],
        "consts",
        [oh.make_tensor_value_info("x", TensorProto.FLOAT, [2, 16])],
        [oh.make_tensor_value_info("y", TensorProto.FLOAT, [2, 10])],
    )
    model = oh.make_model(
        graph, opset_imports=[oh.make_opsetid("", 17), oh.make_opsetid("my.ops", 1)]
    )
    onnx.save(model, path)
    return path


def test_digits_cnn(models_dir):
    report = summarize(models_dir / "digits_cnn.onnx")
    assert report["opsets"] == {"ai.onnx": 17}
    assert report["inputs"] == [{"name": "input", "dtype": "float32", "shape": ["batch", 1, 8, 8]}]
    assert report["operators"]["histogram"]["Conv"] == 3
    assert report["operators"]["subgraphs"] == 0
    weights = model_io.load(models_dir / "digits_cnn.onnx")
    assert report["parameters"]["bytes"] == model_io.weight_bytes(weights)
    assert report["parameters"]["constant_nodes"]["elements"] == 0
    compute = report["compute"]
    # conv 2: 64 out channels x 8x8 pixels x 32 in channels x 3x3 kernel, batch taken as 1
    conv2 = next(layer for layer in compute["layers"] if layer["macs"] == 64 * 64 * 32 * 9)
    assert conv2["op"] == "Conv"
    assert compute["total_macs"] == sum(layer["macs"] for layer in compute["layers"])
    assert compute["assumed"] == {"input[0]": "batch -> 1"}
    assert report["largest_tensors"][0]["shape"] == [64, 64, 3, 3]
    assert report["external_data"] == []


def test_shape_option_scales_macs(models_dir, cli):
    model = models_dir / "digits_cnn.onnx"
    one = summarize(model)["compute"]["total_macs"]
    result = cli("inspect", model, "--shape", "input=4x1x8x8", "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["compute"]["total_macs"] == 4 * one


def test_shape_of_one_input_fixes_inputs_sharing_its_dims(tmp_path):
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[batch, seq, 4] x, float[batch, seq, 4] mask) => (float[batch, seq, 8] y)
        <float[4, 8] w = {1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0,
                          7.0, 8.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 1.0, 2.0, 3.0, 4.0,
                          5.0, 6.0, 7.0, 8.0}>
    {
        masked = Mul (x, mask)
        y = MatMul (masked, w)
    }
    """
    path = tmp_path / "two_inputs.onnx"
    onnx.save(onnx.parser.parse_model(text), path)
    compute = summarize(path, shapes={"x": [2, 16, 4]})["compute"]
    assert compute["assumed"] == {"x": "2x16x4", "mask": "2x16x4"}
    assert compute["total_macs"] == 2 * 16 * 4 * 8


def test_if_loop_subgraphs_counted(tmp_path):
    report = summarize(_if_loop_model(tmp_path / "branchy.onnx"))
    ops = report["operators"]
    assert ops["subgraphs"] == 3
    assert ops["histogram"]["MatMul"] == 2  # one in the If branch, one in the Loop body
    assert ops["histogram"]["If"] == ops["histogram"]["Loop"] == 1
    assert len(report["compute"]["layers"]) == 2


def test_lstm_macs_need_the_sequence_length(tmp_path):
    path = _lstm_model(tmp_path / "lstm.onnx")
    report = summarize(path)
    layer = report["compute"]["layers"][0]
    # the first axis (here the sequence) is taken as 1; the batch axis stays unknown
    assert report["compute"]["assumed"] == {"X[0]": "seq -> 1"}
    assert layer["macs"] is None and "batch" in layer["unknown"]
    assert report["compute"]["total_macs"] is None and report["compute"]["complete"] is False
    # 3 steps x batch 1 x (input 5 + state 8) x 4 gates x hidden 8
    fixed = summarize(path, shapes={"X": [3, 1, 5]})["compute"]
    assert fixed["total_macs"] == 3 * 1 * (5 + 8) * 4 * 8 and fixed["complete"]
    assert report["parameters"]["initializers"]["elements"] == 4 * 8 * 5 + 4 * 8 * 8
    assert report["inputs"][0]["shape"] == ["seq", "batch", 5]


def test_constant_weights_and_custom_domain(tmp_path):
    report = summarize(_constant_weights_model(tmp_path / "consts.onnx"))
    params = report["parameters"]
    assert params["constant_nodes"] == {"tensors": 1, "elements": 160, "bytes": 640}
    assert params["initializers"]["elements"] == 0
    assert report["operators"]["histogram"]["my.ops::Scale"] == 1
    assert report["operators"]["custom_domains"] == ["my.ops"]
    assert report["compute"]["total_macs"] == 2 * 16 * 10  # Constant's shape is inferred
    assert report["largest_tensors"][0]["source"] == "Constant node"


def test_sklearn_coefficients_counted(tmp_path):
    text = """
    <ir_version: 8, opset_import: ["" : 17, "ai.onnx.ml" : 1]>
    g (float[N, 3] x) => (int64[N] label, float[N, 2] scores) {
        label, scores = ai.onnx.ml.LinearClassifier <
            coefficients = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0],
            intercepts = [0.5, -0.5],
            classlabels_ints = [0, 1]
        > (x)
    }
    """
    path = tmp_path / "logreg.onnx"
    onnx.save(onnx.parser.parse_model(text), path)
    params = summarize(path)["parameters"]
    assert params["ml_op_attributes"] == {
        "nodes": 1,
        "elements": 10,
        "bytes": 6 * 4 + 2 * 4 + 2 * 8,
    }


def test_dynamic_dims_and_strings_do_not_crash(tmp_path):
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (string[N, M] s, float[B, K] a, float[K2, T] b) => (string[N, M] t, float[B, T] c) {
        t = Identity (s)
        c = MatMul (a, b)
    }
    """
    path = tmp_path / "dyn.onnx"
    onnx.save(onnx.parser.parse_model(text), path)
    report = summarize(path)
    assert report["inputs"][0]["dtype"] == "string"
    layer = report["compute"]["layers"][0]
    assert layer["macs"] is None and "dynamic" in layer["unknown"]
    assert report["compute"]["total_macs"] is None


def test_sparse_constant_is_densified(tmp_path):
    sparse = oh.make_sparse_tensor(
        oh.make_tensor("v", TensorProto.FLOAT, [2], [1.0, 2.0]),
        oh.make_tensor("i", TensorProto.INT64, [2], [0, 5]),
        [2, 3],
    )
    graph = oh.make_graph(
        [oh.make_node("Constant", [], ["c"], sparse_value=sparse)],
        "sparse",
        [],
        [oh.make_tensor_value_info("c", TensorProto.FLOAT, [2, 3])],
    )
    path = tmp_path / "sparse.onnx"
    onnx.save(oh.make_model(graph), path)
    report = summarize(path)
    assert report["parameters"]["constant_nodes"]["elements"] == 6
    assert any("sparse" in note for note in report["notes"])


def test_sparse_initializer_is_counted(tmp_path):
    sparse = oh.make_sparse_tensor(
        oh.make_tensor("w", TensorProto.FLOAT, [2], [1.0, 2.0]),
        oh.make_tensor("w_i", TensorProto.INT64, [2], [0, 3]),
        [4],
    )
    graph = oh.make_graph(
        [oh.make_node("Add", ["x", "w"], ["y"])],
        "sparse_init",
        [oh.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
        [oh.make_tensor_value_info("y", TensorProto.FLOAT, [4])],
        sparse_initializer=[sparse],
    )
    path = tmp_path / "sparse_init.onnx"
    onnx.save(oh.make_model(graph), path)
    report = summarize(path)
    assert report["parameters"]["initializers"] == {"tensors": 1, "elements": 4, "bytes": 16}
    assert [i["name"] for i in report["inputs"]] == ["x"]


def test_external_data_listed(tmp_path, models_dir):
    model = model_io.load(models_dir / "digits_cnn.onnx")
    path = tmp_path / "ext.onnx"
    model_io.save(model, path, external_data=True)
    report = summarize(path)
    assert [f["path"] for f in report["external_data"]] == [
        str((tmp_path / "ext.onnx.data").resolve())
    ]
    assert report["parameters"]["bytes"] == model_io.weight_bytes(model)


def test_ir_model_left_unchanged(models_dir):
    model = model_io.load(models_dir / "digits_cnn.onnx")
    before = ir.to_proto(model).SerializeToString()
    summarize(model)
    assert ir.to_proto(model).SerializeToString() == before


def test_cli_text_and_json(cli, models_dir):
    model = models_dir / "digits_cnn.onnx"
    text = cli("inspect", model)
    assert text.exit_code == 0, text.stderr
    assert "1,813,440 MACs" in text.stdout and "features.7.weight" in text.stdout
    result = cli("inspect", model, "--json")
    assert json.loads(result.stdout)["operators"]["nodes"] == 14


@pytest.mark.parametrize(
    "path",
    sorted((Path(__file__).resolve().parents[1] / "models" / "variety").glob("*.onnx")),
    ids=lambda p: p.name,
)
def test_variety_models(path, cli):
    result = cli("inspect", path, "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["operators"]["nodes"] > 0


def test_bad_files_exit_2(cli, tmp_path, models_dir):
    truncated = tmp_path / "cut.onnx"
    truncated.write_bytes((models_dir / "digits_cnn.onnx").read_bytes()[:5000])
    for args in (
        ["inspect", truncated],
        ["inspect", tmp_path / "missing.onnx"],
        ["inspect", models_dir / "digits_cnn.onnx", "--shape", "nope=1x2"],
        ["inspect", models_dir / "digits_cnn.onnx", "--shape", "input=abc"],
        ["inspect", models_dir / "digits_cnn.onnx", "--shape", "input=1x3x8x8"],
        ["inspect", models_dir / "digits_cnn.onnx", "--shape", "input=1x64"],
    ):
        result = cli(*args)
        assert result.exit_code == 2, (args, result.stdout)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr


def _thirdparty(name: str) -> Path:
    thirdparty = pytest.importorskip("models.thirdparty")
    try:
        return thirdparty.fetch(name)
    except Exception as err:  # no network / no pip
        pytest.skip(f"cannot fetch {name}: {err}")


@pytest.mark.thirdparty
def test_paddle_constant_weights_model():
    report = summarize(_thirdparty("layout"))
    params = report["parameters"]
    assert params["initializers"]["tensors"] == 0 and params["constant_nodes"]["tensors"] == 878
    assert report["compute"]["total_macs"] > 3e9  # fixed input [1, 3, 800, 608]
    assert report["opsets"]["Paddle"] == 1


@pytest.mark.thirdparty
def test_paddle_minus_one_batch_and_shapes():
    path = _thirdparty("ocr_cls")  # input x: [-1, 3, ?, ?], weights in Constant nodes
    report = summarize(path)
    assert report["compute"]["assumed"] == {"x[0]": "? -> 1"}
    assert report["compute"]["total_macs"] is None
    fixed = summarize(path, shapes={"x": [1, 3, 48, 192]})["compute"]
    assert fixed["known_macs"] > 1e7 and fixed["layers_unknown"] <= 1


@pytest.mark.thirdparty
def test_yolo_symbolic_dims(cli):
    result = cli("inspect", _thirdparty("yolov8n"), "--shape", "images=1x3x320x320")
    assert result.exit_code == 0, result.stderr
    assert "compute: 1,012,627,200 MACs" in result.stdout
