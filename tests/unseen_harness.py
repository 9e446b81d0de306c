"""Every CLI verb on one model it has never seen, as a new user runs it: calibration photos, no --preset.

``run_verbs`` returns one ``Outcome`` per verb; tests assert on them and ``benchmarks/unseen_table.py``
prints them as the README's model x verb table. An outcome is ``ok`` (exit 0, a valid output with the
original interface, fidelity measured with the expected task), ``unprunable`` (slim refused in one
line: no prunable channel, a legitimate answer for a model made of ops that cannot be narrowed), or
``failed`` with the reason.
"""

from __future__ import annotations

import contextlib
import io
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from onnxprune.calibration import CalibrationSet, load_calibration
from onnxprune.cli import main

VERBS = ("analyze", "slim", "quantize", "check")
CALIB = ("--calib-count", "12")
SHARED = Path(__file__).resolve().parents[2] / "shared"
PHOTOS = SHARED / "data" / "faces"
CROPS = SHARED / "data" / "faces112"  # aligned 112x112 crops: what recognizers are deployed on
# fidelity task each family is measured with: MTCNN heads and 3DMM parameters are compared output by output
_FAMILY_TASK = {"mtcnn": "outputs", "3ddfa": "outputs"}


@dataclass(frozen=True)
class RealModel:
    """A trained model from a PyPI package (sample_models) or ../shared, and the task it is measured with."""

    name: str
    task: str
    sample: str = ""  # sample_models name, else a path under ../shared
    shared: str = ""

    def path(self) -> Path:
        if self.sample:
            from onnxprune.sample_models import sample_path
            return sample_path(self.sample)
        path = SHARED / self.shared
        if not path.is_file():
            from onnxprune.sample_models import SampleUnavailable
            raise SampleUnavailable(f"{path} is not there")
        return path


REAL: dict[str, RealModel] = {m.name: m for m in [
    RealModel("mtcnn-onet (keras, PyPI)", "outputs", sample="mtcnn-onet"),
    RealModel("gender-v1 (PyPI)", "classification", sample="gender-v1"),
    RealModel("MobileFaceNet (Paddle, ../shared)", "embedding", shared="models/mobilefacenet_paddle.onnx"),
]}


def photos_for(name: str) -> Path:
    return CROPS if name in REAL and REAL[name].task == "embedding" else PHOTOS


def expected_task(name: str) -> str:
    if name in REAL:
        return REAL[name].task
    from .unseen_models import UNSEEN
    entry = UNSEEN[name]
    return _FAMILY_TASK.get(entry.family, entry.task)


@dataclass(frozen=True)
class Outcome:
    verb: str
    status: str  # ok | unprunable | failed
    detail: str  # task measured and its headline, or the reason
    seconds: float


def _run(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exc:  # argparse
            code = int(exc.code or 0)
    return code, out.getvalue(), err.getvalue()


def interface(model: onnx.ModelProto) -> list[tuple[str, list]]:
    """Names and declared dims (symbolic dims by name) of the graph inputs and outputs."""
    dims = lambda vi: [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim]  # noqa: E731
    inits = {i.name for i in model.graph.initializer}
    return [(v.name, dims(v)) for v in model.graph.input if v.name not in inits] + \
           [(v.name, dims(v)) for v in model.graph.output]


def check_output(original: Path, produced: Path, data: CalibrationSet) -> str:
    """'' when ``produced`` passes the checker, runs in ORT and keeps ``original``'s interface; else why not."""
    try:
        onnx.checker.check_model(str(produced))
    except Exception as exc:  # noqa: BLE001
        return f"checker: {exc}"
    ref, got = onnx.load(str(original), load_external_data=False), onnx.load(str(produced), load_external_data=False)
    if interface(ref) != interface(got):
        return f"interface changed: {interface(ref)} -> {interface(got)}"
    sess = ort.InferenceSession(str(produced), providers=["CPUExecutionProvider"])
    feeds = {data.name: data.samples()[:1]}  # a real photo: random noise drives untrained models out of range
    want = ort.InferenceSession(str(original), providers=["CPUExecutionProvider"]).run(None, feeds)
    got = sess.run(None, feeds)
    if any(o.shape != w.shape for o, w in zip(got, want)):
        return f"output shapes {[o.shape for o in got]} != original's {[w.shape for w in want]}"
    if not all(np.all(np.isfinite(o) | ~np.isfinite(w)) for o, w in zip(got, want)):
        return "non-finite outputs where the original's are finite"
    return ""


def _fidelity_task(report: dict) -> tuple[str, str]:
    fid = report.get("fidelity") or (report.get("quantize") or {}).get("fidelity") or {}
    task = fid.get("task", "?")
    value = fid.get("detection_ap") if task == "detection" else (fid.get("embedding") or {}).get("mean_cosine") \
        if task == "embedding" else fid.get("top1_agreement") if task == "classification" else \
        float(np.mean([o["cosine"] for o in fid.get("outputs", [])])) if fid.get("outputs") else None
    return task, "" if value is None else f"{value:.3f}"


def run_verbs(model: Path, photos: Path, workdir: Path, task: str) -> dict[str, Outcome]:
    """analyze, slim 0.3, quantize and check on ``model`` with ``photos``; ``task`` is what fidelity should use."""
    workdir.mkdir(parents=True, exist_ok=True)
    calib = ["--calib", str(photos), *CALIB]
    slim_out, int8_out = workdir / "m.slim.onnx", workdir / "m.int8.onnx"
    argvs = {
        "analyze": ["analyze", str(model), "-q"],
        "slim": ["slim", str(model), "--ratio", "0.3", *calib, "-o", str(slim_out), "--json", str(workdir / "s.json")],
        "quantize": ["quantize", str(model), *calib, "-o", str(int8_out), "--json", str(workdir / "q.json")],
        "check": ["check", str(model), str(int8_out), *calib, "--task", task, "--runs", "3",
                  "--json", str(workdir / "c.json")],
    }
    outcomes: dict[str, Outcome] = {}
    for verb, argv in argvs.items():
        start = time.perf_counter()
        code, out, err = _run(argv)
        outcomes[verb] = _judge(verb, code, err, model, photos, workdir, slim_out, int8_out, task,
                                time.perf_counter() - start)
    return outcomes


def _judge(verb: str, code: int, err: str, model: Path, photos: Path, workdir: Path, slim_out: Path, int8_out: Path,
           task: str, seconds: float) -> Outcome:
    lines = [ln for ln in err.splitlines() if ln.startswith("onnxprune: error:")]
    if "Traceback" in err:
        return Outcome(verb, "failed", "traceback: " + err.strip().splitlines()[-1], seconds)
    if verb == "slim" and code == 2 and lines and "no prunable channel" in lines[0]:
        return Outcome(verb, "unprunable", lines[0].removeprefix("onnxprune: error: "), seconds)
    if code != 0:
        return Outcome(verb, "failed", f"exit {code}: {lines[0] if lines else err.strip()[-200:]}", seconds)
    if verb == "analyze":
        return Outcome(verb, "ok", "", seconds)
    if verb in ("slim", "quantize"):
        produced = slim_out if verb == "slim" else int8_out
        why = check_output(model, produced, load_calibration(photos, onnx.load(str(model)), count=1))
        if why:
            return Outcome(verb, "failed", why, seconds)
        got, value = _fidelity_task(json.loads((workdir / ("s.json" if verb == "slim" else "q.json")).read_text()))
        if got != task:
            return Outcome(verb, "failed", f"fidelity measured as {got}, expected {task}", seconds)
        return Outcome(verb, "ok", f"{got} {value}", seconds)
    report = json.loads((workdir / "c.json").read_text())
    return Outcome(verb, "ok" if report.get("passed", True) else "failed", "", seconds)
