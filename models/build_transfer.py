"""Models for the transfer-learning tests: digits CNNs that have only ever seen digits 0-4.

    python models/build_transfer.py [--out-dir models]

Writes:
- digits_cnn_04.onnx: the digits CNN architecture (widths 32/64/64, hidden 96), trained on the
  training-split images of digits 0-4 only, 5 outputs. A backbone for new classes (5-9).
- digits_cnn_04_half.onnx: the same with half the channels (16/32/32, hidden 48): a student.

Same split, training loop and export as build_digits.py (seeded). Needs the `build` extra (torch).
"""

from __future__ import annotations

import argparse
import logging
import pathlib

import numpy as np

try:
    from models import build_digits
except ImportError:  # run as a script
    import build_digits  # type: ignore[no-redef]

log = logging.getLogger(__name__)
HERE = pathlib.Path(__file__).resolve().parent
OLD_CLASSES = 5


def build_04(widths=(32, 64, 64), hidden=96):
    """A CNN trained on digits 0-4 only; returns (torch model, test accuracy on 0-4)."""
    import torch

    split = build_digits.load_split()
    torch.manual_seed(build_digits.SEED)
    cnn_cls, _ = build_digits._modules()
    model = cnn_cls(widths=widths, hidden=hidden)
    model.head[-1] = torch.nn.Linear(hidden, OLD_CLASSES)
    keep = split.y_train < OLD_CLASSES
    model = build_digits.train(model, split.x_train[keep], split.y_train[keep])
    test = split.y_test < OLD_CLASSES
    return model, build_digits.accuracy(model, split.x_test[test], split.y_test[test])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=pathlib.Path, default=HERE)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    import torch

    torch.set_num_threads(1)
    example = build_digits.load_split().x_test[:1].astype(np.float32)
    for name, sizes in (
        ("digits_cnn_04", {}),
        ("digits_cnn_04_half", {"widths": (16, 32, 32), "hidden": 48}),
    ):
        model, acc = build_04(**sizes)
        params = sum(p.numel() for p in model.parameters())
        log.info("%s: %d params, test accuracy on digits 0-4 %.4f", name, params, acc)
        build_digits.export(model, example, args.out_dir / f"{name}.onnx")


if __name__ == "__main__":
    main()
