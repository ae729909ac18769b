"""Feature transfer: a pretrained backbone, a head trained in numpy, one spliced ONNX file.

    from onnxcomp.transfer import fit, FitOptions
    result = fit(model, train_data, FitOptions(head="linear"))
    model_io.save(result.model, "new_task.onnx")

Without a cut (``at``), the best few candidates of ``find_cuts`` are each given a head trained on
a stratified validation split held out from the training data; the cut with the best
validation metric wins (ties: the smaller feature vector) and the report says which and why.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxcomp import model as model_io
from onnxcomp.data import DataSource
from onnxcomp.errors import OnnxcompError
from onnxcomp.transfer.cuts import Cut, Pooling, find_cuts, resolve_cut
from onnxcomp.transfer.features import compute_features, key, labels_of, model_hash
from onnxcomp.transfer.heads import Head, HeadOptions, Targets, train_head
from onnxcomp.transfer.splice import splice

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class FitOptions(HeadOptions):
    """Options of ``transfer fit`` (and the ``transfer_fit`` recipe step)."""

    at: str | None = None  # cut tensor; None = try the best `tries` candidates
    pooling: Pooling | None = None  # override the cut's default pooling
    tries: int = 3
    val_fraction: float = 0.2  # held out of the training data when no validation data is given
    batch: int = 32  # samples per onnxruntime run while computing features
    cache: bool = True
    refit: bool = True  # after choosing, retrain on train + held-out rows for the best epoch count

    def check(self, where: str = "transfer fit") -> None:
        super().check(where)
        if not 0 < self.val_fraction < 1:
            raise OnnxcompError(f"{where}: val_fraction must be between 0 and 1")
        if self.tries < 1:
            raise OnnxcompError(f"{where}: tries must be at least 1")


@dataclasses.dataclass
class FitResult:
    model: ir.Model
    head: Head
    cut: Cut
    report: dict[str, Any]


def split_indices(labels: np.ndarray | None, n: int, fraction: float, seed: int):
    """A seeded split of n rows into (train, val), stratified by class when labels are classes."""
    rng = np.random.default_rng(seed)
    if labels is None or labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        order = rng.permutation(n)
        cut = max(1, int(round(n * fraction)))
        return np.sort(order[cut:]), np.sort(order[:cut])
    val = []
    for cls in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == cls))
        take = int(round(len(rows) * fraction))
        if len(rows) >= 2:
            take = min(max(take, 1), len(rows) - 1)
        val.extend(rows[:take])
    val = np.sort(np.asarray(val, np.int64))
    train = np.setdiff1d(np.arange(n), val)
    return train, val


def check_labels(data: DataSource, labels: np.ndarray | None, task: str) -> np.ndarray:
    """The data's labels, checked against the task; OnnxcompError naming the file otherwise."""
    if labels is None:
        raise OnnxcompError(f"{data.name}: no 'labels' array; training a head needs labels")
    if len(labels) != data.num_samples:
        raise OnnxcompError(
            f"{data.name}: {len(labels)} labels for {data.num_samples} samples"
        )
    if task == "classify":
        if not np.issubdtype(labels.dtype, np.integer):
            if np.issubdtype(labels.dtype, np.floating) and np.all(labels == np.round(labels)):
                labels = labels.astype(np.int64)
            else:
                raise OnnxcompError(
                    f"{data.name}: labels are {labels.dtype}; --task classify needs integer "
                    "class ids (use --task regress for real-valued targets)"
                )
        if labels.ndim != 1:
            raise OnnxcompError(f"{data.name}: class labels must be one id per sample, got shape {list(labels.shape)}")
        if labels.min() < 0:
            raise OnnxcompError(f"{data.name}: class labels must be >= 0 (found {labels.min()})")
        return labels.astype(np.int64)
    return np.asarray(labels, np.float32)


def check_model_data(model: ir.Model, data: DataSource) -> None:
    data.check(model_io.input_specs(model))


def fit(
    model: ir.Model,
    data: DataSource,
    options: FitOptions | None = None,
    *,
    val_data: DataSource | None = None,
    threads: int = 1,
    progress: Callable[[str, dict[str, float]], None] | None = None,
) -> FitResult:
    """Train a new head on ``model``'s features and splice it on. ``model`` is changed in place."""
    options = options or FitOptions()
    start = time.perf_counter()
    model_io.normalize(model)
    check_model_data(model, data)
    y = check_labels(data, labels_of(data), options.task)
    if val_data is not None:
        check_model_data(model, val_data)
        y_val = check_labels(val_data, labels_of(val_data), options.task)
    if options.at:
        candidates = [resolve_cut(model, options.at, options.pooling)]
    else:
        candidates = find_cuts(model)
        if not candidates:
            raise OnnxcompError(
                "found no candidate feature tensor in the model; give one with --at"
            )
        candidates = candidates[: options.tries]
    mkey = model_hash(model) if options.cache else None
    features = compute_features(
        model, candidates, data, batch_size=options.batch, threads=threads,
        cache=options.cache, model_key=mkey,
    )
    if val_data is not None:
        val_features = compute_features(
            model, candidates, val_data, batch_size=options.batch, threads=threads,
            cache=options.cache, model_key=mkey,
        )
        train_rows = np.arange(len(y))
    else:
        train_rows, val_rows = split_indices(y, len(y), options.val_fraction, options.seed)
        if len(val_rows) == 0 or len(train_rows) == 0:
            raise OnnxcompError(f"{data.name}: too few samples ({len(y)}) to hold out a validation split")
    classes = int(max(y.max(), y_val.max() if val_data is not None else 0)) + 1 if options.task == "classify" else None
    tried = []
    best = None
    for cut in candidates:
        x = features[key(cut)]
        if val_data is not None:
            x_train, y_train, x_val, yv = x, y, val_features[key(cut)], y_val
        else:
            x_train, y_train, x_val, yv = x[train_rows], y[train_rows], x[val_rows], y[val_rows]
        cut.features = x.shape[1]
        report_progress = (lambda row, c=cut: progress(c.tensor, row)) if progress else None
        t0 = time.perf_counter()
        head, history = train_head(
            x_train, Targets(y_train), x_val, Targets(yv), options,
            classes=classes, progress=report_progress,
        )
        best_row = min(history, key=lambda r: r["val_loss"])
        entry = {
            "tensor": cut.tensor,
            "kind": cut.kind,
            "pooling": cut.pooling,
            "features": int(x.shape[1]),
            "val_metric": best_row["val_metric"],
            "val_loss": best_row["val_loss"],
            "epochs": len(history),
            "train_seconds": round(time.perf_counter() - t0, 3),
        }
        tried.append(entry)
        logger.info(
            "cut %s (%s, %d features): validation %s %.4f",
            cut.tensor, cut.pooling, x.shape[1], _metric_name(options.task), best_row["val_metric"],
        )
        score = (best_row["val_metric"], -best_row["val_loss"], -x.shape[1])
        if best is None or score > best[0]:
            best = (score, cut, head, history, x_train, y_train, x_val, yv)
    _, cut, head, history, x_train, y_train, x_val, yv = best
    val_metric = _score(head, x_val, yv, options.task)
    refit_epochs = None
    if options.refit and val_data is None:
        # The held-out rows chose the cut and the epoch count; now they train too.
        refit_epochs = min(history, key=lambda r: r["val_loss"])["epoch"]
        x_all = features[key(cut)]
        head, _ = train_head(
            x_all, Targets(y), x_val, Targets(yv),
            dataclasses.replace(options, epochs=refit_epochs, patience=refit_epochs + 1),
            classes=classes,
        )
        x_train, y_train = x_all, y
    if len(tried) > 1:
        ranked = sorted(tried, key=lambda e: (-e["val_metric"], e["val_loss"]))
        runner = ranked[1]
        why = (
            f"best validation {_metric_name(options.task)} of {len(tried)} cuts "
            f"({ranked[0]['val_metric']:.4f} vs {runner['val_metric']:.4f} at {runner['tensor']})"
        )
    else:
        why = "given with --at" if options.at else "the only candidate"
    splice(model, cut, head)
    report = {
        "cut": cut.to_json(),
        "why": why,
        "tried": tried,
        "head": {"kind": options.head, "layers": len(head.weights), "parameters": head.parameters,
                 "outputs": head.outputs},
        "task": options.task,
        "classes": classes,
        "train_samples": int(len(x_train)),
        "val_samples": int(len(x_val)),
        "val_source": val_data.name if val_data is not None else f"{options.val_fraction:.0%} of {data.name}",
        "train_metric": _score(head, x_train, y_train, options.task),
        "val_metric": val_metric,
        "refit_epochs": refit_epochs,
        "metric": _metric_name(options.task),
        "history": history,
        "seconds": round(time.perf_counter() - start, 3),
    }
    return FitResult(model, head, cut, report)


def _metric_name(task: str) -> str:
    return "accuracy" if task == "classify" else "r2"


def _score(head: Head, x: np.ndarray, y: np.ndarray, task: str) -> float:
    from onnxcomp.transfer.heads import metric

    return metric(head.forward(x), Targets(y if task == "classify" else y.reshape(len(y), -1)), task)
