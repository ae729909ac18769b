"""``onnxcomp tune``: search whole-model compression recipes for the fastest (or smallest)
model within a metric budget, measured for real in onnxruntime.

1. Long-lived workers (the parent with ``--workers 1``, else a local process pool or Ray
   actors), created once per search: each loads the model and the evaluation data and runs the
   reference once, then builds and judges trial after trial with 1 onnxruntime thread.
2. A first batch tries each lever alone (every quantize mode, the cleaned-up graph, the
   smallest structured ratio). Sensitivity then: per quantized layer (static, only that layer)
   and per structured dependency group (only that group pruned, at the largest ratio), the drop
   on the evaluation data; the order (most harmful first) is cached in the run folder by a hash
   of model, data and metric. The search may leave the k most sensitive layers float
   (``keep_float``) and give the most sensitive groups their own ratio (``group0``...).
3. Greedy seeds (which depend only on which trials passed), then optuna's TPE (constant liar)
   when optuna is installed, else a seeded random search. Trials are asked in batches of fixed
   size (``--batch``, not ``--workers``) and told in trial-number order, so the proposals do not
   depend on how many workers ran them or which finished first.
4. After each batch of builds, while every worker is idle, this process times the trials that
   pass the budget and are not dominated (a timed passing trial with the same kernels has no
   more MACs and no larger file), side by side against the reference in interleaved rounds,
   only until each one's place against the best so far is settled
   (``onnxcomp.search.time_candidates``). At the end the best few are timed again; trials still
   within noise of the best are a tie, broken by fewer MACs, smaller file, lower trial number.
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
FINAL_TOP = 3  # trials timed again side by side before the choice
FINAL_MIN_ROUNDS, FINAL_MAX_ROUNDS = 6, 12
TIMING_MIN_ROUNDS, TIMING_MAX_ROUNDS = 3, 8  # per batch: until each one's place vs the best is settled
LATENCY_STEP = 0.05  # latency ratios told to the optimiser are rounded to this
BATCH = 4  # trials proposed together (fixed: the sequence must not depend on --workers)
TIE_MARGIN = 0.05  # final choice: within 5 % of the fastest (and within noise) is a tie
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
    """Builds and judges trials on long-lived workers: the parent itself (1 worker), a local
    process pool, or Ray actors. Each worker is set up once (model, data, reference outputs)
    and reused; ``map`` returns results in the order of its jobs, whichever worker finishes
    first, so a seeded search sees the same sequence whatever the number of workers."""

    def __init__(self, workers: int, ray_address: str | None, setup: dict[str, Any]):
        from onnxcomp.tune import worker as worker_mod

        self.kind = "inline"
        self.workers = workers
        self.pool = None
        self.actors: Any = None
        self.inline = None
        started = time.perf_counter()
        if ray_address:
            try:
                import ray
                from ray.util import ActorPool
            except ImportError:
                raise OnnxcompError("--ray needs Ray: pip install 'onnxcomp[ray]'") from None
            if not ray.is_initialized():
                if ray_address == "auto":
                    ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)
                else:
                    ray.init(address=ray_address, log_to_driver=False)
            actor = worker_mod.ray_actor_class()
            handles = [actor.remote(setup) for _ in range(workers)]
            self.info = ray.get([h.ping.remote() for h in handles])
            self.actors = ActorPool(handles)
            self._handles = handles
            self.kind = "ray"
        elif workers > 1:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            self.pool = ProcessPoolExecutor(
                max_workers=workers,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=worker_mod.start_process,
                initargs=(setup,),
            )
            self.info = list(self.pool.map(worker_mod.ping, range(workers)))
            self.kind = "pool"
        else:
            self.inline = worker_mod.Worker(setup)
            self.info = [{"pid": self.inline.pid, "setup_seconds": self.inline.setup_seconds}]
        self.start_seconds = time.perf_counter() - started
        logger.info("%d %s worker(s) ready in %.1f s", workers, self.kind, self.start_seconds)

    def map(self, jobs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        if self.kind == "ray":
            return list(self.actors.map(lambda actor, job: actor.build.remote(job), jobs))
        if self.kind == "pool":
            from onnxcomp.tune.worker import build_in_process

            return list(self.pool.map(build_in_process, jobs))
        return [self.inline.build(job) for job in jobs]

    def close(self, cancel: bool = False) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=not cancel, cancel_futures=cancel)
        if self.actors is not None:
            import ray

            for handle in self._handles:
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
    """What the optimiser minimises: the objective ratio (latency rounded to 0.05 so timing noise
    rarely steers a seeded search), or a penalty plus the drop for a trial over the budget. A
    passing trial left untimed (dominated) scores as the trial that dominates it."""
    if not record.get("passed"):
        drop = record.get("drop")
        return PENALTY + (min(float(drop), 1.0) if drop is not None and math.isfinite(drop) else 1.0)
    if objective == "size":
        value = record.get("size_ratio")
        return round(float(value), 3) if value is not None else PENALTY
    value = record.get("latency_ratio", record.get("latency_bound"))
    return round(float(value) / LATENCY_STEP) * LATENCY_STEP if value is not None else PENALTY


def _kernels(config: dict[str, Any]) -> tuple:
    """What decides which kernels run (a trial's MACs compare only within the same kernels)."""
    return (config.get("quantize"), int(config.get("keep_float") or 0), config.get("head"), config.get("hidden"))


def dominated(record: dict[str, Any], others: list[dict[str, Any]]) -> dict[str, Any] | None:
    """A passing trial with the same kernels, no more MACs and no larger file (the earlier one
    on a tie): ``record`` cannot be faster, so it needs no timing."""
    if record.get("macs") is None:
        return None
    for o in others:
        if o is record or not o.get("passed") or o.get("macs") is None or "error" in o:
            continue
        if _kernels(o["config"]) != _kernels(record["config"]):
            continue
        if o["macs"] <= record["macs"] and o["size_bytes"] <= record["size_bytes"]:
            if o["macs"] < record["macs"] or o["size_bytes"] < record["size_bytes"] or o["trial"] < record["trial"]:
                return o
    return None


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
        }

    def _job(self, number: int | str, config: dict[str, Any], name: str | None = None) -> dict[str, Any]:
        name = name or f"t{number:03d}"
        return {
            "trial": number,
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

    def time_batch(self, batch: list[dict[str, Any]]) -> None:
        """Latency against the reference, in this process, after the batch's builds, while every
        worker is idle: the trials that pass the budget and are not dominated (same kernels as
        another passing trial with no more MACs and no larger file), all side by side in
        interleaved rounds, only until each one's place against the best so far is settled."""
        if self.options.objective != "latency":
            return
        timed = [r for r in self.records if r.get("latency_ratio") is not None]
        passing = [r for r in batch if r.get("passed") and "error" not in r]
        todo = []
        for record in passing:
            better = dominated(record, timed + passing)
            if better is None:
                todo.append(record)
            else:
                record["timing"] = f"skipped: dominated by trial {better['trial']} ({better['name']})"
                record["dominated_by"] = better["trial"]
        if todo:
            best = min((r["latency_ratio"] for r in timed if r.get("passed")), default=None)
            self._time(todo, threshold=best)
        by_trial = {r["trial"]: r for r in self.records + batch}
        for record in passing:
            better = record
            while better is not None and better.get("latency_ratio") is None and "dominated_by" in better:
                better = by_trial.get(better["dominated_by"])
            if better is not record and better is not None and better.get("latency_ratio") is not None:
                record["latency_bound"] = better["latency_ratio"]  # it cannot be faster than this

    def _time(self, records: list[dict[str, Any]], threshold: float | None) -> None:
        from onnxcomp.search import time_candidates

        names = {f"t{r['trial']}": r for r in records}
        try:
            timings = time_candidates(
                self.reference,
                {n: r["path"] for n, r in names.items()},
                data=self.timing_data(),
                threads=self.options.threads,
                threshold=threshold,
                bar_only=list(names),  # each against the best so far, not against each other
                min_rounds=TIMING_MIN_ROUNDS,
                max_rounds=TIMING_MAX_ROUNDS,
            )
        except OnnxcompError as err:
            for r in records:
                r["timing_error"] = str(err)
            return
        for n, r in names.items():
            t = timings[n]
            r.update(
                latency_ms=t.latency_ms, latency_ratio=t.ratio, latency_interval=[t.low, t.high],
                timing_rounds=t.rounds, fp32_latency_ms=timings["float"].latency_ms,
            )

    def run_batch(self, configs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Build and judge ``configs`` on the workers, time what may win, log in trial order."""
        start = len(self.records)
        jobs = [self._job(start + i, c) for i, c in enumerate(configs)]
        results = self.runner.map(jobs)
        batch = [{"name": space_mod.label(c), "config": c, **r} for c, r in zip(configs, results)]
        for record in batch:
            if record.get("size_bytes"):
                record["size_ratio"] = record["size_bytes"] / self.base_size
        started, cpu = time.perf_counter(), time.process_time()
        self.time_batch(batch)
        self.timing_seconds += time.perf_counter() - started
        self.timing_cpu_seconds += time.process_time() - cpu
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
                out = [{what: n, "drop_alone": r.get("drop"), "error": r.get("error"), "cpu_seconds": r.get("cpu_seconds")}
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
                sampler.add(self.space.canonical(r["config"]), _score(r, opts.objective))
            while len(self.records) < opts.trials:
                if self._past_deadline():
                    stopped = "time budget"
                    break
                want = min(opts.batch, opts.trials - len(self.records))
                tried = self.tried()
                batch = self.space.greedy(tried)[:want]
                handles: list[Any] = [None] * len(batch)
                twins: list[tuple[Any, str]] = []  # proposals equal to one in this batch
                attempts = 0
                while len(batch) < want and attempts < MAX_ASKS:
                    attempts += 1
                    params, handle = sampler.ask()
                    config = self.space.canonical(params)
                    known = tried.get(space_mod.key(config))
                    if known is not None:  # a duplicate: the optimiser learns its known score
                        sampler.tell(handle, _score(known, opts.objective))
                    elif config in batch:
                        twins.append((handle, space_mod.key(config)))
                    else:
                        batch.append(config)
                        handles.append(handle)
                if not batch:
                    stopped = "space exhausted"
                    break
                records = self.run_batch(batch)
                scores = {}
                for config, handle, record in zip(batch, handles, records):  # trial order
                    score = _score(record, opts.objective)
                    scores[space_mod.key(config)] = score
                    if handle is None:
                        sampler.add(config, score)
                    else:
                        sampler.tell(handle, score)
                for handle, twin in twins:
                    sampler.tell(handle, scores[twin])
        except KeyboardInterrupt:
            stopped = "interrupted"
            logger.warning("interrupted: keeping the best trial so far")
        finally:
            if self.runner is not None:
                self.runner.close(cancel=stopped == "interrupted")
        return self.finish(stopped, sampler.kind if sampler else "none", time.perf_counter() - started)

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
        passing = [r for r in built if r.get("passed") and r.get(key) is not None]
        decision = None
        if passing and self.options.objective == "latency" and stopped != "interrupted":
            started, cpu = time.perf_counter(), time.process_time()
            decision = self._final_choice(passing)
            self.timing_seconds += time.perf_counter() - started
            self.timing_cpu_seconds += time.process_time() - cpu
        passing.sort(key=lambda r: (r[key], r.get("macs") or 0, r["size_bytes"], r["trial"]))
        if decision is not None:
            passing.sort(key=lambda r: r["trial"] != decision["chosen"])
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

    def _final_choice(self, passing: list[dict[str, Any]]) -> dict[str, Any] | None:
        """The best few timed again side by side (ratios from separate batches drift with load);
        when the best two are within noise they are re-measured (``search.remeasure_if_close``),
        and a trial still within noise of the best and within ``TIE_MARGIN`` of its ratio is a
        tie, broken by fewer MACs, then the smaller file, then the lower trial number -- so timing
        noise alone does not pick among equals."""
        from onnxcomp.search import remeasure_if_close, time_candidates

        top = sorted(passing, key=lambda r: (r["latency_ratio"], r["trial"]))[:FINAL_TOP]
        if len(top) < 2:
            return None
        by_name = {f"t{r['trial']}": r for r in top}
        models = {n: r["path"] for n, r in by_name.items()}
        timings = time_candidates(
            self.reference, models, data=self.timing_data(), threads=self.options.threads,
            min_rounds=FINAL_MIN_ROUNDS, max_rounds=FINAL_MAX_ROUNDS,
        )

        def rank(ts):
            return sorted(by_name, key=lambda n: (ts[n].ratio, by_name[n]["trial"]))

        decision = remeasure_if_close(
            self.reference, models, timings, rank, threshold=None, data=self.timing_data(),
            threads=self.options.threads,
        )
        for n, r in by_name.items():
            t = timings[n]
            r.update(latency_ms=t.latency_ms, latency_ratio=t.ratio, latency_interval=[t.low, t.high], final_timing=True)
        fastest = timings[decision.chosen]
        ties = [n for n in by_name if timings[n].ratio <= fastest.ratio * (1 + TIE_MARGIN)
                and timings[n].low <= fastest.high and fastest.low <= timings[n].high]
        chosen = min(ties, key=lambda n: (by_name[n].get("macs") or 0, by_name[n]["size_bytes"], by_name[n]["trial"]))
        why = (f"fastest in the final timing: t{by_name[decision.chosen]['trial']}"
               if len(ties) == 1 else
               f"{', '.join(ties)} within noise of each other: fewest MACs, then smallest, then first")
        return {"chosen": by_name[chosen]["trial"], "ties": [by_name[n]["trial"] for n in ties], "why": why,
                "remeasured": decision.remeasured}


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
