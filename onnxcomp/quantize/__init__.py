"""Quantization: calibration observers, scale/zero-point schemes, solvers, placement."""

# Registers the recipe step "quantize" (auto / static / dynamic / weight-only).
from onnxcomp.quantize import api as _api  # noqa: E402,F401
