"""Activation-range calibrators: one interface from calibration statistics to an int8 range per tensor.

Every way of choosing activation ranges is a :class:`Calibrator`: ``ranges(stats)`` reads the
statistics of the calibration data (:class:`~.ranges.ActivationStats`: a min/max pass and a
histogram pass, each run once, when first asked for) and returns ``{tensor: (rmin, rmax)}``.
Whichever calibrator chose them, the ranges reach ONNX Runtime's quantizer the same way, as
``TensorQuantOverrides`` (:func:`.qdq.quantize_qdq`), so the QDQ models of two calibrators differ in
their ranges only. ``OrtCalibrator`` adapts ONNX Runtime's own calibrators to the interface: fed
through the same overrides, its ranges give byte for byte the model ``quantize_static`` writes with
that ``calibrate_method``.

``CALIBRATORS`` maps the names ``--thresholds`` accepts to the classes: the one place a name is read.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from dataclasses import dataclass
from functools import partial
from typing import Callable, ClassVar, Protocol

import numpy as np
import onnx

from ..errors import ConfigError
from . import ranges as R
from .qdq import _quiet_root_logger, _Reader
from .ranges import ActivationStats, Range

__all__ = ["CALIBRATORS", "THRESHOLDS", "ActivationStats", "Calibrator", "MinMax", "Mse", "OrtCalibrator",
           "Percentile", "Trained", "make_calibrator"]


class Calibrator(Protocol):
    """Chooses the int8 range of every activation tensor from the calibration statistics."""

    @property
    def name(self) -> str:  # the --thresholds name, recorded in the report
        ...

    def ranges(self, stats: ActivationStats) -> dict[str, Range]:
        ...


@dataclass(frozen=True)
class MinMax:
    """The full range seen on the calibration data."""

    name: ClassVar[str] = "minmax"

    def ranges(self, stats: ActivationStats) -> dict[str, Range]:
        return dict(stats.minmax())


@dataclass(frozen=True)
class Percentile:
    """Both tails clipped at ``percentile`` of the histogram (zero always inside)."""

    name: ClassVar[str] = "percentile"
    percentile: float = 99.999

    def ranges(self, stats: ActivationStats) -> dict[str, Range]:
        return stats.from_histograms(lambda h: R.percentile_range(h, self.percentile))


@dataclass(frozen=True)
class Mse:
    """The range minimising each tensor's own quantisation error (:func:`.ranges.mse_range`)."""

    name: ClassVar[str] = "mse"

    def ranges(self, stats: ActivationStats) -> dict[str, Range]:
        return stats.from_histograms(R.mse_range)


@dataclass(frozen=True)
class Trained:
    """Thresholds trained through a simulation of ORT's QDQ graph (``trained.py``, needs PyTorch),
    starting from the ``mse`` ranges; ``per_channel``/``exclude_nodes``: the QDQ graph simulated,
    which must be the one that will be written."""

    name: ClassVar[str] = "trained"
    per_channel: bool = True
    exclude_nodes: tuple[str, ...] = ()

    @staticmethod
    def missing() -> str:
        """Why this calibrator cannot run here, or ''."""
        try:
            from . import trained  # noqa: F401
        except ImportError:
            return "trained thresholds need PyTorch (pip install 'onnxprune[torch]')"
        return ""

    def ranges(self, stats: ActivationStats) -> dict[str, Range]:
        from .qdq import quantize_qdq
        from .trained import train_ranges
        say = stats.progress
        say("activation ranges (mse) to start from")
        init = Mse().ranges(stats)
        first, _ = quantize_qdq(stats.model, stats.input_name, stats.batches, thresholds="mse", ranges=init,
                                per_channel=self.per_channel, exclude_nodes=list(self.exclude_nodes))
        say("training activation thresholds")
        trained, notes = train_ranges(stats.model, stats.input_name, stats.batches, init=init, qdq=first,
                                      progress=say)
        stats.notes.extend(notes)
        return trained


@dataclass(frozen=True)
class OrtCalibrator:
    """ONNX Runtime's own calibrator ``method`` (minmax, percentile, entropy: ``create_calibrator`` with
    its ``quantize_static`` defaults), fed our calibration batches one sample at a time.

    The ranges are ORT's ``TensorsData`` after the adjustment its quantizer makes to them
    (``adjust_tensor_ranges``: a Relu/Clip's input takes its output's range, Softmax's output is
    [0, 1]), so that through ``TensorQuantOverrides`` they reproduce ORT's own QDQ model.
    ``exclude_nodes``: nodes ORT's quantizer will leave float (it does not adjust around those).
    Memory: like ``quantize_static``, ORT keeps every calibrated tensor of every sample until the
    pass ends, so this costs what the QDQ export already costs.
    """

    method: str
    exclude_nodes: tuple[str, ...] = ()
    METHODS: ClassVar[tuple[str, ...]] = ("minmax", "percentile", "entropy")

    def __post_init__(self) -> None:
        if self.method not in self.METHODS:
            raise ConfigError(f"ORT calibrators: {', '.join(self.METHODS)}; got {self.method!r}")

    @property
    def name(self) -> str:
        return f"ort-{self.method}"

    def ranges(self, stats: ActivationStats) -> dict[str, Range]:
        stats.progress(f"activation ranges: ONNX Runtime {self.method} calibrator")
        data = self._tensors_data(stats)
        found = {}
        for tensor in sorted(data.data):  # ORT collects them in set order, which varies between processes
            lo, hi = (float(np.asarray(v).reshape(-1)[0]) for v in data.data[tensor].range_value)
            found[tensor] = (lo, hi)
        return _adjusted(stats.model, found, set(self.exclude_nodes))

    def _tensors_data(self, stats: ActivationStats):
        from onnxruntime.quantization import CalibrationMethod
        from onnxruntime.quantization.calibrate import create_calibrator
        from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry
        method = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
                  "entropy": CalibrationMethod.Entropy}[self.method]
        op_types = sorted(set(QLinearOpsRegistry) | set(QDQRegistry))  # what quantize_static calibrates
        with tempfile.TemporaryDirectory() as tmp:
            src = os.path.join(tmp, "float.onnx")
            onnx.save(stats.model, src)
            with _quiet_root_logger():
                calibrator = create_calibrator(src, op_types, augmented_model_path=os.path.join(tmp, "aug.onnx"),
                                               calibrate_method=method)
                calibrator.collect_data(_Reader(stats.input_name, stats.batches))
                data = calibrator.compute_data()
            del calibrator  # its session holds the augmented model file open
        return data


def _adjusted(model: onnx.ModelProto, found: dict[str, Range], excluded: set[str]) -> dict[str, Range]:
    """ORT's ``BaseQuantizer.adjust_tensor_ranges`` on ``found`` (see :class:`OrtCalibrator`)."""
    readers: dict[str, int] = {}
    for node in model.graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    out = dict(found)
    for node in model.graph.node:
        if node.name in excluded:
            continue
        if node.op_type in ("Clip", "Relu"):
            if readers.get(node.input[0]) == 1 and node.input[0] in out and node.output[0] in out:
                out[node.input[0]] = out[node.output[0]]
        elif node.op_type == "Softmax":
            out[node.output[0]] = (0.0, 1.0)
    return out


# --thresholds NAME -> calibrator. The order is the CLI's.
CALIBRATORS: dict[str, Callable[..., Calibrator]] = {
    "mse": Mse,
    "minmax": MinMax,
    "percentile": Percentile,
    "ort-minmax": partial(OrtCalibrator, "minmax"),
    "ort-percentile": partial(OrtCalibrator, "percentile"),
    "ort-entropy": partial(OrtCalibrator, "entropy"),
    "trained": Trained,
}
THRESHOLDS = tuple(CALIBRATORS)
ORT_CALIBRATORS = ("ort-minmax", "ort-percentile", "ort-entropy")


def make_calibrator(name: str, **settings) -> Calibrator:
    """The calibrator called ``name``, given those of ``settings`` it takes (``per_channel``,
    ``exclude_nodes``: the QDQ graph it will be used for)."""
    if name not in CALIBRATORS:
        raise ConfigError(f"--thresholds must be one of {', '.join(THRESHOLDS)}, got {name!r}")
    factory = CALIBRATORS[name]
    taken = {f.name for f in dataclasses.fields(getattr(factory, "func", factory))}
    return factory(**{k: v for k, v in settings.items() if k in taken})


def missing(name: str) -> str:
    """Why calibrator ``name`` cannot run here (a missing optional dependency), or ''."""
    factory = CALIBRATORS.get(name)
    check = getattr(getattr(factory, "func", factory), "missing", None)
    return check() if check is not None else ""
