"""Constant folding: nodes whose inputs are all constant become initializers."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxcomp import runtime
from onnxcomp.errors import OnnxcompError
from onnxcomp.graph import add_initializer, dims, replace_uses
from onnxcomp.optimize.rules.framework import Match, Rule

# Ops whose result is never computed ahead of time: random, quantization boundaries that
# onnxruntime folds into integer kernels, and ops with side inputs from the outside world.
NEVER_FOLD = {
    "RandomNormal",
    "RandomNormalLike",
    "RandomUniform",
    "RandomUniformLike",
    "Multinomial",
    "Bernoulli",
    "QuantizeLinear",
    "DequantizeLinear",
    "DynamicQuantizeLinear",
    "If",
    "Loop",
    "Scan",
    "Constant",
}


class ConstantFoldRule(Rule):
    """Computes nodes whose inputs are all constant, with onnxruntime.

    onnxruntime is the one engine: it judges every result here, and it would fold these nodes
    itself at session start with the same CPU kernels, so a folded value is the value the model
    computed before (onnx's reference evaluator, used before, can differ in the last bits).
    """

    name = "constant-fold"
    description = "nodes whose inputs are all constant → an initializer (results bounded in size)"
    anchors = ()

    def __init__(self, limit_bytes: int = 1 << 20):
        self.limit_bytes = limit_bytes
        self.opset = 17  # the model's default-domain opset; set by the optimizer before planning

    def match(self, node):
        if node.domain not in ("", "ai.onnx") or node.op_type in NEVER_FOLD:
            return None
        inputs = [v for v in node.inputs if v is not None]
        if not inputs or any(v.const_value is None or v.is_graph_input() for v in inputs):
            return None
        if any(
            a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS)
            for a in node.attributes.values()
        ):
            return None
        if any(out.is_graph_output() for out in node.outputs):
            return "its output is a graph output"
        in_bytes = sum(v.const_value.nbytes for v in inputs)
        limit = max(self.limit_bytes, in_bytes)
        for out in node.outputs:
            shape = dims(out)
            if (
                out.dtype is not None
                and shape is not None
                and all(isinstance(d, int) for d in shape)
            ):
                size = int(np.prod(shape)) * out.dtype.itemsize
                if size > limit:
                    return f"the result would be {size} bytes (limit {limit})"
        results = self.evaluate(node)
        if isinstance(results, str):
            return results
        size = sum(r.nbytes for r in results)
        if size > limit:
            return f"the result is {size} bytes (limit {limit})"
        return Match(self.name, node, [node], {"results": results})

    def evaluate(self, node: ir.Node) -> list[np.ndarray] | str:
        """The node's outputs computed by onnxruntime on its constant inputs, or why not."""
        return evaluate_node(node, self.opset)

    def rewrite(self, match, names):
        node = match.anchor
        results = match.data["results"]
        graph = node.graph
        for out, array in zip(node.outputs, results):
            if not out.uses():
                continue
            if out.dtype is not None:
                array = array.astype(out.dtype.numpy(), copy=False)
            # np.ascontiguousarray would turn a scalar into shape (1,): a folded Cast of a
            # scalar then fed Unsqueeze a rank-1 tensor (ViT-S: Concat of ranks 2 and 1).
            array = np.require(array, requirements="C").reshape(array.shape)
            value = add_initializer(graph, f"{out.name or node.name}_folded", array)
            replace_uses(out, value)
        graph.remove(node, safe=True)


def evaluate_node(node: ir.Node, opset: int) -> list[np.ndarray] | str:
    """Run one default-domain node on its constant inputs in onnxruntime: its outputs, or why not."""
    import onnx

    names = [f"i{i}" if v is not None else "" for i, v in enumerate(node.inputs)]
    outs = [f"o{i}" for i in range(len(node.outputs))]
    proto_node = ir.serde.serialize_node(node)
    del proto_node.input[:]
    proto_node.input.extend(names)
    del proto_node.output[:]
    proto_node.output.extend(outs)
    feeds = {n: v.const_value.numpy() for n, v in zip(names, node.inputs) if v is not None}
    graph = onnx.helper.make_graph(
        [proto_node],
        "fold",
        [
            onnx.helper.make_tensor_value_info(
                n, onnx.helper.np_dtype_to_tensor_dtype(a.dtype), a.shape
            )
            for n, a in feeds.items()
        ],
        [onnx.helper.make_empty_tensor_value_info(o) for o in outs],
    )
    proto = onnx.helper.make_model(
        graph,
        opset_imports=[onnx.helper.make_opsetid("", opset)],
        ir_version=min(onnx.IR_VERSION, 10),
    )
    try:
        session = runtime.create_session(
            proto.SerializeToString(), optimization="disable", label="fold"
        )
        results = list(runtime.run(session, feeds, outs, label="fold").values())
    except OnnxcompError as err:  # onnxruntime lacks the op, or the inputs are invalid
        return f"cannot evaluate it ({str(err).removeprefix('fold: ')})"
    arrays = []
    for r in results:
        if not isinstance(r, np.ndarray) or r.dtype.kind not in "biuf":
            return "its result is not a numeric tensor (sequence, optional or string)"
        arrays.append(r)
    return arrays
