"""Early exit on static frames: the detector's head runs inside an ``If`` only when its features moved.

The graph is cut at one feature map T (the *split*). The prefix (every node T depends on) runs on
every frame. The gate compares T, pooled to cells, with a background model carried as state; when
no cell changed more than the threshold, the ``If`` takes its else-branch, which returns the raw
outputs of the last frame that ran the head (also carried as state). Otherwise the then-branch runs
the original head nodes unchanged, so the outputs are those of the original model. With ``recompute``
(for a cheap prefix) the branch starts with copies of the prefix nodes and their weights, reading the
image: it is then the whole original graph, which ORT optimises as it does the original.

Inputs: the image (fixed to one size and batch 1), ``gate.background`` [1, C, h/k, w/k],
``gate.skipped`` int64 [1] (-1 = no background yet) and ``gate.last.<output>`` per detector output.
Outputs: the detector outputs (original names), ``gate.background.next``, ``gate.skipped.next``,
``ran_head`` bool [1] and ``gate.score`` [1].

Gate statistic (the numpy twin :func:`gate_score` is what calibration measures): G = AveragePool(T, k, k).
Per channel and row of cells, G is fitted to the background B by a gain and an offset (a light change is
explained away: flicker, exposure, and the horizontal bands that mains flicker leaves under a rolling
shutter); the residual R = (G - mean G) - b (B - mean B), means over the row, b = cov(B, G) / var(B)
clipped to [0.5, 2]. Score = max over cells of sum_c w_c |R_c| (w_c: the channel's inverse noise scale / C).
The gate opens when score > threshold, when there is no background yet (skipped < 0), or after
``max_skip`` skipped frames in a row. The background becomes G when the head
runs and B + rate * R otherwise: each skipped frame moves it by at most rate * threshold (in the score's
norm), which bounds how far a slow change can creep past the gate (see ``onnxprune/video/calibrate.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

BACKGROUND = "gate.background"
SKIPPED = "gate.skipped"
LAST = "gate.last."
NEXT = ".next"
RAN_HEAD = "ran_head"
SCORE = "gate.score"
GAIN_RANGE = (0.5, 2.0)
_EPS = 1e-6
_CONTROL_FLOW = {"If", "Loop", "Scan"}


@dataclass(frozen=True)
class GateSpec:
    """Where the graph is cut and the calibrated gate constants."""

    split: str  # name of the feature map T the gate reads
    split_shape: tuple[int, int, int, int]  # [1, C, h, w] at ``image_shape``
    pool: int  # cell = pool x pool positions of T (AveragePool kernel = stride)
    weights: tuple[float, ...]  # per channel of T: inverse noise scale / C
    threshold: float
    rate: float  # background update rate on skipped frames
    max_skip: int  # 0: no forced refresh
    image_shape: tuple[int, ...]  # the image input, fixed: [1, 3, H, W]
    output_shapes: tuple[tuple[int, ...], ...] = ()  # detector outputs at image_shape, in graph order
    recompute: bool = False  # the then-branch reruns the prefix from the image (see GatePass._clone_prefix)

    @property
    def background_shape(self) -> tuple[int, int, int, int]:
        _, c, h, w = self.split_shape
        return (1, c, h // self.pool, w // self.pool)


@dataclass
class GateRecord:
    prefix: list[str] = field(default_factory=list)  # nodes that run on every frame
    head: list[str] = field(default_factory=list)  # nodes moved into the If's then-branch
    moved_initializers: int = 0
    outputs: list[str] = field(default_factory=list)  # detector outputs, carried as state


# ------------------------------------------------------------------------------------------ numpy twin
def pool_cells(t: np.ndarray, k: int) -> np.ndarray:
    """[C, h//k, w//k] means of k x k cells of one [1, C, h, w] (or [C, h, w]) feature map (AveragePool, floor)."""
    t = np.asarray(t, np.float64)
    t = t[0] if t.ndim == 4 else t
    c, h, w = t.shape
    h2, w2 = h // k, w // k
    return t[:, :h2 * k, :w2 * k].reshape(c, h2, k, w2, k).mean(axis=(2, 4))


def residual(g: np.ndarray, b: np.ndarray) -> np.ndarray:
    """G's change from B per cell after a gain/offset fit per channel and row of cells ([C, h, w])."""
    dg = g - g.mean(axis=2, keepdims=True)
    db = b - b.mean(axis=2, keepdims=True)
    gain = (db * dg).mean(axis=2, keepdims=True) / ((db * db).mean(axis=2, keepdims=True) + _EPS)
    return dg - np.clip(gain, *GAIN_RANGE) * db


def gate_score(g: np.ndarray, b: np.ndarray, weights: np.ndarray) -> float:
    """The score the graph computes, for pooled features ``g`` and background ``b`` ([C, h, w])."""
    return float((np.abs(residual(g, b)) * np.asarray(weights)[:, None, None]).sum(axis=0).max())


# ------------------------------------------------------------------------------------------ graph pass
def partition(graph: ir.Graph, split: ir.Value) -> tuple[list[ir.Node], list[ir.Node]]:
    """(prefix, head) in graph order: the nodes ``split`` depends on, and the other nodes outputs need."""
    prefix = _ancestors([split])
    needed = _ancestors(list(graph.outputs))
    return ([n for n in graph if n in prefix], [n for n in graph if n in needed and n not in prefix])


def _ancestors(values: list[ir.Value]) -> set[ir.Node]:
    seen: set[ir.Node] = set()
    stack = [v.producer() for v in values if v.producer() is not None]
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        stack.extend(v.producer() for v in node.inputs if v is not None and v.producer() is not None)
    return seen


class GatePass(ir.passes.InPlacePass):
    """Rewrite a single-input detector into the gated model described in the module docstring."""

    def __init__(self, spec: GateSpec) -> None:
        super().__init__()
        self.spec = spec
        self.record = GateRecord()

    def requires(self, model: ir.Model) -> None:
        graph = model.graph
        real = [v for v in graph.inputs if not v.is_initializer()]
        if len(real) != 1:
            raise ir.passes.PreconditionError(f"the gate needs a single-input model, got {len(real)} inputs")
        if any(n.op_type in _CONTROL_FLOW for n in graph):
            raise ir.passes.PreconditionError("models with If/Loop/Scan nodes cannot be gated")
        if model.opset_imports.get("", 0) < 9:
            raise ir.passes.PreconditionError("the gate needs opset 9 or later (Where, integer comparisons)")
        split = _find(graph, self.spec.split)
        if split is None or split.producer() is None or split.is_graph_output():
            raise ir.passes.PreconditionError(f"{self.spec.split!r} is not an intermediate tensor of the model")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        spec, graph = self.spec, model.graph
        image = next(v for v in graph.inputs if not v.is_initializer())
        image.shape = ir.Shape(spec.image_shape)
        split = _find(graph, spec.split)
        assert split is not None
        prefix, head = partition(graph, split)
        outputs = list(graph.outputs)
        self.record = GateRecord([n.name or "" for n in prefix], [n.name or "" for n in head],
                                 outputs=[v.name for v in outputs])

        # state inputs
        bg_shape = spec.background_shape
        background = ir.val(BACKGROUND, ir.DataType.FLOAT, bg_shape)
        skipped = ir.val(SKIPPED, ir.DataType.INT64, [1])
        shapes = list(spec.output_shapes) or [_concrete(v.shape) for v in outputs]
        last = [ir.val(LAST + v.name, v.dtype, s) for v, s in zip(outputs, shapes)]

        then_graph, names = self._then_branch(graph, prefix, head, outputs)
        kept = [ir.node("Identity", [s], name=f"gate.keep.{n}", outputs=[ir.val(f"{n}.kept", s.dtype)])
                for s, n in zip(last, names)]
        else_graph = ir.Graph([], [k.outputs[0] for k in kept], nodes=kept, name="skip")
        results = [ir.val(n, v.dtype, s) for n, v, s in zip(names, outputs, shapes)]
        state = self._gate(graph, split, background, skipped, results, then_graph, else_graph)
        graph.inputs.extend([background, skipped, *last])
        graph.outputs.extend([*results, *state])
        return ir.passes.PassResult(model, modified=True)

    def _then_branch(self, graph: ir.Graph, prefix: list[ir.Node], head: list[ir.Node], outputs: list[ir.Value]
                     ) -> tuple[ir.Graph, list[str]]:
        """The head as the If's then-branch (outputs renamed there: the If outputs take the names),
        with the initializers only it reads; returns it and the output names."""
        keep = set(prefix) | set(head)
        graph.remove([n for n in graph if n not in keep], safe=False)  # dead nodes: nothing reads them
        graph.remove(head, safe=False)
        graph.outputs.clear()
        clones, copies = self._clone_prefix(prefix, head) if self.spec.recompute else ([], [])
        then_nodes, then_outputs = clones + list(head), []
        in_head = set(head)
        for v in outputs:
            if v.producer() is None or v.producer() not in in_head:  # an output the prefix already has
                v = ir.node("Identity", [v], name=f"gate.head.{v.name}").outputs[0]
                then_nodes.append(v.producer())
            then_outputs.append(v)
        names = [v.name for v in outputs]
        for v, name in zip(then_outputs, names):
            v.name = f"{name}.head"
        then_graph = ir.Graph([], then_outputs, nodes=then_nodes, initializers=copies, name="head")
        used_by_prefix = {v.name for n in prefix for v in n.inputs if v is not None}
        for init in list(graph.initializers.values()):
            users = {u.node for u in init.uses()}
            if users and users <= in_head and init.name not in used_by_prefix:
                graph.initializers.pop(init.name)
                then_graph.register_initializer(init)
                self.record.moved_initializers += 1
        return then_graph, names

    def _gate(self, graph: ir.Graph, split: ir.Value, background: ir.Value, skipped: ir.Value,
              results: list[ir.Value], then_graph: ir.Graph, else_graph: ir.Graph) -> list[ir.Value]:
        """The score, the If producing ``results``, and the next state; returns the state outputs."""
        spec = self.spec
        tape = ir.tape.Tape(graph)
        score, residual_, pooled = self._score(tape, split, background)
        open_ = self._open(tape, score, skipped)
        tape.op_multi_out("If", [open_], {"then_branch": then_graph, "else_branch": else_graph}, name="gate.if",
                          outputs=results)
        rate = tape.initializer(ir.tensor(np.array(spec.rate, np.float32)), name="gate.rate")
        moved = tape.op("Add", [background, tape.op("Mul", [residual_, rate])], name="gate.update")
        next_bg = tape.op("Where", [open_, pooled, moved], name="gate.background.select",
                          output=ir.val(BACKGROUND + NEXT, ir.DataType.FLOAT, spec.background_shape))
        zero = tape.initializer(ir.tensor(np.zeros(1, np.int64)), name="gate.zero")
        one = tape.initializer(ir.tensor(np.ones(1, np.int64)), name="gate.one")
        count = tape.op("Add", [skipped, one], name="gate.count")
        next_skip = tape.op("Where", [open_, zero, count], name="gate.skipped.select",
                            output=ir.val(SKIPPED + NEXT, ir.DataType.INT64, [1]))
        ran = tape.op("Identity", [open_], name="gate.ran_head", output=ir.val(RAN_HEAD, ir.DataType.BOOL, [1]))
        score_out = tape.op("Identity", [score], name="gate.score.out", output=ir.val(SCORE, ir.DataType.FLOAT, [1]))
        return [next_bg, next_skip, ran, score_out]

    def _clone_prefix(self, prefix: list[ir.Node], head: list[ir.Node]) -> tuple[list[ir.Node], list[ir.Value]]:
        """Copies of the prefix nodes and of their weights for the then-branch; the head reads the copies.

        Why: ONNX Runtime runs convolutions in a blocked layout (NCHWc) from one to the next. A head
        that reads the split tensor from the outer graph makes ORT convert it to plain NCHW on every
        frame, shut or not, and back inside the branch. Rerunning a cheap prefix inside the branch keeps
        the original chain whole; its weights are copied in because ORT only reorders a convolution's
        weights for NCHWc when they are initializers of the graph the convolution is in.
        """
        remap: dict[ir.Value, ir.Value] = {}
        copies: list[ir.Value] = []
        clones = []
        for node in prefix:
            for v in node.inputs:
                if v is not None and v.const_value is not None and v.is_initializer() and v not in remap:
                    copy = ir.val(f"{v.name}.prefix", v.dtype, v.shape, const_value=ir.tensor(v.const_value.numpy()))
                    remap[v] = copy
                    copies.append(copy)
            outs = [ir.val(f"{v.name}.prefix", v.dtype, v.shape) for v in node.outputs]
            attrs = [ir.Attr(a.name, a.type, a.value) for a in node.attributes.values()]
            clones.append(ir.Node(node.domain, node.op_type, [remap.get(v, v) if v is not None else None
                                                                for v in node.inputs],
                                  attrs, outputs=outs, version=node.version,
                                  name=f"{node.name}.prefix" if node.name else None))
            remap.update(zip(node.outputs, outs))
        for node in head:
            for i, v in enumerate(node.inputs):
                if v in remap and v.producer() is not None:
                    node.replace_input_with(i, remap[v])
        return clones, copies

    def _score(self, tape: ir.tape.Tape, split: ir.Value, background: ir.Value
               ) -> tuple[ir.Value, ir.Value, ir.Value]:
        """(score [1], residual R, pooled G) of ``split`` against the background input."""
        spec = self.spec
        k = spec.pool
        g = tape.op("AveragePool", [split], {"kernel_shape": [k, k], "strides": [k, k]}, name="gate.pool") \
            if k > 1 else tape.op("Identity", [split], name="gate.pool")
        b = background
        width = spec.background_shape[3]
        gap = lambda x, n: tape.op("AveragePool", [x], {"kernel_shape": [1, width]}, name=n)  # noqa: E731 - row means
        dg = tape.op("Sub", [g, gap(g, "gate.mean_g")], name="gate.dg")
        db = tape.op("Sub", [b, gap(b, "gate.mean_b")], name="gate.db")
        var = gap(tape.op("Mul", [db, db], name="gate.db2"), "gate.var")
        cov = gap(tape.op("Mul", [db, dg], name="gate.dbdg"), "gate.cov")
        eps = tape.initializer(ir.tensor(np.array(_EPS, np.float32)), name="gate.eps")
        gain = tape.op("Div", [cov, tape.op("Add", [var, eps], name="gate.var_eps")], name="gate.gain")
        lo = tape.initializer(ir.tensor(np.array(GAIN_RANGE[0], np.float32)), name="gate.gain_lo")
        hi = tape.initializer(ir.tensor(np.array(GAIN_RANGE[1], np.float32)), name="gate.gain_hi")
        gain = tape.op("Min", [tape.op("Max", [gain, lo], name="gate.gain_max"), hi], name="gate.gain_clip")
        r = tape.op("Sub", [dg, tape.op("Mul", [gain, db], name="gate.fit")], name="gate.residual")
        w = np.asarray(spec.weights, np.float32).reshape(1, -1, 1, 1)
        weights = tape.initializer(ir.tensor(w), name="gate.weights")
        cells = tape.op("Conv", [tape.op("Abs", [r], name="gate.abs"), weights], name="gate.cells")
        shape = tape.initializer(ir.tensor(np.array([1], np.int64)), name="gate.shape1")
        score = tape.op("Reshape", [tape.op("GlobalMaxPool", [cells], name="gate.max"), shape], name="gate.score")
        return score, r, g

    def _open(self, tape: ir.tape.Tape, score: ir.Value, skipped: ir.Value) -> ir.Value:
        spec = self.spec
        threshold = tape.initializer(ir.tensor(np.array([spec.threshold], np.float32)), name="gate.threshold")
        zero = tape.initializer(ir.tensor(np.zeros(1, np.int64)), name="gate.no_background")
        opened = tape.op("Or", [tape.op("Greater", [score, threshold], name="gate.moved"),
                                tape.op("Less", [skipped, zero], name="gate.first")], name="gate.open_any")
        if spec.max_skip > 0:
            limit = tape.initializer(ir.tensor(np.array([spec.max_skip], np.int64)), name="gate.max_skip")
            stale = tape.op("Not", [tape.op("Less", [skipped, limit], name="gate.fresh")], name="gate.stale")
            opened = tape.op("Or", [opened, stale], name="gate.open")
        return opened


def _find(graph: ir.Graph, name: str) -> ir.Value | None:
    for node in graph:
        for v in node.outputs:
            if v.name == name:
                return v
    return None


def _concrete(shape: ir.Shape | None) -> list[int | str | None] | None:
    return list(shape) if shape is not None else None
