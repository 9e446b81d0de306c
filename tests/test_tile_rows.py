"""Row tiling: the strips must reproduce the untiled chain for every input height, and ORT must run them."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from onnxprune.calibration import CalibrationSet
from onnxprune.cli import main
from onnxprune.int8 import quantize
from onnxprune.passes.tile_rows import _Plan, _Window, tile_rows
from onnxprune.verify import interface

from .oracle import run
from .pattern_models import GraphBuilder


def _tile(model: onnx.ModelProto, **kw) -> tuple[onnx.ModelProto, object]:
    tiled, record = tile_rows(ir.from_proto(model), **kw)
    proto = ir.to_proto(tiled)
    onnx.checker.check_model(proto, full_check=True)
    return proto, record


def _same_everywhere(model: onnx.ModelProto, tiled: onnx.ModelProto, sizes, channels: int = 3, batch: int = 2) -> int:
    """Outputs equal at every (H, W) the original accepts; returns how many sizes were compared."""
    compared = 0
    for h, w in sizes:
        x = np.random.default_rng(h * 1000 + w).standard_normal((batch, channels, h, w)).astype(np.float32)
        try:
            want = run(model, {"x": x})
        except Exception:  # the original itself rejects this size (e.g. a VALID conv on 2 rows)
            continue
        got = run(tiled, {"x": x})
        for a, b in zip(want, got):
            assert a.shape == b.shape, (h, w)
            np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5 * (1 + float(np.abs(a).max(initial=0.0))), err_msg=str((h, w)))
        compared += 1
    return compared


def _stem(g: GraphBuilder, x: str) -> str:
    """RetinaFace-mnet's opening: 3x3/2 conv + LeakyReLU, 3x3 depthwise + LeakyReLU, 1x1 conv."""
    a = g.op("LeakyRelu", g.conv(x, 3, 8, stride=2), alpha=0.1)
    b = g.op("LeakyRelu", g.conv(a, 8, 8, group=8), alpha=0.1)
    return g.conv(b, 8, 16, k=1)


def _stem_model(h: int | str = "H", w: int | str = "W") -> onnx.ModelProto:
    g = GraphBuilder(0, "stem")
    y = _stem(g, g.input("x", ["N", 3, h, w]))
    return g.build([g.op("ReduceMean", g.op("Relu", y), keepdims=1, axes=[2, 3]), y])


SIZES = [(h, w) for h in (1, 2, 3, 5, 8, 13, 31, 64, 97) for w in (1, 7, 40)]


def test_stem_strips_equal_the_whole_chain_at_every_size() -> None:
    model = _stem_model()
    tiled, record = _tile(model, input_shape=(1, 3, 96, 96), budget=1024, strips=4)
    assert record.strips == 4 and len(record.nodes) == 5  # up to the 1x1 conv, whose output has two readers
    assert interface(tiled) == interface(model)
    assert sum(n.op_type == "Conv" for n in tiled.graph.node) == 3 * 4
    assert _same_everywhere(model, tiled, SIZES) == len(SIZES)


def test_static_input_is_tiled_for_its_own_height_only() -> None:
    model = _stem_model(64, 48)
    tiled, record = _tile(model, budget=1024)
    assert record.tiled and interface(tiled) == interface(model)
    assert _same_everywhere(model, tiled, [(64, 48)], batch=3) == 1


def test_plan_checks_what_the_graph_computes() -> None:
    """_Plan.exact is the guard: it must reject a plan whose strips would read fake padding."""
    stem = [_Window(3, 2, 1, 1), _Window(3, 1, 1, 1)]
    assert all(_Plan.of(stem, 4).exact(h) for h in range(1, 600))
    plan = _Plan.of(stem, 4)
    lo, hi, keep_from, keep_to = zip(*plan.strips(640))
    assert keep_to[-1] + lo[-1] // 2 == 320 and keep_from[0] == 0 and lo[0] == 0 and hi[-1] == 640
    assert all(b > a for a, b in zip(lo, lo[1:]))  # strips advance: no strip recomputes the whole image
    # a broken plan (strips that start one row late) is caught
    late = _Plan(plan.windows, plan.k, plan.scale, plan.start + 2, plan.end)
    assert not all(late.exact(h) for h in range(1, 600))


@st.composite
def _chains(draw: st.DrawFn) -> tuple[onnx.ModelProto, int]:
    """A random chain of window and per-channel ops on a dynamic-height image, then a non-tileable op."""
    g = GraphBuilder(draw(st.integers(0, 2**16)), "chain")
    cur, c = g.input("x", ["N", 3, "H", "W"]), 3
    for _ in range(draw(st.integers(1, 5))):
        kind = draw(st.sampled_from(["conv", "conv", "depthwise", "maxpool", "avgpool", "act", "bn", "mul", "qdq"]))
        k, s, d = draw(st.sampled_from([1, 2, 3, 5])), draw(st.sampled_from([1, 1, 2])), draw(st.sampled_from([1, 1, 2]))
        extent = d * (k - 1) + 1
        pads = [draw(st.integers(0, k - 1)), draw(st.integers(0, 1)), draw(st.integers(0, k - 1)), draw(st.integers(0, 1))]
        if kind in ("conv", "depthwise"):
            cout = c if kind == "depthwise" else draw(st.integers(1, 6))
            group = c if kind == "depthwise" else 1
            wt = g.const(g.randn([cout, c // group, k, k], 0.5), "W")
            if draw(st.booleans()):  # a QDQ weight: its DequantizeLinear sits between the chain's nodes
                wt = g.op("DequantizeLinear", g.const(np.random.default_rng(c).integers(-127, 128, (cout, c // group, k, k))
                                                      .astype(np.int8), "Wq"), g.const(np.float32(0.01)))
            cur = g.op("Conv", cur, wt, g.const(g.bias(cout), "B"), kernel_shape=[k, k], strides=[s, s],
                       dilations=[d, d], pads=pads, group=group)
            c = cout
        elif kind in ("maxpool", "avgpool") and k > 1:
            pads = [min(p, extent // 2) for p in pads] if kind == "maxpool" else [min(p, k // 2) for p in pads]
            attrs = dict(kernel_shape=[k, k], strides=[s, s], pads=pads)
            if kind == "maxpool":
                cur = g.op("MaxPool", cur, dilations=[d, d], **attrs)
            else:
                cur = g.op("AveragePool", cur, count_include_pad=draw(st.integers(0, 1)), **attrs)
        elif kind == "act":
            cur = g.op(draw(st.sampled_from(["Relu", "Sigmoid", "LeakyRelu"])), cur)
        elif kind == "bn":
            cur = g.bn(cur, c)
        elif kind == "mul":
            cur = g.op("Mul", cur, g.const(g.randn([c, 1, 1], 0.5, 1.0)))
        else:
            scale, zero = g.const(np.float32(0.05)), g.const(np.uint8(128))
            cur = g.op("DequantizeLinear", g.op("QuantizeLinear", cur, scale, zero), scale, zero)
    return g.build([g.op("Resize", cur, "", g.const(np.array([1, 1, 2, 2], np.float32)))]), draw(st.integers(2, 6))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_chains(), st.lists(st.tuples(st.integers(1, 70), st.integers(1, 12)), min_size=4, max_size=4))
def test_random_chains_tile_exactly_or_not_at_all(spec, sizes) -> None:
    model, k = spec
    tiled, record = _tile(model, input_shape=(1, 3, 64, 64), budget=1, strips=k)
    if not record.tiled:  # declined: the graph must be the original one
        assert record.reason and [n.op_type for n in tiled.graph.node] == [n.op_type for n in model.graph.node]
        return
    assert 2 <= record.strips <= k and record.nodes
    assert any(n.op_type == "Resize" for n in tiled.graph.node)  # the non-tileable op stays whole
    _same_everywhere(model, tiled, sizes + [(64, 64), (1, 1)])


def test_declines_what_it_cannot_tile() -> None:
    g = GraphBuilder(0, "same")
    x = g.input("x", ["N", 3, "H", "W"])
    w = g.const(g.randn([8, 3, 3, 3]), "W")
    model = g.build([g.op("Conv", x, w, kernel_shape=[3, 3], auto_pad="SAME_UPPER")])
    assert "no convolution" in tile_rows(ir.from_proto(model), (1, 3, 64, 64), budget=1)[1].reason
    old = _stem_model()
    old.opset_import[0].version = 11  # Conv and Relu read the same at opset 11
    assert "opset below 12" in tile_rows(ir.from_proto(old), (1, 3, 64, 64), budget=1)[1].reason
    assert "input size unknown" in tile_rows(ir.from_proto(_stem_model()), budget=1)[1].reason
    # large budget: no tensor is big enough to be worth it
    assert not tile_rows(ir.from_proto(_stem_model()), (1, 3, 64, 64))[1].tiled


def _detector_stem() -> onnx.ModelProto:
    """A stem at detector resolution (its 8x160x160 float output is 800 KB), then a small head."""
    g = GraphBuilder(1, "det")
    y = _stem(g, g.input("x", ["N", 3, "H", "W"]))
    y = g.op("Relu", g.conv(y, 16, 16, stride=2))
    return g.build([g.conv(g.op("Relu", g.conv(y, 16, 16)), 16, 4, k=1)])


def test_quantize_tiles_the_stem_and_keeps_its_outputs(tmp_path) -> None:
    model = _detector_stem()
    x = np.random.default_rng(0).uniform(-1, 1, (8, 3, 320, 320)).astype(np.float32)
    calib = CalibrationSet("x", [x], [], None, [])
    tiled = quantize(model, calib, task="outputs")
    plain = quantize(model, calib, task="outputs", tile=False)
    assert tiled.report.tiled and tiled.report.tiled["strips"] >= 2 and plain.report.tiled is None
    assert any("row tiling: the first" in n for n in tiled.report.notes)
    assert interface(tiled.model) == interface(model)
    assert tiled.report.kernels.get("QLinearConv", 0) >= 1
    for h, w in [(320, 320), (240, 320), (33, 17)]:
        feed = {"x": np.random.default_rng(h).uniform(-1, 1, (2, 3, h, w)).astype(np.float32)}
        for a, b in zip(run(plain.model, feed), run(tiled.model, feed)):
            np.testing.assert_allclose(b, a, rtol=0, atol=1e-5 * (1 + float(np.abs(a).max(initial=0.0))))
    # the CLI flag, and its misuse
    path, npy = tmp_path / "det.onnx", tmp_path / "calib.npy"
    onnx.save(model, path)
    np.save(npy, x[:4])
    assert main(["quantize", str(path), "--calib", str(npy), "--no-tile", "-q", "-o", str(tmp_path / "q.onnx")]) == 0
    assert not any(n.name.startswith("tile/") for n in onnx.load(tmp_path / "q.onnx").graph.node)
    assert sum(n.name == "tile/concat" for n in tiled.model.graph.node) == 1
    assert main(["slim", str(path), "--ratio", "0.3", "--no-tile", "-q"]) != 0
