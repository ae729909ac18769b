"""Transfer learning on models nobody here wrote, with real photos: the Paddle orientation
classifier and the YOLOv8n detector's backbone learn which texture a crop of a scikit-image photo
shows (brick, grass, gravel), from 12 crops per class taken from the top half of each photo,
scored on 30 crops per class from the bottom half."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from models import photos, thirdparty
from onnxcomp import model as model_io
from onnxcomp.data import NpzData
from onnxcomp.transfer import FitOptions, fit
from onnxcomp.transfer.features import compute_features, key

pytestmark = [pytest.mark.thirdparty, pytest.mark.usefixtures("feature_cache")]
pytest.importorskip("PIL")


def task_files(folder, input_name: str, size: int, scale: str):
    task = photos.texture_task(size=size, scale=scale)
    np.savez(folder / "train.npz", **{input_name: task.x_train}, labels=task.y_train)
    np.savez(folder / "test.npz", **{input_name: task.x_test}, labels=task.y_test)
    return folder / "train.npz", task


@pytest.mark.parametrize(
    "name, input_name, size, scale, cut, least",
    [
        # Measured: 0.978 (512 pooled features); the same head on 16x16 pooled pixels: 0.722.
        ("orientation", "x", 224, "imagenet", "p2o.pd_op.pool2d.2.0", 0.9),
        # Measured: 1.000 at the SPPF output (before the neck's first upsampling).
        ("yolov8n", "images", 320, "unit", "/model.9/cv2/act/Mul_output_0", 0.9),
    ],
)
def test_fit_without_a_cut_on_third_party_backbones(
    name, input_name, size, scale, cut, least, tmp_path
):
    path = thirdparty.fetch(name)
    train, task = task_files(tmp_path, input_name, size, scale)
    model = model_io.load(path)
    result = fit(model, NpzData(train), FitOptions())
    assert result.report["cut"]["tensor"] == cut, result.report["tried"]
    out = model_io.save(result.model, tmp_path / "textures.onnx")
    proto = onnx.load(out)
    onnx.checker.check_model(proto, full_check=True)
    # Dynamic input dims stay dynamic in the spliced model.
    original = onnx.load(path).graph.input[0].type.tensor_type.shape
    assert proto.graph.input[0].type.tensor_type.shape == original

    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    probabilities, label = session.run(None, {input_name: task.x_test})
    assert probabilities.shape == (len(task.y_test), 3)
    accuracy = float((label == task.y_test).mean())
    assert accuracy >= least, accuracy
    # onnxruntime's labels are the numpy head's on the backbone's features.
    np.savez(tmp_path / "test_only.npz", **{input_name: task.x_test})
    backbone = model_io.load(path)
    from onnxcomp.transfer.cuts import fix_input_shapes

    fix_input_shapes(backbone, {input_name: task.x_test.shape})
    features = compute_features(
        backbone, [result.cut], NpzData(tmp_path / "test_only.npz"), cache=False
    )
    np.testing.assert_array_equal(label, result.head.predict(features[key(result.cut)]))
