"""--max-drop for pruning: the judge and the bisection fallback, on onnxcomp.search (shared by
the unstructured and structured paths)."""

from __future__ import annotations

from typing import Any

import onnx_ir as ir

from onnxcomp import search
from onnxcomp.data import DataSource
from onnxcomp.errors import OnnxcompError


class BudgetError(OnnxcompError):
    """--max-drop cannot be met: nothing is written (exit 1)."""


def make_judge(reference: ir.Model, judge_data: DataSource, options: Any) -> search.Judge:
    """The drop of a candidate against ``reference`` on ``judge_data``, held to ``--max-drop``."""
    return search.Judge.from_options(reference, judge_data, options, options.max_drop)


def fall_back(first_build, order, build, judge, options, what: str):
    """Bisect over ``order`` (most sensitive first) for the fewest names to spare so that the
    drop holds ``--max-drop`` (the search module's fallback); returns the result and the
    report's ``check`` (the comparison, the verdict, the rounds)."""
    verdict, comparison = judge(first_build.model)
    result = search.bisect_fallback(search.Fallback(order, build), judge, (first_build, verdict, comparison))
    if not result.verdict.passed:
        raise BudgetError(
            f"--max-drop {options.max_drop}: the drop stays {result.verdict.drop:.4f} "
            f"({result.verdict.metric}) even with the most sensitive {what} spared; nothing saved"
        )
    check = result.comparison.to_json()
    check.update(
        data=result.comparison.data,
        drop=result.verdict.drop,
        drop_metric=result.verdict.metric,
        verdict=result.verdict.to_json(),
        rounds=[{"spared": r["float_layers"], "drop": r["drop"]} for r in result.history],
    )
    return result, check
