"""Unstructured pruning on real models: every method, scopes, 2:4, reconstruction, Constant-node
weights, --max-drop, the CLI and a recipe optimize -> prune -> quantize."""

import json

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from onnxcomp import model as model_io
from onnxcomp import runtime
from onnxcomp.errors import OnnxcompError
from onnxcomp.prune.api import PruneOptions, prune

CALIB = "digits_calib.npz"
TEST = "digits_test.npz"


def _accuracy(model, path):
    data = np.load(path)
    session = runtime.create_session(model)
    logits = session.run(None, {"input": data["input"]})[0]
    return float(np.mean(logits.argmax(axis=1) == data["labels"]))


def _prune(models_dir, **options):
    data = options.pop("data", models_dir / CALIB)
    model = model_io.load(models_dir / "digits_cnn.onnx")
    options.setdefault("samples", 128)
    return prune(model, PruneOptions(**options), data=data, eval_data=models_dir / TEST)


def _pruned_rows(report):
    return [t for t in report["tensors"] if "skipped" not in t]


@pytest.mark.parametrize("method", ["magnitude", "random", "wanda"])
def test_each_method_zeroes_half_of_every_pruned_weight(models_dir, method):
    model, report = _prune(models_dir, sparsity=0.5, method=method, reconstruct=False)
    rows = _pruned_rows(report)
    assert len(rows) == 4 and all(abs(r["sparsity"] - 0.5) < 0.01 for r in rows)
    # the first Conv (288 weights) is left alone as a tiny tensor, and says so
    assert any("tiny tensor" in t.get("skipped", "") for t in report["tensors"])
    onnx.checker.check_model(ir.to_proto(model), full_check=True)
    assert _accuracy(model, models_dir / TEST) > (0.5 if method == "random" else 0.9)
    assert report["after"]["zip_bytes"] < 0.7 * report["before"]["zip_bytes"]
    assert report["after"]["macs"] == report["before"]["macs"]


def test_threshold_method(models_dir):
    _, report = _prune(models_dir, method="threshold", threshold=0.05, reconstruct=False)
    for row in _pruned_rows(report):
        assert 0 < row["sparsity"] < 1


def test_reconstruction_keeps_accuracy_at_70_percent(models_dir):
    """ADMM masks, exact least squares on them (the default with data): the issue's bar is <= 1 point."""
    dense = _accuracy(model_io.load(models_dir / "digits_cnn.onnx"), models_dir / TEST)
    model, report = _prune(models_dir, sparsity=0.7)
    assert report["method"] == "admm" and report["reconstruct"] is True
    assert dense - _accuracy(model, models_dir / TEST) <= 0.01
    assert report["check"]["drop"] <= 0.01
    # reconstruction lowered every layer's output error below the plain mask's
    for row in _pruned_rows(report):
        assert row["error"] < row["error_masked"]


def test_admm_masks_leave_less_layer_error_than_sparsegpts(models_dir):
    """At 90 %, ADMM's masks (`numerics.admm_mask`) leave about a quarter of SparseGPT's output error."""
    sgpt_model, sgpt = _prune(models_dir, sparsity=0.9, method="sparsegpt")
    admm_model, admm = _prune(models_dir, sparsity=0.9, method="admm")
    assert admm["method"] == "admm"
    assert all(abs(r["sparsity"] - 0.9) < 0.01 for r in _pruned_rows(admm))
    error = [sum(r["error"] for r in _pruned_rows(report)) for report in (sgpt, admm)]
    assert error[1] < 0.6 * error[0]
    dense = _accuracy(model_io.load(models_dir / "digits_cnn.onnx"), models_dir / TEST)
    assert dense - _accuracy(admm_model, models_dir / TEST) <= 0.01


def test_admm_over_its_cost_limit_takes_sparsegpts_mask_and_says_so(models_dir, monkeypatch):
    from onnxcomp.prune import unstructured

    monkeypatch.setattr(unstructured, "ADMM_FLOPS", 0)
    _, report = _prune(models_dir, sparsity=0.5)
    rows = _pruned_rows(report)
    assert report["method"] == "admm" and rows
    assert all("sparsegpt: ADMM on" in r["mask"] and "cost limit" in r["mask"] for r in rows)


def test_reconstruction_beats_plain_magnitude(models_dir):
    plain, _ = _prune(models_dir, sparsity=0.9, method="magnitude", reconstruct=False)
    solved, _ = _prune(models_dir, sparsity=0.9, method="magnitude", reconstruct=True)
    assert _accuracy(solved, models_dir / TEST) > _accuracy(plain, models_dir / TEST) + 0.05


def test_two_four_pattern_and_channel_scope(models_dir):
    model, report = _prune(models_dir, pattern="2:4", method="magnitude", reconstruct=False)
    for node in model.graph:
        if node.op_type == "Gemm":
            w = node.inputs[1].const_value.numpy()
            assert ((w.reshape(w.shape[0], -1, 4) != 0).sum(axis=2) <= 2).all()
    _, report = _prune(models_dir, sparsity=0.6, scope="channel", method="magnitude", reconstruct=False)
    assert all(abs(r["sparsity"] - 0.6) < 0.01 for r in _pruned_rows(report))
    _, report = _prune(models_dir, sparsity=0.6, scope="global", method="magnitude", reconstruct=False)
    sparsities = [r["sparsity"] for r in _pruned_rows(report)]
    assert max(sparsities) - min(sparsities) > 0.05  # one threshold, uneven per tensor


def test_weights_in_constant_nodes_are_lifted_and_pruned(models_dir):
    path = models_dir / "variety" / "const_cnn_digits.onnx"
    model, report = prune(
        model_io.load(path), PruneOptions(sparsity=0.5, samples=64), data=models_dir / CALIB,
        eval_data=models_dir / TEST,
    )  # fmt: skip
    assert report["prepare"]["normalize"]["constants_lifted"] > 0
    assert _pruned_rows(report)
    assert report["check"]["drop"] <= 0.01


def test_max_drop_spares_sensitive_layers(models_dir):
    model, report = _prune(models_dir, sparsity=0.95, method="magnitude", reconstruct=False, max_drop=0.02)
    assert report["check"]["drop"] <= 0.02
    assert any("spared" in t.get("skipped", "") for t in report["tensors"])
    assert report["check"]["verdict"]["passed"]
    assert report["check"]["rounds"][0]["spared"] == []  # bisection starts from everything pruned


def test_bad_options_are_named(models_dir):
    with pytest.raises(OnnxcompError, match="--sparsity"):
        _prune(models_dir, sparsity=1.5)
    with pytest.raises(OnnxcompError, match="--threshold"):
        _prune(models_dir, method="threshold")
    with pytest.raises(OnnxcompError, match="needs --data"):
        _prune(models_dir, method="wanda", data=None)
    with pytest.raises(OnnxcompError, match="no node named"):
        _prune(models_dir, exclude_nodes=["nope"])
    with pytest.raises(OnnxcompError, match="--allocate error"):
        _prune(models_dir, allocate="error", pattern="2:4")


def test_cli_prune_json(tmp_path, models_dir, cli):
    out = tmp_path / "pruned.onnx"
    result = cli(
        "prune", models_dir / "digits_cnn.onnx", "-o", out, "--sparsity", "0.5", "--data", models_dir / CALIB,
        "--eval-data", models_dir / TEST, "--samples", "64", "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["check"]["drop"] <= 0.003
    onnx.checker.check_model(onnx.load(out), full_check=True)
    text = cli("prune", models_dir / "digits_cnn.onnx", "-o", tmp_path / "b.onnx", "--method", "nope")
    assert text.exit_code == 2 and "error:" in text.stderr


def test_recipe_optimize_prune_quantize(tmp_path, models_dir, cli):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"""version: 1
input: {models_dir / 'digits_cnn.onnx'}
output: {tmp_path / 'out.onnx'}
steps:
  - pass: optimize
  - pass: prune
    sparsity: 0.5
    samples: 64
    data: {models_dir / CALIB}
  - pass: quantize
    mode: static
    data: {models_dir / CALIB}
validate:
  data: {models_dir / TEST}
  max_drop: 0.01
"""
    )
    result = cli("run", recipe, "--json")
    assert result.exit_code == 0, result.output
    model = model_io.load(tmp_path / "out.onnx")
    assert any(n.op_type == "QuantizeLinear" for n in model.graph)
    assert _accuracy(model, models_dir / TEST) > 0.97
