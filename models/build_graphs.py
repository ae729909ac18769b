"""Architecture graphs built directly with onnx.helper: ResNet, MobileNetV2 and BERT shapes.

No training: weights are seeded random (He-style for convolutions and projections, so activations
keep a sane scale through depth). Each builder returns an `onnx.ModelProto` at opset 17 with a
dynamic batch axis; tests and benchmarks call them to build graphs on the fly.

    python models/build_graphs.py [--out-dir models/build] [all|resnet|mobilenetv2|bert] [--flags]

Every keyword of a builder is a flag of its subcommand (`resnet --widths 32,64 --image-size 64`).
"""

from __future__ import annotations

import argparse
import inspect
import math
import pathlib

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

HERE = pathlib.Path(__file__).resolve().parent
OPSET = 17
IR_VERSION = 8  # the IR version that goes with opset 17; onnxruntime reads it everywhere


class _Graph:
    """Collects nodes and initializers with unique names while a builder writes the graph."""

    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self._count: dict[str, int] = {}

    def name(self, prefix: str) -> str:
        n = self._count.get(prefix, 0)
        self._count[prefix] = n + 1
        return f"{prefix}_{n}"

    def const(self, prefix: str, array: np.ndarray) -> str:
        name = self.name(prefix)
        self.inits.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def op(self, op_type: str, inputs: list[str], n_out: int = 1, **attrs) -> str | list[str]:
        node_name = self.name(op_type)
        outs = [f"{node_name}_out{i}" if n_out > 1 else f"{node_name}_out" for i in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=node_name, **attrs))
        return outs[0] if n_out == 1 else outs

    def he(self, shape: tuple[int, ...], fan_in: int) -> np.ndarray:
        return (self.rng.standard_normal(shape) * math.sqrt(2.0 / fan_in)).astype(np.float32)

    def model(self, name: str, inputs, outputs) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, name, inputs, outputs, self.inits)
        model = helper.make_model(
            graph,
            opset_imports=[helper.make_opsetid("", OPSET)],
            producer_name="onnxcomp-models",
            ir_version=IR_VERSION,
        )
        onnx.checker.check_model(model, full_check=True)
        return model

    # Layers shared by the CNNs.

    def conv_bn(
        self, x: str, c_in: int, c_out: int, k: int, stride: int = 1, group: int = 1, gamma=1.0
    ) -> str:
        fan_in = c_in // group * k * k
        w = self.const("conv_w", self.he((c_out, c_in // group, k, k), fan_in=fan_in))
        y = self.op(
            "Conv", [x, w], kernel_shape=[k, k], strides=[stride, stride],
            pads=[k // 2] * 4, group=group,
        )  # fmt: skip
        scale = self.const("bn_scale", np.full(c_out, gamma, np.float32))
        bias = self.const("bn_bias", (self.rng.standard_normal(c_out) * 0.05).astype(np.float32))
        mean = self.const("bn_mean", (self.rng.standard_normal(c_out) * 0.05).astype(np.float32))
        var = self.const("bn_var", self.rng.uniform(0.8, 1.2, c_out).astype(np.float32))
        return self.op("BatchNormalization", [y, scale, bias, mean, var], epsilon=1e-5)

    def head(self, x: str, c_in: int, num_classes: int) -> str:
        pooled = self.op("Flatten", [self.op("GlobalAveragePool", [x])], axis=1)
        w = self.const("fc_w", self.he((num_classes, c_in), fan_in=c_in) * 0.5)
        b = self.const("fc_b", np.zeros(num_classes, np.float32))
        return self.op("Gemm", [pooled, w, b], transB=1)


def _image_input(channels: int, image_size: int) -> onnx.ValueInfoProto:
    shape = ["batch", channels, image_size, image_size]
    return helper.make_tensor_value_info("input", TensorProto.FLOAT, shape)


def _logits(num_classes: int) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", num_classes])


def resnet(
    *,
    widths: tuple[int, ...] = (32, 64, 128),
    blocks: int = 2,
    image_size: int = 32,
    num_classes: int = 10,
    seed: int = 0,
) -> onnx.ModelProto:
    """ResNet with basic blocks (Conv-BN-Relu, Conv-BN, residual Add, Relu) per stage.

    widths: channels of each stage; stages after the first halve the resolution.
    blocks: basic blocks per stage.
    """
    g = _Graph(seed)
    x = g.op("Relu", [g.conv_bn("input", 3, widths[0], 3)])
    c = widths[0]
    for stage, width in enumerate(widths):
        for block in range(blocks):
            stride = 2 if stage > 0 and block == 0 else 1
            y = g.op("Relu", [g.conv_bn(x, c, width, 3, stride)])
            # A small last gamma keeps the residual sum's variance from growing with depth.
            y = g.conv_bn(y, width, width, 3, gamma=0.3)
            skip = x if (stride == 1 and c == width) else g.conv_bn(x, c, width, 1, stride)
            x = g.op("Relu", [g.op("Add", [y, skip])])
            c = width
    g.head(x, c, num_classes)
    g.nodes[-1].output[0] = "logits"
    return g.model("resnet", [_image_input(3, image_size)], [_logits(num_classes)])


# (expansion t, channels c, repeats n, first stride s), as in MobileNetV2 Table 2, cut short.
MOBILENET_BLOCKS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 2, 2), (6, 64, 2, 2), (6, 96, 1, 1))


def mobilenetv2(
    *,
    width: float = 1.0,
    image_size: int = 96,
    last_channels: int = 512,
    num_classes: int = 10,
    seed: int = 0,
) -> onnx.ModelProto:
    """MobileNetV2 (Sandler et al. 2018): inverted residuals, depthwise Conv, Clip(0, 6) as ReLU6.

    width: channel multiplier applied to every stage of MOBILENET_BLOCKS.
    """
    g = _Graph(seed)
    lo = g.const("relu6_min", np.array(0.0, np.float32))
    hi = g.const("relu6_max", np.array(6.0, np.float32))

    def relu6(v: str) -> str:
        return g.op("Clip", [v, lo, hi])

    def ch(c: int) -> int:
        return max(8, int(round(c * width / 8)) * 8)

    c = ch(32)
    x = relu6(g.conv_bn("input", 3, c, 3, stride=2))
    for t, c_out, n, s in MOBILENET_BLOCKS:
        c_out = ch(c_out)
        for i in range(n):
            stride = s if i == 0 else 1
            hidden = c * t
            y = relu6(g.conv_bn(x, c, hidden, 1)) if t != 1 else x
            y = relu6(g.conv_bn(y, hidden, hidden, 3, stride, group=hidden))
            y = g.conv_bn(y, hidden, c_out, 1)
            x = g.op("Add", [x, y]) if stride == 1 and c == c_out else y
            c = c_out
    x = relu6(g.conv_bn(x, c, last_channels, 1))
    g.head(x, last_channels, num_classes)
    g.nodes[-1].output[0] = "logits"
    return g.model("mobilenetv2", [_image_input(3, image_size)], [_logits(num_classes)])


def bert(
    *,
    vocab_size: int = 1000,
    hidden: int = 128,
    layers: int = 4,
    heads: int = 4,
    intermediate: int = 512,
    max_positions: int = 128,
    seed: int = 0,
) -> onnx.ModelProto:
    """BERT encoder: Gather embeddings, MatMul+Add projections, Softmax attention, Erf GELU.

    Input `input_ids` int64 [batch, seq] (seq <= max_positions); output `last_hidden_state`.
    """
    assert hidden % heads == 0, "hidden must be a multiple of heads"
    head_dim = hidden // heads
    g = _Graph(seed)

    def linear(v: str, n_in: int, n_out: int) -> str:
        w = g.const("dense_w", g.he((n_in, n_out), fan_in=n_in) * math.sqrt(0.5))
        b = g.const("dense_b", np.zeros(n_out, np.float32))
        return g.op("Add", [g.op("MatMul", [v, w]), b])

    def layer_norm(v: str) -> str:
        scale = g.const("ln_scale", np.ones(hidden, np.float32))
        bias = g.const("ln_bias", np.zeros(hidden, np.float32))
        return g.op("LayerNormalization", [v, scale, bias], axis=-1, epsilon=1e-12)

    def emb(rows: int) -> str:
        table = g.rng.standard_normal((rows, hidden)) * 0.5
        return g.const("embedding", table.astype(np.float32))

    # Positions 0..seq-1 from the runtime shape of input_ids.
    seq = g.op("Gather", [g.op("Shape", ["input_ids"]), g.const("one", np.array(1, np.int64))])
    start, step = g.const("zero", np.array(0, np.int64)), g.const("step", np.array(1, np.int64))
    positions = g.op("Range", [start, seq, step])
    words = g.op("Gather", [emb(vocab_size), "input_ids"])
    x = layer_norm(g.op("Add", [words, g.op("Gather", [emb(max_positions), positions])]))

    split_heads = g.const("split_heads", np.array([0, 0, heads, head_dim], np.int64))
    merge_heads = g.const("merge_heads", np.array([0, 0, hidden], np.int64))
    inv_sqrt_d = g.const("inv_sqrt_d", np.array(1.0 / math.sqrt(head_dim), np.float32))
    half = g.const("half", np.array(0.5, np.float32))
    one = g.const("onef", np.array(1.0, np.float32))
    sqrt2 = g.const("sqrt2", np.array(math.sqrt(2.0), np.float32))

    def to_heads(v: str, perm: list[int]) -> str:
        return g.op("Transpose", [g.op("Reshape", [v, split_heads])], perm=perm)

    for _ in range(layers):
        # q, v: (batch, heads, seq, head_dim); k: (batch, heads, head_dim, seq)
        q = to_heads(linear(x, hidden, hidden), perm=[0, 2, 1, 3])
        k = to_heads(linear(x, hidden, hidden), perm=[0, 2, 3, 1])
        v = to_heads(linear(x, hidden, hidden), perm=[0, 2, 1, 3])
        scores = g.op("Mul", [g.op("MatMul", [q, k]), inv_sqrt_d])
        ctx = g.op("MatMul", [g.op("Softmax", [scores], axis=-1), v])
        ctx = g.op("Reshape", [g.op("Transpose", [ctx], perm=[0, 2, 1, 3]), merge_heads])
        x = layer_norm(g.op("Add", [linear(ctx, hidden, hidden), x]))
        h = linear(x, hidden, intermediate)
        erf = g.op("Erf", [g.op("Div", [h, sqrt2])])
        h = g.op("Mul", [g.op("Mul", [h, half]), g.op("Add", [erf, one])])
        x = layer_norm(g.op("Add", [linear(h, intermediate, hidden), x]))

    g.nodes[-1].output[0] = "last_hidden_state"
    ids = helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"])
    out_shape = ["batch", "seq", hidden]
    out = helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, out_shape)
    return g.model("bert", [ids], [out])


BUILDERS = {"resnet": resnet, "mobilenetv2": mobilenetv2, "bert": bert}


def example_feed(model: onnx.ModelProto, batch: int = 1, seq: int = 16, seed: int = 0) -> dict:
    """A random input for a graph built here: images in N(0, 1) or token ids below vocab size."""
    rng = np.random.default_rng(seed)
    feed = {}
    for inp in model.graph.input:
        dims = [d.dim_value for d in inp.type.tensor_type.shape.dim]
        if inp.type.tensor_type.elem_type == TensorProto.INT64:
            inits = model.graph.initializer
            vocab = next(i.dims[0] for i in inits if i.name.startswith("embedding"))
            feed[inp.name] = rng.integers(0, vocab, size=(batch, seq), dtype=np.int64)
        else:
            feed[inp.name] = rng.standard_normal((batch, *dims[1:])).astype(np.float32)
    return feed


def _int_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(","))


def _add_flags(parser: argparse.ArgumentParser, fn) -> None:
    for name, param in inspect.signature(fn).parameters.items():
        default = param.default
        flag = "--" + name.replace("_", "-")
        if isinstance(default, tuple):
            parser.add_argument(flag, default=default, type=_int_tuple)
        else:
            parser.add_argument(flag, default=default, type=type(default))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=pathlib.Path, default=HERE / "build")
    sub = parser.add_subparsers(dest="which")
    sub.add_parser("all", help="every graph at its default size")
    for name, fn in BUILDERS.items():
        _add_flags(sub.add_parser(name, help=fn.__doc__.splitlines()[0]), fn)
    args = parser.parse_args()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    which = args.which or "all"
    if which == "all":
        todo = {name: fn() for name, fn in BUILDERS.items()}
    else:
        fn = BUILDERS[which]
        kwargs = {k: getattr(args, k) for k in inspect.signature(fn).parameters}
        todo = {which: fn(**kwargs)}
    for name, model in todo.items():
        path = args.out_dir / f"{name}.onnx"
        onnx.save(model, path)
        print(path)


if __name__ == "__main__":
    main()
