"""How much int8 could gain on the Silero VAD if its If branches were quantized: its 16 kHz
compute (STFT Conv, 4 encoder Convs, the LSTM cell, the decoder Conv) laid out flat with the real
weights, no If, quantized by onnxruntime (dynamic, static) and onnxcomp (auto), then timed
interleaved with the flat fp32 graph, the real model and the real model quantized inside its If
branches (onnxcomp auto), one frame at a time, 1 thread.

    python benchmarks/bench_vad_flat.py [--rounds 8] [--workdir /tmp/onnxcomp-vad-flat]

The flat graph is for timing: its LSTM gates keep PyTorch's order, so its probabilities are not
Silero's; agreement is with the flat fp32 graph on the real evaluation frames (models/realdata.py).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def flat_model(path: Path) -> None:
    import onnx
    from onnx import TensorProto
    from onnx import helper as h
    from onnx import numpy_helper as nh

    from models import thirdparty

    real = onnx.load(str(thirdparty.fetch("silero_vad")))
    branch = next(a.g for a in real.graph.node[2].attribute if a.name == "then_branch")  # 16 kHz
    consts = {}

    def collect(graph):
        for node in graph.node:
            if node.op_type == "Constant":
                consts[node.output[0]] = nh.to_array(node.attribute[0].t)
            for a in node.attribute:
                if a.type == onnx.AttributeProto.GRAPH:
                    collect(a.g)

    collect(branch)

    def w(key):
        return consts["If_0_then_branch__Inline_0__" + key].astype(np.float32)

    def i64(*v):
        return np.array(v, np.int64)

    arrays = {
        "basis": w("stft.forward_basis_buffer"),
        **{f"w{i}": w(f"encoder.{i}.reparam_conv.weight") for i in range(4)},
        **{f"b{i}": w(f"encoder.{i}.reparam_conv.bias") for i in range(4)},
        "W": w("decoder.rnn.weight_ih")[None], "R": w("decoder.rnn.weight_hh")[None],
        "B": np.concatenate([w("decoder.rnn.bias_ih"), w("decoder.rnn.bias_hh")])[None],
        "wd": w("decoder.decoder.2.weight"), "bd": w("decoder.decoder.2.bias"),
        "pads": i64(0, 0, 0, 0, 0, 64), "s0": i64(0), "s129": i64(129), "s258": i64(258),
        "ax1": i64(1), "two": np.array([2.0], np.float32), "l0": i64(0), "l1": i64(1),
        "shape_d": i64(1, 128, 1),
    }  # fmt: skip
    n = h.make_node
    nodes = [
        n("Unsqueeze", ["input", "ax1"], ["x3"]),
        n("Pad", ["x3", "pads"], ["xp"], mode="reflect"),
        n("Conv", ["xp", "basis"], ["spec"], strides=[128]),
        n("Slice", ["spec", "s0", "s129", "ax1"], ["re"]),
        n("Slice", ["spec", "s129", "s258", "ax1"], ["im"]),
        n("Pow", ["re", "two"], ["re2"]),
        n("Pow", ["im", "two"], ["im2"]),
        n("Add", ["re2", "im2"], ["m2"]),
        n("Sqrt", ["m2"], ["mag"]),
    ]
    x = "mag"
    for i, stride in enumerate([1, 2, 2, 1]):
        nodes += [
            n("Conv", [x, f"w{i}", f"b{i}"], [f"c{i}"], kernel_shape=[3], pads=[1, 1], strides=[stride]),
            n("Relu", [f"c{i}"], [f"r{i}"]),
        ]  # fmt: skip
        x = f"r{i}"
    nodes += [
        n("Transpose", [x], ["seq"], perm=[2, 0, 1]),
        n("Gather", ["state", "l0"], ["h_init"]),
        n("Gather", ["state", "l1"], ["c_init"]),
        n(
            "LSTM",
            ["seq", "W", "R", "B", "", "h_init", "c_init"],
            ["Y", "Yh", "Yc"],
            hidden_size=128,
        ),
        n("Concat", ["Yh", "Yc"], ["stateN"], axis=0),
        n("Reshape", ["Yh", "shape_d"], ["hd"]),
        n("Relu", ["hd"], ["hr"]),
        n("Conv", ["hr", "wd", "bd"], ["logit"]),
        n("Sigmoid", ["logit"], ["p"]),
        n("ReduceMean", ["p"], ["output"], axes=[2], keepdims=0),
    ]
    f32 = TensorProto.FLOAT
    graph = h.make_graph(
        nodes, "silero_16k_flat",
        [h.make_tensor_value_info("input", f32, [1, 576]), h.make_tensor_value_info("state", f32, [2, 1, 128])],
        [h.make_tensor_value_info("output", f32, [1, 1]), h.make_tensor_value_info("stateN", f32, [2, 1, 128])],
        [nh.from_array(v, k) for k, v in arrays.items()],
    )  # fmt: skip
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/onnxcomp-vad-flat"))
    args = parser.parse_args()
    import logging

    logging.basicConfig(level=logging.ERROR)
    from bench_quantize import _Reader
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )

    from models import realdata, thirdparty
    from onnxcomp import model as model_io
    from onnxcomp import runtime
    from onnxcomp.quantize.api import QuantizeOptions, quantize

    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    calib, evals = realdata.build("silero_vad")
    for src, dst in ((calib, work / "calib.npz"), (evals, work / "eval.npz")):
        data = np.load(src)
        np.savez(dst, input=data["input"], state=data["state"])  # the flat graph has no sr
    flat = work / "flat.onnx"
    flat_model(flat)
    paths = {"flat fp32": flat, "real fp32": thirdparty.fetch("silero_vad")}
    quantize_dynamic(flat, work / "ort_dynamic.onnx", per_channel=True, weight_type=QuantType.QInt8)
    paths["ort-dynamic"] = work / "ort_dynamic.onnx"
    reader = type("R", (_Reader, CalibrationDataReader), {})(work / "calib.npz", model=str(flat))
    quantize_static(
        flat, work / "ort_static.onnx", reader, quant_format=QuantFormat.QDQ, per_channel=True,
        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
    )  # fmt: skip
    paths["ort-static"] = work / "ort_static.onnx"
    model, report = quantize(
        model_io.load(flat), QuantizeOptions(mode="auto"), data=work / "calib.npz",
        eval_data=work / "eval.npz",
    )  # fmt: skip
    model_io.save(model, work / "onnxcomp_auto.onnx")
    paths[f"onnxcomp-auto ({report['auto']['chosen']})"] = work / "onnxcomp_auto.onnx"
    # the real graph, quantized inside its If branches, on the real frames (sr included)
    model, report = quantize(
        model_io.load(paths["real fp32"]), QuantizeOptions(mode="auto"), data=calib,
        eval_data=evals,
    )  # fmt: skip
    model_io.save(model, work / "real_onnxcomp_auto.onnx")
    paths[f"real onnxcomp-auto ({report['auto']['chosen']})"] = work / "real_onnxcomp_auto.onnx"

    data = np.load(evals)
    sessions = {k: runtime.create_session(str(p), threads=1) for k, p in paths.items()}

    def feed(name, i):
        f = {"input": data["input"][i : i + 1], "state": data["state"][i]}
        return {**f, "sr": data["sr"]} if name.startswith("real") else f

    probs = {
        k: np.array(
            [runtime.run(s, feed(k, i))["output"].item() for i in range(len(data["input"]))]
        )
        for k, s in sessions.items()
    }
    times = {k: [] for k in sessions}
    for _ in range(args.rounds):  # interleaved: load changes hit every model alike
        for k, s in sessions.items():
            for i in range(150):
                f = feed(k, i)
                start = time.perf_counter()
                s.run(None, f)
                times[k].append(time.perf_counter() - start)
    base = np.median(times["flat fp32"])
    print(
        f"{'model':32} {'p50 ms':>8} {'x flat':>7} {'agree':>6}  "
        "(decision p > 0.5 vs flat fp32; real graphs vs real fp32)"
    )
    for k in sessions:
        ref = "real fp32" if k.startswith("real") else "flat fp32"
        agree = np.mean((probs[k] > 0.5) == (probs[ref] > 0.5)) if k != ref else None
        p50 = np.median(times[k])
        print(
            f"{k:32} {p50 * 1e3:8.4f} {p50 / base:7.2f} {'-' if agree is None else f'{agree:.3f}':>6}"
        )


if __name__ == "__main__":
    main()
