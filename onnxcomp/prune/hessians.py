"""Layer Hessians ``2 X^T X / n`` of Conv/Gemm/MatMul inputs, streamed over data.

A thin adapter over the shared capture and layer-wise modules: one place where pruning asks for
the Hessians of some weighted layers, on the model as it is now (the reference, or the model
pruned so far).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxcomp import ops
from onnxcomp.data import DataSource
from onnxcomp.quantize.gptq import HessianAccumulator
from onnxcomp.quantize.static import GPTQ_MAX_ROWS_PER_BATCH, conv_geometry, conv_patches
from onnxcomp.runtime import capture


@dataclasses.dataclass
class LayerRows:
    """How a weighted node's input becomes solver rows ``(rows, groups, in/groups·k)``."""

    node: ir.Node
    input_name: str
    rows_of: Callable[[np.ndarray, np.random.Generator], np.ndarray]

    @classmethod
    def of(cls, node: ir.Node) -> LayerRows:
        spec = ops.weighted(node)
        x = node.inputs[spec.data]
        w_shape = tuple(int(d) for d in node.inputs[spec.weight].shape)
        if spec.layout == "conv":
            groups = spec.groups(node)

            def rows_of(a: np.ndarray, rng: np.random.Generator) -> np.ndarray:
                kernel, strides, pads, dilations = conv_geometry(node, w_shape, a.shape[2:])
                return conv_patches(
                    a, kernel, strides=strides, pads=pads, dilations=dilations, groups=groups,
                    max_rows=GPTQ_MAX_ROWS_PER_BATCH, rng=rng,
                )  # fmt: skip

        else:

            def rows_of(a: np.ndarray, rng: np.random.Generator) -> np.ndarray:
                return a.reshape(-1, 1, a.shape[-1])  # (samples, 1, in)

        return cls(node, x.name, rows_of)


def layer_hessians(
    model: ir.Model, layers: list[LayerRows], data: DataSource, cfg: Any, seed: int = 0
) -> dict[int, list[np.ndarray]]:
    """``{id(node): [H of each group]}`` of ``layers``' inputs as ``model`` computes them."""
    accs: dict[int, list[HessianAccumulator]] = {}
    by_input: dict[str, list[LayerRows]] = {}
    for layer in layers:
        by_input.setdefault(layer.input_name, []).append(layer)
    rng = np.random.default_rng([cfg.seed, seed])
    for _, tensors in capture(model, list(by_input), data, batch_size=cfg.batch_size, limit=cfg.samples):
        for name, array in tensors.items():
            for layer in by_input[name]:
                rows = layer.rows_of(np.asarray(array, np.float32), rng)  # (rows, g, in)
                group_accs = accs.setdefault(
                    id(layer.node), [HessianAccumulator() for _ in range(rows.shape[1])]
                )
                for g, acc in enumerate(group_accs):
                    acc.update(rows[:, g, :])
    return {key: [acc.H for acc in group] for key, group in accs.items()}
