"""Static int8 quantization (QDQ, written by ONNX Runtime's quantizer) with ranges chosen here."""

from .qdq import (THRESHOLDS, QuantizeRecord, check_not_quantized, int8_kernels, is_int8_kernel, pre_process,
                  quantize_qdq, to_opset13)

__all__ = ["THRESHOLDS", "QuantizeRecord", "check_not_quantized", "int8_kernels", "is_int8_kernel", "pre_process", "quantize_qdq",
           "to_opset13"]
