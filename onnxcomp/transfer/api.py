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
from onnxcomp.transfer.cuts import (
    Cut,
    Pooling,
    find_cuts,
    fix_input_shapes,
    resolve_cut,
    restore_input_shapes,
)
from onnxcomp.transfer.features import compute_features, key, labels_of, model_hash
from onnxcomp.transfer.heads import Head, HeadOptions, Targets, metric, train_head
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
        raise OnnxcompError(f"{data.name}: {len(labels)} labels for {data.num_samples} samples")
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
            raise OnnxcompError(
                f"{data.name}: class labels must be one id per sample, got shape {list(labels.shape)}"
            )
        if labels.min() < 0:
            raise OnnxcompError(f"{data.name}: class labels must be >= 0 (found {labels.min()})")
        return labels.astype(np.int64)
    labels = np.asarray(labels, np.float32)
    return labels.reshape(len(labels), -1)


def check_model_data(model: ir.Model, data: DataSource) -> None:
    data.check(model_io.input_specs(model))


def choose_cuts(model: ir.Model, at: str | None, pooling: Pooling | None, tries: int) -> list[Cut]:
    """The cut the user named, or the best ``tries`` candidates."""
    if at:
        return [resolve_cut(model, at, pooling)]
    candidates = find_cuts(model)
    if not candidates:
        raise OnnxcompError("found no candidate feature tensor in the model; give one with --at")
    return candidates[:tries]


@dataclasses.dataclass
class Choice:
    """The cut that won, its head, and what was tried."""

    cut: Cut
    head: Head
    history: list[dict[str, float]]
    x_train: np.ndarray
    train: Targets
    x_val: np.ndarray
    val: Targets
    val_metric: float
    tried: list[dict[str, Any]]
    why: str
    refit_epochs: int | None = None
    val_output: np.ndarray | None = (
        None  # the chosen head's outputs on validation, before any refit
    )


def train_on_cuts(
    candidates: list[Cut],
    features: dict[str, np.ndarray],
    targets: Targets,
    options: HeadOptions,
    *,
    val_features: dict[str, np.ndarray] | None = None,
    val_targets: Targets | None = None,
    val_rows: np.ndarray | None = None,
    classes: int | None = None,
    refit: bool = True,
    given: bool = False,
    progress: Callable[[str, dict[str, float]], None] | None = None,
) -> Choice:
    """Train one head per candidate cut, keep the best on validation.

    Validation is ``val_features``/``val_targets`` when given, else the rows ``val_rows`` held
    out of the training features. With ``refit``, held-out rows then train the winner too, for
    the epoch count that validation chose.
    """
    n = len(next(iter(features.values())))
    train_rows = np.setdiff1d(np.arange(n), val_rows) if val_features is None else np.arange(n)
    tried, best = [], None
    for cut in candidates:
        x = features[key(cut)]
        if val_features is not None:
            x_train, t_train, x_val, t_val = x, targets, val_features[key(cut)], val_targets
        else:
            x_train, t_train = x[train_rows], targets.subset(train_rows)
            x_val, t_val = x[val_rows], targets.subset(val_rows)
        cut.features = int(x.shape[1])
        report_progress = (lambda row, c=cut: progress(c.tensor, row)) if progress else None
        t0 = time.perf_counter()
        head, history = train_head(
            x_train, t_train, x_val, t_val, options, classes=classes, progress=report_progress
        )
        best_row = min(history, key=lambda r: r["val_loss"])
        tried.append(
            {
                "tensor": cut.tensor,
                "kind": cut.kind,
                "pooling": cut.pooling,
                "features": int(x.shape[1]),
                "val_metric": best_row["val_metric"],
                "val_loss": best_row["val_loss"],
                "epochs": len(history),
                "train_seconds": round(time.perf_counter() - t0, 3),
            }
        )
        logger.info(
            "cut %s (%s, %d features): validation %s %.4f",
            cut.tensor,
            cut.pooling,
            x.shape[1],
            metric_name(options.task),
            best_row["val_metric"],
        )
        score = (best_row["val_metric"], -best_row["val_loss"], -x.shape[1])
        if best is None or score > best[0]:
            best = (
                score,
                Choice(cut, head, history, x_train, t_train, x_val, t_val, 0.0, tried, ""),
            )
    choice = best[1]
    choice.val_output = choice.head.forward(choice.x_val)
    choice.val_metric = metric(choice.val_output, choice.val, options.task)
    if len(tried) > 1:
        ranked = sorted(tried, key=lambda e: (-e["val_metric"], e["val_loss"]))
        runner = ranked[1]
        choice.why = (
            f"best validation {metric_name(options.task)} of {len(tried)} cuts "
            f"({ranked[0]['val_metric']:.4f}, next {runner['val_metric']:.4f} at {runner['tensor']})"
        )
    else:
        choice.why = "given with --at" if given else "the only candidate"
    if refit and val_features is None:
        # The held-out rows chose the cut and the epoch count; now they train too.
        epochs = min(choice.history, key=lambda r: r["val_loss"])["epoch"]
        x_all = features[key(choice.cut)]
        choice.head, _ = train_head(
            x_all,
            targets,
            choice.x_val,
            choice.val,
            dataclasses.replace(options, epochs=epochs, patience=epochs + 1),
            classes=classes,
        )
        choice.x_train, choice.train, choice.refit_epochs = x_all, targets, epochs
    return choice


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
    y_val = None
    if val_data is not None:
        check_model_data(model, val_data)
        y_val = check_labels(val_data, labels_of(val_data), options.task)
    fixed = fix_input_shapes(model, {k: shape for k, (_, shape) in data.sample_signature().items()})
    if fixed:
        model_io.normalize(model)
    candidates = choose_cuts(model, options.at, options.pooling, options.tries)
    mkey = model_hash(model) if options.cache else None

    def features_of(source: DataSource) -> dict[str, np.ndarray]:
        return compute_features(
            model,
            candidates,
            source,
            batch_size=options.batch,
            threads=threads,
            cache=options.cache,
            model_key=mkey,
        )

    val_rows = None
    if val_data is None:
        _, val_rows = split_indices(y, len(y), options.val_fraction, options.seed)
        if len(val_rows) == 0 or len(val_rows) == len(y):
            raise OnnxcompError(
                f"{data.name}: too few samples ({len(y)}) to hold out a validation split"
            )
    classes = None
    if options.task == "classify":
        classes = int(max(y.max(), y_val.max() if y_val is not None else 0)) + 1
    choice = train_on_cuts(
        candidates,
        features_of(data),
        Targets(y),
        options,
        val_features=features_of(val_data) if val_data is not None else None,
        val_targets=Targets(y_val) if y_val is not None else None,
        val_rows=val_rows,
        classes=classes,
        refit=options.refit,
        given=bool(options.at),
        progress=progress,
    )
    splice(model, choice.cut, choice.head)
    restore_input_shapes(fixed)
    head = choice.head
    report = {
        "cut": choice.cut.to_json(),
        "why": choice.why,
        "tried": choice.tried,
        "head": {
            "kind": options.head,
            "layers": len(head.weights),
            "parameters": head.parameters,
            "outputs": head.outputs,
        },
        "task": options.task,
        "classes": classes,
        "train_samples": int(len(choice.x_train)),
        "val_samples": int(len(choice.x_val)),
        "val_source": val_data.name
        if val_data is not None
        else f"{options.val_fraction:.0%} of {data.name}",
        "train_metric": metric(head.forward(choice.x_train), choice.train, options.task),
        "val_metric": choice.val_metric,
        "refit_epochs": choice.refit_epochs,
        "metric": metric_name(options.task),
        "history": choice.history,
        "seconds": round(time.perf_counter() - start, 3),
    }
    return FitResult(model, head, choice.cut, report)


def metric_name(task: str) -> str:
    return "accuracy" if task == "classify" else "r2"
