"""Models with external data, held the way a model over 2 GB must be: weights stay lazy
(memory-mapped, never all read at once), one onnxruntime session alive at a time, rewritten
weights streamed back to disk. A small external-data model here; `benchmarks/bench_large.py`
measures the same commands on one over 2 GB."""

from __future__ import annotations

import os
import weakref

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

from onnxcomp import model as model_io
from onnxcomp import runtime
from onnxcomp.data import NpzData

WIDTH = 1024  # 4 MB per weight
LAYERS = 4


def build(folder, *, identity: bool = True):
    """A MatMul/Relu stack with its weights in ``large.onnx.data`` (and one Identity to remove)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "large.onnx"
    rng = np.random.default_rng(0)
    nodes, inits, offset = [], [], 0
    with open(folder / "large.onnx.data", "wb") as f:
        for i in range(LAYERS):
            w = (rng.standard_normal((WIDTH, WIDTH)) / np.sqrt(WIDTH)).astype(np.float32)
            f.write(w.tobytes())
            tensor = TensorProto(name=f"w{i}", data_type=TensorProto.FLOAT, dims=[WIDTH, WIDTH])
            tensor.data_location = TensorProto.EXTERNAL
            for key, value in (("location", "large.onnx.data"), ("offset", str(offset)),
                               ("length", str(w.nbytes))):  # fmt: skip
                entry = tensor.external_data.add()
                entry.key, entry.value = key, value
            offset += w.nbytes
            inits.append(tensor)
            src = "x" if i == 0 else f"h{i - 1}"
            if i == 1 and identity:
                nodes.append(helper.make_node("Identity", [src], ["copy"]))
                src = "copy"
            nodes.append(helper.make_node("MatMul", [src, f"w{i}"], [f"m{i}"]))
            out = f"h{i}" if i < LAYERS - 1 else "y"
            nodes.append(helper.make_node("Relu", [f"m{i}"], [out]))
    graph = helper.make_graph(
        nodes,
        "large",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", WIDTH])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", WIDTH])],
        inits,
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    x = folder / "x.npz"
    np.savez(x, x=rng.standard_normal((4, WIDTH)).astype(np.float32))
    return path, x


@pytest.fixture
def sessions(monkeypatch):
    """Counts onnxruntime sessions: made, and the most alive at once."""

    class Count:
        made = 0
        alive = 0
        most = 0

    def track(*args, **kwargs):
        session = create(*args, **kwargs)
        Count.made += 1
        Count.alive += 1
        Count.most = max(Count.most, Count.alive)
        weakref.finalize(session, lambda: setattr(Count, "alive", Count.alive - 1))
        return session

    create = runtime.create_session
    monkeypatch.setattr(runtime, "create_session", track)
    return Count


def _outputs(path, x):
    session = runtime.create_session(str(path))
    return runtime.run(session, {"x": np.load(x)["x"]})["y"]


def _lazy(model: ir.Model) -> bool:
    return all(
        isinstance(v.const_value, ir.ExternalTensor)
        for _, v in model_io.iter_tensors(model)
        if v.const_value is not None and v.const_value.nbytes >= 1 << 20
    )


def test_optimize_runs_one_session_at_a_time(tmp_path, sessions):
    from onnxcomp.optimize import optimize

    path, x = build(tmp_path / "in")
    model = model_io.load(path)
    result, report = optimize(model, data=NpzData(x))
    assert report["rules"]["identity"]["applied"] == 1
    assert report["check"]["max_rel_error"] == 0.0
    # the reference is run first and released before the cleaned model's session is made
    assert sessions.made == 2 and sessions.most == 1
    assert _lazy(result) and _lazy(model)  # no weight was read into memory


def test_optimize_that_changes_nothing_runs_nothing(tmp_path, sessions):
    from onnxcomp.optimize import optimize

    path, x = build(tmp_path / "in", identity=False)
    result, report = optimize(model_io.load(path), data=NpzData(x))
    assert report["applied"] == 0 and "check" not in report
    assert "self-check skipped: no rewrite applied" in report["notes"]
    assert sessions.made == 0


def test_compare_releases_the_reference_before_the_candidate(tmp_path, sessions):
    from onnxcomp.validate import compare

    path, x = build(tmp_path / "in")
    comparison = compare(model_io.load(path), model_io.load(path), NpzData(x))
    assert comparison.outputs[0].to_json()["max_abs_error"] == 0.0
    assert sessions.made == 2 and sessions.most == 1


def test_session_files_link_external_data_instead_of_copying(tmp_path):
    path, x = build(tmp_path / "in")
    model = model_io.load(path)
    target = tmp_path / "session" / "model.onnx"
    target.parent.mkdir()
    runtime.write_for_session(model, target)
    [data] = [p for p in target.parent.iterdir() if p.suffix == ".data"]
    assert os.stat(data).st_ino == os.stat(tmp_path / "in" / "large.onnx.data").st_ino
    assert target.stat().st_size < 10_000  # the graph only
    assert _lazy(model)  # the model's own tensors are put back
    np.testing.assert_array_equal(_outputs(target, x), _outputs(path, x))


def test_prune_keeps_weights_on_disk_and_saves_them_beside_the_output(tmp_path, sessions):
    from onnxcomp.prune.api import PruneOptions, prune

    path, x = build(tmp_path / "in")
    model = model_io.load(path)
    pruned, report = prune(model, PruneOptions(sparsity=0.5), eval_data=str(x))
    assert report["after"]["sparsity"] == pytest.approx(0.5, abs=0.01)
    assert _lazy(pruned)  # each pruned weight was written back to disk, not kept in memory
    assert sessions.most == 1
    saved = model_io.save(pruned, tmp_path / "out" / "pruned.onnx", inputs=[path])
    assert (tmp_path / "out" / "pruned.onnx.data").exists()
    reloaded = model_io.load(saved)
    w = reloaded.graph.initializers["w0"].const_value.numpy()
    assert np.mean(w == 0) == pytest.approx(0.5, abs=0.01)
    assert _outputs(saved, x).shape == (4, WIDTH)
    original = model_io.load(path).graph.initializers["w0"].const_value.numpy()
    assert not np.any(original == 0)  # the input's data file is untouched


def test_weight_only_quantize_runs_one_session_at_a_time(tmp_path, sessions, monkeypatch):
    from onnxcomp.quantize.api import QuantizeOptions, quantize

    # as for a model over the limit: the clean-up's fp32 timing (two sessions) is left out
    monkeypatch.setattr(model_io, "TIMING_LIMIT_BYTES", 0)
    path, x = build(tmp_path / "in")
    model, report = quantize(
        model_io.load(path), QuantizeOptions(mode="weight-only", bits=4), data=str(x)
    )
    assert report["quantized"] == LAYERS
    assert report["check"]["comparison"]["outputs"][0]["cosine_mean"] > 0.95
    assert any("not measured" in n for n in report["prepare"]["optimize"]["notes"])
    assert sessions.most == 1
    assert _lazy(model)  # codes of 1 MB and more wait on disk (these are 0.5 MB: in memory)
    saved = model_io.save(model, tmp_path / "out" / "int4.onnx", inputs=[path])
    assert _outputs(saved, x).shape == (4, WIDTH)


def test_dynamic_quantize_leaves_float_weights_unmapped(tmp_path, sessions, monkeypatch):
    from onnxcomp.quantize.api import QuantizeOptions, quantize

    monkeypatch.setattr(model_io, "TIMING_LIMIT_BYTES", 0)
    path, x = build(tmp_path / "in")
    model, report = quantize(model_io.load(path), QuantizeOptions(mode="dynamic"), eval_data=str(x))
    assert report["quantized"] == LAYERS
    assert sessions.most == 1 and _lazy(model)
    saved = model_io.save(model, tmp_path / "out" / "int8.onnx", inputs=[path])
    assert _outputs(saved, x).shape == (4, WIDTH)


def test_released_weights_are_read_again_when_used(tmp_path):
    path, x = build(tmp_path / "in")
    model = model_io.load(path)
    tensor = model.graph.initializers["w0"].const_value
    held = tensor.numpy()  # an array a pass still holds: its pages are dropped, not unmapped
    first = held.copy()
    model_io.release(tensor)
    np.testing.assert_array_equal(held, first)
    del held
    model_io.release(tensor)  # nothing holds it: unmapped, mapped again on the next read
    np.testing.assert_array_equal(tensor.numpy(), first)


def test_inspect_reads_no_weight_data(tmp_path, monkeypatch):
    from onnxcomp.summary import summarize

    path, _ = build(tmp_path / "in")

    def refuse(self):
        raise AssertionError(f"inspect read the data of {self.name}")

    monkeypatch.setattr(ir.ExternalTensor, "numpy", refuse)
    monkeypatch.setattr(ir.ExternalTensor, "tobytes", refuse)
    report = summarize(path)
    assert report["parameters"]["total"] == LAYERS * WIDTH * WIDTH
    assert report["compute"]["total_macs"] == LAYERS * WIDTH * WIDTH
