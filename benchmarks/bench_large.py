"""Models over 2 GB: load, normalise and save with onnxcomp versus plain onnx, peak memory side by side.

    python benchmarks/bench_large.py [--gb 2.2] [--workdir /tmp/onnxcomp-large]

Builds a MatMul stack whose weights (float32, external data) exceed the size asked, then, each in
a fresh child process so peak memory (VmHWM) belongs to one tool alone:
- onnxcomp: ``model.load`` + ``model.normalize`` (constant lifting, shape inference) + ``model.save``;
- onnx: ``onnx.load`` (reads all external data) + ``onnx.shape_inference.infer_shapes_path`` +
  ``onnx.save_model(..., save_as_external_data=True)``, the usual way with protobuf.
Then onnxruntime runs the input and onnxcomp's output on one input and compares them.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import shutil
import time
from pathlib import Path

import numpy as np


def build(path: Path, gigabytes: float, width: int = 8192) -> int:
    """Write a chain of MatMul(+Relu) layers with ``gigabytes`` of float32 weights, weight by weight."""
    import onnx
    from onnx import TensorProto, helper

    layer_bytes = width * width * 4
    layers = max(1, int(np.ceil(gigabytes * 1e9 / layer_bytes)))
    data_name = path.name + ".data"
    nodes, inits = [], []
    offset = 0
    rng = np.random.default_rng(0)
    with open(path.with_name(data_name), "wb") as f:
        for i in range(layers):
            w = (rng.standard_normal((width, width), dtype=np.float32) / np.sqrt(width)).astype(
                np.float32
            )
            f.write(w.tobytes())
            tensor = TensorProto(name=f"w{i}", data_type=TensorProto.FLOAT, dims=[width, width])
            tensor.data_location = TensorProto.EXTERNAL
            for key, value in (
                ("location", data_name),
                ("offset", str(offset)),
                ("length", str(w.nbytes)),
            ):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, value
            offset += w.nbytes
            inits.append(tensor)
            src = "x" if i == 0 else f"h{i - 1}"
            nodes.append(helper.make_node("MatMul", [src, f"w{i}"], [f"m{i}"]))
            nodes.append(helper.make_node("Relu", [f"m{i}"], [f"h{i}" if i < layers - 1 else "y"]))
    graph = helper.make_graph(
        nodes,
        "large",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", width])],
        inits,
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return offset


def _peak_mb() -> float:
    """This process's peak resident memory (VmHWM; ru_maxrss would carry the parent's over exec)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _with_onnxcomp(src: str, dst: str, queue) -> None:
    from onnxcomp import model as model_io

    base = _peak_mb()
    start = time.perf_counter()
    model = model_io.load(src)
    model_io.normalize(model)
    model_io.save(model, dst, inputs=[src])
    queue.put((time.perf_counter() - start, _peak_mb() - base, _peak_mb()))


def _with_onnx(src: str, dst: str, queue) -> None:
    import onnx

    base = _peak_mb()
    start = time.perf_counter()
    proto = onnx.load(src)  # reads every external tensor into the protobuf
    onnx.shape_inference.infer_shapes_path(src, dst + ".shapes.onnx")
    onnx.save_model(proto, dst, save_as_external_data=True, location=Path(dst).name + ".data")
    queue.put((time.perf_counter() - start, _peak_mb() - base, _peak_mb()))


def _child(target, src: Path, dst: Path) -> tuple[float, float, float]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=target, args=(str(src), str(dst), queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def _command(args: list[str]) -> tuple[float, float, int]:
    """Run ``onnxcomp ARGS`` in a child: (wall seconds, peak RSS MB of that child, exit code)."""
    import os
    import subprocess
    import sys

    start = time.perf_counter()
    code = "import sys; from onnxcomp.cli import main; sys.argv[0] = 'onnxcomp'; main()"
    proc = subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return time.perf_counter() - start, usage.ru_maxrss / 1024, proc.returncode


def commands(src: Path, work: Path, size: int) -> None:
    """The commands users run, each in its own process: wall time and peak memory."""
    x = work / "x.npz"
    np.savez(x, x=np.random.default_rng(2).standard_normal((2, 8192)).astype(np.float32))
    runs = [
        ("inspect", ["inspect", str(src)]),
        (
            "optimize (self-check on 2 samples)",
            [
                "optimize",
                str(src),
                "-o",
                str(work / "opt" / "large.onnx"),
                "--no-bench",
                "--data",
                str(x),
            ],
        ),
        (
            "quantize --mode weight-only (int4)",
            [
                "quantize",
                str(src),
                "-o",
                str(work / "wo" / "large.onnx"),
                "--mode",
                "weight-only",
                "--data",
                str(x),
                "--eval-data",
                str(x),
            ],
        ),
    ]
    print(f"\n{'command':38} {'wall s':>8} {'peak RSS MB':>12} {'x weights':>10} {'exit':>5}")
    for name, args in runs:
        seconds, peak, code = _command(args)
        print(
            f"{name:38} {seconds:8.1f} {peak:12.0f} {peak * 2**20 / size:10.2f} {code:5d}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gb", type=float, default=2.2, help="weight size to build (GB)")
    parser.add_argument("--workdir", default="/tmp/onnxcomp-large")
    parser.add_argument("--keep", action="store_true", help="keep the files afterwards")
    parser.add_argument(
        "--commands", action="store_true", help="also time inspect, optimize, weight-only quantize"
    )
    args = parser.parse_args()
    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    src = work / "large.onnx"
    start = time.perf_counter()
    size = build(src, args.gb)
    print(f"built {src}: {size / 1e9:.2f} GB of weights in {time.perf_counter() - start:.1f} s")

    rows = []
    for name, target, dst in (
        ("onnxcomp (onnx-ir, lazy)", _with_onnxcomp, work / "out_onnxcomp" / "large.onnx"),
        ("onnx (protobuf)", _with_onnx, work / "out_onnx" / "large.onnx"),
    ):
        dst.parent.mkdir(exist_ok=True)
        rows.append((name, *_child(target, src, dst)))

    # The saved model must still be the same model: run both on one input.
    from onnxcomp import runtime

    x = np.random.default_rng(1).standard_normal((1, 8192)).astype(np.float32)
    a = runtime.run(runtime.create_session(str(src)), {"x": x})["y"]
    b = runtime.run(runtime.create_session(str(work / "out_onnxcomp" / "large.onnx")), {"x": x})[
        "y"
    ]
    same = bool(np.array_equal(a, b))

    print(f"\n{'tool':28} {'load+shapes+save s':>18} {'peak RSS MB':>12} {'over imports':>13}")
    for name, seconds, extra, peak in rows:
        print(f"{name:28} {seconds:18.1f} {peak:12.0f} {extra:13.0f}")
    print(
        f"\nweights {size / 1e6:.0f} MB; onnxcomp output identical to input in onnxruntime: {same}"
    )
    if args.commands:
        commands(src, work, size)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
