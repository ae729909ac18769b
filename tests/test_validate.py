"""validate: both models run in onnxruntime, differences and accuracy reported, --max-drop exit codes."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx_ir as ir

from onnxcomp import model as model_io


def _perturbed_copy(src, dst, scale):
    """The digits CNN with its first conv weight scaled: a real, measurably worse candidate."""
    model = model_io.load(src)
    conv = next(n for n in model.graph if n.op_type == "Conv")
    weight = conv.inputs[1].const_value
    conv.inputs[1].const_value = ir.tensor(weight.numpy() * scale, name=weight.name)
    model_io.save(model, dst)
    return dst


def test_identical_models(cli, models_dir):
    cnn = models_dir / "digits_cnn.onnx"
    result = cli("validate", cnn, cnn, "--data", models_dir / "digits_test.npz", "--json")
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    out = payload["outputs"][0]
    assert out["max_abs_error"] == 0 and out["top1_agreement"] == 1.0
    assert payload["accuracy_reference"] == payload["accuracy_candidate"] >= 0.95
    assert payload["samples"] == len(np.load(models_dir / "digits_test.npz")["labels"])


def test_max_drop_exit_code(cli, models_dir, tmp_path):
    cnn = models_dir / "digits_cnn.onnx"
    bad = _perturbed_copy(cnn, tmp_path / "bad.onnx", scale=-1.0)
    data = models_dir / "digits_test.npz"
    result = cli("validate", cnn, bad, "--data", data, "--max-drop", "0.01")
    assert result.exit_code == 1
    assert "FAIL" in result.stdout
    loose = cli("validate", cnn, bad, "--data", data, "--max-drop", "1.0", "--json")
    assert loose.exit_code == 0
    payload = json.loads(loose.stdout)
    assert payload["accuracy_candidate"] < payload["accuracy_reference"]
    assert payload["drop"] > 0.01


def test_random_inputs_without_data(cli, models_dir):
    mlp = models_dir / "digits_mlp.onnx"
    result = cli("validate", mlp, mlp, "--samples", "4", "--json")
    assert result.exit_code == 0
    assert json.loads(result.stdout)["outputs"][0]["identical"] is True


def test_candidate_with_other_outputs(cli, models_dir, tmp_path):
    proto = onnx.load(models_dir / "digits_mlp.onnx")
    proto.graph.output[0].name = "renamed"
    proto.graph.node[-1].output[0] = "renamed"
    onnx.save(proto, tmp_path / "renamed.onnx")
    result = cli("validate", models_dir / "digits_mlp.onnx", tmp_path / "renamed.onnx")
    assert result.exit_code == 2
    assert "candidate lacks output" in result.stderr


def test_padding_tokens_are_left_out(tmp_path):
    """A [batch, seq, hidden] output fed an attention_mask: only real tokens are compared."""
    import onnx

    from onnxcomp.data import NpzData
    from onnxcomp.validate import compare

    def model(noise: float):
        # y = x + noise * (1 - mask): the candidate differs only at padding positions.
        text = f"""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N, S, 4] x, int64[N, S] attention_mask) => (float[N, S, 4] y) {{
          m = Cast <to = 1> (attention_mask)
          one = Constant <value = float {{1.0}}> ()
          pad = Sub(one, m)
          p = Unsqueeze(pad, axes)
          axes = Constant <value = int64[1] {{2}}> ()
          scale = Constant <value = float {{{noise}}}> ()
          d = Mul(p, scale)
          y = Add(x, d)
        }}
        """
        return onnx.parser.parse_model(text)

    onnx.save(model(0.0), tmp_path / "ref.onnx")
    onnx.save(model(5.0), tmp_path / "cand.onnx")
    mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 0]], np.int64)
    x = np.random.default_rng(0).standard_normal((2, 5, 4)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x, attention_mask=mask)
    result = compare(
        str(tmp_path / "ref.onnx"), str(tmp_path / "cand.onnx"), NpzData(tmp_path / "d.npz")
    )
    stats = result.outputs[0]
    assert stats.max_abs == 0 and stats.samples == int(mask.sum())
