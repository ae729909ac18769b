"""Dynamic int8 quantization of MatMul and Gemm: weights quantized offline, activations at run time.

Each MatMul / Gemm whose weight is a constant ``[K, N]`` becomes, by default (``form="onnx"``), the standard-ONNX
chain ``DynamicQuantizeLinear(x)`` (shared by every MatMul reading ``x``) -> ``MatMulInteger`` -> ``Cast`` -> ``Mul``
(activation scale x weight scales) -> ``Add`` (bias), which every ONNX runtime reads and which onnxruntime's optimizer
fuses into the same kernels as the contrib form (measured on paraphrase-MiniLM-L3: 9 ``DynamicQuantizeMatMul`` and 9
``MatMulIntegerToFloat`` after optimization in both forms, latency equal within noise).

``form="contrib"`` (``--contrib-ops``) writes those onnxruntime ``com.microsoft`` kernels directly:

- ``DynamicQuantizeMatMul(x, W_int8, w_scale, w_zero_point, bias)`` when ``x`` feeds one quantized MatMul;
- one ``DynamicQuantizeLinear(x)`` shared by several ``MatMulIntegerToFloat`` when it feeds several (the
  query/key/value projections of an attention block);

and, with calibration data, two things standard ONNX below opset 21 cannot say: layers that need int8 activations
scaled per token and block run as ``MatMulNBits`` 8-bit (in the standard form they stay float, with the reason in
the report), and embedding tables become ``GatherBlockQuantized`` (in the standard form: an int8 table with one
scale per row, ``Gather`` -> ``Cast`` -> ``Mul``). A bias Add that follows the MatMul is folded into the kernel.

Weights are symmetric int8 with one scale per output column. Activations are uint8 with a per-tensor range computed
at run time, the error that dominates on transformers: with calibration data the pass measures each layer's output
SQNR on the data, optionally moves activation outliers into the weights (SmoothQuant, `onnxcomp.quantize.smooth`),
corrects the mean output error in the bias, and keeps the least accurate layers float. SmoothQuant's ``x / s`` is
folded into the constants of the op that computes ``x`` when it is a layer norm (scale and bias, fused or decomposed)
or a Mul by per-channel constants; elsewhere it would be a Mul over the whole activation at run time, which smoothing
must pay for with at least ``UNFOLDED_SMOOTH_MIN_GAIN_DB`` of output SQNR (on ViT-S the 46 Muls of smoothing every
group took 4 % of the int8 model's time: onnxcomp's dynamic model was 0.84x fp32 against onnxruntime's 0.79x).

Conv is left float unless asked for (``op_types`` includes "Conv"): dynamic quantization of Conv runs as
ConvInteger, which is several times slower than float Conv on CPU.

The rewritten model carries no inferred shapes on its intermediate values (unless ``keep_shapes``): with them
onnxruntime proves that both inputs of each residual Add have the same shape and fuses Add + LayerNormalization into
SkipLayerNormalization, whose CPU kernel (onnxruntime 1.32) is 3-5x slower than the pair it replaces (MiniLM,
384 channels: 20 versus 6 us at 11 tokens, 52 versus 9 us at 32). On MiniLM, shapes inferred by
`onnxcomp.model.normalize` as the CLI does, the twelve fused nodes took per-channel int8 from 0.23x to 0.31x of
fp32's latency at 11 tokens. Without stored shapes onnxruntime infers its own and, like for the exported model,
cannot prove the sequence dimensions equal after attention's computed Reshapes; where it can, it still fuses.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Literal

import numpy as np
import onnx_ir as ir

from onnxcomp import capture, cpu
from onnxcomp import model as model_io
from onnxcomp.errors import OnnxcompError
from onnxcomp.graph import (
    add_initializer,
    drop_shapes_before_skip_layernorm,
    drop_unused_initializers,
    replace_uses,
    unique_names,
)
from onnxcomp.graph import const as _const
from onnxcomp.passes import Result
from onnxcomp.quantize import schemes, smooth
from onnxcomp.quantize.weight_only import (
    gemm_operands,
    match_embedding,
    matmul_nbits_node,
    rewrite_gather,
    rewrite_gather_standard,
)

logger = logging.getLogger(__name__)

MS_DOMAIN = "com.microsoft"
SUPPORTED_OPS = ("MatMul", "Gemm", "Conv")
# Candidate weights held at once during calibration; more layers than this take more runs over the data.
CALIBRATION_MEMORY_BYTES = 1 << 30
# SmoothQuant's x / s is folded into the constants of x's producer when it is a layer norm (or a
# Mul by per-channel constants); elsewhere it is a Mul over the whole activation, kept only when
# smoothing gains at least this much output SQNR. On ViT-S (197 tokens) the 46 Muls of smoothing
# everywhere took 4 % of the int8 model's time; on 23 of the 24 groups they could not be folded
# into (attention output, fc2) smoothing gained less than 3 dB.
UNFOLDED_SMOOTH_MIN_GAIN_DB = 3.0
# Tokens per sample whose output errors are measured (smoothing, bias correction, SQNR): all of a
# sentence's, a random 64 of an image's 197 patches. The candidates' matmuls over every token took
# most of the 4 minutes dynamic quantization of ViT-S took on 38 photos.
MAX_ERROR_TOKENS = 64
# Samples whose activation ranges set the smoothing factors (the errors, which choose among them,
# are measured on all the calibration samples): each is a run of the model with every quantized
# layer's input captured, the larger part of the pass's time on ViT-S.
RANGE_SAMPLES = 16


@dataclasses.dataclass
class DynamicQuantizeOptions:
    """Options of dynamic quantization.

    Attributes:
        op_types: ops to quantize; "Conv" only when listed (it becomes ConvInteger, slow on CPU).
        per_channel: one weight scale per output column (else one per tensor).
        target_cpu: the CPU the model will run on (see onnxcomp.cpu): "any" (default) writes 7-bit weights
            ([-64, 64]) that onnxruntime's u8s8 kernels run exactly on every x86 path; "vnni", "arm64" (or
            "auto" on such a machine) take full-range int8 weights.
        form: "onnx" (default): standard ONNX ops only, which onnxruntime fuses into its integer kernels;
            "contrib": onnxruntime's com.microsoft kernels written directly (``--contrib-ops``).
        keep_float: node names to leave float.
        min_sqnr_db: with data, layers whose output SQNR on the data (per-tensor or, for block-wise layers,
            block-wise) stays below this are kept float (0: none).
        max_float_layers: at most this many layers kept float by ``min_sqnr_db``, the least accurate first
            (0: no limit).
        smooth: with data, try SmoothQuant on each group of MatMuls sharing an input and keep what helps.
        smooth_alphas: migration strengths tried; the best output SQNR wins (0 = no smoothing).
        bias_correction: with data, add the mean output error of each quantized layer to its bias.
        blockwise: with data, layers whose simulated output SQNR gains at least ``blockwise_gain_db`` from int8
            activations scaled per token and block (instead of per tensor) run as MatMulNBits 8-bit with
            accuracy_level 4 in the contrib form, and stay float in the standard form: the FFN down-projections of
            transformers, whose inputs have outliers that per-tensor scales cannot hold and smoothing cannot reach.
        blockwise_gain_db: the gain (dB) that earns a layer the block-wise kernel.
        blockwise_max_sqnr_db: only layers whose per-tensor output SQNR on the data is below this run block-wise
            (0: no limit). MatMulNBits 8-bit runs at half the speed of DynamicQuantizeMatMul (MiniLM's
            down-projection, K=1536, N=384: 40 versus 21 us at 11 tokens), so it is kept for the layers
            per-tensor scales ruin: on MiniLM one layer at 16.5 dB; the four others that gain 6 dB are at 22-34 dB
            and would cost 0.03 of fp32's latency for 0.9987 -> 0.9992 mean cosine.
        blockwise_block_size: block size along K of the block-wise layers (weights and activations).
        embeddings: Gathers of constant tables (token, position embeddings) are stored 8-bit: a quarter of the
            size, no measurable error (contrib form: GatherBlockQuantized with blocks along the hidden axis;
            standard form: an int8 table with one scale per row, Gather -> Cast -> Mul).
        calibration_samples: samples of the data used for the measurements.
        keep_shapes: keep the inferred shapes of intermediate values; by default they are dropped when the graph
            has a residual Add feeding a LayerNormalization, so that onnxruntime does not fuse the pair into its
            slower SkipLayerNormalization (see the module docstring).
    """

    op_types: list[str] = dataclasses.field(default_factory=lambda: ["MatMul", "Gemm"])
    per_channel: bool = True
    target_cpu: str = "any"
    form: Literal["contrib", "onnx"] = "onnx"
    keep_float: list[str] = dataclasses.field(default_factory=list)
    min_sqnr_db: float = 0.0
    max_float_layers: int = 0
    smooth: bool = True
    smooth_alphas: list[float] = dataclasses.field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75])
    bias_correction: bool = True
    blockwise: bool = True
    blockwise_gain_db: float = 6.0
    blockwise_max_sqnr_db: float = 20.0
    blockwise_block_size: int = 128
    embeddings: bool = True
    calibration_samples: int = 64
    keep_shapes: bool = False

    @property
    def reduce_range(self) -> bool:
        """7-bit weights, unless the target CPU's int8 kernels accumulate in int32."""
        return cpu.reduce_range(self.target_cpu)

    def check(self, where: str = "dynamic quantization") -> None:
        cpu.resolve(self.target_cpu)
        for op in self.op_types:
            if op not in SUPPORTED_OPS:
                raise OnnxcompError(
                    f"{where}: op_types: {op!r} is not one of {', '.join(SUPPORTED_OPS)}"
                )
        if self.form not in ("contrib", "onnx"):
            raise OnnxcompError(f"{where}: form: {self.form!r} is not one of 'contrib', 'onnx'")
        if self.max_float_layers < 0:
            raise OnnxcompError(
                f"{where}: max_float_layers must be >= 0, got {self.max_float_layers}"
            )
        for alpha in self.smooth_alphas:
            if not 0.0 <= alpha <= 1.0:
                raise OnnxcompError(f"{where}: smooth_alphas: {alpha} is not in [0, 1]")
        if self.calibration_samples < 1:
            raise OnnxcompError(
                f"{where}: calibration_samples must be >= 1, got {self.calibration_samples}"
            )
        bs = self.blockwise_block_size
        if not isinstance(bs, int) or bs < 16 or bs & (bs - 1):
            raise OnnxcompError(
                f"{where}: blockwise_block_size: {bs!r} is not a power of two >= 16 (32, 64, 128)"
            )


# ---------------------------------------------------------------------------------------------
# Matching: which nodes can run as a dynamic integer kernel, and why the others cannot.


@dataclasses.dataclass
class _Match:
    """A node to quantize: ``y = x @ w (+ bias)`` with ``w: [K, N]``; ``nodes`` are replaced, ``output`` kept."""

    name: str
    op_type: str
    w: np.ndarray  # (K, N) float32, Gemm's transB and alpha applied
    bias: np.ndarray | None  # (N,) float32
    nodes: list[ir.Node]
    output: ir.Value
    conv: ir.Node | None = None  # for Conv: the original node (attributes are copied)

    @property
    def x(self) -> ir.Value:
        """The input as the graph holds it now: rewriting the layer before renames its output."""
        return self.nodes[0].inputs[0]


def _is_float32(value: ir.Value) -> bool:
    return value.dtype in (None, ir.DataType.FLOAT)


def _bias_add(out: ir.Value, n: int) -> tuple[ir.Node, np.ndarray, ir.Value] | None:
    """The Add right after a MatMul that adds a constant [N] vector, to fold into the kernel."""
    uses = list(out.uses())
    if len(uses) != 1 or out.is_graph_output():
        return None
    add = uses[0].node
    if add.op_type != "Add" or add.domain not in ("", "ai.onnx"):
        return None
    if add.graph is not out.producer().graph:  # read inside an If branch: not the same graph
        return None
    other = add.inputs[1 - uses[0].idx]
    bias = _const(other)
    if bias is None or bias.dtype != np.float32 or bias.size != n or bias.shape[-1:] != (n,):
        return None
    return add, bias.reshape(n), add.outputs[0]


def _match_matmul(node: ir.Node) -> _Match | str:
    x, b = node.inputs[0], node.inputs[1]
    w = _const(b)
    if w is None:
        return "weight is computed at run time (not a constant)"
    if w.dtype != np.float32:
        return f"weight is {w.dtype}, not float32"
    if not _is_float32(x):
        return f"input is {x.dtype}, not float32"
    if w.ndim != 2:
        return f"weight has rank {w.ndim}; the integer kernels need a [K, N] matrix"
    if x.shape is not None and len(x.shape) < 2:
        return "input is a vector; the integer kernels need a matrix"
    nodes, output, bias = [node], node.outputs[0], None
    fold = _bias_add(node.outputs[0], w.shape[1])
    if fold is not None:
        add, bias, output = fold
        nodes.append(add)
    return _Match(node.name or "", "MatMul", w, bias, nodes, output)


def _match_gemm(node: ir.Node) -> _Match | str:
    operands = gemm_operands(node)
    if isinstance(operands, str):
        return operands
    w, bias = operands
    return _Match(node.name or "", "Gemm", w, bias, [node], node.outputs[0])


def _match_conv(node: ir.Node) -> _Match | str:
    w = _const(node.inputs[1])
    if w is None:
        return "weight is computed at run time (not a constant)"
    if w.dtype != np.float32:
        return f"weight is {w.dtype}, not float32"
    bias = None
    if len(node.inputs) > 2 and node.inputs[2] is not None:
        bias = _const(node.inputs[2])
        if bias is None:
            return "bias is computed at run time"
    return _Match(node.name or "", "Conv", w, bias, [node], node.outputs[0], conv=node)


# op type -> rule; a rule returns a match or the reason the node stays float.
RULES = {"MatMul": _match_matmul, "Gemm": _match_gemm, "Conv": _match_conv}

_NOT_ASKED = {
    "Conv": "Conv stays float by default: dynamic quantization makes it ConvInteger, slower than "
    "float Conv on CPU (add Conv to op_types to force it)",
}


# ---------------------------------------------------------------------------------------------
# The plan: per layer, int8 or float and why; per group of layers sharing an input, a smoothing.


@dataclasses.dataclass
class _Layer:
    match: _Match
    weight_sqnr_db: float = math.nan
    output_sqnr_db: float | None = None
    float_reason: str | None = None
    smooth_alpha: float = 0.0
    bias_delta: np.ndarray | None = None  # (N,) added to the bias (bias correction)
    smooth_scale: np.ndarray | None = None  # (K,) SmoothQuant factors s: x / s, s * w
    blockwise_sqnr_db: float | None = None  # simulated output SQNR with per-block int8 activations
    blockwise_reason: str | None = None  # set when the layer runs as MatMulNBits
    shares_weight_with: str | None = None  # the layer whose int8 weight this one reads
    smooth_gain_db: float | None = None  # output SQNR gained by smoothing (all of its group)
    smooth_folded: bool = False  # x / s folded into the producer's constants (no Mul)
    calibration_note: str | None = None  # why the data measured nothing for it
    new_output: ir.Value | None = None

    def to_json(self) -> dict[str, object]:
        entry: dict[str, object] = {
            "node": self.match.name,
            "op": self.match.op_type,
            "weight": list(self.match.w.shape),
            "weight_sqnr_db": _round(self.weight_sqnr_db),
            "status": "float"
            if self.float_reason
            else ("int8-blockwise" if self.blockwise_reason else "int8"),
        }
        if self.output_sqnr_db is not None:
            entry["output_sqnr_db"] = _round(self.output_sqnr_db)
        # A block-wise layer reads the unsmoothed input and keeps its own bias.
        if self.smooth_alpha and not self.blockwise_reason:
            entry["smooth_alpha"] = self.smooth_alpha
            entry["smooth"] = "folded into the producer" if self.smooth_folded else "Mul"
        if self.smooth_gain_db is not None:
            entry["smooth_gain_db"] = _round(self.smooth_gain_db)
        if self.bias_delta is not None and not self.blockwise_reason:
            entry["bias_corrected"] = True
        if self.blockwise_sqnr_db is not None:
            entry["blockwise_sqnr_db"] = _round(self.blockwise_sqnr_db)
        if self.shares_weight_with:
            entry["shares_weight_with"] = self.shares_weight_with
        if self.float_reason or self.blockwise_reason:
            entry["reason"] = self.float_reason or self.blockwise_reason
        if self.calibration_note:
            entry["note"] = self.calibration_note
        return entry


def _round(x: float) -> float | str:
    return x if math.isinf(x) or math.isnan(x) else round(float(x), 2)


class _GroupStats:
    """Running calibration figures of the layers reading one activation ``x``, for each smoothing candidate.

    Keeps sums only: per candidate and layer the output noise relative to each token's output energy, and the sum
    of output errors. The noise is measured per token (row) so that a few huge tokens, which per-tensor scales
    serve well, do not hide the error on all the others; the SQNR reported is ``-10 log10(mean_t |e_t|^2 / |y_t|^2)``.
    """

    def __init__(self, layers: list[_Layer], alphas: list[float], block_size: int | None):
        self.layers = layers
        self.alphas = alphas
        self.block_size = block_size  # None: no block-wise candidate
        self.noise_blockwise = np.zeros(len(layers))
        self.act_absmax: np.ndarray | None = None  # (K,)
        self.scales: dict[float, np.ndarray] = {}
        self.signal = np.zeros(len(layers))
        self.noise = np.zeros((len(alphas), len(layers)))
        self.err_sum = [[np.zeros(lay.match.w.shape[1]) for lay in layers] for _ in alphas]
        self.count = 0
        self.rng = np.random.default_rng(0)

    def _rows(self, x: np.ndarray) -> np.ndarray | None:
        """At most MAX_ERROR_TOKENS rows per sample of ``x: (samples, ..., K)``, drawn at random
        (the same draw for every candidate), or None for all of them."""
        if x.ndim < 3:  # a matrix: one row per sample
            return None
        samples = x.shape[0]
        total = x.size // x.shape[-1]
        if total <= MAX_ERROR_TOKENS * samples:
            return None
        per = total // samples
        picks = [
            i * per + np.sort(self.rng.choice(per, MAX_ERROR_TOKENS, replace=False))
            for i in range(samples)
        ]
        return np.concatenate(picks)

    def observe_range(self, x: np.ndarray) -> None:
        m = np.abs(x.reshape(-1, x.shape[-1])).max(axis=0)
        self.act_absmax = m if self.act_absmax is None else np.maximum(self.act_absmax, m)

    def prepare(self, per_channel: bool, reduce_range: bool) -> None:
        """Compute the smoothing factors and quantized weights of every candidate."""
        w_absmax = np.max([np.abs(lay.match.w).max(axis=1) for lay in self.layers], axis=0)  # (K,)
        self.candidates = []
        for alpha in self.alphas:
            s = (
                np.ones_like(w_absmax, dtype=np.float32)
                if alpha == 0.0
                else smooth.smooth_scales(self.act_absmax, w_absmax, alpha)
            )
            self.scales[alpha] = s
            wqs = []
            for lay in self.layers:
                ws = lay.match.w * s[:, None]
                p = schemes.weight_params(
                    ws, axis=1, per_channel=per_channel, reduce_range=reduce_range
                )
                wqs.append(schemes.dequantize(schemes.quantize(ws, p), p))
            self.candidates.append(wqs)
        if self.block_size:
            self.blockwise_weights = [
                schemes.dequantize_blockwise(
                    schemes.quantize_blockwise(lay.match.w, self.block_size, 8, True)
                )
                for lay in self.layers
            ]

    def release(self) -> None:
        """Drop the candidate weights once the errors are summed."""
        self.candidates = []
        self.blockwise_weights = []

    def observe_error(self, x: np.ndarray) -> None:
        x = np.asarray(x, np.float32)
        k = x.shape[-1]
        x2 = x.reshape(-1, k)  # (tokens, K)
        # Activations are quantized whole (each sample's range is the kernel's), the errors are
        # summed over a sample of the tokens: the matmuls of every candidate are the cost.
        rows = self._rows(x)
        samples = x.shape[0] if x.ndim >= 3 else 1
        per_sample = x2.reshape(samples, -1, k)
        # Each sample's range after smoothing, from its per-channel extremes (s > 0): the
        # candidates then quantize the sampled rows only.
        ch_min, ch_max = per_sample.min(axis=1), per_sample.max(axis=1)  # (samples, K)
        owner = np.arange(x2.shape[0]) // per_sample.shape[1]
        if rows is not None:
            x2, owner = x2[rows], owner[rows]
        refs = [x2 @ lay.match.w for lay in self.layers]  # (tokens, N) each
        # 1 / |y_t|^2 per token; all-zero outputs (padding) weigh nothing.
        inv = [1.0 / np.maximum(np.einsum("tn,tn->t", r, r), 1e-30) for r in refs]
        for i in range(len(refs)):
            self.signal[i] += float(np.count_nonzero(inv[i] < 1e29))

        def noise(i: int, approx: np.ndarray) -> tuple[float, np.ndarray]:
            err = refs[i] - approx  # (tokens, N)
            per_token = np.einsum("tn,tn->t", err, err) * inv[i]
            return float(np.sum(np.where(inv[i] < 1e29, per_token, 0.0))), err

        for a, alpha in enumerate(self.alphas):
            # Per sample ranges, as DynamicQuantizeLinear sees one sample at a time.
            s = self.scales[alpha]
            lo, hi = (ch_min / s).min(axis=1), (ch_max / s).max(axis=1)
            xq = smooth.dequantize_in_range(x2 / s, lo[owner], hi[owner])
            for i, wq in enumerate(self.candidates[a]):
                value, err = noise(i, xq @ wq)
                self.noise[a, i] += value
                self.err_sum[a][i] += err.sum(axis=0, dtype=np.float64)
        if self.block_size:
            xb = smooth.blockwise_quantize_activation(x2, self.block_size)
            for i, wb in enumerate(self.blockwise_weights):
                self.noise_blockwise[i] += noise(i, xb @ wb)[0]
        self.count += x2.shape[0]


def _sqnr(signal: float, noise: float) -> float:
    if noise == 0:
        return math.inf
    return 10 * math.log10(max(signal, 1e-300) / noise)


class DynamicQuantizePass(ir.passes.InPlacePass):
    """Quantize MatMul / Gemm weights to int8 per output column; activations are quantized at run time."""

    def __init__(self, options: DynamicQuantizeOptions | None = None, data=None):
        self.options = options or DynamicQuantizeOptions()
        self.options.check()
        self.data = data

    def _check_opset(self, model: ir.Model) -> None:
        # Not in requires(): onnx-ir wraps what requires() raises in PreconditionError, and the user's
        # mistake must reach the CLI as an OnnxcompError.
        version = model_io.opset(model)
        if version < 11:
            raise OnnxcompError(
                f"dynamic quantization writes DynamicQuantizeLinear (opset 11); the model imports opset "
                f"{version}: upgrade it first (onnxcomp.model.ensure_opset)"
            )

    def call(self, model: ir.Model) -> Result:
        opts = self.options
        self._check_opset(model)
        layers, skipped = self._plan_matches(model)
        for lay in layers:
            if lay.match.name in opts.keep_float:
                lay.float_reason = "listed in keep_float"
        calibration: dict[str, object] = {}
        active = [
            lay
            for lay in layers
            if not lay.float_reason and lay.match.op_type != "Conv" and not lay.calibration_note
        ]
        if active and (
            opts.smooth or opts.bias_correction or opts.blockwise or opts.min_sqnr_db > 0
        ):
            calibration = self._calibrate(model, active)
        for lay in layers:
            if math.isnan(lay.weight_sqnr_db):
                lay.weight_sqnr_db = self._weight_sqnr(lay)
                model_io.release(_weight_of(lay.match.nodes[0]))
        self._choose_float(layers)
        quantized = [lay for lay in layers if not lay.float_reason]
        if quantized:
            self._rewrite(model, quantized)
            unique_names(model)  # values written in several If branches
        embeddings = []
        if opts.embeddings:
            embeddings = self._quantize_embeddings(model, skipped)
        shapes_dropped = 0
        if (quantized or embeddings) and not opts.keep_shapes:
            shapes_dropped = drop_shapes_before_skip_layernorm(model.graph)
        report: dict[str, object] = {
            "quantized": len(quantized),
            "kept_float": len(layers) - len(quantized),
            "embeddings": embeddings,
            "form": opts.form,
            "per_channel": opts.per_channel,
            "reduce_range": opts.reduce_range,
            "cpu": cpu.describe(opts.target_cpu),
            "shapes_dropped": shapes_dropped,
            **calibration,
            "layers": [lay.to_json() for lay in layers],
            "skipped": skipped,
        }
        for lay in layers:
            if lay.float_reason:
                logger.info("%s stays float: %s", lay.match.name, lay.float_reason)
        return Result(model, modified=bool(quantized or embeddings), report=report)

    def _quantize_embeddings(
        self, model: ir.Model, skipped: list[dict[str, str]]
    ) -> list[dict[str, object]]:
        """Embedding Gathers -> GatherBlockQuantized 8-bit (blocks of 128, 64, 32 or 16 along the hidden axis)."""
        plan = []
        for node in model.graph:
            if node.op_type != "Gather" or node.domain not in ("", "ai.onnx"):
                continue
            table = node.inputs[0]
            if table.const_value is None or table.is_graph_input():
                continue  # a Gather of shapes or indices, not a weight
            if table.const_value.dtype != ir.DataType.FLOAT:
                continue  # integer lookup tables (shapes, indices) are not weights
            name = node.name or node.outputs[0].name or "Gather"
            if name in self.options.keep_float:
                skipped.append({"node": name, "op": "Gather", "reason": "listed in keep_float"})
                continue
            shape = table.const_value.shape
            hidden = shape[-1] if len(shape) == 2 else 0
            block = next((b for b in (128, 64, 32, 16) if hidden and hidden % b == 0), 128)
            match = match_embedding(node, block)
            if not isinstance(match, str):
                match = schemes.nonfinite_reason(match.w) or match
            if isinstance(match, str):
                skipped.append({"node": name, "op": "Gather", "reason": match})
            else:
                plan.append((match, block))
        entries = []
        for match, block in plan:
            if self.options.form == "contrib":
                entry, _ = rewrite_gather(model.graph, match, 8, block, True)
            else:
                entry, _ = rewrite_gather_standard(model.graph, match)
            entries.append(entry)
        if entries and self.options.form == "contrib":
            model.opset_imports.setdefault(MS_DOMAIN, 1)
        return entries

    # -- plan ------------------------------------------------------------------------------

    def _plan_matches(self, model: ir.Model) -> tuple[list[_Layer], list[dict[str, str]]]:
        layers, skipped = [], []
        claimed: set[int] = set()
        # The main graph and every subgraph: each layer is rewritten in its own graph (a
        # branch's input from the outer scope is quantized in the branch that reads it). Inside
        # Loop and Scan bodies the inputs cannot be captured: plain per-channel int8 there.
        nodes = [(node, why) for graph, why in capture.subgraphs(model) for node in graph]
        for node, why in nodes:
            if node.domain not in ("", "ai.onnx") or node.op_type not in RULES:
                continue
            name = node.name or node.outputs[0].name or node.op_type
            if node.op_type not in self.options.op_types:
                reason = _NOT_ASKED.get(node.op_type, f"{node.op_type} not in op_types")
                skipped.append({"node": name, "op": node.op_type, "reason": reason})
                continue
            if id(node) in claimed:
                continue
            match = RULES[node.op_type](node)
            if not isinstance(match, str):
                match = schemes.nonfinite_reason(match.w) or match
                model_io.release(_weight_of(node))
            if isinstance(match, str):
                skipped.append({"node": name, "op": node.op_type, "reason": match})
                continue
            match.name = name
            claimed.update(id(n) for n in match.nodes)
            layers.append(_Layer(match))
            if why:
                layers[-1].calibration_note = (
                    f"{why.split(':')[0]}: its input cannot be captured; per-channel int8, "
                    "no smoothing or bias correction"
                )
        return layers, skipped

    def _weight_sqnr(self, lay: _Layer) -> float:
        w = lay.match.w
        if lay.match.op_type == "Conv":
            p = schemes.weight_params(
                w, axis=0, dtype=schemes.UINT8, per_channel=self.options.per_channel
            )
        else:
            p = schemes.weight_params(
                w,
                axis=1,
                per_channel=self.options.per_channel,
                reduce_range=self.options.reduce_range,
            )
        return schemes.sqnr_db(w, schemes.dequantize(schemes.quantize(w, p), p))

    def _calibrate(self, model: ir.Model, layers: list[_Layer]) -> dict[str, object]:
        """Two streaming runs over the data: activation ranges, then output errors per candidate."""
        opts = self.options
        data = self.data
        if data is None:
            # Random inputs would pick smoothing factors and bias corrections for data the model never sees.
            logger.info(
                "no calibration data: per-channel int8 only (no smoothing, bias correction, block-wise)"
            )
            return {
                "calibration": "none: per-channel int8 only; give data for smoothing, bias correction "
                "and block-wise layers"
            }
        groups: dict[str, _GroupStats] = {}
        by_input: dict[str, list[_Layer]] = {}
        for lay in layers:
            by_input.setdefault(lay.match.x.name, []).append(lay)
        alphas = sorted(set([0.0] + (list(opts.smooth_alphas) if opts.smooth else [])))
        block = opts.blockwise_block_size if opts.blockwise else None
        for name, group in by_input.items():
            eligible = block if all(lay.match.op_type == "MatMul" for lay in group) else None
            groups[name] = _GroupStats(group, alphas, eligible)
        limit = opts.calibration_samples
        # The candidate weights of every group are held while the data streams by: groups are taken in chunks
        # that fit CALIBRATION_MEMORY_BYTES, each chunk with its own two runs over the data.
        chunks = capture.split_by_budget(
            list(groups),
            lambda name: (len(alphas) + 1) * sum(lay.match.w.size * 4 for lay in by_input[name]),
            CALIBRATION_MEMORY_BYTES,
        )
        for names in chunks:
            ranges = {name: capture.Each(groups[name].observe_range) for name in names}
            capture.accumulate(model, ranges, data, limit=min(limit, RANGE_SAMPLES))
            # Inputs in If branches no calibration sample took: plain per-channel int8.
            names = [name for name in names if groups[name].act_absmax is not None]
            for name in names:
                groups[name].prepare(opts.per_channel, opts.reduce_range)
            errors = {name: capture.Each(groups[name].observe_error) for name in names}
            if errors:
                capture.accumulate(model, errors, data, limit=limit)
            for name in names:
                groups[name].release()
        smoothed = blockwise = 0
        for stats in groups.values():
            if stats.act_absmax is None:
                for lay in stats.layers:
                    lay.calibration_note = (
                        "in an If branch that no calibration sample took: per-channel int8, "
                        "no smoothing or bias correction"
                    )
                continue
            totals = [_sqnr(stats.signal.sum(), stats.noise[a].sum()) for a in range(len(alphas))]
            best = int(np.argmax(totals))
            gain = totals[best] - totals[0]
            if best and gain < UNFOLDED_SMOOTH_MIN_GAIN_DB:
                first = stats.layers[0].match
                readers = {id(lay.match.nodes[0]) for lay in stats.layers}
                if smoothing_site(first.x, readers, first.w.shape[0]) is None:
                    best = 0  # the Mul would cost more than the noise it saves
            alpha = alphas[best]
            smoothed += alpha > 0
            for i, lay in enumerate(stats.layers):
                lay.smooth_alpha = alpha
                lay.smooth_gain_db = gain if best else None
                lay.output_sqnr_db = _sqnr(stats.signal[i], stats.noise[best, i])
                if alpha:
                    lay.smooth_scale = stats.scales[alpha]
                if opts.bias_correction and stats.count:
                    lay.bias_delta = (stats.err_sum[best][i] / stats.count).astype(np.float32)
                if stats.block_size:
                    lay.blockwise_sqnr_db = _sqnr(stats.signal[i], stats.noise_blockwise[i])
                    gain = lay.blockwise_sqnr_db - lay.output_sqnr_db
                    poor = (
                        not opts.blockwise_max_sqnr_db
                        or lay.output_sqnr_db < opts.blockwise_max_sqnr_db
                    )
                    if gain >= opts.blockwise_gain_db and poor and opts.form == "contrib":
                        blockwise += 1
                        lay.blockwise_reason = (
                            f"per-tensor output SQNR {lay.output_sqnr_db:.1f} dB, per-block int8 "
                            f"activations gain {gain:.1f} dB on the data: MatMulNBits 8-bit, block "
                            f"{stats.block_size}, accuracy_level 4"
                        )
                    elif gain >= opts.blockwise_gain_db and poor:
                        lay.float_reason = (
                            f"per-tensor output SQNR {lay.output_sqnr_db:.1f} dB on the data; per-block "
                            f"int8 activations would gain {gain:.1f} dB, which needs MatMulNBits "
                            "(--contrib-ops): kept float"
                        )
        return {
            "calibration": getattr(data, "name", "data"),
            "calibration_runs": 2 * len(chunks),
            "smoothed_groups": int(smoothed),
            "blockwise_layers": blockwise,
        }

    def _choose_float(self, layers: list[_Layer]) -> None:
        opts = self.options
        if opts.min_sqnr_db <= 0:
            return

        def effective(lay: _Layer) -> float:
            return lay.blockwise_sqnr_db if lay.blockwise_reason else lay.output_sqnr_db

        below = sorted(
            (
                lay
                for lay in layers
                if not lay.float_reason
                and lay.output_sqnr_db is not None
                and effective(lay) < opts.min_sqnr_db
            ),
            key=effective,
        )
        if opts.max_float_layers:
            below = below[: opts.max_float_layers]
        for lay in below:
            lay.float_reason = f"output SQNR {effective(lay):.1f} dB on the data is below min_sqnr_db={opts.min_sqnr_db:g}"
            lay.blockwise_reason = None

    # -- rewrite ---------------------------------------------------------------------------

    def _rewrite(self, model: ir.Model, layers: list[_Layer]) -> None:
        graph = model.graph
        if any(lay.blockwise_reason for lay in layers) or (
            self.options.form == "contrib" and any(lay.match.op_type != "Conv" for lay in layers)
        ):
            model.opset_imports.setdefault(MS_DOMAIN, 1)
        self._order = {id(node): i for g in model.graphs() for i, node in enumerate(g)}
        self._shared: dict[tuple, tuple] = {}
        groups: dict[tuple[int, float, int], list[_Layer]] = {}
        for lay in layers:
            # one group per input and graph: an If branch quantizes what it reads itself
            graph = lay.match.nodes[0].graph
            groups.setdefault((id(lay.match.x), lay.smooth_alpha, id(graph)), []).append(lay)
        for group in groups.values():
            weights = [_weight_of(lay.match.nodes[0]) for lay in group]
            self._rewrite_group(group[0].match.nodes[0].graph or graph, group)
            for tensor in weights:
                model_io.release(tensor)

    def _rewrite_group(self, graph: ir.Graph, group: list[_Layer]) -> None:
        opts = self.options
        first = group[0].match
        x = first.x
        anchor = min((lay.match.nodes[0] for lay in group), key=lambda n: self._order[id(n)])
        new_nodes: list[ir.Node] = []
        tag = first.name.replace("/", "_").strip("_") or "x"
        if first.op_type == "Conv":
            for lay in group:
                new_nodes += self._conv_integer(graph, lay, x)
            self._replace(graph, anchor, group, new_nodes)
            return
        for lay in [lay for lay in group if lay.blockwise_reason]:
            m = lay.match
            q = schemes.quantize_blockwise(m.w, opts.blockwise_block_size, 8, True)
            lay.weight_sqnr_db = schemes.sqnr_db(m.w, schemes.dequantize_blockwise(q))
            node = matmul_nbits_node(graph, x, q, m.bias, 4, m.name)
            new_nodes.append(node)
            lay.new_output = node.outputs[0]
        per_tensor = [lay for lay in group if not lay.blockwise_reason]
        scale_vec = group[0].smooth_scale
        if per_tensor and scale_vec is not None:
            readers = {id(lay.match.nodes[0]) for lay in per_tensor}
            site = smoothing_site(x, readers, scale_vec.size)
            if site is not None:
                # x / s folded into the constants of x's producer (a layer norm's scale and
                # bias): no extra op at run time.
                fold_smoothing(graph, site, scale_vec, tag)
                for lay in per_tensor:
                    lay.smooth_folded = True
            else:
                inv = add_initializer(
                    graph, f"{tag}_smooth_inv", (1.0 / scale_vec).astype(np.float32)
                )
                mul = ir.node("Mul", [x, inv], name=f"{tag}_smooth")
                new_nodes.append(mul)
                x = mul.outputs[0]
        if not per_tensor:
            self._replace(graph, anchor, group, new_nodes)
            return
        shared = None
        if opts.form == "onnx" or len(per_tensor) > 1:
            dql = ir.node("DynamicQuantizeLinear", [x], num_outputs=3, name=f"{tag}_quantize")
            new_nodes.append(dql)
            shared = dql.outputs
        for lay in per_tensor:
            m = lay.match
            name = m.name.replace("/", "_").strip("_") or "matmul"
            # A weight read by several MatMuls is quantized once (unless smoothing scaled it for
            # this reader's input): the later readers take the same int8 initializers.
            key = (_weight_key(m), id(graph)) if scale_vec is None else None
            if key in self._shared:
                lay.shares_weight_with, w_q, w_s, w_zp, lay.weight_sqnr_db = self._shared[key]
            else:
                w = m.w * scale_vec[:, None] if scale_vec is not None else m.w
                p = schemes.weight_params(
                    w, axis=1, per_channel=opts.per_channel, reduce_range=opts.reduce_range
                )
                wq = schemes.quantize(w, p)  # (K, N) int8
                # Of the weight actually quantized (smoothed: s * w).
                lay.weight_sqnr_db = schemes.sqnr_db(w, schemes.dequantize(wq, p))
                w_q = add_initializer(graph, f"{name}_W_int8", wq)
                w_s = add_initializer(graph, f"{name}_W_scale", np.asarray(p.scale, np.float32))
                w_zp = add_initializer(
                    graph, f"{name}_W_zero_point", np.asarray(p.zero_point, np.int8)
                )
                if key is not None:
                    self._shared[key] = (m.name, w_q, w_s, w_zp, lay.weight_sqnr_db)
            bias = m.bias
            if lay.bias_delta is not None:
                bias = (bias if bias is not None else 0.0) + lay.bias_delta
            b = (
                add_initializer(graph, f"{name}_bias", np.asarray(bias, np.float32))
                if bias is not None
                else None
            )
            if opts.form == "onnx":
                new_nodes += _standard_chain(shared, w_q, w_s, w_zp, b, name)
            elif shared is None:
                new_nodes.append(
                    ir.node(
                        "DynamicQuantizeMatMul", [x, w_q, w_s, w_zp, b], domain=MS_DOMAIN, name=name
                    )
                )
            else:
                new_nodes.append(
                    ir.node(
                        "MatMulIntegerToFloat",
                        [shared[0], w_q, shared[1], w_s, shared[2], w_zp, b],
                        domain=MS_DOMAIN,
                        name=name,
                    )
                )
            lay.new_output = new_nodes[-1].outputs[0]
        self._replace(graph, anchor, group, new_nodes)

    def _conv_integer(self, graph: ir.Graph, lay: _Layer, x: ir.Value) -> list[ir.Node]:
        """Conv -> DynamicQuantizeLinear, ConvInteger (uint8 weights), Cast, Mul, Add (only when asked).

        onnxruntime's ConvInteger takes one weight zero point per tensor: weights are symmetric uint8 around 128,
        so per-channel scales can still be applied after the integer convolution.
        """
        m = lay.match
        name = m.name.replace("/", "_").strip("_") or "conv"
        p = schemes.weight_params(
            m.w, axis=0, dtype=schemes.UINT8, per_channel=self.options.per_channel, symmetric=True
        )
        wq = schemes.quantize(m.w, p)
        w_q = add_initializer(graph, f"{name}_W_uint8", wq)
        w_zp = add_initializer(graph, f"{name}_W_zero_point", np.asarray(128, np.uint8))
        shape = (1, -1) + (1,) * (m.w.ndim - 2)
        w_s = add_initializer(
            graph, f"{name}_W_scale", np.asarray(p.scale, np.float32).reshape(shape)
        )
        dql = ir.node("DynamicQuantizeLinear", [x], num_outputs=3, name=f"{name}_quantize")
        conv = ir.node(
            "ConvInteger",
            [dql.outputs[0], w_q, dql.outputs[2], w_zp],
            attributes={k: v for k, v in m.conv.attributes.items()},
            name=f"{name}_integer",
        )
        cast = ir.node(
            "Cast", [conv.outputs[0]], attributes={"to": ir.DataType.FLOAT}, name=f"{name}_cast"
        )
        scale = ir.node("Mul", [dql.outputs[1], w_s], name=f"{name}_scale")
        out = ir.node("Mul", [cast.outputs[0], scale.outputs[0]], name=f"{name}_rescale")
        nodes = [dql, conv, cast, scale, out]
        if m.bias is not None:
            b = add_initializer(graph, f"{name}_bias", m.bias.astype(np.float32).reshape(shape))
            nodes.append(ir.node("Add", [out.outputs[0], b], name=f"{name}_bias"))
        lay.new_output = nodes[-1].outputs[0]
        return nodes

    def _replace(
        self, graph: ir.Graph, anchor: ir.Node, group: list[_Layer], new_nodes: list[ir.Node]
    ) -> None:
        graph.insert_before(anchor, new_nodes)
        for lay in group:
            replace_uses(lay.match.output, lay.new_output, old_suffix="__float", take_name=True)
        for lay in group:
            inputs = [v for node in lay.match.nodes for v in node.inputs]
            for node in reversed(lay.match.nodes):
                graph.remove(node, safe=True)
            drop_unused_initializers(graph, inputs)


def _vector_input(node: ir.Node, k: int) -> int | None:
    """The index of ``node``'s constant input holding one value per channel (``[K]``, or
    ``[1, .., K]``), when the other input is computed."""
    if len(node.inputs) != 2:
        return None
    for i, value in enumerate(node.inputs):
        array = _const(value)
        other = node.inputs[1 - i]
        if (
            array is not None
            and array.dtype == np.float32
            and array.size == k
            and array.shape[-1:] == (k,)
            and _const(other) is None
        ):
            return i
    return None


def smoothing_site(x: ir.Value, readers: set[int], k: int) -> list[tuple[ir.Node, int]] | None:
    """Where SmoothQuant's ``x / s`` can be folded into constants instead of a Mul at run time:
    the (node, input index) of per-channel constants of ``x``'s producer, each divided by ``s``.

    ``x`` must be read by the ``readers`` (node ids) only. Its producer is a LayerNormalization
    over the last axis (scale, bias), a decomposed one's ``Add(Mul(n, gamma), beta)``, or a Mul
    by a ``[K]`` constant. A scalar constant is never scaled: it would stop onnxruntime's
    fusions (Gelu's ``* 0.5``) and cost more than the Mul it saves.
    """
    if x.is_graph_output() or x.is_graph_input():
        return None
    if any(id(use.node) not in readers for use in x.uses()):
        return None
    node = x.producer()
    if node is None or node.domain not in ("", "ai.onnx"):
        return None
    if node.op_type == "LayerNormalization":
        axis = node.attributes.get_int("axis", -1)
        rank = len(x.shape) if x.shape is not None else None
        if axis != -1 and (rank is None or axis != rank - 1):
            return None
        slots = [(node, i) for i in (1, 2) if i < len(node.inputs) and node.inputs[i] is not None]
        for n, i in slots:
            array = _const(n.inputs[i])
            if array is None or array.dtype != np.float32 or array.shape != (k,):
                return None
        return slots
    if node.op_type == "Mul":
        i = _vector_input(node, k)
        return [(node, i)] if i is not None else None
    if node.op_type == "Add":
        i = _vector_input(node, k)
        if i is None:
            return None
        inner = node.inputs[1 - i]
        mul = inner.producer()
        if (
            mul is None
            or mul.op_type != "Mul"
            or mul.domain not in ("", "ai.onnx")
            or inner.is_graph_output()
            or len(list(inner.uses())) != 1
        ):
            return None
        j = _vector_input(mul, k)
        return [(node, i), (mul, j)] if j is not None else None
    return None


def fold_smoothing(
    graph: ir.Graph, site: list[tuple[ir.Node, int]], scale: np.ndarray, tag: str
) -> None:
    """Divide the constants of ``site`` (from `smoothing_site`) by the smoothing factors."""
    for node, i in site:
        old = node.inputs[i]
        array = _const(old)
        folded = (array / scale.reshape(array.shape)).astype(np.float32)
        node.replace_input_with(i, add_initializer(graph, f"{tag}_smoothed", folded))
        drop_unused_initializers(graph, [old])


def _weight_key(match: _Match) -> tuple:
    """Layers with equal keys compute with the same ``[K, N]`` weight: one initializer, seen
    through the same Gemm attributes."""
    node = match.nodes[0]
    attrs = node.attributes
    view = (
        (attrs.get_int("transB", 0), attrs.get_float("alpha", 1.0))
        if node.op_type == "Gemm"
        else ()
    )
    return (id(node.inputs[1]), node.op_type, view)


def _standard_chain(shared, w_q, w_s, w_zp, b, name: str) -> list[ir.Node]:
    """DynamicQuantizeLinear outputs -> MatMulInteger, Cast, Mul (scales), Add (bias): standard ONNX."""
    mm = ir.node("MatMulInteger", [shared[0], w_q, shared[2], w_zp], name=f"{name}_integer")
    cast = ir.node(
        "Cast", [mm.outputs[0]], attributes={"to": ir.DataType.FLOAT}, name=f"{name}_cast"
    )
    scale = ir.node("Mul", [shared[1], w_s], name=f"{name}_scale")
    out = ir.node("Mul", [cast.outputs[0], scale.outputs[0]], name=f"{name}_rescale")
    nodes = [mm, cast, scale, out]
    if b is not None:
        nodes.append(ir.node("Add", [out.outputs[0], b], name=f"{name}_bias"))
    return nodes


def _weight_of(node: ir.Node) -> ir.TensorProtocol | None:
    """The tensor of the node's weight input: released (``model.release``) once a layer has used
    it, so a large model's weights read from external data are resident one layer at a time."""
    value = node.inputs[1] if len(node.inputs) > 1 else None
    return value.const_value if value is not None else None
