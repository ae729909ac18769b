"""Recipes: parsed and checked before work starts; saved only when validation passes."""

from __future__ import annotations

import json

import onnx
import pytest
import yaml

from onnxcomp.errors import OnnxcompError
from onnxcomp.recipe import parse_recipe, read_recipe, run_recipe


def _write(tmp_path, recipe, name="recipe.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(recipe) if name.endswith(".yaml") else json.dumps(recipe))
    return path


def test_recipe_runs_and_saves(tmp_path, models_dir, cli):
    recipe = {
        "version": 1,
        "input": str(models_dir / "digits_cnn_opset11.onnx"),
        "output": "out/cnn.onnx",  # relative to the recipe's folder
        "steps": [{"pass": "normalize", "opset": 13}],
        "validate": {"data": str(models_dir / "digits_test.npz"), "max_drop": 0.0},
    }
    path = _write(tmp_path, recipe, "recipe.json")
    result = cli("run", path, "--json")
    assert result.exit_code == 0, result.stderr
    payload = json.loads(result.stdout)
    assert payload["saved"] and payload["validation"]["passed"]
    assert payload["steps"][0]["report"]["opset_after"] == 13
    saved = onnx.load(tmp_path / "out" / "cnn.onnx")
    assert {o.version for o in saved.opset_import if o.domain == ""} == {13}


def test_failed_validation_saves_nothing(tmp_path, models_dir):
    # int8 weights change the outputs a little: a cosine drop of 0 cannot be met, and the run
    # must not write the output. (A negative max_drop is refused as a mistake.)
    recipe = parse_recipe(
        {
            "input": str(models_dir / "digits_cnn.onnx"),
            "output": str(tmp_path / "never.onnx"),
            "steps": [{"pass": "quantize", "mode": "dynamic"}],
            "validate": {
                "data": str(models_dir / "digits_test.npz"),
                "max_drop": 0,
                "metric": "cosine",
            },
        }
    )
    result = run_recipe(recipe)
    assert not result.saved
    assert not (tmp_path / "never.onnx").exists()


@pytest.mark.parametrize(
    "recipe, message",
    [
        ({"steps": [{"pass": "nope"}]}, "unknown pass 'nope'"),
        ({"steps": [{"pass": "normalize", "opsett": 13}]}, "unknown key 'opsett'"),
        ({"steps": [{"pass": "normalize", "opset": "thirteen"}]}, "opset: expected an integer"),
        ({"steps": [{"pass": "normalize", "opset": 99}]}, "out of range"),
        ({"steps": []}, "non-empty list"),
        ({"stepz": []}, "unknown key 'stepz'"),
        ({"version": 2, "steps": [{"pass": "normalize"}]}, "version 2"),
        ({"steps": [{"pass": "normalize"}], "validate": {"max_dropp": 1}}, "validate: unknown key"),
    ],
)
def test_bad_recipes_are_named(recipe, message):
    with pytest.raises(OnnxcompError, match=message):
        parse_recipe(recipe)


def test_bad_recipe_file_cli(tmp_path, cli):
    path = tmp_path / "r.yaml"
    path.write_text("steps: [pass: normalize\n")
    result = cli("run", path)
    assert result.exit_code == 2
    assert result.stderr.startswith("error: ") and "not valid YAML" in result.stderr
    assert "Traceback" not in result.stderr
    with pytest.raises(OnnxcompError, match="no such recipe"):
        read_recipe(tmp_path / "missing.yaml")


def test_example_recipe_in_the_repository(tmp_path, cli):
    from tests.conftest import ROOT

    out = tmp_path / "digits.int8.onnx"
    result = cli("run", ROOT / "recipes" / "digits_int8.yaml", "-o", out, "--json")
    assert result.exit_code == 0, result.stderr
    payload = json.loads(result.stdout)
    assert [s["pass"] for s in payload["steps"]] == ["normalize", "optimize", "quantize"]
    assert payload["validation"]["passed"] and payload["validation"]["drop"] <= 0.005
    ops = {n.op_type for n in onnx.load(out).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
