"""``onnxcomp tune``: search whole-model compression recipes for the fastest (or smallest)
model within a metric budget, measured for real in onnxruntime.

1. Sensitivity: one trial quantizes every layer it can (static); then, per quantized layer, a
   probe quantizes only that layer and measures the drop on the evaluation data. The order
   (most harmful first) is cached in the run folder by a hash of the model, the data, and the
   metric, so a resumed or repeated run does not probe again. The search leaves the k most
   sensitive layers float (``keep_float``).
2. A greedy seed (each lever alone: static, dynamic, the cleaned-up graph, structured 10/20 %,
   static with the worst layer float), then optuna's TPE over whole configurations when optuna
   is installed, else a seeded random search over the same choices.
3. Builds and the metric run in parallel (a local process pool, or Ray); the latency of every
   built model is measured afterwards in this process, one model at a time, against fp32 in
   interleaved rounds (``onnxcomp.search.time_candidates``), so parallel trials never disturb
   each other's timing. The best few are timed again side by side before the choice.
4. It always ends with a result: the best passing trial, or -- when none passes -- the closest
   one (lowest drop) saved as ``OUT.closest.onnx`` and :class:`NoSolution` raised. Every trial
   is a line of ``trials.jsonl`` in the run folder; ``resume`` continues from it. Ctrl-C keeps
   the best so far.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import random
import signal
import time
from pathlib import Path
from typing import Any, Literal

from onnxcomp.errors import OnnxcompError
from onnxcomp.tune import space as space_mod
from onnxcomp.tune.worker import build_trial

logger = logging.getLogger(__name__)

PENALTY = 10.0  # what a failing trial scores for the optimiser (plus its drop)
FINAL_TOP = 3  # trials timed again side by side before the choice


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
    threads: int = 1

    def check(self, where: str = "tune") -> None:
        if not self.eval_data:
            raise OnnxcompError(f"{where}: --eval-data is required (the metric is measured on it)")
        if not 0 <= self.max_drop <= 1:
            raise OnnxcompError(f"{where}: --max-drop {self.max_drop}: expected a fraction in [0, 1]")
        if self.trials < 1 or self.workers < 1:
            raise OnnxcompError(f"{where}: --trials and --workers must be at least 1")
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
            "trials": self.trials,
        }


# ---------------------------------------------------------------------------------------------
# Where trials run


class Runner:
    """Runs trial builds: inline (1 worker), a local process pool, or Ray tasks. ``map`` keeps
    the order of its jobs, so a seeded search sees results in the same order every time."""

    def __init__(self, workers: int, ray_address: str | None):
        self.kind = "inline"
        self.pool = None
        self.remote = None
        if ray_address:
            try:
                import ray
            except ImportError:
                raise OnnxcompError("--ray needs Ray: pip install 'onnxcomp[ray]'") from None
            if not ray.is_initialized():
                if ray_address == "auto":
                    ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)
                else:
                    ray.init(address=ray_address, log_to_driver=False)
            self.remote = ray.remote(build_trial)
            self.kind = "ray"
        elif workers > 1:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            self.pool = ProcessPoolExecutor(
                max_workers=workers,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_ignore_sigint,
            )
            self.kind = "pool"
        self.workers = workers

    def map(self, jobs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        if self.kind == "ray":
            import ray

            return ray.get([self.remote.remote(job) for job in jobs])
        if self.kind == "pool":
            futures = [self.pool.submit(build_trial, job) for job in jobs]
            return [f.result() for f in futures]
        return [build_trial(job) for job in jobs]

    def close(self, cancel: bool = False) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=not cancel, cancel_futures=cancel)


def _ignore_sigint() -> None:
    # Ctrl-C reaches the whole process group; the parent decides what to keep.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


# ---------------------------------------------------------------------------------------------
# The optimiser: optuna TPE when installed, else seeded random search, over the same choices


class Sampler:
    def __init__(self, choices: dict[str, list[Any]], seed: int):
        self.choices = choices
        self.rng = random.Random(seed)
        self.pending: dict[str, Any] = {}
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
            sampler=optuna.samplers.TPESampler(seed=seed, n_startup_trials=4, multivariate=True),
        )
        self.kind = "tpe"

    def suggest(self) -> dict[str, Any]:
        if self.study is None:
            return {k: self.rng.choice(v) for k, v in self.choices.items()}
        trial = self.study.ask(self.dists)
        key = json.dumps(trial.params, sort_keys=True)
        self.pending[key] = trial
        return dict(trial.params)

    def observe(self, params: dict[str, Any], value: float) -> None:
        if self.study is None:
            return
        key = json.dumps({k: params[k] for k in self.choices}, sort_keys=True)
        trial = self.pending.pop(key, None)
        if trial is not None:
            self.study.tell(trial, value)
            return
        fitted = {k: (params[k] if params[k] in self.choices[k] else self.choices[k][0]) for k in self.choices}
        self.study.add_trial(
            self.optuna.trial.create_trial(params=fitted, distributions=self.dists, value=value)
        )


def _score(record: dict[str, Any], objective: str) -> float:
    """What the optimiser minimises: the objective ratio (rounded to 0.01 so timing noise does
    not steer a seeded search), or a penalty plus the drop for a trial over the budget."""
    if not record.get("passed"):
        drop = record.get("drop")
        return PENALTY + (min(float(drop), 1.0) if drop is not None and math.isfinite(drop) else 1.0)
    key = "latency_ratio" if objective == "latency" else "size_ratio"
    value = record.get(key)
    return round(float(value), 2) if value is not None else PENALTY


def _key(config: dict[str, Any]) -> str:
    return json.dumps(config, sort_keys=True)


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
        both = {"prune", "quantize"} <= set(options.levers)
        prune = space_mod.PRUNE if both else space_mod.PRUNE[1:] if "prune" in options.levers else ("none",)
        quantize = space_mod.QUANTIZE if both else space_mod.QUANTIZE[1:] if "quantize" in options.levers else ("none",)
        self.space = space_mod.Space(prune=prune, quantize=quantize)
        self.base_size = Path(self.model_path).stat().st_size
        self.sensitivity: list[dict[str, Any]] = []
        self.deadline = None
        self.runner: Runner | None = None

    # -- one batch ------------------------------------------------------------------------

    def _job(self, number: int, config: dict[str, Any]) -> dict[str, Any]:
        name = f"t{number:03d}"
        return {
            "trial": number,
            "recipe": self.recipe(config, self.run_dir / "trials" / f"{name}.onnx", validate=False),
            "input": self.model_path,
            "eval_data": self.eval_data,
            "metric": self.options.metric,
            "max_drop": self.options.max_drop,
            "limit": self.options.limit,
        }

    def recipe(self, config: dict[str, Any], output: Path, validate: bool = True) -> dict[str, Any]:
        raw: dict[str, Any] = {
            "version": 1,
            "input": self.model_path,
            "output": str(output),
            "data": self.data,
            "steps": space_mod.steps(config, self.space.layers, self.options.seed),
        }
        if validate:
            raw["validate"] = {
                "data": self.eval_data,
                "metric": self.options.metric,
                "max_drop": self.options.max_drop,
                "limit": self.options.limit,
            }
        return raw

    def _time(self, record: dict[str, Any]) -> None:
        """Latency against fp32, in this process, one model at a time."""
        from onnxcomp.data import open_data
        from onnxcomp.model import input_specs, load
        from onnxcomp.search import time_candidates

        if not hasattr(self, "_timing_data"):
            self._timing_data = open_data(self.eval_data, input_specs(load(self.model_path)))
        timings = time_candidates(
            self.model_path,
            {"trial": record["path"]},
            data=self._timing_data,
            threads=self.options.threads,
            min_rounds=3,
            max_rounds=6,
        )
        t = timings["trial"]
        record.update(
            latency_ms=t.latency_ms,
            latency_ratio=t.ratio,
            latency_interval=[t.low, t.high],
            fp32_latency_ms=timings["float"].latency_ms,
        )

    def run_batch(self, configs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        start = len(self.records)
        jobs = [self._job(start + i, c) for i, c in enumerate(configs)]
        results = self.runner.map(jobs)
        out = []
        for config, result in zip(configs, results):
            record = {"name": space_mod.label(config), "config": config, **result}
            if record.get("path") and "error" not in record:
                try:
                    self._time(record)
                except OnnxcompError as err:
                    record["timing_error"] = str(err)
                record["size_ratio"] = (record.get("size_bytes") or 0) / self.base_size
            self.records.append(record)
            with self.log_path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(_jsonable(record)) + "\n")
            logger.info(
                "trial %d %s: drop %.4f%s, %s",
                record["trial"], record["name"], record.get("drop", math.inf),
                " (passed)" if record.get("passed") else "",
                f"{record['latency_ratio']:.2f}x fp32" if "latency_ratio" in record else record.get("error", ""),
            )
            out.append(record)
        return out

    # -- sensitivity ------------------------------------------------------------------------

    def measure_sensitivity(self, all_static: dict[str, Any]) -> None:
        layers = all_static.get("layers") or []
        key = _hash_files([self.model_path, self.eval_data, self.data], f"{self.options.metric}|{self.options.limit}")
        cache = self.run_dir / f"sensitivity-{key}.json"
        if cache.exists():
            self.sensitivity = json.loads(cache.read_text())
        elif len(layers) > 1:
            jobs = []
            for i, layer in enumerate(layers):
                config = {"prune": "none", "ratio": 0.0, "quantize": "static", "calibration": "minmax", "keep_float": 0}
                job = self._job(0, config)
                job["trial"] = f"probe{i}"
                job["recipe"]["output"] = str(self.run_dir / "trials" / f"probe{i}.onnx")
                job["recipe"]["steps"][-1]["exclude_nodes"] = [n for n in layers if n != layer]
                jobs.append(job)
            results = self.runner.map(jobs)
            self.sensitivity = [
                {"layer": layer, "drop_alone": r.get("drop"), "error": r.get("error")}
                for layer, r in zip(layers, results)
            ]
            self.sensitivity.sort(key=lambda s: -(s["drop_alone"] if s["drop_alone"] is not None else math.inf))
            cache.write_text(json.dumps(_jsonable(self.sensitivity), indent=1))
            for i in range(len(layers)):
                Path(self.run_dir / "trials" / f"probe{i}.onnx").unlink(missing_ok=True)
        self.space.layers = [s["layer"] for s in self.sensitivity] or list(layers)

    # -- the search ---------------------------------------------------------------------------

    def search(self) -> TuneResult:
        opts = self.options
        started = time.perf_counter()
        self.deadline = started + opts.time_budget if opts.time_budget else None
        stopped = "trials"
        self.runner = Runner(opts.workers, opts.ray)
        sampler = None
        try:
            tried = {_key(r["config"]): r for r in self.records}
            # The first trial quantizes everything it can: the sensitivity probes need its layers.
            if "static" in self.space.quantize:
                first = self.space.canonical({"prune": "none", "ratio": 0.0, "quantize": "static", "calibration": "minmax", "keep_float": 0})
                if _key(first) not in tried:
                    self.run_batch([first])
                all_static = next(r for r in self.records if _key(r["config"]) == _key(first))
                self.measure_sensitivity(all_static)
            sampler = Sampler(self.space.choices(), opts.seed)
            for r in self.records:
                sampler.observe(r["config"], _score(r, opts.objective))
            tried = {_key(r["config"]): r for r in self.records}
            while len(self.records) < opts.trials:
                if self.deadline is not None and self.records and time.perf_counter() >= self.deadline:
                    stopped = "time budget"
                    break
                want = min(self.runner.workers, opts.trials - len(self.records))
                batch: list[tuple[dict[str, Any], dict[str, Any] | None]] = []
                # The greedy seed, one step at a time (each step looks at the results so far;
                # it never fills a parallel batch on its own guess).
                if not batch:
                    batch = [(c, None) for c in self.space.greedy(tried)]
                attempts = 0
                while len(batch) < want and attempts < 50:
                    attempts += 1
                    params = sampler.suggest()
                    config = self.space.canonical(params)
                    known = tried.get(_key(config))
                    if known is not None:  # a duplicate: the optimiser learns its known score
                        sampler.observe(params, _score(known, opts.objective))
                    elif _key(config) in {_key(c) for c, _ in batch}:
                        sampler.observe(params, PENALTY)
                    else:
                        batch.append((config, params))
                if not batch:
                    stopped = "space exhausted"
                    break
                records = self.run_batch([c for c, _ in batch])
                for (config, params), record in zip(batch, records):
                    tried[_key(config)] = record
                    sampler.observe(params or _fill(config, self.space.choices()), _score(record, opts.objective))
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
            raise OnnxcompError(f"tune: no trial could be built (see {self.log_path})")
        key = "latency_ratio" if self.options.objective == "latency" else "size_ratio"
        passing = [r for r in built if r.get("passed") and r.get(key) is not None]
        if passing and self.options.objective == "latency" and stopped != "interrupted":
            self._final_timing(passing)
        passing.sort(key=lambda r: (r[key], -(r.get("metric") or 0)))
        for r in self.records:
            r["chosen"] = False
        _mark_pareto(built, key)
        recipe_path = None
        if passing:
            best = passing[0]
            target, closest = self.output, None
        else:
            best = min(built, key=lambda r: (r.get("drop", math.inf), r.get(key) or math.inf))
            target = closest = self.output.with_name(self.output.stem + ".closest" + self.output.suffix)
        best["chosen"] = True
        model_io.save(model_io.load(best["path"]), target, inputs=[self.model_path])
        recipe_path = target.with_name(target.stem + ".recipe.yaml")
        recipe = self.recipe(best["config"], target)
        recipe["_decision"] = {
            "chosen": best["name"],
            "why": f"{key.replace('_', ' ')} {best.get(key, math.nan):.3f}, {best.get('reason', '')}",
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
            seconds=seconds,
            objective=self.options.objective,
        )

    def _final_timing(self, passing: list[dict[str, Any]]) -> None:
        """The best few, timed again side by side (ratios from separate runs drift with load)."""
        from onnxcomp.search import time_candidates

        top = sorted(passing, key=lambda r: r["latency_ratio"])[:FINAL_TOP]
        if len(top) < 2:
            return
        timings = time_candidates(
            self.model_path,
            {f"t{r['trial']}": r["path"] for r in top},
            data=self._timing_data,
            threads=self.options.threads,
            min_rounds=6,
            max_rounds=12,
        )
        for r in top:
            t = timings[f"t{r['trial']}"]
            r.update(latency_ms=t.latency_ms, latency_ratio=t.ratio, latency_interval=[t.low, t.high], final_timing=True)


def _fill(config: dict[str, Any], choices: dict[str, list[Any]]) -> dict[str, Any]:
    """Values the optimiser can take back (None/0.0 where a choice did not matter)."""
    return {k: (config[k] if config.get(k) in v else v[0]) for k, v in choices.items()}


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
    return {k: v for k, v in record.items() if k != "layers"}


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
    rows = [t for t in result.trials if t.get(key) is not None]
    rows.sort(key=lambda t: t[key])
    header = ["trial", "recipe", "latency x fp32", "size x fp32", "metric", "drop", "passed", "pareto", "chosen"]
    return header, [
        [t["trial"], t["name"], t.get("latency_ratio"), t.get("size_ratio"), t.get("metric"),
         t.get("drop"), bool(t.get("passed")), bool(t.get("pareto")), bool(t.get("chosen"))]
        for t in rows
    ]


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
