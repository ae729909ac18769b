"""``--mode auto``: static, dynamic and float measured in onnxruntime; never slower than fp32; the
drop budget met by putting the most sensitive layers back to float; recipes."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from onnxcomp import model as model_io
from onnxcomp import runtime, search
from onnxcomp.data import NpzData
from onnxcomp.evaluate import Verdict
from onnxcomp.passes import run_pipeline
from onnxcomp.quantize.api import QuantizeOptions, quantize
from onnxcomp.quantize.auto import FASTER, BudgetError, rank_candidates
from onnxcomp.validate import compare

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "models"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

CNN = MODELS / "digits_cnn.onnx"
MLP = MODELS / "digits_mlp.onnx"
CALIB = MODELS / "digits_calib.npz"
TEST = MODELS / "digits_test.npz"


def test_auto_measures_every_candidate_on_the_digits_cnn():
    model, report = quantize(model_io.load(CNN), QuantizeOptions(), data=CALIB, eval_data=TEST)
    auto = report["auto"]
    rows = {row["mode"]: row for row in auto["candidates"]}
    assert set(rows) == {"float", "static", "dynamic", "optimized"}
    assert rows["static"]["within_budget"] and rows["static"]["drop_metric"] == "accuracy drop"
    # the choice follows the table: the fastest candidate within budget under FASTER (or, within
    # timing noise of it, a more accurate one), else float
    eligible = [r for r in auto["candidates"][1:] if r["within_budget"]]
    eligible = [r for r in eligible if r["ratio_to_float"] <= FASTER]
    best = min(eligible, key=lambda r: r["ratio_to_float"])["mode"] if eligible else "float"
    assert auto["chosen"] == report["mode"]
    assert auto["chosen"] == best or (
        auto["decision"]["within_noise"] and auto["chosen"] in {r["mode"] for r in eligible}
    )
    low, high = rows["static"]["ratio_interval"]
    assert low <= rows["static"]["ratio_to_float"] <= high
    assert set(auto["decision"]) >= {"chosen", "runner_up", "margin", "within_noise"}
    comparison = compare(str(CNN), model, NpzData(TEST))
    assert comparison.accuracy_drop <= 0.003


@pytest.mark.timing
def test_auto_picks_static_for_the_digits_cnn():
    _, report = quantize(model_io.load(CNN), QuantizeOptions(), data=CALIB, eval_data=TEST)
    auto = report["auto"]
    assert auto["chosen"] == "static" and report["mode"] == "static"
    rows = {row["mode"]: row for row in auto["candidates"]}
    assert rows["static"]["ratio_to_float"] < 0.9
    assert rows["static"]["ratio_to_float"] <= rows["dynamic"]["ratio_to_float"]
    assert "static" in auto["why"] and "fp32 latency" in auto["why"]


def test_auto_is_never_slower_than_fp32():
    # The digits MLP is 5 microseconds of fp32 work: quantize/dequantize overhead beats any gain.
    model, report = quantize(
        model_io.load(MLP),
        QuantizeOptions(),
        data=MODELS / "digits_calib_flat.npz",
        eval_data=MODELS / "digits_test_flat.npz",
    )
    auto = report["auto"]
    chosen = next(row for row in auto["candidates"] if row["mode"] == auto["chosen"])
    assert chosen["ratio_to_float"] <= FASTER or auto["chosen"] == "float"
    if auto["chosen"] == "float":
        assert auto["why"].startswith("kept float (the input model, unchanged):")
        assert [n.op_type for n in model.graph] == [n.op_type for n in model_io.load(MLP).graph]


def test_auto_without_data_says_why_static_was_not_tried():
    _, report = quantize(model_io.load(CNN), QuantizeOptions())
    assert "no calibration data" in report["auto"]["skipped"]["static"]
    assert report["auto"]["chosen"] in ("dynamic", "float", "optimized")


def _bert(tmp_path):
    from models.build_graphs import bert, example_feed

    proto = bert(layers=2, hidden=64, heads=2, intermediate=256, seed=3)
    path = tmp_path / "bert.onnx"
    onnx.save(proto, path)
    for name, seed in (("calib", 0), ("eval", 1)):
        feeds = [example_feed(proto, batch=1, seq=12, seed=seed * 1000 + i) for i in range(24)]
        np.savez(
            tmp_path / f"{name}.npz", **{k: np.concatenate([f[k] for f in feeds]) for k in feeds[0]}
        )
    return path, tmp_path / "calib.npz", tmp_path / "eval.npz"


def test_max_drop_puts_the_most_sensitive_layers_back_to_float(tmp_path):
    path, calib, evals = _bert(tmp_path)
    _, full = quantize(
        model_io.load(path), QuantizeOptions(mode="static"), data=calib, eval_data=evals
    )
    drop = full["check"]["drop"]
    assert drop > 0
    budget = drop * 0.6
    model, report = quantize(
        model_io.load(path),
        QuantizeOptions(mode="static", max_drop=budget),
        data=calib,
        eval_data=evals,
    )
    b = report["budget"]
    assert b["drop_metric"] == "1 - cosine"  # last_hidden_state holds features, not class scores
    assert b["within_budget"] and b["drop"] <= budget
    assert b["fallback_to_float"], "at least one layer went back to float"
    floats = {d["node"] for d in report["plan"]["float_nodes"]}
    for layer in b["fallback_to_float"]:
        assert layer["node"] in floats and "most sensitive" in layer["reason"]
    # bisection over the sensitivity order: the fewest layers that meet the budget
    assert b["rounds"][0]["float_layers"] == []
    chosen = [f["node"] for f in b["fallback_to_float"]]
    assert {"float_layers": chosen, "drop": b["drop"]} in b["rounds"]
    fewer = [r for r in b["rounds"] if len(r["float_layers"]) < len(chosen)]
    assert all(r["drop"] > budget for r in fewer)


def test_max_drop_that_cannot_be_met_saves_nothing_exit_1(cli, tmp_path):
    path, calib, evals = _bert(tmp_path)
    out = tmp_path / "q.onnx"
    result = cli(
        "quantize",
        path,
        "-o",
        out,
        "--mode",
        "static",
        "--data",
        calib,
        "--eval-data",
        evals,
        "--max-drop",
        "0",
    )
    assert result.exit_code == 1
    assert "--max-drop 0.0" in result.stderr and "nothing saved" in result.stderr
    assert not out.exists()
    with pytest.raises(BudgetError):
        quantize(
            model_io.load(path),
            QuantizeOptions(mode="static", max_drop=0.0),
            data=calib,
            eval_data=evals,
        )


def test_auto_cli_table_and_json(cli, tmp_path):
    out = tmp_path / "q.onnx"
    result = cli("quantize", CNN, "-o", out, "--data", CALIB, "--eval-data", TEST)
    assert result.exit_code == 0, result.stderr
    text = result.stdout
    assert text.startswith("mode auto -> ") and "candidate" in text and "static" in text
    result = cli("quantize", CNN, "-o", out, "--mode", "static", "--data", CALIB)
    assert "SQNR dB" in result.stdout and "QLinearConv" in result.stdout
    result = cli("quantize", CNN, "-o", tmp_path / "q2.onnx", "--data", CALIB, "--json")
    report = json.loads(result.stdout)
    assert report["auto"]["chosen"] in ("static", "dynamic", "optimized", "float")
    session = runtime.create_session(str(tmp_path / "q2.onnx"))
    x = np.load(TEST)["input"][:4]
    assert runtime.run(session, {"input": x})["logits"].shape == (4, 10)


def test_quantize_as_a_recipe_step():
    model = model_io.load(CNN)
    model, reports = run_pipeline(
        model, [("quantize", {"mode": "static", "data": str(CALIB), "calibration": "mse"})]
    )
    assert reports[0].report["mode"] == "static"
    assert reports[0].report["calibration"]["method"] == "mse"
    assert any(n.op_type == "QuantizeLinear" for n in model.graph)


def test_dynamic_and_weight_only_modes_dispatch(cli, tmp_path):
    from onnxcomp import bench

    path, calib, evals = _bert(tmp_path)
    model, report = quantize(
        model_io.load(path), QuantizeOptions(mode="dynamic"), data=calib, eval_data=evals
    )
    assert report["mode"] == "dynamic"
    ops = bench.graph_report(model)["integer_kernel_ops"]
    assert sum(ops.get(k, 0) for k in ("DynamicQuantizeMatMul", "MatMulIntegerToFloat")) >= 12
    assert report["check"]["comparison"]["outputs"][0]["cosine_mean"] > 0.99

    out = tmp_path / "w4.onnx"
    result = cli(
        "quantize",
        path,
        "-o",
        out,
        "--mode",
        "weight-only",
        "--bits",
        "4",
        "--data",
        calib,
        "--json",
    )
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["mode"] == "weight-only"
    assert bench.graph_report(str(out))["integer_kernel_ops"].get("MatMulNBits", 0) >= 12
    assert out.stat().st_size < path.stat().st_size / 3

    result = cli("quantize", path, "-o", tmp_path / "x.onnx", "--bits", "4", "--data", calib)
    assert result.exit_code == 2 and "--bits 4 works only with --mode weight-only" in result.stderr


def test_op_types_adds_conv_to_dynamic_as_conv_integer(cli, tmp_path):
    out = tmp_path / "dynamic.onnx"
    result = cli(
        "quantize", CNN, "-o", out, "--mode", "dynamic", "--op-types", "Conv,MatMul,Gemm",
        "--data", CALIB, "--eval-data", TEST, "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    ops = [node.op_type for node in onnx.load(out).graph.node]
    assert ops.count("ConvInteger") >= 1 and "Conv" not in ops
    assert compare(str(CNN), model_io.load(out), NpzData(TEST)).accuracy_drop <= 0.01

    result = cli("quantize", CNN, "-o", tmp_path / "s.onnx", "--mode", "static",
                 "--op-types", "Conv", "--data", CALIB)  # fmt: skip
    assert result.exit_code == 2 and "--op-types applies to" in result.stderr


@pytest.mark.thirdparty
def test_auto_keeps_the_cleaned_graph_when_only_the_clean_up_pays(tmp_path, cli):
    """Paddle's OCR direction classifier, hard-swish decomposed: no calibration data, so no static;
    the clean-up alone (fused HardSwish, folded BatchNorm) is what makes it faster."""
    from models import thirdparty

    path = thirdparty.fetch("ocr_cls")
    out = tmp_path / "ocr_cls.onnx"
    result = cli("quantize", path, "-o", out, "--shape", "x=1x3x48x192", "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    rows = {row["mode"]: row for row in report["auto"]["candidates"]}
    assert rows["optimized"]["drop"] <= 0.01
    assert report["auto"]["chosen"] in ("optimized", "dynamic", "float")
    if report["auto"]["chosen"] == "optimized":
        assert "HardSwish" in {n.op_type for n in onnx.load(out).graph.node}


@pytest.mark.thirdparty
@pytest.mark.timing
def test_the_clean_up_alone_pays_on_the_ocr_classifier(tmp_path, cli):
    from models import thirdparty

    path = thirdparty.fetch("ocr_cls")
    out = tmp_path / "ocr_cls.onnx"
    result = cli("quantize", path, "-o", out, "--shape", "x=1x3x48x192", "--json")
    report = json.loads(result.stdout)
    rows = {row["mode"]: row for row in report["auto"]["candidates"]}
    assert report["auto"]["chosen"] in ("optimized", "dynamic")
    assert rows[report["auto"]["chosen"]]["ratio_to_float"] < 0.97
    assert "HardSwish" in {n.op_type for n in onnx.load(out).graph.node}


# ---------------------------------------------------------------------------------------------
# The tie rule, on synthetic timings: no clock involved.


def _timing(low: float, high: float) -> search.Timing:
    return search.Timing(10.0, (low + high) / 2, low, high, 4)


def _verdicts(**drops: float) -> dict[str, Verdict]:
    return {name: Verdict.judge("1 - cosine", drop, 0.005) for name, drop in drops.items()}


def test_rank_two_candidates_within_noise_the_more_accurate_wins():
    verdicts = _verdicts(static=0.0014, dynamic=0.0001, optimized=0.0, weak=0.02)
    timings = {
        "static": _timing(0.75, 0.85),  # 0.80x, the fastest, but its interval holds dynamic's
        "dynamic": _timing(0.78, 0.86),  # 0.82x, 10x more accurate
        "optimized": _timing(0.95, 1.05),  # 1.00x: not under the bar, not eligible
        "weak": _timing(0.40, 0.45),  # the fastest of all, over its drop budget
    }
    assert rank_candidates(timings, verdicts) == ["dynamic", "static", "float"]
    # apart: the faster one wins, whatever its accuracy
    timings["dynamic"] = _timing(0.87, 0.93)
    assert rank_candidates(timings, verdicts) == ["static", "dynamic", "float"]
    # within noise, and the faster one is also the more accurate: it stays first
    timings["dynamic"] = _timing(0.78, 0.86)
    verdicts = _verdicts(static=0.0001, dynamic=0.0014, optimized=0.0, weak=0.02)
    assert rank_candidates(timings, verdicts) == ["static", "dynamic", "float"]
    # nothing eligible: float
    assert rank_candidates({"weak": _timing(0.4, 0.45)}, _verdicts(weak=0.02)) == ["float"]


class _ScriptedTimer:
    """A stand-in for search.Timer whose intervals follow a script, one entry per round."""

    def __init__(self, script: list[dict]):
        self.script = script
        self.rounds_run = 0
        self.names = ["float", *script[0]]

    def run(self, rounds: int, names=None) -> None:
        self.rounds_run += rounds

    def timings(self) -> dict:
        step = self.script[min(self.rounds_run, len(self.script) - 1)]
        return {"float": _timing(1.0, 1.0), **{n: _timing(*iv) for n, iv in step.items()}}


@pytest.mark.parametrize("separate", [False, True])
def test_tie_after_retiming_goes_to_the_more_accurate(separate):
    """Within noise at first, the two best are timed again; if they stay within noise the more
    accurate one is chosen and the decision says so, if the re-timing separates them the faster
    one is."""
    verdicts = _verdicts(static=0.0014, dynamic=0.0001)
    tied = {"static": (0.75, 0.85), "dynamic": (0.78, 0.86)}
    apart = {"static": (0.70, 0.74), "dynamic": (0.80, 0.84)}
    timer = _ScriptedTimer([tied, tied, apart] if separate else [tied])
    timings = timer.timings()
    decision = search.remeasure_if_close(
        None, {}, timings, lambda t: rank_candidates(t, verdicts), threshold=FASTER, timer=timer
    )
    assert decision.remeasured
    if separate:
        assert decision.chosen == "static" and not decision.within_noise
        assert timer.rounds_run == 2  # timed only until the order settled
    else:
        assert decision.chosen == "dynamic" and decision.runner_up == "static"
        assert decision.within_noise and timer.rounds_run == search.MARGIN_ROUNDS
