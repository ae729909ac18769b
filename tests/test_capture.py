"""Streaming activations into accumulators: one batch at a time, within a memory budget."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from onnxcomp import capture, runtime
from onnxcomp import model as model_io
from onnxcomp.data import NpzData
from onnxcomp.errors import OnnxcompError

MODELS = Path(__file__).resolve().parents[1] / "models"
CNN = MODELS / "digits_cnn.onnx"
CALIB = NpzData(MODELS / "digits_calib.npz")
RELU = "/features/features.2/Relu_output_0"  # (batch, 32, 8, 8)
HIDDEN = "/head/head.2/Relu_output_0"  # (batch, 96)


@pytest.fixture(scope="module")
def cnn():
    model = model_io.load(CNN)
    model_io.normalize(model)
    return model


def reference(model, name: str, limit: int) -> np.ndarray:
    """The tensor for all samples at once, by a plain session (what streaming must reproduce)."""
    session = runtime.capture_session(model, [name])
    inputs = np.load(MODELS / "digits_calib.npz")["input"][:limit]
    return runtime.run(session, {"input": inputs}, [name])[name]


def test_channel_stats_match_numpy_on_the_whole_tensor(cnn):
    by_value = {v.name: v for n in cnn.graph for v in n.outputs}
    conv_in = capture.ChannelStats(axis=1)
    features = capture.ChannelStats(axis=-1)
    samples = capture.accumulate(
        cnn, {by_value[RELU]: conv_in, HIDDEN: features}, CALIB, batch_size=16, limit=100
    )
    assert samples == 100

    x = reference(cnn, RELU, 100).astype(np.float64)  # (100, 32, 8, 8)
    stats = conv_in.compute()
    assert stats.count == 100 * 8 * 8
    np.testing.assert_allclose(stats.mean, x.mean(axis=(0, 2, 3)), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(stats.l2, np.sqrt((x**2).sum(axis=(0, 2, 3))), rtol=1e-6)
    np.testing.assert_allclose(stats.absmax, np.abs(x).max(axis=(0, 2, 3)), rtol=1e-6)
    h = reference(cnn, HIDDEN, 100).astype(np.float64)
    np.testing.assert_allclose(features.compute().mean, h.mean(axis=0), rtol=1e-6, atol=1e-9)


def test_several_accumulators_on_one_tensor_and_teacher_outputs(cnn):
    kept = capture.Collect()
    stats = capture.ChannelStats()
    capture.accumulate(cnn, {"logits": [kept, stats]}, CALIB, batch_size=32, limit=70)
    logits = kept.compute()
    assert logits.shape == (70, 10)
    np.testing.assert_allclose(logits, reference(cnn, "logits", 70), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(stats.compute().mean, logits.mean(axis=0), rtol=1e-5, atol=1e-6)


def test_collect_refuses_more_than_its_budget(cnn):
    with pytest.raises(OnnxcompError, match="more than"):
        capture.accumulate(cnn, {RELU: capture.Collect(max_bytes=1 << 16)}, CALIB, limit=64)


def test_small_budget_shrinks_batches_then_splits_runs(cnn):
    names = [RELU, HIDDEN, "logits"]  # 8 KB + 384 B + 40 B per sample
    plan = lambda budget: capture.plan_runs(  # noqa: E731
        runtime.capture_session(cnn, names), cnn, names, CALIB, batch_size=32, budget_bytes=budget
    )
    assert plan(1 << 30).batch_size == 32 and len(plan(1 << 30).runs) == 1
    smaller = plan(64 * 1024)
    assert smaller.batch_size == 7 and len(smaller.runs) == 1
    split = plan(4096)  # not even one sample of RELU fits: it gets a run of its own
    assert split.batch_size == 1 and split.runs == [[RELU], [HIDDEN, "logits"]]

    # Every tensor sees every sample once, whatever the runs; the statistics do not change.
    def means(budget):
        stats = {name: capture.ChannelStats(axis=1) for name in names}
        seen = capture.accumulate(cnn, stats, CALIB, limit=50, budget_bytes=budget)
        return seen, {name: s.compute() for name, s in stats.items()}

    seen_all, full = means(1 << 30)
    seen_split, split_stats = means(4096)
    assert seen_all == seen_split == 50
    for name in names:
        assert split_stats[name].count == full[name].count
        np.testing.assert_allclose(split_stats[name].mean, full[name].mean, rtol=1e-9)


def test_sizes_of_unshaped_tensors_are_probed(cnn):
    model = model_io.copy_model(cnn)
    for node in model.graph:
        for value in node.outputs:
            value.shape = None
    plan = capture.plan_runs(
        runtime.capture_session(model, [RELU]), model, [RELU], CALIB, batch_size=32,
        budget_bytes=1 << 20,
    )  # fmt: skip
    assert plan.bytes_per_sample[RELU] == 32 * 8 * 8 * 4
    assert plan.batch_size == 32


def test_signal_to_noise_of_a_rounding(cnn):
    step = 0.05
    sqnr = capture.SignalToNoise(lambda x: np.round(x / step) * step)
    capture.accumulate(cnn, {HIDDEN: sqnr}, CALIB, limit=64)
    x = reference(cnn, HIDDEN, 64).astype(np.float64)
    noise = np.sum((x - np.round(x / step) * step) ** 2)
    assert sqnr.compute() == pytest.approx(10 * np.log10(np.sum(x * x) / noise), rel=1e-6)


def test_unknown_tensor_names_the_tensor(cnn):
    with pytest.raises(OnnxcompError, match="no tensor named 'nope'"):
        capture.accumulate(cnn, {"nope": capture.ChannelStats()}, CALIB, limit=4)
    assert [v.name for v in cnn.graph.outputs] == ["logits"]  # the model is left as it was


def _plain(path: Path, name: str, feeds: dict) -> np.ndarray:
    """``name`` computed by the whole model, made a graph output with onnx alone."""
    proto = onnx.load(path)
    proto.graph.output.append(onnx.ValueInfoProto(name=name))
    session = runtime.create_session(proto.SerializeToString(), optimization="disable")
    return session.run([name], feeds)[0]


def test_a_capture_session_runs_only_what_its_tensors_need(cnn):
    """onnxruntime runs every node whichever output is asked for, so the capture session's graph
    is cut to the nodes its tensors need; the tensors are the whole model's, the inputs unchanged."""
    proto = onnx.load(CNN)
    first_conv = next(n for n in proto.graph.node if n.op_type == "Conv")
    runtime.keep_only(proto.graph, [first_conv.output[0]])
    assert [n.op_type for n in proto.graph.node] == ["Conv"]
    assert {t.name for t in proto.graph.initializer} == set(first_conv.input[1:])
    assert [v.name for v in proto.graph.output] == [first_conv.output[0]]
    assert [v.name for v in proto.graph.input] == ["input"]
    feeds = {"input": np.load(MODELS / "digits_calib.npz")["input"][:8]}
    for name in (RELU, HIDDEN, "input"):
        session = runtime.capture_session(cnn, [name])
        assert [o.name for o in session.get_outputs()] == [name]
        np.testing.assert_array_equal(session.run(None, feeds)[0], _plain(CNN, name, feeds))


def test_a_capture_after_an_if_keeps_what_its_branches_read():
    path = MODELS / "variety" / "if_digits.onnx"
    proto = onnx.load(path)
    runtime.keep_only(proto.graph, ["logits"])
    # the If's branches read the trunk's output from the outer graph: the trunk stays
    assert [n.op_type for n in proto.graph.node][-1] == "If" and "Gemm" in {n.op_type for n in proto.graph.node}
    model = model_io.load(path)
    feeds = {"input": np.load(MODELS / "digits_calib.npz")["input"][:8].reshape(8, -1)}
    for name in ("logits", "/ReduceMean_output_0"):
        session = runtime.capture_session(model, [name])
        np.testing.assert_array_equal(session.run(None, feeds)[0], _plain(path, name, feeds))
