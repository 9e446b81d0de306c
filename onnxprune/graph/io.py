"""Loading and saving models: one place that knows about paths, external data and atomic writes."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Union

import onnx
import onnx_ir as ir
from google.protobuf.message import DecodeError

from ..errors import ModelLoadError, OnnxPruneError

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
    try:
        proto = onnx.load(str(path), load_external_data=True)
    except (DecodeError, ValueError, RuntimeError) as exc:
        raise ModelLoadError(f"{path} is not a valid ONNX model ({type(exc).__name__}: {_first_line(exc)})") from None
    except OSError as exc:
        raise ModelLoadError(f"cannot read {path}: {exc.strerror or exc}") from None
    if not proto.graph.node:
        raise ModelLoadError(f"{path} is not a valid ONNX model (it has no graph nodes)")
    return proto


def load_ir(model: ModelLike) -> ir.Model:
    """Return an onnx-ir model (a fresh copy: callers may mutate it freely)."""
    return ir.from_proto(load_proto(model))


def save_atomic(model: onnx.ModelProto | ir.Model, path: str | os.PathLike, *, protect: list[Path] | None = None) -> Path:
    """Write ``model`` to ``path`` through a temporary file and a rename, so a crash never leaves half a file.

    ``protect`` lists paths that must never be overwritten (the input model).
    """
    proto = ir.to_proto(model) if isinstance(model, ir.Model) else model
    out = Path(path)
    for p in protect or []:
        if Path(p).exists() and out.exists() and out.resolve() == Path(p).resolve():
            raise OnnxPruneError(f"refusing to overwrite the input model {p}; choose another output path with -o")

    def write(tmp: str) -> None:
        if proto.ByteSize() > _EXTERNAL_DATA_THRESHOLD:
            # External data lands beside the final name; the model file itself still appears atomically.
            onnx.save(proto, tmp, save_as_external_data=True, all_tensors_to_one_file=True,
                      location=out.name + ".data")
        else:
            with open(tmp, "wb") as f:
                f.write(proto.SerializeToString())

    return _atomic_write(out, write)


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
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; outputs get the usual permissions
        os.replace(tmp, out)
    except OSError as exc:
        raise OnnxPruneError(f"cannot write {out}: {exc.strerror or exc}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


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


def write_text_atomic(text: str, path: str | os.PathLike) -> Path:
    """Write a small text file (a report) atomically, with the same one-line errors as models."""
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
    return _atomic_write(Path(path), write)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else "unreadable"
