"""Static int8 quantization (QDQ, written by ONNX Runtime's quantizer) with ranges chosen here."""

from .calibrators import CALIBRATORS, THRESHOLDS, Calibrator, make_calibrator
from .qdq import (QuantizeRecord, check_not_quantized, int8_kernels, is_int8_kernel, pre_process,
                  quantize_qdq, to_opset13)

__all__ = ["CALIBRATORS", "THRESHOLDS", "Calibrator", "QuantizeRecord", "check_not_quantized", "int8_kernels",
           "is_int8_kernel", "make_calibrator", "pre_process", "quantize_qdq", "to_opset13"]
