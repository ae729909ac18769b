"""Candidate search: build candidates, measure their drop and latency against a baseline, fall
back where a candidate misses the budget, keep the best.

Generic: a :class:`Candidate` is a name and a build function (quantization modes today; pruning,
transfer and tuning candidates tomorrow), optionally with a way to give back part of its gain
(``fallback``: rebuild with the first k of an ordered list of layers left alone).

The work is budgeted:
- the reference model runs once over the evaluation data (:class:`~onnxcomp.evaluate.ReferenceOutputs`);
- latency is timed in interleaved rounds only as long as the order that decides the choice is
  in doubt: each round gives a candidate a ratio to the baseline taken within the same round, so
  load that comes and goes cancels out; the ratios' median and a distribution-free confidence
  interval decide when to stop; after the first few rounds only the candidates that may still
  be the fastest (or whose place against the "faster" bar is open) are timed;
- one :class:`Timer` (sessions created and warmed once) serves the first timing, the timing of a
  rebuilt candidate and the margin, and their rounds pool;
- fallback bisects over the order (k = 1 and the most allowed, that one first when the drop is
  far over the budget: when even it misses, the fallback stops there; else k = 2, 4, ... until
  the budget is met, then halves the bracket) instead of adding a few layers per round;
- when the two best candidates are still within noise at the end, they are timed again, a round
  at a time until their order settles (the margin), and the decision records how close it was.

Progress goes to the ``onnxcomp.search`` logger (the CLI shows it on stderr at a terminal).
"""

from __future__ import annotations

import ctypes
import dataclasses
import gc
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxcomp import runtime
from onnxcomp.data import DataSource
from onnxcomp.errors import OnnxcompError
from onnxcomp.evaluate import Comparison, ReferenceOutputs, Verdict, compare, load_metric

logger = logging.getLogger(__name__)

MIN_ROUNDS = 4  # rounds of timing before the order may be called settled
MAX_ROUNDS = 10  # ... and at most (10 runs each: the 100 runs the measurement took before)
# A round runs each model for about this long (at least MIN_BLOCK timed runs, at most
# bench.BLOCK_RUNS): a 40 ms model gets 4 runs a round, not 10, and twice the rounds for the time.
ROUND_MS = 150.0
MIN_BLOCK = 3
MARGIN_ROUNDS = 6  # at most this many more rounds of the two best when within noise (pooled)
Z95 = 1.96
# A drop more than this many times the budget: the fallback tries the most layers it may leave
# alone first (one layer seldom brings such a drop under the budget).
FAR_OVER_BUDGET = 2.0
# An interval at most this wide (in x baseline) is measured well enough: where it still holds a
# bar or another narrow interval, the two are within 2 % of each other and more rounds would
# not change the choice by more (the tie goes to the more accurate candidate). On the ViT-S
# focus model the clean-up's 1.05x stayed on its 1.05 bar for all 10 rounds: 40 s of timing.
SETTLED_WIDTH = 0.04
# Untimed runs of each new session: up to this many, and no more than WARMUP_MS of them (a
# 500 ms model is warm after 2 runs; 10 took 5 s a session).
WARMUP_MS = 1000.0
MIN_WARMUP = 2


@dataclasses.dataclass
class Built:
    """A built candidate: its model, its JSON-able report, and what its builder keeps beside
    it (a quantization plan, a pruning mask) for a later fallback."""

    model: ir.Model
    report: dict[str, Any]
    plan: Any = None
    # Work only a kept candidate needs (report figures no decision uses): run by `finish`.
    rest: Callable[[], None] | None = None

    def finish(self) -> Built:
        """Do the work left for when this candidate is kept (or its report is read)."""
        if self.rest is not None:
            rest, self.rest = self.rest, None
            rest()
        return self


@dataclasses.dataclass
class Fallback:
    """How a candidate gives back part of its gain: ``order`` lists what may be left alone
    (most harmful first, with a score), ``build(names)`` rebuilds with those names left alone."""

    order: list[tuple[str, float]]
    build: Callable[[list[str]], Built]


@dataclasses.dataclass
class Candidate:
    """A name, a build function, and optionally how to fall back from a built result."""

    name: str
    build: Callable[[], Built]
    fallback: Callable[[Built], Fallback] | None = None


@dataclasses.dataclass
class Timing:
    """A candidate's latency against the baseline, from interleaved rounds."""

    latency_ms: float  # p50 over all timed runs
    ratio: float  # median over rounds of (candidate p50 / baseline p50 in that round)
    low: float  # confidence interval of that median (about 95 %, distribution-free)
    high: float
    rounds: int

    def to_json(self) -> dict[str, Any]:
        return {
            "latency_ms": self.latency_ms,
            "ratio_to_float": self.ratio,
            "ratio_interval": [self.low, self.high],
            "timing_rounds": self.rounds,
        }


def median_interval(values: Sequence[float]) -> tuple[float, float, float]:
    """(median, low, high): the median and an order-statistic confidence interval for it
    (binomial, normal approximation; the full range below 6 values)."""
    ordered = sorted(values)
    n = len(ordered)
    if n == 0:
        return math.nan, math.nan, math.nan
    k = max(0, int(math.floor((n - Z95 * math.sqrt(n)) / 2)))
    return float(np.median(ordered)), ordered[k], ordered[n - 1 - k]


class Timer:
    """Interleaved timing of a baseline and candidates, round by round, in one process.

    Each round times the baseline and the candidates asked for (by default all of them); a
    candidate's ratio is taken over the rounds it was timed in, each against the baseline's
    time in the same round. Sessions are created once: the initial timing, the timing of a
    rebuilt candidate (:meth:`add`) and the margin share them, and their rounds pool."""

    def __init__(
        self,
        baseline: runtime.ModelLike,
        models: Mapping[str, runtime.ModelLike],
        *,
        data: DataSource | None = None,
        shapes: Mapping[str, Sequence[int]] | None = None,
        threads: int = 1,
        warmup: int = 10,
    ):
        from onnxcomp import bench

        feeds, self.feeds_from = bench.make_feeds(baseline, data=data, shapes=shapes)
        self.feeds = feeds
        self.threads = threads
        self.warmup = warmup
        self.sessions: dict[str, Any] = {}
        self.models: dict[str, runtime.ModelLike] = {}
        self.rounds: list[dict[str, list[float]]] = []  # round -> name -> times
        self.add("float", baseline)
        for name, model in models.items():
            self.add(name, model)

    @property
    def names(self) -> list[str]:
        return list(self.sessions)

    def add(self, name: str, model: runtime.ModelLike) -> None:
        """A candidate (or a new build under an old name, whose earlier rounds are dropped)."""
        from onnxcomp import bench

        session = runtime.create_session(model, threads=self.threads, label=name)
        runtime.run(session, self.feeds, label=name)
        started = time.perf_counter()
        runs = self._warm(session)
        if name == "float":  # the block size from the baseline's warm runs
            each_ms = (time.perf_counter() - started) * 1e3 / max(1, runs)
            self.block = max(MIN_BLOCK, min(bench.BLOCK_RUNS, round(ROUND_MS / max(each_ms, 1e-3))))
            # slow models need one run to have their weights back in the caches, fast ones more
            self.warm = 1 if self.block < bench.BLOCK_RUNS else bench.BLOCK_WARM
        if name in self.sessions:
            for r in self.rounds:
                r.pop(name, None)
        self.sessions[name] = session
        self.models[name] = model

    def release(self) -> None:
        """Close the sessions (a copy of each model's weights) until the next round: between
        timings, while candidates are built and judged, they would sit in memory (two ViT-S
        sessions: 400 MB). The rounds and the block size stay; sessions are made again, and
        warmed, when timing resumes."""
        self.sessions = dict.fromkeys(self.sessions)
        trim_memory()

    def _session(self, name: str) -> Any:
        if self.sessions[name] is None:
            session = runtime.create_session(self.models[name], threads=self.threads, label=name)
            runtime.run(session, self.feeds, label=name)
            self._warm(session)
            self.sessions[name] = session
        return self.sessions[name]

    def _warm(self, session: Any) -> int:
        """Untimed runs: at most ``warmup``, at least MIN_WARMUP, no more than WARMUP_MS."""
        started = time.perf_counter()
        feeds, runs = dict(self.feeds), 0
        while runs < self.warmup and (
            runs < MIN_WARMUP or (time.perf_counter() - started) * 1e3 < WARMUP_MS
        ):
            session.run(None, feeds)
            runs += 1
        return runs

    def remove(self, name: str) -> None:
        """Time ``name`` no more (a candidate given up); its rounds are dropped."""
        self.sessions.pop(name, None)
        self.models.pop(name, None)
        for r in self.rounds:
            r.pop(name, None)

    def rounds_of(self, name: str) -> int:
        return sum(1 for r in self.rounds if name in r)

    def run(self, rounds: int, names: Sequence[str] | None = None) -> None:
        """``rounds`` rounds of the baseline and ``names`` (default: every candidate)."""
        from onnxcomp import bench

        timed = [
            "float",
            *[n for n in (names if names is not None else self.names) if n != "float"],
        ]
        sessions = [self._session(n) for n in timed]
        enabled = gc.isenabled()
        gc.disable()  # a collection in the middle of a timed run would land on one model only
        try:
            for _ in range(rounds):
                times = bench.timing_round(
                    sessions, self.feeds, len(self.rounds), block=self.block, warm=self.warm
                )
                self.rounds.append(dict(zip(timed, times, strict=True)))
        finally:
            if enabled:
                gc.enable()

    def timings(self) -> dict[str, Timing]:
        out = {}
        base_all = [t for r in self.rounds for t in r["float"]]
        for name in self.names:
            mine = [r for r in self.rounds if name in r]
            ratios = [float(np.median(r[name]) / np.median(r["float"])) for r in mine]
            ratio, low, high = median_interval(ratios)
            if name == "float":
                ratio = low = high = 1.0
            times = [t for r in mine for t in r[name]]
            out[name] = Timing(float(np.median(times or base_all)), ratio, low, high, len(ratios))
        return out


def settled(t: Timing) -> bool:
    """Narrow enough (:data:`SETTLED_WIDTH`) that more rounds would not change a choice by more
    than the width."""
    return t.high - t.low <= SETTLED_WIDTH


def overlap(a: Timing, b: Timing) -> bool:
    return a.low <= b.high and b.low <= a.high


_LIBC: Any = None


def trim_memory() -> None:
    """Collect garbage and give freed heap memory back to the system. glibc keeps what freed
    onnxruntime sessions and large arrays held (measured: 200 MB after two ViT-S sessions were
    closed), so without this each step of a search starts from the last one's peak."""
    global _LIBC
    gc.collect()
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL("libc.so.6")
            _LIBC.malloc_trim  # noqa: B018  (glibc only)
        except (OSError, AttributeError):
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


def in_doubt(
    timings: Mapping[str, Timing],
    threshold: float | None,
    ignore: Sequence[str] = (),
    bar_only: Sequence[str] = (),
) -> list[tuple[str, str]]:
    """Pairs whose order is not settled: intervals that overlap each other (or the threshold),
    unless both are :func:`settled`. Candidates in ``ignore`` (over the drop budget) do not
    count; those in ``bar_only`` (over the budget, but a fallback may rescue them) count against
    the threshold only."""
    names = [n for n in timings if n != "float" and n not in ignore]
    pairs = []
    for i, a in enumerate(names):
        ta = timings[a]
        if threshold is not None and ta.low <= threshold <= ta.high and not settled(ta):
            pairs.append((a, "threshold"))
        for b in names[i + 1 :]:
            if a in bar_only or b in bar_only:
                continue
            tb = timings[b]
            if overlap(ta, tb) and not (settled(ta) and settled(tb)):
                pairs.append((a, b))
    return pairs


def deciding(
    timings: Mapping[str, Timing],
    threshold: float | None,
    ignore: Sequence[str] = (),
    bar_only: Sequence[str] = (),
) -> list[tuple[str, str]]:
    """The pairs of :func:`in_doubt` whose order decides the choice: only candidates that may
    still be the fastest (their interval reaches below the lowest upper bound of the others)
    count, so a candidate surely slower than another is timed no more. A ``bar_only``
    candidate (a fallback may rescue it, but only makes it slower) is in doubt while its
    interval holds the bar it must beat: the threshold or the best fitting candidate's ratio,
    whichever is lower ("target")."""
    eligible = [n for n in timings if n != "float" and n not in ignore and n not in bar_only]
    best_high = min((timings[n].high for n in eligible), default=math.inf)
    contenders = [n for n in eligible if timings[n].low <= best_high]
    pairs = in_doubt({n: timings[n] for n in contenders}, threshold)
    bars = [timings[n].ratio for n in eligible]
    target = min([*([threshold] if threshold is not None else []), *bars], default=None)
    for name in bar_only:
        t = timings.get(name)
        if t is not None and target is not None and t.low <= target <= t.high and not settled(t):
            pairs.append((name, "target"))
    return pairs


def time_candidates(
    baseline: runtime.ModelLike,
    models: Mapping[str, runtime.ModelLike],
    *,
    data: DataSource | None = None,
    shapes: Mapping[str, Sequence[int]] | None = None,
    threads: int = 1,
    threshold: float | None = None,
    ignore: Sequence[str] = (),
    bar_only: Sequence[str] = (),
    min_rounds: int = MIN_ROUNDS,
    max_rounds: int = MAX_ROUNDS,
    timer: Timer | None = None,
) -> dict[str, Timing]:
    """Time ``models`` against ``baseline`` (named "float") in interleaved rounds until the
    order that decides the choice is settled (see :func:`deciding`) or a candidate in doubt
    has ``max_rounds`` rounds. After ``min_rounds`` rounds of all, only the candidates in doubt
    are timed. ``timer``: an existing :class:`Timer` to go on with: ``models`` not in it (or
    given again under an old name, a rebuild) are added, and its earlier candidates take part
    in the order (and are timed again if it is in doubt). Returns every candidate's timing."""
    if timer is None:
        timer = Timer(baseline, models, data=data, shapes=shapes, threads=threads)
    else:
        for name, model in models.items():
            if timer.models.get(name) is not model:
                timer.add(name, model)
    names = [n for n in timer.names if n != "float"]
    short = [n for n in names if timer.rounds_of(n) < min_rounds]
    while short:
        timer.run(1, short)
        short = [n for n in names if timer.rounds_of(n) < min_rounds]
    timings = timer.timings()
    while True:
        doubt = deciding(timings, threshold, ignore, bar_only)
        active = [n for n in dict.fromkeys(x for pair in doubt for x in pair) if n in names]
        active = [n for n in active if timer.rounds_of(n) < max_rounds]
        if not active:
            break
        logger.info(
            "timing round %d: still in doubt %s",
            len(timer.rounds) + 1,
            ", ".join(f"{a}/{b}" for a, b in doubt[:3]),
        )
        timer.run(1, active)
        timings = timer.timings()
    logger.info(
        "timed %s",
        ", ".join(
            f"{n} {t.ratio:.2f}x [{t.low:.2f}, {t.high:.2f}] ({t.rounds} rounds)"
            for n, t in timings.items()
            if n != "float"
        ),
    )
    return timings


def time_until_narrow(
    timer: Timer,
    *,
    width: float,
    max_seconds: float,
    min_rounds: int = MIN_ROUNDS,
    max_rounds: int = 1000,
) -> dict[str, Timing]:
    """Rounds of every model in ``timer`` until each ratio's interval is at most ``width`` wide
    (after at least ``min_rounds``), or ``max_rounds``, or ``max_seconds`` of timing (checked
    after :data:`MIN_ROUNDS` rounds): figures for a benchmark table, where no choice bounds the
    work. Returns every model's timing (``rounds`` says how many were taken)."""
    started = time.perf_counter()
    while True:
        done = len(timer.rounds)
        timings = timer.timings() if done else {}
        wide = [n for n, t in timings.items() if n != "float" and t.high - t.low > width]
        if done >= min_rounds and not wide:
            break
        if done >= max_rounds:
            break
        if done >= MIN_ROUNDS and time.perf_counter() - started > max_seconds:
            logger.info("timing: %.0f s budget spent with %s still wider than %g", max_seconds,
                        ", ".join(wide), width)  # fmt: skip
            break
        timer.run(1)
    return timer.timings()


# ---------------------------------------------------------------------------------------------
# Judging the drop


class Judge:
    """Measures candidates against one reference on one data source, the reference run once
    (its outputs kept in memory within a budget)."""

    def __init__(
        self,
        reference: runtime.ModelLike,
        data: DataSource,
        *,
        metric: Any = "auto",
        max_drop: float | None = None,
        batch_size: int = 32,
        limit: int | None = None,
        threads: int = 1,
    ):
        self.data = data
        self.metric = load_metric(metric)  # a user's function imported once
        self.max_drop = max_drop
        self.threads = threads
        self.reference = ReferenceOutputs(
            reference, data, batch_size=batch_size, limit=limit, threads=threads
        )

    @classmethod
    def from_options(
        cls, reference: runtime.ModelLike, data: DataSource, options: Any, max_drop: float | None
    ) -> Judge:
        """A judge with a command's options: metric, batch_size, check_samples, threads."""
        return cls(
            reference,
            data,
            metric=options.metric,
            max_drop=max_drop,
            batch_size=options.batch_size,
            limit=options.check_samples,
            threads=options.threads,
        )

    def compare(self, model: runtime.ModelLike) -> Comparison:
        return compare(self.reference, model, metric=self.metric, threads=self.threads)

    def __call__(self, model: runtime.ModelLike) -> tuple[Verdict, Comparison]:
        comparison = self.compare(model)
        return comparison.verdict(self.metric, self.max_drop, default=True), comparison


# ---------------------------------------------------------------------------------------------
# Fallback by bisection


@dataclasses.dataclass
class FallbackResult:
    built: Built
    verdict: Verdict
    comparison: Comparison
    left_alone: list[str]
    history: list[dict[str, Any]]


def bisect_fallback(
    fallback: Fallback,
    judge: Callable[[ir.Model], tuple[Verdict, Comparison]],
    first: tuple[Built, Verdict, Comparison],
    *,
    max_builds: int | None = None,
    max_count: int | None = None,
) -> FallbackResult:
    """The smallest k such that leaving the first k of ``fallback.order`` alone meets the
    budget: the largest k allowed first when the drop is more than FAR_OVER_BUDGET times the
    budget, else second after k = 1 (when it misses, no smaller k is tried), then k = 2, 4, ...
    until it passes, and bisect the bracket (k < n: all left alone is the
    baseline, not a candidate). ``first`` is the build with nothing left alone. Stops after
    ``max_builds`` builds with the best found (the one with the lowest drop when none passes);
    ``max_count`` bounds k."""
    # Leaving everything alone is the baseline itself, not a candidate: at most n - 1.
    names = [name for name, _ in fallback.order][: max(0, len(fallback.order) - 1)]
    if max_count is not None:
        names = names[:max_count]
    built, verdict, comparison = first
    history = [{"float_layers": [], "drop": verdict.drop}]
    best = FallbackResult(built, verdict, comparison, [], history)
    if verdict.passed or not names:
        return best
    tried: dict[int, bool] = {0: False}  # k -> passed (only the best build is kept in memory)
    builds = 0

    def attempt(k: int) -> bool:
        nonlocal builds, best
        builds += 1
        chosen = names[:k]
        logger.info("fallback: %d of %d left alone (float, unpruned)", k, len(names))
        result = fallback.build(chosen)
        v, c = judge(result.model)
        logger.info("fallback: %d left alone: %s %.4f (budget %s)", k, v.metric, v.drop, v.budget)
        tried[k] = v.passed
        history.append({"float_layers": chosen, "drop": v.drop})
        if v.passed and (not best.verdict.passed or k < len(best.left_alone)):
            best = FallbackResult(result, v, c, chosen, history)
        elif not best.verdict.passed and v.drop < best.verdict.drop:
            best = FallbackResult(result, v, c, chosen, history)
        del result
        trim_memory()
        return v.passed

    # The most that may be left alone is tried early: when even it misses the budget, no fewer
    # will (on the PP-OCRv4 recogniser 1 to 32 layers all missed it: 6 builds and checks for
    # nothing). First when the drop is far over the budget (one layer seldom brings it under),
    # else second, after one layer.
    most = len(names)
    far = verdict.budget is not None and verdict.drop > FAR_OVER_BUDGET * verdict.budget
    if far and most > 1 and not attempt(most):
        return best
    low, high = 0, None  # low fails; high passes
    k = 1
    while high is None:
        if max_builds is not None and builds >= max_builds:
            return best
        passed = tried[k] if k in tried else attempt(k)
        if passed:
            high = k
            break
        low = k
        if k >= len(names):
            return best
        if k == 1 and most > 2 and most not in tried and not attempt(most):
            return best
        k = min(2 * k, len(names))
    while high - low > 1:
        if max_builds is not None and builds >= max_builds:
            break
        mid = (low + high) // 2
        if attempt(mid):
            high = mid
        else:
            low = mid
    return best


# ---------------------------------------------------------------------------------------------
# Choosing


@dataclasses.dataclass
class Decision:
    """What the search chose and how close it was."""

    chosen: str
    runner_up: str | None
    margin: float | None  # runner-up's ratio minus the chosen one's (in x baseline)
    within_noise: bool  # their intervals still overlapped after re-measuring
    remeasured: bool

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def remeasure_if_close(
    baseline: runtime.ModelLike,
    models: Mapping[str, runtime.ModelLike],
    timings: dict[str, Timing],
    rank: Callable[[Mapping[str, Timing]], list[str]],
    *,
    threshold: float | None,
    data: DataSource | None = None,
    shapes: Mapping[str, Sequence[int]] | None = None,
    threads: int = 1,
    rounds: int = MARGIN_ROUNDS,
    timer: Timer | None = None,
) -> Decision:
    """``rank(timings)``: the eligible names, best first ("float" last, as the fallback). While
    the best and the runner-up (or the best and the threshold) are within noise, time them
    again, one round at a time, for at most ``rounds`` more rounds; returns the decision with
    its margin. With ``timer`` (the one ``timings`` came from) the new rounds pool with the
    earlier ones; without, the two are measured afresh (at least ``MIN_ROUNDS`` rounds)."""

    def close(ranked: list[str], narrow_too: bool = False) -> list[str]:
        """The names whose order is in doubt (not "float"); with ``narrow_too``, also where
        both intervals are :func:`settled` (within noise, but not worth more rounds)."""
        best = ranked[0]
        if best == "float":
            return []
        a = timings[best]
        names = []
        if threshold is not None and a.low <= threshold <= a.high:
            if narrow_too or not settled(a):
                names.append(best)
        if len(ranked) > 1 and ranked[1] != "float":
            b = timings[ranked[1]]
            if overlap(a, b) and (narrow_too or not (settled(a) and settled(b))):
                names += [best, ranked[1]]
        return list(dict.fromkeys(names))

    ranked = rank(timings) or ["float"]
    doubt = close(ranked)
    remeasured = False
    if doubt:
        logger.info("margin: %s within noise, timing again", " and ".join(doubt))
        fresh = timer is None
        if timer is None:
            timer = Timer(
                baseline,
                {n: models[n] for n in doubt},
                data=data,
                shapes=shapes,
                threads=threads,
            )
        extra = 0
        while extra < rounds and (doubt or (fresh and extra < MIN_ROUNDS)):
            timed = doubt or [n for n in timer.names if n != "float"]
            timer.run(1, timed)
            extra += 1
            if fresh and extra < MIN_ROUNDS:
                continue
            again = timer.timings()
            for name in timer.names:
                if name != "float" and name in timings:
                    timings[name] = again[name]
            ranked = rank(timings) or ["float"]
            doubt = close(ranked)
        remeasured = True
        logger.info(
            "margin: %d more rounds: %s",
            extra,
            ", ".join(f"{n} {timings[n].ratio:.2f}x [{timings[n].low:.2f}, "
                      f"{timings[n].high:.2f}]" for n in ranked if n != "float"),
        )  # fmt: skip
    best = ranked[0]
    runner = ranked[1] if len(ranked) > 1 else None
    margin = None
    if runner is not None and runner != "float":
        margin = timings[runner].ratio - timings[best].ratio
    elif threshold is not None and best != "float":
        margin = threshold - timings[best].ratio  # how far under the "faster" bar
    return Decision(best, runner, margin, bool(close(ranked, narrow_too=True)), remeasured)


def check_same_inputs(reference: ir.Model, candidate: ir.Model, name: str) -> None:
    ref = [v.name for v in reference.graph.inputs]
    cand = [v.name for v in candidate.graph.inputs]
    if ref != cand:
        raise OnnxcompError(f"candidate {name}: inputs {cand} differ from the reference's {ref}")
