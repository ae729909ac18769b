"""Parameter transfer: copy weights from one model into another where they correspond.

An initializer of the target takes the source's tensor of the same name when the shapes are
equal. The rest are matched by graph position: the k-th unmatched weight feeding input slot s of
an op type in the target takes the k-th unmatched one feeding the same slot of the same op type
in the source, when the shapes are equal. Every target weight left alone is listed with the
reason.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxcomp import model as model_io

logger = logging.getLogger(__name__)


def _weights_by_slot(model: ir.Model) -> list[tuple[tuple[str, int], ir.Value]]:
    """(op type, input slot) and initializer value, in topological order, each value once."""
    seen: set[int] = set()
    out = []
    for node in model.graph:
        for slot, value in enumerate(node.inputs):
            if value is None or value.const_value is None or id(value) in seen:
                continue
            if value.name not in model.graph.initializers:
                continue
            seen.add(id(value))
            out.append(((node.op_type, slot), value))
    return out


def _shape(value: ir.Value) -> list[int]:
    return list(value.const_value.shape)


def transfer_params(source: ir.Model, target: ir.Model) -> tuple[ir.Model, dict[str, Any]]:
    """Copy ``source``'s weights into ``target`` (in place); returns (target, report)."""
    model_io.normalize(source, infer_shapes=False)
    model_io.normalize(target, infer_shapes=False)
    src_by_name = dict(source.graph.initializers)
    copied, skipped = [], []
    used: set[str] = set()
    pending = []
    for slot, value in _weights_by_slot(target):
        other = src_by_name.get(value.name)
        if other is not None and other.const_value is not None:
            if _shape(other) == _shape(value) and other.dtype == value.dtype:
                _copy(other, value)
                used.add(other.name)
                copied.append(
                    {"tensor": value.name, "from": other.name, "by": "name", "shape": _shape(value)}
                )
                continue
            pending.append(
                (slot, value, f"same name, shape {_shape(other)} in the source vs {_shape(value)}")
            )
            continue
        pending.append((slot, value, None))
    queues: dict[tuple[str, int], list[ir.Value]] = defaultdict(list)
    for slot, value in _weights_by_slot(source):
        if value.name not in used:
            queues[slot].append(value)
    for slot, value, name_reason in pending:
        queue = queues.get(slot)
        if not queue:
            skipped.append(
                {
                    "tensor": value.name,
                    "reason": name_reason
                    or f"no unmatched {slot[0]} input {slot[1]} left in the source",
                }
            )
            continue
        other = queue.pop(0)
        if _shape(other) != _shape(value) or other.dtype != value.dtype:
            skipped.append(
                {
                    "tensor": value.name,
                    "reason": name_reason
                    or (
                        f"the {slot[0]} input {slot[1]} at the same position ({other.name}) has shape "
                        f"{_shape(other)} {other.dtype}, the target wants {_shape(value)} {value.dtype}"
                    ),
                }
            )
            continue
        _copy(other, value)
        copied.append(
            {"tensor": value.name, "from": other.name, "by": "position", "shape": _shape(value)}
        )
    parameters = sum(
        int(v.const_value.size)
        for v in target.graph.initializers.values()
        if v.const_value is not None
    )
    copied_parameters = sum(int(np.prod(c["shape"])) for c in copied)
    report = {
        "copied": copied,
        "skipped": skipped,
        "copied_tensors": len(copied),
        "skipped_tensors": len(skipped),
        "copied_parameters": copied_parameters,
        "parameters": parameters,
    }
    logger.info("copied %d tensors, skipped %d", len(copied), len(skipped))
    return target, report


def _copy(source: ir.Value, target: ir.Value) -> None:
    array = source.const_value.numpy()
    target.const_value = ir.tensor(array.copy(), name=target.name)
