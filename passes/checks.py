"""Postconditions of the passes: the output is a valid model that ONNX Runtime runs.

Every pass class of this package is a :class:`CheckedPass`. When checks are on, its ``ensures``
runs :func:`check_output` on what the pass returned: ``onnx.checker.check_model`` on the proto, then
one ONNX Runtime run on seeded random inputs of the declared shapes. ``RemoveChannels`` adds the
mask oracle (its outputs must equal ``MaskChannels``' on the same inputs). A failed check raises
``onnx_ir.passes.PostconditionError`` with the reason.

Checks are **off by default**, for speed: each one serialises the model and opens an ORT session,
and the sensitivity scan alone removes channels hundreds of times; the pipeline verifies its final
model once (``onnxprune/verify.py``). Turn them on with ``ONNXPRUNE_CHECK_PASSES=1`` in the
environment (the tests do), or per pass with ``check=True``; ``check=False`` turns them off whatever
the environment says.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

import numpy as np
import onnx
import onnx_ir as ir

from ..graph.runtime import session
from ..graph.skeleton import skeleton

ENV = "ONNXPRUNE_CHECK_PASSES"
CHECKER_MAX_BYTES = 2**31 - 2**20  # onnx.checker refuses a serialised model above 2 GB
TOLERANCE = 1e-4  # outputs that must agree (the mask oracle): relative, and absolute per unit of output scale

Shapes = Mapping[str, Sequence[int]]


def checks_enabled(flag: bool | None = None) -> bool:
    """``flag`` if given, else whether ``ONNXPRUNE_CHECK_PASSES`` is set to something other than 0/false/no/off."""
    if flag is not None:
        return flag
    return os.environ.get(ENV, "").strip().lower() not in ("", "0", "false", "no", "off")


def random_feeds(proto: onnx.ModelProto, shapes: Shapes | None = None, seed: int = 0) -> dict[str, np.ndarray] | None:
    """Seeded random values for every runtime input of ``proto``, at its declared shape.

    ``shapes`` (input name -> shape) overrides the declaration; otherwise a symbolic first (batch)
    dim is 1. None when some input's shape is unknown or has another symbolic dim: no size can be
    guessed for it sensibly (an image's height), so the run is skipped.
    """
    shapes = shapes or {}
    inits = {i.name for i in proto.graph.initializer}
    rng = np.random.default_rng(seed)
    feeds = {}
    for vi in proto.graph.input:
        if vi.name in inits:
            continue
        shape = _shape(vi, shapes.get(vi.name))
        if shape is None:
            return None
        dtype = onnx.helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type)
        if np.issubdtype(dtype, np.floating):
            feeds[vi.name] = rng.standard_normal(shape).astype(dtype)
        else:  # indices, masks, counts: zeros are valid wherever such an input is read
            feeds[vi.name] = np.zeros(shape, dtype)
    return feeds


def shapes_of(input_name: str | None, batches: object) -> dict[str, tuple[int, ...]] | None:
    """{input_name: the shape of one sample of ``batches``}, if ``batches`` is a non-empty sequence of arrays
    (an iterator is left unread); the shape a check runs a calibrated pass's output at."""
    if input_name is None or not isinstance(batches, Sequence) or not len(batches):
        return None
    first = np.asarray(batches[0])
    return {input_name: (1, *first.shape[1:])} if first.ndim else None


def _shape(vi: onnx.ValueInfoProto, given: Sequence[int] | None) -> tuple[int, ...] | None:
    if given is not None:
        return tuple(int(d) for d in given)
    t = vi.type.tensor_type
    if not vi.type.HasField("tensor_type") or not t.HasField("shape"):
        return None
    dims = []
    for axis, d in enumerate(t.shape.dim):
        if d.HasField("dim_value") and d.dim_value > 0:
            dims.append(d.dim_value)
        elif axis == 0:
            dims.append(1)
        else:
            return None
    return tuple(dims)


def check_output(model: ir.Model, *, shapes: Shapes | None = None, seed: int = 0, source: ir.Model | None = None
                 ) -> tuple[dict[str, np.ndarray] | None, list[np.ndarray] | None]:
    """Raise ``PostconditionError`` unless ``model`` passes ``onnx.checker`` and runs in ONNX Runtime.

    Graph outputs without a type are given the inferred one first, as the pipeline restores the
    interface before writing (``graph/interface.py``): a pass may leave one undeclared
    (``FoldBatchNorm``, when a BatchNormalization output is a graph output, puts the Conv output in
    its place, which exporters rarely declare), and every later pass inherits it.

    A run that fails is blamed on the pass only if ``source`` (the pass's input model), run on the same
    feeds, does not fail too: random shapes can be ones no model of the graph accepts (a 64x64 input
    strided below a kernel's extent); then the run is skipped.

    Returns the random feeds and the outputs (both None when the run was skipped, see
    :func:`random_feeds`), for a pass that compares them with a reference.
    """
    proto = ir.to_proto(model)
    _declare_outputs(proto)
    if proto.ByteSize() <= CHECKER_MAX_BYTES:
        try:
            onnx.checker.check_model(proto)
        except onnx.checker.ValidationError as exc:
            raise ir.passes.PostconditionError(f"onnx.checker rejects the output: {_first_line(exc)}") from exc
    feeds = random_feeds(proto, shapes, seed)
    if feeds is None:
        return None, None
    try:
        return feeds, run(proto, feeds, "the output")
    except ir.passes.PostconditionError:
        if source is not None and not _runs(source, feeds):
            return None, None  # the input model fails on these inputs too: nothing the pass did
        raise


def _runs(model: ir.Model, feeds: dict[str, np.ndarray]) -> bool:
    try:
        run(ir.to_proto(model), feeds, "the input")
    except ir.passes.PostconditionError:
        return False
    return True


def _declare_outputs(proto: onnx.ModelProto) -> None:
    """Give the graph outputs of ``proto`` that have no type the type ONNX shape inference finds."""
    missing = [vi for vi in proto.graph.output if vi.type.WhichOneof("value") is None]
    if not missing:
        return
    try:  # on a skeleton: inference never reads the weights
        inferred = {vi.name: vi for vi in onnx.shape_inference.infer_shapes(skeleton(proto)).graph.output}
    except Exception:  # noqa: BLE001 - then the checker says what is missing
        return
    for vi in missing:
        if vi.name in inferred and inferred[vi.name].type.WhichOneof("value") is not None:
            vi.CopyFrom(inferred[vi.name])


def run(proto: onnx.ModelProto, feeds: dict[str, np.ndarray], what: str) -> list[np.ndarray]:
    """``proto``'s outputs on ``feeds`` (one thread); ``PostconditionError`` if ORT cannot load or run it."""
    try:
        return session(proto, threads=1).run(None, feeds)
    except Exception as exc:  # noqa: BLE001 - any ORT failure means the model is broken
        raise ir.passes.PostconditionError(f"ONNX Runtime cannot run {what}: {_first_line(exc)}") from exc


def assert_close(got: Sequence[np.ndarray], want: Sequence[np.ndarray], what: str, tol: float = TOLERANCE) -> None:
    """``PostconditionError`` unless every output agrees within ``tol`` (relative, and absolute per unit of scale)."""
    if len(got) != len(want):
        raise ir.passes.PostconditionError(f"{what}: {len(got)} outputs, expected {len(want)}")
    for i, (g, w) in enumerate(zip(got, want)):
        if g.shape != w.shape:
            raise ir.passes.PostconditionError(f"{what}: output {i} has shape {g.shape}, expected {w.shape}")
        scale = max(1.0, float(np.abs(w).max())) if w.size else 1.0
        if not np.allclose(g, w, rtol=tol, atol=tol * scale):
            err = float(np.abs(g.astype(np.float64) - w).max())
            raise ir.passes.PostconditionError(f"{what}: output {i} differs by {err:.3g} (scale {scale:.3g})")


def run_composed(passes: ir.passes.PassBase, model: ir.Model) -> ir.passes.PassResult:
    """Run a ``PassManager`` (or ``Sequential``); an error inside one of its passes is raised as itself.

    onnx-ir wraps it in a ``PassError`` per level (the step, the pass), which would hide its type (a
    ``MemoryError``, a ``ValueError`` on an unsupported graph) from callers and from the CLI's message.
    """
    try:
        return passes(model)
    except ir.passes.PassError as exc:
        cause: BaseException = exc
        while isinstance(cause, ir.passes.PassError) and cause.__cause__ is not None:
            cause = cause.__cause__
        if cause is exc:
            raise
        raise cause from cause.__cause__


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]


class CheckedPass(ir.passes.PassBase):
    """Base of this package's passes (mixed in before ``FunctionalPass``).

    ``ensures`` runs :meth:`verify` when checks are on (see the module doc: off by default).
    ``record`` is the record of the last run: a ``PassManager`` returns a plain ``PassResult``,
    so a caller that composes passes reads each one's record there.
    """

    check: bool | None = None  # None: ONNXPRUNE_CHECK_PASSES decides
    check_shapes: Shapes | None = None  # input shapes for the check run (see random_feeds)
    record: Any = None
    _source: ir.Model | None = None  # the input model, while the pass runs

    def __init__(self, *, check: bool | None = None) -> None:
        super().__init__()
        self.check = check

    def __call__(self, model_or_result: ir.Model | ir.passes.PassResult, /) -> ir.passes.PassResult:
        source = model_or_result.model if isinstance(model_or_result, ir.passes.PassResult) else model_or_result
        self._source = source
        try:
            result = super().__call__(model_or_result)
        finally:
            self._source = None
        self.record = getattr(result, "record", None)
        return result

    def ensures(self, model: ir.Model) -> None:
        if checks_enabled(self.check):
            self.verify(self._source, model)

    def verify(self, source: ir.Model | None, model: ir.Model) -> None:
        """The postcondition: ``model`` (the output of the pass on ``source``) is valid and runs."""
        check_output(model, shapes=self.check_shapes, source=source)
