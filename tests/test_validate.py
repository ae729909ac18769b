"""validate: both models run in onnxruntime, differences and accuracy reported, --max-drop exit codes."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx_ir as ir

from onnxcomp import model as model_io


def _perturbed_copy(src, dst, scale):
    """The digits CNN with its first conv weight scaled: a real, measurably worse candidate."""
    model = model_io.load(src)
    conv = next(n for n in model.graph if n.op_type == "Conv")
    weight = conv.inputs[1].const_value
    conv.inputs[1].const_value = ir.tensor(weight.numpy() * scale, name=weight.name)
    model_io.save(model, dst)
    return dst


def test_identical_models(cli, models_dir):
    cnn = models_dir / "digits_cnn.onnx"
    result = cli("validate", cnn, cnn, "--data", models_dir / "digits_test.npz", "--json")
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    out = payload["outputs"][0]
    assert out["max_abs_error"] == 0 and out["top1_agreement"] == 1.0
    assert payload["accuracy_reference"] == payload["accuracy_candidate"] >= 0.95
    assert payload["samples"] == len(np.load(models_dir / "digits_test.npz")["labels"])


def test_max_drop_exit_code(cli, models_dir, tmp_path):
    cnn = models_dir / "digits_cnn.onnx"
    bad = _perturbed_copy(cnn, tmp_path / "bad.onnx", scale=-1.0)
    data = models_dir / "digits_test.npz"
    result = cli("validate", cnn, bad, "--data", data, "--max-drop", "0.01")
    assert result.exit_code == 1
    assert "FAIL" in result.stdout
    loose = cli("validate", cnn, bad, "--data", data, "--max-drop", "1.0", "--json")
    assert loose.exit_code == 0
    payload = json.loads(loose.stdout)
    assert payload["accuracy_candidate"] < payload["accuracy_reference"]
    assert payload["drop"] > 0.01


def test_random_inputs_without_data(cli, models_dir):
    mlp = models_dir / "digits_mlp.onnx"
    result = cli("validate", mlp, mlp, "--samples", "4", "--json")
    assert result.exit_code == 0
    assert json.loads(result.stdout)["outputs"][0]["identical"] is True


def test_candidate_with_other_outputs(cli, models_dir, tmp_path):
    proto = onnx.load(models_dir / "digits_mlp.onnx")
    proto.graph.output[0].name = "renamed"
    proto.graph.node[-1].output[0] = "renamed"
    onnx.save(proto, tmp_path / "renamed.onnx")
    result = cli("validate", models_dir / "digits_mlp.onnx", tmp_path / "renamed.onnx")
    assert result.exit_code == 2
    assert "candidate lacks output" in result.stderr
