"""Train the digits reference models (a small CNN and an MLP) and export them to ONNX.

Data: scikit-learn's bundled digits set (1797 8x8 images, 10 classes, no download). Pixels are
scaled to [0, 1]. The split is fixed (stratified, seed 0): 30 % held out as the test set, and a
300-sample calibration set drawn from the training part.

    python models/build_digits.py [--out-dir models]

Writes digits_cnn.onnx, digits_cnn_opset11.onnx, digits_mlp.onnx, digits_test.npz,
digits_test_flat.npz, digits_calib.npz, digits_calib_flat.npz. Needs the `build` extra (torch).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import pathlib
import warnings

import numpy as np

log = logging.getLogger(__name__)

HERE = pathlib.Path(__file__).resolve().parent
SEED = 0
TEST_FRACTION = 0.3
CALIB_SAMPLES = 300


@dataclasses.dataclass
class DigitsSplit:
    """Digits images in [0, 1], shape (samples, 1, 8, 8), and int64 labels."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    x_calib: np.ndarray
    y_calib: np.ndarray


def load_split() -> DigitsSplit:
    """The fixed train / test / calibration split used by every digits model."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[:, None, :, :]  # (samples, 1, 8, 8)
    y = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=TEST_FRACTION, random_state=SEED, stratify=y
    )
    rng = np.random.default_rng(SEED)
    calib = rng.choice(len(x_train), size=CALIB_SAMPLES, replace=False)
    return DigitsSplit(x_train, y_train, x_test, y_test, x_train[calib], y_train[calib])


def _modules():
    """Torch module classes, defined lazily so importing this file does not need torch."""
    import torch
    from torch import nn

    class DigitsCNN(nn.Module):
        """Conv-BN-Relu x2, MaxPool, Conv-Relu, MaxPool, Flatten, Gemm-Relu-Gemm (82k params)."""

        def __init__(self, widths: tuple[int, int, int] = (32, 64, 64), hidden: int = 96):
            super().__init__()
            c1, c2, c3 = widths
            self.features = nn.Sequential(
                nn.Conv2d(1, c1, 3, padding=1),
                nn.BatchNorm2d(c1),
                nn.ReLU(),
                nn.Conv2d(c1, c2, 3, padding=1),
                nn.BatchNorm2d(c2),
                nn.ReLU(),
                nn.MaxPool2d(2),  # 8x8 -> 4x4
                nn.Conv2d(c2, c3, 3, padding=1),
                nn.ReLU(),
                nn.MaxPool2d(2),  # 4x4 -> 2x2
            )
            self.head = nn.Sequential(
                nn.Flatten(),
                nn.Linear(c3 * 2 * 2, hidden),
                nn.ReLU(),
                nn.Dropout(0.2),
                nn.Linear(hidden, 10),
            )

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.features(x))

    class DigitsMLP(nn.Module):
        """64 -> 128 -> 64 -> 10 with Relu."""

        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(
                nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10)
            )

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

    return DigitsCNN, DigitsMLP


def train(model, x: np.ndarray, y: np.ndarray, epochs: int = 60, lr: float = 2e-3):
    """Adam with cosine decay, batch 64, seeded; returns the model in eval mode."""
    import torch

    torch.manual_seed(SEED)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    gen = torch.Generator().manual_seed(SEED)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(xt), generator=gen).split(64):
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(xt[idx]), yt[idx])
            loss.backward()
            opt.step()
        sched.step()
    return model.eval()


def accuracy(model, x: np.ndarray, y: np.ndarray) -> float:
    import torch

    with torch.no_grad():
        return float((model(torch.from_numpy(x)).argmax(1).numpy() == y).mean())


def export(model, example: np.ndarray, path: pathlib.Path, opset: int = 17) -> None:
    """Export with a dynamic batch axis; BatchNormalization stays a separate node (not fused)."""
    import torch

    # The TorchScript exporter is deprecated upstream and warns about constant folding with
    # PRESERVE; both are expected here.
    warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
    warnings.filterwarnings("ignore", message=".*constant folding.*", category=UserWarning)
    torch.onnx.export(
        model,
        (torch.from_numpy(example),),
        str(path),
        input_names=["input"],
        output_names=["logits"],
        dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        opset_version=opset,
        dynamo=False,
        # PRESERVE with an eval-mode model exports inference-mode BatchNormalization without the
        # Conv+BN fusion that EVAL applies, so the toolkit's own folding has something to do.
        training=torch.onnx.TrainingMode.PRESERVE,
    )


def build_cnn(split: DigitsSplit | None = None, **sizes):
    """Train the digits CNN; returns (torch model, test accuracy).

    sizes: `widths` (three conv widths) and `hidden` (head width) for a slimmer or wider CNN.
    """
    import torch

    split = split or load_split()
    torch.manual_seed(SEED)
    cnn_cls, _ = _modules()
    model = train(cnn_cls(**sizes), split.x_train, split.y_train)
    return model, accuracy(model, split.x_test, split.y_test)


def build_mlp(split: DigitsSplit | None = None):
    """Train the digits MLP on flattened images; returns (torch model, test accuracy)."""
    import torch

    split = split or load_split()
    torch.manual_seed(SEED)
    _, mlp_cls = _modules()
    flat = split.x_train.reshape(len(split.x_train), 64)
    model = train(mlp_cls(), flat, split.y_train)
    return model, accuracy(model, split.x_test.reshape(-1, 64), split.y_test)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=pathlib.Path, default=HERE)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    import torch

    torch.set_num_threads(1)
    out: pathlib.Path = args.out_dir
    out.mkdir(parents=True, exist_ok=True)
    split = load_split()

    def flat(x: np.ndarray) -> np.ndarray:
        return x.reshape(len(x), 64)

    np.savez_compressed(out / "digits_test.npz", input=split.x_test, labels=split.y_test)
    np.savez_compressed(out / "digits_test_flat.npz", input=flat(split.x_test), labels=split.y_test)
    np.savez_compressed(out / "digits_calib.npz", input=split.x_calib, labels=split.y_calib)
    np.savez_compressed(
        out / "digits_calib_flat.npz", input=flat(split.x_calib), labels=split.y_calib
    )

    cnn, cnn_acc = build_cnn(split)
    n_params = sum(p.numel() for p in cnn.parameters())
    log.info("digits CNN: %d params, test accuracy %.4f", n_params, cnn_acc)
    export(cnn, split.x_test[:1], out / "digits_cnn.onnx", opset=17)
    export(cnn, split.x_test[:1], out / "digits_cnn_opset11.onnx", opset=11)

    mlp, mlp_acc = build_mlp(split)
    log.info("digits MLP: test accuracy %.4f", mlp_acc)
    export(mlp, flat(split.x_test[:1]), out / "digits_mlp.onnx", opset=17)


if __name__ == "__main__":
    main()
