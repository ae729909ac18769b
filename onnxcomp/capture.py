"""Stream chosen activations of a model over a data source into accumulators, in bounded memory.

Calibration observers, GPTQ/SparseGPT Hessians, per-channel means and norms (bias correction,
Wanda), SQNR and teacher outputs all need intermediate tensors. None of them keeps the tensors:
each is an `Accumulator` (``update(batch_array)`` folds one batch in, ``compute()`` gives the
result), and `accumulate` feeds every accumulator one batch at a time, then drops the batch.

Memory is bounded by ``budget_bytes`` (one batch of the captured tensors): the batch is made
smaller while one sample of every tensor fits, and when even one sample of all the tensors does
not, the tensors are asked for a few at a time, one onnxruntime run over the data for each such
set. Sizes come from the stored shapes, or from a one-sample probe when a shape is not known.
All runs share one session (`runtime.capture_session`), whose graph holds only the nodes the
captured tensors need: onnxruntime runs every node of its graph, whatever a run asks for.

    stats = {value: ChannelStats(axis=-1) for value in inputs}
    capture.accumulate(model, stats, data, limit=64)
    norms = {value: s.compute().l2 for value, s in stats.items()}   # Wanda's ||X_j||_2
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np
import onnx_ir as ir

from onnxcomp import runtime
from onnxcomp.data import Batch, DataSource
from onnxcomp.errors import OnnxcompError

logger = logging.getLogger(__name__)

# One batch of captured tensors may hold at most this much (a BERT layer stack asks for ~100
# tensors per sample; an LLM block's inputs at 2k tokens are 32 MB each).
CAPTURE_BUDGET_BYTES = 256 << 20
# Tensors of unknown size are measured on one sample, this many per probing run.
_PROBE_TENSORS = 16

TensorRef = ir.Value | str


@runtime_checkable
class Accumulator(Protocol):
    """Folds batches of one tensor into a running result; never keeps the batches themselves."""

    def update(self, batch: np.ndarray) -> None: ...

    def compute(self) -> Any: ...


def tensor_name(tensor: TensorRef) -> str:
    name = tensor if isinstance(tensor, str) else tensor.name
    if not name:
        raise OnnxcompError("capture: a tensor to capture has no name")
    return name


# ---------------------------------------------------------------------------------------------
# Planning the runs


def split_by_budget(items: list, cost: Callable[[Any], float], budget: float) -> list[list]:
    """Split ``items`` (in order) into runs whose summed ``cost`` stays within ``budget`` (at
    least one item each): tensors per capture run, layers per set of Hessians, weights per
    calibration pass."""
    runs: list[list] = []
    used = 0.0
    for item in items:
        c = cost(item)
        if runs and used + c <= budget:
            runs[-1].append(item)
            used += c
        else:
            runs.append([item])
            used = c
    return runs


def _known_bytes(value: ir.Value) -> tuple[int, int] | None:
    """(bytes per sample, bytes per run whatever the batch) from the stored shape, or None."""
    if value.shape is None or value.dtype is None:
        return None
    try:
        itemsize = value.dtype.itemsize
    except Exception:  # strings, unusual types
        return None
    dims = list(value.shape)
    if not dims:
        return 0, int(itemsize)
    rest = dims[1:]
    if not all(isinstance(d, int) for d in rest):
        return None
    size = math.prod(rest) * int(itemsize)
    if isinstance(dims[0], int):
        return 0, size * dims[0]  # a fixed first axis: the same size in every run
    return size, 0


def _values_by_name(model: ir.Model) -> dict[str, ir.Value]:
    values = {v.name: v for v in model.graph.inputs if v.name}
    for node in model.graph:
        for v in node.outputs:
            if v.name:
                values[v.name] = v
    return values


# ---------------------------------------------------------------------------------------------
# Values inside If branches


def _owners(model: ir.Model) -> dict[int, tuple[ir.Node, str]]:
    """id(subgraph) -> (the node holding it, the attribute name)."""
    owners: dict[int, tuple[ir.Node, str]] = {}
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        for attr in node.attributes.values():
            if attr.type == ir.AttributeType.GRAPH:
                owners[id(attr.value)] = (node, attr.name)
            elif attr.type == ir.AttributeType.GRAPHS:
                for graph in attr.value:
                    owners[id(graph)] = (node, attr.name)
    return owners


def _subgraph_values(model: ir.Model) -> dict[str, tuple[ir.Value, ir.Graph]]:
    """Values computed inside subgraphs, by name, with the graph computing them."""
    found: dict[str, tuple[ir.Value, ir.Graph]] = {}
    for graph in model.graphs():
        if graph is model.graph:
            continue
        for value in graph.inputs:  # a Loop body's iteration number, condition and state
            if value.name:
                found[value.name] = (value, graph)
        for node in graph:
            for value in node.outputs:
                if value.name:
                    found[value.name] = (value, graph)
    return found


def subgraphs(model: ir.Model) -> list[tuple[ir.Graph, str | None]]:
    """The main graph and every subgraph, outer first, each with why its values cannot be
    captured (None: they can, through `expose`): those of If branches can, and those of a Loop
    body (in the main graph or in If branches) as one more scan output stacked over the
    iterations; those of Scan bodies, of Ifs or Loops inside a Loop body (an iteration that
    skips a branch would break the stacking) and of custom ops' graphs cannot."""
    found: list[tuple[ir.Graph, str | None]] = []

    def walk(graph: ir.Graph, why: str | None, loop: ir.Node | None) -> None:
        found.append((graph, why))
        for node in graph:
            inner = []
            for attr in node.attributes.values():
                if attr.type == ir.AttributeType.GRAPH:
                    inner.append(attr.value)
                elif attr.type == ir.AttributeType.GRAPHS:
                    inner.extend(attr.value)
            if not inner:
                continue
            reason, inner_loop = why, loop
            standard = node.domain in ("", "ai.onnx")
            if reason is None and loop is not None:
                reason = (
                    f"inside {node.op_type} {node.name!r} within the body of Loop {loop.name!r}: "
                    "its values cannot be captured for calibration, kept float"
                )
            elif reason is None and standard and node.op_type == "Loop":
                inner_loop = node
            elif reason is None and not (standard and node.op_type == "If"):
                reason = (
                    f"inside the body of {node.op_type} {node.name!r}: its values cannot be "
                    "captured for calibration, kept float"
                )
            for g in inner:
                walk(g, reason, inner_loop)

    walk(model.graph, None, None)
    return found


def in_subgraphs(model: ir.Model, names: Sequence[str]) -> list[str]:
    """Those of ``names`` that the main graph does not compute (values inside If branches)."""
    main = _values_by_name(model)
    return [name for name in names if name not in main]


def expose(
    model: ir.Model, names: Sequence[str]
) -> tuple[ir.Model, dict[str, str], set[str]]:
    """A copy of ``model`` whose graph outputs include the named values computed inside If
    branches (nested Ifs too) and Loop bodies; returns it, {name: the graph output carrying it}
    and the names that come stacked over a Loop's iterations ([iterations, ...]).

    onnxruntime gives graph outputs only. Each value becomes one more output of its branch and of
    the If holding it (and of each enclosing If, up to the main graph); the other branch gives an
    empty float tensor there, so a run that did not take the branch returns an empty array for
    it (`accumulate` skips those: that sample never reached the value). A value in a Loop body
    becomes one more scan output of the body, which the Loop stacks over the iterations. Values
    `subgraphs` says cannot be captured (Scan bodies, Ifs inside a Loop body) are refused.
    """
    from onnxcomp import model as model_io

    copy = model_io.copy_model(model)
    owners = _owners(copy)
    inside = _subgraph_values(copy)
    names_used = {v.name for g in copy.graphs() for n in g for v in n.outputs if v.name}
    names_used |= {v.name for g in copy.graphs() for v in g.inputs if v.name}
    names_used |= {name for g in copy.graphs() for name in g.initializers}

    def fresh(hint: str) -> str:
        name, i = hint, 1
        while name in names_used:
            name = f"{hint}_{i}"
            i += 1
        names_used.add(name)
        return name

    exposed: dict[str, str] = {}
    stacked: set[str] = set()
    why_not = {id(graph): why for graph, why in subgraphs(copy)}
    for name in names:
        if name not in inside:
            raise OnnxcompError(f"capture: the model has no tensor named {name!r}")
        value, graph = inside[name]
        if why_not[id(graph)]:
            raise OnnxcompError(f"capture: {name!r} is {why_not[id(graph)].split(':')[0]}")
        while graph is not copy.graph:
            node, attr_name = owners[id(graph)]
            if value.is_graph_input() or any(out is value for out in graph.outputs):
                # already a branch output (the If's output there carries the other branch's
                # value when that one runs): exposed on its own through an Identity
                copy_node = ir.node("Identity", [value], name=fresh(f"{name}__exposed"))
                copy_node.outputs[0].name = fresh(f"{name}__exposed")
                graph.append(copy_node)
                value = copy_node.outputs[0]
            position = len(node.outputs)
            if node.op_type == "Loop":  # one more scan output: the body's values, stacked
                graph.outputs.append(value)
                stacked.add(name)
            for attr in ("then_branch", "else_branch") if node.op_type == "If" else ():
                branch = node.attributes[attr].value
                if attr == attr_name:
                    branch.outputs.append(value)
                else:
                    empty = ir.node(
                        "Constant",
                        [],
                        attributes={"value": ir.tensor(np.zeros([0] * max(_rank(value), 1), np.float32))},
                        name=fresh(f"{name}__not_taken"),
                    )
                    empty.outputs[0].name = fresh(f"{name}__not_taken")
                    branch.append(empty)
                    branch.outputs.append(empty.outputs[0])
            node.resize_outputs(position + 1)
            out = node.outputs[position]
            out.name = fresh(f"{name}__captured")
            out.type = ir.TensorType(ir.DataType.FLOAT)
            value, graph = out, node.graph
        copy.graph.outputs.append(value)
        exposed[name] = value.name
    return copy, exposed, stacked


def _rank(value: ir.Value) -> int:
    return len(value.shape) if value.shape is not None else 1


@dataclasses.dataclass
class CapturePlan:
    """How a capture runs: ``batch_size`` samples per batch, one run over the data per set of
    tensor names in ``runs``."""

    batch_size: int
    runs: list[list[str]]
    bytes_per_sample: dict[str, float]


def plan_runs(
    session,
    model: ir.Model,
    names: Sequence[str],
    data: DataSource,
    *,
    batch_size: int,
    budget_bytes: int,
) -> CapturePlan:
    """Choose the batch size and the sets of tensors per run so that one batch fits the budget.

    The batch shrinks first (more, smaller batches cost little); only when one sample of all the
    tensors exceeds the budget are they split into several runs (each a full pass over the data).
    """
    values = _values_by_name(model)
    per_sample: dict[str, float] = {}
    fixed: dict[str, float] = {}
    unknown = []
    for name in names:
        known = _known_bytes(values[name]) if name in values else None
        if known is None:
            unknown.append(name)
        else:
            per_sample[name], fixed[name] = known
    for i in range(0, len(unknown), _PROBE_TENSORS):
        chunk = unknown[i : i + _PROBE_TENSORS]
        for batch, arrays in runtime.iter_outputs(
            session, data, batch_size=1, limit=1, output_names=chunk, label="capture"
        ):
            for name in chunk:
                per_sample[name] = arrays[name].nbytes / max(len(batch), 1)
                fixed[name] = 0
        for name in chunk:  # no sample at all: nothing will run either
            per_sample.setdefault(name, 0.0)
            fixed.setdefault(name, 0)

    model_batch = runtime.fixed_batch(session)
    if model_batch is not None:
        batch_size = model_batch
    total_sample = sum(per_sample.values())
    total_fixed = sum(fixed.values())
    if model_batch is None and total_sample * batch_size + total_fixed > budget_bytes:
        room = budget_bytes - total_fixed
        smaller = max(1, int(room // total_sample)) if total_sample and room > 0 else 1
        if smaller < batch_size:
            logger.info(
                "capture: %d MB per batch of %d; batches of %d instead",
                int(total_sample * batch_size + total_fixed) >> 20,
                batch_size,
                smaller,
            )
            batch_size = smaller
    runs = split_by_budget(
        list(names), lambda name: per_sample[name] * batch_size + fixed[name], budget_bytes
    )
    if len(runs) > 1:
        logger.info(
            "capture: one batch of the %d tensors exceeds %d MB; %d runs over the data",
            len(names),
            budget_bytes >> 20,
            len(runs),
        )
    return CapturePlan(batch_size, runs, per_sample)


# ---------------------------------------------------------------------------------------------
# Streaming


def stream(
    model: ir.Model,
    tensors: Sequence[TensorRef],
    data: DataSource,
    *,
    batch_size: int = 32,
    limit: int | None = None,
    budget_bytes: int | None = None,
    threads: int = 1,
) -> Iterator[tuple[Batch, dict[str, np.ndarray]]]:
    """Yield ``(batch, {name: array})`` one batch at a time, within ``budget_bytes``.

    When the tensors do not fit one batch together, they come in several runs over the data: a
    yield then holds some of the names only, and each name sees every sample exactly once. Fold
    each array into running statistics and drop it.
    """
    names = list(dict.fromkeys(tensor_name(t) for t in tensors))
    if not names:
        return
    budget = CAPTURE_BUDGET_BYTES if budget_bytes is None else budget_bytes
    model, exposed, stacked = _exposed(model, names)
    outputs = [exposed.get(name, name) for name in names]
    back = {out: name for name, out in exposed.items()}
    session = runtime.capture_session(model, outputs, threads=threads)
    plan = plan_runs(session, model, outputs, data, batch_size=batch_size, budget_bytes=budget)
    for run_names in plan.runs:
        for batch, arrays in runtime.iter_outputs(
            session,
            data,
            batch_size=plan.batch_size,
            limit=limit,
            output_names=run_names,
            label="capture",
        ):
            yield batch, _unstack({back.get(k, k): v for k, v in arrays.items()}, stacked)


def _exposed(
    model: ir.Model, names: Sequence[str]
) -> tuple[ir.Model, dict[str, str], set[str]]:
    """``model`` itself when the main graph computes all of ``names``, else `expose`'s copy."""
    hidden = in_subgraphs(model, names)
    if not hidden:
        return model, {}, set()
    return expose(model, hidden)


def _unstack(arrays: dict[str, np.ndarray], stacked: set[str]) -> dict[str, np.ndarray]:
    """Values a Loop stacked ([iterations, batch, ...]) as one batch of iterations x batch."""
    for name in stacked & set(arrays):
        array = arrays[name]
        if array.ndim >= 2:
            arrays[name] = array.reshape(-1, *array.shape[2:])
    return arrays


def stream_pairs(
    model: ir.Model,
    reference: ir.Model,
    tensors: Sequence[TensorRef],
    data: DataSource,
    *,
    batch_size: int = 32,
    limit: int | None = None,
    budget_bytes: int | None = None,
    threads: int = 1,
) -> Iterator[tuple[Batch, dict[str, np.ndarray], dict[str, np.ndarray]]]:
    """`stream` over two models that name the same tensors (a model and the reference it was
    compressed from), in lockstep: ``(batch, {name: model's}, {name: reference's})``, both arrays
    computed on the same samples. Each model gets half the budget."""
    names = list(dict.fromkeys(tensor_name(t) for t in tensors))
    if not names:
        return
    budget = (CAPTURE_BUDGET_BYTES if budget_bytes is None else budget_bytes) // 2
    model, exposed, stacked = _exposed(model, names)
    reference, ref_exposed, _ = _exposed(reference, names)
    outputs = [exposed.get(name, name) for name in names]
    ref_of = {exposed.get(name, name): ref_exposed.get(name, name) for name in names}
    back = {out: name for name, out in exposed.items()}
    session = runtime.capture_session(model, outputs, threads=threads)
    ref_session = runtime.capture_session(reference, list(ref_of.values()), threads=threads)
    plan = plan_runs(session, model, outputs, data, batch_size=batch_size, budget_bytes=budget)
    for run_names in plan.runs:
        for batch, arrays in runtime.iter_outputs(
            session, data, batch_size=plan.batch_size, limit=limit, output_names=run_names, label="capture"
        ):
            ref_names = [ref_of[n] for n in run_names]
            ref = runtime.run(ref_session, batch.inputs, ref_names, "capture (reference)")
            yield (
                batch,
                _unstack({back.get(k, k): v for k, v in arrays.items()}, stacked),
                _unstack({back.get(n, n): ref[r] for n, r in zip(run_names, ref_names)}, stacked),
            )


def token_positions(batch: Batch) -> np.ndarray | None:
    """The real (not padded) token positions of a batch, (batch, seq) bool, from an integer input
    of rank 2 named ``attention_mask`` (or ``*mask*``); None when the batch has no such input."""
    named = sorted(batch.inputs, key=lambda n: (n != "attention_mask", n))
    for name in named:
        array = np.asarray(batch.inputs[name])
        if "mask" in name.lower() and array.ndim == 2 and array.dtype.kind in "iub":
            return array != 0
    return None


def _at_positions(array: np.ndarray, positions: np.ndarray | None) -> np.ndarray:
    """``array[positions]``: (kept positions, features) for a (batch, seq, features) tensor whose
    first two axes are the mask's; any other tensor as it is."""
    if positions is None or array.ndim != 3 or array.shape[:2] != positions.shape:
        return array
    return array[positions]


def accumulate(
    model: ir.Model,
    accumulators: Mapping[TensorRef, Accumulator | Sequence[Accumulator]],
    data: DataSource,
    *,
    batch_size: int = 32,
    limit: int | None = None,
    budget_bytes: int | None = None,
    positions: Callable[[Batch], np.ndarray | None] | None = None,
    reference: ir.Model | None = None,
) -> int:
    """Stream the keyed tensors over ``data`` into their accumulators; returns the samples seen.

    Several accumulators may watch one tensor (give a list). ``positions`` (e.g.
    `token_positions`) picks the rows that count: a (batch, seq, features) tensor is then handed
    over as (real positions, features), so padded tokens weigh nothing in a statistic and every
    real token weighs the same. With ``reference`` (a model naming the same tensors), each
    accumulator gets ``update(array, reference_array)``: the same tensor of both models on the same
    samples (`stream_pairs`). Raises OnnxcompError when the data has no sample.
    """
    by_name: dict[str, list[Accumulator]] = {}
    for tensor, accs in accumulators.items():
        group = [accs] if isinstance(accs, Accumulator) else list(accs)
        by_name.setdefault(tensor_name(tensor), []).extend(group)
    seen: dict[str, int] = dict.fromkeys(by_name, 0)
    main_names = set(by_name) - set(in_subgraphs(model, list(by_name)))
    options = {"batch_size": batch_size, "limit": limit, "budget_bytes": budget_bytes}
    if reference is None:
        batches = ((b, a, None) for b, a in stream(model, list(by_name), data, **options))
    else:
        batches = stream_pairs(model, reference, list(by_name), data, **options)
    streamed = 0
    for batch, arrays, ref_arrays in batches:
        streamed += len(batch)
        mask = positions(batch) if positions is not None else None
        for name, array in arrays.items():
            if array.size == 0 and name not in main_names:
                continue  # an If branch this batch did not take (see `expose`)
            seen[name] += len(batch)
            array = _at_positions(array, mask)
            if ref_arrays is None:
                for acc in by_name[name]:
                    acc.update(array)
            else:
                ref = _at_positions(ref_arrays[name], mask)
                for acc in by_name[name]:
                    acc.update(array, ref)
    samples = max(seen.values(), default=0)
    if by_name and streamed == 0:  # (values in untaken If branches alone see none either)
        raise OnnxcompError(f"{getattr(data, 'name', 'data')}: no samples to capture")
    return samples


# ---------------------------------------------------------------------------------------------
# Accumulators used by several capabilities


@dataclasses.dataclass
class ChannelSummary:
    """Per-channel statistics of a tensor over all the positions seen (shapes ``(channels,)``)."""

    count: int  # positions per channel (samples x all non-channel positions)
    mean: np.ndarray
    l2: np.ndarray  # sqrt(sum x^2): Wanda's input norm ||X_j||_2
    absmax: np.ndarray
    min: np.ndarray
    max: np.ndarray

    @property
    def rms(self) -> np.ndarray:
        return self.l2 / math.sqrt(max(self.count, 1))


class ChannelStats:
    """Running per-channel count, sum, sum of squares and range along ``axis`` (float64 sums).

    ``axis=1`` for NCHW Conv inputs, ``-1`` for the features of MatMul/Gemm inputs.
    """

    def __init__(self, axis: int = -1):
        self.axis = axis
        self.count = 0
        self._sum: np.ndarray | None = None
        self._sq: np.ndarray | None = None
        self._min: np.ndarray | None = None
        self._max: np.ndarray | None = None

    def update(self, batch: np.ndarray) -> None:
        x = np.asarray(batch)
        axis = self.axis % x.ndim
        x = np.moveaxis(x, axis, -1).reshape(-1, x.shape[axis])  # (positions, channels)
        s = np.sum(x, axis=0, dtype=np.float64)
        x64 = x.astype(np.float64, copy=False)
        sq = np.einsum("pc,pc->c", x64, x64)
        lo, hi = x.min(axis=0), x.max(axis=0)
        if self._sum is None:
            self._sum, self._sq, self._min, self._max = s, sq, lo, hi
        else:
            self._sum += s
            self._sq += sq
            self._min = np.minimum(self._min, lo)
            self._max = np.maximum(self._max, hi)
        self.count += x.shape[0]

    def compute(self) -> ChannelSummary:
        if self._sum is None:
            raise OnnxcompError("ChannelStats: no inputs seen")
        return ChannelSummary(
            count=self.count,
            mean=self._sum / max(self.count, 1),
            l2=np.sqrt(self._sq),
            absmax=np.maximum(np.abs(self._min), np.abs(self._max)),
            min=self._min,
            max=self._max,
        )


class SignalToNoise:
    """Signal-to-noise ratio in dB of ``approx(x)`` against ``x``, summed over all batches.

    ``approx`` maps a float32 batch to what a compressed model would compute instead (for an
    activation: its quantize-dequantize). inf when exact, -inf when the signal is zero.
    """

    def __init__(self, approx: Callable[[np.ndarray], np.ndarray]):
        self.approx = approx
        self.signal = 0.0
        self.noise = 0.0

    def update(self, batch: np.ndarray) -> None:
        ref = np.asarray(batch, np.float32)
        approx = self.approx(ref)
        ref64 = ref.astype(np.float64)
        self.signal += float(np.sum(ref64 * ref64))
        self.noise += float(np.sum((ref64 - approx) ** 2))

    def compute(self) -> float:
        if self.noise == 0:
            return math.inf
        if self.signal == 0:
            return -math.inf
        return 10 * math.log10(self.signal / self.noise)


class Each:
    """An accumulator that calls ``fn(batch)``: for statistics whose state lives in the caller."""

    def __init__(self, fn: Callable[[np.ndarray], None]):
        self.fn = fn

    def update(self, batch: np.ndarray) -> None:
        self.fn(batch)

    def compute(self) -> None:
        return None


class Collect:
    """Keep the batches themselves (teacher outputs for distillation), up to ``max_bytes``.

    The one accumulator that stores tensors: for model outputs and small features only. Raises
    OnnxcompError naming the budget when the data would exceed it.
    """

    def __init__(self, max_bytes: int = CAPTURE_BUDGET_BYTES):
        self.max_bytes = max_bytes
        self.parts: list[np.ndarray] = []
        self.nbytes = 0

    def update(self, batch: np.ndarray) -> None:
        array = np.array(batch)  # a copy: onnxruntime may reuse the buffer
        if self.nbytes + array.nbytes > self.max_bytes:
            raise OnnxcompError(
                f"capture: keeping these tensors needs more than {self.max_bytes >> 20} MB; "
                "use fewer samples or running statistics"
            )
        self.parts.append(array)
        self.nbytes += array.nbytes

    def compute(self) -> np.ndarray:
        if not self.parts:
            raise OnnxcompError("Collect: no inputs seen")
        return np.concatenate(self.parts, axis=0)
