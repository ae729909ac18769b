"""Which integer-kernel path onnxruntime's CPU provider takes, and what a target CPU asks of weights.

onnxruntime's u8s8 kernels (uint8 activations x int8 weights: QLinearConv, QGemm, MatMulInteger,
DynamicQuantizeMatMul) multiply with ``vpmaddubsw`` on AVX2 and on AVX-512 without VNNI. That
instruction adds two uint8 x int8 products into an int16 that saturates: 2 * 255 * 127 = 64,770 does
not fit, so full-range int8 weights lose accuracy there (measured on an AVX2 EPYC: cosine to fp32 0.993
where a VNNI machine gives 0.9998). 7-bit weights ([-64, 64]: 2 * 255 * 64 = 32,640) never saturate;
that is onnxruntime's documented ``reduce_range`` remedy. VNNI (``vpdpbusd``) and ARM64's dot-product
kernels accumulate in int32 and take full-range weights.

A model is often quantized on one machine and deployed on another, so the default target is ``any``:
weights safe on every path. ``--target-cpu auto`` means "the machine I am running on".
"""

from __future__ import annotations

import functools
import platform
from typing import Literal

from onnxcomp.errors import OnnxcompError

TargetCpu = Literal["any", "auto", "avx2", "avx512", "vnni", "arm64"]
TARGETS: tuple[str, ...] = ("any", "auto", "avx2", "avx512", "vnni", "arm64")

# ISA paths whose int8 kernels accumulate in int32 (no int16 saturation with 8-bit weights).
_FULL_RANGE_PATHS = {"avx512-vnni", "avx-vnni", "vnni", "arm64"}


@functools.cache
def isa_path() -> str:
    """The integer-kernel path of this machine: avx512-vnni, avx-vnni, avx512, avx2, arm64 or other."""
    machine = platform.machine().lower()
    if machine in ("aarch64", "arm64"):
        return "arm64"
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            flags: set[str] = set()
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        return "other"
    if "avx512_vnni" in flags:
        return "avx512-vnni"
    if "avx_vnni" in flags:
        return "avx-vnni"
    if "avx512bw" in flags:
        return "avx512"
    if "avx2" in flags:
        return "avx2"
    return "other"


def resolve(target: str) -> str:
    """The ISA path a target names: ``auto`` is this machine, ``any`` stays ``any``."""
    if target not in TARGETS:
        raise OnnxcompError(f"--target-cpu {target!r}: expected one of {', '.join(TARGETS)}")
    return isa_path() if target == "auto" else target


def reduce_range(target: str) -> bool:
    """True when int8 weights must be 7-bit to stay exact on the target's u8s8 kernels."""
    return resolve(target) not in _FULL_RANGE_PATHS


def describe(target: str) -> dict[str, str]:
    """What the report says: the path measured here, the target, and the weight range chosen."""
    return {
        "isa_measured": isa_path(),
        "target_cpu": target,
        "weight_range": "7-bit [-64, 64]" if reduce_range(target) else "8-bit [-127, 127]",
    }
