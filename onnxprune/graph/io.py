"""Loading and saving models: one place that knows about paths, external data and atomic writes."""

from __future__ import annotations

import os
import shutil
import tempfile
import zlib
from functools import cached_property
from pathlib import Path
from typing import Union

import numpy as np
import onnx
import onnx_ir as ir
from google.protobuf.message import DecodeError
from onnx_ir.external_data import set_base_dir

from ..errors import ModelLoadError, OnnxPruneError
from .skeleton import skeleton

ModelLike = Union[str, os.PathLike, onnx.ModelProto, ir.Model]

# Above this size protobuf cannot serialise a model in one message: write weights as external data.
_EXTERNAL_DATA_THRESHOLD = 1_800_000_000


def load_proto(model: ModelLike) -> onnx.ModelProto:
    """Return a ModelProto with all weights in memory, whatever form the model came in."""
    if isinstance(model, onnx.ModelProto):
        return model
    if isinstance(model, ir.Model):
        return ir.to_proto(model)
    path = Path(model)
    if not path.exists():
        raise ModelLoadError(f"model file not found: {path}")
    if not path.is_file():
        raise ModelLoadError(f"not a file: {path}")
    return _read(path, load_external_data=True)


def _read(path: Path, *, load_external_data: bool) -> onnx.ModelProto:
    try:
        proto = onnx.load(str(path), load_external_data=load_external_data)
    except (DecodeError, ValueError, RuntimeError) as exc:
        raise ModelLoadError(f"{path} is not a valid ONNX model ({type(exc).__name__}: {_first_line(exc)})") from None
    except OSError as exc:
        raise ModelLoadError(f"cannot read {path}: {exc.strerror or exc}") from None
    if not proto.graph.node:
        raise ModelLoadError(f"{path} is not a valid ONNX model (it has no graph nodes)")
    return proto


def load_ir(model: ModelLike) -> ir.Model:
    """Return an onnx-ir model (a fresh copy: callers may mutate it freely).

    From a path, external-data weights are memory-mapped and read lazily, not loaded.
    """
    return ModelSource(model).ir_model()


class ModelSource:
    """A model as the user gave it, opened without reading its weights into memory.

    Why: a 260 MB recognizer must not be copied several times, and a model above 2 GB cannot be
    one protobuf message at all. From a path, the graph is read without external data; onnx-ir
    memory-maps the weights when a pass reads them, ONNX Runtime reads them from the path, and
    the full ModelProto is built only for callers that need one (:meth:`proto`).
    """

    def __init__(self, model: ModelLike) -> None:
        self.path: Path | None = None
        self._given: onnx.ModelProto | ir.Model | None = None
        self._stub: onnx.ModelProto | None = None  # from a path: the graph, inline weights, external references
        if isinstance(model, (onnx.ModelProto, ir.Model)):
            self._given = model
            return
        self.path = Path(model)
        if not self.path.exists():
            raise ModelLoadError(f"model file not found: {self.path}")
        if not self.path.is_file():
            raise ModelLoadError(f"not a file: {self.path}")
        self._stub = _read(self.path, load_external_data=False)
        _check_external_files(self._stub, self.path)

    @property
    def external(self) -> bool:
        """True when the weights are stored in external data files (the output should be, too)."""
        return self._stub is not None and bool(external_data_files(self._stub, self.path.parent))

    @cached_property
    def weight_bytes(self) -> int:
        """Bytes of all initializers, read from the graph (no weight is loaded)."""
        if isinstance(self._given, ir.Model):
            return _nbytes(self._given)
        proto = self._stub if self._stub is not None else self._given
        total = 0
        for t in proto.graph.initializer:
            length = next((e.value for e in t.external_data if e.key == "length"), None)
            total += int(length) if t.data_location == onnx.TensorProto.EXTERNAL and length else t.ByteSize()
        return total

    def ir_model(self) -> ir.Model:
        """A fresh onnx-ir model (callers may mutate it); tensors are shared, never copied."""
        if isinstance(self._given, ir.Model):
            return self._given.clone()
        if self._given is not None:
            return ir.from_proto(self._given)
        model = ir.serde.deserialize_model(self._stub)
        set_base_dir(model.graph, str(self.path.parent))  # external weights resolve beside the model
        return model

    @cached_property
    def skeleton(self) -> onnx.ModelProto:
        """The graph and interface with large weights elided: for shapes, counts and interface checks."""
        return skeleton(self._stub if self._stub is not None else self._given)

    def proto(self) -> onnx.ModelProto:
        """The full ModelProto, all weights in memory (costs the model's size; above 2 GB it cannot serialise)."""
        if self.path is not None:
            return load_proto(self.path)
        return load_proto(self._given)

    def runtime_model(self) -> onnx.ModelProto | Path:
        """What ONNX Runtime should open: the path when the model is on disk (it reads the weights itself)."""
        return self.path if self.path is not None else load_proto(self._given)


def materialize(model: ir.Model) -> None:
    """Read every memory-mapped external weight of ``model`` into memory, one tensor at a time.

    Why: the working model must serialise to a self-contained ModelProto (ORT sessions, the
    output), not to references into the input's data file. Each file view is unmapped right
    after its copy, so memory grows by the weights still unread, never by two copies.
    """
    for graph in model.graphs():
        for value in graph.initializers.values():
            t = value.const_value
            if isinstance(t, ir.ExternalTensor):
                value.const_value = ir.Tensor(np.array(t.numpy()), name=t.name, doc_string=t.doc_string)
                t.release()


def external_data_files(proto: onnx.ModelProto, base_dir: Path) -> set[Path]:
    """The external data files the initializers of ``proto`` (a model in ``base_dir``) refer to."""
    files = set()
    for t in proto.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            loc = next((e.value for e in t.external_data if e.key == "location"), "")
            files.add(base_dir / loc)
    return files


def _check_external_files(proto: onnx.ModelProto, path: Path) -> None:
    """One clear error now, not a failed memory map deep inside a pass, when external data is missing or short."""
    base = path.parent.resolve()
    sizes: dict[Path, int] = {}
    for t in proto.graph.initializer:
        if t.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in t.external_data}
        loc = info.get("location", "")
        target = (base / loc).resolve()
        if not loc or os.path.isabs(loc) or base not in target.parents:
            raise ModelLoadError(f"{path}: tensor {t.name} has external data outside the model's folder ({loc!r})")
        if target not in sizes:
            if not target.is_file():
                raise ModelLoadError(f"{path}: external data file {loc} is missing (needed by tensor {t.name})")
            sizes[target] = target.stat().st_size
        end = int(info.get("offset", 0) or 0) + int(info.get("length", 0) or 0)
        if end > sizes[target]:
            raise ModelLoadError(f"{path}: external data file {loc} is truncated ({sizes[target]} bytes, "
                                 f"tensor {t.name} ends at {end})")


def save_atomic(model: onnx.ModelProto | ir.Model, path: str | os.PathLike, *, protect: list[Path] | None = None,
                external_data: bool | None = None) -> Path:
    """Write ``model`` to ``path`` through a temporary file and a rename, so a crash never leaves half a file.

    ``protect`` lists paths that must never be overwritten (the input model, and its external data).
    ``external_data`` writes the weights to ``<name>.data`` beside the model; by default only a
    model too large for one protobuf message is written that way.
    """
    out = Path(path)
    for p in protect or []:
        if Path(p).exists() and out.exists() and out.resolve() == Path(p).resolve():
            raise OnnxPruneError(f"refusing to overwrite the input model {p}; choose another output path with -o")
    if external_data is None:
        external_data = _nbytes(model) > _EXTERNAL_DATA_THRESHOLD
    if external_data:
        return _atomic_write_external(model, out, [Path(p) for p in protect or []])
    proto = ir.to_proto(model) if isinstance(model, ir.Model) else model

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(proto.SerializeToString())

    return _atomic_write(out, write)


GZIP_LEVEL = 9  # sizes are reported as `gzip -9` would compress the file(s)


def stored_size(model: onnx.ModelProto | ir.Model, *, external_data: bool | None = None) -> tuple[int, int]:
    """(bytes, gzip -9 bytes) of ``model`` as :func:`save_atomic` writes it (model and data file summed).

    Measured on a real write to a temporary folder, so the figures are those of the file a user gets.
    """
    with tempfile.TemporaryDirectory(prefix="onnxprune-size-") as tmp:
        path = save_atomic(model, Path(tmp) / "model.onnx", external_data=external_data)
        files = [f for f in (path, external_data_path(path)) if f.exists()]
        return sum(f.stat().st_size for f in files), sum(_gzip_size(f) for f in files)


def _gzip_size(path: Path, chunk: int = 1 << 22) -> int:
    """Compressed size of a file in the gzip container, streamed (never the whole file in memory)."""
    comp = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, 31)  # wbits 31: gzip header and trailer
    size = 0
    with open(path, "rb") as f:
        while block := f.read(chunk):
            size += len(comp.compress(block))
    return size + len(comp.flush())


def with_sparse_initializers(model: onnx.ModelProto, min_zero_share: float = 0.0) -> onnx.ModelProto:
    """A copy of ``model`` whose float initializers with at least ``min_zero_share`` zeros (and at least one)
    are stored as ONNX sparse initializers (values + int64 linear indices, the only index type
    onnx.checker accepts).

    Not what ``slim --sparsity`` writes (README, "Sparse weights": larger and compressing worse than
    the dense layout at the sparsities that keep accuracy, and onnx-ir and ONNX's full shape
    inference do not read them); kept for comparison and for runtimes that want it. ONNX Runtime
    loads them, densified at session start, with the same outputs.
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    keep = []
    for t in out.graph.initializer:
        a = onnx.numpy_helper.to_array(t) if t.data_type in _SPARSE_TYPES else None
        if a is None or a.size == 0 or np.count_nonzero(a) == a.size or 1 - np.count_nonzero(a) / a.size < min_zero_share:
            keep.append(t)
            continue
        flat = a.reshape(-1)
        nz = np.flatnonzero(flat)
        out.graph.sparse_initializer.append(onnx.helper.make_sparse_tensor(
            onnx.numpy_helper.from_array(flat[nz], t.name), onnx.numpy_helper.from_array(nz.astype(np.int64), t.name + "_indices"),
            list(a.shape)))
    del out.graph.initializer[:]
    out.graph.initializer.extend(keep)
    return out


_SPARSE_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE}


def _nbytes(model: onnx.ModelProto | ir.Model) -> int:
    if isinstance(model, ir.Model):
        return sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)
    return model.ByteSize()


def external_data_path(out: Path) -> Path:
    """Where the weights of a model saved with external data at ``out`` go."""
    return out.with_name(out.name + ".data")


def _atomic_write_external(model: onnx.ModelProto | ir.Model, out: Path, protect: list[Path]) -> Path:
    """Model and weights written in a temporary folder beside ``out``, then renamed: data first, model last.

    A failure at any point leaves no new file under the output's names (and an existing output as it was).
    """
    check_writable(out)
    data = external_data_path(out)
    for p in protect:
        if data.exists() and p.is_file() and data.resolve() in {f.resolve() for f in _external_files_of(p)}:
            raise OnnxPruneError(f"refusing to overwrite {data}, the external data of the input model {p}; "
                                 "choose another output path with -o")
    try:
        tmp_dir = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent if str(out.parent) else "."))
    except OSError as exc:
        raise OnnxPruneError(f"cannot write {out}: {exc.strerror or exc}") from None
    try:
        # onnx-ir writes tensor by tensor (never one whole serialised copy) and leaves the model unchanged.
        model_ir = model if isinstance(model, ir.Model) else ir.from_proto(model)
        ir.save(model_ir, tmp_dir / out.name, external_data=data.name, alignment=65536)
        for f in (tmp_dir / data.name, tmp_dir / out.name):
            if f.exists():
                _usual_permissions(f)
        if (tmp_dir / data.name).exists():
            os.replace(tmp_dir / data.name, data)
        os.replace(tmp_dir / out.name, out)
    except OSError as exc:
        raise OnnxPruneError(f"cannot write {out}: {exc.strerror or exc}") from None
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return out


def _external_files_of(path: Path) -> set[Path]:
    try:
        return external_data_files(onnx.load(str(path), load_external_data=False), path.parent)
    except Exception:  # not a model we can read: nothing of it to protect beyond the path itself
        return set()


def _atomic_write(out: Path, write) -> Path:
    """Run ``write(tmp)`` on a temporary file beside ``out``, then rename it over ``out``."""
    check_writable(out)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent if str(out.parent) else ".")
        os.close(fd)
    except OSError as exc:
        raise OnnxPruneError(f"cannot write {out}: {exc.strerror or exc}") from None
    try:
        write(tmp)
        _usual_permissions(tmp)
        os.replace(tmp, out)
    except OSError as exc:
        raise OnnxPruneError(f"cannot write {out}: {exc.strerror or exc}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def _usual_permissions(path: str | os.PathLike) -> None:
    """mkstemp/mkdtemp files are 0600; outputs get what a plain open() would give (0666 minus umask)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def check_writable(path: str | os.PathLike) -> None:
    """Fail early, with one line, if ``path`` cannot be created (before any long work runs)."""
    out = Path(path)
    directory = out.parent if str(out.parent) else Path(".")
    if not directory.exists():
        raise OnnxPruneError(f"output directory does not exist: {directory}")
    if not directory.is_dir():
        raise OnnxPruneError(f"output directory is not a directory: {directory}")
    if not os.access(directory, os.W_OK):
        raise OnnxPruneError(f"output directory is not writable: {directory}")
    if out.is_dir():
        raise OnnxPruneError(f"output path is a directory: {out}")


def write_bytes_atomic(data: bytes, path: str | os.PathLike) -> Path:
    """Write bytes already serialised (a model from a worker) atomically, with the same one-line errors."""
    return _atomic_write(Path(path), lambda tmp: Path(tmp).write_bytes(data))


def write_text_atomic(text: str, path: str | os.PathLike) -> Path:
    """Write a small text file (a report) atomically, with the same one-line errors as models."""
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
    return _atomic_write(Path(path), write)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else "unreadable"
