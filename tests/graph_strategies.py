"""Hypothesis strategy drawing small random conv graphs that mix the pruner's coupling patterns."""

from __future__ import annotations

from dataclasses import dataclass

import onnx
from hypothesis import strategies as st

from tests.pattern_models import GraphBuilder

WIDTH = st.integers(4, 24)
ACTS = ["Relu", "PRelu", "LeakyRelu", "Sigmoid"]
BLOCKS = ["conv", "residual", "concat", "depthwise", "grouped", "se", "split", "nhwc"]
NODE_BUDGET = 19  # no new block once the graph has this many nodes (block <= 6, head+extra <= 4)


@dataclass
class _T:
    """A feature map in NCHW layout: tensor name, channels, height, width."""

    name: str
    c: int
    h: int
    w: int


def _act(draw: st.DrawFn, g: GraphBuilder, t: _T, optional: bool = True) -> _T:
    kind = draw(st.sampled_from(ACTS + ([None] if optional else [])))
    return t if kind is None else _T(g.act(t.name, kind, t.c), t.c, t.h, t.w)


def _conv(draw: st.DrawFn, g: GraphBuilder, t: _T, cout: int | None = None, free: bool = False) -> _T:
    """Conv (+BN, +act). ``free`` draws kernel/stride/padding, otherwise 3x3 'same'."""
    cout = draw(WIDTH) if cout is None else cout
    k, s, pads = 3, 1, [1, 1, 1, 1]
    if free:
        k = draw(st.sampled_from([1, 3]))
        s = draw(st.sampled_from([1, 2])) if min(t.h, t.w) >= 4 else 1
        pads = [draw(st.integers(0, k // 2)) for _ in range(4)]
        if min(t.h + pads[0] + pads[2], t.w + pads[1] + pads[3]) < k + 1:
            pads = [k // 2] * 4
    h = (t.h + pads[0] + pads[2] - k) // s + 1
    w = (t.w + pads[1] + pads[3] - k) // s + 1
    y = g.conv(t.name, t.c, cout, k=k, stride=s, pads=pads, bias=draw(st.booleans()) or not free)
    if draw(st.booleans()):
        y = g.bn(y, cout)
    return _act(draw, g, _T(y, cout, h, w))


def _block(draw: st.DrawFn, g: GraphBuilder, t: _T, kind: str) -> _T:
    """Append one block of at most 6 nodes and return its output."""
    if kind == "conv":
        return _conv(draw, g, t, free=True)
    if kind == "residual":
        a = _conv(draw, g, t, t.c)
        b = t if draw(st.booleans()) else _T(g.conv(t.name, t.c, t.c, k=1), t.c, t.h, t.w)
        return _act(draw, g, _T(g.op("Add", a.name, b.name), t.c, t.h, t.w))
    if kind == "concat":
        a = _conv(draw, g, t)
        cb = t.c if draw(st.booleans()) else draw(WIDTH)
        b = t.name if cb == t.c else g.conv(t.name, t.c, cb, k=1)
        return _T(g.op("Concat", a.name, b, axis=1), a.c + cb, t.h, t.w)
    if kind == "depthwise":
        mult = draw(st.sampled_from([1, 2]))
        y = g.conv(t.name, t.c, t.c * mult, group=t.c)
        return _act(draw, g, _T(y, t.c * mult, t.h, t.w))
    if kind == "grouped":
        grp = draw(st.sampled_from([gr for gr in (2, 4) if t.c % gr == 0]))
        cout = grp * draw(st.integers(max(1, 4 // grp), 24 // grp))
        return _act(draw, g, _T(g.conv(t.name, t.c, cout, group=grp), cout, t.h, t.w))
    if kind == "se":
        r = draw(st.integers(2, max(2, t.c // 2)))
        z = g.act(g.conv(g.gap(t.name), t.c, r, k=1))
        e = g.op("Sigmoid", g.conv(z, r, t.c, k=1))
        return _T(g.op("Mul", t.name, e), t.c, t.h, t.w)
    if kind == "split":
        ca = draw(st.integers(1, t.c - 1))
        a, b = g.nodes_out("Split", [t.name, g.i64([ca, t.c - ca], "split")], 2, axis=1)
        pa = _conv(draw, g, _T(a, ca, t.h, t.w))
        pb = _T(b, t.c - ca, t.h, t.w) if draw(st.booleans()) else _T(g.conv(b, t.c - ca, t.c - ca), t.c - ca, t.h, t.w)
        return _T(g.op("Concat", pa.name, pb.name, axis=1), pa.c + pb.c, t.h, t.w)
    assert kind == "nhwc"
    y = g.op("Transpose", t.name, perm=[0, 2, 3, 1])
    y = g.op("Mul", y, g.const(g.randn([t.c], 0.3, 1.0), "nhwc_scale"))
    if draw(st.booleans()):
        y = g.op(draw(st.sampled_from(["Relu", "LeakyRelu", "Sigmoid"])), y)
    return _T(g.op("Transpose", y, perm=[0, 3, 1, 2]), t.c, t.h, t.w)


def _head(draw: st.DrawFn, g: GraphBuilder, t: _T) -> str:
    kind = draw(st.sampled_from(["gap_gemm", "flatten_gemm", "conv"]))
    n_out = draw(st.integers(2, 12))
    if kind == "conv":
        return g.conv(t.name, t.c, n_out, k=1)
    src = g.gap(t.name) if kind == "gap_gemm" else t.name
    fin = t.c if kind == "gap_gemm" else t.c * t.h * t.w
    return g.gemm(g.op("Flatten", src, axis=1), fin, n_out)


@st.composite
def random_conv_model(draw: st.DrawFn, max_blocks: int = 4) -> onnx.ModelProto:
    """Draw a small (< 30 nodes) random conv model that passes the checker and runs in ORT."""
    g = GraphBuilder(draw(st.integers(0, 2**16)), "random_conv")
    if draw(st.booleans()):  # NHWC input variant
        x = g.op("Transpose", g.input("x", ["N", 16, 16, 3]), perm=[0, 3, 1, 2])
    else:
        x = g.input("x", ["N", 3, 16, 16])
    t = _conv(draw, g, _T(x, 3, 16, 16), free=True)
    feats = [t]
    for _ in range(draw(st.integers(1, max_blocks))):
        if len(g.nodes) > NODE_BUDGET:
            break
        kinds = [k for k in BLOCKS if (k != "grouped" or t.c % 2 == 0) and (k != "split" or t.c >= 2)]
        t = _block(draw, g, t, draw(st.sampled_from(kinds)))
        feats.append(t)
    outputs = [_head(draw, g, t)]
    if len(feats) > 1 and draw(st.booleans()):  # second output taps an intermediate feature map
        f = draw(st.sampled_from(feats[:-1]))
        outputs.append(f.name if draw(st.booleans()) else g.conv(f.name, f.c, draw(WIDTH), k=1))
    return g.build(outputs)

