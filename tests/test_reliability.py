"""Nothing lost, nothing broken saved, no traceback: what a careless or hostile user meets.

Each test is one promise of the command line: an input is never overwritten whatever its
spelling, a result loads from any folder, a result onnxcomp measured as broken is not written,
and every mistake is one ``error:`` line with its documented exit code.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "models"
CNN = MODELS / "digits_cnn.onnx"
CALIB = MODELS / "digits_calib.npz"
TEST = MODELS / "digits_test.npz"


def _copy(src: Path, dst: Path) -> Path:
    dst.write_bytes(src.read_bytes())
    return dst


def _loads_from_elsewhere(path: Path) -> None:
    """onnxruntime opens ``path`` from another working folder (external data resolved)."""
    code = "import onnxruntime as o, sys; o.InferenceSession(sys.argv[1])"
    subprocess.run([sys.executable, "-c", code, str(path.resolve())], cwd="/", check=True)


def _error_line(result) -> str:
    lines = result.stderr.strip().splitlines()
    assert lines, "no message on stderr"
    assert "Traceback" not in result.stderr, result.stderr
    return lines[-1]


# ---------------------------------------------------------------------------------------------
# An input that is not the model is never overwritten


@pytest.mark.parametrize("option", ["--data", "--eval-data"])
def test_quantize_refuses_to_overwrite_its_data(tmp_path, cli, option):
    data = _copy(CALIB, tmp_path / "calib.npz")
    before = data.read_bytes()
    result = cli("quantize", CNN, "-o", data, option, data, "--mode", "dynamic")
    assert result.exit_code == 2
    assert "refusing to overwrite" in _error_line(result)
    assert data.read_bytes() == before


def test_every_spelling_of_an_input_is_refused(tmp_path, cli, monkeypatch):
    data = _copy(CALIB, tmp_path / "calib.npz")
    (tmp_path / "sub").mkdir()
    os.symlink(data, tmp_path / "link.npz")
    os.link(data, tmp_path / "hard.npz")
    monkeypatch.chdir(tmp_path / "sub")
    before = data.read_bytes()
    for spelling in [
        "../calib.npz",
        str(data),
        "../sub/../calib.npz",
        "../link.npz",
        "../hard.npz",
    ]:
        result = cli("quantize", CNN, "-o", spelling, "--data", "../calib.npz", "--mode", "dynamic")
        assert result.exit_code == 2, spelling
        assert "refusing to overwrite" in _error_line(result)
    assert data.read_bytes() == before


def _external_model(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    proto = onnx.load(CNN)
    path = folder / "model.onnx"
    onnx.save(proto, path, save_as_external_data=True, location="model.data", size_threshold=0)
    return path


def test_output_never_replaces_the_models_external_data(tmp_path, cli):
    model = _external_model(tmp_path / "in")
    weights = (tmp_path / "in" / "model.data").read_bytes()
    # "-o in/model" would put its own weights in in/model.data: refused as well.
    for out in [tmp_path / "in" / "model.data", tmp_path / "in" / "model"]:
        result = cli("optimize", model, "-o", out, "--no-bench")
        assert result.exit_code == 2
        assert "refusing to overwrite" in _error_line(result)
    assert (tmp_path / "in" / "model.data").read_bytes() == weights


def test_recipe_output_may_not_be_the_recipe_or_its_data(tmp_path, cli):
    _copy(CNN, tmp_path / "cnn.onnx")
    _copy(TEST, tmp_path / "test.npz")
    recipe = tmp_path / "recipe.yaml"
    for output in ["recipe.yaml", "test.npz"]:
        text = (
            f"input: cnn.onnx\noutput: {output}\nsteps:\n  - pass: optimize\n"
            "validate: {data: test.npz}\n"
        )
        recipe.write_text(text)
        result = cli("run", recipe)
        assert result.exit_code == 2, result.output
        assert "refusing to overwrite" in _error_line(result)
        assert recipe.read_text() == text
    assert (tmp_path / "test.npz").read_bytes() == TEST.read_bytes()


# ---------------------------------------------------------------------------------------------
# Models with external weights: the result loads from anywhere


def test_optimize_writes_external_weights_beside_the_output(tmp_path, cli):
    model = _external_model(tmp_path / "in")
    out = tmp_path / "out" / "opt.onnx"
    result = cli("optimize", model, "-o", out, "--no-bench")
    assert result.exit_code == 0, result.stderr
    assert (tmp_path / "out" / "opt.onnx.data").exists()
    _loads_from_elsewhere(out)
    assert cli("validate", CNN, out, "--data", TEST, "--max-drop", "0").exit_code == 0


@pytest.mark.parametrize("mode", ["auto", "static"])
def test_quantize_external_weights_from_another_folder(tmp_path, cli, monkeypatch, mode):
    model = _external_model(tmp_path / "in")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    out = tmp_path / "out" / f"{mode}.onnx"
    result = cli(
        "quantize",
        os.path.relpath(model),
        "-o",
        os.path.relpath(out),
        "--mode",
        mode,
        "--data",
        CALIB,
    )
    assert result.exit_code == 0, result.stderr
    _loads_from_elsewhere(out)


# ---------------------------------------------------------------------------------------------
# A result the self-check measured as broken is not written


def _tiny_cnn(path: Path, opset: int = 17) -> Path:
    """Conv -> Tanh -> GlobalAveragePool -> Gemm with random weights: int8 ruins it."""
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("Conv", ["input", "W", "B"], ["c"], pads=[1, 1, 1, 1], name="conv"),
        helper.make_node("Tanh", ["c"], ["t"], name="tanh"),
        helper.make_node("GlobalAveragePool", ["t"], ["g"], name="gap"),
        helper.make_node("Flatten", ["g"], ["f"], name="flat"),
        helper.make_node("Gemm", ["f", "G", "GB"], ["logits"], name="fc"),
    ]
    weights = [
        numpy_helper.from_array(rng.standard_normal((16, 1, 3, 3)).astype(np.float32), "W"),
        numpy_helper.from_array((rng.standard_normal(16) * 0.1).astype(np.float32), "B"),
        numpy_helper.from_array(rng.standard_normal((16, 10)).astype(np.float32), "G"),
        numpy_helper.from_array(np.zeros(10, np.float32), "GB"),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
        weights,
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    proto.ir_version = 8
    onnx.save(proto, path)
    return path


def _random_npz(path: Path, n: int = 64) -> Path:
    x = np.random.default_rng(1).standard_normal((n, 1, 8, 8)).astype(np.float32)
    np.savez(path, input=x)
    return path


def test_broken_static_result_is_not_written(tmp_path, cli):
    """One outlier of 1e6 in the calibration data: min-max ranges make every real input zero."""
    model = _tiny_cnn(tmp_path / "tiny.onnx")
    evaluation = _random_npz(tmp_path / "eval.npz")
    x = np.load(evaluation)["input"].copy()
    x[0, 0, 0, 0] = 1e6
    np.savez(tmp_path / "calib.npz", input=x)
    out = tmp_path / "q.onnx"
    args = [
        "quantize",
        model,
        "-o",
        out,
        "--mode",
        "static",
        "--data",
        tmp_path / "calib.npz",
        "--eval-data",
        evaluation,
    ]
    result = cli(*args)
    assert result.exit_code == 1, result.stderr
    assert "broken" in _error_line(result) and "--force" in _error_line(result)
    assert not out.exists()
    forced = cli(*args, "--force")
    assert forced.exit_code == 0
    assert "warning: written with --force" in forced.stderr
    assert out.exists()


def test_the_reported_tanh_cnn_is_written_only_when_healthy(tmp_path, cli):
    """The case of the report: written only when its own check finds it sound."""
    model = _tiny_cnn(tmp_path / "tiny.onnx")
    out = tmp_path / "q.onnx"
    result = cli(
        "quantize",
        model,
        "-o",
        out,
        "--mode",
        "static",
        "--data",
        _random_npz(tmp_path / "calib.npz"),
        "--json",
    )
    if result.exit_code == 0:
        import json

        from onnxcomp.inputs import broken_reason

        assert broken_reason(json.loads(result.stdout)["check"]) is None
    else:
        assert result.exit_code == 1 and not out.exists()


def test_broken_reason_reads_the_self_check():
    from onnxcomp.inputs import broken_reason

    healthy = {
        "comparison": {"outputs": [{"output": "y", "cosine_mean": 0.999, "top1_agreement": 0.98}]}
    }
    assert broken_reason(healthy) is None
    assert "cosine" in broken_reason(
        {"comparison": {"outputs": [{"output": "y", "cosine_mean": 0.27}]}}
    )
    assert "cosine" in broken_reason(
        {"comparison": {"outputs": [{"output": "y", "cosine_mean": float("nan")}]}}
    )
    assert "top-1" in broken_reason(
        {
            "comparison": {
                "outputs": [{"output": "y", "cosine_mean": 0.95, "top1_agreement": 0.0156}]
            }
        }
    )
    assert "accuracy" in broken_reason(
        {"comparison": {"outputs": [], "accuracy_reference": 0.9, "accuracy_candidate": 0.1}}
    )


# ---------------------------------------------------------------------------------------------
# Opsets onnxruntime cannot quantize: upgraded or refused before any work


def test_static_on_opset_7_is_upgraded(tmp_path, cli):
    model = _tiny_cnn(tmp_path / "op7.onnx", opset=7)
    out = tmp_path / "q7.onnx"
    result = cli(
        "quantize",
        model,
        "-o",
        out,
        "--mode",
        "static",
        "--per-tensor",
        "--data",
        _random_npz(tmp_path / "c.npz"),
        "--force",
    )
    assert result.exit_code == 0, result.stderr
    assert max(o.version for o in onnx.load(out).opset_import if o.domain in ("", "ai.onnx")) >= 10
    ort.InferenceSession(str(out))


def test_static_on_an_opset_onnxruntime_cannot_quantize_is_refused_up_front(tmp_path, cli):
    from onnxcomp import runtime

    if runtime.qdq_problem(28) is None:
        pytest.skip("this onnxruntime runs QuantizeLinear at opset 28")
    model = _tiny_cnn(tmp_path / "op28.onnx", opset=28)
    out = tmp_path / "q28.onnx"
    result = cli(
        "quantize", model, "-o", out, "--mode", "static", "--data", _random_npz(tmp_path / "c.npz")
    )
    assert result.exit_code == 2
    assert "opset 28" in _error_line(result)
    assert not out.exists()


# ---------------------------------------------------------------------------------------------
# Signals: exit 130/143, children ended, temporary files removed


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def _ended(pid: int, seconds: float = 5.0) -> bool:
    import time

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return True
        if state in ("Z", "X"):
            return True
        time.sleep(0.05)
    return False


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="needs Linux /proc")
def test_sigterm_during_bench_memory_ends_the_child_and_cleans_up(tmp_path):
    import signal
    import time

    env = dict(os.environ, TMPDIR=str(tmp_path))
    code = "from onnxcomp.cli import main; main()"
    args = ["bench", str(CNN), "--runs", "2", "--warmup", "0"]
    proc = subprocess.Popen(
        [sys.executable, "-c", code, *args], env=env, cwd=ROOT,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    child = None
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        kids = _children(proc.pid)
        if kids:
            child = kids[0]
            break
        time.sleep(0.05)
    if child is None:
        proc.wait()
        pytest.skip("the memory child ended before it could be interrupted")
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 143, stderr
    assert stderr.strip().splitlines()[-1] == "error: terminated"
    assert _ended(child, seconds=60), Path(f"/proc/{child}/cmdline").read_bytes()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("onnxcomp-")]


def test_interrupted_save_leaves_nothing_beside_the_output(tmp_path, monkeypatch):
    import onnx_ir as ir

    from onnxcomp import model as model_io
    from onnxcomp.errors import Terminated

    model = model_io.load(CNN)

    def interrupted(*args, **kwargs):
        Path(args[1]).write_bytes(b"half")
        raise Terminated()

    monkeypatch.setattr(ir, "save", interrupted)
    with pytest.raises(Terminated):
        model_io.save(model, tmp_path / "out.onnx")
    assert list(tmp_path.iterdir()) == []


def test_exit_codes_of_the_command_line(tmp_path, cli, monkeypatch):
    """0 ok, 1 check failed, 2 user error, 3 internal error (a traceback only with --debug)."""
    assert cli("validate", CNN, CNN, "--data", TEST, "--max-drop", "0").exit_code == 0
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    assert cli("validate", CNN, bad).exit_code == 2
    assert cli("validate", CNN, CNN, "--data", TEST, "--max-drop", "-0.5").exit_code == 2

    from onnxcomp import data

    def boom(*args, **kwargs):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(data, "open_data", boom)
    result = cli("validate", CNN, CNN)
    assert result.exit_code == 3
    assert "internal error: ZeroDivisionError: a bug" in result.stderr
    assert "Traceback" not in result.stderr
    with pytest.raises(ZeroDivisionError):
        cli("--debug", "validate", CNN, CNN)


# ---------------------------------------------------------------------------------------------
# Corrupt models, bad data, bad options, bad recipes: one error line, exit 2, nothing written


def _graph(path: Path, nodes, inits=(), inputs=None, opset: int = 17) -> Path:
    graph = helper.make_graph(
        nodes,
        "g",
        inputs or [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        list(inits),
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    proto.ir_version = 8
    onnx.save(proto, path)
    return path


def _undefined_weight():
    tensor = numpy_helper.from_array(np.ones((4, 4), np.float32), "w")
    tensor.data_type = TensorProto.UNDEFINED
    return tensor


BAD_MODELS = {
    "cycle": (
        lambda p: _graph(p, [helper.make_node("Add", ["x", "b"], ["a"]),
                             helper.make_node("Relu", ["a"], ["b"]),
                             helper.make_node("Identity", ["a"], ["y"])]),
        "cycle",
    ),
    "reshape_without_inputs": (
        lambda p: _graph(p, [helper.make_node("Reshape", [], ["r"]),
                             helper.make_node("Add", ["x", "r"], ["y"])]),
        "Reshape needs at least 2",
    ),
    "empty_weight": (
        lambda p: _graph(p, [helper.make_node("Gemm", ["x", "w"], ["y"], transB=1)],
                         [numpy_helper.from_array(np.zeros((0, 4), np.float32), "w")]),
        "empty weight",
    ),
    "undefined_weight": (
        lambda p: _graph(p, [helper.make_node("MatMul", ["x", "w"], ["y"])], [_undefined_weight()]),
        "UNDEFINED",
    ),
    "huge_input": (
        lambda p: _graph(p, [helper.make_node("Relu", ["x"], ["y"])],
                         inputs=[helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 100000, 100000])]),
        "--data",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_MODELS))
@pytest.mark.parametrize("command", ["optimize", "quantize"])
def test_corrupt_models_are_one_error_line(tmp_path, cli, case, command):
    build, message = BAD_MODELS[case]
    model = build(tmp_path / f"{case}.onnx")
    out = tmp_path / "out.onnx"
    args = [command, model, "-o", out] + (["--mode", "dynamic"] if command == "quantize" else ["--no-bench"])
    result = cli(*args)
    assert result.exit_code == 2, result.stderr
    assert message in _error_line(result)
    assert not out.exists()


def test_external_data_outside_the_model_folder_is_refused(tmp_path, cli):
    (tmp_path / "model").mkdir()
    proto = onnx.load(CNN)
    onnx.save(proto, tmp_path / "model" / "m.onnx", save_as_external_data=True, location="m.data",
              size_threshold=0)
    (tmp_path / "model" / "m.data").rename(tmp_path / "outside.data")
    proto = onnx.load(tmp_path / "model" / "m.onnx", load_external_data=False)
    for tensor in proto.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "../outside.data"
    onnx.save(proto, tmp_path / "model" / "m.onnx")
    for command in (["optimize", "--no-bench"], ["quantize", "--mode", "dynamic"]):
        result = cli(command[0], tmp_path / "model" / "m.onnx", "-o", tmp_path / "o.onnx", *command[1:])
        assert result.exit_code == 2
        assert "outside the model's folder" in _error_line(result)


def test_already_quantized_model_is_refused(tmp_path, cli):
    once = tmp_path / "once.onnx"
    assert cli("quantize", CNN, "-o", once, "--mode", "dynamic").exit_code == 0
    result = cli("quantize", once, "-o", tmp_path / "twice.onnx", "--mode", "dynamic")
    assert result.exit_code == 2
    assert "already quantized" in _error_line(result)


def _digits(**arrays) -> dict:
    data = dict(np.load(TEST))
    data.update(arrays)
    return data


BAD_DATA = {
    "nan": (lambda d: _digits(input=np.where(np.arange(d["input"].size).reshape(d["input"].shape) == 5, np.nan, d["input"]).astype(np.float32)), "NaN"),
    "inf": (lambda d: _digits(input=np.full_like(d["input"], np.inf)), "infinity"),
    "one_hot": (lambda d: _digits(labels=np.eye(10, dtype=np.int64)[d["labels"]]), "one-hot"),
    "float_labels": (lambda d: _digits(labels=d["labels"].astype(np.float32)), "integer class indices"),
    "string_labels": (lambda d: _digits(labels=d["labels"].astype(str)), "strings"),
    "negative_labels": (lambda d: _digits(labels=-d["labels"] - 1), "start at 0"),
    "labels_out_of_range": (lambda d: _digits(labels=d["labels"] + 10), "out of range"),
}


@pytest.mark.parametrize("case", sorted(BAD_DATA))
def test_bad_data_is_refused(tmp_path, cli, case):
    build, message = BAD_DATA[case]
    path = tmp_path / f"{case}.npz"
    np.savez(path, **build(dict(np.load(TEST))))
    result = cli("validate", CNN, CNN, "--data", path, "--max-drop", "0.01")
    assert result.exit_code == 2, result.output
    assert message in _error_line(result)


@pytest.mark.parametrize(
    "args, message",
    [
        (["validate", CNN, CNN, "--max-drop", "nan"], "--max-drop"),
        (["validate", CNN, CNN, "--batch-size", "0"], "--batch-size"),
        (["validate", CNN, CNN, "--shape", "input=-1x1x8x8"], "--shape"),
        (["validate", CNN, CNN, "--threads", "many"], "--threads"),
        (["quantize", CNN, "-o", "/tmp/never-written.onnx", "--threads", "0"], "--threads 0"),
        (["bench", CNN, "--warmup", "-1"], "--warmup"),
    ],
)
def test_bad_options_are_refused(cli, args, message):
    result = cli(*args)
    assert result.exit_code == 2
    assert message in _error_line(result)
    assert _error_line(result).startswith("error: ")


BOMB = """
a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]
b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]
c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]
d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]
e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]
f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]
g: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]
h: &h [*g,*g,*g,*g,*g,*g,*g,*g,*g]
i: &i [*h,*h,*h,*h,*h,*h,*h,*h,*h]
steps: [{pass: optimize}]
"""


@pytest.mark.parametrize(
    "body, message",
    [
        ("threads: many\nsteps: [{pass: optimize}]", "threads: expected an integer"),
        ("shape: 5\nsteps: [{pass: optimize}]", "shape must map"),
        ("shape: {input: 1xAx8x8}\nsteps: [{pass: optimize}]", "shape"),
        ("steps: [{pass: [optimize]}]", "pass must be a pass name"),
        ("steps: [{pass: optimize, 5: x}]", "keys are strings"),
        ("1: x\nsteps: [{pass: optimize}]", "keys are strings"),
        ("steps: [{pass: optimize}]\nvalidate: {limit: ten}", "limit: expected an integer"),
        ("threads: -3\nsteps: [{pass: optimize}]", "threads -3"),
        ("steps: [{pass: optimize}]\nvalidate: {max_drop: -1}", "max_drop -1"),
        ("steps: [{pass: quantize, threads: -3}]", "threads -3"),
        (BOMB, "alias bomb"),
        ("steps: " + "[" * 100 + "]" * 100, "nested deeper"),
    ],
)
def test_bad_recipes_are_one_short_line(tmp_path, cli, body, message):
    _copy(CNN, tmp_path / "cnn.onnx")
    recipe = tmp_path / "r.yaml"
    recipe.write_text("input: cnn.onnx\noutput: out.onnx\n" + body)
    result = cli("run", recipe)
    assert result.exit_code == 2, result.output
    line = _error_line(result)
    assert message in line and len(line) < 300
    assert not (tmp_path / "out.onnx").exists()


def test_unwritable_outputs_are_refused_before_any_work(tmp_path, cli):
    _copy(CNN, tmp_path / "cnn.onnx")
    for out, message in [
        ("/proc/out.onnx", "cannot write under"),
        (str(tmp_path / "cnn.onnx" / "out.onnx"), "is a file, not a folder"),
        (str(tmp_path), "is a directory"),
    ]:
        result = cli("optimize", tmp_path / "cnn.onnx", "-o", out, "--no-bench")
        assert result.exit_code == 2, out
        assert message in _error_line(result)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through folder permissions")
def test_read_only_folder_is_refused(tmp_path, cli):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        result = cli("optimize", CNN, "-o", folder / "out.onnx", "--no-bench")
        assert result.exit_code == 2
        assert "cannot write in" in _error_line(result)
    finally:
        folder.chmod(0o700)


def test_unexpected_probe_failure_is_one_line(tmp_path, cli, monkeypatch):
    """A read-only filesystem or an immutable folder: the write probe fails -> one line."""
    import errno
    import tempfile

    def refuse(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    result = cli("optimize", CNN, "-o", tmp_path / "out.onnx", "--no-bench")
    assert result.exit_code == 2
    assert "read-only filesystem" in _error_line(result)


@pytest.mark.parametrize("new_type", [TensorProto.FLOAT, 5, 8])  # FLOAT tag, TENSORS, STRINGS
def test_ml_attribute_with_a_flipped_type_is_one_line(tmp_path, cli, new_type):
    """One bit flip in an ai.onnx.ml attribute's type once failed inside onnx-ir's serializer."""
    proto = onnx.load(MODELS / "variety" / "logreg_digits.onnx")
    node = next(n for n in proto.graph.node if n.domain == "ai.onnx.ml")
    node.attribute[1].type = new_type
    model = tmp_path / "flipped.onnx"
    onnx.save(proto, model)
    out = tmp_path / "out.onnx"
    result = cli("quantize", model, "-o", out, "--mode", "dynamic")
    assert result.exit_code in (0, 2), result.stderr
    if result.exit_code == 2:
        assert _error_line(result).startswith("error: ")
        assert not out.exists()


def test_side_outputs_never_replace_inputs(tmp_path, cli):
    """--report and --recipe-out are outputs too: checked against every input up front."""
    data = _copy(TEST, tmp_path / "test.npz")
    result = cli("optimize", CNN, "-o", tmp_path / "o.onnx", "--data", data, "--report", data,
                 "--no-bench")
    assert result.exit_code == 2 and "refusing to overwrite" in _error_line(result)
    result = cli("quantize", CNN, "-o", tmp_path / "q.onnx", "--mode", "dynamic", "--eval-data", data,
                 "--recipe-out", data)
    assert result.exit_code == 2 and "refusing to overwrite" in _error_line(result)
    assert data.read_bytes() == TEST.read_bytes()
    assert not (tmp_path / "o.onnx").exists() and not (tmp_path / "q.onnx").exists()
