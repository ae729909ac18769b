"""Layer-by-layer reconstruction: Hessians from streamed inputs, a solver per layer, new weights."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest

from onnxcomp import layerwise, runtime
from onnxcomp import model as model_io
from onnxcomp.data import NpzData

MODELS = Path(__file__).resolve().parents[1] / "models"
FLAT_CALIB = NpzData(MODELS / "digits_calib_flat.npz")
FLAT_TEST = np.load(MODELS / "digits_test_flat.npz")["input"]


def load(name: str) -> ir.Model:
    model = model_io.load(MODELS / name)
    model_io.normalize(model)
    return model


def outputs(model: ir.Model, x: np.ndarray) -> np.ndarray:
    session = runtime.create_session(model)
    return next(iter(runtime.run(session, {"input": x}).values()))


def snr_db(ref: np.ndarray, approx: np.ndarray) -> float:
    return float(10 * np.log10(np.sum(ref**2) / np.sum((ref - approx) ** 2)))


def half_magnitude_mask(w: np.ndarray) -> np.ndarray:
    """Keep the larger half of each row: (out, in) bool."""
    order = np.argsort(np.abs(w), axis=1)
    mask = np.ones(w.shape, bool)
    np.put_along_axis(mask, order[:, : w.shape[1] // 2], False, axis=1)
    return mask


def write_weight(layer: layerwise.LayerResult) -> None:
    """Put the solved weight back into the model, as a pruning pass would."""
    value = layer.view.node.inputs[1]
    value.const_value = ir.tensor(layer.weight.astype(np.float32), name=value.name)


def prune(model: ir.Model, solve, *, sequential: bool, reference: ir.Model | None = None):
    views = [layerwise.linear_view(n) for n in model.graph if n.op_type == "Gemm"]
    source = reference if reference is not None else model
    return layerwise.reconstruct(
        source, views, FLAT_CALIB, solve, write=write_weight, sequential=sequential, limit=200
    )


def least_squares_solver(w, h, ctx):
    mask = half_magnitude_mask(w)
    return layerwise.Solution(layerwise.masked_least_squares(w, h, mask), mask=mask)


def zeroing_solver(w, h, ctx):
    mask = half_magnitude_mask(w)
    return layerwise.Solution(np.where(mask, w, 0).astype(np.float32), mask=mask)


def test_a_pruning_solver_plugs_in_and_beats_plain_magnitude_pruning():
    fp32 = load("digits_mlp.onnx")
    ref = outputs(fp32, FLAT_TEST)

    zeroed = load("digits_mlp.onnx")
    plain = prune(zeroed, zeroing_solver, sequential=False, reference=fp32)
    solved = load("digits_mlp.onnx")
    done = prune(solved, least_squares_solver, sequential=True)

    # Sequential: one run over the data per layer, each on the inputs of the pruned model so far.
    assert done.runs == 3 and plain.runs == 1
    assert [layer.rows for layer in done.layers] == [200, 200, 200]
    for layer_plain, layer_solved in zip(plain.layers, done.layers):
        assert layer_solved.skipped is None
        assert layer_solved.error < 0.7 * layer_plain.error
    for node in solved.graph:
        if node.op_type == "Gemm":
            assert np.mean(node.inputs[1].const_value.numpy() == 0) == pytest.approx(0.5, abs=0.01)

    snr_plain = snr_db(ref, outputs(zeroed, FLAT_TEST))
    snr_solved = snr_db(ref, outputs(solved, FLAT_TEST))
    assert snr_solved > snr_plain + 3.0
    labels = np.argmax(ref, axis=1)
    assert np.mean(np.argmax(outputs(solved, FLAT_TEST), axis=1) == labels) > 0.9


def test_conv_views_round_trip_and_share_hessians():
    cnn = load("digits_cnn.onnx")
    views = [layerwise.linear_view(n) for n in cnn.graph if n.op_type in ("Conv", "Gemm")]
    assert all(isinstance(v, layerwise.LinearView) for v in views)
    seen = {}

    def identity(w, h, ctx):
        seen[(ctx.view.node.name, ctx.group)] = h
        return layerwise.Solution(np.asarray(w, np.float32))

    done = layerwise.reconstruct(
        cnn, views, NpzData(MODELS / "digits_calib.npz"), identity, limit=64
    )
    assert done.runs == 1
    for layer in done.layers:
        assert layer.error == pytest.approx(0.0, abs=1e-12)
        np.testing.assert_array_equal(layer.weight, layer.view.weight)
    conv = done.layers[0]
    h = seen[(conv.view.node.name, 0)]
    assert h.shape == (9, 9)  # one input channel, 3x3 kernel
    assert conv.rows == 64 * 8 * 8  # every position of every sample (fewer than the cap)
    assert np.all(np.linalg.eigvalsh(h) > -1e-9)
    # A channel statistic spread over the im2col features of the second Conv: (1, 32 * 9).
    second = done.layers[1].view
    assert second.input_channels == 32
    assert second.per_feature(np.arange(32.0)).shape == (1, 32 * 9)


def test_masked_least_squares_is_the_best_fit_with_the_mask():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((500, 12)) @ rng.standard_normal((12, 12))  # correlated inputs
    w = rng.standard_normal((4, 12))
    mask = rng.random((4, 12)) > 0.4
    acc = layerwise.HessianAccumulator()
    acc.update(x)
    got = layerwise.masked_least_squares(w, acc.compute(), mask, damp=0.0)
    for row in range(4):
        keep = mask[row]
        best, *_ = np.linalg.lstsq(x[:, keep], x @ w[row], rcond=None)
        np.testing.assert_allclose(got[row, keep], best, rtol=1e-4, atol=1e-5)
        assert np.all(got[row, ~keep] == 0)


def test_corrected_target_maps_drifted_inputs_to_the_reference_outputs():
    rng = np.random.default_rng(0)
    x_ref = rng.normal(size=(2000, 16))  # (rows, in): the dense model's inputs
    x = x_ref @ (np.eye(16) + 0.3 * rng.normal(size=(16, 16)))  # the compressed model's: drifted
    w = rng.normal(size=(8, 16))
    acc = layerwise.HessianAccumulator()
    acc.update(x, x_ref)
    corrected = layerwise.corrected_target(w, acc.H, acc.cross, damp=1e-6)
    error = lambda v: float(np.mean((x_ref @ w.T - x @ v.T) ** 2))  # noqa: E731
    assert error(corrected) < 1e-3 * error(w)
    # no drift: the layer's own weights
    same = layerwise.HessianAccumulator()
    same.update(x_ref, x_ref)
    np.testing.assert_allclose(layerwise.corrected_target(w, same.H, same.cross, damp=1e-6), w, atol=1e-4)


def test_token_positions_keep_padding_out_of_a_hessian():
    from onnxcomp import capture
    from onnxcomp.data import Batch

    mask = np.array([[1, 1, 0, 0], [1, 1, 1, 0]])
    batch = Batch({"input_ids": np.ones((2, 4), np.int64), "attention_mask": mask})
    hidden = np.arange(2 * 4 * 3, dtype=np.float32).reshape(2, 4, 3)  # (batch, seq, features)
    kept = capture._at_positions(hidden, capture.token_positions(batch))
    assert kept.shape == (5, 3)
    np.testing.assert_array_equal(kept, hidden[mask.astype(bool)])
    assert capture.token_positions(Batch({"input": np.zeros((2, 3), np.float32)})) is None
