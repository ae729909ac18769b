"""onnxcomp tune on the digits models: real builds, real onnxruntime sessions, real data."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from onnxcomp.recipe import read_recipe, run_recipe
from onnxcomp.tune import NoSolution, TuneOptions, tune

MODELS = Path(__file__).resolve().parent.parent / "models"
CNN = str(MODELS / "digits_cnn.onnx")
CALIB = str(MODELS / "digits_calib.npz")
TEST = str(MODELS / "digits_test.npz")
MLP = str(MODELS / "digits_mlp.onnx")  # fewer layers: fewer sensitivity probes
CALIB_FLAT = str(MODELS / "digits_calib_flat.npz")
TEST_FLAT = str(MODELS / "digits_test_flat.npz")


def options(**kw) -> TuneOptions:
    values = dict(eval_data=TEST, data=CALIB, limit=300, seed=0)
    values.update(kw)
    return TuneOptions(**values)


def outputs(path: str | Path) -> list[np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = np.load(TEST)[session.get_inputs()[0].name][:64]
    return session.run(None, {session.get_inputs()[0].name: x})


def test_small_budget_finds_a_passing_model_whose_recipe_rebuilds_it(tmp_path):
    out = tmp_path / "digits.tuned.onnx"
    result = tune(CNN, out, options(trials=3, levers=["quantize"]))
    assert result.passed and out.exists()
    best = result.best
    assert best["passed"] and best["drop"] <= 0.01
    assert any(t["chosen"] for t in result.trials)
    assert all("latency_ratio" in t for t in result.trials if "error" not in t)
    # The sensitivity probes ran once per quantized layer and were cached in the run folder.
    assert len(result.sensitivity) >= 2
    assert list(result.run_dir.glob("sensitivity-*.json"))
    # The saved recipe rebuilds the very same model with `onnxcomp run`.
    recipe = read_recipe(result.recipe)
    recipe.output = tmp_path / "rebuilt.onnx"
    run = run_recipe(recipe)
    assert run.saved and run.validation["passed"]
    for a, b in zip(outputs(out), outputs(tmp_path / "rebuilt.onnx")):
        np.testing.assert_array_equal(a, b)
    # --json's trials are what the report draws its Pareto plot from.
    from onnxcomp.report import render

    assert "Trials" in render(result.to_json())


def test_time_budget_stops_the_search_with_a_result(tmp_path):
    result = tune(CNN, tmp_path / "out.onnx", options(trials=20, time_budget=0.01, levers=["prune"]))
    assert result.stopped == "time budget"
    assert 1 <= len(result.trials) < 20
    assert (tmp_path / "out.onnx").exists() or (tmp_path / "out.closest.onnx").exists()


def test_no_solution_exits_1_and_saves_the_closest(tmp_path):
    out = tmp_path / "q.onnx"
    proc = subprocess.run(
        [sys.executable, "-m", "onnxcomp.cli", "tune", MLP, "--eval-data", TEST_FLAT, "--data", CALIB_FLAT,
         "--metric", "cosine", "--max-drop", "0", "--space", "quantize", "--trials", "2",
         "--limit", "200", "-o", str(out), "--json"],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 1, proc.stderr
    assert "no trial of 2 met --max-drop 0" in proc.stderr
    assert not out.exists()
    assert (tmp_path / "q.closest.onnx").exists()
    assert (tmp_path / "q.closest.recipe.yaml").exists()
    report = json.loads(proc.stdout)
    assert report["passed"] is False and report["closest"].endswith("q.closest.onnx")


def test_resume_continues_the_trial_log(tmp_path):
    out = tmp_path / "p.onnx"
    first = tune(CNN, out, options(trials=2, levers=["prune"]))
    log = first.run_dir / "trials.jsonl"
    assert len(log.read_text().splitlines()) == 2
    again = tune(CNN, out, options(trials=4, levers=["prune"], resume=str(first.run_dir)))
    assert [t["trial"] for t in again.trials] == [0, 1, 2, 3]
    assert [t["name"] for t in again.trials[:2]] == [t["name"] for t in first.trials]
    assert len(log.read_text().splitlines()) == 4


def test_sigint_keeps_the_best_so_far(tmp_path):
    out = tmp_path / "s.onnx"
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "onnxcomp.cli", "tune", CNN, "--eval-data", TEST, "--data", CALIB,
         "--space", "prune,quantize", "--trials", "400", "--limit", "200", "--run-dir", str(run_dir), "-o", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        # A shell's background job inherits SIGINT ignored, and Python then keeps it ignored:
        # give the child the default disposition, as a terminal's Ctrl-C would find it.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    log = run_dir / "trials.jsonl"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if log.exists() and log.read_text().strip():
            break
        time.sleep(0.2)
    assert proc.poll() is None, proc.stderr.read()
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 130, (stdout, stderr)
    assert "interrupted" in stdout
    assert out.exists() or (tmp_path / "s.closest.onnx").exists()


def test_ray_runs_trials_on_a_local_ray(tmp_path):
    ray = pytest.importorskip("ray", reason="Ray is an optional extra: pip install 'onnxcomp[ray]'")
    try:
        result = tune(CNN, tmp_path / "r.onnx", options(trials=2, levers=["prune"], workers=2, ray="auto"))
    finally:
        ray.shutdown()
    assert len(result.trials) == 2 and result.passed


def test_without_optuna_the_random_search_is_seeded(monkeypatch):
    from onnxcomp.tune.api import Sampler

    monkeypatch.setitem(sys.modules, "optuna", None)  # as if it were not installed
    choices = {"prune": ["none", "structured"], "ratio": [0.1, 0.2, 0.3], "keep_float": [0, 1, 2]}
    first, second = Sampler(choices, seed=3), Sampler(choices, seed=3)
    assert first.kind == "random"
    assert [first.suggest() for _ in range(5)] == [second.suggest() for _ in range(5)]
