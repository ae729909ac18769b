"""Where trials are built and judged: one long-lived worker per process (the parent with one
worker, a process of the local pool, or a Ray actor), set up once and reused for every trial.

A worker loads the model and the evaluation data once and runs the reference model once (the
judge keeps its outputs); each trial then builds its recipe with the recipe runner, counts the
MACs of the result and measures the metric, with 1 onnxruntime intra-op thread (and 1 BLAS
thread), so two workers on two cores do not fight over them.

Only plain dicts cross the process boundary. Latency is NOT measured here: the parent times
the built models between batches, while every worker is idle (see ``api.Tuner.time_batch``).
"""

from __future__ import annotations

import logging
import os
import signal
import time
import traceback
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

QUANTIZED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


class Worker:
    """The state a worker keeps between trials: the judge (reference outputs in memory)."""

    def __init__(self, setup: dict[str, Any]):
        from onnxcomp import model as model_io
        from onnxcomp.data import open_data
        from onnxcomp.passes import get_pass
        from onnxcomp.search import Judge

        self.setup = setup
        start = time.perf_counter()
        get_pass("optimize")  # imports every pass module now, not in the first trial
        specs = model_io.input_specs(model_io.load(setup["reference"]))
        source = open_data(setup["eval_data"], specs)
        self.judge = Judge(
            setup["reference"], source, metric=setup["metric"], max_drop=setup["max_drop"],
            limit=setup["limit"], threads=1,
        )
        self.setup_seconds = round(time.perf_counter() - start, 3)
        self.pid = os.getpid()

    def build(self, job: dict[str, Any]) -> dict[str, Any]:
        """Build ``job["recipe"]`` and judge it; returns the trial's record (no latency yet)."""
        from onnxcomp.recipe import parse_recipe, run_recipe

        start, cpu = time.perf_counter(), time.process_time()
        out: dict[str, Any] = {"trial": job["trial"], "worker": self.pid}
        try:
            recipe = parse_recipe(job["recipe"], source=f"trial {job['trial']}")
            result = run_recipe(recipe)
            out["build_seconds"] = round(time.perf_counter() - start, 3)
            for step in result.steps:
                if step.name == "quantize":
                    out["layers"] = quantized_layers(step.report)
                if step.name == "prune":
                    out["groups"] = pruned_groups(step.report)
            path = str(recipe.output)
            out["path"] = path
            out["size_bytes"] = result.size_after
            out["macs"] = count_macs(path)
            verdict, _ = self.judge(path)
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
        out["cpu_seconds"] = round(time.process_time() - cpu, 3)
        return out


def count_macs(path: str) -> int | None:
    """Multiply-accumulates of one sample (what the dominance check compares; None if unknown)."""
    from onnxcomp import model as model_io
    from onnxcomp.summary import summarize

    try:
        compute = summarize(model_io.load(path)).get("compute") or {}
    except Exception as err:  # a count we cannot make only turns the dominance check off
        logger.debug("no MAC count for %s: %s", path, err)
        return None
    macs = compute.get("total_macs")
    if macs is None:
        macs = compute.get("known_macs")
    return int(macs) if macs is not None else None


def quantized_layers(step_report: dict[str, Any]) -> list[str]:
    """The nodes a quantize step turned into integer kernels (what ``exclude_nodes`` names)."""
    plan = step_report.get("plan") or {}
    return [
        n["node"]
        for n in plan.get("quantized_nodes") or []
        if n.get("op") in QUANTIZED_OPS and n.get("kernel") not in (None, n.get("op"))
    ]


def pruned_groups(step_report: dict[str, Any]) -> list[str]:
    """The structured groups a prune step could cut (what ``group_ratios`` names)."""
    return [row["group"] for row in step_report.get("groups") or [] if not row.get("skipped")]


def probe_path(run_dir: str | Path, name: str) -> str:
    return str(Path(run_dir) / "trials" / f"{name}.onnx")


# ---------------------------------------------------------------------------------------------
# One worker per process


_WORKER: Worker | None = None


def one_thread() -> None:
    """1 BLAS / OpenMP thread in this process: the environment for libraries not loaded yet,
    threadpoolctl (when installed) for those already loaded (a Ray worker imports numpy first)."""
    for var in THREAD_VARS:
        os.environ[var] = "1"
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return
    threadpool_limits(1)


def start_process(setup: dict[str, Any]) -> None:
    """A pool process's initializer: ignore Ctrl-C (the parent decides what to keep), one
    thread, and the worker set up once, before the first trial."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    one_thread()
    global _WORKER
    _WORKER = Worker(setup)


def build_in_process(job: dict[str, Any]) -> dict[str, Any]:
    """A pool task: the trial on this process's worker."""
    assert _WORKER is not None, "start_process did not run"
    return _WORKER.build(job)


def ping(_: int = 0) -> dict[str, Any]:
    """A pool task that returns once the process's worker is set up (start-up is paid here)."""
    assert _WORKER is not None, "start_process did not run"
    return {"pid": _WORKER.pid, "setup_seconds": _WORKER.setup_seconds}


def ray_actor_class():
    """``Worker`` as a Ray actor class (1 CPU each), made when Ray is imported."""
    import ray

    @ray.remote(num_cpus=1)
    class TrialActor:
        def __init__(self, setup: dict[str, Any]):
            one_thread()
            self.worker = Worker(setup)

        def ping(self) -> dict[str, Any]:
            return {"pid": self.worker.pid, "setup_seconds": self.worker.setup_seconds}

        def build(self, job: dict[str, Any]) -> dict[str, Any]:
            return self.worker.build(job)

    return TrialActor
