"""The clean-up rules, one file per family, and the order they are tried in.

- ``framework``: Rule, Match, the opsets fused ops need, pattern helpers shared by rules;
- ``activations``: hard-swish, hard-sigmoid, ReLU6 from Min/Max, SiLU, GELU (erf and tanh);
- ``norms``: decomposed LayerNormalization;
- ``folding``: BatchNorm, bias Add and per-channel scales folded into Conv/ConvTranspose/Gemm;
- ``cleanup``: Identity/Dropout removal, Reshape targets computed from run-time shapes;
- ``constants``: constant folding (with onnxruntime).

Graph queries and edits come from ``onnxcomp.graph``, op facts from ``onnxcomp.ops``.
"""

from __future__ import annotations

from onnxcomp.optimize.rules.activations import (
    GeluErfRule,
    GeluTanhRule,
    HardSigmoidRule,
    HardSwishRule,
    Relu6Rule,
    SiluRule,
)
from onnxcomp.optimize.rules.cleanup import IdentityRule, ReshapeShapeRule
from onnxcomp.optimize.rules.constants import NEVER_FOLD, ConstantFoldRule
from onnxcomp.optimize.rules.folding import (
    FoldBatchNormRule,
    FoldBiasAddRule,
    FoldInputScaleRule,
    FoldInputShiftRule,
    FoldScaleRule,
)
from onnxcomp.optimize.rules.framework import NO_UPGRADE, TARGET_OPSET, Match, Rule, replace_chain
from onnxcomp.optimize.rules.norms import LayerNormRule


def all_rules(fold_limit_bytes: int = 1 << 20) -> list[Rule]:
    """Every rule, in the order they are tried on each node."""
    return [
        IdentityRule(),
        ConstantFoldRule(fold_limit_bytes),
        # Activations and norms first: a fold rule must not eat the Add of an x + 3.
        Relu6Rule(),
        HardSwishRule(),
        HardSigmoidRule(),
        GeluErfRule(),
        GeluTanhRule(),
        LayerNormRule(),
        SiluRule(),
        FoldBatchNormRule(),
        FoldBiasAddRule(),
        FoldScaleRule(),
        FoldInputScaleRule(),
        FoldInputShiftRule(),
        ReshapeShapeRule(),
    ]


RULE_NAMES: list[str] = [r.name for r in all_rules()]

__all__ = [
    "NEVER_FOLD",
    "NO_UPGRADE",
    "RULE_NAMES",
    "TARGET_OPSET",
    "ConstantFoldRule",
    "FoldBatchNormRule",
    "FoldBiasAddRule",
    "FoldInputScaleRule",
    "FoldInputShiftRule",
    "FoldScaleRule",
    "GeluErfRule",
    "GeluTanhRule",
    "HardSigmoidRule",
    "HardSwishRule",
    "IdentityRule",
    "LayerNormRule",
    "Match",
    "Relu6Rule",
    "ReshapeShapeRule",
    "Rule",
    "SiluRule",
    "all_rules",
    "replace_chain",
]
