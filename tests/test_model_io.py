"""Model I/O: loading odd and broken files, atomic saves, external data, normalising."""

from __future__ import annotations

import os

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from onnxcomp import model as model_io
from onnxcomp import runtime
from onnxcomp.errors import OnnxcompError

CONSTANT_WEIGHTS = """
<ir_version: 7, opset_import: ["" : 12]>
g (float[N, 4] x) => (float[N, 3] y) {
  w = Constant <value = float[4, 3] {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12}> ()
  b = Constant <value = float[3] {0.5, -0.5, 1}> ()
  h = MatMul(x, w)
  y = Add(h, b)
}
"""


def _run(model, x):
    session = runtime.create_session(model)
    return runtime.run(session, {"x": x})["y"]


def test_constant_weights_are_lifted_and_outputs_kept(tmp_path):
    path = tmp_path / "const.onnx"
    onnx.save(onnx.parser.parse_model(CONSTANT_WEIGHTS), path)
    model = model_io.load(path)
    x = np.random.default_rng(0).standard_normal((5, 4)).astype(np.float32)
    before = _run(model, x)
    report = model_io.normalize(model)
    assert report["constants_lifted"] == 2
    assert {n.op_type for n in model.graph} == {"MatMul", "Add"}
    assert set(model.graph.initializers) == {"w", "b"}
    np.testing.assert_array_equal(_run(model, x), before)


def test_opset_upgrade_for_per_channel_qdq(tmp_path, models_dir):
    model = model_io.load(models_dir / "digits_cnn_opset11.onnx")
    assert model_io.opset(model) == 11
    upgraded = model_io.ensure_opset(model, 13, "per-channel QDQ")
    assert model_io.opset(upgraded) == 13
    x = np.load(models_dir / "digits_test.npz")["input"][:16]
    a = runtime.run(runtime.create_session(model), {"input": x})
    b = runtime.run(runtime.create_session(upgraded), {"input": x})
    for name in a:
        np.testing.assert_allclose(a[name], b[name], rtol=1e-5, atol=1e-5)


def test_save_is_atomic_and_refuses_to_overwrite_input(tmp_path, models_dir):
    source = tmp_path / "in.onnx"
    source.write_bytes((models_dir / "digits_cnn.onnx").read_bytes())
    model = model_io.load(source)
    with pytest.raises(OnnxcompError, match="refusing to overwrite an input"):
        model_io.save(model, source, inputs=[source])
    # A hard link is the same file under another name.
    link = tmp_path / "link.onnx"
    os.link(source, link)
    with pytest.raises(OnnxcompError, match="refusing to overwrite"):
        model_io.save(model, link, inputs=[source])
    out = model_io.save(model, tmp_path / "sub" / "out.onnx", inputs=[source])
    assert out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".onnxcomp-")]
    onnx.checker.check_model(str(out))


def _model_with_external_data(tmp_path):
    rng = np.random.default_rng(1)
    w = rng.standard_normal((64, 32)).astype(np.float32)
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("MatMul", ["x", "w"], ["y"])],
        "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 64])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 32])],
        [onnx.numpy_helper.from_array(w, "w")],
    )
    proto = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    path = tmp_path / "ext.onnx"
    onnx.save_model(
        proto, path, save_as_external_data=True, location="ext.onnx.data", size_threshold=0
    )
    return path, w


def test_external_data_round_trip(tmp_path):
    path, w = _model_with_external_data(tmp_path)
    model = model_io.load(path)
    tensor = model.graph.initializers["w"].const_value
    assert isinstance(tensor, ir.ExternalTensor)  # lazy: not read yet
    out = model_io.save(model, tmp_path / "out" / "copy.onnx", inputs=[path], external_data=True)
    assert (out.parent / "copy.onnx.data").exists()
    x = np.ones((2, 64), np.float32)
    np.testing.assert_allclose(_run_path(out, x), x @ w, rtol=1e-5)
    # Writing over the input's own data file is refused.
    with pytest.raises(OnnxcompError, match="refusing to overwrite"):
        model_io.save(model, tmp_path / "ext.onnx", inputs=[], external_data=True)


def _run_path(path, x):
    session = runtime.create_session(str(path))
    return runtime.run(session, {"x": x})["y"]


def test_missing_and_truncated_external_data(tmp_path):
    path, _ = _model_with_external_data(tmp_path)
    data = tmp_path / "ext.onnx.data"
    content = data.read_bytes()
    data.write_bytes(content[: len(content) // 2])
    with pytest.raises(OnnxcompError, match="truncated"):
        model_io.load(path)
    data.unlink()
    with pytest.raises(OnnxcompError, match="is missing"):
        model_io.load(path)


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "empty file"),
        (b"this is not an onnx model at all" * 10, "not a readable ONNX model|not an ONNX model"),
    ],
)
def test_not_onnx(tmp_path, content, message):
    path = tmp_path / "bad.onnx"
    path.write_bytes(content)
    with pytest.raises(OnnxcompError, match=message):
        model_io.load(path)


def test_truncated_model_file(tmp_path, models_dir):
    content = (models_dir / "digits_cnn.onnx").read_bytes()
    path = tmp_path / "cut.onnx"
    path.write_bytes(content[: len(content) // 3])
    with pytest.raises(OnnxcompError, match="cut.onnx"):
        model = model_io.load(path)
        runtime.create_session(model, label=str(path))


def test_session_error_is_one_line_and_keeps_stdout_clean(capsys):
    proto = onnx.parser.parse_model(
        """
        <ir_version: 8, opset_import: ["" : 17, "x.unknown" : 1]>
        g (float[2] a) => (float[2] b) { b = x.unknown.Frobnicate(a) }
        """
    )
    with pytest.raises(OnnxcompError) as info:
        runtime.create_session(ir.from_proto(proto), label="frob.onnx")
    assert "frob.onnx: onnxruntime cannot load it" in str(info.value)
    assert "\n" not in str(info.value)
    assert capsys.readouterr().out == ""
