"""Quantization: calibration observers, scale/zero-point schemes, reconstruction solvers and placement."""
