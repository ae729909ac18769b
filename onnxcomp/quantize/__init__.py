"""Quantization: calibration observers, scale/zero-point schemes, solvers, placement."""
