"""Compare a candidate model with its reference by running both in onnxruntime.

Metrics are folded batch by batch (running sums), so any number of samples fits in memory:
per output max/mean absolute error, cosine similarity (mean and min over samples), SNR in dB,
top-1 agreement for classifier-like outputs, and accuracy of each model where data has labels.
Token outputs ([batch, seq, ...]) of models fed an ``attention_mask`` are compared on the real
tokens only, one row per token.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal

import numpy as np

from onnxcomp import runtime
from onnxcomp.data import DataSource, check_labels_fit
from onnxcomp.errors import OnnxcompError


@dataclasses.dataclass
class OutputStats:
    """Running error statistics for one output."""

    name: str
    samples: int = 0
    max_abs: float = 0.0
    sum_abs: float = 0.0
    count: int = 0
    max_rel: float = 0.0  # max |a-b| / (max |a| over the output), a scale-free error
    signal: float = 0.0
    noise: float = 0.0
    cos_sum: float = 0.0
    cos_min: float = 1.0
    top1_same: int = 0
    top1_total: int = 0
    exact: bool = True
    ref_scale: float = 0.0

    def update(self, ref: np.ndarray, cand: np.ndarray) -> None:
        if ref.shape != cand.shape:
            raise OnnxcompError(
                f"output {self.name!r}: shapes differ (reference {list(ref.shape)}, "
                f"candidate {list(cand.shape)})"
            )
        if not np.issubdtype(ref.dtype, np.number) and ref.dtype != np.bool_:
            same = np.array_equal(ref, cand)
            self.exact &= bool(same)
            self.samples += len(ref) if ref.ndim else 1
            return
        a = ref.astype(np.float64)
        b = cand.astype(np.float64)
        diff = np.abs(a - b)
        if diff.size:
            self.max_abs = max(self.max_abs, float(np.nanmax(diff)))
            self.ref_scale = max(self.ref_scale, float(np.nanmax(np.abs(a))))
        self.sum_abs += float(np.nansum(diff))
        self.count += diff.size
        self.signal += float(np.sum(a * a))
        self.noise += float(np.sum((a - b) ** 2))
        self.exact &= bool(np.array_equal(ref, cand))
        rows_a = a.reshape(len(a), -1) if a.ndim >= 1 and len(a) else a.reshape(1, -1)
        rows_b = b.reshape(rows_a.shape)
        norms = np.linalg.norm(rows_a, axis=1) * np.linalg.norm(rows_b, axis=1)
        dots = np.sum(rows_a * rows_b, axis=1)
        cos = np.where(
            norms > 0, dots / np.where(norms > 0, norms, 1), np.where(dots == 0, 1.0, 0.0)
        )
        # Two all-zero rows are identical: cosine 1.
        both_zero = (np.linalg.norm(rows_a, axis=1) == 0) & (np.linalg.norm(rows_b, axis=1) == 0)
        cos = np.where(both_zero, 1.0, cos)
        self.cos_sum += float(np.sum(cos))
        if len(cos):
            self.cos_min = min(self.cos_min, float(np.min(cos)))
        self.samples += len(rows_a)
        if is_classifier_output(ref):
            self.top1_same += int(np.sum(ref.argmax(-1) == cand.argmax(-1)))
            self.top1_total += int(np.prod(ref.shape[:-1]))

    def to_json(self) -> dict[str, Any]:
        if self.count == 0:
            return {"output": self.name, "samples": self.samples, "identical": self.exact}
        snr = (
            math.inf if self.noise == 0 else 10 * math.log10(max(self.signal, 1e-300) / self.noise)
        )
        result = {
            "output": self.name,
            "samples": self.samples,
            "max_abs_error": self.max_abs,
            "mean_abs_error": self.sum_abs / self.count,
            "max_rel_error": self.max_abs / self.ref_scale if self.ref_scale else self.max_abs,
            "cosine_mean": self.cos_sum / self.samples if self.samples else 1.0,
            "cosine_min": self.cos_min,
            "snr_db": snr,
            "identical": self.exact,
        }
        if self.top1_total:
            result["top1_agreement"] = self.top1_same / self.top1_total
        return result


Metric = Literal["auto", "accuracy", "top1", "cosine"]
DROP_NAMES = {"accuracy": "accuracy drop", "top1": "1 - top-1 agreement", "cosine": "1 - cosine"}

# Output names that hold embeddings or features, not class scores: their argmax means nothing.
_FEATURE_WORDS = ("embed", "hidden", "feature", "pool", "encod", "vector", "state")


def _names_features(name: str) -> bool:
    return any(word in name.lower() for word in _FEATURE_WORDS)


def is_classifier_output(array: np.ndarray) -> bool:
    """Scores over classes: float, rank 2, more than one class."""
    return array.ndim == 2 and array.shape[-1] > 1 and np.issubdtype(array.dtype, np.floating)


@dataclasses.dataclass
class Comparison:
    """The outcome of running a reference and a candidate on the same data."""

    outputs: list[OutputStats]
    samples: int
    accuracy_reference: float | None = None
    accuracy_candidate: float | None = None

    @property
    def accuracy_drop(self) -> float | None:
        if self.accuracy_reference is None or self.accuracy_candidate is None:
            return None
        return self.accuracy_reference - self.accuracy_candidate

    def metric(self, metric: Metric = "auto") -> Metric:
        """What ``auto`` stands for on this data: accuracy where the data has labels, top-1
        agreement where an output holds class scores, else cosine."""
        if metric != "auto":
            return metric
        if self.accuracy_drop is not None:
            return "accuracy"
        if any(s.top1_total and not _names_features(s.name) for s in self.outputs):
            return "top1"
        return "cosine"

    def drop(self, metric: Metric = "auto") -> float:
        """The figure ``--max-drop`` is held against: the accuracy drop, 1 - top-1 agreement of
        the first class-score output, or 1 - the lowest mean cosine over the outputs."""
        metric = self.metric(metric)
        if metric == "accuracy":
            if self.accuracy_drop is None:
                raise OnnxcompError("metric accuracy: the data has no labels")
            return self.accuracy_drop
        if metric == "top1":
            for stats in self.outputs:
                if stats.top1_total and not _names_features(stats.name):
                    return 1.0 - stats.top1_same / stats.top1_total
            raise OnnxcompError("metric top1: no output holds class scores ([batch, classes])")
        cosines = [s.cos_sum / s.samples for s in self.outputs if s.count and s.samples]
        return 1.0 - min(cosines) if cosines else 0.0

    def drop_metric(self, metric: Metric = "auto") -> str:
        return DROP_NAMES[self.metric(metric)]

    def to_json(self) -> dict[str, Any]:
        result: dict[str, Any] = {
            "samples": self.samples,
            "outputs": [s.to_json() for s in self.outputs],
            "drop": self.drop(),
            "drop_metric": self.drop_metric(),
        }
        if self.accuracy_reference is not None:
            result["accuracy_reference"] = self.accuracy_reference
            result["accuracy_candidate"] = self.accuracy_candidate
        return result


def compare(
    reference: runtime.ModelLike,
    candidate: runtime.ModelLike,
    data: DataSource,
    *,
    batch_size: int = 32,
    limit: int | None = None,
    threads: int = 1,
    labels_output: str | None = None,
) -> Comparison:
    """Run both models on ``data`` and fold the differences of every output."""
    ref_session = runtime.create_session(reference, threads=threads, label="reference")
    cand_session = runtime.create_session(candidate, threads=threads, label="candidate")
    ref_outputs = [o.name for o in ref_session.get_outputs()]
    cand_outputs = [o.name for o in cand_session.get_outputs()]
    if ref_outputs != cand_outputs:
        missing = [n for n in ref_outputs if n not in cand_outputs]
        if missing:
            raise OnnxcompError(
                f"candidate lacks output {missing[0]!r} of the reference "
                f"(candidate outputs: {', '.join(cand_outputs)})"
            )
    stats = {name: OutputStats(name) for name in ref_outputs}
    correct_ref = correct_cand = labelled = 0
    samples = 0
    fixed = runtime.fixed_batch(ref_session)
    if fixed is not None:
        batch_size = fixed
    for batch in data.batches(batch_size, limit=limit):
        if fixed is not None and len(batch) != fixed:
            continue
        ref = runtime.run(ref_session, batch.inputs, ref_outputs, "reference")
        cand = runtime.run(cand_session, batch.inputs, ref_outputs, "candidate")
        for name in ref_outputs:
            a, b = _real_tokens(ref[name], cand[name], batch.inputs)
            stats[name].update(a, b)
        samples += len(batch)
        if batch.labels is not None:
            name = labels_output or _label_output(ref, ref_outputs)
            if name is not None:
                labels = np.asarray(batch.labels).reshape(-1)
                if ref[name].ndim == 2:
                    check_labels_fit(labels, ref[name].shape[-1], f"{data.name}: labels")
                correct_ref += int(np.sum(_predict(ref[name]) == labels))
                correct_cand += int(np.sum(_predict(cand[name]) == labels))
                labelled += len(labels)
    if samples == 0:
        raise OnnxcompError(f"{data.name}: no samples to compare on")
    comparison = Comparison(list(stats.values()), samples)
    if labelled:
        comparison.accuracy_reference = correct_ref / labelled
        comparison.accuracy_candidate = correct_cand / labelled
    return comparison


def _real_tokens(
    ref: np.ndarray, cand: np.ndarray, inputs: dict[str, np.ndarray]
) -> tuple[np.ndarray, np.ndarray]:
    """For a [batch, seq, ...] output of a model fed an ``attention_mask`` [batch, seq], keep the
    real tokens only, one row each: what the model computes at padding positions is never used,
    and its error there would swamp the comparison."""
    mask = next(
        (a for name, a in inputs.items() if "attention_mask" in name.lower() and np.ndim(a) == 2),
        None,
    )
    if mask is None or ref.ndim < 3 or ref.shape[:2] != mask.shape or mask.all():
        return ref, cand
    keep = mask.astype(bool)
    return ref[keep], cand[keep]


def _label_output(outputs: dict[str, np.ndarray], names: list[str]) -> str | None:
    """The output that predicts labels: the first classifier-like output, else an int vector."""
    for name in names:
        if is_classifier_output(outputs[name]) and not _names_features(name):
            return name
    for name in names:
        array = outputs[name]
        if array.ndim == 1 and np.issubdtype(array.dtype, np.integer):
            return name
    return None


def _predict(array: np.ndarray) -> np.ndarray:
    if array.ndim == 1:
        return array.astype(np.int64)
    return array.argmax(-1)
