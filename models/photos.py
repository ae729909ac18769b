"""Real photos for tests and benchmarks: scikit-image's bundled images, read from its wheel.

    from models import photos
    data = photos.texture_task(size=224)      # crops of brick / grass / gravel, train and test

`wheel()` runs `pip download --no-deps scikit-image==0.26.0` once into ~/.cache/onnxcomp/wheels
(or $ONNXCOMP_CACHE/../wheels); images are read from the wheel with Pillow, never installed.
"""

from __future__ import annotations

import dataclasses
import io
import pathlib
import subprocess
import sys
import zipfile

import numpy as np

PACKAGE = "scikit-image==0.26.0"
TEXTURES = ("brick", "grass", "gravel")
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


def wheel() -> pathlib.Path:
    folder = pathlib.Path.home() / ".cache" / "onnxcomp" / "wheels"
    found = sorted(folder.glob("scikit_image-0.26.0-*.whl"))
    if found:
        return found[0]
    folder.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q",
         "--disable-pip-version-check", PACKAGE, "-d", str(folder)],
        capture_output=True, text=True,
    )  # fmt: skip
    found = sorted(folder.glob("scikit_image-0.26.0-*.whl"))
    if done.returncode != 0 or not found:
        raise RuntimeError(f"pip download {PACKAGE} failed: {done.stderr.strip()[-2000:]}")
    return found[0]


def image(name: str) -> np.ndarray:
    """An RGB uint8 [H, W, 3] image from skimage/data (``name`` without the extension)."""
    from PIL import Image

    with zipfile.ZipFile(wheel()) as wh:
        member = next(n for n in wh.namelist() if n.startswith(f"skimage/data/{name}."))
        return np.asarray(Image.open(io.BytesIO(wh.read(member))).convert("RGB"))


@dataclasses.dataclass
class Task:
    x_train: np.ndarray  # float32 [N, 3, size, size], ImageNet-normalised
    y_train: np.ndarray  # int64
    x_test: np.ndarray
    y_test: np.ndarray
    classes: tuple[str, ...]


def texture_task(
    size: int = 224,
    crop: int = 128,
    train_per_class: int = 12,
    test_per_class: int = 30,
    seed: int = 0,
    scale: str = "imagenet",
) -> Task:
    """Which texture a crop shows (brick, grass, gravel). Training crops come from the top half of
    each photo, test crops from the bottom half, so no test pixel was seen in training."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    parts = {"train": ([], []), "test": ([], [])}
    for label, name in enumerate(TEXTURES):
        picture = image(name)
        h, w, _ = picture.shape
        for part, count, (top, bottom) in (
            ("train", train_per_class, (0, h // 2)),
            ("test", test_per_class, (h // 2, h)),
        ):
            for _ in range(count):
                y = rng.integers(top, bottom - crop + 1)
                x = rng.integers(0, w - crop + 1)
                patch = Image.fromarray(picture[y : y + crop, x : x + crop]).resize(
                    (size, size), Image.BILINEAR
                )
                parts[part][0].append(_scale(np.asarray(patch), scale))
                parts[part][1].append(label)

    def stack(part):
        xs, ys = parts[part]
        return np.stack(xs).astype(np.float32), np.asarray(ys, np.int64)

    x_train, y_train = stack("train")
    x_test, y_test = stack("test")
    return Task(x_train, y_train, x_test, y_test, TEXTURES)


def _scale(pixels: np.ndarray, scale: str) -> np.ndarray:
    x = pixels.astype(np.float32) / 255.0
    if scale == "imagenet":
        x = (x - IMAGENET_MEAN) / IMAGENET_STD
    return x.transpose(2, 0, 1)  # [3, H, W]
