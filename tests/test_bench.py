"""bench: interleaved latency ratios that mean something, peak memory from child processes,
what onnxruntime's optimizer made of a graph, and one-line errors for bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from onnxcomp import model as model_io
from onnxcomp.bench import benchmark, graph_report

VARIETY = Path(__file__).resolve().parents[1] / "models" / "variety"


def _doubled_convs(src: Path, dst: Path) -> Path:
    """The digits CNN with every Conv given a twin on the same input, outputs added: twice the
    conv MACs, same shapes. The twin's weights are halved so onnxruntime cannot merge the two
    (common-subexpression elimination or initializer sharing)."""
    model = model_io.load(src)
    graph = model.graph
    for conv in [n for n in graph if n.op_type == "Conv"]:
        weight = conv.inputs[1]
        twin_weight = ir.Value(
            name=f"{weight.name}.twin",
            const_value=ir.tensor(weight.const_value.numpy() * 0.5, name=f"{weight.name}.twin"),
        )
        graph.register_initializer(twin_weight)
        twin = ir.node("Conv", [conv.inputs[0], twin_weight], attributes=dict(conv.attributes))
        out = conv.outputs[0]
        uses = list(out.uses())
        total = ir.node("Add", [out, twin.outputs[0]])
        graph.insert_after(conv, [twin, total])
        for use in uses:
            use.node.replace_input_with(use.idx, total.outputs[0])
    model_io.save(model, dst)
    return dst


QDQ = """
<ir_version: 8, opset_import: ["" : 17]>
qdq (float[1, 3, 8, 8] x) => (float[1, 4, 8, 8] y)
    <float s = {0.05}, uint8 zp = {128}, float ws = {0.01}, int8 wzp = {0}>
{
    xq = QuantizeLinear (x, s, zp)
    xd = DequantizeLinear (xq, s, zp)
    w = DequantizeLinear (w_q, ws, wzp)
    c = Conv <pads = [1, 1, 1, 1]> (xd, w, b)
    cq = QuantizeLinear (c, s, zp)
    cd = DequantizeLinear (cq, s, zp)
    y = Exp (cd)
}
"""


def _qdq_model(path: Path) -> Path:
    """A QDQ Conv onnxruntime fuses into QLinearConv, then a DequantizeLinear feeding Exp,
    which stays float: one island."""
    proto = onnx.parser.parse_model(QDQ)
    rng = np.random.default_rng(0)
    proto.graph.initializer.append(
        onnx.numpy_helper.from_array(rng.integers(-100, 100, (4, 3, 3, 3)).astype(np.int8), "w_q")
    )
    proto.graph.initializer.append(onnx.numpy_helper.from_array(np.zeros(4, np.float32), "b"))
    onnx.checker.check_model(proto)
    onnx.save(proto, path)
    return path


def test_model_against_itself(models_dir):
    cnn = models_dir / "digits_cnn.onnx"
    result = benchmark([cnn, cnn], runs=30, warmup=2, memory=False, graph=False)
    first, second = result.models
    assert first.ratio_p50 == 1.0 and second.ratio_p50 > 0
    assert len(first.latencies_ms) == len(second.latencies_ms) == 30
    assert first.percentile(50) <= first.percentile(90) <= first.percentile(99)


@pytest.mark.timing
def test_model_against_itself_is_within_noise(models_dir):
    cnn = models_dir / "digits_cnn.onnx"
    result = benchmark([cnn, cnn], runs=300, warmup=20, memory=False, graph=False)
    assert 0.7 <= result.models[1].ratio_p50 <= 1.4, result.models[1].ratio_p50


@pytest.mark.timing
def test_doubled_conv_stack_is_clearly_slower(models_dir, tmp_path):
    cnn = models_dir / "digits_cnn.onnx"
    doubled = _doubled_convs(cnn, tmp_path / "doubled.onnx")
    result = benchmark([cnn, doubled], runs=300, warmup=20, memory=False, graph=False)
    assert result.models[1].ratio_p50 > 1.3, result.models[1].ratio_p50


def test_doubled_conv_stack_graph(models_dir, tmp_path):
    cnn = models_dir / "digits_cnn.onnx"
    doubled = _doubled_convs(cnn, tmp_path / "doubled.onnx")
    result = benchmark([cnn, doubled], runs=5, warmup=1, memory=False)
    # a valid model with twice the Conv nodes (and an Add each), also after onnxruntime's fusions
    assert result.models[1].graph["nodes_before"] == 14 + 2 * 3
    assert (
        result.models[1].graph["top_ops"]["Conv"] >= 2 * result.models[0].graph["top_ops"]["Conv"]
    )


def test_cli_json_with_memory_and_data(cli, models_dir):
    cnn = models_dir / "digits_cnn.onnx"
    result = cli(
        "bench",
        cnn,
        models_dir / "digits_cnn_opset11.onnx",
        "--runs",
        "30",
        "--warmup",
        "3",
        "--data",
        models_dir / "digits_test.npz",
        "--batch-size",
        "4",
        "--json",
    )
    assert result.exit_code == 0, result.stderr
    payload = json.loads(result.stdout)  # nothing but JSON on stdout
    assert payload["batch"] == 4 and payload["inputs"]["input"]["shape"] == [4, 1, 8, 8]
    for entry in payload["models"]:
        assert entry["peak_memory_bytes"] > 0, entry
        assert entry["latency_ms"]["p50"] > 0 and entry["throughput_samples_per_s"] > 0
        assert entry["graph"]["nodes"] < entry["graph"]["nodes_before"]  # BN folded, Gemm fused
        assert entry["graph"]["integer_kernels"] == 0


def test_cli_table(cli, models_dir):
    result = cli("bench", models_dir / "digits_mlp.onnx", "--runs", "10", "--no-memory")
    assert result.exit_code == 0, result.stderr
    assert "p50 ratio" in result.stdout and "1.00x" in result.stdout
    assert result.stderr == ""  # no progress bar when stderr is not a terminal


def test_graph_report_counts_fused_kernels_and_islands(tmp_path):
    report = graph_report(_qdq_model(tmp_path / "qdq.onnx"))
    assert report["integer_kernel_ops"] == {"QLinearConv": 1}
    assert report["islands"] == 1 and report["island_consumers"] == {"Exp": 1}
    assert report["dequantize_linear"] == 1
    assert list(tmp_path.iterdir()) == [tmp_path / "qdq.onnx"]  # optimized file not left behind


def test_graph_report_accepts_ir_model(models_dir):
    report = graph_report(model_io.load(models_dir / "digits_cnn.onnx"))
    assert report["nodes_before"] == 14 and report["nodes"] < 14


def test_if_loop_and_lstm_run(tmp_path):
    from tests.test_inspect import _if_loop_model, _lstm_model

    for path in (_if_loop_model(tmp_path / "branchy.onnx"), _lstm_model(tmp_path / "lstm.onnx")):
        shapes = {"X": [3, 1, 5]} if "lstm" in path.name else None
        result = benchmark([path], runs=5, warmup=1, memory=False, shapes=shapes)
        assert result.models[0].p50_ms > 0


@pytest.mark.parametrize("path", sorted(VARIETY.glob("*.onnx")), ids=lambda p: p.name)
def test_variety_models(cli, path):
    result = cli("bench", path, "--runs", "3", "--warmup", "1", "--no-memory", "--json")
    if result.exit_code == 2:  # e.g. a dynamic dim that needs --shape: said in one line
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    else:
        assert result.exit_code == 0, result.stderr
        assert json.loads(result.stdout)["models"][0]["latency_ms"]["p50"] > 0


def _unknown_op_model(path: Path) -> Path:
    text = """
    <ir_version: 8, opset_import: ["" : 17, "my.ops" : 1]>
    g (float[1, 4] x) => (float[1, 4] y) { y = my.ops.Frobnicate (x) }
    """
    onnx.save(onnx.parser.parse_model(text), path)
    return path


def test_bad_input_exit_2(cli, models_dir, tmp_path):
    cnn = models_dir / "digits_cnn.onnx"
    truncated = tmp_path / "cut.onnx"
    truncated.write_bytes(cnn.read_bytes()[:4000])
    wrong_names = tmp_path / "wrong.npz"
    np.savez(wrong_names, pixels=np.zeros((2, 1, 8, 8), np.float32))
    cases = {
        "cut.onnx": ["bench", truncated],
        "onnxruntime cannot load": ["bench", _unknown_op_model(tmp_path / "custom.onnx")],
        "--shape input": ["bench", cnn, "--shape", "input=1x3x8x8"],
        "unknown input name 'pixels'": ["bench", cnn, "--data", wrong_names],
        "same inputs": ["bench", cnn, models_dir / "digits_mlp.onnx"],
    }
    for expected, args in cases.items():
        result = cli(*args, "--runs", "2", "--no-memory")
        assert result.exit_code == 2, (args, result.stdout)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
        assert expected in lines[0], lines[0]
        assert "Traceback" not in result.stderr


@pytest.mark.thirdparty
def test_paddle_classifier(cli):
    thirdparty = pytest.importorskip("models.thirdparty")
    try:
        path = thirdparty.fetch("orientation")
    except Exception as err:  # no network / no pip
        pytest.skip(f"cannot fetch orientation: {err}")
    result = cli("bench", path, "--runs", "3", "--warmup", "1", "--json")
    assert result.exit_code == 0, result.stderr
    entry = json.loads(result.stdout)["models"][0]
    assert entry["peak_memory_bytes"] > 0
    assert entry["graph"]["nodes"] < entry["graph"]["nodes_before"]
