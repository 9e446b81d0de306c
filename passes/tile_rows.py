"""Run a model's first high-resolution layers in horizontal strips, so their activations stay in cache.

Face detectors open with narrow layers on the full image: RetinaFace-mnet0.25's 3->8 stem and
8-channel depthwise conv write 320x320 activations that ONNX Runtime's NCHWc kernels pad to 16
channels (6.5 MB each). At that size the layers are bound by memory traffic, not arithmetic, and
in an int8 model they are the float prefix (int8 kernels are slower there, see
``quantization/latency.py``) whose output is reordered and quantized in two more passes over
memory. Cut into K strips of rows, each strip's chain runs on tensors that fit in the cache.

The rewrite is exact and needs no guard: strip k computes rows [a_k, b_k) of the chain's last
tensor by running copies of the chain's nodes, each keeping its own padding, on the input rows
[lo_k, hi_k) that cover those rows' receptive field. Rows a strip computes next to its cut read
zero padding where the original read real rows; those rows are sliced away, and only rows whose
whole receptive field is real (or is the image border's own padding) are kept and concatenated.
Strip bounds are computed at run time from the input height, so dynamic sizes stay dynamic; the
plan is checked against every height a dynamic input may take (up to ``_CHECK_HEIGHTS``) and the
strip count lowered until it is exact. Float models gain nothing from this (their first layers are
compute-bound); the int8 model's float prefix does, which is why ``quantize`` applies it.

Ops a chain may hold: Conv and Max/AveragePool (2-D, explicit or VALID padding, floor mode),
elementwise activations, per-channel affine ops (BatchNormalization, Add/Mul/... by a constant,
PRelu) and Quantize/DequantizeLinear. The chain follows single-use edges from the image input and
stops at the first tensor smaller than the cache budget, or at any other op.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from .checks import CheckedPass, check_output

CACHE_BUDGET = 1 << 20  # bytes per strip of the chain's largest tensor (~L2 of a server core)
MAX_STRIPS = 8
_CHECK_HEIGHTS = 2048  # dynamic heights checked for exactness

_UNARY = {"Relu", "LeakyRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Elu", "Selu", "Softplus",
          "Clip", "Identity", "Neg", "Abs", "Exp", "Celu", "Gelu", "Mish", "Softsign", "ThresholdedRelu"}
_PER_CHANNEL = {"Add", "Sub", "Mul", "Div", "PRelu", "BatchNormalization", "QuantizeLinear", "DequantizeLinear"}
_WINDOW = {"Conv", "MaxPool", "AveragePool"}
_BIG = np.iinfo(np.int64).max


@dataclass(frozen=True)
class _Window:
    """How one window op maps rows: out = (in + top + bottom - extent) // stride + 1."""

    extent: int  # dilation * (kernel - 1) + 1
    stride: int
    top: int
    bottom: int

    def out(self, h: int) -> int:
        return (h + self.top + self.bottom - self.extent) // self.stride + 1


@dataclass(frozen=True)
class TileRecord:
    nodes: list[str] = field(default_factory=list)  # the chain that now runs in strips
    strips: int = 0
    reason: str = ""  # why nothing was tiled

    @property
    def tiled(self) -> bool:
        return self.strips > 1


@dataclass
class TileResult(ir.passes.PassResult):
    record: TileRecord = field(default_factory=TileRecord)


class TileRows(CheckedPass, ir.passes.FunctionalPass):
    """Run the model's high-resolution prefix in row strips (see the module doc); the input model is not modified.

    ``input_shape``: the concrete [N, C, H, W] the chain is sized for (the input's static dims by
    default); ``strips`` forces the strip count instead of sizing strips to ``budget``.
    """

    def __init__(self, input_shape: tuple[int, ...] | None = None, *, budget: int = CACHE_BUDGET,
                 strips: int | None = None, check: bool | None = None) -> None:
        super().__init__(check=check)
        self.input_shape, self.budget, self.strips = input_shape, budget, strips

    def call(self, model: ir.Model) -> TileResult:
        model = model.clone()
        graph = model.graph
        x = _image_input(graph)
        if x is None:
            return TileResult(model, False, TileRecord(reason="no 4-D float image input"))
        given = self.input_shape
        shape = tuple(given) if given else tuple(d if isinstance(d, int) else None for d in x.shape)
        if len(shape) != 4 or not all(isinstance(d, int) and d > 0 for d in shape[1:]):
            return TileResult(model, False, TileRecord(reason="input size unknown (give a concrete input shape)"))
        if model.opset_imports.get("", 1) < 12:
            return TileResult(model, False, TileRecord(reason="opset below 12 (no int64 Min/Max for the strip bounds)"))
        chain, windows, largest = _chain(graph, x, shape, self.budget)
        if not windows:
            return TileResult(model, False, TileRecord(reason="no convolution on a tensor above the cache budget"))
        k = self.strips or min(MAX_STRIPS, max(2, math.ceil(largest / self.budget)))
        # Heights the model may see: its own if static, else every one up to a bound (beyond, strips only grow).
        heights = [x.shape[2]] if isinstance(x.shape[2], int) else range(1, _CHECK_HEIGHTS + 1)
        ws = [windows[i] for i in sorted(windows)]
        while k > 1 and not all(_Plan.of(ws, k).exact(h) for h in heights):
            k -= 1
        if k < 2:
            return TileResult(model, False,
                              TileRecord(reason="strips would not reproduce the chain for every input height"))
        _rewrite(graph, x, chain, _Plan.of(ws, k))
        return TileResult(model, True, TileRecord([n.name or n.op_type for n in chain], k))

    def verify(self, source: ir.Model | None, model: ir.Model) -> None:
        """The output is valid and runs, at ``input_shape`` when given (its height may be symbolic)."""
        x = _image_input(model.graph)
        shapes = {x.name: self.input_shape} if x is not None and self.input_shape else None
        check_output(model, shapes=shapes, source=source)


def tile_rows(model: ir.Model, input_shape: tuple[int, ...] | None = None, *, budget: int = CACHE_BUDGET,
              strips: int | None = None) -> tuple[ir.Model, TileRecord]:
    """A copy of ``model`` whose high-resolution prefix runs in row strips (:class:`TileRows`)."""
    result = TileRows(input_shape, budget=budget, strips=strips)(model)
    return result.model, result.record


def _image_input(graph: ir.Graph) -> ir.Value | None:
    """The first 4-D float input: the image the chain starts from."""
    return next((v for v in graph.inputs if v.shape is not None and len(v.shape) == 4
                 and v.dtype in (ir.DataType.FLOAT, ir.DataType.FLOAT16)), None)


# ------------------------------------------------------------------------------------------ the chain
def _chain(graph: ir.Graph, x: ir.Value, shape: tuple[int, ...], budget: int
           ) -> tuple[list[ir.Node], dict[int, _Window], int]:
    """Nodes on the single-use path from ``x`` whose input is at least ``budget`` bytes per image.

    Returns the nodes, the row mapping of each window op (by position in the chain) and the
    largest tensor's bytes. Ends before the first node that reads a small tensor, cannot be
    tiled, or whose output is read twice (a strip boundary there would need every reader tiled).
    """
    chain: list[ir.Node] = []
    windows: dict[int, _Window] = {}
    c, h, w = shape[1:]
    dtype = x.dtype
    size = int(dtype.itemsize)
    largest = 0
    value = x
    while True:
        uses = list(value.uses())
        if len(uses) != 1 or value.is_graph_output() or uses[0].idx != 0:
            break
        node = uses[0].node
        if c * h * w * size < budget or len(node.outputs) != 1 or node.domain not in ("", "ai.onnx"):
            break
        step = _tileable(node, c)
        if step is None:
            break
        largest = max(largest, c * h * w * size)
        if isinstance(step, tuple):
            (rows, cols), c = step[:2], step[2] or c
            windows[len(chain)] = rows
            h, w = rows.out(h), cols.out(w)
            if h < 1 or w < 1:
                break
        chain.append(node)
        dtype = node.outputs[0].dtype = _out_dtype(node, dtype)  # set: the strips' copies need it
        size = int(dtype.itemsize)
        value = node.outputs[0]
    # a trailing run of cheap ops after the last window op is kept: it is elementwise work on a big tensor
    return chain, windows, largest


def _tileable(node: ir.Node, channels: int):
    """None if ``node`` cannot run in row strips; True for row-wise ops; for window ops
    ((rows, cols), out_channels or None)."""
    op = node.op_type
    others = [v for v in node.inputs[1:] if v is not None]
    if op in _UNARY:
        return True if all(_constant(v) for v in others) else None
    if op in _PER_CHANNEL:
        if not all(_constant(v) for v in others):
            return None
        if op in ("QuantizeLinear", "DequantizeLinear"):
            return True if node.attributes.get_int("axis", 1) in (1, -3) or _scalar(node.inputs[1]) else None
        if op == "BatchNormalization":
            return True if len(node.outputs) == 1 else None
        return True if all(_along_channels(v) for v in others) else None
    if op not in _WINDOW:
        return None
    if op != "Conv" and (node.attributes.get_int("ceil_mode", 0) or len(node.outputs) != 1):
        return None
    if node.attributes.get_string("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
        return None
    out_channels = None
    if op == "Conv":
        weight = node.inputs[1]
        wshape = _const_shape(weight)
        if wshape is None or len(wshape) != 4 or not all(_constant(v) for v in others):
            return None
        kernel = node.attributes.get_ints("kernel_shape", list(wshape[2:]))
        out_channels = int(wshape[0])
    else:
        kernel = node.attributes.get_ints("kernel_shape", [])
    if len(kernel) != 2:
        return None
    strides = node.attributes.get_ints("strides", [1, 1])
    dilations = node.attributes.get_ints("dilations", [1, 1])
    pads = node.attributes.get_ints("pads", [0, 0, 0, 0])
    if node.attributes.get_string("auto_pad", "NOTSET") == "VALID":
        pads = [0, 0, 0, 0]
    rows = _Window(dilations[0] * (kernel[0] - 1) + 1, strides[0], pads[0], pads[2])
    cols = _Window(dilations[1] * (kernel[1] - 1) + 1, strides[1], pads[1], pads[3])
    return (rows, cols, out_channels)


def _out_dtype(node: ir.Node, in_dtype: ir.DataType | None) -> ir.DataType:
    """The element type a chain node outputs (ORT's quantizer leaves most value types unset)."""
    if node.outputs[0].dtype is not None:
        return node.outputs[0].dtype
    if node.op_type == "QuantizeLinear":
        zp = node.inputs[2] if len(node.inputs) > 2 else None
        return zp.dtype if zp is not None and zp.dtype is not None else ir.DataType.UINT8
    if node.op_type == "DequantizeLinear":
        return node.inputs[1].dtype or ir.DataType.FLOAT
    return in_dtype or node.inputs[0].dtype or ir.DataType.FLOAT


def _constant(v: ir.Value) -> bool:
    """An initializer, or a DequantizeLinear of initializers (a QDQ graph's weights)."""
    if v.const_value is not None or v.is_initializer():
        return True
    p = v.producer()
    return p is not None and p.op_type == "DequantizeLinear" and all(
        i is None or i.const_value is not None or i.is_initializer() for i in p.inputs)


def _const_shape(v: ir.Value) -> tuple[int, ...] | None:
    if v.const_value is not None:
        return tuple(v.const_value.shape.numpy())
    p = v.producer()
    if p is not None and p.op_type == "DequantizeLinear" and p.inputs[0].const_value is not None:
        return tuple(p.inputs[0].const_value.shape.numpy())
    return None


def _scalar(v: ir.Value) -> bool:
    s = _const_shape(v)
    return s is not None and int(np.prod(s)) == 1


def _along_channels(v: ir.Value) -> bool:
    """A constant that broadcasts against NCHW without varying along H ([C,1,1], [1], scalar...)."""
    s = _const_shape(v)
    if s is None:
        return False
    s = (1,) * (4 - len(s)) + tuple(s) if len(s) <= 4 else None
    return s is not None and s[0] == 1 and s[2] == 1


# ------------------------------------------------------------------------------------------ the strips
@dataclass(frozen=True)
class _Plan:
    """Row arithmetic shared by the exactness check and the graph that does it at run time.

    Output rows [a, b) of strip s (the chain's last tensor) need input rows [a*scale + start,
    b*scale + end): ``_affine``. A strip reads those rows, rounded out to a multiple of ``scale``
    so its sampling grid lines up with the whole image's, runs the chain with every op's own
    padding, and keeps rows [a - lo/scale, b - lo/scale) of its result. Rows next to a cut are
    computed from fake zero padding there, but they are exactly the ones thrown away.
    """

    windows: tuple[_Window, ...]
    k: int
    scale: int
    start: int
    end: int

    @classmethod
    def of(cls, windows: list[_Window], k: int) -> _Plan:
        return cls(tuple(windows), k, *_affine(windows))

    def heights(self, h: int) -> list[int] | None:
        hs = [h]
        for win in self.windows:
            hs.append(win.out(hs[-1]))
            if hs[-1] < 1:
                return None
        return hs

    def strips(self, h: int) -> list[tuple[int, int, int, int]]:
        """(lo, hi, keep_from, keep_to) per strip for input height ``h``, exactly as the graph computes them."""
        last = self.heights(h)[-1]
        top = ((h - 1) // self.scale) * self.scale
        out = []
        for s in range(self.k):
            a, b = (last * s) // self.k, (last * (s + 1)) // self.k
            lo = min(max(0, (a + self.start // self.scale) * self.scale), top)
            hi = min(h, b * self.scale + self.end)
            out.append((lo, hi, a - lo // self.scale, b - lo // self.scale))
        return out

    def exact(self, h: int) -> bool:
        """Whether the strips reproduce the chain at input height ``h`` (True where the chain itself fails).

        Re-derives each strip's receptive field level by level rather than trusting ``start``/``end``.
        """
        if self.heights(h) is None:
            return True
        for lo, hi, keep_from, keep_to in self.strips(h):
            rows = self.heights(hi - lo) if hi > lo else None
            if rows is None:
                return False  # every strip runs, even one that keeps no rows
            if keep_from == keep_to:
                continue
            if keep_from < 0 or rows[-1] < keep_to or lo % self.scale:
                return False  # rows missing, or the strip's sampling grid is off the image's
            first, last = keep_from + lo // self.scale, keep_to + lo // self.scale - 1
            for win in reversed(self.windows):  # the input rows the kept rows read, padding included
                first, last = first * win.stride - win.top, last * win.stride - win.top + win.extent - 1
            if (lo > 0 and first < lo) or (hi < h and last >= hi):
                return False  # a kept row would read the strip's fake padding
        return True


def _affine(windows: list[_Window]) -> tuple[int, int, int]:
    """(scale, start offset, end offset): output rows [a, b) of the chain read input rows
    [a * scale + start, b * scale + end) (composition of the per-level maps a -> a*s - top,
    b -> b*s + extent - s - top)."""
    scale, start, end = 1, 0, 0
    for win in reversed(windows):
        start, end = start * win.stride - win.top, end * win.stride + win.extent - win.stride - win.top
        scale *= win.stride
    return scale, start, end


class _Builder:
    """Nodes and int64 constants of the tiled graph, all named under one tag (``tile``, ``tile1``...)."""

    def __init__(self, graph: ir.Graph) -> None:
        taken = {n.name.split("/", 1)[0] for n in graph.all_nodes() if n.name}
        # short: names repeat
        self.tag = next(t for t in (f"tile{i or ''}" for i in range(len(taken) + 1)) if t not in taken)
        self.graph = graph
        self.consts: dict[str, ir.Value] = {}
        self.nodes: list[ir.Node] = []

    def const(self, name: str, values) -> ir.Value:
        key = f"{self.tag}/{name}"
        if key not in self.consts:
            arr = np.asarray(values, dtype=np.int64)
            self.consts[key] = ir.Value(name=key, const_value=ir.tensor(arr, name=key), shape=ir.Shape(arr.shape),
                                        type=ir.TensorType(ir.DataType.INT64))
            self.graph.register_initializer(self.consts[key])
        return self.consts[key]

    def op(self, op_type: str, *inputs: ir.Value, name: str, **attrs) -> ir.Value:
        node = ir.Node("", op_type, inputs, [_attr(key, val) for key, val in attrs.items()], name=f"{self.tag}/{name}")
        node.outputs[0].name = node.name
        self.nodes.append(node)
        return node.outputs[0]


def _rewrite(graph: ir.Graph, x: ir.Value, chain: list[ir.Node], plan: _Plan) -> None:
    """Replace ``chain`` by ``plan.k`` strips whose bounds the graph computes from the input's height."""
    base = chain[-1].outputs[0]
    b = _Builder(graph)
    bounds = _bounds(b, x, plan)
    axes = b.const("axes", [2])
    pieces = [_strip(b, x, chain, s, bounds, axes) for s in range(plan.k)]
    for piece in pieces:
        piece.dtype = base.dtype
    joined = ir.Node("", "Concat", pieces, [_attr("axis", 2)], name=f"{b.tag}/concat")
    joined.outputs[0].dtype, joined.outputs[0].shape = base.dtype, base.shape  # same tensor, so same shape
    b.nodes.append(joined)
    graph.insert_before(chain[0], b.nodes)
    base.replace_all_uses_with(joined.outputs[0], replace_graph_outputs=True)
    for node in reversed(chain):
        graph.remove(node, safe=True)
    base.name, joined.outputs[0].name = f"{base.name}/untiled", base.name
    graph.sort()  # the copies read values (QDQ weights) produced between the chain's nodes


def _bounds(b: _Builder, x: ir.Value, plan: _Plan) -> dict[str, ir.Value]:
    """``_Plan.strips`` as graph values, vectorised over the strips: lo, hi, keep_from, keep_to (one per strip).

    Heights are never negative, so Div is floor division here.
    """
    k, scale, const, op = plan.k, plan.scale, b.const, b.op
    height = op("Gather", op("Shape", x, name="shape"), const("axis_h", [2]), name="height", axis=0)
    h = height
    for i, win in enumerate(plan.windows):
        padded = op("Add", h, const(f"pad{i}", [win.top + win.bottom - win.extent]), name=f"h{i}_padded")
        h = op("Add", op("Div", padded, const(f"stride{i}", [win.stride]), name=f"h{i}_strided"),
               const("one", [1]), name=f"h{i + 1}")
    a = op("Div", op("Mul", h, const("from_index", list(range(k))), name="a_scaled"), const("k", [k]), name="a")
    b_ = op("Div", op("Mul", h, const("to_index", list(range(1, k + 1))), name="b_scaled"), const("k", [k]), name="b")
    top = op("Mul", op("Div", op("Sub", height, const("one", [1]), name="last_row"), const("scale", [scale]),
                       name="last_block"), const("scale", [scale]), name="top_start")
    lo = op("Mul", op("Add", a, const("start_blocks", [plan.start // scale]), name="a_shifted"),
            const("scale", [scale]), name="lo_raw")
    lo = op("Min", op("Max", lo, const("zero", [0]), name="lo_clamped"), top, name="lo")
    hi = op("Add", op("Mul", b_, const("scale", [scale]), name="b_in"), const("end", [plan.end]), name="hi")
    offset = op("Div", lo, const("scale", [scale]), name="offset")
    return {"lo": lo, "hi": hi, "keep_from": op("Sub", a, offset, name="keep_from"),
            "keep_to": op("Sub", b_, offset, name="keep_to")}


def _strip(b: _Builder, x: ir.Value, chain: list[ir.Node], s: int, bounds: dict[str, ir.Value],
           axes: ir.Value) -> ir.Value:
    """Strip ``s``: its input rows, copies of the chain's nodes on them, and the rows it keeps."""
    index = b.const(f"i{s}", [s])
    pick = {name: b.op("Gather", bounds[name], index, name=f"strip{s}/{name}", axis=0)
            for name in ("lo", "hi", "keep_from", "keep_to")}
    cur = b.op("Slice", x, pick["lo"], pick["hi"], axes, name=f"strip{s}/rows")
    for node in chain:
        copy = ir.Node(node.domain, node.op_type, [cur, *node.inputs[1:]], list(node.attributes.values()),
                       name=f"{node.name or node.op_type}/strip{s}")
        copy.outputs[0].name, copy.outputs[0].dtype = f"{node.outputs[0].name}/strip{s}", node.outputs[0].dtype
        b.nodes.append(copy)
        cur = copy.outputs[0]
    return b.op("Slice", cur, pick["keep_from"], pick["keep_to"], axes, name=f"strip{s}/keep")


def _attr(name: str, value) -> ir.Attr:
    if isinstance(value, int):
        return ir.AttrInt64(name, value)
    return ir.AttrInt64s(name, list(value))
