"""Where static quantization puts QuantizeLinear/DequantizeLinear, decided before anything is written.

`OP_TABLE` says how onnxruntime's CPU provider runs each op when it is wrapped in Q/DQ (measured on
onnxruntime 1.32: which fused kernel replaces it, which input is the weight and its channel axis).
`build_plan` walks the graph once and returns a `QuantPlan`: the activation tensors that get a
Q -> DQ pair (and which of them share one scale), the weights to store as int8, the nodes that run
as integer kernels, and every node that stays float with the reason. Nothing is changed here;
`onnxcomp.quantize.static` applies the plan in one sweep.

Placement rules (why a pair is there or not):
- a Q/DQ pair goes only on tensors that an integer kernel reads or writes; a pair beside an op that
  stays float is an island that costs time, so ops without an integer kernel stay float, untouched;
- Conv needs its output quantized to become QLinearConv; MatMul and Gemm do not (MatMulIntegerToFloat
  and QGemm write float), so their output is quantized only when an integer kernel reads it;
- Relu, and Clip with constant bounds around 0, that alone follow a quantized op are absorbed: their
  output is what gets quantized, and onnxruntime drops them (the Q range already clips);
- shape ops (Reshape, Transpose, MaxPool, Resize, ...) pass int8 through when their input is
  quantized: their output shares the input's scale and zero point, and onnxruntime drops the pair.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal

import numpy as np
import onnx_ir as ir

from onnxcomp import capture, ops
from onnxcomp.graph import const as _const
from onnxcomp.graph import home_graph
from onnxcomp.quantize.schemes import nonfinite_reason

Role = Literal["weighted", "elementwise", "concat", "unary", "passthrough", "activation", "float"]

FLOAT_TYPES = (ir.DataType.FLOAT,)


def _weight_axis(node: ir.Node) -> int:
    """The weight axis of the output channels (ops.WEIGHTED); MatMul weights here are (K, N)."""
    axis = ops.WEIGHTED[node.op_type].out_axis(node)
    return axis % 2 if axis < 0 else axis


@dataclasses.dataclass(frozen=True)
class OpRule:
    """How onnxruntime's CPU provider runs one op type inside Q/DQ.

    role: weighted (has a weight, anchors the int8 domain), elementwise/concat/unary (integer kernel
    when all data inputs are quantized), passthrough (moves int8 unchanged, shares its input's
    scale), activation (absorbed into the producer's output range), float (no integer kernel).
    kernel: what onnxruntime runs instead (None: stays float).
    """

    op_type: str
    role: Role
    kernel: str | None
    weight_input: int | None = None
    data_inputs: tuple[int, ...] = (0,)
    weight_axis: Callable[[ir.Node], int] | None = None
    bias_input: int | None = None
    why_float: str = ""


def _rules(*rules: OpRule) -> dict[str, OpRule]:
    return {r.op_type: r for r in rules}


OP_TABLE: dict[str, OpRule] = _rules(
    OpRule("Conv", "weighted", "QLinearConv", 1, (0,), _weight_axis, 2),
    OpRule("Gemm", "weighted", "QGemm", 1, (0,), _weight_axis, 2),
    OpRule("MatMul", "weighted", "QLinearMatMul / MatMulIntegerToFloat", 1, (0,), _weight_axis),
    OpRule(
        "ConvTranspose",
        "float",
        None,
        why_float="onnxruntime's CPU provider has no integer ConvTranspose (Q/DQ would run as "
        "DequantizeLinear + float ConvTranspose)",
    ),
    OpRule("Add", "elementwise", "QLinearAdd", data_inputs=(0, 1)),
    OpRule("Mul", "elementwise", "QLinearMul", data_inputs=(0, 1)),
    OpRule("Concat", "concat", "QLinearConcat"),
    OpRule("GlobalAveragePool", "unary", "QLinearGlobalAveragePool"),
    OpRule("AveragePool", "unary", "QLinearAveragePool"),
    OpRule("Sigmoid", "unary", "QLinearSigmoid"),
    OpRule("LeakyRelu", "unary", "QLinearLeakyRelu"),
    OpRule("MaxPool", "passthrough", "MaxPool (int8)"),
    OpRule("Reshape", "passthrough", "Reshape (int8)"),
    OpRule("Transpose", "passthrough", "Transpose (int8)"),
    OpRule("Flatten", "passthrough", "Flatten (int8)"),
    OpRule("Squeeze", "passthrough", "Squeeze (int8)"),
    OpRule("Unsqueeze", "passthrough", "Unsqueeze (int8)"),
    OpRule("Resize", "passthrough", "Resize (int8)"),
    OpRule("Slice", "passthrough", "Slice (int8)"),
    OpRule("Split", "passthrough", "Split (int8)"),
    OpRule("DepthToSpace", "passthrough", "DepthToSpace (int8)"),
    OpRule("SpaceToDepth", "passthrough", "SpaceToDepth (int8)"),
    OpRule("Relu", "activation", "absorbed into the producer's output range"),
    OpRule("Clip", "activation", "absorbed into the producer's output range"),
)

# Which weighted ops the user may ask for; the rest of the table follows from them.
WEIGHTED_OPS = tuple(op for op, rule in OP_TABLE.items() if rule.role == "weighted")


@dataclasses.dataclass
class ActivationPlan:
    """One activation tensor that gets a QuantizeLinear -> DequantizeLinear pair."""

    value: ir.Value
    group: str  # name of the tensor whose calibrated range sets this one's scale (itself, or the
    # input of a chain of pass-through ops)
    reason: str
    clip: tuple[float, float] | None = None  # bounds of an absorbed Relu/Clip
    graph: ir.Graph | None = None  # where the pair goes: the graph of its integer readers (an If
    # branch reading an outer-scope value gets its own pair); None: where the value is computed

    @property
    def name(self) -> str:
        return self.value.name or ""


@dataclasses.dataclass
class WeightPlan:
    """A weight stored as int8 + DequantizeLinear (per channel along ``axis``, or per tensor)."""

    node: ir.Node
    value: ir.Value
    axis: int | None


@dataclasses.dataclass
class NodeDecision:
    node: ir.Node
    kernel: str | None  # the integer kernel it becomes, or None when it stays float
    reason: str

    def to_json(self) -> dict[str, Any]:
        out = {"node": self.node.name, "op": self.node.op_type}
        if self.kernel:
            out["kernel"] = self.kernel
        out["reason"] = self.reason
        return out


@dataclasses.dataclass
class QuantPlan:
    """What static quantization will do to a graph, with reasons."""

    activations: dict[str, ActivationPlan]
    weights: list[WeightPlan]
    quantized: list[NodeDecision]
    floats: list[NodeDecision]
    per_channel: bool

    def groups(self) -> dict[str, ir.Value]:
        """Tensors to calibrate: one per scale group."""
        out: dict[str, ir.Value] = {}
        for plan in self.activations.values():
            if plan.group == plan.name:
                out[plan.name] = plan.value
        return out

    def clip_of(self, group: str) -> tuple[float, float] | None:
        return self.activations[group].clip if group in self.activations else None

    def to_json(self) -> dict[str, Any]:
        return {
            "quantized_nodes": [d.to_json() for d in self.quantized],
            "float_nodes": [d.to_json() for d in self.floats],
            "activation_tensors": len(self.activations),
            "weights": len(self.weights),
            "per_channel": self.per_channel,
        }


def _is_float(value: ir.Value | None) -> bool:
    return value is not None and value.dtype in FLOAT_TYPES


def _absorbable(node: ir.Node) -> tuple[float, float] | None:
    """The (lo, hi) bounds of a Relu or a constant Clip around 0, else None."""
    if node.op_type == "Relu":
        return 0.0, float("inf")
    if node.op_type != "Clip":
        return None
    lo, hi = -float("inf"), float("inf")
    if len(node.inputs) > 1 and node.inputs[1] is not None:
        c = _const(node.inputs[1])
        if c is None:
            return None
        lo = float(c)
    elif "min" in node.attributes:  # Clip-6
        lo = node.attributes.get_float("min")
    if len(node.inputs) > 2 and node.inputs[2] is not None:
        c = _const(node.inputs[2])
        if c is None:
            return None
        hi = float(c)
    elif "max" in node.attributes:
        hi = node.attributes.get_float("max")
    if not lo <= 0.0 <= hi:
        return None
    return lo, hi


def _output_point(
    node: ir.Node, excluded: Callable[[ir.Node], str | None]
) -> tuple[ir.Value, ir.Node | None, tuple[float, float] | None]:
    """The tensor that carries ``node``'s quantized output: its Relu/Clip's output when that
    activation is the only reader, else the node's own output."""
    out = node.outputs[0]
    uses = list(out.uses())
    if len(uses) == 1 and not out.is_graph_output():
        user = uses[0].node
        bounds = _absorbable(user)
        if (
            bounds is not None
            and user.graph is node.graph
            and user.inputs[0] is out
            and excluded(user) is None
        ):
            return user.outputs[0], user, bounds
    return out, None, None


def _weight_problem(node: ir.Node, rule: OpRule) -> str | None:
    """Why a weighted op cannot be quantized, or None."""
    if len(node.inputs) <= (rule.weight_input or 0) or node.inputs[rule.weight_input] is None:
        return "has no weight input"
    weight = node.inputs[rule.weight_input]
    array = _const(weight)
    if array is None:
        if node.op_type == "MatMul":
            return "both inputs are computed at run time (e.g. attention scores): kept float"
        return "weight is computed at run time, not an initializer"
    if array.dtype != np.float32:
        return f"weight is {array.dtype}, not float32"
    nonfinite = nonfinite_reason(array)
    if nonfinite:
        return f"weight {nonfinite}"
    if not _is_float(node.inputs[0]) and node.inputs[0].dtype is not None:
        # (unknown inside If branches, where shapes are not inferred: the op's type constraint
        # makes it the weight's float32)
        return "input is not float32"
    if node.op_type == "Gemm" and node.attributes.get_int("transA", 0):
        return "Gemm with transA=1 has no integer kernel"
    if node.op_type == "MatMul" and array.ndim != 2:
        return f"weight has rank {array.ndim}; the integer kernels take a 2-D weight"
    if node.op_type == "Gemm" and array.ndim != 2:
        return f"weight has rank {array.ndim}"
    if node.op_type == "Conv" and array.ndim < 3:
        return f"weight has rank {array.ndim}"
    if rule.bias_input is not None and len(node.inputs) > rule.bias_input:
        bias = node.inputs[rule.bias_input]
        if bias is not None and _const(bias) is None:
            return "bias is computed at run time"
    return None


def matmul_bias_as_gemm(model: ir.Model) -> list[str]:
    """Rewrite ``Add(MatMul(x, W), b)`` with a 2-D ``x``, a constant ``W: [K, N]`` and a constant per-column ``b``
    as ``Gemm(x, W, b)`` (the same numbers); returns the names of the MatMuls rewritten.

    TensorFlow exports (tf2onnx) write Dense layers this way. onnxruntime fuses such a pair into a Gemm itself, before
    its QDQ fusions: the quantized MatMul then runs as DequantizeLinear + float Gemm (an island), whereas a Gemm
    written with an int32 bias behind DequantizeLinear becomes QGemm. Inputs of rank 3 and up are left alone:
    onnxruntime keeps them MatMul (MatMulIntegerToFloat, bias Add after it).
    """
    done = []
    plan = []
    for node in model.graph:
        if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx"):
            continue
        x, w = node.inputs[0], _const(node.inputs[1])
        if w is None or w.ndim != 2 or w.dtype != np.float32:
            continue
        if x is None or x.shape is None or len(x.shape) != 2 or not _is_float(x):
            continue
        out = node.outputs[0]
        uses = list(out.uses())
        if len(uses) != 1 or out.is_graph_output():
            continue
        add, idx = uses[0].node, uses[0].idx
        if add.op_type != "Add" or add.domain not in ("", "ai.onnx"):
            continue
        bias = _const(add.inputs[1 - idx])
        n = w.shape[1]
        if bias is None or bias.dtype != np.float32 or bias.size != n or bias.shape[-1:] != (n,):
            continue
        plan.append((node, add, bias.reshape(n)))
    for node, add, bias in plan:
        name = f"{node.name or 'MatMul'}_bias"
        while name in model.graph.initializers:
            name += "_"
        b = ir.Value(name=name, const_value=ir.tensor(bias, name=name))
        b.shape, b.dtype = ir.Shape([bias.shape[0]]), ir.DataType.FLOAT
        model.graph.register_initializer(b)
        gemm = ir.node("Gemm", [node.inputs[0], node.inputs[1], b], name=node.name)
        model.graph.insert_before(node, gemm)
        old = add.outputs[0]
        gemm.outputs[0].name, old.name = old.name, f"{old.name}__matmul_add"
        gemm.outputs[0].shape, gemm.outputs[0].type = old.shape, old.type
        ir.convenience.replace_all_uses_with(old, gemm.outputs[0], replace_graph_outputs=True)
        stale = [add.inputs[1 - i] for i in range(2) if add.inputs[i] is node.outputs[0]]
        model.graph.remove([add, node], safe=True)
        for value in stale:
            if value is not None and not value.uses() and value.name in model.graph.initializers:
                del model.graph.initializers[value.name]
        done.append(node.name or "MatMul")
    return done


def build_plan(
    model: ir.Model,
    *,
    per_channel: bool = True,
    exclude_nodes: Iterable[str] = (),
    exclude_ops: Iterable[str] = (),
    ops: Iterable[str] | None = None,
    skip_graphs: Mapping[int, str] | None = None,
) -> QuantPlan:
    """Decide which tensors get Q/DQ and which nodes run as integer kernels.

    ops: the weighted op types to quantize (default all of `WEIGHTED_OPS`).
    skip_graphs: id(subgraph) -> why its ops stay float (a branch calibration never reached).

    The main graph, every If branch (nested Ifs too) and Loop bodies are planned, each on its
    own: a value computed outside a subgraph counts as float inside it, and an integer kernel in
    the subgraph that reads it gets its own pair there (onnxruntime fuses Q/DQ within one graph
    only). Graphs whose values `capture.subgraphs` cannot capture (Scan bodies, Ifs or Loops
    inside a Loop body) stay float, with that reason.
    """
    exclude_nodes = set(exclude_nodes)
    exclude_ops = set(exclude_ops)
    wanted_ops = set(ops) if ops is not None else set(WEIGHTED_OPS)
    skip_graphs = dict(skip_graphs or {})

    def excluded(node: ir.Node) -> str | None:
        if node.name in exclude_nodes:
            return "excluded by --exclude-nodes"
        if node.op_type in exclude_ops:
            return "excluded by --exclude-ops"
        return None

    activations: dict[str, ActivationPlan] = {}
    weights: list[WeightPlan] = []
    quantized: list[NodeDecision] = []
    floats: list[NodeDecision] = []
    for graph, why_not in capture.subgraphs(model):
        why_not = why_not or skip_graphs.get(id(graph))
        if why_not:
            floats.extend(
                NodeDecision(node, None, why_not)
                for node in graph
                if node.op_type in OP_TABLE and OP_TABLE[node.op_type].role == "weighted"
            )
            continue
        part = _plan_graph(graph, excluded, wanted_ops, per_channel, graph is model.graph)
        for key, act in part.activations.items():
            activations.setdefault(key, act)
        weights += part.weights
        quantized += part.quantized
        floats += part.floats
    return QuantPlan(activations, weights, quantized, floats, per_channel)


def _plan_graph(
    graph: ir.Graph,
    excluded: Callable[[ir.Node], str | None],
    wanted_ops: set[str],
    per_channel: bool,
    main: bool,
) -> QuantPlan:
    """`build_plan` for the nodes of one graph (not those of its subgraphs)."""
    nodes = list(graph)
    # names this graph's pairs on outer-scope values (branch names repeat across an export)
    tag = next((n.name for n in nodes if n.name), graph.name or "subgraph")
    # a subgraph's outputs are kept float like the model's (what reads them is planned apart)
    where = "model" if main else "subgraph"

    decisions: dict[int, NodeDecision] = {}  # id(node) -> decision
    # value -> group name of the int8 tensor carrying it (only values an integer op produces)
    available: dict[ir.Value, str] = {}
    clips: dict[ir.Value, tuple[float, float]] = {}
    absorbed_by: dict[int, ir.Node] = {}
    int_nodes: list[ir.Node] = []
    output_point: dict[int, ir.Value] = {}

    def produce(node: ir.Node, kernel: str, reason: str) -> None:
        point, activation, bounds = _output_point(node, excluded)
        decisions[id(node)] = NodeDecision(node, kernel, reason)
        int_nodes.append(node)
        output_point[id(node)] = point
        available[point] = point.name or ""
        if activation is not None:
            absorbed_by[id(activation)] = node
            clips[point] = bounds
            decisions[id(activation)] = NodeDecision(
                activation, "absorbed", f"absorbed into {node.name}'s quantized output range"
            )

    near_output = _near_outputs(graph)
    for node in nodes:
        if id(node) in decisions:
            continue
        rule = OP_TABLE.get(node.op_type) if node.domain in ("", "ai.onnx") else None
        if any(
            attr.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS)
            for attr in node.attributes.values()
        ):
            decisions[id(node)] = NodeDecision(
                node,
                None,
                f"{node.op_type} with subgraphs: no integer kernel (If branches are "
                "planned on their own)",
            )
            continue
        if rule is None:
            decisions[id(node)] = NodeDecision(
                node, None, "no integer kernel in onnxruntime's CPU provider"
            )
            continue
        reason = excluded(node)
        if reason:
            decisions[id(node)] = NodeDecision(node, None, reason)
            continue
        if rule.role == "float":
            decisions[id(node)] = NodeDecision(node, None, rule.why_float)
        elif rule.role == "weighted":
            if node.op_type not in wanted_ops:
                decisions[id(node)] = NodeDecision(
                    node, None, f"{node.op_type} not among the quantized op types"
                )
                continue
            problem = _weight_problem(node, rule)
            if problem is None and node.op_type == "Conv":
                point = _output_point(node, excluded)[0]
                if point in near_output:
                    how = "is" if point.is_graph_output() else "reaches through shape ops only"
                    problem = (
                        f"its output {how} {where} output {near_output[point]!r}: kept float so "
                        "the output keeps fp32 precision (QLinearConv would write it in 8 bits)"
                    )
            if problem:
                decisions[id(node)] = NodeDecision(node, None, problem)
            else:
                produce(node, rule.kernel or "", "weight and input quantized")
        elif any(out in near_output for out in node.outputs) and rule.role != "activation":
            reached = next(near_output[out] for out in node.outputs if out in near_output)
            decisions[id(node)] = NodeDecision(
                node,
                None,
                f"its output reaches {where} output {reached!r} through shape ops only: kept float",
            )
        elif rule.role in ("elementwise", "concat", "unary"):
            data = (
                [v for v in node.inputs if v is not None]
                if rule.role == "concat"
                else [node.inputs[i] for i in rule.data_inputs if i < len(node.inputs)]
            )
            missing = [v for v in data if v not in available]
            if not data or not all(_is_float(v) or v in available or v.dtype is None for v in data):
                decisions[id(node)] = NodeDecision(node, None, "inputs are not float tensors")
            elif missing:
                what = (
                    "a constant" if missing[0].const_value is not None else "computed by a float op"
                )
                decisions[id(node)] = NodeDecision(
                    node,
                    None,
                    f"input {missing[0].name!r} is {what}, not an int8 tensor: kept float",
                )
            else:
                produce(node, rule.kernel or "", "all inputs are int8 tensors")
        elif rule.role == "passthrough":
            data = node.inputs[0] if node.inputs else None
            if data in available and all(_is_float(o) or o.dtype is None for o in node.outputs):
                for out in node.outputs:
                    available[out] = available[data]
                decisions[id(node)] = NodeDecision(node, rule.kernel, "moves int8 data unchanged")
                int_nodes.append(node)
                output_point[id(node)] = node.outputs[0]
            else:
                decisions[id(node)] = NodeDecision(
                    node, None, "input is not an int8 tensor (no quantized producer)"
                )
        elif rule.role == "activation":
            decisions[id(node)] = NodeDecision(
                node, None, "not directly after a quantized op (nothing to absorb it)"
            )

    # Which int8 tensors are materialised as Q -> DQ pairs.
    activations: dict[str, ActivationPlan] = {}
    int_ids = {id(n) for n in int_nodes}

    def readers_int(value: ir.Value) -> bool:
        return any(
            id(u.node) in int_ids and u.node.op_type not in ("Relu", "Clip") for u in value.uses()
        )

    def add(value: ir.Value, group: str, reason: str) -> None:
        if value in near_output:
            return
        key = value.name or ""
        home = None
        if home_graph(value) is not graph:
            # An outer-scope value read by an integer kernel of this branch: its own pair here.
            key, home = f"{key}@{tag}", graph
        if key in activations:
            return
        activations[key] = ActivationPlan(value, group, reason, clips.get(value), home)

    # Inputs of integer ops: quantized where they are produced (their group), or at the boundary.
    for node in int_nodes:
        rule = OP_TABLE[node.op_type]
        if rule.role == "passthrough":
            continue
        indices = range(len(node.inputs)) if rule.role == "concat" else rule.data_inputs
        for i in indices:
            if i >= len(node.inputs) or node.inputs[i] is None:
                continue
            value = node.inputs[i]
            if value in available:
                continue  # handled below with its producer
            add(value, value.name or "", f"input of {node.name} ({node.op_type})")
    # Outputs of integer ops.
    for node in int_nodes:
        rule = OP_TABLE[node.op_type]
        point = output_point[id(node)]
        if rule.role == "passthrough":
            source = node.inputs[0]
            if source.name in activations:
                for out in node.outputs:
                    add(out, activations[source.name].group, f"int8 through {node.op_type}")
            continue
        needed = node.op_type not in ("MatMul", "Gemm")
        if needed:
            add(point, point.name or "", f"output of {node.name}: {rule.kernel} writes int8")
        elif point is not node.outputs[0]:
            # Without a Q after it, onnxruntime fuses Gemm + Relu into a float FusedGemm first.
            add(
                point,
                point.name or "",
                f"output of {node.name} with its {point.producer().op_type} absorbed",
            )
        elif readers_int(point) or _passthrough_feeds_int(point, int_ids):
            add(point, point.name or "", f"output of {node.name}, read by integer kernels")
    # Pass-through chains whose input got a pair: carried above in topological order only when the
    # producer came first; run once more for chains seeded late.
    for node in int_nodes:
        if OP_TABLE[node.op_type].role == "passthrough":
            source = node.inputs[0]
            if source.name in activations:
                for out in node.outputs:
                    add(out, activations[source.name].group, f"int8 through {node.op_type}")

    # Pass-through ops whose input ended up without a pair stay float after all.
    for node in int_nodes:
        if OP_TABLE[node.op_type].role == "passthrough" and node.outputs[0].name not in activations:
            decisions[id(node)] = NodeDecision(
                node, None, "its input stays float (no integer reader downstream)"
            )

    weights = []
    for node in int_nodes:
        rule = OP_TABLE[node.op_type]
        if rule.role != "weighted":
            continue
        axis = rule.weight_axis(node) if (per_channel and rule.weight_axis) else None
        weights.append(WeightPlan(node, node.inputs[rule.weight_input], axis))

    quantized = [d for n in nodes if (d := decisions.get(id(n))) and d.kernel]
    floats = [d for n in nodes if (d := decisions.get(id(n))) and not d.kernel]
    return QuantPlan(activations, weights, quantized, floats, per_channel)


def _near_outputs(graph: ir.Graph) -> dict[ir.Value, str]:
    """Values that become a model output through pass-through, unary or activation ops only
    (e.g. a detection head's Conv -> Split -> Sigmoid -> Reshape -> Transpose -> output), mapped
    to that output's name. Quantizing them would round the model's outputs themselves."""
    near: dict[ir.Value, str] = {}
    stack = [(v, v.name or "") for v in graph.outputs]
    while stack:
        value, output = stack.pop()
        if value in near:
            continue
        near[value] = output
        producer = value.producer()
        if producer is None or producer.domain not in ("", "ai.onnx"):
            continue
        rule = OP_TABLE.get(producer.op_type)
        if rule is None or rule.role not in ("passthrough", "unary", "activation"):
            continue
        if producer.inputs and producer.inputs[0] is not None:
            stack.append((producer.inputs[0], output))
    return near


def _passthrough_feeds_int(value: ir.Value, int_ids: set[int]) -> bool:
    """Whether a chain of int8 pass-through ops from ``value`` reaches an integer kernel."""
    for use in value.uses():
        node = use.node
        if id(node) not in int_ids:
            continue
        rule = OP_TABLE[node.op_type]
        if rule.role == "passthrough":
            if any(_passthrough_feeds_int(out, int_ids) for out in node.outputs):
                return True
        elif rule.role != "activation":
            return True
    return False
