"""Candidate search: build candidates, measure their drop and latency against a baseline, fall
back where a candidate misses the budget, keep the best.

Generic: a :class:`Candidate` is a name and a build function (quantization modes today; pruning,
transfer and tuning candidates tomorrow), optionally with a way to give back part of its gain
(``fallback``: rebuild with the first k of an ordered list of layers left alone).

The work is budgeted:
- the reference model runs once over the evaluation data (:class:`~onnxcomp.evaluate.ReferenceOutputs`);
- latency is timed in interleaved rounds only as long as the order of the candidates (and their
  place against the "faster" threshold) is in doubt: each round gives every candidate a ratio
  to the baseline taken within the same round, so load that comes and goes cancels out; the
  ratios' median and a distribution-free confidence interval decide when to stop;
- fallback bisects over the order (k = 1, 2, 4, ... until the budget is met, then halves the
  bracket) instead of adding a few layers per round;
- when the two best candidates are still within noise at the end, both are re-measured with
  more rounds (the margin), and the decision records how close it was.

Progress goes to the ``onnxcomp.search`` logger (the CLI shows it on stderr at a terminal).
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import math
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
MARGIN_ROUNDS = 10  # extra rounds for the two best when they are within noise at the end
Z95 = 1.96


@dataclasses.dataclass
class Built:
    """A built candidate: its model, its JSON-able report, and what its builder keeps beside
    it (a quantization plan, a pruning mask) for a later fallback."""

    model: ir.Model
    report: dict[str, Any]
    plan: Any = None


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
    """Interleaved timing of a baseline and candidates, round by round, in one process."""

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

        self.names = ["float", *models]
        feeds, self.feeds_from = bench.make_feeds(baseline, data=data, shapes=shapes)
        self.feeds = feeds
        self.sessions = []
        for name, model in zip(self.names, [baseline, *models.values()]):
            session = runtime.create_session(model, threads=threads, label=name)
            runtime.run(session, feeds, label=name)
            self.sessions.append(session)
        bench.warm_up(self.sessions, feeds, warmup)
        self.rounds: list[list[list[float]]] = []  # round -> model -> times

    def run(self, rounds: int) -> None:
        from onnxcomp import bench

        enabled = gc.isenabled()
        gc.disable()  # a collection in the middle of a timed run would land on one model only
        try:
            for _ in range(rounds):
                self.rounds.append(bench.timing_round(self.sessions, self.feeds, len(self.rounds)))
        finally:
            if enabled:
                gc.enable()

    def timings(self) -> dict[str, Timing]:
        out = {}
        base_all = [t for r in self.rounds for t in r[0]]
        for index, name in enumerate(self.names):
            ratios = [float(np.median(r[index]) / np.median(r[0])) for r in self.rounds]
            ratio, low, high = median_interval(ratios)
            if index == 0:
                ratio = low = high = 1.0
            times = [t for r in self.rounds for t in r[index]]
            out[name] = Timing(float(np.median(times or base_all)), ratio, low, high, len(ratios))
        return out


def in_doubt(
    timings: Mapping[str, Timing],
    threshold: float | None,
    ignore: Sequence[str] = (),
    bar_only: Sequence[str] = (),
) -> list[tuple[str, str]]:
    """Pairs whose order is not settled: intervals that overlap each other (or the threshold).
    Candidates in ``ignore`` (over the drop budget) do not count; those in ``bar_only`` (over
    the budget, but a fallback may rescue them) count against the threshold only."""
    names = [n for n in timings if n != "float" and n not in ignore]
    pairs = []
    for i, a in enumerate(names):
        ta = timings[a]
        if threshold is not None and ta.low <= threshold <= ta.high:
            pairs.append((a, "threshold"))
        for b in names[i + 1 :]:
            if a in bar_only or b in bar_only:
                continue
            tb = timings[b]
            if ta.low <= tb.high and tb.low <= ta.high:
                pairs.append((a, b))
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
) -> dict[str, Timing]:
    """Time ``models`` against ``baseline`` (named "float") in interleaved rounds until their
    order is settled (see :func:`in_doubt`) or ``max_rounds`` is reached."""
    timer = Timer(baseline, models, data=data, shapes=shapes, threads=threads)
    timer.run(min_rounds)
    timings = timer.timings()
    while len(timer.rounds) < max_rounds:
        doubt = in_doubt(timings, threshold, ignore, bar_only)
        if not doubt:
            break
        logger.info(
            "timing round %d: still in doubt %s",
            len(timer.rounds) + 1,
            ", ".join(f"{a}/{b}" for a, b in doubt[:3]),
        )
        timer.run(1)
        timings = timer.timings()
    logger.info(
        "timed %d rounds: %s",
        len(timer.rounds),
        ", ".join(f"{n} {t.ratio:.2f}x [{t.low:.2f}, {t.high:.2f}]" for n, t in timings.items()),
    )
    return timings


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
    budget: k = 1, 2, 4, ... until it does, then bisect the bracket (k < n: all left alone is
    the baseline, not a candidate). ``first`` is the build with nothing left alone. Stops after ``max_builds`` builds with the best found (the one
    with the lowest drop when none passes); ``max_count`` bounds k."""
    # Leaving everything alone is the baseline itself, not a candidate: at most n - 1.
    names = [name for name, _ in fallback.order][: max(0, len(fallback.order) - 1)]
    if max_count is not None:
        names = names[:max_count]
    built, verdict, comparison = first
    history = [{"float_layers": [], "drop": verdict.drop}]
    best = FallbackResult(built, verdict, comparison, [], history)
    if verdict.passed or not names:
        return best
    tried: dict[int, tuple[Built, Verdict, Comparison]] = {0: first}
    builds = 0

    def attempt(k: int) -> bool:
        nonlocal builds, best
        builds += 1
        chosen = names[:k]
        logger.info("fallback: %d of %d left alone (float, unpruned)", k, len(names))
        result = fallback.build(chosen)
        v, c = judge(result.model)
        tried[k] = (result, v, c)
        history.append({"float_layers": chosen, "drop": v.drop})
        if v.passed and (not best.verdict.passed or k < len(best.left_alone)):
            best = FallbackResult(result, v, c, chosen, history)
        elif not best.verdict.passed and v.drop < best.verdict.drop:
            best = FallbackResult(result, v, c, chosen, history)
        return v.passed

    low, high = 0, None  # low fails; high passes
    k = 1
    while high is None:
        if max_builds is not None and builds >= max_builds:
            return best
        if attempt(k):
            high = k
        else:
            low = k
            if k >= len(names):
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
) -> Decision:
    """``rank(timings)``: the eligible names, best first ("float" last, as the fallback). When
    the best and the runner-up (or the best and the threshold) are within noise, time both
    again for ``rounds`` rounds and rank anew; returns the decision with its margin."""

    def close(ranked: list[str]) -> list[str]:
        """The names whose order is in doubt (not "float")."""
        best = ranked[0]
        if best == "float":
            return []
        a = timings[best]
        names = []
        if threshold is not None and a.low <= threshold <= a.high:
            names.append(best)
        if len(ranked) > 1 and ranked[1] != "float":
            b = timings[ranked[1]]
            if a.low <= b.high and b.low <= a.high:
                names += [best, ranked[1]]
        return list(dict.fromkeys(names))

    ranked = rank(timings) or ["float"]
    doubt = close(ranked)
    remeasured = False
    if doubt:
        logger.info("margin: %s within noise, timing again", " and ".join(doubt))
        again = time_candidates(
            baseline,
            {n: models[n] for n in doubt},
            data=data,
            shapes=shapes,
            threads=threads,
            min_rounds=rounds,
            max_rounds=rounds,
        )
        for name in doubt:
            timings[name] = again[name]
        remeasured = True
        ranked = rank(timings) or ["float"]
    best = ranked[0]
    runner = ranked[1] if len(ranked) > 1 else None
    margin = None
    if runner is not None and runner != "float":
        margin = timings[runner].ratio - timings[best].ratio
    elif threshold is not None and best != "float":
        margin = threshold - timings[best].ratio  # how far under the "faster" bar
    return Decision(best, runner, margin, bool(close(ranked)), remeasured)


def check_same_inputs(reference: ir.Model, candidate: ir.Model, name: str) -> None:
    ref = [v.name for v in reference.graph.inputs]
    cand = [v.name for v in candidate.graph.inputs]
    if ref != cand:
        raise OnnxcompError(f"candidate {name}: inputs {cand} differ from the reference's {ref}")
