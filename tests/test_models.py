"""The model zoo: committed models check and run, generated graphs build, fetch works."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from models import build_digits, build_graphs, thirdparty

MODELS = Path(__file__).resolve().parents[1] / "models"

# Committed model -> (test data file, reshape of its `input`, minimum top-1 accuracy).
# The bars sit a little under what training reaches (see models/README.md) so that a rebuild on
# another torch version still passes, while a broken export does not.
COMMITTED = {
    "digits_cnn.onnx": ("digits_test.npz", None, 0.95),
    "digits_cnn_opset11.onnx": ("digits_test.npz", None, 0.95),
    "digits_mlp.onnx": ("digits_test_flat.npz", None, 0.95),
    "variety/lstm_digits.onnx": ("digits_test.npz", (-1, 8, 8), 0.95),
    "variety/if_digits.onnx": ("digits_test_flat.npz", None, 0.95),
    "variety/loop_digits.onnx": ("digits_test.npz", (-1, 8, 8), 0.95),
    "variety/logreg_digits.onnx": ("digits_test_flat.npz", None, 0.95),
    "variety/const_cnn_digits.onnx": ("digits_test.npz", None, 0.95),
}


def session(model: onnx.ModelProto | Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def top1(name: str) -> float:
    data_file, shape, _ = COMMITTED[name]
    data = np.load(MODELS / data_file)
    x = data["input"] if shape is None else data["input"].reshape(shape)
    sess = session(MODELS / name)
    names = [o.name for o in sess.get_outputs()]
    outputs = dict(zip(names, sess.run(None, {"input": x}), strict=True))
    # skl2onnx's classifier gives probabilities; the torch exports give logits.
    scores = outputs.get("logits", outputs.get("probabilities"))
    return float((scores.argmax(axis=1) == data["labels"]).mean())


@pytest.mark.parametrize("name", sorted(COMMITTED))
def test_committed_model_checks_and_keeps_its_accuracy(name):
    model = onnx.load(MODELS / name)
    onnx.checker.check_model(model, full_check=True)
    assert top1(name) >= COMMITTED[name][2]


def test_digits_cnn_accuracy_from_test_split():
    assert top1("digits_cnn.onnx") >= 0.95


def test_digits_cnn_is_the_old_opset_cnn_with_the_same_outputs():
    x = np.load(MODELS / "digits_test.npz")["input"][:32]
    new = session(MODELS / "digits_cnn.onnx").run(None, {"input": x})[0]
    old = session(MODELS / "digits_cnn_opset11.onnx").run(None, {"input": x})[0]
    assert onnx.load(MODELS / "digits_cnn_opset11.onnx").opset_import[0].version == 11
    np.testing.assert_allclose(old, new, rtol=1e-5, atol=1e-5)


def test_digits_cnn_batch_axis_is_dynamic():
    x = np.load(MODELS / "digits_test.npz")["input"]
    sess = session(MODELS / "digits_cnn.onnx")
    one = np.concatenate([sess.run(None, {"input": x[i : i + 1]})[0] for i in range(5)])
    np.testing.assert_allclose(one, sess.run(None, {"input": x[:5]})[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "name, shape",
    [
        ("digits_test.npz", (1, 8, 8)),
        ("digits_test_flat.npz", (64,)),
        ("digits_calib.npz", (1, 8, 8)),
        ("digits_calib_flat.npz", (64,)),
    ],
)
def test_digits_data_files(name, shape):
    data = np.load(MODELS / name)
    assert sorted(data.files) == ["input", "labels"]
    assert data["input"].dtype == np.float32 and data["input"].shape[1:] == shape
    assert data["labels"].dtype == np.int64 and len(data["labels"]) == len(data["input"])
    assert 0.0 <= data["input"].min() and data["input"].max() <= 1.0
    assert set(data["labels"].tolist()) == set(range(10))


def test_committed_data_is_the_split_the_build_script_makes():
    split = build_digits.load_split()
    test = np.load(MODELS / "digits_test.npz")
    calib = np.load(MODELS / "digits_calib_flat.npz")
    np.testing.assert_array_equal(test["input"], split.x_test)
    np.testing.assert_array_equal(test["labels"], split.y_test)
    np.testing.assert_array_equal(calib["input"], split.x_calib.reshape(-1, 64))
    assert len(calib["input"]) == 300


def test_committed_files_stay_small():
    onnx_files = list(MODELS.glob("*.onnx")) + list(MODELS.glob("variety/*.onnx"))
    assert all(f.stat().st_size < 200_000 for f in MODELS.glob("variety/*.onnx"))
    total = sum(f.stat().st_size for f in onnx_files + list(MODELS.glob("*.npz")))
    assert total < 3_000_000


GRAPH_SIZES = {
    "resnet": dict(widths=(8, 16), blocks=1, image_size=24, num_classes=5),
    "mobilenetv2": dict(width=0.5, image_size=48, last_channels=64, num_classes=3),
    "bert": dict(vocab_size=50, hidden=32, layers=1, heads=2, intermediate=64, max_positions=20),
}


@pytest.mark.parametrize("name", sorted(build_graphs.BUILDERS))
@pytest.mark.parametrize("sized", [False, True], ids=["default", "custom"])
def test_generated_graph_checks_and_runs(name, sized):
    kwargs = GRAPH_SIZES[name] if sized else {}
    model = build_graphs.BUILDERS[name](**kwargs)
    onnx.checker.check_model(model, full_check=True)
    feed = build_graphs.example_feed(model, batch=2, seq=12)
    (out,) = session(model).run(None, feed)
    assert out.shape[0] == 2 and np.isfinite(out).all()
    if name == "bert":
        assert out.shape == (2, 12, kwargs.get("hidden", 128))
    else:
        assert out.shape == (2, kwargs.get("num_classes", 10))
        assert 0.05 < out.std() < 20  # He-style init keeps the logits in a sane range


def test_generated_graphs_have_the_ops_they_promise():
    def ops(model):
        return {n.op_type for n in model.graph.node}

    assert {"Conv", "BatchNormalization", "Relu", "Add", "GlobalAveragePool", "Gemm"} <= ops(
        build_graphs.resnet()
    )
    mobilenet = build_graphs.mobilenetv2()
    assert "Clip" in ops(mobilenet)
    groups = [a.i for n in mobilenet.graph.node for a in n.attribute if a.name == "group"]
    assert max(groups) > 1, "no depthwise Conv"
    assert {"Gather", "MatMul", "LayerNormalization", "Softmax", "Erf", "Reshape"} <= ops(
        build_graphs.bert()
    )


def test_build_graphs_cli_writes_to_out_dir(tmp_path, monkeypatch):
    argv = ["build_graphs.py", "--out-dir", str(tmp_path), "resnet", "--widths", "8,16"]
    monkeypatch.setattr(sys, "argv", argv)
    build_graphs.main()
    model = onnx.load(tmp_path / "resnet.onnx")
    assert model.graph.node[0].op_type == "Conv"
    assert model.graph.initializer[0].dims[0] == 8


def test_build_output_dir_is_ignored():
    assert "build/" in (MODELS / ".gitignore").read_text().split()


def test_fetch_rejects_unknown_names():
    with pytest.raises(KeyError, match="yolov8n"):
        thirdparty.fetch("no-such-model")


def test_fetch_cache_honours_env(tmp_path, monkeypatch):
    monkeypatch.setenv("ONNXCOMP_CACHE", str(tmp_path))
    assert thirdparty.cache_dir() == tmp_path


@pytest.mark.thirdparty
@pytest.mark.parametrize("name", sorted(thirdparty.ENTRIES))
def test_fetch_third_party_models(name):
    path = thirdparty.fetch(name)
    assert path.is_file() and MODELS.parent not in path.parents
    assert thirdparty.fetch(name) == path  # second call: from the cache
    onnx.checker.check_model(onnx.load(path))
    session(path)  # onnxruntime opens it


def test_lift_to_constants_leaves_no_initializers():
    from models.build_variety import lift_to_constants

    model = build_graphs.resnet(widths=(8,), blocks=1, image_size=16)
    x = build_graphs.example_feed(model)
    expected = session(model).run(None, x)[0]
    lifted = lift_to_constants(model)
    onnx.checker.check_model(lifted, full_check=True)
    assert not lifted.graph.initializer
    np.testing.assert_allclose(session(lifted).run(None, x)[0], expected, rtol=1e-6)


def test_minilm_sentences_tokenize_to_a_fixed_length():
    pytest.importorskip("tokenizers")
    from models import build_minilm

    feed = build_minilm.tokenize(build_minilm.SENTENCES)
    assert sorted(feed) == sorted(build_minilm.INPUT_NAMES)
    assert all(v.shape == (64, build_minilm.SEQ_LEN) and v.dtype == np.int64 for v in feed.values())
    lengths = feed["attention_mask"].sum(axis=1)
    assert lengths.max() < build_minilm.SEQ_LEN  # nothing truncated
    assert (feed["input_ids"][:, 0] == 101).all()  # [CLS]
