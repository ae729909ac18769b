"""onnxcomp: compress and adapt ONNX models, with onnxruntime as the judge."""

from onnxcomp.errors import OnnxcompError

__version__ = "0.1.0"

__all__ = ["OnnxcompError", "__version__"]
