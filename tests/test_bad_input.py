"""Bad input never gives a traceback: truncated and bit-flipped models through every command.

Each mutated file either still works (a bit flip inside weights loads fine) or gets a one-line
``error: ...`` on stderr with exit code 2, and no output file is left behind.
"""

from __future__ import annotations

import numpy as np
import pytest

from onnxcomp.cli import main

MUTANTS = 24


def _mutants(source: bytes, seed: int = 0):
    rng = np.random.default_rng(seed)
    for i in range(MUTANTS):
        data = bytearray(source)
        if i % 3 == 0:
            data = data[: int(rng.integers(1, len(data)))]
        else:
            # Flip bytes in the protobuf structure (the first KB and the tail hold names, ops, dims).
            for _ in range(int(rng.integers(1, 8))):
                region = int(rng.integers(0, 2))
                pos = (
                    int(rng.integers(0, min(1024, len(data))))
                    if region == 0
                    else int(rng.integers(len(data) - 2048, len(data)))
                )
                data[pos] = int(rng.integers(0, 256))
        yield i, bytes(data)


def _commands(reference, mutant, out):
    commands = [["validate", reference, mutant, "--samples", "2"]]
    names = set(main.commands)
    if "inspect" in names:
        commands.append(["inspect", mutant])
    if "bench" in names:
        commands.append(["bench", mutant, "--runs", "2", "--warmup", "0", "--no-memory"])
    if "optimize" in names:
        commands.append(["optimize", mutant, "-o", out])
    if "quantize" in names:
        commands.append(["quantize", mutant, "-o", out, "--mode", "dynamic"])
    return commands


@pytest.mark.parametrize("model_name", ["digits_cnn.onnx", "digits_mlp.onnx"])
def test_mutated_models_never_traceback(tmp_path, models_dir, cli, model_name):
    reference = models_dir / model_name
    outcomes = {0: 0, 1: 0, 2: 0}
    for i, content in _mutants(reference.read_bytes(), seed=len(model_name)):
        mutant = tmp_path / f"m{i}.onnx"
        mutant.write_bytes(content)
        out = tmp_path / f"out{i}.onnx"
        for args in _commands(reference, mutant, out):
            result = cli(*args)  # an exception here fails the test: no traceback reaches users
            assert result.exit_code in (0, 1, 2), (args, result.exit_code)
            outcomes[result.exit_code] += 1
            if result.exit_code == 2:
                lines = result.stderr.strip().splitlines()
                assert lines[-1].startswith("error: "), result.stderr
                assert "Traceback" not in result.stderr
                assert not out.exists(), f"{args} failed yet wrote {out}"
    assert outcomes[2] > 0  # truncations at least must be caught


def _structural_mutants(source: bytes, seed: int = 0):
    """Well-formed protobuf, wrong model: what a bad exporter or a hand edit produces."""
    import onnx

    rng = np.random.default_rng(seed)
    kinds = ["drop_node", "op_type", "dims", "dangling", "attribute", "opset", "input_type"]
    for i in range(28):
        model = onnx.load_from_string(source)
        graph = model.graph
        kind = kinds[i % len(kinds)]
        node = graph.node[int(rng.integers(len(graph.node)))]
        if kind == "drop_node":
            graph.node.remove(node)
        elif kind == "op_type":
            node.op_type = str(rng.choice(["Gemm", "Conv", "Softmax", "Frobnicate", "Relu"]))
        elif kind == "dims":
            tensor = graph.initializer[int(rng.integers(len(graph.initializer)))]
            tensor.dims[0] = int(tensor.dims[0]) + int(rng.integers(1, 4))
        elif kind == "dangling":
            node.input[0] = "no_such_tensor"
        elif kind == "attribute":
            if node.attribute:
                attr = node.attribute[int(rng.integers(len(node.attribute)))]
                if attr.ints:
                    attr.ints[0] = int(rng.integers(-3, 9))
                else:
                    attr.i = int(rng.integers(-3, 9))
        elif kind == "opset":
            model.opset_import[0].version = int(rng.choice([1, 3, 99]))
        elif kind == "input_type":
            graph.input[0].type.tensor_type.elem_type = onnx.TensorProto.INT32
        yield i, model.SerializeToString()


@pytest.mark.parametrize("model_name", ["digits_cnn.onnx", "digits_mlp.onnx"])
def test_structurally_wrong_models_never_traceback(tmp_path, models_dir, cli, model_name):
    reference = models_dir / model_name
    outcomes = {0: 0, 1: 0, 2: 0}
    for i, content in _structural_mutants(reference.read_bytes(), seed=len(model_name)):
        mutant = tmp_path / f"s{i}.onnx"
        mutant.write_bytes(content)
        out = tmp_path / f"out{i}.onnx"
        for args in _commands(reference, mutant, out):
            result = cli(*args)
            assert result.exit_code in (0, 1, 2), (args, result.exit_code)
            outcomes[result.exit_code] += 1
            if result.exit_code == 2:
                assert result.stderr.strip().splitlines()[-1].startswith("error: "), result.stderr
                assert not out.exists(), f"{args} failed yet wrote {out}"
            if out.exists():
                out.unlink()
    assert outcomes[2] > 0
