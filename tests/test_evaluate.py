"""evaluate: one model scored, two compared, the verdict; sequence outputs judged per position;
echo outputs; the user's own metric in the API, the CLI and recipes; teacher outputs."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import yaml

from onnxcomp import model as model_io
from onnxcomp.data import NpzData
from onnxcomp.errors import OnnxcompError
from onnxcomp.evaluate import (
    ReferenceOutputs,
    Verdict,
    compare,
    evaluate,
    load_metric,
    reference_outputs,
    weakest_output,
)

# A CTC-like recogniser head: scores over 5 classes at every one of 6 time steps, softmax.
SEQUENCE = """
<ir_version: 8, opset_import: ["" : 17]>
seq (float[N, 6, 4] x) => (float[N, 6, 5] probs) {
    logits = MatMul(x, w)
    probs = Softmax<axis = -1>(logits)
}
"""
# The same with a copy of its input as a second output (as MiniLM exports echo input_ids).
ECHO = """
<ir_version: 8, opset_import: ["" : 17]>
seq (float[N, 6, 4] x) => (float[N, 6, 5] probs, float[N, 6, 4] x_echo) {
    logits = MatMul(x, w)
    probs = Softmax<axis = -1>(logits)
    x_echo = Identity(x)
}
"""


def _sequence_model(path, text=SEQUENCE, scale=1.0, seed=0):
    proto = onnx.parser.parse_model(text)
    w = np.random.default_rng(seed).normal(size=(4, 5)).astype(np.float32) * scale
    proto.graph.initializer.append(onnx.numpy_helper.from_array(w, "w"))
    onnx.save(proto, path)
    return path


def _sequence_data(path, n=40, labels=False):
    rng = np.random.default_rng(1)
    arrays = {"x": rng.normal(size=(n, 6, 4)).astype(np.float32)}
    if labels:
        arrays["labels"] = rng.integers(0, 2, n)
    np.savez(path, **arrays)
    return path


def test_sequence_scores_are_judged_per_position(tmp_path):
    ref = _sequence_model(tmp_path / "ref.onnx")
    # Nearly the same weights: cosine stays high while some positions change their argmax.
    cand = _sequence_model(tmp_path / "cand.onnx", scale=1.0)
    proto = onnx.load(cand)
    w = onnx.numpy_helper.to_array(proto.graph.initializer[0]).copy()
    w[:, 0] += 0.6
    proto.graph.initializer[0].CopyFrom(onnx.numpy_helper.from_array(w, "w"))
    onnx.save(proto, cand)
    comparison = compare(str(ref), str(cand), NpzData(_sequence_data(tmp_path / "d.npz")))
    out = comparison.to_json()["outputs"][0]
    assert out["top1_per_position"] is True
    assert comparison.metric() == "top1"
    assert comparison.drop() == pytest.approx(1 - out["top1_agreement"])
    # per position: the agreement counts 40 samples x 6 time steps
    stats = comparison.outputs[0]
    assert stats.top1_total == 40 * 6
    assert 0 < comparison.drop() < 1


def test_verdict_names_metric_budget_and_reason(models_dir):
    cnn = str(models_dir / "digits_cnn.onnx")
    comparison = compare(cnn, cnn, NpzData(models_dir / "digits_test.npz"), limit=64)
    verdict = comparison.verdict("auto", 0.01)
    assert isinstance(verdict, Verdict)
    assert verdict.passed and verdict.metric == "accuracy drop" and verdict.drop == 0
    assert verdict.value == verdict.reference_value == comparison.accuracy_candidate
    assert "within 0.01" in verdict.reason and "64 samples" in verdict.reason
    failing = Verdict.judge("1 - cosine", 0.2, 0.005)
    assert not failing.passed and "exceeds 0.005" in failing.reason
    assert not Verdict.judge("1 - cosine", float("nan"), 0.5).passed
    # without a budget, the default for the metric when asked for
    assert comparison.verdict(default=True).budget == 0.01


def test_outputs_that_echo_inputs_may_be_missing(tmp_path):
    ref = _sequence_model(tmp_path / "echo.onnx", text=ECHO)
    cand = _sequence_model(tmp_path / "plain.onnx")
    comparison = compare(str(ref), str(cand), NpzData(_sequence_data(tmp_path / "d.npz")))
    assert "x_echo" in comparison.skipped_outputs
    assert [s.name for s in comparison.outputs] == ["probs"]
    assert comparison.drop() == 0


def test_evaluate_one_model(models_dir):
    result = evaluate(str(models_dir / "digits_cnn.onnx"), NpzData(models_dir / "digits_test.npz"))
    assert result.metric == "accuracy" and result.value > 0.95
    assert result.samples == len(np.load(models_dir / "digits_test.npz")["labels"])
    with pytest.raises(OnnxcompError, match="needs labels"):
        evaluate(
            str(models_dir / "digits_cnn.onnx"), NpzData(models_dir / "digits_test.npz"), "top1"
        )


METRIC_FILE = '''
import numpy as np


def exact_lines(outputs, target):
    """1 per sample whose best class at every position matches the target's."""
    pred = outputs["probs"].argmax(-1)
    want = target["probs"].argmax(-1) if isinstance(target, dict) else target
    return np.all(pred == want, axis=-1).astype(float)


def correct(outputs, labels):
    """(correct, count) against the labels."""
    return int(np.sum(outputs["logits"].argmax(-1) == labels)), len(labels)
'''


def test_user_metric_from_a_file(tmp_path, models_dir):
    (tmp_path / "mymetrics.py").write_text(METRIC_FILE)
    ref = _sequence_model(tmp_path / "ref.onnx")
    cand = _sequence_model(tmp_path / "cand.onnx", seed=3)
    data = NpzData(_sequence_data(tmp_path / "d.npz"))
    metric = load_metric(f"{tmp_path / 'mymetrics.py'}:exact_lines")
    comparison = compare(str(ref), str(cand), data, metric=metric)
    assert comparison.user_reference == 1.0  # the reference against its own outputs
    assert comparison.user_candidate < 0.5
    verdict = comparison.verdict(metric, 0.01)
    assert verdict.metric == "exact_lines drop" and not verdict.passed
    assert verdict.drop == pytest.approx(1.0 - comparison.user_candidate)
    # (sum, count) per batch, against labels, on one model
    correct = load_metric(f"{tmp_path / 'mymetrics.py'}:correct")
    one = evaluate(
        str(models_dir / "digits_cnn.onnx"), NpzData(models_dir / "digits_test.npz"), correct
    )
    plain = evaluate(str(models_dir / "digits_cnn.onnx"), NpzData(models_dir / "digits_test.npz"))
    assert one.metric == "correct" and one.value == pytest.approx(plain.value)


def test_user_metric_errors_are_one_line(tmp_path):
    with pytest.raises(OnnxcompError, match="no such file"):
        load_metric("nothere.py:f")
    with pytest.raises(OnnxcompError, match="cannot import module"):
        load_metric("no_such_module_xyz:f")
    with pytest.raises(OnnxcompError, match="has no function"):
        load_metric("numpy:no_such_function")
    with pytest.raises(OnnxcompError, match="expected one of"):
        load_metric("cosin")


def test_user_metric_in_the_cli_and_recipes(tmp_path, cli):
    (tmp_path / "mymetrics.py").write_text(METRIC_FILE)
    ref = _sequence_model(tmp_path / "ref.onnx")
    cand = _sequence_model(tmp_path / "cand.onnx", seed=3)
    data = _sequence_data(tmp_path / "d.npz")
    metric = f"{tmp_path / 'mymetrics.py'}:exact_lines"
    result = cli("validate", ref, cand, "--data", data, "--metric", metric, "--max-drop", "0.01")
    assert result.exit_code == 1, result.stderr
    assert "FAIL: exact_lines drop" in result.stdout
    result = cli("validate", ref, ref, "--data", data, "--metric", metric, "--json")
    payload = json.loads(result.stdout)
    assert payload["verdict"]["metric"] == "exact_lines drop" and payload["drop"] == 0
    # a recipe names the file relative to itself
    recipe = {
        "input": "ref.onnx",
        "output": "out.onnx",
        "steps": [{"pass": "normalize"}],
        "validate": {"data": "d.npz", "metric": "mymetrics.py:exact_lines", "max_drop": 0.0},
    }
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    result = cli("run", tmp_path / "r.yaml", "--json")
    assert result.exit_code == 0, result.stderr
    validation = json.loads(result.stdout)["validation"]
    assert validation["verdict"]["metric"] == "exact_lines drop" and validation["passed"]


def test_user_metric_drives_quantize(tmp_path, models_dir):
    from onnxcomp.quantize.api import QuantizeOptions, quantize

    (tmp_path / "m.py").write_text(
        "import numpy as np\n"
        "def top2(outputs, labels):\n"
        "    best = np.argsort(outputs['logits'], -1)[:, -2:]\n"
        "    return np.any(best == labels[:, None], axis=1)\n"
    )
    _, report = quantize(
        model_io.load(models_dir / "digits_cnn.onnx"),
        QuantizeOptions(mode="static", metric=f"{tmp_path / 'm.py'}:top2", check_samples=128),
        data=models_dir / "digits_calib.npz",
        eval_data=models_dir / "digits_test.npz",
    )
    check = report["check"]
    assert check["drop_metric"] == "top2 drop"
    assert check["comparison"]["user_metric"]["candidate"] > 0.9


def test_teacher_outputs_per_batch(models_dir):
    data = NpzData(models_dir / "digits_test.npz")
    cnn = str(models_dir / "digits_cnn.onnx")
    seen = 0
    for batch, outputs in reference_outputs(cnn, data, batch_size=16, limit=40):
        assert outputs["logits"].shape == (len(batch), 10)
        seen += len(batch)
    assert seen == 40
    # kept within its memory budget, a second pass runs nothing
    teacher = ReferenceOutputs(cnn, data, batch_size=16, limit=40)
    first = [o["logits"] for _, o in teacher]
    teacher.session = None  # a second pass must not touch the session
    second = [o["logits"] for _, o in teacher]
    assert all(a is b for a, b in zip(first, second))


def test_box_agreement_counts_lost_and_added_boxes_as_zero():
    from onnxcomp.evaluate import box_agreement

    def yolo(*boxes):  # [4 + 2 classes, anchors]: (cx, cy, w, h, score class 0, score class 1)
        out = np.zeros((6, 4), np.float32)
        for i, (cx, cy, w, h, cls) in enumerate(boxes):
            out[:, i] = [cx, cy, w, h, 0.9 if cls == 0 else 0.0, 0.9 if cls == 1 else 0.0]
        return out

    want = yolo((10, 10, 10, 10, 0), (50, 50, 20, 20, 1))[None]
    assert box_agreement(want, want)["box_iou"] == 1.0
    shifted = yolo((11, 10, 10, 10, 0), (50, 50, 20, 20, 1))[None]  # IoU 90/110 for the first box
    assert abs(box_agreement(shifted, want)["box_iou"] - (2 * 90 / 110 + 2) / 4) < 1e-6
    lost = yolo((10, 10, 10, 10, 0))[None]  # the class-1 box is gone: it counts 0
    row = box_agreement(lost, want)
    assert abs(row["box_iou"] - 2 / 3) < 1e-6 and row["reference_boxes"] == 2 and row["boxes"] == 1

    # the same, as a metric auto and --max-drop can judge by: one score per image
    from onnxcomp.evaluate import load_metric

    metric = load_metric("onnxcomp.evaluate:yolo_boxes")
    empty = np.zeros((6, 4), np.float32)[None]  # no box in either: they agree
    got = np.concatenate([want, lost, empty])
    total, count = metric.score(
        {"output0": got}, {"output0": np.concatenate([want, want, empty])}, 3
    )
    assert count == 3 and abs(total - (1.0 + 2 / 3 + 1.0)) < 1e-6


def test_one_probability_per_sample_is_judged_by_its_decision(tmp_path):
    # A sigmoid [batch, 1] (speech or not): each row's cosine is only its sign, always 1 here;
    # the decision at 0.5 is what a user reads.
    def model(path, bias):
        text = f"""
        <ir_version: 8, opset_import: ["" : 17]>
        detector (float[N, 4] x) => (float[N, 1] prob)
        <int64[1] axes = {{1}}, float bias = {{{bias}}}> {{
            total = ReduceSum<keepdims = 1>(x, axes)
            shifted = Add(total, bias)
            prob = Sigmoid(shifted)
        }}
        """
        onnx.save(onnx.parser.parse_model(text), path)
        return str(path)

    np.savez(
        tmp_path / "d.npz", x=np.random.default_rng(0).normal(size=(200, 4)).astype(np.float32)
    )
    comparison = compare(model(tmp_path / "a.onnx", 0.0), model(tmp_path / "b.onnx", 0.5),
                         NpzData(tmp_path / "d.npz"))  # fmt: skip
    out = comparison.to_json()["outputs"][0]
    assert out["cosine_mean"] == pytest.approx(1.0)
    assert comparison.metric() == "top1"
    assert 0.02 < comparison.drop() < 0.5  # the frames whose sum lies in (-0.5, 0) flip


def test_weakest_output_is_the_one_a_summary_line_shows():
    """paraphrase-MiniLM's first output is its int64 input_ids passed through (cosine 1.0)."""
    rows = [
        {"output": "output", "cosine_mean": 1.0},
        {"output": "onnx::Shape_422", "cosine_mean": 0.991},
        {"output": "461", "cosine_mean": 0.979},
        {"output": "flags", "identical": True},
    ]
    assert weakest_output(rows)["output"] == "461"
    assert weakest_output([{"output": "flags", "identical": True}]) == {}
