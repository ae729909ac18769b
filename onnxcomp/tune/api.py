"""``onnxcomp tune``: search whole-model compression recipes for the fastest (or smallest)
model within a metric budget, measured for real in onnxruntime.

1. Long-lived workers, created once per search: this process is worker 0, and ``--workers``
   - 1 more run in a local process pool or as Ray actors, started in the background while this
   one already builds. Each loads the model and the evaluation data and runs the reference once,
   then builds, judges and (latency objective) times trial after trial with 1 onnxruntime
   thread, each on a core of its own while it times (``worker``).
2. A first batch tries each lever alone (every quantize mode, the cleaned-up graph, the
   smallest structured ratio). Sensitivity then: per quantized layer (static, only that layer)
   and per structured dependency group (only that group pruned, at the largest ratio), the drop
   on the evaluation data; the order (most harmful first) is cached in the run folder by a hash
   of model, data and metric. The search may leave the k most sensitive layers float
   (``keep_float``) and give the most sensitive groups their own ratio (``group0``...).
3. Greedy seeds (which depend only on which trials passed), then optuna's TPE (constant liar)
   when optuna is installed, else a seeded random search. Trials are asked in batches of fixed
   size (``--batch``, not ``--workers``), ``DEPTH`` batches in flight (the next proposed when
   the oldest is told, so the workers never wait for the optimiser), and told in trial-number
   order; what the optimiser is told is deterministic -- the drop, and for a passing trial its
   MAC ratio (latency) or size ratio (size) -- never a timing. So the same seed proposes the
   same trials whatever the number of workers, the load, or which worker finished first.
4. Each passing trial not dominated by one already logged (same kernels, no more MACs, no
   larger file) is timed on its worker against the reference in interleaved rounds, for the
   Pareto table. The final choice: the best of each kernel class (quantize mode, layers left
   float, head) by MACs, then size, then trial -- a deterministic set -- timed again side by
   side in this process once the workers are done; a candidate within ``TIE_MARGIN`` or within
   noise of the fastest is a tie, broken by fewer MACs, smaller file, lower trial number.
5. It always ends with a result: the best passing trial, or -- when none passes -- the closest
   one (lowest drop) saved as ``OUT.closest.onnx`` and :class:`NoSolution` raised. Every trial
   is a line of ``trials.jsonl`` in the run folder; ``resume`` continues from it. Ctrl-C keeps
   the best so far.

For a transfer task (``transfer_fit``) each trial first fits a head on ``--data`` (labelled) and
the search also chooses the cut and the head; trials are judged and timed against the default
fit (the cut ``transfer fit`` picks, a linear head), built once.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import random
import time
from pathlib import Path
from typing import Any, Literal

from onnxcomp.errors import OnnxcompError
from onnxcomp.tune import space as space_mod

logger = logging.getLogger(__name__)

PENALTY = 10.0  # what a failing trial scores for the optimiser (plus its drop)
FINAL_MIN_ROUNDS, FINAL_MAX_ROUNDS = 6, 12
BATCH = 4  # trials proposed together (fixed: the sequence must not depend on --workers)
DEPTH = 2  # batches in flight: the next is proposed when the one before the last is told
TIE_MARGIN = 0.05  # final choice: within 5 % of the fastest (or within its noise) is a tie
MAX_ASKS = 50  # proposals per batch before the space counts as exhausted


class NoSolution(OnnxcompError):
    """No trial met the budget; the closest one was saved under another name."""

    def __init__(self, message: str, result: TuneResult):
        super().__init__(message)
        self.result = result


@dataclasses.dataclass
class TuneOptions:
    """Options of ``onnxcomp tune`` (keys = flag names)."""

    eval_data: str | None = None
    data: str | None = None  # calibration (quantize static, prune reconstruction); default eval_data
    metric: str = "auto"
    max_drop: float = 0.01
    objective: Literal["latency", "size"] = "latency"
    trials: int = 20
    time_budget: float | None = None  # seconds
    workers: int = 1
    ray: str | None = None  # "auto" or a cluster address
    seed: int = 0
    resume: str | None = None  # a run folder to continue
    run_dir: str | None = None
    levers: list[str] = dataclasses.field(default_factory=lambda: ["prune", "quantize"])
    limit: int | None = 1000  # evaluation samples per trial
    threads: int = 1  # for the latency measurements (builds and the metric use 1 per worker)
    batch: int = BATCH  # trials proposed together
    transfer_fit: bool = False  # MODEL is a backbone: every trial fits a head on --data first

    def check(self, where: str = "tune") -> None:
        if not self.eval_data:
            raise OnnxcompError(f"{where}: --eval-data is required (the metric is measured on it)")
        if not 0 <= self.max_drop <= 1:
            raise OnnxcompError(f"{where}: --max-drop {self.max_drop}: expected a fraction in [0, 1]")
        if self.trials < 1 or self.workers < 1 or self.batch < 1:
            raise OnnxcompError(f"{where}: --trials, --workers and --batch must be at least 1")
        unknown = set(self.levers) - {"prune", "quantize"}
        if unknown:
            raise OnnxcompError(f"{where}: --space {sorted(unknown)[0]!r}: expected prune and/or quantize")


def parse_duration(text: str | float | None) -> float | None:
    """``90``, ``90s``, ``20m``, ``1.5h`` -> seconds."""
    if text is None or isinstance(text, (int, float)):
        return None if text is None else float(text)
    units = {"s": 1, "m": 60, "h": 3600}
    value = text.strip().lower()
    scale = units.get(value[-1:], None)
    try:
        return float(value[:-1]) * scale if scale else float(value)
    except ValueError:
        raise OnnxcompError(f"--time-budget {text!r}: expected e.g. 90s, 20m or 1.5h") from None


@dataclasses.dataclass
class TuneResult:
    output: Path | None  # the best passing model (None when none passed)
    closest: Path | None  # the closest one, when none passed
    recipe: Path | None
    run_dir: Path
    trials: list[dict[str, Any]]
    best: dict[str, Any] | None
    stopped: str  # "trials", "time budget", "interrupted"
    search: str  # "tpe" or "random"
    sensitivity: list[dict[str, Any]]
    seconds: float
    objective: str
    group_sensitivity: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    workers: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # pid, set-up seconds
    timing_seconds: float = 0.0  # spent timing in this process (workers idle), final choice included
    timing_cpu_seconds: float = 0.0
    main_cpu_seconds: float = 0.0  # CPU of this process over the search (the builds too with 1 worker)
    startup_seconds: float = 0.0  # starting the workers (each loads the model and runs the reference)
    decision: dict[str, Any] | None = None  # the final choice among the fastest

    @property
    def passed(self) -> bool:
        return self.output is not None

    def to_json(self) -> dict[str, Any]:
        return {
            "command": "tune",
            "output": str(self.output) if self.output else None,
            "closest": str(self.closest) if self.closest else None,
            "recipe": str(self.recipe) if self.recipe else None,
            "run_dir": str(self.run_dir),
            "passed": self.passed,
            "objective": self.objective,
            "stopped": self.stopped,
            "search": self.search,
            "wall_seconds": round(self.seconds, 2),
            "best": self.best,
            "sensitivity": self.sensitivity,
            "group_sensitivity": self.group_sensitivity,
            "workers": self.workers,
            "timing_seconds": self.timing_seconds,
            "timing_cpu_seconds": self.timing_cpu_seconds,
            "main_cpu_seconds": self.main_cpu_seconds,
            "startup_seconds": self.startup_seconds,
            "decision": self.decision,
            "trials": self.trials,
        }


# ---------------------------------------------------------------------------------------------
# Where trials run: long-lived workers, created once per search


class Runner:
    """Builds, judges and times trials on long-lived workers. This process is worker 0 (set up
    at once: its modules are loaded); ``workers - 1`` more run in a local process pool or as Ray
    actors, started in the background, so their start-up (a new Python process importing onnx
    and onnxruntime, then loading the model and data and running the reference) overlaps the
    trials this process builds meanwhile. Each worker is set up once and reused.

    Jobs are queued (:meth:`submit`); each other worker holds up to 2 (the second starts the
    moment the first ends, even while this process is busy), and this process runs the next
    queued job itself while it waits. Results are collected in the order the jobs were
    submitted (:meth:`collect`), whichever worker ran them, so a seeded search sees the same
    sequence whatever the number of workers."""

    AHEAD = 2  # jobs held by each other worker

    def __init__(self, workers: int, ray_address: str | None, setup: dict[str, Any]):
        from onnxcomp.tune import worker as worker_mod

        self.kind = "inline"
        self.workers = workers
        self.pool = None
        self._remotes: list[Any] = []  # the other workers: pool slots or Ray actor handles
        self._outstanding: dict[int, int] = {}  # remote -> jobs held
        self._running: dict[Any, tuple[int, int]] = {}  # future or Ray ref -> (job index, remote)
        self._jobs: dict[int, dict[str, Any]] = {}
        self._queue: list[int] = []
        self._results: dict[int, dict[str, Any]] = {}
        self._pings: list[Any] = []
        self._ready: set[int] = set()
        self._next = 0
        started = time.perf_counter()
        setup = {**setup, "workers": workers}
        others = workers - 1
        if others and ray_address:
            try:
                import ray
            except ImportError:
                raise OnnxcompError("--ray needs Ray: pip install 'onnxcomp[ray]'") from None
            local = ray_address == "auto"
            if not ray.is_initialized():
                if local:
                    ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)
                else:
                    ray.init(address=ray_address, log_to_driver=False)
            actor = worker_mod.ray_actor_class()
            # a local Ray: each actor pinned to a core of its own (a cluster's nodes are not ours to pin)
            self._remotes = [actor.remote({**setup, "pin": local}, i) for i in range(1, workers)]
            self._pings = [h.ping.remote() for h in self._remotes]
            self.kind = "ray"
        elif others:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            context = multiprocessing.get_context("spawn")
            slots = context.Queue()
            for i in range(1, workers):
                slots.put(i)
            self.pool = ProcessPoolExecutor(
                max_workers=others,
                mp_context=context,
                initializer=worker_mod.start_process,
                initargs=(setup, slots),
            )
            self._remotes = list(range(others))  # slots: the pool gives a job to whichever process is free
            self._pings = [self.pool.submit(worker_mod.ping) for _ in range(others)]  # starts them now
            self.kind = "pool"
        self._outstanding = {i: 0 for i in range(len(self._remotes))}
        self.inline = worker_mod.Worker(setup)
        self.inline.core = worker_mod.core_for(0, workers)  # pinned only while it times
        self.info = [{"pid": self.inline.pid, "setup_seconds": self.inline.setup_seconds, "core": self.inline.core}]
        self.start_seconds = time.perf_counter() - started
        logger.info("this process ready in %.1f s; %d more %s worker(s) starting", self.start_seconds, others, self.kind)

    def submit(self, jobs: list[dict[str, Any]]) -> list[int]:
        """Queue ``jobs``; returns their indices for :meth:`collect`."""
        out = []
        for job in jobs:
            index, self._next = self._next, self._next + 1
            self._jobs[index] = job
            self._queue.append(index)
            out.append(index)
        self._dispatch()
        return out

    def _dispatch(self) -> None:
        from onnxcomp.tune.worker import build_in_process

        ready = [r for r in self._outstanding if self._is_ready(r)]
        while self._queue and ready:
            remote = min(ready, key=lambda r: (self._outstanding[r], r))  # the least busy
            if self._outstanding[remote] >= self.AHEAD:
                break
            index = self._queue.pop(0)
            job = self._jobs[index]
            if self.kind == "pool":
                handle = self.pool.submit(build_in_process, job)
            else:
                handle = self._remotes[remote].build.remote(job)
            self._running[handle] = (index, remote)
            self._outstanding[remote] += 1

    def _is_ready(self, remote: int) -> bool:
        """Set up (its start-up ping answered): a job given to a worker still starting would wait
        while this process could run it."""
        if remote in self._ready:
            return True
        if self.kind == "pool":
            up = sum(1 for p in self._pings if p.done())  # pool processes are interchangeable
            ok = remote < up
        else:
            import ray

            ok = bool(ray.wait([self._pings[remote]], timeout=0)[0])
        if ok:
            self._ready.add(remote)
        return ok

    def wait_ready(self, timeout: float = 600.0) -> bool:
        """Block until every other worker is set up (a search never waits: it builds here
        meanwhile); False on timeout."""
        deadline = time.perf_counter() + timeout
        while not all(self._is_ready(r) for r in self._outstanding):
            if time.perf_counter() > deadline:
                return False
            time.sleep(0.05)
        return True

    def _poll(self, block: bool) -> None:
        """Take what the other workers finished (waiting for one when ``block``)."""
        if not self._running:
            return
        if self.kind == "pool":
            from concurrent.futures import FIRST_COMPLETED, wait

            done, _ = wait(list(self._running), timeout=None if block else 0, return_when=FIRST_COMPLETED)
            results = [(h, h.result()) for h in done]
        else:
            import ray

            done, _ = ray.wait(list(self._running), num_returns=1, timeout=None if block else 0)
            results = [(h, ray.get(h)) for h in done]
        for handle, result in results:
            index, remote = self._running.pop(handle)
            self._results[index] = result
            self._outstanding[remote] -= 1
            self._jobs.pop(index, None)

    def collect(self, indices: list[int]) -> list[dict[str, Any]]:
        """The results of submitted jobs, in the order asked; this process runs queued jobs
        while it waits for the others."""
        out = []
        for index in indices:
            while index not in self._results:
                self._poll(block=False)
                self._dispatch()
                if index in self._results:
                    break
                if index in self._queue:  # not taken by another worker: run it here
                    mine = index
                elif self._queue:  # running elsewhere: meanwhile run the next queued job here
                    mine = self._queue[0]
                else:
                    self._poll(block=True)
                    continue
                from onnxcomp.runtime import blas_threads

                self._queue.remove(mine)
                with blas_threads(1):  # this process builds beside the other workers
                    self._results[mine] = self.inline.build(self._jobs.pop(mine))
            out.append(self._results.pop(index))
        return out

    def map(self, jobs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return self.collect(self.submit(jobs))

    def close(self, cancel: bool = False) -> None:
        """Stop the other workers (their start-up records joined to ``info`` when they got that far)."""
        for ping in self._pings:
            try:
                if self.kind == "pool":
                    if ping.done():
                        self.info.append(ping.result())
                else:
                    import ray

                    if ray.wait([ping], timeout=0)[0]:
                        self.info.append(ray.get(ping))
            except Exception as err:  # a worker that died: its jobs raised already
                logger.debug("worker start-up: %s", err)
        if self.pool is not None:
            self.pool.shutdown(wait=not cancel, cancel_futures=cancel)
        if self.kind == "ray":
            import ray

            for handle in self._remotes:
                ray.kill(handle)


# ---------------------------------------------------------------------------------------------
# The optimiser: optuna TPE when installed, else seeded random search, over the same choices.
# Trials are asked in batches and told in trial-number order: what is proposed depends on the
# seed and the results, never on which worker finished first.


class Sampler:
    def __init__(self, choices: dict[str, list[Any]], seed: int):
        self.choices = choices
        self.rng = random.Random(seed)
        try:
            import optuna
        except ImportError:
            self.study = None
            self.kind = "random"
            return
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.optuna = optuna
        self.dists = {k: optuna.distributions.CategoricalDistribution(v) for k, v in choices.items()}
        self.study = optuna.create_study(
            direction="minimize",
            sampler=optuna.samplers.TPESampler(
                seed=seed, n_startup_trials=4, multivariate=True, constant_liar=True
            ),
        )
        self.kind = "tpe"

    def ask(self) -> tuple[dict[str, Any], Any]:
        """A proposal and its handle (to tell its score later; pending ones are lied about)."""
        if self.study is None:
            return {k: self.rng.choice(v) for k, v in self.choices.items()}, None
        trial = self.study.ask(self.dists)
        return dict(trial.params), trial

    def tell(self, handle: Any, value: float) -> None:
        if self.study is not None and handle is not None:
            self.study.tell(handle, value)

    def add(self, config: dict[str, Any], value: float) -> None:
        """A trial the optimiser did not propose (greedy seeds, a resumed log)."""
        if self.study is None:
            return
        params = {k: (config.get(k) if config.get(k) in v else v[0]) for k, v in self.choices.items()}
        self.study.add_trial(
            self.optuna.trial.create_trial(params=params, distributions=self.dists, value=value)
        )


def _score(record: dict[str, Any], objective: str) -> float:
    """What the optimiser minimises: for a passing trial a deterministic estimate of the
    objective -- the size ratio, or for latency the MAC ratio to the reference (the same
    numbers on every run; timing noise never reaches the optimiser) -- and for a trial over the
    budget a penalty plus its drop."""
    if not record.get("passed"):
        drop = record.get("drop")
        return PENALTY + (min(float(drop), 1.0) if drop is not None and math.isfinite(drop) else 1.0)
    if objective == "size":
        value = record.get("size_ratio")
        return round(float(value), 4) if value is not None else PENALTY
    value = record.get("macs_ratio", record.get("size_ratio"))
    return round(float(value), 4) if value is not None else PENALTY


_kernels = space_mod.kernels
dominated = space_mod.dominated


def stable_key(record: dict[str, Any]) -> tuple:
    """The deterministic order among equals: fewer MACs, then the smaller file, then the lower
    trial number."""
    macs = record.get("macs")
    return (macs if macs is not None else math.inf, record.get("size_bytes") or math.inf, record["trial"])


def class_bests(passing: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per kernel class (quantize mode, layers left float, head), its passing trial with the
    fewest MACs, then the smallest file, then the lowest trial number: within a class that one
    is at least as fast as the others, so only these candidates are timed for the final choice.
    Which trials they are depends on the seed and on deterministic values only."""
    best: dict[tuple, dict[str, Any]] = {}
    for r in sorted(passing, key=stable_key):
        best.setdefault(_kernels(r["config"]), r)
    return sorted(best.values(), key=stable_key)


def noise_aware_choice(timings: dict[str, Any], keys: dict[str, tuple], margin: float) -> tuple[str, list[str]]:
    """The choice among timed candidates (name -> Timing with ratio, low, high): the fastest by
    the median ratio, and every candidate whose ratio is within ``margin`` of it or whose
    interval overlaps its interval is a tie -- timing cannot tell them apart -- broken by
    ``keys`` (deterministic). Returns (chosen, ties)."""
    fastest = min(timings, key=lambda n: (timings[n].ratio, keys[n]))
    f = timings[fastest]
    ties = [n for n in timings if timings[n].ratio <= f.ratio * (1 + margin)
            or (timings[n].low <= f.high and f.low <= timings[n].high)]
    return min(ties, key=lambda n: keys[n]), sorted(ties, key=lambda n: keys[n])


# ---------------------------------------------------------------------------------------------
# The run


def _hash_files(paths: list[str | None], extra: str) -> str:
    h = hashlib.sha256(extra.encode())
    for p in paths:
        if p:
            h.update(Path(p).read_bytes())
    return h.hexdigest()[:16]


def _read_log(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                logger.warning("%s: skipped a truncated line", path)
    return records


class Tuner:
    def __init__(self, model_path: str | Path, output: str | Path, options: TuneOptions):
        options.check()
        self.model_path = str(Path(model_path).resolve())
        if not Path(self.model_path).exists():
            raise OnnxcompError(f"{model_path}: no such model")
        self.output = Path(output).resolve()
        self.options = options
        self.data = str(Path(options.data or options.eval_data).resolve())
        self.eval_data = str(Path(options.eval_data).resolve())
        if options.resume:
            self.run_dir = Path(options.resume).resolve()
            if not (self.run_dir / "trials.jsonl").exists():
                raise OnnxcompError(f"--resume {options.resume}: no trials.jsonl in that folder")
        else:
            self.run_dir = Path(options.run_dir or self.output.with_name(self.output.stem + ".tune")).resolve()
        (self.run_dir / "trials").mkdir(parents=True, exist_ok=True)
        self.log_path = self.run_dir / "trials.jsonl"
        if not options.resume and self.log_path.exists():
            self.log_path.unlink()  # a fresh run; --resume continues an old one
        self.records: list[dict[str, Any]] = _read_log(self.log_path)
        # One lever alone means it is applied in every trial; both include "none" of each.
        levers = set(options.levers)
        both = {"prune", "quantize"} <= levers
        prune = space_mod.PRUNE if both else space_mod.PRUNE[1:] if "prune" in levers else ("none",)
        quantize = space_mod.QUANTIZE if both else space_mod.QUANTIZE[1:] if "quantize" in levers else ("none",)
        self.space = space_mod.Space(prune=prune, quantize=quantize)
        # The model the trials are judged and timed against: the input, or for a transfer task
        # the default fit (the cut transfer fit chooses, a linear head), built once.
        self.reference = self.model_path
        if options.transfer_fit:
            self.space.cuts = ["auto", *self._cuts()]
            self.reference = self._default_fit()
        self.base_size = Path(self.reference).stat().st_size
        self._base_macs: int | None | bool = False  # counted once the workers are starting (imports onnx)
        self.sensitivity: list[dict[str, Any]] = []
        self.group_sensitivity: list[dict[str, Any]] = []
        self.deadline = None
        self.runner: Runner | None = None
        self._timing_data = None
        self.timing_seconds = self.timing_cpu_seconds = 0.0

    # -- transfer fit -------------------------------------------------------------------------

    def _cuts(self) -> list[str]:
        from onnxcomp import model as model_io
        from onnxcomp.transfer.cuts import find_cuts

        return [c.tensor for c in find_cuts(model_io.load(self.model_path))[: space_mod.MAX_CUTS]]

    def _default_fit(self) -> str:
        from onnxcomp.recipe import parse_recipe, run_recipe

        path = self.run_dir / "reference.onnx"
        if not path.exists():
            raw = {
                "version": 1, "input": self.model_path, "output": str(path), "data": self.data,
                "steps": [{"pass": "transfer_fit", "seed": self.options.seed}],
            }
            run_recipe(parse_recipe(raw, source="tune: the default transfer fit"))
        return str(path)

    # -- one batch ------------------------------------------------------------------------

    def setup(self) -> dict[str, Any]:
        """What every worker loads once."""
        return {
            "reference": self.reference,
            "eval_data": self.eval_data,
            "metric": self.options.metric,
            "max_drop": self.options.max_drop,
            "limit": self.options.limit,
            "threads": self.options.threads,
        }

    def _job(self, number: int | str, config: dict[str, Any], name: str | None = None) -> dict[str, Any]:
        name = name or f"t{number:03d}"
        return {
            "trial": number,
            "config": config,
            "recipe": self.recipe(config, self.run_dir / "trials" / f"{name}.onnx", validate=False),
        }

    def recipe(self, config: dict[str, Any], output: Path, validate: bool = True) -> dict[str, Any]:
        raw: dict[str, Any] = {
            "version": 1,
            "input": self.model_path,
            "output": str(output),
            "data": self.data,
            "steps": space_mod.steps(config, self.space, self.options.seed),
        }
        if validate:
            raw["validate"] = {
                "data": self.eval_data,
                "metric": self.options.metric,
                "max_drop": self.options.max_drop,
                "limit": self.options.limit,
            }
            if self.options.transfer_fit:
                raw["validate"]["reference"] = self.reference
        return raw

    def timing_data(self):
        from onnxcomp.data import open_data
        from onnxcomp.model import input_specs, load

        if self._timing_data is None:
            self._timing_data = open_data(self.eval_data, input_specs(load(self.reference)))
        return self._timing_data

    def submit_batch(self, configs: list[dict[str, Any]], start: int | None = None) -> dict[str, Any]:
        """Queue ``configs`` on the workers (trial numbers from ``start``). With the latency
        objective each passing trial is timed on its worker, unless a passing trial already
        logged dominates it (``known``)."""
        start = len(self.records) if start is None else start
        timed = self.options.objective == "latency"
        known = [{k: r.get(k) for k in ("trial", "name", "config", "macs", "size_bytes", "passed")}
                 for r in self.records if r.get("passed") and "error" not in r] if timed else []
        jobs = []
        for i, config in enumerate(configs):
            job = self._job(start + i, config)
            job.update(time=timed, known=known)
            jobs.append(job)
        return {"configs": configs, "indices": self.runner.submit(jobs), "start": start}

    def finish_batch(self, pending: dict[str, Any]) -> list[dict[str, Any]]:
        """The batch's results, in trial order, logged."""
        results = self.runner.collect(pending["indices"])
        batch = [{"name": space_mod.label(c), "config": c, **r} for c, r in zip(pending["configs"], results)]
        for record in batch:
            self._estimate(record)
        by_trial = {r["trial"]: r for r in self.records + batch}
        for record in batch:
            better = record
            while better is not None and better.get("latency_ratio") is None and "dominated_by" in better:
                better = by_trial.get(better["dominated_by"])
            if better is not record and better is not None and better.get("latency_ratio") is not None:
                record["latency_bound"] = better["latency_ratio"]  # it cannot be faster than this
            self.timing_seconds += record.get("timing_seconds") or 0.0
        for record in batch:
            self.records.append(record)
            with self.log_path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(_jsonable(record)) + "\n")
            logger.info(
                "trial %d %s: drop %.4f%s, %s",
                record["trial"], record["name"], record.get("drop", math.inf),
                " (passed)" if record.get("passed") else "",
                f"{record['latency_ratio']:.2f}x fp32" if "latency_ratio" in record
                else record.get("error") or record.get("timing", "untimed"),
            )
        return batch

    @property
    def base_macs(self) -> int | None:
        if self._base_macs is False:
            from onnxcomp.tune.worker import count_macs

            self._base_macs = count_macs(self.reference)
        return self._base_macs

    def _estimate(self, record: dict[str, Any]) -> None:
        """The deterministic ratios the optimiser is told: size and MACs against the reference."""
        if record.get("size_bytes"):
            record["size_ratio"] = record["size_bytes"] / self.base_size
        if record.get("macs") is not None and self.base_macs:
            record["macs_ratio"] = record["macs"] / self.base_macs

    def run_batch(self, configs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Build, judge (and time) ``configs`` on the workers, log in trial order."""
        return self.finish_batch(self.submit_batch(configs))

    # -- sensitivity ------------------------------------------------------------------------

    def measure_sensitivity(self) -> None:
        """Per quantized layer (static, only that layer) and per structured group (the largest
        ratio, only that group): the drop alone, most harmful first; cached by model and data."""
        key = _hash_files(
            [self.reference, self.eval_data, self.data],
            f"{self.options.metric}|{self.options.limit}|{self.space.ratios[-1]}",
        )
        cache = self.run_dir / f"sensitivity-{key}.json"
        if cache.exists():
            saved = json.loads(cache.read_text())
            self.sensitivity, self.group_sensitivity = saved.get("layers", []), saved.get("groups", [])
        else:
            static = next((r for r in self.records if r["config"]["quantize"] == "static"
                           and r["config"]["prune"] == "none" and not r["config"]["keep_float"]
                           and r.get("layers")), None)
            structured = next((r for r in self.records if r["config"]["prune"] == "structured"
                               and r.get("groups")), None)
            layers = static["layers"] if static and len(static["layers"]) > 1 else []
            groups = structured["groups"] if structured and len(structured["groups"]) > 1 else []
            base = self.space.base()
            jobs = []
            for i, layer in enumerate(layers):
                job = self._job(f"probe-layer{i}", {**base, "quantize": "static", "calibration": "minmax"}, f"probe-layer{i}")
                job["recipe"]["steps"][-1]["exclude_nodes"] = [n for n in layers if n != layer]
                jobs.append(job)
            for i, group in enumerate(groups):
                job = self._job(f"probe-group{i}", {**base, "prune": "structured", "ratio": 0.0}, f"probe-group{i}")
                step = next(s for s in job["recipe"]["steps"] if s["pass"] == "prune")
                step["group_ratios"] = {group: self.space.ratios[-1]}
                jobs.append(job)
            results = self.runner.map(jobs) if jobs else []

            def order(names, rows, what):
                out = [{what: n, "drop_alone": r.get("drop"), "error": r.get("error"), "cpu_seconds": r.get("cpu_seconds"),
                        "seconds": r.get("seconds"), "worker": r.get("worker"), "started_at": r.get("started_at"),
                        "ended_at": r.get("ended_at")}
                       for n, r in zip(names, rows)]
                out.sort(key=lambda s: -(s["drop_alone"] if s["drop_alone"] is not None else math.inf))
                return out

            self.sensitivity = order(layers, results[: len(layers)], "layer")
            self.group_sensitivity = order(groups, results[len(layers):], "group")
            cache.write_text(json.dumps(_jsonable({"layers": self.sensitivity, "groups": self.group_sensitivity}), indent=1))
            for job in jobs:
                Path(job["recipe"]["output"]).unlink(missing_ok=True)
        self.space.layers = [s["layer"] for s in self.sensitivity]
        self.space.groups = [s["group"] for s in self.group_sensitivity]

    # -- the search ---------------------------------------------------------------------------

    def tried(self) -> dict[str, dict[str, Any]]:
        return {space_mod.key(self.space.canonical(r["config"])): r for r in self.records}

    def _past_deadline(self) -> bool:
        return self.deadline is not None and time.perf_counter() >= self.deadline

    def search(self) -> TuneResult:
        """The first batch and the sensitivity probes, then batches proposed ahead: ``DEPTH``
        batches are in flight, and the next one is proposed when the oldest is told (in trial
        order), so the workers never wait for the optimiser. When and from what each batch is
        proposed depends on the batch count alone, never on the number of workers."""
        opts = self.options
        started, self._cpu_start = time.perf_counter(), time.process_time()
        self.deadline = started + opts.time_budget if opts.time_budget else None
        self.timing_seconds = self.timing_cpu_seconds = 0.0
        stopped = "trials"
        sampler = None
        try:
            self.runner = Runner(opts.workers, opts.ray, self.setup())
            # The first batch: each lever alone (the sensitivity probes need its layers and groups).
            if not self.records:
                self.run_batch(self.space.greedy({})[: min(opts.batch, opts.trials)])
            if len(self.records) < opts.trials and not self._past_deadline():
                self.measure_sensitivity()  # probes only for a search that goes on
            sampler = Sampler(self.space.choices(), opts.seed)
            for r in self.records:  # told in trial order
                self._estimate(r)
                sampler.add(self.space.canonical(r["config"]), _score(r, opts.objective))
            inflight: list[dict[str, Any]] = []
            twins: list[tuple[Any, str]] = []  # proposals equal to a pending trial: told when it is done
            proposing = True
            while True:
                while proposing and len(inflight) < DEPTH:
                    if self._past_deadline():
                        stopped, proposing = "time budget", False
                        break
                    queued = sum(len(b["configs"]) for b in inflight)
                    want = min(opts.batch, opts.trials - len(self.records) - queued)
                    if want <= 0:
                        break
                    batch = self.propose(sampler, want, inflight, twins)
                    if not batch["configs"]:
                        if not inflight:
                            stopped, proposing = "space exhausted", False
                        break  # (a batch in flight may open the space again)
                    inflight.append({**self.submit_batch(batch["configs"], len(self.records) + queued),
                                     "handles": batch["handles"]})
                if not inflight:
                    break
                done = inflight.pop(0)
                records = self.finish_batch(done)
                for config, handle, record in zip(done["configs"], done["handles"], records):  # trial order
                    if handle is None:
                        sampler.add(config, _score(record, opts.objective))
                    else:
                        sampler.tell(handle, _score(record, opts.objective))
                tried = self.tried()
                for handle, twin in [t for t in twins if t[1] in tried]:
                    sampler.tell(handle, _score(tried[twin], opts.objective))
                twins = [t for t in twins if t[1] not in tried]
        except KeyboardInterrupt:
            stopped = "interrupted"
            logger.warning("interrupted: keeping the best trial so far")
        finally:
            if self.runner is not None:
                self.runner.close(cancel=stopped == "interrupted")
        return self.finish(stopped, sampler.kind if sampler else "none", time.perf_counter() - started)

    def propose(self, sampler: Sampler, want: int, inflight: list[dict[str, Any]],
                twins: list[tuple[Any, str]]) -> dict[str, Any]:
        """Up to ``want`` new configurations: greedy seeds first, then the optimiser's, none of
        them tried or pending. A proposal that was tried is told its known score at once; one
        that is pending is told when that trial is done."""
        tried = self.tried()
        pending = {space_mod.key(self.space.canonical(c)) for b in inflight for c in b["configs"]}
        configs = self.space.greedy(tried, pending)[:want]
        handles: list[Any] = [None] * len(configs)
        attempts = 0
        while len(configs) < want and attempts < MAX_ASKS:
            attempts += 1
            params, handle = sampler.ask()
            config = self.space.canonical(params)
            k = space_mod.key(config)
            known = tried.get(k)
            if known is not None:  # a duplicate: the optimiser learns its known score
                sampler.tell(handle, _score(known, self.options.objective))
            elif k in pending or config in configs:
                twins.append((handle, k))
            else:
                configs.append(config)
                handles.append(handle)
        return {"configs": configs, "handles": handles}

    # -- the end ------------------------------------------------------------------------------

    def finish(self, stopped: str, search: str, seconds: float) -> TuneResult:
        from onnxcomp import model as model_io
        from onnxcomp.recipe import write_recipe

        built = [r for r in self.records if r.get("path") and "error" not in r and Path(r["path"]).exists()]
        if not built:
            if stopped == "interrupted":
                raise KeyboardInterrupt  # nothing to keep yet
            raise OnnxcompError(f"tune: no trial could be built (see {self.log_path})")
        key = "latency_ratio" if self.options.objective == "latency" else "size_ratio"
        passing = [r for r in built if r.get("passed")]
        decision = None
        if passing and self.options.objective == "latency" and stopped != "interrupted":
            started, cpu = time.perf_counter(), time.process_time()
            decision = self._final_choice(passing)
            self.timing_seconds += time.perf_counter() - started
            self.timing_cpu_seconds += time.process_time() - cpu
            passing.sort(key=lambda r: r["trial"] != decision["chosen"])
        else:  # size, or interrupted: the best measured so far
            passing.sort(key=lambda r: (r.get(key) if r.get(key) is not None else math.inf, *stable_key(r)))
        for r in self.records:
            r["chosen"] = False
        _mark_pareto(built, key)
        if passing:
            best = passing[0]
            target, closest = self.output, None
        else:
            best = min(built, key=lambda r: (r.get("drop", math.inf), r.get(key) or math.inf, r["trial"]))
            target = closest = self.output.with_name(self.output.stem + ".closest" + self.output.suffix)
        best["chosen"] = True
        model_io.save(model_io.load(best["path"]), target, inputs=[self.model_path])
        recipe_path = target.with_name(target.stem + ".recipe.yaml")
        recipe = self.recipe(best["config"], target)
        recipe["_decision"] = {
            "chosen": best["name"],
            "why": f"{key.replace('_', ' ')} {best.get(key, math.nan):.3f}, {best.get('reason', '')}"
            + (f"; {decision['why']}" if decision else ""),
        }
        write_recipe(recipe, recipe_path, protect=[self.model_path, target])
        _rewrite_decision_header(recipe_path)
        return TuneResult(
            output=target if passing else None,
            closest=closest,
            recipe=recipe_path,
            run_dir=self.run_dir,
            trials=[_jsonable(_public(r)) for r in self.records],
            best=_jsonable(_public(best)),
            stopped=stopped,
            search=search,
            sensitivity=self.sensitivity,
            group_sensitivity=self.group_sensitivity,
            seconds=seconds,
            objective=self.options.objective,
            workers=self.runner.info if self.runner else [],
            timing_seconds=round(self.timing_seconds, 2),
            timing_cpu_seconds=round(self.timing_cpu_seconds, 2),
            main_cpu_seconds=round(time.process_time() - getattr(self, "_cpu_start", time.process_time()), 2),
            startup_seconds=round(self.runner.start_seconds, 2) if self.runner else 0.0,
            decision=decision,
        )

    def _final_choice(self, passing: list[dict[str, Any]]) -> dict[str, Any]:
        """The candidates are the best of each kernel class (:func:`class_bests`: fewest MACs,
        then smallest, then first) -- a set that depends on the seed and on deterministic values
        only. One candidate is the choice, untimed. Several are timed again side by side in
        interleaved rounds in this process (the workers are done), until the order of those that
        may be the fastest is settled; every candidate within ``TIE_MARGIN`` of the fastest or
        within its noise (overlapping intervals) is a tie, broken by fewer MACs, then the smaller
        file, then the lower trial number -- so timing noise alone does not pick among equals."""
        from onnxcomp.search import time_candidates
        from onnxcomp.tune.worker import core_for, pinned

        candidates = class_bests(passing)
        if len(candidates) == 1:
            only = candidates[0]
            return {"chosen": only["trial"], "candidates": [only["trial"]], "ties": [only["trial"]],
                    "why": "one kernel class: the passing trial with the fewest MACs, then smallest, then first"}
        by_name = {f"t{r['trial']}": r for r in candidates}
        with pinned(core_for(0, 1)):
            timings = time_candidates(
                self.reference, {n: r["path"] for n, r in by_name.items()}, data=self.timing_data(),
                threads=self.options.threads, min_rounds=FINAL_MIN_ROUNDS, max_rounds=FINAL_MAX_ROUNDS,
            )
        for n, r in by_name.items():
            t = timings[n]
            r.update(latency_ms=t.latency_ms, latency_ratio=t.ratio, latency_interval=[t.low, t.high], final_timing=True)
        chosen, ties = noise_aware_choice({n: timings[n] for n in by_name},
                                          {n: stable_key(r) for n, r in by_name.items()}, TIE_MARGIN)
        why = (f"fastest of the kernel classes' best in the final timing: {chosen}"
               if len(ties) == 1 else
               f"{', '.join(ties)} within {TIE_MARGIN:.0%} or within noise of the fastest: fewest MACs, then smallest, then first")
        return {"chosen": by_name[chosen]["trial"], "candidates": [r["trial"] for r in candidates],
                "ties": [by_name[n]["trial"] for n in ties], "why": why}


def _mark_pareto(records: list[dict[str, Any]], key: str) -> None:
    """``pareto``: no other trial is both better on ``key`` (lower) and on the metric (higher)."""
    for r in records:
        x, y = r.get(key), r.get("metric")
        r["pareto"] = x is not None and y is not None and not any(
            o is not r and o.get(key) is not None and o.get("metric") is not None
            and o[key] <= x and o["metric"] >= y and (o[key] < x or o["metric"] > y)
            for o in records
        )


def _public(record: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in record.items() if k not in ("layers", "groups")}


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if hasattr(value, "item"):
        return value.item()
    return value


def _rewrite_decision_header(path: Path) -> None:
    # write_recipe's comment names `quantize --mode auto`; this recipe comes from tune.
    text = path.read_text(encoding="utf-8").replace(
        "# Replays a decision of `onnxcomp quantize --mode auto`, timing nothing:",
        "# The recipe `onnxcomp tune` chose; it rebuilds the tuned model:",
    )
    path.write_text(text, encoding="utf-8")


def tune(model_path: str | Path, output: str | Path, options: TuneOptions) -> TuneResult:
    """Tune ``model_path``; raises :class:`NoSolution` (closest saved) when nothing passes."""
    result = Tuner(model_path, output, options).search()
    if not result.passed:
        best = result.best or {}
        raise NoSolution(
            f"no trial of {len(result.trials)} met --max-drop {options.max_drop} "
            f"(closest: {best.get('name')}, {best.get('drop_metric', 'drop')} {best.get('drop', math.nan):.4f}); "
            f"saved it as {result.closest} with its recipe {result.recipe}",
            result,
        )
    return result


def pareto_table(result: TuneResult) -> tuple[list[str], list[list[Any]]]:
    """Rows of every built trial, by objective: the Pareto front marked."""
    key = "latency_ratio" if result.objective == "latency" else "size_ratio"
    rows = [t for t in result.trials if t.get("size_ratio") is not None]
    rows.sort(key=lambda t: (t[key] if t.get(key) is not None else math.inf, t["trial"]))
    header = ["trial", "recipe", "latency x fp32", "size x fp32", "metric", "drop", "passed", "pareto", "chosen"]
    return header, [
        [t["trial"], t["name"], _latency_cell(t), t.get("size_ratio"), t.get("metric"),
         t.get("drop"), bool(t.get("passed")), bool(t.get("pareto")), bool(t.get("chosen"))]
        for t in rows
    ]


def _latency_cell(trial: dict[str, Any]) -> Any:
    if trial.get("latency_ratio") is not None:
        return trial["latency_ratio"]
    if trial.get("latency_bound") is not None:  # dominated: not timed
        return f">= {trial['latency_bound']:.2f} (untimed)"
    return "-"


def plot(result: TuneResult, path: str | Path) -> Path | None:
    """A PNG of the trials (objective against the metric), when matplotlib is installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    key = "latency_ratio" if result.objective == "latency" else "size_ratio"
    pts = [t for t in result.trials if t.get(key) is not None and t.get("metric") is not None]
    if not pts:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.scatter([t[key] for t in pts], [t["metric"] for t in pts],
               c=["tab:green" if t.get("passed") else "tab:gray" for t in pts], s=18)
    front = sorted((t for t in pts if t.get("pareto")), key=lambda t: t[key])
    ax.plot([t[key] for t in front], [t["metric"] for t in front], "g-", lw=1)
    for t in pts:
        if t.get("chosen"):
            ax.scatter([t[key]], [t["metric"]], c="red", s=40, label=f"chosen: {t['name']}")
    ax.set_xlabel(key.replace("_", " ") + " (lower is better)")
    ax.set_ylabel("metric")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)
