"""Size of the HTML report of a 1,000-node model, and how long headless Chromium takes to open it.

    python benchmarks/bench_report.py [--blocks 200] [--workdir /tmp/onnxcomp-bench-report]

Builds a residual CNN of ``blocks`` blocks (Conv, Relu, Conv, Add, Relu: 5 nodes each, 1,000
nodes for 200 blocks), quantizes it with ``onnxcomp quantize --mode static --report`` on random
calibration and evaluation samples, then measures the page: its size, the time to render it
from the JSON result, the wall time of headless Chromium loading it (a
screenshot) and the time from navigation to the load event and to the first frame painted after
it (a copy of the page with a two-line timing script; the report itself has none), next to a
small page of text and SVG (the browser's own start-up, fonts included).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def build(path: Path, blocks: int, channels: int = 16, size: int = 8) -> int:
    """A chain of residual blocks; returns its number of nodes."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    nodes, inits = [], []
    x = "input"
    for b in range(blocks):
        names = [f"b{b}_{k}" for k in ("c1", "r1", "c2", "add", "out")]
        for conv in ("w1", "w2"):
            w = rng.standard_normal((channels, channels, 3, 3)).astype(np.float32)
            w *= 0.5 * np.sqrt(2 / (channels * 9))
            inits.append(numpy_helper.from_array(w, f"b{b}_{conv}"))
            inits.append(
                numpy_helper.from_array(np.zeros(channels, np.float32), f"b{b}_{conv}_bias")
            )
        nodes += [
            helper.make_node(
                "Conv",
                [x, f"b{b}_w1", f"b{b}_w1_bias"],
                [names[0]],
                name=f"block{b}/conv1",
                pads=[1, 1, 1, 1],
            ),
            helper.make_node("Relu", [names[0]], [names[1]], name=f"block{b}/relu1"),
            helper.make_node(
                "Conv",
                [names[1], f"b{b}_w2", f"b{b}_w2_bias"],
                [names[2]],
                name=f"block{b}/conv2",
                pads=[1, 1, 1, 1],
            ),
            helper.make_node("Add", [names[2], x], [names[3]], name=f"block{b}/add"),
            helper.make_node("Relu", [names[3]], [names[4]], name=f"block{b}/relu2"),
        ]
        x = names[4]
    nodes[-1].output[0] = "output"
    graph = helper.make_graph(
        nodes,
        "residual",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", channels, size, size])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", channels, size, size])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return len(nodes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=5, help="Browser loads of each page.")
    parser.add_argument(
        "--reuse", action="store_true", help="Time the pages of a previous run in --workdir again."
    )
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/onnxcomp-bench-report"))
    args = parser.parse_args()

    from onnxcomp.report import read_result, render

    work = args.workdir
    if args.reuse and (work / "result.json").exists():
        return time_pages(work, work / "report.html", args.repeat)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    model = work / "residual.onnx"
    nodes = build(model, args.blocks)
    rng = np.random.default_rng(1)
    for name, count in (("calib", 64), ("eval", 64)):
        np.savez(work / f"{name}.npz", input=rng.random((count, 16, 8, 8), dtype=np.float32))

    started = time.perf_counter()
    done = subprocess.run(
        [
            str(Path(sys.executable).with_name("onnxcomp")),
            "quantize",
            str(model),
            "-o",
            str(work / "int8.onnx"),
            "--mode",
            "static",
            "--data",
            str(work / "calib.npz"),
            "--eval-data",
            str(work / "eval.npz"),
            "--max-drop",
            "1",
            "--report",
            str(work / "report.html"),
            "--json",
        ],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        sys.exit(f"quantize failed: {done.stderr.strip()}")
    quantize_seconds = time.perf_counter() - started
    (work / "result.json").write_text(done.stdout)
    result = read_result(work / "result.json")
    started = time.perf_counter()
    render(result)
    render_seconds = time.perf_counter() - started

    page = work / "report.html"
    print(
        f"model: {nodes} nodes ({model.stat().st_size / 1e6:.1f} MB); quantize --report took {quantize_seconds:.1f} s"
    )
    print(
        f"JSON result: {len(done.stdout) / 1e3:.0f} KB; tensors listed: {len(result.get('tensors', []))}"
    )
    print(
        f"HTML report: {page.stat().st_size / 1e3:.0f} KB; rendered from the JSON in {render_seconds * 1000:.0f} ms"
    )
    time_pages(work, page, args.repeat)


def time_pages(work: Path, page: Path, repeat: int) -> None:
    """Load the report, and a small page of text and SVG as the baseline, in headless Chromium."""
    from onnxcomp.report.chromium import find_chromium, open_page

    if find_chromium() is None:
        print("chromium not found: browser timings skipped")
        return
    console = open_page(page).console
    print(f"console messages of the report in Chromium: {len(console)}")
    # Timed copies: the report itself has no script; these log, from the start of the
    # navigation, when the load event fired and when the first frame after it was painted.
    timed = work / "timed.html"
    timed.write_text(page.read_text().replace("</body>", PROBE + "</body>"))
    small = work / "small.html"
    small.write_text(
        '<!DOCTYPE html><html><body><p style="font-family:sans-serif">a line of <b>text</b></p>'
        '<svg width="200" height="40"><text x="4" y="20">and of SVG</text></svg>'
        + PROBE
        + "</body></html>"
    )
    rows = []
    for label, target in (("small page", small), ("report", timed)):
        runs = [open_page(target, screenshot=work / "shot.png") for _ in range(repeat)]
        probe = [p for p in (_probe(r.console) for r in runs) if p]
        loaded = statistics.median(p[0] for p in probe) if probe else float("nan")
        painted = statistics.median(p[1] for p in probe) if probe else float("nan")
        worst = max((p[1] for p in probe), default=float("nan"))
        rows.append((label, statistics.median(r.seconds for r in runs), loaded, painted, worst))
    print(f"headless Chromium screenshot at 1200x2000, {repeat} loads (ms from navigation):")
    print(f"{'page':<11} {'browser s':>9} {'load event':>10} {'painted':>8} {'worst painted':>13}")
    for label, seconds, loaded, painted, worst in rows:
        print(f"{label:<11} {seconds:>9.2f} {loaded:>10.0f} {painted:>8.0f} {worst:>13.0f}")
    print(
        json.dumps(
            {"html_bytes": page.stat().st_size, "painted_ms": rows[1][3], "worst_ms": rows[1][4]}
        )
    )


PROBE = (
    "<script>addEventListener('load',()=>{const t=performance.now();"
    "requestAnimationFrame(()=>setTimeout(()=>console.log('probe',t,performance.now())))})</script>"
)


def _probe(console: list[str]) -> tuple[float, float] | None:
    for line in console:
        if '"probe ' in line:
            _, loaded, painted = line.split('"')[1].split()
            return float(loaded), float(painted)
    return None


if __name__ == "__main__":
    main()
