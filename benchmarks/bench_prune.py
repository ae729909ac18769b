"""Pruning side by side: onnxcomp's unstructured (magnitude, Wanda, SparseGPT and ADMM reconstruction),
structured and structured+int8 rows beside onnxsim's four pruning functions, per model.

    python benchmarks/bench_prune.py [--models digits,resnet,mobilenetv2,orientation,minilm_l3,yolov8n]
                                     [--runs 300] [--structured-only] [--no-onnxsim] [--json]

Per row: sparsity (zeros in the weights) or channels removed, MACs, file size, zip size (zlib of
the weights), p50 latency at 1 thread (all models of one table timed interleaved in one process)
and its ratio to the dense cleaned-up model, and accuracy (digits: top-1 on the 540 held-out
digits) or fidelity to the dense model (untrained generated graphs: top-1 agreement and cosine on
random inputs, the only data they have; third-party models: models/realdata.py's rendered text
lines and sentences; YOLOv8n: scikit-image photos, `evaluate.box_agreement`: after a 0.25
confidence threshold and per-class NMS, every box of either model (dense and pruned) is matched to
the best-overlapping box of the same class in the other's result on the same photo, and box_iou is
the mean of those IoUs, a box with no match counting 0 (a lost or an extra detection costs a full
box); "boxes" is dense/pruned box counts). Numbers go to docs/prune.md and the README by hand.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models import build_graphs  # noqa: E402
from onnxcomp import bench, evaluate, runtime  # noqa: E402
from onnxcomp import model as model_io  # noqa: E402
from onnxcomp.prune.api import PruneOptions, clean_up, model_stats, prune  # noqa: E402

MODELS = ROOT / "models"
THIRDPARTY = ("minilm_l3", "minilm", "orientation", "yolov8n")  # real data from models/realdata.py


def _digits():
    calib = MODELS / "digits_calib.npz"
    test = MODELS / "digits_test.npz"
    return model_io.load(MODELS / "digits_cnn.onnx"), calib, test


def _thirdparty(name: str):
    from models import realdata, thirdparty

    if name == "minilm":  # all-MiniLM-L6-v2, python models/build_minilm.py --out-dir models/build
        calib, test = realdata.build("minilm_docs")
        return model_io.load(MODELS / "build" / "minilm.onnx"), calib, test
    # MiniLM: ~2,900 everyday calibration sentences, 59 k tokens (reconstruction needs many more tokens
    # than a 1536-wide layer has inputs, and sentences like the ones it is judged on)
    calib, test = realdata.build("minilm_l3_text" if name == "minilm_l3" else name)
    return model_io.load(thirdparty.fetch(name)), calib, test


def _generated(name: str, tmp: Path):
    proto = getattr(build_graphs, name)()
    path = tmp / f"{name}.onnx"
    onnx.save(proto, path)
    calib, test = tmp / f"{name}_calib.npz", tmp / f"{name}_test.npz"
    np.savez(calib, **build_graphs.example_feed(proto, batch=64, seed=1))
    np.savez(test, **build_graphs.example_feed(proto, batch=64, seed=2))
    return model_io.load(path), calib, test


def _outputs(model, data_path: Path) -> np.ndarray:
    """The model's first float output of rank 2 (logits, or a sentence embedding)."""
    data = np.load(data_path)
    feed = {k: data[k] for k in data.files if k != "labels"}
    outs = [o for o in runtime.create_session(model).run(None, feed) if o.dtype.kind == "f"]
    out = next((o for o in outs if o.ndim == 2), outs[0])  # else a hidden state, flattened per sample
    return out.reshape(len(out), -1).astype(np.float64)


def _quality(model, dense_out: np.ndarray, data_path: Path) -> dict:
    out = _outputs(model, data_path)
    data = np.load(data_path)
    row = {
        "top1_agreement": float(np.mean(out.argmax(1) == dense_out.argmax(1))),
        "cosine": float(
            np.mean(np.sum(out * dense_out, 1) / np.linalg.norm(out, axis=1) / np.linalg.norm(dense_out, axis=1))
        ),
    }
    if "labels" in data.files:
        row["accuracy"] = float(np.mean(out.argmax(1) == data["labels"]))
    return row



def box_iou(model, dense, data_path: Path, conf: float = 0.25) -> dict:
    """`evaluate.box_agreement` of ``model``'s boxes with ``dense``'s on the photos."""
    data = np.load(data_path)
    feed = {k: data[k] for k in data.files if k != "labels"}
    got = runtime.create_session(model).run(None, feed)[0]
    want = runtime.create_session(dense).run(None, feed)[0]
    row = evaluate.box_agreement(got, want, conf)
    return {"box_iou": row["box_iou"], "boxes": f"{row['reference_boxes']}/{row['boxes']}"}


def _zip(model: ir.Model) -> int:
    raw = b"".join(
        v.const_value.numpy().tobytes() for _, v in model_io.iter_tensors(model) if v.const_value is not None
    )
    return len(zlib.compress(raw, 6))


def _calibration_list(data_path: Path, n: int = 64) -> list[dict]:
    """The first ``n`` samples, one dict each, cut to their real tokens when there is a mask."""
    data = np.load(data_path)
    names = [k for k in data.files if k != "labels"]
    rows = []
    for i in range(min(n, len(data[names[0]]))):
        row = {k: data[k][i : i + 1] for k in names}
        if "attention_mask" in row:
            length = int(row["attention_mask"].sum())
            row = {k: v[:, :length] for k, v in row.items()}
        rows.append(row)
    return rows


def _onnxsim_rows(
    dense_proto: onnx.ModelProto, calib: Path, structured_only: bool = False, name: str = "", samples: int = 64
) -> list[tuple[str, object]]:
    """onnxsim's four pruning functions on the cleaned dense model (or why not); Wanda and SparseGPT
    get the same calibration samples as onnxcomp's reconstruction (at most ``samples``)."""
    try:
        from onnxsim import pruning
    except Exception as err:  # not installed, or no pruning API at this version
        return [("onnxsim pruning", f"unavailable: {type(err).__name__}: {err}")]
    cal = _calibration_list(calib, samples if name.startswith("minilm") else 64)
    on = f", {len(cal)} sentences" if name.startswith("minilm") else ""
    rows: list[tuple[str, object]] = []
    jobs = [
        ("onnxsim magnitude 50%", lambda: pruning.apply_magnitude_pruning(dense_proto, sparsity=0.5)),
        (f"onnxsim Wanda 50%{on}", lambda: pruning.apply_wanda_pruning(dense_proto, calibration_data=cal, num_samples=len(cal), sparsity=0.5)),
        (f"onnxsim SparseGPT 50%{on}", lambda: pruning.apply_sparsegpt_pruning(dense_proto, calibration_data=cal, num_samples=len(cal), sparsity=0.5)),
        ("onnxsim SparseGPT 70%", lambda: pruning.apply_sparsegpt_pruning(dense_proto, calibration_data=cal, num_samples=len(cal), sparsity=0.7)),
        ("onnxsim structured 40%", lambda: pruning.apply_structured_pruning(dense_proto, sparsity=0.4)),
    ]  # fmt: skip
    if structured_only or name == "orientation":
        jobs = jobs[-1:]
    elif name.startswith("minilm"):
        jobs = jobs[:3]
    for label, job in jobs:
        try:
            rows.append((label, ir.from_proto(job())))
        except Exception as err:
            rows.append((label, f"failed: {type(err).__name__}: {str(err).splitlines()[0][:120]}"))
    return rows


def run_model(name: str, tmp: Path, runs: int, structured_only: bool = False, onnxsim: bool = True) -> list[dict]:
    if name == "digits":
        model, calib, test = _digits()
    elif name in THIRDPARTY:
        model, calib, test = _thirdparty(name)
    else:
        model, calib, test = _generated(name, tmp)
    from onnxcomp.data import open_data

    dense, _ = clean_up(model_io.copy_model(model), PruneOptions(), open_data(test, model_io.input_specs(model)))
    calib_samples = len(np.load(calib)[model_io.input_specs(model)[0].name])
    detector = name == "yolov8n"  # [1, 4 + classes, N] boxes: judged by box IoU to the dense model
    dense_out = None if detector else _outputs(dense, test)
    shapes = {"images": [1, 3, 320, 320]} if detector else None
    candidates: list[tuple[str, object]] = [("dense (cleaned)", dense)]

    def ours(label, **options):
        start = time.perf_counter()
        try:
            pruned, report = prune(model_io.copy_model(model), PruneOptions(**options), data=calib, eval_data=test)
        except Exception as err:
            candidates.append((label, f"failed: {err}"))
            return None
        candidates.append((label, pruned))
        print(f"  {label}: {time.perf_counter() - start:.1f} s", file=sys.stderr)
        return pruned

    if name == "digits":
        ours("onnxcomp magnitude 50%", sparsity=0.5, method="magnitude", reconstruct=False)
        ours("onnxcomp Wanda 50%", sparsity=0.5, method="wanda", reconstruct=False)
        ours("onnxcomp SparseGPT+LS 50%", sparsity=0.5, method="sparsegpt")
        ours("onnxcomp SparseGPT+LS 70%", sparsity=0.7, method="sparsegpt")
        ours("onnxcomp SparseGPT+LS 90%", sparsity=0.9, method="sparsegpt")
        ours("onnxcomp ADMM+LS 50% (default)", sparsity=0.5)
        ours("onnxcomp ADMM+LS 70% (default)", sparsity=0.7)
        ours("onnxcomp ADMM+LS 90% (default)", sparsity=0.9)
        ours("onnxcomp 2:4 + reconstruction", sparsity=0.5, pattern="2:4")
        structured = ours("onnxcomp structured 20% ch", structured=True, sparsity=0.2)
        ours("onnxcomp structured 40% ch", structured=True, sparsity=0.4)
    elif name.startswith("minilm"):
        structured = None
        ours("onnxcomp magnitude 50%", sparsity=0.5, method="magnitude", reconstruct=False)
        ours("onnxcomp Wanda 50%", sparsity=0.5, method="wanda", reconstruct=False, samples=48)
        ours("onnxcomp ADMM+LS 50%, 48 sentences", sparsity=0.5, samples=48)
        ours(f"onnxcomp SparseGPT+LS 50%, {calib_samples} sentences", sparsity=0.5, samples=calib_samples,
             method="sparsegpt")
        ours(f"onnxcomp ADMM+LS 50% (default), {calib_samples} sentences", sparsity=0.5, samples=calib_samples)
        ours(f"onnxcomp ADMM+LS 50%, --allocate error, {calib_samples} sentences", sparsity=0.5,
             samples=calib_samples, allocate="error")
        ours("onnxcomp structured 10% heads+FFN", structured=True, sparsity=0.1, importance="activation")
        ours("onnxcomp structured 25% heads+FFN", structured=True, sparsity=0.25, importance="activation")
    elif name == "orientation":
        ours("onnxcomp structured 20% ch", structured=True, sparsity=0.2, samples=32)
        structured = ours("onnxcomp structured 30% ch", structured=True, sparsity=0.3, samples=32)
    elif detector:  # all 58 calibration images, people first (realdata yolov8n v2); the deepest 3x3 convs
        # have 2304 inputs, so few images under-determine their least squares
        structured_only = True
        structured = ours(
            "onnxcomp structured 25% MACs", structured=True, sparsity=0.25, sparsity_of="macs",
            importance="activation", samples=calib_samples,
        )  # fmt: skip
        ours(
            "onnxcomp structured 25% MACs, --allocate sensitivity", structured=True, sparsity=0.25, sparsity_of="macs",
            importance="activation", allocate="sensitivity", metric="onnxcomp.evaluate:yolo_boxes",
            samples=calib_samples,
        )  # fmt: skip
    else:
        if not structured_only:
            ours("onnxcomp ADMM+LS 50%", sparsity=0.5)
        ours("onnxcomp structured 25% ch", structured=True, sparsity=0.25)
        structured = ours("onnxcomp structured 40% ch", structured=True, sparsity=0.4)
    if structured is not None:
        from onnxcomp.quantize.api import QuantizeOptions, quantize

        try:
            q, _ = quantize(model_io.copy_model(structured), QuantizeOptions(mode="static", optimize=False), data=calib)
            label = next(lbl for lbl, m in candidates if m is structured)
            candidates.append((label + " + int8", q))
        except Exception as err:
            candidates.append(("structured + int8", f"failed: {err}"))
    # the same sentences as onnxcomp's (MiniLM: onnxsim's SparseGPT on all 2,886 took 39 minutes on a
    # 2-core machine at load 1-3)
    if onnxsim:
        candidates += _onnxsim_rows(ir.to_proto(dense), calib, structured_only, name, calib_samples)

    live = [(label, m) for label, m in candidates if not isinstance(m, str)]
    timing = bench.benchmark([m for _, m in live], runs=runs, warmup=20, memory=False, graph=False, data=test)
    p50 = {label: t for (label, _), t in zip(live, timing.models)}
    dense_stats = model_stats(dense, shapes)
    rows = []
    for label, m in candidates:
        row: dict = {"model": name, "row": label}
        if isinstance(m, str):
            row["note"] = m
            rows.append(row)
            continue
        stats = model_stats(m, shapes)
        row.update(
            sparsity=stats["sparsity"],
            parameters=stats["parameters"],
            macs=stats["macs"],
            macs_ratio=(stats["macs"] / dense_stats["macs"]) if stats["macs"] and dense_stats["macs"] else None,
            file_kb=round(stats["file_bytes"] / 1024, 1),
            zip_kb=round(_zip(m) / 1024, 1),
            p50_ms=round(p50[label].p50_ms, 4),
            ratio=round(p50[label].p50_ms / p50["dense (cleaned)"].p50_ms, 3),
            **{k: round(v, 4) if isinstance(v, float) else v
               for k, v in (box_iou(m, dense, test) if detector else _quality(m, dense_out, test)).items()},
        )
        rows.append(row)
    return rows


def markdown(rows: list[dict]) -> str:
    cols = ["row", "sparsity", "parameters", "macs_ratio", "file_kb", "zip_kb", "p50_ms", "ratio", "accuracy",
            "top1_agreement", "cosine", "box_iou", "boxes", "note"]  # fmt: skip
    out = []
    for model in dict.fromkeys(r["model"] for r in rows):
        out.append(f"\n### {model}\n")
        out.append("| " + " | ".join(cols) + " |")
        out.append("|" + "---|" * len(cols))
        for r in rows:
            if r["model"] == model:
                cells = []
                for c in cols:
                    v = r.get(c, "")
                    cells.append(f"{v:.3g}" if isinstance(v, float) and c in ("macs_ratio",) else str(v if v is not None else ""))
                out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="digits,resnet,mobilenetv2")
    parser.add_argument("--runs", type=int, default=300)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--structured-only", action="store_true", help="Structured rows only (faster).")
    parser.add_argument("--no-onnxsim", action="store_true", help="Leave out onnxsim's rows (MiniLM's SparseGPT takes ~40 minutes).")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            print(f"{name} ...", file=sys.stderr)
            rows += run_model(name, Path(tmp), args.runs, args.structured_only, not args.no_onnxsim)
    print(json.dumps(rows, indent=1) if args.json else markdown(rows))


if __name__ == "__main__":
    main()
