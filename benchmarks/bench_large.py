"""Models over 2 GB: load, normalise and save with onnxcomp versus plain onnx, peak memory side by side.

    python benchmarks/bench_large.py [--gb 2.2] [--width 8192] [--commands [inspect,optimize,...]]
                                      [--no-load-save] [--workdir /tmp/onnxcomp-large]

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
            if i == 1:  # one node for optimize to remove, so its self-check runs
                nodes.append(helper.make_node("Identity", [src], ["h0_copy"]))
                src = "h0_copy"
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
    """Run ``onnxcomp ARGS`` in a child: (wall seconds, peak RSS MB of that child, exit code).

    The child reports its own VmHWM at exit: the rusage of a forked child would start from this
    process's peak (ru_maxrss carries over exec).
    """
    import subprocess
    import sys
    import tempfile

    with tempfile.NamedTemporaryFile("r", suffix=".peak") as peak_file:
        code = (
            "import atexit, sys\n"
            "def peak():\n"
            "    for line in open('/proc/self/status'):\n"
            "        if line.startswith('VmHWM:'):\n"
            f"            open({peak_file.name!r}, 'w').write(line.split()[1])\n"
            "atexit.register(peak)\n"
            "from onnxcomp.cli import main\n"
            "sys.argv[0] = 'onnxcomp'\n"
            "main()\n"
        )
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", code, *args], stdout=subprocess.DEVNULL)
        seconds = time.perf_counter() - start
        text = open(peak_file.name).read().strip()
    peak = int(text) / 1024 if text else float("nan")
    return seconds, peak, proc.returncode


COMMANDS = ("inspect", "optimize", "weight-only", "dynamic", "prune")


def commands(
    src: Path, work: Path, size: int, width: int, only: tuple[str, ...] = COMMANDS
) -> list:
    """The commands users run, each in its own process: wall time and peak memory."""
    x = work / "x.npz"
    np.savez(x, x=np.random.default_rng(2).standard_normal((2, width)).astype(np.float32))
    out = lambda name: str(work / name / "large.onnx")  # noqa: E731
    runs = {
        "inspect": ("inspect", ["inspect", str(src)]),
        "optimize": (
            "optimize --data x.npz (self-check)",
            ["optimize", str(src), "-o", out("opt"), "--no-bench", "--data", str(x)],
        ),
        "weight-only": (
            "quantize --mode weight-only --bits 4",
            [
                "quantize",
                str(src),
                "-o",
                out("wo"),
                "--mode",
                "weight-only",
                "--bits",
                "4",
                "--data",
                str(x),
                "--eval-data",
                str(x),
            ],
        ),  # fmt: skip
        # without --data: per-channel int8 only (calibrating smoothing and bias correction
        # holds each layer's candidate weights and runs the model twice per chunk of layers)
        "dynamic": (
            "quantize --mode dynamic (no calibration)",
            ["quantize", str(src), "-o", out("dyn"), "--mode", "dynamic", "--eval-data", str(x)],
        ),
        "prune": (
            "prune --sparsity 0.5 (magnitude)",
            ["prune", str(src), "-o", out("prune"), "--sparsity", "0.5", "--eval-data", str(x)],
        ),
    }
    rows = []
    print(f"\n{'command':38} {'wall s':>8} {'peak RSS MB':>12} {'x weights':>10} {'exit':>5}")
    for key in only:
        name, args = runs[key]
        seconds, peak, code = _command(args)
        rows.append((name, seconds, peak, code))
        print(
            f"{name:38} {seconds:8.1f} {peak:12.0f} {peak * 2**20 / size:10.2f} {code:5d}",
            flush=True,
        )
        if "-o" in args:  # one large output on disk at a time
            shutil.rmtree(Path(args[args.index("-o") + 1]).parent, ignore_errors=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gb", type=float, default=2.2, help="weight size to build (GB)")
    parser.add_argument(
        "--width", type=int, default=8192, help="each MatMul weight is width x width"
    )
    parser.add_argument("--workdir", default="/tmp/onnxcomp-large")
    parser.add_argument("--keep", action="store_true", help="keep the files afterwards")
    parser.add_argument(
        "--commands",
        nargs="?",
        const=",".join(COMMANDS),
        default=None,
        help=f"also time the commands users run (comma-separated subset of {','.join(COMMANDS)})",
    )
    parser.add_argument(
        "--no-load-save", action="store_true", help="skip the onnxcomp vs onnx load/save rows"
    )
    args = parser.parse_args()
    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    src = work / "large.onnx"
    start = time.perf_counter()
    size = build(src, args.gb, args.width)
    print(f"built {src}: {size / 1e9:.2f} GB of weights in {time.perf_counter() - start:.1f} s")
    try:
        if not args.no_load_save:
            load_save(src, work, args.width)
        if args.commands:
            only = tuple(c.strip() for c in args.commands.split(",") if c.strip())
            unknown = [c for c in only if c not in COMMANDS]
            if unknown:
                parser.error(f"--commands: unknown {unknown[0]!r} (known: {', '.join(COMMANDS)})")
            commands(src, work, size, args.width, only)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


def load_save(src: Path, work: Path, width: int) -> None:
    """onnxcomp's load + normalise + save against plain onnx's, then both models run once."""
    rows = []
    for name, target, dst in (
        ("onnxcomp (onnx-ir, lazy)", _with_onnxcomp, work / "out_onnxcomp" / "large.onnx"),
        ("onnx (protobuf)", _with_onnx, work / "out_onnx" / "large.onnx"),
    ):
        dst.parent.mkdir(exist_ok=True)
        rows.append((name, *_child(target, src, dst)))
    shutil.rmtree(work / "out_onnx", ignore_errors=True)

    # The saved model must still be the same model: run both on one input.
    from onnxcomp import runtime

    x = np.random.default_rng(1).standard_normal((1, width)).astype(np.float32)
    a = runtime.run(runtime.create_session(str(src)), {"x": x})["y"]
    b = runtime.run(runtime.create_session(str(work / "out_onnxcomp" / "large.onnx")), {"x": x})[
        "y"
    ]
    same = bool(np.array_equal(a, b))
    shutil.rmtree(work / "out_onnxcomp", ignore_errors=True)

    print(f"\n{'tool':28} {'load+shapes+save s':>18} {'peak RSS MB':>12} {'over imports':>13}")
    for name, seconds, extra, peak in rows:
        print(f"{name:28} {seconds:18.1f} {peak:12.0f} {extra:13.0f}")
    print(f"onnxcomp output identical to input in onnxruntime: {same}")


if __name__ == "__main__":
    main()
