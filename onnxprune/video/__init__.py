"""Early exit on static frames (AmphibianDetector-style) for detectors on fixed cameras.

``gate`` cuts a detector after an early feature map and wraps the rest in an ``If`` that runs only when
those features moved against a background model carried as state (``passes/gate.py`` is the rewrite,
``calibrate.py`` chooses the cut and the threshold). ``GatedDetector`` runs the result frame by frame with
its state kept inside; ``run_video`` is ``onnxprune video``; ``synthetic`` makes test sequences.
"""

from .calibrate import GateOptions, GateReport, GateResult, gate
from .run import VideoReport, run_video
from .runtime import Detector, FrameResult, GatedDetector, GateInfo, GateState, read_frames
from .synthetic import LEVELS, NoiseLevel, SyntheticSequence, sequence

__all__ = ["Detector", "FrameResult", "GateInfo", "GateOptions", "GateReport", "GateResult", "GateState",
           "GatedDetector", "LEVELS", "NoiseLevel", "SyntheticSequence", "VideoReport", "gate", "read_frames",
           "run_video", "sequence"]
