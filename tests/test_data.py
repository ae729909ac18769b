"""Data sources: npz files read in batches (memory-mapped when stored), folders, random inputs."""

from __future__ import annotations

import numpy as np
import pytest

from onnxcomp.data import FolderData, NpzData, RandomData, open_data, parse_shapes
from onnxcomp.errors import OnnxcompError
from onnxcomp.model import InputSpec

SPEC = [InputSpec("x", np.dtype(np.float32), ("N", 4))]


def test_npz_batches_are_memory_mapped_slices(tmp_path):
    x = np.arange(100 * 4, dtype=np.float32).reshape(100, 4)
    labels = np.arange(100) % 3
    np.savez(tmp_path / "d.npz", x=x, labels=labels)
    source = NpzData(tmp_path / "d.npz")
    assert isinstance(source._arrays["x"], np.memmap)  # uncompressed: nothing read up front
    batches = list(source.batches(32))
    assert [len(b) for b in batches] == [32, 32, 32, 4]
    np.testing.assert_array_equal(np.concatenate([b.inputs["x"] for b in batches]), x)
    np.testing.assert_array_equal(np.concatenate([b.labels for b in batches]), labels)
    assert [len(b) for b in source.batches(32, limit=40)] == [32, 8]


def test_compressed_npz_and_folder(tmp_path):
    folder = tmp_path / "parts"
    folder.mkdir()
    for i in range(3):
        np.savez_compressed(folder / f"{i}.npz", x=np.full((10, 4), i, np.float32))
    source = open_data(folder, SPEC)
    assert isinstance(source, FolderData) and source.num_samples == 30
    values = np.concatenate([b.inputs["x"][:, 0] for b in source.batches(7)])
    np.testing.assert_array_equal(values, np.repeat([0, 1, 2], 10))


@pytest.mark.parametrize(
    "arrays, message",
    [
        ({"y": np.zeros((3, 4), np.float32)}, "unknown input name 'y'"),
        ({"x": np.zeros((3, 4), np.float64)}, "'x' is float64, the model wants float32"),
        ({"x": np.zeros((3, 5), np.float32)}, "axis 1 differs"),
        ({"x": np.zeros((3, 4, 1), np.float32)}, "rank 3"),
        (
            {"x": np.zeros((3, 4), np.float32), "labels": np.zeros(2)},
            "disagree on the number of samples",
        ),
    ],
)
def test_data_that_does_not_fit_is_named(tmp_path, arrays, message):
    np.savez(tmp_path / "d.npz", **arrays)
    with pytest.raises(OnnxcompError, match=message):
        open_data(tmp_path / "d.npz", SPEC)


def test_not_an_npz(tmp_path):
    (tmp_path / "d.npz").write_text("hello")
    with pytest.raises(OnnxcompError, match="not a readable .npz"):
        open_data(tmp_path / "d.npz", SPEC)


def test_random_data_resolves_shapes():
    specs = [
        InputSpec("input_ids", np.dtype(np.int64), ("batch", "seq")),
        InputSpec("attention_mask", np.dtype(np.int64), ("batch", "seq")),
    ]
    with pytest.raises(OnnxcompError, match="--shape input_ids="):
        RandomData(specs)
    source = RandomData(
        specs, samples=3, shapes=parse_shapes(["input_ids=2x7", "attention_mask=2x7"])
    )
    batches = list(source.batches())
    assert len(batches) == 3
    assert batches[0].inputs["input_ids"].shape == (2, 7)
    assert (batches[0].inputs["attention_mask"] == 1).all()
    with pytest.raises(OnnxcompError, match="expected NAME="):
        parse_shapes(["1x3x224"])
    with pytest.raises(OnnxcompError, match="unknown input name"):
        RandomData(specs, shapes={"nope": [1]})


def test_scalar_inputs_go_with_every_batch(tmp_path):
    np.savez(tmp_path / "d.npz", x=np.zeros((5, 4), np.float32), sr=np.array(16000, np.int64))
    specs = [*SPEC, InputSpec("sr", np.dtype(np.int64), ())]
    source = open_data(tmp_path / "d.npz", specs)
    batches = list(source.batches(2))
    assert [len(b) for b in batches] == [2, 2, 1]
    assert all(b.inputs["sr"].shape == () and int(b.inputs["sr"]) == 16000 for b in batches)


# A recurrent cell as streaming models export it: the state's batch axis is its second; the
# sample rate is a scalar.
STATEFUL = """
<ir_version: 8, opset_import: ["" : 17]>
cell (float[N, 4] x, float[2, N, 4] state, int64 sr) => (float[N, 1] prob, float[2, N, 4] state_out)
<int64 first = {0}, int64[1] axes = {1}> {
    h = Gather<axis = 0>(state, first)
    mixed = Add(h, x)
    gate = ReduceSum<keepdims = 1>(mixed, axes)
    prob = Sigmoid(gate)
    state_out = Tanh(state)
}
"""


def test_a_state_whose_batch_axis_is_second_is_fed_one_whole_feed_per_sample(tmp_path):
    import onnx

    from onnxcomp import model as model_io
    from onnxcomp.validate import compare

    path = tmp_path / "cell.onnx"
    onnx.save(onnx.parser.parse_model(STATEFUL), path)
    specs = model_io.input_specs(model_io.load(path))
    rng = np.random.default_rng(0)
    # state stored [samples, 2, 1, 4]: one axis more than its input; sr a 0-d array
    np.savez(
        tmp_path / "d.npz",
        x=rng.normal(size=(5, 4)).astype(np.float32),
        state=rng.normal(size=(5, 2, 1, 4)).astype(np.float32),
        sr=np.array(16000, np.int64),
    )
    source = open_data(tmp_path / "d.npz", specs)
    batches = list(source.batches(32))
    assert len(batches) == 5
    assert batches[0].inputs["state"].shape == (2, 1, 4) and batches[0].inputs["x"].shape == (1, 4)
    assert batches[0].inputs["sr"].shape == ()
    result = compare(str(path), str(path), source)
    assert result.samples == 5
    # one probability per sample is judged by the decision at 0.5, as top-1 agreement
    assert result.to_json()["outputs"][0]["top1_agreement"] == 1.0
    assert result.metric() == "top1"
