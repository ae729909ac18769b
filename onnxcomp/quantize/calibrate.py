"""Calibration: stream the planned activation tensors through observers, batch by batch.

`runtime.capture` yields one batch of the wanted tensors at a time; each is folded into its
observer (running min/max or a fixed-size histogram) and dropped, so memory does not grow with the
number of samples. `activation_sqnr` makes a second streaming pass to measure how much each
quantized tensor loses (signal-to-quantization-noise ratio against fp32).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Iterator, Mapping

import numpy as np
import onnx_ir as ir

from onnxcomp import runtime
from onnxcomp.data import Batch, DataSource
from onnxcomp.errors import OnnxcompError
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


def _observer(method: str, activation_type: str):
    if method == "mse":
        return make_observer("mse", dtype=activation_type)
    return make_observer(method)


# One batch of captured tensors may hold at most this much; a bigger first batch makes the stream
# restart with fewer samples per batch (a BERT layer stack asks for ~100 tensors per sample).
CAPTURE_BUDGET_BYTES = 256 << 20


def stream(
    model: ir.Model, names: list[str], data: DataSource, *, batch_size: int, limit: int | None
) -> Iterator[tuple[Batch, dict[str, np.ndarray]]]:
    """`runtime.capture`, with the batch size lowered when one batch of the named tensors would
    exceed `CAPTURE_BUDGET_BYTES`, so memory stays bounded by the budget, not by the model."""
    while True:
        batches = runtime.capture(model, names, data, batch_size=batch_size, limit=limit)
        first = next(batches, None)
        if first is None:
            return
        nbytes = sum(a.nbytes for a in first[1].values())
        if nbytes <= CAPTURE_BUDGET_BYTES or len(first[0]) <= 1:
            break
        per_sample = nbytes / len(first[0])
        smaller = max(1, int(CAPTURE_BUDGET_BYTES // per_sample))
        logger.info(
            "capture: %d MB per batch of %d; batches of %d instead",
            nbytes >> 20,
            len(first[0]),
            smaller,
        )
        del first, batches
        batch_size = smaller
    yield first
    yield from batches


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
    observers = {name: _observer(method, activation_type) for name in groups}
    samples = 0
    for batch, tensors in stream(model, list(groups), data, batch_size=batch_size, limit=limit):
        samples += len(batch)
        for name, array in tensors.items():
            observers[name].update(array)
    if samples == 0:
        raise OnnxcompError(f"{data.name}: no samples to calibrate on")
    ranges = {}
    for name, obs in observers.items():
        try:
            lo, hi = obs.compute()
        except OnnxcompError as err:
            raise OnnxcompError(f"calibration of tensor {name!r}: {err}") from None
        ranges[name] = (float(lo), float(hi))
    nbytes = sum(obs.nbytes for obs in observers.values())
    logger.info("calibrated %d tensors on %d samples (%s)", len(ranges), samples, method)
    return Calibration(ranges, samples, method, nbytes)


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
    return {name: by_group[p.group] for name, p in plan.activations.items()}


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
    signal = dict.fromkeys(groups, 0.0)
    noise = dict.fromkeys(groups, 0.0)
    for _, tensors in stream(model, list(groups), data, batch_size=batch_size, limit=limit):
        for name, array in tensors.items():
            ref = np.asarray(array, np.float32)
            approx = schemes.dequantize(schemes.quantize(ref, params[name]), params[name])
            ref64 = ref.astype(np.float64)
            signal[name] += float(np.sum(ref64 * ref64))
            noise[name] += float(np.sum((ref64 - approx) ** 2))
    out = {}
    for name in groups:
        if noise[name] == 0:
            out[name] = math.inf
        elif signal[name] == 0:
            out[name] = -math.inf
        else:
            out[name] = 10 * math.log10(signal[name] / noise[name])
    return out
