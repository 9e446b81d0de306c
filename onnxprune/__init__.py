"""onnxprune: structured channel pruning of ONNX graphs for CPU deployment of face models.

Python API::

    import onnxprune
    result = onnxprune.slim("retinaface.onnx", ratio=0.5)
    result.save("retinaface.slim.onnx")
    print(result.report.summary())
"""

__version__ = "0.1.0"

from .errors import ConfigError, ModelLoadError, NothingToPruneError, OnnxPruneError, VerificationError  # noqa: E402
from .pipeline import SlimResult, analyze, slim  # noqa: E402

__all__ = [
    "__version__", "slim", "analyze", "SlimResult", "OnnxPruneError", "ModelLoadError", "ConfigError",
    "NothingToPruneError", "VerificationError",
]
