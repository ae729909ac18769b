"""Pruning third-party models users bring: a Paddle-derived CNN classifier (HardSwish, unfused
BatchNormalization) on rendered, rotated text lines, and NudeNet's YOLOv8n on photos of people
(models/realdata.py)."""

import onnx
import onnx_ir as ir
import pytest

from models import realdata, thirdparty
from onnxcomp import model as model_io
from onnxcomp.prune.api import PruneOptions, prune

pytestmark = pytest.mark.thirdparty


def test_orientation_classifier_structured_keeps_its_accuracy():
    path = thirdparty.fetch("orientation")
    calib, evals = realdata.build("orientation")
    model, report = prune(
        model_io.load(path), PruneOptions(structured=True, sparsity=0.3, samples=32), data=calib, eval_data=evals
    )
    onnx.checker.check_model(ir.to_proto(model), full_check=True)
    assert report["after"]["macs"] < 0.7 * report["before"]["macs"]
    assert report["check"]["drop"] <= 0.01
    live = [g for g in report["groups"] if not g.get("skipped")]
    declined = [g for g in report["groups"] if g.get("skipped")]
    assert len(live) > 10
    # the classifier head feeds a Softmax over the classes: declined, with why
    assert any("Softmax" in g["skipped"] for g in declined)


def test_yolov8n_photos_show_people_and_judge_on_photos_not_calibrated_on():
    """NudeNet's detector finds people's faces and bodies: its evaluation photos hold many boxes of
    the dense model, and no evaluation photo (nor a crop of one) is among the calibration ones."""
    import numpy as np

    from onnxcomp import evaluate, runtime

    calib, evals = realdata.build("yolov8n")
    x_calib, x_eval = np.load(calib)["images"], np.load(evals)["images"]
    assert x_eval.shape[1:] == x_calib.shape[1:] == (3, 320, 320)
    assert len(x_eval) == 3 * len(realdata.PEOPLE_EVAL)  # each photo whole and two crops of it
    assert set(realdata.PEOPLE_EVAL) <= set(realdata.people_photos())
    # whole photos and crops never match across the split (letterboxed pixels compared)
    flat_c, flat_e = x_calib.reshape(len(x_calib), -1), x_eval.reshape(len(x_eval), -1)
    assert not any(np.allclose(e, c, atol=1e-3) for e in flat_e[::3] for c in flat_c[::3])
    session = runtime.create_session(str(thirdparty.fetch("yolov8n")))
    out = np.concatenate([session.run(None, {"images": x_eval[i : i + 10]})[0] for i in range(0, len(x_eval), 10)])
    boxes = [len(evaluate.detections(o)[0]) for o in out]
    assert sum(boxes) >= 40 and np.count_nonzero(boxes) >= 0.8 * len(boxes)  # measured 53 boxes, on 28 of 30


def test_yolov8n_25_percent_fewer_macs_through_its_split_groups():
    """YOLOv8n (PyTorch export): the C2f blocks' Split and Concat groups are cut, 25 % of the
    MACs go, and the boxes stay close to the dense model's on held-out photos of people."""
    import numpy as np

    from onnxcomp import evaluate, runtime

    calib, evals = realdata.build("yolov8n")
    options = PruneOptions(structured=True, sparsity=0.25, sparsity_of="macs", importance="activation", samples=8)
    dense = model_io.load(thirdparty.fetch("yolov8n"))
    model, report = prune(model_io.copy_model(dense), options, data=calib, eval_data=evals)
    assert report["after"]["macs"] <= 0.76 * report["before"]["macs"]
    live = [g for g in report["groups"] if not g.get("skipped") and g["removed"]]
    assert any("split" in g["kind"] for g in live) and any("residual" in g["kind"] for g in live)
    # the detect head's output convs reach the graph output through Concat/Reshape: declined
    assert all(g.get("skipped") for g in report["groups"] if g["group"].endswith(("cv2.0.2/Conv", "cv3.0.2/Conv")))
    photos = np.load(evals)["images"][:16]
    got, want = (runtime.create_session(m).run(None, {"images": photos})[0] for m in (model, dense))
    # measured 0.83 on 37 dense boxes (8 calibration images of people; 0.5-0.54 on scikit-image's photos alone)
    assert evaluate.box_agreement(got, want)["box_iou"] >= 0.6


def test_silero_vads_weights_inside_if_branches_are_named_with_why():
    """Silero VAD keeps every Conv inside the branches of an If: pruning says so in one line."""
    from onnxcomp.errors import OnnxcompError

    _, evals = realdata.build("silero_vad")  # recorded speech, each frame with its state
    with pytest.raises(OnnxcompError, match="inside a subgraph .*not pruned yet"):
        prune(model_io.load(thirdparty.fetch("silero_vad")), PruneOptions(method="magnitude"), eval_data=evals)


def test_a_size_one_constant_broadcast_over_the_channels_is_left_whole():
    """PP-OCRv4's recognizer scales a [batch, time, 240] tensor by a [1] constant between two
    MatMuls: the constant holds none of the channels (it once had 48 positions cut from it)."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weights = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n)
               for n, s in (("w1", (16, 64)), ("w2", (64, 8)))]  # fmt: skip
    scale = numpy_helper.from_array(np.array([0.5], np.float32), "scale")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Mul", ["h", "scale"], ["s"]),
         helper.make_node("Relu", ["s"], ["r"]), helper.make_node("MatMul", ["r", "w2"], ["y"])],
        "scaled", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4, 8])], [*weights, scale],
    )  # fmt: skip
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model, report = prune(ir.from_proto(proto), PruneOptions(structured=True, sparsity=0.25, optimize=False))
    onnx.checker.check_model(ir.to_proto(model), full_check=True)
    shapes = {v.name: list(v.const_value.shape) for v in model.graph.initializers.values()}
    assert shapes == {"w1": [16, 48], "w2": [48, 8], "scale": [1]}
