"""The former home of model comparison; everything now lives in :mod:`onnxcomp.evaluate`."""

from onnxcomp.evaluate import (  # noqa: F401
    DROP_NAMES,
    Comparison,
    Evaluation,
    Metric,
    OutputStats,
    ReferenceOutputs,
    UserMetric,
    Verdict,
    check_metric,
    compare,
    default_budget,
    evaluate,
    is_classifier_output,
    load_metric,
    reference_outputs,
)
