"""optimize and quantize on models exported by other tools: LSTM, If, Loop, scikit-learn, Constant
weights at opset 12. Each result runs in onnxruntime next to its input."""

from __future__ import annotations

import json

import numpy as np
import pytest

from onnxcomp import model as model_io
from onnxcomp.data import NpzData
from onnxcomp.validate import compare

VARIETY = ["lstm_digits", "if_digits", "loop_digits", "logreg_digits", "const_cnn_digits"]


def _data(tmp_path, models_dir, name, split):
    """The digits split laid out as the model's input wants it."""
    model = model_io.load(models_dir / "variety" / f"{name}.onnx")
    spec = model_io.input_specs(model)[0]
    source = np.load(models_dir / f"digits_{split}.npz")
    x = source["input"]
    rank = len(spec.shape) if spec.shape is not None else 4
    x = {2: x.reshape(len(x), 64), 3: x[:, 0], 4: x}[rank]
    path = tmp_path / f"{name}_{split}.npz"
    np.savez(path, **{spec.name: x.astype(spec.dtype), "labels": source["labels"]})
    return path


@pytest.mark.parametrize("name", VARIETY)
def test_optimize_checks_itself(tmp_path, models_dir, cli, name):
    src = models_dir / "variety" / f"{name}.onnx"
    data = _data(tmp_path, models_dir, name, "test")
    out = tmp_path / "opt.onnx"
    result = cli("optimize", src, "-o", out, "--data", data, "--no-bench", "--json")
    assert result.exit_code == 0, result.stderr
    comparison = compare(str(src), str(out), NpzData(data))
    assert all(s.max_abs <= 1e-4 * max(1.0, s.ref_scale) for s in comparison.outputs)


@pytest.mark.parametrize("name", VARIETY)
def test_quantize_auto_never_breaks_the_model(tmp_path, models_dir, cli, name):
    src = models_dir / "variety" / f"{name}.onnx"
    calib = _data(tmp_path, models_dir, name, "calib")
    test = _data(tmp_path, models_dir, name, "test")
    out = tmp_path / "q.onnx"
    result = cli("quantize", src, "-o", out, "--data", calib, "--eval-data", test, "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["auto"]["chosen"] in ("static", "dynamic", "float", "optimized")
    comparison = compare(str(src), str(out), NpzData(test))
    # auto's default budget: at most 1 point of accuracy lost, whatever it chose.
    assert comparison.accuracy_drop is not None and comparison.accuracy_drop <= 0.01
