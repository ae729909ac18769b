"""Evaluate one model, compare two, and the one verdict every budget is judged by.

- :func:`evaluate` scores ONE model on data: accuracy against the data's labels, or a user metric.
- :func:`compare` runs a reference and a candidate on the same data and folds, batch by batch
  (running sums, so any number of samples fits in memory), per output: max/mean absolute error,
  cosine (mean and min over samples), SNR in dB, top-1 agreement for class scores ([batch,
  classes]) and per position for scores over classes at every position ([batch, time, classes]:
  CTC, token classification), decision agreement at 0.5 for one probability per sample ([batch,
  1] in [0, 1]: a voice-activity or binary classifier), accuracy of each model where the data has labels, and a user
  metric when one is given. Outputs that only echo an input may be missing from the candidate.
- :class:`Verdict`: the metric held against a budget (``--max-drop``), its value and drop,
  passed or not and why: the CLI's ``validate``, recipes, the quantize self-check and auto's
  choice all build it with :meth:`Comparison.verdict`.
- :func:`box_agreement`: a detector's boxes against the reference's (YOLOv8-style outputs
  ``[batch, 4 + classes, anchors]``): mean IoU of every box to its best match of the same class
  in the other model's boxes, both ways (0 for a box the other model lost or added).
- :class:`ReferenceOutputs`: the reference model's outputs per batch (teacher outputs for
  distillation), kept in memory up to a budget so several candidates are judged against one
  run of the reference.

Token outputs ([batch, seq, ...]) of models fed an ``attention_mask`` are compared on the real
tokens only, one row per token.

A user metric is ``module:function`` or ``path/to/file.py:function``, called once per batch::

    def exact_lines(outputs: dict[str, np.ndarray], target) -> np.ndarray | float | tuple:
        ...

``outputs`` holds the model's outputs for the batch by name; ``target`` is the batch's labels
when the data has a ``labels`` array, else the reference model's outputs for the batch (a dict
like ``outputs``). It returns per-sample scores (a 1-D array: the mean over all samples is the
score), a ``(sum, count)`` pair, or one number (the batch's mean, weighted by its size). Higher
is better; the drop is the reference's score minus the candidate's.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import math
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np

from onnxcomp import runtime
from onnxcomp.data import Batch, DataSource, class_labels
from onnxcomp.errors import OnnxcompError

Metric = Literal["auto", "accuracy", "top1", "cosine"]
BUILTIN_METRICS = ("auto", "accuracy", "top1", "cosine")
DROP_NAMES = {"accuracy": "accuracy drop", "top1": "1 - top-1 agreement", "cosine": "1 - cosine"}

DEFAULT_MAX_DROP = 0.01  # without --max-drop: 1 point of accuracy, top-1 agreement or a user score
DEFAULT_COSINE_DROP = 0.005  # ... or a mean cosine of 0.995 to fp32 (embeddings, features)

# Output names that hold embeddings or features, not class scores: their argmax means nothing.
_FEATURE_WORDS = ("embed", "hidden", "feature", "pool", "encod", "vector", "state")
# Output names that say "scores over classes" at every position of a sequence.
_SCORE_WORDS = ("logit", "prob", "softmax", "score")


def _names_features(name: str) -> bool:
    return any(word in name.lower() for word in _FEATURE_WORDS)


def is_classifier_output(array: np.ndarray) -> bool:
    """Scores over classes: float, rank 2, more than one class."""
    return array.ndim == 2 and array.shape[-1] > 1 and np.issubdtype(array.dtype, np.floating)


def is_sequence_scores(array: np.ndarray, name: str = "") -> bool:
    """Scores over classes at every position, [batch, time, classes] (CTC, token classification):
    float, rank 3, not named like features, and either named like scores (logits, probabilities,
    softmax) or holding probabilities (each position sums to 1). A detector's per-anchor sigmoid
    scores or box distributions are neither, and stay judged by cosine."""
    if array.ndim != 3 or array.shape[-1] < 2 or not np.issubdtype(array.dtype, np.floating):
        return False
    if _names_features(name):
        return False
    if any(word in name.lower() for word in _SCORE_WORDS):
        return True
    if array.size == 0 or np.nanmin(array) < 0:
        return False
    sums = np.sum(array, axis=-1, dtype=np.float64)
    return bool(np.all(np.abs(sums - 1.0) < 1e-3))


def is_probability_column(array: np.ndarray, name: str = "") -> bool:
    """One probability per sample, [batch, 1] in [0, 1] (a sigmoid: speech or not, a binary
    class), not named like features: judged by the decision at 0.5, as top-1 agreement."""
    if array.ndim != 2 or array.shape[-1] != 1 or not np.issubdtype(array.dtype, np.floating):
        return False
    if _names_features(name) or array.size == 0:
        return False
    return bool(np.nanmin(array) >= 0 and np.nanmax(array) <= 1)


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
    per_position: bool | None = None  # decided on the first batch: [batch, time, classes] scores
    binary: bool | None = None  # decided on the first batch: one probability per sample [batch, 1]

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
        if self.per_position is None and ref.ndim == 3:
            self.per_position = is_sequence_scores(ref, self.name)
        if self.binary is None and ref.ndim == 2:
            self.binary = is_probability_column(ref, self.name)
        if is_classifier_output(ref) or (ref.ndim == 3 and self.per_position):
            # rank 3: one vote per position (time step, token), as a CTC decoder reads it
            self.top1_same += int(np.sum(ref.argmax(-1) == cand.argmax(-1)))
            self.top1_total += int(np.prod(ref.shape[:-1]))
        elif self.binary:
            # one probability per sample: its cosine is only its sign; the decision at 0.5 counts
            self.top1_same += int(np.sum((ref > 0.5) == (cand > 0.5)))
            self.top1_total += ref.size

    @property
    def top1_agreement(self) -> float | None:
        return self.top1_same / self.top1_total if self.top1_total else None

    @property
    def cosine_mean(self) -> float | None:
        return self.cos_sum / self.samples if self.count and self.samples else None

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
            "cosine_mean": self.cosine_mean if self.samples else 1.0,
            "cosine_min": self.cos_min,
            "snr_db": snr,
            "identical": self.exact,
        }
        if self.top1_total:
            result["top1_agreement"] = self.top1_agreement
            if self.per_position:
                result["top1_per_position"] = True
        return result


def weakest_output(outputs: list[dict[str, Any]]) -> dict[str, Any]:
    """Of `OutputStats.to_json` rows, the one with the lowest mean cosine (the one a one-line
    summary should show: a model's first output may be an integer pass-through); {} if none."""
    rows = [o for o in outputs if o.get("cosine_mean") is not None]
    return min(rows, key=lambda o: o["cosine_mean"]) if rows else {}


# ---------------------------------------------------------------------------------------------
# User metrics


@dataclasses.dataclass
class UserMetric:
    """A user's metric function (see the module docstring for its signature)."""

    spec: str  # how the user named it: "module:function" or "path/file.py:function"
    function: Callable[..., Any]

    @property
    def name(self) -> str:
        return getattr(self.function, "__name__", self.spec)

    def score(self, outputs: dict[str, np.ndarray], target: Any, samples: int) -> tuple[float, int]:
        """(sum of scores, samples scored) for one batch."""
        try:
            value = self.function(outputs, target)
        except Exception as err:
            raise OnnxcompError(
                f"--metric {self.spec}: the function raised {type(err).__name__}: {err}"
            ) from None
        if isinstance(value, tuple) and len(value) == 2:
            total, count = value
            return float(total), int(count)
        array = np.asarray(value, dtype=np.float64)
        if array.ndim == 0:
            return float(array) * samples, samples
        if array.ndim == 1:
            return float(np.sum(array)), len(array)
        raise OnnxcompError(
            f"--metric {self.spec}: expected per-sample scores, a (sum, count) pair or a number, "
            f"got an array of shape {list(array.shape)}"
        )


def is_user_metric(spec: Any) -> bool:
    return isinstance(spec, UserMetric) or (isinstance(spec, str) and ":" in spec)


def check_metric(spec: Any, where: str = "--metric") -> None:
    """Raise OnnxcompError when ``spec`` is neither a built-in metric nor ``module:function``."""
    if isinstance(spec, UserMetric) or callable(spec):
        return
    if not isinstance(spec, str) or (spec not in BUILTIN_METRICS and ":" not in spec):
        raise OnnxcompError(
            f"{where} {spec!r}: expected one of {', '.join(BUILTIN_METRICS)}, or your own "
            "function as module:function or path/to/file.py:function"
        )


def load_metric(spec: Any, base_dir: str | Path | None = None) -> str | UserMetric:
    """A built-in metric name as is, or the user function ``module:function`` /
    ``path/to/file.py:function`` (a relative file is read from ``base_dir``, default the
    working folder) loaded as a :class:`UserMetric`."""
    if isinstance(spec, UserMetric):
        return spec
    if callable(spec):
        return UserMetric(getattr(spec, "__name__", "metric"), spec)
    check_metric(spec)
    if spec in BUILTIN_METRICS:
        return spec
    where, _, attr = spec.rpartition(":")
    if not where or not attr:
        raise OnnxcompError(f"--metric {spec!r}: expected module:function or file.py:function")
    if where.endswith(".py") or "/" in where or "\\" in where:
        path = Path(where)
        if not path.is_absolute() and base_dir is not None:
            path = Path(base_dir) / path
        if not path.is_file():
            raise OnnxcompError(f"--metric {spec}: no such file {str(path)!r}")
        name = f"onnxcomp_user_metric_{abs(hash(str(path.resolve())))}"
        module_spec = importlib.util.spec_from_file_location(name, path)
        if module_spec is None or module_spec.loader is None:
            raise OnnxcompError(f"--metric {spec}: cannot import {str(path)!r}")
        module = importlib.util.module_from_spec(module_spec)
        try:
            module_spec.loader.exec_module(module)
        except Exception as err:
            raise OnnxcompError(
                f"--metric {spec}: importing {str(path)!r} raised {type(err).__name__}: {err}"
            ) from None
        sys.modules.setdefault(name, module)
    else:
        try:
            module = importlib.import_module(where)
        except Exception as err:
            raise OnnxcompError(
                f"--metric {spec}: cannot import module {where!r} ({type(err).__name__}: {err})"
            ) from None
    function = getattr(module, attr, None)
    if not callable(function):
        raise OnnxcompError(f"--metric {spec}: {where!r} has no function {attr!r}")
    return UserMetric(spec, function)


# ---------------------------------------------------------------------------------------------
# The verdict


def default_budget(metric_name: str) -> float:
    """The drop accepted without --max-drop: 0.005 of cosine, else 0.01 (accuracy, top-1
    agreement, a user score)."""
    return DEFAULT_COSINE_DROP if metric_name == DROP_NAMES["cosine"] else DEFAULT_MAX_DROP


@dataclasses.dataclass
class Verdict:
    """A candidate judged against a budget: what was measured, how much it dropped, and why it
    passed or failed. With no budget (``budget`` None) it passes."""

    metric: str  # what the drop measures: "accuracy drop", "1 - top-1 agreement", ...
    drop: float
    budget: float | None
    passed: bool
    reason: str
    value: float | None = None  # the candidate's score (accuracy, agreement, cosine, user score)
    reference_value: float | None = None
    samples: int = 0
    data: str | None = None

    @classmethod
    def judge(
        cls,
        metric: str,
        drop: float,
        budget: float | None,
        *,
        value: float | None = None,
        reference_value: float | None = None,
        samples: int = 0,
        data: str | None = None,
    ) -> Verdict:
        where = f" on {samples} samples of {data}" if data else ""
        if budget is None:
            passed, reason = True, f"{metric} {drop:.4f}{where} (no budget)"
        elif not math.isfinite(drop):
            passed, reason = False, f"{metric} is {drop}{where}: not a number (> {budget})"
        elif drop <= budget:
            passed, reason = True, f"{metric} {drop:.4f} within {budget:g}{where}"
        else:
            passed, reason = False, f"{metric} {drop:.4f} exceeds {budget:g}{where}"
        return cls(metric, drop, budget, passed, reason, value, reference_value, samples, data)

    def to_json(self) -> dict[str, Any]:
        return {
            "metric": self.metric,
            "drop": self.drop,
            "max_drop": self.budget,
            "passed": self.passed,
            "reason": self.reason,
            "value": self.value,
            "reference_value": self.reference_value,
        }


# ---------------------------------------------------------------------------------------------
# Comparing two models


@dataclasses.dataclass
class Comparison:
    """The outcome of running a reference and a candidate on the same data."""

    outputs: list[OutputStats]
    samples: int
    accuracy_reference: float | None = None
    accuracy_candidate: float | None = None
    user_metric: UserMetric | None = None
    user_reference: float | None = None
    user_candidate: float | None = None
    skipped_outputs: dict[str, str] = dataclasses.field(default_factory=dict)
    data: str | None = None

    @property
    def accuracy_drop(self) -> float | None:
        if self.accuracy_reference is None or self.accuracy_candidate is None:
            return None
        return self.accuracy_reference - self.accuracy_candidate

    def metric(self, metric: Any = None) -> str:
        """What the drop is measured by: ``user`` for a user metric; for ``auto`` accuracy
        where the data has labels, top-1 agreement where an output holds class scores (per
        position for [batch, time, classes]), else cosine."""
        if metric is None:
            metric = self.user_metric or "auto"
        if is_user_metric(metric):
            if self.user_candidate is None:
                raise OnnxcompError(f"metric {metric}: not measured in this comparison")
            return "user"
        if metric != "auto":
            return metric
        if self.accuracy_drop is not None:
            return "accuracy"
        if self._class_scores() is not None:
            return "top1"
        return "cosine"

    def _class_scores(self) -> OutputStats | None:
        return next((s for s in self.outputs if s.top1_total and not _names_features(s.name)), None)

    def drop(self, metric: Any = None) -> float:
        """The figure ``--max-drop`` is held against: the user metric's drop, the accuracy
        drop, 1 - top-1 agreement of the first class-score output, or 1 - the lowest mean
        cosine over the outputs."""
        return self._measure(metric)[0]

    def drop_metric(self, metric: Any = None) -> str:
        resolved = self.metric(metric)
        if resolved == "user":
            return f"{self.user_metric.name} drop"
        return DROP_NAMES[resolved]

    def _measure(self, metric: Any) -> tuple[float, float | None, float | None]:
        """(drop, candidate value, reference value) by ``metric``."""
        resolved = self.metric(metric)
        if resolved == "user":
            return (
                self.user_reference - self.user_candidate,
                self.user_candidate,
                self.user_reference,
            )
        if resolved == "accuracy":
            if self.accuracy_drop is None:
                raise OnnxcompError("metric accuracy: the data has no labels")
            return self.accuracy_drop, self.accuracy_candidate, self.accuracy_reference
        if resolved == "top1":
            stats = self._class_scores()
            if stats is None:
                raise OnnxcompError(
                    "metric top1: no output holds class scores ([batch, classes] or "
                    "[batch, time, classes])"
                )
            return 1.0 - stats.top1_agreement, stats.top1_agreement, 1.0
        cosines = [s.cosine_mean for s in self.outputs if s.cosine_mean is not None]
        lowest = min(cosines) if cosines else 1.0
        return 1.0 - lowest, lowest, 1.0

    def verdict(
        self, metric: Any = None, max_drop: float | None = None, *, default: bool = False
    ) -> Verdict:
        """Judge the candidate: its drop by ``metric`` against ``max_drop`` (with ``default``,
        a missing budget is the metric's default: 0.01, or 0.005 of cosine)."""
        drop, value, reference = self._measure(metric)
        name = self.drop_metric(metric)
        if max_drop is None and default:
            max_drop = default_budget(name)
        return Verdict.judge(
            name,
            drop,
            max_drop,
            value=value,
            reference_value=reference,
            samples=self.samples,
            data=self.data,
        )

    def to_json(self, metric: Any = None) -> dict[str, Any]:
        result: dict[str, Any] = {
            "samples": self.samples,
            "outputs": [s.to_json() for s in self.outputs],
            "drop": self.drop(metric),
            "drop_metric": self.drop_metric(metric),
        }
        if self.accuracy_reference is not None:
            result["accuracy_reference"] = self.accuracy_reference
            result["accuracy_candidate"] = self.accuracy_candidate
        if self.user_metric is not None:
            result["user_metric"] = {
                "metric": self.user_metric.spec,
                "reference": self.user_reference,
                "candidate": self.user_candidate,
            }
        if self.skipped_outputs:
            result["skipped_outputs"] = self.skipped_outputs
        return result


class ReferenceOutputs:
    """The reference model's outputs over a data source, batch by batch: teacher outputs for
    distillation, and what :func:`compare` judges candidates against.

    The first pass runs the model; its batches are kept while they fit in ``max_bytes``, so
    later passes (the next candidate) do not run the reference again, and its onnxruntime
    session (a copy of its weights) is then released. Past the budget, every pass runs it anew,
    one batch in memory at a time.
    """

    def __init__(
        self,
        model: runtime.ModelLike,
        data: DataSource,
        *,
        batch_size: int = 32,
        limit: int | None = None,
        threads: int = 1,
        max_bytes: int = 256 << 20,
        label: str = "reference",
    ):
        self.data = data
        self.batch_size = batch_size
        self.limit = limit
        self.max_bytes = max_bytes
        self.label = label
        self._model = model
        self._threads = threads
        self.session: Any = runtime.create_session(model, threads=threads, label=label)
        self.output_names = [o.name for o in self.session.get_outputs()]
        fixed = runtime.fixed_batch(self.session)
        self.batch_size = fixed if fixed is not None else batch_size
        self._kept: list[tuple[Batch, dict[str, np.ndarray]]] | None = None
        self._over_budget = max_bytes <= 0

    def collect(self) -> bool:
        """Run the reference now and keep its outputs if they fit the budget (its session is
        then released, so a candidate's session is never alive beside it). True when kept."""
        if self._kept is None and not self._over_budget:
            for _ in self:
                if self._over_budget:
                    break
        return self._kept is not None

    def __iter__(self) -> Iterator[tuple[Batch, dict[str, np.ndarray]]]:
        if self._kept is not None:
            yield from self._kept
            return
        if self.session is None:
            self.session = runtime.create_session(
                self._model, threads=self._threads, label=self.label
            )
        kept: list[tuple[Batch, dict[str, np.ndarray]]] | None = None if self._over_budget else []
        size = 0
        for batch, outputs in runtime.iter_outputs(
            self.session,
            self.data,
            batch_size=self.batch_size,
            limit=self.limit,
            output_names=self.output_names,
            label=self.label,
        ):
            if kept is not None:
                size += sum(a.nbytes for a in outputs.values())
                size += sum(np.asarray(a).nbytes for a in batch.inputs.values())
                if size <= self.max_bytes:
                    kept.append((batch, outputs))
                else:
                    kept = None
                    self._over_budget = True
            yield batch, outputs
        if kept is not None:
            self._kept = kept
            self.session = None  # every later pass reads the kept outputs


def reference_outputs(
    model: runtime.ModelLike,
    data: DataSource,
    *,
    batch_size: int = 32,
    limit: int | None = None,
    threads: int = 1,
) -> Iterator[tuple[Batch, dict[str, np.ndarray]]]:
    """Yield ``(batch, the model's outputs by name)`` over ``data``: teacher outputs for
    distillation, one batch in memory at a time."""
    yield from ReferenceOutputs(
        model, data, batch_size=batch_size, limit=limit, threads=threads, max_bytes=0
    )


# compare() keeps the reference's outputs up to this size, so it runs the reference first and
# releases it before the candidate's session is made (two large models never in memory at once).
COMPARE_KEEP_BYTES = 64 << 20


def compare(
    reference: runtime.ModelLike | ReferenceOutputs,
    candidate: runtime.ModelLike,
    data: DataSource | None = None,
    *,
    batch_size: int = 32,
    limit: int | None = None,
    threads: int = 1,
    labels_output: str | None = None,
    metric: Any = None,
) -> Comparison:
    """Run both models on ``data`` and fold the differences of every output.

    reference: a model, or :class:`ReferenceOutputs` (its data is used; ``data`` may be None).
    metric: a user metric (``module:function``, a :class:`UserMetric` or a function) to score
    both models with besides the built-in statistics; a built-in name changes nothing here.
    """
    if isinstance(reference, ReferenceOutputs):
        teacher = reference
        if data is not None and data is not teacher.data:
            raise OnnxcompError("compare: the reference outputs were taken on other data")
    else:
        if data is None:
            raise OnnxcompError("compare: no data to compare on")
        teacher = ReferenceOutputs(
            reference, data, batch_size=batch_size, limit=limit, threads=threads,
            max_bytes=COMPARE_KEEP_BYTES,
        )  # fmt: skip
    user = load_metric(metric) if is_user_metric(metric) or callable(metric) else None
    # The reference runs first when its outputs fit the budget: one session alive at a time.
    teacher.collect()
    cand_session = runtime.create_session(candidate, threads=threads, label="candidate")
    ref_outputs = teacher.output_names
    cand_outputs = [o.name for o in cand_session.get_outputs()]
    missing = [n for n in ref_outputs if n not in cand_outputs]
    present = [n for n in ref_outputs if n in cand_outputs]
    stats = {name: OutputStats(name) for name in present}
    skipped: dict[str, str] = {}
    correct_ref = correct_cand = labelled = 0
    user_ref = [0.0, 0]
    user_cand = [0.0, 0]
    samples = 0
    for batch, ref in teacher:
        if missing and not skipped:
            _check_echoes(missing, ref, batch.inputs, cand_outputs)
            skipped = {n: "echoes a model input; the candidate does not output it" for n in missing}
        cand = runtime.run(cand_session, batch.inputs, present, "candidate")
        for name in present:
            a, b = _real_tokens(ref[name], cand[name], batch.inputs)
            stats[name].update(a, b)
        samples += len(batch)
        if batch.labels is not None:
            name = labels_output or _label_output(ref, present)
            if name is not None:
                labels = class_labels(batch.labels, ref[name], teacher.data.name)
                correct_ref += int(np.sum(_predict(ref[name]) == labels))
                correct_cand += int(np.sum(_predict(cand[name]) == labels))
                labelled += len(labels)
        if user is not None:
            target = batch.labels if batch.labels is not None else ref
            for acc, outs in ((user_ref, ref), (user_cand, cand)):
                total, count = user.score(outs, target, len(batch))
                acc[0] += total
                acc[1] += count
    name = getattr(data, "name", None) or teacher.data.name
    if samples == 0:
        raise OnnxcompError(f"{name}: no samples to compare on")
    comparison = Comparison(list(stats.values()), samples, skipped_outputs=skipped, data=name)
    if labelled:
        comparison.accuracy_reference = correct_ref / labelled
        comparison.accuracy_candidate = correct_cand / labelled
    if user is not None:
        if not user_ref[1] or not user_cand[1]:
            raise OnnxcompError(f"--metric {user.spec}: the function scored no samples")
        comparison.user_metric = user
        comparison.user_reference = user_ref[0] / user_ref[1]
        comparison.user_candidate = user_cand[0] / user_cand[1]
    return comparison


def _check_echoes(
    missing: list[str],
    ref: dict[str, np.ndarray],
    inputs: dict[str, np.ndarray],
    cand_outputs: list[str],
) -> None:
    """A reference output the candidate lacks is fine only when it echoes an input (MiniLM
    exports return ``input_ids`` through Identity): there is nothing to compare."""
    for name in missing:
        out = ref[name]
        if not any(
            np.shape(x) == out.shape and np.array_equal(np.asarray(x), out) for x in inputs.values()
        ):
            raise OnnxcompError(
                f"candidate lacks output {name!r} of the reference "
                f"(candidate outputs: {', '.join(cand_outputs)})"
            )


# ---------------------------------------------------------------------------------------------
# Evaluating one model


@dataclasses.dataclass
class Evaluation:
    """One model's score on data: accuracy against labels, or a user metric."""

    metric: str
    value: float
    samples: int
    data: str

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def evaluate(
    model: runtime.ModelLike,
    data: DataSource,
    metric: Any = "auto",
    *,
    batch_size: int = 32,
    limit: int | None = None,
    threads: int = 1,
    labels_output: str | None = None,
) -> Evaluation:
    """Score ONE model on ``data``: ``auto``/``accuracy`` is top-1 accuracy against the data's
    labels (argmax of the first class-score output, or an integer output as is); a user metric
    is called with the outputs and the labels (None when the data has none)."""
    user = load_metric(metric)
    if isinstance(user, str):
        if user not in ("auto", "accuracy"):
            raise OnnxcompError(
                f"metric {user}: measures agreement with a reference model; evaluating one model "
                "needs labels (accuracy) or your own metric (module:function)"
            )
        if not data.has_labels:
            raise OnnxcompError(
                f"{data.name}: no 'labels' array to score accuracy against (or give your own "
                "--metric module:function)"
            )
    total, count, samples = 0.0, 0, 0
    for batch, outputs in reference_outputs(
        model, data, batch_size=batch_size, limit=limit, threads=threads
    ):
        samples += len(batch)
        if isinstance(user, UserMetric):
            s, n = user.score(outputs, batch.labels, len(batch))
        else:
            name = labels_output or _label_output(outputs, list(outputs))
            if name is None:
                raise OnnxcompError(
                    "metric accuracy: no output holds class scores or integer predictions"
                )
            labels = class_labels(batch.labels, outputs[name], data.name)
            s, n = float(np.sum(_predict(outputs[name]) == labels)), len(labels)
        total += s
        count += n
    if not count:
        raise OnnxcompError(f"{data.name}: no samples to evaluate on")
    name = user.name if isinstance(user, UserMetric) else "accuracy"
    return Evaluation(name, total / count, samples, data.name)


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


# ---------------------------------------------------------------------------------------------
# Detection


def detections(
    out: np.ndarray, conf: float = 0.25, nms_iou: float = 0.45
) -> tuple[np.ndarray, np.ndarray]:
    """One image of a YOLOv8-style output, ``[4 + classes, anchors]`` (cx, cy, w, h, class
    scores) -> boxes ``[K, 4]`` (x1, y1, x2, y2) and classes ``[K]`` scoring at least ``conf``,
    after per-class non-maximum suppression at ``nms_iou``."""
    scores = out[4:].T
    cls, score = scores.argmax(1), scores.max(1)
    keep = score >= conf
    cx, cy, w, h = out[:4, keep]
    boxes = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], 1)
    cls, score = cls[keep], score[keep]
    chosen: list[int] = []
    for i in np.argsort(-score):
        same = [j for j in chosen if cls[j] == cls[i]]
        if not same or box_iou(boxes[i : i + 1], boxes[same]).max() < nms_iou:
            chosen.append(int(i))
    return boxes[chosen], cls[chosen]


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU matrix ``[len(a), len(b)]`` of x1y1x2y2 boxes."""
    lo, hi = np.maximum(a[:, None, :2], b[None, :, :2]), np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(hi - lo, 0, None), axis=2)
    area_a = np.prod(a[:, 2:] - a[:, :2], axis=1)
    area_b = np.prod(b[:, 2:] - b[:, :2], axis=1)
    return inter / np.maximum(area_a[:, None] + area_b[None, :] - inter, 1e-9)


def box_agreement(got: np.ndarray, want: np.ndarray, conf: float = 0.25) -> dict[str, Any]:
    """How well a candidate detector's boxes (``got``, a batch of YOLOv8-style outputs) agree
    with the reference's (``want``): ``box_iou``, the mean over every box of either model of its
    IoU with the best box of the same class in the other's result (0 when there is none), and
    the box counts."""
    ious: list[float] = []
    counts = [0, 0]
    for g, w in zip(got, want):
        (gb, gc), (wb, wc) = detections(g, conf), detections(w, conf)
        counts[0] += len(wb)
        counts[1] += len(gb)
        for xb, xc, yb, yc in ((wb, wc, gb, gc), (gb, gc, wb, wc)):
            for box, c in zip(xb, xc):
                other = yb[yc == c]
                ious.append(float(box_iou(box[None], other).max()) if len(other) else 0.0)
    return {
        "box_iou": float(np.mean(ious)) if ious else None,
        "reference_boxes": counts[0],
        "boxes": counts[1],
    }


def yolo_distortion(want: dict[str, np.ndarray], got: dict[str, np.ndarray], floor: float = 0.1) -> float:
    """A smooth stand-in for :func:`yolo_boxes` (what ``prune --allocate sensitivity`` ranks
    groups by): over the anchors where the reference scores a class at least ``floor``, weighted
    by that score, the candidate's relative change of the score plus ``1 - IoU`` of the two
    boxes. 0 when the outputs agree; it grows before boxes flip across the threshold."""
    ref = np.asarray(next(iter(want.values())), np.float64)
    out = np.asarray(got[next(iter(want))], np.float64)
    cls = ref[:, 4:].argmax(1)  # (N, anchors)
    s_ref = np.take_along_axis(ref[:, 4:], cls[:, None], 1)[:, 0]
    s_out = np.take_along_axis(out[:, 4:], cls[:, None], 1)[:, 0]
    keep = s_ref >= floor
    if not keep.any():
        return 0.0

    def corners(o):
        cx, cy, w, h = (o[:, i][keep] for i in range(4))
        return np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], 1)

    a, b = corners(ref), corners(out)
    lo, hi = np.maximum(a[:, :2], b[:, :2]), np.minimum(a[:, 2:], b[:, 2:])
    inter = np.prod(np.clip(hi - lo, 0, None), 1)
    union = np.prod(a[:, 2:] - a[:, :2], 1) + np.prod(b[:, 2:] - b[:, :2], 1) - inter
    iou = inter / np.maximum(union, 1e-9)
    weight = s_ref[keep]
    loss = np.abs(s_out[keep] - weight) / weight + (1.0 - iou)
    return float(np.sum(weight * loss) / np.sum(weight))


def yolo_boxes(outputs: dict[str, np.ndarray], target: Any) -> np.ndarray:
    """A ready-made user metric for YOLOv8-style detectors (``--metric
    onnxcomp.evaluate:yolo_boxes``): per image, the boxes' mean IoU with the reference model's
    (:func:`box_agreement`; 1 when neither finds a box), so auto and ``--max-drop`` judge the
    boxes rather than the raw output's cosine. Reads the first output; needs no labels."""
    if not isinstance(target, dict):
        raise OnnxcompError(
            "yolo_boxes compares with the reference model's boxes: give data without labels"
        )
    got, want = next(iter(outputs.values())), next(iter(target.values()))
    scores = [box_agreement(g[None], w[None])["box_iou"] for g, w in zip(got, want)]
    return np.array([1.0 if s is None else s for s in scores])


yolo_boxes.distortion = yolo_distortion  # what --allocate sensitivity measures with this metric
