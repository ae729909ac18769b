"""Latency, throughput and peak memory of models in onnxruntime, and what its optimizer made of
each graph (fused integer kernels versus Q/DQ islands left behind).

Latency is measured interleaved in one process: round after round, each model runs a short
block of warm runs (the model that starts a round rotates), so machine noise hits all models
alike and the ratio of their medians is fair. Peak memory is measured in one child process per model: the growth of
the child's peak resident set from just after its imports (and after loading the inputs) to after
creating the session and running it a few times. On Linux the peak is ``VmHWM``, reset after the
imports through ``/proc/self/clear_refs``; elsewhere ``ru_maxrss``.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import gc
import json
import logging
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from onnxcomp import model as model_io
from onnxcomp import runtime
from onnxcomp.data import DataSource, RandomData, open_data
from onnxcomp.errors import OnnxcompError
from onnxcomp.runtime import ModelLike
from onnxcomp.summary import expand_shapes

logger = logging.getLogger(__name__)

# Integer kernels onnxruntime's CPU provider runs after folding Q/DQ pairs (or that quantizers
# write directly). A quantized graph where these replaced the float ops is what pays off.
INTEGER_KERNELS = frozenset(
    {
        "QLinearConv",
        "QGemm",
        "QLinearMatMul",
        "MatMulInteger",
        "ConvInteger",
        "DynamicQuantizeMatMul",
        "MatMulIntegerToFloat",
        "DynamicQuantizeLinear",
        "DynamicQuantizeLSTM",
        "MatMulNBits",
        "MatMulBnb4",
        "GatherBlockQuantized",
        "QAttention",
        "QEmbedLayerNormalization",
        "QLinearAdd",
        "QLinearMul",
        "QLinearConcat",
        "QLinearGlobalAveragePool",
        "QLinearAveragePool",
        "QLinearSigmoid",
        "QLinearLeakyRelu",
        "QLinearSoftmax",
        "QLinearReduceMean",
        "QLinearWhere",
        "QLinearConvTranspose",
        "NhwcQLinearConv",
    }
)
QDQ_OPS = frozenset({"QuantizeLinear", "DequantizeLinear"})
# Ops that only move or reshape data: a DequantizeLinear feeding one of them is not (yet) an
# island, the float compute is further down.
LAYOUT_OPS = frozenset(
    {
        "Reshape",
        "Transpose",
        "Squeeze",
        "Unsqueeze",
        "Flatten",
        "Identity",
        "Shape",
        "Size",
        "Gather",
        "Slice",
        "Split",
        "Concat",
        "Expand",
        "Tile",
    }
)

TOP_OPS = 10
MEMORY_RUNS = 3


def graph_report(model: ModelLike, *, threads: int = 1, label: str = "model") -> dict[str, Any]:
    """What onnxruntime's optimizer made of a graph: fused integer kernels, Q/DQ nodes left,
    DequantizeLinear islands (feeding float compute), node count and top op types.

    The optimized graph is written to a temporary file for inspection only and deleted.
    """
    tmpdir = tempfile.mkdtemp(prefix="onnxcomp-optimized-")
    path = os.path.join(tmpdir, "optimized.onnx")
    try:
        runtime.create_session(model, threads=threads, optimized_model_path=path, label=label)
        try:
            optimized = onnx.load(path, load_external_data=False)
        except Exception as err:
            logger.info("%s: cannot read onnxruntime's optimized graph: %s", label, err)
            return {
                "unavailable": f"onnxruntime's optimized graph is unreadable ({type(err).__name__})"
            }
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    report = count_kernels(optimized)
    report["nodes_before"] = _node_count(model)
    return report


def count_kernels(proto: onnx.ModelProto) -> dict[str, Any]:
    """Fused integer kernels, Q/DQ nodes and DequantizeLinear islands of an (optimized) graph."""
    ops: collections.Counter[str] = collections.Counter()
    integer: collections.Counter[str] = collections.Counter()
    island_consumers: dict[int, str] = {}
    islands = 0
    for graph in _proto_graphs(proto.graph):
        consumers: dict[str, list[onnx.NodeProto]] = collections.defaultdict(list)
        for node in graph.node:
            for name in node.input:
                if name:
                    consumers[name].append(node)
        for node in graph.node:
            ops[node.op_type] += 1
            if node.op_type in INTEGER_KERNELS:
                integer[node.op_type] += 1
            if node.op_type != "DequantizeLinear":
                continue
            compute = _float_compute_consumers(node.output[0], consumers)
            if compute:
                islands += 1
                island_consumers.update((id(n), n.op_type) for n in compute)
    return {
        "nodes": sum(ops.values()),
        "integer_kernels": sum(integer.values()),
        "integer_kernel_ops": dict(integer.most_common()),
        "quantize_linear": ops["QuantizeLinear"],
        "dequantize_linear": ops["DequantizeLinear"],
        "islands": islands,
        # float compute nodes fed by those islands, by op type (each node counted once)
        "island_consumers": dict(collections.Counter(island_consumers.values()).most_common()),
        "top_ops": dict(ops.most_common(TOP_OPS)),
    }


def _float_compute_consumers(
    name: str, consumers: Mapping[str, list[onnx.NodeProto]]
) -> list[onnx.NodeProto]:
    """The float compute nodes reading ``name``, looking through layout ops."""
    found = []
    seen = set()
    stack = [name]
    while stack:
        current = stack.pop()
        for node in consumers.get(current, []):
            if id(node) in seen:
                continue
            seen.add(id(node))
            if node.op_type in QDQ_OPS or node.op_type in INTEGER_KERNELS:
                continue
            if node.op_type in LAYOUT_OPS:
                stack.extend(o for o in node.output if o)
                continue
            found.append(node)
    return found


def _proto_graphs(graph: onnx.GraphProto):
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _proto_graphs(attr.g)
            for sub in attr.graphs:
                yield from _proto_graphs(sub)


def _node_count(model: ModelLike) -> int | None:
    if isinstance(model, ir.Model):
        return sum(1 for _ in ir.traversal.RecursiveGraphIterator(model.graph))
    try:
        if isinstance(model, bytes):
            proto = onnx.load_from_string(model)
        else:
            proto = onnx.load(model, load_external_data=False)
    except Exception:
        return None
    return sum(len(g.node) for g in _proto_graphs(proto.graph))


# ---------------------------------------------------------------------------------------------
# Results


@dataclasses.dataclass
class ModelBench:
    """Measurements of one model."""

    name: str
    latencies_ms: np.ndarray
    batch: int
    peak_memory_bytes: int | None = None
    memory_error: str | None = None
    graph: dict[str, Any] = dataclasses.field(default_factory=dict)
    ratio_p50: float = 1.0

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.latencies_ms, q))

    @property
    def p50_ms(self) -> float:
        return self.percentile(50)

    @property
    def throughput(self) -> float:
        """Samples per second at the median latency (the mean follows rare stalls of a
        noisy machine)."""
        return self.batch / (self.p50_ms / 1000.0)

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.name,
            "latency_ms": {
                "p50": self.percentile(50),
                "p90": self.percentile(90),
                "p99": self.percentile(99),
                "mean": float(np.mean(self.latencies_ms)),
                "min": float(np.min(self.latencies_ms)),
            },
            "ratio_p50": self.ratio_p50,
            "throughput_samples_per_s": self.throughput,
            "peak_memory_bytes": self.peak_memory_bytes,
            "memory_error": self.memory_error,
            "graph": self.graph,
        }


@dataclasses.dataclass
class BenchResult:
    """Interleaved latency of several models; ratios are to the first."""

    models: list[ModelBench]
    threads: int
    runs: int
    warmup: int
    batch: int
    inputs: dict[str, dict[str, Any]]
    feeds_from: str

    def to_json(self) -> dict[str, Any]:
        return {
            "threads": self.threads,
            "runs": self.runs,
            "warmup": self.warmup,
            "batch": self.batch,
            "inputs": self.inputs,
            "feeds_from": self.feeds_from,
            "memory_method": "peak RSS of a child process per model after creating the session "
            f"and {MEMORY_RUNS} runs, minus its RSS after imports (Linux VmHWM, else ru_maxrss)",
            "models": [m.to_json() for m in self.models],
        }


# ---------------------------------------------------------------------------------------------
# Benchmark


def benchmark(
    models: Sequence[ModelLike],
    *,
    threads: int = 1,
    runs: int = 100,
    warmup: int = 10,
    feeds: Mapping[str, np.ndarray] | None = None,
    data: DataSource | str | os.PathLike | None = None,
    shapes: Mapping[str, Sequence[int]] | None = None,
    batch_size: int = 1,
    memory: bool = True,
    graph: bool = True,
    names: Sequence[str] | None = None,
    progress: Callable[[int], None] | None = None,
) -> BenchResult:
    """Measure each model's latency interleaved in this process, its peak memory in a child.

    Args:
        models: ``ir.Model`` objects, paths or serialized bytes; all take the same inputs.
        feeds: the inputs to run; else the first ``batch_size`` samples of ``data`` (a data
            source or an .npz path), else random inputs shaped by ``shapes``.
        memory: measure peak memory (one child process per model, about a second each).
        graph: add ``graph_report`` of each model.
        names: labels for the models (default: their paths, or "model 1", ...).
        progress: called with the number of steps done since the last call; the total is
            ``progress_steps(len(models), runs, warmup, memory)``.
    """
    if not models:
        raise OnnxcompError("bench: no models given")
    if runs < 1 or warmup < 0 or threads < 1 or batch_size < 1:
        raise OnnxcompError(
            "bench: --runs, --threads and --batch-size must be at least 1, --warmup at least 0"
        )
    labels = list(names) if names else _labels(models)
    step = progress or (lambda n: None)
    first = _as_ir(models[0])
    loaded = [first if isinstance(models[0], ir.Model) else _source(models[0])]
    loaded += [_source(m, check=True) for m in models[1:]]
    feeds, feeds_from = _make_feeds(first, feeds, data, shapes, batch_size)
    batch = _batch_of(feeds)

    sessions = []
    for label, model in zip(labels, loaded, strict=True):
        session = runtime.create_session(model, threads=threads, label=label)
        try:
            runtime.check_feeds(session, feeds, label)
        except OnnxcompError as err:
            if label == labels[0]:
                raise
            raise OnnxcompError(
                f"{err} (all models must take the same inputs as {labels[0]})"
            ) from None
        runtime.run(session, feeds, label=label)
        sessions.append(session)

    # A garbage collection in the middle of a timed run would land on one model only.
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        timings = _interleave(sessions, feeds, runs, warmup, step)
    finally:
        if gc_was_enabled:
            gc.enable()
    results = [
        ModelBench(label, np.array(t), batch) for label, t in zip(labels, timings, strict=True)
    ]
    base = results[0].p50_ms
    for result in results:
        result.ratio_p50 = result.p50_ms / base if base > 0 else float("nan")
    del sessions

    for result, model in zip(results, loaded, strict=True):
        if graph:
            try:
                result.graph = graph_report(model, threads=threads, label=result.name)
            except OnnxcompError as err:
                # e.g. onnxruntime cannot write the optimized graph of a model over 2 GB
                logger.warning("%s: optimized graph not inspected (%s)", result.name, err)
                result.graph = {"unavailable": str(err)}
        if memory:
            try:
                result.peak_memory_bytes = peak_memory(model, feeds, threads=threads)
            except OnnxcompError as err:
                result.memory_error = str(err)
                logger.warning("%s: peak memory not measured (%s)", result.name, err)
            step(1)
    inputs = {k: {"shape": list(v.shape), "dtype": str(v.dtype)} for k, v in feeds.items()}
    return BenchResult(results, threads, runs, warmup, batch, inputs, feeds_from)


def progress_steps(models: int, runs: int, warmup: int, memory: bool) -> int:
    """How many steps ``benchmark`` reports through its ``progress`` callback."""
    return (runs + warmup) + (models if memory else 0)


def _labels(models: Sequence[ModelLike]) -> list[str]:
    labels = []
    for index, model in enumerate(models, 1):
        label = str(model) if isinstance(model, (str, os.PathLike)) else f"model {index}"
        if label in labels:
            label = f"{label} ({index})"
        labels.append(label)
    return labels


def _source(model: ModelLike, check: bool = False) -> ModelLike:
    """What sessions are made from: paths stay paths, so onnxruntime reads them itself; with
    ``check`` they are loaded once first, for a clear error on a missing or truncated file."""
    if isinstance(model, (str, os.PathLike)):
        if check:
            model_io.load(model)
        return str(model)
    return model


def _as_ir(model: ModelLike) -> ir.Model:
    if isinstance(model, ir.Model):
        return model
    if isinstance(model, bytes):
        try:
            return ir.from_proto(onnx.load_from_string(model))
        except Exception as err:
            raise OnnxcompError(
                f"model bytes: not a readable ONNX model ({type(err).__name__})"
            ) from None
    return model_io.load(model)


def _make_feeds(
    model: ir.Model,
    feeds: Mapping[str, np.ndarray] | None,
    data: DataSource | str | os.PathLike | None,
    shapes: Mapping[str, Sequence[int]] | None,
    batch_size: int,
) -> tuple[dict[str, np.ndarray], str]:
    specs = model_io.input_specs(model)
    if feeds is not None:
        return {k: np.asarray(v) for k, v in feeds.items()}, "given feeds"
    if data is not None:
        source = data if isinstance(data, DataSource) else open_data(data, specs)
        for batch in source.batches(batch_size, limit=batch_size):
            return dict(batch.inputs), f"first {len(batch)} sample(s) of {source.name}"
        raise OnnxcompError(f"{source.name}: holds no samples")
    shapes = expand_shapes(specs, shapes or {})
    random = RandomData(specs, samples=1, shapes=shapes)
    if batch_size != 1:
        # Random inputs: a dynamic first axis takes the batch size unless --shape fixed it.
        for spec in specs:
            if spec.name not in shapes and spec.shape and not isinstance(spec.shape[0], int):
                shapes[spec.name] = [batch_size, *random.shapes[spec.name][1:]]
        random = RandomData(specs, samples=1, shapes=shapes)
    # np.asarray: RandomData draws a numpy scalar (not a 0-d array) for a scalar bool input.
    inputs = {k: np.asarray(v) for k, v in next(random.batches(1)).inputs.items()}
    described = ", ".join(
        f"{k}=" + ("x".join(map(str, v.shape)) or "scalar") for k, v in inputs.items()
    )
    return inputs, f"random inputs ({described})"


def _batch_of(feeds: Mapping[str, np.ndarray]) -> int:
    for array in feeds.values():
        if array.ndim:
            return int(array.shape[0])
    return 1


BLOCK_RUNS = 10  # timed runs of one model in a row, within a round
BLOCK_WARM = 3  # untimed runs before each block: the model's weights back in the CPU caches


def _interleave(sessions, feeds, runs: int, warmup: int, step) -> list[list[float]]:
    """Rounds of blocks: each round runs every model for a short block of runs, the starting
    model rotating from round to round.

    Blocks rather than single runs: a small model run right after another one starts with the
    other's weights in the CPU caches, which made int8 MiniLM read 0.45x of fp32 instead of its
    warm 0.25x. A few untimed runs before each block measure the steady state, while the rounds
    still spread machine noise over all models alike.
    """
    feeds = dict(feeds)
    timings: list[list[float]] = [[] for _ in sessions]
    warm_up(sessions, feeds, warmup)
    step(warmup)
    rounds = -(-runs // BLOCK_RUNS)
    for round_index in range(rounds):
        block = min(BLOCK_RUNS, runs - round_index * BLOCK_RUNS)
        for index, times in enumerate(timing_round(sessions, feeds, round_index, block)):
            timings[index] += times
        step(block)
    return timings


def warm_up(sessions, feeds: Mapping[str, np.ndarray], runs: int) -> None:
    """``runs`` untimed runs of each session."""
    feeds = dict(feeds)
    for session in sessions:
        for _ in range(runs):
            session.run(None, feeds)


def timing_round(
    sessions,
    feeds: Mapping[str, np.ndarray],
    round_index: int,
    block: int = BLOCK_RUNS,
    warm: int = BLOCK_WARM,
) -> list[list[float]]:
    """One round of :func:`_interleave`: ``warm`` untimed and ``block`` timed runs (ms) of every
    session, the first session rotating with ``round_index``; returns the times by session."""
    feeds = dict(feeds)
    count = len(sessions)
    times: list[list[float]] = [[] for _ in sessions]
    for offset in range(count):
        index = (round_index + offset) % count
        session = sessions[index]
        for _ in range(warm):
            session.run(None, feeds)
        for _ in range(block):
            start = time.perf_counter_ns()
            session.run(None, feeds)
            times[index].append((time.perf_counter_ns() - start) / 1e6)
    return times


def make_feeds(
    model: ModelLike,
    *,
    data: DataSource | str | os.PathLike | None = None,
    shapes: Mapping[str, Sequence[int]] | None = None,
    batch_size: int = 1,
) -> tuple[dict[str, np.ndarray], str]:
    """The inputs ``benchmark`` times a model on, and where they came from."""
    return _make_feeds(_as_ir(model), None, data, shapes, batch_size)


# ---------------------------------------------------------------------------------------------
# Peak memory, in a child process


def peak_memory(model: ModelLike, feeds: Mapping[str, np.ndarray], *, threads: int = 1) -> int:
    """Bytes the model adds to a fresh process's peak resident set: create the session and run
    it a few times in a child process: peak RSS after, minus RSS after imports."""
    with tempfile.TemporaryDirectory(prefix="onnxcomp-memory-") as tmpdir:
        if isinstance(model, (str, os.PathLike)):
            model_path = str(Path(model).resolve())
        else:
            model_path = os.path.join(tmpdir, "model.onnx")
            if isinstance(model, bytes):
                Path(model_path).write_bytes(model)
            else:
                ir.save(model, model_path, external_data="model.onnx.data")
        feeds_path = os.path.join(tmpdir, "feeds.npz")
        np.savez(feeds_path, **feeds)
        result_path = os.path.join(tmpdir, "result.json")
        args = {
            "model": model_path,
            "feeds": feeds_path,
            "threads": threads,
            "result": result_path,
            "parent": os.getpid(),
        }
        # The child must import this very onnxcomp, installed or not.
        package_root = str(Path(__file__).resolve().parents[1])
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
        command = [sys.executable, "-m", "onnxcomp.bench", json.dumps(args)]
        proc = None
        try:
            with _signals_held():  # a signal raised inside Popen() would orphan the child
                proc = subprocess.Popen(
                    command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
                )
            _, stderr = proc.communicate(timeout=600)
        except BaseException:  # timeout, Ctrl-C, SIGTERM: the child ends with us
            if proc is not None:
                proc.kill()
                proc.wait()
            raise
        if proc.returncode != 0 or not os.path.exists(result_path):
            tail = (stderr.strip().splitlines() or ["no output"])[-1]
            raise OnnxcompError(f"memory child process failed (exit {proc.returncode}: {tail})")
        result = json.loads(Path(result_path).read_text())
    return max(0, result["peak_kb"] - result["baseline_kb"]) * 1024


@contextlib.contextmanager
def _signals_held():
    """Hold SIGINT and SIGTERM (delivered on exit from the block) where the platform can."""
    import signal
    import threading

    held = {signal.SIGINT, signal.SIGTERM}
    if (
        not hasattr(signal, "pthread_sigmask")
        or threading.current_thread() is not threading.main_thread()
    ):
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _die_with_parent(parent: int | None) -> None:
    """In the memory child, Linux only: get SIGTERM when onnxcomp ends, however it ends (a
    signal that lands while the child starts, or SIGKILL, would otherwise orphan it)."""
    import ctypes
    import signal

    if hasattr(signal, "pthread_sigmask"):  # the parent held these while starting us
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})
    if parent is None or not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent ended before prctl took effect
        sys.exit(1)


def _proc_status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak() -> bool:
    """Reset this process's peak RSS (Linux: VmHWM), so the peak after counts only what
    follows. ru_maxrss cannot be used on Linux: a child inherits its parent's peak at fork."""
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
        return _proc_status_kb("VmHWM") is not None
    except OSError:
        return False


def _memory_child(args: dict[str, Any]) -> None:
    _die_with_parent(args.get("parent"))
    with np.load(args["feeds"]) as npz:
        feeds = {k: npz[k] for k in npz.files}
    if _reset_peak():
        baseline, method = _proc_status_kb("VmRSS"), "VmHWM"
    else:
        baseline, method = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "ru_maxrss"
    session = runtime.create_session(args["model"], threads=args["threads"])
    for _ in range(MEMORY_RUNS):
        session.run(None, feeds)
    if method == "VmHWM":
        peak = _proc_status_kb("VmHWM")
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        if sys.platform == "darwin":  # bytes there, KB on Linux
            peak, baseline = peak // 1024, baseline // 1024
    result = {"baseline_kb": baseline, "peak_kb": peak, "method": method}
    Path(args["result"]).write_text(json.dumps(result))


if __name__ == "__main__":
    _memory_child(json.loads(sys.argv[1]))


PROFILE_TOP_NODES = 30  # slowest nodes kept per model: a 1,000-node model's report stays small


def profile(
    models: Sequence[ModelLike],
    *,
    names: Sequence[str] | None = None,
    feeds: Mapping[str, np.ndarray] | None = None,
    data: DataSource | str | os.PathLike | None = None,
    shapes: Mapping[str, Sequence[int]] | None = None,
    threads: int = 1,
    runs: int = 20,
    warmup: int = 3,
    top: int = PROFILE_TOP_NODES,
) -> dict[str, Any]:
    """Where the time goes in each model, from onnxruntime's profiler: per op type and the
    slowest ``top`` nodes (median kernel time per run), on the same inputs as ``benchmark``.

    The profiler adds time to every node and the models run one after the other, so
    ``benchmark`` (interleaved, unprofiled) stays the latency figure.
    """
    from onnxcomp.cpu import isa_path

    labels = list(names) if names else _labels(models)
    first = _as_ir(models[0])
    feeds, feeds_from = _make_feeds(first, feeds, data, shapes, 1)
    entries = []
    for label, model in zip(labels, models, strict=True):
        source = first if model is models[0] and isinstance(model, ir.Model) else _source(model)
        raw = runtime.profile_nodes(
            source, feeds, runs=runs, warmup=warmup, threads=threads, label=label
        )
        nodes = raw["nodes"]
        total = sum(n["ms"] for n in nodes)
        by_op: dict[str, dict[str, Any]] = {}
        for n in nodes:
            entry = by_op.setdefault(n["op"], {"op": n["op"], "ms": 0.0, "count": 0})
            entry["ms"] += n["ms"]
            entry["count"] += 1
        op_types = sorted(by_op.values(), key=lambda e: -e["ms"])
        for entry in op_types:
            entry["share"] = entry["ms"] / total if total > 0 else 0.0
        slowest = sorted(nodes, key=lambda n: -n["ms"])[:top]
        entries.append(
            {
                "name": label,
                "run_p50_ms": float(np.median(raw["runs"])) if raw["runs"] else None,
                "nodes_ms": total,
                "nodes": len(nodes),
                "op_types": op_types,
                "slowest_nodes": [
                    {**n, "share": n["ms"] / total if total > 0 else 0.0} for n in slowest
                ],
            }
        )
    return {
        "threads": threads,
        "runs": runs,
        "inputs": feeds_from,
        "cpu": isa_path(),
        "models": entries,
    }
