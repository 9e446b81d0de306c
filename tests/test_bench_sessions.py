"""One session builder (graph/runtime.session) serves the pipeline, bench's timing sessions and the
latency table: each caller still gets the ONNX Runtime options it always had."""

from __future__ import annotations

from pathlib import Path

import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from onnxprune import bench
from onnxprune.budget.latency import LatencyTarget
from onnxprune.errors import ModelLoadError
from onnxprune.graph import runtime

SPIN = "session.intra_op.allow_spinning"


@pytest.fixture()
def opened(monkeypatch) -> list[dict]:
    """What every session would be opened with (no session is made)."""
    seen: list[dict] = []

    def record(source, opts, providers=None):
        try:
            spin = opts.get_session_config_entry(SPIN)
        except RuntimeError:  # ORT raises when the entry was never set
            spin = None
        seen.append({"bytes": isinstance(source, bytes), "intra": opts.intra_op_num_threads,
                     "inter": opts.inter_op_num_threads, "level": opts.graph_optimization_level,
                     "log": opts.log_severity_level, "spin": spin, "optimized": opts.optimized_model_filepath,
                     "profiling": opts.enable_profiling, "prefix": opts.profile_file_prefix, "providers": providers})

    monkeypatch.setattr(ort, "InferenceSession", record)
    return seen


@pytest.fixture(scope="module")
def model():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    return helper.make_model(helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y]))


def test_pipeline_sessions(opened: list[dict], model) -> None:
    runtime.session(model)
    runtime.session(model, 2, optimize=False)
    default, pinned = opened
    assert default["intra"] == 0 and default["inter"] == 0 and default["spin"] is None  # ORT's own defaults
    assert default["level"] == ort.GraphOptimizationLevel.ORT_ENABLE_ALL and default["log"] == 3
    assert default["providers"] == ["CPUExecutionProvider"] and default["bytes"]
    assert (pinned["intra"], pinned["inter"], pinned["spin"]) == (2, 1, None)  # spinning is only turned off to time
    assert pinned["level"] == ort.GraphOptimizationLevel.ORT_DISABLE_ALL


def test_timing_sessions(opened: list[dict], model, tmp_path: Path) -> None:
    bench._session(model, "CPUExecutionProvider", 1, None, "m")
    bench._session(model, "CPUExecutionProvider", 4, str(tmp_path / "opt.onnx"), "m")
    LatencyTarget(threads=2).session(model, profile_dir=str(tmp_path))
    one, four, layer = opened
    assert (one["intra"], one["inter"], one["spin"], one["optimized"]) == (1, 1, None, "")
    assert (four["intra"], four["inter"], four["spin"]) == (4, 1, "0") and four["optimized"].endswith("opt.onnx")
    assert (layer["intra"], layer["inter"], layer["spin"], layer["profiling"]) == (2, 1, "0", True)
    assert layer["prefix"] == str(tmp_path / "layer") and layer["level"] == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    assert all(s["bytes"] and s["log"] == 3 and s["providers"] == ["CPUExecutionProvider"] for s in opened)


def test_a_model_ort_cannot_load_is_a_model_load_error(model) -> None:
    broken = helper.make_model(helper.make_graph([helper.make_node("NoSuchOp", ["x"], ["y"])], "g",
                                                 list(model.graph.input), list(model.graph.output)))
    with pytest.raises(ModelLoadError, match="cannot load broken with CPUExecutionProvider"):
        bench._session(broken, "CPUExecutionProvider", 1, None, "broken")
