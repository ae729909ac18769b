"""Transfer learning and distillation: cut a pretrained ONNX model, train a new head in numpy,
splice it on as ONNX nodes; copy or re-initialise weights; distil a teacher into a student."""

from onnxcomp.transfer.api import FitOptions, FitResult, fit
from onnxcomp.transfer.cuts import Cut, extract, find_cuts, resolve_cut
from onnxcomp.transfer.heads import Head, HeadOptions, Targets, train_head
from onnxcomp.transfer.splice import splice

__all__ = [
    "Cut",
    "FitOptions",
    "FitResult",
    "Head",
    "HeadOptions",
    "Targets",
    "extract",
    "find_cuts",
    "fit",
    "resolve_cut",
    "splice",
    "train_head",
]

from onnxcomp.transfer import passes as _passes  # noqa: E402,F401  (registers the recipe steps)
