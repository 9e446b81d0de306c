"""Deterministic synthetic face-model graphs for pruning tests.

Why: real models are large or need the network; these are small, seeded (same bytes every build),
keep BatchNormalization as separate nodes (so BN-gamma saliency and BN folding have work to do)
and reproduce the graph patterns a pruner must handle: depthwise/grouped convs, residual Adds,
Flatten->Gemm, FPN Resize with Shape-derived sizes, SSH Concats, squeeze-excitation Muls, NHWC
Transposes and per-stride heads.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
IR_VERSION = 8
Dim = int | str


class _Builder:
    """Collects nodes/initializers; every random draw comes from one seeded generator, in order."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self._used: set[str] = set()

    def _uniq(self, name: str) -> str:
        base, i = name, 1
        while name in self._used:
            i += 1
            name = f"{base}_{i}"
        self._used.add(name)
        return name

    def const(self, name: str, arr: np.ndarray) -> str:
        name = self._uniq(name)
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(arr), name))
        return name

    def i64(self, name: str, vals: Sequence[int]) -> str:
        return self.const(name, np.asarray(vals, dtype=np.int64))

    def op(self, op_type: str, inputs: Sequence[str], name: str, out: str | None = None, **attrs: object) -> str:
        """Add one node; its output tensor is named after the node unless ``out`` is given."""
        name = self._uniq(name)
        self.nodes.append(helper.make_node(op_type, list(inputs), [out or name], name=name, **attrs))
        return out or name

    def conv(self, x: str, cin: int, cout: int, k: int = 3, s: int = 1, g: int = 1, p: int | None = None,
             bias: bool = False, name: str = "conv", gain: float = 2.0, out: str | None = None) -> str:
        fan_in = cin // g * k * k
        w = self.rng.normal(0.0, np.sqrt(gain / fan_in), (cout, cin // g, k, k)).astype(np.float32)
        ins = [x, self.const(f"{name}.weight", w)]
        if bias:
            ins.append(self.const(f"{name}.bias", (self.rng.normal(0, 0.05, cout)).astype(np.float32)))
        p = k // 2 if p is None else p
        return self.op("Conv", ins, name, out, kernel_shape=[k, k], strides=[s, s], pads=[p] * 4, group=g,
                       dilations=[1, 1])

    def bn(self, x: str, c: int, name: str, out: str | None = None) -> str:
        """Gamma in [0.05, 1.5], ~20% of channels near 0.05 so gamma ranking separates channels."""
        r = self.rng
        gamma = r.uniform(0.05, 1.5, c)
        small = r.random(c) < 0.2
        gamma[small] = r.uniform(0.05, 0.1, int(small.sum()))
        beta, mean = r.normal(0, 0.1, c), r.normal(0, 0.1, c)
        var = r.uniform(0.5, 1.5, c)
        ins = [x] + [self.const(f"{name}.{k}", v.astype(np.float32))
                     for k, v in (("weight", gamma), ("bias", beta), ("running_mean", mean), ("running_var", var))]
        return self.op("BatchNormalization", ins, name, out, epsilon=1e-5, momentum=0.9)

    def act(self, x: str, kind: str, c: int, name: str) -> str:
        if kind == "prelu":
            slope = (0.25 + self.rng.normal(0, 0.02, (c, 1, 1))).astype(np.float32)
            return self.op("PRelu", [x, self.const(f"{name}.weight", slope)], name)
        if kind == "leaky":
            return self.op("LeakyRelu", [x], name, alpha=0.1)
        if kind == "relu":
            return self.op("Relu", [x], name)
        assert kind == "none"
        return x

    def cba(self, x: str, cin: int, cout: int, k: int = 3, s: int = 1, g: int = 1, act: str = "relu",
            name: str = "blk") -> str:
        """Conv -> BN -> activation, torch-style dotted names."""
        y = self.bn(self.conv(x, cin, cout, k, s, g, name=f"{name}.conv"), cout, f"{name}.bn")
        return self.act(y, act, cout, f"{name}.act")

    def gemm(self, x: str, cin: int, cout: int, name: str, out: str | None = None) -> str:
        w = self.rng.normal(0, np.sqrt(1.0 / cin), (cout, cin)).astype(np.float32)
        b = self.rng.normal(0, 0.05, cout).astype(np.float32)
        return self.op("Gemm", [x, self.const(f"{name}.weight", w), self.const(f"{name}.bias", b)], name, out,
                       transB=1)

    def gap_flatten(self, x: str, name: str) -> str:
        return self.op("Flatten", [self.op("GlobalAveragePool", [x], f"{name}.gap")], f"{name}.flatten", axis=1)

    def model(self, name: str, inputs: list[tuple[str, list[Dim]]], outputs: list[tuple[str, list[Dim]]],
              doc: str) -> onnx.ModelProto:
        vi = lambda n, s: helper.make_tensor_value_info(n, TensorProto.FLOAT, s)  # noqa: E731
        graph = helper.make_graph(self.nodes, name, [vi(*i) for i in inputs], [vi(*o) for o in outputs],
                                  initializer=self.inits)
        m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION,
                              producer_name="onnxprune.sample_models", producer_version="1", doc_string=doc)
        onnx.checker.check_model(m, full_check=True)
        return m


def mobilefacenet() -> onnx.ModelProto:
    """MobileFaceNet (reduced repeats): bottlenecks with residual Add, GDC head, Gemm, BN1d."""
    b = _Builder(1001)
    x = b.cba("input", 3, 64, 3, 2, act="prelu", name="conv1")
    x = b.cba(x, 64, 64, 3, 1, g=64, act="prelu", name="conv2_dw")
    x = b.cba(x, 64, 64, 1, 1, act="prelu", name="conv2_pw")  # depthwise separable block
    cin = 64
    for si, (cout, n, s) in enumerate([(64, 2, 2), (128, 1, 2), (128, 2, 1), (128, 1, 2), (128, 1, 1)]):
        for i in range(n):
            nm, stride, mid = f"stage{si}.{i}", s if i == 0 else 1, cin * 2
            y = b.cba(x, cin, mid, 1, 1, act="prelu", name=f"{nm}.expand")
            y = b.cba(y, mid, mid, 3, stride, g=mid, act="prelu", name=f"{nm}.dw")
            y = b.cba(y, mid, cout, 1, 1, act="none", name=f"{nm}.project")
            x = b.op("Add", [x, y], f"{nm}.add") if stride == 1 and cin == cout else y
            cin = cout
    x = b.cba(x, cin, 512, 1, 1, act="prelu", name="conv_sep")
    x = b.bn(b.conv(x, 512, 512, 7, 1, g=512, p=0, name="gdc.conv"), 512, "gdc.bn")
    x = b.op("Flatten", [x], "flatten", axis=1)
    x = b.bn(b.gemm(x, 512, 128, "linear"), 128, "features", out="embedding")
    return b.model("mobilefacenet", [("input", ["N", 3, 112, 112])], [("embedding", ["N", 128])],
                   mobilefacenet.__doc__ or "")


def iresnet(blocks: Sequence[int] = (1, 2, 2, 1), widths: Sequence[int] = (16, 32, 64, 80), stem: int = 16,
            embedding: int = 512, name: str = "iresnet", doc: str = "") -> onnx.ModelProto:
    """iResNet (widths 16/32/64/80, blocks 1/2/2/1); last stage is narrow so Flatten->Gemm(7*7*C->512) stays <3M."""
    b = _Builder(1002)
    x = b.cba("input", 3, stem, 3, 1, act="prelu", name="conv1")
    cin = stem
    for li, (cout, n) in enumerate(zip(widths, blocks), start=1):
        for i in range(n):
            nm, s = f"layer{li}.{i}", 2 if i == 0 else 1
            y = b.bn(x, cin, f"{nm}.bn1")
            y = b.cba(y, cin, cout, 3, 1, act="prelu", name=f"{nm}.conv1")
            y = b.bn(b.conv(y, cout, cout, 3, s, name=f"{nm}.conv2"), cout, f"{nm}.bn3")
            sc = x if s == 1 and cin == cout else b.cba(x, cin, cout, 1, s, act="none", name=f"{nm}.downsample")
            x, cin = b.op("Add", [y, sc], f"{nm}.add"), cout
    x = b.op("Flatten", [b.bn(x, cin, "bn2")], "flatten", axis=1)
    x = b.bn(b.gemm(x, cin * 49, embedding, "fc"), embedding, "features", out="embedding")
    return b.model(name, [("input", ["N", 3, 112, 112])], [("embedding", ["N", embedding])],
                   doc or iresnet.__doc__ or "")


def iresnet100(width: float = 1.0) -> onnx.ModelProto:
    """iResNet-100 (blocks 3/13/30/3, widths 64-512, 512-d embedding: 65M parameters at ``width`` 1).

    Why: the size of the recognizers users really prune (~260 MB), for the scale benchmark.
    ``width`` scales every channel count and the embedding, so parameters scale as ``width**2``
    (0.125, 0.25, 0.5, 1 give about 1M, 4M, 16M, 65M) while the graph keeps its 100-layer depth.
    """
    w = lambda c: max(8, int(round(c * width)))  # noqa: E731
    return iresnet(blocks=(3, 13, 30, 3), widths=tuple(w(c) for c in (64, 128, 256, 512)), stem=w(64),
                   embedding=w(512), name="iresnet100", doc=iresnet100.__doc__ or "")


def _resize_like(b: _Builder, x: str, like: str, name: str) -> str:
    """Nearest upsample ``x`` to ``like``'s H,W with sizes from Shape->Slice->Concat, as torch exports it."""
    n_c = b.op("Slice", [b.op("Shape", [x], f"{name}.shape_src"), b.i64(f"{name}.s0", [0]), b.i64(f"{name}.e0", [2])],
               f"{name}.slice_nc")
    hw = b.op("Slice", [b.op("Shape", [like], f"{name}.shape_dst"), b.i64(f"{name}.s1", [2]),
                        b.i64(f"{name}.e1", [4])], f"{name}.slice_hw")
    sizes = b.op("Concat", [n_c, hw], f"{name}.sizes", axis=0)
    return b.op("Resize", [x, "", "", sizes], name, mode="nearest", coordinate_transformation_mode="asymmetric",
                nearest_mode="floor")


def _retina_neck_heads(b: _Builder, feats: list[tuple[str, int]], out_c: int, act: str) -> None:
    """FPN (lateral 1x1, top-down Resize+Add, 3x3 merge), SSH per level, class/bbox/landmark heads."""
    lat = [b.cba(f, c, out_c, 1, 1, act=act, name=f"fpn.output{i + 1}") for i, (f, c) in enumerate(feats)]
    for i in (1, 0):  # top-down: level3 -> level2 -> level1
        up = _resize_like(b, lat[i + 1], lat[i], f"fpn.up{i + 2}")
        lat[i] = b.cba(b.op("Add", [lat[i], up], f"fpn.add{i + 1}"), out_c, out_c, 3, 1, act=act,
                       name=f"fpn.merge{i + 1}")
    heads: dict[str, list[str]] = {"loc": [], "conf": [], "landmarks": []}
    q = out_c // 4
    for i, f in enumerate(lat, start=1):
        nm = f"ssh{i}"
        c3 = b.cba(f, out_c, out_c // 2, act="none", name=f"{nm}.conv3X3")
        c5 = b.cba(f, out_c, q, act=act, name=f"{nm}.conv5X5_1")
        c5b = b.cba(c5, q, q, act="none", name=f"{nm}.conv5X5_2")
        c7 = b.cba(c5, q, q, act=act, name=f"{nm}.conv7X7_2")
        c7 = b.cba(c7, q, q, act="none", name=f"{nm}.conv7X7_3")
        y = b.op("Relu", [b.op("Concat", [c3, c5b, c7], f"{nm}.concat", axis=1)], f"{nm}.relu")
        for key, k, hn in (("loc", 4, "BboxHead"), ("conf", 2, "ClassHead"), ("landmarks", 10, "LandmarkHead")):
            h = b.conv(y, out_c, 2 * k, 1, bias=True, name=f"{hn}.{i - 1}.conv1x1", gain=0.5)
            h = b.op("Transpose", [h], f"{hn}.{i - 1}.permute", perm=[0, 2, 3, 1])
            heads[key].append(b.op("Reshape", [h, b.i64(f"{hn}.{i - 1}.shape", [0, -1, k])], f"{hn}.{i - 1}.view"))
    b.op("Concat", heads["loc"], "loc.concat", out="loc", axis=1)
    b.op("Softmax", [b.op("Concat", heads["conf"], "conf.concat", axis=1)], "conf.softmax", out="conf", axis=-1)
    b.op("Concat", heads["landmarks"], "landmarks.concat", out="landmarks", axis=1)


_RETINA_IO = ([("input", ["N", 3, "H", "W"])],
              [("loc", ["N", "A", 4]), ("conf", ["N", "A", 2]), ("landmarks", ["N", "A", 10])])


def retinaface() -> onnx.ModelProto:
    """RetinaFace with MobileNet-0.25 backbone (LeakyRelu 0.1), FPN, SSH; any H,W multiple of 32."""
    b = _Builder(1003)

    def dw(x: str, cin: int, cout: int, s: int, nm: str) -> str:
        return b.cba(b.cba(x, cin, cin, 3, s, g=cin, act="leaky", name=f"{nm}.dw"), cin, cout, 1, 1, act="leaky",
                     name=f"{nm}.pw")

    x = b.cba("input", 3, 8, 3, 2, act="leaky", name="body.stage1.0")
    plan = {1: [(8, 16, 1), (16, 32, 2), (32, 32, 1), (32, 64, 2), (64, 64, 1)],
            2: [(64, 128, 2)] + [(128, 128, 1)] * 5, 3: [(128, 256, 2), (256, 256, 1)]}
    feats = []
    for st, layers in plan.items():
        for i, (ci, co, s) in enumerate(layers, start=1 if st == 1 else 0):
            x = dw(x, ci, co, s, f"body.stage{st}.{i}")
        feats.append((x, plan[st][-1][1]))
    _retina_neck_heads(b, feats, 64, "leaky")
    return b.model("retinaface", *_RETINA_IO, retinaface.__doc__ or "")


def retinaface_r50() -> onnx.ModelProto:
    """RetinaFace with a narrow ResNet-bottleneck backbone (stem 7x7 + MaxPool, 4 layers), Relu FPN/SSH."""
    b = _Builder(1004)
    x = b.cba("input", 3, 16, 7, 2, act="relu", name="body.conv1")
    x = b.op("MaxPool", [x], "body.maxpool", kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    cin, feats = 16, []
    for li, (mid, n, s) in enumerate([(8, 1, 1), (16, 2, 2), (32, 2, 2), (64, 1, 2)], start=1):
        for i in range(n):
            nm, st, cout = f"body.layer{li}.{i}", s if i == 0 else 1, mid * 4
            y = b.cba(x, cin, mid, 1, 1, act="relu", name=f"{nm}.conv1")
            y = b.cba(y, mid, mid, 3, st, act="relu", name=f"{nm}.conv2")
            y = b.cba(y, mid, cout, 1, 1, act="none", name=f"{nm}.conv3")
            sc = x if st == 1 and cin == cout else b.cba(x, cin, cout, 1, st, act="none", name=f"{nm}.downsample")
            x, cin = b.op("Relu", [b.op("Add", [y, sc], f"{nm}.add")], f"{nm}.relu"), cout
        if li >= 2:
            feats.append((x, cin))
    _retina_neck_heads(b, feats, 64, "relu")
    return b.model("retinaface_r50", *_RETINA_IO, retinaface_r50.__doc__ or "")


def scrfd() -> onnx.ModelProto:
    """SCRFD-like: BN+Relu backbone, PAFPN neck (Resize scales=2 + Add, stride-2 conv + Add), per-stride BN heads.

    Outputs per stride s in 8/16/32: score_s (Sigmoid) [N,A,1], bbox_s (scalar Mul) [N,A,4], kps_s [N,A,10].
    """
    b = _Builder(1005)
    x = b.cba("input", 3, 16, 3, 2, name="backbone.stem0")
    x = b.cba(x, 16, 16, 3, 2, name="backbone.stem1")
    feats, cin = [], 16
    for si, cout in enumerate((32, 64, 96), start=1):
        x = b.cba(x, cin, cout, 3, 2, name=f"backbone.stage{si}.0")
        x = b.cba(x, cout, cout, 3, 1, name=f"backbone.stage{si}.1")
        feats.append((x, cout))
        cin = cout
    nc = 32
    lat = [b.cba(f, c, nc, 1, 1, name=f"neck.lateral{i}") for i, (f, c) in enumerate(feats)]
    scales = b.const("neck.up_scales", np.array([1, 1, 2, 2], dtype=np.float32))
    for i in (1, 0):
        up = b.op("Resize", [lat[i + 1], "", scales], f"neck.upsample{i}", mode="nearest")
        lat[i] = b.op("Add", [lat[i], up], f"neck.td_add{i}")
    outs = [b.cba(lat[0], nc, nc, name="neck.fpn0")]
    for i in (1, 2):
        down = b.cba(outs[-1], nc, nc, 3, 2, name=f"neck.downsample{i}")
        outs.append(b.cba(b.op("Add", [lat[i], down], f"neck.bu_add{i}"), nc, nc, name=f"neck.pafpn{i}"))
    io: list[tuple[str, list[Dim]]] = []
    for f, s in zip(outs, (8, 16, 32)):
        h = b.cba(b.cba(f, nc, nc, name=f"head.stride{s}.conv0"), nc, nc, name=f"head.stride{s}.conv1")
        for key, k in (("score", 1), ("bbox", 4), ("kps", 10)):
            y = b.conv(h, nc, 2 * k, 3, bias=True, name=f"head.stride{s}.{key}", gain=0.5)
            y = b.op("Reshape", [b.op("Transpose", [y], f"head.stride{s}.{key}.permute", perm=[0, 2, 3, 1]),
                                 b.i64(f"head.stride{s}.{key}.shape", [0, -1, k])], f"head.stride{s}.{key}.view")
            if key == "score":
                y = b.op("Sigmoid", [y], f"head.stride{s}.score.sigmoid", out=f"score_{s}")
            elif key == "bbox":
                sc = b.const(f"head.stride{s}.scale", np.array(1.0, dtype=np.float32))
                y = b.op("Mul", [y, sc], f"head.stride{s}.bbox.scale", out=f"bbox_{s}")
            else:
                y = b.op("Identity", [y], f"head.stride{s}.kps.out", out=f"kps_{s}")
            io.append((y, ["N", f"A{s}", k]))
    io.sort(key=lambda t: ("score", "bbox", "kps").index(str(t[0]).split("_")[0]))
    return b.model("scrfd", [("input", ["N", 3, "H", "W"])], io, scrfd.__doc__ or "")


def se_block() -> onnx.ModelProto:
    """Small CNN with two squeeze-excitation gates (GAP->1x1 reduce->Relu->1x1 expand->Sigmoid->Mul)."""
    b = _Builder(1006)

    def se(x: str, c: int, nm: str) -> str:
        g = b.op("GlobalAveragePool", [x], f"{nm}.squeeze")
        g = b.op("Relu", [b.conv(g, c, c // 4, 1, bias=True, name=f"{nm}.fc1")], f"{nm}.relu")
        g = b.op("Sigmoid", [b.conv(g, c // 4, c, 1, bias=True, name=f"{nm}.fc2")], f"{nm}.sigmoid")
        return b.op("Mul", [x, g], f"{nm}.scale")

    x = b.cba("input", 3, 16, name="conv1")
    x = se(b.cba(x, 16, 32, 3, 2, name="conv2"), 32, "se1")
    x = se(b.cba(x, 32, 64, 3, 2, name="conv3"), 64, "se2")
    x = b.gemm(b.gap_flatten(x, "pool"), 64, 10, "fc", out="logits")
    return b.model("se_block", [("input", ["N", 3, 32, 32])], [("logits", ["N", 10])], se_block.__doc__ or "")


def grouped_conv() -> onnx.ModelProto:
    """Small CNN with a group=4 conv (32->32) between ordinary convs."""
    b = _Builder(1007)
    x = b.cba("input", 3, 32, name="conv1")
    x = b.cba(x, 32, 32, 3, 1, g=4, name="gconv")
    x = b.cba(x, 32, 64, 3, 2, name="conv2")
    x = b.gemm(b.gap_flatten(x, "pool"), 64, 10, "fc", out="logits")
    return b.model("grouped_conv", [("input", ["N", 3, 32, 32])], [("logits", ["N", 10])],
                   grouped_conv.__doc__ or "")


def nhwc_block() -> onnx.ModelProto:
    """NHWC in/out: Transpose->NCHW conv blocks->Transpose back ("features" [N,8,8,32]), plus GAP->Gemm "logits"."""
    b = _Builder(1008)
    x = b.op("Transpose", ["input"], "to_nchw", perm=[0, 3, 1, 2])
    x = b.cba(x, 3, 16, 3, 2, name="conv1")
    x = b.cba(x, 16, 32, 3, 2, name="conv2")
    b.op("Transpose", [x], "to_nhwc", out="features", perm=[0, 2, 3, 1])
    b.gemm(b.gap_flatten(x, "pool"), 32, 10, "fc", out="logits")
    return b.model("nhwc_block", [("input", ["N", 32, 32, 3])],
                   [("features", ["N", 8, 8, 32]), ("logits", ["N", 10])], nhwc_block.__doc__ or "")


GENERATED: dict[str, Callable[[], onnx.ModelProto]] = {
    "mobilefacenet": mobilefacenet,
    "iresnet": iresnet,
    "retinaface": retinaface,
    "retinaface-r50": retinaface_r50,
    "scrfd": scrfd,
    "se-block": se_block,
    "grouped-conv": grouped_conv,
    "nhwc-block": nhwc_block,
}

# Shape each generated model is exercised at (symbolic dims resolved; batch 1).
NOMINAL_INPUT: dict[str, tuple[int, ...]] = {
    "mobilefacenet": (1, 3, 112, 112), "iresnet": (1, 3, 112, 112), "retinaface": (1, 3, 640, 640),
    "retinaface-r50": (1, 3, 640, 640), "scrfd": (1, 3, 640, 640), "se-block": (1, 3, 32, 32),
    "grouped-conv": (1, 3, 32, 32), "nhwc-block": (1, 32, 32, 3),
}
