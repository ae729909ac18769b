"""Target CPUs: int8 weights that onnxruntime's u8s8 kernels run exactly on every x86 path.

The default (``--target-cpu any``) writes 7-bit weights ([-64, 64]), because on AVX2 and AVX-512
without VNNI the kernels' int16 pair sums saturate with full-range weights. These tests hold on any
machine: they check the codes written, and accuracy measured in onnxruntime on this machine.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from onnxcomp import cpu
from onnxcomp import model as model_io
from onnxcomp.errors import OnnxcompError
from onnxcomp.quantize import schemes
from onnxcomp.quantize.api import QuantizeOptions, quantize

MODELS = Path(__file__).resolve().parents[1] / "models"
CNN = MODELS / "digits_cnn.onnx"
MLP = MODELS / "digits_mlp.onnx"


def int8_weights(path: Path) -> list[np.ndarray]:
    model = onnx.load(path)
    return [
        onnx.numpy_helper.to_array(t)
        for t in model.graph.initializer
        if t.data_type == onnx.TensorProto.INT8 and t.dims and np.prod(t.dims) > 1
    ]


def test_isa_path_names_a_known_path():
    assert cpu.isa_path() in {"avx512-vnni", "avx-vnni", "avx512", "avx2", "arm64", "other"}


@pytest.mark.parametrize(
    ("target", "reduced"),
    [("any", True), ("avx2", True), ("avx512", True), ("vnni", False), ("arm64", False)],
)
def test_targets_choose_the_weight_range(target, reduced):
    assert cpu.reduce_range(target) is reduced
    assert cpu.describe(target)["weight_range"].startswith("7-bit" if reduced else "8-bit")


def test_unknown_target_is_a_user_error():
    with pytest.raises(OnnxcompError, match="--target-cpu 'pentium'"):
        QuantizeOptions(target_cpu="pentium").check()


def test_reduced_grid_never_leaves_seven_bits_even_with_gptq_style_values():
    w = np.random.default_rng(0).standard_normal((16, 32)).astype(np.float32)
    params = schemes.weight_params(w, axis=0, reduce_range=True)
    assert params.levels == (-64, 64)
    # values beyond the calibrated range (as GPTQ's error feedback makes) clip to the grid
    q = schemes.quantize(w * 3, params)
    assert q.min() >= -64 and q.max() <= 64 and q.max() == 64


@pytest.mark.parametrize(
    ("target", "limit"), [("any", 64), ("vnni", 127)]
)
def test_static_cli_writes_weights_for_the_target(cli, tmp_path, target, limit):
    out = tmp_path / "q.onnx"
    result = cli(
        "quantize", CNN, "-o", out, "--mode", "static", "--data", MODELS / "digits_calib.npz",
        "--eval-data", MODELS / "digits_test.npz", "--target-cpu", target, "--json",
    )
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["cpu"]["target_cpu"] == target
    assert report["cpu"]["isa_measured"] == cpu.isa_path()
    codes = int8_weights(out)
    assert codes and max(int(np.abs(c).max()) for c in codes) == limit
    if target == "any":  # exact on this machine whatever its path: no accuracy lost
        assert report["check"]["drop"] <= 0.003


def test_dynamic_default_is_seven_bit_and_close_to_fp32(tmp_path):
    data = MODELS / "digits_test_flat.npz"
    model, report = quantize(
        model_io.load(MLP), QuantizeOptions(mode="dynamic"), data=data, eval_data=data
    )
    assert report["reduce_range"] is True and report["cpu"]["target_cpu"] == "any"
    path = model_io.save(model, tmp_path / "q.onnx")
    codes = int8_weights(path)
    assert codes and max(int(np.abs(c).max()) for c in codes) <= 64
    assert report["check"]["drop"] <= 0.005
