"""Graph clean-up before compression: fuse what exporters decompose, fold what they leave.

Rules (``onnxcomp.optimize.rules``): hard-swish, hard-sigmoid, ReLU6 written as Min/Max, GELU (erf
and tanh forms), LayerNormalization (ReduceMean, ReduceSum and x*s + (b - mean*s) forms), SiLU → Swish (off by default: onnxruntime
1.32 runs Swish slower than the Sigmoid·Mul it fuses itself), BatchNormalization / bias Add /
per-channel Mul folded into Conv, ConvTranspose and Gemm weights, Identity and Dropout removal,
constant folding. The result is a plain ONNX model, checked against the input in onnxruntime.
"""

from __future__ import annotations

from onnxcomp.optimize.optimizer import (
    OptimizeOptions,
    OptimizePass,
    RuleLog,
    apply_rules,
    op_histogram,
    optimize,
    self_check,
)
from onnxcomp.optimize.rules import RULE_NAMES, Match, Rule, all_rules
from onnxcomp.passes import Context, register

__all__ = [
    "OptimizeOptions",
    "OptimizePass",
    "RULE_NAMES",
    "Match",
    "Rule",
    "RuleLog",
    "all_rules",
    "apply_rules",
    "op_histogram",
    "optimize",
    "self_check",
]


@register(
    "optimize",
    OptimizeOptions,
    help="Fuse decomposed activations and norms, fold BatchNorm and biases, fold constants.",
)
def _build(options: OptimizeOptions, context: Context) -> OptimizePass:
    return OptimizePass(options, data=context.data)
