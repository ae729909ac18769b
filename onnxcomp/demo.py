"""The demo: today's compression pipeline on the bundled digits CNN, measured before and after.

It grows as capabilities land: it runs every compression pass that is registered, in order.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from onnxcomp.errors import OnnxcompError
from onnxcomp.passes import PASSES, _load_builtin_passes
from onnxcomp.recipe import parse_recipe, run_recipe

logger = logging.getLogger(__name__)

MODELS = Path(__file__).resolve().parents[1] / "models"

# Compression steps in pipeline order, with the options the demo gives each. A step whose pass
# is not registered is left out. (quantize runs the optimize clean-up itself.)
DEMO_STEPS: list[tuple[str, dict[str, Any]]] = [
    ("quantize", {"data": str(MODELS / "digits_calib.npz")}),
]
FALLBACK_STEPS: list[tuple[str, dict[str, Any]]] = [("optimize", {}), ("normalize", {})]


def demo_steps() -> list[tuple[str, dict[str, Any]]]:
    _load_builtin_passes()
    steps = [(name, options) for name, options in DEMO_STEPS if name in PASSES]
    if not steps:
        steps = [next(s for s in FALLBACK_STEPS if s[0] in PASSES)]
    return steps


def run_demo(
    output_dir: Path, *, runs: int = 300, progress: Callable[[str], None] = lambda m: None
) -> dict[str, Any]:
    """Compress the digits CNN into ``output_dir``, validate on the test split, benchmark both."""
    from onnxcomp import bench
    from onnxcomp import model as model_io
    from onnxcomp.data import open_data
    from onnxcomp.validate import compare

    source = MODELS / "digits_cnn.onnx"
    test = MODELS / "digits_test.npz"
    if not source.exists() or not test.exists():
        raise OnnxcompError(
            f"demo: the reference models are not at {MODELS}; run the demo from a clone of the "
            "repository installed with `pip install -e .`"
        )
    output_dir = Path(output_dir)
    output = output_dir / "digits_cnn.compressed.onnx"
    steps = demo_steps()
    recipe = parse_recipe(
        {
            "input": str(source),
            "output": str(output),
            "steps": [{"pass": name, **options} for name, options in steps],
            "validate": {"data": str(test), "max_drop": 0.01},
        }
    )
    progress(f"running {' -> '.join(name for name, _ in steps)} on {source.name} ...")
    result = run_recipe(recipe)
    if not result.saved:
        raise OnnxcompError(
            "demo: the compressed model failed validation (accuracy drop > 1 point)"
        )

    progress(f"benchmarking both models ({runs} interleaved runs) ...")
    data = open_data(test, model_io.input_specs(model_io.load(source)))
    timing = bench.benchmark(
        [str(source), str(output)], runs=runs, warmup=20, data=data, memory=False
    )
    comparison = compare(str(source), str(output), data)
    models = []
    for path, measured, accuracy in zip(
        (source, output),
        timing.models,
        (comparison.accuracy_reference, comparison.accuracy_candidate),
    ):
        models.append(
            {
                "name": "input (fp32)" if path == source else "compressed",
                "path": str(path),
                "size_bytes": path.stat().st_size,
                "p50_ms": measured.p50_ms,
                "ratio_p50": measured.ratio_p50,
                "accuracy": accuracy,
                "integer_kernels": measured.graph.get("integer_kernels", 0),
            }
        )
    return {
        "input": str(source),
        "output": str(output),
        "steps": [name for name, _ in steps],
        "test_samples": comparison.samples,
        "models": models,
        "reports": [s.to_json() for s in result.steps],
    }
