"""One trial, in whatever process runs it (the parent, a pool worker, a Ray task): build the
recipe with the recipe runner, then measure the metric on the evaluation data.

Only plain dicts cross the process boundary. Latency is NOT measured here: the parent times
every built model serially, so trials running side by side do not disturb each other's timing.
"""

from __future__ import annotations

import logging
import time
import traceback
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

_JUDGES: dict[tuple, Any] = {}  # one reference run per process and evaluation setup
QUANTIZED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def _judge(job: dict[str, Any]):
    from onnxcomp import model as model_io
    from onnxcomp.data import open_data
    from onnxcomp.search import Judge

    key = (job["input"], job["eval_data"], job["metric"], job["max_drop"], job["limit"])
    if key not in _JUDGES:
        specs = model_io.input_specs(model_io.load(job["input"]))
        source = open_data(job["eval_data"], specs)
        _JUDGES[key] = Judge(
            job["input"], source, metric=job["metric"], max_drop=job["max_drop"], limit=job["limit"]
        )
    return _JUDGES[key]


def quantized_layers(step_report: dict[str, Any]) -> list[str]:
    """The nodes a quantize step turned into integer kernels (what ``exclude_nodes`` names)."""
    plan = step_report.get("plan") or {}
    return [
        n["node"]
        for n in plan.get("quantized_nodes") or []
        if n.get("op") in QUANTIZED_OPS and n.get("kernel") not in (None, n.get("op"))
    ]


def build_trial(job: dict[str, Any]) -> dict[str, Any]:
    """Build ``job["recipe"]`` and judge it; returns the trial's record (no latency yet)."""
    from onnxcomp.recipe import parse_recipe, run_recipe

    start = time.perf_counter()
    out: dict[str, Any] = {"trial": job["trial"]}
    try:
        recipe = parse_recipe(job["recipe"], source=f"trial {job['trial']}")
        result = run_recipe(recipe)
        out["build_seconds"] = round(time.perf_counter() - start, 3)
        for step in result.steps:
            if step.name == "quantize":
                out["layers"] = quantized_layers(step.report)
        path = str(recipe.output)
        out["path"] = path
        out["size_bytes"] = result.size_after
        verdict, comparison = _judge(job)(path)
        out.update(
            drop=float(verdict.drop),
            metric=verdict.value,
            reference_metric=verdict.reference_value,
            drop_metric=verdict.metric,
            passed=bool(verdict.passed),
            reason=verdict.reason,
        )
    except Exception as err:  # a trial that fails is a data point, not the end of the search
        logger.info("trial %s failed: %s", job["trial"], err)
        out.update(error=f"{type(err).__name__}: {err}", passed=False, drop=float("inf"))
        logger.debug("%s", traceback.format_exc())
    out["seconds"] = round(time.perf_counter() - start, 3)
    return out


def probe_path(run_dir: str | Path, name: str) -> str:
    return str(Path(run_dir) / "trials" / f"{name}.onnx")
