"""Where trials are built and judged: one long-lived worker per process (the parent with one
worker, a process of the local pool, or a Ray actor), set up once and reused for every trial.

A worker loads the model and the evaluation data once and runs the reference model once (the
judge keeps its outputs); each trial then builds its recipe with the recipe runner, counts the
MACs of the result and measures the metric, with 1 onnxruntime intra-op thread (and 1 BLAS
thread), so two workers on two cores do not fight over them.

Latency (``job["time"]``) is measured here too, right after the build, against the reference
in interleaved rounds in this process: a worker of a pool or a local Ray is pinned to a core of
its own for its whole life (``os.sched_setaffinity``; the parent, as the only worker, only while
it times), and every session has 1 intra-op thread, so a timed model never shares its core with
another worker of the search, and load from outside moves the reference and the trial alike
(their ratio is taken round by round). A trial dominated by a passing trial known when it was
submitted (same kernels, no more MACs, no larger file) is not timed. These timings fill the
Pareto table; they do not steer the search (see ``api``). Only plain dicts cross the process
boundary.
"""

from __future__ import annotations

import contextlib
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
TIMING_ROUNDS = 3  # per timed trial (informative: the final choice times the candidates again)


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
        self.timing_source = open_data(setup["eval_data"], specs)
        self.timer = None  # the reference's session, made at the first timing and kept
        self.core: int | None = None  # pinned to it while timing (None: not pinned)
        self.setup_seconds = round(time.perf_counter() - start, 3)
        self.pid = os.getpid()

    def build(self, job: dict[str, Any]) -> dict[str, Any]:
        """Build ``job["recipe"]`` and judge it; returns the trial's record (no latency yet)."""
        from onnxcomp.recipe import parse_recipe, run_recipe

        start, cpu = time.perf_counter(), time.process_time()
        out: dict[str, Any] = {"trial": job["trial"], "worker": self.pid, "started_at": time.time()}
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
            out["build_seconds_with_metric"] = round(time.perf_counter() - start, 3)
            if job.get("time") and out["passed"]:
                self.time_trial(job, out)
        except Exception as err:  # a trial that fails is a data point, not the end of the search
            logger.info("trial %s failed: %s", job["trial"], err)
            out.update(error=f"{type(err).__name__}: {err}", passed=False, drop=float("inf"))
            logger.debug("%s", traceback.format_exc())
        out["seconds"] = round(time.perf_counter() - start, 3)
        out["cpu_seconds"] = round(time.process_time() - cpu, 3)
        out["ended_at"] = time.time()
        return out


    def time_trial(self, job: dict[str, Any], out: dict[str, Any]) -> None:
        """The trial's latency against the reference, unless a passing trial known when it was
        submitted (``job["known"]``) dominates it."""
        from onnxcomp.errors import OnnxcompError
        from onnxcomp.search import Timer, time_candidates
        from onnxcomp.tune.space import dominated

        record = {**out, "config": job["config"]}
        better = dominated(record, job.get("known") or [])
        if better is not None:
            out["timing"] = f"skipped: dominated by trial {better['trial']} ({better.get('name')})"
            out["dominated_by"] = better["trial"]
            return
        name = f"t{job['trial']}"
        started = time.perf_counter()
        try:
            with pinned(self.core):
                if self.timer is None:
                    self.timer = Timer(self.setup["reference"], {}, data=self.timing_source,
                                       threads=self.setup.get("threads", 1))
                timings = time_candidates(self.setup["reference"], {name: out["path"]}, timer=self.timer,
                                          min_rounds=TIMING_ROUNDS, max_rounds=TIMING_ROUNDS)
                self.timer.remove(name)
        except OnnxcompError as err:
            out["timing_error"] = str(err)
            return
        t = timings[name]
        out.update(
            latency_ms=t.latency_ms, latency_ratio=t.ratio, latency_interval=[t.low, t.high],
            timing_rounds=t.rounds, fp32_latency_ms=timings["float"].latency_ms,
            timing_seconds=round(time.perf_counter() - started, 3), timed_on_core=self.core,
        )


def cores() -> list[int]:
    """The cores this process may run on."""
    try:
        return sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return list(range(os.cpu_count() or 1))


def pin(core: int | None) -> None:
    """Run this thread (and the threads it starts) on ``core`` only."""
    if core is None or not hasattr(os, "sched_setaffinity"):
        return
    try:
        os.sched_setaffinity(0, {core})
    except OSError as err:  # a container that forbids it: timed unpinned
        logger.info("could not pin to core %s: %s", core, err)


@contextlib.contextmanager
def pinned(core: int | None):
    """Pinned to ``core`` for the block, the old affinity back after it (the parent as the
    only worker: pinned while it times, free while it builds)."""
    if core is None or not hasattr(os, "sched_setaffinity"):
        yield
        return
    before = os.sched_getaffinity(0)
    if before == {core}:
        yield
        return
    pin(core)
    try:
        yield
    finally:
        try:
            os.sched_setaffinity(0, before)
        except OSError:
            pass


def core_for(index: int, workers: int) -> int | None:
    """Worker ``index``'s core: its own when there are at least as many cores as workers, else
    none (several workers would share cores; timing then stays unpinned)."""
    allowed = cores()
    return allowed[index] if workers <= len(allowed) else None


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


def start_process(setup: dict[str, Any], slots: Any = None) -> None:
    """A pool process's initializer: ignore Ctrl-C (the parent decides what to keep), one
    thread, pinned to a core of its own for its whole life (its index from ``slots``, a queue),
    and the worker set up once, before the first trial."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    one_thread()
    core = None
    if slots is not None:
        core = core_for(slots.get(), setup["workers"])
        pin(core)
    global _WORKER
    _WORKER = Worker(setup)
    _WORKER.core = core


def build_in_process(job: dict[str, Any]) -> dict[str, Any]:
    """A pool task: the trial on this process's worker."""
    assert _WORKER is not None, "start_process did not run"
    return _WORKER.build(job)


def ping(_: int = 0) -> dict[str, Any]:
    """A pool task that returns once the process's worker is set up (start-up is paid here)."""
    assert _WORKER is not None, "start_process did not run"
    return {"pid": _WORKER.pid, "setup_seconds": _WORKER.setup_seconds, "core": _WORKER.core}


def time_models(task: dict[str, Any]) -> dict[str, Any]:
    """A pool task (the benchmark's check of concurrent pinned timing): ``task["models"]``
    (name -> path) timed against the reference in ``task["rounds"]`` interleaved rounds on this
    process's core, starting at ``task["at"]`` (wall clock) so that two processes time at once."""
    assert _WORKER is not None, "start_process did not run"
    from onnxcomp.search import Timer

    with pinned(_WORKER.core):
        timer = Timer(_WORKER.setup["reference"], task["models"], data=_WORKER.timing_source, threads=1)
        time.sleep(max(0.0, task.get("at", 0) - time.time()))
        started = time.time()
        timer.run(task["rounds"])
        timings = timer.timings()
    return {"pid": _WORKER.pid, "core": _WORKER.core, "started": started, "ended": time.time(),
            "ratios": {n: [t.ratio, t.low, t.high] for n, t in timings.items() if n != "float"}}


def ray_actor_class():
    """``Worker`` as a Ray actor class (1 CPU each), made when Ray is imported."""
    import ray

    @ray.remote(num_cpus=1)
    class TrialActor:
        def __init__(self, setup: dict[str, Any], index: int):
            one_thread()
            core = core_for(index, setup["workers"]) if setup.get("pin") else None
            pin(core)
            self.worker = Worker(setup)
            self.worker.core = core

        def ping(self) -> dict[str, Any]:
            return {"pid": self.worker.pid, "setup_seconds": self.worker.setup_seconds, "core": self.worker.core}

        def build(self, job: dict[str, Any]) -> dict[str, Any]:
            return self.worker.build(job)

    return TrialActor
