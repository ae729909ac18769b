"""The optimizer's self-check: run the input and the cleaned model in onnxruntime, judge the
difference, and find the rewrite instances at fault so they can be left out.

A difference above the tolerance is not yet a fault: fp32 arithmetic in the input graph has
its own error, and a fused op (LayerNormalization on inputs with a large offset, say) can be
nearer the exact result than the decomposed chain it replaces. So the input model is also run
in float64 (``as_float64``: the same graph with every float32 tensor widened), and a candidate
passes when its distance from that float64 result stays within what fp32 noise already puts
between the input model and it.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxcomp import model as model_io
from onnxcomp.errors import OnnxcompError
from onnxcomp.ops import FLOAT32_ONLY

logger = logging.getLogger(__name__)

# A candidate may be this many times farther from the float64 result than the fp32 input model
# is, and still count as fp32 noise (both are fp32 evaluations of the same function).
NOISE_FACTOR = 2.0


def check_data(model: ir.Model, data: Any, samples: int, shapes: dict[str, list[int]]):
    """The data of the self-check: the user's, or random inputs of the model's input specs."""
    from onnxcomp.data import RandomData

    if data is not None:
        return data
    return RandomData(model_io.input_specs(model), samples=samples, shapes=shapes)


def worst_error(comparison) -> tuple[float, str | None]:
    """The largest max_rel_error over outputs (inf for a non-numeric output that differs)."""
    worst, where = 0.0, None
    for stats in comparison.outputs:
        js = stats.to_json()
        err = js.get("max_rel_error")
        if err is None:
            err = 0.0 if js.get("identical", True) else float("inf")
        if err != err:  # NaN in one model and not the other
            err = float("inf")
        if err > worst:
            worst, where = err, stats.name
    return worst, where


def as_float64(model: ir.Model) -> ir.Model | str:
    """A copy of ``model`` computing in float64: float32 initializers, constants and Casts widened,
    inputs cast up on entry and outputs cast back to float32 (so it takes the same feeds and its
    outputs compare with the original's). Ops onnxruntime runs only in float32
    (``ops.FLOAT32_ONLY``: Conv, pooling, Erf, ...) stay float32 between Casts, so the result is
    exact everywhere but there. A reason string when the graph cannot be widened."""
    work = model.clone()
    graph = work.graph
    if any(n.op_type in ("If", "Loop", "Scan") for n in ir.traversal.RecursiveGraphIterator(graph)):
        return "the graph has subgraphs (If/Loop/Scan)"
    model_io.normalize(work)  # Constant nodes lifted, types inferred: which values are float32
    float32, float64 = ir.DataType.FLOAT, ir.DataType.DOUBLE
    widen = {id(v) for v in graph.inputs if v.dtype == float32}
    widen |= {id(v) for v in graph.initializers.values() if v.dtype == float32}
    widen |= {id(v) for n in graph for v in n.outputs if v.dtype == float32}
    kept: set[int] = set()  # the Casts written here
    narrow: dict[int, ir.Value] = {}  # an up-Cast's float64 output -> the float32 value it widens
    for index, node in enumerate(list(graph)):
        if node.op_type not in FLOAT32_ONLY or node.domain not in ("", "ai.onnx"):
            continue
        where = node.name or f"{node.op_type}_{index}"  # the Casts' names must be unique
        for i, value in enumerate(node.inputs):
            if value is not None and id(value) in narrow:  # float32-only op after another one
                node.replace_input_with(i, narrow[id(value)])
            elif value is not None and id(value) in widen:
                down = ir.node("Cast", [value], {"to": float32}, name=f"{where}__in{i}_float32")
                down.outputs[0].type = ir.TensorType(float32)
                graph.insert_before(node, down)
                node.replace_input_with(i, down.outputs[0])
                kept.add(id(down))
        for value in node.outputs:
            if id(value) not in widen:
                continue
            widen.discard(id(value))
            up = ir.node("Cast", [value], {"to": float64}, name=f"{where}__out_float64")
            graph.insert_after(node, up)
            kept.add(id(up))
            name = value.name
            ir.convenience.replace_all_uses_with(value, up.outputs[0], replace_graph_outputs=True)
            up.replace_input_with(0, value)
            value.name, up.outputs[0].name = f"{name}__float32", name
            up.outputs[0].type = ir.TensorType(float64)
            up.outputs[0].shape = value.shape
            narrow[id(up.outputs[0])] = value
    for value in list(graph.initializers.values()):
        if id(value) in widen and value.const_value is not None:
            value.const_value = ir.tensor(
                value.const_value.numpy().astype(np.float64), name=value.name
            )
    for node in list(graph):
        if id(node) in kept:
            continue
        if node.op_type == "Cast" and node.attributes.get_int("to") == float32:
            node.attributes["to"] = ir.AttrInt64("to", float64)
        elif node.op_type == "Constant" and "value" in node.attributes:
            tensor = node.attributes["value"].value
            if tensor.dtype == float32:
                node.attributes["value"] = ir.AttrTensor(
                    "value", ir.tensor(tensor.numpy().astype(np.float64))
                )
        elif node.op_type in (
            "ConstantOfShape",
            "EyeLike",
            "RandomNormal",
            "RandomUniform",
        ) or node.domain not in (
            "",
            "ai.onnx",
        ):
            if node.op_type != "ConstantOfShape" or "value" in node.attributes:
                return f"{node.op_type} {node.name!r} fixes its own output type"
    for g_value in [*graph.initializers.values(), *(v for n in graph for v in n.outputs)]:
        if id(g_value) in widen:
            g_value.type = ir.TensorType(float64)  # a new type: clones share type objects
    for value in list(graph.inputs):
        if value.dtype != float32 or not value.uses():
            continue
        cast = ir.node("Cast", [value], {"to": float64}, name=f"{value.name}__to_float64")
        cast.outputs[0].type = ir.TensorType(float64)
        cast.outputs[0].shape = value.shape
        cast.outputs[0].name = f"{value.name}__float64"
        ir.convenience.replace_all_uses_with(value, cast.outputs[0])
        cast.replace_input_with(0, value)
        graph.insert_before(next(iter(graph)), cast)
    for i, value in enumerate(list(graph.outputs)):
        if value.dtype != float64:
            continue
        if value.producer() is None:
            return f"output {value.name!r} is not computed by a node"
        name = value.name
        value.name = f"{name}__float64"
        cast = ir.node("Cast", [value], {"to": float32}, name=f"{name}__to_float32")
        cast.outputs[0].name = name
        cast.outputs[0].type = ir.TensorType(float32)
        cast.outputs[0].shape = value.shape
        graph.append(cast)
        graph.outputs[i] = cast.outputs[0]
    return work


@dataclasses.dataclass
class Verdict:
    """The self-check's answer for one candidate."""

    passed: bool
    report: dict[str, Any]

    @property
    def error(self) -> float:
        return self.report["max_rel_error"]


class Judge:
    """Compares candidates with the input model, and with its float64 evaluation when the fp32
    difference alone is above the tolerance."""

    def __init__(
        self,
        reference: ir.Model,
        data: Any,
        *,
        tolerance: float,
        samples: int = 4,
        shapes: dict[str, list[int]] | None = None,
        limit: int = 64,
    ):
        self.reference = reference
        self.tolerance = tolerance
        self.source = check_data(reference, data, samples, shapes or {})
        self.limit = None if data is None else limit
        self._truth: ir.Model | str | None = None
        self._reference_error: float | None = None
        # the outputs of the input model and of its float64 evaluation, each run once: the
        # fault search judges many candidates against them
        self._outputs: dict[str, Any] = {}

    def _reference(self, which: str):
        """The outputs of the input model ("input") or of its float64 evaluation ("float64"),
        each computed once: the session that made them is released before any candidate's is
        made (a large model is never in memory twice)."""
        from onnxcomp.evaluate import ReferenceOutputs

        if which not in self._outputs:
            model = self.reference if which == "input" else self._truth
            outputs = ReferenceOutputs(model, self.source, limit=self.limit, label=f"{which} model")
            outputs.collect()
            self._outputs[which] = outputs
        return self._outputs[which]

    def _compare(self, which: str, candidate: ir.Model):
        from onnxcomp.evaluate import compare

        return compare(self._reference(which), candidate)

    def truth(self) -> ir.Model | str:
        """The float64 evaluation of the input model (built once), or why there is none."""
        if self._truth is None:
            truth = self._truth = as_float64(self.reference)
            if not isinstance(truth, str):
                try:
                    self._reference_error = worst_error(self._compare("float64", self.reference))[0]
                except OnnxcompError as err:
                    self._truth = f"onnxruntime cannot run it in float64 ({err})"
        return self._truth

    def __call__(self, candidate: ir.Model) -> Verdict:
        self._reference("input")  # an input model that cannot run is the user's error
        try:
            comparison = self._compare("input", candidate)
        except OnnxcompError as err:  # a rewrite made a graph onnxruntime refuses: a fault too
            return Verdict(False, {
                "samples": 0, "data": self.source.name, "max_rel_error": float("inf"),
                "worst_output": None, "tolerance": self.tolerance, "max_abs_error": float("inf"),
                "unrunnable": str(err).splitlines()[0][:300],
            })  # fmt: skip
        worst, where = worst_error(comparison)
        report: dict[str, Any] = {
            "samples": comparison.samples,
            "data": self.source.name,
            "max_rel_error": worst,
            "worst_output": where,
            "tolerance": self.tolerance,
            "max_abs_error": max((s.max_abs for s in comparison.outputs), default=0.0),
        }
        if worst <= self.tolerance:
            return Verdict(True, report)
        truth = self.truth()
        if isinstance(truth, str):
            report["float64"] = {"unavailable": truth}
            return Verdict(False, report)
        candidate_error = worst_error(self._compare("float64", candidate))[0]
        allowance = max(self.tolerance, NOISE_FACTOR * self._reference_error)
        report["float64"] = {
            "input_error": self._reference_error,  # fp32 input model vs its float64 evaluation
            "candidate_error": candidate_error,
            "allowance": allowance,
        }
        return Verdict(candidate_error <= allowance, report)


@dataclasses.dataclass
class Fault:
    """A rewrite instance left out because it changes the outputs beyond fp32 noise."""

    rule: str
    node: str
    key: tuple[str, str, str]
    check: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        entry = {"rule": self.rule, "node": self.node, "max_rel_error": self.check["max_rel_error"]}
        f64 = self.check.get("float64", {})
        if "candidate_error" in f64:
            entry["float64_error"] = f64["candidate_error"]
            entry["fp32_noise"] = f64["input_error"]
        return entry

    def note(self) -> str:
        f64 = self.check.get("float64", {})
        text = (
            f"left out {self.rule} at {self.node!r}: it changes the outputs by "
            f"{self.check['max_rel_error']:.3g} (relative; tolerance {self.check['tolerance']:g})"
        )
        if "candidate_error" in f64:
            text += (
                f", {f64['candidate_error']:.3g} from the float64 result where fp32 noise "
                f"explains {f64['input_error']:.3g}"
            )
        elif "unrunnable" in self.check:
            text = f"left out {self.rule} at {self.node!r}: {self.check['unrunnable']}"
        elif "unavailable" in f64:
            text += f" (no float64 evaluation: {f64['unavailable']})"
        return text


# apply(rules, exclude, limit) -> (model, applied instances [(rule, node label, key)])
Apply = Callable[..., tuple[ir.Model, list[tuple[str, str, tuple[str, str, str]]]]]


def find_fault(
    rule_names: Sequence[str],
    apply: Apply,
    judge: Judge,
    exclude: set,
    failing: tuple[Verdict, list] | None = None,
) -> Fault | None:
    """Bisect the rules (in order) for the first whose prefix fails the check, then bisect its
    instances for the first one that fails: that instance, or None when no single one does.
    About log2(rules) + log2(instances) checks, where one more rule at a time took one per rule.
    ``failing``: the verdict and applied instances of all the rules, when already judged."""
    tried: dict[int, tuple[Any, list]] = {}  # prefix length -> (verdict, its applied instances)
    if failing is not None:
        tried[len(rule_names)] = failing

    def verdict_of(k: int) -> Any:
        if k not in tried:
            candidate, applied = apply(rule_names[:k], exclude, None)
            tried[k] = (judge(candidate), applied)
        return tried[k][0]

    lo, hi = 0, len(rule_names)  # the prefix of lo rules passes (none applied), hi fails
    if verdict_of(hi).passed:
        return None
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if verdict_of(mid).passed:
            lo = mid
        else:
            hi = mid
    name = rule_names[hi - 1]
    failing = tried[hi][0]
    mine = [(label, key) for rule, label, key in tried[hi][1] if rule == name]
    if not mine:
        return None
    first, last = 1, len(mine)  # the smallest n whose first n instances fail
    while first < last:
        mid = (first + last) // 2
        candidate, _ = apply(rule_names[:hi], exclude, (name, mid))
        verdict = judge(candidate)
        if verdict.passed:
            first = mid + 1
        else:
            last, failing = mid, verdict
    label, key = mine[first - 1]
    return Fault(name, label, key, failing.report)
