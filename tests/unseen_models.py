"""Face models "the project has never seen": layouts, names and conventions of detectors in the wild.

Why: every other test model comes from ``sample_models`` or ``tests/zoo.py`` and so shares their
naming and export habits. These imitate what users really bring (facenet-pytorch MTCNN through the
TorchScript exporter with its real weights, UltraFace with its prior decoding inside the graph,
OpenCV's YuNet with twelve per-stride heads and unnormalised BGR input, an NHWC detector with
numeric output names, a 3DDFA-like regressor, and SCRFD as insightface's ``scrfd2onnx.py`` writes
it), so a harness can run every CLI verb on them.

Each builder is ``build_X(directory) -> Path``: it writes ``directory/<name>.onnx`` and returns it;
``UNSEEN`` lists them with the interface each declares, ``example_inputs`` feeds each the way its
pipeline would. Generated graphs are seeded, and their BatchNorm statistics are measured on seeded
synthetic photos (``natural_images``) so outputs depend on the image as a trained model's do
(rounded to 4 significant digits: the same bytes on every build). Detector face biases are set so a
few percent of anchors score above 0.5. RetinaFace and SCRFD start from ``sample_models.generate``.

The MTCNN builders need torch and the network once (``pip download`` of the pinned facenet-pytorch
wheel into ``default_cache_dir()/dist``; the package is never installed); offline they raise
``SampleUnavailable`` so tests can skip, and they reuse an export already in ``directory``.
"""

from __future__ import annotations

import hashlib
import io
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnxprune.sample_models import FetchSpec, SampleIntegrityError, SampleUnavailable, default_cache_dir
from onnxprune.sample_models import generate
from onnxprune.sample_models.fetch import _download_dist

Dim = int | str


@dataclass(frozen=True)
class UnseenModel:
    """One model: how to build it, what it is for, and the interface it declares."""

    name: str
    build: Callable[[Path], Path]
    task: str  # "detection" | "embedding" | "classification" | "outputs"
    family: str
    needs_torch: bool
    note: str  # what it imitates, and its input convention
    inputs: tuple[tuple[str, tuple[Dim, ...]], ...] = ()  # declared graph inputs (name, shape)
    outputs: tuple[tuple[str, tuple[Dim, ...]], ...] = ()  # declared graph outputs, in graph order
    layout: str = "NCHW"
    preprocess: str = ""  # what the original pipeline feeds the input


# -- small graph builder -------------------------------------------------------------------------------------------

class _Graph(generate._Builder):
    """Nodes and initializers drawn from one seeded generator; tensor names numeric or path-style."""

    def __init__(self, seed: int, numeric_from: int | None = None) -> None:
        super().__init__(seed)
        self._numeric = numeric_from  # legacy TorchScript export names: "245", "246", ...
        self.pending_bn: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # conv node -> (gamma, beta)

    def const(self, name: str, arr: np.ndarray) -> str:
        name = self._uniq(name)
        self.inits.append(numpy_helper.from_array(np.array(arr, order="C"), name))  # keeps 0-d scalars 0-d
        return name

    def f32(self, name: str, vals: object) -> str:
        return self.const(name, np.asarray(vals, dtype=np.float32))

    def op(self, op_type: str, inputs: Sequence[str], name: str, out: str | None = None, **attrs: object) -> str:
        """One node; its output is ``out``, else a numeric name (legacy style) or ``<name>_output_0``."""
        name = self._uniq(name)
        if out is None:
            if self._numeric is not None:
                out, self._numeric = str(self._numeric), self._numeric + 1
            else:
                out = f"{name}_output_0"
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], name=name, **attrs))
        return out

    def conv(self, x: str, cin: int, cout: int, k: int = 3, s: int = 1, p: int | None = None, g: int = 1,
             d: int = 1, name: str = "conv", fold_bn: bool = True, gain: float = 2.0,
             out: str | None = None) -> str:
        """Conv with bias. ``fold_bn``: a BatchNorm (gamma, beta drawn here) to fold in once its statistics
        are measured on data (:func:`_calibrate_bn`), as an eval-mode export folds a trained BN."""
        fan_in = cin // g * k * k
        w = self.rng.normal(0.0, np.sqrt(gain / fan_in), (cout, cin // g, k, k))
        b = self.rng.normal(0.0, 0.05, cout)
        p = (k // 2) * d if p is None else p
        ins = [x, self.const(f"{name}.weight", w.astype(np.float32)), self.const(f"{name}.bias", b.astype(np.float32))]
        y = self.op("Conv", ins, name, out, kernel_shape=[k, k], strides=[s, s], pads=[p] * 4, group=g,
                    dilations=[d, d])
        if fold_bn:
            gamma = self.rng.uniform(0.3, 1.5, cout)
            small = self.rng.random(cout) < 0.2  # some near-dead channels, as trained BN gammas have
            gamma[small] = self.rng.uniform(0.02, 0.08, int(small.sum()))
            self.pending_bn[name] = (gamma, self.rng.normal(0.0, 0.1, cout))
        return y

    def bias_of(self, node_name: str) -> str:
        return next(n.input[2] for n in self.nodes if n.name == node_name)

    def relu(self, x: str, name: str) -> str:
        return self.op("Relu", [x], name)

    def model(self, name: str, inputs: Sequence[tuple[str, Sequence[Dim]]],
              outputs: Sequence[tuple[str, Sequence[Dim]]], opset: int, ir_version: int, producer: str,
              doc: str) -> onnx.ModelProto:
        vi = lambda n, s: helper.make_tensor_value_info(n, TensorProto.FLOAT, list(s))  # noqa: E731
        graph = helper.make_graph(self.nodes, name, [vi(*i) for i in inputs], [vi(*o) for o in outputs],
                                  initializer=self.inits)
        m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=ir_version,
                              producer_name=producer, producer_version="", doc_string=doc)
        onnx.checker.check_model(m, full_check=True)
        return m


def _save(model: onnx.ModelProto, directory: Path, name: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.onnx"
    onnx.save(model, str(path))
    return path


def natural_images(count: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    """``count`` smooth uint8 RGB images [count,H,W,3] with photo-like statistics (no dataset needed).

    Low-frequency colour fields (bilinear upsampling of coarse noise at three scales), a lighting
    gradient and a little sensor noise: spatially correlated, mid-grey mean, channels correlated.
    """
    rng = np.random.default_rng(seed)
    out = np.empty((count, height, width, 3), dtype=np.uint8)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    for n in range(count):
        img = np.zeros((height, width, 3), dtype=np.float32)
        for cells, amp in ((3, 60.0), (9, 30.0), (27, 12.0)):
            grid = (cells + 1, cells + 1)
            coarse = rng.normal(0.0, 1.0, (*grid, 1)) * 0.6 + rng.normal(0.0, 0.4, (*grid, 3))
            fy, fx = yy * cells / max(height - 1, 1), xx * cells / max(width - 1, 1)
            y0, x0 = np.minimum(fy.astype(int), cells - 1), np.minimum(fx.astype(int), cells - 1)
            ty, tx = (fy - y0)[..., None], (fx - x0)[..., None]
            img += amp * ((1 - ty) * ((1 - tx) * coarse[y0, x0] + tx * coarse[y0, x0 + 1])
                          + ty * ((1 - tx) * coarse[y0 + 1, x0] + tx * coarse[y0 + 1, x0 + 1]))
        angle = rng.uniform(0, 2 * np.pi)
        img += 30.0 * ((np.cos(angle) * xx / width + np.sin(angle) * yy / height) - 0.5)[..., None]
        img += rng.uniform(90, 150) + rng.normal(0.0, 3.0, img.shape)
        out[n] = np.clip(img, 0, 255).astype(np.uint8)
    return out


def _run(model: onnx.ModelProto, feeds: Sequence[np.ndarray], names: Sequence[str]) -> dict[str, np.ndarray]:
    """Any tensors of ``model`` on each feed (one image a run), concatenated along axis 0."""
    import onnxruntime as ort

    producer = {o: n for n in model.graph.node for o in n.output}
    keep, todo, seen = set(), list(names), set()
    while todo:  # only the nodes these tensors need: early calibration waves load a small graph
        t = todo.pop()
        if t in seen or t not in producer:
            continue
        seen.add(t)
        node = producer[t]
        keep.add(id(node))
        todo.extend(node.input)
    nodes = [n for n in model.graph.node if id(n) in keep]
    used = {i for n in nodes for i in n.input}
    graph = helper.make_graph(nodes, model.graph.name, list(model.graph.input),
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in names],
                              initializer=[t for t in model.graph.initializer if t.name in used])
    m = helper.make_model(graph, opset_imports=model.opset_import, ir_version=model.ir_version)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(m.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    iname = sess.get_inputs()[0].name
    runs = [sess.run(list(names), {iname: x}) for x in feeds]
    return {n: np.concatenate([r[i] for r in runs], axis=0) for i, n in enumerate(names)}


def _sig(a: np.ndarray, digits: int = 4) -> np.ndarray:
    """Rounded to ``digits`` significant digits, so last-bit ORT differences between CPUs leave the bytes alone."""
    a = np.asarray(a, dtype=np.float64)
    mag = 10.0 ** (np.floor(np.log10(np.maximum(np.abs(a), 1e-30))) - digits + 1)
    return np.round(a / mag) * mag


def _set(model: onnx.ModelProto, name: str, value: np.ndarray) -> None:
    init = next(t for t in model.graph.initializer if t.name == name)
    init.CopyFrom(numpy_helper.from_array(np.asarray(value, dtype=np.float32), name))


def _get(model: onnx.ModelProto, name: str) -> np.ndarray:
    return numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == name)).astype(np.float64)


def _calibrate_bn(model: onnx.ModelProto, feeds: Sequence[np.ndarray],
                  fold: dict[str, tuple[np.ndarray, np.ndarray]] | None = None) -> None:
    """Give random BatchNorms the statistics training would: measured on ``feeds``, upstream first.

    BatchNormalization nodes get running mean/var of their input; Conv nodes named in ``fold`` get their
    (gamma, beta) folded in with the measured mean/var of their output. Without this, random weights
    lose the image within a few layers and every output is the same for every input.
    """
    fold = fold or {}
    g = model.graph
    producer = {o: n for n in g.node for o in n.output}
    items = {n.name: n for n in g.node if n.op_type == "BatchNormalization" or n.name in fold}
    memo: dict[str, frozenset[str]] = {}

    def upstream(node: onnx.NodeProto) -> frozenset[str]:
        """Items feeding ``node`` (not ``node`` itself)."""
        if node.name not in memo:
            acc: set[str] = set()
            for t in node.input[:1] if node.op_type == "BatchNormalization" else node.input:
                p = producer.get(t)
                if p is not None:
                    acc |= upstream(p) | ({p.name} if p.name in items else set())
            memo[node.name] = frozenset(acc)
        return memo[node.name]

    stat = {k: (n.input[0] if n.op_type == "BatchNormalization" else n.output[0]) for k, n in items.items()}
    done: set[str] = set()
    while len(done) < len(items):
        ready = [k for k, n in items.items() if k not in done and upstream(n) <= done]
        got = _run(model, feeds, [stat[k] for k in ready])
        for k in ready:
            a, node = got[stat[k]], items[k]
            mean = _sig(a.mean(axis=(0, 2, 3)))
            var = a.var(axis=(0, 2, 3))
            # floor near-constant channels: smooth synthetic images leave some with a tiny variance, whose
            # 1/std gain would blow up on real photos (edges, texture) as no trained BN does
            var = _sig(np.maximum(var, 0.1 * float(np.median(var)) + 1e-6))
            if node.op_type == "BatchNormalization":
                _set(model, node.input[3], mean)
                _set(model, node.input[4], var)
            else:
                gamma, beta = fold[k]
                scale = gamma / np.sqrt(var + 1e-5)
                _set(model, node.input[1], _get(model, node.input[1]) * scale[:, None, None, None])
                _set(model, node.input[2], (_get(model, node.input[2]) - mean) * scale + beta)
            done.add(k)


def _rate_bias(logits: np.ndarray, rate: float) -> float:
    """Bias that puts a ``rate`` share of ``logits`` above 0 (two decimals)."""
    return float(np.round(-np.quantile(logits, 1.0 - rate), 2))


def _feeds(count: int, height: int, width: int, *, bgr: bool, mean: float | tuple[float, float, float],
           scale: float, nhwc: bool = False, seed: int = 11) -> list[np.ndarray]:
    """``natural_images`` as a pipeline feeds them: channel order, (x - mean) * scale, layout, batch 1 each.
    A per-channel ``mean`` is in the fed channel order."""
    out, mu = [], np.asarray(mean, dtype=np.float32)
    for im in natural_images(count, height, width, seed):
        x = ((im[..., ::-1] if bgr else im).astype(np.float32) - mu) * np.float32(scale)
        out.append(np.ascontiguousarray(x[None] if nhwc else x.transpose(2, 0, 1)[None]))
    return out


# -- 1. facenet-pytorch MTCNN, real weights, TorchScript exporter ------------------------------------------------

FACENET_WHEEL = FetchSpec(
    "facenet-pytorch", "2.6.0", "facenet_pytorch-2.6.0-py3-none-any.whl",
    "ecb82b27beb226d106f2219efe8f829b01b87a8595badd01545679bdb9f19cca",
    "facenet_pytorch/data/pnet.pt", "a2a71925e0b9996a42f63e47efc1ca19043e69558b5c523b978d611dfae49c8f",
    "facenet-pytorch 2.6.0 MTCNN state dicts (pnet.pt, rnet.pt, onet.pt); the package is never installed")

FACENET_MEMBERS = {
    "pnet": ("facenet_pytorch/data/pnet.pt", "a2a71925e0b9996a42f63e47efc1ca19043e69558b5c523b978d611dfae49c8f"),
    "rnet": ("facenet_pytorch/data/rnet.pt", "bbb937de72efc9ef83b186c49f5f558467a1d7e3453a8ece0d71a886633f6a86"),
    "onet": ("facenet_pytorch/data/onet.pt", "165bfbe42940416ccfb977545cf0e976d5bf321f67083ae2aaaa5c764280118d"),
}

MTCNN_PREPROCESS = ("RGB (PIL/uint8 HWC image permuted to NCHW, no H/W swap), float (x - 127.5) * 0.0078125; "
                    "crops resized with interpolate(mode='area')")


_WHEEL_UNAVAILABLE: SampleUnavailable | None = None


def _facenet_state_dict(net: str) -> dict:
    """One net's state dict out of the pinned wheel (downloaded to the shared cache on first use)."""
    try:
        import torch
    except ImportError as e:  # pragma: no cover - the registry says needs_torch
        raise SampleUnavailable("torch is not installed") from e
    global _WHEEL_UNAVAILABLE
    if _WHEEL_UNAVAILABLE is not None:  # offline: one pip attempt per process, not one per net
        raise _WHEEL_UNAVAILABLE
    try:
        wheel = _download_dist(FACENET_WHEEL, default_cache_dir())
    except SampleUnavailable as e:
        _WHEEL_UNAVAILABLE = e
        raise
    member, sha = FACENET_MEMBERS[net]
    with zipfile.ZipFile(wheel) as z:
        raw = z.read(member)
    if hashlib.sha256(raw).hexdigest() != sha:
        raise SampleIntegrityError(f"{member}: sha256 {hashlib.sha256(raw).hexdigest()} != pinned {sha}")
    return torch.load(io.BytesIO(raw), weights_only=True, map_location="cpu")


def _mtcnn_module(net: str):
    """facenet-pytorch's PNet/RNet/ONet, same parameter names and forward, weights loaded strictly."""
    from torch import nn

    class PNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1, self.prelu1 = nn.Conv2d(3, 10, 3), nn.PReLU(10)
            self.pool1 = nn.MaxPool2d(2, 2, ceil_mode=True)
            self.conv2, self.prelu2 = nn.Conv2d(10, 16, 3), nn.PReLU(16)
            self.conv3, self.prelu3 = nn.Conv2d(16, 32, 3), nn.PReLU(32)
            self.conv4_1, self.softmax4_1 = nn.Conv2d(32, 2, 1), nn.Softmax(dim=1)
            self.conv4_2 = nn.Conv2d(32, 4, 1)

        def forward(self, x):
            x = self.pool1(self.prelu1(self.conv1(x)))
            x = self.prelu3(self.conv3(self.prelu2(self.conv2(x))))
            return self.conv4_2(x), self.softmax4_1(self.conv4_1(x))

    class RNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1, self.prelu1 = nn.Conv2d(3, 28, 3), nn.PReLU(28)
            self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
            self.conv2, self.prelu2 = nn.Conv2d(28, 48, 3), nn.PReLU(48)
            self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
            self.conv3, self.prelu3 = nn.Conv2d(48, 64, 2), nn.PReLU(64)
            self.dense4, self.prelu4 = nn.Linear(576, 128), nn.PReLU(128)
            self.dense5_1, self.softmax5_1 = nn.Linear(128, 2), nn.Softmax(dim=1)
            self.dense5_2 = nn.Linear(128, 4)

        def forward(self, x):
            x = self.pool1(self.prelu1(self.conv1(x)))
            x = self.pool2(self.prelu2(self.conv2(x)))
            x = self.prelu3(self.conv3(x))
            x = x.permute(0, 3, 2, 1).contiguous()
            x = self.prelu4(self.dense4(x.view(x.shape[0], -1)))
            return self.dense5_2(x), self.softmax5_1(self.dense5_1(x))

    class ONet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1, self.prelu1 = nn.Conv2d(3, 32, 3), nn.PReLU(32)
            self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
            self.conv2, self.prelu2 = nn.Conv2d(32, 64, 3), nn.PReLU(64)
            self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
            self.conv3, self.prelu3 = nn.Conv2d(64, 64, 3), nn.PReLU(64)
            self.pool3 = nn.MaxPool2d(2, 2, ceil_mode=True)
            self.conv4, self.prelu4 = nn.Conv2d(64, 128, 2), nn.PReLU(128)
            self.dense5, self.prelu5 = nn.Linear(1152, 256), nn.PReLU(256)
            self.dense6_1, self.softmax6_1 = nn.Linear(256, 2), nn.Softmax(dim=1)
            self.dense6_2 = nn.Linear(256, 4)
            self.dense6_3 = nn.Linear(256, 10)

        def forward(self, x):
            x = self.pool1(self.prelu1(self.conv1(x)))
            x = self.pool2(self.prelu2(self.conv2(x)))
            x = self.pool3(self.prelu3(self.conv3(x)))
            x = self.prelu4(self.conv4(x))
            x = x.permute(0, 3, 2, 1).contiguous()
            x = self.prelu5(self.dense5(x.view(x.shape[0], -1)))
            return self.dense6_2(x), self.dense6_3(x), self.softmax6_1(self.dense6_1(x))

    module = {"pnet": PNet, "rnet": RNet, "onet": ONet}[net]()
    module.load_state_dict(_facenet_state_dict(net), strict=True)
    return module.eval()


# name -> (net, input shape for export, dynamic axes of the input, opset)
_MTCNN_EXPORTS: dict[str, tuple[str, tuple[int, ...], dict[int, str], int]] = {
    "facenet-mtcnn-pnet": ("pnet", (1, 3, 48, 64), {0: "N", 2: "H", 3: "W"}, 17),
    "facenet-mtcnn-pnet-b1": ("pnet", (1, 3, 240, 320), {}, 11),
    "facenet-mtcnn-rnet": ("rnet", (1, 3, 24, 24), {0: "N"}, 17),
    "facenet-mtcnn-rnet-b1": ("rnet", (1, 3, 24, 24), {}, 11),
    "facenet-mtcnn-onet": ("onet", (1, 3, 48, 48), {0: "N"}, 17),
    "facenet-mtcnn-onet-b1": ("onet", (1, 3, 48, 48), {}, 11),
}
_MTCNN_OUTPUTS = {"pnet": ["reg", "prob"], "rnet": ["reg", "prob"], "onet": ["reg", "landmarks", "prob"]}


def _export_mtcnn(name: str, directory: Path) -> Path:
    """TorchScript exporter (``dynamo=False``), constant folding on; reuses ``directory/<name>.onnx``."""
    path = directory / f"{name}.onnx"
    if path.is_file():
        return path
    try:
        import torch
    except ImportError as e:
        raise SampleUnavailable("torch is not installed") from e
    net, shape, dyn_in, opset = _MTCNN_EXPORTS[name]
    module = _mtcnn_module(net)
    outs = _MTCNN_OUTPUTS[net]
    dynamic = None
    if dyn_in:
        dynamic = {"input": dyn_in}
        for o in outs:  # P-Net outputs are maps [N,C,h,w]; R/O-Net outputs are [N,C]
            dynamic[o] = {0: "N", 2: "h", 3: "w"} if net == "pnet" else {0: "N"}
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / f".{name}.onnx.partial"
    x = torch.from_numpy(((natural_images(1, shape[2], shape[3], seed=7).astype(np.float32) - 127.5) * 0.0078125)
                         .transpose(0, 3, 1, 2).copy())
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (x,), str(tmp), dynamo=False, opset_version=opset, input_names=["input"],
                          output_names=outs, dynamic_axes=dynamic, do_constant_folding=True)
    tmp.replace(path)
    return path


def _mtcnn_builder(name: str) -> Callable[[Path], Path]:
    def build(directory: Path) -> Path:
        return _export_mtcnn(name, directory)
    build.__name__ = build.__qualname__ = f"build_{name.replace('-', '_')}"
    return build


build_facenet_mtcnn_pnet = _mtcnn_builder("facenet-mtcnn-pnet")
build_facenet_mtcnn_pnet_b1 = _mtcnn_builder("facenet-mtcnn-pnet-b1")
build_facenet_mtcnn_rnet = _mtcnn_builder("facenet-mtcnn-rnet")
build_facenet_mtcnn_rnet_b1 = _mtcnn_builder("facenet-mtcnn-rnet-b1")
build_facenet_mtcnn_onet = _mtcnn_builder("facenet-mtcnn-onet")
build_facenet_mtcnn_onet_b1 = _mtcnn_builder("facenet-mtcnn-onet-b1")


# -- 2. UltraFace RFB-320 -----------------------------------------------------------------------------------------

ULTRAFACE_MIN_BOXES = ((10, 16, 24), (32, 48), (64, 96), (128, 192, 256))
ULTRAFACE_FMAPS = ((40, 30), (20, 15), (10, 8), (5, 4))  # (w, h) per level at 320x240, as define_img_size(320)
ULTRAFACE_IMAGE = (320, 240)  # (w, h)
FACE_RATE = 0.03  # share of anchors/locations scoring > 0.5 on natural_images(), per level


def ultraface_priors() -> np.ndarray:
    """[4420,4] centre-form priors (cx, cy, w, h) in [0,1], as the original generate_priors (clamped to [0,1])."""
    (img_w, img_h), priors = ULTRAFACE_IMAGE, []
    for (fw, fh), boxes, stride in zip(ULTRAFACE_FMAPS, ULTRAFACE_MIN_BOXES, (8, 16, 32, 64)):
        scale_w, scale_h = img_w / stride, img_h / stride  # image / shrinkage, not the (rounded-up) map size
        for j in range(fh):
            for i in range(fw):
                for box in boxes:
                    priors.append([(i + 0.5) / scale_w, (j + 0.5) / scale_h, box / img_w, box / img_h])
    return np.clip(np.asarray(priors, dtype=np.float64), 0.0, 1.0).astype(np.float32)


def ultraface() -> onnx.ModelProto:
    """UltraFace version-RFB-320 layout (Mb_Tiny_RFB, BN folded, numeric tensor names, opset 11).

    Input "input" [1,3,240,320] RGB, (x - 127) / 128. Outputs "scores" [1,4420,2] (Softmax over
    background/face) and "boxes" [1,4420,4] corner-form (x1,y1,x2,y2) normalised to [0,1], decoded in
    the graph from SSD priors with variances 0.1 (centre) and 0.2 (size):
    centre = prior_c + loc_c * 0.1 * prior_wh, size = prior_wh * exp(loc_wh * 0.2), box = centre -/+ size/2.
    """
    g = _Graph(2101, numeric_from=245)

    def conv_bn(x: str, cin: int, cout: int, s: int, nm: str) -> str:
        return g.relu(g.conv(x, cin, cout, 3, s, name=f"{nm}.0"), f"{nm}.2")

    def conv_dw(x: str, cin: int, cout: int, s: int, nm: str) -> str:
        x = g.relu(g.conv(x, cin, cin, 3, s, g=cin, name=f"{nm}.0"), f"{nm}.2")
        return g.relu(g.conv(x, cin, cout, 1, name=f"{nm}.3"), f"{nm}.5")

    def basic(x: str, cin: int, cout: int, k: int, nm: str, relu: bool = True, d: int = 1) -> str:
        y = g.conv(x, cin, cout, k, d=d, name=f"{nm}.conv")
        return g.relu(y, f"{nm}.relu") if relu else y

    def rfb(x: str, c: int, nm: str) -> str:
        i = c // 8
        b0 = basic(basic(basic(x, c, i, 1, f"{nm}.branch0.0", relu=False), i, 2 * i, 3, f"{nm}.branch0.1"),
                   2 * i, 2 * i, 3, f"{nm}.branch0.2", relu=False, d=2)
        b1 = basic(basic(basic(x, c, i, 1, f"{nm}.branch1.0", relu=False), i, 2 * i, 3, f"{nm}.branch1.1"),
                   2 * i, 2 * i, 3, f"{nm}.branch1.2", relu=False, d=3)
        b2 = basic(x, c, i, 1, f"{nm}.branch2.0", relu=False)
        b2 = basic(basic(b2, i, i // 2 * 3, 3, f"{nm}.branch2.1"), i // 2 * 3, 2 * i, 3, f"{nm}.branch2.2")
        b2 = basic(b2, 2 * i, 2 * i, 3, f"{nm}.branch2.3", relu=False, d=5)
        y = basic(g.op("Concat", [b0, b1, b2], f"{nm}.cat", axis=1), 6 * i, c, 1, f"{nm}.ConvLinear", relu=False)
        y = g.op("Mul", [y, g.f32(f"{nm}.scale", 1.0)], f"{nm}.mul")  # out * self.scale (1.0) survives export
        short = basic(x, c, c, 1, f"{nm}.shortcut", relu=False)
        return g.relu(g.op("Add", [y, short], f"{nm}.add"), f"{nm}.relu")

    def head(x: str, cin: int, cout: int, nm: str, separable: bool) -> str:
        """SeperableConv2d (depthwise 3x3 + ReLU + pointwise 1x1, no BN) or, on the last level, a plain 3x3."""
        if separable:
            x = g.relu(g.conv(x, cin, cin, 3, g=cin, name=f"{nm}.0", fold_bn=False), f"{nm}.1")
            return g.conv(x, cin, cout, 1, name=f"{nm}.2", fold_bn=False, gain=0.5)
        return g.conv(x, cin, cout, 3, name=nm, fold_bn=False, gain=0.5)

    def flat(t: str, k: int, nm: str) -> str:  # permute(0,2,3,1) + view(x.size(0), -1, k), legacy-export style
        t = g.op("Transpose", [t], f"{nm}.permute", perm=[0, 2, 3, 1])
        n = g.op("Gather", [g.op("Shape", [t], f"{nm}.shape"), g.i64(f"{nm}.zero", 0)], f"{nm}.gather", axis=0)
        n = g.op("Unsqueeze", [n], f"{nm}.unsqueeze", axes=[0])
        shape = g.op("Concat", [n, g.i64(f"{nm}.m1", [-1]), g.i64(f"{nm}.k", [k])], f"{nm}.cat", axis=0)
        return g.op("Reshape", [t, shape], f"{nm}.view")

    x = conv_bn("input", 3, 16, 2, "base_net.0")
    for idx, (ci, co, s) in enumerate([(16, 32, 1), (32, 32, 2), (32, 32, 1), (32, 64, 2), (64, 64, 1),
                                       (64, 64, 1)], start=1):
        x = conv_dw(x, ci, co, s, f"base_net.{idx}")
    x = rfb(x, 64, "base_net.7")
    feats = [(x, 64)]
    for idx, (ci, co, s) in enumerate([(64, 128, 2), (128, 128, 1), (128, 128, 1)], start=8):
        x = conv_dw(x, ci, co, s, f"base_net.{idx}")
    feats.append((x, 128))
    for idx, (ci, co, s) in enumerate([(128, 256, 2), (256, 256, 1)], start=11):
        x = conv_dw(x, ci, co, s, f"base_net.{idx}")
    feats.append((x, 256))
    # extras have no BN in Mb_Tiny_RFB; trained weights keep them in scale, random ones need one folded in
    x = g.relu(g.conv(x, 256, 64, 1, name="extras.0.0", fold_bn=True, gain=1.0), "extras.0.1")
    x = g.relu(g.conv(x, 64, 64, 3, 2, g=64, name="extras.0.2.0", fold_bn=True, gain=1.0), "extras.0.2.1")
    x = g.relu(g.conv(x, 64, 256, 1, name="extras.0.2.2", fold_bn=True, gain=1.0), "extras.0.3")
    feats.append((x, 256))

    confs, locs, cls_convs = [], [], []
    for lvl, ((f, c), boxes) in enumerate(zip(feats, ULTRAFACE_MIN_BOXES)):
        a = len(boxes)
        confs.append(flat(head(f, c, 2 * a, f"classification_headers.{lvl}", lvl < 3), 2, f"conf{lvl}"))
        cls_convs.append(f"classification_headers.{lvl}" + (".2" if lvl < 3 else ""))  # its last conv
        locs.append(flat(head(f, c, 4 * a, f"regression_headers.{lvl}", lvl < 3), 4, f"loc{lvl}"))
    conf = g.op("Concat", confs, "conf.cat", axis=1)
    loc = g.op("Concat", locs, "loc.cat", axis=1)
    g.op("Softmax", [conf], "softmax", out="scores", axis=2)

    priors = ultraface_priors()[None]
    p_c, p_wh = g.const("priors_center", priors[..., :2]), g.const("priors_size", priors[..., 2:])
    l_c = g.op("Slice", [loc, g.i64("s0", [0]), g.i64("e0", [2]), g.i64("a0", [2])], "slice_center")
    l_s = g.op("Slice", [loc, g.i64("s1", [2]), g.i64("e1", [4]), g.i64("a1", [2])], "slice_size")
    centre = g.op("Add", [g.op("Mul", [g.op("Mul", [l_c, g.f32("center_variance", 0.1)], "mul_cv"), p_wh],
                               "mul_pwh"), p_c], "add_pc")
    size = g.op("Mul", [g.op("Exp", [g.op("Mul", [l_s, g.f32("size_variance", 0.2)], "mul_sv")], "exp"), p_wh],
                "mul_size")
    half = g.op("Div", [size, g.f32("two", 2.0)], "half")
    g.op("Concat", [g.op("Sub", [centre, half], "x1y1"), g.op("Add", [centre, half], "x2y2")], "boxes.cat",
         out="boxes", axis=2)
    m = g.model("torch-jit-export", [("input", [1, 3, 240, 320])],
                [("scores", [1, 4420, 2]), ("boxes", [1, 4420, 4])], 11, 6, "pytorch", ultraface.__doc__ or "")

    feeds = _feeds(4, 240, 320, bgr=False, mean=127.0, scale=1 / 128)
    _calibrate_bn(m, feeds, g.pending_bn)
    for lvl, name in enumerate(locs):  # trained regressors give offsets of order 1: exp(0.2 * loc) stays finite
        last = f"regression_headers.{lvl}" + (".2" if lvl < 3 else "")
        std = 5.0 * float(np.std(_run(m, feeds, [name])[name])) or 1.0  # real photos drive it ~5x harder
        for param in (f"{last}.weight", g.bias_of(last)):
            _set(m, param, _sig(_get(m, param) / std))
    logits = _run(m, feeds, [conf])[conf]
    start = 0
    for lvl, ((fw, fh), boxes) in enumerate(zip(ULTRAFACE_FMAPS, ULTRAFACE_MIN_BOXES)):
        rows = fw * fh * len(boxes)
        bias_name = g.bias_of(cls_convs[lvl])
        bias = _get(m, bias_name)
        diff = logits[:, start:start + rows, 1] - logits[:, start:start + rows, 0]
        bias[1::2] += _rate_bias(diff, FACE_RATE)  # channels are (background, face) per prior
        _set(m, bias_name, bias)
        start += rows
    return m


def build_ultraface_rfb320(directory: Path) -> Path:
    return _save(ultraface(), directory, "ultraface-rfb320")


# -- 3. YuNet (OpenCV face_detection_yunet_2023mar layout) ----------------------------------------------------------

YUNET_SIZE = 320  # the released model runs at 640x640; 320 keeps the harness fast
YUNET_STRIDES = (8, 16, 32)


def yunet() -> onnx.ModelProto:
    """YuNet 2023mar layout: ConvDPUnit blocks (1x1 conv + depthwise 3x3, BN folded), TFPN neck, 4 heads.

    Input "input" [1,3,320,320]: BGR, 0..255, NOT normalised (cv::dnn::blobFromImage with defaults,
    after zero-padding bottom/right to a multiple of 32). Twelve outputs, in OpenCV's order:
    cls_8, cls_16, cls_32, obj_8, obj_16, obj_32 [1,HW,1] (Sigmoid applied), bbox_8/16/32 [1,HW,4],
    kps_8/16/32 [1,HW,10]; HW = (320/s)^2 = 1600, 400, 100, row-major over (row r, col c).

    Decoding (OpenCV modules/objdetect/src/face_detect.cpp, FaceDetectorYNImpl::postProcess), per stride s
    and location idx = r*cols + c:
        score = sqrt(clamp(cls, 0, 1) * clamp(obj, 0, 1))
        cx = (c + bbox[0]) * s;  cy = (r + bbox[1]) * s;  w = exp(bbox[2]) * s;  h = exp(bbox[3]) * s
        face = (cx - w/2, cy - h/2, w, h)   # top-left corner + size, not corners
        landmark n (0..4) = ((kps[2n] + c) * s, (kps[2n+1] + r) * s)   # right eye, left eye, nose, mouth r/l
    then NMSBoxes(score_threshold, nms_threshold, top_k). No anchors, no variances.
    """
    g = _Graph(2201)

    def dp(x: str, cin: int, cout: int, nm: str, relu: bool = True) -> str:
        """ConvDPUnit: 1x1 conv then depthwise 3x3 (+ folded BN + ReLU when withBNRelu)."""
        y = g.conv(x, cin, cout, 1, name=f"/{nm}/conv1/Conv", fold_bn=False, gain=1.0)
        y = g.conv(y, cout, cout, 3, g=cout, name=f"/{nm}/conv2/Conv", fold_bn=relu, gain=2.0 if relu else 0.5)
        return g.relu(y, f"/{nm}/relu/Relu") if relu else y

    def pool(x: str, nm: str) -> str:
        return g.op("MaxPool", [x], nm, kernel_shape=[2, 2], strides=[2, 2], pads=[0, 0, 0, 0])

    # BGR 0..255 straight in: after BN calibration the stem's weights absorb the scale and the mean.
    x = g.relu(g.conv("input", 3, 16, 3, 2, name="/backbone/model0/conv1/Conv"), "/backbone/model0/conv1/relu/Relu")
    x = dp(x, 16, 16, "backbone/model0/conv2")
    x = pool(x, "/backbone/maxpool0/MaxPool")
    x = dp(dp(x, 16, 16, "backbone/model1/conv1"), 16, 64, "backbone/model1/conv2")
    feats = []
    for i in (2, 3, 4):
        x = pool(x, f"/backbone/maxpool{i - 1}/MaxPool")
        x = dp(dp(x, 64, 64, f"backbone/model{i}/conv1"), 64, 64, f"backbone/model{i}/conv2")
        feats.append(x)
    scales = g.f32("neck.scales", [1.0, 1.0, 2.0, 2.0])
    p32 = dp(feats[2], 64, 64, "neck/lateral_convs.2")
    up = g.op("Resize", [p32, "", scales], "/neck/Resize", mode="nearest")
    p16 = dp(g.op("Add", [feats[1], up], "/neck/Add"), 64, 64, "neck/lateral_convs.1")
    up = g.op("Resize", [p16, "", scales], "/neck/Resize_1", mode="nearest")
    p8 = dp(g.op("Add", [feats[0], up], "/neck/Add_1"), 64, 64, "neck/lateral_convs.0")

    heads: dict[str, list[tuple[str, int, int]]] = {"cls": [], "obj": [], "bbox": [], "kps": []}
    logit_bias: dict[str, tuple[str, str]] = {}  # output -> (pre-sigmoid tensor, bias initializer)
    for i, (f, s) in enumerate(zip((p8, p16, p32), YUNET_STRIDES)):
        f = dp(f, 64, 64, f"bbox_head/multi_level_share_convs.{i}")
        for key, k in (("cls", 1), ("obj", 1), ("bbox", 4), ("kps", 10)):
            y = dp(f, 64, k, f"bbox_head/multi_level_{key}.{i}", relu=False)
            bias_name = g.nodes[-1].input[2]
            y = g.op("Transpose", [y], f"/bbox_head/{key}_{s}/Transpose", perm=[0, 2, 3, 1])
            sigmoid = key in ("cls", "obj")
            y = g.op("Reshape", [y, g.i64(f"/bbox_head/{key}_{s}/shape", [1, -1, k])],
                     f"/bbox_head/{key}_{s}/Reshape", out=None if sigmoid else f"{key}_{s}")
            if sigmoid:
                logit_bias[f"{key}_{s}"] = (y, bias_name)
                y = g.op("Sigmoid", [y], f"/bbox_head/{key}_{s}/Sigmoid", out=f"{key}_{s}")
            heads[key].append((y, (YUNET_SIZE // s) ** 2, k))
    outputs = [(n, [1, hw, k]) for key in ("cls", "obj", "bbox", "kps") for n, hw, k in heads[key]]
    m = g.model("main_graph", [("input", [1, 3, YUNET_SIZE, YUNET_SIZE])], outputs, 13, 7, "pytorch",
                yunet.__doc__ or "")

    feeds = _feeds(4, YUNET_SIZE, YUNET_SIZE, bgr=True, mean=0.0, scale=1.0)
    _calibrate_bn(m, feeds, g.pending_bn)
    got = _run(m, feeds, [t for t, _ in logit_bias.values()])
    for s in YUNET_STRIDES:  # obj: median 0.8; cls: FACE_RATE of locations with sqrt(cls * obj) > 0.5
        (c_t, c_b), (o_t, o_b) = logit_bias[f"cls_{s}"], logit_bias[f"obj_{s}"]
        o_shift = float(np.round(np.log(4.0) - np.median(got[o_t]), 2))
        obj = 1.0 / (1.0 + np.exp(-(got[o_t] + o_shift)))
        lo, hi = -30.0, 30.0
        for _ in range(60):
            mid = (lo + hi) / 2
            rate = (np.sqrt(obj / (1.0 + np.exp(-(got[c_t] + mid)))) > 0.5).mean()
            lo, hi = (mid, hi) if rate < FACE_RATE else (lo, mid)
        _set(m, o_b, _get(m, o_b) + o_shift)
        _set(m, c_b, _get(m, c_b) + float(np.round(hi, 2)))
    return m


def build_yunet_2023mar(directory: Path) -> Path:
    return _save(yunet(), directory, "yunet-2023mar")


# -- 4. NHWC RetinaFace with numeric output names -------------------------------------------------------------------

RETINA_NHWC_SIZE = 320
_RETINA_NHWC_NAMES = {"loc": "443", "conf": "444", "landmarks": "445"}


def _rename(model: onnx.ModelProto, mapping: dict[str, str]) -> None:
    """Rename tensors everywhere (node inputs/outputs, graph inputs/outputs, value_info, initializers)."""
    g = model.graph
    for node in g.node:
        node.input[:] = [mapping.get(n, n) for n in node.input]
        node.output[:] = [mapping.get(n, n) for n in node.output]
    for vi in [*g.input, *g.output, *g.value_info]:
        vi.name = mapping.get(vi.name, vi.name)
    for t in g.initializer:
        t.name = mapping.get(t.name, t.name)


def _set_shape(vi: onnx.ValueInfoProto, dims: Sequence[Dim]) -> None:
    shape = vi.type.tensor_type.shape
    del shape.dim[:]
    for d in dims:
        dim = shape.dim.add()
        if isinstance(d, int):
            dim.dim_value = d
        else:
            dim.dim_param = d


def retinaface_nhwc() -> onnx.ModelProto:
    """sample_models' RetinaFace behind a Transpose: input "input_1" [1,320,320,3] NHWC, BGR convention.

    Outputs (numeric, as a TorchScript export without output_names): "443" loc [1,4200,4],
    "444" conf [1,4200,2] (Softmax; channel 1 = face), "445" landmarks [1,4200,10];
    4200 = (40^2 + 20^2 + 10^2) * 2 anchors. BN statistics measured on images fed the imitated way
    (Pytorch_Retinaface: BGR, x - (104, 117, 123), no scaling), face bias set for FACE_RATE per level.
    """
    m = generate.retinaface()
    g = m.graph
    _rename(m, {"input": "input.nchw", **_RETINA_NHWC_NAMES})
    g.input.remove(g.input[0])
    g.input.append(helper.make_tensor_value_info("input_1", TensorProto.FLOAT,
                                                 [1, RETINA_NHWC_SIZE, RETINA_NHWC_SIZE, 3]))
    g.node.insert(0, helper.make_node("Transpose", ["input_1"], ["input.nchw"], name="Transpose_0", perm=[0, 3, 1, 2]))
    levels = [(RETINA_NHWC_SIZE // s) ** 2 * 2 for s in (8, 16, 32)]
    for out, k in zip(g.output, (4, 2, 10)):
        _set_shape(out, [1, sum(levels), k])
    m.doc_string = retinaface_nhwc.__doc__ or ""
    m.producer_name = "pytorch"
    onnx.checker.check_model(m, full_check=True)

    feeds = _feeds(4, RETINA_NHWC_SIZE, RETINA_NHWC_SIZE, bgr=True, mean=(104.0, 117.0, 123.0), scale=1.0, nhwc=True)
    _calibrate_bn(m, feeds)
    logits = _run(m, feeds, ["conf.concat"])["conf.concat"]
    start = 0
    for i, rows in enumerate(levels):
        diff = logits[:, start:start + rows, 1] - logits[:, start:start + rows, 0]
        bias = _get(m, f"ClassHead.{i}.conv1x1.bias")
        bias[1::2] += _rate_bias(diff, FACE_RATE)
        _set(m, f"ClassHead.{i}.conv1x1.bias", bias)
        start += rows
    return m


def build_retinaface_nhwc_bgr(directory: Path) -> Path:
    return _save(retinaface_nhwc(), directory, "retinaface-nhwc-bgr")


# -- 5. 3DDFA-like 62-parameter regressor --------------------------------------------------------------------------

def tddfa() -> onnx.ModelProto:
    """3DDFA_V2 mb05_120x120 layout: MobileNetV1 x0.5 (BN folded), GAP, Flatten, Gemm to 62 parameters.

    Input "input" [1,3,120,120]: BGR crop, (x - 127.5) / 128. Output "output" [1,62]: 12 pose
    (3x4 camera matrix, row-major) + 40 shape + 10 expression coefficients, all normalised
    (the app multiplies by param_std and adds param_mean). No softmax: a pure regression head.
    """
    g = _Graph(2301)
    c = lambda n: max(8, int(n * 0.5))  # noqa: E731  widen_factor 0.5

    x = g.relu(g.conv("input", 3, c(32), 3, 2, name="conv1"), "relu")
    cin = c(32)
    plan = [(64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2), (512, 1), (512, 1), (512, 1), (512, 1),
            (512, 1), (1024, 2), (1024, 1)]
    for i, (cout, s) in enumerate(plan, start=2):
        x = g.relu(g.conv(x, cin, cin, 3, s, g=cin, name=f"dw{i}_1.conv_dw"), f"dw{i}_1.relu_dw")
        x = g.relu(g.conv(x, cin, c(cout), 1, name=f"dw{i}_1.conv_sep"), f"dw{i}_1.relu_sep")
        cin = c(cout)
    x = g.op("Flatten", [g.op("GlobalAveragePool", [x], "avgpool")], "flatten", axis=1)
    w = g.rng.normal(0.0, np.sqrt(1.0 / cin), (62, cin)).astype(np.float32)
    g.op("Gemm", [x, g.const("fc.weight", w), g.const("fc.bias", g.rng.normal(0, 0.05, 62).astype(np.float32))],
         "fc", out="output", transB=1)
    m = g.model("main_graph", [("input", [1, 3, 120, 120])], [("output", [1, 62])], 11, 6, "pytorch",
                tddfa.__doc__ or "")
    _calibrate_bn(m, _feeds(8, 120, 120, bgr=True, mean=127.5, scale=1 / 128), g.pending_bn)
    return m


def build_3ddfa_mb05(directory: Path) -> Path:
    return _save(tddfa(), directory, "3ddfa-mb05")


# -- 6. SCRFD as insightface's scrfd2onnx.py exports it -----------------------------------------------------------

SCRFD_SIZE = 320  # official exports use 640x640 (or dynamic); 320 keeps the harness fast
# det_10g.onnx (buffalo_l) names: scores 8/16/32, then bboxes, then kps.
SCRFD_NAMES = ("448", "471", "494", "451", "474", "497", "454", "477", "500")


def scrfd_official(batched: bool) -> onnx.ModelProto:
    """sample_models' SCRFD with the official interface: input "input.1" [1,3,320,320], numeric outputs.

    Outputs in insightface order: scores s8,s16,s32 ("448","471","494"; Sigmoid), bboxes ("451","474",
    "497"; distances l,t,r,b in stride units), kps ("454","477","500"; dx,dy x5 in stride units).
    ``batched``: [1,A,C] (insightface sets ``batched`` when outputs are 3-D); otherwise [A,C] as the
    non-batched export (head Reshape to (-1, C)). A = (320/s)^2 * 2 anchors = 3200, 800, 200.
    Convention: RGB (blobFromImage swapRB=True), (x - 127.5) / 128.
    """
    m = generate.scrfd()
    g = m.graph
    order = [f"{k}_{s}" for k in ("score", "bbox", "kps") for s in (8, 16, 32)]
    assert [o.name for o in g.output] == order, [o.name for o in g.output]
    _rename(m, {"input": "input.1", **dict(zip(order, SCRFD_NAMES))})
    _set_shape(g.input[0], [1, 3, SCRFD_SIZE, SCRFD_SIZE])
    if not batched:  # cls_score.permute(0, 2, 3, 1).reshape(-1, C): the batch folds into the rows
        for t in g.initializer:
            if t.name.endswith(".shape") and t.name.startswith("head.stride"):
                k = int(numpy_helper.to_array(t)[-1])
                t.CopyFrom(numpy_helper.from_array(np.array([-1, k], dtype=np.int64), t.name))
    for out, key in zip(g.output, order):
        kind, s = key.split("_")
        rows, k = (SCRFD_SIZE // int(s)) ** 2 * 2, {"score": 1, "bbox": 4, "kps": 10}[kind]
        _set_shape(out, [1, rows, k] if batched else [rows, k])
    m.doc_string = scrfd_official.__doc__ or ""
    m.producer_name = "pytorch"
    onnx.checker.check_model(m, full_check=True)

    feeds = _feeds(4, SCRFD_SIZE, SCRFD_SIZE, bgr=False, mean=127.5, scale=1 / 128)
    _calibrate_bn(m, feeds)
    views = [f"head.stride{s}.score.view" for s in (8, 16, 32)]
    got = _run(m, feeds, views)
    for s, v in zip((8, 16, 32), views):
        _set(m, f"head.stride{s}.score.bias", _get(m, f"head.stride{s}.score.bias") + _rate_bias(got[v], FACE_RATE))
    dists = _run(m, feeds, [f"head.stride{s}.bbox" for s in (8, 16, 32)])
    for s in (8, 16, 32):  # trained distances are positive (about 2 strides); random ones would invert boxes
        d, conv = dists[f"head.stride{s}.bbox"], f"head.stride{s}.bbox"
        gain = 0.5 / (float(d.std()) or 1.0)
        _set(m, f"{conv}.weight", _sig(_get(m, f"{conv}.weight") * gain))
        _set(m, f"{conv}.bias", _sig((_get(m, f"{conv}.bias") - float(d.mean())) * gain + 2.0))
    return m


def build_scrfd_official_batched(directory: Path) -> Path:
    return _save(scrfd_official(True), directory, "scrfd-official-batched")


def build_scrfd_official_flat(directory: Path) -> Path:
    return _save(scrfd_official(False), directory, "scrfd-official-flat")


# -- registry -------------------------------------------------------------------------------------------------------

def _mtcnn_entry(name: str, build: Callable[[Path], Path]) -> UnseenModel:
    net, shape, dyn, opset = _MTCNN_EXPORTS[name]
    inp: tuple[Dim, ...] = tuple(dyn.get(i, d) for i, d in enumerate(shape))
    batch: Dim = "N" if dyn else 1
    if net == "pnet":
        if dyn:
            outs = (("reg", ("N", 4, "h", "w")), ("prob", ("N", 2, "h", "w")))
        else:  # 240x320 -> conv 238x318 -> pool 119x159 -> 117x157 -> 115x155
            outs = (("reg", (1, 4, 115, 155)), ("prob", (1, 2, 115, 155)))
    elif net == "rnet":
        outs = (("reg", (batch, 4)), ("prob", (batch, 2)))
    else:
        outs = (("reg", (batch, 4)), ("landmarks", (batch, 10)), ("prob", (batch, 2)))
    what = {"pnet": "P-Net (fully convolutional proposal net; reg = box offsets per 12x12 cell, prob = "
                    "Softmax over channels, channel 1 = face)",
            "rnet": "R-Net (24x24 crops; Transpose(0,3,2,1) before Flatten->Gemm)",
            "onet": "O-Net (48x48 crops; landmarks = x1..x5 then y1..y5, relative to box w/h)"}[net]
    batching = "dynamic batch" + (" and H/W" if net == "pnet" and dyn else "") if dyn else "fixed batch 1"
    return UnseenModel(
        name, build, "detection", "mtcnn", True,
        f"facenet-pytorch 2.6.0 MTCNN {what}: real weights, TorchScript exporter (dynamo=False), opset {opset}, "
        f"{batching}, PReLU, ceil_mode MaxPool", (("input", inp),), outs, "NCHW", MTCNN_PREPROCESS)


_RETINA_ROWS = sum((RETINA_NHWC_SIZE // s) ** 2 for s in (8, 16, 32)) * 2
_YUNET_OUTS = tuple((f"{key}_{s}", (1, (YUNET_SIZE // s) ** 2, k))
                    for key, k in (("cls", 1), ("obj", 1), ("bbox", 4), ("kps", 10)) for s in YUNET_STRIDES)
_SCRFD_ROWS = {s: (SCRFD_SIZE // s) ** 2 * 2 for s in (8, 16, 32)}
_SCRFD_OUTS = tuple((n, (_SCRFD_ROWS[s], k))
                    for n, (s, k) in zip(SCRFD_NAMES, [(s, k) for k in (1, 4, 10) for s in (8, 16, 32)]))

UNSEEN: dict[str, UnseenModel] = {e.name: e for e in [
    _mtcnn_entry("facenet-mtcnn-pnet", build_facenet_mtcnn_pnet),
    _mtcnn_entry("facenet-mtcnn-pnet-b1", build_facenet_mtcnn_pnet_b1),
    _mtcnn_entry("facenet-mtcnn-rnet", build_facenet_mtcnn_rnet),
    _mtcnn_entry("facenet-mtcnn-rnet-b1", build_facenet_mtcnn_rnet_b1),
    _mtcnn_entry("facenet-mtcnn-onet", build_facenet_mtcnn_onet),
    _mtcnn_entry("facenet-mtcnn-onet-b1", build_facenet_mtcnn_onet_b1),
    UnseenModel("ultraface-rfb320", build_ultraface_rfb320, "detection", "ultraface", False,
                "Ultra-Light-Fast-Generic-Face-Detector-1MB version-RFB-320 (random weights, BN folded, opset 11, "
                "numeric tensor names): SSD heads at strides 8/16/32/64, 3/2/2/3 priors, Softmax and prior "
                "decoding inside the graph",
                (("input", (1, 3, 240, 320)),), (("scores", (1, 4420, 2)), ("boxes", (1, 4420, 4))), "NCHW",
                "RGB, (x - 127) / 128, resized to 320x240"),
    UnseenModel("yunet-2023mar", build_yunet_2023mar, "detection", "yunet", False,
                "OpenCV face_detection_yunet_2023mar layout at 320x320 (random weights, opset 13): anchor-free, "
                "12 outputs cls/obj/bbox/kps x strides 8/16/32, ConvDPUnit blocks, nearest Resize neck",
                (("input", (1, 3, YUNET_SIZE, YUNET_SIZE)),), _YUNET_OUTS, "NCHW",
                "BGR, 0..255 unnormalised (blobFromImage defaults), zero-padded bottom/right to a multiple of 32"),
    UnseenModel("retinaface-nhwc-bgr", build_retinaface_nhwc_bgr, "detection", "retinaface", False,
                "RetinaFace-MobileNet0.25 with a leading NHWC->NCHW Transpose, fixed [1,320,320,3], numeric output "
                "names 443/444/445 (loc, conf, landmarks)",
                (("input_1", (1, RETINA_NHWC_SIZE, RETINA_NHWC_SIZE, 3)),),
                (("443", (1, _RETINA_ROWS, 4)), ("444", (1, _RETINA_ROWS, 2)), ("445", (1, _RETINA_ROWS, 10))),
                "NHWC", "BGR, x - (104, 117, 123), no scaling"),
    UnseenModel("3ddfa-mb05", build_3ddfa_mb05, "outputs", "3ddfa", False,
                "3DDFA_V2 mb05_120x120 layout (random weights, opset 11): MobileNetV1 x0.5 regressing 62 "
                "normalised 3DMM parameters (12 pose + 40 shape + 10 expression)",
                (("input", (1, 3, 120, 120)),), (("output", (1, 62)),), "NCHW", "BGR, (x - 127.5) / 128"),
    UnseenModel("scrfd-official-batched", build_scrfd_official_batched, "detection", "scrfd", False,
                "SCRFD as scrfd2onnx.py exports it, batched heads: input.1 fixed [1,3,320,320], numeric outputs "
                "(scores 8/16/32, bboxes, kps) each [1,A,C], 2 anchors per location",
                (("input.1", (1, 3, SCRFD_SIZE, SCRFD_SIZE)),), tuple((n, (1, *s)) for n, s in _SCRFD_OUTS),
                "NCHW", "RGB, (x - 127.5) / 128"),
    UnseenModel("scrfd-official-flat", build_scrfd_official_flat, "detection", "scrfd", False,
                "SCRFD as insightface's non-batched export: input.1 fixed [1,3,320,320], numeric outputs each 2-D "
                "[A,C] (head Reshape(-1, C) folds the batch into the rows)",
                (("input.1", (1, 3, SCRFD_SIZE, SCRFD_SIZE)),), _SCRFD_OUTS, "NCHW", "RGB, (x - 127.5) / 128"),
]}


# family -> (BGR?, mean, scale) of the pipeline each model imitates
_PIPELINE: dict[str, tuple[bool, float | tuple[float, float, float], float]] = {
    "mtcnn": (False, 127.5, 0.0078125), "ultraface": (False, 127.0, 1 / 128), "yunet": (True, 0.0, 1.0),
    "retinaface": (True, (104.0, 117.0, 123.0), 1.0), "3ddfa": (True, 127.5, 1 / 128),
    "scrfd": (False, 127.5, 1 / 128),
}


def example_inputs(name: str, count: int = 2, seed: int = 1, size: tuple[int, int] = (120, 160)) -> list[np.ndarray]:
    """``count`` batch-1 inputs for ``UNSEEN[name]``: natural_images() preprocessed as its pipeline does.

    ``size`` (h, w) fills dynamic spatial dims (P-Net). Seed 1 differs from the builders' calibration seed 11.
    """
    entry = UNSEEN[name]
    (_, shape), = entry.inputs
    nhwc = entry.layout == "NHWC"
    h, w = (shape[1], shape[2]) if nhwc else (shape[2], shape[3])
    h, w = (h if isinstance(h, int) else size[0]), (w if isinstance(w, int) else size[1])
    bgr, mean, scale = _PIPELINE[entry.family]
    return _feeds(count, h, w, bgr=bgr, mean=mean, scale=scale, nhwc=nhwc, seed=seed)
