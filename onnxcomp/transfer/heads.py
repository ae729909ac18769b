"""Heads trained in numpy: a linear layer or a one-hidden-layer MLP on fixed features.

Losses: softmax cross-entropy (classify), mean squared error (regress), and for distillation
the KL divergence to a teacher's softened probabilities at temperature T (Hinton, Vinyals & Dean
2015, "Distilling the Knowledge in a Neural Network": soft loss scaled by T², plus an optional
cross-entropy on the labelled rows). Optimiser: Adam (Kingma & Ba 2015) with decoupled weight
decay (AdamW, Loshchilov & Hutter 2019) on weights, mini-batches, early stopping on the
validation loss with the best weights kept. Inputs are standardised during training; the
standardisation (and for regression the target scale) is folded into the first and last layers
afterwards, so the deployed head is plain Gemm layers. Every random choice is seeded.

No graph in sight: ``splice.py`` writes a :class:`Head` as ONNX nodes.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import Literal

import numpy as np

from onnxcomp.errors import OnnxcompError

logger = logging.getLogger(__name__)

Task = Literal["classify", "regress"]
HeadKind = Literal["linear", "mlp"]


@dataclasses.dataclass
class HeadOptions:
    """How to train a head (the keys are the CLI flags' names)."""

    head: HeadKind = "linear"
    task: Task = "classify"
    hidden: int = 128  # MLP hidden units
    epochs: int = 300
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 1e-4
    patience: int = 30  # epochs without a better validation loss before stopping
    seed: int = 0

    def check(self, where: str = "head") -> None:
        for key in ("hidden", "epochs", "batch_size", "patience"):
            if getattr(self, key) < 1:
                raise OnnxcompError(f"{where}: {key} must be at least 1")
        if self.lr <= 0:
            raise OnnxcompError(f"{where}: lr must be positive")
        if self.weight_decay < 0:
            raise OnnxcompError(f"{where}: weight_decay must be >= 0")


@dataclasses.dataclass
class Targets:
    """What a head learns from; rows align with the features.

    labels: int64 class ids (classify, -1 = unlabelled) or float targets [N, outputs] (regress).
    soft: a teacher's probabilities at ``temperature`` [N, K], for distillation.
    """

    labels: np.ndarray | None = None
    soft: np.ndarray | None = None
    temperature: float = 1.0
    labels_weight: float = 1.0  # weight of the label loss beside the soft loss

    def subset(self, index: np.ndarray) -> Targets:
        return Targets(
            None if self.labels is None else self.labels[index],
            None if self.soft is None else self.soft[index],
            self.temperature,
            self.labels_weight,
        )


@dataclasses.dataclass
class Head:
    """Dense layers ``x @ W + b`` with ReLU between them, on raw (unstandardised) features.

    weights[i]: (in, out) float32; for classification the last layer gives logits.
    """

    weights: list[np.ndarray]
    biases: list[np.ndarray]
    task: Task = "classify"

    @property
    def inputs(self) -> int:
        return int(self.weights[0].shape[0])

    @property
    def outputs(self) -> int:
        return int(self.weights[-1].shape[1])

    @property
    def parameters(self) -> int:
        return int(sum(w.size + b.size for w, b in zip(self.weights, self.biases)))

    def forward(self, x: np.ndarray) -> np.ndarray:
        """Logits (classify) or predictions (regress), float32 [N, outputs]."""
        h = np.asarray(x, np.float32)
        for i, (w, b) in enumerate(zip(self.weights, self.biases)):
            h = h @ w + b
            if i < len(self.weights) - 1:
                h = np.maximum(h, 0)
        return h

    def predict(self, x: np.ndarray) -> np.ndarray:
        out = self.forward(x)
        return out.argmax(axis=1).astype(np.int64) if self.task == "classify" else out


def softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


@dataclasses.dataclass
class Standardizer:
    """Per-feature mean and scale from the training features; constant features keep scale 1."""

    mean: np.ndarray
    scale: np.ndarray

    @classmethod
    def fit(cls, x: np.ndarray) -> Standardizer:
        x64 = np.asarray(x, np.float64)
        mean = x64.mean(axis=0)
        scale = x64.std(axis=0)
        scale[scale < 1e-6 * max(1.0, float(np.abs(mean).max(initial=0)))] = 1.0
        return cls(mean, scale)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return ((np.asarray(x, np.float64) - self.mean) / self.scale).astype(np.float32)


def loss_and_grad(out: np.ndarray, targets: Targets, task: Task) -> tuple[float, np.ndarray]:
    """Mean loss over the batch and its gradient w.r.t. ``out`` (logits or predictions)."""
    n = len(out)
    if task == "regress":
        diff = out - targets.labels
        return float((diff**2).mean()), (2.0 / diff.size) * diff
    loss = 0.0
    grad = np.zeros_like(out)
    if targets.soft is not None:
        t = targets.temperature
        log_p = log_softmax(out / t)
        q = targets.soft
        # KL(q || p_T) * T², gradient T * (p_T - q) per row (Hinton et al. 2015, section 2).
        loss += float((q * (np.log(np.clip(q, 1e-12, None)) - log_p)).sum() / n) * t * t
        grad += t * (np.exp(log_p) - q) / n
    if targets.labels is not None:
        labelled = targets.labels >= 0
        count = int(labelled.sum())
        if count:
            weight = targets.labels_weight if targets.soft is not None else 1.0
            rows = np.flatnonzero(labelled)
            log_p = log_softmax(out[rows])
            loss += weight * float(-log_p[np.arange(count), targets.labels[rows]].mean())
            g = np.exp(log_p)
            g[np.arange(count), targets.labels[rows]] -= 1.0
            grad[rows] += weight * g / count
    return loss, grad


def metric(head_out: np.ndarray, targets: Targets, task: Task) -> float:
    """Accuracy on labels (classify), agreement with the teacher when there are none, or R²."""
    if task == "regress":
        y = targets.labels
        ss_res = float(((head_out - y) ** 2).sum())
        ss_tot = float(((y - y.mean(axis=0)) ** 2).sum())
        return 1.0 - ss_res / ss_tot if ss_tot > 0 else float("nan")
    predicted = head_out.argmax(axis=1)
    if targets.labels is not None and (targets.labels >= 0).any():
        rows = targets.labels >= 0
        return float((predicted[rows] == targets.labels[rows]).mean())
    return float((predicted == targets.soft.argmax(axis=1)).mean())


def _init(rng: np.random.Generator, sizes: list[int]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    weights, biases = [], []
    for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        last = i == len(sizes) - 2
        # He init before a ReLU, Glorot for the output layer.
        std = np.sqrt(2.0 / (fan_in + fan_out)) if last else np.sqrt(2.0 / fan_in)
        weights.append((rng.standard_normal((fan_in, fan_out)) * std).astype(np.float32))
        biases.append(np.zeros(fan_out, np.float32))
    return weights, biases


def _forward(weights, biases, x) -> tuple[np.ndarray, list[np.ndarray]]:
    activations = [x]
    h = x
    for i, (w, b) in enumerate(zip(weights, biases)):
        h = h @ w + b
        if i < len(weights) - 1:
            h = np.maximum(h, 0)
        activations.append(h)
    return h, activations


def _backward(weights, activations, grad_out):
    grads_w, grads_b = [None] * len(weights), [None] * len(weights)
    g = grad_out
    for i in reversed(range(len(weights))):
        grads_w[i] = activations[i].T @ g
        grads_b[i] = g.sum(axis=0)
        if i:
            g = (g @ weights[i].T) * (activations[i] > 0)
    return grads_w, grads_b


def output_size(targets: Targets, task: Task) -> int:
    if task == "regress":
        return int(targets.labels.shape[1])
    if targets.soft is not None:
        return int(targets.soft.shape[1])
    return int(targets.labels.max()) + 1


def train_head(
    x_train: np.ndarray,
    train: Targets,
    x_val: np.ndarray,
    val: Targets,
    options: HeadOptions | None = None,
    *,
    classes: int | None = None,
    progress: Callable[[dict[str, float]], None] | None = None,
) -> tuple[Head, list[dict[str, float]]]:
    """Train a head on features; returns the head (standardisation folded in) and the history.

    x_*: (samples, features) float32. History rows: epoch, train_loss, val_loss, val_metric.
    """
    options = options or HeadOptions()
    task = options.task
    if task == "regress":
        train = dataclasses.replace(train, labels=_as_2d(train.labels))
        val = dataclasses.replace(val, labels=_as_2d(val.labels))
        y_mean = train.labels.mean(axis=0)
        y_scale = train.labels.std(axis=0)
        y_scale[y_scale < 1e-12] = 1.0
        fit_train = dataclasses.replace(
            train, labels=((train.labels - y_mean) / y_scale).astype(np.float32)
        )
        fit_val = dataclasses.replace(
            val, labels=((val.labels - y_mean) / y_scale).astype(np.float32)
        )
    else:
        y_mean = y_scale = None
        fit_train, fit_val = train, val
    k = classes or output_size(train, task)
    scaler = Standardizer.fit(x_train)
    xs_train, xs_val = scaler(x_train), scaler(x_val)
    rng = np.random.default_rng(options.seed)
    sizes = [x_train.shape[1]] + ([options.hidden] if options.head == "mlp" else []) + [k]
    weights, biases = _init(rng, sizes)
    params = weights + biases
    m = [np.zeros_like(p) for p in params]
    v = [np.zeros_like(p) for p in params]
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    step = 0
    best = (np.inf, None, 0)
    history: list[dict[str, float]] = []
    n = len(xs_train)
    for epoch in range(1, options.epochs + 1):
        order = rng.permutation(n)
        total = 0.0
        for start in range(0, n, options.batch_size):
            index = order[start : start + options.batch_size]
            out, acts = _forward(weights, biases, xs_train[index])
            loss, grad = loss_and_grad(out, fit_train.subset(index), task)
            total += loss * len(index)
            gw, gb = _backward(weights, acts, grad)
            step += 1
            lr_t = options.lr * np.sqrt(1 - beta2**step) / (1 - beta1**step)
            for i, (p, g) in enumerate(zip(params, gw + gb)):
                m[i] = beta1 * m[i] + (1 - beta1) * g
                v[i] = beta2 * v[i] + (1 - beta2) * g * g
                p -= (lr_t * m[i] / (np.sqrt(v[i]) + eps)).astype(np.float32)
                if i < len(weights):  # decoupled weight decay on weights only
                    p -= np.float32(options.lr * options.weight_decay) * p
        val_out, _ = _forward(weights, biases, xs_val)
        val_loss, _ = loss_and_grad(val_out, fit_val, task)
        row = {
            "epoch": epoch,
            "train_loss": total / n,
            "val_loss": val_loss,
            "val_metric": metric(val_out, fit_val, task),
        }
        history.append(row)
        if progress:
            progress(row)
        if val_loss < best[0] - 1e-6:
            best = (val_loss, [p.copy() for p in params], epoch)
        elif epoch - best[2] >= options.patience:
            logger.info("early stop at epoch %d (best %d)", epoch, best[2])
            break
    params = best[1] if best[1] is not None else params
    weights, biases = params[: len(weights)], params[len(weights) :]
    head = fold(weights, biases, scaler, task, y_mean, y_scale)
    return head, history


def _as_2d(y: np.ndarray) -> np.ndarray:
    y = np.asarray(y, np.float32)
    return y[:, None] if y.ndim == 1 else y


def fold(weights, biases, scaler: Standardizer, task: Task, y_mean=None, y_scale=None) -> Head:
    """Fold x -> (x - mean) / scale into the first layer and y * scale + mean into the last."""
    weights = [np.asarray(w, np.float64) for w in weights]
    biases = [np.asarray(b, np.float64) for b in biases]
    w0 = weights[0] / scaler.scale[:, None]
    biases[0] = biases[0] - scaler.mean @ w0
    weights[0] = w0
    if y_scale is not None:
        weights[-1] = weights[-1] * y_scale[None, :]
        biases[-1] = biases[-1] * y_scale + y_mean
    return Head(
        [w.astype(np.float32) for w in weights], [b.astype(np.float32) for b in biases], task
    )
