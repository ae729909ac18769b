"""Transfer learning and distillation, measured: one run, one table.

    python benchmarks/bench_transfer.py [--no-thirdparty] [--json]

Per backbone and task: the cut `transfer fit` chose, labelled samples per class, test accuracy
of the same numpy head on raw inputs (pooled pixels) and on the backbone's features, of
scikit-learn's LogisticRegression on the same features, and of the same head trained with
PyTorch (AdamW, same epochs, batch and standardisation; needs the `build` extra), and the time
`fit` took (features + all cuts tried). Distillation rows: the student's head trained on the
labels alone vs distilled from the teacher on labelled + unlabelled samples.

Tasks (real data): digits 5-9 for a CNN that has only seen digits 0-4 (20 labels per class,
scikit-learn's digits); texture of a crop of a scikit-image photo (brick / grass / gravel,
12 crops per class from the top halves, 30 per class from the bottom halves to test) for the
Paddle orientation classifier and YOLOv8n's backbone.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from onnxcomp import model as model_io  # noqa: E402
from onnxcomp.data import NpzData  # noqa: E402
from onnxcomp.transfer import FitOptions, fit  # noqa: E402
from onnxcomp.transfer.cuts import fix_input_shapes  # noqa: E402
from onnxcomp.transfer.distill import DistillOptions, distill  # noqa: E402
from onnxcomp.transfer.features import compute_features, key  # noqa: E402


def pixels_model(shape: tuple[int, ...], name: str):
    """A model that only pools its image input to at most 16x16 and flattens it (the raw baseline)."""
    import onnx_ir as ir

    c, h, w = shape[1:]
    k = max(1, h // 16)
    text = f"""<ir_version: 8, opset_import: ["" : 17]>
pixels (float[N, {c}, {h}, {w}] {name}) => (float[N, F] flat) {{
  p = AveragePool <kernel_shape = [{k}, {k}], strides = [{k}, {k}]> ({name})
  flat = Flatten <axis = 1> (p)
}}"""
    return ir.from_onnx_text(text)


def run_labels(path, data: NpzData, input_name: str) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = np.concatenate([b.inputs[input_name] for b in data.batches(64)])
    return session.run(["label"], {input_name: x})[0]


def torch_head(x_train, y_train, x_test, epochs: int, options: FitOptions) -> np.ndarray | None:
    try:
        import torch
    except ImportError:
        return None
    torch.manual_seed(options.seed)
    mean, std = x_train.mean(0), x_train.std(0)
    std[std < 1e-6] = 1.0
    xt = torch.from_numpy(((x_train - mean) / std).astype(np.float32))
    yt = torch.from_numpy(y_train)
    layer = torch.nn.Linear(xt.shape[1], int(y_train.max()) + 1)
    opt = torch.optim.AdamW(layer.parameters(), lr=options.lr, weight_decay=options.weight_decay)
    gen = torch.Generator().manual_seed(options.seed)
    for _ in range(epochs):
        for idx in torch.randperm(len(xt), generator=gen).split(options.batch_size):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(layer(xt[idx]), yt[idx]).backward()
            opt.step()
    with torch.no_grad():
        return layer(torch.from_numpy(((x_test - mean) / std).astype(np.float32))).argmax(1).numpy()


def transfer_row(name, backbone_path, train, test, input_name, per_class, folder) -> dict:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    options = FitOptions()
    y_test = np.load(test)["labels"]
    y_train = np.load(train)["labels"]
    model = model_io.load(backbone_path)
    start = time.perf_counter()
    result = fit(model, NpzData(train), options)
    seconds = time.perf_counter() - start
    out = model_io.save(result.model, folder / f"{name}.onnx")
    accuracy = float((run_labels(out, NpzData(test), input_name) == y_test).mean())

    backbone = model_io.load(backbone_path)
    fix_input_shapes(backbone, {k: s for k, (_, s) in NpzData(train).sample_signature().items()})
    feats_train = compute_features(backbone, [result.cut], NpzData(train))[key(result.cut)]
    feats_test = compute_features(backbone, [result.cut], NpzData(test))[key(result.cut)]
    logreg = make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000)).fit(feats_train, y_train)
    torch_pred = torch_head(feats_train, y_train, feats_test, result.report["refit_epochs"] or options.epochs, options)

    shape = next(iter(NpzData(train).sample_signature().values()))[1]
    raw = fit(pixels_model(shape, input_name), NpzData(train), FitOptions(at="flat"))
    raw_path = model_io.save(raw.model, folder / f"{name}.pixels.onnx")
    raw_accuracy = float((run_labels(raw_path, NpzData(test), input_name) == y_test).mean())
    return {
        "backbone": name,
        "cut": result.report["cut"]["tensor"],
        "features": result.report["cut"]["features"],
        "labels_per_class": per_class,
        "raw_input": raw_accuracy,
        "features_numpy": accuracy,
        "features_logreg": float(logreg.score(feats_test, y_test)),
        "features_torch": None if torch_pred is None else float((torch_pred == y_test).mean()),
        "fit_seconds": round(seconds, 2),
    }


def digits_files(folder: Path):
    from models.build_digits import load_split

    split = load_split()
    rng = np.random.default_rng(0)
    rows = np.concatenate([rng.choice(np.flatnonzero(split.y_train == c), 20, replace=False) for c in range(5, 10)])
    np.savez(folder / "d59_train.npz", input=split.x_train[rows], labels=split.y_train[rows] - 5)
    test = split.y_test >= 5
    np.savez(folder / "d59_test.npz", input=split.x_test[test], labels=split.y_test[test] - 5)
    order = rng.permutation(len(split.x_train))
    np.savez(folder / "labelled.npz", input=split.x_train[order[:100]], labels=split.y_train[order[:100]])
    np.savez(folder / "unlabelled.npz", input=split.x_train[order[100:1100]])
    np.savez(folder / "test.npz", input=split.x_test, labels=split.y_test)


def texture_files(folder: Path, input_name: str, size: int, scale: str):
    from models import photos

    task = photos.texture_task(size=size, scale=scale)
    train, test = folder / f"tex_{input_name}_train.npz", folder / f"tex_{input_name}_test.npz"
    np.savez(train, **{input_name: task.x_train}, labels=task.y_train)
    np.savez(test, **{input_name: task.x_test}, labels=task.y_test)
    return train, test


def distill_rows(folder: Path) -> list[dict]:
    teacher_path = ROOT / "models" / "digits_cnn.onnx"
    student_path = ROOT / "models" / "digits_cnn_04_half.onnx"
    y_test = np.load(folder / "test.npz")["labels"]
    teacher_labels = None
    import onnxruntime as ort

    x_test = np.load(folder / "test.npz")["input"]
    teacher_labels = ort.InferenceSession(str(teacher_path)).run(None, {"input": x_test})[0].argmax(1)
    rows = []
    start = time.perf_counter()
    alone = fit(model_io.load(student_path), NpzData(folder / "labelled.npz"), FitOptions())
    alone_seconds = time.perf_counter() - start
    start = time.perf_counter()
    taught = distill(
        model_io.load(teacher_path), model_io.load(student_path),
        [NpzData(folder / "labelled.npz"), NpzData(folder / "unlabelled.npz")], DistillOptions(),
    )
    taught_seconds = time.perf_counter() - start
    for how, result, seconds, samples in (
        ("100 labels only", alone, alone_seconds, 100),
        ("distilled, 100 labelled + 1000 unlabelled", taught, taught_seconds, 1100),
    ):
        out = model_io.save(result.model, folder / f"student_{samples}.onnx")
        labels = run_labels(out, NpzData(folder / "test.npz"), "input")
        rows.append({
            "student": "digits_cnn_04_half (20k params, seen 0-4 only)",
            "teacher": "digits_cnn (82k params)",
            "training": how,
            "cut": result.report["cut"]["tensor"],
            "accuracy": float((labels == y_test).mean()),
            "teacher_agreement": float((labels == teacher_labels).mean()),
            "teacher_accuracy": float((teacher_labels == y_test).mean()),
            "seconds": round(seconds, 2),
        })
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-thirdparty", action="store_true", help="Only the digits rows.")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="bench-transfer-"))
    os.environ.setdefault("ONNXCOMP_FEATURE_CACHE", str(folder / "features"))
    digits_files(folder)
    rows = [transfer_row("digits_cnn_04 -> digits 5-9", ROOT / "models" / "digits_cnn_04.onnx",
                         folder / "d59_train.npz", folder / "d59_test.npz", "input", 20, folder)]
    if not args.no_thirdparty:
        from models import thirdparty

        for name, input_name, size, scale in (("orientation", "x", 224, "imagenet"), ("yolov8n", "images", 320, "unit")):
            train, test = texture_files(folder, input_name, size, scale)
            rows.append(transfer_row(f"{name} -> textures", thirdparty.fetch(name), train, test, input_name, 12, folder))
    distilled = distill_rows(folder)
    if args.json:
        print(json.dumps({"transfer": rows, "distill": distilled}, indent=2))
        return
    header = ["backbone -> task", "cut", "features", "labels/class", "raw input", "numpy head", "logreg", "torch head", "fit s"]
    lines = [header] + [[
        r["backbone"], r["cut"], r["features"], r["labels_per_class"], f"{r['raw_input']:.3f}",
        f"{r['features_numpy']:.3f}", f"{r['features_logreg']:.3f}",
        "-" if r["features_torch"] is None else f"{r['features_torch']:.3f}", f"{r['fit_seconds']:.1f}",
    ] for r in rows]
    print(_table(lines))
    print()
    lines = [["student", "training", "cut", "accuracy", "agreement with teacher", "teacher accuracy", "s"]] + [[
        r["student"], r["training"], r["cut"], f"{r['accuracy']:.3f}", f"{r['teacher_agreement']:.3f}",
        f"{r['teacher_accuracy']:.3f}", f"{r['seconds']:.1f}",
    ] for r in distilled]
    print(_table(lines))


def _table(rows: list[list]) -> str:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    out = ["| " + " | ".join(str(c).ljust(w) for c, w in zip(row, widths)) + " |" for row in rows]
    out.insert(1, "| " + " | ".join("-" * w for w in widths) + " |")
    return "\n".join(out)


if __name__ == "__main__":
    main()
