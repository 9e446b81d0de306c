"""The CI gate: is a slimmed candidate a valid, faithful, faster, smaller drop-in for the original?

Why a separate verb from ``slim``: the model that ships is often produced elsewhere (another run,
another tool, a hand edit), so the gate re-measures everything from the two files alone and turns
it into an exit code, a JUnit report for the CI's test view and a Markdown table for the PR.
"""

from __future__ import annotations

import math
import os
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from .bench import _line, interleaved_times, ratio_quartiles
from .calibration.data import CalibrationSet
from .calibration.split import CalibrationSplit
from .errors import ConfigError, ModelLoadError
from .fidelity import TASKS, FidelityReport
from .graph.io import ModelLike, load_proto
from .graph.shapes import Shape, random_inputs, representative_shapes
from .progress import Progress
from .report import SCHEMA_VERSION, record_dict, shape_text
from .graph.runtime import check_batch, session
from .verify import interface

# Direction of each threshold, for people reading the report.
_OPS = {"fidelity": "≥", "fidelity_drop": "≤", "speedup": "≥", "size_ratio": "≤"}


@dataclass
class Criterion:
    """One gate: ``threshold`` None means measured for information only (always passes)."""

    name: str
    passed: bool
    value: float | None
    threshold: float | None
    detail: str

    @property
    def limit(self) -> str:
        return "—" if self.threshold is None else f"{_OPS.get(self.name, '')} {self.threshold:g}".strip()

    @property
    def shown(self) -> str:
        return "—" if self.value is None else f"{self.value:.4g}"


@dataclass(frozen=True)
class LatencyReport:
    """How the speed-up was timed (``--min-speedup``), and both models' latencies, for the report's chart."""

    provider: str
    threads: int
    runs: int  # interleaved rounds
    input_shapes: dict[str, list[int]]
    median_ms: list[float]  # original, candidate
    p90_ms: list[float]  # original, candidate
    speedup_iqr: list[float]  # p25, p75 of the per-round original/candidate ratios

    def to_dict(self) -> dict[str, Any]:
        return record_dict(self)


@dataclass
class CheckReport:
    original: str
    candidate: str
    criteria: list[Criterion]
    notes: list[str] = field(default_factory=list)
    fidelity: FidelityReport | None = None  # on every calibration sample
    latency: LatencyReport | None = None

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.criteria)

    @property
    def exit_code(self) -> int:
        """0 when every criterion passes, 1 otherwise (usage errors never get here: they raise)."""
        return 0 if self.passed else 1

    def to_dict(self) -> dict[str, Any]:
        return {"schema": SCHEMA_VERSION, "kind": "check", "passed": self.passed, "exit_code": self.exit_code,
                **record_dict(self)}

    def summary(self) -> str:
        lines = [f"check {self.candidate} against {self.original}: {'PASSED' if self.passed else 'FAILED'}"]
        for c in self.criteria:
            lines.append(f"  {'ok  ' if c.passed else 'FAIL'} {c.name:14s} {c.shown:>10s}  {c.limit:>8s}  {c.detail}")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)

    def to_junit_xml(self) -> str:
        """One <testcase> per criterion in one <testsuite name="onnxprune-check">; failures carry a message."""
        failures = sum(not c.passed for c in self.criteria)
        suite = ET.Element("testsuite", name="onnxprune-check", tests=str(len(self.criteria)),
                           failures=str(failures), errors="0", skipped="0")
        props = ET.SubElement(suite, "properties")
        for key, val in (("original", self.original), ("candidate", self.candidate)):
            ET.SubElement(props, "property", name=key, value=val)
        for c in self.criteria:
            case = ET.SubElement(suite, "testcase", name=c.name, classname="onnxprune.check")
            text = f"{c.name} = {c.shown} (threshold {c.limit}): {c.detail}"
            if not c.passed:
                ET.SubElement(case, "failure", message=text, type="ThresholdFailed").text = text
            else:
                ET.SubElement(case, "system-out").text = text
        return ET.tostring(suite, encoding="unicode", xml_declaration=True) + "\n"

    def to_markdown(self) -> str:
        """A table for a PR comment; ℹ️ marks values measured without a threshold."""
        head = "✅ passed" if self.passed else "❌ failed"
        lines = [f"### onnxprune check: {head}", "",
                 f"`{_md(self.candidate)}` vs `{_md(self.original)}`", "",
                 "| | criterion | value | threshold | detail |", "|---|---|---|---|---|"]
        for c in self.criteria:
            mark = "❌" if not c.passed else ("ℹ️" if c.threshold is None and c.name != "validity" else "✅")
            lines.append(f"| {mark} | {c.name} | {c.shown} | {_md(c.limit)} | {_md(c.detail)} |")
        lines += [""] + [f"> {_md(n)}" for n in self.notes] if self.notes else []
        return "\n".join(lines) + "\n"


def check(original: ModelLike, candidate: ModelLike, *, calibration: CalibrationSet | None = None,
          task: str = "auto", min_fidelity: float | None = None, max_drop: float | None = None,
          min_speedup: float | None = None, max_size_ratio: float | None = None, runs: int = 30,
          warmup: int = 3, seed: int = 0, progress: Progress | None = None) -> CheckReport:
    """Gate ``candidate`` against ``original``; see :class:`CheckReport` for how results are reported.

    Validity (checker, ORT load, unchanged interface) is always checked and the size ratio always
    measured; fidelity needs ``calibration`` and is measured on all of its samples (nothing here is
    fitted, so nothing needs holding out); speed is timed only when ``min_speedup`` is set.
    ``min_fidelity`` applies to the task metric when ``task`` is given (detection AP, embedding mean
    cosine, top-1 agreement), else to the mean cosine of the raw outputs; ``max_drop`` bounds 1 - metric.
    """
    _check_options(task, min_fidelity, max_drop, min_speedup, max_size_ratio, runs, warmup)
    if calibration is None and (min_fidelity is not None or max_drop is not None):
        raise ConfigError("--min-fidelity/--max-drop need calibration data (--calib)")
    orig, cand = load_proto(original), load_proto(candidate)
    names = (_name(original, "original"), _name(candidate, "candidate"))
    criteria, notes = [], []

    problems, ref_sess = _validity(orig, cand)
    criteria.append(Criterion("validity", not problems, None, None,
                              "; ".join(problems) if problems else "checker, ONNX Runtime load and interface ok"))
    valid = not problems
    skipped = "not measured: the candidate is invalid"

    report: FidelityReport | None = None
    if calibration is not None:
        if valid:
            metric, detail, report = _fidelity(orig, cand, ref_sess, calibration, task)
            ok = metric is not None and (min_fidelity is None or metric >= min_fidelity)
            criteria.append(Criterion("fidelity", ok, metric, min_fidelity, detail))
            if max_drop is not None:
                drop = None if metric is None else 1.0 - metric
                criteria.append(Criterion("fidelity_drop", drop is not None and drop <= max_drop, drop, max_drop,
                                          f"1 - {detail}"))
        else:
            criteria.append(Criterion("fidelity", min_fidelity is None and max_drop is None, None, min_fidelity,
                                      skipped))

    latency = None
    if min_speedup is not None:
        if valid:
            speed, latency = _speed(orig, cand, ref_sess, calibration, min_speedup, runs, warmup, seed, progress)
            criteria.append(speed)
        else:
            criteria.append(Criterion("speedup", False, None, min_speedup, skipped))

    size = cand.ByteSize() / max(orig.ByteSize(), 1)
    criteria.append(Criterion("size_ratio", max_size_ratio is None or size <= max_size_ratio, size, max_size_ratio,
                              f"candidate/original serialized bytes ({cand.ByteSize():,} / {orig.ByteSize():,})"))
    if calibration is None:
        notes.append("no calibration data: fidelity not measured")
    return CheckReport(names[0], names[1], criteria, notes, report, latency)


# ------------------------------------------------------------------------------------------------ pieces
def _validity(orig: onnx.ModelProto, cand: onnx.ModelProto) -> tuple[list[str], ort.InferenceSession]:
    """Problems that make ``cand`` no drop-in for ``orig`` (empty list: valid), and the original's session."""
    try:
        ref_sess = session(orig)
    except Exception as exc:
        raise ModelLoadError(f"ONNX Runtime cannot load the original model: {_line(exc)}") from None
    problems: list[str] = []
    try:
        onnx.checker.check_model(cand)
    except (onnx.checker.ValidationError, ValueError) as exc:
        problems.append(f"onnx.checker: {_line(exc)}")
    try:
        session(cand)
    except Exception as exc:  # ORT raises several unrelated types
        problems.append(f"ONNX Runtime cannot load it: {_line(exc)}")
    (oi, oo), (ci, co) = interface(orig), interface(cand)
    problems += _interface_problems("input", oi, ci) + _interface_problems("output", oo, co)
    return problems, ref_sess


def _interface_problems(kind: str, ref: list[tuple], got: list[tuple]) -> list[str]:
    """Same names in the same order, same element types, compatible dims.

    A fixed dim may become symbolic (more general); a symbolic one must not become fixed, or the
    candidate stops accepting the resolutions/batches the original took.
    """
    if [r[0] for r in ref] != [g[0] for g in got]:
        return [f"{kind}s changed: {[r[0] for r in ref]} -> {[g[0] for g in got]}"]
    out = []
    for (name, rt, rd), (_, gt, gd) in zip(ref, got):
        if rt != gt:
            out.append(f"{kind} {name}: element type {onnx.TensorProto.DataType.Name(rt)} -> "
                       f"{onnx.TensorProto.DataType.Name(gt)}")
        elif rd is not None and gd is not None:
            if len(rd) != len(gd):
                out.append(f"{kind} {name}: rank {len(rd)} -> {len(gd)}")
            for i, (a, b) in enumerate(zip(rd, gd)):
                if isinstance(a, str) and not isinstance(b, str):
                    out.append(f"{kind} {name}: dim {i} was symbolic ({a}), now fixed to {b}")
                elif isinstance(a, int) and isinstance(b, int) and a != b:
                    out.append(f"{kind} {name}: dim {i} {a} -> {b}")
    return out


def _fidelity(orig: onnx.ModelProto, cand: onnx.ModelProto, ref_sess: ort.InferenceSession,
              calibration: CalibrationSet, task: str) -> tuple[float | None, str, FidelityReport | None]:
    """(metric, what it is, full report) on every calibration sample; metric None if the candidate broke."""
    shapes = {i.name: tuple(d if isinstance(d, int) else 1 for d in i.shape) for i in ref_sess.get_inputs()}
    split = CalibrationSplit.split(calibration, 1.0, shapes)  # every sample is measured
    check_batch(orig, split.input_name)  # a batch fixed to 1 runs sample by sample; N > 1 is refused
    wanted = "outputs" if task == "auto" else task
    try:
        ref_sess.run(None, {split.input_name: calibration.batches[0][:1]})
    except Exception as exc:
        raise ConfigError(f"calibration data does not fit the original model: {_line(exc)}") from None
    try:
        report = split.evaluate(orig, cand, wanted)
    except Exception as exc:
        try:  # is it the task that does not fit these outputs, or the candidate that broke?
            split.evaluate(orig, orig, wanted)
        except Exception:
            raise ConfigError(f"--task {task} does not fit the model's outputs: {_line(exc)}") from None
        return None, f"the candidate failed on the calibration data: {_line(exc)}", None
    on = f" on {report.n_inputs} calibration inputs"
    if wanted == "detection":
        return _need(report.detection_ap, task), "detection AP@0.5 vs the original's boxes" + on, report
    if wanted == "embedding":
        return _need((report.embedding or {}).get("mean_cosine"), task), "embedding mean cosine" + on, report
    if wanted == "classification":
        return _need(report.top1_agreement, task), "top-1 agreement" + on, report
    worst = min(report.outputs, key=lambda o: o.cosine)
    mean = float(np.mean([o.cosine for o in report.outputs]))
    return mean, f"mean output cosine{on} (worst: {worst.name} {worst.cosine:.4f})", report


def _speed(orig: onnx.ModelProto, cand: onnx.ModelProto, ref_sess: ort.InferenceSession,
           calibration: CalibrationSet | None, min_speedup: float, runs: int, warmup: int, seed: int,
           progress: Progress | None = None) -> tuple[Criterion, LatencyReport | None]:
    """Median per-round original/candidate latency ratio, both timed interleaved on one thread
    (and the latencies themselves, for the report's chart)."""
    shapes = _speed_shapes(orig, calibration)
    feeds = random_inputs(ref_sess, shapes, np.random.default_rng(seed))
    try:
        ref_sess.run(None, feeds)
    except Exception as exc:
        raise ConfigError(f"the original model cannot run at {shape_text(shapes)}: {_line(exc)}") from None
    try:
        times = interleaved_times([session(orig, 1), session(cand, 1)], feeds, runs, warmup, seed, progress)
    except Exception as exc:  # the original just ran on these feeds, so the candidate is at fault
        return Criterion("speedup", False, None, min_speedup, f"the candidate failed to run: {_line(exc)}"), None
    q25, q50, q75 = ratio_quartiles(times[:, 0], times[:, 1])
    med = np.median(times, axis=0)
    latency = LatencyReport(provider="CPUExecutionProvider", threads=1, runs=runs,
                            input_shapes={k: list(v) for k, v in shapes.items()}, median_ms=[float(m) for m in med],
                            p90_ms=[float(p) for p in np.percentile(times, 90, axis=0)],
                            speedup_iqr=[float(q25), float(q75)])
    return Criterion("speedup", bool(q50 >= min_speedup), float(q50), min_speedup,
                     f"original/candidate latency, median of {runs} interleaved rounds (IQR {q25:.3f}..{q75:.3f}); "
                     f"{med[0]:.3f} -> {med[1]:.3f} ms at {shape_text(shapes)}, 1 thread"), latency


def _need(value: float | None, task: str) -> float:
    if value is None or math.isnan(value):
        raise ConfigError(f"--task {task} gave no metric for this model")
    return float(value)


def _speed_shapes(orig: onnx.ModelProto, calibration: CalibrationSet | None) -> dict[str, Shape]:
    """Time at the deployment resolution (one calibration sample) when known, else the default shape."""
    if calibration is not None:
        sample = calibration.samples()[:1]
        return representative_shapes(orig, {calibration.name: tuple(sample.shape)})
    return representative_shapes(orig)


def _check_options(task: str, min_fidelity: float | None, max_drop: float | None, min_speedup: float | None,
                   max_size_ratio: float | None, runs: int, warmup: int) -> None:
    if task not in TASKS:
        raise ConfigError(f"--task must be one of {', '.join(TASKS)}, got {task!r}")
    for flag, value, lo, hi in (("--min-fidelity", min_fidelity, 0.0, 1.0), ("--max-drop", max_drop, 0.0, 1.0),
                                ("--min-speedup", min_speedup, 0.0, math.inf),
                                ("--max-size-ratio", max_size_ratio, 0.0, math.inf)):
        if value is not None and not (lo <= value <= hi and math.isfinite(value)):
            raise ConfigError(f"{flag} must be in [{lo:g}, {hi:g}], got {value}")
    if runs < 1 or warmup < 0:
        raise ConfigError(f"--runs must be >= 1 and warmup >= 0, got {runs} and {warmup}")


def _name(model: ModelLike, default: str) -> str:
    return str(model) if isinstance(model, (str, os.PathLike)) else default


def _md(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")
