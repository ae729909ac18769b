"""Pruning: scores and masks (numerics), unstructured pruning with layer-wise reconstruction,
structured channel pruning over dependency groups."""

# Registers the recipe step "prune".
from onnxcomp.prune import api as _api  # noqa: E402,F401
