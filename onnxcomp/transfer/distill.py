"""Knowledge distillation: a teacher's soft outputs train a student's head.

The teacher runs over the (possibly unlabelled) data once; its class scores, softened at
temperature T, are the targets of the student's new head, trained on the student's features at a
cut (KL at T scaled by T², plus ``labels_weight`` × cross-entropy on the rows that have labels;
Hinton, Vinyals & Dean 2015). The student may be a smaller model, or a pruned or quantized copy
of the teacher; its head is spliced on as in ``transfer fit``.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxcomp import model as model_io
from onnxcomp.data import DataSource
from onnxcomp.errors import OnnxcompError
from onnxcomp.evaluate import reference_outputs
from onnxcomp.transfer.api import FitResult, choose_cuts, split_indices, train_on_cuts
from onnxcomp.transfer.cuts import Pooling, fix_input_shapes, restore_input_shapes
from onnxcomp.transfer.features import compute_features, labels_of
from onnxcomp.transfer.heads import HeadOptions, Targets, log_softmax, softmax
from onnxcomp.transfer.splice import splice

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class DistillOptions(HeadOptions):
    """Options of ``distill`` (and the ``distill`` recipe step)."""

    at: str | None = None  # the student's cut; None = its best-ranked candidate
    pooling: Pooling | None = None
    temperature: float = 4.0
    labels_weight: float = 0.5
    teacher_output: str | None = None  # the teacher's class-score output; None = the first [N, K]
    tries: int = 3
    val_fraction: float = 0.2
    batch: int = 32
    cache: bool = True
    refit: bool = True

    def check(self, where: str = "distill") -> None:
        super().check(where)
        if self.temperature <= 0:
            raise OnnxcompError(f"{where}: temperature must be positive")
        if self.labels_weight < 0:
            raise OnnxcompError(f"{where}: labels_weight must be >= 0")
        if self.task != "classify":
            raise OnnxcompError(
                f"{where}: distillation trains a classification head (task: classify)"
            )


def teacher_scores(
    teacher: ir.Model,
    data: DataSource,
    output: str | None = None,
    *,
    batch_size: int = 32,
    threads: int = 1,
) -> tuple[str, np.ndarray]:
    """The teacher's class scores as log-probabilities (float64 [N, K]) and the output's name."""
    candidates = [
        v
        for v in teacher.graph.outputs
        if v.shape is not None
        and len(v.shape) == 2
        and v.dtype in (ir.DataType.FLOAT, ir.DataType.DOUBLE, ir.DataType.FLOAT16)
    ]
    if output is None:
        if not candidates:
            raise OnnxcompError(
                "the teacher has no [batch, classes] float output; name one with --teacher-output"
            )
        output = candidates[0].name
    elif output not in {v.name for v in teacher.graph.outputs}:
        names = ", ".join(v.name for v in teacher.graph.outputs)
        raise OnnxcompError(f"the teacher has no output {output!r} (outputs: {names})")
    parts = [
        outputs[output]
        for _, outputs in reference_outputs(teacher, data, batch_size=batch_size, threads=threads)
    ]
    if not parts:
        raise OnnxcompError(f"{data.name}: no samples")
    scores = np.concatenate(parts).astype(np.float64)
    if scores.ndim != 2:
        raise OnnxcompError(
            f"teacher output {output!r} has shape {list(scores.shape)}, not [batch, classes]"
        )
    if np.all(scores >= 0) and np.allclose(scores.sum(axis=1), 1.0, atol=1e-3):
        scores = np.log(np.clip(scores, 1e-12, None))  # probabilities: back to logits
    return output, log_softmax(scores)


def _adapt(data: DataSource, model: ir.Model) -> DataSource:
    """``data`` as ``model`` wants it: a single input of the same size per sample is reshaped
    (the CNN teacher's [N, 1, 8, 8] images feed an MLP student's [N, 64])."""
    specs = model_io.input_specs(model)
    try:
        data.check(specs)
        return data
    except OnnxcompError:
        if len(specs) != 1 or len(data.input_names) != 1 or specs[0].shape is None:
            raise
    return _Reshaped(data, specs[0])


class _Reshaped(DataSource):
    def __init__(self, inner: DataSource, spec):
        self.inner, self.spec = inner, spec
        self.name = f"{inner.name} (reshaped for {spec.name})"
        ((dtype, shape),) = inner.sample_signature().values()
        want = [d if isinstance(d, int) else -1 for d in spec.shape[1:]]
        if -1 in want or int(np.prod(want)) != int(np.prod(shape[1:])):
            raise OnnxcompError(
                f"{inner.name}: samples of shape {list(shape[1:])} do not fit the student's input {spec.describe()}"
            )
        self.dims = want

    @property
    def input_names(self):
        return [self.spec.name]

    @property
    def num_samples(self):
        return self.inner.num_samples

    @property
    def has_labels(self):
        return self.inner.has_labels

    def sample_signature(self):
        ((dtype, shape),) = self.inner.sample_signature().values()
        return {self.spec.name: (dtype, (shape[0], *self.dims))}

    def batches(self, batch_size=32, limit=None):
        from onnxcomp.data import Batch

        for batch in self.inner.batches(batch_size, limit):
            (array,) = batch.inputs.values()
            yield Batch({self.spec.name: array.reshape(len(array), *self.dims)}, batch.labels)


def distill(
    teacher: ir.Model,
    student: ir.Model,
    data: Sequence[DataSource],
    options: DistillOptions | None = None,
    *,
    val_data: DataSource | None = None,
    threads: int = 1,
) -> FitResult:
    """Train a head on the student's features towards the teacher; splice it on (in place)."""
    options = options or DistillOptions()
    start = time.perf_counter()
    model_io.normalize(teacher)
    model_io.normalize(student)
    student_data = _adapt(data[0], student)
    fixed = fix_input_shapes(
        student, {k: shape for k, (_, shape) in student_data.sample_signature().items()}
    )
    if fixed:
        model_io.normalize(student)
    candidates = choose_cuts(student, options.at, options.pooling, options.tries)

    def features_of(source: DataSource) -> dict[str, np.ndarray]:
        return compute_features(
            student,
            candidates,
            _adapt(source, student),
            batch_size=options.batch,
            threads=threads,
            cache=options.cache,
        )

    def targets_of(
        sources: Sequence[DataSource], output: str | None
    ) -> tuple[str, Targets, dict[str, np.ndarray]]:
        soft, labels, feats = [], [], []
        for source in sources:
            source.check(model_io.input_specs(teacher))
            output, log_q = teacher_scores(
                teacher, source, output, batch_size=options.batch, threads=threads
            )
            y = labels_of(source)
            if y is None:
                y = np.full(len(log_q), -1, np.int64)
            elif len(y) != len(log_q) or np.ndim(y) != 1:
                raise OnnxcompError(
                    f"{source.name}: labels of shape {list(np.shape(y))} for {len(log_q)} samples"
                )
            soft.append(softmax(log_q / options.temperature))
            labels.append(np.asarray(y).astype(np.int64))
            feats.append(features_of(source))
        targets = Targets(
            np.concatenate(labels), np.concatenate(soft), options.temperature, options.labels_weight
        )
        k = targets.soft.shape[1]
        if targets.labels.max(initial=-1) >= k:
            raise OnnxcompError(
                f"labels go up to {targets.labels.max()} but the teacher scores {k} classes"
            )
        merged = {name: np.concatenate([f[name] for f in feats]) for name in feats[0]}
        return output, targets, merged

    output, targets, features = targets_of(data, options.teacher_output)
    val_features = val_targets = val_rows = None
    if val_data is not None:
        _, val_targets, val_features = targets_of([val_data], output)
    else:
        _, val_rows = split_indices(None, len(targets.soft), options.val_fraction, options.seed)
    choice = train_on_cuts(
        candidates,
        features,
        targets,
        options,
        val_features=val_features,
        val_targets=val_targets,
        val_rows=val_rows,
        classes=targets.soft.shape[1],
        refit=options.refit,
        given=bool(options.at),
    )
    splice(student, choice.cut, choice.head)
    restore_input_shapes(fixed)
    head = choice.head
    agreement = float((choice.val_output.argmax(1) == choice.val.soft.argmax(1)).mean())
    report: dict[str, Any] = {
        "cut": choice.cut.to_json(),
        "why": choice.why,
        "tried": choice.tried,
        "teacher_output": output,
        "temperature": options.temperature,
        "labels_weight": options.labels_weight,
        "samples": int(len(targets.soft)),
        "labelled_samples": int((targets.labels >= 0).sum()),
        "train_samples": int(len(choice.x_train)),
        "val_samples": int(len(choice.x_val)),
        "val_agreement": agreement,
        "val_metric": choice.val_metric,
        "head": {"kind": options.head, "parameters": head.parameters, "outputs": head.outputs},
        "history": choice.history,
        "seconds": round(time.perf_counter() - start, 3),
    }
    return FitResult(student, head, choice.cut, report)
