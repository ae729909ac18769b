"""Auto-tuning: search whole-model compression recipes within a metric budget (``onnxcomp tune``)."""

from onnxcomp.tune.api import (
    NoSolution,
    TuneOptions,
    TuneResult,
    pareto_table,
    parse_duration,
    plot,
    tune,
)

__all__ = ["NoSolution", "TuneOptions", "TuneResult", "parse_duration", "pareto_table", "plot", "tune"]
