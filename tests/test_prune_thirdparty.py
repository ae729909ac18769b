"""Pruning third-party models users bring: a Paddle-derived CNN classifier (HardSwish, unfused
BatchNormalization) on rendered, rotated text lines (models/realdata.py)."""

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
