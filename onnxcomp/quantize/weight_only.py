"""Weight-only block-wise quantization (int4 / int8) for transformer and LLM-style models.

By default (``form="onnx"``) the output is standard ONNX at opset 21:

- MatMul with a constant ``[K, N]`` weight -> ``DequantizeLinear(codes, scales, zero_points, axis=0,
  block_size=B)`` -> ``MatMul`` (-> bias ``Add``): int4 / uint4 (or 8-bit) codes in blocks of ``B`` along K.
  onnxruntime's optimizer fuses the pair into the same ``MatMulNBits`` kernel the contrib form writes, with
  ``accuracy_level`` 4 (its session option ``session.qdq_matmulnbits_accuracy_level``, default 4);
- Gather of a constant embedding table -> an int8 table with one scale per row: ``Gather`` -> ``Cast`` -> ``Mul``
  (standard ONNX has no 4-bit Gather kernel in onnxruntime).

With ``form="contrib"`` (``--contrib-ops``) the onnxruntime ``com.microsoft`` kernels are written directly:

- MatMul with a constant ``[K, N]`` weight -> ``com.microsoft.MatMulNBits``: weights in blocks of ``block_size``
  along K, one scale (and, asymmetric, one zero point) per block and column; a following bias Add is folded into
  the op's bias input. ``accuracy_level=4`` lets onnxruntime's CPU kernel quantize the activations to int8 per block
  and run an integer GEMM (the fast path); 0 dequantizes the weights and multiplies in float.
- Gather of a constant embedding table -> ``com.microsoft.GatherBlockQuantized`` (uint8-packed codes, blocks along
  the hidden axis).

Rounding is round-to-nearest (``algorithm="rtn"``) or GPTQ (``algorithm="gptq"``, Frantar et al. 2022, Alg. 1), which
needs each layer's input Hessian: `onnxcomp.layerwise.reconstruct` streams the layer inputs over the calibration
data into Hessians, one batch at a time, and hands each layer to GPTQ.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Literal

import numpy as np
import onnx_ir as ir

from onnxcomp import layerwise
from onnxcomp.errors import OnnxcompError
from onnxcomp.graph import (
    add_initializer,
    drop_shapes_before_skip_layernorm,
    drop_unused_initializers,
    replace_uses,
)
from onnxcomp.graph import const as _const
from onnxcomp.passes import Result
from onnxcomp.quantize import gptq, schemes

logger = logging.getLogger(__name__)

MS_DOMAIN = "com.microsoft"
STANDARD_OPSET = 21  # DequantizeLinear's block_size attribute (blocked int4 weights)
SUPPORTED_OPS = ("MatMul", "Gemm", "Gather")
# GPTQ Hessians held at once; more inputs than this take more runs over the calibration data.
HESSIAN_MEMORY_BYTES = 2 << 30


@dataclasses.dataclass
class WeightOnlyOptions:
    """Options of weight-only quantization.

    Attributes:
        bits: 4 or 8.
        block_size: weights per scale along the input axis (a power of two, >= 16: 32, 64, 128).
        symmetric: codes around the fixed zero point 2**(bits-1) (no zero-point tensor); the default, asymmetric,
            stores a zero point per block and uses all 2**bits levels (MiniLM int4: cosine 0.973 versus 0.954).
        algorithm: "rtn" (round to nearest) or "gptq" (error-correcting rounding, needs calibration data).
        accuracy_level: MatMulNBits' compute type for the activations: 0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8.
        op_types: ops to quantize ("MatMul", "Gemm", "Gather").
        keep_float: node names to leave float.
        calibration_samples: samples of the data used by GPTQ.
        damp: GPTQ's relative Hessian dampening.
        act_order: GPTQ quantizes columns by decreasing Hessian diagonal (groups stay contiguous).
        form: "onnx" (default): standard ONNX at opset 21 (blocked DequantizeLinear + MatMul), which onnxruntime
            fuses into MatMulNBits; "contrib": com.microsoft MatMulNBits / GatherBlockQuantized written directly.
    """

    bits: int = 4
    block_size: int = 32
    symmetric: bool = False
    algorithm: Literal["rtn", "gptq"] = "rtn"
    accuracy_level: int = 4
    op_types: list[str] = dataclasses.field(default_factory=lambda: ["MatMul", "Gemm", "Gather"])
    keep_float: list[str] = dataclasses.field(default_factory=list)
    calibration_samples: int = 64
    damp: float = 0.01
    act_order: bool = False
    form: Literal["contrib", "onnx"] = "onnx"

    def check(self, where: str = "weight-only quantization") -> None:
        if self.bits not in (4, 8):
            raise OnnxcompError(f"{where}: bits: {self.bits!r} is not one of 4, 8")
        if (
            not isinstance(self.block_size, int)
            or self.block_size < 16
            or self.block_size & (self.block_size - 1)
        ):
            raise OnnxcompError(
                f"{where}: block_size: {self.block_size!r} is not a power of two >= 16 (32, 64, 128)"
            )
        if self.algorithm not in ("rtn", "gptq"):
            raise OnnxcompError(
                f"{where}: algorithm: {self.algorithm!r} is not one of 'rtn', 'gptq'"
            )
        if self.accuracy_level not in (0, 1, 2, 3, 4):
            raise OnnxcompError(
                f"{where}: accuracy_level: {self.accuracy_level!r} is not one of 0-4"
            )
        for op in self.op_types:
            if op not in SUPPORTED_OPS:
                raise OnnxcompError(
                    f"{where}: op_types: {op!r} is not one of {', '.join(SUPPORTED_OPS)}"
                )
        if self.calibration_samples < 1:
            raise OnnxcompError(
                f"{where}: calibration_samples must be >= 1, got {self.calibration_samples}"
            )
        if not 0.0 <= self.damp < 1.0:
            raise OnnxcompError(f"{where}: damp must be in [0, 1), got {self.damp}")
        if self.form not in ("contrib", "onnx"):
            raise OnnxcompError(f"{where}: form: {self.form!r} is not one of 'contrib', 'onnx'")


# ---------------------------------------------------------------------------------------------
# Matching


@dataclasses.dataclass
class _Match:
    name: str
    op_type: str
    node: ir.Node
    w: np.ndarray  # MatMul: (K, N); Gather: the table (rows, hidden)
    bias: np.ndarray | None = None
    bias_add: ir.Node | None = None
    output: ir.Value | None = None

    @property
    def x(self) -> ir.Value | None:
        """The MatMul's input as the graph holds it now (rewriting the layer before renames its
        output), None for a Gather."""
        return self.node.inputs[0] if self.op_type == "MatMul" else None


def _match_matmul(node: ir.Node, block_size: int) -> _Match | str:
    w = _const(node.inputs[1])
    if w is None:
        return "weight is computed at run time (not a constant)"
    if w.dtype != np.float32:
        return f"weight is {w.dtype}, not float32"
    if w.ndim != 2:
        return f"weight has rank {w.ndim}; MatMulNBits needs a [K, N] matrix"
    x = node.inputs[0]
    if x.shape is not None and len(x.shape) < 2:
        return "input is a vector; MatMulNBits needs a matrix"
    match = _Match(node.name or "", "MatMul", node, w, output=node.outputs[0])
    out = node.outputs[0]
    uses = list(out.uses())
    if len(uses) == 1 and not out.is_graph_output():
        add = uses[0].node
        if add.op_type == "Add" and add.domain in ("", "ai.onnx"):
            bias = _const(add.inputs[1 - uses[0].idx])
            n = w.shape[1]
            if (
                bias is not None
                and bias.dtype == np.float32
                and bias.size == n
                and bias.shape[-1:] == (n,)
            ):
                match.bias, match.bias_add, match.output = bias.reshape(n), add, add.outputs[0]
    return match


def gemm_operands(node: ir.Node) -> tuple[np.ndarray, np.ndarray | None] | str:
    """A Gemm with a constant weight as ``x @ W + bias``: (W (K, N) with alpha applied, bias (N,)
    with beta applied, or None), or the reason it is not one."""
    attrs = node.attributes
    if "transA" in attrs and attrs["transA"].as_int():
        return "Gemm with transA=1 (the input would need a Transpose)"
    b = _const(node.inputs[1])
    if b is None:
        return "weight is computed at run time (not a constant)"
    if b.dtype != np.float32 or b.ndim != 2:
        return f"weight is {b.dtype} of rank {b.ndim}, not a float32 matrix"
    alpha = attrs["alpha"].as_float() if "alpha" in attrs else 1.0
    beta = attrs["beta"].as_float() if "beta" in attrs else 1.0
    w = b.T if ("transB" in attrs and attrs["transB"].as_int()) else b
    w = np.ascontiguousarray(w * np.float32(alpha), dtype=np.float32)  # (K, N)
    n = w.shape[1]
    bias = None
    if len(node.inputs) > 2 and node.inputs[2] is not None:
        c = _const(node.inputs[2])
        if c is None:
            return "bias C is computed at run time"
        if c.size not in (1, n) or (c.size == n and c.shape[-1:] != (n,)):
            return f"bias C of shape {list(c.shape)} is not a per-column vector"
        bias = np.broadcast_to(c.reshape(-1) * np.float32(beta), (n,)).astype(np.float32)
    return w, bias


def _match_gemm(node: ir.Node, block_size: int) -> _Match | str:
    """Gemm with a constant weight: ``alpha * x @ W (+ beta * C)`` as MatMulNBits with a bias."""
    operands = gemm_operands(node)
    if isinstance(operands, str):
        return operands
    w, bias = operands
    return _Match(node.name or "", "MatMul", node, w, bias=bias, output=node.outputs[0])


def _match_gather(node: ir.Node, block_size: int) -> _Match | str:
    table = _const(node.inputs[0])
    if table is None:
        return "the gathered data is not a constant (not an embedding table)"
    if table.dtype != np.float32 or table.ndim != 2:
        return f"data is {table.dtype} of rank {table.ndim}, not a float32 [rows, hidden] table"
    axis = node.attributes["axis"].as_int() if "axis" in node.attributes else 0
    if axis not in (0, -2):
        return f"gathers along axis {axis}; GatherBlockQuantized needs axis 0"
    if table.shape[1] % block_size:
        return f"hidden size {table.shape[1]} is not a multiple of block_size {block_size}"
    return _Match(node.name or "", "Gather", node, table, output=node.outputs[0])


RULES = {"MatMul": _match_matmul, "Gemm": _match_gemm, "Gather": _match_gather}


# ---------------------------------------------------------------------------------------------
# The pass


class WeightOnlyQuantizePass(ir.passes.InPlacePass):
    """MatMul -> MatMulNBits and embedding Gather -> GatherBlockQuantized, int4 / int8 block-wise weights."""

    def __init__(self, options: WeightOnlyOptions | None = None, data=None):
        self.options = options or WeightOnlyOptions()
        self.options.check()
        self.data = data

    def _check_opset(self, model: ir.Model) -> None:
        # Raised from call(), not requires(): onnx-ir wraps errors of requires() in its PreconditionError.
        if self.options.form == "onnx" and model.opset_imports.get("", 1) < STANDARD_OPSET:
            raise OnnxcompError(
                f"weight-only quantization in standard ONNX needs opset {STANDARD_OPSET} (blocked "
                f"DequantizeLinear); the model is at opset {model.opset_imports.get('', 1)}: upgrade it "
                "(onnxcomp.model.ensure_opset; `onnxcomp quantize` does) or use the contrib form"
            )

    def call(self, model: ir.Model) -> Result:
        opts = self.options
        self._check_opset(model)
        matches, skipped = self._plan(model)
        calibration: dict[str, object] = {}
        matmuls = [m for m in matches if m.op_type == "MatMul"]
        if opts.form == "contrib":
            model.opset_imports.setdefault(MS_DOMAIN, 1)
        entries: dict[int, tuple[dict[str, object], int]] = {}
        # Weights read by several MatMuls are quantized once; later readers reuse the codes.
        self._shared: dict[tuple, tuple[str, list[ir.Value | None], schemes.BlockwiseWeight]] = {}
        if opts.algorithm == "gptq" and matmuls:
            matmuls = self._finite(matmuls, skipped)
            if matmuls:
                calibration = self._gptq(model, matmuls, entries)
        bytes_before = 0
        for match in matches:
            if id(match) in entries:
                bytes_before += match.w.nbytes
                continue
            # Checked here, one weight at a time, not while planning: a large model's weights
            # are then read (and unmapped) one by one.
            if self._finite([match], skipped):
                bytes_before += match.w.nbytes
                tensor = _weight_tensor(match)
                if match.op_type == "MatMul":
                    entries[id(match)] = self._rewrite_matmul(model.graph, match, None)
                else:
                    entries[id(match)] = self._rewrite_gather(model.graph, match)
                match.w = None
                _release(tensor)
        done = [m for m in matches if id(m) in entries]
        layers = [entries[id(m)][0] for m in done]
        bytes_after = sum(entries[id(m)][1] for m in done)
        shapes_dropped = 0
        if done:
            # As for dynamic int8: stored shapes let onnxruntime fuse residual Add + LayerNormalization into its
            # slower SkipLayerNormalization (paraphrase-MiniLM-L3 int4 at opset 21: 0.87x fp32 with, 0.71x without).
            shapes_dropped = drop_shapes_before_skip_layernorm(model.graph)
        report: dict[str, object] = {
            "quantized": len(layers),
            "bits": opts.bits,
            "block_size": opts.block_size,
            "symmetric": opts.symmetric,
            "algorithm": opts.algorithm,
            "accuracy_level": opts.accuracy_level,
            "form": opts.form,
            "shapes_dropped": shapes_dropped,
            "weight_bytes_before": bytes_before,
            "weight_bytes_after": bytes_after,
            **calibration,
            "layers": layers,
            "skipped": skipped,
        }
        return Result(model, modified=bool(layers), report=report)

    def _plan(self, model: ir.Model) -> tuple[list[_Match], list[dict[str, str]]]:
        matches, skipped = [], []
        for node in model.graph:
            if node.domain not in ("", "ai.onnx") or node.op_type not in RULES:
                continue
            name = node.name or node.outputs[0].name or node.op_type
            if node.op_type not in self.options.op_types:
                continue
            if name in self.options.keep_float:
                skipped.append({"node": name, "op": node.op_type, "reason": "listed in keep_float"})
                continue
            match = RULES[node.op_type](node, self.options.block_size)
            if isinstance(match, str):
                if node.op_type == "Gather" and _const(node.inputs[0]) is None:
                    continue  # a Gather of run-time data (shapes, indices) is not a weight: no report line
                skipped.append({"node": name, "op": node.op_type, "reason": match})
                continue
            match.name = name
            matches.append(match)
        for node in ir.traversal.RecursiveGraphIterator(model.graph):
            if node.graph is not model.graph and node.op_type in self.options.op_types:
                if node.op_type == "Gather" and _const(node.inputs[0]) is None:
                    continue  # shapes and indices, not a weight
                skipped.append(
                    {
                        "node": node.name or node.op_type,
                        "op": node.op_type,
                        "reason": "inside an If/Loop/Scan subgraph (not quantized)",
                    }
                )
        return matches, skipped

    @staticmethod
    def _finite(matches: list[_Match], skipped: list[dict[str, str]]) -> list[_Match]:
        """The matches whose weights are all finite; the others go to ``skipped`` with the count
        of NaN/inf values (an attention-bias table of -inf stays float, the rest is quantized)."""
        kept = []
        for match in matches:
            reason = schemes.nonfinite_reason(match.w)
            if reason is None:
                kept.append(match)
            else:
                skipped.append({"node": match.name, "op": match.node.op_type, "reason": reason})
                logger.info("%s stays float: its weight %s", match.name, reason)
        return kept

    def _gptq(
        self,
        model: ir.Model,
        matches: list[_Match],
        entries: dict[int, tuple[dict[str, object], int]],
    ) -> dict[str, object]:
        """Stream each MatMul input over the calibration data into a Hessian (one per distinct input), quantize.

        The Hessians (``K^2`` float64 each) are accumulated for as many inputs as fit HESSIAN_MEMORY_BYTES at a
        time, in graph order; the layers of a chunk are rewritten before the next chunk's run, so later layers
        see the already-quantized ones, as in GPTQ.
        """
        data = self.data
        if data is None:
            from onnxcomp.data import RandomData
            from onnxcomp.model import input_specs

            try:
                data = RandomData(
                    input_specs(model), samples=min(8, self.options.calibration_samples)
                )
            except OnnxcompError as err:
                raise OnnxcompError(
                    f"algorithm=gptq needs calibration data: give --data ({err})"
                ) from None
            logger.warning("GPTQ without calibration data: using random inputs")
        opts = self.options
        views = {id(m): layerwise.matmul_view(m.node, m.w) for m in matches}
        by_view = {id(views[id(m)]): m for m in matches}
        k_bits = schemes.UINT4 if opts.bits == 4 else schemes.UINT8

        def solve(w, h, ctx: layerwise.SolveContext) -> layerwise.Solution:
            result = gptq.gptq_quantize(
                w,  # (N, K): GPTQ's (out, in) layout
                h,
                dtype=k_bits,
                symmetric=opts.symmetric,
                group_size=opts.block_size,
                damp=opts.damp,
                act_order=opts.act_order,
            )
            return layerwise.Solution(
                result.dequantized,
                codes=result.quantized,
                info={"scale": result.scale, "zero_point": result.zero_point},
            )

        def write(layer: layerwise.LayerResult) -> None:
            match = by_view[id(layer.view)]
            entries[id(match)] = self._rewrite_matmul(model.graph, match, layer)

        # Layers are rewritten as soon as their set of Hessians is solved, and ``model`` is also
        # the source: the layers of the next set see the already quantized ones, as in GPTQ.
        done = layerwise.reconstruct(
            model,
            [views[id(m)] for m in matches],
            data,
            solve,
            write=write,
            limit=opts.calibration_samples,
            hessian_budget_bytes=HESSIAN_MEMORY_BYTES,
        )
        for layer in done.layers:
            if layer.skipped:  # no finite inputs: round to nearest
                match = by_view[id(layer.view)]
                entries[id(match)] = self._rewrite_matmul(model.graph, match, None)
        rows = min((layer.rows for layer in done.layers if not layer.skipped), default=0)
        return {
            "calibration": getattr(data, "name", "data"),
            "calibration_rows": rows,
            "calibration_runs": done.runs,
        }

    def _quantize_weight(
        self, w: np.ndarray, solution: layerwise.Solution | None
    ) -> schemes.BlockwiseWeight:
        """``w: [K, N]`` -> MatMulNBits layout: round to nearest, or GPTQ's ``solution``."""
        opts = self.options
        if solution is None:
            return schemes.quantize_blockwise(w, opts.block_size, opts.bits, opts.symmetric)
        k, n = w.shape
        n_blocks = -(-k // opts.block_size)
        codes = np.asarray(solution.codes, np.uint8)  # (N, K)
        zero = np.asarray(solution.info["zero_point"], np.uint8)  # (N, n_blocks)
        pad = n_blocks * opts.block_size - k
        if pad:
            codes = np.concatenate([codes, np.repeat(zero[:, -1:], pad, axis=1)], axis=1)
        return schemes.pack_matmulnbits(
            codes,
            np.asarray(solution.info["scale"], np.float32),
            None if opts.symmetric else zero,
            k,
            opts.bits,
            opts.block_size,
        )

    def _rewrite_matmul(
        self,
        graph: ir.Graph,
        match: _Match,
        layer: layerwise.LayerResult | None,
    ) -> tuple[dict[str, object], int]:
        """Replace the MatMul (and its bias Add) by MatMulNBits: round to nearest, or the codes of
        GPTQ's solved ``layer``."""
        opts = self.options
        old = [match.node] + ([match.bias_add] if match.bias_add is not None else [])
        # GPTQ's codes depend on the reader's inputs: only round-to-nearest codes are shared.
        key = _weight_key(match) if layer is None else None
        # Only a weight with other readers is remembered: codes kept for every layer would hold
        # a quarter of a large model's float weights until the pass ends.
        others = len(match.node.inputs[1].uses()) > 1
        first, weights, q = self._shared.get(key, (None, None, None)) if key else (None,) * 3
        if q is None:
            q = self._quantize_weight(match.w, layer.solutions[0] if layer else None)
        if opts.form == "contrib":
            node = matmul_nbits_node(
                graph, match.x, q, match.bias, opts.accuracy_level, match.name, weights=weights
            )
            replace_with(graph, old, node, match.output)
            written = list(node.inputs[1:4])
        else:
            nodes = blocked_dequantize_matmul(
                graph, match.x, q, match.bias, match.name, weights=weights
            )
            replace_with(graph, old, nodes, match.output)
            written = list(nodes[0].inputs)
        if key is not None and first is None and others:
            self._shared[key] = (match.name, written, q)
        deq = schemes.dequantize_blockwise(q)
        entry: dict[str, object] = {
            "node": match.name,
            "op": match.node.op_type,
            "to": "MatMulNBits" if opts.form == "contrib" else "DequantizeLinear+MatMul",
            "weight": list(match.w.shape),
            "weight_sqnr_db": _round(schemes.sqnr_db(match.w, deq)),
        }
        if first is not None:
            entry["shares_weight_with"] = first
        if layer is not None:
            rtn = schemes.quantize_blockwise(match.w, opts.block_size, opts.bits, opts.symmetric)
            rtn = schemes.dequantize_blockwise(rtn).T  # (N, K), as the solver saw it
            h = layer.hessians[0].H
            entry["output_error_rtn"] = _significant(
                layerwise.reconstruction_error(match.w.T, rtn, h)
            )
            entry["output_error"] = _significant(layer.error)
        return entry, 0 if first is not None else _nbytes(q)

    def _rewrite_gather(self, graph: ir.Graph, match: _Match) -> tuple[dict[str, object], int]:
        opts = self.options
        if opts.form == "onnx":
            return rewrite_gather_standard(graph, match)
        return rewrite_gather(graph, match, opts.bits, opts.block_size, opts.symmetric)


def match_embedding(node: ir.Node, block_size: int) -> _Match | str:
    """A Gather of a constant [rows, hidden] float table, or why it cannot become GatherBlockQuantized."""
    match = _match_gather(node, block_size)
    if isinstance(match, _Match):
        match.name = node.name or node.outputs[0].name or "Gather"
    return match


def rewrite_gather(
    graph: ir.Graph, match: _Match, bits: int, block_size: int, symmetric: bool
) -> tuple[dict[str, object], int]:
    """Replace an embedding Gather by GatherBlockQuantized; returns its report entry and weight bytes."""
    table = match.w  # (rows, hidden)
    rows, hidden = table.shape
    q = schemes.quantize_blockwise(table.T, block_size, bits, symmetric)
    tag = match.name.replace("/", "_").strip("_") or "gather"

    def initializer(suffix: str, array: np.ndarray) -> ir.Value:
        return add_initializer(graph, f"{tag}_{suffix}", array)

    inputs = [
        initializer(f"data_q{bits}", q.packed.reshape(rows, -1)),
        match.node.inputs[1],
        initializer("scales", q.scales.reshape(rows, q.n_blocks)),
    ]
    if q.zero_points is not None:
        inputs.append(initializer("zero_points", q.zero_points.reshape(rows, -1)))
    node = ir.node(
        "GatherBlockQuantized",
        inputs,
        attributes={"gather_axis": 0, "quantize_axis": 1, "block_size": block_size, "bits": bits},
        domain=MS_DOMAIN,
        name=tag,
    )
    replace_with(graph, [match.node], node, match.output)
    entry = {
        "node": match.name,
        "op": "Gather",
        "to": "GatherBlockQuantized",
        "weight": [rows, hidden],
        "weight_sqnr_db": _round(schemes.sqnr_db(table, schemes.dequantize_blockwise(q).T)),
    }
    return entry, _nbytes(q)


def rewrite_gather_standard(graph: ir.Graph, match: _Match) -> tuple[dict[str, object], int]:
    """Replace an embedding Gather by standard ops: an int8 table with one symmetric scale per row,
    ``Gather(codes) -> Cast -> Mul(Gather(scales))``; returns its report entry and weight bytes."""
    table = match.w  # (rows, hidden)
    rows, hidden = table.shape
    p = schemes.weight_params(table, axis=0, per_channel=True)  # one scale per row
    codes = schemes.quantize(table, p)  # (rows, hidden) int8
    scales = np.asarray(p.scale, np.float32).reshape(rows, 1)
    tag = match.name.replace("/", "_").strip("_") or "gather"
    ids = match.node.inputs[1]
    gather = ir.node(
        "Gather", [add_initializer(graph, f"{tag}_data_int8", codes), ids], name=f"{tag}_int8"
    )
    gather_scale = ir.node(
        "Gather", [add_initializer(graph, f"{tag}_scales", scales), ids], name=f"{tag}_scales"
    )
    cast = ir.node(
        "Cast", [gather.outputs[0]], attributes={"to": ir.DataType.FLOAT}, name=f"{tag}_cast"
    )
    mul = ir.node("Mul", [cast.outputs[0], gather_scale.outputs[0]], name=f"{tag}_dequantize")
    replace_with(graph, [match.node], [gather, gather_scale, cast, mul], match.output)
    entry = {
        "node": match.name,
        "op": "Gather",
        "to": "Gather int8 (per-row scale)",
        "weight": [rows, hidden],
        "weight_sqnr_db": _round(schemes.sqnr_db(table, schemes.dequantize(codes, p))),
    }
    return entry, codes.nbytes + scales.nbytes


def blocked_dequantize_matmul(
    graph: ir.Graph,
    x: ir.Value,
    q: schemes.BlockwiseWeight,
    bias: np.ndarray | None,
    name: str,
    weights: list[ir.Value | None] | None = None,
) -> list[ir.Node]:
    """Standard ONNX (opset 21) for ``x @ dequantize(q) + bias``: ``DequantizeLinear`` with ``block_size`` along K,
    ``MatMul`` and a bias ``Add``; onnxruntime fuses the first two into MatMulNBits.

    Symmetric blocks are written as signed codes without a zero point, asymmetric ones as unsigned codes with
    one zero point per block; the stored codes are those of ``q`` (the same integers MatMulNBits would hold).
    ``weights``: the DequantizeLinear inputs another reader of the same weight already wrote (shared).
    """
    tag = name.replace("/", "_").strip("_") or "matmul"
    n, nb, bs, k = q.N, q.n_blocks, q.block_size, q.K
    codes = schemes.unpack_bits(q.packed, q.bits, bs).reshape(n, nb * bs)[:, :k].T  # (K, N)
    scales = np.ascontiguousarray(q.scales.reshape(n, nb).T)  # (n_blocks, N)
    half = 1 << (q.bits - 1)
    signed = {4: ir.DataType.INT4, 8: ir.DataType.INT8}[q.bits]
    unsigned = {4: ir.DataType.UINT4, 8: ir.DataType.UINT8}[q.bits]

    def initializer(suffix: str, array: np.ndarray, dtype: ir.DataType | None = None) -> ir.Value:
        return add_initializer(graph, f"{tag}_{suffix}", array, dtype=dtype)

    inputs: list[ir.Value | None]
    if weights is not None:
        inputs = list(weights)
    elif q.zero_points is None:
        signed_codes = np.ascontiguousarray(codes.astype(np.int16) - half).astype(np.int8)
        inputs = [
            initializer(f"B_int{q.bits}", signed_codes, signed),
            initializer("scales", scales),
        ]
    else:
        zp = schemes.unpack_bits(q.zero_points.reshape(n, -1), q.bits, nb).T  # (n_blocks, N)
        inputs = [
            initializer(f"B_uint{q.bits}", np.ascontiguousarray(codes), unsigned),
            initializer("scales", scales),
            initializer("zero_points", np.ascontiguousarray(zp), unsigned),
        ]
    dq = ir.node(
        "DequantizeLinear",
        inputs,
        attributes={"axis": 0, "block_size": bs},
        name=f"{tag}_dequantize",
    )
    mm = ir.node("MatMul", [x, dq.outputs[0]], name=tag)
    nodes = [dq, mm]
    if bias is not None:
        b = add_initializer(graph, f"{tag}_bias", np.asarray(bias, np.float32))
        nodes.append(ir.node("Add", [mm.outputs[0], b], name=f"{tag}_bias"))
    return nodes


def replace_with(
    graph: ir.Graph, old_nodes: list[ir.Node], node: ir.Node | list[ir.Node], old_out: ir.Value
) -> None:
    """Put ``node`` (or a chain of nodes, the last one's output the result) where ``old_nodes`` were; the new
    output takes over ``old_out``'s name and readers."""
    chain = node if isinstance(node, list) else [node]
    graph.insert_before(old_nodes[0], chain)
    replace_uses(old_out, chain[-1].outputs[0], old_suffix="__float", take_name=True)
    inputs = [v for old in old_nodes for v in old.inputs]
    for old in reversed(old_nodes):
        graph.remove(old, safe=True)
    drop_unused_initializers(graph, inputs)


def matmul_nbits_node(
    graph: ir.Graph,
    x: ir.Value,
    q: schemes.BlockwiseWeight,
    bias: np.ndarray | None,
    accuracy_level: int,
    name: str,
    weights: list[ir.Value | None] | None = None,
) -> ir.Node:
    """A ``com.microsoft.MatMulNBits`` node computing ``x @ dequantize(q) + bias``; its constants are registered.

    ``weights``: the (B, scales, zero_points) inputs another reader of the same weight already wrote (shared).
    """
    tag = name.replace("/", "_").strip("_") or "matmul"

    def initializer(suffix: str, array: np.ndarray) -> ir.Value:
        return add_initializer(graph, f"{tag}_{suffix}", array)

    if weights is None:
        weights = [
            initializer(f"B_q{q.bits}", q.packed),
            initializer("scales", q.scales),
            None if q.zero_points is None else initializer("zero_points", q.zero_points),
        ]
    inputs: list[ir.Value | None] = [
        x,
        *(list(weights) + [None] * 3)[:3],
        None,
        None if bias is None else initializer("bias", np.asarray(bias, np.float32)),
    ]
    while inputs[-1] is None:
        inputs.pop()
    return ir.node(
        "MatMulNBits",
        inputs,
        attributes={
            "K": q.K,
            "N": q.N,
            "bits": q.bits,
            "block_size": q.block_size,
            "accuracy_level": accuracy_level,
        },
        domain=MS_DOMAIN,
        name=tag,
    )


def _weight_key(match: _Match) -> tuple | None:
    """Readers with equal keys compute with the same ``[K, N]`` weight: the same initializer seen
    through the same Gemm attributes (transB, alpha)."""
    if match.op_type != "MatMul":
        return None
    value = match.node.inputs[1]
    attrs = match.node.attributes
    view = (
        (attrs.get_int("transB", 0), attrs.get_float("alpha", 1.0))
        if match.node.op_type == "Gemm"
        else ()
    )
    return (id(value), match.node.op_type, view)


def _weight_tensor(match: _Match) -> ir.TensorProtocol | None:
    value = match.node.inputs[0 if match.op_type == "Gather" else 1]
    return value.const_value if value is not None else None


def _release(tensor: ir.TensorProtocol | None) -> None:
    """Unmap a rewritten float weight read from external data, so that quantizing a large model
    holds one weight at a time, not all the ones already done (they stay readable: the file is
    mapped again on the next read)."""
    if isinstance(tensor, ir.ExternalTensor):
        try:
            tensor.release()
        except BufferError:  # someone still holds an array of it: it stays mapped
            pass


def _significant(x: float) -> float:
    return float(f"{x:.4g}")


def _nbytes(q: schemes.BlockwiseWeight) -> int:
    return (
        q.packed.nbytes + q.scales.nbytes + (0 if q.zero_points is None else q.zero_points.nbytes)
    )


def _round(x: float) -> float | str:
    return x if not np.isfinite(x) else round(float(x), 2)
