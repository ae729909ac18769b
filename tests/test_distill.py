"""Distillation on real digits: the digits CNN teaches a student with half its channels (trained
on digits 0-4 only) all ten digits from 100 labelled and 1,000 unlabelled images."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from models.build_digits import load_split

pytestmark = pytest.mark.usefixtures("feature_cache")
MODELS = Path(__file__).resolve().parents[1] / "models"
TEACHER = MODELS / "digits_cnn.onnx"
STUDENT = MODELS / "digits_cnn_04_half.onnx"  # half the channels, has seen digits 0-4 only


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    folder = tmp_path_factory.mktemp("distill")
    split = load_split()
    rng = np.random.default_rng(0)
    order = rng.permutation(len(split.x_train))
    labelled, unlabelled = order[:100], order[100:1100]
    np.savez(folder / "labelled.npz", input=split.x_train[labelled], labels=split.y_train[labelled])
    np.savez(folder / "unlabelled.npz", input=split.x_train[unlabelled])
    np.savez(folder / "test.npz", input=split.x_test, labels=split.y_test)
    return folder


def accuracy(path, data) -> float:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    spec = session.get_inputs()[0]
    x = data["input"].reshape(
        len(data["input"]), *[d if isinstance(d, int) else -1 for d in spec.shape[1:]]
    )
    outputs = dict(zip([o.name for o in session.get_outputs()], session.run(None, {spec.name: x})))
    return float((outputs["label"] == data["labels"]).mean())


def test_distilled_student_beats_the_same_student_trained_on_labels_alone(cli, digits, tmp_path):
    distilled, labels_only = tmp_path / "distilled.onnx", tmp_path / "labels_only.onnx"
    result = cli(
        "distill",
        TEACHER,
        "--student",
        STUDENT,
        "--data",
        digits / "labelled.npz",
        "--data",
        digits / "unlabelled.npz",
        "--temperature",
        "4",
        "-o",
        distilled,
        "--json",
    )
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["samples"] == 1100 and report["labelled_samples"] == 100
    assert report["teacher_output"] == "logits" and report["val_agreement"] > 0.9
    onnx.checker.check_model(onnx.load(distilled), full_check=True)

    result = cli("transfer", "fit", STUDENT, "--data", digits / "labelled.npz", "-o", labels_only)
    assert result.exit_code == 0, result.stderr
    test = np.load(digits / "test.npz")
    with_teacher, alone = accuracy(distilled, test), accuracy(labels_only, test)
    # Measured: 0.991 distilled vs 0.920 from the 100 labels (teacher 0.993).
    assert with_teacher > alone + 0.03, (with_teacher, alone)

    # Agreement with the teacher improves too.
    teacher = ort.InferenceSession(str(TEACHER)).run(None, {"input": test["input"]})[0].argmax(1)

    def agreement(path):
        return float(
            (
                ort.InferenceSession(str(path)).run(None, {"input": test["input"]})[1] == teacher
            ).mean()
        )

    assert agreement(distilled) > agreement(labels_only)


def test_an_mlp_student_reads_the_teachers_images_flattened(digits, tmp_path):
    from onnxcomp import model as model_io
    from onnxcomp.data import NpzData
    from onnxcomp.transfer.distill import DistillOptions, distill

    teacher, student = model_io.load(TEACHER), model_io.load(MODELS / "digits_mlp.onnx")
    result = distill(
        teacher,
        student,
        [NpzData(digits / "unlabelled.npz")],
        DistillOptions(temperature=2.0, labels_weight=0.0),
    )
    assert result.report["labelled_samples"] == 0
    out = model_io.save(result.model, tmp_path / "mlp.onnx")
    onnx.checker.check_model(onnx.load(out), full_check=True)
    assert accuracy(out, np.load(digits / "test.npz")) > 0.95


def test_distill_as_a_recipe_step_with_the_input_as_teacher(cli, digits, tmp_path):
    # prune -> distill -> quantize pipelines take the recipe's input as the teacher; here the
    # student is the teacher itself after its last layer is re-initialised.
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"""version: 1
input: {TEACHER}
output: {tmp_path / "out.onnx"}
steps:
  - pass: transfer_structure
    reinit: head
  - pass: distill
    data: {digits / "unlabelled.npz"}
    temperature: 2
"""
    )
    result = cli("run", recipe, "--json")
    assert result.exit_code == 0, result.stderr
    step = json.loads(result.stdout)["steps"][1]
    assert step["pass"] == "distill" and step["report"]["teacher"] == str(TEACHER)
    assert accuracy(tmp_path / "out.onnx", np.load(digits / "test.npz")) > 0.97


def test_distill_errors(cli, digits, tmp_path):
    bad = tmp_path / "bad.npz"
    np.savez(
        bad, input=np.load(digits / "labelled.npz")["input"], labels=np.full(100, 12, np.int64)
    )
    result = cli("distill", TEACHER, "--student", STUDENT, "--data", bad, "-o", tmp_path / "x.onnx")
    assert result.exit_code == 2 and "teacher scores 10 classes" in result.stderr
    result = cli(
        "distill",
        TEACHER,
        "--student",
        STUDENT,
        "--data",
        digits / "labelled.npz",
        "--teacher-output",
        "nope",
        "-o",
        tmp_path / "x.onnx",
    )
    assert result.exit_code == 2 and "no output 'nope'" in result.stderr
