"""Helpers shared by the optimize tests: parse ONNX text, run in onnxruntime, optimize and compare."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir

from onnxcomp import runtime
from onnxcomp.optimize import OptimizeOptions, optimize


def _model(text: str) -> ir.Model:
    proto = onnx.parser.parse_model(text)
    onnx.checker.check_model(proto, full_check=True)
    return ir.from_proto(proto)


def _run(model: ir.Model, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    session = runtime.create_session(model)
    return list(runtime.run(session, feeds).values())


def _optimize(text: str, feeds: dict[str, np.ndarray] | None = None, **options):
    """Optimize a text model; assert the outputs match on ``feeds`` (default: random x)."""
    model = _model(text)
    if feeds is None:
        spec = model.graph.inputs[0]
        shape = [d if isinstance(d, int) else 2 for d in spec.shape]
        feeds = {spec.name: np.random.default_rng(0).normal(0, 3, shape).astype(np.float32)}
    result, report = optimize(model, OptimizeOptions(**options))
    for before, after in zip(_run(model, feeds), _run(result, feeds)):
        np.testing.assert_allclose(after, before, rtol=1e-5, atol=1e-5)
    return result, report


def _skips(report, rule: str) -> list[str]:
    return [s["reason"] for s in report["rules"][rule]["skips"]]
