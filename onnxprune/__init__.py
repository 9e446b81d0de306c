"""onnxprune: structured channel pruning of ONNX graphs for CPU deployment of face models.

Python API::

    import onnx, onnxprune
    calibration = onnxprune.load_calibration("photos/", onnx.load("retinaface.onnx"), preset="retinaface")
    result = onnxprune.slim("retinaface.onnx", ratio=0.5, calibration=calibration)
    result.save("retinaface.slim.onnx")
    print(result.report.summary())
    int8 = onnxprune.quantize(result.model, calibration)
    int8.save("retinaface.slim.int8.onnx")
"""

__version__ = "0.1.0"


def _map_source_folders() -> None:
    """In a source checkout, ``onnxprune.passes`` and ``onnxprune.sample_models`` live in the top-level
    ``passes/`` and ``sample_models/`` folders, which pyproject maps only when installing. Python run
    from the repository root imports this source tree first (even over an installed copy), so map the
    two folders here: the package imports the same wherever it is run from."""
    import os
    here = os.path.dirname(os.path.abspath(__file__))
    root = os.path.dirname(here)
    if not os.path.isdir(os.path.join(here, "passes")) and os.path.isfile(os.path.join(root, "passes", "__init__.py")):
        __path__.append(root)  # noqa: F821 - the package's own search path


_map_source_folders()

from .errors import ConfigError, ModelLoadError, NothingToPruneError, OnnxPruneError, VerificationError  # noqa: E402
from .pipeline import SlimResult, analyze, slim  # noqa: E402
from .calibration import PRESETS, CalibrationSet, Preprocess, load_calibration, load_identities  # noqa: E402
from .int8 import QuantizeResult, quantize  # noqa: E402
from . import video  # noqa: E402  - onnxprune.video.GatedDetector, onnxprune.gate
from .video import GateResult, gate  # noqa: E402

__all__ = [
    "__version__", "slim", "analyze", "SlimResult", "quantize", "QuantizeResult", "load_calibration",
    "load_identities", "CalibrationSet", "Preprocess", "PRESETS", "OnnxPruneError", "ModelLoadError", "ConfigError",
    "NothingToPruneError", "VerificationError", "gate", "GateResult", "video",
]
