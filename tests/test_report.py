"""report: optimize and quantize write an HTML report of their --json result (--report), and
`onnxcomp report` renders a saved result; the pages open in headless Chromium without console
errors, are not blank, and show the JSON's own figures (read back from their data-value)."""

from __future__ import annotations

import html
import json
import struct
import zlib
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from onnxcomp import bench
from onnxcomp.cli import main
from onnxcomp.report import render, write_report
from onnxcomp.report.chromium import find_chromium, open_page

MODELS = Path(__file__).resolve().parents[1] / "models"
CNN = MODELS / "digits_cnn.onnx"
CALIB = MODELS / "digits_calib.npz"
TEST = MODELS / "digits_test.npz"

needs_chromium = pytest.mark.skipif(
    find_chromium() is None,
    reason="headless Chromium not found on PATH (Debian: apt-get install chromium); "
    "the page checks in a real browser are skipped",
)


def run_cli(*args):
    try:
        runner = CliRunner(mix_stderr=False)
    except TypeError:  # click >= 8.2 keeps stderr apart by default
        runner = CliRunner()
    return runner.invoke(main, [str(a) for a in args], catch_exceptions=False)


class Figures(HTMLParser):
    """The page's key figures: {id: JSON value} of elements carrying data-value, and the ids of
    its sections."""

    def __init__(self, page: str):
        super().__init__()
        self.values: dict[str, object] = {}
        self.sections: list[str] = []
        self.scripts = 0
        self.external: list[str] = []
        self.feed(page)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if "data-value" in attrs and "id" in attrs:
            self.values[attrs["id"]] = json.loads(attrs["data-value"])
        if tag == "section":
            self.sections.append(attrs.get("id"))
        if tag == "script":
            self.scripts += 1
        for key in ("src", "href"):
            if attrs.get(key):
                self.external.append(attrs[key])


@pytest.fixture(scope="module")
def optimized(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("optimize")
    result = run_cli(
        "optimize",
        CNN,
        "-o",
        tmp / "clean.onnx",
        "--data",
        TEST,
        "--runs",
        20,
        "--report",
        tmp / "report.html",
        "--json",
    )
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout), tmp / "report.html"


def quantize_with_report(tmp, *mode):
    result = run_cli(
        "quantize",
        CNN,
        "-o",
        tmp / "int8.onnx",
        *mode,
        "--data",
        CALIB,
        "--eval-data",
        TEST,
        "--report",
        tmp / "report.html",
        "--json",
    )
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout), tmp / "report.html"


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    """Static int8: integer kernels whatever the machine's timing (auto may keep float on a
    loaded machine where int8 is not measured faster, as it did on a 2-core CI runner)."""
    return quantize_with_report(tmp_path_factory.mktemp("quantize"), "--mode", "static")


@pytest.fixture(scope="module")
def auto_quantized(tmp_path_factory):
    return quantize_with_report(tmp_path_factory.mktemp("auto"))


def float_nodes_in(result: dict) -> set[str]:
    """What the JSON says stayed float: the plan's float nodes and the budget's fallbacks (static),
    the skipped layers and float-status layers (dynamic: auto picks by measured latency, so either)."""
    names = {d["node"] for d in result.get("plan", {}).get("float_nodes", [])}
    names |= {d["node"] for d in result.get("budget", {}).get("fallback_to_float", [])}
    names |= {d.get("node") or d.get("name") for d in result.get("skipped", [])}
    names |= {d.get("node") or d.get("name") for d in result.get("layers", []) if "float" in str(d.get("status", ""))}
    return names


def test_optimize_report_shows_the_json_figures(optimized):
    result, page = optimized
    figures = Figures(page.read_text())
    assert figures.values["ratio"] == result["latency_ms"]["ratio"]
    assert figures.values["latency-after"] == result["latency_ms"]["optimized_p50"]
    assert figures.values["max-rel-error"] == result["check"]["max_rel_error"]
    assert figures.values["nodes-after"] == result["nodes"]["after"] == 12
    assert figures.values["size-after"] == result["size_bytes"]["after"]
    assert {"summary", "rewrites", "time"} <= set(figures.sections)
    assert "fold-batchnorm" in page.read_text()
    # self-contained: no script, nothing loaded from elsewhere
    assert figures.scripts == 0 and figures.external == []


def test_quantize_report_shows_the_json_figures(quantized):
    result, page = quantized
    figures = Figures(page.read_text())
    assert figures.values["drop"] == result["check"]["drop"]
    assert figures.values["float-layers"] == len(float_nodes_in(result))
    assert figures.values["integer-kernels"] == result["check"]["graph"]["integer_kernels"] > 0
    assert figures.values["cpu"] == result["cpu"]["isa_measured"] == result["profile"]["cpu"]
    assert {"summary", "layers", "float", "time", "prepare"} <= set(figures.sections)
    assert figures.scripts == 0 and figures.external == []


def test_auto_report_shows_its_candidates(auto_quantized):
    """Auto's page shows the chosen candidate's latency ratio and the candidates table; whether
    int8 or float was chosen depends on the machine's timing, and the page shows either."""
    result, page = auto_quantized
    text = page.read_text()
    figures = Figures(text)
    auto = result["auto"]
    chosen = next(c for c in auto["candidates"] if c["mode"] == auto["chosen"])
    assert figures.values["ratio"] == chosen["ratio_to_float"]
    assert {"summary", "candidates", "float", "time", "prepare"} <= set(figures.sections)
    assert {c["mode"] for c in auto["candidates"]} >= {"float", "static"}
    if auto["chosen"] == "float":
        assert "kept float" in html.unescape(text)
    else:
        assert figures.values["drop"] == result["check"]["drop"]


def test_profile_is_in_the_json_and_adds_up(quantized):
    result, _ = quantized
    profile = result["profile"]
    assert [m["name"] for m in profile["models"]] == ["input", "quantized"]
    for model in profile["models"]:
        assert model["op_types"] and model["slowest_nodes"]
        assert sum(e["ms"] for e in model["op_types"]) == pytest.approx(model["nodes_ms"])
        assert sum(e["count"] for e in model["op_types"]) == model["nodes"]
        times = [n["ms"] for n in model["slowest_nodes"]]
        assert times == sorted(times, reverse=True)
    ops = {e["op"] for e in profile["models"][1]["op_types"]}
    # onnxruntime ran static's integer kernels
    assert ops & {"QLinearConv", "QLinearMatMul", "MatMulInteger", "DynamicQuantizeMatMul", "ConvInteger"}


def test_float_nodes_and_reasons_are_listed(tmp_path):
    result = run_cli(
        "quantize",
        CNN,
        "-o",
        tmp_path / "int8.onnx",
        "--mode",
        "static",
        "--exclude-ops",
        "Gemm",
        "--data",
        CALIB,
        "--eval-data",
        TEST,
        "--json",
    )
    assert result.exit_code == 0, result.stderr
    saved = tmp_path / "result.json"
    saved.write_text(result.stdout)
    report = run_cli("report", saved, "-o", tmp_path / "r.html")
    assert report.exit_code == 0, report.stderr
    page = (tmp_path / "r.html").read_text()
    floats = float_nodes_in(json.loads(result.stdout))
    assert len(floats) == 3
    assert Figures(page).values["float-layers"] == 3
    assert "/head/head.1/Gemm" in page and "excluded by --exclude-ops" in page


def test_recipe_run_report_shows_its_steps(tmp_path):
    recipe = MODELS.parent / "recipes" / "digits_int8.yaml"
    result = run_cli("run", recipe, "-o", tmp_path / "int8.onnx", "--json")
    assert result.exit_code == 0, result.stderr
    run = json.loads(result.stdout)
    page = tmp_path / "run.html"
    (tmp_path / "run.json").write_text(result.stdout)
    assert run_cli("report", tmp_path / "run.json", "-o", page).exit_code == 0
    figures = Figures(page.read_text())
    quantize = run["steps"][-1]["report"]
    assert figures.values["drop"] == run["validation"]["drop"]
    assert figures.values["size-after"] == run["size_bytes_after"]
    assert figures.values["float-layers"] == len(float_nodes_in(quantize))
    assert figures.values["cpu"] == quantize["cpu"]["isa_measured"]
    assert "steps" in figures.sections


@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("prune")
    result = run_cli(
        "prune", CNN, "-o", tmp / "pruned.onnx", "--data", CALIB, "--eval-data", TEST,
        "--report", tmp / "report.html", "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout), tmp / "report.html"


def test_prune_report_shows_the_json_figures(pruned):
    result, page = pruned
    figures = Figures(page.read_text())
    assert figures.values["drop"] == result["check"]["drop"]
    assert figures.values["sparsity"] == result["after"]["sparsity"] > 0.4
    assert figures.values["size-after"] == result["size_bytes"]["output"]
    assert {"summary", "prune", "before-after", "time"} <= set(figures.sections)
    skipped = [t for t in result["tensors"] if t.get("skipped")]
    assert skipped and all(html.escape(t["skipped"]) in page.read_text() for t in skipped)


def test_transfer_fit_report_shows_cuts_and_training(tmp_path, monkeypatch):
    monkeypatch.setenv("ONNXCOMP_FEATURE_CACHE", str(tmp_path / "features"))
    result = run_cli(
        "transfer", "fit", MODELS / "digits_cnn_04.onnx", "--data", CALIB, "--val", TEST,
        "--tries", 2, "--epochs", 20, "-o", tmp_path / "fit.onnx", "--report", tmp_path / "fit.html", "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    fit = json.loads(result.stdout)
    page = (tmp_path / "fit.html").read_text()
    figures = Figures(page)
    assert figures.values["val-metric"] == fit["val_metric"]
    assert {"cuts", "history", "time"} <= set(figures.sections)
    assert page.count("<polyline") >= 2  # loss and metric curves
    assert fit["cut"]["tensor"] in page


def test_distill_report_shows_agreement_and_training(tmp_path, monkeypatch):
    monkeypatch.setenv("ONNXCOMP_FEATURE_CACHE", str(tmp_path / "features"))
    result = run_cli(
        "distill", CNN, "--student", MODELS / "digits_cnn_04_half.onnx", "--data", CALIB, "--val", TEST,
        "--at", "/features/features.8/Relu_output_0", "--epochs", 10, "-o", tmp_path / "student.onnx",
        "--report", tmp_path / "distill.html", "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    distilled = json.loads(result.stdout)
    figures = Figures((tmp_path / "distill.html").read_text())
    assert figures.values["val-agreement"] == distilled["val_agreement"]
    assert figures.values["val-metric"] == distilled["val_metric"]
    assert {"history", "time"} <= set(figures.sections)


@needs_chromium
@pytest.mark.parametrize("which", ["optimized", "quantized", "pruned"])
def test_report_opens_in_chromium(which, request, tmp_path):
    result, page = request.getfixturevalue(which)
    shot = tmp_path / "page.png"
    opened = open_page(page, screenshot=shot)
    assert opened.console == []
    pixels = png_pixels(shot.read_bytes())
    assert pixels.shape[:2] == (2000, 1200)
    inked = (pixels[..., :3].min(axis=2) < 200).mean()
    assert inked > 0.01, f"the screenshot is almost blank ({inked:.2%} dark pixels)"


@needs_chromium
def test_the_browser_shows_the_same_figures(quantized):
    """The DOM Chromium built holds the figures written in the file (no markup lost)."""
    _, page = quantized
    opened = open_page(page)
    assert opened.console == []
    assert Figures(opened.dom).values == Figures(page.read_text()).values


def test_other_commands_results_render():
    """Prune, transfer, distill and tune results (their report shapes) get their sections."""
    # the shapes `onnxcomp prune --json` prints (unstructured and --structured)
    unstructured = {
        "kind": "unstructured",
        "method": "sparsegpt",
        "requested_sparsity": 0.5,
        "tensors": [
            {
                "node": "conv2",
                "op": "Conv",
                "shape": [64, 32, 3, 3],
                "sparsity": 0.5,
                "relative_error": 0.003,
            },
            {"node": "conv1", "op": "Conv", "skipped": "tiny tensor (288 < 512 weights)"},
        ],
        "before": {"parameters": 81386, "sparsity": 0.0, "macs": 1813440},
        "after": {"parameters": 81386, "sparsity": 0.4966, "macs": 1813440},
        "check": {
            "drop": 0.0,
            "drop_metric": "accuracy drop",
            "accuracy_reference": 0.99,
            "accuracy_candidate": 0.99,
        },
    }
    structured = {
        "kind": "structured",
        "requested_ratio": 0.3,
        "groups": [
            {
                "group": "conv1",
                "kind": "chain",
                "channels": 32,
                "consumers": ["conv2"],
                "removed": 8,
            },
            {
                "group": "fc",
                "kind": "chain",
                "channels": 10,
                "consumers": [],
                "removed": 0,
                "skipped": "its channels reach the graph output 'logits'",
            },
        ],
        "before": {"macs": 1813440},
        "after": {"macs": 1022080},
    }
    page = render(unstructured)
    figures = Figures(page)
    assert {"prune", "before-after"} <= set(figures.sections)
    assert figures.values["sparsity"] == 0.4966 and figures.values["drop"] == 0.0
    assert "tiny tensor" in page
    page = render(structured)
    assert Figures(page).values["macs-after"] == 1022080
    assert "reach the graph output" in page
    # the per-layer shape other commands may print
    prune = {
        "command": "prune",
        "layers": [
            {"name": "conv1", "op": "Conv", "sparsity": 0.5, "channels_removed": 8, "reason": None},
            {
                "name": "fc",
                "op": "Gemm",
                "sparsity": 0.0,
                "channels_removed": 0,
                "reason": "output layer",
            },
        ],
        "size_bytes": {"before": 1000, "after": 600},
    }
    transfer = {
        "command": "transfer",
        "cuts": [
            {"name": "block3", "probe_accuracy": 0.91, "chosen": True},
            {"name": "block4", "probe_accuracy": 0.88},
        ],
        "history": [
            {"epoch": e, "train_loss": 1 / (e + 1), "val_metric": 0.8 + e / 100} for e in range(5)
        ],
        "best_epoch": 3,
        "metrics": {"val_accuracy": 0.84, "test_accuracy": 0.83},
    }
    tune = {
        "command": "tune",
        "trials": [
            {"latency_ms": 1.0, "metric": 0.99, "chosen": False},
            {"latency_ms": 0.6, "metric": 0.98, "chosen": True},
            {"latency_ms": 0.8, "metric": 0.97},
            {"latency_ms": 0.4, "metric": 0.90},
        ],
    }
    assert {"prune"} <= set(Figures(render(prune)).sections)
    page = render(transfer)
    assert {"cuts", "history", "validation"} <= set(Figures(page).sections)
    assert page.count("<polyline") == 2  # loss and metric curves
    figures = Figures(render(tune))
    assert "trials" in figures.sections
    assert figures.values["chosen-x"] == 0.6 and figures.values["chosen-y"] == 0.98


def test_unknown_or_odd_keys_do_not_break_the_page():
    odd = {
        "size_bytes": "n/a",
        "latency_ms": {"ratio": None},
        "layers": "none",
        "trials": [1, 2],
        "plan": {"float_nodes": [{"node": "<script>x</script>", "reason": "a < b"}]},
        "requested_mode": "static",
        "mode": "static",
        "weird": {"deep": [1, {"x": float("nan")}]},
    }
    page = render(odd)
    assert "<script>x" not in page and "&lt;script&gt;" in page
    assert Figures(page).values["float-layers"] == 1
    assert "<section" in render({})


def test_report_command_errors_are_one_line(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    result = run_cli("report", bad, "-o", tmp_path / "r.html")
    assert result.exit_code == 2
    assert (
        result.stderr.strip().startswith("error: ") and len(result.stderr.strip().splitlines()) == 1
    )
    result = run_cli("report", bad, "-o", tmp_path / "missing" / "r.html")
    assert result.exit_code == 2 and "does not exist" in result.stderr
    assert not (tmp_path / "r.html").exists()


def test_report_reads_standard_input(quantized, tmp_path):
    result, _ = quantized
    try:
        runner = CliRunner(mix_stderr=False)
    except TypeError:
        runner = CliRunner()
    done = runner.invoke(
        main, ["report", "-", "-o", str(tmp_path / "r.html")], input=json.dumps(result)
    )
    assert done.exit_code == 0, done.stderr
    assert Figures((tmp_path / "r.html").read_text()).values["drop"] == result["check"]["drop"]


def test_write_report_is_atomic_and_readable(tmp_path):
    target = tmp_path / "r.html"
    target.write_text("old")
    write_report({"notes": ["hello"]}, target)
    assert "hello" in target.read_text()
    assert [p.name for p in tmp_path.iterdir()] == ["r.html"]  # no temporary file left
    assert target.stat().st_mode & 0o044  # readable by others, like any file the user writes


def test_profile_caps_the_slowest_nodes():
    profile = bench.profile([CNN], names=["cnn"], data=TEST, runs=3, warmup=1, top=4)
    model = profile["models"][0]
    assert len(model["slowest_nodes"]) == 4 < model["nodes"]
    assert profile["inputs"].startswith("first 1 sample")


def png_pixels(data: bytes) -> np.ndarray:
    """Decode an 8-bit, non-interlaced PNG (as Chromium writes) to (height, width, channels)."""
    try:
        import io

        from PIL import Image

        return np.asarray(Image.open(io.BytesIO(data)))
    except ImportError:
        pass
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat = 8, []
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        chunk = data[pos + 8 : pos + 8 + length]
        pos += 12 + length
        if kind == b"IHDR":
            width, height, depth, color, _, _, interlace = struct.unpack(">IIBBBBB", chunk)
        elif kind == b"IDAT":
            idat.append(chunk)
    assert depth == 8 and interlace == 0
    bpp = {0: 1, 2: 3, 4: 2, 6: 4}[color]
    raw = np.frombuffer(zlib.decompress(b"".join(idat)), np.uint8).reshape(height, 1 + width * bpp)
    out = np.zeros((height, width * bpp), np.int32)
    prev = np.zeros(width * bpp, np.int32)
    for y in range(height):
        kind, line = raw[y, 0], raw[y, 1:].astype(np.int32)
        if kind == 0:
            cur = line
        elif kind == 1:
            cur = line.reshape(width, bpp).cumsum(axis=0).reshape(-1) & 255
        elif kind == 2:
            cur = (line + prev) & 255
        else:  # average and Paeth depend on the pixel just decoded: one at a time
            cur = line.copy()
            for x in range(width * bpp):
                a = cur[x - bpp] if x >= bpp else 0
                b, c = prev[x], prev[x - bpp] if x >= bpp else 0
                if kind == 3:
                    cur[x] = (cur[x] + (a + b) // 2) & 255
                else:
                    p = a + b - c
                    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                    cur[x] = (cur[x] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        out[y] = cur
        prev = cur
    return out.reshape(height, width, bpp)
