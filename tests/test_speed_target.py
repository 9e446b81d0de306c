"""`slim --speedup`: the latency budget, staged pruning and their reports, under a fake cost model.

The fake prices a layer by its multiply-accumulates (deterministic, no timing), so the tests check
the allocation and the pipeline, not this machine's speed: the measured cost model has its own
tests (test_latency_table.py) and its accuracy is a benchmark (benchmarks/speed_target.py).
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest

import onnxprune
from onnxprune.allocation import allocate
from onnxprune.budget.speed import LatencyCounter, weighted_layers
from onnxprune.budget.target import SpeedTarget, auto_stages
from onnxprune.calibration import CalibrationSet
from onnxprune.channels.analysis import analyze_channels
from onnxprune.cli import main
from onnxprune.errors import ConfigError, TargetUnreachableError
from onnxprune.pipeline import prepare
from onnxprune.sample_models.generate import GENERATED, NOMINAL_INPUT

FIXED_MS = 1.0  # what the fake says the rest of the graph costs


def FAKE(speedup: float) -> SpeedTarget:  # noqa: N802
    """A target for the fake cost model: no re-allocation on measurement (its predictions are not times)."""
    return SpeedTarget(speedup, retries=0)


class MacCost:
    """Latency proportional to each weighted layer's MACs at its output size (a stand-in for the LUT)."""

    def __init__(self, model: ir.Model, shapes: dict[str, tuple[int, ...]], per_mac_ms: float = 1e-6) -> None:
        self.spatial, self.widths, self.depthwise = {}, {}, set()
        for layer in weighted_layers(model):
            node = next(n for n in model.graph if n.name == layer.node)
            w = node.inputs[1].const_value.shape
            out = shapes.get(node.outputs[0].name, ())
            self.spatial[layer.node] = int(np.prod(out[2:])) * int(np.prod(w[2:])) if len(out) > 2 else 1
            c_out = w[layer.out_axis]
            self.widths[layer.node] = (c_out, c_out) if layer.depthwise else (w[layer.in_axis] * layer.group, c_out)
            if layer.depthwise:
                self.depthwise.add(layer.node)
        self.per_mac = per_mac_ms
        self.reference_ms = self.predict({})
        self.calls = 0

    def layer_ms(self, node: str, widths: tuple[int, int]) -> float:
        c_in, c_out = widths
        macs = c_out if node in self.depthwise else c_in * c_out
        return macs * self.spatial.get(node, 1) * self.per_mac

    def predict(self, widths) -> float:
        full = {**self.widths, **widths}
        return FIXED_MS + sum(self.layer_ms(n, w) for n, w in full.items() if n in self.spatial)

    def saving(self, node: str, old, new) -> float:
        self.calls += 1
        return self.layer_ms(node, old) - self.layer_ms(node, new) if node in self.spatial else 0.0


SMALL = 160  # detectors are analysed at 160x160 here: the same graph, a fraction of the time


def _shape(name: str) -> tuple[int, ...]:
    shape = NOMINAL_INPUT[name]
    return (*shape[:2], SMALL, SMALL) if shape[2] > SMALL else shape


def _shapes(name: str) -> dict[str, tuple[int, ...]]:
    return {GENERATED[name]().graph.input[0].name: _shape(name)}


def _prepared(name: str):
    prep = prepare(GENERATED[name](), input_shapes=_shapes(name), progress=lambda *a: None)
    return prep, analyze_channels(prep.model, prep.shapes)


def _cost_for(name: str) -> MacCost:
    prep, _ = _prepared(name)
    return MacCost(prep.model, prep.shapes)


def _calibration(name: str, n: int = 16) -> CalibrationSet:
    model = GENERATED[name]()
    shape = list(_shape(name))
    shape[0] = n
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    return CalibrationSet(model.graph.input[0].name, [x])


@pytest.mark.parametrize("name,speedup", [("retinaface", 2.0), ("mobilefacenet", 1.5), ("scrfd", 3.0)])
def test_latency_allocation_meets_its_budget_and_is_deterministic(name: str, speedup: float) -> None:
    prep, analysis = _prepared(name)
    cost = MacCost(prep.model, prep.shapes)
    scores = {u: float((u * 7919) % 101) for u in analysis.units}
    runs = []
    for _ in range(2):
        counter = LatencyCounter(prep.model, analysis, cost)
        assert counter.total == pytest.approx(cost.reference_ms)  # nothing removed: the reference
        need = counter.total - cost.reference_ms / speedup
        alloc = allocate(analysis, scores, need, round_to=8, min_keep_frac=0.1, budget=counter)
        runs.append((sorted(alloc.removed), counter.predicted_ms()))
        assert cost.reference_ms / counter.predicted_ms() >= speedup  # the floor is met
        assert alloc.params_removed == pytest.approx(counter.total - counter.predicted_ms())  # ms saved, exactly
    assert runs[0] == runs[1]


def test_latency_budget_spends_where_time_is_not_where_parameters_are() -> None:
    """The parameter budget prunes the late, wide layers; the latency budget must reach the early,
    high-resolution ones, which hold few parameters and most of the time."""
    prep, analysis = _prepared("retinaface")
    cost = MacCost(prep.model, prep.shapes)
    scores = {u: 1.0 for u in analysis.units}
    counter = LatencyCounter(prep.model, analysis, cost)
    by_time = allocate(analysis, scores, counter.total * 0.4, round_to=8, budget=counter)
    by_params = allocate(analysis, scores, 0.4 * analysis.total_params(), round_to=8,
                         tolerance=int(0.01 * analysis.total_params()))

    def share_of_time_saved(removed: set[int]) -> float:
        c = LatencyCounter(prep.model, analysis, cost)
        c.remove(sorted(removed))
        return 1 - c.predicted_ms() / c.total

    assert share_of_time_saved(by_time.removed) > share_of_time_saved(by_params.removed)


def test_widths_follow_removed_units() -> None:
    prep, analysis = _prepared("mobilefacenet")
    cost = MacCost(prep.model, prep.shapes)
    counter = LatencyCounter(prep.model, analysis, cost)
    assert counter.widths == {n: w for n, w in cost.widths.items()}
    group = next(g for g in analysis.groups if all(analysis.units[u].prunable for u in g.units) and len(g.units) >= 4)
    gone = group.units[:2]
    counter.remove(gone)
    pruned, _ = onnxprune.passes.remove_channels(prep.model, analysis, set(gone))
    for layer in weighted_layers(pruned):  # the counter's widths are the pruned model's real widths
        w = next(n for n in pruned.graph if n.name == layer.node).inputs[1].const_value.shape
        c_out = w[layer.out_axis]
        real = (c_out, c_out) if layer.depthwise else (w[layer.in_axis] * layer.group, c_out)
        assert counter.widths[layer.node] == real, layer.node


def test_slim_speedup_reports_prediction_and_measurement() -> None:
    model = GENERATED["scrfd"]()
    result = onnxprune.slim(model, speedup=FAKE(2.0), cost_model=_cost_for("scrfd"), input_shapes=_shapes("scrfd"),
                            progress=lambda *a: None)
    speed = result.report.speed
    assert speed is not None and speed.target == 2.0
    assert speed.predicted >= 2.0 * 0.99
    assert speed.measured is not None and speed.measured > 0 and speed.compressed_ms > 0
    assert result.report.params_after < result.report.params_before
    onnx.checker.check_model(result.model)
    assert [i.name for i in result.model.graph.input] == [i.name for i in model.graph.input]
    assert "predicted" in result.report.summary() and "(speed target)" in result.report.summary()


def test_staged_speedup_reaches_each_stage_target_and_reports_fidelity() -> None:
    model = GENERATED["scrfd"]()
    result = onnxprune.slim(model, speedup=FAKE(3.0), stages=2, round_to=8, cost_model=_cost_for("scrfd"),
                            input_shapes=_shapes("scrfd"), calibration=_calibration("scrfd"), task="outputs",
                            progress=lambda *a: None)
    stages = result.report.speed.stages
    assert [s.stage for s in stages] == [1, 2]
    assert stages[0].target == pytest.approx(3.0 ** 0.5) and stages[1].target == pytest.approx(3.0)
    assert all(s.predicted_speedup >= s.target * 0.99 for s in stages)
    assert stages[0].params > stages[1].params
    assert all(s.fidelity_value is not None for s in stages)
    onnx.checker.check_model(result.model)


def test_staging_is_not_worse_than_one_shot_held_out() -> None:
    """On the generated MobileFaceNet with held-out random inputs: two refitted stages keep the
    embedding at least as close to the original as one cut of the same size."""
    model, calib = GENERATED["mobilefacenet"](), _calibration("mobilefacenet", 32)
    kw = dict(calibration=calib, task="embedding", round_to=4, progress=lambda *a: None)
    one = onnxprune.slim(model, 0.5, **kw).fidelity
    two = onnxprune.slim(model, 0.5, stages=2, **kw).fidelity
    assert two.headline()[1] >= one.headline()[1] - 1e-3


def test_unreachable_target_warns_or_fails_strictly() -> None:
    model = GENERATED["scrfd"]()
    kw = dict(cost_model=_cost_for("scrfd"), input_shapes=_shapes("scrfd"), progress=lambda *a: None)
    result = onnxprune.slim(model, speedup=FAKE(50.0), **kw)
    assert any("out of reach" in w for w in result.report.warnings)
    assert result.report.speed.predicted < 50
    with pytest.raises(TargetUnreachableError, match="nothing written"):
        onnxprune.slim(model, speedup=SpeedTarget(50.0, strict=True, retries=0), **kw)


def test_cli_strict_unreachable_writes_nothing_and_exits_1(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("ONNXPRUNE_CACHE_DIR", str(tmp_path / "cache"))
    src = tmp_path / "m.onnx"
    onnx.save(GENERATED["se-block"](), str(src))
    out = tmp_path / "out.onnx"
    assert main(["slim", str(src), "--speedup", "50", "--strict", "-o", str(out), "-q"]) == 1
    assert not out.exists()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("onnxprune: error: --speedup 50 is out of reach")


@pytest.mark.parametrize("argv,message", [
    (["--ratio", "0.5", "--speedup", "2"], "not allowed with argument"),
    (["--speedup", "0.5"], "--speedup must be a number above 1"),
    (["--speedup", "2", "--stages", "0"], "--stages must be an integer from 1 to 10"),
    (["--ratio", "0.5", "--strict"], "--strict only applies with --speedup"),
])
def test_cli_refuses_bad_speed_options(tmp_path: Path, capsys, argv: list[str], message: str) -> None:
    src = tmp_path / "m.onnx"
    onnx.save(GENERATED["se-block"](), str(src))
    with pytest.raises(SystemExit) if "not allowed" in message else nullcontext():
        code = main(["slim", str(src), *argv, "-o", str(tmp_path / "o.onnx"), "-q"])
        assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o.onnx").exists()


def test_options_are_validated() -> None:
    with pytest.raises(ConfigError, match="exactly one"):
        onnxprune.slim(GENERATED["se-block"](), 0.5, speedup=2.0)
    with pytest.raises(ConfigError, match="exactly one"):
        onnxprune.slim(GENERATED["se-block"]())
    assert [auto_stages(s) for s in (1.5, 2.0, 3.0, 4.0, 5.0)] == [1, 1, 2, 2, 3]
    assert SpeedTarget(4.0).stage_targets(2) == pytest.approx([2.0, 4.0])


def test_float_speed_target_rewrites_prelu_exactly_and_the_plan_replays_it() -> None:
    """ORT's float PRelu is slow: a float speed target first rewrites it as Max(y, a·y) (exact), and the
    plan records that rewrite so apply-plan reproduces the same bytes."""
    from onnxprune.plan import apply_plan

    model = GENERATED["mobilefacenet"]()
    assert any(n.op_type == "PRelu" for n in model.graph.node)
    result = onnxprune.slim(model, speedup=FAKE(1.2), round_to=4, cost_model=_cost_for("mobilefacenet"),
                            progress=lambda *a: None)
    assert not any(n.op_type == "PRelu" for n in result.model.graph.node)
    assert result.report.speed.rewrites and result.plan.rewrites == ("prelu-max",)
    assert result.report.params_after < result.report.params_before
    replayed = apply_plan(model, result.plan, progress=lambda *a: None)
    assert replayed.model.SerializeToString() == result.model.SerializeToString()


def test_measured_retry_bisects_to_the_target_when_the_cost_model_is_off(monkeypatch) -> None:
    """The cost model predicts half the real gain (as on small, overhead-bound models): re-allocations
    on the measured speed-up (faked here: measured = predicted squared) bring it back near the target."""
    import onnxprune.pipeline as pipeline

    def fake_measure(ctx, prep, stage, target):
        return (cost.reference_ms / stage.predicted_ms) ** 2

    cost = _cost_for("scrfd")
    monkeypatch.setattr(pipeline, "_measure", fake_measure)
    result = onnxprune.slim(GENERATED["scrfd"](), speedup=SpeedTarget(2.0, retries=3), stages=1, round_to=8,
                            cost_model=cost, input_shapes=_shapes("scrfd"), progress=lambda *a: None)
    speed = result.report.speed
    assert speed.retarget is not None and speed.retarget < 2.0  # re-allocated for a smaller prediction
    assert abs(speed.predicted ** 2 / 2.0 - 1) <= 0.25  # what the fake measurement would read: near 2x
    no_retry = onnxprune.slim(GENERATED["scrfd"](), speedup=FAKE(2.0), stages=1, round_to=8, cost_model=cost,
                              input_shapes=_shapes("scrfd"), progress=lambda *a: None)
    assert no_retry.report.params_after < result.report.params_after  # the retry pruned less
