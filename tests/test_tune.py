"""onnxcomp tune on the digits models: real builds, real onnxruntime sessions, real data."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from onnxcomp.recipe import parse_recipe, read_recipe, run_recipe
from onnxcomp.tune import TuneOptions, tune

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
    # Every passing trial was timed, or left untimed because a timed one with the same kernels
    # has no more MACs and no larger file; failing trials are never timed.
    for t in result.trials:
        assert ("latency_ratio" in t) == (t["passed"] and "dominated_by" not in t), t
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
    first = tune(CNN, out, options(trials=3, levers=["prune"]))
    log = first.run_dir / "trials.jsonl"
    assert len(log.read_text().splitlines()) == 3
    # The first batch (each lever alone) gave the prune groups; each was probed alone.
    assert len(first.group_sensitivity) >= 2
    assert {"group", "drop_alone"} <= set(first.group_sensitivity[0])
    again = tune(CNN, out, options(trials=5, levers=["prune"], resume=str(first.run_dir)))
    assert [t["trial"] for t in again.trials] == [0, 1, 2, 3, 4]
    assert [t["name"] for t in again.trials[:3]] == [t["name"] for t in first.trials]
    assert len(log.read_text().splitlines()) == 5
    assert again.group_sensitivity == first.group_sensitivity  # from the cache, not probed again


def test_sigint_keeps_the_best_so_far(tmp_path):
    # Once this exited 0 with no output: the child had inherited SIGINT *ignored* (a CI shell's
    # background job; Python then installs no KeyboardInterrupt handler), so the signal was lost
    # and the search ran out its small space (8 prune configurations) and exited normally. The
    # child now gets the default disposition, as a terminal's Ctrl-C finds it, and a search that
    # cannot end before the signal (a large space, 400 trials); the test checks both.
    out = tmp_path / "s.onnx"
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "onnxcomp.cli", "tune", CNN, "--eval-data", TEST, "--data", CALIB,
         "--space", "prune,quantize", "--trials", "400", "--limit", "200", "--run-dir", str(run_dir), "-o", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    log = run_dir / "trials.jsonl"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if log.exists() and log.read_text().strip():
            break
        time.sleep(0.2)
    assert proc.poll() is None, ("the search ended before the signal", proc.communicate())
    logged = len(log.read_text().splitlines())
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 130, (proc.returncode, stdout, stderr)
    assert "stopped: interrupted" in stdout
    assert 1 <= logged <= len(log.read_text().splitlines()) < 400
    assert out.exists() or (tmp_path / "s.closest.onnx").exists()


def same_result(first, second) -> None:
    """The same trials in the same order, the same choice, the same recipe steps and the very
    same output model (bytes)."""
    one, two = ([(t["trial"], t["name"], t["passed"], t.get("size_bytes"), t.get("macs")) for t in r.trials]
                for r in (first, second))
    assert one == two
    assert first.best["trial"] == second.best["trial"]
    assert read_recipe(first.recipe).steps == read_recipe(second.recipe).steps
    assert Path(first.output).read_bytes() == Path(second.output).read_bytes()


def test_same_seed_same_result_with_1_and_2_workers_under_the_latency_objective(tmp_path):
    # Trials are proposed in batches of a fixed size, ahead of time by a fixed number of
    # batches, and told in trial order; the optimiser is told MAC (or size) ratios, never a
    # timing; the final choice is among each kernel class's best by MACs. So timing noise --
    # and this machine is loaded -- cannot make the two runs part.
    runs = [
        tune(CNN, tmp_path / f"w{n}" / "out.onnx", options(trials=8, levers=["prune"], workers=n))
        for n in (1, 2)
    ]
    same_result(*runs)
    assert len(runs[0].trials) == 8
    # The passing trials were timed (on their worker) unless one known before dominated them.
    assert any("latency_ratio" in t for t in runs[1].trials)
    # The per-group sensitivity reached the space: a trial gave a group its own ratio.
    assert any("[g" in t["name"] for t in runs[0].trials)


def test_same_seed_same_trials_with_the_size_objective(tmp_path):
    runs = [
        tune(CNN, tmp_path / f"w{n}" / "out.onnx", options(trials=5, levers=["prune"], objective="size", workers=n))
        for n in (1, 2)
    ]
    same_result(*runs)
    assert all("latency_ratio" not in t for t in runs[0].trials)  # nothing timed


def test_timing_noise_does_not_pick_among_equals():
    # The final choice: within 5 % of the fastest, or overlapping intervals, is a tie, broken by
    # fewer MACs, then the smaller file, then the lower trial number -- whichever measured faster.
    from onnxcomp.search import Timing
    from onnxcomp.tune.api import noise_aware_choice

    keys = {"a": (900, 10, 1), "b": (1000, 9, 2), "c": (800, 8, 3)}
    for wobble in (-0.03, 0.0, 0.03):
        timings = {"a": Timing(1.0, 0.50, 0.48, 0.52, 6), "b": Timing(1.0, 0.50 + wobble, 0.49 + wobble, 0.51 + wobble, 6),
                   "c": Timing(1.0, 0.70, 0.68, 0.72, 6)}
        assert noise_aware_choice(timings, keys, 0.05) == ("a", ["a", "b"])
    # clearly faster wins even with more MACs
    timings = {"a": Timing(1.0, 0.60, 0.58, 0.62, 6), "b": Timing(1.0, 0.40, 0.39, 0.41, 6)}
    assert noise_aware_choice(timings, keys, 0.05) == ("b", ["b"])


def test_a_group_ratio_spares_the_most_sensitive_group(tmp_path):
    from onnxcomp import model as model_io
    from onnxcomp.tune import space

    groups = ["/features/features.3/Conv", "/features/features.0/Conv", "/features/features.7/Conv"]
    s = space.Space(groups=groups)
    config = s.canonical({"prune": "structured", "ratio": 0.5, "quantize": "none", "group0": 0.0, "group1": 0.5})
    steps = space.steps(config, s)
    assert steps[1]["group_ratios"] == {groups[0]: 0.0, groups[1]: 0.25}
    recipe = parse_recipe({"version": 1, "input": CNN, "output": str(tmp_path / "g.onnx"), "data": CALIB, "steps": steps})
    run_recipe(recipe)
    weights = {n.name: n.inputs[1].shape[0] for n in model_io.load(tmp_path / "g.onnx").graph if n.op_type == "Conv"}
    assert weights == {groups[1]: 24, groups[0]: 64, groups[2]: 32}  # 32 -> 24 (x0.75 kept), 64 kept, 64 -> 32


def test_transfer_fit_chooses_the_cut_and_head(tmp_path):
    # A backbone trained on digits 0-4 and a new task (digits 5-9): every trial fits a head
    # first; the cut and the head are choices of the search, the default fit is the reference.
    from models.build_digits import load_split

    split = load_split()
    rng = np.random.default_rng(0)
    rows = np.concatenate([rng.choice(np.flatnonzero(split.y_train == c), 20, replace=False) for c in range(5, 10)])
    np.savez(tmp_path / "train.npz", input=split.x_train[rows], labels=split.y_train[rows] - 5)
    test = split.y_test >= 5
    np.savez(tmp_path / "test.npz", input=split.x_test[test], labels=split.y_test[test] - 5)
    out = tmp_path / "t.onnx"
    result = tune(str(MODELS / "digits_cnn_04.onnx"), out, options(
        eval_data=str(tmp_path / "test.npz"), data=str(tmp_path / "train.npz"), transfer_fit=True,
        levers=["quantize"], trials=4, max_drop=0.05))
    configs = [t["config"] for t in result.trials]
    assert len({c["cut"] for c in configs}) >= 2  # the first batch tries the candidate cuts
    assert "cut" in result.to_json()["trials"][0]["config"] and "head" in configs[0]
    assert all(c["head"] in ("linear", "mlp") for c in configs)
    assert result.passed
    recipe = read_recipe(result.recipe)
    assert recipe.steps[0]["pass"] == "transfer_fit"
    recipe.output = tmp_path / "rebuilt.onnx"
    run = run_recipe(recipe)
    assert run.saved and run.validation["passed"]
    x = np.load(tmp_path / "test.npz")["input"][:64]
    a, b = (ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, {"input": x}) for p in (out, recipe.output))
    for u, v in zip(a, b):
        np.testing.assert_array_equal(u, v)


def test_ray_runs_trials_on_a_local_ray_with_the_same_result_as_one_worker(tmp_path):
    ray = pytest.importorskip("ray", reason="Ray is an optional extra: pip install 'onnxcomp[ray]'")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        result = tune(CNN, tmp_path / "r" / "out.onnx", options(trials=6, levers=["prune"], workers=2, ray="auto"))
    finally:
        ray.shutdown()
    assert len(result.trials) == 6 and result.passed
    # The same seed without Ray, one worker: the same trials, choice, recipe and model.
    inline = tune(CNN, tmp_path / "i" / "out.onnx", options(trials=6, levers=["prune"]))
    same_result(result, inline)


@pytest.mark.parametrize("ray_address", [None, "auto"], ids=["pool", "ray"])
def test_two_workers_share_the_jobs_once_set_up(tmp_path, ray_address):
    # This process is worker 0 and builds while the other starts (a search never waits for it,
    # so on a loaded machine a short search may end before the other is up); once it is set up,
    # queued jobs go to both, each pinned to a core of its own when there are two.
    from onnxcomp.tune.api import Runner, Tuner

    if ray_address:
        ray = pytest.importorskip("ray", reason="Ray is an optional extra: pip install 'onnxcomp[ray]'")
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    tuner = Tuner(CNN, tmp_path / "x.onnx", options(levers=["prune"]))
    runner = Runner(2, ray_address, tuner.setup())
    try:
        assert runner.wait_ready()
        tuner.runner = runner
        configs = [{**tuner.space.base(), "prune": "structured", "ratio": r} for r in (0.1, 0.2, 0.3, 0.5)]
        records = tuner.run_batch(configs)
    finally:
        runner.close()
        if ray_address:
            ray.shutdown()
    assert [r["trial"] for r in records] == [0, 1, 2, 3]  # in the order submitted
    assert len({r["worker"] for r in records}) == 2
    cores = {w.get("core") for w in runner.info}
    assert len(runner.info) == 2 and (cores == {None} or len(cores) == 2)


def test_without_optuna_the_random_search_is_seeded(monkeypatch):
    from onnxcomp.tune.api import Sampler

    monkeypatch.setitem(sys.modules, "optuna", None)  # as if it were not installed
    choices = {"prune": ["none", "structured"], "ratio": [0.1, 0.2, 0.3], "keep_float": [0, 1, 2]}
    first, second = Sampler(choices, seed=3), Sampler(choices, seed=3)
    assert first.kind == "random"
    assert [first.ask()[0] for _ in range(5)] == [second.ask()[0] for _ in range(5)]


def test_transfer_configurations_become_transfer_fit_steps():
    from onnxcomp.tune import space

    s = space.Space(cuts=["auto", "/features/features.8/Relu_output_0"], quantize=("static",), prune=("none",))
    assert s.choices()["head"] == ["linear", "mlp"] and s.choices()["cut"] == s.cuts
    mlp = s.canonical({**s.base(), "cut": s.cuts[1], "head": "mlp", "hidden": 64, "quantize": "static", "calibration": "entropy"})
    assert space.steps(mlp, s, seed=3)[0] == {"pass": "transfer_fit", "head": "mlp", "seed": 3, "at": s.cuts[1], "hidden": 64}
    linear = s.canonical({**mlp, "head": "linear"})
    assert linear["hidden"] is None and "at" not in space.steps({**linear, "cut": "auto"}, s)[0]
