"""Where YOLOv8n's int8 box error comes from, and how low it can go: the figures behind the
README's YOLOv8n row.

    python benchmarks/bench_yolo_int8.py [--draws 4] [--fallback 8,32]

On the third-party YOLOv8n (`models/thirdparty.py`) and its real photos (`models/realdata.py`),
each variant is scored against fp32 on the held-out photos with the box metric auto uses
(`onnxcomp.evaluate:yolo_boxes`, per image the boxes' mean IoU with fp32's; 1 point is auto's
budget), plus two continuous errors that are not all-or-nothing at the 0.25 confidence threshold:
the RMS error of the class logits where fp32's score is over 0.05, and the mean absolute error of
the box coordinates (pixels) at the anchors fp32 scores over 0.1.

Variants:
- weights int8 only: every Conv weight rounded to per-channel int8 and back, activations float
  (the least any int8 model loses), with round-to-nearest and with stochastic rounding draws (the
  same error size, other draws: how far the box score moves by chance);
- onnxcomp static (mse ranges, the default), then with parts kept float: the detect head
  (model.22: the box/class Concat, Split, DFL, Sigmoid), the stem (model.0-2), and auto's
  fallback (the k most sensitive layers by SQNR, as auto puts them back).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--draws", type=int, default=4, help="stochastic-rounding draws")
    parser.add_argument("--fallback", default="8,32", help="layers auto puts back to float")
    args = parser.parse_args()

    import onnx
    from onnx import numpy_helper

    from models import realdata, thirdparty
    from onnxcomp import model as model_io
    from onnxcomp import runtime
    from onnxcomp.data import open_data
    from onnxcomp.evaluate import detections, yolo_boxes
    from onnxcomp.quantize import api, auto

    path = thirdparty.fetch("yolov8n")
    calib_path, eval_path = realdata.build("yolov8n")
    images = np.load(eval_path)["images"]

    def outputs(model) -> np.ndarray:
        session = runtime.create_session(model, threads=1)  # a path, bytes or an ir.Model
        return np.concatenate(
            [
                next(iter(runtime.run(session, {"images": images[i : i + 1]}).values()))
                for i in range(len(images))
            ]
        )

    reference = outputs(str(path))
    boxes = sum(len(detections(r)[0]) for r in reference)
    print(f"{len(images)} held-out photos, {boxes} fp32 boxes at confidence 0.25")

    def row(name: str, out: np.ndarray) -> None:
        score = float(yolo_boxes({"o": out}, {"o": reference}).mean())
        ref_s, got_s = reference[:, 4:], out[:, 4:]
        near = ref_s > 0.05
        logit = lambda p: np.log(np.clip(p, 1e-6, 1 - 1e-6) / np.clip(1 - p, 1e-6, 1))  # noqa: E731
        logit_err = float(np.sqrt(((logit(ref_s) - logit(got_s)) ** 2)[near].mean()))
        anchors = ref_s.max(1) > 0.1  # [images, anchors]
        px = float(
            np.abs(reference[:, :4].transpose(0, 2, 1) - out[:, :4].transpose(0, 2, 1))[
                anchors
            ].mean()
        )
        print(f"| {name} | {score:.3f} | {logit_err:.3f} | {px:.2f} |", flush=True)

    print("| variant | box agreement (yolo_boxes) | class logit RMS error | box error (px) |")
    print("|---|---|---|---|")

    def weights_int8(rng: np.random.Generator | None) -> bytes:
        proto = onnx.load(str(path))
        for init in proto.graph.initializer:
            w = numpy_helper.to_array(init)
            if w.ndim != 4 or w.size <= 16:
                continue
            scale = np.abs(w).reshape(w.shape[0], -1).max(1).reshape(-1, 1, 1, 1) / 127
            scale[scale == 0] = 1
            x = w / scale
            q = np.round(x) if rng is None else np.floor(x + rng.random(x.shape))
            init.CopyFrom(
                numpy_helper.from_array((q.clip(-127, 127) * scale).astype(np.float32), init.name)
            )
        return proto.SerializeToString()

    row("weights int8 only, round to nearest", outputs(weights_int8(None)))
    for seed in range(args.draws):
        row(
            f"weights int8 only, stochastic rounding draw {seed}",
            outputs(weights_int8(np.random.default_rng(seed))),
        )

    options = api.QuantizeOptions(mode="static", metric="onnxcomp.evaluate:yolo_boxes")
    options.check()
    calib = open_data(str(calib_path), model_io.input_specs(model_io.load(path)))
    prepared, _ = api.prepare(model_io.load(path), options, calib)
    cache = api.CalibrationCache()

    def static(exclude: list[str]):
        opts = api.QuantizeOptions(**{**options.__dict__, "exclude_nodes": exclude})
        return api.quantize_static(
            model_io.copy_model(prepared), opts, calib, reference=prepared, check=False, cache=cache
        )

    def block(node) -> int:
        found = re.match(r"/model\.(\d+)/", node.name or "")
        return int(found.group(1)) if found else -1

    full = static([])
    row("onnxcomp static (mse), all int8", outputs(full.model))
    head = [n.name for n in prepared.graph if block(n) == 22]
    row(f"static, detect head float ({len(head)} nodes)", outputs(static(head).model))
    stem = [n.name for n in prepared.graph if 0 <= block(n) <= 2]
    row(f"static, stem model.0-2 float ({len(stem)} nodes)", outputs(static(stem).model))
    order = [name for name, _ in auto.sensitivity(full)]
    for k in (int(v) for v in args.fallback.split(",") if v):
        row(f"static, auto's {k} most sensitive layers float", outputs(static(order[:k]).model))


if __name__ == "__main__":
    main()
