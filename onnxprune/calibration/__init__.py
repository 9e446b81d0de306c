"""Calibration data for pruning saliency and quantization: images or arrays in the model's input format."""

from .data import PRESETS, CalibrationSet, Preprocess, load_calibration, load_identities, parse_floats, parse_size

__all__ = ["PRESETS", "CalibrationSet", "Preprocess", "load_calibration", "load_identities", "parse_floats", "parse_size"]
