"""search: timing until the order is settled, fallback by bisection, the margin; auto's decision
replayed from a recipe without timing; CLI defaults read from the option dataclasses."""

from __future__ import annotations

import dataclasses
import json
import pathlib

import click
import pytest
import yaml

from onnxcomp import search
from onnxcomp.evaluate import Verdict
from onnxcomp.search import Built, Fallback, Timing


def test_median_interval_widens_with_spread_and_shrinks_with_rounds():
    m, low, high = search.median_interval([1.0, 1.1, 0.9, 1.05])
    assert m == pytest.approx(1.025) and (low, high) == (0.9, 1.1)  # few rounds: full range
    values = [1.0 + 0.01 * ((i * 7) % 11 - 5) for i in range(40)]
    m, low, high = search.median_interval(values)
    assert low < m < high and low > min(values) and high < max(values)


def test_order_in_doubt_only_where_intervals_overlap():
    timings = {
        "float": Timing(1.0, 1.0, 1.0, 1.0, 4),
        "static": Timing(0.7, 0.70, 0.66, 0.74, 4),
        "dynamic": Timing(0.9, 0.90, 0.85, 0.99, 4),  # straddles the 0.97 bar
        "optimized": Timing(0.72, 0.72, 0.69, 0.76, 4),  # overlaps static
    }
    doubt = search.in_doubt(timings, threshold=0.97)
    assert ("dynamic", "threshold") in doubt and ("static", "optimized") in doubt
    assert ("static", "dynamic") not in doubt
    # over the drop budget: left out, or (when a fallback may rescue it) against the bar only
    assert search.in_doubt(timings, 0.97, ignore=["dynamic", "optimized"]) == []
    doubt = search.in_doubt(timings, 0.97, bar_only=["optimized", "dynamic"])
    assert doubt == [("dynamic", "threshold")]


def test_only_candidates_that_may_still_win_are_timed_on():
    timings = {
        "float": Timing(1.0, 1.0, 1.0, 1.0, 4),
        "static": Timing(0.6, 0.60, 0.55, 0.66, 4),
        "dynamic": Timing(0.9, 0.90, 0.85, 0.99, 4),  # straddles the bar, surely slower than static
        "optimized": Timing(0.88, 0.88, 0.84, 0.93, 4),  # overlaps dynamic: both out of the race
    }
    assert ("dynamic", "optimized") in search.in_doubt(timings, 0.97)
    assert search.deciding(timings, 0.97) == []
    # static over budget (a fallback may rescue it): timed on only while it straddles the bar it
    # must beat, the best fitting candidate's ratio (0.88) here
    # (surely under it: settled; dynamic and optimized are in the race again, being the fitting ones)
    doubt = search.deciding(timings, 0.97, bar_only=["static"])
    assert ("static", "target") not in doubt and ("dynamic", "optimized") in doubt
    timings["static"] = Timing(0.85, 0.85, 0.80, 0.95, 4)
    assert ("static", "target") in search.deciding(timings, 0.97, bar_only=["static"])


def test_auto_puts_layers_back_only_when_static_is_surely_fastest(monkeypatch):
    """The fallback costs a build and a check per bisection step, and only makes static slower:
    it runs when the all-int8 model's whole timing interval is under every fitting candidate."""
    from onnxcomp import model as model_io
    from onnxcomp.quantize.api import QuantizeOptions, quantize

    def fake_timings(interval):
        def time_candidates(baseline, models, *, timer=None, **kwargs):
            names = [n for n in timer.names if n != "float"] if timer else list(models)
            names += [n for n in models if n not in names]
            out = {"float": Timing(1.0, 1.0, 1.0, 1.0, 4)}
            for name in names:
                low, high = interval if name == "static" else (0.85, 0.95)
                out[name] = Timing(1.0, (low + high) / 2, low, high, 4)
            return out

        return time_candidates

    root = pathlib.Path(__file__).resolve().parents[1] / "models"
    options = QuantizeOptions(metric="cosine", max_drop=1e-9)  # static misses it, always
    for interval, fallback in (((0.5, 0.92), False), ((0.5, 0.6), True)):
        monkeypatch.setattr(search, "time_candidates", fake_timings(interval))
        _, report = quantize(
            model_io.load(root / "digits_cnn.onnx"),
            options,
            data=root / "digits_calib.npz",
            eval_data=root / "digits_test.npz",
        )
        row = next(r for r in report["auto"]["candidates"] if r["mode"] == "static")
        assert not row["within_budget"]
        assert ("float_layers" in row) is fallback, row
        if not fallback:
            assert "not surely under" in row["note"]


def _fake(n_layers: int, needed: int, drop: float = 0.1):
    """A candidate whose drop (``drop`` until then) meets the 0.01 budget once ``needed`` layers
    are left alone."""
    builds = []

    def build(names):
        builds.append(len(names))
        return Built(model=len(names), report={})

    def judge(model):
        return Verdict.judge("1 - cosine", 0.0 if model >= needed else drop, 0.01), None

    order = [(f"layer{i}", float(i)) for i in range(n_layers)]
    first = (Built(0, {}), judge(0)[0], None)
    return Fallback(order, build), judge, first, builds


@pytest.mark.parametrize("needed", [1, 3, 8, 37])
def test_fallback_bisects_to_the_fewest_layers(needed):
    fallback, judge, first, builds = _fake(60, needed)
    result = search.bisect_fallback(fallback, judge, first)
    assert len(result.left_alone) == needed and result.verdict.passed
    assert result.left_alone == [f"layer{i}" for i in range(needed)]
    # doubling then halving: about 2 log2(needed) builds, not one round per few layers
    assert len(builds) <= 2 * max(1, needed).bit_length() + 1


def test_fallback_never_leaves_everything_alone():
    fallback, judge, first, builds = _fake(5, needed=5)
    result = search.bisect_fallback(fallback, judge, first)
    assert not result.verdict.passed and max(builds) == 4


def test_option_defaults_come_from_the_dataclasses():
    """Every CLI option that mirrors a recipe key reads its default from the dataclass: the
    command declares none of its own, so the two cannot drift."""
    from onnxcomp.cli import FromOptions, main
    from onnxcomp.optimize import OptimizeOptions
    from onnxcomp.quantize.api import QuantizeOptions

    for command, cls in (("quantize", QuantizeOptions), ("optimize", OptimizeOptions)):
        fields = {f.name for f in dataclasses.fields(cls)}
        for param in main.commands[command].params:
            if param.name in fields and isinstance(param, click.Option):
                if isinstance(param, FromOptions):
                    assert param.field_name == param.name
                # no default of its own: the dataclass fills in what the user did not give
                declared = param.default not in (None, (), []) and "UNSET" not in repr(
                    param.default
                )
                assert not declared, f"{command} {param.opts} re-declares its default"
        help_text = main.commands[command].get_help(click.Context(main.commands[command]))
        if cls is QuantizeOptions:
            assert "[default: 32]" in help_text and "[default: mse]" in help_text


def test_dynamic_and_weight_only_are_recipe_steps(models_dir):
    import onnx_ir as ir

    from onnxcomp.passes import get_pass, run_pipeline

    assert get_pass("quantize-dynamic").options.__name__ == "DynamicQuantizeOptions"
    model = ir.load(models_dir / "digits_mlp.onnx")
    steps = [("normalize", {"opset": 21}), ("quantize-weight-only", {"bits": 8, "block_size": 32})]
    model, reports = run_pipeline(model, steps)
    assert any(n.op_type in ("MatMulNBits", "DequantizeLinear") for n in model.graph)


def test_recipe_out_replays_the_decision_without_timing(cli, models_dir, tmp_path, monkeypatch):
    out, recipe = tmp_path / "q.onnx", tmp_path / "decision.yaml"
    result = cli(
        "quantize", models_dir / "digits_cnn.onnx", "-o", out,
        "--data", models_dir / "digits_calib.npz", "--eval-data", models_dir / "digits_test.npz",
        "--recipe-out", recipe, "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    chosen = report["auto"]["chosen"]
    text = recipe.read_text()
    assert text.startswith("# Replays a decision") and f"chose {chosen}" in text
    steps = yaml.safe_load(text)["steps"]
    if chosen in ("static", "dynamic"):
        assert steps[0]["mode"] == chosen and "optimize_rules" in steps[0]

    def no_timing(*args, **kwargs):
        raise AssertionError("the replay timed something")

    monkeypatch.setattr(search, "time_candidates", no_timing)
    monkeypatch.setattr("onnxcomp.quantize.api._slowdown", no_timing)
    replay = tmp_path / "replay.onnx"
    result = cli("run", recipe, "-o", replay, "--json")
    assert result.exit_code == 0, result.stderr
    run = json.loads(result.stdout)
    assert run["validation"]["passed"]
    if chosen in ("static", "dynamic"):
        assert run["steps"][0]["report"]["mode"] == chosen
        ops = lambda p: sorted(n.op_type for n in __import__("onnx").load(p).graph.node)  # noqa: E731
        assert ops(replay) == ops(out)


@pytest.mark.parametrize("drop, probes", [(0.015, [1, 32]), (0.1, [32])])
def test_fallback_stops_when_even_the_most_allowed_misses(drop, probes):
    """The most that may be left alone is tried after 1 layer (first, when the drop is far over
    the budget): when it still misses the budget, no count in between is built (each is a build
    and a check)."""
    fallback, judge, first, builds = _fake(60, needed=100, drop=drop)
    result = search.bisect_fallback(fallback, judge, first, max_count=32)
    assert not result.verdict.passed and builds == probes


@pytest.mark.parametrize("drop", [0.015, 0.1])
def test_fallback_near_or_far_over_budget_finds_the_same_count(drop):
    fallback, judge, first, builds = _fake(60, needed=5, drop=drop)
    result = search.bisect_fallback(fallback, judge, first, max_count=32)
    assert len(result.left_alone) == 5 and builds[0] == (32 if drop > 0.02 else 1)


def test_narrow_intervals_are_settled_even_where_they_overlap():
    """Within 2 % of each other (or of the bar) after the intervals have narrowed, more rounds
    would not change the choice by more: timing stops, and the decision says it was close."""
    timings = {
        "float": Timing(1.0, 1.0, 1.0, 1.0, 8),
        "static": Timing(0.7, 0.70, 0.685, 0.715, 8),
        "dynamic": Timing(0.7, 0.71, 0.695, 0.725, 8),  # overlaps static; both narrow
        "optimized": Timing(1.0, 0.97, 0.955, 0.985, 8),  # holds the 0.97 bar; narrow
    }
    assert search.in_doubt(timings, 0.97) == []
    timings["dynamic"] = Timing(0.7, 0.71, 0.64, 0.80, 8)  # wide: still in doubt with static
    assert search.in_doubt(timings, 0.97) == [("static", "dynamic")]
    timings["dynamic"] = Timing(0.7, 0.71, 0.695, 0.725, 8)
    decision = search.remeasure_if_close(
        None, {}, dict(timings), lambda t: ["static", "dynamic", "float"], threshold=0.97,
        timer=object(),  # not timed again: nothing in doubt
    )  # fmt: skip
    assert decision.chosen == "static" and decision.within_noise and not decision.remeasured
