"""Static int8 quantization: our activation ranges, ONNX Runtime's quantizer writes the QDQ graph.

Weights are int8, symmetric, per output channel; activations are uint8 asymmetric, which is what
ONNX Runtime's x86 kernels fuse (int8 activations are not fused there and run slower than fp32).
The graph is first brought to opset 13 or later and run through ORT's ``quant_pre_process``
(shape inference and optimisation), as its quantizer expects.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import onnx

from ..errors import ConfigError
from ..graph.shapes import graph_inputs
from ..progress import Progress, quiet
from . import ranges as R
from .ranges import activation_tensors  # noqa: F401 - re-exported: it lived here

QUANTIZED_OPS = {"QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul", "ConvInteger",
                 "MatMulInteger", "DynamicQuantizeLinear", "QGemm", "QLinearAdd"}


def is_int8_kernel(op_type: str) -> bool:
    """Op types of ORT's optimised graph that compute in int8 (QLinearConv, ConvInteger...)."""
    return op_type.startswith("QLinear") or op_type.endswith("Integer")


@dataclass
class QuantizeRecord:
    thresholds: str
    ranges: dict[str, tuple[float, float]] = field(default_factory=dict)
    excluded_nodes: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def check_not_quantized(model: onnx.ModelProto, verb: str = "quantize") -> None:
    """Refuse int8 graphs (QDQ or QOperator): re-quantizing or pruning them needs the float original."""
    found = sorted({n.op_type for n in model.graph.node if n.op_type in QUANTIZED_OPS or is_int8_kernel(n.op_type)})
    if found:
        shown = ", ".join(found[:4]) + (", ..." if len(found) > 4 else "")
        raise ConfigError(f"the model is already quantized ({shown}); {verb} its float original")


def check_float32(model: onnx.ModelProto) -> None:
    """ORT's quantizer calibrates float32 graphs; on fp16 ones it mixes casts into a slower, odd model."""
    halves = {onnx.TensorProto.FLOAT16: "float16", onnx.TensorProto.BFLOAT16: "bfloat16"}
    types = [i.type.tensor_type.elem_type for i in graph_inputs(model)] + [t.data_type for t in model.graph.initializer]
    found = {halves[t] for t in types if t in halves}
    if found:
        raise ConfigError(f"int8 quantization needs a float32 model, this one is {'/'.join(sorted(found))}; "
                          "quantize its float32 export")


def to_opset13(model: onnx.ModelProto) -> onnx.ModelProto:
    """ORT's quantizer needs opset >= 13; convert older graphs first."""
    version = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 13)
    if version >= 13:
        return model
    try:
        return onnx.version_converter.convert_version(model, 13)
    except Exception as exc:  # the converter raises several types
        raise ConfigError(f"cannot convert the model from opset {version} to 13 for quantization: "
                          f"{str(exc).splitlines()[0][:150]}") from None


def pre_process(model: onnx.ModelProto) -> onnx.ModelProto:
    """ORT's recommended pre-processing (symbolic shape inference + graph optimisation)."""
    from onnxruntime.quantization.shape_inference import quant_pre_process
    with tempfile.TemporaryDirectory() as tmp:
        src, out = Path(tmp) / "in.onnx", Path(tmp) / "pre.onnx"
        # By path, not as a ModelProto: given a proto, ORT moves its weights to placeholder external
        # data in place, which breaks its own optimiser (Resize scales) and every later use of the proto.
        onnx.save(model, str(src))
        for kwargs in ({}, {"skip_symbolic_shape": True}, {"skip_optimization": True, "skip_symbolic_shape": True}):
            try:
                with _working_dir(tmp):  # a failed symbolic shape inference dumps its model into the cwd
                    quant_pre_process(str(src), str(out), **kwargs)
                return onnx.load(str(out))
            except Exception:  # fall back to less ambitious pre-processing
                continue
    return model


@contextlib.contextmanager
def _working_dir(path: str):
    """Run inside ``path`` (ORT writes sym_shape_infer_temp.onnx and a .data file to the cwd)."""
    previous = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(previous)


def compute_ranges(model: onnx.ModelProto, input_name: str, batches: Sequence[np.ndarray], method: str,
                   progress: Progress | None = None) -> dict[str, tuple[float, float]]:
    """Per-tensor (rmin, rmax) by the calibrator ``method`` (``calibrators.CALIBRATORS``), over ``batches``."""
    from .calibrators import make_calibrator
    stats = R.ActivationStats(model, input_name, batches, progress or quiet)
    return make_calibrator(method).ranges(stats)


def decode_tail(model: onnx.ModelProto) -> list[str]:
    """Names of Exp nodes and of every node downstream of one: box decoding inside the graph
    (UltraFace's size = prior * exp(0.2 * loc), YOLO-style heads). Its values span orders of magnitude,
    which one int8 scale cannot hold, and it costs next to nothing in float."""
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    tail, todo = {}, [n for n in model.graph.node if n.op_type == "Exp"]
    while todo:
        node = todo.pop()
        if id(node) not in tail:
            tail[id(node)] = node
            todo += [r for out in node.output for r in readers.get(out, [])]
    return [n.name for n in model.graph.node if id(n) in tail and n.name]


def _finite(model: onnx.ModelProto, ranges: dict[str, tuple[float, float]]
            ) -> tuple[dict[str, tuple[float, float]], list[str]]:
    """(finite ranges, nodes that produce or read a tensor without one): int8 cannot represent inf, and
    ORT would turn such a range into a NaN scale that poisons every output downstream."""
    bad = {n for n, (lo, hi) in ranges.items() if not (np.isfinite(lo) and np.isfinite(hi))}
    nodes = [n.name for n in model.graph.node if n.name and bad & (set(n.input) | set(n.output))]
    return {n: r for n, r in ranges.items() if n not in bad}, nodes


class _Reader:
    """ORT CalibrationDataReader over our batches (ORT's own calibrators use it)."""

    def __init__(self, input_name: str, batches: Sequence[np.ndarray]) -> None:
        # One sample per call: ORT's histogram calibrators cannot merge batches of different sizes.
        items = [b[i:i + 1] for b in batches for i in range(len(b))]
        self._it = iter([{input_name: x} for x in items])

    def get_next(self):
        return next(self._it, None)

    def rewind(self) -> None:  # pragma: no cover - some ORT versions call it
        pass


def quantize_qdq(model: onnx.ModelProto, input_name: str, batches: Sequence[np.ndarray], *, thresholds: str = "mse",
                 ranges: dict[str, tuple[float, float]] | None = None, per_channel: bool = True,
                 exclude_nodes: Sequence[str] = (), progress: Progress | None = None
                 ) -> tuple[onnx.ModelProto, QuantizeRecord]:
    """QDQ int8 model from a float ``model`` (already pre-processed) and calibration ``batches``.

    ``ranges``: (rmin, rmax) per activation tensor, handed to ORT's quantizer as ``TensorQuantOverrides``;
    when None, those of the calibrator ``thresholds`` (its name is recorded either way).
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    record = QuantizeRecord(thresholds, excluded_nodes=list(exclude_nodes))
    if ranges is None:
        ranges = compute_ranges(model, input_name, batches, thresholds, progress)
    ranges, unbounded = _finite(model, ranges)
    exclude_nodes = [*exclude_nodes, *unbounded]
    if unbounded:
        record.excluded_nodes = list(exclude_nodes)
        record.notes.append(f"{len(unbounded)} nodes kept in float: their activations reach inf or NaN on the "
                            "calibration data, which no int8 range can hold")
    record.ranges = ranges
    extra: dict = {"ActivationSymmetric": False, "WeightSymmetric": True,
                   "TensorQuantOverrides": {n: [{"rmin": np.float32(lo), "rmax": np.float32(hi)}]
                                            for n, (lo, hi) in ranges.items()}}
    with tempfile.TemporaryDirectory() as tmp:
        src, out = os.path.join(tmp, "float.onnx"), os.path.join(tmp, "q.onnx")
        onnx.save(model, src)  # ORT's calibrator reloads the model by path; an in-memory proto trips it
        with _quiet_root_logger():  # ORT logs per-tensor chatter on the root logger
            # ORT calibrates min/max of every tensor first; the overrides replace what they name.
            quantize_static(src, out, _Reader(input_name, batches), quant_format=QuantFormat.QDQ,
                            per_channel=per_channel, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            nodes_to_exclude=list(exclude_nodes), calibrate_method=CalibrationMethod.MinMax,
                            extra_options=extra)
        return _sorted(onnx.load(out)), record


def _sorted(model: onnx.ModelProto) -> onnx.ModelProto:
    """ORT's quantizer orders nodes ignoring what If/Loop bodies read from the outer graph: re-sort."""
    if not any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in model.graph.node
               for a in n.attribute):
        return model
    import onnx_ir as ir
    from onnx_ir.passes.common import TopologicalSortPass
    return ir.to_proto(TopologicalSortPass()(ir.from_proto(model)).model)


@contextlib.contextmanager
def _quiet_root_logger():
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # and prints calibration progress to stdout
            yield
    finally:
        root.setLevel(level)


def int8_kernels(model: onnx.ModelProto) -> dict[str, int]:
    """Op types of ORT's optimised CPU graph: shows whether int8 kernels (QLinearConv...) are used."""
    import onnxruntime as ort
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "opt.onnx")
        opts = ort.SessionOptions()
        opts.optimized_model_filepath = path
        opts.log_severity_level = 3
        ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        optimized = onnx.load(path)
    return dict(Counter(n.op_type for n in optimized.graph.node).most_common())
