"""Calibration: stream the planned activation tensors through observers, batch by batch.

`onnxcomp.capture` streams one batch of the wanted tensors at a time; each is folded into its
observer (running min/max or a fixed-size histogram) and dropped, so memory does not grow with the
number of samples. `activation_sqnr` makes a second streaming pass to measure how much each
quantized tensor loses (signal-to-quantization-noise ratio against fp32).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping

import numpy as np
import onnx_ir as ir

from onnxcomp import capture
from onnxcomp.data import DataSource
from onnxcomp.errors import OnnxcompError
from onnxcomp.graph import home_graph
from onnxcomp.quantize import schemes
from onnxcomp.quantize.observers import make_observer
from onnxcomp.quantize.plan import QuantPlan

logger = logging.getLogger(__name__)

METHODS = ("minmax", "percentile", "entropy", "mse")


@dataclasses.dataclass
class Calibration:
    """Calibrated ranges by tensor (scale group) name, and how many samples were seen."""

    ranges: dict[str, tuple[float, float]]
    samples: int
    method: str
    observer_bytes: int = 0
    # tensors inside If branches that no calibration sample reached (no range)
    unseen: list[str] = dataclasses.field(default_factory=list)


class _Seen:
    """An observer that also counts the batches it was given."""

    def __init__(self, observer):
        self.observer = observer
        self.batches = 0

    def update(self, batch: np.ndarray) -> None:
        self.batches += 1
        self.observer.update(batch)

    def compute(self):
        return self.observer.compute()


def _observer(method: str, activation_type: str):
    if method == "mse":
        return make_observer("mse", dtype=activation_type)
    return make_observer(method)


def calibrate(
    model: ir.Model,
    plan: QuantPlan,
    data: DataSource,
    *,
    method: str = "minmax",
    activation_type: str = "uint8",
    batch_size: int = 32,
    limit: int | None = None,
) -> Calibration:
    """Run ``model`` over ``data`` and compute a range for each tensor group of ``plan``."""
    if method not in METHODS:
        raise OnnxcompError(f"--calibration: {method!r} is not one of {', '.join(METHODS)}")
    groups = plan.groups()
    if not groups:
        return Calibration({}, 0, method)
    observers = {name: _Seen(_observer(method, activation_type)) for name in groups}
    try:
        samples = capture.accumulate(model, observers, data, batch_size=batch_size, limit=limit)
    except OnnxcompError as err:
        if "no samples" in str(err):
            raise OnnxcompError(f"{data.name}: no samples to calibrate on") from None
        raise
    ranges = {}
    unseen = [name for name, obs in observers.items() if not obs.batches]
    if unseen:
        logger.info("%d tensors in If branches no calibration sample took", len(unseen))
    for name, obs in observers.items():
        if not obs.batches:
            continue
        try:
            lo, hi = obs.compute()
        except OnnxcompError as err:
            raise OnnxcompError(f"calibration of tensor {name!r}: {err}") from None
        ranges[name] = (float(lo), float(hi))
    nbytes = sum(obs.observer.nbytes for obs in observers.values())
    logger.info("calibrated %d tensors on %d samples (%s)", len(ranges), samples, method)
    return Calibration(ranges, samples, method, nbytes, unseen)


def unreached_graphs(plan: QuantPlan, calibration: Calibration) -> dict[int, str]:
    """id(If branch) -> why its ops stay float, for the branches holding tensors that no
    calibration sample reached (`build_plan`'s ``skip_graphs``)."""
    skip: dict[int, str] = {}
    unseen = set(calibration.unseen)
    for act in plan.activations.values():
        if act.group not in unseen:
            continue
        graph = act.graph if act.graph is not None else home_graph(act.value)
        if graph is not None:
            skip[id(graph)] = (
                "in an If branch that no calibration sample took: no range to quantize with, "
                "kept float"
            )
    return skip


def activation_params(
    plan: QuantPlan, calibration: Calibration, activation_type: str
) -> dict[str, schemes.QuantParams]:
    """Scale and zero point of every planned activation tensor (pass-through tensors share their
    group's), with absorbed Relu/Clip bounds applied."""
    qt = schemes.quant_type(activation_type)
    by_group: dict[str, schemes.QuantParams] = {}
    for group in plan.groups():
        lo, hi = calibration.ranges[group]
        clip = plan.clip_of(group)
        if clip is not None:
            lo, hi = max(lo, clip[0]), min(hi, clip[1])
            hi = max(hi, lo)
        params = schemes.params_from_range(lo, hi, qt)
        if clip is not None:
            params = _inside_clip(params, clip)
        by_group[group] = params
    # by plan key, and by group name (a value read from the outer scope by If branches is
    # keyed per branch; its range is its own)
    return {**by_group, **{key: by_group[p.group] for key, p in plan.activations.items()}}


def _inside_clip(params: schemes.QuantParams, clip: tuple[float, float]) -> schemes.QuantParams:
    """Shrink the scale by float32 rounding steps until the quantized range lies inside the clip
    bounds, so onnxruntime can drop the absorbed Clip (it checks exactly that)."""
    qt = params.dtype
    scale = np.float32(params.scale)
    zp = int(params.zero_point)
    for _ in range(8):
        top = np.float32(scale * np.float32(qt.qmax - zp))
        bottom = np.float32(scale * np.float32(qt.qmin - zp))
        if top <= clip[1] and bottom >= clip[0]:
            break
        scale = np.nextafter(scale, np.float32(0))
    return schemes.QuantParams(np.float32(scale), params.zero_point, qt)


def activation_sqnr(
    model: ir.Model,
    plan: QuantPlan,
    params: Mapping[str, schemes.QuantParams],
    data: DataSource,
    *,
    batch_size: int = 32,
    limit: int | None = 128,
) -> dict[str, float]:
    """SQNR in dB of each quantized activation (fp32 tensor vs its quantize-dequantize), streamed."""
    groups = plan.groups()
    if not groups:
        return {}

    def round_trip(p: schemes.QuantParams):
        return lambda ref: schemes.dequantize(schemes.quantize(ref, p), p)

    sqnr = {name: capture.SignalToNoise(round_trip(params[name])) for name in groups}
    capture.accumulate(model, sqnr, data, batch_size=batch_size, limit=limit)
    return {name: acc.compute() for name, acc in sqnr.items()}
